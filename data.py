"""The data of SALMONN / AI-STA: corpora become manifests, audio files become the inputs of the two encoders.

    load_audio(path, start, end) file (or a segment of it) -> mono float32 waveform at 16 kHz, >= 1 s, <= 30 s
    pad_batch(wavs)              B waveforms -> (B, N_max) zero-padded + (B, N_max) padding mask
    log_mel_spectrogram(wavs)    Whisper's input: (B, n_mels, 3000) log-mel, always 30 s
    beats_fbank(wavs)            BEATs' input: (B, T, 128) normalised Kaldi fbank, T = 1 + (N - 400) // 160
    read_manifest(path)          a JSON-lines manifest -> validated entries (task_key, target_text read them)
    SpeechDataset, collate, Batch, StreamSampler, ShardSampler    what train.py and evaluate.py iterate over

Quirks worth knowing (each one is commented where it happens):
- Whisper always sees 30 s: every clip is zero-padded (or trimmed) to 480000 samples *before* the STFT, so
  its dynamic-range floor (max - 8) is taken over the padded clip, and a batch member never sees another.
- Whisper's centred STFT makes 3001 frames from 480000 samples; the last one is dropped (3000 frames).
- BEATs runs Kaldi's fbank on the waveform scaled to the int16 range (x 2**15), because Kaldi's log
  energies, and the mean/std BEATs normalises with, were computed on int16 audio.
- Kaldi frames with snip_edges=True: only whole 25 ms frames, the first starting at sample 0. In a padded
  batch BEATs computes frames over the padded zeros too; its encoder masks them later.
- SALMONN assumes 16 kHz input; CoVoST2's clips are 48 kHz mp3, so everything is resampled here with a
  Kaiser-windowed sinc (polyphase, exact rational ratio; from above 32 kHz in two stages, via 48 kHz).
- A segment (start, end) is read from its file with the resampling filter's reach on each side, starting on
  a frame that maps onto the file's 16 kHz grid, so it equals the whole file's waveform sliced.
- Training features are computed in Batch.to(device), on the GPU, not in DataLoader workers.
- SpeechDataset keeps its entries as one byte buffer of JSON lines: forked workers reading a list of a million
  dicts would touch every refcount and so copy the whole list, once per worker.

Everything after the file read is torch in float32 on the input's device (CPU or CUDA).
"""
import csv
import json
import math
import os
import re
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

try:
    import soundfile as sf
except ImportError:  # only reading audio files needs it (a GPU benchmark machine may lack it): _open says so
    sf = None
import torch
import torch.nn.functional as F

# ---- audio constants --------------------------------------------------------------------------------------
SAMPLE_RATE = 16000
N_FFT = 400  # Whisper: 25 ms window
HOP_LENGTH = 160  # 10 ms hop, for Whisper and for BEATs' Kaldi fbank
CHUNK_LENGTH = 30  # seconds: Whisper's fixed input length, and SALMONN's cut
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a mel spectrogram input
MIN_SAMPLES = SAMPLE_RATE  # SALMONN pads shorter clips with zeros to 1 s

LOG_MEL_EPS = 1e-10  # Whisper: log10(clamp(mel, min=1e-10))
LOG_MEL_RANGE = 8.0  # Whisper: floor at (max - 8.0), i.e. an 80 dB dynamic range

# BEATs' preprocess: Kaldi fbank (torchaudio.compliance.kaldi.fbank) with these options, Kaldi defaults otherwise
FBANK_FRAME_LENGTH = 400  # 25 ms at 16 kHz
FBANK_FRAME_SHIFT = 160  # 10 ms at 16 kHz
FBANK_N_FFT = 512  # Kaldi's round_to_power_of_two: 400 -> 512
FBANK_N_MELS = 128
FBANK_LOW_FREQ = 20.0  # Kaldi's default low_freq
FBANK_HIGH_FREQ = SAMPLE_RATE / 2  # Kaldi's high_freq = 0 means the Nyquist frequency
PREEMPHASIS = 0.97
POVEY_EXPONENT = 0.85  # Kaldi's "povey" window: a Hann window raised to 0.85 (like Hamming, but 0 at the ends)
INT16_SCALE = 2**15  # BEATs multiplies the [-1, 1) waveform by 2**15 before the fbank
FBANK_MEAN = 15.41663  # BEATs' fbank statistics (AudioSet): (fbank - mean) / (2 * std)
FBANK_STD = 6.55582

# Resampler (see resample()): Kaiser-windowed sinc, cutoff 0.945 x the lower Nyquist frequency
# (7560 Hz for 16 kHz output), 64 zero crossings of the sinc on each side, Kaiser beta 10.
# Measured for 48 kHz -> 16 kHz: passband ripple < 1e-4 dB up to 7 kHz, <= -100 dB from 8 kHz up.
RESAMPLE_ROLLOFF = 0.945
RESAMPLE_ZEROS = 64
RESAMPLE_BETA = 10.0


class AudioError(ValueError):
    """An audio file or waveform that cannot be used: the message names the file or the input."""


# ---- reading files ----------------------------------------------------------------------------------------
# A segment [start, end) may end a little past the file (manifests round their times; GigaSpeech's end times
# have 2-4 decimals): up to this much it is cut to the file's end, beyond it the entry is an error.
SEGMENT_END_SLACK = 0.1  # seconds


def _open(path: Path) -> "sf.SoundFile":
    """Open an audio file for reading; errors name the file (libsndfile's own can mislead: a bad mp3
    reads "File does not exist")."""
    if sf is None:
        raise ImportError(f"reading {path} needs the soundfile package: pip install -r requirements.txt")
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError) as err:  # only now look why: a manifest check opens 100k files
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}") from None
        if path.stat().st_size == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}") from None
        raise AudioError(f"cannot decode audio file {path}: {err}") from err
    if f.frames == 0:
        f.close()
        raise AudioError(f"audio file has no samples: {path}")
    promised = _wav_promised_frames(f)
    if promised is not None:
        f.close()
        raise AudioError(f"truncated audio file {path}: its header promises {promised / f.samplerate:.3f} s, "
                         f"it holds {f.frames / f.samplerate:.3f} s")
    return f


def _wav_promised_frames(f: "sf.SoundFile") -> int | None:
    """The frame count a WAV header promises when the file holds fewer (None otherwise).

    libsndfile quietly shortens a WAV whose 'data' chunk is larger than the file (a download cut short) to
    what is there, and only says so in its log: "data : 96000 (should be 48000)".
    """
    if f.format != "WAV":
        return None
    log = f.extra_info
    data = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", log, re.M)
    align = re.search(r"Block Align\s*:\s*(\d+)", log)
    if data is None or align is None or int(data[1]) <= int(data[2]):
        return None
    return int(data[1]) // int(align[1])


def _read_frames(f: "sf.SoundFile", path: Path, first: int, count: int) -> torch.Tensor:
    """Frames [first, first + count) of an open file, channels averaged: (count,) float32."""
    try:
        f.seek(first)
        samples = f.read(count, dtype="float32", always_2d=True)  # (count, channels)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"cannot decode audio file {path}: {err}") from err
    if samples.shape[0] < count:  # the header promised frames the file does not hold (a cut-short mp3/flac)
        raise AudioError(f"truncated audio file {path}: its header promises {f.frames / f.samplerate:.3f} s, "
                         f"it holds {(first + samples.shape[0]) / f.samplerate:.3f} s")
    # numpy, not torch, for these two: torch's reductions start threads, which costs more than the work here
    wav = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)  # SALMONN keeps channel 0, we average
    if not (np.isfinite(wav.sum()) or np.isfinite(wav).all()):  # one cheap sum first, as in _all_finite
        raise AudioError(f"audio file contains NaN or inf samples: {path}")
    return torch.from_numpy(np.ascontiguousarray(wav))  # (count,)


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read a whole file in any format libsndfile knows (wav, flac, ogg/vorbis/opus, mp3), channels averaged.

    Returns (wav (N,) float32 in [-1, 1], sample_rate). Raises FileNotFoundError for a missing file and
    AudioError for an empty, undecodable, truncated or non-finite one.
    """
    path = Path(path)
    with _open(path) as f:
        return _read_frames(f, path, 0, f.frames), f.samplerate


def audio_info(path: str | Path) -> tuple[int, int]:
    """(frames, sample_rate) from the file's header alone, with the same errors as read_audio."""
    path = Path(path)
    with _open(path) as f:
        return f.frames, f.samplerate


def load_audio(path: str | Path, start: float | None = None, end: float | None = None,
               max_samples: int | None = N_SAMPLES, warn_cut: bool = True) -> torch.Tensor:
    """SALMONN's audio loading, plus resampling and segments: file -> mono 16 kHz waveform (N,), float32.

    start, end: seconds, a segment [start, end) of the file (either may be None: the file's start / end).
        Only the segment's frames are read (plus the resampling filter's reach on each side), so an utterance
        of an hour-long GigaSpeech podcast costs what the utterance costs. The result equals the whole file's
        16 kHz waveform sliced at round(start * 16000) : round(end * 16000).
    max_samples: longer clips are cut to their first max_samples (30 s, SALMONN's and Whisper's limit), with
        a warning naming the file if warn_cut; None keeps everything. Shorter clips than 1 s are zero-padded
        at the end to 1 s, as SALMONN does.
    """
    path = Path(path)
    with _open(path) as f:
        sr, n_in = f.samplerate, f.frames
        g = math.gcd(sr, SAMPLE_RATE)
        up, down = SAMPLE_RATE // g, sr // g
        n_out = -(-n_in * up // down)  # the whole file's length at 16 kHz (as resample() makes it)
        lo = 0 if start is None else round(start * SAMPLE_RATE)
        hi = n_out if end is None else round(end * SAMPLE_RATE)
        if not 0 <= lo < min(hi, n_out) or hi > n_out + SEGMENT_END_SLACK * SAMPLE_RATE:
            raise AudioError(f"segment [{start}, {end}) s is not inside {path} ({n_in / sr:.3f} s)")
        hi = min(hi, n_out)
        if max_samples is not None and hi - lo > max_samples:
            if warn_cut:
                warnings.warn(f"{path}: {(hi - lo) / SAMPLE_RATE:.2f} s is longer than "
                              f"{max_samples / SAMPLE_RATE:g} s; keeping the first {max_samples / SAMPLE_RATE:g} s",
                              stacklevel=2)
            hi = lo + max_samples
        # Input frames that output samples [lo, hi) depend on: their instants lo*down/up .. hi*down/up, plus the
        # filter's reach. The first frame read is a multiple of `down`, so that the segment's output samples fall
        # on the whole file's output grid (output i of the segment is output i + first*up/down of the file).
        margin = 0 if sr == SAMPLE_RATE else _resample_margin(sr, SAMPLE_RATE)
        first = max(0, lo * down // up - margin) // down * down
        last = min(n_in, -(-hi * down // up) + margin)
        wav = _read_frames(f, path, first, last - first)
    offset = first * up // down
    wav = resample(wav, sr, SAMPLE_RATE)[lo - offset: hi - offset]
    if wav.shape[0] < MIN_SAMPLES:
        wav = F.pad(wav, (0, MIN_SAMPLES - wav.shape[0]))
    return wav


# ---- resampling -------------------------------------------------------------------------------------------
def resample(wav: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling: (..., N) at orig_sr -> (..., ceil(N * new_sr / orig_sr)), float32.

    Output sample n is the input at time n * orig_sr / new_sr (in input samples), interpolated by a low-pass
    Kaiser-windowed sinc with its cutoff at RESAMPLE_ROLLOFF x the lower Nyquist frequency (7560 Hz for a
    16 kHz output), so that the transition band ends before anything can alias. Samples outside the signal
    count as zeros. Equal rates return the input unchanged.
    From rates above 2 x new_sr the signal first goes to 3 x new_sr (48 kHz) through a short filter that only
    has to keep 0..new_sr/2 and remove what would fold onto it, then down to new_sr through the sharp one: the
    sharp filter's length grows with the input rate, and at 384 kHz it alone would cost 8x the work at 48 kHz.
    Works for any pair of integer rates in bounded memory (see _polyphase).
    """
    orig_sr, new_sr = _check_rate(orig_sr), _check_rate(new_sr)
    if not torch.is_floating_point(wav):
        raise AudioError(f"resample expects a floating-point waveform, got {wav.dtype}")
    if orig_sr == new_sr:
        return wav
    if wav.shape[-1] == 0:
        raise AudioError("resample got an empty waveform")
    x = wav.reshape(-1, wav.shape[-1]).to(torch.float32)  # (B, N)
    for stage in _resample_stages(orig_sr, new_sr):
        x = _polyphase(x, *stage)
    return x.reshape(*wav.shape[:-1], x.shape[-1])


def _check_rate(sr) -> int:
    if isinstance(sr, float) and sr.is_integer():
        sr = int(sr)
    if not isinstance(sr, int) or sr <= 0:
        raise AudioError(f"sample rates must be positive integers, got {sr!r}")
    return sr


def _resample_stages(orig_sr: int, new_sr: int) -> list[tuple[int, int, float, int, float]]:
    """The stages (rate in, rate out, cutoff Hz, zero crossings of the sinc on each side, Kaiser beta)."""
    sharp = (RESAMPLE_ROLLOFF * min(orig_sr, new_sr) / 2, RESAMPLE_ZEROS, RESAMPLE_BETA)
    mid = 3 * new_sr
    if orig_sr <= 2 * new_sr or orig_sr == mid:
        return [(orig_sr, new_sr, *sharp)]
    # The first stage must pass 0..new_sr/2 and remove, before they fold onto 0..new_sr/2 at `mid`, the
    # frequencies from mid - new_sr/2 (and, going up, the images of 0..new_sr/2 at orig_sr - new_sr/2).
    # The second stage removes everything else above new_sr/2. The first stage's ripple adds to the second's,
    # so it is made 30 dB better: a Kaiser window with beta 14 (~135 dB) needs about 8.9 / (transition
    # width / rate) taps, i.e. 8.9 * cutoff / width zero crossings of the sinc; 9.5 with a margin.
    passband, stopband = new_sr / 2, min(orig_sr, mid) - new_sr / 2
    cutoff = (passband + stopband) / 2
    zeros = math.ceil(9.5 * cutoff / (stopband - passband))
    return [(orig_sr, mid, cutoff, zeros, 14.0), (mid, new_sr, *sharp)]


def _resample_margin(orig_sr: int, new_sr: int) -> int:
    """How far (in input samples) the resampler looks on either side of an output instant, rounded up."""
    reach = sum(zeros * rate_in / (2 * cutoff) * orig_sr / rate_in  # a stage's half-length, in input samples
                for rate_in, _, cutoff, zeros, _ in _resample_stages(orig_sr, new_sr))
    return math.ceil(reach) + 2


def _polyphase(x: torch.Tensor, orig_sr: int, new_sr: int, cutoff: float, zeros: int, beta: float) -> torch.Tensor:
    """(B, N) -> (B, ceil(N * new_sr / orig_sr)): one resampling stage as batched matrix products.

    With up/down = new_sr/orig_sr reduced, output n sits at input time n*down/up and is
        y[n] = sum_m x[m] h(n*down/up - m),   h(t) = b sinc(b t) kaiser(t / half),   b = 2 cutoff / orig_sr.
    Outputs go in blocks of P consecutive ones. Blocks whose first output has the same fractional input time
    share their weights: block i and block i + Q do, Q = up / gcd(up, P), and lie S = Q*P*down/up input samples
    apart. So "class" c < Q is one product (its blocks' input windows, (n_q, Kb)) @ (its weights, (Kb, P)):
    a strided convolution with P output channels, or, for many small classes, a gather and a batched matmul.
    The weights hold lcm(up, P) x Kb numbers (at most ~9 M), never the up x (K + down) of one filter per
    phase over a whole period (2 GB at 16001 Hz, 7.4 GB at 11127 Hz).
    """
    bank, starts, period = _polyphase_bank(orig_sr, new_sr, cutoff, zeros, beta)  # (Q, Kb, P), (Q,), S
    q_classes, kb, p = bank.shape
    n_rows, n_in = x.shape
    g = math.gcd(orig_sr, new_sr)
    n_out = -(-n_in * (new_sr // g) // (orig_sr // g))
    n_q = -(-n_out // (q_classes * p))  # blocks per class
    left = math.ceil(zeros * orig_sr / (2 * cutoff))  # window starts count from `left` samples before the signal
    bank, starts = bank.to(x.device), starts.to(x.device)  # (a CUDA input moves the bank: <= 36 MB, odd rates)
    # few classes with many blocks each (Q = 1 at 48, 96, 192, 384 kHz): one strided convolution per class,
    # which never materialises the windows (3-4x faster than gathering them, measured at 48 kHz); many small
    # classes (odd rates): gather the windows and multiply, class by class in one batched matmul
    convolve = q_classes <= 4 and n_q >= 256
    y = x.new_empty(n_rows, q_classes, n_q, p)
    # a stretch of blocks at a time, so that what is copied (the stretch of input, the gathered windows) stays
    # below _CHUNK samples whatever the length of the signal and the batch; but at least 8 blocks per class
    # (over the batch) when gathering, or each class's product is a vector times a matrix (1.4x slower at
    # 383999 Hz; the stretch is then up to 4 x `down` samples, 6 MB at worst)
    blocks = max(1, _CHUNK // (n_rows * (period if convolve else q_classes * kb)))
    if not convolve:
        blocks = max(blocks, min(n_q, -(-4 // n_rows)))
    for q0 in range(0, n_q, blocks):
        q1 = min(n_q, q0 + blocks)
        lo, hi = q0 * period, int(starts[-1]) + (q1 - 1) * period + kb  # the stretch, in samples from -left
        piece = x[:, max(0, lo - left): max(0, min(n_in, hi - left))]
        piece = F.pad(piece, (max(0, left - lo), hi - lo - max(0, left - lo) - piece.shape[1]))  # (B, hi - lo)
        if convolve:
            for c in range(q_classes):
                out = F.conv1d(piece[:, None, int(starts[c]):], bank[c].T[:, None, :], stride=period)  # (B, P, .)
                y[:, c, q0:q1] = out[..., : q1 - q0].transpose(1, 2)
        else:
            windows = piece.unfold(-1, kb, 1)  # (B, hi - lo - Kb + 1, Kb): a view, every window of Kb samples
            first = starts[:, None] + period * torch.arange(q1 - q0, device=x.device)  # (Q, blocks)
            classes = max(1, _CHUNK // (n_rows * (q1 - q0) * kb))
            for c in range(0, q_classes, classes):
                # (B, classes, blocks, Kb) @ (classes, Kb, P) -> (B, classes, blocks, P)
                y[:, c: c + classes, q0:q1] = windows[:, first[c: c + classes]] @ bank[c: c + classes]
    return y.transpose(1, 2).reshape(n_rows, n_q * q_classes * p)[:, :n_out]  # output (q*Q + c)*P + j


_CHUNK = 1 << 20  # 1 M samples (4 MB) copied at a time
_BANKS: dict = {}  # (orig_sr, new_sr, cutoff, zeros, beta) -> bank; see _BANK_CACHE
_BANK_CACHE = 10 << 20  # numbers (40 MB) of banks held at once, the one being designed included (largest: 9 M)


def _bank_shape(orig_sr: int, new_sr: int, cutoff: float, zeros: int) -> tuple[int, int, int, int]:
    """(Q classes, Kb taps, P outputs per block, S input stride between a class's blocks) of a stage's bank."""
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    half = zeros * orig_sr / (2 * cutoff)  # the filter's half-length in input samples

    def width(p):  # Kb: the taps of a block of P outputs, which span (P-1)*down/up input samples
        return 2 * math.ceil(half) + math.ceil((p - 1) * down / up) + 2
    # P outputs per block: enough for a good matrix product (<= 64), and a window not mostly zeros for any one
    # output (P*down/up about twice the filter's length); smaller (>= 8) while the bank would exceed 8 M numbers
    p = int(min(64, max(8, 2 ** round(math.log2(max(1.0, 4 * half * up / down))))))
    while p > 8 and up // math.gcd(up, p) * p * width(p) > 8 << 20:
        p //= 2
    q_classes = up // math.gcd(up, p)
    return q_classes, width(p), p, q_classes * p * down // up


def _polyphase_bank(orig_sr: int, new_sr: int, cutoff: float, zeros: int,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The weights of _polyphase, (Q, Kb, P) float32, each class's first window start (Q,) int64 (in samples
    of the input padded with `left` zeros), and the input stride S between a class's blocks. Designed in
    float64 on the CPU, a few classes at a time, and cached (at 383999 Hz the bank holds 9 M numbers and takes
    about a second to design; at common rates, a few thousand and a millisecond)."""
    key = (orig_sr, new_sr, cutoff, zeros, beta)
    if key in _BANKS:
        return _BANKS[key]
    q_classes, kb, p, period = _bank_shape(orig_sr, new_sr, cutoff, zeros)
    while _BANKS and sum(e[0].numel() for e in _BANKS.values()) + q_classes * kb * p > _BANK_CACHE:
        del _BANKS[next(iter(_BANKS))]  # make room first, the oldest first (dicts keep insertion order)
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    b = 2 * cutoff / orig_sr  # the sinc's bandwidth in cycles per input sample
    half = zeros / b  # the window's half-length in input samples
    left = math.ceil(half)
    starts = torch.arange(q_classes, dtype=torch.int64) * p * down // up  # floor(c*P*down/up), padded samples
    bank = torch.empty(q_classes, kb, p, dtype=torch.float32)
    i0_beta = torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    step = max(1, (1 << 16) // (p * kb))  # float64 temporaries of ~64 k numbers (0.5 MB) at a time
    for c in range(0, q_classes, step):
        n = torch.arange(c, min(c + step, q_classes))[:, None] * p + torch.arange(p)  # (classes, P) outputs
        # time from input sample (start - left + k) to output n, times up: exact in integers
        t_up = n[:, :, None] * down - (starts[c: c + step, None, None] - left + torch.arange(kb)) * up
        t = t_up.to(torch.float64) / up  # (classes, P, Kb)
        window = torch.special.i0(beta * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / i0_beta
        bank[c: c + step] = (b * torch.sinc(b * t) * window * (t.abs() <= half)).transpose(1, 2)
    _BANKS[key] = entry = (bank, starts, period)
    return entry


# ---- batching ---------------------------------------------------------------------------------------------
def pad_batch(wavs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SALMONN's collater: B waveforms (N_b,) -> zero-padded (B, N_max) and padding_mask (B, N_max), True = padding."""
    wavs = _check_list(wavs, "pad_batch")
    lengths = torch.tensor([w.shape[0] for w in wavs], device=wavs[0].device)  # (B,)
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # (B, N_max), zeros after each clip
    padding_mask = torch.arange(batch.shape[1], device=batch.device) >= lengths[:, None]  # (B, N_max)
    return batch, padding_mask


def _check_list(wavs: Sequence, name: str) -> list[torch.Tensor]:
    if len(wavs) == 0:
        raise AudioError(f"{name} got an empty list of waveforms")
    wavs = [_as_float_tensor(w, f"{name}: waveform {i}") for i, w in enumerate(wavs)]
    for i, w in enumerate(wavs):
        if w.dim() != 1:
            raise AudioError(f"{name}: waveform {i} must be 1-D (N,), got shape {tuple(w.shape)}")
    return wavs


def _as_float_tensor(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    # integer PCM would silently be 2**15 times too loud: make the caller scale it to [-1, 1)
    if not torch.is_floating_point(x):
        raise AudioError(f"{name} must be floating point in [-1, 1], got {x.dtype}")
    return x.to(torch.float32)


def _all_finite(x: torch.Tensor) -> bool:
    # one cheap reduction first: any NaN or inf makes the sum non-finite; only then look element by element
    # (a finite signal can overflow the sum only with samples near 1e38)
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _as_batch(audio, padding_mask: torch.Tensor | None, name: str,
              length: int | None = None) -> tuple[torch.Tensor, bool]:
    """(N,), (B, N) or a list of (N_b,) -> (B, N) float32 with padded samples zeroed; and 'was it batched'.

    With `length`, a list is padded/cut straight to that length (one copy, no padding mask needed).
    """
    if isinstance(audio, (list, tuple)):
        if padding_mask is not None:
            raise AudioError(f"{name}: padding_mask is only for a padded (B, N) tensor, not for a list")
        wavs = _check_list(audio, name)
        audio = pad_batch(wavs)[0] if length is None else torch.stack([pad_or_trim(w, length) for w in wavs])
        batched = True
    else:
        audio = _as_float_tensor(audio, name)
        if audio.dim() not in (1, 2):
            raise AudioError(f"{name} expects (N,) or (B, N) audio, got shape {tuple(audio.shape)}")
        batched = audio.dim() == 2
        audio = audio if batched else audio[None]
    if padding_mask is not None:
        if padding_mask.shape != audio.shape or padding_mask.dtype != torch.bool:
            raise AudioError(f"{name}: padding_mask must be bool of shape {tuple(audio.shape)}, "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        audio = audio.masked_fill(padding_mask, 0.0)
    if not _all_finite(audio):
        raise AudioError(f"{name}: the audio contains NaN or inf")
    return audio, batched


def _by_rows(fn, x: torch.Tensor) -> torch.Tensor:
    """fn applied to a (B, N) batch: all at once on an accelerator, one row at a time on a CPU.

    Each row is independent, so the result is the same either way. On a CPU one clip's intermediates (a 30 s
    STFT is 4.8 MB) stay in cache and their memory is reused, where a 16-clip batch's (77 MB per step) must be
    fetched from the OS page by page: for 16 x 30 s on a quiet 2-core CPU, row by row measured 2.0x (log-mel)
    and 2.6x (fbank) faster than the whole batch at once.
    """
    if x.device.type != "cpu" or x.shape[0] == 1:
        return fn(x)
    return torch.cat([fn(row) for row in x.split(1)])


# ---- Whisper's log-mel spectrogram ------------------------------------------------------------------------
def _hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    # Slaney's Auditory Toolbox scale (librosa's htk=False): linear below 1 kHz, logarithmic above
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp  # 15
    return torch.where(hz >= min_log_hz, min_log_mel + torch.log(hz.clamp(min=min_log_hz) / min_log_hz) / logstep,
                       hz / f_sp)


def _mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Whisper's mel filter bank (n_mels, N_FFT // 2 + 1) = (n_mels, 201), float32.

    The same matrix as librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) (htk=False, norm='slaney'),
    which Whisper ships as mel_filters.npz: triangles between n_mels + 2 points spaced evenly on the Slaney
    mel scale from 0 to 8 kHz, each scaled by 2 / (its width in Hz) so that every filter has the same area.
    """
    if n_mels not in (80, 128):
        raise AudioError(f"Whisper uses 80 (large-v2) or 128 (large-v3) mel bins, got {n_mels}")
    fft_freqs = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)  # 0, 40, ..., 8000 Hz
    lo, hi = _hz_to_mel_slaney(torch.tensor([0.0, SAMPLE_RATE / 2], dtype=torch.float64))
    hz = _mel_to_hz_slaney(torch.linspace(lo.item(), hi.item(), n_mels + 2, dtype=torch.float64))  # (n_mels+2,)
    width = hz.diff()  # (n_mels+1,)
    ramps = hz[:, None] - fft_freqs[None, :]  # (n_mels+2, 201)
    rising = -ramps[:-2] / width[:-1, None]  # left edge -> centre
    falling = ramps[2:] / width[1:, None]  # centre -> right edge
    weights = torch.minimum(rising, falling).clamp(min=0)
    weights = weights * (2.0 / (hz[2:] - hz[:-2]))[:, None]  # Slaney normalisation: constant area
    return weights.to(torch.float32).to(device)


@lru_cache(maxsize=None)
def _hann_window(device: torch.device) -> torch.Tensor:
    # periodic (torch's default): the window of a 400-point DFT, not a symmetric filter-design window
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """(..., N) -> (..., length): zero-pad at the end or cut, as Whisper does to make every input 30 s."""
    n = audio.shape[-1]
    return audio[..., :length] if n >= length else F.pad(audio, (0, length - n))


def _log_mel(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """(B, n_frames * 160) -> (B, n_mels, n_frames), e.g. (B, 480000) -> (B, n_mels, 3000): the computation
    behind log_mel_spectrogram."""
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=_hann_window(audio.device), center=True,
                      pad_mode="reflect", return_complex=True)  # (B, 201, 3001)
    power = stft.real.square().addcmul_(stft.imag, stft.imag)  # |X|^2 = re^2 + im^2, without abs()'s sqrt
    mel = mel_filters(n_mels, audio.device) @ power  # (B, n_mels, 3001)
    # a centred STFT of 480000 samples has 480000 // 160 + 1 = 3001 frames; Whisper drops the last one,
    # which is centred on the final sample and half made of reflect padding, so 30 s give exactly 3000 frames
    mel = mel[..., :-1]  # (B, n_mels, 3000)
    log_spec = mel.clamp(min=LOG_MEL_EPS).log10_()
    # 80 dB dynamic range below each clip's own loudest bin: the max is per utterance, never over the batch
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1)
    log_spec = torch.maximum(log_spec, peak - LOG_MEL_RANGE)
    return log_spec.add_(4.0).div_(4.0)  # roughly into [-1, 1]


def log_mel_spectrogram(audio, n_mels: int = 80, padding_mask: torch.Tensor | None = None,
                        n_frames: int = N_FRAMES) -> torch.Tensor:
    """Whisper's input features, as openai/whisper and HF's WhisperFeatureExtractor compute them.

    audio: 16 kHz float waveform(s) in [-1, 1]: (N,), (B, N), or a list of B tensors (N_b,).
    padding_mask: optional (B, N) bool for a (B, N) input, True = padding (as pad_batch returns); those
        samples are set to zero, so each row gives what it gives alone (Whisper pads every clip with zeros).
    n_frames: the encoder's input length (WhisperEncoderConfig.n_frames): 3000 = 30 s for every real
        Whisper; a smaller encoder (the toy world's) takes n_frames * 160 samples.
    Returns (n_mels, n_frames) for (N,) input, else (B, n_mels, n_frames); float32 on the input's device.

    Every clip is padded/cut to exactly n_frames * 160 samples (30 s), then: centred STFT (n_fft 400, hop 160, periodic Hann,
    reflect padding) -> power -> drop the last frame -> mel (Slaney) -> log10(clamp(1e-10)) ->
    floor at (max - 8) per clip -> (x + 4) / 4.
    """
    if not isinstance(n_frames, int) or n_frames < 1:
        raise AudioError(f"log_mel_spectrogram: n_frames must be a positive integer, got {n_frames!r}")
    n_samples = n_frames * HOP_LENGTH
    audio, batched = _as_batch(audio, padding_mask, "log_mel_spectrogram", length=n_samples)
    log_spec = _by_rows(lambda rows: _log_mel(rows, n_mels), pad_or_trim(audio, n_samples))  # (B, n_mels, n_frames)
    return log_spec if batched else log_spec[0]


# ---- BEATs' Kaldi fbank -----------------------------------------------------------------------------------
def _mel_kaldi(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + hz / 700.0)  # Kaldi's (HTK's) mel scale: 1127 ln(1 + f/700)


@lru_cache(maxsize=None)
def kaldi_mel_banks(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Kaldi's mel filter bank for BEATs' options: (128, FBANK_N_FFT // 2 + 1) = (128, 257), float32.

    Triangles with unit peak (no area normalisation), evenly spaced on the HTK mel scale between 20 Hz and
    8 kHz, evaluated in mel at the FFT bin frequencies i * 16000/512 for i < 256; a weight is non-zero only
    strictly between a triangle's edges. The Nyquist bin (256) always gets weight 0 in Kaldi.
    """
    # Computed in float32 in Kaldi's order of operations, on purpose: Kaldi (and torchaudio, which BEATs
    # used) do so, and near a triangle's edge the weight (mel - left) / (centre - left) is a difference of
    # two numbers around 2500 mel, so float32 rounding moves a small weight by up to ~1e-3 of its value.
    # A float64 design would be more exact and differ from Kaldi's features by up to ~1e-3 in the log.
    n_bins = FBANK_N_FFT // 2  # 256: Kaldi's num_fft_bins leaves out the Nyquist bin
    bin_width = SAMPLE_RATE / FBANK_N_FFT  # 31.25 Hz
    fft_mel = _mel_kaldi(torch.arange(n_bins, dtype=torch.float32) * bin_width)  # (256,)
    mel_lo, mel_hi = _mel_kaldi(torch.tensor([FBANK_LOW_FREQ, FBANK_HIGH_FREQ], dtype=torch.float32))
    delta = (mel_hi - mel_lo) / (FBANK_N_MELS + 1)
    b = torch.arange(FBANK_N_MELS, dtype=torch.float32)[:, None]  # (128, 1)
    left, centre, right = mel_lo + b * delta, mel_lo + (b + 1) * delta, mel_lo + (b + 2) * delta
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    weights = torch.where(fft_mel <= centre, rising, falling)
    weights = torch.where((fft_mel > left) & (fft_mel < right), weights, torch.zeros_like(weights))  # (128, 256)
    weights = F.pad(weights, (0, 1))  # (128, 257): zero weight on the Nyquist bin
    return weights.to(device)


@lru_cache(maxsize=None)
def _povey_window(device: torch.device) -> torch.Tensor:
    # Kaldi's windows are symmetric (divide by N - 1), unlike Whisper's periodic Hann
    i = torch.arange(FBANK_FRAME_LENGTH, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * i / (FBANK_FRAME_LENGTH - 1))
    return hann.pow(POVEY_EXPONENT).to(torch.float32).to(device)


def _kaldi_fbank(wavs: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, T, 128): the computation behind kaldi_fbank."""
    frames = wavs.unfold(-1, FBANK_FRAME_LENGTH, FBANK_FRAME_SHIFT)  # (B, T, 400), a strided view
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove_dc_offset, per frame; (B, T, 400) copy
    # Kaldi's pre-emphasis runs inside each frame: x[i] -= 0.97 x[i-1], and the first sample, which has no
    # predecessor in the frame, is treated as its own: x[0] -= 0.97 x[0] (the povey window is 0 there
    # anyway, so with BEATs' options that sample never reaches the FFT)
    emphasised = torch.empty_like(frames)
    torch.sub(frames[..., 1:], frames[..., :-1], alpha=PREEMPHASIS, out=emphasised[..., 1:])
    torch.mul(frames[..., :1], 1 - PREEMPHASIS, out=emphasised[..., :1])
    emphasised *= _povey_window(frames.device)
    spec = torch.fft.rfft(emphasised, n=FBANK_N_FFT)  # (B, T, 257): the FFT zero-pads 400 -> 512
    power = spec.real.square().addcmul_(spec.imag, spec.imag)  # |X|^2
    mel = power @ kaldi_mel_banks(frames.device).T  # (B, T, 128)
    # Kaldi floors the energy at the float epsilon (2**-23) before the log, so silence gives log(eps) = -15.94
    return mel.clamp_(min=torch.finfo(torch.float32).eps).log_()


def kaldi_fbank(wavs: torch.Tensor) -> torch.Tensor:
    """Kaldi's compute-fbank-feats with BEATs' options, on the waveform exactly as given (no scaling).

    wavs: (N,) or (B, N) float, N >= 400. Returns (T, 128) or (B, T, 128) log mel energies (natural log),
    T = 1 + (N - 400) // 160 (snip_edges=True: whole frames only, the first starting at sample 0).
    Per frame: remove the DC offset -> pre-emphasis 0.97 -> povey window -> zero-pad to 512 -> |FFT|^2 ->
    mel (128 HTK-mel triangles, 20 Hz .. 8 kHz) -> log(max(energy, float32 eps)). Dither 0, no energy term.
    """
    wavs, batched = _as_batch(wavs, None, "kaldi_fbank")
    if wavs.shape[-1] < FBANK_FRAME_LENGTH:
        raise AudioError(f"kaldi_fbank needs at least {FBANK_FRAME_LENGTH} samples (one 25 ms frame), "
                         f"got {wavs.shape[-1]}")
    fbank = _by_rows(_kaldi_fbank, wavs)  # (B, T, 128)
    return fbank if batched else fbank[0]


def beats_fbank(wavs, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """BEATs' preprocess: (B, N) or (N,) 16 kHz waveform in [-1, 1] -> (B, T, 128) or (T, 128).

    fbank = kaldi_fbank(wav * 2**15), then (fbank - 15.41663) / (2 * 6.55582), T = 1 + (N - 400) // 160.
    Like the official code, each row of a padded batch is processed over its whole padded length: padded
    zeros give frames too (log(eps) wherever a frame is all zeros), and BEATs masks them later with the
    waveform-level padding mask. padding_mask (B, N) bool, True = padding, if given, zeroes those samples.
    A list of (N_b,) waveforms is padded with pad_batch first.
    """
    wavs, batched = _as_batch(wavs, padding_mask, "beats_fbank")
    fbank = kaldi_fbank(wavs * INT16_SCALE)  # Kaldi works on int16-range samples
    fbank = fbank.sub_(FBANK_MEAN).div_(2 * FBANK_STD)  # (fbank - mean) / (2 * std)
    return fbank if batched else fbank[0]


# ---- manifests ----------------------------------------------------------------------------------------------
# A manifest is a JSON-lines file, one utterance per line (the README has an example per task):
#   id (str, unique), audio (path, relative to the manifest's folder or absolute), task ("asr" | "aac" | "st"),
#   start / end (optional, seconds: a segment of a longer file), duration (optional, seconds, informative),
#   lang (source language; asr, st), tgt_lang (st), transcript (asr, st), caption (aac), translation (st).
# Unknown fields are kept and ignored.
TASKS = ("asr", "aac", "st")
TASK_FIELDS = {"asr": ("transcript",), "aac": ("caption",), "st": ("lang", "tgt_lang", "transcript", "translation")}
TARGET_FIELD = {"asr": "transcript", "aac": "caption", "st": "translation"}
STRING_FIELDS = ("id", "audio", "task", "lang", "tgt_lang", "transcript", "caption", "translation")
NUMBER_FIELDS = ("start", "end", "duration")


class ManifestError(ValueError):
    """A manifest that cannot be used: the message names the file and line (and the field)."""


def read_manifest(path: str | Path, require: Sequence[str] | None = None) -> list[dict]:
    """Read a JSON-lines manifest: a list of entries (dicts), `audio` resolved to an absolute path.

    require: None checks the full format: id, audio, task, and the fields the task needs (TASK_FIELDS); a
        tuple names the only fields that must be there (select_layers.py needs just audio and transcript).
    Whatever the requirement, a field that is present must have its type (strings non-empty, times finite
    numbers with 0 <= start < end), a task must be one of TASKS, and ids must be unique. A bad line is a
    ManifestError "file:line: field 'x' ..."; blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    entries, seen = [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            entry = _parse_line(raw, path, n, require)
            if entry is None:
                continue
            if "id" in entry:
                if entry["id"] in seen:
                    raise ManifestError(f"{path}:{n}: id {entry['id']!r} already used on line {seen[entry['id']]}")
                seen[entry["id"]] = n
            if "audio" in entry:
                entry["audio"] = os.path.abspath(path.parent / entry["audio"])  # no resolve(): keep symlinks
            entries.append(entry)
    if not entries:
        raise ManifestError(f"{path}: the manifest has no entries")
    return entries


def _parse_line(raw: bytes, path: Path, n: int, require: Sequence[str] | None) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            f"manifests are UTF-8 JSON lines") from None
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}:{n}: expected a JSON object, got {type(entry).__name__}")
    where = f"{path}:{n}: field"
    for name in STRING_FIELDS:
        if name in entry:
            value = entry[name]
            if not isinstance(value, str):
                raise ManifestError(f"{where} {name!r} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise ManifestError(f"{where} {name!r} is empty")
    for name in NUMBER_FIELDS:
        if name in entry:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ManifestError(f"{where} {name!r} must be a non-negative number of seconds, got {value!r}")
    if "start" in entry and "end" in entry and entry["start"] >= entry["end"]:
        raise ManifestError(f"{where}s 'start' ({entry['start']}) and 'end' ({entry['end']}): start must come first")
    if "task" in entry and entry["task"] not in TASKS:
        raise ManifestError(f"{where} 'task' must be one of {', '.join(TASKS)}, got {entry['task']!r}")
    needed = require if require is not None else ("id", "audio", "task") + TASK_FIELDS.get(entry.get("task"), ())
    for name in needed:
        if name not in entry:
            raise ManifestError(f"{where} {name!r} is missing"
                                + (f" (a {entry['task']!r} entry needs {', '.join(TASK_FIELDS[entry['task']])})"
                                   if require is None and name in TASK_FIELDS.get(entry.get("task"), ()) else ""))
    return entry


def task_key(entry: dict) -> str:
    """The entry's key in model.INSTRUCTIONS: "asr", "aac" or "st_{lang}_{tgt_lang}" (e.g. "st_en_zh")."""
    return f"st_{entry['lang']}_{entry['tgt_lang']}" if entry["task"] == "st" else entry["task"]


def target_text(entry: dict) -> str:
    """What the model should write: the transcript (asr), the caption (aac) or the translation (st)."""
    return entry[TARGET_FIELD[entry["task"]]]


def write_manifest(entries: Iterable[dict], path: str | Path) -> int:
    """Write entries as JSON lines, atomically: a temporary file in the same folder, renamed when complete,
    so an interrupted run never leaves a partial manifest. Returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return n


# ---- batches for training and evaluation --------------------------------------------------------------------
@dataclass
class Batch:
    """A batch of utterances for the speech LLM. Call .to(device) before use: it moves the waveforms and computes
    both encoders' features there: a few batched FFTs and matrix products on a GPU, where a CPU worker spends
    16-22 ms per 30 s clip on them (as much as on reading it; benchmarks/bench_data.py), and the waveform sent
    is smaller than the features it becomes (1.9 MB against 2.5 MB per 30 s).

    ids, tasks (instruction keys), instructions, targets, transcripts (None where an entry has none): B each
    wavs          (B, N) float32   16 kHz waveforms, zero-padded to the longest
    padding_mask  (B, N) bool      True = padding (BEATs reduces it to its tokens)
    mel           (B, n_mels, n_frames) float32  Whisper's log-mel, after .to()
    fbank         (B, T, 128) float32  BEATs' fbank over the padded batch, T = 1 + (N - 400) // 160, after .to()
    skipped       ids of unreadable entries left out of this batch (only with skip_bad; each was warned about)
    """
    ids: list[str]
    tasks: list[str]
    instructions: list[str]
    targets: list[str]
    transcripts: list[str | None]
    wavs: torch.Tensor
    padding_mask: torch.Tensor
    n_mels: int = 80
    n_frames: int = N_FRAMES
    mel: torch.Tensor | None = None
    fbank: torch.Tensor | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: str | torch.device, non_blocking: bool = False, features: bool = True) -> "Batch":
        """The batch on `device`, with mel and fbank computed there if they are not yet (features=False: the
        waveforms only, for a caller that computes or caches the features itself)."""
        wavs = self.wavs.to(device, non_blocking=non_blocking)
        mask = self.padding_mask.to(device, non_blocking=non_blocking)
        if not features:
            return replace(self, wavs=wavs, padding_mask=mask)
        mel = (self.mel.to(device, non_blocking=non_blocking) if self.mel is not None
               else log_mel_spectrogram(wavs, self.n_mels, padding_mask=mask, n_frames=self.n_frames))
        fbank = self.fbank.to(device, non_blocking=non_blocking) if self.fbank is not None else beats_fbank(wavs)
        return replace(self, wavs=wavs, padding_mask=mask, mel=mel, fbank=fbank)

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this on custom batch types
        return replace(self, wavs=self.wavs.pin_memory(), padding_mask=self.padding_mask.pin_memory())


def collate(items: Sequence[dict | None], n_mels: int = 80, n_frames: int = N_FRAMES) -> Batch:
    """SpeechDataset items -> Batch (waveforms zero-padded, features left to Batch.to). None items (entries
    skipped as unreadable) are left out and listed in batch.skipped."""
    kept = [it for it in items if it is not None and "wav" in it]
    if not kept:
        raise AudioError(f"every entry of this batch was unreadable: {[it['id'] for it in items if it]}")
    wavs, padding_mask = pad_batch([it["wav"] for it in kept])
    return Batch(ids=[it["id"] for it in kept], tasks=[it["task"] for it in kept],
                 instructions=[it["instruction"] for it in kept], targets=[it["target"] for it in kept],
                 transcripts=[it["transcript"] for it in kept], wavs=wavs, padding_mask=padding_mask,
                 n_mels=n_mels, n_frames=n_frames, skipped=[it["id"] for it in items if it and "wav" not in it])


class SpeechDataset(torch.utils.data.Dataset):
    """The entries of one or several manifests, one index space: manifest 0's entries first, then manifest 1's...

    weights: how many times each manifest's utterances are seen per epoch of StreamSampler's stream (1 each by
        default; 2 = twice; 0.5 = a seeded half, a different half each epoch). This is how stage 1 mixes ASR
        with captioning.
    seed: the stream's order and the instruction drawn for each stream position.
    instructions: {task key: [instruction, ...]}, model.INSTRUCTIONS by default; training draws one per item
        from (seed, stream position), evaluation (an int index) takes the first.
    n_mels, n_frames: Whisper's input; max_samples: clips are cut to this many 16 kHz samples, by default the
        n_frames * 160 that Whisper sees (30 s), as SALMONN cuts them (BEATs then never sees more than Whisper,
        and the Q-Former always makes the same number of speech tokens).
    skip_bad: an unreadable audio file is skipped with a warning (missing ones already here, corrupt ones when
        read); otherwise it is an error naming the file and entry. Missing files are looked for here, before any
        model is loaded (check_files=False skips the look).

    Item i (evaluation) or (i, position) (training, from StreamSampler) is a dict with id, task (the key),
    instruction, target, transcript and wav (N,) float32 at 16 kHz; or, for a skipped entry, just its id.
    The entries are kept as one byte buffer of JSON lines, not a list of dicts: forked DataLoader workers read
    a list of a million dicts and touch every refcount, which copies the whole list into each worker.
    """

    def __init__(self, manifests: str | Path | Sequence[str | Path], weights: Sequence[float] | None = None, *,
                 seed: int = 0, instructions: dict[str, Sequence[str]] | None = None,
                 max_samples: int | None = None, n_mels: int = 80, n_frames: int = N_FRAMES,
                 skip_bad: bool = False, check_files: bool = True):
        manifests = [manifests] if isinstance(manifests, (str, Path)) else list(manifests)
        weights = [1.0] * len(manifests) if weights is None else [float(w) for w in weights]
        if not manifests or len(weights) != len(manifests):
            raise ValueError(f"SpeechDataset: {len(manifests)} manifests but {len(weights)} weights")
        if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"SpeechDataset: weights must be >= 0 and not all 0, got {weights}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SpeechDataset: seed must be a non-negative integer, got {seed!r}")
        if instructions is None:
            from model import INSTRUCTIONS as instructions
        self.instructions = {k: list(v) for k, v in instructions.items()}
        self.seed, self.weights, self.skip_bad = int(seed), weights, skip_bad
        self.max_samples, self.n_mels, self.n_frames = max_samples or n_frames * HOP_LENGTH, n_mels, n_frames
        lines, self.sizes = [], []
        for path in manifests:
            entries = read_manifest(path)
            for e in entries:
                if task_key(e) not in self.instructions:
                    raise ManifestError(f"{path}: entry {e['id']!r} has task {task_key(e)!r}, which has no "
                                        f"instructions (known: {', '.join(self.instructions)})")
            if check_files:
                entries = self._check_files(entries, path)
            lines += [json.dumps(e, ensure_ascii=False).encode() for e in entries]
            self.sizes.append(len(entries))
        self.manifests = [str(m) for m in manifests]
        self._offsets = np.cumsum([0] + [len(b) for b in lines])  # (n + 1,) int64
        self._blob = np.frombuffer(b"".join(lines), dtype=np.uint8)

    def _check_files(self, entries: list[dict], manifest) -> list[dict]:
        with ThreadPoolExecutor(16) as pool:  # stat() waits on the disk (or the network), not the CPU
            found = list(pool.map(os.path.isfile, [e["audio"] for e in entries]))
        missing = [e for e, ok in zip(entries, found) if not ok]
        if missing:
            listed = "; ".join(f"{e['id']}: {e['audio']}" for e in missing[:5])
            message = f"{manifest}: {len(missing)} of {len(entries)} audio files are missing ({listed}...)"
            if not self.skip_bad:
                raise FileNotFoundError(message)
            warnings.warn(message + "; skipping them", stacklevel=3)
        return [e for e, ok in zip(entries, found) if ok]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def entry(self, i: int) -> dict:
        return json.loads(self._blob[self._offsets[i]: self._offsets[i + 1]].tobytes())

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, position = (key, None) if isinstance(key, (int, np.integer)) else key
        e = self.entry(int(i))
        choices = self.instructions[task_key(e)]
        pick = 0 if position is None else int(np.random.default_rng([self.seed, position]).integers(len(choices)))
        try:
            wav = load_audio(e["audio"], e.get("start"), e.get("end"), max_samples=self.max_samples, warn_cut=False)
        except (OSError, AudioError) as err:
            message = f"entry {e['id']!r}: {err}"
            if not self.skip_bad:
                raise AudioError(message) from None
            warnings.warn(message + "; skipping it", stacklevel=2)
            return {"id": e["id"]}
        return {"id": e["id"], "task": task_key(e), "instruction": choices[pick], "target": target_text(e),
                "transcript": e.get("transcript"), "wav": wav}

    def collate(self, items: Sequence[dict]) -> Batch:
        return collate(items, self.n_mels, self.n_frames)


class StreamSampler(torch.utils.data.Sampler):
    """Training micro-batches for one rank, deterministic for a seed, resumable at any optimizer step.

    The stream is the concatenation of epochs; an epoch is a seeded permutation of the dataset's mixture (each
    manifest's utterances, each repeated by its weight), so with all weights 1 every utterance is seen exactly
    once per epoch, and a batch may span the boundary between two epochs. With global batch G, micro-batch B,
    world size W and A = G / (B * W) accumulation steps, optimizer step s gives rank r the micro-batches
    k = r*A + m, m = 0..A-1, micro-batch k being the stream positions [s*G + k*B, s*G + (k+1)*B).
    Each micro-batch is a list of B (dataset index, stream position) pairs; it depends only on (seed, mixture,
    G, s, k), so a run resumed at step s (start_step=s, or load_state_dict) gets exactly the micro-batches an
    uninterrupted run would, even on a different number of GPUs with the same G.

    Iterates steps start_step, start_step + 1, ... for ever, or up to num_steps (exclusive) if given.
    Use: DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate, num_workers=N).
    """

    def __init__(self, dataset: SpeechDataset, global_batch: int = 32, micro_batch: int = 8, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, num_steps: int | None = None):
        for name, v in (("global_batch", global_batch), ("micro_batch", micro_batch), ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"StreamSampler: {name} must be a positive integer, got {v!r}")
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"StreamSampler: global_batch {global_batch} is not a multiple of micro_batch "
                             f"{micro_batch} x world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"StreamSampler: rank {rank} is not in [0, {world_size})")
        self.sizes, self.weights, self.seed = list(dataset.sizes), list(dataset.weights), dataset.seed
        self.global_batch, self.micro_batch, self.rank, self.world_size = global_batch, micro_batch, rank, world_size
        self.accumulation = global_batch // (micro_batch * world_size)
        self.start_step, self.num_steps = start_step, num_steps
        self.offsets = np.cumsum([0] + self.sizes)
        self.epoch_size = sum(math.floor(w) * n + round((w - math.floor(w)) * n)
                              for n, w in zip(self.sizes, self.weights))
        if self.epoch_size == 0:
            raise ValueError(f"StreamSampler: the mixture is empty (sizes {self.sizes}, weights {self.weights})")
        self._epoch = (None, None)  # (epoch number, its order): one epoch's permutation kept at a time

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(epoch_size,) int64 dataset indices: epoch `epoch` of the stream."""
        if self._epoch[0] != epoch:
            parts = []
            for m, (n, w) in enumerate(zip(self.sizes, self.weights)):
                whole, frac = math.floor(w), w - math.floor(w)
                part = [np.tile(np.arange(n), whole)]
                if round(frac * n):  # a fractional weight: a seeded subset, a different one each epoch
                    part.append(np.random.default_rng([self.seed, epoch, m]).permutation(n)[: round(frac * n)])
                parts.append(self.offsets[m] + np.concatenate(part))
            mixture = np.concatenate(parts)
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(mixture))
        return self._epoch[1]

    def micro_batch_at(self, step: int, k: int) -> list[tuple[int, int]]:
        """Micro-batch k (0 <= k < W*A) of optimizer step `step`: B (dataset index, stream position) pairs."""
        first = step * self.global_batch + k * self.micro_batch
        batch = []
        for position in range(first, first + self.micro_batch):
            epoch, offset = divmod(position, self.epoch_size)
            batch.append((int(self.epoch_order(epoch)[offset]), position))
        return batch

    @property
    def steps_per_epoch(self) -> float:
        return self.epoch_size / self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            for m in range(self.accumulation):
                yield self.micro_batch_at(step, self.rank * self.accumulation + m)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("StreamSampler without num_steps is endless")
        return max(0, self.num_steps - self.start_step) * self.accumulation

    def state_dict(self, step: int) -> dict:
        """What to save in a checkpoint taken before optimizer step `step`; load_state_dict resumes there."""
        return {"step": step, "seed": self.seed, "global_batch": self.global_batch, "sizes": self.sizes,
                "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"]; the stream (seed, G, manifests' sizes, weights) must be the saved one."""
        mine = self.state_dict(state["step"])
        changed = [k for k in mine if k != "step" and state.get(k) != mine[k]]
        if changed:
            raise ValueError("cannot resume this data stream: " + ", ".join(
                f"{k} was {state.get(k)!r}, now {mine[k]!r}" for k in changed))
        self.start_step = state["step"]


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation batches for one rank: a contiguous shard of the indices 0..n-1 (rank r of W gets
    [r*n//W, (r+1)*n//W)), in order, in batches of batch_size (the last may be smaller). Nothing is padded
    or repeated, unlike DistributedSampler: every entry is evaluated exactly once over all ranks."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: batch_size {batch_size}, rank {rank}, world_size {world_size}")
        self.indices = range(rank * n // world_size, (rank + 1) * n // world_size)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[i: i + self.batch_size])

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


def load_batch(entries: Sequence[dict | str | Path], n_mels: int = 80, device: str | torch.device = "cpu",
               n_frames: int = N_FRAMES):
    """Audio files or manifest entries (audio + optional start/end) -> the inputs of both encoders, as SALMONN's
    collater makes them; each clip cut to Whisper's n_frames * 160 samples (30 s). Layer selection uses it.

    Returns mel (B, n_mels, n_frames), fbank (B, T, 128) over the zero-padded batch, and the waveform-level
    padding mask (B, N_max), True = padding, which BEATs reduces to its tokens.
    """
    entries = [e if isinstance(e, dict) else {"audio": e} for e in entries]
    wavs, padding_mask = pad_batch([load_audio(e["audio"], e.get("start"), e.get("end"), max_samples=n_frames * HOP_LENGTH)
                                    for e in entries])
    wavs, padding_mask = wavs.to(device), padding_mask.to(device)
    mel = log_mel_spectrogram(wavs, n_mels=n_mels, padding_mask=padding_mask, n_frames=n_frames)
    return mel, beats_fbank(wavs), padding_mask


# ---- corpora -> manifests: python data.py prepare CORPUS --root ... --out ... --------------------------------
# Each reader turns a corpus, as its publisher ships it, into candidate entries (audio as an absolute path) and
# the items it had to leave out with the reason; _finish then checks every audio file by its header (present,
# readable, long enough for its segment, not too long), writes the manifest atomically and prints counts, hours
# and every skipped item.
# LibriSpeech and GigaSpeech transcripts are upper case; SALMONN's own training annotation gives LibriSpeech in
# sentence case ("Chapter one missus rachel lynde is surprised ...", bytedance/SALMONN data/example_data.json),
# so that is the default here (--case lower | upper | sentence); SLAM-LLM's asr_librispeech README shows cased,
# punctuated targets, which the corpus does not have. WER is computed after normalisation anyway.
def _cased(text: str, case: str) -> str:
    """Whitespace collapsed; "sentence": lower case with a capital at the start and after . ? !"""
    text = " ".join(text.split())
    if case == "sentence":
        return re.sub(r"(^|[.?!] )([a-z])", lambda m: m[1] + m[2].upper(), text.lower())
    return text.lower() if case == "lower" else text.upper()


def _read_table(path: Path, delimiter: str, **kw) -> list[dict]:
    """A CSV/TSV with a header row -> list of dicts; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        try:
            return list(csv.DictReader(f, delimiter=delimiter, **kw))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: cannot parse ({e})") from None


def _require_columns(rows: list[dict], columns: Sequence[str], path: Path) -> None:
    if rows and not set(columns) <= set(rows[0]):
        raise ManifestError(f"{path}: expected columns {', '.join(columns)}, found {', '.join(rows[0])}")


def _index_files(root: Path, extensions=(".wav", ".flac", ".mp3", ".ogg", ".opus")) -> dict[str, str]:
    """Every audio file under root by its name (downloaders and unzipped archives nest folders differently)."""
    found = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            if name.lower().endswith(extensions):
                found.setdefault(name, os.path.join(folder, name))
    return found


def read_covost2(root: Path, split: str = "train", tgt_lang: str = "zh-CN", clips: Path | None = None,
                 cv_tsv: Path | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """CoVoST 2 En->X over Common Voice 4 English (paper: En->Zh and En->Ja; 289k / 15.5k / 15.5k).

    root holds either the per-split TSV written by the official split script, covost_v2.en_{tgt}.{split}.tsv
    (columns path, sentence, translation, client_id), or the released covost_v2.en_{tgt}.tsv (path,
    translation, split) and then cv_tsv must be Common Voice's validated.tsv (path, sentence, client_id): the
    two are joined on path as the script does, train taking split "train" and "train_covost". Both are read as
    the script writes them: tab-separated, no quoting, backslash escapes (facebookresearch/covost
    get_covost_splits.py). Audio: Common Voice's clips/<path> (mp3, 48 kHz), clips defaulting to root/clips.
    tgt_lang is CoVoST's code (zh-CN, ja); the manifest's tgt_lang is its language part (zh, ja).
    """
    tsv = dict(delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
    per_split = root / f"covost_v2.en_{tgt_lang}.{split}.tsv"
    if per_split.is_file():
        rows = _read_table(per_split, **tsv)
        _require_columns(rows, ("path", "sentence", "translation"), per_split)
    else:
        released = root / f"covost_v2.en_{tgt_lang}.tsv"
        if cv_tsv is None:
            raise FileNotFoundError(f"neither {per_split} nor --cv-tsv (Common Voice's validated.tsv, to join with "
                                    f"{released}) was given")
        rows = _read_table(released, **tsv)
        _require_columns(rows, ("path", "translation", "split"), released)
        sentences = {r["path"]: r["sentence"] for r in _read_table(Path(cv_tsv), **tsv)}
        wanted = {"train", "train_covost"} if split == "train" else {split}
        rows = [{**r, "sentence": sentences.get(r["path"])} for r in rows if r["split"] in wanted]
    clips = Path(clips) if clips else root / "clips"
    entries, skipped = [], []
    for r in rows:
        uid = Path(r["path"]).stem
        if r["sentence"] is None:
            skipped.append((uid, f"not in {cv_tsv} (the official script's inner join leaves it out too)"))
            continue
        if not r["sentence"].strip() or not r["translation"].strip():
            skipped.append((uid, "empty transcript or translation"))
            continue
        entries.append({"id": uid, "audio": str(clips / r["path"]), "task": "st", "lang": "en",
                        "tgt_lang": tgt_lang.split("-")[0], "transcript": r["sentence"].strip(),
                        "translation": r["translation"].strip()})
    return entries, skipped


def read_librispeech(root: Path, splits: Sequence[str] = (), case: str = "sentence"):
    """LibriSpeech: <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt, one "<id> <TEXT>" line per
    utterance, beside <id>.flac (16 kHz). root is the LibriSpeech/ folder; splits default to every folder in it
    (train-clean-100, train-clean-360, train-other-500 for the paper's 960 h; test-clean for layer selection)."""
    splits = list(splits) or sorted(p.name for p in root.iterdir() if p.is_dir())
    entries, skipped = [], []
    for split in splits:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"LibriSpeech split not found: {root / split}")
        for trans in sorted((root / split).glob("*/*/*.trans.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                uid, _, text = line.strip().partition(" ")
                if not uid:
                    continue
                if not text.strip():
                    skipped.append((uid, f"empty transcript in {trans}"))
                    continue
                entries.append({"id": uid, "audio": str(trans.parent / f"{uid}.flac"), "task": "asr", "lang": "en",
                                "transcript": _cased(text, case)})
    return entries, skipped


GIGASPEECH_PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GIGASPEECH_GARBAGE = ("<SIL>", "<MUSIC>", "<NOISE>", "<OTHER>")


def read_gigaspeech(root: Path, subset: str = "{M}", case: str = "sentence"):
    """GigaSpeech: root/GigaSpeech.json, {"audios": [{"aid", "path" (e.g. audio/podcast/P0001/POD0000000001.opus,
    relative to root), "segments": [{"sid", "begin_time", "end_time", "text_tn", "subsets": ["{XL}", "{M}", ...]}]}]}
    (SpeechColab/GigaSpeech toolkits/kaldi/extract_meta.py reads the same keys). Segments of `subset` ({M} is
    the paper's 1,000 h; {DEV}, {TEST} the evaluation sets) become entries with start/end in the hour-long
    opus file. text_tn is upper case with punctuation as tags: the four tags become , . ? ! attached to the
    word before; a segment with a garbage tag (<SIL> <MUSIC> <NOISE> <OTHER>, which the dev/test annotators put
    on non-speech; the publisher recommends dropping them) is skipped, as is any other tag."""
    meta = root / "GigaSpeech.json"
    if not meta.is_file():
        raise FileNotFoundError(f"not found: {meta}")
    with open(meta, encoding="utf-8") as f:
        audios = json.load(f)["audios"]
    entries, skipped = [], []
    for audio in audios:
        for seg in audio.get("segments", []):
            if subset not in seg.get("subsets", []):
                continue
            words = seg.get("text_tn", "").split()
            garbage = [w for w in words if w in GIGASPEECH_GARBAGE]
            unknown = [w for w in words if w.startswith("<") and w not in GIGASPEECH_PUNCTUATION and w not in garbage]
            if garbage or unknown:
                skipped.append((seg["sid"], f"{'garbage' if garbage else 'unknown'} tag {(garbage or unknown)[0]}"))
                continue
            text = " ".join(words)
            for tag, mark in GIGASPEECH_PUNCTUATION.items():
                text = text.replace(f" {tag}", mark).replace(tag, mark)
            if not text.strip(" ,.?!"):
                skipped.append((seg["sid"], "empty transcript"))
                continue
            entries.append({"id": seg["sid"], "audio": str(root / audio["path"]), "start": seg["begin_time"],
                            "end": seg["end_time"], "task": "asr", "lang": "en", "transcript": _cased(text, case)})
    return entries, skipped


def read_audiocaps(root: Path, split: str = "train", audio_dir: Path | None = None):
    """AudioCaps: root/{train,val,test}.csv with columns audiocap_id, youtube_id, start_time, caption (one row
    per caption: val and test have five rows per clip; cdjkim/audiocaps dataset/README.md). The 10-s clips
    come from YouTube through third-party downloaders, so a clip is looked for under audio_dir (default root)
    by any of the names they give it: {youtube_id}_{start_time}.<ext> (aac-datasets), Y{youtube_id}.<ext>
    (AudioSet style, as WavCaps' AudioCaps lists name them), {youtube_id}.<ext>, {audiocap_id}.<ext>."""
    path = root / f"{split}.csv"
    rows = _read_table(path, ",")
    _require_columns(rows, ("audiocap_id", "youtube_id", "start_time", "caption"), path)
    files = _index_files(Path(audio_dir) if audio_dir else root)
    entries, skipped = [], []
    for r in rows:
        uid, yt, start = r["audiocap_id"], r["youtube_id"], r["start_time"]
        names = [f"{yt}_{start}", f"Y{yt}", yt, uid]
        found = next((files[n + e] for n in names for e in (".wav", ".flac", ".mp3", ".ogg", ".opus") if n + e in files),
                     None)
        if not r["caption"].strip():
            skipped.append((uid, "empty caption"))
        elif found is None:
            skipped.append((uid, f"missing audio file (looked for {yt}_{start}.*, Y{yt}.*, {yt}.*, {uid}.*)"))
        else:
            entries.append({"id": uid, "audio": found, "task": "aac", "caption": " ".join(r["caption"].split())})
    return entries, skipped


def read_clotho(root: Path, split: str = "development"):
    """Clotho v2: root/clotho_captions_{development,validation,evaluation}.csv with columns file_name,
    caption_1 .. caption_5 (five captions per file), and the audio of each split extracted from
    clotho_audio_<split>.7z into root/<split>/<file_name> (44.1 kHz wav; the publisher's Zenodo record and
    aac-datasets' Clotho loader use these names). One entry per caption, id <file stem>_<k>."""
    path = root / f"clotho_captions_{split}.csv"
    rows = _read_table(path, ",")
    columns = [f"caption_{k}" for k in range(1, 6)]
    _require_columns(rows, ["file_name"] + columns, path)
    entries, skipped = [], []
    for r in rows:
        stem = Path(r["file_name"]).stem
        for k, column in enumerate(columns, 1):
            uid = f"{stem}_{k}"
            if not (r[column] or "").strip():
                skipped.append((uid, "empty caption"))
                continue
            entries.append({"id": uid, "audio": str(root / split / r["file_name"]), "task": "aac",
                            "caption": " ".join(r[column].split())})
    return entries, skipped


WAVCAPS_SOURCES = {"AudioSet_SL": "as_final.json", "BBC_Sound_Effects": "bbc_final.json",
                   "FreeSound": "fsd_final.json", "SoundBible": "sb_final.json"}


def read_wavcaps(root: Path, sources: Sequence[str] = (), audio_dir: Path | None = None):
    """WavCaps: root/json_files/<source>/<name>_final.json, {"num_captions_per_audio": 1, "data": [{"id",
    "caption", "audio", "duration", ...}]} (an early SoundBible file is a bare list), as the publisher's own
    loader reads them (XinhaoMei/WavCaps retrieval/data_handling/pretrain_dataset.py); its "audio" is a
    placeholder. The audio ships as zipped flac (huggingface cvssp/WavCaps) whose folders nest differently
    once unpacked, so a file is looked for by name under audio_dir (default root): AudioSet_SL's id
    "Y<yt>.wav" is the file Y<yt>.flac, every other source's id <id> is <id>.flac (aac-datasets' WavCaps
    loader names them the same way). Clips longer than 180 s are dropped by _finish (the paper's filter)."""
    files = _index_files(Path(audio_dir) if audio_dir else root, (".flac", ".wav"))
    entries, skipped = [], []
    for source in sources or WAVCAPS_SOURCES:
        if source not in WAVCAPS_SOURCES:
            raise ValueError(f"unknown WavCaps source {source!r}; known: {', '.join(WAVCAPS_SOURCES)}")
        path = root / "json_files" / source / WAVCAPS_SOURCES[source]
        if not path.is_file():
            raise FileNotFoundError(f"not found: {path}")
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
        for item in items["data"] if isinstance(items, dict) else items:
            name = item["id"].replace(".wav", ".flac") if source == "AudioSet_SL" else f"{item['id']}.flac"
            uid = f"{source}/{Path(name).stem}"
            if not (item.get("caption") or "").strip():
                skipped.append((uid, "empty caption"))
            elif name not in files:
                skipped.append((uid, f"missing audio file {name}"))
            else:
                entries.append({"id": uid, "audio": files[name], "task": "aac", "caption": " ".join(item["caption"].split())})
    return entries, skipped


def _header(path: str) -> tuple[float, str | None]:
    """(duration in seconds, None) from the header, or (0, the reason it cannot be used)."""
    try:
        frames, sr = audio_info(path)
        return frames / sr, None
    except FileNotFoundError:
        return 0.0, "missing audio file"
    except AudioError as e:
        return 0.0, str(e)


_PARALLEL_HEADERS = 2000  # fewer files than this are read in this process (starting workers costs ~0.1 s)


def _headers(paths: Iterable[str], workers: int | None = None) -> dict[str, tuple[float, str | None]]:
    """_header of every distinct path, in worker processes for many (opening a file with soundfile is ~100 us
    of mostly Python, so threads would wait on each other's GIL)."""
    unique = list(dict.fromkeys(paths))
    workers = workers or os.cpu_count() or 1
    if len(unique) < _PARALLEL_HEADERS or workers == 1:
        return {p: _header(p) for p in unique}
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers) as pool:
        return dict(zip(unique, pool.map(_header, unique, chunksize=512)))


def _finish(entries: list[dict], skipped: list[tuple[str, str]], out: Path, max_seconds: float | None) -> dict:
    """Check every entry's audio by its header, write the manifest atomically, print counts, hours, skips."""
    out = Path(out)
    headers = _headers(e["audio"] for e in entries)
    kept, seen = [], set()
    for e in entries:
        duration, problem = headers[e["audio"]]
        if problem is None and "end" in e and e["end"] > duration + SEGMENT_END_SLACK:
            problem = f"segment ends at {e['end']} s, after the end of {e['audio']} ({duration:.2f} s)"
        length = (e.get("end", duration) - e.get("start", 0.0)) if problem is None else 0.0
        if problem is None and max_seconds is not None and length > max_seconds:
            problem = f"too long: {length:.1f} s > {max_seconds:g} s"
        if problem is None and e["id"] in seen:
            problem = "duplicate id"
        if problem:
            skipped.append((e["id"], problem))
            continue
        seen.add(e["id"])
        e["duration"] = round(length, 3)
        kept.append(e)
    base = out.parent.resolve()
    for e in kept:  # paths under the manifest's folder are written relative to it, so the folder can move
        rel = os.path.relpath(e["audio"], base)
        e["audio"] = e["audio"] if rel.startswith("..") else rel
    for uid, reason in skipped:
        print(f"skipped {uid}: {reason}")
    if not kept:
        raise ManifestError(f"nothing to write to {out}: all {len(skipped)} items were skipped")
    write_manifest(kept, out)
    hours = sum(e["duration"] for e in kept) / 3600
    print(f"wrote {out}: {len(kept)} entries, {hours:.2f} h; skipped {len(skipped)}")
    return {"entries": len(kept), "hours": hours, "skipped": len(skipped)}


# ---- python data.py check MANIFEST ------------------------------------------------------------------------------
def check_manifest(path: str | Path, workers: int | None = None) -> dict:
    """Every line parsed, every audio file read by its header, every segment inside its file. Prints the lines
    that would fail (file:line: reason), then counts and hours per task; returns them with "failed"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    failures, parsed, seen = [], [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                entry = _parse_line(raw, path, n, None)
            except ManifestError as e:
                failures.append(str(e))
                continue
            if entry is None:
                continue
            if entry["id"] in seen:
                failures.append(f"{path}:{n}: id {entry['id']!r} already used on line {seen[entry['id']]}")
                continue
            seen[entry["id"]] = n
            entry["audio"] = os.path.abspath(path.parent / entry["audio"])
            parsed.append((n, entry))
    headers = _headers((e["audio"] for _, e in parsed), workers)
    hours, counts, long = {}, {}, 0
    for n, e in parsed:
        duration, problem = headers[e["audio"]]
        if problem is None and (e.get("end", 0.0) > duration + SEGMENT_END_SLACK or e.get("start", 0.0) >= duration):
            problem = f"segment [{e.get('start', 0)}, {e.get('end')}) s is not inside the file ({duration:.2f} s)"
        if problem:
            failures.append(f"{path}:{n}: {e['audio']}: {problem}")
            continue
        key = task_key(e)
        length = min(e.get("end", duration), duration) - e.get("start", 0.0)
        hours[key] = hours.get(key, 0.0) + length / 3600
        counts[key] = counts.get(key, 0) + 1
        long += length > CHUNK_LENGTH
    for line in failures:
        print(line)
    for key in sorted(counts):
        print(f"{key}: {counts[key]} entries, {hours[key]:.2f} h")
    if long:
        print(f"{long} entries are longer than {CHUNK_LENGTH} s: training and evaluation keep their first {CHUNK_LENGTH} s")
    print(f"{path}: {sum(counts.values())} good entries, {len(failures)} failing lines")
    return {"counts": counts, "hours": hours, "failed": failures, "longer_than_30s": long}


PREPARE = {"covost2": read_covost2, "librispeech": read_librispeech, "gigaspeech": read_gigaspeech,
           "audiocaps": read_audiocaps, "clotho": read_clotho, "wavcaps": read_wavcaps}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="turn a corpus, as published, into a manifest")
    prep.add_argument("corpus", choices=sorted(PREPARE))
    prep.add_argument("--root", type=Path, required=True, help="the corpus's folder (see each reader's docstring)")
    prep.add_argument("--out", type=Path, required=True, help="the manifest to write (.jsonl)")
    prep.add_argument("--split", help="covost2: train|dev|test (train); audiocaps: train|val|test (train); "
                                      "clotho: development|validation|evaluation (development)")
    prep.add_argument("--splits", help="librispeech: comma-separated split folders (default: all)")
    prep.add_argument("--tgt-lang", default="zh-CN", help="covost2: CoVoST's target code, zh-CN or ja (zh-CN)")
    prep.add_argument("--clips", type=Path, help="covost2: Common Voice's clips/ folder (default ROOT/clips)")
    prep.add_argument("--cv-tsv", type=Path, help="covost2: Common Voice's validated.tsv, with the released TSV")
    prep.add_argument("--subset", default="{M}", help="gigaspeech: {XS} {S} {M} {L} {XL} {DEV} {TEST} ({M})")
    prep.add_argument("--sources", help="wavcaps: comma-separated, of " + ", ".join(WAVCAPS_SOURCES) + " (all)")
    prep.add_argument("--audio-dir", type=Path, help="audiocaps, wavcaps: where the audio files are (ROOT)")
    prep.add_argument("--case", choices=("sentence", "lower", "upper"), default="sentence",
                      help="librispeech, gigaspeech: transcript casing (sentence, as SALMONN's annotation)")
    prep.add_argument("--max-seconds", type=float, help="drop longer clips (wavcaps: 180, the paper's filter)")
    chk = sub.add_parser("check", help="check manifests: every line, every audio header, hours per task")
    chk.add_argument("manifests", nargs="+", type=Path)
    args = parser.parse_args(argv)

    if args.command == "check":
        return int(any(check_manifest(m)["failed"] for m in args.manifests))
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a folder")
    if args.out.exists() and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give the manifest's file name")
    c = args.corpus
    kwargs = {"covost2": dict(split=args.split or "train", tgt_lang=args.tgt_lang, clips=args.clips, cv_tsv=args.cv_tsv),
              "librispeech": dict(splits=args.splits.split(",") if args.splits else (), case=args.case),
              "gigaspeech": dict(subset=args.subset, case=args.case),
              "audiocaps": dict(split=args.split or "train", audio_dir=args.audio_dir),
              "clotho": dict(split=args.split or "development"),
              "wavcaps": dict(sources=args.sources.split(",") if args.sources else (), audio_dir=args.audio_dir)}[c]
    max_seconds = args.max_seconds if args.max_seconds is not None else (180.0 if c == "wavcaps" else None)
    try:
        entries, skipped = PREPARE[c](args.root, **kwargs)
        _finish(entries, skipped, args.out, max_seconds)
    except (OSError, ValueError) as e:
        print(f"data.py prepare {c}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
