"""Batched log-domain Sinkhorn: the Wasserstein loss of AI-STA (Eq. 1) and the all-pairs distances of
its layer selection (Eq. 3).

The paper (Sec. 3.2) aligns speech hidden states h_s (n, d) with text hidden states h_t (m, d) of the
same LLM layer by their Wasserstein distance

    W = min_Z Σ_ij Z_ij C_ij,  C_ij = ‖h_s[i] − h_t[j]‖²,  Z 1 = 1/n,  Zᵀ 1 = 1/m          Eq. (1)

and gives no solver, ε, iteration count or feature normalisation. This file fills those gaps; each
choice below is a default that can be overridden by an argument.

Solver. Entropic OT, min_P ⟨P, C⟩ + ε KL(P | a⊗b), solved by Sinkhorn in the log domain on a batch
of B problems of different sizes, padded to (B, n, m) with masks; a and b are uniform over the valid
positions only (padding carries no mass). The state is a pair of dual potentials u, v (in units of
ε), the plan is P_ij = a_i b_j exp(u_i + v_j − C_ij/ε), and a half-step divides out the marginal
error of one side: u_i ← u_i − log(r_i / a_i), where r_i = Σ_j P_ij is the current row mass (this is
u_i ← −log Σ_j b_j exp(v_j − C_ij/ε), the usual log-sum-exp update). The marginal error comes for
free. Two implementation choices make it fast on a CPU without giving up the log domain:
  - P is exponentiated only now and then (P0, at potentials u0, v0). In between, P = P0 ·
    e^(u − u0)_i · e^(v − v0)_j exactly, so a half-step is one batched matrix-vector product with P0
    rather than a pass of exp() over (B, n, m). P0 is retaken once a potential has moved by more than
    TAU = 20 (the factors stay far from over/underflow), and after any exact step.
  - A mass outside [e^-50, e^50] of its target (the first step from zero potentials, a point far from
    all others) sends the whole half-step down the exact max-shifted log-sum-exp path.
  - On a GPU the host must not wait for the device at every half-step to decide that: the iterations run
    in blocks ending at a convergence check, whose fast half-steps are not looked at; what the check
    needs (whether any of them went wild, how many pairs converged, whether P0 is due) comes back in one
    host synchronisation, and a block that went wild (rare after the first iteration, which is always
    guarded) is run again from its start, half-step by half-step. The numbers are the same either way.
    Measured on an H200 (BENCHMARKS.md): the joint step's text pass + OT went from 99 to 48 ms.
The exponent is floored at e^-80 (denormal floats are ~20x slower on a CPU; that little mass changes
nothing). The value returned is the transport cost ⟨P, C⟩ of Eq. (1) (not the entropic objective),
as POT's `sinkhorn2` does.

ε rule. Hidden states of deep LLM layers have norms in the hundreds to thousands, so an absolute ε
means nothing: ε is set per pair relative to the scale of that pair's cost,
    ε = eps_rel · mean_ij |C̃_ij|,   C̃ = C − (row means) − (column means) + (grand mean)
(means weighted by a and b). Adding α_i + β_j to C leaves the plan unchanged (it is absorbed by the
potentials), so only C̃ matters to the plan, and for the squared Euclidean cost C̃_ij = −2⟨x_i − x̄,
y_j − ȳ⟩: a scale that ignores the distance between the clouds' means (the "modality gap") and the
points' norms, which `mean(C)` does not. eps_rel = 0.1 kept ⟨P, C⟩ within 1.3% of the exact
(network-simplex) W on speech-like data (tests/test_sinkhorn.py checks 2% against `ot.emd2`); the
noisier the speech, the smaller the bias (~1e-4 on the benchmark's data).
ε is floored at 1e-4 · max C: below that, float32 cannot resolve C/ε (and a cost that is, up to
rounding, α_i + β_j, e.g. n = 1, has nothing for a smaller ε to resolve); an all-zero C gets ε = 1.

Stopping rule. Iterate until the plan's L1 marginal error Σ_i |Σ_j P_ij − a_i| + Σ_j |Σ_i P_ij − b_j|
(a number in [0, 2], independent of the cost's scale) is below `tol`, or `max_iter` iterations; it
is measured every CHECK_EVERY iterations right after an exact column update, so it is the full
error of the plan that is returned. Measured here: the relative change of ⟨P, C⟩ still to come is
about `tol`, so the default tol = 1e-3 leaves ~0.1% of error, under the entropic bias. Each pair
stops on its own: converged pairs leave the batch (the batch is compacted), so one slow pair does not
make the whole batch iterate. Every pair's iterations, error and a converged flag are returned.

Acceleration. On speech-like data (frames that are noisy repeats of the text tokens, so a token's
mass must be split between frames) plain Sinkhorn at this ε needs ~100-300 iterations, and ε-scaling
(annealing ε by halves from max C) did not reduce that (measured: 311 against 308 iterations on
average): the count is set by the contraction rate at the final ε, not by the warm start.
Over-relaxation does reduce it (Thibault et al. 2021, "Overrelaxed Sinkhorn-Knopp"): u ← u −
ω·log(r/a) with ω = 1.8 took 2.5x (benchmark data) to 5x (the tests' pairs) fewer iterations. A pair
is relaxed only once its error is below 0.5 and falls back to plain Sinkhorn (ω = 1) for good if its
error ever grows between two checks, so at worst it converges like plain Sinkhorn.

Gradient (envelope theorem). The plan is computed under no_grad and the loss is Σ_ij P_ij C_ij(h_s,
h_t.detach()). By the envelope theorem, the gradient of the entropic OT value with respect to C is
the optimal plan P, so this gives the exact gradient of the entropic objective (ε held fixed) with
respect to h_s, in memory independent of the number of iterations (no graph through the loop).
h_t is detached: the paper's "gradients from text representations do not contribute" (Sec. 4.3).

Precision. Costs come from the matmul expansion ‖x‖² + ‖y‖² − 2 x·y, clamped at 0. Both clouds are
first shifted by the same vector (their joint mean), which leaves every distance unchanged but
removes the large common component of LLM hidden states that would otherwise cancel catastrophically
in float32. Arithmetic is float32 whatever the input (bf16 hidden states included; float64 inputs stay
float64), with autocast off and TF32 off for the cost matmul. Squared distances beyond 1/8 of the largest
float (points ~3e18 from their joint mean in float32) are refused at the entry, naming the input: ⟨P, C⟩
itself would not be representable, and hidden states that large come from a diverged model.
"""
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union
import warnings

