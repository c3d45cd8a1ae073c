"""Speed of the audio front end (data.py) against the references it is tested equal to, on this machine.

    python benchmarks/bench_audio.py [--batch 16] [--seconds 30] [--repeats 10] [--threads N]

Each comparison is one function that times our code and the reference on the same inputs (a warm-up call
first, then the best of --repeats, the two taking turns) and returns (ours_s, ref_s). main() prints one line
per comparison and, as its last line, the ratios ours/ref from a dict: `logmel_ratio=... fbank_ratio=...`
(below 1: we are faster).

kaldi-native-fbank is single-threaded; torch uses all cores unless --threads says otherwise. On a machine
shared with other jobs, torch's multi-threaded ops slow down far more than single-threaded code (a thread
waits for its descheduled partner at every op), so compare runs taken on an idle machine, or use --threads 1.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules are flat files
import data  # noqa: E402


def race(ours, ref, repeats: int) -> tuple[float, float]:
    """Seconds of the fastest of `repeats` calls of each, after one untimed warm-up call of each.

    The two are called in turn (ours, ref, ours, ref, ...) so that a busy machine slows both alike.
    """
    ours(), ref()
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for k, fn in enumerate((ours, ref)):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


def make_clips(batch: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """`batch` clips of noise with a few tones, 16 kHz float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * data.SAMPLE_RATE)) / data.SAMPLE_RATE
    return [(0.1 * np.sin(2 * np.pi * (200 + 300 * i) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
            for i in range(batch)]


def bench_logmel(clips: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """data.log_mel_spectrogram vs transformers' WhisperFeatureExtractor (80 mel bins, 30 s padding)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80)

    def ours():
        return data.log_mel_spectrogram([torch.from_numpy(c) for c in clips], n_mels=80)

    def ref():
        return extractor(clips, sampling_rate=data.SAMPLE_RATE, return_tensors="pt").input_features

    assert (ours() - ref()).abs().max().item() <= 1e-4  # the same work
    return race(ours, ref, repeats)


def bench_fbank(clips: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """data.beats_fbank on the (B, N) batch vs kaldi-native-fbank clip by clip, both normalised as BEATs does."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0  # BEATs' (torchaudio's) default; knf's own is 3e-5
    opts.mel_opts.num_bins = 128  # the rest of knf's defaults are Kaldi's: 16 kHz, 25/10 ms, povey, 0.97, ...
    wavs = torch.from_numpy(np.stack(clips))  # (B, N): equal lengths, as after pad_batch

    def knf_one(clip: np.ndarray) -> np.ndarray:
        fbank = knf.OnlineFbank(opts)
        fbank.accept_waveform(data.SAMPLE_RATE, clip * 2**15)
        fbank.input_finished()
        return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])

    def ours():
        return data.beats_fbank(wavs)

    def ref():
        return (np.stack([knf_one(c) for c in clips]) - data.FBANK_MEAN) / (2 * data.FBANK_STD)

    assert np.abs(ours().numpy() - ref()).max() <= 1e-3  # the same work
    return race(ours, ref, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clips = make_clips(args.batch, args.seconds)
    print(f"batch {args.batch} x {args.seconds:g} s at 16 kHz, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, best of {args.repeats} after a warm-up")
    ratios = {}
    for name, bench, what in [("logmel", bench_logmel, "WhisperFeatureExtractor"),
                              ("fbank", bench_fbank, "kaldi-native-fbank")]:
        ours_s, ref_s = bench(clips, args.repeats)
        print(f"{name:8s} ours {ours_s * 1e3:8.1f} ms   {what} {ref_s * 1e3:8.1f} ms")
        ratios[f"{name}_ratio"] = ours_s / ref_s
    print(" ".join(f"{key}={value:.3f}" for key, value in ratios.items()))


if __name__ == "__main__":
    main()
