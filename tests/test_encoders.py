"""The frozen encoders: Whisper's equals HF transformers' WhisperEncoder; BEATs equals the official code.

BEATs is checked against golden tensors produced once by the official implementation (github
microsoft/unilm `beats/`, commit 768a3c873f59) from a tiny random checkpoint in the official format;
tests/data/README.md says how (config, seeds). Only the tensors and the tiny checkpoint are committed.
"""
import argparse
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from model import (BEATs, BEATsConfig, CheckpointError, WhisperEncoder, WhisperEncoderConfig,
                   _reduce_padding_mask, relative_position_bucket, sinusoids)

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data"
BEATS_CKPT = DATA / "beats_tiny.pt"
BEATS_GOLDEN = DATA / "beats_tiny_golden.pt"

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
    with pytest.raises(CheckpointError, match="config.json.*whisper-large-v2"):
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
    assert n == 636_784_640    # 634.9 M + the stored 1500 x 1280 positions
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


# ----------------------------------------------------------------------------------------------------
# BEATs
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    g = torch.load(BEATS_GOLDEN, weights_only=True)
    pad = torch.arange(g["num_samples"])[None, :] >= g["lengths"][:, None]     # (2, N) waveform level
    return g, g["fbank"].float(), pad


@pytest.fixture(scope="module")
def beats_tiny():
    return BEATs.from_pretrained(BEATS_CKPT, dtype=torch.float32)


