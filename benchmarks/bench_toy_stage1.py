"""The toy world's stage-1 step with its audio read in the training process (--workers 0, what `toy.py` runs)
against a DataLoader process (--workers 1), on a built toy world.

    python toy.py build --out toy_run/world                      # once (or any world built by toy.py)
    python benchmarks/bench_toy_stage1.py --world toy_run/world --threads 2

Both are `train.train_step` exactly as `train.py --stage pretrain` runs it with toy.py's flags (`toy._train_argv`),
the frozen encoders' outputs already cached for every clip (as after the first epoch of `--cache-encoders`), so
that a step is what most of stage 1's 1,500 are. The two settings take turns, `--rounds` times `--steps` steps
each, to share whatever else the machine is doing; each prints its step times and their median, and the last
line is `toy_stage1_step_s workers0=<median> workers1=<median>`. The batches are the same in both (one
sampler, one collate), so the weights are too: this measures only where the audio is read.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import toy  # noqa: E402
import train  # noqa: E402


def trainer(world: Path, workers: int, seed: int):
    """run(n) -> seconds per step over the next n stage-1 steps, with toy.py's settings and `workers` loader
    processes (the --out directory is never written: only train.train_step runs)."""
    argv = toy._train_argv("pretrain", world, Path("unused"), False, seed, [])
    argv[argv.index("--workers") + 1] = str(workers)
    args = train.build_parser().parse_args(argv[1:])
    train.check_args(args, 1)
    ctx = train.Context(torch.device("cpu"), torch.float32)
    model, ctc_head, named = train.build(args, ctx)
    params = [p for _, p in named]
    opt = train.make_optimizer(named, args.weight_decay)
    cache = train.EncoderCache()
    ds = args.train_data
    with torch.no_grad():                      # every clip's encoder outputs, as after stage 1's first epoch
        for i in range(0, len(ds), 64):
            cache.bridge_inputs(model, ds.collate([ds[j] for j in range(i, min(len(ds), i + 64))]))
    batches = train.micro_batches(args, ctx, 0)
    step = iter(range(10 ** 9))

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            train.train_step(model, opt, params, next(batches), next(step), args, ctx, ctc_head, cache)
        return (time.perf_counter() - t) / n
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, help="a world built by toy.py (its models and manifests)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (toy.py runs stage 1 on every core)")
    ap.add_argument("--steps", type=int, default=40, help="steps per turn")
    ap.add_argument("--rounds", type=int, default=3, help="turns per setting")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    world = Path(a.world)
    if not (world / "world.json").is_file():
        sys.exit(f"bench_toy_stage1: {world / 'world.json'} not found: build a world first "
                 f"(python toy.py build --out {world})")
    torch.set_num_threads(a.threads)
    runs = {w: trainer(world, w, a.seed) for w in (0, 1)}
    for run in runs.values():
        run(5)                                 # warm-up (and the loader process's start)
    times = {w: [] for w in runs}
    for _ in range(a.rounds):
        for w, run in runs.items():
            times[w].append(run(a.steps))
    for w, ts in times.items():
        print(f"--workers {w}: " + " ".join(f"{t:.3f}" for t in ts) + f" s/step, median {statistics.median(ts):.3f}")
    print(f"toy_stage1_step_s workers0={statistics.median(times[0]):.3f} workers1={statistics.median(times[1]):.3f}")


if __name__ == "__main__":
    main()