import torch
from torch import Tensor
from tqdm import tqdm

EPS_REL = 0.1  # ε = EPS_REL · mean |double-centred cost|
EPS_FLOOR_REL = 1e-4  # ε ≥ EPS_FLOOR_REL · max C: float32 cannot resolve C/ε beyond ~1e4
TOL = 1e-3  # stop when the L1 marginal error of the plan is below this
MAX_ITER = 1000
OMEGA = 1.8  # over-relaxation factor, in (0, 2); 1 = plain Sinkhorn
RELAX_BELOW = 0.5  # start over-relaxing a pair once its marginal error is below this
WILD = 50.0  # a half-step whose log mass ratios reach ±WILD is taken by the exact log-sum-exp
CHECK_EVERY = 10  # iterations between convergence checks (a check costs one un-relaxed half-step)
TAU = 20.0  # retake exp() of the plan once a potential moved by more than this since the last time
MAX_BYTES = {"cpu": 2**26, "cuda": 2**35}  # default work-memory budget of `wasserstein_matrix` per device type
#   (on a GPU also at most half of its free memory: `_default_max_bytes`)
WORK_TENSORS = 4  # (pairs, n, m) float32 tensors alive at once in a chunk: cross term/cost, plan, copies


@dataclass
class SinkhornResult:
    cost: Tensor  # (B,) transport cost ⟨P, C⟩ of the returned plan, Eq. (1)
    eps: Tensor  # (B,) the ε that was used
    err: Tensor  # (B,) L1 marginal error of the returned plan
    iters: Tensor  # (B,) iterations used (int64)
    converged: Tensor  # (B,) err < tol
    plan: Optional[Tensor] = None  # (B, n, m) when asked for


