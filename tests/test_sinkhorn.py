"""sinkhorn.py against POT: the same entropic cost as ot.sinkhorn2 at the same ε, within 2% of the exact
ot.emd2 at the default ε, the envelope gradient against finite differences, and the edge cases."""
import math

import numpy as np
import ot
import pytest
import torch

from sinkhorn import ot_loss, relative_eps, sinkhorn as solve, sq_euclidean_cost, wasserstein_matrix


def speechlike(g, m, n, d, noise, scale=1.0, offset=0.0):
    """Text: m random tokens (m, d); speech: each token repeated for a random duration (n frames in all)
    plus Gaussian noise (n, d). Both multiplied by `scale` and shifted by a common `offset`."""
    text = torch.randn(m, d, generator=g)
    cuts = torch.randperm(n - 1, generator=g)[: m - 1].sort().values + 1
    dur = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
    speech = text.repeat_interleave(dur, 0) + noise * torch.randn(n, d, generator=g)
    return speech * scale + offset, text * scale + offset


def pad(seqs):
    """list of (len_i, d) -> (B, L, d) zero-padded, mask (B, L)."""
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in seqs], batch_first=True)
    return x, mask


def emd(x, y):
    return ot.emd2([], [], ot.dist(x.double().numpy(), y.double().numpy()))


# (m, n, noise, scale): several lengths, noise levels and norm scales up to 1e3, d = 32
CASES = [(3, 7, 0.1, 1.0), (8, 20, 0.5, 1.0), (12, 40, 1.0, 30.0), (20, 45, 2.0, 1e3), (5, 5, 0.3, 1e3),
         (15, 60, 4.0, 1.0)]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    pairs = [speechlike(g, m, n, 32, noise, scale) for m, n, noise, scale in CASES]
    return pairs


def test_cost_is_squared_euclidean():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 7, generator=g) * 100 + 1e3, torch.randn(2, 4, 7, generator=g) * 100 + 1e3
    C = sq_euclidean_cost(x, y)
    ref = ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(C.double(), ref, rtol=1e-5, atol=1e-3)
    assert C.dtype == torch.float32 and (C >= 0).all()


def test_matches_pot_at_same_eps(batch):
    """Same ε, tight tolerances: ⟨P, C⟩ equals POT's sinkhorn2 (float64) within 1e-4 relative, with all
    pairs solved in one padded batch."""
    for (x, y) in batch:  # what sinkhorn2 returns is ⟨P, C⟩, not the entropic objective
        C = ot.dist(x.double().numpy(), y.double().numpy())
        a, b = ot.unif(len(x)), ot.unif(len(y))
        P = ot.sinkhorn(a, b, C, 0.1 * C.mean(), method="sinkhorn_log", numItermax=1000, stopThr=1e-9, warn=False)
        assert ot.sinkhorn2(a, b, C, 0.1 * C.mean(), method="sinkhorn_log", numItermax=1000,
                            stopThr=1e-9) == pytest.approx((P * C).sum(), rel=1e-12)
    xs, xm = pad([x for x, _ in batch])
    ys, ym = pad([y for _, y in batch])
    for eps_rel in (0.1, 0.05):
        res = solve(sq_euclidean_cost(xs, ys, xm, ym), xm, ym, eps_rel=eps_rel, tol=1e-5, max_iter=5000)
        assert res.converged.all()
        for k, (x, y) in enumerate(batch):
            C = ot.dist(x.double().numpy(), y.double().numpy())
            ref = ot.sinkhorn2(ot.unif(len(x)), ot.unif(len(y)), C, float(res.eps[k]), method="sinkhorn_log",
                               numItermax=100000, stopThr=1e-9)
            assert float(res.cost[k]) == pytest.approx(ref, rel=1e-4), (k, eps_rel)


