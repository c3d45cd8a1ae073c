"""The window-level Q-Former of SALMONN (Tang et al. 2023), the bridge between the audio encoders and the LLM.

AI-STA (arXiv 2503.10211) §3.1 and §4.1 use SALMONN's model unchanged:

    Whisper (B, 1500, 1280) --ln_speech--+
                                         +-- concat on features --> (B, 1500, 2048)
    BEATs   (B, 1496,  768) --ln_audio---+       |  windows of 17 frames, stride 17
                                                 v
                  (B*88, 17, 2048) windows, one query per window
                                                 |  2-layer BERT Q-Former, cross-attention to its window
                                                 v
                  (B*88, 1, 768) --speech_llama_proj--> (B, 88, llm_hidden) speech tokens for the LLM

Quirks kept from SALMONN (github bytedance/SALMONN, branch `salmonn`, models/salmonn.py and models/Qformer.py):
- The two streams are LayerNorm-ed first and only then is the shorter one zero-padded at its end, so the
  padded frames are exact zeros (LN of a zero frame would be the LN bias, not zero). Whisper always gives
  1500 frames (its input is padded to 30 s), so in practice BEATs, which follows the clip length, is padded.
- Windows are cut with no padding: floor((1500 - 17) / 17) + 1 = 88 windows cover 88 * 17 = 1496 frames,
  so the last 4 Whisper frames (the last 80 ms of the 30 s window) are never seen. 30 s of BEATs is exactly
  1496 frames, so that stream loses nothing.
- Every window is attended in full: SALMONN passes an all-ones mask, so the padded frames past the end of a
  short clip are attended like real ones.
- The Q-Former is BERT-base's config with random weights. Its queries are not text: there are no word or
  position embeddings, only the embeddings LayerNorm, and only the query feed-forward
  (`intermediate_query`, `output_query`); SALMONN deletes the text FFN and the LM head.
- The window length comes from `round(1500 * 0.333333 / 30) = 17` frames, i.e. 0.34 s at 50 Hz.
- With one query per window (N = 1) the self-attention is a softmax over a single key, identically 1: its
  output is the value projection of the query alone, and the `query`/`key` weights of `attention.self` get
  exactly zero gradient. They are trainable in name only (weight decay still shrinks their weights).

Module names are SALMONN's checkpoint keys (identity map), e.g.
`speech_Qformer.bert.encoder.layer.0.crossattention.self.key.weight`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QFormerConfig:
    speech_dim: int = 1280  # Whisper-large-v2 d_model
    audio_dim: int = 768  # BEATs encoder_embed_dim; 0 = no BEATs stream (SALMONN run without beats_path)
    llm_hidden: int = 5120  # 5120 Vicuna-13B, 3584 Qwen2-7B
    window: int = 17  # frames per window: round(1500 * 0.333333 / 30)
    stride: int = 17  # frames between window starts (no overlap)
    num_query: int = 1  # queries per window; SALMONN and AI-STA use N = 1
    n_layer: int = 2
    hidden: int = 768  # BERT-base
    n_head: int = 12
    ffn: int = 3072
    cross_attention_freq: int = 1  # layer i cross-attends iff i % freq == 0 (SALMONN: every layer)
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12  # BERT's LayerNorm eps; ln_speech / ln_audio are plain nn.LayerNorm (1e-5)
    init_std: float = 0.02  # BERT's initializer_range, also used for the queries

    @property
    def encoder_width(self) -> int:  # width of the fused frames the cross-attention reads
        return self.speech_dim + self.audio_dim

    def __post_init__(self):
        if self.hidden % self.n_head:
            raise ValueError(f"QFormerConfig: hidden={self.hidden} is not a multiple of n_head={self.n_head}")
        for name in ("speech_dim", "llm_hidden", "window", "stride", "num_query", "n_layer", "cross_attention_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"QFormerConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.audio_dim < 0:
            raise ValueError(f"QFormerConfig: audio_dim must be >= 0, got {self.audio_dim}")


class MultiHeadAttention(nn.Module):
    """BERT self- or cross-attention: queries from x, keys and values from kv (the window, for cross)."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_dim, cfg.hidden)  # 2048 -> 768 in the cross-attention
        self.value = nn.Linear(kv_dim, cfg.hidden)
        self.dropout = nn.Dropout(cfg.attn_dropout)

    def forward(self, x, kv):
        B, Tq, C = x.shape  # B here counts windows: (B*L, N, 768)
        Tk = kv.shape[1]
        hs = C // self.n_head
        q = self.query(x).view(B, Tq, self.n_head, hs).transpose(1, 2)  # (B*L, nh, N, hs)
        k = self.key(kv).view(B, Tk, self.n_head, hs).transpose(1, 2)  # (B*L, nh, Tk, hs)
        v = self.value(kv).view(B, Tk, self.n_head, hs).transpose(1, 2)  # (B*L, nh, Tk, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B*L, nh, N, Tk); no mask: SALMONN's is all ones
        att = self.dropout(att.softmax(dim=-1))  # BERT drops attention probabilities
        y = att @ v  # (B*L, nh, N, hs)
        return y.transpose(1, 2).reshape(B, Tq, C)  # (B*L, N, 768)