# -----------------------------------------------------------------------------
# input checks: each public function checks its arguments once, here; the solver trusts what passed


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# the solver's settings: name -> (test, what a valid value is); select_layers.py checks its flags with it
SETTINGS = {
    "eps_rel": (lambda v: _is_real(v) and 0 < v < math.inf, "a finite number > 0"),
    "tol": (lambda v: _is_real(v) and 0 < v < 2,
            "a number in (0, 2) (it bounds the plan's L1 marginal error, which lies in [0, 2])"),
    "max_iter": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "omega": (lambda v: _is_real(v) and 0 < v < 2, "a number in (0, 2) (1 = plain Sinkhorn)"),
    "max_bytes": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def _check_settings(**settings):
    for name, value in settings.items():
        ok, what = SETTINGS[name]
        if not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 hidden states are upcast: the cost expansion cancels and exp/log need the mantissa
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cost_limit(dt: torch.dtype) -> float:
    """The largest |C| accepted: the ε rule's double centring reaches 4·max|C|; a further factor 2 of margin."""
    return torch.finfo(dt).max / 8


def _overflow(name: str, values: Tensor, bound: float, dt: torch.dtype, hint: str) -> ValueError:
    return ValueError(f"{name}: values up to {float(values.detach().abs().max()):.1e} overflow "
                      f"{str(dt).removeprefix('torch.')} in the squared distances (up to {bound:.1e}, "
                      f"limit {_cost_limit(dt):.1e}); {hint}")


def _check_mask(name: str, mask: Optional[Tensor], B: int, n: int, device) -> Tensor:
    if mask is None:
        return torch.ones(B, n, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or mask.shape != (B, n):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have shape {(B, n)}, got {got}")
    mask = mask.to(device=device, dtype=torch.bool)
    empty = (~mask.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"{name}: pair(s) {empty.tolist()[:8]} have no valid position (empty sequence)")
    return mask


def _check_finite(name: str, t: Tensor):
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def _check_cloud(name: str, h: Tensor):
    if not isinstance(h, Tensor) or h.dim() != 3:
        raise ValueError(f"{name} must be a (B, length, d) tensor, got "
                         f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    if not h.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {h.dtype}")
    if h.shape[1] == 0 or h.shape[2] == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(h.shape)}")


def _check_points(x: Tensor, y: Tensor, x_mask, y_mask, names: Tuple[str, str, str, str]):
    """Shapes, masks, finite valid points, and squared distances that fit the compute dtype.

    names: how the caller calls (x, y, x_mask, y_mask). Returns the masks (B, n), (B, m) bool."""
    xname, yname, xmname, ymname = names
    _check_cloud(xname, x)
    _check_cloud(yname, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: {xname} {tuple(x.shape)} vs {yname} {tuple(y.shape)}")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"hidden sizes differ: {xname} d={x.shape[2]} vs {yname} d={y.shape[2]}")
    if x.device != y.device:
        raise ValueError(f"{xname} is on {x.device}, {yname} on {y.device}")
    B, n, _ = x.shape
    x_mask = _check_mask(xmname, x_mask, B, n, x.device)
    y_mask = _check_mask(ymname, y_mask, B, y.shape[1], x.device)
    _check_finite(xname, x.detach()[x_mask])
    _check_finite(yname, y.detach()[y_mask])
    # every C_ij ≤ (r_x + r_y)², r the largest distance of a point from the joint mean (where C is computed)
    dt = _compute_dtype(x.dtype)
    with torch.no_grad():
        xc, yc = _centred(x.detach(), y.detach(), x_mask, y_mask, dt)
        rx = float((xc * xc).sum(-1).masked_fill(~x_mask, 0).amax()) ** 0.5
        ry = float((yc * yc).sum(-1).masked_fill(~y_mask, 0).amax()) ** 0.5
    if not (rx + ry) ** 2 <= _cost_limit(dt):  # NaN too: the mean itself overflowed
        xv, yv = x.detach()[x_mask], y.detach()[y_mask]
        name, v = (yname, yv) if yv.abs().max() > xv.abs().max() else (xname, xv)  # the input with the largest value
        raise _overflow(name, v, (rx + ry) ** 2, dt, "rescale the inputs or pass float64 tensors")
    return x_mask, y_mask


def _check_cost(C: Tensor, x_mask, y_mask):
    """A (B, n, m) cost with finite valid entries small enough for the ε rule. Returns C in the compute dtype
    with padding set to 0 (detached) and the masks."""
    if not isinstance(C, Tensor) or C.dim() != 3:
        got = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
        raise ValueError(f"C must be a (B, n, m) tensor, got {got}")
    B, n, m = C.shape
    if B == 0 or n == 0 or m == 0:
        raise ValueError(f"C has an empty dimension: shape {(B, n, m)}")
    dt = _compute_dtype(C.dtype)
    x_mask = _check_mask("x_mask", x_mask, B, n, C.device)
    y_mask = _check_mask("y_mask", y_mask, B, m, C.device)
    C = C.detach().to(dt).masked_fill(~(x_mask[:, :, None] & y_mask[:, None, :]), 0.0)
    _check_finite("C", C)
    top = float(C.abs().amax())
    if top > _cost_limit(dt):
        raise ValueError(f"C: |values| up to {top:.1e} overflow {str(dt).removeprefix('torch.')} in the ε rule "
                         f"(limit {_cost_limit(dt):.1e}); rescale C")
    return C, x_mask, y_mask


def _check_eps(eps, C: Tensor) -> Optional[Tensor]:
    """None (the ε rule) or an absolute ε: a number or a (B,) tensor, finite, > 0, with C/ε finite. -> (B,)"""
    if eps is None:
        return None
    B = C.shape[0]
    if not (_is_real(eps) or (isinstance(eps, Tensor) and eps.shape in ((), (B,)))):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eps must be a number or a tensor of shape {(B,)} (one per pair), got {got}")
    eps = torch.as_tensor(eps, dtype=C.dtype, device=C.device).expand(B).clone()
    if not (torch.isfinite(eps).all() and (eps > 0).all()):
        raise ValueError(f"eps must be finite and > 0, got {eps.tolist()[:8]}")
    top = C.flatten(1).abs().amax(1)  # (B,)
    if not (top / eps <= _cost_limit(C.dtype)).all():
        k = int((top / eps).argmax())
        raise ValueError(f"eps={float(eps[k]):.1e} (pair {k}) is too small for C: C/eps overflows "
                         f"{str(C.dtype).removeprefix('torch.')} (max |C| {float(top[k]):.1e})")
    return eps


# -----------------------------------------------------------------------------
# cost


@contextmanager
def _exact_fp32_matmul(device: torch.device):
    """Autocast and TF32 off: a bf16/TF32 cross term (8-10 mantissa bits) ruins ‖x‖² + ‖y‖² − 2x·y."""
    if device.type != "cuda":
        with torch.autocast(device.type, enabled=False):
            yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _centred(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, dt: torch.dtype):
    """x, y in dt with padding zeroed, both shifted by the joint mean of their valid points: every distance is
    unchanged and the large common component of LLM hidden states (which would cancel in float32) is gone.
    Garbage, even NaN, in the padding reaches neither the cost nor its gradient. -> (B, n, d), (B, m, d)"""
    x = torch.where(x_mask[..., None], x.to(dt), 0.0)  # (B, n, d)
    y = torch.where(y_mask[..., None], y.to(dt), 0.0)  # (B, m, d)
    with torch.no_grad():
        count = (x_mask.sum(1) + y_mask.sum(1)).to(dt)  # (B,)
        mu = (x.sum(1) + y.sum(1)) / count[:, None]  # (B, d)
    return x - mu[:, None, :], y - mu[:, None, :]


def _sq_cost(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """C[b, i, j] = ‖x[b, i] − y[b, j]‖² of checked inputs, (B, n, m), differentiable, 0 on padding."""
    with _exact_fp32_matmul(x.device):
        x, y = _centred(x, y, x_mask, y_mask, _compute_dtype(x.dtype))
        xx = (x * x).sum(-1)  # (B, n)
        yy = (y * y).sum(-1)  # (B, m)
        C = torch.baddbmm(xx[:, :, None] + yy[:, None, :], x, y.transpose(1, 2), alpha=-2.0)  # (B, n, m)
    C = C.clamp_min(0.0)
    return C.masked_fill(~(x_mask[:, :, None] & y_mask[:, None, :]), 0.0)


def sq_euclidean_cost(x: Tensor, y: Tensor, x_mask: Optional[Tensor] = None,
                      y_mask: Optional[Tensor] = None) -> Tensor:
    """C[b, i, j] = ‖x[b, i] − y[b, j]‖² for a batch of point-cloud pairs.

    x: (B, n, d), y: (B, m, d), masks (B, n) / (B, m) bool (True = valid). Returns (B, n, m) in float32
    (float64 for float64 input), differentiable in x and y, clamped at 0, and 0 on padded entries.
    """
    x_mask, y_mask = _check_points(x, y, x_mask, y_mask, ("x", "y", "x_mask", "y_mask"))
    return _sq_cost(x, y, x_mask, y_mask)


# -----------------------------------------------------------------------------
# solver


def _log_marginal(mask: Tensor, dtype) -> Tensor:
    """log of the uniform weights over valid positions, −inf on padding. mask (B, n) -> (B, n)."""
    count = mask.sum(1, keepdim=True).to(dtype)  # (B, 1)
    return torch.where(mask, -torch.log(count), -math.inf)


def _eps_from_cost(C: Tensor, la: Tensor, lb: Tensor, eps_rel: float) -> Tensor:
    """ε = eps_rel · Σ_ij a_i b_j |C̃_ij| (C̃ double-centred), floored; see the module docstring. -> (B,)"""
    a, b = la.exp(), lb.exp()  # (B, n), (B, m); 0 on padding
    row = torch.bmm(C, b[:, :, None])  # (B, n, 1) Σ_j b_j C_ij
    col = torch.bmm(a[:, None, :], C)  # (B, 1, m) Σ_i a_i C_ij
    tot = torch.bmm(a[:, None, :], row)  # (B, 1, 1)
    Cc = (C - row - col + tot).abs_()  # (B, n, m) |C̃|
    spread = torch.bmm(torch.bmm(a[:, None, :], Cc), b[:, :, None]).flatten()  # (B,)
    del Cc
    eps = torch.maximum(eps_rel * spread, EPS_FLOOR_REL * C.flatten(1).amax(1))
    return torch.where(eps > 0, eps, torch.ones_like(eps))  # C ≡ 0: every plan costs 0, any ε works


def _exp_plan(alpha: Tensor, beta: Tensor, K: Tensor, out: Tensor) -> Tensor:
    """out = P = exp(alpha_i + beta_j − K_ij), (B, n, m), with alpha = log a + u, beta = log b + v.

    The exponent is floored just above the denormal range (e^-80 ≈ 2e-35 in float32): exp() and sums run
    ~20x slower on denormal numbers on a CPU, and mass that small changes nothing. Padding (−inf) so holds
    e^-80 instead of 0: its rows and columns are masked wherever a mass is used."""
    torch.sub(alpha[:, :, None], K, out=out)
    out.add_(beta[:, None, :])
    out.clamp_min_(math.log(torch.finfo(out.dtype).tiny) + 7.0)
    return out.exp_()


def _lse(alpha: Tensor, beta: Tensor, K: Tensor, dim: int) -> Tensor:
    """log Σ_dim exp(alpha_i + beta_j − K_ij) with the max-shift: the exact (slow) path. -> (B, n) or (B, m)"""
    T = torch.sub(alpha[:, :, None], K).add_(beta[:, None, :])  # (B, n, m)
    mx = T.amax(dim, keepdim=True)
    return T.sub_(mx).exp_().sum(dim).log_().add_(mx.squeeze(dim))


def _log_ratio(mass: Tensor, log_target: Tensor, valid: Tensor) -> Tensor:
    """log(mass / target) on valid positions, 0 on padding (the fast path: no look at the values)."""
    return torch.where(valid, mass.log() - log_target, 0.0)


def _peak(lr: Tensor) -> Tensor:
    """max |log-ratio| (0-dim, left on the device: looking at it is a host synchronisation; NaN if any is NaN).
    Beyond WILD a mass under- or overflowed (the first step from zero potentials, a point far from all others),
    which only the exact log-sum-exp resolves."""
    return lr.abs().amax()


def _guarded_ratio(mass: Tensor, log_target: Tensor, valid: Tensor, exact):
    """(log(mass / target) as `_log_ratio`, whether the exact path was taken): when any ratio is wild, all of them
    are recomputed by the exact log-sum-exp `exact()`. One host synchronisation."""
    lr = _log_ratio(mass, log_target, valid)
    if bool(_peak(lr) < WILD):  # NaN fails too
        return lr, False
    return torch.where(valid, exact(), 0.0), True


@torch.no_grad()
def _sinkhorn_core(K: Tensor, eps: Tensor, la: Tensor, lb: Tensor, *, tol: float, max_iter: int,
                   omega: float, want_plan: bool):
    """Sinkhorn on K = C/ε (B, n, m), with log-marginals la (B, n), lb (B, m) (−inf on padding).

    The state is the pair of log-domain potentials (u, v); the plan is P = exp(la + lb + u + v − K).
    Its exp is taken only now and then (P0, at potentials u0, v0); in between P = P0 · e^(u − u0)_i ·
    e^(v − v0)_j exactly, so a half-step's masses are one batched matrix-vector product with P0 instead
    of an exp over (B, n, m). P0 is re-taken at a check once a potential moved by more than TAU (the
    factors stay within e^±TAU, far from over/underflow) and after every exact step.

    The iterations run in blocks that end at a check (every CHECK_EVERY). A block first runs optimistically:
    fast half-steps only, none of them looked at, so that the host does not wait for the device; whether any
    needed the exact path is read at the check, together with the convergence counts, in one host
    synchronisation. If one did (rare after the first iteration, which is always guarded), the block is run
    again from its start, guarded: each half-step looked at and taken exactly where needed, as `_guarded_ratio`
    says. Either way the block computes the same numbers as running every half-step guarded.
    K is compacted as pairs converge. Returns per-pair cost ⟨P, C⟩, L1 marginal error, iterations, and
    the plans (B, n, m) if want_plan.
    """
    B, n, m = K.shape
    dt, dev = K.dtype, K.device
    cost = K.new_zeros(B)
    err_out = K.new_full((B,), math.inf)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    plan = K.new_zeros(B, n, m) if want_plan else None

    idx = torch.arange(B, device=dev)  # global index of each active pair
    a_valid, b_valid = torch.isfinite(la), torch.isfinite(lb)
    # start with an exact column step from u = 0 (from zero potentials every mass would underflow)
    u = K.new_zeros(B, n)  # dual potentials / ε, 0 on padding
    v = torch.where(b_valid, -_lse(la, torch.zeros_like(lb), K, dim=1), 0.0)  # (B, m)
    u0, v0 = u.clone(), v.clone()  # the potentials at which P0 was taken
    eu, ev = K.new_ones(B, n), K.new_ones(B, m)  # e^(u − u0), e^(v − v0)
    P0 = _exp_plan(la + u, lb + v, K, torch.empty_like(K))  # (B, n, m)
    w = K.new_ones(B)  # per-pair over-relaxation factor (1 until the pair is near convergence)
    prev_err = K.new_full((B,), math.inf)
    plain = torch.zeros(B, dtype=torch.bool, device=dev)  # error grew once: plain Sinkhorn from now on

    def block(first: int, last: int, guard_to: int):
        """Iterations first..last (last is a check: its column step is exact (ω = 1), its row step is left
        to the check, as du); those up to guard_to guarded. Returns the potentials, du, whether the last
        iteration took an exact step, and (0-dim, on the device) whether an unguarded half-step was wild."""
        nonlocal P0
        u_, v_, u0_, v0_, eu_, ev_ = u, v, u0, v0, eu, ev
        peak, slow = K.new_zeros(()), False  # the largest |log-ratio| of the unguarded half-steps
        for it in range(first, last + 1):
            guard, check = it <= guard_to, it == last
            # columns: v ← v − ω log(c/b)
            c = ev_ * torch.bmm(eu_[:, None, :], P0)[:, 0]  # (Ba, m) column masses
            if guard:
                dv, slow_v = _guarded_ratio(c, lb, b_valid,
                                            lambda: v_ + _lse(la + u_, torch.zeros_like(v_), K, dim=1))
            else:
                dv, slow_v = _log_ratio(c, lb, b_valid), False
                peak = torch.maximum(peak, _peak(dv))
            v_ = v_ - (dv if check else w[:, None] * dv)
            ev_ = (v_ - v0_).exp()
            # rows: u ← u − ω log(r/a)
            r = eu_ * torch.bmm(P0, ev_[:, :, None])[:, :, 0]  # (Ba, n) row masses
            if guard:
                du, slow_u = _guarded_ratio(r, la, a_valid,
                                            lambda: u_ + _lse(torch.zeros_like(u_), lb + v_, K, dim=2))
            else:
                du, slow_u = _log_ratio(r, la, a_valid), False
                peak = torch.maximum(peak, _peak(du))
            slow = slow_u or slow_v
            if check:
                break
            u_ = u_ - w[:, None] * du
            if slow:  # into a new tensor: a guarded rerun of the block starts again from the old one
                P0 = _exp_plan(la + u_, lb + v_, K, torch.empty_like(P0))
                u0_, v0_ = u_.clone(), v_.clone()
            eu_, ev_ = (u_ - u0_).exp(), (v_ - v0_).exp()
        return u_, v_, u0_, v0_, du, slow, ~(peak < WILD)  # NaN is wild too

    def settle(u_, v_, u0_, v0_, du, last):
        """The check's numbers for every pair, before compaction: the plan's L1 marginal error (columns are
        exact, so Σ_i |r_i − a_i| is all of it), which pairs are done, the relaxation state, the potentials
        after the row step, and whether a kept pair's potentials moved by more than TAU since P0 was taken."""
        err = (la.exp() * torch.expm1(du).abs()).sum(1)  # (Ba,)
        done = err < tol if last < max_iter else torch.ones_like(err, dtype=torch.bool)
        # over-relax once near the solution; back off for good if the error ever grows
        plain_ = plain | (err > prev_err)
        w_ = torch.where(~plain_ & (err < RELAX_BELOW), omega, 1.0).to(dt)
        u_ = u_ - w_[:, None] * du
        keep = ~done[:, None]
        far = torch.maximum(torch.where(keep, (u_ - u0_).abs(), 0.0).amax(),
                            torch.where(keep, (v_ - v0_).abs(), 0.0).amax()) > TAU
        return err, done, plain_, w_, u_, far

    it = 0
    while it < max_iter:
        first, last = it + 1, min(max_iter, (it // CHECK_EVERY + 1) * CHECK_EVERY)
        P0_start = P0
        u_, v_, u0_, v0_, du, slow, wild = block(first, last, guard_to=1)
        err, done, plain_, w_, un, far = settle(u_, v_, u0_, v0_, du, last)
        # one host synchronisation for all the check needs
        wild_seen, n_done, far = torch.stack([wild.long(), done.sum(), far.long()]).tolist()
        if wild_seen:  # run the block again from its start, guarded
            P0 = P0_start
            u_, v_, u0_, v0_, du, slow, _ = block(first, last, guard_to=last)
            err, done, plain_, w_, un, far = settle(u_, v_, u0_, v0_, du, last)
            n_done, far = int(done.sum()), bool(far)
        P0_start = None  # an abandoned P0's memory is free again before the compaction copies
        it = last
        if n_done:
            order = torch.argsort(done.to(torch.int8), stable=True)  # the pairs to keep first
            keep, fin = order[:len(order) - n_done], order[len(order) - n_done:]
            g = idx[fin]
            ev = (v_[fin] - v0_[fin]).exp()
            P = P0[fin] * (u_[fin] - u0_[fin]).exp()[:, :, None] * ev[:, None, :]  # the plan at (u, v)
            cost[g] = eps[fin] * (P * K[fin]).sum((1, 2))  # ⟨P, C⟩ = ε ⟨P, K⟩
            err_out[g] = err[fin]
            iters[g] = it
            if want_plan:  # zero the floor value left on padding
                plan[g] = P.masked_fill_(~(a_valid[fin][:, :, None] & b_valid[fin][:, None, :]), 0.0)
            if n_done == len(order):
                break
            # compact: converged pairs leave the batch
            K, P0, idx, eps, la, lb, a_valid, b_valid = (
                t[keep] for t in (K, P0, idx, eps, la, lb, a_valid, b_valid))
            un, v_, u0_, v0_, err, w_, plain_ = (t[keep] for t in (un, v_, u0_, v0_, err, w_, plain_))
        u, v, u0, v0, w, plain, prev_err = un, v_, u0_, v0_, w_, plain_, err
        if slow or far:
            P0 = _exp_plan(la + u, lb + v, K, P0)
            u0, v0 = u.clone(), v.clone()
        eu, ev = (u - u0).exp(), (v - v0).exp()
    return cost, err_out, iters, plan


def sinkhorn(C: Tensor, x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None, *,
             eps: Union[None, float, Tensor] = None, eps_rel: float = EPS_REL, tol: float = TOL,
             max_iter: int = MAX_ITER, omega: float = OMEGA, return_plan: bool = False) -> SinkhornResult:
    """Entropic OT between uniform measures on the valid rows and columns of each cost matrix.

    C: (B, n, m) cost (any float dtype; computed in float32, or float64 for float64 input).
    x_mask: (B, n), y_mask: (B, m) bool, True on valid positions (None: all valid).
    eps: absolute ε (float or (B,) tensor); None: eps_rel · mean |double-centred C| per pair.
    tol: stop when the L1 marginal error of the plan < tol; max_iter: iteration cap.
    omega: over-relaxation in (0, 2) (1 = plain Sinkhorn).
    Returns a SinkhornResult with cost ⟨P, C⟩ (B,), eps, err, iters, converged, and plan (B, n, m).
    No gradient flows through it: see `ot_loss` for the loss.
    """
    _check_settings(eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega)
    C, x_mask, y_mask = _check_cost(C, x_mask, y_mask)
    return _solve(C, x_mask, y_mask, _check_eps(eps, C), eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega,
                  return_plan=return_plan)


@torch.no_grad()
def _solve(C: Tensor, x_mask: Tensor, y_mask: Tensor, eps: Optional[Tensor], *, eps_rel: float, tol: float,
           max_iter: int, omega: float, return_plan: bool) -> SinkhornResult:
    """`sinkhorn` on checked inputs: C (B, n, m) detached, in the compute dtype, 0 on padding; eps (B,) or None."""
    la, lb = _log_marginal(x_mask, C.dtype), _log_marginal(y_mask, C.dtype)
    if eps is None:
        eps = _eps_from_cost(C, la, lb, eps_rel)
    K = C / eps[:, None, None]  # (B, n, m) cost in units of ε
    cost, err, iters, plan = _sinkhorn_core(K, eps, la, lb, tol=tol, max_iter=max_iter, omega=omega,
                                             want_plan=return_plan)
    return SinkhornResult(cost=cost, eps=eps, err=err, iters=iters, converged=err < tol, plan=plan)


def relative_eps(C: Tensor, x_mask: Optional[Tensor] = None, y_mask: Optional[Tensor] = None,
                 eps_rel: float = EPS_REL) -> Tensor:
    """The default ε of each pair: eps_rel · mean |double-centred C|, floored (module docstring).

    C: (B, n, m), masks (B, n) / (B, m). Returns (B,). Exposed so that another solver (POT in the tests
    and the benchmark) can be run at exactly the same ε.
    """
    _check_settings(eps_rel=eps_rel)
    C, x_mask, y_mask = _check_cost(C, x_mask, y_mask)
    with torch.no_grad():
        return _eps_from_cost(C, _log_marginal(x_mask, C.dtype), _log_marginal(y_mask, C.dtype), eps_rel)


def _warn_unconverged(converged: Tensor, err: Tensor, tol: float, where: str):
    bad = int((~converged).sum())
    if bad:
        warnings.warn(f"{where}: {bad} pair(s) did not reach the marginal error tol={tol} "
                      f"(max error {float(err.max()):.2e}); raise max_iter or eps_rel", RuntimeWarning)


# -----------------------------------------------------------------------------
# the loss


def ot_loss(h_speech: Tensor, h_text: Tensor, speech_mask: Optional[Tensor] = None,
            text_mask: Optional[Tensor] = None, *, eps: Union[None, float, Tensor] = None,
            eps_rel: float = EPS_REL, tol: float = TOL, max_iter: int = MAX_ITER, omega: float = OMEGA,
            return_result: bool = False):
    """Per-pair Wasserstein loss W(h_s, h_t) of Eq. (1), with the envelope gradient.

    h_speech: (B, n, d), h_text: (B, m, d) hidden states (any float dtype); speech_mask (B, n),
    text_mask (B, m) bool, True on valid positions. Returns loss (B,) in float32 (float64 for float64
    input): ⟨P, C(h_s, h_t)⟩ with P the entropic plan. Gradient flows to h_speech only, as P·∂C/∂h_s
    (P is a constant: envelope theorem, no graph through the Sinkhorn iterations); h_text is detached.
    Sum the layers' losses as Eq. (6) says. With return_result, also the SinkhornResult (plans included).
    """
    _check_settings(eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega)
    speech_mask, text_mask = _check_points(h_speech, h_text, speech_mask, text_mask,
                                           ("h_speech", "h_text", "speech_mask", "text_mask"))
    C = _sq_cost(h_speech, h_text.detach(), speech_mask, text_mask)  # (B, n, m), grad to h_speech
    res = _solve(C.detach(), speech_mask, text_mask, _check_eps(eps, C.detach()), eps_rel=eps_rel, tol=tol,
                 max_iter=max_iter, omega=omega, return_plan=True)
    _warn_unconverged(res.converged, res.err, tol, "ot_loss")
    loss = (res.plan * C).sum((1, 2))  # (B,) envelope theorem: ∇_C = P, P held constant
    return (loss, res) if return_result else loss


# -----------------------------------------------------------------------------
# all-pairs distances (layer selection, Eq. 3)


def _pack(seqs: Sequence[Tensor], mu: Tensor, device, dt):
    """Sort by length, centre by mu and pad: -> (N, L, d) on device, lengths (N,), order (N,)."""
    lengths = torch.tensor([s.shape[0] for s in seqs])
    order = torch.argsort(lengths, stable=True)
    L, d = int(lengths.max()), seqs[0].shape[1]
    out = torch.zeros(len(seqs), L, d, dtype=dt, device=device)
    for row, k in enumerate(order.tolist()):
        out[row, : lengths[k]] = seqs[k].to(device=device, dtype=dt) - mu
    return out, lengths[order].to(device), order.to(device)


def _check_seqs(seqs, name: str):
    if not isinstance(seqs, (list, tuple)) or len(seqs) == 0:
        raise ValueError(f"{name} must be a non-empty list of (length, d) tensors")
    d = None
    for k, s in enumerate(seqs):
        if not isinstance(s, Tensor) or s.dim() != 2 or not s.is_floating_point():
            raise ValueError(f"{name}[{k}] must be a 2-D float tensor (length, d), got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        if s.shape[0] == 0:
            raise ValueError(f"{name}[{k}] is empty (length 0)")
        d = s.shape[1] if d is None else d
        if s.shape[1] != d:
            raise ValueError(f"{name}[{k}] has d={s.shape[1]}, {name}[0] has d={d}")
        _check_finite(f"{name}[{k}]", s)
    return d


@torch.no_grad()
def _default_max_bytes(device: torch.device) -> int:
    """The work-memory budget of a chunk: MAX_BYTES[device type], and on a GPU at most half its free memory."""
    budget = MAX_BYTES.get(device.type, MAX_BYTES["cuda"])
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return max(1, budget)


def wasserstein_matrix(speech: Sequence[Tensor], text: Sequence[Tensor], *, device=None,
                       max_bytes: Optional[int] = None, eps_rel: float = EPS_REL, tol: float = TOL,
                       max_iter: int = MAX_ITER, omega: float = OMEGA, progress: bool = True,
                       return_stats: bool = False):
    """D[i, j] = W(speech[i], text[j]) for all pairs (Eq. 3), by chunks of speech × text.

    speech: N tensors (n_i, d), text: M tensors (m_j, d), any lengths and float dtypes.
    device: where to compute (default: speech[0]'s device). All points are packed there once
    (sorted by length, padded, centred on their joint mean: a common shift, so distances are exact).
    max_bytes: budget for the chunk's (pairs, n, m) work tensors (about WORK_TENSORS of them, float32);
    a chunk is at least one pair. Default MAX_BYTES[device type]: 64 MiB on a CPU (small chunks pad less
    and stay in cache: measured fastest here); on a GPU half of its free memory, at most 32 GiB (measured on
    an H200, 1,000 x 1,000 pairs at d = 3584: 38.2 s in 1-GiB chunks, 11.1 s in 8-GiB, 6.2 s in 32-GiB ones:
    a chunk iterates as long as its slowest pair, and an iteration costs about the same whatever its size).
    A chunk's costs are one matmul, (cs·n, d) @ (d, ct·m), not a loop over pairs.
    Returns D (N, M) float32 on the CPU; with return_stats also a dict (max_err, max_iters, unconverged).
    """
    _check_settings(eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega)
    if max_bytes is not None:
        _check_settings(max_bytes=max_bytes)
    d = _check_seqs(speech, "speech")
    if _check_seqs(text, "text") != d:
        raise ValueError(f"speech has d={d} but text has d={text[0].shape[1]}")
    try:
        device = torch.device(device) if device is not None else speech[0].device
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: {e}") from None
    dt = _compute_dtype(torch.promote_types(speech[0].dtype, text[0].dtype))
    N, M = len(speech), len(text)

    # one shift for all points (their mean) leaves every distance unchanged and limits cancellation
    seqs = list(speech) + list(text)
    mu = sum(s.to(device=device, dtype=dt).sum(0) for s in seqs) / sum(s.shape[0] for s in seqs)  # (d,)
    X, xlen, xorder = _pack(speech, mu, device, dt)  # (N, n_max, d)
    Y, ylen, yorder = _pack(text, mu, device, dt)  # (M, m_max, d)
    xx, yy = (X * X).sum(-1), (Y * Y).sum(-1)  # (N, n_max), (M, m_max)
    # every D_ij ≤ (r_s + r_t)², r the largest distance of a point from the mean; D is returned in float32
    bound = (float(xx.max()) ** 0.5 + float(yy.max()) ** 0.5) ** 2
    if not bound <= _cost_limit(torch.float32):  # NaN too: the mean itself overflowed
        named = [(f"speech[{k}]", s) for k, s in enumerate(speech)] + [(f"text[{k}]", t) for k, t in enumerate(text)]
        name, h = max(named, key=lambda nh: float(nh[1].abs().max()))  # the sequence holding the largest value
        raise _overflow(name, h, bound, torch.float32, "rescale the inputs")

    # chunk of cs speech × ct text pairs: WORK_TENSORS (pairs, n_max, m_max) tensors within max_bytes
    max_bytes = _default_max_bytes(device) if max_bytes is None else max_bytes
    per_pair = WORK_TENSORS * X.shape[1] * Y.shape[1] * X.element_size()
    pairs = max(1, max_bytes // per_pair)
    ct = min(M, max(1, math.isqrt(pairs)))
    cs = min(N, max(1, pairs // ct))

    D_sorted = torch.empty(N, M, dtype=dt, device=device)
    err_max, it_max, unconverged = 0.0, 0, 0
    bar = tqdm(total=N * M, disable=not progress, unit="pair", desc="wasserstein", leave=False)
    for s0 in range(0, N, cs):
        s1 = min(N, s0 + cs)
        n = int(xlen[s1 - 1])  # sorted: the last is the longest of the chunk
        xs, xxs = X[s0:s1, :n], xx[s0:s1, :n]  # (cs', n, d), (cs', n)
        xmask = torch.arange(n, device=device)[None, :] < xlen[s0:s1, None]  # (cs', n)
        for t0 in range(0, M, ct):
            t1 = min(M, t0 + ct)
            m = int(ylen[t1 - 1])
            ys, yys = Y[t0:t1, :m], yy[t0:t1, :m]  # (ct', m, d), (ct', m)
            ymask = torch.arange(m, device=device)[None, :] < ylen[t0:t1, None]  # (ct', m)
            a, b = s1 - s0, t1 - t0
            with _exact_fp32_matmul(device):
                cross = xs.reshape(a * n, d) @ ys.reshape(b * m, d).T  # (a·n, b·m): every pair in one matmul
            # C[p=(i, j)] = ‖x‖² + ‖y‖² − 2 x·y, laid out as (a·b, n, m)
            C = torch.empty(a, b, n, m, dtype=dt, device=device)
            torch.add(xxs[:, None, :, None], yys[None, :, None, :], out=C)
            C.add_(cross.view(a, n, b, m).permute(0, 2, 1, 3), alpha=-2.0).clamp_min_(0.0)
            del cross
            C.masked_fill_(~xmask[:, None, :, None], 0.0).masked_fill_(~ymask[None, :, None, :], 0.0)
            C = C.view(a * b, n, m)
            la = _log_marginal(xmask, dt).repeat_interleave(b, 0)  # (a·b, n): pair p = i·b + j
            lb = _log_marginal(ymask, dt).repeat(a, 1)  # (a·b, m)
            eps = _eps_from_cost(C, la, lb, eps_rel)
            K = C.div_(eps[:, None, None])  # in place: the chunk's cost becomes K = C/ε
            del C
            cost, err, iters, _ = _sinkhorn_core(K, eps, la, lb, tol=tol, max_iter=max_iter, omega=omega,
                                                 want_plan=False)
            del K
            D_sorted[s0:s1, t0:t1] = cost.view(a, b)
            err_max = max(err_max, float(err.max()))
            it_max = max(it_max, int(iters.max()))
            unconverged += int((err >= tol).sum())
            bar.update(a * b)
    bar.close()

    D = torch.empty(N, M, dtype=dt, device=device)
    D[xorder[:, None], yorder[None, :]] = D_sorted  # undo the length sort
    D = D.float().cpu()
    if unconverged:
        warnings.warn(f"wasserstein_matrix: {unconverged} of {N * M} pairs did not reach tol={tol} "
                      f"(max error {err_max:.2e}); raise max_iter or eps_rel", RuntimeWarning)
    stats = dict(max_err=err_max, max_iters=it_max, unconverged=unconverged, chunk=(cs, ct))
    return (D, stats) if return_stats else D
