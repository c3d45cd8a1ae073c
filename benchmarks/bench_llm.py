"""Our LLM against HF transformers on the same weights: a forward pass and greedy decoding.

    python benchmarks/bench_llm.py                       # CPU, small Qwen2-style config (4 layers, hidden 512)
    python benchmarks/bench_llm.py --device cuda --preset qwen2-7b --dtype bf16 --batch 4 --prompt 256

The last line is `llm_forward_ratio=<ours/HF time> decode_ratio=<ours/HF time>` (lower is better for ours).
With --preset the real-size model is built with random weights (no download) and the script also prints
prefill and decode tokens/s for both.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import LLM, LLMConfig  # noqa: E402


def hf_twin(cfg: LLMConfig, device, dtype):
    """The HF model with the same config, built on `device` in `dtype` (its weights are then replaced by ours)."""
    import transformers
    cls = "Qwen2" if cfg.family == "qwen2" else "Llama"
    hf_cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, attn_implementation="sdpa", max_position_embeddings=cfg.max_position_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = getattr(transformers, f"{cls}ForCausalLM")(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    return hf


def random_llm(args, device, dtype):
    """The benchmarked LLM: --preset's config or a small Qwen2-style one (--layers, --hidden), random weights
    with a spread so that decoding does not collapse to one token. Returns (config, model in eval mode)."""
    if args.preset:
        cfg = LLMConfig.from_name(args.preset)
    else:
        cfg = LLMConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                        num_key_value_heads=args.hidden // 128, qkv_bias=True, rope_theta=1e6, family="qwen2")
    with torch.device(device):
        ours = LLM(cfg).to(dtype)
    for p in ours.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    return cfg, ours.eval()


@torch.no_grad()
def fp32_gap(cfg: LLMConfig, ours: LLM, ids: torch.Tensor, device):
    """Print how far the low-precision logits are from fp32 ones on the same (upcast) weights: the max and mean
    absolute gap, the fp32 logits' spread, and how often the two agree on the top token."""
    with torch.device(device):
        ref = LLM(cfg)
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()}, strict=True)
    low, high = ours(ids).logits.float(), ref.eval()(ids).logits.float()
    gap = (low - high).abs()
    top1 = (low.argmax(-1) == high.argmax(-1)).float().mean().item()
    print(f"bf16 vs fp32 logits (same weights): max |gap| {gap.max().item():.3f}, mean {gap.mean().item():.4f}, "
          f"fp32 logits std {high.std().item():.3f}; top-1 agreement {100 * top1:.2f}%")
    del ref, low, high, gap
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def wall(fn, device) -> float:
    """Seconds one call of fn takes, the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls after one warm-up."""
    fn()
    return min(wall(fn, device) for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="a real config (qwen2-7b, vicuna-13b-v1.1); default: small")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256, help="prompt length (tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp32-check", action="store_true",
                    help="with --dtype bf16: also the gap of the bf16 logits to fp32 ones on the same weights")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    cfg, ours = random_llm(args, device, dtype)
    hf = hf_twin(cfg, device, dtype)
    hf.load_state_dict(ours.state_dict(), assign=True, strict=True)  # the same tensors: no second copy
    hf.eval()
    print(f"config: {cfg.family} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
          f"params={ours.num_parameters() / 1e6:.1f}M  batch={args.batch} prompt={args.prompt} "
          f"new={args.new_tokens} device={device} dtype={args.dtype} threads={torch.get_num_threads()}")

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    with torch.no_grad():
        diff = (ours(ids).logits.float() - hf(ids).logits.float()).abs().max().item()
    print(f"max |logits ours - HF| = {diff:.2e}")
    if args.fp32_check and dtype != torch.float32:
        fp32_gap(cfg, ours, ids, device)

    with torch.no_grad():
        t_ours_fwd = timed(lambda: ours(ids), device, args.repeats)
        t_hf_fwd = timed(lambda: hf(ids), device, args.repeats)
    gen_ours = lambda: ours.generate(ids, max_new_tokens=args.new_tokens)  # noqa: E731
    gen_hf = lambda: hf.generate(ids, do_sample=False, max_new_tokens=args.new_tokens,  # noqa: E731
                                 min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    t_ours_gen = timed(gen_ours, device, args.repeats)
    t_hf_gen = timed(gen_hf, device, args.repeats)
    same = gen_ours() == hf.generate(ids, do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None,
                                     pad_token_id=0)[:, args.prompt:].tolist()

    n_prompt, n_new = args.batch * args.prompt, args.batch * args.new_tokens
    # decode time = generate time - one prefill (generate runs exactly one prompt forward first)
    dec_ours, dec_hf = max(t_ours_gen - t_ours_fwd, 1e-9), max(t_hf_gen - t_hf_fwd, 1e-9)
    print(f"forward  ours {t_ours_fwd * 1e3:8.1f} ms   HF {t_hf_fwd * 1e3:8.1f} ms   "
          f"prefill tok/s ours {n_prompt / t_ours_fwd:,.0f}  HF {n_prompt / t_hf_fwd:,.0f}")
    print(f"generate ours {t_ours_gen * 1e3:8.1f} ms   HF {t_hf_gen * 1e3:8.1f} ms   "
          f"decode tok/s ours {n_new / dec_ours:,.0f}  HF {n_new / dec_hf:,.0f}   same tokens: {same}")
    print(f"llm_forward_ratio={t_ours_fwd / t_hf_fwd:.3f} decode_ratio={t_ours_gen / t_hf_gen:.3f}")


if __name__ == "__main__":
    main()
