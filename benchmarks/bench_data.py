"""Speed of the data pipeline: can the DataLoader keep a GPU busy?

    python benchmarks/bench_data.py [--clips 16] [--seconds 30] [--workers 1 2] [--device cuda]

Writes --clips clips of --seconds (speech-like noise) as 16 kHz flac (LibriSpeech's format) and as 48 kHz mp3
(CoVoST 2 / Common Voice's), then measures, each the best of --repeats:
- decode:    data.load_audio per clip in this process (read + resample to 16 kHz), clips/s;
- loader:    a DataLoader over SpeechDataset + StreamSampler (micro-batch 8) with N workers, features left to
             Batch.to (the default), clips/s per worker, timed over --batches after the workers have started;
- loader+features: the same with each worker also computing the log-mel and fbank (Batch.to("cpu") inside
             the collate), clips/s per worker: the alternative of computing features on the CPU;
- features on --device: Batch.to(device) for a micro-batch of 8 clips, ms (what the default costs the GPU);
- segment:   a 10 s segment from the middle of a 10-minute opus file (GigaSpeech's format) by
             load_audio(path, start, end) against decoding the whole file and slicing it.
The last line is `key=value` pairs. Figures: BENCHMARKS.md.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules are flat files
import data  # noqa: E402

INSTRUCTIONS = {"asr": ["Transcribe the speech."]}


def speech_like(seconds: float, sr: int, seed: int) -> np.ndarray:
    """A gliding harmonic source with a 4 Hz envelope over noise: compresses like speech, not like silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.5 * t + seed)
    voiced = sum(np.sin(k * 2 * np.pi * np.cumsum(f0) / sr) / k for k in range(1, 30))
    return (0.1 * (1 + np.sin(2 * np.pi * 4 * t)) * voiced + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_corpus(folder: Path, n: int, seconds: float, ext: str, sr: int, **kw) -> Path:
    lines = []
    for i in range(n):
        sf.write(folder / f"{i}.{ext}", speech_like(seconds, sr, i), sr, **kw)
        lines.append({"id": f"{ext}{i}", "audio": f"{i}.{ext}", "task": "asr", "lang": "en", "transcript": "words"})
    manifest = folder / f"{ext}.jsonl"
    data.write_manifest(lines, manifest)
    return manifest


def best(fn, repeats: int) -> float:
    fn()  # warm-up: imports, resampling banks, worker start-up paths
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class FeaturesInWorker:
    """A collate that also computes the features in the worker (the alternative to Batch.to on the device)."""
    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, items):
        return self.dataset.collate(items).to("cpu")


def loader_seconds(manifest: Path, workers: int, features_in_worker: bool, batches: int) -> float:
    """Seconds per clip of a running DataLoader (micro-batches of 8), after its workers have started and
    delivered 2 batches each: the steady state a training run sees, not the start-up."""
    ds = data.SpeechDataset(manifest, instructions=INSTRUCTIONS)
    warm = 2 * max(1, workers)
    sampler = data.StreamSampler(ds, global_batch=8, micro_batch=8, num_steps=warm + batches)  # epochs repeat
    collate = FeaturesInWorker(ds) if features_in_worker else ds.collate
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                              prefetch_factor=2 if workers else None))
    for _ in range(warm):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - start) / (batches * 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16, help="clips per format (a multiple of 8)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="micro-batches of 8 timed per DataLoader")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    print(f"{args.clips} clips x {args.seconds:g} s per format, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, best of {args.repeats}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        formats = {"flac16k": write_corpus(tmp, args.clips, args.seconds, "flac", 16000),
                   "mp3_48k": write_corpus(tmp, args.clips, args.seconds, "mp3", 48000)}
        for name, manifest in formats.items():
            paths = [e["audio"] for e in data.read_manifest(manifest)]
            per_clip = best(lambda: [data.load_audio(p) for p in paths], args.repeats) / len(paths)
            results[f"{name}_decode_clips_s"] = 1 / per_clip
            print(f"{name:8s} decode + resample in this process: {1 / per_clip:7.1f} clips/s")
            for w in args.workers:
                for features in (False, True):
                    per_clip = loader_seconds(manifest, w, features, args.batches)
                    key = f"{name}_w{w}{'_features' if features else ''}_clips_s_per_worker"
                    results[key] = 1 / per_clip / w
                    print(f"{name:8s} DataLoader, {w} worker(s){', features in workers' if features else '':22s}: "
                          f"{1 / per_clip:7.1f} clips/s ({1 / per_clip / w:.1f} per worker)")
        ds = data.SpeechDataset(formats["flac16k"], instructions=INSTRUCTIONS)
        batch = ds.collate([ds[i] for i in range(8)])
        device = torch.device(args.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        ms = best(lambda: (batch.to(device), sync()), max(args.repeats, 5)) * 1e3
        results[f"features_8x{args.seconds:g}s_{device.type}_ms"] = ms
        print(f"features for 8 x {args.seconds:g} s in Batch.to({device.type}): {ms:.1f} ms (transfer included)")

        opus = tmp / "podcast.opus"  # GigaSpeech ships hour-long 16 kHz opus files
        sf.write(opus, np.concatenate([speech_like(60, 16000, s) for s in range(10)]), 16000, format="OGG",
                 subtype="OPUS")
        seg = best(lambda: data.load_audio(opus, 300.0, 310.0), args.repeats) * 1e3
        whole = best(lambda: data.read_audio(opus)[0][300 * 16000: 310 * 16000], args.repeats) * 1e3
        results.update(segment_ms=seg, whole_file_ms=whole)
        print(f"10 s segment of a 10-min opus: load_audio(start, end) {seg:.1f} ms, decode all and slice {whole:.1f} ms")
    print(" ".join(f"{k}={v:.1f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
