"""LoRA (Hu et al. 2021) for the frozen LLM: y = W x + b + (alpha / r) * B(A(dropout(x))).

AI-STA (App. A.1) and SALMONN train LoRA with r = 8, alpha = 32 (scale 4), dropout 0.1 on `q_proj` and
`v_proj` of every decoder layer (PEFT's default targets for Llama and Qwen2); everything else in the LLM
is frozen.

Design
- `LoRALinear` IS an nn.Linear: the frozen base keeps its keys (`...q_proj.weight`, `...q_proj.bias`) and the
  adapter adds `...q_proj.lora_A.weight` (r, in) and `...q_proj.lora_B.weight` (out, r), so the base LLM's
  checkpoint keys stay the identity map. Load the base weights first, then inject, then load adapters.
- `inject_lora` swaps the named projections for LoRALinear layers that reuse the base weight Parameters
  (nothing is copied, whatever their device and dtype) and freezes every other parameter of the module.
- The LoRA weights live in `lora_dtype`, fp32 by default: the base may be bf16, but the adapter's small
  updates (lr 3e-5) would be lost to bf16 rounding. The branch computes in `lora_dtype` and the sum is cast
  back to the base output's dtype, as PEFT does.
- A starts Kaiming-uniform (a = sqrt(5), nn.Linear's default) and B at zero, so an injected model starts
  exactly equal to the base model; dropout applies to the LoRA branch's input only.
- `merge` folds (alpha / r) * B A into W for inference; `unmerge` subtracts the same product. In fp32 this
  restores W up to float rounding (about 1 ulp of W + dW); in bf16 up to bf16 rounding of W + dW, so
  keep a copy of W if you need it bit-exact.

The adapter is saved with the rest of the trainable weights in this project's checkpoint (model.py, which
also reads SALMONN's); `export_peft_adapter` writes it as a PEFT adapter folder, which
`peft.PeftModel.from_pretrained` loads onto the Hugging Face model.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

DEFAULT_TARGETS = ("q_proj", "v_proj")
# PEFT saves adapters as `base_model.model.<module path>.lora_A.weight` (the adapter name is dropped)
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, in_features, out_features, bias=True, r=8, alpha=32, dropout=0.1,
                 device=None, dtype=None, lora_dtype=torch.float32):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r < 1:
            raise ValueError(f"LoRALinear: rank r must be >= 1, got {r}")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=lora_dtype)  # (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=lora_dtype)  # (out, r)
        self.merged = False
        self.reset_lora_parameters()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @classmethod
    def from_linear(cls, base: nn.Linear, r=8, alpha=32, dropout=0.1, lora_dtype=torch.float32):
        """Wrap `base`: its weight and bias Parameters are reused as they are (same tensor, device, dtype)."""
        w = base.weight
        # build on the meta device (allocates nothing), then take over the base's Parameters
        layer = cls(base.in_features, base.out_features, bias=base.bias is not None, r=r, alpha=alpha,
                    dropout=dropout, device="meta", dtype=w.dtype, lora_dtype=lora_dtype)
        layer.weight, layer.bias = w, base.bias
        layer.lora_A.to_empty(device=w.device)
        layer.lora_B.to_empty(device=w.device)
        layer.reset_lora_parameters()
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer.train(base.training)  # a new module would otherwise be in train mode (dropout on)

    @torch.no_grad()
    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's own default
        nn.init.zeros_(self.lora_B.weight)  # so the update B A starts at zero

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # W x + b, frozen (W already holds the update once merged)
        if self.merged:
            return y
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))  # dropout on the LoRA branch only
        return (y + self.scaling * self.lora_B(self.lora_A(h))).to(y.dtype)  # (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, in), in lora_dtype

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha / r) B A, for inference: forward then skips the LoRA branch (and its dropout)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - (alpha / r) B A: the base weight back, up to float rounding (see the module docstring)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets) -> bool:
    """PEFT's rule for a list of target_modules: the module's name is, or ends with '.' + , a target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict:
    """{module path: LoRALinear} in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, targets=DEFAULT_TARGETS, r=8, alpha=32, dropout=0.1,
                lora_dtype=torch.float32) -> list:
    """Replace every nn.Linear of `model` named in `targets` by a LoRALinear that reuses its weights, and
    freeze every parameter of `model` except the LoRA ones. Returns the injected module paths.

    Inject into the LLM only (not into a model that also holds the Q-Former, which would be frozen too).
    The LoRA weights are created on each base weight's device in `lora_dtype` (fp32 by default)."""
    names = [n for n, m in model.named_modules() if n and _matches(n, targets) and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"inject_lora: no nn.Linear named {list(targets)} in {type(model).__name__}")
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"inject_lora: {n} already has LoRA")
        setattr(parent, child, LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout, lora_dtype=lora_dtype))
    lora_params = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    return names


def merge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter weights only, under the model's own keys (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {f"{n}.{ab}.weight": getattr(m, ab).weight
            for n, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}


def lora_hparams(model: nn.Module) -> dict:
    """r, alpha, dropout and target module names shared by all LoRA layers of `model` (error if they differ)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call inject_lora first)")
    hp = {(m.r, m.alpha, m.lora_dropout.p) for m in mods.values()}
    if len(hp) > 1:
        raise ValueError(f"LoRA layers of {type(model).__name__} differ in (r, alpha, dropout): {sorted(hp)}")
    r, alpha, dropout = hp.pop()
    targets = sorted({n.rpartition(".")[2] for n in mods})
    return dict(r=r, alpha=alpha, dropout=dropout, target_modules=targets)


def export_peft_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None):
    """Write a PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json) that
    `peft.PeftModel.from_pretrained(hf_causal_lm, out_dir)` loads. `model` must be the LLM itself, whose
    module paths are Hugging Face's (`model.layers.{i}.self_attn.q_proj`)."""
    hp = lora_hparams(model)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
        r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=hp["dropout"], target_modules=hp["target_modules"],
        bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
        modules_to_save=None, inference_mode=True,
    )
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def count_trainable(model: nn.Module) -> dict:
    """Trainable parameter counts: LoRA weights under 'lora', the rest by top-level submodule, and 'total'.
    Works on a model built on the meta device."""
    lora_params = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    counts = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            group = "lora" if id(p) in lora_params else n.split(".")[0]
            counts[group] = counts.get(group, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts
