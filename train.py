"""Training of AI-STA: stage 1 (speech pre-training, §4.1) and stage 3 (joint CE + OT training, §4.3).

    # stage 1: ASR + audio captioning, cross-entropy only (80k steps, 9k warm-up)
    python train.py --stage pretrain --backbone qwen2-7b --beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt \
        --train librispeech.jsonl gigaspeech_m.jsonl wavcaps.jsonl audiocaps.jsonl clotho.jsonl --out runs/stage1
    # stage 2: python select_layers.py --ckpt runs/stage1/step_080000 ... -> runs/layers/layer_selection.json
    # stage 3: speech translation with L = α·CE + Σ_{l∈I} (1-α)/|I| · W_l (Eq. 6)
    python train.py --stage joint --backbone qwen2-7b --init runs/stage1/step_080000 \
        --layers runs/layers/layer_selection.json --train covost2_en_zh_train.jsonl --valid covost2_en_zh_dev.jsonl \
        --out runs/joint
    # any of them on 8 GPUs (global batch stays 32: micro 4 x 8 GPUs x accumulation 1):
    torchrun --nproc_per_node 8 train.py ... --micro-batch 4

The file reads top to bottom: the paper's settings; the alignment losses (Eq. 6 and Table 4's CTC and
contrastive ablations); the schedule and optimizer (App. A.1); one optimizer step; validation; checkpoints;
the command line and its checks; reporting; main.

Decisions the paper leaves open (each is a flag where a researcher may want another value):
  - "The OT loss weight is empirically set to 0.01" (§5.2): read as 1 - α = 0.01, i.e. α = 0.99 in Eq. (6),
    so Σ_l (1-α)/|I| · W_l carries a total weight of 0.01 whatever |I| is (--alpha).
  - Table 4's CTC and contrastive losses replace the OT term at layer 0 with the same weight:
    L = α·CE + (1-α)·L_align. Stage 1 and `--align none` train on CE alone (the paper's "base").
  - The learning rate follows SALMONN's LinearWarmupCosineLRScheduler, which the paper's values come from:
    linear from 1e-6 to 3e-5 over the warm-up, then lr = 1e-5 + (3e-5 - 1e-5)·(1 + cos(π·step/steps))/2 with
    the cosine counted from step 0 (so it is 2% under the peak when the warm-up ends at 9k of 80k).
  - The joint stage has no fixed length in the paper; its cosine needs one. SALMONN's config for that stage
    (3k warm-up, validation every iters_per_epoch = 3000 steps, max_epoch 30) gives 90k steps: the default
    horizon. Early stopping (patience 4) usually ends the run earlier.
  - Gradient clipping is not in the paper: --clip 1.0 by default (0 turns it off); the norm is logged.
  - Every random draw of a micro-batch (Q-Former and LoRA dropout) comes from torch's generator re-seeded
    with (seed, step, k), k the micro-batch's global index in the step. So the run does not depend on how
    micro-batches are spread over processes (DDP equals one process with accumulation) nor on where it was
    interrupted (resume is exact), and no RNG state needs saving.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import select_layers
import sinkhorn
from model import LLMConfig, SpeechLLM, WhisperEncoderConfig, load_tokenizer, read_json

# ----------------------------------------------------------------------------------------------------
# 1. The paper's settings (§4, §5.2, App. A.1)
# ----------------------------------------------------------------------------------------------------

STAGES = {
    # stage 1: ASR + AAC, CE only; 80k steps, 9k warm-up, no validation in the paper
    "pretrain": dict(steps=80_000, warmup=9_000, eval_every=3_000, patience=0, align="none"),
    # stage 3: ST; 3k warm-up, validate every 3k steps, stop after 4 validations without a new best accuracy
    "joint": dict(steps=90_000, warmup=3_000, eval_every=3_000, patience=4, align="ot"),
}
ALPHA = 0.99                 # Eq. (6): 1 - α = 0.01, "the OT loss weight" of §5.2
LR, WARMUP_LR, MIN_LR = 3e-5, 1e-6, 1e-5
BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.05
GLOBAL_BATCH, MICRO_BATCH = 32, 8      # global batch of the paper; SALMONN's per-GPU batch
SEED = 42                              # SALMONN's
CONTRASTIVE_TEMPERATURE = 0.1          # Table 4's N-pair loss on cosine similarities (see contrastive_loss)

BACKBONES = {"qwen2-7b": "Qwen/Qwen2-7B", "vicuna-13b-v1.1": "lmsys/vicuna-13b-v1.1"}
WHISPER_HUB = "openai/whisper-large-v2"
HUB_INCLUDE = {WHISPER_HUB: " --include config.json model.safetensors"}   # not the TF/Flax/bin copies
BEATS_URL = "https://github.com/microsoft/unilm/tree/master/beats (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)"

CKPT_PREFIX, STATE_FILE, CTC_FILE = "step_", "train_state.pt", "ctc_head.safetensors"


# ----------------------------------------------------------------------------------------------------
# 2. The alignment losses: Eq. (6) and the two alignments of Table 4
# ----------------------------------------------------------------------------------------------------

def eq6_loss(ce: torch.Tensor, align: dict[int, torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. (6): L = α·L_CE + Σ_{l∈I} (1-α)/|I| · L_Wass^(l).

    align: {layer l: the batch mean of that layer's alignment loss}. With OT, L_Wass^(l) = W_l (§3.2, Eq. 1);
    Table 4's CTC and contrastive losses take its place at layer 0 (|I| = 1). No alignment: L = L_CE.
    """
    if not align:
        return ce
    return alpha * ce + sum((1 - alpha) / len(align) * a for a in align.values())


