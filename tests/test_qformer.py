"""The window-level Q-Former equals transformers' Blip2QFormerModel and has SALMONN's checkpoint keys (SALMONN's
checkpoints are read through SpeechLLM.load_trainable: tests/test_speech_llm.py)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from qformer import QFormerConfig, WindowQFormer, make_windows

# tiny sizes; the fused width (12 + 8 = 20) stands for Whisper 1280 + BEATs 768
TINY = dict(speech_dim=12, audio_dim=8, llm_hidden=24, hidden=32, n_head=4, ffn=64)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = WindowQFormer(QFormerConfig(**{**TINY, **kw}))
    with torch.no_grad():  # O(1) activations (so the GELU variant matters), non-trivial LayerNorm affines
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return m.eval()


def hf_qformer(model: WindowQFormer) -> Blip2QFormerModel:
    """HF's Q-Former with our weights, copied with an explicit key map."""
    c = model.cfg
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=c.hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, intermediate_size=c.ffn,
        encoder_hidden_size=c.encoder_width, cross_attention_frequency=c.cross_attention_freq,
        hidden_act="gelu", layer_norm_eps=1e-12)).eval()
    ours = {}
    for k, v in model.speech_Qformer.state_dict().items():
        k = k.removeprefix("bert.")
        k = k.replace("embeddings.LayerNorm.", "layernorm.")
        k = k.replace("attention.self.", "attention.attention.")  # also crossattention.self.
        ours[k] = v
    assert set(ours) == set(hf.state_dict()), set(ours) ^ set(hf.state_dict())
    hf.load_state_dict(ours, strict=True)
    return hf


def salmonn_windows(x, kernel, stride):
    """SALMONN's windowing, re-derived: F.unfold over (B, C, 1, T) with a (1, kernel) kernel."""
    B, T, C = x.shape
    u = F.unfold(x.transpose(1, 2).unsqueeze(2), kernel_size=(1, kernel), stride=(1, stride))  # (B, C*K, L)
    L = u.shape[-1]
    return u.view(B, C, kernel, L).permute(0, 3, 2, 1).reshape(B * L, kernel, C)  # (B*L, K, C)


@pytest.mark.parametrize("freq,num_query", [(1, 1), (2, 1), (1, 3)])
def test_qformer_equals_hf_blip2(freq, num_query):
    m = tiny_model(cross_attention_freq=freq, num_query=num_query)
    hf = hf_qformer(m)
    windows = torch.randn(10, 17, m.cfg.encoder_width)  # (B*L, K, C)
    queries = m.speech_query_tokens.expand(10, -1, -1)
    with torch.no_grad():
        ours = m.speech_Qformer(queries, windows)
        ref = hf(query_embeds=queries, encoder_hidden_states=windows).last_hidden_state
    torch.testing.assert_close(ours, ref)
    assert hasattr(m.speech_Qformer.bert.encoder.layer[1], "crossattention") == (freq == 1)


def test_windows_match_salmonn_unfold():
    x = torch.randn(2, 1500, 5)
    w = make_windows(x, 17, 17)  # (B, L, K, C)
    assert w.shape == (2, 88, 17, 5)
    torch.testing.assert_close(w.reshape(-1, 17, 5), salmonn_windows(x, 17, 17), rtol=0, atol=0)
    torch.testing.assert_close(w[1, 87, 16], x[1, 87 * 17 + 16])  # frame 1495 is the last one seen
    x = torch.randn(2, 23, 5)  # overlapping windows: stride < kernel
    torch.testing.assert_close(make_windows(x, 5, 3).reshape(-1, 5, 5), salmonn_windows(x, 5, 3), rtol=0, atol=0)


def test_pad_after_layernorm():
    m = tiny_model()
    whisper, beats = torch.randn(2, 1500, 12), torch.randn(2, 1496, 8)
    with torch.no_grad():
        fused = m.fuse(whisper, beats)  # (B, T, 20)
    assert fused.shape == (2, 1500, 20)
    assert torch.all(fused[:, 1496:, 12:] == 0)  # padded after LN: zeros, not the LN bias
    assert m.ln_audio.bias.abs().min() > 0
    torch.testing.assert_close(fused[:, :1496, 12:], F.layer_norm(beats, (8,), m.ln_audio.weight, m.ln_audio.bias))
    torch.testing.assert_close(fused[:, :, :12], F.layer_norm(whisper, (12,), m.ln_speech.weight, m.ln_speech.bias))
    with torch.no_grad():  # the other way round: a longer BEATs stream pads Whisper
        fused = m.fuse(torch.randn(2, 30, 12), torch.randn(2, 34, 8))
    assert fused.shape == (2, 34, 20) and torch.all(fused[:, 30:, :12] == 0)
    with torch.no_grad():  # audio_lengths: each row's BEATs frames from its length on are zero as well
        full = m.fuse(whisper, beats)
        cut = m.fuse(whisper, beats, audio_lengths=torch.tensor([1496, 700]))
    assert torch.equal(cut[0], full[0]) and torch.equal(cut[1, :700], full[1, :700])
    assert torch.all(cut[1, 700:, 12:] == 0) and torch.equal(cut[1, 700:, :12], full[1, 700:, :12])
    with pytest.raises(ValueError, match="audio_lengths"):
        m.fuse(whisper, beats, audio_lengths=torch.tensor([1496]))


