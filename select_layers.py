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

W comes from `sinkhorn.wasserstein_matrix`. The command line runs the whole stage on a stage-1 checkpoint:

    python select_layers.py --ckpt runs/stage1/final --data librispeech_test_clean.jsonl \
        --num-pairs 1000 --threshold 0.05 --out runs/layer_selection

It samples --num-pairs utterances with --seed, runs the speech pass (speech in the prompt) and the text
pass (the transcript in its place) of the speech LLM with the same instruction, keeps the hidden states
of every layer at the speech and transcript positions, and writes layer_selection.json (MRR per layer,
the selected layers, every setting, the sampled entries) and layer_selection.png (like Figure 4).
Memory: all requested layers' states are kept on the CPU in the model's dtype, about 25 GB for 1,000
pairs of Qwen2-7B (29 layers) in bf16; --layers restricts them (e.g. --layers 0-8).
"""
import argparse
import json
import math
import random
import sys
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


# -----------------------------------------------------------------------------
# the command line


def parse_layers(spec: str, num_layers: int) -> list:
    """'all' or a list like '0-5,8' -> sorted layer ids within 0..num_layers (0 = embeddings)."""
    if spec == "all":
        return list(range(num_layers + 1))
    out = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--layers {spec!r}: expected 'all' or a list like '0-5,8'") from None
        if hi < lo:
            raise ValueError(f"--layers {spec!r}: the range {part!r} runs backwards")
        out.update(range(lo, hi + 1))
    bad = sorted(l for l in out if not 0 <= l <= num_layers)
    if bad:
        raise ValueError(f"--layers {spec!r}: layer(s) {bad} outside 0..{num_layers}")
    return sorted(out)


@torch.no_grad()
def extract_states(model, entries: Sequence[dict], layers: Sequence[int], instruction: str, batch_size: int,
                   device, progress: bool = True) -> dict:
    """{layer: (speech states, text states)}: per entry, (88, d) at the speech positions and (m, d) at the
    transcript positions, on the CPU. Both passes use the same instruction (Sec. 4.2)."""
    import data
    from tqdm import tqdm

    speech = {l: [] for l in layers}
    text = {l: [] for l in layers}
    n_mels = model.config.whisper.num_mel_bins
    for start in tqdm(range(0, len(entries), batch_size), desc="hidden states", unit="batch", disable=not progress):
        batch = entries[start:start + batch_size]
        mel, fbank, padding_mask = data.load_batch(batch, n_mels=n_mels, device=device,
                                                   n_frames=model.config.whisper.n_frames)
        sp = model.speech_pass(model.encode_speech(mel, fbank, padding_mask), [instruction] * len(batch),
                               layers=layers)
        tx = model.text_pass([e["transcript"] for e in batch], [instruction] * len(batch), layers=layers)
        for l in layers:
            for i in range(len(batch)):
                speech[l].append(sp.hidden_states[l][i][sp.mask[i]].cpu())   # (88, d)
                text[l].append(tx.hidden_states[l][i][tx.mask[i]].cpu())     # (m_i, d)
    return {l: (speech[l], text[l]) for l in layers}


def _line_numbers(path, n: int) -> list:
    """The file line of each of the n entries of a manifest: data.read_manifest skips blank lines only."""
    lines = [k for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return lines if len(lines) == n else [None] * n


def _check_numbers(args) -> list:
    """The flags that need no file: each problem names its flag."""
    problems = []
    if args.num_pairs < 2:
        problems.append(f"--num-pairs {args.num_pairs}: must be at least 2 (one pair scores MRR 1 at every layer)")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: must be >= 1")
    if not 0 < args.threshold < 1:  # MRR lies in (0, 1]: outside (0, 1) every layer or none is selected
        problems.append(f"--threshold {args.threshold}: must be in (0, 1) (MRR lies in (0, 1]: a threshold "
                        f"outside selects every layer or none)")
    for key in ("eps_rel", "tol", "max_iter", "max_bytes"):
        ok, what = sinkhorn.SETTINGS[key]
        value = getattr(args, key)
        if value is not None and not ok(value):
            problems.append(f"--{key.replace('_', '-')} {value}: must be {what}")
    if args.instruction is not None and not args.instruction.strip():
        problems.append(f"--instruction {args.instruction!r}: empty (leave it out for the default)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        problems.append(f"--device {args.device!r}: not a device (cpu, cuda, cuda:1, ...)")
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {args.device}: CUDA is not available here")
        elif device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            problems.append(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return problems


def _base_weights(args, problems: list):
    """The base weights' paths (--llm/--whisper/--beats, else those recorded in --ckpt), checked to exist and to
    fit the checkpoint by SpeechLLM.resolve, and the LLM's layer count. No weights are read."""
    from model import CheckpointError, LLMConfig, SpeechLLM

    try:
        paths = SpeechLLM.resolve(args.ckpt, args.llm, args.whisper, args.beats)
        return paths, LLMConfig.from_dir(paths["llm"]).num_hidden_layers
    except CheckpointError as e:
        problems.append(str(e))
        return {}, None


