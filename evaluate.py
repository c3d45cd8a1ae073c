"""Evaluation of a speech LLM as the paper reports it: BLEU on CoVoST 2 (Table 2), zero-shot text
translation (Table 5), the alignment degree against BLEU (Figure 6), t-SNE of the two modalities
(Figure 5), and translating one file.

    # decode a test manifest (beam 4, <= 200 new tokens, length penalty 1: SALMONN's decoding)
    python evaluate.py --ckpt runs/joint/best --data covost2_en_zh_test.jsonl --task st_en_zh --out runs/eval/zh
    #   ... --align-layers 0,1     also the alignment degree at those layers (Figure 6)
    #   ... --text-input           zero-shot MT: the transcript where the speech was (Table 5)
    python evaluate.py --ckpt runs/joint/best --audio clip.mp3 --task st_en_zh            # prints the translation
    python evaluate.py --ckpt runs/base --compare runs/joint/best --data test.jsonl --figure5 --out runs/fig5
    python evaluate.py --figure6 runs/eval/*/metrics.json --out runs/fig6                 # no model

The command has four modes, picked by --data, --data --figure5, --audio and --figure6; every input is
checked before any model loads (the manifest's lines, the audio files, the task and its references, the
BLEU tokenizer, the output folder, the checkpoint's backbone against --llm, a resumed run's settings).

Outputs of a decoding run (--out):
  hyps.jsonl    one row per utterance, in manifest order: id, hypothesis, reference, source (the
                transcript), n_tokens (generated, without the stop token), and with --align-layers the
                distance W at each layer. Appended batch by batch (flushed and fsync-ed): a rerun with
                the same --out resumes after the last complete batch; a half-written last line (a kill
                mid-write) is cut off first. Batches are always the manifest's [k*B, (k+1)*B), and an
                interrupted batch is decoded again whole, so a resumed run writes the same file as an
                uninterrupted one with the same --batch-size.
  run.json      the settings that decide the hypotheses; a rerun with other settings is refused.
  hyps.txt, refs.txt   one line each (translation tasks), for `sacrebleu refs.txt -i hyps.txt ...`.
  metrics.json  the scores with their signatures, the counts of empty hypotheses and of hypotheses
                that hit --max-new-tokens, the throughput, every setting.

Decisions this file makes (the paper says "SacreBLEU" and no more):
- BLEU and chrF: sacrebleu's corpus scores, the signature written beside each (Post 2018). The
  tokenizer follows the target language: `zh` for Chinese (each CJK character a token), `ja-mecab` for
  Japanese (MeCab + ipadic, `sacrebleu[ja]`), `13a` (sacrebleu's default) for the space-delimited
  languages in SPACE_DELIMITED; any other language is an error unless --bleu-tokenize names one
  (BLEU over whole untokenized Thai or Korean sentences would be silently meaningless). These are the
  tokenizers Qwen2-Audio's CoVoST 2 script uses, so our numbers compare with the paper's baselines.
  Each hypothesis and reference is made one line (whitespace runs -> one space) before scoring: no
  tokenizer above nor chrF (which drops whitespace) sees the difference, and hyps.txt / refs.txt then
  give sacrebleu's command line exactly the same segments.
- WER (ASR): jiwer's word alignment after Whisper's English text normaliser (`--wer-norm whisper-en`,
  the default for English): lower case, punctuation and fillers ("uh", "um") removed, British
  spellings and contractions standardised, numbers written as digits ("twenty one" -> "21"),
  "mr" -> "mister". LibriSpeech's references are upper case without punctuation and spell numbers out,
  while an LLM writes "Mr." and "1999"; jiwer's transforms (lower case, punctuation, spaces) do not
  reconcile those, so they would count formatting as errors. The normaliser comes from the
  `whisper-normalizer` package: openai-whisper's normaliser alone (whisper itself would pull torch
  builds, tiktoken and numba), the very package Qwen2-Audio's evaluate_asr.py imports for English WER,
  pure Python on `regex` and `more-itertools`, imported only when WER is computed. `--wer-norm basic`
  is jiwer's transforms alone (lower case, punctuation removed, spaces collapsed), for other languages.
- Audio captioning (aac) is scored by BLEU (13a) and chrF against the one caption of each entry: a
  rough indicator, not the field's SPIDEr/CIDEr (those need the COCO caption toolkit and Java).
- Alignment degree (Figure 6, Sec. 6.5): W_il = sinkhorn.ot_loss(speech states, transcript states) of
  utterance i at layer l (Eq. 1, the very distance the joint stage minimises, same solver settings), the
  speech pass and the text pass run with the task's instruction as in training. The degree is
            A = 1/(N |I|) Σ_l Σ_i ln W_il
  the mean of the natural log over the utterances and the layers (= the log of the geometric mean of
  W): the paper plots "logarithmic Wasserstein distance" and W spans orders of magnitude across
  utterances and layers, so a mean of logs is not dominated by a few long utterances or by the deepest
  layer, as log(mean W) would be. metrics.json also gives, per layer, mean ln W and the plain mean W
  (the OT term of Eq. 6 averaged over the test set) and the pairs whose Sinkhorn did not converge.
- Zero-shot MT (Table 5): the transcript's tokens, tokenized exactly as the joint stage's text pass
  tokenizes them, take the place of the speech in the same prompt and instruction; decoding and scoring
  as for speech.
- Figure 5 (Sec. 6.4): speech = the bridge's output (after the projection, before the LLM), text = the
  LLM's input embeddings of the transcript, each averaged over its length; t-SNE of both together
  (scikit-learn) and a Gaussian kernel density per modality (scikit-learn, Scott's bandwidth).
  figure5.json adds a number the picture cannot give: the modality gap, ‖mean speech − mean text‖ over
  the RMS spread of the two clouds, in the LLM's space (t-SNE distances mean nothing).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

import data
import sinkhorn

HYPS, METRICS, RUN = "hyps.jsonl", "metrics.json", "run.json"

BLEU_TOKENIZE = {"zh": "zh", "ja": "ja-mecab"}  # languages written without spaces between words
# space-delimited languages, sacrebleu's default 13a: CoVoST 2's 21 X->En and 15 En->X languages but
# Chinese and Japanese, and a few more
SPACE_DELIMITED = ("ar", "ca", "cy", "de", "en", "es", "et", "fa", "fr", "id", "it", "lv", "mn", "nl", "pt",
                   "ru", "sl", "sv", "ta", "tr")
WER_NORMALIZERS = ("whisper-en", "basic")


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------

def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's tokenizer for a target language (see the module docstring)."""
    if lang in BLEU_TOKENIZE:
        return BLEU_TOKENIZE[lang]
    if lang in SPACE_DELIMITED:
        return "13a"
    raise ValueError(f"no BLEU tokenizer is known for target language {lang!r} (zh -> zh, ja -> ja-mecab, "
                     f"13a for {', '.join(SPACE_DELIMITED)}): name one with --bleu-tokenize, e.g. char or flores200")


