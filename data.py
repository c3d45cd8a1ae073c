"""The audio front end of SALMONN / AI-STA: an audio file becomes the inputs of the two encoders.

    load_audio(path)             file -> mono float32 waveform at 16 kHz, padded to >= 1 s, cut to <= 30 s
    pad_batch(wavs)              B waveforms -> (B, N_max) zero-padded + (B, N_max) padding mask
    log_mel_spectrogram(wavs)    Whisper's input: (B, n_mels, 3000) log-mel, always 30 s
    beats_fbank(wavs)            BEATs' input: (B, T, 128) normalised Kaldi fbank, T = 1 + (N - 400) // 160

Quirks worth knowing (each one is commented where it happens):
- Whisper always sees 30 s: every clip is zero-padded (or trimmed) to 480000 samples *before* the STFT, so
  its dynamic-range floor (max - 8) is taken over the padded clip, and a batch member never sees another.
- Whisper's centred STFT makes 3001 frames from 480000 samples; the last one is dropped (3000 frames).
- BEATs runs Kaldi's fbank on the waveform scaled to the int16 range (x 2**15), because Kaldi's log
  energies, and the mean/std BEATs normalises with, were computed on int16 audio.
- Kaldi frames with snip_edges=True: only whole 25 ms frames, the first starting at sample 0. In a padded
  batch BEATs computes frames over the padded zeros too; its encoder masks them later.
- SALMONN assumes 16 kHz input; CoVoST2's clips are 48 kHz mp3, so everything is resampled here with a
  Kaiser-windowed sinc (polyphase, rational ratio) written out below.

Everything after the file read is torch in float32 on the input's device (CPU or CUDA).
"""
import math
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import soundfile as sf
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
def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read any format libsndfile knows (wav, flac, ogg/vorbis/opus, mp3) and average the channels.

    Returns (wav (N,) float32 in [-1, 1], sample_rate). Raises FileNotFoundError for a missing file and
    AudioError for an empty, undecodable or non-finite one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    try:
        samples, sample_rate = sf.read(path, dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError) as err:
        # libsndfile's own messages can mislead (a bad mp3 reads "File does not exist"), so say what happened
        raise AudioError(f"cannot decode audio file {path}: {err}") from err
    if samples.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {path}")
    wav = torch.from_numpy(samples).mean(dim=1)  # (N,); SALMONN keeps channel 0 of stereo, we average
    if not _all_finite(wav):
        raise AudioError(f"audio file contains NaN or inf samples: {path}")
    return wav, int(sample_rate)


def load_audio(path: str | Path) -> torch.Tensor:
    """SALMONN's audio loading, plus resampling: file -> mono 16 kHz waveform (N,), float32.

    1 s <= N / 16000 <= 30 s: shorter clips are zero-padded at the end to 1 s, longer ones are cut to their
    first 30 s with a warning naming the file.
    """
    wav, sr = read_audio(path)
    if wav.shape[0] > CHUNK_LENGTH * sr:
        warnings.warn(f"{path}: {wav.shape[0] / sr:.2f} s is longer than {CHUNK_LENGTH} s; "
                      f"keeping the first {CHUNK_LENGTH} s", stacklevel=2)
        # keep a margin beyond 30 s so the resampling filter near the cut sees real signal, not zeros
        wav = wav[: CHUNK_LENGTH * sr + _resample_margin(sr, SAMPLE_RATE)]
    wav = resample(wav, sr, SAMPLE_RATE)[:N_SAMPLES]
    if wav.shape[0] < MIN_SAMPLES:
        wav = F.pad(wav, (0, MIN_SAMPLES - wav.shape[0]))
    return wav