def _sample(args, problems: list):
    """The manifest read and checked, the pairs sampled, and each sampled pair's audio header read.
    Returns (indices, entries) of the sample, or ([], []) after a problem that leaves nothing to check."""
    import data

    try:
        entries = data.read_manifest(args.data, require=("audio", "transcript"))
    except (OSError, ValueError) as e:  # names the file and the line (a UnicodeDecodeError names neither)
        problems.append(str(e) if str(Path(args.data)) in str(e) else f"{args.data}: {e}")
        return [], []
    if args.num_pairs > len(entries):
        problems.append(f"--num-pairs {args.num_pairs} but {args.data} has {len(entries)} entries")
    if not 2 <= args.num_pairs <= len(entries):
        return [], []
    picked = random.Random(args.seed).sample(range(len(entries)), args.num_pairs)
    lines = _line_numbers(args.data, len(entries))
    at = {i: f"{args.data}:{lines[i]}" if lines[i] else f"{args.data} (entry {i + 1})" for i in picked}

    # Duplicates cap MRR whatever the layer, so it no longer measures alignment: refuse them (Eq. 4 counts ties
    # against the gold). The same audio twice: at most one of its rows can rank its own transcript first. The
    # same transcript twice: the two texts tie, so neither gold can rank first.
    why = {"audio": "at most one of these rows can rank its own transcript first",
           "transcript": "identical texts tie, and a tie ranks the gold second at best (Eq. 4)"}
    for what, key in (("audio", lambda e: (e["audio"], e.get("start"), e.get("end"))),
                      ("transcript", lambda e: e["transcript"].strip())):
        seen = {}
        for i in sorted(picked):
            seen.setdefault(key(entries[i]), []).append(i)
        for k, rows in seen.items():
            if len(rows) > 1:
                nums = [str(lines[i] or f"entry {i + 1}") for i in rows]
                shown = k[0] if what == "audio" else k
                problems.append(f"{args.data}: lines {', '.join(nums[:-1])} and {nums[-1]} have the same {what} "
                                f"{shown!r}: {why[what]}; keep one of them")

    bad = []
    for i in picked:
        e = entries[i]
        try:
            frames, sr = data.audio_info(e["audio"])
        except FileNotFoundError:
            bad.append(f"{at[i]}: audio file not found: {e['audio']}")
            continue
        except data.AudioError as err:
            bad.append(f"{at[i]}: {err}")
            continue
        start, end = e.get("start") or 0.0, e.get("end") or frames / sr
        if not 0 <= start < end <= frames / sr + 0.1:
            bad.append(f"{at[i]}: segment [{start}, {end}) s is not inside {e['audio']} ({frames / sr:.3f} s)")
    if bad:
        shown = bad if len(bad) <= 20 else bad[:20] + [f"... and {len(bad) - 20} more"]
        problems.append(f"{len(bad)} of {len(picked)} sampled audio files cannot be used:\n    " + "\n    ".join(shown))
    return picked, [entries[i] for i in picked]


