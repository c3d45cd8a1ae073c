"""Manifests, segments, and the training stream: precise errors, exact slicing, determinism and resumption."""
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data

SR = data.SAMPLE_RATE
INSTRUCTIONS = {"asr": ["transcribe", "write it down"], "aac": ["describe", "caption it", "what is it"],
                "st_en_zh": ["translate to Chinese"]}


def write_clip(path, seconds, sr=16000, freq=440.0, **kw):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, **kw)


def write_jsonl(path, entries):
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return path


# ---- manifests ------------------------------------------------------------------------------------------------
def test_manifest_resolves_paths_and_reads_every_task(tmp_path):
    rows = [{"id": "a", "audio": "clips/a.flac", "task": "asr", "lang": "en", "transcript": "hello"},
            {"id": "b", "audio": "/abs/b.wav", "start": 3, "end": 4.5, "task": "aac", "caption": "a dog barks"},
            {"id": "c", "audio": "c.mp3", "task": "st", "lang": "en", "tgt_lang": "zh", "transcript": "hi",
             "translation": "你好", "speaker": "kept"}]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    a, b, c = data.read_manifest(m)
    assert a["audio"] == str(tmp_path / "clips" / "a.flac") and b["audio"] == "/abs/b.wav"
    assert [data.task_key(e) for e in (a, b, c)] == ["asr", "aac", "st_en_zh"]
    assert [data.target_text(e) for e in (a, b, c)] == ["hello", "a dog barks", "你好"]
    assert b["start"] == 3 and c["speaker"] == "kept"
    # a reader that needs less: select_layers reads {"audio", "transcript"} lines with no id or task
    write_jsonl(m, [{"audio": "x.wav", "transcript": "t"}])
    assert data.read_manifest(m, require=("audio", "transcript"))[0]["transcript"] == "t"


BAD_LINES = [  # (line, what the error must say)
    ('{"id": "a", "audio": "a.wav", "task": "asr", "transcript": 42}', "field 'transcript' must be a string, got int"),
    ('{"id": "a", "audio": "a.wav", "task": "asr", "transcript": "  "}', "field 'transcript' is empty"),
    ('{"id": "a", "audio": "a.wav", "task": "asr"}', "field 'transcript' is missing (a 'asr' entry needs transcript)"),
    ('{"id": "a", "audio": "a.wav", "task": "st", "lang": "en", "transcript": "x", "translation": "y"}',
     "field 'tgt_lang' is missing"),
    ('{"audio": "a.wav", "task": "aac", "caption": "c"}', "field 'id' is missing"),
    ('{"id": "a", "audio": "a.wav", "task": "ast", "transcript": "x"}', "field 'task' must be one of asr, aac, st"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c", "start": "3"}', "field 'start' must be a non-neg"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c", "end": -1}', "field 'end' must be a non-neg"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c", "start": true}', "field 'start' must be a non-neg"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c", "start": 5, "end": 5}', "start must come first"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c", "duration": NaN}', "field 'duration' must be"),
    ('{"id": "a", "audio": 7, "task": "aac", "caption": "c"}', "field 'audio' must be a string"),
    ('{"id": "a", "audio": "a.wav", "task": "aac", "caption": "c"', "invalid JSON"),
    ('["a.wav", "hello"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_manifest_names_the_bad_line_and_field(tmp_path, line, message):
    m = tmp_path / "m.jsonl"
    good = json.dumps({"id": "g", "audio": "g.wav", "task": "asr", "transcript": "fine"})
    m.write_text(good + "\n" + line + "\n")
    with pytest.raises(data.ManifestError, match=re.escape("m.jsonl:2: ") + ".*" + re.escape(message)):
        data.read_manifest(m)


def test_manifest_file_level_errors(tmp_path):
    m = tmp_path / "m.jsonl"
    row = {"id": "a", "audio": "a.wav", "task": "asr", "transcript": "x"}
    write_jsonl(m, [row, {**row, "transcript": "y"}, row])
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:2: id 'a' already used on line 1"):
        data.read_manifest(m)
    m.write_bytes(json.dumps(row).encode() + b"\n" + '{"id": "b", "caption": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:2: not UTF-8 \(byte 0xe9 at column 28\)"):
        data.read_manifest(m)
    m.write_text("\n \n")
    with pytest.raises(data.ManifestError, match="no entries"):
        data.read_manifest(m)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        data.read_manifest(tmp_path / "nowhere.jsonl")


def test_write_manifest_is_atomic(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    data.write_manifest([{"id": "1", "caption": "é"}], out)
    assert out.read_text(encoding="utf-8") == '{"id": "1", "caption": "é"}\n'

    def broken():
        yield {"id": "2"}
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.write_manifest(broken(), out)
    assert out.read_text(encoding="utf-8") == '{"id": "1", "caption": "é"}\n'   # the old file, untouched
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]              # and no temporary left behind


# ---- segments -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext, sr, kw", [("flac", 16000, {}), ("wav", 44100, {"subtype": "FLOAT"}),
                                         ("wav", 16001, {"subtype": "FLOAT"}),  # an odd rate: 16000 phases
                                         ("mp3", 48000, {}), ("opus", 48000, {"format": "OGG", "subtype": "OPUS"})])