def test_within_2_percent_of_exact_emd_at_default_eps(batch):
    xs, xm = pad([x for x, _ in batch])
    ys, ym = pad([y for _, y in batch])
    losses, res = ot_loss(xs, ys, xm, ym, return_result=True)
    assert res.converged.all()
    for k, (x, y) in enumerate(batch):
        w = emd(x, y)
        assert float(losses[k]) == pytest.approx(w, rel=0.02), (k, float(losses[k]), w)
        assert float(losses[k]) >= w * (1 - 1e-3)  # the entropic plan is feasible: never below the exact W


def test_padded_batch_equals_each_pair_alone(batch):
    xs, xm = pad([x for x, _ in batch])
    ys, ym = pad([y for _, y in batch])
    xs[~xm] = float("nan")  # garbage in padding must not matter
    ys[~ym] = float("nan")
    loss, res = ot_loss(xs, ys, xm, ym, tol=1e-5, return_result=True)
    assert torch.isfinite(loss).all()
    for k, (x, y) in enumerate(batch):
        alone, r1 = ot_loss(x[None], y[None], tol=1e-5, return_result=True)
        n, m = len(x), len(y)
        assert float(loss[k]) == pytest.approx(float(alone[0]), rel=1e-5)
        torch.testing.assert_close(res.plan[k, :n, :m], r1.plan[0], rtol=1e-3, atol=1e-7)
        assert (res.plan[k, n:] == 0).all() and (res.plan[k, :, m:] == 0).all()


def test_returned_error_is_the_plans_marginal_error(batch):
    xs, xm = pad([x for x, _ in batch])
    ys, ym = pad([y for _, y in batch])
    for max_iter, tol in ((1000, 1e-3), (3, 1e-3)):
        res = solve(sq_euclidean_cost(xs, ys, xm, ym), xm, ym, tol=tol, max_iter=max_iter, return_plan=True)
        a = xm / xm.sum(1, keepdim=True)
        b = ym / ym.sum(1, keepdim=True)
        measured = (res.plan.sum(2) - a).abs().sum(1) + (res.plan.sum(1) - b).abs().sum(1)
        torch.testing.assert_close(res.err, measured, rtol=1e-2, atol=2e-6)
        assert (res.converged == (res.err < tol)).all()
        assert (res.iters <= max_iter).all()
    assert not res.converged.all() and (res.iters == 3).all()  # 3 iterations: not enough, and reported
    with pytest.warns(RuntimeWarning, match="did not reach"):
        ot_loss(xs, ys, xm, ym, max_iter=3)


def test_over_relaxation_converges_to_the_same_plan(batch):
    xs, xm = pad([x for x, _ in batch])
    ys, ym = pad([y for _, y in batch])
    C = sq_euclidean_cost(xs, ys, xm, ym)
    plain = solve(C, xm, ym, omega=1.0, tol=1e-5, max_iter=5000)
    fast = solve(C, xm, ym, tol=1e-5, max_iter=5000)
    torch.testing.assert_close(fast.cost, plain.cost, rtol=1e-4, atol=0)
    assert fast.iters.sum() < plain.iters.sum()


def test_bf16_input():
    g = torch.Generator().manual_seed(2)
    x, y = speechlike(g, 10, 30, 64, 0.5, scale=50.0)
    xb = x.bfloat16()[None].requires_grad_()
    yb = y.bfloat16()[None]
    loss = ot_loss(xb, yb)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    ref = ot_loss(xb.detach().float(), yb.float())  # the same (bf16-rounded) points in float32
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)
    assert float(loss.detach()) == pytest.approx(emd(xb.detach()[0].float(), yb[0].float()), rel=0.02)
    loss.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all() and xb.grad.abs().sum() > 0