class AddNorm(nn.Module):
    """BERT's post-LN output block: LayerNorm(residual + dropout(dense(h)))."""

    def __init__(self, cfg: QFormerConfig, in_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.hidden)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)  # BERT's TF-era capitalised name

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Attention(nn.Module):
    """BERT's attention block. `self` is BERT's (and SALMONN's checkpoint's) name for the attention."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_dim)
        self.output = AddNorm(cfg, cfg.hidden)

    def forward(self, x, kv):
        return self.output(self.self(x, kv), x)


class QFormerLayer(nn.Module):
    """Self-attention among a window's queries, cross-attention to the window's frames, query FFN."""

    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden)
        if cross:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        # only the query FFN exists: SALMONN sets the text FFN (`intermediate`, `output`) to None
        self.intermediate_query = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden, cfg.ffn)))
        self.output_query = AddNorm(cfg, cfg.ffn)

    def forward(self, x, window):
        x = self.attention(x, x)  # (B*L, N, 768)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, window)  # (B*L, N, 768), keys/values from (B*L, K, 2048)
        h = F.gelu(self.intermediate_query.dense(x))  # (B*L, N, 3072); BERT's "gelu" is the exact erf form
        return self.output_query(h, x)  # (B*L, N, 768)


class QFormer(nn.Module):
    """SALMONN's `speech_Qformer`: the `.bert` of a BertLMHeadModel whose LM head was deleted."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.bert = nn.ModuleDict(dict(
            # no word/position embeddings: the "embedding" of a query is the query itself, LayerNorm-ed
            embeddings=nn.ModuleDict(dict(LayerNorm=nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps))),
            encoder=nn.ModuleDict(dict(layer=nn.ModuleList(
                QFormerLayer(cfg, cross=i % cfg.cross_attention_freq == 0) for i in range(cfg.n_layer)
            ))),
        ))
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, queries, windows):
        x = self.dropout(self.bert.embeddings.LayerNorm(queries))  # (B*L, N, 768)
        for layer in self.bert.encoder.layer:
            x = layer(x, windows)
        return x  # (B*L, N, 768)


