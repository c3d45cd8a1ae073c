"""The networks of AI-STA, written by hand in PyTorch, loading the public checkpoints directly.

Contents, top to bottom:
  1. Checkpoints: one reader for every published format (safetensors, sharded safetensors, pickled
     .bin / .pt / .pth, sharded .bin) and one loader that checks keys, shapes and dtypes and assigns the
     tensors in place into a model built on the meta device. One exception: CheckpointError.
  2. The LLM shared by both backbones (Qwen2-7B; Vicuna-13B-v1.1 = Llama): presets, KV cache, greedy and
     beam-search generation, and the two tokenizers.
  3. The frozen ears: Whisper-large-v2's encoder (HF's keys) and BEATs iter3+ (the official keys), built
     from one attention and one encoder layer.
  4. The speech LLM (AI-STA §3.1, SALMONN's architecture): frozen encoders -> window Q-Former
     (qformer.py) -> LLM with LoRA (lora.py); prompts; the speech pass and the text pass of the joint stage;
     this project's checkpoints and SALMONN's.

Module names equal the public checkpoints' keys (`model.layers.3.self_attn.q_proj.weight`,
`layers.0.fc1.weight` under Whisper's `model.encoder.`), so loading is the identity map.

Quirks of the LLM family worth knowing:
  - Llama and Qwen2 are one network: pre-RMSNorm blocks, rotate-half RoPE (dimension j is paired with
    j + head_dim/2; HF checkpoints are already permuted for it), SwiGLU MLP, untied lm_head.
  - Qwen2 puts biases on q/k/v but not on o; Llama's optional `attention_bias` puts them on all four.
  - Qwen2-7B uses grouped-query attention (28 query heads share 4 key/value heads); Vicuna-13B does not.
  - RMSNorm normalises in float32 and casts back before the weight multiplies (bf16 parity with HF).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import count_trainable, inject_lora
from qformer import QFormerConfig, WindowQFormer

# ----------------------------------------------------------------------------------------------------
# 1. Checkpoints: one reader, one loader, one error
# ----------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint (file, folder or config) that cannot be used; the message names the file and the key."""


def _list_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_file(path: str | os.PathLike) -> dict:
    """One checkpoint file -> its contents on the CPU, memory-mapped (tensors stay on disk until touched).

    safetensors, or a torch pickle read with weights_only=True: a checkpoint is data, never code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:   # a truncated file raises SafetensorError with a terse message
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if culprit is None:
            raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refuses the object {culprit[1]} in this checkpoint. If you "
            f"trust the file, re-save its plain contents once, e.g. torch.save({{'model': torch.load(p, "
            f"weights_only=False)['model']}}, p2)") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, state dict) for each shard of a checkpoint, one shard in memory at a time.

    `path` is a file or an HF model folder holding, looked for in this order: model.safetensors.index.json
    (+ shards), model.safetensors, pytorch_model.bin.index.json (+ shards), pytorch_model.bin (all that
    Vicuna-13B-v1.1 publishes).
    """
    path = Path(path)
    if path.is_file():
        yield path, read_file(path)
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path / index}: not a shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / index} names shard(s) that do not exist: {', '.join(missing)}")
            for shard in shards:
                yield path / shard, read_file(path / shard)
            return
        if (path / single).is_file():
            yield path / single, read_file(path / single)
            return
    raise CheckpointError(f"{path}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json] found")


def assign_weights(model: nn.Module, shards: Iterable[tuple[object, dict[str, torch.Tensor]]], source,
                   *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                   allow_missing: Iterable[str] = ()) -> None:
    """The one key checker and loader: assign the tensors of `shards` ((label, state dict) pairs) to `model`.

    Every key must be one of the model's, with the model's shape, a float tensor for a float parameter;
    every model key must be loaded (but `allow_missing`); otherwise a CheckpointError names the shard (or
    `source`, for missing keys) and the keys. Each tensor is cast to `dtype` (floats only; None keeps the
    checkpoint's), moved to `device` and assigned in place of the parameter: a model built on the meta
    device is filled without ever holding two copies, or an fp32 copy of a bf16 checkpoint.
    """
    expected = model.state_dict()
    loaded: set[str] = set()
    for label, sd in shards:
        unexpected = [k for k in sd if k not in expected]
        if unexpected:
            raise CheckpointError(f"{label}: unexpected key(s) for {type(model).__name__}: {_list_keys(unexpected)}")
        for k, t in sd.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{label}: key {k} has shape {tuple(t.shape)}, "
                                      f"but the model expects {tuple(expected[k].shape)}")
            if expected[k].is_floating_point() and not t.is_floating_point():
                raise CheckpointError(f"{label}: key {k} holds {t.dtype} values, but the model expects "
                                      f"floating-point weights")
        sd = {k: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
              for k, t in sd.items()}
        model.load_state_dict(sd, strict=False, assign=True)
        loaded.update(sd)
    missing = set(expected) - loaded - set(allow_missing)
    if missing:
        raise CheckpointError(f"{source}: missing key(s) for {type(model).__name__}: {_list_keys(missing)}")


def read_json(path: str | os.PathLike, hint: str = "") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class Preset:
    """`from_name` for the config dataclasses: a copy of an entry of PRESETS (filled in below)."""

    @classmethod
    def from_name(cls, name: str):
        cfg = PRESETS.get(name)
        if not isinstance(cfg, cls):
            known = [k for k, v in PRESETS.items() if isinstance(v, cls)]
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {', '.join(known)}")
        return replace(cfg)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())   # a shared parameter counts once


# ----------------------------------------------------------------------------------------------------
# 2. The LLM: one decoder-only network for Llama (Vicuna) and Qwen2
# ----------------------------------------------------------------------------------------------------

@dataclass
class LLMConfig(Preset):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32        # < num_attention_heads: grouped-query attention
    head_dim: int | None = None          # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False               # Qwen2: True
    o_bias: bool = False                 # Llama's attention_bias sets both
    mlp_bias: bool = False
    tie_word_embeddings: bool = False    # both real backbones have an untied lm_head
    max_position_embeddings: int = 4096
    family: str = "llama"                # "llama" | "qwen2": picks the prompt template

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads or self.family not in ("llama", "qwen2"):
            raise ValueError(f"LLMConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads}); family {self.family!r} must be "
                             f"'llama' or 'qwen2'")

    @classmethod
    def from_dir(cls, ckpt_dir: str | os.PathLike) -> "LLMConfig":
        """From an HF `config.json` (Qwen2ForCausalLM or LlamaForCausalLM)."""
        path = Path(ckpt_dir) / "config.json"
        cfg = read_json(path, " (an LLM checkpoint folder needs its config.json)")
        arch = (cfg.get("architectures") or [None])[0]
        family = ({"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}.get(arch)
                  or {"qwen2": "qwen2", "llama": "llama"}.get(cfg.get("model_type")))
        if family is None:
            raise CheckpointError(f"{path}: unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r});"
                                  f" supported: Qwen2ForCausalLM, LlamaForCausalLM")
        rope = cfg.get("rope_parameters") or {}
        if (cfg.get("rope_scaling") or {}).get("rope_type", rope.get("rope_type", "default")) not in (None, "default"):
            raise CheckpointError(f"{path}: RoPE scaling is not supported (rope_scaling={cfg.get('rope_scaling')})")
        bias = cfg.get("attention_bias", False)
        try:
            return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                       num_attention_heads=cfg["num_attention_heads"],
                       num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                       head_dim=cfg.get("head_dim"),
                       rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
                       rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), qkv_bias=family == "qwen2" or bias,
                       o_bias=family != "qwen2" and bias, mlp_bias=cfg.get("mlp_bias", False),
                       tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                       max_position_embeddings=cfg.get("max_position_embeddings", 4096), family=family)
        except KeyError as e:
            raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back, then scale: the order HF uses, so bf16 results agree bit for bit
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) for rotate-half RoPE, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq                  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)                           # (B, T, head_dim)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache: "KVCache | None" = None, is_causal: bool = False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                               # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_head)       # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, is_causal=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` part of an HF causal LM: embeddings, blocks, final norm."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LLMOutput:
    logits: torch.Tensor | None              # (B, T, vocab), (B, 1, vocab) with logits="last", or None
    hidden_states: dict[int, torch.Tensor]   # layer -> (B, T, hidden): 0 = embeddings, l = output of block l


