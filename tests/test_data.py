"""Manifests and batches: relative paths, precise errors, and batch features equal to each clip alone."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import data


def write_clip(path, seconds, sr=16000, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def test_manifest_resolves_paths_and_names_bad_lines(tmp_path):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "a.wav", 1.2)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"audio": "clips/a.wav", "transcript": "hello"}) + "\n\n")
    [e] = data.read_manifest(m, require=("audio", "transcript"))
    assert e["audio"] == str((tmp_path / "clips" / "a.wav").resolve()) and e["transcript"] == "hello"
    m.write_text(json.dumps({"audio": "clips/a.wav", "transcript": "hello"}) + "\n" + json.dumps({"audio": "b.wav"}))
    with pytest.raises(ValueError, match=r"m\.jsonl:2: field 'transcript' is missing"):
        data.read_manifest(m, require=("audio", "transcript"))
    m.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:1: invalid JSON"):
        data.read_manifest(m)
    m.write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        data.read_manifest(m)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        data.read_manifest(tmp_path / "nowhere.jsonl")


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