def test_degenerate_inputs_are_finite():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g)
    # identical point clouds: W = 0
    loss = ot_loss(x[None], x[None])
    C = sq_euclidean_cost(x[None], x[None])
    assert torch.isfinite(loss).all() and 0 <= float(loss) < 1e-3 * float(C.mean())
    # one-token sequences on either side and both
    for n, m in ((1, 5), (5, 1), (1, 1)):
        a, b = torch.randn(n, 16, generator=g), torch.randn(m, 16, generator=g)
        loss = ot_loss(a[None], b[None])
        assert torch.isfinite(loss).all() and float(loss) == pytest.approx(emd(a, b), rel=1e-4)
    # huge norms (1e4 scale, plus a common offset of norm 1e5) in float32
    s, t = speechlike(g, 8, 20, 32, 0.5, scale=1e4, offset=1e5 / math.sqrt(32))
    h = torch.randn(16, generator=g)
    loss = ot_loss(s[None], t[None])
    assert torch.isfinite(loss).all() and float(loss) == pytest.approx(emd(s, t), rel=0.02)
    # a whole cloud far from the other (modality gap): same W as exact
    loss = ot_loss(s[None], (t + 3e4)[None])
    assert torch.isfinite(loss).all() and float(loss) == pytest.approx(emd(s, t + 3e4), rel=0.02)
    # an all-zero cost matrix: cost 0, uniform plan
    res = solve(torch.zeros(2, 4, 3), return_plan=True)
    assert (res.cost == 0).all() and res.converged.all()
    torch.testing.assert_close(res.plan, torch.full((2, 4, 3), 1 / 12))
    # identical points everywhere (all costs 0 through the point interface)
    same = h.expand(3, 16)
    loss = ot_loss(same[None], same[:2][None])
    assert torch.isfinite(loss).all() and float(loss) == 0.0


def test_eps_rule_is_scale_and_offset_aware():
    g = torch.Generator().manual_seed(4)
    x, y = speechlike(g, 6, 18, 16, 0.5)
    eps = relative_eps(sq_euclidean_cost(x[None], y[None]))
    # ε scales with the cost ...
    eps10 = relative_eps(sq_euclidean_cost(10 * x[None], 10 * y[None]))
    torch.testing.assert_close(eps10, 100 * eps, rtol=1e-4, atol=0)
    # ... and ignores a shift of one cloud (it only adds α_i + β_j to C, which moves no plan)
    torch.testing.assert_close(relative_eps(sq_euclidean_cost(x[None], y[None] + 5.0)), eps, rtol=1e-3, atol=0)
    # an explicit ε is used as given
    assert float(solve(sq_euclidean_cost(x[None], y[None]), eps=0.5).eps) == 0.5


def test_envelope_gradient_matches_finite_differences():
    """d/dh_s of the entropic objective OT_ε(C(h_s, h_t)) = ⟨P, C⟩ + ε Σ P log P (ε fixed), computed by
    POT in float64 and central differences, equals the autograd gradient of ot_loss."""
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ht = torch.randn(3, 3, generator=g, dtype=torch.float64)
    eps = 0.7

    def entropic(h):
        C = ot.dist(h.numpy(), ht.numpy())
        P = ot.sinkhorn(ot.unif(4), ot.unif(3), C, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-15)
        return (P * C).sum() + eps * (P * np.log(P)).sum()

    x = hs.clone()[None].requires_grad_()
    ot_loss(x, ht[None], eps=eps, tol=1e-13, max_iter=100000).sum().backward()
    fd = torch.zeros_like(hs)
    step = 1e-6
    for i in range(4):
        for k in range(3):
            e = torch.zeros_like(hs)
            e[i, k] = step
            fd[i, k] = (entropic(hs + e) - entropic(hs - e)) / (2 * step)
    torch.testing.assert_close(x.grad[0], fd, rtol=1e-6, atol=1e-8)
    # and it is not the gradient of ⟨P, C⟩ with P differentiated through: that one differs
    def transport(h):
        C = ot.dist(h.numpy(), ht.numpy())
        return (ot.sinkhorn(ot.unif(4), ot.unif(3), C, eps, method="sinkhorn_log", numItermax=100000,
                            stopThr=1e-15) * C).sum()
    e = torch.zeros_like(hs)
    e[0, 0] = step
    assert abs((transport(hs + e) - transport(hs - e)) / (2 * step) - float(fd[0, 0])) > 1e-4


