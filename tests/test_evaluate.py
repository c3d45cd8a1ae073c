"""evaluate.py: metrics equal to sacrebleu's command line and jiwer, the decoding paths, the alignment
degree, resumption after a kill, the figures, and clear errors before any model loads."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
from conftest import TINY_QFORMER

# ---------------------------------------------------------------- metrics

SETS = {   # (target language, hypotheses, references): empty and whitespace-only hypotheses included
    "zh": (["今天天气很好。", "", "   ", "我们去公园散步吧", "你好，世界！他说：“好的。”", "2024年11月21日"],
           ["今天天气很好。", "我们去公园。", "你好", "我们去公园散步吧。", "你好世界！他说好的。", "2024年11月21日。"]),
    "ja": (["こんにちは、世界。", "", " \t ", "カタカナとひらがなと漢字。", "今日は良い天気です", "東京へ行きます。"],
           ["こんにちは世界。", "ありがとう。", "はい", "カタカナとひらがなと漢字です。", "今日はいい天気です。", "東京に行きます。"]),
    "de": (["Das ist ein Test.", "", "  ", "Hallo Welt, wie geht's?", "Zahlen: 12345 und 3,14.",
            "Er sagte: \"Nein.\""],
           ["Das ist ein Test.", "Guten Morgen.", "Ja", "Hallo, Welt! Wie geht es?", "Zahlen: 12345 und 3,14",
            "Er sagte \"nein\"."]),
}


@pytest.mark.parametrize("lang", sorted(SETS))
def test_bleu_and_chrf_equal_sacrebleus_command_line(lang, tmp_path):
    hyps, refs = SETS[lang]
    tok = evaluate.bleu_tokenizer(lang)
    assert tok == {"zh": "zh", "ja": "ja-mecab", "de": "13a"}[lang]
    ours = evaluate.translation_scores(hyps, refs, tok)
    (tmp_path / "h.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    (tmp_path / "r.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    # sacrebleu's own command line, as a reader would run it on the files (it reads lines, strips their ends)
    cmd = [sys.executable, "-m", "sacrebleu", str(tmp_path / "r.txt"), "-i", str(tmp_path / "h.txt"),
           "-m", "bleu", "chrf", "-tok", tok, "--format", "json", "-w", "6"]
    bleu, chrf = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert bleu["signature"] == ours["bleu_signature"] and chrf["signature"] == ours["chrf_signature"]
    assert bleu["score"] == float(f"{ours['bleu']:.6f}") and chrf["score"] == float(f"{ours['chrf']:.6f}")
    assert 0 < ours["bleu"] < 100 and f"tok:{tok}" in ours["bleu_signature"]


def test_bleu_tokenizer_choice():
    tokenizers = [evaluate.bleu_tokenizer(x) for x in ("zh", "ja", "en", "de", "tr")]
    assert tokenizers == ["zh", "ja-mecab", "13a", "13a", "13a"]
    for lang in ("th", "ko", "yue"):
        with pytest.raises(ValueError, match=f"no BLEU tokenizer is known for target language '{lang}'"):
            evaluate.bleu_tokenizer(lang)


def test_one_line_hypotheses_score_as_sacrebleu_scores_them():
    # a newline inside a hypothesis would shift every later line of a text file; the score does not change
    a = evaluate.translation_scores(["我们去\n公园。", "今天"], ["我们去公园。", "今天天气"], "zh")
    b = evaluate.translation_scores(["我们去 公园。", "今天"], ["我们去公园。", "今天天气"], "zh")
    assert a == b


WER_REFS = ["HE HOPED THERE WOULD BE STEW FOR DINNER", "MISTER SMITH PAID TWENTY DOLLARS IN NINETEEN NINETY NINE",
            "THE COLOUR OF THE SKY", "UH I THINK SO", "A B C D"]
WER_HYPS = ["He hoped there would be stew for dinner.", "Mr. Smith paid $20 in 1999.", "the color of a sky",
            "", "a b x d e"]


def test_wer_equals_jiwer_on_the_same_normalised_text():
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    ours = evaluate.wer_scores(WER_HYPS, WER_REFS, "whisper-en")
    assert ours["wer"] == jiwer.wer([norm(r) for r in WER_REFS], [norm(h) for h in WER_HYPS])
    # by hand: sentences 1-2 are equal after normalisation ("mister"/"mr", "$20"/"twenty dollars",
    # "1999"), sentence 3 has one substitution (colour->color is normalised), 4 is 3 deletions ("uh" is
    # a filler and goes), 5 one substitution and one insertion
    assert (ours["substitutions"], ours["deletions"], ours["insertions"]) == (2, 3, 1)
    assert ours["ref_words"] == 8 + 6 + 5 + 3 + 4
    assert ours["wer"] == pytest.approx(6 / 26)
    basic = evaluate.wer_scores(WER_HYPS, WER_REFS, "basic")   # jiwer's transforms alone: formatting counts
    assert basic["wer"] > ours["wer"]


def test_whisper_normaliser_is_openai_whispers():
    """The `whisper-normalizer` package gives what transformers' port of openai-whisper's normaliser gives."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer as HF
    import whisper_normalizer
    from importlib.resources import files
    from whisper_normalizer.english import EnglishTextNormalizer

    spelling = json.loads((files(whisper_normalizer) / "normalizers" / "english.json").read_text())
    ours, hf = EnglishTextNormalizer(), HF(spelling)
    for s in WER_REFS + WER_HYPS + ["It's 3:30 p.m., isn't it? We've got £5.50 and 1st place in the '90s!"]:
        assert ours(s) == hf(s), s


