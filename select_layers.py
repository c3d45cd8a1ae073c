"""Optimization layer selection of AI-STA (Sec. 4.2): speech→text retrieval by Wasserstein distance.

For each LLM layer l (0 = the embedding layer), the hidden states of N speech utterances and of their
M ≥ N transcripts (each fed with the same instruction) give a distance matrix
    D_ij^(l) = W(h_s[i, l], h_t[j, l])                                                   Eq. (3)
in which row i's gold transcript is column i. Ranking the columns of each row gives
    MRR^(l) = 1/Q Σ_i 1/r_i                                                              Eq. (4)
and the layers kept for the alignment loss are
    I = {l : MRR^(l) > threshold},  threshold = 0.05                                     Eq. (5)
The paper uses 1,000 LibriSpeech test-clean pairs; for Vicuna-13B it finds layers 0-5 above 0.5 and
the rest below 0.01, for Qwen2-7B layers 0-1 (Figure 4).

This file holds the library functions; W comes from `sinkhorn.wasserstein_matrix`.
"""
import json
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor

import sinkhorn

THRESHOLD = 0.05  # Eq. (5), "based on empirical practice" (Sec. 4.2)

LayerStates = Union[Mapping[int, Tuple[Sequence[Tensor], Sequence[Tensor]]],
                    Iterable[Tuple[int, Sequence[Tensor], Sequence[Tensor]]]]


def mrr(D: Tensor) -> float:
    """Speech→text mean reciprocal rank, Eq. (4).

    D: (N, M) distances, N ≤ M, row i's gold text in column i. The rank of the gold is 1 + the number of
    other columns at distance ≤ the gold's: ties count against the gold, so a constant D scores 1/M,
    not 1. Returns a Python float.
    """
    if not isinstance(D, Tensor) or D.dim() != 2:
        got = tuple(D.shape) if isinstance(D, Tensor) else type(D).__name__
        raise ValueError(f"D must be an (N, M) tensor, got {got}")
    N, M = D.shape
    if N == 0 or N > M:
        raise ValueError(f"D must have 1 <= N <= M (gold of row i is column i), got shape {(N, M)}")
    if not torch.isfinite(D).all():
        raise ValueError("D contains NaN or inf")
    D = D.double()
    gold = D[:, :N].diagonal()  # (N,)
    rank = (D <= gold[:, None]).sum(1)  # (N,) the gold counts itself once: 1 + (others ≤ gold)
    return float((1.0 / rank.double()).mean())


def chance_mrr(M: int) -> float:
    """Expected MRR when the gold's rank is uniform over 1..M: H_M / M."""
    return sum(1.0 / k for k in range(1, M + 1)) / M


def select(mrr_by_layer: Mapping[int, float], threshold: float = THRESHOLD) -> list:
    """Eq. (5): the layers whose MRR is strictly above the threshold, in increasing order."""
    return sorted(int(l) for l, v in mrr_by_layer.items() if v > threshold)


def _iter_layers(layer_states: LayerStates):
    if isinstance(layer_states, Mapping):
        for layer, (speech, text) in sorted(layer_states.items()):
            yield layer, speech, text
    else:
        yield from layer_states


def layer_retrieval(layer_states: LayerStates, *, threshold: float = THRESHOLD, device=None,
                    max_bytes: int = None, eps_rel: float = sinkhorn.EPS_REL,
                    tol: float = sinkhorn.TOL, max_iter: int = sinkhorn.MAX_ITER,
                    omega: float = sinkhorn.OMEGA, progress: bool = True,
                    on_layer: Callable[[int, float], None] = None) -> dict:
    """D (Eq. 3) and MRR (Eq. 4) for every layer, and the selected set (Eq. 5).

    layer_states: {layer: (speech, text)} or an iterable of (layer, speech, text), where speech is a
    list of N tensors (n_i, d) and text a list of M ≥ N tensors (m_j, d), text[i] the transcript of
    speech[i]. An iterable (e.g. a generator that runs the LLM and yields one layer at a time) keeps
    only one layer's states alive. The solver settings are passed to `sinkhorn.wasserstein_matrix`;
    on_layer(layer, mrr) is called after each layer (e.g. to log).
    Returns a JSON-ready dict: layers, mrr (same order), selected, threshold, chance_mrr, num_speech,
    num_text, convergence (per layer), settings.
    """
    layers, mrrs, conv = [], [], []
    N = M = None
    for layer, speech, text in _iter_layers(layer_states):
        if N is None:
            N, M = len(speech), len(text)
        if (len(speech), len(text)) != (N, M):
            raise ValueError(f"layer {layer}: {len(speech)} speech / {len(text)} text, "
                             f"but the first layer had {N} / {M}")
        if N > M:
            raise ValueError(f"layer {layer}: more speech ({N}) than text ({M}) samples; text[i] must be "
                             f"the transcript of speech[i]")
        D, stats = sinkhorn.wasserstein_matrix(speech, text, device=device, max_bytes=max_bytes,
                                               eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega,
                                               progress=progress, return_stats=True)
        value = mrr(D)
        layers.append(int(layer))
        mrrs.append(value)
        conv.append(dict(layer=int(layer), max_marginal_err=stats["max_err"], max_iters=stats["max_iters"],
                         unconverged_pairs=stats["unconverged"]))
        if on_layer is not None:
            on_layer(int(layer), value)
    if not layers:
        raise ValueError("layer_states is empty")
    return dict(
        layers=layers,
        mrr=mrrs,
        selected=select(dict(zip(layers, mrrs)), threshold),
        threshold=threshold,
        chance_mrr=chance_mrr(M),
        num_speech=N,
        num_text=M,
        convergence=conv,
        settings=dict(device=str(device) if device is not None else None, max_bytes=max_bytes,
                      eps_rel=eps_rel, tol=tol, max_iter=max_iter, omega=omega),
    )


def plot_mrr(result: dict, path) -> Path:
    """MRR against layer like the paper's Figure 4: the threshold as a dashed line, the selected layers
    as filled markers. Writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    layers, values, selected = result["layers"], result["mrr"], set(result["selected"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, values, "-", color="tab:blue", lw=1.5, label="MRR")
    sel = [(l, v) for l, v in zip(layers, values) if l in selected]
    rest = [(l, v) for l, v in zip(layers, values) if l not in selected]
    if sel:
        ax.plot(*zip(*sel), "o", color="tab:blue", label=f"selected: {sorted(selected)}")
    if rest:
        ax.plot(*zip(*rest), "o", mfc="white", color="tab:blue")
    ax.axhline(result["threshold"], ls="--", color="tab:red", lw=1, label=f"threshold {result['threshold']}")
    ax.axhline(result["chance_mrr"], ls=":", color="gray", lw=1, label=f"chance {result['chance_mrr']:.3f}")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("speech→text MRR")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"retrieval by Wasserstein distance, {result['num_speech']} speech × {result['num_text']} text")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_results(result: dict, out_dir, name: str = "layer_selection", settings: dict = None):
    """Writes <out_dir>/<name>.json (the result, with `settings` merged into result['settings']) and
    <out_dir>/<name>.png (plot_mrr). Returns (json_path, png_path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, settings={**result.get("settings", {}), **(settings or {})})
    for l, v in zip(result["layers"], result["mrr"]):
        if not math.isfinite(v):
            raise ValueError(f"MRR of layer {l} is {v}")
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")  # Paths etc. as strings
    png_path = plot_mrr(result, out_dir / f"{name}.png")
    return json_path, png_path


def load_results(path) -> dict:
    """Reads a JSON written by save_results."""
    return json.loads(Path(path).read_text())