def one_line(text: str) -> str:
    return " ".join(text.split())


def translation_scores(hyps: Sequence[str], refs: Sequence[str], tokenize: str) -> dict:
    """Corpus BLEU and chrF (sacrebleu) with their signatures; hypotheses and references made one line."""
    from sacrebleu.metrics import BLEU, CHRF

    hyps, refs = [one_line(h) for h in hyps], [one_line(r) for r in refs]
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return dict(bleu=b.score, bleu_signature=str(bleu.get_signature()), bleu_precisions=b.precisions, bleu_bp=b.bp,
                hyp_len=b.sys_len, ref_len=b.ref_len, chrf=c.score, chrf_signature=str(chrf.get_signature()))


def wer_normalizer(name: str):
    """text -> normalised text, for WER (see the module docstring)."""
    if name == "whisper-en":
        from whisper_normalizer.english import EnglishTextNormalizer
        return EnglishTextNormalizer()
    if name == "basic":
        import jiwer
        return jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                              jiwer.Strip()])
    raise ValueError(f"unknown WER normaliser {name!r}; known: {', '.join(WER_NORMALIZERS)}")


def wer_scores(hyps: Sequence[str], refs: Sequence[str], normalizer: str = "whisper-en") -> dict:
    """Corpus WER (jiwer) after normalisation: (S + D + I) / reference words, with the counts."""
    import jiwer

    norm = wer_normalizer(normalizer)
    out = jiwer.process_words([norm(r) for r in refs], [norm(h) for h in hyps])
    n_ref = out.hits + out.substitutions + out.deletions
    return dict(wer=out.wer, substitutions=out.substitutions, deletions=out.deletions, insertions=out.insertions,
                ref_words=n_ref, wer_normalizer=normalizer)


def alignment_degree(rows: Sequence[dict], layers: Sequence[int]) -> dict:
    """Figure 6's alignment degree from the rows' distances: A = mean over utterances and layers of ln W."""
    per_layer, logs = {}, []
    for l in layers:
        w = [r["w"][str(l)] for r in rows]
        bad = sum(x <= 0 for x in w)   # ln 0 = -inf: a zero distance would be a copied input, say so
        lw = [math.log(x) for x in w if x > 0]
        per_layer[str(l)] = dict(mean_log_w=sum(lw) / len(lw) if lw else None, mean_w=sum(w) / len(w),
                                 nonpositive=bad, unconverged=sum(not r["w_converged"][str(l)] for r in rows))
        logs += lw
    return dict(layers=list(layers), mean_log_w=sum(logs) / len(logs) if logs else None, per_layer=per_layer,
                definition="mean over utterances and layers of ln W (natural log; W = sinkhorn.ot_loss)")


