"""Manifests, segments, and the training stream: precise errors, exact slicing, determinism and resumption."""
import json
import math
import re
import warnings
from collections import Counter

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
    with pytest.raises(data.ManifestError, match=re.escape(f"m.jsonl:2: ") + ".*" + re.escape(message)):
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
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate, num_workers=1)
    with pytest.raises(data.AudioError, match=re.escape(f"entry 'u3': cannot decode audio file {bad}")):
        list(loader)
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