def test_segment_equals_slicing_the_whole_file(tmp_path, ext, sr, kw):
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(4.3 * sr))).astype(np.float32)
    path = tmp_path / f"long.{ext}"
    sf.write(path, x, sr, **kw)
    whole = data.load_audio(path)
    assert whole.shape == (math.ceil(len(x) * SR / sr),)
    for start, end in [(0.0, 1.25), (1.0007, 2.5), (2.9, 4.3), (3.2, None), (None, 1.5)]:
        seg = data.load_audio(path, start, end)
        lo = 0 if start is None else round(start * SR)
        hi = len(whole) if end is None else min(round(end * SR), len(whole))
        # the same output samples from the same input samples; the sums may be ordered differently (float32)
        torch.testing.assert_close(seg, whole[lo:hi], rtol=0, atol=1e-6)


def test_imports_without_soundfile_and_reading_says_what_is_missing(tmp_path, monkeypatch):
    """A GPU benchmark machine may lack soundfile: data.py still imports (features and batches need no files),
    and reading a file names the file and the missing package instead of failing at import."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "soundfile", None)           # as if it were not installed
    spec = importlib.util.spec_from_file_location("data_without_soundfile", data.__file__)
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)                                  # a second copy: `data` itself is untouched
    assert bare.sf is None and bare.log_mel_spectrogram([torch.zeros(1600)]).shape == (1, 80, 3000)
    write_clip(tmp_path / "a.flac", 0.1)
    with pytest.raises(ImportError, match=r"a\.flac needs the soundfile package"):
        bare.load_audio(tmp_path / "a.flac")


def test_segment_outside_the_file_and_long_segments(tmp_path):
    path = tmp_path / "three.flac"
    write_clip(path, 3.0)
    assert data.load_audio(path, 2.0, 3.05).shape == (SR,)    # rounding slack past the end is cut off
    for start, end in [(3.0, 3.5), (1.0, 3.2), (-1.0, 1.0)]:
        with pytest.raises(data.AudioError, match=re.escape(f"segment [{start}, {end}) s is not inside {path}")):
            data.load_audio(path, start, end)
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        assert data.load_audio(path, 0.5, None, max_samples=SR).shape == (SR,)
    assert data.load_audio(path, 2.6, 2.8).shape == (SR,)     # padded to 1 s, as SALMONN pads


def test_truncated_files_name_both_durations(tmp_path):
    good = tmp_path / "good.wav"
    write_clip(good, 3.0, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:44 + 2 * 24000])        # the header still promises 3 s; 1.5 s are there
    with pytest.raises(data.AudioError, match=re.escape(f"truncated audio file {cut}: its header promises "
                                                        "3.000 s, it holds 1.500 s")):
        data.load_audio(cut)
    with pytest.raises(data.AudioError, match="truncated"):
        data.audio_info(cut)
    mp3 = tmp_path / "good.mp3"
    write_clip(mp3, 3.0)
    cut_mp3 = tmp_path / "cut.mp3"
    cut_mp3.write_bytes(mp3.read_bytes()[: len(mp3.read_bytes()) // 2])  # the Xing header promises 3 s
    with pytest.raises(data.AudioError, match=re.escape(f"truncated audio file {cut_mp3}: its header promises "
                                                        "3.000 s")):
        data.load_audio(cut_mp3)


# ---- the training stream --------------------------------------------------------------------------------------
class Sizes:
    """What StreamSampler reads from a dataset."""
    def __init__(self, sizes, weights=None, seed=0):
        self.sizes, self.weights, self.seed = sizes, weights or [1.0] * len(sizes), seed


def step_batches(sampler, step):
    sampler.start_step, sampler.num_steps = step, step + 1
    return list(sampler)


def test_stream_slicing_rule_and_every_utterance_once_per_epoch():
    ds = Sizes([13, 8])                                             # 21 utterances: epochs end mid-batch
    G, B, W = 8, 2, 2                                               # A = 2 micro-batches per rank per step
    ranks = [data.StreamSampler(ds, G, B, rank=r, world_size=W) for r in range(W)]
    stream = []
    for s in range(6):
        per_rank = [step_batches(sp, s) for sp in ranks]
        assert [len(b) for b in per_rank] == [2, 2] and all(len(mb) == B for b in per_rank for mb in b)
        for r, batches in enumerate(per_rank):
            for m, mb in enumerate(batches):
                k = r * 2 + m
                assert [p for _, p in mb] == list(range(s * G + k * B, s * G + (k + 1) * B))
        stream += [pair for b in per_rank for mb in b for pair in mb]
    positions = [p for _, p in stream]
    assert positions == list(range(6 * G))
    for e in range(2):                                              # whole epochs: each index exactly once
        assert sorted(i for i, p in stream if e * 21 <= p < (e + 1) * 21) == list(range(21))
    assert [i for i, p in stream[:21]] != [i for i, p in stream[21:42]]   # a new order each epoch


def test_stream_resumes_and_refuses_another_stream():
    ds = Sizes([50, 7], seed=3)
    full = list(data.StreamSampler(ds, 8, 4, num_steps=10))
    resumed = data.StreamSampler(ds, 8, 4, num_steps=10)
    resumed.load_state_dict(json.loads(json.dumps(data.StreamSampler(ds, 8, 4).state_dict(6))))
    assert list(resumed) == full[6 * 2:] and len(resumed) == 8
    # the same global batch on 2 GPUs instead of 1: each step covers the same utterances
    two = [data.StreamSampler(ds, 8, 2, rank=r, world_size=2, num_steps=10) for r in range(2)]
    for s in range(10):
        assert sorted(sum(step_batches(two[0], s) + step_batches(two[1], s), [])) == sorted(sum(full[2 * s: 2 * s + 2], []))
    other = data.StreamSampler(Sizes([50, 7], seed=4), 8, 4)
    with pytest.raises(ValueError, match="seed was 3, now 4"):
        other.load_state_dict(data.StreamSampler(ds, 8, 4).state_dict(2))
    with pytest.raises(ValueError, match="global_batch 32 is not a multiple of micro_batch 3 x world_size 2"):
        data.StreamSampler(ds, 32, 3, world_size=2)
    assert list(data.StreamSampler(Sizes([50, 7], seed=3), 8, 4, num_steps=10)) == full   # a new sampler, same stream


def test_mixing_weights():
    ds = Sizes([300, 100], weights=[0.5, 2.0])        # per epoch: a seeded half of manifest 0, manifest 1 twice
    sp = data.StreamSampler(ds, 10, 10)
    assert sp.epoch_size == 150 + 200
    halves = []
    for e in range(3):
        counts = Counter(sp.epoch_order(e).tolist())
        assert all(counts[i] == 2 for i in range(300, 400))
        half = {i for i in counts if i < 300}
        assert len(half) == 150 and all(counts[i] == 1 for i in half)
        halves.append(half)
    assert halves[0] != halves[1]
    # within an epoch the order is a uniform shuffle: the share of manifest 1 in the first 100 positions is
    # hypergeometric, mean 4/7, sd = sqrt(100 * 4/7 * 3/7 * 250/349) = 4.2 items; allow 4 sd
    share = sum(i >= 300 for i in sp.epoch_order(0)[:100])
    assert abs(share - 400 / 7) <= 4 * 4.2
    with pytest.raises(ValueError, match="weights"):
        data.SpeechDataset([], weights=[])


# ---- the dataset and DataLoader -------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    """Two manifests: 10 ASR flac clips at 16 kHz and 4 captioned 44.1 kHz wav clips (two segments of one file)."""
    (tmp_path / "clips").mkdir()
    asr = []
    for i in range(10):
        write_clip(tmp_path / "clips" / f"{i}.flac", 0.6 + 0.1 * i, freq=200 + 50 * i)
        asr.append({"id": f"u{i}", "audio": f"clips/{i}.flac", "task": "asr", "lang": "en", "transcript": f"words {i}"})
    write_clip(tmp_path / "clips" / "long.wav", 3.0, sr=44100, freq=900)
    write_clip(tmp_path / "clips" / "b.wav", 1.1, sr=44100, freq=1300)
    aac = [{"id": "c0", "audio": "clips/long.wav", "start": 0.0, "end": 1.2, "task": "aac", "caption": "tone"},
           {"id": "c1", "audio": "clips/long.wav", "start": 1.5, "end": 3.0, "task": "aac", "caption": "tone again"},
           {"id": "c2", "audio": "clips/b.wav", "task": "aac", "caption": "a higher tone"},
           {"id": "c3", "audio": "clips/b.wav", "task": "aac", "caption": "another caption"}]
    return write_jsonl(tmp_path / "asr.jsonl", asr), write_jsonl(tmp_path / "aac.jsonl", aac)


def as_tuples(batch):
    return (batch.ids, batch.tasks, batch.instructions, batch.targets, batch.transcripts, batch.wavs, batch.padding_mask)


def test_dataloader_is_deterministic_across_workers_and_resumption(corpus):
    ds = data.SpeechDataset(corpus, weights=[1, 2], seed=5, instructions=INSTRUCTIONS, n_frames=300)
    assert ds.sizes == [10, 4] and len(ds) == 14

    def run(workers, start_step=0):
        sampler = data.StreamSampler(ds, global_batch=6, micro_batch=3, start_step=start_step, num_steps=4)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate, num_workers=workers)
        return [as_tuples(b) for b in loader]
    serial = run(0)
    assert len(serial) == 8 and Counter(i for b in serial[:6] for i in b[0]) == Counter(
        [f"u{i}" for i in range(10)] + ["c0", "c1", "c2", "c3"] * 2)   # one epoch = 18 = 3 steps
    parallel = run(2)
    for a, b in zip(serial, parallel):
        assert a[:5] == b[:5]
        assert torch.equal(a[5], b[5]) and torch.equal(a[6], b[6])
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for a, b in zip(serial[4:], run(0, 2))
               for x, y in zip(a, b))
    drawn = Counter(ins for b in serial for ins, t in zip(b[2], b[1]) if t == "aac")
    assert set(drawn) <= set(INSTRUCTIONS["aac"]) and len(drawn) > 1       # drawn, not always the first


def test_batch_features_equal_each_clip_alone(corpus):
    ds = data.SpeechDataset(corpus, instructions=INSTRUCTIONS, n_frames=400)
    batch = ds.collate([ds[0], ds[11], ds[13]]).to("cpu")
    assert batch.ids == ["u0", "c1", "c3"] and batch.instructions == ["transcribe", "describe", "describe"]
    assert batch.targets == ["words 0", "tone again", "another caption"] and batch.transcripts == ["words 0", None, None]
    assert batch.mel.shape == (3, 80, 400) and batch.wavs.shape == batch.padding_mask.shape == (3, 24000)
    for i, row in enumerate([ds[0], ds[11], ds[13]]):
        n = row["wav"].shape[0]
        assert not batch.padding_mask[i, :n].any() and batch.padding_mask[i, n:].all()
        torch.testing.assert_close(batch.mel[i], data.log_mel_spectrogram(row["wav"], n_frames=400), rtol=0, atol=1e-5)
        t = 1 + (n - 400) // 160
        torch.testing.assert_close(batch.fbank[i, :t], data.beats_fbank(row["wav"]), rtol=0, atol=1e-4)


def test_unreadable_files_fail_clearly_or_are_skipped(corpus, tmp_path):
    bad = tmp_path / "clips" / "3.flac"
    bad.write_bytes(b"fLaC" + bytes(300))                          # a corrupt file in the middle of the manifest
    ds = data.SpeechDataset(corpus[0], instructions=INSTRUCTIONS)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate, num_workers=1))
    with pytest.raises(data.AudioError, match=re.escape(f"entry 'u3': cannot decode audio file {bad}")):
        next(batches)
    # torch's iterator, garbage-collected after a worker's error, waits 5 s for the worker; shut it down now
    batches._shutdown_workers()
    skipping = data.SpeechDataset(corpus[0], instructions=INSTRUCTIONS, skip_bad=True)
    with pytest.warns(UserWarning, match=re.escape(f"entry 'u3': cannot decode audio file {bad}")):
        batches = list(torch.utils.data.DataLoader(skipping, batch_size=4, collate_fn=skipping.collate))
    assert [b.ids for b in batches] == [["u0", "u1", "u2"], ["u4", "u5", "u6", "u7"], ["u8", "u9"]]
    assert batches[0].skipped == ["u3"]
    (tmp_path / "clips" / "7.flac").unlink()                        # a missing file: found before any training
    with pytest.raises(FileNotFoundError, match=re.escape(f"1 of 10 audio files are missing (u7: {tmp_path}/clips/7.flac")):
        data.SpeechDataset(corpus[0], instructions=INSTRUCTIONS)
    with pytest.warns(UserWarning, match="skipping them"):
        assert len(data.SpeechDataset(corpus[0], instructions=INSTRUCTIONS, skip_bad=True)) == 9
    with pytest.raises(data.ManifestError, match="'st_en_de', which has no instructions"):
        write_jsonl(tmp_path / "st.jsonl", [{"id": "s", "audio": "clips/0.flac", "task": "st", "lang": "en",
                                             "tgt_lang": "de", "transcript": "a", "translation": "b"}])
        data.SpeechDataset(tmp_path / "st.jsonl", instructions=INSTRUCTIONS)


def test_evaluation_shards_cover_every_entry_once():
    shards = [list(data.ShardSampler(11, 3, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[[0, 1, 2]], [[3, 4, 5], [6]], [[7, 8, 9], [10]]]
    assert [len(data.ShardSampler(11, 3, rank=r, world_size=3)) for r in range(3)] == [1, 2, 2]


def test_load_batch_equals_each_clip_alone(tmp_path):
    write_clip(tmp_path / "a.wav", 1.5, freq=300.0)
    write_clip(tmp_path / "b.wav", 2.25, sr=48000, freq=700.0)   # resampled on the way in
    mel, fbank, mask = data.load_batch([tmp_path / "a.wav", tmp_path / "b.wav"])
    assert mel.shape == (2, 80, 3000) and mask.shape == (2, 36000) and fbank.shape == (2, 1 + (36000 - 400) // 160, 128)
    assert mask[0, 24000:].all() and not mask[0, :24000].any() and not mask[1].any()
    for i, p in enumerate(["a.wav", "b.wav"]):
        wav = data.load_audio(tmp_path / p)
        torch.testing.assert_close(mel[i], data.log_mel_spectrogram(wav), rtol=0, atol=1e-5)
        n = (wav.shape[0] - 400) // 160 + 1
        torch.testing.assert_close(fbank[i, :n], data.beats_fbank(wav), rtol=0, atol=1e-4)
    # manifest entries with a segment, for a Whisper with a 6-s window (the toy world's): the clip is cut to it
    write_clip(tmp_path / "long.wav", 7.5, freq=500.0)
    with pytest.warns(UserWarning, match=r"long\.wav: 7\.50 s is longer than 6 s"):
        mel, fbank, mask = data.load_batch([{"audio": tmp_path / "a.wav", "start": 0.25, "end": 1.25},
                                            {"audio": tmp_path / "long.wav"}], n_frames=600)
    assert mel.shape == (2, 80, 600) and mask.shape == (2, 96000) and mask[0, 16000:].all()
    seg = data.load_audio(tmp_path / "a.wav", 0.25, 1.25)
    torch.testing.assert_close(mel[0], data.log_mel_spectrogram(seg, n_frames=600), rtol=0, atol=1e-5)
    torch.testing.assert_close(fbank[1], data.beats_fbank(data.load_audio(tmp_path / "long.wav")[:96000]), rtol=0, atol=1e-4)


# ---- corpora, in each publisher's layout --------------------------------------------------------------------
def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prepare(capsys, *argv):
    code = data.main(["prepare", *map(str, argv)])
    return code, capsys.readouterr().out


def test_prepare_covost2_split_tsv_and_released_tsv(tmp_path, capsys):
    root = tmp_path / "covost"
    (root / "clips").mkdir(parents=True)
    for i in (1, 2, 3):
        write_clip(root / "clips" / f"common_voice_en_{i}.mp3", 1.0, sr=48000)
    # as get_covost_splits.py writes it: tab-separated, no quoting, backslash escapes (a tab inside a field is \<TAB>)
    (root / "covost_v2.en_zh-CN.dev.tsv").write_text(
        "path\tsentence\ttranslation\tclient_id\n"
        "common_voice_en_1.mp3\tHe said \"hi\",\\\tthen left.\t他说\"嗨\"，然后走了。\tc1\n"
        "common_voice_en_2.mp3\tNo translation here.\t\tc2\n"
        "common_voice_en_3.mp3\tIt's 5 o'clock.\t五点了。\tc3\n"
        "common_voice_en_4.mp3\tMissing audio.\t音频缺失。\tc4\n", encoding="utf-8")
    out = tmp_path / "m" / "covost_dev.jsonl"
    code, printed = prepare(capsys, "covost2", "--root", root, "--out", out, "--split", "dev")
    assert code == 0
    assert "skipped common_voice_en_2: empty transcript or translation" in printed
    assert "skipped common_voice_en_4: missing audio file" in printed and "wrote" in printed and "2 entries" in printed
    rows = read_lines(out)
    assert [r["id"] for r in rows] == ["common_voice_en_1", "common_voice_en_3"]
    assert rows[0]["transcript"] == 'He said "hi",\tthen left.' and rows[0]["translation"] == '他说"嗨"，然后走了。'
    assert rows[0]["tgt_lang"] == "zh" and rows[0]["task"] == "st" and rows[0]["duration"] == 1.0
    assert [data.task_key(e) for e in data.read_manifest(out)] == ["st_en_zh", "st_en_zh"]
    # the released TSV (path, translation, split) joined with Common Voice's validated.tsv, train = train + train_covost
    (root / "covost_v2.en_ja.tsv").write_text(
        "path\ttranslation\tsplit\n" "common_voice_en_1.mp3\t彼は言った\ttrain\n"
        "common_voice_en_3.mp3\t五時です\ttrain_covost\n" "common_voice_en_2.mp3\tテスト\tdev\n"
        "common_voice_en_9.mp3\t無い\ttrain\n", encoding="utf-8")
    (tmp_path / "validated.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\n" "c1\tcommon_voice_en_1.mp3\tHe said hi.\t2\n"
        "c3\tcommon_voice_en_3.mp3\tIt's five.\t2\n" "c2\tcommon_voice_en_2.mp3\tA test.\t2\n", encoding="utf-8")
    code, printed = prepare(capsys, "covost2", "--root", root, "--out", out, "--tgt-lang", "ja",
                            "--cv-tsv", tmp_path / "validated.tsv")
    assert code == 0 and "skipped common_voice_en_9: not in" in printed
    assert [(r["id"], r["transcript"], r["translation"], r["tgt_lang"]) for r in read_lines(out)] == [
        ("common_voice_en_1", "He said hi.", "彼は言った", "ja"), ("common_voice_en_3", "It's five.", "五時です", "ja")]


def test_prepare_librispeech(tmp_path, capsys):
    root = tmp_path / "LibriSpeech"
    chapter = root / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    (chapter / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER\n"
        "1089-134686-0001 STUFF IT INTO YOU HIS BELLY COUNSELLED HIM\n"
        "1089-134686-0002 AFTER EARLY NIGHTFALL THE YELLOW LAMPS WOULD LIGHT UP\n")
    write_clip(chapter / "1089-134686-0000.flac", 1.5)
    write_clip(chapter / "1089-134686-0001.flac", 0.8)                       # 0002 has no flac
    out = root / "test_clean.jsonl"                                           # inside the tree: relative paths
    code, printed = prepare(capsys, "librispeech", "--root", root, "--out", out)
    assert code == 0 and "skipped 1089-134686-0002: missing audio file" in printed and "0.00 h" in printed
    rows = read_lines(out)
    assert rows[0] == {"id": "1089-134686-0000", "audio": "test-clean/1089/134686/1089-134686-0000.flac",
                       "task": "asr", "lang": "en", "transcript": "He hoped there would be stew for dinner",
                       "duration": 1.5}
    code, _ = prepare(capsys, "librispeech", "--root", root, "--out", out, "--case", "lower", "--splits", "test-clean")
    assert read_lines(out)[1]["transcript"] == "stuff it into you his belly counselled him"
    code, printed = prepare(capsys, "librispeech", "--root", root, "--out", out, "--splits", "dev-clean")
    assert code == 1 and read_lines(out)[1]["transcript"].startswith("stuff")   # the old manifest is untouched


def test_prepare_gigaspeech_segments_tags_and_subsets(tmp_path, capsys):
    root = tmp_path / "GigaSpeech"
    (root / "audio" / "podcast" / "P0001").mkdir(parents=True)
    write_clip(root / "audio" / "podcast" / "P0001" / "POD0000000001.opus", 6.0, format="OGG", subtype="OPUS")
    seg = lambda sid, b, e, text, subsets: {"sid": sid, "speaker": "N/A", "begin_time": b, "end_time": e,
                                            "text_tn": text, "subsets": subsets}
    meta = {"dataset": "GigaSpeech", "audios": [
        {"aid": "POD0000000001", "path": "audio/podcast/P0001/POD0000000001.opus", "duration": 6.0, "format": "opus",
         "sample_rate": 16000, "source": "podcast", "segments": [
             seg("POD0000000001_S0000000", 0.0, 1.52, "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE <QUESTIONMARK>",
                 ["{XL}", "{L}", "{M}", "{S}"]),
             seg("POD0000000001_S0000001", 1.52, 2.5, "<MUSIC>", ["{XL}", "{M}"]),
             seg("POD0000000001_S0000002", 2.5, 4.0, "THAT'S ALL <PERIOD> THANKS <EXCLAMATIONPOINT>", ["{XL}", "{L}"]),
             seg("POD0000000001_S0000003", 4.0, 5.95, "SEE YOU <PERIOD> BYE <PERIOD>", ["{XL}", "{M}"]),
             seg("POD0000000001_S0000004", 5.9, 7.5, "PAST THE END", ["{XL}", "{M}"])]},
        {"aid": "POD0000000002", "path": "audio/podcast/P0001/POD0000000002.opus", "duration": 3.0, "format": "opus",
         "sample_rate": 16000, "source": "podcast", "segments": [
             seg("POD0000000002_S0000000", 0.0, 1.0, "NO FILE", ["{XL}", "{M}"])]}]}
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    out = tmp_path / "gs_m.jsonl"
    code, printed = prepare(capsys, "gigaspeech", "--root", root, "--out", out)
    assert code == 0
    assert "skipped POD0000000001_S0000001: garbage tag <MUSIC>" in printed
    assert "skipped POD0000000001_S0000004: segment ends at 7.5 s, after the end of" in printed
    assert "skipped POD0000000002_S0000000: missing audio file" in printed
    rows = read_lines(out)
    assert [(r["id"], r["start"], r["end"], r["transcript"]) for r in rows] == [
        ("POD0000000001_S0000000", 0.0, 1.52, "As they're leaving, can kash pull zahra aside?"),
        ("POD0000000001_S0000003", 4.0, 5.95, "See you. Bye.")]
    assert rows[0]["audio"] == "GigaSpeech/audio/podcast/P0001/POD0000000001.opus"   # relative to the manifest
    entry = data.read_manifest(out)[1]
    wav = data.load_audio(entry["audio"], entry["start"], entry["end"])
    assert wav.shape == (round(1.95 * SR),)


def test_prepare_audiocaps_finds_every_downloader_naming(tmp_path, capsys):
    root = tmp_path / "audiocaps"
    (root / "audio" / "train").mkdir(parents=True)
    write_clip(root / "audio" / "train" / "vfY_TJq7n_U_130.flac", 1.0)      # aac-datasets' {youtube_id}_{start}
    write_clip(root / "audio" / "train" / "Ytdwhhv3x25Q.wav", 1.0, sr=32000)  # AudioSet style Y{youtube_id}
    write_clip(root / "audio" / "107898.wav", 1.0)                              # {audiocap_id}
    (root / "train.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        '97151,vfY_TJq7n_U,130,"Rustling occurs, ducks quack and water splashes"\n'
        "108945,tdwhhv3x25Q,60,An audience gives applause as a man yells\n"
        "107898,tw76HGONaKg,570,A man speaks over intermittent keyboard taps\n"
        '109001,vfY_TJq7n_U,130,""\n'
        "107893,y2bVZ7rz-5M,280,Motor noise is followed by a horn honking\n", encoding="utf-8")
    out = tmp_path / "ac.jsonl"
    code, printed = prepare(capsys, "audiocaps", "--root", root, "--out", out)
    assert code == 0 and "skipped 109001: empty caption" in printed
    assert "skipped 107893: missing audio file (looked for y2bVZ7rz-5M_280.*" in printed
    rows = read_lines(out)
    assert [(r["id"], Path(r["audio"]).name) for r in rows] == [
        ("97151", "vfY_TJq7n_U_130.flac"), ("108945", "Ytdwhhv3x25Q.wav"), ("107898", "107898.wav")]
    assert rows[0]["caption"] == "Rustling occurs, ducks quack and water splashes" and rows[0]["task"] == "aac"


def test_prepare_clotho_five_captions_per_file(tmp_path, capsys):
    root = tmp_path / "clotho"
    (root / "evaluation").mkdir(parents=True)
    write_clip(root / "evaluation" / "Radio Garble.wav", 1.2, sr=44100)
    (root / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        '"Radio Garble.wav","A radio dispatcher and an officer, talking.",Static on a walkie-talkie.,,'
        '"A café\'s ""noisy"" radio.",People talking through a radio.\n'
        "missing.wav,a,b,c,d,e\n", encoding="utf-8")
    out = tmp_path / "clotho_eval.jsonl"
    code, printed = prepare(capsys, "clotho", "--root", root, "--out", out, "--split", "evaluation")
    assert code == 0 and "skipped Radio Garble_3: empty caption" in printed
    assert all(f"skipped missing_{k}: missing audio file" in printed for k in range(1, 6))
    rows = read_lines(out)
    assert [r["id"] for r in rows] == ["Radio Garble_1", "Radio Garble_2", "Radio Garble_4", "Radio Garble_5"]
    assert rows[0]["caption"] == "A radio dispatcher and an officer, talking." and rows[2]["caption"] == 'A café\'s "noisy" radio.'


def test_prepare_wavcaps_drops_clips_over_180_s_by_header(tmp_path, capsys):
    root = tmp_path / "WavCaps"
    for source in data.WAVCAPS_SOURCES:
        (root / "json_files" / source).mkdir(parents=True)
    nested = root / "Zip_files" / "mnt" / "AudioSet_SL_flac"                 # unzipped archives nest folders
    nested.mkdir(parents=True)
    (root / "bbc").mkdir()
    write_clip(nested / "Y--0w1YA1Hm4.flac", 1.0, sr=32000)
    write_clip(root / "bbc" / "07070263.flac", 1.0, sr=32000)
    sf.write(root / "bbc" / "07070264.flac", np.zeros(181 * 1000, dtype=np.float32), 1000)  # 181 s, tiny
    item = lambda i, caption, duration: {"id": i, "caption": caption, "audio": "wav_path", "duration": duration}
    (root / "json_files" / "AudioSet_SL" / "as_final.json").write_text(json.dumps(
        {"num_captions_per_audio": 1, "data": [item("Y--0w1YA1Hm4.wav", "A vehicle engine revs.", 10.0)]}))
    (root / "json_files" / "BBC_Sound_Effects" / "bbc_final.json").write_text(json.dumps(
        {"num_captions_per_audio": 1, "data": [item("07070263", "Footsteps on gravel.", 1.0),
                                               item("07070264", "A long ambience.", 181.0),
                                               item("07070265", "Missing file.", 3.0)]}))
    (root / "json_files" / "FreeSound" / "fsd_final.json").write_text(json.dumps({"num_captions_per_audio": 1, "data": []}))
    (root / "json_files" / "SoundBible" / "sb_final.json").write_text(json.dumps([item("2219", "", 14.1)]))
    out = tmp_path / "wavcaps.jsonl"
    code, printed = prepare(capsys, "wavcaps", "--root", root, "--out", out)
    assert code == 0
    assert "skipped BBC_Sound_Effects/07070264: too long: 181.0 s > 180 s" in printed
    assert "skipped BBC_Sound_Effects/07070265: missing audio file 07070265.flac" in printed
    assert "skipped SoundBible/2219: empty caption" in printed
    assert [(r["id"], r["caption"]) for r in read_lines(out)] == [
        ("AudioSet_SL/Y--0w1YA1Hm4", "A vehicle engine revs."), ("BBC_Sound_Effects/07070263", "Footsteps on gravel.")]


def test_check_reports_every_failing_line(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "a.flac", 2.0)
    write_clip(tmp_path / "clips" / "c.flac", 1.0)
    (tmp_path / "clips" / "b.flac").write_bytes(b"fLaC" + bytes(100))         # corrupt, in the middle
    rows = [{"id": "a", "audio": "clips/a.flac", "task": "asr", "lang": "en", "transcript": "one"},
            {"id": "b", "audio": "clips/b.flac", "task": "asr", "lang": "en", "transcript": "two"},
            {"id": "c", "audio": "clips/c.flac", "task": "aac", "caption": "three", "start": 0.5, "end": 3.0},
            {"id": "d", "audio": "clips/d.flac", "task": "aac", "caption": "four"},
            {"id": "e", "audio": "clips/a.flac", "task": "aac", "caption": 5},
            {"id": "f", "audio": "clips/a.flac", "start": 0.5, "end": 1.5, "task": "aac", "caption": "six"}]
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    assert data.main(["check", str(m)]) == 1
    printed = capsys.readouterr().out
    assert f"m.jsonl:2: {tmp_path}/clips/b.flac: cannot decode audio file" in printed
    assert "m.jsonl:3: " in printed and "is not inside the file (1.00 s)" in printed
    assert f"m.jsonl:4: {tmp_path}/clips/d.flac: missing audio file" in printed
    assert "m.jsonl:5: field 'caption' must be a string" in printed
    assert "asr: 1 entries, 0.00 h" in printed and "aac: 1 entries" in printed and "2 good entries, 4 failing" in printed
    write_jsonl(m, [rows[0], rows[5]])
    assert data.main(["check", str(m)]) == 0


def test_headers_in_worker_processes_equal_serial(tmp_path, monkeypatch):
    write_clip(tmp_path / "a.flac", 1.5)
    write_clip(tmp_path / "b.wav", 0.5, sr=44100)
    (tmp_path / "c.flac").write_bytes(b"fLaC" + bytes(100))
    paths = [str(tmp_path / n) for n in ("a.flac", "b.wav", "c.flac", "missing.flac", "a.flac")]
    serial = data._headers(paths)
    monkeypatch.setattr(data, "_PARALLEL_HEADERS", 0)
    assert data._headers(paths, workers=2) == serial
    assert serial[paths[0]] == (1.5, None) and serial[paths[3]] == (0.0, "missing audio file")
    assert "cannot decode audio file" in serial[paths[2]][1]
