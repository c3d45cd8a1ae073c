"""data.py, the audio front end, against its references.

- Whisper log-mel  == transformers' WhisperFeatureExtractor (built from its constructor, nothing downloaded)
- BEATs fbank      == kaldi-native-fbank with BEATs' options (C++ port of Kaldi's compute-fbank-feats)
- resample         == the analytic signal at the new rate (tones), with >= 60 dB rejection above Nyquist
- reading          == what soundfile wrote, for wav / flac / ogg / mp3, with clear errors on bad files
"""
import math
import re

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

import data

SR = data.SAMPLE_RATE


# ---- test signals (16 kHz, float32, deterministic) ----------------------------------------------------------
def tilted_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise with a speech-like -6 dB/octave tilt: white noise shaped by 1/|1 - 0.97 z^-1|."""
    spec = np.fft.rfft(rng.standard_normal(n))
    z = np.exp(-2j * np.pi * np.fft.rfftfreq(n))
    x = np.fft.irfft(spec / np.abs(1 - 0.97 * z), n)
    return x / x.std()


def chirp_noise(seconds=5.0, seed=0, chirp_amp=0.2, noise_amp=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0, f1 = 50.0, 7900.0  # linear sweep over the whole band
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))
    return (chirp_amp * chirp + noise_amp * tilted_noise(t.size, rng)).astype(np.float32)


def speech_like(seconds=7.0, seed=1) -> np.ndarray:
    """A gliding 100-180 Hz harmonic source, 4 Hz 'syllable' envelope, over a noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 43))  # harmonics up to 43 * 180 Hz < 8 kHz
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.1 * envelope * voiced + 0.02 * tilted_noise(t.size, rng)).astype(np.float32)


