"""The toy world: determinism, the grammar's properties, the audio against its manifests, and the base
models in their public layouts (loaded by our loaders and by transformers' where one exists)."""
import dataclasses
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import toy
from model import BEATs, BEATsConfig, LLM, WhisperEncoder, load_tokenizer

# a world far smaller than --quick: a few clips per split, two or three optimizer steps per model (the LLM's
# one copy check fails: an untrained LLM does not copy)
MICRO = toy.Sizes(asr_train=6, asr_valid=2, aac_train=4, aac_valid=3, asr_test_clean=2, st_train=4, st_dev=2,
                  st_test=2, mt_test=3, llm_mt=60, llm_en=20, llm_zh=20, llm_steps=1, llm_max_steps=2, llm_decay=1,
                  llm_warmup=1, llm_rows=2, whisper_steps=2,
                  whisper_batch=4, beats_steps=2, beats_batch=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build(tmp_path_factory.mktemp("toy") / "world", seed=0, sizes=MICRO, workers=0)


def _digests(root: Path) -> dict[str, str]:
    skip = {"world.json", "base_models.json"}     # they hold wall-clock times
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def test_same_seed_same_bytes(world, tmp_path):
    """Text, audio, manifests, and (one torch thread, as in the tests) the weights: byte for byte."""
    again = toy.build(tmp_path / "again", seed=0, sizes=MICRO, workers=0)
    first, second = _digests(world), _digests(again)
    assert len(first) > 40 and first == second
    assert {"models/qwen2-toy/model-00001-of-00002.safetensors", "models/whisper-toy/model.safetensors",
            "models/beats-toy.pt", "audio/st_test/st_test-00001.flac", "text/mt_train.jsonl"} <= set(first)
    other = toy.write_world(tmp_path / "other", 1, MICRO, workers=1)      # another seed, another world
    assert other["st_test"] != toy.draw_sentences(0, MICRO)["st_test"]
    assert _digests(tmp_path / "other")["st_train.jsonl"] != first["st_train.jsonl"]


def test_cached_and_refused(world):
    stamp = (world / "world.json").stat().st_mtime_ns
    assert toy.build(world, seed=0, sizes=MICRO, workers=0) == world         # cached: nothing rebuilt
    assert (world / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another toy world"):
        toy.build(world, seed=1, sizes=MICRO, workers=0)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for argv, msg in ((["build", "--out", str(f)], "not a folder"), (["build", "--out", str(tmp_path), "--seed", "-1"],
                      "--seed must be >= 0"), (["build", "--out", str(tmp_path), "--threads", "0"], "--threads")):
        with pytest.raises(SystemExit):
            toy.main(argv)
        assert msg in capsys.readouterr().err


def test_splits_disjoint_and_sized(world):
    sents = toy.draw_sentences(0, MICRO)
    held = [en for split in toy.HELD_OUT for en, _ in sents[split]]
    assert len(held) == len(set(held))                                       # held-out sentences all distinct
    train = {en for split in ("asr_train", "st_train", "llm_mt", "llm_en", "llm_zh") for en, _ in sents[split]}
    assert not train & set(held)
    for split in toy.SPLITS:
        assert len(toy._read_jsonl(world / f"{split}.jsonl")) == getattr(MICRO, split)


def test_grammar_reorders_and_is_not_a_cipher():
    rng = np.random.default_rng(7)
    pairs = [toy.sample_sentence(rng) for _ in range(3000)]
    for en, zh in pairs:
        assert toy.MIN_WORDS <= len(en.split()) <= toy.MAX_WORDS and zh.endswith("。")
        assert sum(c != " " for c in en) <= toy.MAX_LETTERS and set(en) <= set(toy.CTC_ALPHABET[1:])
    # the subordinate clause comes first in Chinese wherever it stands in English
    because = [(en, zh) for en, zh in pairs if " because " in en]
    assert because and all(zh.startswith("因为") and "所以" in zh for _, zh in because)
    # a time adverb at the end of the English sentence moves before the verb
    late = [zh for en, zh in pairs if en.endswith(" yesterday") and "，" not in zh]
    assert late and all(zh.index("昨天") < len(zh) - 4 for zh in late)
    # one to many: the article takes the noun's classifier; a preposition becomes a circumposition
    assert any(" a dog" in f" {en}" for en, _ in pairs)
    for en, zh in pairs:
        if " a dog " in f" {en} ":
            assert "一只" in zh
        if " in the house" in en:
            assert "在房子里" in zh
        if en.startswith("the ") and " the " not in en[3:] and "，" not in zh:
            assert "the" not in zh                                           # `the` has no counterpart
    # many to one: "is running" -> 正在跑, "does not run" -> 不跑; agreement on the English side only
    dog, dogs = toy.Phrase(["the", "dog"], "狗"), toy.Phrase(["the", "dogs"], "狗", number="pl")
    run = toy.INTRANSITIVE[0]
    assert toy.verb_forms(dog, run, "present", False) == (["runs"], "", "跑")
    assert toy.verb_forms(dogs, run, "present", False) == (["run"], "", "跑")
    assert toy.verb_forms(dog, run, "progressive", False) == (["is", "running"], "正在", "跑")
    assert toy.verb_forms(dogs, run, "progressive", True) == (["are", "not", "running"], "没有在", "跑")
    assert toy.verb_forms(dog, run, "present", True) == (["does", "not", "run"], "不", "跑")
    assert toy.verb_forms(dog, run, "past", False) == (["ran"], "", "跑了")


def test_free_variation_words_the_chinese_only():
    # the world's English is the grammar's own stream, untouched by the wording
    sents = toy.draw_sentences(3, MICRO)
    rng = np.random.default_rng([3, 0])
    drawn = [en for split in toy.HELD_OUT for en, _ in sents[split]]
    assert drawn == [toy.sample_sentence(rng)[0] for _ in drawn]
    # the Chinese is the grammar's translation with each listed word in one of its forms, in place
    rng = np.random.default_rng(5)
    grammar = [toy.sample_sentence(rng)[1] for _ in range(2000)]
    varied = [toy.vary(zh, np.random.default_rng(i)) for i, zh in enumerate(grammar)]
    for a, b in zip(grammar, varied):
        parts = toy.ZH_VARIANT_RE.split(a)
        sites = toy.ZH_VARIANT_RE.findall(a)
        forms = ["(" + "|".join(map(re.escape, toy.ZH_VARIANTS[w])) + ")" for w in sites]
        assert re.fullmatch("".join(re.escape(t) + f for t, f in zip(parts, forms + [""])), b), (a, b)
    changed = sum(a != b for a, b in zip(grammar, varied)) / len(grammar)
    assert 0.5 < changed < 0.95
    taken = {w for a, b in zip(grammar, varied) for w, forms in toy.ZH_VARIANTS.items()
             if len(forms) > 1 and forms[1] in b and forms[1] not in a}
    assert len(taken) >= 40                   # nearly every alternative appears
    assert not any("不将" in b for b in varied) and any("不会" in b for b in varied)     # 不会 never varies


def test_ctc_path_spells_the_text():
    wav, letters = toy.synthesize("all good kids", np.random.default_rng(3), alignment=True)
    path = toy.ctc_path(letters, 300)
    assert toy.ctc_decode(torch.nn.functional.one_hot(path, len(toy.CTC_ALPHABET))[None].float()) == ["all good kids"]
    # the clip is the plan rounded to 5-ms frames, plus one frame
    assert 0 <= len(wav) / toy.SAMPLE_RATE - letters[-1][2] < 0.0076


def test_token_frames_spell_the_tokens(world):
    """The LLM token under each frame: merging runs and dropping silence gives back the tokenization (no two
    equal tokens follow each other in this sentence), at Whisper's 50 Hz and at BEATs' patch rate."""
    text = "the old dog did not see a big cat"
    _, letters = toy.synthesize(text, np.random.default_rng(5), alignment=True)
    tok = load_tokenizer(world / toy.PATHS["llm"])
    ids = tok.encode(text)
    for n, frame_s in ((300, toy.WHISPER_FRAME_S), (37, 0.16)):
        labels = toy.token_frames(tok.tok, letters, n, frame_s).tolist()
        runs = [k - 1 for i, k in enumerate(labels) if k and (i == 0 or labels[i - 1] != k)]
        assert runs == ids if frame_s < 0.1 else set(runs) <= set(ids) and len(runs) >= len(ids) // 2


def test_llm_documents_by_kind(world):
    """Each kind of pretraining document: its template and content (a random-word repeat copies words of the
    corpus that form no sentence of it)."""
    from model import INSTRUCTIONS, Prompter
    tok = load_tokenizer(world / toy.PATHS["llm"])
    corpus = toy.LLMCorpus(mt=[("the dog runs", "狗跑。"), ("a cat sleeps", "一只猫睡觉。")], en=["the dog runs"],
                           zh=["狗跑。"])
    assert corpus.words == ["a", "cat", "dog", "runs", "sleeps", "the"]
    rng = np.random.default_rng(0)
    docs = {k: toy.llm_documents(corpus, Prompter(tok, "qwen2"), tok, rng, 3, {k: 1.0})
            for k in ("randrep", "repeat", "st", "lines")}
    for kind, ds in docs.items():
        for d in ds:
            text = tok.tok.decode(d, skip_special_tokens=False)
            assert text.endswith("<|endoftext|>")
            if kind == "lines":
                assert "the dog runs = 狗跑。" in text or "a cat sleeps = 一只猫睡觉。" in text
                continue
            user, answer = text.split("<|im_start|>assistant\n")
            answer = answer.split("<|im_end|>")[0]
            assert any(i in user for i in (toy.REPEAT_INSTRUCTIONS + INSTRUCTIONS["asr"] if kind != "st" else
                                           INSTRUCTIONS["st_en_zh"]))
            if kind == "st":
                assert answer in ("狗跑。", "一只猫睡觉。")
            else:
                assert answer in user and set(answer.split()) <= set(corpus.words) and 3 <= len(answer.split()) <= 12 \
                    if kind == "randrep" else answer in ("the dog runs", "a cat sleeps")


def test_llm_documents_stretch(world):
    """A stretched repeat holds each source token for 1-3 positions and ends the source with 0-20 pauses: the
    slot, its runs collapsed and the pauses dropped, is the answer's tokens; held tokens and pauses occur."""
    from model import INSTRUCTIONS, Prompter
    tok = load_tokenizer(world / toy.PATHS["llm"])
    corpus = toy.LLMCorpus(mt=[("the dog runs", "狗跑。"), ("a cat sleeps", "一只猫睡觉。")], en=["the dog runs"],
                           zh=["狗跑。"])
    prompter, pause = Prompter(tok, "qwen2"), tok.encode(" ")[0]
    afters = [tok.encode(prompter.after.format(instruction=i)) for i in toy.REPEAT_INSTRUCTIONS + INSTRUCTIONS["asr"]]
    longest_run, pauses, sentences = 0, 0, 0
    for d in toy.llm_documents(corpus, prompter, tok, np.random.default_rng(0), 40, {"stretch": 1.0}):
        assert d[:len(prompter.before_ids)] == prompter.before_ids
        ends = [j for j in range(len(prompter.before_ids), len(d)) for a in afters if d[j:j + len(a)] == a]
        slot = d[len(prompter.before_ids):ends[0]]
        text = tok.tok.decode(d, skip_special_tokens=False)
        answer = tok.encode(text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0])
        n = len(slot)
        while slot and slot[-1] == pause:
            slot.pop()
        pauses += n - len(slot)
        assert 0 <= n - len(slot) <= 20
        runs = [(t, sum(1 for _ in g)) for t, g in itertools.groupby(slot)]
        expected = [(t, sum(1 for _ in g)) for t, g in itertools.groupby(answer)]
        assert [t for t, _ in runs] == [t for t, _ in expected]
        assert all(e <= k <= 3 * e for (_, k), (_, e) in zip(runs, expected))   # each token held 1-3 times
        longest_run = max([longest_run] + [k for (_, k), (_, e) in zip(runs, expected) if e == 1])
        sentences += tok.decode(answer) in ("the dog runs", "a cat sleeps")
    assert longest_run == 3 and pauses > 0 and 5 <= sentences <= 35


@pytest.mark.parametrize("copies, max_steps, peak_steps", [([0.5, 0.95], 10, 3), ([0.1] * 9, 4, 4), (None, 10, 2)])
def test_pretrain_llm_holds_the_peak_until_it_copies(monkeypatch, copies, max_steps, peak_steps):
    """The LLM's pretraining checks its copying every LLM_CHECK_EVERY steps from llm_steps on and decays once a
    check passes LLM_COPY (or at llm_max_steps, or at once without a check); the learning rate is the peak
    until then and falls to a tenth of it over llm_decay steps."""
    from model import LLMConfig
    monkeypatch.setattr(toy, "LLM_CHECK_EVERY", 1)
    llm = LLM(LLMConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, family="qwen2"))
    rates = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (rates.append(self.param_groups[0]["lr"]),
                                                                          real_step(self, *a, **k))[1])
    batches = iter(lambda: torch.randint(0, 32, (2, 6)), None)
    answers = iter(copies or [])
    sizes = dataclasses.replace(MICRO, llm_steps=2, llm_max_steps=max_steps, llm_decay=2, llm_warmup=1)
    done = toy.pretrain_llm(llm, batches, sizes, 1e-2, (lambda m: next(answers)) if copies else None)
    assert done["peak_steps"] == peak_steps and done["steps"] == peak_steps + 2 == len(rates)
    assert [c["step"] for c in done["copy_checks"]] == (list(range(2, min(peak_steps + 1, max_steps))) if copies else [])
    assert rates[:peak_steps + 1] == [1e-2] * (peak_steps + 1) and rates[-1] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))