# ----------------------------------------------------------------------------------------------------
# tasks and manifests
# ----------------------------------------------------------------------------------------------------

def parse_task(key: str) -> tuple[str, str | None, str]:
    """An instruction key -> (task, source language, target language): 'st_en_zh' -> ('st', 'en', 'zh').
    ASR's and captioning's text is English here (LibriSpeech, GigaSpeech, AudioCaps, Clotho, WavCaps)."""
    if key in ("asr", "aac"):
        return key, ("en" if key == "asr" else None), "en"
    m = re.fullmatch(r"st_([a-z]{2,3})_([a-z]{2,3})", key)
    if m is None:
        raise ValueError(f"unknown task {key!r}: expected asr, aac or st_<src>_<tgt> (e.g. st_en_zh)")
    return "st", m.group(1), m.group(2)


def check_entries(entries: Sequence[dict], manifest, task_key: str | None, need_transcript: bool = False) -> None:
    """Entries of data.read_manifest (ids unique, each task's fields present) fit the run: their task is
    `task_key` (if given) and they have a transcript where one is needed. Errors name the manifest and entry."""
    for n, e in enumerate(entries, 1):
        where = f"{manifest}: entry {n} (id {e['id']!r})"
        if task_key is not None and data.task_key(e) != task_key:
            raise ValueError(f"{where}: task {data.task_key(e)!r}, but --task is {task_key!r}")
        if need_transcript and "transcript" not in e:
            raise ValueError(f"{where}: no 'transcript' (the text pass and --text-input need one)")


# ----------------------------------------------------------------------------------------------------
# decoding, zero-shot MT, the alignment distances
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, instructions: Sequence[str], *, speech: torch.Tensor | None = None,
             transcripts: Sequence[str] | None = None, num_beams: int = 4, max_new_tokens: int = 200,
             length_penalty: float = 1.0) -> tuple[list[str], list[int]]:
    """Decode one batch from speech embeddings (B, n, H) or, zero-shot (Table 5), from transcripts: their
    tokens in the speech slot of the same prompt (SpeechLLM.generate).

    Returns the texts (special tokens dropped, stripped) and the number of generated tokens of each
    (without the stop token: n_tokens == max_new_tokens means the row hit the length limit).
    """
    texts, rows = model.generate(speech, instructions, transcripts=transcripts, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens, length_penalty=length_penalty, return_ids=True)
    return texts, [len(r) for r in rows]


@torch.no_grad()
def ot_distances(model, speech: torch.Tensor, transcripts: Sequence[str], instructions: Sequence[str],
                 layers: Sequence[int]) -> tuple[dict, dict]:
    """W_il of Eq. (1) between the speech states and the transcript states of each utterance at each layer:
    ({layer: [B floats]}, {layer: [B converged flags]}), by the joint stage's sinkhorn.ot_loss."""
    sp = model.speech_pass(speech, instructions, layers=layers)
    tx = model.text_pass(transcripts, instructions, layers)
    w, ok = {}, {}
    for l in layers:
        loss, res = sinkhorn.ot_loss(sp.hidden_states[l], tx.hidden_states[l], sp.mask, tx.mask, return_result=True)
        w[l], ok[l] = loss.double().tolist(), res.converged.tolist()
    return w, ok


def encode(model, batch, device) -> torch.Tensor:
    """A data.Batch -> the bridge's output (B, 88, H) on `device` (Batch.to computes the features there)."""
    batch = batch.to(device)
    return model.encode_speech(batch.mel, batch.fbank, batch.padding_mask)


def decode_batch(model, entries: Sequence[dict], instruction: str, batch=None, *, align_layers: Sequence[int] = (),
                 device="cpu", **decoding) -> list[dict]:
    """One batch of manifest entries -> the rows of hyps.jsonl. batch: their data.Batch (audio), or None to
    translate their transcripts (zero-shot MT)."""
    instructions = [instruction] * len(entries)
    transcripts = [e.get("transcript") for e in entries]
    speech = encode(model, batch, device) if batch is not None else None
    texts, n_tokens = generate(model, instructions, speech=speech, transcripts=transcripts if batch is None else None,
                               **decoding)
    rows = [dict(id=e["id"], hypothesis=h, reference=data.target_text(e), source=e.get("transcript"), n_tokens=n)
            for e, h, n in zip(entries, texts, n_tokens)]
    if align_layers:
        w, ok = ot_distances(model, speech, transcripts, instructions, align_layers)
        for i, row in enumerate(rows):
            row["w"] = {str(l): w[l][i] for l in align_layers}
            row["w_converged"] = {str(l): ok[l][i] for l in align_layers}
    return rows


# ----------------------------------------------------------------------------------------------------
# a decoding run: hyps.jsonl appended as it goes, resumed after an interruption
# ----------------------------------------------------------------------------------------------------