def long_clip(seconds=31.0, seed=2) -> np.ndarray:
    """Longer than Whisper's 30 s: a tone sliding between 300 Hz and 6.3 kHz, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    freq = 300 + 3000 * (1 + np.sin(2 * np.pi * t / seconds))
    return (0.2 * np.sin(2 * np.pi * np.cumsum(freq) / SR) + 0.1 * tilted_noise(t.size, rng)).astype(np.float32)


SIGNALS = {
    "chirp+noise 5 s": chirp_noise(),
    "silence 2 s": np.zeros(2 * SR, dtype=np.float32),
    "speech-like 7 s": speech_like(),
    "long 31 s": long_clip(),
}


def tones(sr: int, n: int, freqs, amp=0.15) -> np.ndarray:
    """Sum of sines sampled at sr, time 0 at sample 0, in float64."""
    t = np.arange(n) / sr
    return sum(amp * np.sin(2 * np.pi * f * t + k) for k, f in enumerate(freqs))


def error_db(y, ref) -> float:
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return 10 * math.log10(((y - ref) ** 2).sum() / (ref**2).sum())


# ---- Whisper log-mel ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_librosa_slaney(n_mels):
    # transformers' mel_filter_bank with norm/mel_scale "slaney" is librosa.filters.mel(htk=False, norm="slaney")
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=SR, norm="slaney", mel_scale="slaney")  # (201, n_mels) float64
    ours = data.mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref.T, rtol=0, atol=1e-7)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    names = list(SIGNALS)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    ref = extractor(list(SIGNALS.values()), sampling_rate=SR, padding="max_length", truncation=True,
                    return_tensors="pt").input_features  # (4, n_mels, 3000)
    ours = data.log_mel_spectrogram([torch.from_numpy(x) for x in SIGNALS.values()], n_mels=n_mels)
    assert ours.shape == ref.shape == (len(names), n_mels, data.N_FRAMES)
    for i, name in enumerate(names):
        diff = (ours[i] - ref[i]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max |diff| {diff:.2e}"
        # one clip alone gives the same features as inside the batch: the floor (max - 8) is per clip
        alone = data.log_mel_spectrogram(torch.from_numpy(SIGNALS[name]), n_mels=n_mels)
        assert alone.shape == (n_mels, data.N_FRAMES)
        torch.testing.assert_close(alone, ours[i], rtol=0, atol=1e-6)
    # silence: log10(1e-10) everywhere -> (-10 + 4) / 4
    assert torch.all(ours[names.index("silence 2 s")] == -1.5)


def test_log_mel_of_a_shorter_encoder_window_matches_whisper_feature_extractor():
    # a smaller Whisper (the toy world's) takes fewer frames: HF's extractor with chunk_length=6 -> 600 frames
    clips = [SIGNALS["chirp+noise 5 s"], SIGNALS["speech-like 7 s"]]   # one shorter, one longer than 6 s
    ref = WhisperFeatureExtractor(feature_size=80, chunk_length=6)(
        clips, sampling_rate=SR, padding="max_length", truncation=True, return_tensors="pt").input_features
    ours = data.log_mel_spectrogram([torch.from_numpy(x) for x in clips], n_frames=600)
    assert ours.shape == ref.shape == (2, 80, 600)
    assert (ours - ref).abs().max().item() <= 1e-4   # float32 STFT vs HF's float64 numpy: 1e-4 as above


def test_log_mel_padded_batch_with_mask():
    clips = [torch.from_numpy(SIGNALS["chirp+noise 5 s"]), torch.from_numpy(SIGNALS["speech-like 7 s"][: 3 * SR])]
    wavs, mask = data.pad_batch(clips)
    assert wavs.shape == mask.shape == (2, 5 * SR)
    expected = data.log_mel_spectrogram(clips)
    torch.testing.assert_close(data.log_mel_spectrogram(wavs), expected, rtol=0, atol=0)  # padded zeros
    noisy = wavs.masked_fill(mask, 0.5)  # whatever the padding holds, the mask removes it
    torch.testing.assert_close(data.log_mel_spectrogram(noisy, padding_mask=mask), expected, rtol=0, atol=0)
    assert not torch.allclose(data.log_mel_spectrogram(noisy), expected)


def test_log_mel_rejects_bad_input():
    with pytest.raises(data.AudioError, match="shape"):
        data.log_mel_spectrogram(torch.zeros(1, 2, SR))
    with pytest.raises(data.AudioError, match="floating point"):
        data.log_mel_spectrogram(torch.zeros(SR, dtype=torch.int16))
    bad = torch.zeros(SR)
    bad[100] = float("nan")
    with pytest.raises(data.AudioError, match="NaN"):
        data.log_mel_spectrogram(bad)
    with pytest.raises(data.AudioError, match="mel bins"):
        data.log_mel_spectrogram(torch.zeros(SR), n_mels=64)
    with pytest.raises(data.AudioError, match="padding_mask"):
        data.log_mel_spectrogram(torch.zeros(2, SR), padding_mask=torch.zeros(2, SR - 1, dtype=torch.bool))


# ---- BEATs' Kaldi fbank -------------------------------------------------------------------------------------
def knf_fbank(wav: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank with BEATs' options (torchaudio.compliance.kaldi.fbank's defaults): (T, 128)."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.dither = 0.0  # knf's default is 3e-5; torchaudio's fbank (BEATs) uses 0
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 128
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0  # 0 = Nyquist
    opts.mel_opts.is_librosa = False  # Kaldi's own HTK-style mel banks
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SR, np.ascontiguousarray(wav, dtype=np.float32))
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def test_kaldi_mel_banks_match_kaldi_native_fbank():
    opts = knf.MelBanksOptions()
    opts.num_bins = 128
    frame_opts = knf.FrameExtractionOptions()
    ref = np.array(knf.MelBanks(opts, frame_opts).get_matrix())  # (128, 257)
    ours = data.kaldi_mel_banks()
    assert ours.shape == ref.shape == (128, 257)
    # Both compute (mel - left) / (centre - left) in float32 with mel up to 2840 (8 kHz), so each weight carries
    # a few ulps of 2840 (2.4e-4 each) divided by a triangle's width of 21.8 mel: allow 4 ulps / width = 4.5e-5
    # (measured: 1.1e-5 with kaldi-native-fbank 1.22.5, whose float32 order of operations differs from ours).
    width = (1127 * math.log(1 + 8000 / 700) - 1127 * math.log(1 + 20 / 700)) / 129
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=4 * np.spacing(np.float32(2840)) / width)
    assert (ours.numpy() == 0).tolist() == (ref == 0).tolist()  # the same support, bin for bin


@pytest.mark.parametrize("name", list(SIGNALS))
def test_fbank_matches_kaldi_native_fbank(name):
    wav = SIGNALS[name]
    ref = knf_fbank(wav * 2**15)  # BEATs scales to the int16 range first
    n_frames = 1 + (len(wav) - 400) // 160
    assert ref.shape == (n_frames, 128)
    ours = data.kaldi_fbank(torch.from_numpy(wav) * 2**15)
    assert ours.shape == ref.shape
    raw_diff = np.abs(ours.numpy() - ref).max()
    assert raw_diff <= 1e-3, f"{name}: max |diff| of log energies {raw_diff:.2e}"
    # after BEATs' normalisation (which also does the x 2**15 itself): the difference shrinks by 2 * 6.55582
    normalised = data.beats_fbank(torch.from_numpy(wav))
    ref_normalised = (ref - 15.41663) / (2 * 6.55582)
    norm_diff = np.abs(normalised.numpy() - ref_normalised).max()
    assert norm_diff <= 1e-4, f"{name}: max |diff| after normalisation {norm_diff:.2e}"


def test_fbank_float32_ill_conditioned_bins():
    """A loud chirp over faint white noise: some low mel bands (each holds one FFT bin there, after the 0.97
    pre-emphasis has taken ~30 dB off) sit 1e-7..1e-12 below the frame's strongest band. Float32 rounding of
    the FFT alone moves those log energies by up to a few 1e-2, in Kaldi as in torch, so agreement to 1e-3
    is expected, and checked, only where a band holds >= e^-15 (3e-7) of the frame's largest mel energy."""
    rng = np.random.default_rng(0)
    t = np.arange(7 * SR) / SR
    wav = (0.5 * np.sin(2 * np.pi * (50 * t + 7850 / 14 * t**2)) + 0.01 * rng.standard_normal(t.size)) * 2**15
    ref = knf_fbank(wav)
    ours = data.kaldi_fbank(torch.from_numpy(wav.astype(np.float32))).numpy()
    well_conditioned = ref - ref.max(axis=1, keepdims=True) >= -15.0
    assert well_conditioned.mean() > 0.6
    assert np.abs(ours - ref)[well_conditioned].max() <= 1e-3
    # and where it is not, both float32 results scatter around the float64 value by the same order
    frames = torch.from_numpy(wav).unfold(0, 400, 160)  # float64 all the way
    frames = frames - frames.mean(-1, keepdim=True)
    frames = torch.cat([frames[:, :1] * 0.03, frames[:, 1:] - 0.97 * frames[:, :-1]], dim=-1)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(400, dtype=torch.float64) / 399)) ** 0.85
    power = torch.fft.rfft(frames * window, n=512).abs() ** 2
    exact = (power @ data.kaldi_mel_banks().double().T).clamp(min=np.finfo(np.float32).eps).log().numpy()
    ill = ~well_conditioned
    assert np.abs(ref - exact)[ill].max() < 0.1 and np.abs(ours - exact)[ill].max() < 0.1