# ---- resampling -------------------------------------------------------------------------------------------
def resample(wav: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Band-limited resampling by a rational factor: (..., N) at orig_sr -> (..., ceil(N * new_sr / orig_sr)).

    With up/down = new_sr/orig_sr reduced by their gcd, output sample n = i*up + j lies at input time
    t = i*down + j*down/up (in input samples), and
        y[n] = sum_m x[m] * h(t - m),   h(t) = b * sinc(b * t) * kaiser(t),   b = 2 * cutoff / orig_sr,
    a low-pass at `cutoff` = RESAMPLE_ROLLOFF * min(orig_sr, new_sr) / 2 Hz, a bit below the lower Nyquist
    frequency so that the transition band ends before anything can alias. The sum is one conv1d with stride
    `down` whose `up` output channels are the `up` phases j (the polyphase filter bank), interleaved after.
    Samples outside the signal count as zeros. Equal rates return the input unchanged; otherwise the
    output is float32 on the input's device.
    """
    orig_sr, new_sr = _check_rate(orig_sr), _check_rate(new_sr)
    if not torch.is_floating_point(wav):
        raise AudioError(f"resample expects a floating-point waveform, got {wav.dtype}")
    if orig_sr == new_sr:
        return wav
    if wav.shape[-1] == 0:
        raise AudioError("resample got an empty waveform")
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    kernel, left = _resample_kernel(orig_sr, new_sr, wav.device)  # (up, 1, K), taps before t
    n_in = wav.shape[-1]
    n_out = -(-n_in * up // down)  # ceil
    n_blocks = -(-n_out // up)  # conv outputs per phase
    k = kernel.shape[-1]
    x = wav.reshape(-1, 1, n_in).to(torch.float32)  # (B, 1, N)
    # conv output i reads x_padded[i*down : i*down + K] = x[i*down - left : ...]: pad so every block exists
    x = F.pad(x, (left, max(0, (n_blocks - 1) * down + k - left - n_in)))
    y = F.conv1d(x, kernel, stride=down)[..., :n_blocks]  # (B, up, n_blocks): y[b, j, i] = output i*up + j
    y = y.transpose(1, 2).reshape(x.shape[0], n_blocks * up)[:, :n_out]
    return y.reshape(*wav.shape[:-1], n_out)


def _check_rate(sr) -> int:
    if isinstance(sr, float) and sr.is_integer():
        sr = int(sr)
    if not isinstance(sr, int) or sr <= 0:
        raise AudioError(f"sample rates must be positive integers, got {sr!r}")
    return sr


def _resample_half_width(orig_sr: int, new_sr: int) -> float:
    """Half-length of the resampling filter, in input samples: RESAMPLE_ZEROS zero crossings of the sinc."""
    cutoff = RESAMPLE_ROLLOFF * min(orig_sr, new_sr) / 2
    return RESAMPLE_ZEROS * orig_sr / (2 * cutoff)


def _resample_margin(orig_sr: int, new_sr: int) -> int:
    return math.ceil(_resample_half_width(orig_sr, new_sr)) + 1


@lru_cache(maxsize=16)
def _resample_kernel(orig_sr: int, new_sr: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The polyphase filter bank, (up, 1, K) float32, and the number of taps that precede the output instant.

    Designed in float64 on the CPU (it is a constant), then moved to the device.
    """
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    bandwidth = RESAMPLE_ROLLOFF * min(orig_sr, new_sr) / orig_sr  # b = 2 * cutoff / orig_sr
    half = _resample_half_width(orig_sr, new_sr)
    left = math.ceil(half)
    right = math.ceil(half + (up - 1) * down / up)  # the last phase sits (up-1)*down/up samples later
    taps = torch.arange(-left, right + 1, dtype=torch.float64)  # input offsets r = m - i*down
    phase = torch.arange(up, dtype=torch.float64) * down / up  # t_j = j*down/up
    t = phase[:, None] - taps[None, :]  # (up, K): time from each input sample to the output instant
    beta = torch.tensor(RESAMPLE_BETA, dtype=torch.float64)
    inside = t.abs() <= half
    window = torch.special.i0(beta * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / torch.special.i0(beta)
    h = bandwidth * torch.sinc(bandwidth * t) * window * inside
    return h.to(torch.float32)[:, None, :].to(device), left


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


# ---- manifests and batches --------------------------------------------------------------------------------
# A manifest is a JSON-lines file, one utterance per line:
#   {"audio": "clips/common_voice_en_1.mp3", "transcript": "the source text", "target": "译文", "task": "st_en_zh"}
# `audio` is a path, absolute or relative to the manifest's folder; the text fields a stage needs must be
# there (layer selection: transcript; training: target; the joint stage: both).

def read_manifest(path: str | Path, require: Sequence[str] = ("audio",)) -> list[dict]:
    """Read a JSONL manifest; each entry's `audio` is resolved against the manifest's folder.

    Every line must be a JSON object with the fields in `require` (non-empty strings); a bad line is an
    error naming the file, the line number and the field.
    """
    import json
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    entries = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(entry).__name__}")
            for field in require:
                if not isinstance(entry.get(field), str) or not entry[field].strip():
                    raise ValueError(f"{path}:{n}: field {field!r} is missing or empty")
            if "audio" in entry:
                entry["audio"] = str((path.parent / entry["audio"]).resolve())
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: the manifest has no entries")
    return entries


def load_batch(paths: Sequence[str | Path], n_mels: int = 80, device: str | torch.device = "cpu"):
    """Audio files -> the inputs of both encoders, as SALMONN's collater makes them.

    Returns mel (B, n_mels, 3000), fbank (B, T, 128) over the zero-padded batch, and the waveform-level
    padding mask (B, N_max), True = padding, which BEATs reduces to its tokens.
    """
    wavs, padding_mask = pad_batch([load_audio(p) for p in paths])
    wavs, padding_mask = wavs.to(device), padding_mask.to(device)
    return log_mel_spectrogram(wavs, n_mels=n_mels, padding_mask=padding_mask), beats_fbank(wavs), padding_mask