def read_hyps(path: Path) -> tuple[list[dict], int]:
    """The complete rows of a (possibly interrupted) hyps.jsonl and the byte length they take: a
    half-written last line, left by a kill mid-write, lies beyond it."""
    if not path.is_file():
        return [], 0
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    rows = []
    for n, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); delete it or pass --overwrite") from None
    return rows, end


def check_resume(out: Path, settings: dict, entries: Sequence[dict]) -> list[dict]:
    """The rows already decoded in `out`, after checking they come from a run with the same settings and
    the same references. A fresh folder gives []."""
    rows, _ = read_hyps(out / HYPS)
    run_file = out / RUN
    if rows and not run_file.is_file():
        raise ValueError(f"{out / HYPS} exists without {RUN}: not a run of this script; "
                         f"use another --out or --overwrite")
    if rows:   # (a run.json alone, from a run that stopped before its first batch, binds nothing)
        old = json.loads(run_file.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            said = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a run with other settings ({said}); use another --out or --overwrite")
    by_id = {e["id"]: e for e in entries}
    for n, r in enumerate(rows, 1):
        e = by_id.get(r.get("id"))
        if e is None:
            raise ValueError(f"{out / HYPS}:{n}: id {r.get('id')!r} is not among the manifest's entries (or beyond "
                             f"--limit); use another --out or --overwrite")
        if r["reference"] != data.target_text(e):
            raise ValueError(f"{out / HYPS}:{n}: the reference of {r['id']!r} differs from the manifest's; the "
                             f"manifest changed since: use another --out or --overwrite")
    return rows


def run_decoding(model, entries: Sequence[dict], out: Path, instruction: str, dataset=None, *,
                 batch_size: int = 8, workers: int = 0, align_layers: Sequence[int] = (), device="cpu",
                 progress: bool = True, **decoding) -> tuple[list[dict], dict]:
    """Decode every entry not yet in out/hyps.jsonl, appending a batch at a time; returns all rows in
    manifest order and this call's throughput. dataset: a data.SpeechDataset whose first len(entries)
    items are the entries (audio is read by `workers` DataLoader processes), or None for zero-shot MT."""
    from tqdm import tqdm

    path = out / HYPS
    old, end = read_hyps(path)
    if path.is_file() and path.stat().st_size > end:
        with open(path, "r+b") as f:   # a kill mid-write left half a line: cut it
            f.truncate(end)
    done = {r["id"] for r in old}
    # always the batches [k*B, (k+1)*B); one with any entry missing is decoded whole again, so that a
    # resumed run decodes every batch as an unbroken run does
    todo = [list(range(i, min(i + batch_size, len(entries)))) for i in range(0, len(entries), batch_size)]
    todo = [b for b in todo if any(entries[i]["id"] not in done for i in b)]
    if dataset is None:
        batches = (None for _ in todo)
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_sampler=todo, collate_fn=dataset.collate,
                                              num_workers=workers)
    n_new, t0 = 0, time.perf_counter()
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(entries), initial=len(done), unit="utt",
                                                      disable=not progress) as bar:
        for idx, batch in zip(todo, batches):
            rows = decode_batch(model, [entries[i] for i in idx], instruction, batch, align_layers=align_layers,
                                device=device, **decoding)
            new = [r for r in rows if r["id"] not in done]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
            n_new += len(new)
            bar.update(len(new))
    seconds = time.perf_counter() - t0
    rows, _ = read_hyps(path)
    order = {e["id"]: i for i, e in enumerate(entries)}
    rows.sort(key=lambda r: order[r["id"]])
    return rows, dict(utterances=n_new, seconds=seconds, utt_per_s=n_new / seconds if seconds > 0 else None,
                      resumed_after=len(done))


def summarize(rows: Sequence[dict], task_key: str, *, max_new_tokens: int, bleu_tokenize: str | None = None,
              wer_norm: str = "whisper-en", align_layers: Sequence[int] = ()) -> dict:
    """metrics.json's scores for the rows of hyps.jsonl."""
    hyps, refs = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
    m = dict(num_utterances=len(rows), empty_hypotheses=sum(not h.strip() for h in hyps),
             hit_length_limit=sum(r["n_tokens"] >= max_new_tokens for r in rows))
    if parse_task(task_key)[0] == "asr":
        m.update(wer_scores(hyps, refs, wer_norm))
    else:
        m.update(translation_scores(hyps, refs, bleu_tokenize))
        m["sacrebleu_command"] = f"sacrebleu refs.txt -i hyps.txt -m bleu chrf -tok {bleu_tokenize}"
    if align_layers:
        m["alignment"] = alignment_degree(rows, align_layers)
    return m


