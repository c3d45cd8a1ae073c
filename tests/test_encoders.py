"""The frozen encoders: Whisper's equals HF transformers' WhisperEncoder."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from model import CheckpointError, WhisperEncoder, WhisperEncoderConfig, sinusoids

transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------------------------------
# Whisper
# ----------------------------------------------------------------------------------------------------

TINY_WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                    decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80,
                    vocab_size=100, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                    decoder_start_token_id=1)


def make_hf_whisper(model_cls, max_source_positions, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(**TINY_WHISPER, max_source_positions=max_source_positions,
                                     attn_implementation="sdpa")
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so that a mis-wired one cannot hide
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "layer_norm" in n:
                p.normal_(1.0 if "layer_norm" in n and n.endswith("weight") else 0.0, 0.3)
    return hf


def hf_encoder(hf):
    return hf.model.encoder if hasattr(hf, "model") else hf.encoder


@pytest.mark.parametrize("model_cls,positions", [("WhisperForConditionalGeneration", 50),
                                                 ("WhisperModel", 1500)])
def test_whisper_matches_hf(tmp_path, model_cls, positions):
    """Saved with save_pretrained (encoder + decoder keys), loaded by our loader, same output in fp32.

    WhisperForConditionalGeneration stores `model.encoder.*`, WhisperModel `encoder.*`; the decoder keys
    must be ignored. 1500 positions is the real 3000-frame input; 50 is a config HF allows too (100 frames).
    """
    hf = make_hf_whisper(model_cls, positions)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = WhisperEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.n_frames == 2 * positions
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 2 * positions)
    with torch.no_grad():
        ref = hf_encoder(hf)(mel).last_hidden_state
    out = ours(mel)
    assert out.shape == (2, positions, 64)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_whisper_loads_weights_file_and_ignores_proj_out(tmp_path):
    """A bare model.safetensors path (config.json read beside it, or given); an extra `proj_out` is ignored."""
    hf = make_hf_whisper("WhisperForConditionalGeneration", 50)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["proj_out.weight"] = torch.randn(100, 64)
    save_file(sd, tmp_path / "model.safetensors")
    mel = torch.randn(1, 80, 100)
    with torch.no_grad():
        ref = hf.model.encoder(mel).last_hidden_state
    for kw in ({}, {"config": WhisperEncoderConfig(64, 2, 4, 128, 80, 50)}):
        ours = WhisperEncoder.from_pretrained(tmp_path / "model.safetensors", dtype=torch.float32, **kw)
        assert_close(ours(mel), ref, rtol=1e-5, atol=1e-5)
    # without config.json beside the file and no config given: a clear error
    (tmp_path / "w").mkdir()
    (tmp_path / "model.safetensors").rename(tmp_path / "w" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json.*whisper-large-v2"):
        WhisperEncoder.from_pretrained(tmp_path / "w" / "model.safetensors")


def test_whisper_from_scratch_positions_are_hf_sinusoids():
    hf = make_hf_whisper("WhisperModel", 50)   # HF initialises embed_positions with Whisper's sinusoids
    ours = WhisperEncoder(WhisperEncoderConfig(64, 2, 4, 128, 80, 50))
    assert_close(ours.embed_positions.weight, hf.encoder.embed_positions.weight, rtol=0, atol=1e-6)
    assert sinusoids(1500, 1280).shape == (1500, 1280)


def test_whisper_input_length_is_enforced():
    enc = WhisperEncoder(WhisperEncoderConfig(32, 1, 2, 64, 80, 1500))
    with pytest.raises(ValueError, match="exactly 3000 mel frames.*got 2999.*allow_short"):
        enc(torch.randn(1, 80, 2999))
    with pytest.raises(ValueError, match="exactly 3000 mel frames.*got 3001.*never allowed"):
        enc(torch.randn(1, 80, 3001), allow_short=True)
    with pytest.raises(ValueError, match=r"\(B, 80, 3000\), got \(1, 128, 3000\)"):
        enc(torch.randn(1, 128, 3000))
    with pytest.raises(ValueError, match="got"):
        enc(torch.randn(80, 3000))
    # allow_short: the first ceil(T/2) positions only, and NOT the first frames of the 30-s output
    mel = torch.randn(1, 80, 3000)
    short = enc(mel[:, :, :999], allow_short=True)
    assert short.shape == (1, 500, 32)
    assert not torch.allclose(short, enc(mel)[:, :500], atol=1e-3)


def test_whisper_preset_has_hf_large_v2_keys_and_shapes():
    """whisper-large-v2 on meta: the same encoder keys and shapes as HF's WhisperModel (prefix stripped)."""
    cfg = transformers.WhisperConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                     encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20,
                                     decoder_ffn_dim=5120, num_mel_bins=80, max_source_positions=1500,
                                     max_target_positions=448, vocab_size=51865)
    with torch.device("meta"):
        hf = transformers.WhisperModel(cfg)
        ours = WhisperEncoder(WhisperEncoderConfig.from_name("whisper-large-v2"))
    ref = {k[len("encoder."):]: tuple(v.shape) for k, v in hf.state_dict().items() if k.startswith("encoder.")}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == ref
    assert "layers.0.self_attn.k_proj.bias" not in got and got["embed_positions.weight"] == (1500, 1280)
    n = ours.num_parameters()
    assert n == sum(p.numel() for p in hf.encoder.parameters())
    assert 630e6 < n < 640e6   # 635 M
    assert WhisperEncoderConfig.from_hf_config(cfg.to_dict()) == WhisperEncoderConfig.from_name("whisper-large-v2")


def test_whisper_checkpoint_errors(tmp_path):
    hf = make_hf_whisper("WhisperForConditionalGeneration", 50)
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(f)

    bad = dict(good)
    bad["model.encoder.layers.1.fc1.weight"] = bad["model.encoder.layers.1.fc1.weight"].t().contiguous()
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"model\.safetensors \[model\.encoder\.\*\]: key layers\.1\.fc1\.weight "
                                              r"has shape \(64, 128\), but the model expects \(128, 64\)"):
        WhisperEncoder.from_pretrained(tmp_path)

    bad = {k: v for k, v in good.items() if k != "model.encoder.layers.1.fc2.bias"}
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=f"{tmp_path}: missing key.*layers.1.fc2.bias"):
        WhisperEncoder.from_pretrained(tmp_path)

    bad = dict(good, **{"model.encoder.layers.0.self_attn.k_proj.bias": torch.zeros(64)})
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="unexpected key.*layers.0.self_attn.k_proj.bias"):
        WhisperEncoder.from_pretrained(tmp_path)

    save_file({k: v for k, v in good.items() if k.startswith("model.decoder.")}, f)
    with pytest.raises(CheckpointError, match="missing key"):
        WhisperEncoder.from_pretrained(tmp_path)


def test_whisper_stays_frozen_under_parent_train(tmp_path):
    hf = make_hf_whisper("WhisperModel", 50)
    hf.save_pretrained(tmp_path)
    parent = nn.ModuleDict(dict(speech_encoder=WhisperEncoder.from_pretrained(tmp_path, dtype=torch.float32),
                                proj=nn.Linear(4, 4)))
    parent.train()
    assert parent.proj.training and not any(m.training for m in parent.speech_encoder.modules())
    assert not any(p.requires_grad for p in parent.speech_encoder.parameters())