def ot_losses(speech: dict[int, torch.Tensor], text: dict[int, torch.Tensor], speech_mask: torch.Tensor,
              text_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """§4.3: per selected layer, the Wasserstein distance (Eq. 1) between the speech pass's states at the
    speech positions and the text pass's states at the transcript positions, averaged over the batch.

    speech[l] (B, n, H) with gradient; text[l] (B, m, H) from the no-grad text pass ("the gradients from text
    representations do not contribute"); masks (B, n), (B, m) True on real positions.

    Every layer's pairs go to the solver as one batch of |I|·B pairs, in a |I|-th of its steps: it treats pairs
    independently (each leaves the batch as it converges), so the plans are those of one call per layer; only
    when it re-takes a plan's exp is decided batch-wide, which moves float32 results by ~1e-5 (float64: ~1e-15).
    """
    layers = list(speech)
    n_layers, batch = len(layers), speech_mask.shape[0]
    w = sinkhorn.ot_loss(torch.cat([speech[l] for l in layers]), torch.cat([text[l] for l in layers]),
                         speech_mask.repeat(n_layers, 1), text_mask.repeat(n_layers, 1))      # (|I|·B,)
    return dict(zip(layers, w.view(n_layers, batch).mean(1)))


def ctc_loss(head: nn.Linear, speech: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Table 4's CTC (§6.3): "an independent classification layer" maps each speech token at layer 0 (the
    projected Q-Former output, (B, n, H)) to the LLM's vocabulary plus a blank (the last index); the
    transcript tokenized by the backbone's tokenizer is the target.

    A transcript longer than the n = 88 speech tokens has no CTC path: zero_infinity=True makes its loss 0
    (and its gradient 0) instead of inf, so such a row trains only through CE. reduction "mean": each row's
    loss divided by its target length, then averaged over the batch (F.ctc_loss's default).
    """
    B, n, _ = speech.shape
    logp = head(speech).float().log_softmax(-1).transpose(0, 1)               # (n, B, V+1)
    flat = torch.tensor([t for row in targets for t in row], device=speech.device)
    in_len = torch.full((B,), n, dtype=torch.long, device=speech.device)
    tgt_len = torch.tensor([len(row) for row in targets], device=speech.device)
    return F.ctc_loss(logp, flat, in_len, tgt_len, blank=head.out_features - 1, zero_infinity=True)


def contrastive_loss(speech: torch.Tensor, speech_mask: torch.Tensor, text: torch.Tensor,
                     text_mask: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """Table 4's CL (§6.3): the multi-class N-pair loss (Sohn, 2016) between length-averaged speech and
    text representations at layer 0; row i's transcript is its positive, the batch's others its negatives:
        L = 1/B Σ_i log(1 + Σ_{j≠i} exp(s_ij - s_ii)) = cross-entropy of softmax_j(s_ij) at j = i.
    s_ij is the cosine similarity over a temperature: Sohn's raw inner product rewards growing the speech
    vectors' norm without bound (the text side is fixed), and the LLM would then see ever larger inputs.

    speech (B, n, H) with gradient, text (B, m, H) without; masks True on real positions.
    """
    s = (speech * speech_mask[..., None]).sum(1) / speech_mask.sum(1, keepdim=True)    # (B, H)
    t = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)           # (B, H)
    sim = F.normalize(s.float(), dim=-1) @ F.normalize(t.float(), dim=-1).T / temperature   # (B, B)
    return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))


# ----------------------------------------------------------------------------------------------------
# 3. The schedule and the optimizer (App. A.1)
# ----------------------------------------------------------------------------------------------------

def get_lr(step: int, steps: int, warmup: int, lr: float = LR, warmup_lr: float = WARMUP_LR,
           min_lr: float = MIN_LR) -> float:
    """The learning rate of optimizer step `step` (0-based): SALMONN's linear warm-up from warmup_lr to lr,
    then a cosine from lr to min_lr over the whole run, its phase counted from step 0 (App. A.1)."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def make_optimizer(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.999, eps 1e-8); weight decay on matrices only: biases and the 1-D weights of norms
    are not decayed, as in SALMONN. The learning rate is set before every step (get_lr)."""
    decay = [p for n, p in named_params if p.ndim >= 2]
    no_decay = [p for n, p in named_params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=BETAS, eps=ADAM_EPS)


# ----------------------------------------------------------------------------------------------------
# 4. One optimizer step
# ----------------------------------------------------------------------------------------------------

class Context:
    """Where and how the step runs: device, compute dtype, process rank / world size."""

    def __init__(self, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1):
        self.device, self.dtype, self.rank, self.world = device, dtype, rank, world
        self.is_main = rank == 0

    def autocast(self):
        """bf16 autocast where the frozen weights are bf16 (the trainable ones stay fp32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def micro_batch_seed(seed: int, step: int, k: int) -> int:
    """The seed of global micro-batch k of optimizer step `step`: a hash, so nearby (step, k) are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{step}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1        # < 2**63: any torch.manual_seed accepts it


class EncoderCache:
    """--cache-encoders: the frozen encoders' outputs for each training utterance, computed once and kept on the
    device, so that later epochs skip the features and both encoders (on the toy world's CPU run, 58% of a
    stage-1 step). Each clip is encoded alone, as in a batch of one, whatever batch it comes in: Whisper's
    output is the same either way (every clip is padded to its window), BEATs' is not. In a batch, BEATs runs
    over the zero padding up to the longest clip and the bridge reads those padded frames (SALMONN's
    behaviour, kept without the cache); with the cache, the bridge sees each clip's own frames and zeros
    after them (WindowQFormer's audio_lengths), exactly what it sees at micro-batch 1 without the cache.
    Memory: each utterance keeps (Whisper frames x width + BEATs tokens x width) values in the model's dtype:
    4-6 MB for Whisper-large-v2 + BEATs in bf16, at most 0.15 MB on the toy world. Meant for small corpora.
    Validation (and evaluate.py) encode their batches as usual."""

    def __init__(self):
        self.whisper: dict[str, torch.Tensor] = {}
        self.beats: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.whisper)

    def _add(self, model, batch, rows: list[int], lengths: list[int]) -> None:
        """Encode the batch's rows `rows`: Whisper over them together (each row padded to its window, so its
        output is its own up to float rounding), BEATs over each clip alone (its own length, no padding)."""
        mel = data.log_mel_spectrogram(batch.wavs[rows], batch.n_mels, padding_mask=batch.padding_mask[rows],
                                       n_frames=batch.n_frames)                            # (b, n_mels, n_frames)
        speech = model.encode_whisper(mel)                                                   # (b, T_w, C)
        for j, i in enumerate(rows):
            self.whisper[batch.ids[i]] = speech[j]
            if model.beats is not None:
                fbank = data.beats_fbank(batch.wavs[i:i + 1, :lengths[i]])                    # (1, T, 128)
                self.beats[batch.ids[i]] = model.encode_beats(fbank)[0]                       # (T', C')

    def bridge_inputs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Whisper's (B, T_w, C) and BEATs' (B, max T', C') outputs for the batch (padded with zeros), and
        BEATs' lengths (B,); the clips not seen before are encoded first (batch: waveforms on the device)."""
        lengths = (~batch.padding_mask).sum(1).tolist()
        new = [i for i, uid in enumerate(batch.ids) if uid not in self.whisper]
        if new:
            self._add(model, batch, new, lengths)
        speech = torch.stack([self.whisper[u] for u in batch.ids])
        if model.beats is None:
            return speech, None, None
        audio = nn.utils.rnn.pad_sequence([self.beats[u] for u in batch.ids], batch_first=True)
        return speech, audio, torch.tensor([len(self.beats[u]) for u in batch.ids], device=audio.device)


def compute_losses(model, batch, align: str, layers: list[int], alpha: float, ctc_head: nn.Linear | None = None,
                   cache: EncoderCache | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch: encode speech -> speech pass with CE -> text pass (no grad) -> alignment -> Eq. (6).

    Returns the loss to backpropagate and its named terms: loss, ce, and w{l} per OT layer, ctc or
    contrastive. With `cache`, the encoders' outputs come from it (the batch needs no features)."""
    if cache is None:
        speech = model.encode_speech(batch.mel, batch.fbank, batch.padding_mask)  # (B, 88, H), encoders no grad
    else:
        speech = model.bridge(*cache.bridge_inputs(model, batch))
    out = model.speech_pass(speech, batch.instructions, batch.targets, layers=layers if align == "ot" else ())
    if align == "ot":
        text = model.text_pass(batch.transcripts, batch.instructions, layers)    # stops after max(I)
        align_terms = ot_losses(out.hidden_states, text.hidden_states, out.mask, text.mask)
        names = {l: f"w{l}" for l in align_terms}
    elif align == "ctc":
        ids = [model.prompter.text_ids(t, "transcript") for t in batch.transcripts]
        align_terms, names = {0: ctc_loss(ctc_head, speech, ids)}, {0: "ctc"}
    elif align == "contrastive":
        text = model.text_pass(batch.transcripts, batch.instructions, [0])      # token embeddings only
        align_terms = {0: contrastive_loss(speech, out.mask, text.hidden_states[0], text.mask)}
        names = {0: "contrastive"}
    else:
        align_terms, names = {}, {}
    loss = eq6_loss(out.loss, align_terms, alpha)
    return loss, {"loss": loss, "ce": out.loss, **{names[l]: v for l, v in align_terms.items()}}


def all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the trainable parameters' gradients over the processes: one flat buffer, one collective.
    Only the ~28 M trainable gradients exist (the frozen weights have none), so the 7B/13B backbone is never
    communicated; no gradient buckets, no find_unused_parameters."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def train_step(model, opt: torch.optim.Optimizer, params: list[nn.Parameter], micro_batches: list, step: int,
               args, ctx: Context, ctc_head: nn.Linear | None = None,
               cache: EncoderCache | None = None) -> dict[str, float]:
    """One optimizer step over this process's micro-batches [(k, Batch)], k = global micro-batch index.

    Each micro-batch's loss is divided by their number, the gradients are averaged over the processes, so
    the update is that of the mean loss over all A x world micro-batches whatever the split. Returns the
    step's mean terms (over micro-batches and processes), lr and grad_norm as floats."""
    lr = get_lr(step, args.steps, args.warmup, args.lr, args.warmup_lr, args.min_lr)
    for group in opt.param_groups:
        group["lr"] = lr
    terms = []
    for k, batch in micro_batches:
        torch.manual_seed(micro_batch_seed(args.seed, step, k))    # dropout masks depend on (seed, step, k) only
        with ctx.autocast():
            loss, t = compute_losses(model, batch.to(ctx.device, features=cache is None), args.align, args.layers,
                                     args.alpha, ctc_head, cache)
        (loss / len(micro_batches)).backward()
        terms.append({n: v.detach().float() for n, v in t.items()})
    if ctx.world > 1:
        all_reduce_grads(params, ctx.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else math.inf)
    stats = step_stats(step, terms, grad_norm, [b.ids for _, b in micro_batches], ctx)   # the step's one sync
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**stats, "lr": lr}


def step_stats(step: int, terms: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor,
               ids: list[list[str]], ctx: Context) -> dict[str, float]:
    """The step's mean terms and gradient norm on the host, after checking that all are finite.

    A NaN or inf anywhere (any micro-batch, any process) stops the run before the optimizer touches the
    weights, naming the step, the terms and the utterance ids, so the last checkpoint stays the last good
    one. This is the step's one host-device synchronisation (the logging reads the same numbers)."""
    names = list(terms[0])
    local = torch.stack([torch.stack([t[n] for n in names]) for t in terms])     # (A, n_terms)
    total = torch.cat([local.sum(0), grad_norm.reshape(1).float()])
    if ctx.world > 1:
        dist.all_reduce(total)       # every process sees the same numbers, so all of them stop together
    total = total.tolist()
    if all(math.isfinite(v) for v in total):
        n = len(terms) * ctx.world
        return {**{k: v / n for k, v in zip(names, total)}, "grad_norm": total[-1] / ctx.world}
    bad = [m for m in range(len(terms)) if not bool(local[m].isfinite().all())]
    where = "; ".join(f"micro-batch {m}: " + ", ".join(f"{n} {v:.4g}" for n, v in zip(names, local[m].tolist()))
                      + f" (ids: {', '.join(ids[m])})" for m in bad)
    if not bad:
        where = (f"gradient norm {total[-1] / ctx.world:.4g}" if all(math.isfinite(v) for v in total[:-1])
                 else f"a micro-batch of another process (rank != {ctx.rank})")
    raise NonFiniteLoss(f"step {step + 1}: non-finite loss or gradient: {where}. Stopped before the update; "
                        f"the last checkpoint is untouched.")


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss or gradient: the run stops (main turns it into an exit message)."""


# ----------------------------------------------------------------------------------------------------
# 5. Validation: teacher-forced loss and token accuracy (the early-stopping metric of App. A.1)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of CE, number of correct argmax predictions, number of target tokens) over a batch, each 0-d:
    the speech pass with its targets, as in training (dropout off)."""
    speech = model.encode_speech(batch.mel, batch.fbank, batch.padding_mask)           # (B, 88, H)
    out = model.speech_pass(speech, batch.instructions, batch.targets)
    return out.loss * out.n_tokens, out.correct, out.n_tokens


def validate(model, batches, ctx: Context) -> dict[str, float]:
    """Token-weighted CE and accuracy over the validation set (each process holds a shard of it)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for batch in batches:
        with ctx.autocast():
            sums += torch.stack([v.double() for v in teacher_forced(model, batch.to(ctx.device))])
    if ctx.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    ce, correct, tokens = sums.tolist()
    return {"valid_loss": ce / tokens, "valid_acc": correct / tokens}


# ----------------------------------------------------------------------------------------------------
# 6. Checkpoints: the trainable weights (model.save_trainable) + the training state, written atomically
# ----------------------------------------------------------------------------------------------------
# runs/joint/
#   args.json            every setting of the run (checked again on --resume)
#   metrics.jsonl        one line per logged step and per validation
#   step_003000/         trainable.safetensors + speech_llm.json (loadable by SpeechLLM / evaluate.py),
#                        train_state.pt (optimizer, step, early-stopping state), ctc_head.safetensors (--align ctc)
#   best -> step_003000  the best validation accuracy so far
# A checkpoint is written into .tmp_step_XXXXXX and renamed: a step_* directory is always complete, so a
# kill at any moment leaves the previous checkpoints intact and --resume takes the newest step_*.

def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return sorted(p for p in out.glob(CKPT_PREFIX + "*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, model, state: dict, meta: dict, ctc_head: nn.Linear | None,
                    keep: int) -> Path:
    """Write step_{step} atomically, then keep only the newest `keep` checkpoints and the best one."""
    from safetensors.torch import save_file

    final = out / f"{CKPT_PREFIX}{step:06d}"
    tmp = out / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_trainable(tmp, meta)
    if ctc_head is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ctc_head.state_dict().items()}, str(tmp / CTC_FILE))
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():           # on disk before the rename makes the checkpoint visible
        _fsync(f)
    if final.exists():                # only after a resume from an older checkpoint than this one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out)
    if state["best_step"] == step:
        link = out / ".best.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(final.name)
        os.replace(link, out / "best")
    for old in checkpoints(out)[:-keep]:
        if old.name != f"{CKPT_PREFIX}{state['best_step']:06d}":
            shutil.rmtree(old)
    return final


def load_checkpoint_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# 7. The command line, and every check that can fail before a model is loaded
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="AI-STA training: stage 1 (--stage pretrain) and stage 3 (--stage joint).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--stage", required=True, choices=list(STAGES),
                    help="pretrain: ASR + captioning with CE (§4.1); joint: CE + alignment, Eq. (6) (§4.3)")
    ap.add_argument("--backbone", required=True,
                    help=f"{' | '.join(BACKBONES)} | an LLM directory holding config.json | toy (the whole "
                         "method on the toy world: see `python train.py --backbone toy --help`)")
    ap.add_argument("--llm", help="LLM weights: a directory or a hub id found in the local Hugging Face cache "
                                  "(default: --init's recorded path, else the backbone's hub id)")
    ap.add_argument("--whisper", help=f"Whisper weights: directory or hub id (default: recorded, else {WHISPER_HUB})")
    ap.add_argument("--beats", help="the BEATs .pt file, or 'none' for a Whisper-only model (default: recorded)")
    ap.add_argument("--train", required=True, nargs="+", metavar="MANIFEST[:WEIGHT]",
                    help="JSON-lines manifests; WEIGHT = times each utterance is seen per epoch (default 1)")
    ap.add_argument("--valid", metavar="MANIFEST", help="validation manifest (teacher-forced loss and accuracy)")
    ap.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, plots")
    ap.add_argument("--init", help="start from a checkpoint: this project's directory or SALMONN's .pth "
                                   "(--stage joint: the stage-1 checkpoint, required)")
    ap.add_argument("--qformer", metavar="FIELD=VALUE,...",
                    help="a fresh bridge's shape, QFormerConfig fields, e.g. hidden=128,n_head=4,ffn=512 (default: "
                         "SALMONN's BERT-base Q-Former; a run from --init takes the checkpoint's)")
    ap.add_argument("--lora", metavar="FIELD=VALUE,...",
                    help="a fresh model's LoRA: r, alpha, dropout, e.g. dropout=0 (default: SALMONN's r=8,alpha=32,"
                         "dropout=0.1 on q_proj/v_proj; a run from --init takes the checkpoint's)")
    ap.add_argument("--layers", help="layers I of Eq. (6): select_layers.py's JSON, or a list like '0-1' or '0,5' "
                                     "(required with --align ot; 0 = the embeddings)")
    ap.add_argument("--align", choices=["ot", "ctc", "contrastive", "none"],
                    help="alignment loss: ot (Eq. 6), ctc or contrastive (Table 4, layer 0), none (CE only); "
                         "default: ot for joint, none for pretrain")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="α of Eq. (6): the alignment terms weigh 1 - α")
    ap.add_argument("--global-batch", type=int, default=GLOBAL_BATCH,
                    help="utterances per optimizer step = micro-batch x accumulation x processes")
    ap.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="utterances per forward pass")
    ap.add_argument("--steps", type=int, help="optimizer steps (cosine horizon); default 80000 pretrain, 90000 joint")
    ap.add_argument("--warmup", type=int, help="warm-up steps; default 9000 pretrain, 3000 joint")
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    ap.add_argument("--warmup-lr", type=float, default=WARMUP_LR, help="learning rate of step 0")
    ap.add_argument("--min-lr", type=float, default=MIN_LR, help="learning rate at the end of the cosine")
    ap.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    ap.add_argument("--eval-every", type=int, help="validate every N steps (default 3000)")
    ap.add_argument("--patience", type=int,
                    help="stop after N validations without a better accuracy (default 4 joint, 0 = never pretrain)")
    ap.add_argument("--save-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    ap.add_argument("--keep", type=int, default=2, help="newest checkpoints kept (the best one is kept too)")
    ap.add_argument("--log-every", type=int, default=10, help="write metrics every N steps")
    ap.add_argument("--seed", type=int, default=SEED, help="data order, instructions and dropout")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="frozen weights and autocast (default: bf16 on CUDA, "
                                                             "fp32 on CPU); trainable weights are always fp32")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the repeated blocks (default: on for CUDA, off on CPU)")
    ap.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    ap.add_argument("--cache-encoders", action="store_true",
                    help="keep each training clip's frozen-encoder outputs in device memory after its first use "
                         "(each clip encoded alone; see EncoderCache): for small corpora such as the toy world")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


class ArgumentError(ValueError):
    """A bad argument or input file, found before anything is loaded; main prints it and exits."""


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def resolve_weights(value: str, flag: str) -> Path:
    """A local path as it is; a hub id ('Qwen/Qwen2-7B') from the local Hugging Face cache (the snapshot
    refs/main points to), else an error with the command that downloads it. Nothing is downloaded here."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise ArgumentError(f"{flag} {value}: no such file or directory")
    repo = hf_hub_cache() / f"models--{value.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    if snapshots:
        return snapshots[-1]
    raise ArgumentError(f"{flag} {value}: not a local path, and not in the Hugging Face cache ({repo}). "
                        f"Download it with:\n    hf download {value}{HUB_INCLUDE.get(value, '')}")


def parse_train_specs(specs: list[str]) -> tuple[list[Path], list[float]]:
    """'MANIFEST[:WEIGHT]' -> paths and weights (a trailing ':number' is a weight, anything else a path)."""
    paths, weights = [], []
    for spec in specs:
        path, _, weight = spec.rpartition(":")
        try:
            w = float(weight) if path else 1.0
        except ValueError:
            path, w = spec, 1.0
        if not path:
            path = spec
        if not (math.isfinite(w) and w > 0):
            raise ArgumentError(f"--train {spec}: the weight must be a positive number, got {weight!r}")
        if not Path(path).is_file():
            raise ArgumentError(f"--train {spec}: manifest {path} not found")
        paths.append(Path(path))
        weights.append(w)
    return paths, weights


def parse_layer_spec(value: str, num_layers: int) -> list[int]:
    """--layers: select_layers.py's JSON (its 'selected' layers) or a list like '0-1' / '0,5' / 'all'."""
    if Path(value).is_file():
        try:
            layers = select_layers.load_results(value)["selected"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArgumentError(f"--layers {value}: not a layer_selection.json of select_layers.py "
                                f"({type(e).__name__}: {e})") from None
        if not layers:
            raise ArgumentError(f"--layers {value}: selects no layer (every MRR was under its threshold)")
        value = ",".join(str(l) for l in layers)
    elif value.endswith(".json"):
        raise ArgumentError(f"--layers {value}: file not found")
    try:
        return select_layers.parse_layers(value, num_layers)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def parse_fields(flag: str, spec: str, kinds: dict) -> dict:
    """'a=1,b=0.5' -> {a: 1, b: 0.5}, each value converted by kinds[field] (int or float)."""
    out = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in kinds:
            raise ArgumentError(f"{flag} {spec}: unknown field {key!r} (known: {', '.join(kinds)})")
        try:
            out[key] = kinds[key](value)
        except ValueError:
            raise ArgumentError(f"{flag} {spec}: {key}={value!r} is not "
                                f"{'an integer' if kinds[key] is int else 'a number'}") from None
    return out


def parse_qformer(spec: str) -> dict:
    """--qformer 'hidden=128,n_head=4,ffn=512' -> QFormerConfig overrides (its dims follow the encoders/LLM)."""
    from qformer import QFormerConfig
    kinds = {k: float if f.type in (float, "float") else int for k, f in QFormerConfig.__dataclass_fields__.items()
             if k not in ("speech_dim", "audio_dim", "llm_hidden")}
    out = parse_fields("--qformer", spec, kinds)
    try:
        QFormerConfig(**out)
    except ValueError as e:
        raise ArgumentError(f"--qformer {spec}: {e}") from None
    return out


def parse_lora(spec: str) -> dict:
    """--lora 'r=8,alpha=32,dropout=0' -> SpeechLLM.from_pretrained's lora_r, lora_alpha, lora_dropout."""
    out = parse_fields("--lora", spec, {"r": int, "alpha": float, "dropout": float})
    ranges = {"r": (lambda v: v >= 1, ">= 1"), "alpha": (lambda v: v > 0, "> 0"),
              "dropout": (lambda v: 0 <= v < 1, "0 <= dropout < 1")}
    for key, v in out.items():
        if not ranges[key][0](v):
            raise ArgumentError(f"--lora {spec}: {key}={v:g} is out of range ({ranges[key][1]})")
    return {f"lora_{k}": v for k, v in out.items()}


def check_args(args, world: int) -> argparse.Namespace:
    """Every argument and every manifest, checked before any model is loaded. Fills in the stage's defaults,
    the resolved paths (args.paths), the layers (list), args.accumulation, and the datasets.

    Raises ArgumentError naming the argument, file or line."""
    stage = STAGES[args.stage]
    for k in ("steps", "warmup", "eval_every", "patience"):
        if getattr(args, k) is None:
            setattr(args, k, stage[k])
    args.align = args.align or stage["align"]
    args.save_every = args.save_every or args.eval_every
    # numbers
    for k in ("steps", "global_batch", "micro_batch", "eval_every", "save_every", "keep", "log_every"):
        if getattr(args, k) < 1:
            raise ArgumentError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("warmup", "patience", "workers", "clip", "weight_decay"):
        if getattr(args, k) < 0:
            raise ArgumentError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if args.warmup >= args.steps:
        raise ArgumentError(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if not (0 < args.warmup_lr <= args.lr and 0 < args.min_lr <= args.lr):
        raise ArgumentError(f"learning rates: need 0 < --warmup-lr ({args.warmup_lr}) <= --lr ({args.lr}) and "
                            f"0 < --min-lr ({args.min_lr}) <= --lr")
    if args.global_batch % (args.micro_batch * world):
        raise ArgumentError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch "
                            f"{args.micro_batch} x {world} process(es)")
    args.accumulation = args.global_batch // (args.micro_batch * world)
    # the stage's rules
    if args.stage == "pretrain" and args.align != "none":
        raise ArgumentError(f"--align {args.align}: stage 1 (--stage pretrain) trains with CE only; "
                            f"alignment belongs to --stage joint")
    if args.align != "none" and not 0 < args.alpha < 1:
        raise ArgumentError(f"--alpha {args.alpha}: must lie in (0, 1) (1 - α weighs the alignment loss)")
    if args.align == "ot" and not args.layers:
        raise ArgumentError("--align ot needs --layers: select_layers.py's layer_selection.json or a list like '0-1'")
    if args.align in ("ctc", "contrastive") and args.layers not in (None, "0"):
        raise ArgumentError(f"--align {args.align} works at layer 0 (the embeddings, Table 4); drop --layers")
    if args.align == "none" and args.layers:
        raise ArgumentError("--layers is only used with --align ot")
    if args.align == "contrastive" and args.micro_batch < 2:
        raise ArgumentError("--align contrastive needs --micro-batch >= 2 (the negatives are the micro-batch's "
                            "other utterances)")
    if args.stage == "joint" and not args.init and not args.resume:
        raise ArgumentError("--stage joint starts from the stage-1 checkpoint: pass --init DIR (or SALMONN's .pth)")
    args.qformer = parse_qformer(args.qformer) if args.qformer else {}
    if args.qformer and args.init:
        raise ArgumentError(f"--qformer: the bridge of --init {args.init} has its own shape; drop --qformer")
    args.lora = parse_lora(args.lora) if args.lora else {}
    if args.lora and args.init:
        raise ArgumentError(f"--lora: the LoRA of --init {args.init} has its own settings; drop --lora")
    if args.patience and not args.valid:
        raise ArgumentError(f"--patience {args.patience} needs --valid (early stopping on validation accuracy); "
                            f"--patience 0 trains all --steps")
    # the run directory
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out}: exists and is not a directory")
    args.resume_from = None
    if out.is_dir() and checkpoints(out):
        if not args.resume:
            raise ArgumentError(f"--out {out} already holds a run (newest: {checkpoints(out)[-1].name}); "
                                f"add --resume to continue it, or choose another --out")
        args.resume_from = checkpoints(out)[-1]
    # the weights: flags, then what the --init / resumed checkpoint recorded, then the hub defaults
    args.init = args.init or None
    init = Path(args.init) if args.init else None
    if init is not None and not init.exists():
        raise ArgumentError(f"--init {init}: no such file or directory")
    recorded = {}
    for ckpt in (args.resume_from, init):
        if ckpt is not None and ckpt.is_dir():
            try:
                recorded = {k: v for k, v in SpeechLLM.checkpoint_info(ckpt).get("sources", {}).items() if v} | recorded
            except ValueError as e:
                raise ArgumentError(f"{ckpt}: {e}") from None
    paths = {}
    if args.backbone in BACKBONES:
        preset = LLMConfig.from_name(args.backbone)
        paths["llm"] = resolve_weights(args.llm or recorded.get("llm") or BACKBONES[args.backbone], "--llm")
    else:
        preset = None
        paths["llm"] = resolve_weights(args.llm or args.backbone, "--backbone")
    try:
        llm_cfg = LLMConfig.from_dir(paths["llm"])
        load_tokenizer(paths["llm"])
    except (OSError, ValueError) as e:
        raise ArgumentError(f"LLM {paths['llm']}: {e}") from None
    if preset is not None:
        diff = [f"{k} {getattr(llm_cfg, k)} (preset {getattr(preset, k)})"
                for k in ("family", "hidden_size", "num_hidden_layers", "vocab_size")
                if getattr(llm_cfg, k) != getattr(preset, k)]
        if diff:
            raise ArgumentError(f"--backbone {args.backbone}: {paths['llm']} is another model: {', '.join(diff)}")
    paths["whisper"] = resolve_weights(args.whisper or recorded.get("whisper") or WHISPER_HUB, "--whisper")
    config = (paths["whisper"] if paths["whisper"].is_dir() else paths["whisper"].parent) / "config.json"
    try:
        whisper_cfg = WhisperEncoderConfig.from_hf_config(read_json(config), str(config))
    except (OSError, ValueError) as e:
        raise ArgumentError(f"--whisper {paths['whisper']}: {e}") from None
    beats = args.beats or recorded.get("beats")
    if beats is None:
        raise ArgumentError(f"--beats is required: the BEATs checkpoint from {BEATS_URL}, or 'none' for a "
                            f"Whisper-only model")
    paths["beats"] = None if beats == "none" else resolve_weights(beats, "--beats")
    args.paths = {k: str(v) if v is not None else None for k, v in paths.items()}
    try:      # the checkpoint we start from must have been trained on this LLM
        SpeechLLM.resolve(args.resume_from or args.init, args.paths["llm"], args.paths["whisper"],
                          args.paths["beats"] or "none")
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    args.layers = (parse_layer_spec(args.layers, llm_cfg.num_hidden_layers) if args.align == "ot"
                   else [0] if args.align in ("ctc", "contrastive") else [])
    # the data: every line parsed, every audio file looked for
    manifests, weights = parse_train_specs(args.train)
    if args.valid and not Path(args.valid).is_file():
        raise ArgumentError(f"--valid {args.valid}: manifest not found")
    features = dict(n_mels=whisper_cfg.num_mel_bins, n_frames=whisper_cfg.n_frames)
    try:
        args.train_data = data.SpeechDataset(manifests, weights, seed=args.seed, **features)
        args.valid_data = data.SpeechDataset(args.valid, **features) if args.valid else None
    except (OSError, ValueError) as e:
        raise ArgumentError(str(e)) from None
    if args.align != "none":
        check_transcripts(args.train_data, manifests, args.align)
    args.train_sizes = args.train_data.sizes     # a resumed run's data stream needs the same manifests' sizes
    return args


def check_transcripts(dataset, manifests: list[Path], align: str) -> None:
    """The text pass (and CTC's target) needs every training utterance's transcript."""
    offsets = [0]
    for n in dataset.sizes:
        offsets.append(offsets[-1] + n)
    for m, path in enumerate(manifests):
        for i in range(offsets[m], offsets[m + 1]):
            e = dataset.entry(i)
            if not e.get("transcript"):
                raise ArgumentError(f"{path}: entry {e['id']!r} (task {e['task']}) has no 'transcript'; "
                                    f"--align {align} needs the transcript of every training utterance")


RESUME_KEYS = ("stage", "backbone", "paths", "train", "train_sizes", "qformer", "lora", "layers", "align", "alpha", "global_batch",
               "steps", "warmup", "lr", "warmup_lr", "min_lr", "weight_decay", "clip", "eval_every", "patience",
               "seed", "valid", "dtype", "cache_encoders")
RESUME_ABSENT = {"cache_encoders": False}      # settings added later: their value in an older run's args.json


def check_resume(args, saved: dict) -> None:
    """A resumed run must be the same run: the settings that define it must not have changed."""
    now = run_settings(args)
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_KEYS
               if saved.get(k, RESUME_ABSENT.get(k)) != now[k]]
    if changed:
        raise ArgumentError(f"--resume: {args.out} was started with other settings: {'; '.join(changed)}")


def run_settings(args) -> dict:
    """The JSON-able settings of the run (args.json)."""
    skip = {"train_data", "valid_data", "resume_from"}
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


# ----------------------------------------------------------------------------------------------------
# 8. What the run shows: parameters, expected memory, metrics, curves, summary
# ----------------------------------------------------------------------------------------------------

def parameter_report(model, ctc_head: nn.Linear | None) -> str:
    """Frozen and trainable parameters per part of the model."""
    parts: dict[str, list[int]] = {}
    for n, p in model.named_parameters():
        part = ("LoRA" if ".lora_" in n else "projection" if "speech_llama_proj" in n
                else {"speech_encoder": "Whisper encoder", "beats": "BEATs", "bridge": "Q-Former",
                      "llm": "LLM"}.get(n.split(".")[0], n.split(".")[0]))
        parts.setdefault(part, [0, 0])[p.requires_grad] += p.numel()
    if ctc_head is not None:
        parts["CTC head"] = [0, sum(p.numel() for p in ctc_head.parameters())]
    rows = [f"  {'part':<16}{'frozen':>12}{'trainable':>12}"]
    rows += [f"  {k:<16}{f / 1e6:>11.2f}M{t / 1e6:>11.2f}M" for k, (f, t) in parts.items()]
    frozen, trainable = (sum(v[i] for v in parts.values()) for i in (0, 1))
    rows.append(f"  {'total':<16}{frozen / 1e6:>11.2f}M{trainable / 1e6:>11.2f}M")
    return "parameters:\n" + "\n".join(rows)


def activation_bytes_per_token(cfg, lora_targets: int, act_bytes: int) -> int:
    """Bytes one LLM block keeps for backward per token when its weights are frozen and LoRA is trained.

    A frozen linear keeps nothing (its input gradient needs only its weight); what stays is: each RMSNorm's
    fp32 input (4h), each LoRA branch's input and dropout mask (a·h + h), attention's q, k, v and output
    for SDPA's backward (a·(2·h_q + 2·h_kv)), SwiGLU's gate, up and silu outputs (3·a·ffn); a = bytes of the
    compute dtype. Measured with saved_tensors_hooks on CPU fp32 LLMs: 8-11% above this count (the LoRA
    rank-r tensors, RoPE tables, the normalisers)."""
    h, h_q, h_kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    a = act_bytes
    return 2 * 4 * h + lora_targets * (a * h + h) + a * (2 * h_q + 2 * h_kv) + 3 * a * cfg.intermediate_size


def expected_memory(model, micro_batch: int, seq_len: int, target_len: int, act_bytes: int,
                    ctc_head: nn.Linear | None = None, cached_clips: int = 0) -> dict[str, float]:
    """GiB expected on one device: frozen weights, trainable weights with gradients and AdamW moments
    (16 B per parameter), the speech pass's saved activations, the CE's fp32 logits (and CTC's), and with
    --cache-encoders at most `cached_clips` clips' encoder outputs (BEATs' 50 tokens/s counted as Whisper's
    frames: at most as many for a clip inside Whisper's window)."""
    cfg = model.config.llm
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_speech = model.bridge.num_speech_tokens(model.config.whisper.max_source_positions)
    mem = {"frozen weights": frozen,
           "trainable + grads + AdamW": 16 * trainable,
           "LLM activations": micro_batch * seq_len * cfg.num_hidden_layers
           * activation_bytes_per_token(cfg, len(model.config.lora_targets), act_bytes),
           "CE logits": micro_batch * target_len * cfg.vocab_size * 4 * 2}   # logits + log-softmax, fp32
    if ctc_head is not None:
        mem["trainable + grads + AdamW"] += 16 * ctc_head.weight.numel()
        mem["CTC logits"] = micro_batch * n_speech * ctc_head.out_features * 4 * 3
    if cached_clips:
        bridge = model.bridge.cfg
        mem["encoder cache"] = (cached_clips * model.config.whisper.max_source_positions
                                * (bridge.speech_dim + bridge.audio_dim) * act_bytes)
    mem = {k: v / 2**30 for k, v in mem.items()}
    mem["total"] = sum(mem.values())
    return mem


def sequence_lengths(model, dataset, n: int = 256) -> tuple[int, int]:
    """(LLM positions, target tokens) of the longest of the first n training utterances' speech passes."""
    n_speech = model.bridge.num_speech_tokens(model.config.whisper.max_source_positions)
    seq = tgt = 0
    for i in range(min(n, len(dataset))):
        e = dataset.entry(i)
        instr = max(dataset.instructions[data.task_key(e)], key=len)
        p = model.prompter.build([instr], [n_speech], [data.target_text(e)])
        seq, tgt = max(seq, p.input_ids.shape[1]), max(tgt, int((p.labels != -100).sum()))
    return seq, tgt


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, when tensorboard is installed, TensorBoard scalars.
    On resume, lines after the checkpoint's step (written by the interrupted run) are dropped."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        kept = []
        if start_step and self.path.is_file():
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
        self.path.write_text("".join(l + "\n" for l in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_losses(metrics: list[dict], path: Path) -> Path:
    """loss_curves.png: the training loss, CE and alignment terms per step; validation loss and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in metrics if "loss" in r]
    valid_rows = [r for r in metrics if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    skip = {"step", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_mem_gib"}
    for key in [k for k in (train_rows[0] if train_rows else {}) if k not in skip]:
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], lw=1, label=key)
    if valid_rows:
        ax.plot([r["step"] for r in valid_rows], [r["valid_loss"] for r in valid_rows], "o-", label="valid CE")
        acc = ax.twinx()
        acc.plot([r["step"] for r in valid_rows], [r["valid_acc"] for r in valid_rows], "s--", color="black",
                 label="valid accuracy")
        acc.set_ylabel("validation token accuracy")
        acc.legend(loc="upper center", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # the process's peak RSS (KiB on Linux)


# ----------------------------------------------------------------------------------------------------
# 9. main: check -> load -> train -> summarise
# ----------------------------------------------------------------------------------------------------

def load_model(paths: dict, ckpt, dtype: torch.dtype, device: torch.device, qformer: dict | None = None,
               lora: dict | None = None):
    """The speech LLM from the base weights (+ the trainable weights of `ckpt`): frozen parts in `dtype`."""
    return SpeechLLM.from_pretrained(paths["llm"], paths["whisper"], paths["beats"], ckpt=ckpt, dtype=dtype,
                                     device=device, qformer=qformer or None, verbose=False, **(lora or {}))


def compile_blocks(model) -> None:
    """torch.compile each repeated block in place (LLM blocks, encoder layers): one graph per kind of block,
    reused by every layer; the parameter names do not change (no `_orig_mod.` in checkpoints)."""
    blocks = list(model.llm.model.layers) + list(model.speech_encoder.layers)
    if model.beats is not None:
        blocks += list(model.beats.encoder.layers)
    for block in blocks:
        block.compile()


def micro_batches(args, ctx: Context, start_step: int):
    """Yield, per optimizer step from start_step, this process's [(k, Batch)] (k = global micro-batch index)."""
    sampler = data.StreamSampler(args.train_data, args.global_batch, args.micro_batch, ctx.rank, ctx.world,
                                 start_step=start_step, num_steps=args.steps)
    loader = torch.utils.data.DataLoader(args.train_data, batch_sampler=sampler, collate_fn=args.train_data.collate,
                                         num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    batches = iter(loader)
    for _ in range(start_step, args.steps):
        yield [(ctx.rank * args.accumulation + m, next(batches)) for m in range(args.accumulation)]


def valid_batches(args, ctx: Context):
    sampler = data.ShardSampler(len(args.valid_data), args.micro_batch, ctx.rank, ctx.world)
    return torch.utils.data.DataLoader(args.valid_data, batch_sampler=sampler, collate_fn=args.valid_data.collate,
                                       num_workers=args.workers)


def main(argv=None) -> dict:
    argv = [part for a in (sys.argv[1:] if argv is None else argv)
            for part in (a.split("=", 1) if a.startswith("--backbone=") else [a])]
    if any(a == "--backbone" and b == "toy" for a, b in zip(argv, argv[1:])):
        import toy                                   # the whole method on the toy world (README, first command)
        return toy.train_main(argv)
    args = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        check_args(args, world)
        if args.resume_from is not None:
            check_resume(args, json.loads((Path(args.out) / "args.json").read_text()))
    except ArgumentError as e:
        sys.exit(f"train.py: {e}")
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, Context(device, dtype, rank, world))
    except NonFiniteLoss as e:
        sys.exit(f"train.py: {e}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def build(args, ctx: Context):
    """The speech LLM (+ CTC head) on the device, and the trainable parameters with their names."""
    torch.manual_seed(args.seed)            # a fresh bridge / LoRA / CTC head starts the same on every process
    model = load_model(args.paths, args.resume_from or args.init, ctx.dtype, ctx.device, args.qformer,
                       args.lora).train()
    ctc_head = None
    if args.align == "ctc":   # an independent layer: speech tokens -> the LLM's vocabulary + blank (Table 4)
        ctc_head = nn.Linear(model.config.llm.hidden_size, model.config.llm.vocab_size + 1, device=ctx.device)
        if args.resume_from:
            from safetensors.torch import load_file
            ctc_head.load_state_dict(load_file(str(args.resume_from / CTC_FILE), device=str(ctx.device)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [("ctc_head." + n, p) for n, p in (ctc_head.named_parameters() if ctc_head is not None else [])]
    if ctx.world > 1:                       # start identical whatever each device's random generator did
        for _, p in named:
            dist.broadcast(p.data, 0)
    if args.compile if args.compile is not None else ctx.device.type == "cuda":
        compile_blocks(model)
    return model, ctc_head, named


def print_start(args, ctx: Context, model, ctc_head, start: int) -> None:
    seq, tgt = sequence_lengths(model, args.train_data)
    mem = expected_memory(model, args.micro_batch, seq, tgt, 2 if ctx.dtype == torch.bfloat16 else 4, ctc_head,
                          len(args.train_data) if args.cache_encoders else 0)
    print(parameter_report(model, ctc_head))
    print(f"expected memory per device at micro-batch {args.micro_batch} (<= {seq} positions, {tgt} target "
          f"tokens): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()))
    print(f"stage {args.stage}, align {args.align}"
          + (f" at layers {args.layers}, alpha {args.alpha}" if args.layers else "")
          + f"; {len(args.train_data)} utterances, {args.train_data.sizes} per manifest; global batch "
          f"{args.global_batch} = {args.micro_batch} x {args.accumulation} accumulation x {ctx.world} process(es); "
          f"steps {start}..{args.steps}; {ctx.device}, {str(ctx.dtype).removeprefix('torch.')}"
          + ("; frozen-encoder outputs cached per clip" if args.cache_encoders else "")
          + (f"; resuming from {args.resume_from}" if args.resume_from
             else "; --resume: no checkpoint yet, starting at step 0" if args.resume else ""), flush=True)


def summarise(out: Path, summary: dict) -> dict:
    """summary.json and loss_curves.png from metrics.jsonl, and the summary printed."""
    metrics = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in metrics if "loss" in r]
    if train_rows:
        summary["final_loss"] = train_rows[-1]["loss"]
        summary["mean_samples_per_s"] = sum(r["samples_per_s"] for r in train_rows) / len(train_rows)
        summary["curves"] = str(plot_losses(metrics, out / "loss_curves.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    return summary


def train(args, ctx: Context) -> dict:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, ctc_head, named = build(args, ctx)
    params = [p for _, p in named]
    opt = make_optimizer(named, args.weight_decay)
    start, best_acc, best_step, bad = 0, -1.0, 0, 0
    if args.resume_from:
        state = load_checkpoint_state(args.resume_from)
        opt.load_state_dict(state["optimizer"])
        start, best_acc, best_step, bad = state["step"], state["best_acc"], state["best_step"], state["bad_validations"]
    if ctx.is_main:
        for tmp in out.glob(".tmp_*"):      # a checkpoint an interrupted run did not finish writing
            shutil.rmtree(tmp)
        if not args.resume_from:
            (out / "args.json").write_text(json.dumps(run_settings(args), indent=2) + "\n")
        print_start(args, ctx, model, ctc_head, start)

    log = MetricsLog(out, start, ctx.is_main)
    bar = tqdm(total=args.steps, initial=start, disable=not ctx.is_main or args.no_progress, unit="step")
    n_speech = model.bridge.num_speech_tokens(model.config.whisper.max_source_positions)
    cache = EncoderCache() if args.cache_encoders else None
    t_start, stopped, done = time.perf_counter(), None, start
    for step, batches in enumerate(micro_batches(args, ctx, start), start):
        t0 = time.perf_counter()
        stats = train_step(model, opt, params, batches, step, args, ctx, ctc_head, cache)
        done, dt = step + 1, time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", sps=f"{args.global_batch / dt:.1f}")
        if done % args.log_every == 0 or done == args.steps:
            tokens = sum(int(model.prompter.build(b.instructions, [n_speech] * len(b), b.targets).attention_mask.sum())
                         for _, b in batches) * ctx.world      # this process's LLM positions x processes
            log.log({"step": done, **stats, "samples_per_s": args.global_batch / dt, "tokens_per_s": tokens / dt,
                     "peak_mem_gib": peak_memory_gib(ctx.device)})
        validating = args.valid_data is not None and (done % args.eval_every == 0 or done == args.steps)
        if validating:
            v = validate(model, valid_batches(args, ctx), ctx)
            if v["valid_acc"] > best_acc:
                best_acc, best_step, bad = v["valid_acc"], done, 0
            else:
                bad += 1
            log.log({"step": done, **v, "best_acc": best_acc, "bad_validations": bad})
            if ctx.is_main:                      # tqdm.write prints even where the bar is disabled
                bar.write(f"step {done}: valid loss {v['valid_loss']:.4f}, accuracy {v['valid_acc']:.4f} "
                          f"(best {best_acc:.4f} at step {best_step})")
            if args.patience and bad >= args.patience:
                stopped = f"no better validation accuracy for {bad} validations"
        if ctx.is_main and (done % args.save_every == 0 or validating or done == args.steps or stopped):
            meta = {"stage": args.stage, "step": done, "align": args.align, "layers": args.layers,
                    "alpha": args.alpha, "best_acc": best_acc, "best_step": best_step}
            state = {"step": done, "optimizer": opt.state_dict(), "best_acc": best_acc, "best_step": best_step,
                     "bad_validations": bad}
            save_checkpoint(out, done, model, state, meta, ctc_head, args.keep)   # at validations: the best is kept
        if stopped:
            break
    bar.close()
    log.close()
    summary = {"steps": done, "stopped_early": stopped, "best_step": best_step,
               "best_valid_acc": best_acc if best_step else None, "wall_s": time.perf_counter() - t_start,
               "last_checkpoint": str(checkpoints(out)[-1]) if checkpoints(out) else None}
    return summarise(out, summary) if ctx.is_main else summary


if __name__ == "__main__":
    main()