def test_alignment_degree_is_the_mean_of_logs():
    rows = [{"w": {"0": 1.0, "1": math.e ** 2}, "w_converged": {"0": True, "1": True}},
            {"w": {"0": math.e, "1": math.e ** 4}, "w_converged": {"0": True, "1": False}}]
    a = evaluate.alignment_degree(rows, [0, 1])
    assert a["mean_log_w"] == pytest.approx((0 + 2 + 1 + 4) / 4)
    assert a["per_layer"]["0"]["mean_log_w"] == pytest.approx(0.5) and a["per_layer"]["1"]["unconverged"] == 1
    assert a["per_layer"]["1"]["mean_w"] == pytest.approx((math.e ** 2 + math.e ** 4) / 2)


# ---------------------------------------------------------------- a tiny speech LLM and a test set

WORDS = [("hello world", "你好世界"), ("this is a test", "这是一个测试"), ("numbers and spaces", "数字和空格"),
         ("new lines", "新行"), ("it's fine", "没关系"), ("the tokenizer", "分词器"), ("good morning", "早上好")]


@pytest.fixture(scope="module")
def tiny(tiny_ckpts, tmp_path_factory):
    """A stage-1 checkpoint of a tiny speech LLM (LoRA B made non-zero), the model, and a manifest of
    generated audio with st_en_zh entries."""
    from model import SpeechLLM

    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(1)   # the bridge's initial biases: the same model whatever ran before
    model = SpeechLLM.from_pretrained(tiny_ckpts["llm"], tiny_ckpts["whisper"], tiny_ckpts["beats"],
                                      dtype=torch.float32, qformer=TINY_QFORMER, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:   # a trained-looking bridge: larger weights give varied, not constant, outputs
                p.normal_(0, 0.5 if "lora_B" in n else 0.2) if p.ndim > 1 else None
    model.save_trainable(d / "stage1")
    (d / "clips").mkdir()
    lines = []
    for i, (en, zh) in enumerate(WORDS):
        t = np.arange(int((1.0 + 0.25 * i) * 16000)) / 16000
        sf.write(d / "clips" / f"{i}.flac", (0.2 * np.sin(2 * np.pi * (180 + 60 * i) * t)).astype(np.float32), 16000)
        lines.append(json.dumps({"id": f"utt{i}", "audio": f"clips/{i}.flac", "task": "st", "lang": "en",
                                 "tgt_lang": "zh", "transcript": en, "translation": zh}, ensure_ascii=False))
    (d / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dict(dir=d, ckpt=d / "stage1", model=model, manifest=d / "test.jsonl", ckpts=tiny_ckpts)


def speech_of(tiny, ids):
    """The bridge's output for clips `ids` batched together, through data.SpeechDataset and collate."""
    import data

    ds = data.SpeechDataset(tiny["manifest"])
    return evaluate.encode(tiny["model"], ds.collate([ds[i] for i in ids]), "cpu")


def test_generate_equals_speech_llm_generate(tiny):
    model, instr = tiny["model"], ["Listen to the speech and translate it into Chinese."] * 3
    speech = speech_of(tiny, [0, 1, 2])
    texts, n = evaluate.generate(model, instr, speech=speech, num_beams=4, max_new_tokens=10)
    assert texts == model.generate(speech, instr, num_beams=4, max_new_tokens=10)
    assert all(0 <= k <= 10 for k in n) and len(set(texts)) > 1


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_decoding_equals_each_utterance_alone(tiny, num_beams):
    """From the bridge's output on (a padded batch of audio changes BEATs' output: see the end-to-end test)."""
    model, instr = tiny["model"], "Listen to the speech and translate it into Chinese."
    speech = speech_of(tiny, [0, 1, 2, 3])
    kw = dict(num_beams=num_beams, max_new_tokens=10)
    batched = evaluate.generate(model, [instr] * 4, speech=speech, **kw)
    alone = [evaluate.generate(model, [instr], speech=speech[i:i + 1], **kw) for i in range(4)]
    assert batched == ([a[0][0] for a in alone], [a[1][0] for a in alone])
    # zero-shot from transcripts of different lengths: left padding
    texts = [en for en, _ in WORDS[:4]]
    batched = evaluate.generate(model, [instr] * 4, transcripts=texts, **kw)
    alone = [evaluate.generate(model, [instr], transcripts=[t], **kw) for t in texts]
    assert batched == ([a[0][0] for a in alone], [a[1][0] for a in alone])


def test_zero_shot_prompt_is_the_training_prompt_with_the_transcript_in_the_slot(tiny):
    model = tiny["model"]
    instr, transcript, target = "Listen to the speech and translate it into Chinese.", "this is a test", "这是一个测试"
    tr_ids = model.tokenizer.encode(transcript)
    train = model.prompter.build([instr], [88], targets=[target])          # the speech pass of training
    row = train.input_ids[0][train.attention_mask[0]].tolist()
    slot = train.slot_mask[0][train.attention_mask[0]].tolist()
    start, end = slot.index(True), len(slot) - slot[::-1].index(True)
    prompt_end = (train.labels[0] != -100).nonzero()[0].item()            # where the target begins
    expected = row[:start] + tr_ids + row[end:prompt_end]
    # the prompt SpeechLLM.generate builds from transcripts (left-padded) and the text pass's: the same ids
    for pad_left in (True, False):
        zs = model.prompter.build([instr, instr], [tr_ids, model.prompter.text_ids("hello world", "t")],
                                  pad_left=pad_left)
        assert zs.input_ids[0][zs.attention_mask[0]].tolist() == expected
    # the speech path with the transcript's embeddings in the slot decodes the same tokens
    emb = model.llm.model.embed_tokens(torch.tensor([tr_ids]))
    assert (evaluate.generate(model, [instr], speech=emb, num_beams=4, max_new_tokens=8)
            == evaluate.generate(model, [instr], transcripts=[transcript], num_beams=4, max_new_tokens=8))


# ---------------------------------------------------------------- the command line

def cli(tiny, out, *extra, data=None):
    return evaluate.main(["--ckpt", str(tiny["ckpt"]), "--data", str(data or tiny["manifest"]), "--task", "st_en_zh",
                          "--out", str(out), "--batch-size", "3", "--max-new-tokens", "8", "--device", "cpu",
                          "--workers", "0", "--no-progress", *extra])


def test_decode_end_to_end_with_alignment_degree(tiny, tmp_path):
    import sinkhorn

    m = cli(tiny, tmp_path / "run", "--align-layers", "0,1")
    rows = [json.loads(l) for l in (tmp_path / "run" / "hyps.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"utt{i}" for i in range(len(WORDS))]
    assert [r["reference"] for r in rows] == [zh for _, zh in WORDS] and rows[2]["source"] == WORDS[2][0]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    again = evaluate.translation_scores([r["hypothesis"] for r in rows], [r["reference"] for r in rows], "zh")
    assert (m["bleu"], m["chrf"], m["bleu_signature"]) == (again["bleu"], again["chrf"], again["bleu_signature"])
    assert m["hit_length_limit"] == sum(r["n_tokens"] == 8 for r in rows) and m["num_utterances"] == len(WORDS)
    assert m["empty_hypotheses"] == sum(r["hypothesis"] == "" for r in rows)
    assert (tmp_path / "run" / "hyps.txt").read_text(encoding="utf-8").count("\n") == len(WORDS)
    assert m["throughput"]["utterances"] == len(WORDS) and m["throughput"]["utt_per_s"] > 0
    # the alignment degree is the mean of ln ot_loss over utterances and layers, recomputed here batch by
    # batch as the run composed them (a pair alone equals it in a padded batch: tests/test_sinkhorn.py;
    # here the batch matters for the audio: in a padded batch BEATs' output for a shorter clip is not what it
    # is alone, by SALMONN's token-mask reduction, and the Q-Former attends to the padded frames)
    model, instr = tiny["model"], "Listen to the speech and translate it into Chinese."
    logs = []
    for start in range(0, len(WORDS), 3):
        ids = range(start, min(start + 3, len(WORDS)))
        sp = model.speech_pass(speech_of(tiny, ids), [instr] * len(ids), layers=[0, 1])
        tx = model.text_pass([WORDS[i][0] for i in ids], [instr] * len(ids), [0, 1])
        for l in (0, 1):
            w = sinkhorn.ot_loss(sp.hidden_states[l], tx.hidden_states[l], sp.mask, tx.mask).tolist()
            for i, wi in zip(ids, w):
                assert rows[i]["w"][str(l)] == wi   # the same computation on the same inputs: deterministic
                logs.append(math.log(wi))
    assert m["alignment"]["mean_log_w"] == pytest.approx(sum(logs) / len(logs), rel=1e-12)   # summation order
    assert m["alignment"]["layers"] == [0, 1]


def test_text_input_scores_zero_shot_translation(tiny, tmp_path):
    m = cli(tiny, tmp_path / "mt", "--text-input", "--greedy")
    rows = [json.loads(l) for l in (tmp_path / "mt" / "hyps.jsonl").read_text(encoding="utf-8").splitlines()]
    instr = "Listen to the speech and translate it into Chinese."
    texts, _ = evaluate.generate(tiny["model"], [instr] * 3, transcripts=[en for en, _ in WORDS[:3]],
                                 num_beams=1, max_new_tokens=8)
    assert [r["hypothesis"] for r in rows[:3]] == texts
    assert m["text_input"] and m["settings"]["num_beams"] == 1 and "bleu" in m


def test_resume_after_a_kill_gives_the_same_hyps(tiny, tmp_path, monkeypatch):
    cli(tiny, tmp_path / "full")
    full = (tmp_path / "full" / "hyps.jsonl").read_bytes()

    real, calls = evaluate.decode_batch, []

    def dies_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt   # what a kill between two batches leaves
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "decode_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cli(tiny, tmp_path / "cut")
    monkeypatch.setattr(evaluate, "decode_batch", real)
    part = (tmp_path / "cut" / "hyps.jsonl").read_bytes()
    assert part == full[:len(part)] and part.count(b"\n") == 3          # the first batch only
    # a kill in the middle of writing the second batch: one whole line and half of the next
    lines = full.splitlines(keepends=True)
    (tmp_path / "cut" / "hyps.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:len(lines[4]) // 2])
    m = cli(tiny, tmp_path / "cut")
    assert (tmp_path / "cut" / "hyps.jsonl").read_bytes() == full
    assert m["throughput"]["resumed_after"] == 4 and m["throughput"]["utterances"] == len(WORDS) - 4
    assert cli(tiny, tmp_path / "cut")["throughput"]["utterances"] == 0   # done: nothing decoded again
    # the manifest changed since: its reference no longer matches the one in hyps.jsonl
    (tmp_path / "clips").symlink_to(tiny["dir"] / "clips")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(tiny["manifest"].read_text(encoding="utf-8"), encoding="utf-8")
    cli(tiny, tmp_path / "stale", "--limit", "3", data=manifest)
    manifest.write_text(manifest.read_text(encoding="utf-8").replace("你好世界", "你好"), encoding="utf-8")
    with pytest.raises(SystemExit, match="hyps.jsonl:1: the reference of 'utt0' differs from the manifest's"):
        cli(tiny, tmp_path / "stale", "--limit", "3", data=manifest)


def test_one_file(tiny, capsys):
    text = evaluate.main(["--ckpt", str(tiny["ckpt"]), "--audio", str(tiny["dir"] / "clips" / "2.flac"),
                          "--task", "st_en_zh", "--max-new-tokens", "8", "--device", "cpu"])
    [expected], _ = evaluate.generate(tiny["model"], ["Listen to the speech and translate it into Chinese."],
                                      speech=speech_of(tiny, [2]), max_new_tokens=8)
    assert text == expected and capsys.readouterr().out.strip() == expected.strip()


def test_figures(tiny, tmp_path):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):   # t-SNE's OpenMP threads on a busy 2-core machine: seconds instead of 0.1 s
        s = evaluate.main(["--ckpt", str(tiny["ckpt"]), "--compare", str(tiny["ckpt"]), "--data", str(tiny["manifest"]),
                           "--figure5", "--num-pairs", "6", "--out", str(tmp_path / "f5"), "--labels", "base",
                           "again", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert [p["label"] for p in s["panels"]] == ["base", "again"] and len(s["panels"][0]["speech_2d"]) == 6
    assert s["panels"][0]["modality_gap"] == s["panels"][1]["modality_gap"] > 0   # same checkpoint twice
    assert (tmp_path / "f5" / "figure5.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = []
    for i, (lw, bleu) in enumerate([(3.1, 40.0), (2.5, 41.2), (2.2, 41.9)]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(
            {"task": "st_en_zh", "bleu": bleu, "alignment": {"layers": [0, 1], "mean_log_w": lw}}))
        paths.append(str(tmp_path / f"r{i}" / "metrics.json"))
    r = evaluate.main(["--figure6", *paths, "--out", str(tmp_path / "f6")])
    assert [p["label"] for p in r["points"]] == ["r0", "r1", "r2"] and r["pearson_r"] < -0.95
    assert (tmp_path / "f6" / "figure6.png").stat().st_size > 1000
    (tmp_path / "r2" / "metrics.json").write_text(json.dumps({"task": "st_en_zh", "bleu": 41.9}))
    with pytest.raises(SystemExit, match=r"r2/metrics.json: no alignment degree \(run evaluate.py with --align-layers"):
        evaluate.main(["--figure6", *paths, "--out", str(tmp_path / "f6")])


# ---------------------------------------------------------------- bad input: clear errors before any model loads

def _write(path, entries):
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


def test_bad_input_fails_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys):
    import shutil

    from model import SpeechLLM

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(SpeechLLM, "from_pretrained", no_loading)
    good = [json.loads(l) for l in tiny["manifest"].read_text(encoding="utf-8").splitlines()]
    for e in good:
        e["audio"] = str(tiny["dir"] / e["audio"])

    def fails(match, *argv, data=None):
        with pytest.raises(SystemExit) as info:
            cli(tiny, tmp_path / "out", *argv, data=data)
        assert info.value.code != 0
        msg = str(info.value.code) + capsys.readouterr().err
        assert match in msg, msg

    no_ref = [dict(e) for e in good]
    del no_ref[3]["translation"]
    fails("noref.jsonl:4: field 'translation' is missing (a 'st' entry needs lang, tgt_lang, transcript, translation)",
          data=_write(tmp_path / "noref.jsonl", no_ref))
    other_task = [dict(e) for e in good]
    other_task[1].update(task="asr")
    fails("entry 2 (id 'utt1'): task 'asr', but --task is 'st_en_zh'", data=_write(tmp_path / "task.jsonl", other_task))
    no_audio = [dict(e) for e in good]
    no_audio[5]["audio"] = str(tmp_path / "nowhere.flac")
    fails("audio.jsonl: 1 of 7 audio files are missing (utt5: ", data=_write(tmp_path / "audio.jsonl", no_audio))
    fails("unknown task 'translate'", "--task", "translate")
    fails("no BLEU tokenizer is known for target language 'th'", "--task", "st_en_th", "--instruction", "Translate.")
    fails("no instruction for task 'st_en_th'", "--task", "st_en_th", "--bleu-tokenize", "char")
    fails("--text-input is zero-shot translation: --task must be st_<src>_<tgt>, not 'aac'",
          "--task", "aac", "--text-input")
    fails("layer(s) [7] outside 0..3", "--align-layers", "0,7")
    with pytest.raises(SystemExit, match="nowhere.mp3"):
        evaluate.main(["--ckpt", str(tiny["ckpt"]), "--audio", str(tmp_path / "nowhere.mp3"), "--task", "st_en_zh"])
    (tmp_path / "file").write_text("x")
    fails("cannot write there", "--out", str(tmp_path / "file" / "sub"))
    # a checkpoint trained on another backbone: an LLM directory whose config says hidden_size 64
    other = tmp_path / "other_llm"
    shutil.copytree(tiny["ckpts"]["llm"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, hidden_size=64)))
    fails("was trained on an LLM with hidden_size=32, but", "--llm", str(other))
    # a resumed run with other settings, and a stale reference
    with pytest.raises(AssertionError, match="the model was loaded"):   # all checks passed: run.json written
        cli(tiny, tmp_path / "out", "--greedy")
    row = dict(id="utt0", hypothesis="x", reference=WORDS[0][1], source=WORDS[0][0], n_tokens=1)
    (tmp_path / "out" / "hyps.jsonl").write_text(json.dumps(row) + "\n")
    fails("holds a run with other settings (num_beams: 1 then, 4 now)")
    (tmp_path / "out" / "hyps.jsonl").write_text(json.dumps(dict(row, id="utt99")) + "\n")
    fails("hyps.jsonl:1: id 'utt99' is not among the manifest's entries", "--greedy")