# ----------------------------------------------------------------------------------------------------
# Figure 5: t-SNE and kernel densities of length-averaged speech and text representations
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def modality_means(model, dataset, indices: Sequence[int], batch_size: int = 8, workers: int = 0, device="cpu",
                   progress: bool = True):
    """Per dataset item, the bridge's output averaged over its 88 positions and the transcript's LLM input
    embeddings averaged over its tokens (Sec. 6.4): two float32 (N, H) tensors on the CPU."""
    from tqdm import tqdm

    emb = model.llm.model.embed_tokens
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate,
                                         num_workers=workers)
    speech, text = [], []
    for batch in tqdm(loader, desc="representations", unit="batch", disable=not progress):
        speech.append(encode(model, batch, device).float().mean(1).cpu())                          # (B, H)
        for t in batch.transcripts:
            ids = torch.tensor(model.prompter.text_ids(t, "transcript"), device=emb.weight.device)
            text.append(emb(ids).float().mean(0).cpu())                                              # (H,)
    return torch.cat(speech), torch.stack(text)


def modality_gap(speech: torch.Tensor, text: torch.Tensor) -> float:
    """‖mean(speech) − mean(text)‖ / RMS spread of the two clouds about their own means (scale-free)."""
    s, t = speech.double(), text.double()
    spread = ((s - s.mean(0)).pow(2).sum(1).mean() + (t - t.mean(0)).pow(2).sum(1).mean()) / 2
    return float((s.mean(0) - t.mean(0)).norm() / spread.sqrt())


def tsne_2d(speech: torch.Tensor, text: torch.Tensor, seed: int = 0):
    """Both clouds together to 2-D by t-SNE: (N, 2) speech, (M, 2) text numpy arrays."""
    import numpy as np
    from sklearn.manifold import TSNE

    x = np.concatenate([speech.numpy(), text.numpy()]).astype(np.float64)
    perplexity = min(30.0, (len(x) - 1) / 3)   # sklearn needs perplexity < n_samples; 30 is its default
    y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return y[:len(speech)], y[len(speech):]


def plot_figure5(panels: Sequence[dict], path) -> Path:
    """One panel per checkpoint: scatter and kernel-density contours of speech and text in t-SNE space."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.neighbors import KernelDensity

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        pts = np.concatenate([p["speech_2d"], p["text_2d"]])
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.15 * (hi - lo) + 1e-9
        gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 120),
                             np.linspace(lo[1] - pad[1], hi[1] + pad[1], 120))
        grid = np.stack([gx.ravel(), gy.ravel()], 1)
        for name, xy, cmap, color in (("speech", p["speech_2d"], "Blues", "tab:blue"),
                                      ("text", p["text_2d"], "Oranges", "tab:orange")):
            kde = KernelDensity(bandwidth="scott").fit(xy)
            dens = np.exp(kde.score_samples(grid)).reshape(gx.shape)
            ax.contourf(gx, gy, dens, levels=8, cmap=cmap, alpha=0.45)
            ax.scatter(xy[:, 0], xy[:, 1], s=4, color=color, alpha=0.7, label=name)
        ax.set_title(f"{p['label']}  (gap {p['modality_gap']:.2f})")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"t-SNE of length-averaged speech (after the projection) and text (embeddings), "
                 f"{len(panels[0]['speech_2d'])} pairs", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Figure 6: alignment degree against BLEU across runs
# ----------------------------------------------------------------------------------------------------

def read_figure6_points(paths: Sequence, labels: Sequence[str] | None = None) -> list[dict]:
    """(label, alignment degree, BLEU) from runs' metrics.json, checked comparable (same task, layers)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} metrics files")
    points = []
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg})") from None
        if not isinstance(m, dict) or m.get("bleu") is None:
            raise ValueError(f"{path}: no BLEU (not a translation run of evaluate.py)")
        a = m.get("alignment") or {}
        if a.get("mean_log_w") is None:
            raise ValueError(f"{path}: no alignment degree (run evaluate.py with --align-layers)")
        points.append(dict(label=labels[i] if labels else m.get("label") or path.parent.name, path=str(path),
                           task=m.get("task"), layers=a["layers"], log_w=a["mean_log_w"], bleu=m["bleu"]))
    for p in points[1:]:
        for key in ("task", "layers"):
            if p[key] != points[0][key]:
                raise ValueError(f"{p['path']}: {key} {p[key]!r}, but {points[0]['path']} has {points[0][key]!r}: "
                                 f"not comparable")
    return points