def test_text_side_gets_no_gradient():
    g = torch.Generator().manual_seed(6)
    x, y = speechlike(g, 5, 12, 8, 0.5)
    hs, ht = x[None].clone().requires_grad_(), y[None].clone().requires_grad_()
    loss = ot_loss(hs, ht)
    assert loss.requires_grad
    loss.sum().backward()
    assert ht.grad is None
    assert hs.grad is not None and torch.isfinite(hs.grad).all() and hs.grad.abs().sum() > 0


def test_all_pairs_equals_loop_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(7)
    pairs = [speechlike(g, m, n, 12, 0.7) for m, n in ((3, 9), (6, 10), (2, 4), (5, 17), (4, 8))]
    speech = [s for s, _ in pairs]
    text = [t for _, t in pairs[:4]] + [torch.randn(7, 12, generator=g)]
    text[1] = text[1].double()  # mixed dtypes and lengths
    D = wasserstein_matrix(speech, text, tol=1e-5, max_iter=5000, progress=False)
    assert D.shape == (5, 5) and D.dtype == torch.float32
    loop = torch.tensor([[float(ot_loss(s[None].float(), t[None].float(), tol=1e-5, max_iter=5000))
                          for t in text] for s in speech])
    torch.testing.assert_close(D, loop, rtol=1e-4, atol=0)
    D1, stats = wasserstein_matrix(speech, text, tol=1e-5, max_iter=5000, max_bytes=1, progress=False,
                                   return_stats=True)
    assert stats["chunk"] == (1, 1) and stats["unconverged"] == 0
    torch.testing.assert_close(D1, D, rtol=1e-5, atol=0)
    D2 = wasserstein_matrix(speech, text, tol=1e-5, max_iter=5000, max_bytes=3 * 4 * 17 * 12 * 4, progress=False)
    torch.testing.assert_close(D2, D, rtol=1e-5, atol=0)


def test_bad_input_is_rejected_by_name():
    x, y = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        ot_loss(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ot_loss(x, torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="h_speech must be a"):
        ot_loss(x[0], y)
    with pytest.raises(ValueError, match="speech_mask must have shape"):
        ot_loss(x, y, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"text_mask: pair\(s\) \[1\]"):
        ot_loss(x, y, None, torch.tensor([[True, False, False], [False, False, False]]))
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="h_speech contains NaN"):
        ot_loss(bad, y)
    bad = y.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="h_text contains NaN"):
        ot_loss(x, bad)
    with pytest.raises(ValueError, match="empty dimension"):
        ot_loss(torch.randn(2, 0, 4), y)
    with pytest.raises(ValueError, match="hidden sizes differ: x d=4 vs y d=3"):
        sq_euclidean_cost(x, torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="C contains NaN"):
        solve(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="eps must be"):
        solve(torch.rand(1, 2, 2), eps=0.0)
    with pytest.raises(ValueError, match="omega"):
        solve(torch.rand(1, 2, 2), omega=2.0)
    with pytest.raises(ValueError, match=r"text\[1\] has d=5"):
        wasserstein_matrix([torch.randn(3, 4)], [torch.randn(2, 4), torch.randn(2, 5)], progress=False)
    with pytest.raises(ValueError, match=r"speech\[0\] is empty"):
        wasserstein_matrix([torch.randn(0, 4)], [torch.randn(2, 4)], progress=False)
    with pytest.raises(ValueError, match="speech has d=4 but text has d=3"):
        wasserstein_matrix([torch.randn(3, 4)], [torch.randn(2, 3)], progress=False)
    with pytest.raises(ValueError, match=r"text\[0\] contains NaN"):
        wasserstein_matrix([torch.randn(3, 4)], [torch.full((2, 4), float("nan"))], progress=False)
    with pytest.raises(ValueError, match="text must be a non-empty list"):
        wasserstein_matrix([torch.randn(3, 4)], [], progress=False)