class KVCache:
    """A static key/value cache, preallocated for `max_len` positions and written in place. It also keeps
    the key padding mask of everything written so far, so a decode step knows which cached keys are padding."""

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # True = real token
        self.max_len = max_len
        self.pos = 0              # positions written
        self._step = 0            # positions being written by the current forward

    def begin(self, new_mask: torch.Tensor) -> None:
        """Start a forward over T new positions; new_mask (B, T) marks the real (non-padding) ones."""
        T = new_mask.shape[1]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {T} positions > max_len {self.max_len}")
        self.key_mask[:, self.pos:self.pos + T] = new_mask
        self._step = T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.pos + self._step
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def end(self) -> None:
        self.pos, self._step = self.pos + self._step, 0

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes row index[i]. Only the positions written so far are copied,
        into a second buffer allocated once; the two then swap (not a new whole cache every step)."""
        if not hasattr(self, "_spare"):
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        k2, v2 = self._spare
        torch.index_select(self.k[:, :, :, :self.pos], 1, index, out=k2[:, :, :, :self.pos])
        torch.index_select(self.v[:, :, :, :self.pos], 1, index, out=v2[:, :, :, :self.pos])
        self._spare, self.k, self.v = (self.k, self.v), k2, v2
        self.key_mask = self.key_mask.index_select(0, index)


def _attention_mask(key_mask: torch.Tensor, q_start: int) -> torch.Tensor:
    """key_mask (B, S) of real keys -> boolean SDPA mask (B, 1, T, S) for queries at q_start..S-1.

    Query i sees key j iff j is real and j <= q_start + i (causal). A padding query would then see no key
    and SDPA would return NaN, which leaks through 0·NaN into the real rows; so every query also sees
    itself. Padding outputs are garbage by design and never read.
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(q_start, S, device=key_mask.device)[:, None]    # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]             # (1, S)
    allowed = ((k_pos <= q_pos) & key_mask[:, None, :]) | (k_pos == q_pos)  # (B, T, S)
    return allowed[:, None]


class LLM(nn.Module):
    """A Llama / Qwen2 causal LM whose state_dict keys equal the HF checkpoint's."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                output_layers: Sequence[int] = (), logits: str | None = "all") -> LLMOutput:
        """Run the LLM on input_ids (B, T) or inputs_embeds (B, T, hidden).

        attention_mask (B, T): 1 on real tokens, 0 on padding (left or right); None = no padding.
        cache: a KVCache to read past keys from and write this call's keys into (generation).
        output_layers: residual-stream layers to return (0 = embedding output, l = output of block l,
            before the final norm). logits: "all", "last" (the last position only) or None, in which case
            the forward stops after the highest requested layer (the joint stage's text pass needs only
            layers 0..max(I)): the blocks above it and the lm_head never run.
        """
        cfg = self.config
        layers = sorted(set(output_layers))
        if (input_ids is None) == (inputs_embeds is None) or logits not in ("all", "last", None) or (
                layers and not 0 <= layers[0] <= layers[-1] <= cfg.num_hidden_layers):
            raise ValueError(f"LLM.forward: pass exactly one of input_ids and inputs_embeds, logits in "
                             f"('all', 'last', None) (got {logits!r}), and output_layers within "
                             f"[0, {cfg.num_hidden_layers}] (got {list(output_layers)})")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds   # (B, T, C)
        B, T, _ = x.shape

        # positions count real tokens only, so a left-padded row starts at position 0 like an unpadded one
        new_mask = (torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None
                    else attention_mask.to(device=x.device, dtype=torch.bool))
        start = 0 if cache is None else cache.pos
        if cache is not None:
            cache.begin(new_mask)
        key_mask = new_mask if cache is None else cache.key_mask[:, :start + T]   # (B, S) every key seen
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]       # (B, T)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        padded = attention_mask is not None or (cache is not None and not bool(cache.key_mask[:, :start].all()))
        if not padded and (start == 0 or T == 1):
            # no padding: SDPA's own causal path, or for a one-token decode step no mask at all
            mask, is_causal = None, start == 0 and T > 1
        else:
            mask, is_causal = _attention_mask(key_mask, start), False

        hidden = {0: x} if 0 in layers else {}
        last = cfg.num_hidden_layers if logits is not None else (layers[-1] if layers else 0)
        for i, block in enumerate(self.model.layers[:last]):
            x = block(x, cos, sin, mask, cache, is_causal)
            if i + 1 in layers:
                hidden[i + 1] = x
        if cache is not None:
            cache.end()
        out = None if logits is None else self.lm_head(self.model.norm(x if logits == "all" else x[:, -1:]))
        return LLMOutput(logits=out, hidden_states=hidden)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> "LLM":
        """Load an HF Qwen2 / Llama folder (config.json + weights in any published format), in `dtype`."""
        cfg = LLMConfig.from_dir(ckpt_dir)
        with torch.device("meta"):
            model = cls(cfg)
        # old Llama checkpoints carry RoPE's inverse frequencies; we compute them instead
        shards = ((f, {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")})
                  for f, sd in iter_checkpoint(ckpt_dir))
        assign_weights(model, shards, ckpt_dir, dtype=dtype, device=device,
                       allow_missing=["lm_head.weight"] if cfg.tie_word_embeddings else ())
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def num_parameters(self) -> int:
        return _count(self)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 200, num_beams: int = 1,
                 length_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 ) -> list[list[int]]:
        """Greedy (num_beams=1) or beam-search decoding with the KV cache, batched.

        Prompts of different lengths are LEFT-padded: input_ids (B, T) or inputs_embeds (B, T, hidden),
        attention_mask (B, T) 0 on padding. Each row stops at its own EOS. Returns the new token ids of each
        row, without the EOS. Beam search follows HF transformers: scores are sums of log-probabilities; a
        finished hypothesis scores sum / generated_len ** length_penalty (the EOS counted); a row ends
        once no running beam can beat its worst kept hypothesis.
        """
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        prompt = input_ids if inputs_embeds is None else inputs_embeds
        B, T = prompt.shape[:2]
        device = prompt.device
        mask = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.to(device=device, dtype=torch.bool))
        if not bool(mask[:, -1].all()):
            raise ValueError("generate() needs LEFT-padded prompts: attention_mask[:, -1] must be 1 for every row")
        if num_beams > 1:   # every beam starts as a copy of its prompt
            prompt, mask = prompt.repeat_interleave(num_beams, dim=0), mask.repeat_interleave(num_beams, dim=0)
        cache = KVCache(self.config, prompt.shape[0], T + max_new_tokens, device, self.model.embed_tokens.weight.dtype)
        kw = {"input_ids": prompt} if inputs_embeds is None else {"inputs_embeds": prompt}
        padded = attention_mask is not None
        logits = self(**kw, attention_mask=mask if padded else None, cache=cache, logits="last").logits[:, -1]
        step_mask = torch.ones(prompt.shape[0], 1, dtype=torch.bool, device=device)

        def step(tokens):  # tokens (rows,) -> next logits (rows, vocab)
            return self(input_ids=tokens[:, None], attention_mask=step_mask if padded else None, cache=cache,
                        logits="last").logits[:, -1]

        if num_beams == 1:
            return _greedy(logits, step, eos, max_new_tokens)
        return _beam_search(logits, step, cache, eos, B, num_beams, max_new_tokens, length_penalty)


def _cut_at_eos(row: list[int], eos: list[int]) -> list[int]:
    return next((row[:i] for i, t in enumerate(row) if t in eos), row)


def _greedy(logits, step, eos: list[int], max_new_tokens: int) -> list[list[int]]:
    eos_t = torch.tensor(eos, device=logits.device, dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for t in range(max_new_tokens):
        tok = logits.float().argmax(-1)                           # (B,)
        out.append(tok)
        done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = step(tok)
    return [_cut_at_eos(row, eos) for row in torch.stack(out, 1).tolist()]


def _beam_search(logits, step, cache: KVCache, eos: list[int], B: int, K: int, max_new_tokens: int,
                 length_penalty: float) -> list[list[int]]:
    """Beam search over B prompts with K beams each, rows (b, k) flattened to b*K + k.

    Per step: take the top 2K continuations of each prompt over all its beams (2K, so that K of them
    survive even if up to K end in EOS); those among the top K that end in EOS (or reach the length
    limit) become finished hypotheses scored by log-prob sum / length**length_penalty; the best K that
    did not end continue. A prompt is done when its K kept hypotheses are all filled and the best running
    beam, normalised by the current length, cannot beat the worst of them.
    """
    device = logits.device
    V = logits.shape[-1]
    NEG = -1.0e9
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    running = torch.zeros(B, K, 0, dtype=torch.long, device=device)          # running token sequences
    run_scores = torch.full((B, K), NEG, device=device)
    run_scores[:, 0] = 0.0                                                   # only beam 0 is live at first
    fin_tokens = torch.zeros(B, K, max_new_tokens, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_scores = torch.full((B, K), NEG, device=device)
    fin_filled = torch.zeros(B, K, dtype=torch.bool, device=device)
    open_rows = torch.ones(B, dtype=torch.bool, device=device)               # can still improve
    for t in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, V) + run_scores[:, :, None]
        top_scores, top_idx = logp.view(B, K * V).topk(2 * K, dim=-1)        # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        seqs = torch.cat([running.gather(1, beam[:, :, None].expand(-1, -1, t)), tok[:, :, None]], dim=2)
        ends = torch.isin(tok, eos_t) | (t == max_new_tokens - 1)            # (B, 2K) hits a stop
        # running beams for the next step: best K continuations that did not stop
        keep = (top_scores + ends.float() * NEG).topk(K, dim=-1).indices     # (B, K)
        next_scores = top_scores.gather(1, keep) + ends.gather(1, keep).float() * NEG
        next_beam = beam.gather(1, keep)
        next_running = seqs.gather(1, keep[:, :, None].expand(-1, -1, t + 1))
        # finished hypotheses: stopped candidates ranked in the top K, while the row may still improve
        cand = top_scores / ((t + 1) ** length_penalty)
        eligible = ends & (torch.arange(2 * K, device=device) < K) & open_rows[:, None]
        cand = torch.where(eligible, cand, cand + NEG)   # NEG is added, as HF does, keeping the order of ties
        all_scores = torch.cat([fin_scores, cand], dim=1)                    # (B, 3K)
        all_tokens = torch.cat([fin_tokens, F.pad(seqs, (0, max_new_tokens - t - 1))], dim=1)
        all_len = torch.cat([fin_len, torch.full_like(cand, t + 1, dtype=torch.long)], dim=1)
        all_filled = torch.cat([fin_filled, eligible], dim=1)
        best = all_scores.topk(K, dim=-1).indices
        fin_scores, fin_len, fin_filled = all_scores.gather(1, best), all_len.gather(1, best), all_filled.gather(1, best)
        fin_tokens = all_tokens.gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
        running, run_scores = next_running, next_scores
        # can any row still improve? (best running score at the current length vs the worst kept)
        worst = torch.where(fin_filled, fin_scores.min(dim=1, keepdim=True).values, torch.full_like(fin_scores, NEG))
        open_rows = open_rows & (run_scores[:, :1] / ((t + 1) ** length_penalty) > worst).any(dim=1)
        if not bool(open_rows.any()) or t == max_new_tokens - 1:
            break
        cache.reorder((next_beam + torch.arange(B, device=device)[:, None] * K).view(-1))
        logits = step(running[:, :, -1].reshape(-1))
    best_tokens, best_len = fin_tokens[:, 0].tolist(), fin_len[:, 0].tolist()
    return [_cut_at_eos(row[:n], eos) for row, n in zip(best_tokens, best_len)]


# ------------------------------------------------------------------ tokenizers

class Tokenizer:
    """The interface of both tokenizers: bos_id (None for Qwen2), eos_id, pad_id, read from the tokenizer files
    (never from config.json, whose bos/eos are wrong for Vicuna-13B-v1.1); encode(text, bos=False) -> ids
    (special-token strings become their ids); decode(ids) -> text (special tokens skipped); token_id(token)."""
    bos_id: int | None
    eos_id: int
    pad_id: int


class BPETokenizer(Tokenizer):
    """Qwen2: byte-level BPE from `tokenizer.json`; no BOS; `<|endoftext|>` ends and pads."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer
        self.path = Path(path)
        try:
            self.tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tokenizer ({e})") from None
        special = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the later file wins
            f = self.path.parent / name
            cfg = read_json(f) if f.is_file() else {}
            for key in ("eos_token", "pad_token"):
                v = cfg.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    special[key] = v
        eos = special.get("eos_token", "<|endoftext|>")
        self.bos_id, self.eos_id, self.pad_id = None, self.token_id(eos), self.token_id(special.get("pad_token", eos))

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """Vicuna / Llama: SentencePiece `tokenizer.model`; `<unk>`=0, `<s>`=1, `</s>`=2.

    The model has no pad piece. Padding is always masked out of attention and loss, so any id works: we
    use `<unk>` (SALMONN adds a `[PAD]` = 32000, outside the embedding).
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read SentencePiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def token_id(self, token: str) -> int:
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise ValueError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if i not in (self.bos_id, self.eos_id)])


def load_tokenizer(ckpt_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an LLM folder: tokenizer.model (SentencePiece) or tokenizer.json (BPE)."""
    d = Path(ckpt_dir)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d / "tokenizer.model")
    if (d / "tokenizer.json").is_file():
        return BPETokenizer(d / "tokenizer.json")
    raise CheckpointError(f"{d}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE) found")