def plot_figure6(points: Sequence[dict], path) -> dict:
    """BLEU against the alignment degree, one labelled point per run; Pearson's r with 3 or more runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x, y = np.array([p["log_w"] for p in points]), np.array([p["bleu"] for p in points])
    r = float(np.corrcoef(x, y)[0, 1]) if len(points) >= 3 and x.std() > 0 and y.std() > 0 else None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, "o", color="tab:blue")
    for p in points:
        ax.annotate(p["label"], (p["log_w"], p["bleu"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    layers = ",".join(map(str, points[0]["layers"]))
    ax.set_xlabel(f"alignment degree: mean ln W at layers {layers} (lower = more aligned)")
    ax.set_ylabel(f"BLEU ({points[0]['task']})")
    ax.set_title("alignment against translation quality" + (f"  (Pearson r = {r:.3f})" if r is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return dict(points=list(points), pearson_r=r)


# ----------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------

def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'0,1' or '0-5,8' -> sorted layer ids within 0..num_layers (0 = the embeddings)."""
    out = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--align-layers {spec!r}: expected a list like '0,1' or '0-5'") from None
    bad = sorted(l for l in out if not 0 <= l <= num_layers)
    if bad:
        raise ValueError(f"--align-layers {spec!r}: layer(s) {bad} outside 0..{num_layers} (0 = the embeddings)")
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate an AI-STA speech LLM: BLEU/WER, zero-shot MT, alignment "
                                 "degree, Figures 5 and 6, one-file translation.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", help="JSONL test manifest to decode (or, with --figure5, to draw from)")
    mode.add_argument("--audio", help="translate/transcribe this one audio file and print the result")
    mode.add_argument("--figure6", nargs="+", metavar="METRICS_JSON",
                      help="plot BLEU against the alignment degree over these runs' metrics.json (no model)")
    ap.add_argument("--figure5", action="store_true", help="with --data: draw Figure 5 instead of decoding")
    ap.add_argument("--ckpt", help="checkpoint directory of this project (or SALMONN .pth with --llm/--whisper)")
    ap.add_argument("--llm", help="LLM directory (default: the one recorded in --ckpt)")
    ap.add_argument("--whisper", help="Whisper directory (default: recorded)")
    ap.add_argument("--beats", help="BEATs .pt (default: recorded; 'none' for a model without BEATs)")
    ap.add_argument("--task", help="asr, aac or st_<src>_<tgt> (e.g. st_en_zh): picks the instruction and metric")
    ap.add_argument("--instruction", help="override the task's instruction (default: its first in model.INSTRUCTIONS)")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--text-input", action="store_true", help="zero-shot MT: the transcript instead of the speech")
    ap.add_argument("--align-layers", help="also the alignment degree at these LLM layers, e.g. 0,1 (Figure 6)")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding (= --num-beams 1)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader processes reading and resampling the audio")
    ap.add_argument("--limit", type=int, help="only the first N entries of the manifest")
    ap.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    ap.add_argument("--bleu-tokenize", help="sacrebleu tokenizer (default: from the target language)")
    ap.add_argument("--wer-norm", choices=WER_NORMALIZERS, help="WER normaliser (default: whisper-en for English)")
    ap.add_argument("--label", help="the run's name in metrics.json and Figure 6 (default: --out's name)")
    ap.add_argument("--compare", help="--figure5: a second checkpoint, drawn beside --ckpt")
    ap.add_argument("--labels", nargs="+", help="--figure5 / --figure6: the panels' / points' labels")
    ap.add_argument("--num-pairs", type=int, default=1000, help="--figure5: speech-text pairs to sample")
    ap.add_argument("--seed", type=int, default=0, help="--figure5: the pairs' sampling and t-SNE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="the frozen weights' dtype (default: bf16 on CUDA, else fp32)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def resolve_checkpoint(ckpt, args) -> dict:
    """The base weights' paths (SpeechLLM.resolve: each exists, --llm is the checkpoint's backbone) and the
    configs the data needs, read without loading any weights: dict(llm, whisper, beats, llm_cfg, whisper_cfg)."""
    from model import LLMConfig, SpeechLLM, WhisperEncoderConfig

    paths = SpeechLLM.resolve(ckpt, args.llm, args.whisper, args.beats)
    if Path(ckpt).is_dir():
        saved = SpeechLLM.saved_config(ckpt)
        return dict(paths, llm_cfg=saved.llm, whisper_cfg=saved.whisper)
    whisper = Path(paths["whisper"])   # a SALMONN .pth records no config: the base weights' config.json
    return dict(paths, llm_cfg=LLMConfig.from_dir(paths["llm"]),
                whisper_cfg=WhisperEncoderConfig.from_dir(whisper if whisper.is_dir() else whisper.parent))


def check_out_dir(out: Path) -> None:
    """Create the output folder and prove it writable, before any long work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def load_model(ckpt, paths: dict, args):
    from model import SpeechLLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return SpeechLLM.from_pretrained(paths["llm"], paths["whisper"], paths["beats"], ckpt=ckpt, dtype=dtype,
                                     device=args.device, verbose=False)


def _instruction(args) -> str:
    from model import INSTRUCTIONS

    if args.instruction:
        return args.instruction
    if args.task not in INSTRUCTIONS:
        raise ValueError(f"no instruction for task {args.task!r} in model.INSTRUCTIONS (known: "
                         f"{', '.join(INSTRUCTIONS)}): pass --instruction")
    return INSTRUCTIONS[args.task][0]


def _dataset(args, ckpt: dict, instructions=None):
    """The manifest's audio as a data.SpeechDataset for the checkpoint's Whisper (its files looked for now)."""
    cfg = ckpt["whisper_cfg"]
    return data.SpeechDataset(args.data, instructions=instructions, n_mels=cfg.num_mel_bins, n_frames=cfg.n_frames)


def prepare(args, ap) -> dict:
    """Every check of the command line, its files and the checkpoint; nothing is loaded or decoded."""
    if args.figure6:
        if not args.out:
            ap.error("--figure6 needs --out")
        return {}
    if not args.ckpt:
        ap.error("--ckpt is required")
    if args.figure5 and not args.data:
        ap.error("--figure5 needs --data")
    if args.compare and not args.figure5:
        ap.error("--compare is for --figure5")
    if args.data and not args.out:
        ap.error("--out is required with --data")
    if not args.figure5 and not args.task:
        ap.error("--task is required")
    for name in ("num_beams", "max_new_tokens", "batch_size", "num_pairs", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        ap.error("--workers must be >= 0")
    if args.greedy:
        args.num_beams = 1
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.text_input and (args.audio or args.figure5 or args.align_layers):
        ap.error("--text-input is for decoding a manifest, without --align-layers")
    if args.audio and (args.align_layers or args.out):
        ap.error("--audio prints one result: no --align-layers, no --out")

    prep = dict(ckpt=resolve_checkpoint(args.ckpt, args))
    if args.compare:
        prep["compare"] = resolve_checkpoint(args.compare, args)
    if args.task:
        task, _, tgt = parse_task(args.task)
        if args.text_input and task != "st":
            raise ValueError(f"--text-input is zero-shot translation: --task must be st_<src>_<tgt>, not {args.task!r}")
        prep["instruction"] = _instruction(args)
        if task != "asr":
            prep["tokenize"] = args.bleu_tokenize or bleu_tokenizer(tgt)
            from sacrebleu.metrics import BLEU
            try:
                BLEU(tokenize=prep["tokenize"])   # an unknown name, or ja-mecab without MeCab, fails here
            except Exception as e:
                raise ValueError(f"BLEU tokenizer {prep['tokenize']!r}: {e}") from None
        if args.wer_norm is None:
            args.wer_norm = "whisper-en" if parse_task(args.task)[1] == "en" else "basic"
    if args.align_layers:
        prep["layers"] = parse_layers(args.align_layers, prep["ckpt"]["llm_cfg"].num_hidden_layers)
    if args.audio:
        prep["wav"] = data.load_audio(args.audio)   # a missing or unreadable file fails now
        return prep
    entries = data.read_manifest(args.data)
    if args.figure5:
        if args.labels is not None and len(args.labels) != 1 + bool(args.compare):
            ap.error(f"--labels: {len(args.labels)} labels for {1 + bool(args.compare)} panel(s)")
        check_entries(entries, args.data, None, need_transcript=True)
        if args.num_pairs > len(entries):
            raise ValueError(f"--num-pairs {args.num_pairs}, but {args.data} has {len(entries)} entries")
        prep["indices"] = sorted(random.Random(args.seed).sample(range(len(entries)), args.num_pairs))
        prep["ids"] = [entries[i]["id"] for i in prep["indices"]]
        prep["dataset"] = _dataset(args, prep["ckpt"])
        check_out_dir(Path(args.out))
        return prep
    entries = entries[:args.limit]
    check_entries(entries, args.data, args.task, need_transcript=args.text_input or bool(args.align_layers))
    prep["entries"] = entries
    # the audio (the files looked for now), with the one instruction evaluation uses
    prep["dataset"] = None if args.text_input else _dataset(args, prep["ckpt"], {args.task: [prep["instruction"]]})
    out = Path(args.out)
    if args.overwrite:
        for name in (HYPS, RUN, METRICS):
            (out / name).unlink(missing_ok=True)
    check_out_dir(out)
    prep["settings"] = dict(ckpt=str(Path(args.ckpt).resolve()), data=str(Path(args.data).resolve()), task=args.task,
                            instruction=prep["instruction"], text_input=args.text_input,
                            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                            length_penalty=args.length_penalty, align_layers=prep.get("layers", []), dtype=args.dtype,
                            **{k: str(Path(v).resolve()) if v else None for k, v in prep["ckpt"].items()
                               if k in ("llm", "whisper", "beats")})
    prep["done"] = check_resume(out, prep["settings"], prep["entries"])
    return prep


def main_decode(args, prep) -> dict:
    out = Path(args.out)
    (out / RUN).write_text(json.dumps(prep["settings"], indent=2, ensure_ascii=False) + "\n")
    model = load_model(args.ckpt, prep["ckpt"], args)
    decoding = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
    rows, speed = run_decoding(model, prep["entries"], out, prep["instruction"], prep["dataset"],
                               batch_size=args.batch_size, workers=args.workers, align_layers=prep.get("layers", ()),
                               device=args.device, progress=not args.no_progress, **decoding)
    metrics = dict(label=args.label or out.resolve().name, task=args.task, text_input=args.text_input,
                   **summarize(rows, args.task, max_new_tokens=args.max_new_tokens, bleu_tokenize=prep.get("tokenize"),
                               wer_norm=args.wer_norm, align_layers=prep.get("layers", ())),
                   throughput=speed, settings=dict(prep["settings"], batch_size=args.batch_size, device=args.device,
                                                   limit=args.limit))
    if "bleu" in metrics:
        (out / "hyps.txt").write_text("".join(one_line(r["hypothesis"]) + "\n" for r in rows), encoding="utf-8")
        (out / "refs.txt").write_text("".join(one_line(r["reference"]) + "\n" for r in rows), encoding="utf-8")
    (out / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if "bleu" in metrics:
        score = f"BLEU {metrics['bleu']:.2f} ({metrics['bleu_signature']})  chrF {metrics['chrf']:.2f}"
    else:
        score = f"WER {100 * metrics['wer']:.2f}% ({metrics['wer_normalizer']} normaliser)"
    print(f"{args.task}{' (text input)' if args.text_input else ''}: {score}; {metrics['num_utterances']} utterances, "
          f"{metrics['empty_hypotheses']} empty, {metrics['hit_length_limit']} at the length limit")
    if "alignment" in metrics:
        print(f"alignment degree (mean ln W at layers {metrics['alignment']['layers']}): "
              f"{metrics['alignment']['mean_log_w']:.4f}")
    if speed["utterances"]:
        print(f"decoded {speed['utterances']} utterances in {speed['seconds']:.1f} s ({speed['utt_per_s']:.2f} utt/s)")
    print(f"wrote {out / METRICS}")
    return metrics


def main_figure5(args, prep) -> dict:
    panels = []
    ckpts = [(args.ckpt, prep["ckpt"])] + ([(args.compare, prep["compare"])] if args.compare else [])
    labels = args.labels or [Path(c).name for c, _ in ckpts]
    for label, (ckpt, paths) in zip(labels, ckpts):
        model = load_model(ckpt, paths, args)
        speech, text = modality_means(model, prep["dataset"], prep["indices"], args.batch_size, args.workers,
                                      args.device, not args.no_progress)
        del model
        s2, t2 = tsne_2d(speech, text, args.seed)
        panels.append(dict(label=label, ckpt=str(ckpt), modality_gap=modality_gap(speech, text),
                           speech_2d=s2, text_2d=t2))
    out = Path(args.out)
    png = plot_figure5(panels, out / "figure5.png")
    summary = dict(num_pairs=len(prep["ids"]), seed=args.seed, ids=prep["ids"],
                   panels=[dict(p, speech_2d=p["speech_2d"].tolist(), text_2d=p["text_2d"].tolist()) for p in panels])
    (out / "figure5.json").write_text(json.dumps(summary, ensure_ascii=False) + "\n")
    for p in panels:
        print(f"{p['label']}: modality gap {p['modality_gap']:.4f}")
    print(f"wrote {png}")
    return summary


def main_audio(args, prep) -> str:
    model = load_model(args.ckpt, prep["ckpt"], args)
    cfg = prep["ckpt"]["whisper_cfg"]
    item = dict(id=args.audio, task=args.task, instruction=prep["instruction"], target="", transcript=None,
                wav=prep["wav"])
    speech = encode(model, data.collate([item], cfg.num_mel_bins, cfg.n_frames), args.device)
    [text], _ = generate(model, [prep["instruction"]], speech=speech, num_beams=args.num_beams,
                         max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
    print(text)
    return text


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        prep = prepare(args, ap)
        if args.figure6:   # no model: read, check and plot
            points = read_figure6_points(args.figure6, args.labels)
            check_out_dir(Path(args.out))
    except (ValueError, OSError) as e:   # bad input: one clear line, before any model loads
        sys.exit(f"evaluate.py: {e}")
    if args.figure6:
        result = plot_figure6(points, Path(args.out) / "figure6.png")
        (Path(args.out) / "figure6.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        for p in points:
            print(f"{p['label']}: mean ln W {p['log_w']:.4f}, BLEU {p['bleu']:.2f}")
        print(f"wrote {Path(args.out) / 'figure6.png'}")
        return result
    if args.audio:
        return main_audio(args, prep)
    if args.figure5:
        return main_figure5(args, prep)
    return main_decode(args, prep)


if __name__ == "__main__":
    main()
