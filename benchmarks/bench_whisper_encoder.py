"""Time our Whisper encoder against transformers' WhisperEncoder: same weights, same input, eval, no_grad.

    python benchmarks/bench_whisper_encoder.py                       # CPU, whisper-tiny-sized encoder, batch 2 x 30 s
    python benchmarks/bench_whisper_encoder.py --device cuda --dtype bf16 --real-size   # large-v2 + BEATs, batch 16 x 30 s

Each timing is the best of --repeats runs after --warmup runs, ours and HF interleaved round by round.
The last line is `whisper_ratio=<ours/HF>` (below 1: ours is faster). With --real-size BEATs (the real iter3+ preset, random weights, 30 s of fbank)
is timed too; it has no reference implementation in this project, so only its own time is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import BEATs, BEATsConfig, WhisperEncoder, WhisperEncoderConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the encoder of whisper-tiny: small enough for a 2-core CPU, the real 1500 positions
SMALL = WhisperEncoderConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                             num_mel_bins=80, max_source_positions=1500)


def best_times(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Best wall time in seconds of each `fn()` over `repeats` rounds, after `warmup` rounds.

    The contenders are interleaved, in alternating order, round by round, so that a drift of the machine's
    load (another process, clock changes) falls on all of them alike.
    """
    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    best = {name: float("inf") for name in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = run(fns[name])
            if r >= warmup:
                best[name] = min(best[name], t)
    return best


def bench_whisper_encoder(device: str = "cpu", dtype: torch.dtype = torch.float32, real_size: bool = False,
                          batch: int | None = None, warmup: int = 2, repeats: int = 10, seed: int = 0) -> dict:
    """Time ours and HF's WhisperEncoder on the same weights and input. Returns seconds and ours/HF."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    device = torch.device(device)
    cfg = WhisperEncoderConfig.from_name("whisper-large-v2") if real_size else SMALL
    batch = batch or (16 if real_size else 2)
    torch.manual_seed(seed)
    hf_cfg = WhisperConfig(d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                           encoder_attention_heads=cfg.encoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
                           num_mel_bins=cfg.num_mel_bins, max_source_positions=cfg.max_source_positions,
                           attn_implementation="sdpa")
    hf = HFWhisperEncoder(hf_cfg).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = WhisperEncoder(cfg)
    ours.load_state_dict(hf.state_dict(), assign=True)      # identical key names: the same tensors
    ours.freeze()
    mel = torch.randn(batch, cfg.num_mel_bins, cfg.n_frames, device=device, dtype=dtype)
    with torch.no_grad():
        diff = (ours(mel).float() - hf(mel).last_hidden_state.float()).abs().max().item()
        t = best_times({"ours": lambda: ours(mel), "hf": lambda: hf(mel).last_hidden_state}, warmup, repeats, device)
    t_ours, t_hf = t["ours"], t["hf"]
    return dict(config="whisper-large-v2" if real_size else "whisper-tiny-size", batch=batch, ours_s=t_ours,
                hf_s=t_hf, ratio=t_ours / t_hf, max_abs_diff=diff)


def bench_beats(device: str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 16, frames: int = 2998,
                warmup: int = 2, repeats: int = 5, seed: int = 0) -> dict:
    """Time the real-size BEATs (random weights) on `batch` clips of `frames` fbank frames (2998 = 30 s)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = BEATs(BEATsConfig.from_name("beats-iter3-plus-as2m-cpt2")).to(device=device, dtype=dtype)
    fbank = torch.randn(batch, frames, 128, device=device, dtype=dtype)
    with torch.no_grad():
        t = best_times({"beats": lambda: model(fbank)}, warmup, repeats, device)["beats"]
    return dict(config="beats-iter3-plus-as2m-cpt2", batch=batch, frames=frames, ours_s=t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--real-size", action="store_true", help="whisper-large-v2 and BEATs, batch 16 x 30 s")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}")
    if args.real_size:
        b = bench_beats(args.device, dtype, batch=args.batch or 16, warmup=args.warmup, repeats=args.repeats)
        print(f"beats {b['config']}: batch {b['batch']} x {b['frames']} frames: ours {b['ours_s'] * 1e3:.1f} ms")
    w = bench_whisper_encoder(args.device, dtype, args.real_size, args.batch, args.warmup, args.repeats)
    print(f"whisper {w['config']}: batch {w['batch']} x 3000 frames: ours {w['ours_s'] * 1e3:.1f} ms, "
          f"HF {w['hf_s'] * 1e3:.1f} ms (max |diff| {w['max_abs_diff']:.2e})")
    print(f"whisper_ratio={w['ratio']:.3f}")


if __name__ == "__main__":
    main()