# ----------------------------------------------------------------------------------------------------
# 3. The ears: Whisper encoder and BEATs, frozen
# ----------------------------------------------------------------------------------------------------
#
# Both are transformer encoders with fairseq's names (self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1,
# fc2, final_layer_norm), so they share one attention and one layer. Both are built frozen (no parameter
# requires grad) and have no dropout, so train() and eval() compute the same thing.
#
# Quirks worth knowing:
#   - Whisper: pre-LN; the key projection has no bias; the sinusoidal positions are a stored weight; HF
#     accepts exactly 2·max_source_positions = 3000 mel frames (30 s) and so do we (allow_short opts out).
#   - BEATs: post-LN with deep norm, x = LN(α·x + f(x)), α = (2·layers)^(1/4); the encoder LayerNorm comes
#     BEFORE the layers (layer_norm_first=False); its GELU is evaluated in float32.
#   - BEATs: one relative-position table (T5 buckets) owned by layer 0 and shared by every layer; each
#     layer scales it per query by a learnt gate (gru_rel_pos). The checkpoint repeats it under each layer.
#   - BEATs: the positional conv is weight-normalised in the checkpoint (weight_g, weight_v): folded at load.
#   - BEATs takes its padding mask at the waveform level and reduces it twice (frames, then patches).

class EncoderAttention(nn.Module):
    """Multi-head self-attention, q/k/v/out projections; `bias` (B or 1, nh, T, T) is added to the scores."""

    def __init__(self, d: int, n_head: int, k_bias: bool = True):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=k_bias)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def qkv(self, x: torch.Tensor):
        B, T, _ = x.shape
        return [p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)]

    def attend(self, q, k, v, bias=None) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)           # (B, nh, T, hd), scale hd^-0.5
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.qkv(x))


class EncoderLayer(nn.Module):
    """fc1/fc2 feed-forward with GELU around an attention: pre-LN (Whisper) or post-LN with the residual
    scaled by `deep_norm_alpha` (BEATs; 1 without deep norm)."""

    def __init__(self, attn: nn.Module, d: int, ffn: int, pre_ln: bool, alpha: float = 1.0, gelu_fp32: bool = False):
        super().__init__()
        self.self_attn = attn
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.pre_ln, self.deep_norm_alpha, self.gelu_fp32 = pre_ln, alpha, gelu_fp32

    def ffn(self, x):
        h = self.fc1(x)
        return self.fc2(F.gelu(h.float()).type_as(h) if self.gelu_fp32 else F.gelu(h))

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), *attn_args)
            return x + self.ffn(self.final_layer_norm(x))
        a = self.deep_norm_alpha
        x = self.self_attn_layer_norm(x * a + self.self_attn(x, *attn_args))
        return self.final_layer_norm(x * a + self.ffn(x))


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


# ------------------------------------------------------------------ Whisper encoder

