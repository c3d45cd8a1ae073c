"""Speed of the ears against the references they are tested equal to: our log-mel and fbank (data.py) and
our Whisper encoder (model.py) against WhisperFeatureExtractor, kaldi-native-fbank and transformers'
WhisperEncoder.

    python benchmarks/bench_audio.py [--batch 16] [--seconds 30] [--repeats 10] [--threads N]
    python benchmarks/bench_audio.py --device cuda --dtype bf16 --real-size   # + whisper-large-v2 and BEATs on a GPU
    python benchmarks/bench_audio.py --device cuda --dtype bf16 --real-size --encoders-only   # the encoders alone
    python benchmarks/bench_audio.py --resample --threads 1    # data.resample from 14 rates, 1 kHz..384 kHz

Each comparison is one function that times our code and the reference on the same inputs (a warm-up call
first, then the best of --repeats, the two taking turns) and returns (ours_s, ref_s). main() prints one line
per comparison and, as its last line, the ratios ours/ref from a dict:
`logmel_ratio=... fbank_ratio=... whisper_ratio=...` (below 1: we are faster). The features are timed on
the CPU (the references run there); the Whisper encoder on --device: by default a whisper-tiny-sized
encoder (d 384, 4 layers) on batch 2 x 30 s, with --real-size whisper-large-v2 on batch --batch x 30 s,
plus the real-size BEATs (no reference implementation exists to race it against).

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
from model import BEATs, BEATsConfig, WhisperEncoder, WhisperEncoderConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the encoder of whisper-tiny: small enough for a 2-core CPU, with the real 1500 positions
WHISPER_SMALL = WhisperEncoderConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                     encoder_ffn_dim=1536, num_mel_bins=80, max_source_positions=1500)


def race(ours, ref, repeats: int, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Seconds of the fastest of `repeats` calls of each, after one untimed warm-up call of each.

    The two are called in turn (ours, ref, ours, ref, ...) so that a busy machine slows both alike.
    """
    def run(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(ours), run(ref)
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for k, fn in enumerate((ours, ref)):
            best[k] = min(best[k], run(fn))
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


def bench_whisper(device: torch.device, dtype: torch.dtype, real_size: bool, batch: int,
                  repeats: int) -> tuple[float, float]:
    """Our WhisperEncoder vs transformers' on the same weights (shared tensors) and input; eval, no_grad."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    cfg = WhisperEncoderConfig.from_name("whisper-large-v2") if real_size else WHISPER_SMALL
    torch.manual_seed(0)
    hf_cfg = WhisperConfig(d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
                           encoder_attention_heads=cfg.encoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
                           num_mel_bins=cfg.num_mel_bins, max_source_positions=cfg.max_source_positions,
                           attn_implementation="sdpa")
    hf = HFWhisperEncoder(hf_cfg).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        ours = WhisperEncoder(cfg)
    ours.load_state_dict(hf.state_dict(), assign=True)   # identical key names: the very same tensors
    ours.requires_grad_(False).eval()
    mel = torch.randn(batch, cfg.num_mel_bins, cfg.n_frames, device=device, dtype=dtype)
    with torch.no_grad():
        diff = (ours(mel).float() - hf(mel).last_hidden_state.float()).abs().max().item()
        assert diff <= (1e-4 if dtype == torch.float32 else 5e-2), diff   # the same work
        return race(lambda: ours(mel), lambda: hf(mel).last_hidden_state, repeats, device)


def bench_beats(device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> float:
    """The real-size BEATs (random weights) on `batch` x 30 s of fbank (2998 frames -> 1496 tokens)."""
    torch.manual_seed(0)
    model = BEATs(BEATsConfig.from_name("beats-iter3-plus-as2m-cpt2")).to(device=device, dtype=dtype)
    fbank = torch.randn(batch, 2998, 128, device=device, dtype=dtype)
    with torch.no_grad():
        return race(lambda: model(fbank), lambda: None, repeats, device)[0]


def whisper_flops(cfg: WhisperEncoderConfig) -> float:
    """Matmul FLOPs of the Whisper encoder on one 30-s clip: the two convolutions, then per layer the q/k/v/o
    and MLP projections (2·d·(4d + 2·ffn) per position) and attention's scores and values (4·T²·d).
    Also bench_speech_llm.py's count for its step."""
    d, T = cfg.d_model, cfg.max_source_positions
    conv = 2 * (3 * cfg.num_mel_bins) * d * (2 * T) + 2 * (3 * d) * d * T
    return conv + cfg.encoder_layers * (2 * d * (4 * d + 2 * cfg.encoder_ffn_dim) * T + 4 * T ** 2 * d)


def beats_flops(cfg: BEATsConfig, frames: int = 2998) -> float:
    """Matmul FLOPs of BEATs on one clip of `frames` fbank frames: the patch embedding, the projection to the
    encoder width, the grouped convolutional position embedding, then per layer as whisper_flops."""
    p, d = cfg.input_patch_size, cfg.encoder_embed_dim
    T = (frames // p) * (128 // p)
    embed = (2 * p * p * cfg.embed_dim * T + 2 * cfg.embed_dim * d * T
             + 2 * d * (d // cfg.conv_pos_groups) * cfg.conv_pos * T)
    return embed + cfg.encoder_layers * (2 * d * (4 * d + 2 * cfg.encoder_ffn_embed_dim) * T + 4 * T ** 2 * d)


def rate(flops: float, seconds: float, peak: float | None) -> str:
    """'x TFLOP/s' and, with the device's peak (TFLOP/s), the MFU."""
    r = flops / seconds / 1e12
    return f"{r:.1f} TFLOP/s" + (f" = MFU {100 * r / peak:.1f}% of {peak:g}" if peak else "")


RESAMPLE_RATES = [44100, 48000, 8000, 22050, 32000, 88200, 96000, 192000, 384000,  # common rates
                  11127, 16001, 22254, 47999, 96001, 383999]                          # odd ones (small gcd)


def resample_quality(sr: int) -> tuple[float, float]:
    """(error in dB of tones below 7 kHz against the same tones made at 16 kHz, attenuation in dB of a tone at
    8008 Hz, just above the new Nyquist frequency), 2 s of float64 tones, 800 samples left out at each edge."""
    def tones(rate, n, freqs):
        t = np.arange(n) / rate
        return sum(0.15 * np.sin(2 * np.pi * f * t + k) for k, f in enumerate(freqs))
    n = 2 * sr + 17
    freqs = [f for f in (100, 440, 1000, 2500, 5000, 6900) if f < 0.4 * sr]
    y = data.resample(torch.from_numpy(tones(sr, n, freqs)).float(), sr, data.SAMPLE_RATE).numpy()[800:-800]
    ref = tones(data.SAMPLE_RATE, math.ceil(n * data.SAMPLE_RATE / sr), freqs)[800:-800]
    error = 10 * math.log10(((y - ref) ** 2).sum() / (ref ** 2).sum())
    if sr <= 2 * 8008:
        return error, float("nan")
    x = tones(sr, n, [8008])
    y = data.resample(torch.from_numpy(x).float(), sr, data.SAMPLE_RATE).numpy().astype(np.float64)[800:-800]
    return error, 10 * math.log10((y ** 2).mean() / (x ** 2).mean())


def bench_resample(seconds: float, repeats: int) -> dict[int, float]:
    """data.resample of `seconds` of noise from each rate to 16 kHz: the first call (which designs the filter
    bank), the best later call, the bank's size, the quality (resample_quality); and soxr's VHQ resampler
    (libsoxr, the library ffmpeg and librosa use) on the same input, if it is installed.
    Returns {rate: best seconds}."""
    try:
        import soxr
    except ImportError:
        soxr = None
    times = {}
    for sr in RESAMPLE_RATES:
        x = torch.randn(int(seconds * sr), generator=torch.Generator().manual_seed(sr))
        data._BANKS.clear()
        start = time.perf_counter()
        data.resample(x, sr, data.SAMPLE_RATE)
        first = time.perf_counter() - start
        times[sr] = race(lambda: data.resample(x, sr, data.SAMPLE_RATE), lambda: None, repeats)[0]
        bank = sum(data._bank_shape(*stage[:4])[0] * data._bank_shape(*stage[:4])[1] * data._bank_shape(*stage[:4])[2]
                   for stage in data._resample_stages(sr, data.SAMPLE_RATE))
        error, stop = resample_quality(sr)
        line = (f"resample {sr:6d} Hz: {times[sr] * 1e3:7.1f} ms ({times[sr] / times[44100]:.2f} x 44.1 kHz), "
                f"first call {first * 1e3:7.1f} ms, bank {bank * 4 / 2**20:5.1f} MB, tones < 7 kHz {error:6.1f} dB, "
                f"8008 Hz {stop:6.1f} dB")
        if soxr is not None:
            xs = x.numpy()
            t_soxr = race(lambda: soxr.resample(xs, sr, data.SAMPLE_RATE, quality="VHQ"), lambda: None, repeats)[0]
            line += f", soxr VHQ {t_soxr * 1e3:7.1f} ms"
        print(line)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the encoders run (the features run on the CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the encoders' dtype")
    parser.add_argument("--resample", action="store_true",
                        help="only time data.resample from each of RESAMPLE_RATES to 16 kHz (--seconds of noise)")
    parser.add_argument("--real-size", action="store_true",
                        help="time whisper-large-v2 (and BEATs) on --batch x 30 s instead of a small encoder on 2")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s in --dtype, for the encoders' MFU")
    parser.add_argument("--encoders-only", action="store_true",
                        help="skip the CPU features (on a GPU machine without kaldi-native-fbank, for example)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resample:
        times = bench_resample(args.seconds, args.repeats)
        print(f"resample_worst_ratio={max(times.values()) / times[44100]:.3f} "
              f"resample_worst_rate={max(times, key=times.get)}")
        return
    clips = make_clips(args.batch, args.seconds)
    print(f"batch {args.batch} x {args.seconds:g} s at 16 kHz, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, best of {args.repeats} after a warm-up")
    ratios = {}
    for name, bench, what in [] if args.encoders_only else [("logmel", bench_logmel, "WhisperFeatureExtractor"),
                                                            ("fbank", bench_fbank, "kaldi-native-fbank")]:
        ours_s, ref_s = bench(clips, args.repeats)
        print(f"{name:8s} ours {ours_s * 1e3:8.1f} ms   {what} {ref_s * 1e3:8.1f} ms")
        ratios[f"{name}_ratio"] = ours_s / ref_s
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.real_size:
        t = bench_beats(device, dtype, args.batch, args.repeats)
        flops = args.batch * beats_flops(BEATsConfig.from_name("beats-iter3-plus-as2m-cpt2"))
        print(f"beats    ours {t * 1e3:8.1f} ms   (iter3+ preset, batch {args.batch} x 30 s, {args.dtype}, {device}; "
              f"{flops / 1e12:.2f} TFLOP: {rate(flops, t, args.peak_tflops)})")
    batch = args.batch if args.real_size else 2
    ours_s, ref_s = bench_whisper(device, dtype, args.real_size, batch, args.repeats)
    size = "whisper-large-v2" if args.real_size else "whisper-tiny-sized encoder"
    print(f"whisper  ours {ours_s * 1e3:8.1f} ms   transformers' WhisperEncoder {ref_s * 1e3:8.1f} ms   "
          f"({size}, batch {batch} x 3000 frames, {args.dtype}, {device})")
    cfg = WhisperEncoderConfig.from_name("whisper-large-v2") if args.real_size else WHISPER_SMALL
    flops = batch * whisper_flops(cfg)
    print(f"whisper  {flops / 1e12:.2f} TFLOP: ours {rate(flops, ours_s, args.peak_tflops)}, "
          f"transformers {rate(flops, ref_s, args.peak_tflops)}")
    ratios["whisper_ratio"] = ours_s / ref_s
    print(" ".join(f"{key}={value:.3f}" for key, value in ratios.items()))


if __name__ == "__main__":
    main()