def test_beats_fbank_on_a_padded_batch():
    clips = [SIGNALS["speech-like 7 s"][: 2 * SR], SIGNALS["chirp+noise 5 s"], SIGNALS["silence 2 s"][:SR]]
    wavs, mask = data.pad_batch([torch.from_numpy(c) for c in clips])
    assert wavs.shape == mask.shape == (3, 5 * SR) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3 * SR, 0, 4 * SR]
    fbank = data.beats_fbank(wavs)
    n_frames = 1 + (5 * SR - 400) // 160  # every row is framed over its whole padded length, as in BEATs
    assert fbank.shape == (3, n_frames, 128)
    for i, clip in enumerate(clips):
        # each row equals Kaldi on the zero-padded row...
        ref = (knf_fbank(wavs[i].numpy() * 2**15) - 15.41663) / (2 * 6.55582)
        assert np.abs(fbank[i].numpy() - ref).max() <= 1e-4
        # ...its frames inside the clip equal the clip processed alone...
        alone = data.beats_fbank(torch.from_numpy(clip))
        inside = 1 + (len(clip) - 400) // 160
        torch.testing.assert_close(fbank[i, :inside], alone, rtol=0, atol=1e-5)
        # ...and frames made only of padding hold log(float eps), normalised
        first_padding_only = -(-len(clip) // 160)
        padding_value = (math.log(np.finfo(np.float32).eps) - 15.41663) / (2 * 6.55582)
        torch.testing.assert_close(fbank[i, first_padding_only:],
                                   torch.full_like(fbank[i, first_padding_only:], padding_value))
    # a noisy padding region is zeroed by the mask
    noisy = wavs.masked_fill(mask, 0.3)
    torch.testing.assert_close(data.beats_fbank(noisy, padding_mask=mask), fbank, rtol=0, atol=0)


def test_fbank_rejects_bad_input():
    with pytest.raises(data.AudioError, match="400 samples"):
        data.beats_fbank(torch.zeros(399))
    with pytest.raises(data.AudioError, match="shape"):
        data.beats_fbank(torch.zeros(2, 2, SR))
    bad = torch.zeros(2, SR)
    bad[1, 5] = float("inf")
    with pytest.raises(data.AudioError, match="NaN or inf"):
        data.beats_fbank(bad)
    with pytest.raises(data.AudioError, match="empty"):
        data.pad_batch([])
    with pytest.raises(data.AudioError, match="1-D"):
        data.pad_batch([torch.zeros(2, SR)])


# ---- resampling ---------------------------------------------------------------------------------------------
def resampled_error_db(orig_sr: int, freqs, seconds=2.0, edge=800) -> float:
    """Resample tones to 16 kHz and compare with the same tones generated at 16 kHz, away from the edges
    (where the filter sees the zeros outside the signal)."""
    n = int(seconds * orig_sr) + 17  # not a whole number of output periods
    y = data.resample(torch.from_numpy(tones(orig_sr, n, freqs)).float(), orig_sr, SR)
    assert y.dtype == torch.float32 and y.shape == (math.ceil(n * SR / orig_sr),)
    ref = tones(SR, y.shape[0], freqs)
    return error_db(y.numpy()[edge:-edge], ref[edge:-edge])


# Measured (tones, away from the edges): -119 to -122 dB below 7 kHz at every rate here, -100.8 dB at 8008 Hz,
# -110 dB at 8.5 kHz. The thresholds leave 10-20 dB of room. 16001 and 11127 Hz are the odd rates that once
# needed 2 GB and 7.4 GB of filter bank; 88201 goes through the two-stage path with an odd first stage.
@pytest.mark.parametrize("orig_sr", [48000, 44100, 22050, 32000, 16001, 11127, 88201])
def test_resample_passes_tones_below_7khz(orig_sr):
    freqs = [f for f in [100, 440, 1000, 2500, 5000, 6900] if f < 0.4 * orig_sr]
    assert resampled_error_db(orig_sr, freqs) <= -100.0


def test_resample_upsamples_8khz():
    assert resampled_error_db(8000, [100, 440, 1000, 2500, 3500]) <= -100.0


@pytest.mark.parametrize("freq", [8500, 10000, 40100])
@pytest.mark.parametrize("orig_sr", [48000, 44100, 22050, 96000, 88201])
def test_resample_rejects_tones_above_8khz(orig_sr, freq):
    if freq >= orig_sr / 2:
        pytest.skip("above the input's Nyquist frequency")
    n = 2 * orig_sr
    x = tones(orig_sr, n, [freq])  # above 16 kHz's Nyquist: 8.5 kHz would alias to 7.5 kHz, 10 kHz to 6 kHz,
    y = data.resample(torch.from_numpy(x).float(), orig_sr, SR).numpy().astype(np.float64)  # 40.1 kHz to 100 Hz
    attenuation_db = 10 * math.log10((y[800:-800] ** 2).mean() / (x**2).mean())
    assert attenuation_db <= -100.0


def test_resample_bank_cache_stays_within_its_budget(monkeypatch):
    x = torch.from_numpy(SIGNALS["speech-like 7 s"])[:SR]
    monkeypatch.setattr(data, "_BANKS", {})
    monkeypatch.setattr(data, "_BANK_CACHE", 50_000)  # numbers; the banks below hold 10 k to 38 k each
    for sr in (44100, 8000, 32000, 24000, 44100):
        y = data.resample(x, sr, SR)
        assert sum(bank.numel() for bank, _, _ in data._BANKS.values()) <= 50_000
        torch.testing.assert_close(y, data.resample(x, sr, SR), rtol=0, atol=0)  # the same with the bank cached
    assert len(data._BANKS) == 2  # 44.1 kHz's two stages (7.5 k + 38 k) evicted everything else


def test_resample_bank_is_bounded_at_every_rate():
    """The weights of every stage stay below 9.5 M numbers (38 MB) for rates from 1 kHz to 384 kHz (a sweep of
    the bank's shape, which is integer arithmetic; designing them all would take hours)."""
    rates = list(range(1000, 384001, 997)) + [11127, 16001, 22254, 32001, 47999, 96001, 383999, 384000]
    worst = 0
    for sr in rates:
        for rate_in, rate_out, cutoff, zeros, _ in data._resample_stages(sr, SR):
            q, kb, p, _ = data._bank_shape(rate_in, rate_out, cutoff, zeros)
            worst = max(worst, q * kb * p)
    assert worst <= 9.5e6


def test_resample_identity_and_batch():
    x = torch.from_numpy(SIGNALS["speech-like 7 s"])
    assert data.resample(x, SR, SR) is x  # 16 kHz passes unchanged
    batch = torch.stack([x[:SR * 3], x[SR:SR * 4]]) * torch.tensor([[1.0], [0.5]])  # (2, N)
    out = data.resample(batch, 44100, SR)
    assert out.shape == (2, math.ceil(3 * SR * SR / 44100))
    for i in range(2):
        torch.testing.assert_close(out[i], data.resample(batch[i], 44100, SR), rtol=0, atol=1e-6)
    with pytest.raises(data.AudioError, match="sample rate"):
        data.resample(x, 0, SR)
    with pytest.raises(data.AudioError, match="sample rate"):
        data.resample(x, 44100.5, SR)


# ---- reading files ------------------------------------------------------------------------------------------
FORMATS = {  # extension: (soundfile format, subtype, lossless?)
    "wav": ("WAV", "PCM_16", True),
    "flac": ("FLAC", "PCM_16", True),
    "ogg": ("OGG", "VORBIS", False),
    "mp3": ("MP3", "MPEG_LAYER_III", False),
}


@pytest.mark.parametrize("ext", list(FORMATS))
def test_read_formats(tmp_path, ext):
    fmt, subtype, lossless = FORMATS[ext]
    x = tones(SR, int(1.5 * SR) + 37, [220, 440, 1000, 2500, 5000]).astype(np.float32)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    wav, sr = data.read_audio(path)
    assert sr == SR and wav.dtype == torch.float32
    # Exactly the written length even for the lossy codecs: libsndfile writes LAME's gapless (Xing/Info)
    # header into mp3 and Ogg granule positions into Vorbis, and trims encoder delay and padding on reading.
    assert wav.shape == (len(x),)
    if lossless:
        assert np.abs(wav.numpy() - x).max() <= 1 / 2**15  # 16-bit quantisation
    else:
        assert error_db(wav.numpy(), x) <= -20.0  # measured: about -30 (Vorbis) and -37 dB (mp3)
    loaded = data.load_audio(path)  # 16 kHz already, > 1 s: read_audio's samples, unchanged
    torch.testing.assert_close(loaded, wav, rtol=0, atol=0)


def test_load_48khz_mp3_like_covost2(tmp_path):
    freqs = [200, 700, 1500, 3000, 6000]
    x = tones(48000, 2 * 48000, freqs).astype(np.float32)
    path = tmp_path / "common_voice_en_1.mp3"
    sf.write(path, x, 48000, format="MP3", subtype="MPEG_LAYER_III")
    wav = data.load_audio(path)
    assert wav.shape == (2 * SR,) and wav.dtype == torch.float32
    assert error_db(wav.numpy()[800:-800], tones(SR, 2 * SR, freqs)[800:-800]) <= -20.0


def test_stereo_is_averaged(tmp_path):
    left = tones(SR, 2 * SR, [300])
    right = tones(SR, 2 * SR, [1200])
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1).astype(np.float32), SR, subtype="FLOAT")
    wav, _ = data.read_audio(path)
    np.testing.assert_allclose(wav.numpy(), (left + right) / 2, rtol=0, atol=1e-6)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        data.load_audio(path)