def _train_tiny_llm(threads):
    from model import LLMConfig
    torch.manual_seed(0)
    llm = LLM(LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, family="qwen2"))
    g = torch.Generator().manual_seed(1)
    sizes = dataclasses.replace(MICRO, llm_steps=3, llm_max_steps=3, llm_decay=2, llm_warmup=1)
    toy.pretrain_llm(llm, iter(lambda: torch.randint(0, 256, (8, 128), generator=g), None), sizes, 1e-2,
                     threads=threads)
    return torch.cat([p.detach().flatten() for p in llm.parameters()])


def _one_thread_then_two():
    """In a process started as build() starts the LLM's: the weights trained on one thread throughout and with a
    switch to two threads after two steps; exit code 0 if they are the same bytes, 3 if not, 4 if never switched."""
    import sys
    torch.set_num_threads(1)
    steps = itertools.count()
    one, switched = _train_tiny_llm(lambda: 1), _train_tiny_llm(lambda: 1 if next(steps) < 2 else 2)
    if torch.get_num_threads() != 2 or next(steps) != 5:                 # asked once a step; switched
        sys.exit(4)
    sys.exit(0 if torch.equal(one, switched) else 3)


def test_pretrain_llm_bytes_do_not_depend_on_threads():
    """build() trains the LLM on one thread beside the encoders, then on every core: its weights must not
    depend on when that switch comes. Activations of 8 x 128 x 192 values, past the 32,768 elements from which
    torch's CPU kernels split their work over threads. Run in a process started by toy.start_llm_process, as
    build() starts the LLM's (its environment asks MKL for products that do not depend on the thread count)."""
    import multiprocessing as mp
    before = os.environ.get("MKL_CBWR")
    proc = toy.start_llm_process(mp.get_context("spawn"), _one_thread_then_two, ())
    proc.join()
    assert proc.exitcode == 0, {3: "the bytes differ", 4: "the threads did not switch"}.get(proc.exitcode)
    assert os.environ.get("MKL_CBWR") == before                            # this process's environment is left alone