def test_beats_matches_official(beats_tiny, golden):
    g, fbank, pad = golden
    out, mask = beats_tiny(fbank)
    assert mask is None and out.shape == (2, 8 * (173 // 16), 32)
    assert_close(out, g["features"], rtol=1e-5, atol=1e-5)

    out, mask = beats_tiny(fbank, pad)
    assert torch.equal(mask, g["padding_mask_out"])
    assert 0 < int(mask[1].sum()) < 80 and not mask[0].any()           # row 1 is padded, row 0 is not
    assert_close(out, g["features_padded"], rtol=1e-5, atol=1e-5)
    # padding changes the real frames' outputs too (masked keys, zeroed input of the positional conv)
    assert not torch.allclose(g["features_padded"][1, :40], g["features"][1, :40], atol=1e-2)

    # a frame-level mask (B, T) gives the same result: its first reduction is the identity
    frame_mask = _reduce_padding_mask(pad, fbank.shape[1])
    out2, mask2 = beats_tiny(fbank, frame_mask)
    assert torch.equal(mask2, mask) and torch.equal(out2, out)


def test_beats_padding_mask_reduction_is_the_official_one():
    """Waveform (B, N) -> frames (B, T) -> tokens (B, T'): trim N mod T, groups of N // T, all() per group."""
    mask = torch.zeros(1, 28000, dtype=torch.bool)
    mask[0, 17000:] = True
    frames = _reduce_padding_mask(mask, 173)       # 28000 = 173 · 161 + 147: 147 trimmed, groups of 161
    first_pad = int(frames[0].float().argmax())
    assert first_pad == -(-17000 // 161) and frames[0, first_pad:].all()
    tokens = _reduce_padding_mask(frames, 80)      # 173 = 80 · 2 + 13: 13 trimmed, pairs of frames
    assert tokens[0].tolist() == [2 * i >= first_pad for i in range(80)]


def test_relative_position_bucket_values():
    """T5 bidirectional buckets for the real config (320 buckets, max distance 800), worked out by hand:
    half = 160, max_exact = 80; a key to the right adds 160; far distances: 80 + floor(log10(d/80) · 80)."""
    rel = torch.tensor([0, -1, 1, -79, 79, 80, -80, 100, 799, 800, 5000, -5000])
    want = [0, 1, 161, 79, 239, 240, 80, 160 + 87, 319, 319, 319, 159]
    assert relative_position_bucket(rel, 320, 800).tolist() == want


def official_key_shapes(E=768, L=12, H=12, F=3072, D=512, P=16, K=128, G=16, buckets=320, classes=527):
    """The official state-dict layout (reference-facts.md §1, official BEATs code), with its shapes."""
    keys = {"patch_embedding.weight": (D, 1, P, P), "layer_norm.weight": (D,), "layer_norm.bias": (D,),
            "post_extract_proj.weight": (E, D), "post_extract_proj.bias": (E,),
            "encoder.pos_conv.0.weight_g": (1, 1, K), "encoder.pos_conv.0.weight_v": (E, E // G, K),
            "encoder.pos_conv.0.bias": (E,), "encoder.layer_norm.weight": (E,), "encoder.layer_norm.bias": (E,),
            "predictor.weight": (classes, E), "predictor.bias": (classes,)}
    for i in range(L):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"], keys[p + f"self_attn.{proj}.bias"] = (E, E), (E,)
        keys[p + "self_attn.grep_linear.weight"], keys[p + "self_attn.grep_linear.bias"] = (8, E // H), (8,)
        keys[p + "self_attn.grep_a"] = (1, H, 1, 1)
        keys[p + "self_attn.relative_attention_bias.weight"] = (buckets, H)   # one table, under every layer
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            keys[p + f"{ln}.weight"], keys[p + f"{ln}.bias"] = (E,), (E,)
        keys[p + "fc1.weight"], keys[p + "fc1.bias"] = (F, E), (F,)
        keys[p + "fc2.weight"], keys[p + "fc2.bias"] = (E, F), (E,)
    return keys


def to_ours(official: dict) -> dict:
    """The official layout -> ours: no `predictor.*`; weight_g, weight_v -> one folded `weight`."""
    out = {k: s for k, s in official.items() if not k.startswith("predictor.")}
    del out["encoder.pos_conv.0.weight_g"]
    out["encoder.pos_conv.0.weight"] = out.pop("encoder.pos_conv.0.weight_v")
    return out


def test_beats_keys_match_official_checkpoint():
    # the tiny checkpoint written by the official code
    official = {k: tuple(v.shape) for k, v in torch.load(BEATS_CKPT, weights_only=True)["model"].items()}
    assert official == official_key_shapes(E=32, L=2, H=2, F=64, D=24, P=16, K=16, G=4, buckets=32, classes=5)
    cfg = BEATsConfig.from_checkpoint_cfg(torch.load(BEATS_CKPT, weights_only=True)["cfg"])
    with torch.device("meta"):
        tiny = BEATs(cfg)
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == to_ours(official)
    # the real preset, against the official layout with the real config
    with torch.device("meta"):
        real = BEATs(BEATsConfig.from_name("beats-iter3-plus-as2m-cpt2"))
    assert {k: tuple(v.shape) for k, v in real.state_dict().items()} == to_ours(official_key_shapes())
    assert real.encoder.layers[0].deep_norm_alpha == pytest.approx(24 ** 0.25)
    assert real.encoder.layers[11].self_attn.relative_attention_bias is real.encoder.layers[0].self_attn.relative_attention_bias
    assert real.num_parameters() == 90_311_664   # the shared table counted once, no predictor


def test_beats_loads_weight_norm_folded(beats_tiny):
    sd = torch.load(BEATS_CKPT, weights_only=True)["model"]
    g, v = sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
    w = beats_tiny.encoder.pos_conv[0].weight
    assert_close(w, torch._weight_norm(v, g, 2))
    assert_close(w.norm(dim=(0, 1)), g.flatten())          # |w| per kernel tap equals g


def save_beats(tmp_path, edit):
    ckpt = torch.load(BEATS_CKPT, weights_only=True)
    edit(ckpt)
    path = tmp_path / "beats.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit,error", [
    (lambda c: c.pop("cfg"), r"beats\.pt: not an official BEATs checkpoint: expected a dict with 'cfg' and 'model'"),
    (lambda c: c.update(cfg=[1, 2]), r"beats\.pt \['cfg'\]: expected a dict, found list"),
    (lambda c: c["cfg"].update(layer_norm_first=True), r"\['cfg'\]: BEATs cfg layer_norm_first=True is not supported"),
    (lambda c: c["model"].pop("encoder.layers.1.fc2.bias"), r"beats\.pt: missing key.*encoder\.layers\.1\.fc2\.bias"),
    (lambda c: c["model"].update({"encoder.layers.0.fc1.weight": torch.zeros(32, 64)}),
     r"beats\.pt: key encoder\.layers\.0\.fc1\.weight has shape \(32, 64\), but the model expects \(64, 32\)"),
    (lambda c: c["model"].pop("encoder.pos_conv.0.weight_g"), r"beats\.pt: missing key encoder\.pos_conv\.0\.weight_g"),
    (lambda c: c["model"].update({"encoder.pos_conv.0.weight_v": torch.zeros(32, 8, 15)}),
     r"key encoder\.pos_conv\.0\.weight_v has shape \(32, 8, 15\), but the model expects \(32, 8, 16\)"),
    (lambda c: c["model"].update({"encoder.layers.1.self_attn.relative_attention_bias.weight": torch.zeros(32, 2)}),
     r"encoder\.layers\.1\.self_attn\.relative_attention_bias\.weight \(32, 2\) differs from encoder\.layers\.0"),
    (lambda c: c["cfg"].update(extra=argparse.Namespace(a=1)), r"beats\.pt: torch\.load\(weights_only=True\) refuses the object argparse\.Namespace"),
])
def test_beats_checkpoint_errors(tmp_path, edit, error):
    path = save_beats(tmp_path, edit)
    with pytest.raises(CheckpointError, match=error):
        BEATs.from_pretrained(path)


def test_beats_accepts_a_single_copy_of_the_shared_table(tmp_path, beats_tiny, golden):
    path = save_beats(tmp_path, lambda c: c["model"].pop("encoder.layers.1.self_attn.relative_attention_bias.weight"))
    m = BEATs.from_pretrained(path, dtype=torch.float32)
    _, fbank, _ = golden
    assert torch.equal(m(fbank)[0], beats_tiny(fbank)[0])


def test_beats_input_errors(beats_tiny, golden):
    _, fbank, pad = golden
    with pytest.raises(ValueError, match=r"\(B, T, 128\), got \(2, 128, 173\)"):
        beats_tiny(fbank.transpose(1, 2))
    with pytest.raises(ValueError, match="at least 16 fbank frames, got 15"):
        beats_tiny(fbank[:, :15])
    with pytest.raises(ValueError, match=r"N >= 173.*got \(2, 100\)"):
        beats_tiny(fbank, pad[:, :100])


# ----------------------------------------------------------------------------------------------------
# Both: frozen, and the same in train and eval mode, whatever the parent does
# ----------------------------------------------------------------------------------------------------

def test_encoders_stay_frozen_under_parent_train(tmp_path):
    hf = make_hf_whisper("WhisperModel", 50)
    hf.save_pretrained(tmp_path)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.speech_encoder = WhisperEncoder.from_pretrained(tmp_path, dtype=torch.float32)
            self.beats = BEATs.from_pretrained(BEATS_CKPT, dtype=torch.float32)
            self.proj = nn.Linear(4, 4)

    parent = Parent()
    parent.train()
    assert parent.training and parent.proj.training
    for enc in (parent.speech_encoder, parent.beats):
        assert not any(p.requires_grad for p in enc.parameters())
        assert not any(isinstance(m, nn.Dropout) for m in enc.modules())   # train() can switch nothing on
    assert all(p.requires_grad for p in parent.proj.parameters())
    # in "training" the outputs are still deterministic and equal to eval's (no dropout anywhere)
    g = torch.load(BEATS_GOLDEN, weights_only=True)
    assert_close(parent.beats(g["fbank"].float())[0], g["features"], rtol=1e-5, atol=1e-5)
    # a freshly built (not loaded) encoder is frozen too
    assert not any(p.requires_grad for p in WhisperEncoder(WhisperEncoderConfig(32, 1, 2, 64, 80, 50)).parameters())