def test_empty_files(tmp_path):
    zero_bytes = tmp_path / "zero_bytes.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(data.AudioError, match=re.escape(str(zero_bytes))):
        data.load_audio(zero_bytes)
    no_samples = tmp_path / "no_samples.flac"
    sf.write(no_samples, np.zeros(0, dtype=np.float32), SR)  # a valid header and nothing else
    with pytest.raises(data.AudioError, match=re.escape(str(no_samples))):
        data.load_audio(no_samples)


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3"])
def test_corrupt_files(tmp_path, ext):
    path = tmp_path / f"garbage.{ext}"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(data.AudioError, match=re.escape(str(path))):
        data.load_audio(path)


def test_truncated_wav_header(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, tones(SR, SR, [440]).astype(np.float32), SR)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:30])  # the header ends before the 'data' chunk
    with pytest.raises(data.AudioError, match=re.escape(str(cut))):
        data.load_audio(cut)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples(tmp_path, bad_value):
    x = tones(SR, 2 * SR, [440]).astype(np.float32)
    x[1234] = bad_value
    path = tmp_path / "non_finite.wav"
    sf.write(path, x, SR, subtype="FLOAT")  # float wav can store NaN and inf
    with pytest.raises(data.AudioError, match=re.escape(str(path))):
        data.load_audio(path)


