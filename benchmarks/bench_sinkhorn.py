"""Benchmark: the all-pairs Wasserstein matrix of layer selection (Eq. 3) and its retrieval MRR (Eq. 4),
ours (sinkhorn.wasserstein_matrix) against a loop over POT's log-domain Sinkhorn and the exact EMD.

    python benchmarks/bench_sinkhorn.py                    # 200 x 200 pairs, d = 256, CPU
    python benchmarks/bench_sinkhorn.py --device cuda --n-speech 1000 --n-text 1000 --dim 3584 \
        --speech-len 88 88 --text-len 10 60 --pot-pairs 200 --emd-block 300

Data (speech-like, synthetic): a text is a sequence of token vectors drawn from a small vocabulary
(texts share tokens, so retrieval is not trivial); its speech repeats each token for a random duration
(a random composition of the speech length) and adds Gaussian noise, so speech is longer than text and
its mass is not uniform over the tokens. Speech i's gold text is text i.

POT is run at the same ε as ours (per pair, `sinkhorn.relative_eps`) with stopThr = our tol on its own
marginal error (the L2 norm of the column-marginal error, checked every 10 iterations; L2 <= our L1,
so POT stops no later than it would under our rule) and numItermax = our max_iter. POT's loop is timed on
a random subset of pairs (--pot-pairs) and extrapolated per pair; --pot-pairs 0 runs all of them and
gives POT's MRR too. The exact EMD (ot.emd2, float64) runs on all pairs, or on the first K x K block
(--emd-block K, a smaller retrieval problem on which both MRRs are then computed).
The last line is `speedup_vs_pot=<x> mrr_max_abs_diff=<|MRR ours - MRR EMD|>`.

Without POT installed (a GPU machine may lack it) both are skipped; the reference is then ours in float64 on
the CPU on the first K x K block (--emd-block), and the last line is
`f64_block_mrr_abs_diff=<|MRR ours - MRR float64|> f64_block_max_rel=<max |D / D_f64 - 1|>`.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sinkhorn  # noqa: E402
from select_layers import mrr  # noqa: E402


def make_data(n_speech, n_text, dim, speech_len, text_len, vocab, noise, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, dim, generator=g)  # (V, d) token vectors

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    speech, text = [], []
    for i in range(n_text):
        m = randint(*text_len)
        t = table[torch.randint(vocab, (m,), generator=g)]  # (m, d)
        text.append(t)
        if i >= n_speech:
            continue  # extra texts are distractors without speech
        if speech_len[1] < m:
            raise ValueError(f"speech length {speech_len[1]} < text length {m}: every token needs a frame")
        n = randint(max(speech_len[0], m), speech_len[1])
        cuts = torch.randperm(n - 1, generator=g)[: m - 1].sort().values + 1
        dur = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))  # (m,) >= 1, sum n
        speech.append(t.repeat_interleave(dur, 0) + noise * torch.randn(n, dim, generator=g))  # (n, d)
    return speech, text


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-speech", type=int, default=200)
    p.add_argument("--n-text", type=int, default=200)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--speech-len", type=int, nargs=2, default=(30, 100))
    p.add_argument("--text-len", type=int, nargs=2, default=(10, 40))
    p.add_argument("--vocab", type=int, default=20)
    p.add_argument("--noise", type=float, default=8.0, help="std of the noise added to speech frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-bytes", type=int, default=None, help="work-memory budget (default: sinkhorn.MAX_BYTES)")
    p.add_argument("--eps-rel", type=float, default=sinkhorn.EPS_REL)
    p.add_argument("--tol", type=float, default=sinkhorn.TOL)
    p.add_argument("--max-iter", type=int, default=sinkhorn.MAX_ITER)
    p.add_argument("--pot-pairs", type=int, default=500, help="random pairs for POT's timing (0 = all)")
    p.add_argument("--pot-backend", choices=["torch", "numpy"], default="torch",
                   help="POT on torch float32 CPU tensors (faster here) or numpy float64")
    p.add_argument("--emd-block", type=int, default=0,
                   help="exact EMD on the first K speech x K text (0 = all pairs); the MRRs are compared there")
    p.add_argument("--omega", type=float, default=sinkhorn.OMEGA, help="our over-relaxation (1 = plain Sinkhorn)")
    p.add_argument("--repeat", type=int, default=3,
                   help="time ours and POT's loop this many times each and keep the fastest (shared CPUs are noisy)")
    args = p.parse_args()

    try:
        import ot  # benchmark-only dependency
    except ImportError:
        ot = None

    N, M = args.n_speech, args.n_text
    speech, text = make_data(N, M, args.dim, args.speech_len, args.text_len, args.vocab, args.noise, args.seed)
    print(f"data: {N} speech ({args.speech_len[0]}-{args.speech_len[1]} frames) x {M} text "
          f"({args.text_len[0]}-{args.text_len[1]} tokens), d={args.dim}, vocab {args.vocab}, "
          f"noise {args.noise}, seed {args.seed}; torch threads {torch.get_num_threads()}")
    kw = dict(eps_rel=args.eps_rel, tol=args.tol, max_iter=args.max_iter, omega=args.omega)

    # --- ours -----------------------------------------------------------------------------------
    sinkhorn.wasserstein_matrix(speech[:2], text[:2], device=args.device, progress=False, **kw)  # warm-up
    times = []
    for _ in range(args.repeat):
        sync(args.device)
        t0 = time.perf_counter()
        D, stats = sinkhorn.wasserstein_matrix(speech, text, device=args.device, max_bytes=args.max_bytes,
                                               progress=False, return_stats=True, **kw)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    t_ours = min(times)
    mrr_ours = mrr(D)
    print(f"ours: wasserstein_matrix on {args.device} (float32, omega {args.omega}), {N * M} pairs in {t_ours:.2f} s "
          f"({t_ours / (N * M) * 1e3:.3f} ms/pair); chunk {stats['chunk'][0]}x{stats['chunk'][1]}, "
          f"max marginal err {stats['max_err']:.1e}, max iters {stats['max_iters']}, "
          f"unconverged {stats['unconverged']}; fastest of {args.repeat}: "
          f"{', '.join(f'{t:.2f}' for t in times)} s")

    K = min(N, M) if args.emd_block <= 0 else min(args.emd_block, N, M)  # the reference's block: first K x K
    if ot is None:
        t0 = time.perf_counter()
        D64 = sinkhorn.wasserstein_matrix([x.double() for x in speech[:K]], [y.double() for y in text[:K]],
                                          device="cpu", progress=False, **kw).double()
        rel64 = (D[:K, :K].double() / D64 - 1).abs()
        diff = abs(mrr(D[:K, :K]) - mrr(D64))
        print(f"POT is not installed: no POT loop, no EMD. Reference: ours in float64 on the CPU on the first "
              f"{K} x {K} pairs ({time.perf_counter() - t0:.1f} s): relative error median {rel64.median():.2e}, "
              f"max {rel64.max():.2e}; MRR there {mrr(D[:K, :K]):.4f} vs float64 {mrr(D64):.4f}")
        print(f"f64_block_mrr_abs_diff={diff:.4f} f64_block_max_rel={rel64.max():.2e}")
        return

    # --- POT sinkhorn_log, same ε and tolerance ------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed + 1)
    all_pairs = args.pot_pairs <= 0 or args.pot_pairs >= N * M
    flat = torch.arange(N * M) if all_pairs else torch.randperm(N * M, generator=g)[: args.pot_pairs]
    pairs = [(int(k) // M, int(k) % M) for k in flat]
    eps = {}
    for i, j in pairs:  # the same per-pair ε as ours (not timed)
        C = sinkhorn.sq_euclidean_cost(speech[i][None], text[j][None])
        eps[i, j] = float(sinkhorn.relative_eps(C, eps_rel=args.eps_rel))

    def pot_inputs(i, j):
        if args.pot_backend == "torch":
            return speech[i].float(), text[j].float()
        return speech[i].double().numpy(), text[j].double().numpy()

    inputs = [pot_inputs(i, j) for i, j in pairs]
    D_pot, times = {}, []
    for _ in range(1 if all_pairs else args.repeat):
        t0 = time.perf_counter()
        for (i, j), (x, y) in zip(pairs, inputs):
            C = ot.dist(x, y)  # squared Euclidean
            D_pot[i, j] = float(ot.sinkhorn2(ot.unif(len(x), type_as=C), ot.unif(len(y), type_as=C), C,
                                             eps[i, j], method="sinkhorn_log", numItermax=args.max_iter,
                                             stopThr=args.tol))
        times.append(time.perf_counter() - t0)
    t_pot_sub = min(times)
    t_pot = t_pot_sub / len(pairs) * N * M
    rel = max(abs(D_pot[i, j] / float(D[i, j]) - 1) for i, j in pairs)
    backend = "torch float32 CPU tensors" if args.pot_backend == "torch" else "numpy float64 arrays"
    print(f"POT: ot.sinkhorn2(method='sinkhorn_log') on {backend}, same per-pair eps, stopThr={args.tol} "
          f"(L2 column-marginal error, checked every 10 it.), numItermax={args.max_iter}, ot.dist inside the loop")
    if all_pairs:
        print(f"POT: all {N * M} pairs in {t_pot:.1f} s ({t_pot / (N * M) * 1e3:.3f} ms/pair)")
    else:
        print(f"POT: timed on a random subset of {len(pairs)} of {N * M} pairs (fastest of {len(times)}: "
              f"{', '.join(f'{t:.2f}' for t in times)} s), {t_pot_sub / len(pairs) * 1e3:.3f} ms/pair "
              f"-> EXTRAPOLATED to all pairs: {t_pot:.1f} s")
    print(f"POT vs ours on those pairs: max |D_pot / D_ours - 1| = {rel:.2e}")

    # --- exact EMD ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    D_emd = torch.empty(K, K, dtype=torch.float64)
    for i in range(K):
        x = speech[i].double().numpy()
        for j in range(K):
            D_emd[i, j] = ot.emd2([], [], ot.dist(x, text[j].double().numpy()))
    t_emd = time.perf_counter() - t0
    block = "all" if (K == N and K == M) else f"the first {K} x {K} (a smaller retrieval problem)"
    mrr_emd, mrr_ours_block = mrr(D_emd), mrr(D[:K, :K])
    rel_emd = (D[:K, :K].double() / D_emd - 1).abs()
    print(f"EMD: ot.emd2 (exact, float64 numpy) on {block} pairs, {K * K} pairs in {t_emd:.1f} s; "
          f"ours vs EMD: relative error median {rel_emd.median():.2e}, max {rel_emd.max():.2e}")

    mrr_pot = f"{mrr(torch.tensor([[D_pot[i, j] for j in range(M)] for i in range(N)])):.4f}" if all_pairs \
        else "n/a (POT ran on a subset; --pot-pairs 0 for all)"
    print(f"MRR: ours {mrr_ours:.4f}  POT {mrr_pot}  EMD {mrr_emd:.4f}"
          + ("" if K == N == M else f" (EMD on the {K} x {K} block, where ours is {mrr_ours_block:.4f})"))
    print(f"speedup_vs_pot={t_pot / t_ours:.1f} mrr_max_abs_diff={abs(mrr_ours_block - mrr_emd):.4f}")


if __name__ == "__main__":
    main()