def test_large_values_within_range_are_computed_not_refused():
    """The overflow check refuses only what cannot be represented: float64 points at 1e20 give exactly 1e40
    times the unit-scale loss (the ε rule scales with the cost, so the plan is the same), and float32 points
    1e17 apart give the same W as in float64."""
    g = torch.Generator().manual_seed(8)
    x, y = speechlike(g, 5, 12, 8, 0.5)
    x, y = x.double()[None], y.double()[None]
    unit = ot_loss(x, y, tol=1e-9, max_iter=10000)
    huge = ot_loss(1e20 * x, 1e20 * y, tol=1e-9, max_iter=10000)
    torch.testing.assert_close(huge, 1e40 * unit, rtol=1e-10, atol=0)  # two float64 paths through the same code
    # float32 at 1e17 (squared distances ~1e35, under the 4.3e37 limit) against float64: float32 rounding
    # (6e-8) through the cost and the iterations plus a plan marginal error < 1e-6 (measured: 7e-7)
    f32 = ot_loss((1e17 * x).float(), (1e17 * y).float(), tol=1e-6, max_iter=10000)
    torch.testing.assert_close(f32.double(), 1e34 * unit, rtol=5e-6, atol=0)
    D = wasserstein_matrix([1e17 * x[0].float()], [1e17 * y[0].float()], tol=1e-6, max_iter=10000, progress=False)
    torch.testing.assert_close(D.double(), 1e34 * unit[None], rtol=5e-6, atol=0)


def test_a_block_run_again_guarded_gives_the_same_plan(batch, monkeypatch):
    """The iterations run in blocks whose fast half-steps are not looked at (no host synchronisation); a block in
    which one went wild (a mass that under- or overflowed) is run again from its start, guarded. Forcing such
    reruns (and exact steps) at every fifth look leaves every pair's cost and plan equal to float64 rounding: the
    rerun starts from the block's own potentials and plan P0, not from what the abandoned pass left."""
    import sinkhorn
    xs, xm = pad([x.double() for x, _ in batch])
    ys, ym = pad([y.double() for _, y in batch])
    C = sq_euclidean_cost(xs, ys, xm, ym)
    ref = solve(C, xm, ym, return_plan=True)
    real, looks, guarded = sinkhorn._peak, [0], [0]

    def peak(lr):  # max |log-ratio|, as if wild (inf) at every fifth look
        looks[0] += 1
        return real(lr) + (math.inf if looks[0] % 5 == 0 else 0.0)

    def counted(*args):
        guarded[0] += 1
        return real_guarded(*args)

    real_guarded = sinkhorn._guarded_ratio
    monkeypatch.setattr(sinkhorn, "_peak", peak)
    monkeypatch.setattr(sinkhorn, "_guarded_ratio", counted)
    res = solve(C, xm, ym, return_plan=True)
    assert guarded[0] > 10 * 2  # blocks were rerun guarded (without them, only iteration 1's two half-steps are)
    assert torch.equal(res.iters, ref.iters) and res.converged.all()
    torch.testing.assert_close(res.cost, ref.cost, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.plan, ref.plan, rtol=1e-9, atol=1e-15)


def test_chunk_budget_on_a_gpu_is_half_its_free_memory_at_most_32_gib(monkeypatch):
    """Large chunks are faster on a GPU (each iterates as long as its slowest pair), within what it has free."""
    import sinkhorn
    free = [10 * 2**30]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 141 * 2**30))
    assert sinkhorn._default_max_bytes(torch.device("cuda")) == 5 * 2**30
    free[0] = 120 * 2**30
    assert sinkhorn._default_max_bytes(torch.device("cuda")) == 32 * 2**30
    assert sinkhorn._default_max_bytes(torch.device("cpu")) == 64 * 2**20