def test_short_clip_is_padded_to_one_second(tmp_path):
    x = tones(SR, SR // 2, [440]).astype(np.float32)
    path = tmp_path / "half_second.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    wav = data.load_audio(path)
    assert wav.shape == (SR,)
    np.testing.assert_array_equal(wav[: SR // 2].numpy(), x)
    assert torch.all(wav[SR // 2:] == 0)


def test_long_clip_is_cut_to_30_s_with_a_warning(tmp_path):
    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal(31 * 48000)).astype(np.float32)
    path = tmp_path / "thirty_one_seconds.wav"
    sf.write(path, x, 48000, subtype="FLOAT")
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        wav = data.load_audio(path)
    assert wav.shape == (data.N_SAMPLES,)
    # the cut is made after resampling: the last samples see the real signal beyond 30 s, not zeros
    full = data.resample(torch.from_numpy(x), 48000, SR)
    torch.testing.assert_close(wav, full[: data.N_SAMPLES], rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_features_on_cuda():
    clips = [torch.from_numpy(SIGNALS["chirp+noise 5 s"]), torch.from_numpy(SIGNALS["speech-like 7 s"])]
    wavs, mask = data.pad_batch(clips)
    cuda_wavs, cuda_mask = wavs.cuda(), mask.cuda()
    torch.testing.assert_close(data.log_mel_spectrogram(cuda_wavs, padding_mask=cuda_mask).cpu(),
                               data.log_mel_spectrogram(wavs, padding_mask=mask), rtol=0, atol=1e-4)
    torch.testing.assert_close(data.beats_fbank(cuda_wavs).cpu(), data.beats_fbank(wavs), rtol=0, atol=1e-4)
    torch.testing.assert_close(data.resample(cuda_wavs, 48000, SR).cpu(), data.resample(wavs, 48000, SR),
                               rtol=0, atol=1e-5)