def _check_out(out, problems: list):
    """Create --out and write a probe file there now, rather than fail after hours of computation."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out}: exists and is not a folder")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".select_layers_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"--out {out}: cannot write there ({e.strerror or e})")


def check_inputs(args):
    """Everything the run needs, checked before any model is loaded: the flags, the checkpoint, the base
    weights' paths, the layers, the manifest, every sampled audio file's header and the output folder.
    Exits with every problem found, each naming its flag, file or line. Returns (paths, layers, picked, entries)."""
    problems = _check_numbers(args)
    paths, num_layers = _base_weights(args, problems)
    layers = []
    if num_layers is not None:
        try:
            layers = parse_layers(args.layers, num_layers)
        except ValueError as e:
            problems.append(str(e))
    picked, entries = _sample(args, problems)
    _check_out(args.out, problems)
    if len(problems) == 1:
        raise SystemExit(f"select_layers.py: {problems[0]}")
    if problems:
        raise SystemExit(f"select_layers.py: {len(problems)} problems, nothing was loaded:\n  " + "\n  ".join(problems))
    if chance_mrr(len(picked)) >= args.threshold:
        print(f"select_layers.py: warning: with {len(picked)} pairs the chance MRR is {chance_mrr(len(picked)):.3f} "
              f">= --threshold {args.threshold}: a layer at chance would be selected (the paper: 1000 pairs)",
              file=sys.stderr)
    return paths, layers, picked, entries


def main(argv=None):
    from model import INSTRUCTIONS, SpeechLLM

    ap = argparse.ArgumentParser(prog="select_layers.py",
                                 description="AI-STA stage 2: pick the LLM layers to align (Sec. 4.2).")
    ap.add_argument("--ckpt", required=True,
                    help="stage-1 checkpoint: this project's checkpoint directory or a SALMONN .pth file")
    ap.add_argument("--data", required=True, help="JSONL manifest with 'audio' and 'transcript' per line")
    ap.add_argument("--out", required=True, help="output directory for layer_selection.json and .png")
    ap.add_argument("--llm", help="LLM checkpoint directory (default: the one recorded in --ckpt)")
    ap.add_argument("--whisper", help="whisper-large-v2 directory or model.safetensors (default: recorded)")
    ap.add_argument("--beats", help="BEATs .pt checkpoint (default: recorded; 'none' for a Whisper-only model)")
    ap.add_argument("--num-pairs", type=int, default=1000, help="speech-transcript pairs to sample (paper: 1000)")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="keep layers with MRR above this (Eq. 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    ap.add_argument("--instruction", default=None,
                    help=f"the instruction of both passes (default: {INSTRUCTIONS['asr'][0]!r})")
    ap.add_argument("--layers", default="all", help="layers to evaluate, 'all' or e.g. '0-8' (0 = embeddings)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="dtype of the frozen model (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--max-bytes", type=int, default=None,
                    help="work memory of one OT chunk (default: 64 MiB on a CPU; on a GPU half its free memory, "
                         "at most 32 GiB)")
    ap.add_argument("--eps-rel", type=float, default=sinkhorn.EPS_REL, help="Sinkhorn ε relative to the cost scale")
    ap.add_argument("--tol", type=float, default=sinkhorn.TOL, help="Sinkhorn stop: L1 marginal error")
    ap.add_argument("--max-iter", type=int, default=sinkhorn.MAX_ITER)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    paths, layers, picked, entries = check_inputs(args)   # exits here on any bad input, before any model loads

    instruction = args.instruction or INSTRUCTIONS["asr"][0]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    model = SpeechLLM.from_pretrained(paths["llm"], paths["whisper"], paths["beats"], ckpt=args.ckpt,
                                      dtype=dtype, device=args.device).eval()
    states = extract_states(model, entries, layers, instruction, args.batch_size, args.device,
                            progress=not args.no_progress)
    del model

    def one_layer_at_a_time():   # frees each layer's states once its distances are computed
        for l in layers:
            yield (l, *states.pop(l))

    result = layer_retrieval(one_layer_at_a_time(), threshold=args.threshold, device=args.device,
                             max_bytes=args.max_bytes, eps_rel=args.eps_rel, tol=args.tol, max_iter=args.max_iter,
                             progress=not args.no_progress,
                             on_layer=lambda l, v: print(f"layer {l:2d}: MRR {v:.4f}", flush=True))
    settings = dict(vars(args), instruction=instruction, dtype=str(dtype).removeprefix("torch."), **{
        f"{k}_path": str(v) if v is not None else None for k, v in paths.items()})
    result["pairs"] = [{"index": i, "audio": e["audio"], "transcript": e["transcript"]} for i, e in zip(picked, entries)]
    json_path, png_path = save_results(result, args.out, settings=settings)
    print(f"selected layers (MRR > {args.threshold}): {result['selected']}")
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