def test_audio_is_what_the_manifests_say(world):
    for split, (task, _) in toy.SPLITS.items():
        entries, meta = toy._read_jsonl(world / f"{split}.jsonl"), toy.read_meta(world, split)
        assert [e["id"] for e in entries] == [m["id"] for m in meta]
        for e, m in zip(entries, meta):
            info = sf.info(str(world / e["audio"]))
            assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
            assert 0.3 < info.duration <= toy.MAX_SECONDS + 0.01 and e["task"] == task
            if task == "aac":
                for label in m["labels"]:                                    # the caption names every sound
                    words = toy.COUNTED[label][0].split()[-1] if label in toy.COUNTED else toy.PHRASES[label].split()[-1]
                    assert words.rstrip("s") in e["caption"]
                continue
            assert e["lang"] == "en" and "".join(c for c, _, _ in m["letters"]) == e["transcript"]
            assert -0.0001 < info.duration - m["letters"][-1][2] < 0.0076      # plus < 1.5 5-ms frames
            if task == "st":
                assert e["tgt_lang"] == "zh" and e["translation"].endswith("。")


def test_llm_loads_in_both_and_equals_transformers(world):
    transformers = pytest.importorskip("transformers")
    d = world / toy.PATHS["llm"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    ours = LLM.from_pretrained(d, dtype=torch.float32)
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = load_tokenizer(d)
    n = tok.tok.get_vocab_size()
    # Qwen2's special tokens, after the learnt vocabulary; the embedding padded to a multiple of 64
    assert [tok.token_id(t) for t in toy.SPECIAL_TOKENS] == [n - 3, n - 2, n - 1] and tok.eos_id == n - 3
    assert ours.config.vocab_size % 64 == 0 and ours.config.family == "qwen2" and ours.config.qkv_bias
    text = "<|im_start|>user\nthe dog sees a cat<|im_end|>\n<|im_start|>assistant\n狗看见一只猫。<|im_end|>"
    assert tok.decode(tok.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        # same float32 weights, same operations up to kernel order: equal to rounding
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_whisper_loads_in_both_and_equals_transformers(world):
    transformers = pytest.importorskip("transformers")
    d = world / toy.PATHS["whisper"]
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert all(k.startswith("model.encoder.") for k in f.keys())
    ours = WhisperEncoder.from_pretrained(d, dtype=torch.float32)
    assert ours.config.n_frames == 600
    theirs = transformers.WhisperModel.from_pretrained(d, dtype=torch.float32).eval().encoder
    wav = data.load_audio(world / "audio/asr_test_clean/asr_test_clean-00000.flac")
    mel = data.log_mel_spectrogram([wav], n_frames=600)                      # (1, 80, 600): 6 s
    with torch.no_grad():
        # float32 on both sides, same weights: equal to rounding
        torch.testing.assert_close(ours(mel), theirs(mel).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_beats_file_is_official_and_round_trips(world, tmp_path):
    ckpt = torch.load(world / toy.PATHS["beats"], weights_only=True)
    assert set(ckpt) == {"cfg", "model", "label_dict"} and ckpt["label_dict"] == dict(enumerate(toy.SOUND_LABELS))
    sd, K = ckpt["model"], toy.TOY_BEATS["conv_pos"]
    assert sd["encoder.pos_conv.0.weight_g"].shape == (1, 1, K) and "encoder.pos_conv.0.weight" not in sd
    assert sd["predictor.weight"].shape == (len(toy.SOUND_LABELS), toy.TOY_BEATS["encoder_embed_dim"])
    # the shared relative-position table is stored under every layer, as the official state dict does
    table = [k for k in sd if k.endswith("relative_attention_bias.weight")]
    assert len(table) == toy.TOY_BEATS["encoder_layers"]
    BEATs.from_pretrained(world / toy.PATHS["beats"], dtype=torch.float32)
    # a module with non-trivial weights -> the official file -> BEATs.from_pretrained: the same outputs
    torch.manual_seed(0)
    beats = BEATs(BEATsConfig.from_checkpoint_cfg(toy.TOY_BEATS))
    with torch.no_grad():
        for p in beats.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head = torch.nn.Linear(beats.config.encoder_embed_dim, len(toy.SOUND_LABELS))
    toy.save_beats(beats, head, tmp_path / "b.pt")
    loaded = BEATs.from_pretrained(tmp_path / "b.pt", dtype=torch.float32)
    wavs, mask = data.pad_batch([torch.from_numpy(toy.sound_clip(np.random.default_rng(i))[0]) for i in range(2)])
    fbank = data.beats_fbank(wavs, mask)
    with torch.no_grad():
        a, b = beats(fbank, mask), loaded(fbank, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])             # g / ||v|| is exactly 1: no rounding


def test_base_models_report(world):
    report = json.loads((world / "base_models.json").read_text())
    assert {"llm", "whisper", "beats", "command", "seconds"} <= set(report)
    assert 0 <= report["llm"]["mt_bleu"] <= 100 and "tok:zh" in report["llm"]["signature"]
    assert 0 <= report["llm"]["copy_random_words"] <= 1 and report["llm"]["copy_n"] == {"sentences": MICRO.mt_test, "random_words": 200}
    assert (report["llm"]["steps"], report["llm"]["peak_steps"]) == (3, 2)
    assert [c["step"] for c in report["llm"]["copy_checks"]] == [1] and report["llm"]["copy_checks"][0]["copy_sentences"] < toy.LLM_COPY
    assert report["whisper"]["n_frames"] == 600 and report["whisper"]["n"] == MICRO.asr_test_clean
    assert report["beats"]["n"] == MICRO.aac_valid
    info = json.loads((world / "world.json").read_text())
    assert info["seed"] == 0 and all((world / p).exists() for p in info["paths"].values())


class _Oracle(torch.nn.Module):
    """A stand-in LLM whose logits at each position name the next input token (shift=1: a perfect copier
    under teacher forcing) or the current one (shift=0: always one behind)."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids, attention_mask=None, logits="all"):
        ids = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(ids, self.vocab).float()})()


def test_eval_copy_scores_the_answer_only(world):
    tok = load_tokenizer(world / toy.PATHS["llm"])
    vocab = tok.tok.get_vocab_size()
    sentences = ["the cat sees a dog", "two birds sing quietly"] * 3
    words = ["cat", "dog", "bird", "tree", "sees"]
    perfect = toy.eval_copy(_Oracle(vocab, 1), tok, sentences, words, seed=0, n=6)
    assert perfect == {"copy_sentences": 1.0, "copy_random_words": 1.0, "copy_n": {"sentences": 6, "random_words": 6}}
    behind = toy.eval_copy(_Oracle(vocab, 0), tok, sentences, words, seed=0, n=6)
    assert behind["copy_sentences"] < 0.3 and behind["copy_random_words"] < 0.5    # repeats (cat cat) can match


def test_train_py_dispatches_toy_and_checks_its_flags(capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(["--backbone=toy", "--seed", "-1"])
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--backbone", "toy", "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_chain_end_to_end(tmp_path):
    """`python train.py --backbone toy --quick`: the world, stage 1, layer selection, stage 3 with AI-STA and
    CE only, evaluation, through the real scripts; a second call finds every stage done and only reprints."""
    import time
    import train
    out = tmp_path / "run"
    r = train.main(["--backbone", "toy", "--quick", "--out", str(out)])
    assert r["layers"] == list(range(toy.TOY_LLM["num_hidden_layers"] + 1))
    assert set(r["selected_layers"]) <= set(r["layers"]) and len(r["mrr"]) == len(r["layers"])
    assert all(0 <= b <= 100 for b in r["bleu"].values()) and set(r["bleu"]) == {"ce", "ai-sta"}
    assert r["stage1_asr_wer"] >= 0 and all(np.isfinite(v) for v in r["alignment_mean_log_w"].values())
    for f in [r["figures"]["figure4"], *r["figures"]["loss_curves"], out / "result.json"]:
        assert Path(f).is_file()
    args = json.loads((out / "joint_ai-sta" / "args.json").read_text())
    assert args["align"] == "ot" and args["layers"] == r["ai_sta_layers"] == (r["selected_layers"] or [0])
    assert json.loads((out / "joint_ce" / "args.json").read_text())["align"] == "none"
    s1 = json.loads((out / "stage1" / "args.json").read_text())      # ASR drawn four times as often, a constant lr
    assert s1["train"][0].endswith("asr_train.jsonl:4") and s1["min_lr"] == s1["lr"] and s1["cache_encoders"]
    assert json.loads((out / "joint_ce" / "args.json").read_text())["cache_encoders"]
    assert (out / "eval" / "stage1_asr.log").is_file() and (out / "eval" / "st_ce.log").is_file()
    t = time.time()
    again = train.main(["--backbone", "toy", "--quick", "--out", str(out)])
    assert time.time() - t < 10 and again["bleu"] == r["bleu"] and again["seconds"] == r["seconds"]


def test_run_chains_side_by_side_in_order_and_failures(tmp_path):
    """_run_chains: chains side by side with the torch threads shared out, each chain's scripts one after the
    other, logs where asked; a failure stops every chain and names the script, its exit code and its log's end."""
    show = "import os, sys; print(sys.argv[1], os.environ['OMP_NUM_THREADS'])"
    log = lambda n: tmp_path / f"{n}.log"
    step = lambda n, *code: (n, ["-c", ";".join([*code, show]), n], log(n))
    toy._run_chains({"x": [step("a1", "import time; time.sleep(0.3)"),
                           step("a2", f"assert open({str(log('b1'))!r}).read()")],   # b1 has finished by then
                     "y": [step("b1")]}, jobs=2)
    assert [log(n).read_text() for n in ("a1", "a2", "b1")] == ["a1 1\n", "a2 1\n", "b1 1\n"]
    toy._run_chains({"z": [step("c")], "done": []}, jobs=2)           # alone, it gets both threads
    assert log("c").read_text() == "c 2\n"
    toy._run_chains({"x": [step("d1")], "y": [step("d2", f"assert open({str(log('d1'))!r}).read()")]}, jobs=1)
    assert log("d2").read_text() == "d2 1\n"                        # one at a time, in the order given
    slow = ("slow", ["-c", f"import os, time; open({str(log('pid'))!r}, 'w').write(str(os.getpid())); time.sleep(30)"],
            None)
    bad = ("bad", ["-c", "import sys, time; time.sleep(0.5); print('boom'); sys.exit(3)"], log("bad"))
    with pytest.raises(SystemExit, match=r"(?s)the bad run failed \(exit 3\); the end of .*bad\.log:\nboom"):
        toy._run_chains({"s": [slow], "b": [bad, step("after")]}, jobs=2)
    assert not log("after").exists()
    with pytest.raises(ProcessLookupError):                           # the other chain was stopped
        os.kill(int(log("pid").read_text()), 0)


def test_claims_summary_and_flags(tmp_path, capsys):
    """claims.json's statistics: mean and sample standard deviation over seeds, the AI-STA gain per seed."""
    seeds = [dict(seed=s, stage1_asr_wer=w, mrr=[0.5, m], selected_layers=[0], bleu={"ce": c, "ai-sta": a},
                  mean_log_w={"ce": -1.0, "ai-sta": -2.0}, mt_bleu={"ce": 50.0, "ai-sta": 52.0},
                  modality_gap={"base": 1.0, "AI-STA": 0.5}, minutes=14.0)
             for s, w, m, c, a in ((0, 10.0, 0.1, 30.0, 31.0), (1, 12.0, 0.2, 32.0, 32.0), (2, 14.0, 0.3, 34.0, 36.0))]
    r = toy.summarize_claims(seeds, {"pearson_r": -0.5})
    assert r["stage1_asr_wer"] == {"mean": 12.0, "std": 2.0, "values": [10.0, 12.0, 14.0]}
    assert r["mrr"][1]["mean"] == 0.2 and r["mrr"][0]["std"] == 0.0
    assert r["bleu_gain_ai_sta"]["values"] == [1.0, 0.0, 2.0] and r["bleu_gain_ai_sta"]["mean"] == 1.0
    assert r["mt_bleu"]["ai-sta"]["mean"] == 52.0 and r["figure6"] == {"pearson_r": -0.5}
    for argv, msg in ((["claims", "--seeds", "0", "0"], "--seeds must be distinct"),
                      (["claims", "--seeds", "-1"], "--seeds must be distinct and >= 0"),
                      (["claims", "--jobs", "0"], "--jobs >= 1")):
        with pytest.raises(SystemExit):
            toy.main(argv + ["--out", str(tmp_path / "c")])
        assert msg in capsys.readouterr().err