def make_windows(x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Cut (B, T, C) frames into (B, L, window, C) windows; window l holds frames [l*stride, l*stride + window).

    L = (T - window) // stride + 1; a tail shorter than a window is dropped. This is the same assignment and
    feature order as SALMONN's F.unfold over x.transpose(1, 2).unsqueeze(2) with kernel (1, window).
    """
    T = x.shape[1]
    if T < window:
        raise ValueError(f"make_windows: {T} frames are fewer than one window of {window}")
    return x.unfold(1, window, stride).transpose(2, 3)  # (B, L, C, K) -> (B, L, K, C)


class WindowQFormer(nn.Module):
    """Whisper (+ BEATs) frames -> one LLM input embedding per query per 17-frame window.

    forward(whisper_out (B, T_w, speech_dim), beats_out (B, T_b, audio_dim) or None) -> (B, L*N, llm_hidden),
    with L = (max(T_w, T_b) - window) // stride + 1 (88 for Whisper's 1500 frames) and N = num_query;
    the tokens are ordered window by window. The computation runs in the dtype of the module's parameters.
    audio_lengths (B,), optional: row b's BEATs frames from audio_lengths[b] on are treated as absent, zero
    after the LayerNorm, as when that row's clip is alone in its batch (train.py --cache-encoders).
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, cfg.hidden))  # (1, N, 768)
        self.ln_speech = nn.LayerNorm(cfg.speech_dim)
        if cfg.audio_dim:
            self.ln_audio = nn.LayerNorm(cfg.audio_dim)
        self.speech_Qformer = QFormer(cfg)
        self.speech_llama_proj = nn.Linear(cfg.hidden, cfg.llm_hidden)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """SALMONN's initialisation: BERT's (normal(0, 0.02) Linear weights, zero biases, unit LayerNorms)
        inside the Q-Former and for the queries; PyTorch's defaults for ln_speech, ln_audio, speech_llama_proj."""
        self.speech_query_tokens.normal_(0.0, self.cfg.init_std)
        for m in self.speech_Qformer.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, self.cfg.init_std)
                m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        self.ln_speech.reset_parameters()
        if self.cfg.audio_dim:
            self.ln_audio.reset_parameters()
        self.speech_llama_proj.reset_parameters()

    def num_speech_tokens(self, num_frames: int = 1500) -> int:
        """Number of LLM tokens for `num_frames` fused frames: 88 for Whisper's 1500 (any clip <= 30 s)."""
        return ((num_frames - self.cfg.window) // self.cfg.stride + 1) * self.cfg.num_query

    def fuse(self, whisper_out: torch.Tensor, beats_out: torch.Tensor | None = None,
             audio_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """LayerNorm each stream, zero-pad the shorter at its end, concatenate: (B, T, speech_dim + audio_dim).
        With audio_lengths, each row's BEATs frames beyond its length are zero too."""
        cfg = self.cfg
        if whisper_out.ndim != 3 or whisper_out.shape[-1] != cfg.speech_dim:
            raise ValueError(f"whisper_out: expected (B, T, {cfg.speech_dim}), got {tuple(whisper_out.shape)}")
        dtype = self.ln_speech.weight.dtype  # the encoders may run in bf16; the bridge runs in its own dtype
        speech = self.ln_speech(whisper_out.to(dtype))  # (B, T_w, 1280)
        if not cfg.audio_dim:
            if beats_out is not None:
                raise ValueError("beats_out given, but this Q-Former was built with audio_dim=0 (Whisper only)")
            return speech
        if beats_out is None:
            raise ValueError(f"beats_out is required: this Q-Former cross-attends to {cfg.encoder_width}-wide "
                             f"Whisper+BEATs frames (build it with audio_dim=0 for Whisper only)")
        if beats_out.ndim != 3 or beats_out.shape[-1] != cfg.audio_dim:
            raise ValueError(f"beats_out: expected (B, T, {cfg.audio_dim}), got {tuple(beats_out.shape)}")
        if beats_out.shape[0] != whisper_out.shape[0]:
            raise ValueError(f"batch sizes differ: whisper_out {whisper_out.shape[0]}, beats_out {beats_out.shape[0]}")
        audio = self.ln_audio(beats_out.to(dtype))  # (B, T_b, 768)
        if audio_lengths is not None:
            if audio_lengths.shape != (audio.shape[0],):
                raise ValueError(f"audio_lengths: expected ({audio.shape[0]},), got {tuple(audio_lengths.shape)}")
            absent = torch.arange(audio.shape[1], device=audio.device) >= audio_lengths.to(audio.device)[:, None]
            audio = audio.masked_fill(absent[..., None], 0.0)
        # pad after the LayerNorm, so padded frames are exact zeros (SALMONN's order)
        T = max(speech.shape[1], audio.shape[1])
        speech = F.pad(speech, (0, 0, 0, T - speech.shape[1]))  # (B, T, 1280)
        audio = F.pad(audio, (0, 0, 0, T - audio.shape[1]))  # (B, T, 768)
        return torch.cat([speech, audio], dim=-1)  # (B, T, 2048)

    def forward(self, whisper_out: torch.Tensor, beats_out: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        x = self.fuse(whisper_out, beats_out, audio_lengths)  # (B, T, 2048)
        B, T, C = x.shape
        windows = make_windows(x, cfg.window, cfg.stride)  # (B, L, 17, 2048)
        L = windows.shape[1]
        windows = windows.reshape(B * L, cfg.window, C)  # (B*L, 17, 2048): each window is its own "image"
        queries = self.speech_query_tokens.expand(B * L, -1, -1)  # (B*L, N, 768), the same queries everywhere
        out = self.speech_Qformer(queries, windows)  # (B*L, N, 768)
        out = self.speech_llama_proj(out)  # (B*L, N, llm_hidden)
        return out.view(B, L * cfg.num_query, cfg.llm_hidden)  # (B, L*N, llm_hidden)