def test_window_qformer_equals_hf_composition():
    m = tiny_model()
    hf = hf_qformer(m)
    whisper, beats = torch.randn(2, 1500, 12), torch.randn(2, 1496, 8)  # 30 s of audio
    with torch.no_grad():
        ours = m(whisper, beats)
        s = F.layer_norm(whisper, (12,), m.ln_speech.weight, m.ln_speech.bias)
        a = F.pad(F.layer_norm(beats, (8,), m.ln_audio.weight, m.ln_audio.bias), (0, 0, 0, 4))
        windows = salmonn_windows(torch.cat([s, a], -1), 17, 17)  # (B*88, 17, 20)
        q = hf(query_embeds=m.speech_query_tokens.expand(windows.shape[0], -1, -1),
               encoder_hidden_states=windows).last_hidden_state
        ref = m.speech_llama_proj(q).view(2, -1, 24)
    assert ours.shape == (2, 88, 24) and m.num_speech_tokens(1500) == 88
    torch.testing.assert_close(ours, ref)
    with torch.no_grad():  # bf16 encoder outputs: the bridge upcasts them and computes in its own fp32
        from_bf16 = m(whisper.bfloat16(), beats.bfloat16())
        upcast_first = m(whisper.bfloat16().float(), beats.bfloat16().float())
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, upcast_first, rtol=0, atol=0)


def test_whisper_only_and_input_errors():
    m = tiny_model(audio_dim=0)
    assert not hasattr(m, "ln_audio")
    assert m(torch.randn(1, 1500, 12)).shape == (1, 88, 24)
    with pytest.raises(ValueError, match="audio_dim=0"):
        m(torch.randn(1, 1500, 12), torch.randn(1, 1496, 8))
    m = tiny_model()
    with pytest.raises(ValueError, match="beats_out is required"):
        m(torch.randn(1, 1500, 12))
    with pytest.raises(ValueError, match="whisper_out"):
        m(torch.randn(1, 1500, 13), torch.randn(1, 1496, 8))
    with pytest.raises(ValueError, match="fewer than one window"):
        m(torch.randn(1, 10, 12), torch.randn(1, 10, 8))


def test_dropout_active_in_train_mode():
    m = tiny_model().train()
    x = (torch.randn(1, 40, 12), torch.randn(1, 40, 8))
    assert not torch.equal(m(*x), m(*x))
    m.eval()
    assert torch.equal(m(*x), m(*x))


def salmonn_qformer_keys(n_layer=2):
    """SALMONN's trainable bridge keys, written out from its models/salmonn.py and models/Qformer.py."""
    keys = ["speech_query_tokens", "ln_speech.weight", "ln_speech.bias", "ln_audio.weight", "ln_audio.bias",
            "speech_Qformer.bert.embeddings.LayerNorm.weight", "speech_Qformer.bert.embeddings.LayerNorm.bias",
            "speech_llama_proj.weight", "speech_llama_proj.bias"]
    for i in range(n_layer):
        p = f"speech_Qformer.bert.encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            keys += [f"{p}{att}.self.{n}.{t}" for n in ("query", "key", "value") for t in ("weight", "bias")]
            keys += [f"{p}{att}.output.{n}.{t}" for n in ("dense", "LayerNorm") for t in ("weight", "bias")]
        keys += [f"{p}intermediate_query.dense.{t}" for t in ("weight", "bias")]
        keys += [f"{p}output_query.{n}.{t}" for n in ("dense", "LayerNorm") for t in ("weight", "bias")]
    return keys


def test_state_dict_keys_are_salmonns():
    assert sorted(tiny_model().state_dict()) == sorted(salmonn_qformer_keys())
    assert sorted(WindowQFormer(QFormerConfig(**TINY, n_layer=3)).state_dict()) == sorted(salmonn_qformer_keys(3))