@dataclass
class WhisperEncoderConfig(Preset):
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 80
    max_source_positions: int = 1500     # output frames; the input is 2x as many mel frames (30 s)

    @property
    def n_frames(self) -> int:
        """Mel frames the encoder takes: conv2 has stride 2, so 2 per output position (3000 = 30 s)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "WhisperEncoderConfig":
        """The encoder's part of an HF WhisperConfig dict (config.json of openai/whisper-*)."""
        if cfg.get("activation_function", "gelu") != "gelu" or cfg.get("scale_embedding", False):
            raise CheckpointError(f"{source}: only activation_function='gelu' without scale_embedding is supported")
        try:
            return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table (length, channels): sin on the first half of channels, cos on the second."""
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float))
    scaled_time = torch.arange(length, dtype=torch.float)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperEncoder(nn.Module):
    """Whisper's encoder with HF's module names: `model.encoder.<key>` in the checkpoint is `<key>` here."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # sinusoidal and never trained, but stored in the checkpoint as a weight: loaded, not recomputed
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(
            EncoderLayer(EncoderAttention(d, cfg.encoder_attention_heads, k_bias=False), d, cfg.encoder_ffn_dim,
                         pre_ln=True) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        if not self.embed_positions.weight.is_meta:      # built from scratch: Whisper's own table
            with torch.no_grad():
                self.embed_positions.weight.copy_(sinusoids(cfg.max_source_positions, d))
        _frozen(self)

    def forward(self, mel: torch.Tensor, allow_short: bool = False) -> torch.Tensor:
        """Log-mel (B, n_mels, n_frames) -> hidden states (B, n_frames / 2, d_model) at 50 Hz.

        Whisper is trained on exactly 30 s (3000 frames, shorter audio padded) and HF rejects any other
        length. allow_short=True accepts T < n_frames and returns (B, ceil(T/2), d_model) from the first
        positions only: faster, but NOT the first frames of the 30-s output (attention then sees no padding
        frames), so not what SALMONN / AI-STA computed.
        """
        cfg = self.config
        T = mel.shape[-1]
        if mel.dim() != 3 or mel.shape[1] != cfg.num_mel_bins or not (
                T == cfg.n_frames or (allow_short and 0 < T < cfg.n_frames)):
            raise ValueError(f"Whisper encoder expects log-mel of shape (B, {cfg.num_mel_bins}, {cfg.n_frames}), got "
                             f"{tuple(mel.shape)}: exactly {cfg.n_frames} mel frames (pad shorter audio), got {T}"
                             + (" (longer input is never allowed)" if T > cfg.n_frames else
                                "" if allow_short else "; allow_short=True accepts fewer"))
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))             # (B, d, T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)                           # (B, T/2, d)
        x = x + self.embed_positions.weight[:x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu",
                        config: WhisperEncoderConfig | str | None = None) -> "WhisperEncoder":
        """The encoder of an HF Whisper checkpoint: a folder (config.json + weights in any format
        `iter_checkpoint` reads) or a weights file (its folder's config.json, unless `config`, a
        WhisperEncoderConfig or a preset name, is given). Keys under `model.encoder.`
        (WhisperForConditionalGeneration) or `encoder.` (WhisperModel) are loaded; the rest is ignored."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory (a Whisper checkpoint folder or weights file)")
        if isinstance(config, str):
            config = WhisperEncoderConfig.from_name(config)
        if config is None:
            f = (path if path.is_dir() else path.parent) / "config.json"
            config = WhisperEncoderConfig.from_hf_config(
                read_json(f, " (pass config= to from_pretrained, e.g. config='whisper-large-v2')"), str(f))
        with torch.device("meta"):
            model = cls(config)

        def encoder_keys():   # label each shard with the prefix it used, for error messages
            for file, sd in iter_checkpoint(path):
                prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in sd)), None)
                yield (f"{file} [{prefix or 'no encoder keys'}*]",
                       {k[len(prefix):]: v for k, v in sd.items() if prefix and k.startswith(prefix)})

        assign_weights(model, encoder_keys(), path, dtype=dtype, device=device)
        return _frozen(model)

    def num_parameters(self) -> int:
        return _count(self)


# ------------------------------------------------------------------ BEATs

BEATS_N_MELS = 128          # Kaldi fbank bins of the official preprocess (computed in data.py)


@dataclass
class BEATsConfig(Preset):
    """The official BEATsConfig's names and defaults, so a checkpoint's `cfg` dict means here what it means
    there. Its training-only fields (dropouts, layerdrop, the AudioSet predictor) are ignored: BEATs is frozen."""
    input_patch_size: int = -1           # -1 in the official defaults: every checkpoint sets it (16)
    embed_dim: int = 512                 # patch embedding width
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = False
    conv_pos: int = 128                  # kernel of the convolutional positional embedding
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False

    def __post_init__(self):
        # what this implementation covers (and is tested against): the iter3 / iter3+ networks
        for k, v in dict(activation_fn="gelu", layer_norm_first=False, relative_position_embedding=True,
                         gru_rel_pos=True).items():
            if getattr(self, k) != v:
                raise ValueError(f"BEATs cfg {k}={getattr(self, k)!r} is not supported (only {k}={v!r}, "
                                 f"as in the iter3 / iter3+ checkpoints)")
        if self.input_patch_size <= 0:
            raise ValueError(f"BEATs cfg input_patch_size={self.input_patch_size} (the checkpoint's cfg must set it)")

    @classmethod
    def from_checkpoint_cfg(cls, cfg: dict, source: str = "cfg") -> "BEATsConfig":
        """From the `cfg` dict of an official checkpoint; the fields this network does not use are ignored."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: expected a dict, found {type(cfg).__name__}")
        try:
            return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: {e}") from None


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets as BEATs computes them: rel = key position - query position -> bucket id.

    Half the buckets are for keys to the right (rel > 0), half for the rest. In each half, distances below
    max_exact = num_buckets / 4 get a bucket each; larger ones share log-spaced buckets up to max_distance,
    and everything farther lands in the half's last bucket.
    """
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(dist < max_exact, dist, large)


def _reduce_padding_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L) -> (B, n), as the official `forward_padding_mask`: drop the last L mod n columns, cut the rest
    into n runs of L // n, and call a run padding iff all its columns are."""
    B, L = mask.shape
    return mask[:, :L - L % n].reshape(B, n, -1).all(-1)


class BEATsAttention(EncoderAttention):
    """Self-attention with BEATs' gated relative position bias (gru_rel_pos)."""

    def __init__(self, cfg: BEATsConfig, owns_relative_bias: bool):
        E, H = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        super().__init__(E, H)
        self.grep_linear = nn.Linear(E // H, 8)   # 8 outputs per head from the query: two gates of 4
        self.grep_a = nn.Parameter(torch.ones(1, H, 1, 1))
        if owns_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, H)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); pos_bias (1, nh, T, T) the shared relative bias; key_padding_mask (B, T) True = padding."""
        q, k, v = self.qkv(x)                                                             # (B, nh, T, hd)
        B, H, T, _ = q.shape
        # each query scales the shared bias by its own gate, from its unscaled projection:
        # gate_a, gate_b = sigmoid of two sums of 4 grep_linear outputs; scale = gate_a·(gate_b·grep_a − 1) + 2
        gate_a, gate_b = torch.sigmoid(self.grep_linear(q).view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
        bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * pos_bias                  # (B, nh, T, T)
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        # the official code computes softmax(q·k·hd^-0.5 − rowmax + bias) with q pre-divided by 32 for fp16
        # range; subtracting a per-row constant does not change the softmax, so SDPA computes the same thing
        return self.attend(q, k, v, bias)


class BEATsTransformer(nn.Module):
    """The `encoder.` part: convolutional positional embedding, LayerNorm, post-LN layers."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.config = cfg
        E = cfg.encoder_embed_dim
        # key `encoder.pos_conv.0.*`: the official Sequential(conv, SamePad, GELU), stored weight-normalised
        self.pos_conv = nn.Sequential(nn.Conv1d(E, E, kernel_size=cfg.conv_pos, padding=cfg.conv_pos // 2,
                                                groups=cfg.conv_pos_groups))
        alpha = math.pow(2 * cfg.encoder_layers, 1 / 4) if cfg.deep_norm else 1.0   # DeepNet's residual scale
        self.layers = nn.ModuleList(
            EncoderLayer(BEATsAttention(cfg, owns_relative_bias=i == 0), E, cfg.encoder_ffn_embed_dim,
                         pre_ln=False, alpha=alpha, gelu_fp32=True) for i in range(cfg.encoder_layers))
        # one table, shared: as in the official code every layer registers the same module, so the
        # checkpoint (and our state_dict) list it under every layer
        for layer in self.layers[1:]:
            layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(E)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), padding_mask (B, T) True = padding -> (B, T, C)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x_conv = self.pos_conv(x.transpose(1, 2))                 # (B, C, T + 1) for an even kernel
        if self.config.conv_pos % 2 == 0:
            x_conv = x_conv[:, :, :-1]                            # SamePad: drop the extra last frame
        x = self.layer_norm(x + F.gelu(x_conv).transpose(1, 2))   # layer_norm_first=False: before the layers
        # the bias of every (query, key) pair, computed once from layer 0's table; each layer gates it
        pos = torch.arange(x.shape[1], device=x.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.num_buckets,
                                           self.config.max_distance)                     # (T, T)
        pos_bias = self.layers[0].self_attn.relative_attention_bias(buckets).permute(2, 0, 1)[None].to(x.dtype)
        for layer in self.layers:
            x = layer(x, pos_bias, padding_mask)
        return x


class BEATs(nn.Module):
    """BEATs (iter3 / iter3+) after its preprocess, with the official module names (checkpoint keys)."""

    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.config = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.encoder = BEATsTransformer(cfg)
        _frozen(self)

    def forward(self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised Kaldi fbank (B, T, 128) -> features (B, T', C) and padding mask (B, T') or None.

        T' = 8·floor(T/16): 16x16 patches (time x frequency), flattened time-major (token = 8·t + f), so
        50 tokens/s. padding_mask (B, N), True on padding, is given at the WAVEFORM level (N samples) as in
        the official `extract_features`, and reduced to the T frames, then to the T' tokens (a frame-level
        (B, T) mask also works: its first reduction is the identity). The second reduction marks token i by
        frames 2i and 2i+1, not by its own patch: the official quirk, kept; near the end of a clip a token
        may be marked padding although its patch holds some real frames.
        """
        B, T, n_mels = fbank.shape if fbank.dim() == 3 else (0, 0, 0)
        P = self.config.input_patch_size
        if n_mels != BEATS_N_MELS or T < P:
            raise ValueError(f"BEATs expects fbank of shape (B, T, {BEATS_N_MELS}), got {tuple(fbank.shape)}"
                             + (f": at least {P} fbank frames, got {T}" if n_mels == BEATS_N_MELS else ""))
        if padding_mask is not None and (padding_mask.dim() != 2 or padding_mask.shape[0] != B
                                         or padding_mask.shape[1] < T):
            raise ValueError(f"BEATs padding_mask must be (B={B}, N >= {T}), the waveform-level mask of the N "
                             f"samples the {T} fbank frames came from; got {tuple(padding_mask.shape)}")
        if padding_mask is not None:
            padding_mask = _reduce_padding_mask(padding_mask.to(device=fbank.device, dtype=torch.bool), T)  # (B, T)
        x = self.patch_embedding(fbank.to(self.patch_embedding.weight.dtype)[:, None])   # (B, D, T/16, 8)
        x = self.layer_norm(x.flatten(2).transpose(1, 2))                              # (B, T', D)
        if padding_mask is not None:
            padding_mask = _reduce_padding_mask(padding_mask, x.shape[1])              # (B, T')
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)                                              # (B, T', C)
        return self.encoder(x, padding_mask), padding_mask

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu") -> "BEATs":
        """An official BEATs checkpoint (e.g. BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt): a torch pickle
        {'cfg': dict, 'model': state dict, 'label_dict': ...}. The AudioSet classifier (`predictor.*`) is
        dropped, the positional conv's weight norm folded, the shared relative bias table kept once."""
        path = Path(path)
        ckpt = read_file(path)
        if "cfg" not in ckpt or not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"{path}: not an official BEATs checkpoint: expected a dict with 'cfg' and 'model' "
                                  f"(a state dict), found keys {_list_keys(map(str, ckpt))}")
        cfg = BEATsConfig.from_checkpoint_cfg(ckpt["cfg"], source=f"{path} ['cfg']")
        sd = {k: t for k, t in ckpt["model"].items() if not k.startswith("predictor.")}
        # weight norm over dim 2: weight = g · v / ||v||, the norm over dims 0 and 1 for each kernel tap
        g_key, v_key = "encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"
        E, K = cfg.encoder_embed_dim, cfg.conv_pos
        for k, shape in ((g_key, (1, 1, K)), (v_key, (E, E // cfg.conv_pos_groups, K))):
            if k not in sd:
                raise CheckpointError(f"{path}: missing key {k} (the positional conv is stored weight-normalised)")
            if tuple(sd[k].shape) != shape:
                raise CheckpointError(f"{path}: key {k} has shape {tuple(sd[k].shape)}, but the model expects {shape}")
        g, v = sd.pop(g_key).float(), sd.pop(v_key)
        sd["encoder.pos_conv.0.weight"] = (v.float() * (g / v.float().norm(dim=(0, 1), keepdim=True))).to(v.dtype)
        # the shared relative bias table: the checkpoint repeats it under every layer; the copies must agree
        first = "encoder.layers.0.self_attn.relative_attention_bias.weight"
        others = [f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" for i in range(1, cfg.encoder_layers)]
        for k in [k for k in others if k in sd and first in sd]:
            if sd[k].shape != sd[first].shape or not torch.equal(sd[k], sd[first]):
                raise CheckpointError(f"{path}: key {k} {tuple(sd[k].shape)} differs from {first} "
                                      f"{tuple(sd[first].shape)}: BEATs shares one table across layers")
            del sd[k]
        with torch.device("meta"):
            model = cls(cfg)
        assign_weights(model, [(path, sd)], path, dtype=dtype, device=device, allow_missing=others)
        return _frozen(model)

    def num_parameters(self) -> int:
        return _count(self)


PRESETS = {
    # Qwen/Qwen2-7B config.json
    "qwen2-7b": LLMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                          qkv_bias=True, max_position_embeddings=131072, family="qwen2"),
    # lmsys/vicuna-13b-v1.1 config.json (a LLaMA-13B fine-tune)
    "vicuna-13b-v1.1": LLMConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, rope_theta=10000.0,
                                 rms_norm_eps=1e-6, max_position_embeddings=2048, family="llama"),
    # openai/whisper-large-v2 config.json, encoder part
    "whisper-large-v2": WhisperEncoderConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                                             encoder_ffn_dim=5120, num_mel_bins=80, max_source_positions=1500),
    # BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, ckpt['cfg'] (the audio encoder of SALMONN / AI-STA)
    "beats-iter3-plus-as2m-cpt2": BEATsConfig(
        input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072, encoder_attention_heads=12, layer_norm_first=False, deep_norm=True,
        conv_pos=128, conv_pos_groups=16, relative_position_embedding=True, num_buckets=320, max_distance=800,
        gru_rel_pos=True),
}


# ----------------------------------------------------------------------------------------------------
# 4. The speech LLM: frozen encoders -> window Q-Former -> LLM with LoRA; prompts; the two passes
# ----------------------------------------------------------------------------------------------------

SPEECH_SLOT = "<SpeechHere>"   # where the speech embeddings (or, in the text pass, the transcript) go

# Prompt templates, in one place. Each holds exactly one <SpeechHere> and one {instruction}.
PROMPTS = {
    # SALMONN (Vicuna): "USER: {}\nASSISTANT:" around "<Speech><SpeechHere></Speech> " + instruction.
    # <Speech> and </Speech> are plain text; BOS comes first; the target ends with "</s>".
    "llama": "USER: <Speech><SpeechHere></Speech> {instruction}\nASSISTANT:",
    # Qwen2-Audio's chat template (the paper uses it for the Qwen2 backbone). <|im_start|> and <|im_end|>
    # are special tokens of Qwen2-7B; <|audio_bos|> and <|audio_eos|> are NOT in Qwen2-7B's vocabulary
    # (they are Qwen2-Audio's), so here they are plain text, tokenized like any other characters. The
    # <|AUDIO|> placeholder of Qwen2-Audio is our <SpeechHere>. The target ends with <|im_end|>.
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "Audio 1: <|audio_bos|><SpeechHere><|audio_eos|>\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
}
END_OF_TARGET = {"llama": "</s>", "qwen2": "<|im_end|>"}          # the token the model learns to stop on
STOP_TOKENS = {"llama": ("</s>",), "qwen2": ("<|im_end|>", "<|endoftext|>")}

# Instructions per task; the first of each list is the one used for evaluation and layer selection.
INSTRUCTIONS = {
    "asr": ["Recognize the speech and give me the transcription.",
            "Transcribe the speech into text.",
            "Write down what is said in this audio.",
            "Please transcribe the spoken words."],
    "aac": ["Please describe the audio.",
            "Describe the sounds in this audio clip.",
            "Write a short caption for this audio.",
            "What can you hear in this recording?"],
    "st_en_zh": ["Listen to the speech and translate it into Chinese.",
                 "Translate the English speech into Chinese.",
                 "Please translate what is said into Chinese."],
    "st_en_ja": ["Listen to the speech and translate it into Japanese.",
                 "Translate the English speech into Japanese.",
                 "Please translate what is said into Japanese."],
}


def split_prompt(prompt: str) -> tuple[str, str]:
    """A prompt template -> (text before the speech, text after it, {instruction} still unfilled)."""
    if prompt.count(SPEECH_SLOT) != 1 or "{instruction}" in prompt.split(SPEECH_SLOT)[0]:
        raise ValueError(f"a prompt template needs exactly one {SPEECH_SLOT} (found {prompt.count(SPEECH_SLOT)}), "
                         f"with {{instruction}} after it: {prompt!r}")
    before, after = prompt.split(SPEECH_SLOT)
    return before, after


@dataclass
class PromptBatch:
    """Token ids of a batch of prompts with a slot of embeddings to fill in each row.

    input_ids      (B, T) long  the slot positions hold pad ids, to be replaced by embeddings
    attention_mask (B, T) bool  True on real positions (slot included)
    slot_mask      (B, T) bool  True on the slot (the speech, or the transcript in the text pass)
    labels         (B, T) long  target ids and end token; -100 everywhere else (None without targets)
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_mask: torch.Tensor
    labels: torch.Tensor | None = None

    def truncate(self, end: int) -> "PromptBatch":
        """The first `end` positions (no labels): enough for hidden states up to the end of the slot."""
        return PromptBatch(self.input_ids[:, :end], self.attention_mask[:, :end], self.slot_mask[:, :end])


class Prompter:
    """Turns (instruction, slot length or slot ids, target) into token ids with the backbone's template.

    Every piece is tokenized on its own, as SALMONN does: [BOS] before-text, slot, after-text (with the
    instruction), target, end token. So the slot's positions are known exactly, and the transcript of the
    text pass is tokenized the same way whatever surrounds it.
    """

    def __init__(self, tokenizer: Tokenizer, family: str, prompt: str | None = None):
        self.tok = tokenizer
        self.template = prompt or PROMPTS[family]
        self.before, self.after = split_prompt(self.template)
        self.before_ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(self.before)
        self.end_id = tokenizer.token_id(END_OF_TARGET[family])
        self.stop_ids = [tokenizer.token_id(t) for t in STOP_TOKENS[family]]

    def text_ids(self, text: str, what: str) -> list[int]:
        ids = self.tok.encode(text)
        if not ids:
            raise ValueError(f"{what} {text!r} tokenizes to nothing")
        return ids

    def build(self, instructions: Sequence[str], slots: Sequence[int | list[int]],
              targets: Sequence[str] | None = None, pad_left: bool = False) -> PromptBatch:
        """slots[i]: a slot length (filled with embeddings later) or a list of ids (the transcript).

        Training and hidden-state extraction pad on the right; generation pads on the left.
        """
        if len(instructions) != len(slots) or (targets is not None and len(targets) != len(slots)):
            raise ValueError(f"batch sizes differ: {len(instructions)} instructions, {len(slots)} slots"
                             + (f", {len(targets)} targets" if targets is not None else ""))
        rows = []
        for i, (instr, slot) in enumerate(zip(instructions, slots)):
            slot_ids = [self.tok.pad_id] * slot if isinstance(slot, int) else list(slot)
            ids = self.before_ids + slot_ids + self.tok.encode(self.after.format(instruction=instr.strip()))
            tgt = [] if targets is None else self.text_ids(targets[i], "target") + [self.end_id]
            n_before = len(self.before_ids)
            rows.append((ids + tgt, [-100] * len(ids) + tgt,
                         [n_before <= j < n_before + len(slot_ids) for j in range(len(ids) + len(tgt))]))
        B, T = len(rows), max(len(r[0]) for r in rows)
        input_ids = torch.full((B, T), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.bool)
        slot_mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (ids, lab, is_slot) in enumerate(rows):
            sl = slice(T - len(ids), T) if pad_left else slice(0, len(ids))
            input_ids[b, sl], labels[b, sl], attn[b, sl], slot_mask[b, sl] = (
                torch.tensor(ids), torch.tensor(lab), True, torch.tensor(is_slot))
        return PromptBatch(input_ids, attn, slot_mask, labels if targets is not None else None)


@dataclass
class SpeechLLMConfig:
    llm: LLMConfig
    whisper: WhisperEncoderConfig
    beats: BEATsConfig | None
    qformer: QFormerConfig
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    prompt: str | None = None          # None: the backbone family's template in PROMPTS

    def __post_init__(self):
        q = self.qformer
        beats_dim = self.beats.encoder_embed_dim if self.beats is not None else 0
        for name, have, want in (("qformer.llm_hidden", q.llm_hidden, self.llm.hidden_size),
                                 ("qformer.speech_dim", q.speech_dim, self.whisper.d_model),
                                 ("qformer.audio_dim", q.audio_dim, beats_dim)):
            if have != want:
                raise ValueError(f"SpeechLLMConfig: {name} is {have}, but the model needs {want}")
        self.lora_targets = tuple(self.lora_targets)
        if self.prompt is not None:
            split_prompt(self.prompt)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "SpeechLLMConfig":
        try:
            return cls(llm=LLMConfig(**d["llm"]), whisper=WhisperEncoderConfig(**d["whisper"]),
                       beats=BEATsConfig(**d["beats"]) if d.get("beats") else None, qformer=QFormerConfig(**d["qformer"]),
                       **{k: d[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "prompt") if k in d})
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: not a speech-LLM config ({type(e).__name__}: {e})") from None


@dataclass
class SpeechOutput:
    loss: torch.Tensor | None                 # mean CE over all target tokens of the batch (Eq. 2)
    row_loss: torch.Tensor | None             # (B,) mean CE over each row's target tokens
    hidden_states: dict[int, torch.Tensor]    # layer -> (B, n, hidden) at the slot (speech or transcript)
    mask: torch.Tensor                        # (B, n) True on real slot positions
    correct: torch.Tensor | None = None       # () target tokens whose argmax prediction is right (accuracy)
    n_tokens: torch.Tensor | None = None      # () target tokens (the end token included)


TRAINABLE_FILE, CONFIG_FILE = "trainable.safetensors", "speech_llm.json"
# SALMONN's checkpoints hold the bridge under its own names (ours, minus `bridge.`) and LoRA under peft's
SALMONN_BRIDGE = ("speech_query_tokens", "ln_speech.", "ln_audio.", "speech_Qformer.", "speech_llama_proj.")
SALMONN_LORA = re.compile(r"llama_model\.base_model\.model\.(.+)\.(lora_[AB])\.default\.weight")


def salmonn_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SALMONN state dict (salmonn_v1.pth's ['model']) -> our keys: `bridge.` + its bridge keys; its LoRA
    `llama_model.base_model.model.X.lora_A.default.weight` -> `llm.X.lora_A.weight`. Its other `llama_model.*`
    buffers (RoPE) and BERT's unused `position_ids` are dropped; any other key is kept, for the loader to
    name it."""
    out = {}
    for k, v in sd.items():
        if k.startswith("llama_model.") or k == "speech_Qformer.bert.embeddings.position_ids":
            if m := SALMONN_LORA.fullmatch(k):
                out[f"llm.{m[1]}.{m[2]}.weight"] = v
        else:
            out["bridge." + k if k.startswith(SALMONN_BRIDGE) else k] = v
    return out


class SpeechLLM(nn.Module):
    """SALMONN's architecture (AI-STA §3.1): frozen Whisper + BEATs -> trainable window Q-Former and
    projection -> frozen LLM with trainable LoRA on q_proj / v_proj.

    Submodules: `speech_encoder` (Whisper), `beats`, `bridge` (WindowQFormer: SALMONN's speech_query_tokens,
    ln_speech, ln_audio, speech_Qformer, speech_llama_proj), `llm`.
    """

    def __init__(self, cfg: SpeechLLMConfig, tokenizer: Tokenizer, *, llm: LLM | None = None,
                 speech_encoder: WhisperEncoder | None = None, beats: BEATs | None = None):
        super().__init__()
        self.config = cfg
        self.speech_encoder = speech_encoder or WhisperEncoder(cfg.whisper)
        self.beats = (beats or BEATs(cfg.beats)) if cfg.beats is not None else None
        self.bridge = WindowQFormer(cfg.qformer)
        self.llm = llm or LLM(cfg.llm)
        # LoRA last: it reuses the loaded base weights and freezes everything else in the LLM
        inject_lora(self.llm, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        self.prompter = Prompter(tokenizer, cfg.llm.family, cfg.prompt)
        self.tokenizer = tokenizer
        self.sources: dict[str, str | None] = {}   # where the frozen weights came from (saved with checkpoints)

    # ------------------------------------------------------------------ building and checkpoints
    @classmethod
    def from_pretrained(cls, llm_dir: str | os.PathLike, whisper_path: str | os.PathLike,
                        beats_path: str | os.PathLike | None = None, ckpt: str | os.PathLike | None = None, *,
                        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                        lora_r: int | None = None, lora_alpha: float | None = None,
                        lora_dropout: float | None = None, prompt: str | None = None,
                        qformer: dict | None = None, verbose: bool = True) -> "SpeechLLM":
        """Build from the public checkpoints: the frozen parts in `dtype`, the trainable ones in fp32.

        ckpt: a SALMONN checkpoint (.pth) or this project's checkpoint folder; None starts the bridge and
        LoRA fresh. Their shapes and the prompt come from this project's checkpoint when given, else are
        SALMONN's (BERT-base Q-Former, r=8, alpha=32, dropout 0.1); the arguments override either
        (`qformer`: QFormerConfig fields).
        """
        arch = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, prompt=prompt)
        saved = cls.saved_config(ckpt) if ckpt is not None and Path(ckpt).is_dir() else None
        if saved is not None:
            arch = {k: getattr(saved, k) if v is None else v for k, v in arch.items()}
        arch = {k: v for k, v in arch.items() if v is not None}
        if saved is not None:   # another backbone's checkpoint: refuse it before reading gigabytes of weights
            cls.resolve(ckpt, llm_dir, whisper_path, beats_path or "none")
        llm = LLM.from_pretrained(llm_dir, dtype=dtype, device=device)
        speech_encoder = WhisperEncoder.from_pretrained(whisper_path, dtype=dtype, device=device)
        beats = BEATs.from_pretrained(beats_path, dtype=dtype, device=device) if beats_path else None
        qcfg = {**(asdict(saved.qformer) if saved else {}), **(qformer or {}),   # the dims follow the encoders/LLM
                "speech_dim": speech_encoder.config.d_model, "llm_hidden": llm.config.hidden_size,
                "audio_dim": beats.config.encoder_embed_dim if beats is not None else 0}
        cfg = SpeechLLMConfig(llm=llm.config, whisper=speech_encoder.config, qformer=QFormerConfig(**qcfg),
                              beats=beats.config if beats is not None else None, **arch)
        with torch.device(device):
            model = cls(cfg, load_tokenizer(llm_dir), llm=llm, speech_encoder=speech_encoder, beats=beats)
        model.sources = {"llm": str(llm_dir), "whisper": str(whisper_path), "beats": str(beats_path) if beats_path else None}
        if ckpt is not None:
            model.load_trainable(ckpt)
        if verbose:
            print(model.describe_trainable())
        return model.eval()   # like any loaded model: call .train() to train

    @classmethod
    def resolve(cls, ckpt: str | os.PathLike | None, llm=None, whisper=None, beats=None) -> dict:
        """The base weights a checkpoint needs, checked without loading any weights: {llm, whisper, beats}.

        The paths given win over those recorded in this project's checkpoint (a SALMONN .pth records none;
        beats "none" means a Whisper-only model). Each must exist; the LLM folder's config.json must describe
        the LLM the checkpoint was trained on. For command lines, before anything loads.
        """
        paths = {"llm": llm, "whisper": whisper, "beats": beats}
        saved = None
        if ckpt is not None:
            if not Path(ckpt).exists():
                raise CheckpointError(f"{ckpt}: no such checkpoint file or directory")
            if Path(ckpt).is_dir():
                recorded = cls.checkpoint_info(ckpt).get("sources") or {}
                paths = {k: v if v is not None else recorded.get(k) for k, v in paths.items()}
                saved = cls.saved_config(ckpt)
        if paths["beats"] == "none":
            paths["beats"] = None
        for k in ("llm", "whisper"):
            if not paths[k]:
                raise CheckpointError(f"--{k} is required: {ckpt} records no {k} path")
        for k, p in paths.items():
            if p is not None and not Path(p).exists():
                recorded = p != {"llm": llm, "whisper": whisper, "beats": beats}[k]
                raise CheckpointError(f"--{k} {p}: no such file or directory"
                                      + (f" (recorded in {Path(ckpt) / CONFIG_FILE}; --{k} overrides it)" if recorded else ""))
        if saved is not None:   # the trainable weights fit only the encoders and LLM they were trained on
            have = LLMConfig.from_dir(paths["llm"])
            for f in ("hidden_size", "num_hidden_layers", "vocab_size"):
                if getattr(have, f) != getattr(saved.llm, f):
                    raise CheckpointError(f"{ckpt} was trained on an LLM with {f}={getattr(saved.llm, f)}, but "
                                          f"{paths['llm']} has {f}={getattr(have, f)}: another backbone")
            if (saved.beats is None) != (paths["beats"] is None):
                raise CheckpointError(f"{ckpt} was trained {'without' if saved.beats is None else 'with'} BEATs, "
                                      f"but beats is {paths['beats'] or 'none'}")
            w = Path(paths["whisper"])
            if (w if w.is_dir() else w.parent).joinpath("config.json").is_file():
                f = (w if w.is_dir() else w.parent) / "config.json"
                if WhisperEncoderConfig.from_hf_config(read_json(f), str(f)) != saved.whisper:
                    raise CheckpointError(f"{ckpt} was trained on another Whisper encoder than {f} describes")
        return paths

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, llm=None, whisper=None, beats=None, **kw) -> "SpeechLLM":
        """A trained model: `ckpt` (this project's folder or a SALMONN .pth) on the base weights that
        `resolve` finds; keyword arguments as from_pretrained's."""
        paths = cls.resolve(ckpt, llm, whisper, beats)
        return cls.from_pretrained(paths["llm"], paths["whisper"], paths["beats"], ckpt=ckpt, **kw)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def describe_trainable(self) -> str:
        c = count_trainable(self)
        parts = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in c.items() if k != "total")
        return f"trainable parameters: {c['total'] / 1e6:.2f} M ({parts})"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    def save_trainable(self, out_dir: str | os.PathLike, meta: dict | None = None) -> Path:
        """This project's checkpoint: the trainable weights (safetensors) + the config, sources, `meta` (JSON)."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()},
                  str(out / TRAINABLE_FILE))
        info = {"config": self.config.to_dict(), "sources": self.sources, "meta": meta or {}}
        (out / CONFIG_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False))
        return out

    @staticmethod
    def checkpoint_info(ckpt: str | os.PathLike) -> dict:
        """The JSON beside a checkpoint of this project: config, sources (base weights' paths), meta."""
        info = read_json(Path(ckpt) / CONFIG_FILE, f" (a checkpoint folder of this project holds {TRAINABLE_FILE}"
                                                   f" and {CONFIG_FILE})")
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise CheckpointError(f"{Path(ckpt) / CONFIG_FILE}: no 'config' object")
        return info

    @classmethod
    def saved_config(cls, ckpt: str | os.PathLike) -> SpeechLLMConfig:
        return SpeechLLMConfig.from_dict(cls.checkpoint_info(ckpt)["config"], source=str(Path(ckpt) / CONFIG_FILE))

    def load_trainable(self, ckpt: str | os.PathLike) -> None:
        """The trainable weights, from this project's checkpoint folder or a SALMONN .pth file, through the
        one loader; a frozen weight in the file is refused."""
        path = Path(ckpt)
        if path.is_dir():
            saved = self.saved_config(path).llm
            for f in ("hidden_size", "num_hidden_layers", "vocab_size"):
                if getattr(saved, f) != getattr(self.config.llm, f):
                    raise CheckpointError(f"{path / CONFIG_FILE}: trained for an LLM with {f}={getattr(saved, f)}, "
                                          f"this model has {getattr(self.config.llm, f)}")
            path, sd = path / TRAINABLE_FILE, read_file(path / TRAINABLE_FILE)
        elif path.is_file():
            sd = read_file(path)
            sd = salmonn_to_ours(sd["model"] if isinstance(sd.get("model"), dict) else sd)
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        own, trainable = set(self.state_dict()), set(self.trainable_names())
        frozen = [k for k in sd if k in own and k not in trainable]
        if frozen:
            raise CheckpointError(f"{path}: key(s) of frozen weights in a trainable-weights checkpoint: "
                                  f"{_list_keys(frozen)}")
        assign_weights(self, [(path, sd)], path, dtype=torch.float32, device=self.bridge.speech_llama_proj.weight.device,
                       allow_missing=own - trainable)

    # ------------------------------------------------------------------ the forward passes
    def encode_speech(self, mel: torch.Tensor, fbank: torch.Tensor | None = None,
                      fbank_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel (B, n_mels, n_frames), fbank (B, T, 128) + waveform padding mask (B, N) -> (B, 88, hidden)."""
        if (self.beats is None) != (fbank is None):
            raise ValueError("encode_speech: pass fbank features exactly when the model has BEATs")
        speech = self.encode_whisper(mel)                                                   # (B, 1500, 1280)
        audio = None if self.beats is None else self.encode_beats(fbank, fbank_padding_mask)  # (B, T', 768)
        return self.bridge(speech, audio)                                                   # (B, 88, hidden)

    # the frozen encoders, in their weights' dtype; no activations kept for backward
    @torch.no_grad()
    def encode_whisper(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, n_mels, n_frames) -> Whisper's output (B, 1500, 1280)."""
        return self.speech_encoder(mel.to(self.speech_encoder.conv1.weight.dtype))

    @torch.no_grad()
    def encode_beats(self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """fbank (B, T, 128) + waveform padding mask (B, N) or None -> BEATs' output (B, T', 768)."""
        return self.beats(fbank.to(self.speech_encoder.conv1.weight.dtype), padding_mask)[0]

    def _embed(self, batch: PromptBatch, slot: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the slot positions replaced by `slot` (B, n, hidden) when given."""
        emb = self.llm.model.embed_tokens
        x = emb(batch.input_ids.to(emb.weight.device))                              # (B, T, hidden)
        if slot is not None:   # gradient flows to the slot
            x = x.masked_scatter(batch.slot_mask.to(x.device)[..., None], slot.to(x.dtype))
        return x

    def speech_pass(self, speech_embeds: torch.Tensor, instructions: Sequence[str],
                    targets: Sequence[str] | None = None, layers: Sequence[int] = ()) -> SpeechOutput:
        """The speech pass: CE loss on the targets (Eq. 2) and, on request, the hidden states at the
        speech positions of `layers` (0 = embeddings), with their mask."""
        B, n, _ = speech_embeds.shape
        batch = self.prompter.build(instructions, [n] * B, targets)
        start = len(self.prompter.before_ids)        # the slot starts at the same position in every row
        if targets is None:   # only hidden states: by causality nothing after the speech changes them
            batch = batch.truncate(start + n)
        x = self._embed(batch, speech_embeds)
        L = self.config.llm.num_hidden_layers
        want = set(layers) | ({L} if targets is not None else set())
        out = self.llm(inputs_embeds=x, attention_mask=batch.attention_mask.to(x.device),
                       output_layers=sorted(want), logits=None)
        ce = self._ce(out.hidden_states[L], batch.labels.to(x.device)) if targets is not None else (None,) * 4
        hidden = {l: out.hidden_states[l][:, start:start + n] for l in layers}
        return SpeechOutput(ce[0], ce[1], hidden, batch.slot_mask[:, start:start + n].to(x.device), *ce[2:])

    def _ce(self, h: torch.Tensor, labels: torch.Tensor):
        """Cross-entropy of the next-token predictions at the labelled positions only: the lm_head
        (vocab 152k for Qwen2) runs on the few target positions, not on the whole prompt and speech.
        Returns the mean CE, each row's mean CE (B,), the correct argmax predictions and the target count."""
        pred = labels[:, 1:] != -100                                               # (B, T-1)
        target = labels[:, 1:][pred]                                               # (N,)
        logits = self.llm.lm_head(self.llm.model.norm(h[:, :-1][pred])).float()   # (N, vocab)
        ce = F.cross_entropy(logits, target, reduction="none")                    # (N,)
        row_loss = torch.zeros(labels.shape[0], device=ce.device).index_add(0, pred.nonzero()[:, 0], ce) / pred.sum(1)
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).sum()
        return ce.mean(), row_loss, correct, pred.sum()

    @torch.no_grad()
    def text_pass(self, transcripts: Sequence[str], instructions: Sequence[str], layers: Sequence[int]) -> SpeechOutput:
        """The text pass of the joint stage (§4.3): the same prompt with the transcript's tokens in place of
        the speech; hidden states at the transcript positions of `layers`, with their mask.

        No gradient (the text side is the target the speech is pulled towards), and LoRA dropout off. The
        forward stops after max(layers), and at the end of the longest transcript: by causality nothing
        after a position changes its hidden state, so the instruction and target are never computed.
        """
        ids = [self.prompter.text_ids(t, "transcript") for t in transcripts]
        start, n = len(self.prompter.before_ids), max(len(i) for i in ids)
        cut = self.prompter.build(instructions, ids).truncate(start + n)
        was_training = self.llm.training
        self.llm.eval()
        try:
            device = self.llm.model.embed_tokens.weight.device
            out = self.llm(input_ids=cut.input_ids.to(device), attention_mask=cut.attention_mask.to(device),
                           output_layers=sorted(set(layers)), logits=None)
        finally:
            self.llm.train(was_training)
        hidden = {l: out.hidden_states[l][:, start:start + n] for l in layers}
        return SpeechOutput(None, None, hidden, cut.slot_mask[:, start:start + n].to(device))

    @torch.no_grad()
    def generate(self, speech_embeds: torch.Tensor | None, instructions: Sequence[str], *,
                 transcripts: Sequence[str] | None = None, num_beams: int = 4, max_new_tokens: int = 200,
                 length_penalty: float = 1.0, return_ids: bool = False):
        """Decode a response per row (SALMONN: beam 4, up to 200 new tokens, length penalty 1.0).

        speech_embeds (B, n, hidden) fill the slot; or, for zero-shot text translation (Table 5), pass None
        and `transcripts`: their tokens take the slot, tokenized as the text pass does, in the same prompt.
        Returns the texts (special tokens dropped), and with return_ids also each row's new token ids
        (without the stop token: a row of max_new_tokens ids hit the length limit).
        """
        slots = ([speech_embeds.shape[1]] * len(instructions) if speech_embeds is not None
                 else [self.prompter.text_ids(t, "transcript") for t in transcripts])
        batch = self.prompter.build(instructions, slots, pad_left=True)
        device = self.llm.model.embed_tokens.weight.device
        inputs = ({"inputs_embeds": self._embed(batch, speech_embeds)} if speech_embeds is not None
                  else {"input_ids": batch.input_ids.to(device)})
        ids = self.llm.generate(**inputs, attention_mask=batch.attention_mask.to(device), num_beams=num_beams,
                                max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                eos_token_id=self.prompter.stop_ids)
        texts = [self.tokenizer.decode(row).strip() for row in ids]
        return (texts, ids) if return_ids else texts
