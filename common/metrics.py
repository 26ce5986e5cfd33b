"""Objective metrics for codecs and audio LMs, and a picture to compare two signals.

Shape letters: B batch, C audio channels, T samples, F frames, Q codebooks, K codebook size.

Signal metrics take a reference and an estimate of the same shape, (T,) or batched (..., T),
at the same sample rate, and return a Python float: the mean over all leading dimensions
(items and channels alike). Lower is better for `mel_distance` and `stft_distance`, higher for
`si_sdr`, `pesq` and `stoi`. They are for evaluation; the model files write their own losses.

- `mel_distance`  multi-scale log-mel L1 of the Descript Audio Codec (DAC, Kumar et al. 2023)
- `stft_distance` multi-resolution STFT distance of Parallel WaveGAN (Yamamoto et al. 2020)
- `si_sdr`        scale-invariant SDR (Le Roux et al. 2019)
- `pesq`, `stoi`  through the `pesq` and `pystoi` packages (wide-band PESQ at 16 kHz)
- `codebook_stats` codebook usage, entropy, perplexity and bitrates of a batch of codes
- `plot_comparison` waveforms and spectrograms of a reference and a reconstruction, as a PNG
"""

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from common.audio import resample

# ---------------------------------------------------------------------------------------------
# Spectrograms
# ---------------------------------------------------------------------------------------------


def _hz_to_mel(f, htk):
    """Hz -> mel. HTK: 2595 log10(1 + f / 700). Slaney (Auditory Toolbox, librosa's default):
    linear below 1 kHz (3 / 200 mel per Hz), logarithmic above (27 mels per factor 6.4)."""
    if htk:
        return 2595.0 * torch.log10(1.0 + f / 700.0)  # the HTK Book's mel formula (Young et al.)
    f_sp, min_log_hz = 200.0 / 3, 1000.0  # Slaney's Auditory Toolbox constants, as in librosa.hz_to_mel
    logstep = math.log(6.4) / 27.0
    return torch.where(f >= min_log_hz, min_log_hz / f_sp + torch.log(f.clamp(min=min_log_hz) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m, htk):
    """Inverse of `_hz_to_mel`."""
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=64)
def _mel_filterbank64(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm):
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # (n_freq,) bin centres
    mel_lo, mel_hi = _hz_to_mel(torch.tensor([fmin, fmax], dtype=torch.float64), htk)
    edges = _mel_to_hz(torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64), htk)  # (n_mels + 2,)
    widths = edges.diff()  # (n_mels + 1,)
    ramps = edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freq)
    rising = -ramps[:-2] / widths[:-1, None]  # (n_mels, n_freq)
    falling = ramps[2:] / widths[1:, None]  # (n_mels, n_freq)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)  # triangles
    if norm == "slaney":
        weights = weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # constant energy per band
    return weights


def mel_filterbank(sample_rate, n_fft, n_mels, fmin=0.0, fmax=None, htk=False, norm="slaney"):
    """Triangular mel filterbank (n_mels, n_fft // 2 + 1), float32, equal to `librosa.filters.mel`.

    Same arguments as librosa: `htk` picks the HTK mel scale instead of Slaney's, `norm` is
    "slaney" (each triangle divided by its width in Hz, so bands carry equal energy) or None
    (peak 1). Built in float64 and cached; the returned tensor is a fresh float32 copy.
    """
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    fmax = None if fmax is None else float(fmax)
    return _mel_filterbank64(int(sample_rate), int(n_fft), int(n_mels), float(fmin), fmax, bool(htk), norm).float()


def stft(x, n_fft, hop_length, win_length=None, center=True):
    """Complex STFT (..., n_fft // 2 + 1, F) of `x` (..., T) with a periodic Hann window.

    A thin wrapper over `torch.stft` that accepts any leading dims. `win_length` defaults to
    `n_fft` (a shorter window is zero-padded to `n_fft` in the middle). With `center=True` the
    signal is reflect-padded by n_fft // 2 on both sides, so F = 1 + T // hop_length; this needs
    T > n_fft // 2.
    """
    win_length = n_fft if win_length is None else win_length
    *lead, length = x.shape
    if center and length <= n_fft // 2:
        raise ValueError(f"signal of {length} samples is too short for an STFT with n_fft={n_fft} (needs more than {n_fft // 2})")
    window = torch.hann_window(win_length, periodic=True, dtype=x.dtype, device=x.device)
    spec = torch.stft(
        x.reshape(-1, length), n_fft, hop_length, win_length, window, center=center, pad_mode="reflect", return_complex=True
    )  # (N, n_freq, F)
    return spec.reshape(*lead, *spec.shape[-2:])  # (..., n_freq, F)


def mel_spectrogram(
    x, sample_rate, n_fft, hop_length, n_mels, win_length=None, fmin=0.0, fmax=None, power=1.0, htk=False, norm="slaney"
):
    """Mel spectrogram (..., n_mels, F) of `x` (..., T): |STFT|^power through `mel_filterbank`."""
    spec = stft(x, n_fft, hop_length, win_length).abs().pow(power)  # (..., n_freq, F)
    fb = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm).to(spec)  # (n_mels, n_freq)
    return torch.matmul(fb, spec)  # (..., n_mels, F)


# ---------------------------------------------------------------------------------------------
# Signal metrics
# ---------------------------------------------------------------------------------------------


def _check_pair(x, y):
    """Both signals as detached float32 tensors of one shape (..., T), or a ValueError."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != y.shape:
        raise ValueError(f"reference and estimate must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"expected signals of shape (T,) or (..., T) with T > 0, got {tuple(x.shape)}")
    return x.detach().float(), y.detach().float()


# DAC conf/base.yml (descriptinc/descript-audio-codec), MelSpectrogramLoss:
_DAC_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)  # window_lengths; hop = window // 4 (dac/nn/loss.py)
_DAC_N_MELS = (5, 10, 20, 40, 80, 160, 320)  # n_mels
_DAC_CLAMP = 1e-5  # clamp_eps, applied before log10 (pow 1.0: magnitude mel)


@torch.no_grad()
def mel_distance(x, y, sample_rate):
    """DAC's multi-scale mel distance between `x` and `y` (..., T); 0 for identical signals.

    For each of 7 scales (windows 32..2048 samples, hop window / 4, 5..320 mel bands, fmin 0,
    fmax Nyquist; DAC `conf/base.yml`): the mean |log10(max(mel_x, 1e-5)) - log10(max(mel_y,
    1e-5))| over bands and frames, with magnitude (power 1) mels, Slaney filterbanks and centred
    reflect-padded Hann STFTs as in audiotools. The result is the mean over the scales.
    DAC's `MelSpectrogramLoss` *sums* the scales (and its log-mel weight is 1, linear-mel
    weight 0 in `conf/base.yml`), so DAC's logged `mel/loss` equals 7 times this value.
    Needs T > 1024 samples (the 2048-sample window).
    """
    x, y = _check_pair(x, y)
    total = 0.0
    for window, n_mels in zip(_DAC_WINDOWS, _DAC_N_MELS):
        mx = mel_spectrogram(x, sample_rate, window, window // 4, n_mels)  # (..., n_mels, F)
        my = mel_spectrogram(y, sample_rate, window, window // 4, n_mels)
        total += (mx.clamp(min=_DAC_CLAMP).log10() - my.clamp(min=_DAC_CLAMP).log10()).abs().mean().item()
    return total / len(_DAC_WINDOWS)


# Parallel WaveGAN (Yamamoto et al. 2020, §2.3): (FFT size, hop, window) of each resolution; the
# defaults of MultiResolutionSTFTLoss in the official code (kan-bayashi/ParallelWaveGAN stft_loss.py).
_PWG_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
# official code, not in the paper: |X|^2 clamped before sqrt and log (kan-bayashi/ParallelWaveGAN stft_loss.py)
_PWG_POWER_FLOOR = 1e-7


@torch.no_grad()
def stft_distance(x, y):
    """Parallel WaveGAN's multi-resolution STFT distance, `x` the reference, `y` the estimate.

    Per resolution (FFT 1024 / 2048 / 512, hop 120 / 240 / 50, Hann window 600 / 1200 / 240;
    Yamamoto et al. 2020, §2.3), the sum of
      spectral convergence  || |X| - |Y| ||_F / || |X| ||_F  (per item, then averaged)
      log-magnitude L1      mean | log|X| - log|Y| |
    averaged over the three resolutions. Magnitudes are sqrt(max(|.|^2, 1e-7)) as in the
    official code. The resolutions were chosen for 24 kHz audio; they are used unchanged at any
    rate. ~0 for identical signals. Needs T > 1024 samples.
    """
    x, y = _check_pair(x, y)
    total = 0.0
    for n_fft, hop, win in _PWG_RESOLUTIONS:
        mag_x = stft(x, n_fft, hop, win).abs().pow(2).clamp(min=_PWG_POWER_FLOOR).sqrt()  # (..., n_freq, F)
        mag_y = stft(y, n_fft, hop, win).abs().pow(2).clamp(min=_PWG_POWER_FLOOR).sqrt()
        sc = torch.linalg.matrix_norm(mag_x - mag_y) / torch.linalg.matrix_norm(mag_x)  # (...,) Frobenius
        log_mag = (mag_x.log() - mag_y.log()).abs().mean()
        total += sc.mean().item() + log_mag.item()
    return total / len(_PWG_RESOLUTIONS)


@torch.no_grad()
def si_sdr(reference, estimate, eps=1e-8):
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019, "SDR - half-baked or well done?").

    Both signals are made zero-mean; the estimate is projected on the reference,
    s_target = (<s_hat, s> / ||s||^2) s, and SI-SDR = 10 log10(||s_target||^2 / ||s_hat - s_target||^2).
    `eps` keeps silence and perfect estimates finite (identical signals give ~ +80 dB or more).
    Computed in float64; the mean over leading dims is returned.
    """
    s, s_hat = (t.double() for t in _check_pair(reference, estimate))
    s = s - s.mean(dim=-1, keepdim=True)
    s_hat = s_hat - s_hat.mean(dim=-1, keepdim=True)
    alpha = (s_hat * s).sum(-1, keepdim=True) / (s.pow(2).sum(-1, keepdim=True) + eps)  # (..., 1)
    target = alpha * s  # (..., T)
    ratio = (target.pow(2).sum(-1) + eps) / ((s_hat - target).pow(2).sum(-1) + eps)  # (...,)
    return (10 * torch.log10(ratio)).mean().item()


_PESQ_WB_RATE = 16000  # ITU-T P.862.2 wide-band PESQ is defined at 16 kHz


def pesq(reference, degraded, sample_rate):
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO 1.0 ... 4.64) via the `pesq` package.

    Signals at other rates are resampled to 16 kHz first. The mean over leading dims is returned.
    If PESQ fails on an item (e.g. no speech found in silence), a warning is issued and the
    result is NaN.
    """
    from pesq import PesqError
    from pesq import pesq as _pesq

    ref, deg = _check_pair(reference, degraded)
    ref, deg = resample(ref, sample_rate, _PESQ_WB_RATE), resample(deg, sample_rate, _PESQ_WB_RATE)  # (..., T16)
    scores = []
    for r, d in zip(ref.reshape(-1, ref.shape[-1]).double().cpu().numpy(), deg.reshape(-1, deg.shape[-1]).double().cpu().numpy()):
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # the package divides silence by its peak (0)
                scores.append(_pesq(_PESQ_WB_RATE, r, d, "wb"))
        except PesqError as e:
            warnings.warn(f"PESQ failed ({type(e).__name__}: {e}); returning NaN", stacklevel=2)
            return float("nan")
    return float(np.mean(scores))


def stoi(reference, degraded, sample_rate):
    """Short-time objective intelligibility (Taal et al. 2011, 0 ... 1) via `pystoi`.

    pystoi resamples to 10 kHz internally and only looks at 150 Hz - 4.3 kHz, so STOI hardly
    sees band-limiting above ~4 kHz (by design). The mean over leading dims is returned.
    """
    from pystoi import stoi as _stoi

    ref, deg = _check_pair(reference, degraded)
    pairs = zip(ref.reshape(-1, ref.shape[-1]).double().cpu().numpy(), deg.reshape(-1, deg.shape[-1]).double().cpu().numpy())
    return float(np.mean([_stoi(r, d, sample_rate, extended=False) for r, d in pairs]))


# ---------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------


def codebook_stats(codes, codebook_size, frame_rate):
    """Usage, entropy and bitrates of codes (B, Q, F), or of a list of such (F may differ).

    Returns a dict:
        usage:           Q floats, fraction of the K entries used at least once
        entropy:         Q floats, bits, entropy of each codebook's empirical code distribution
        perplexity:      Q floats, 2 ** entropy (the number of equally used entries it equals)
        bitrate_entropy: frame_rate * sum of entropies, bits/s. BigCodec reports this as the
                         "approximated bitrate"; SoundStream (§V-B) calls it the empirical entropy
                         bound. It treats each codebook as a memoryless source, so it bounds what
                         entropy coding of single codes could save, not what a context model could.
        bitrate_nominal: frame_rate * Q * log2(K), bits/s, what the codes cost as sent
    """
    batches = list(codes) if isinstance(codes, (list, tuple)) else [codes]
    int_types = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if not batches or any(c.dim() != 3 or c.dtype not in int_types for c in batches):
        raise ValueError("codes must be an integer tensor (B, Q, F) or a non-empty list of them")
    num_q = batches[0].shape[1]
    if any(c.shape[1] != num_q for c in batches):
        raise ValueError(f"all code tensors must have the same number of codebooks, got {[c.shape[1] for c in batches]}")
    flat = torch.cat([c.transpose(0, 1).reshape(num_q, -1) for c in batches], dim=1).long()  # (Q, B * F summed)
    if flat.numel() == 0:
        raise ValueError("codes are empty")
    if flat.min() < 0 or flat.max() >= codebook_size:
        raise ValueError(f"code ids must lie in [0, {codebook_size}), found {int(flat.min())} ... {int(flat.max())}")
    counts = torch.stack([torch.bincount(q, minlength=codebook_size) for q in flat]).double()  # (Q, K)
    p = counts / counts.sum(dim=1, keepdim=True)  # (Q, K)
    entropy = torch.special.entr(p).sum(dim=1) / math.log(2)  # (Q,) bits; entr(p) = -p ln p, 0 at p = 0
    return {
        "usage": ((counts > 0).sum(dim=1) / codebook_size).tolist(),
        "entropy": entropy.tolist(),
        "perplexity": (2.0**entropy).tolist(),
        "bitrate_entropy": float(frame_rate * entropy.sum()),
        "bitrate_nominal": float(frame_rate * num_q * math.log2(codebook_size)),
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

_PLOT_RANGE_DB = 80.0  # our choice: colour scale spans 80 dB below the reference's loudest bin


def plot_comparison(path, reference, reconstruction, sample_rate, title=None):
    """Save a PNG: the two waveforms (top) and their log-magnitude spectrograms (bottom).

    Signals are (T,) or (C, T) (channels are averaged for the picture) and may differ in length.
    Both spectrograms share one colour scale, fixed by the reference, so a difference in colour
    is a difference in level. Parent folders are created; returns the path.
    Uses matplotlib's object API with the Agg canvas, so the pyplot backend (e.g. a notebook's
    inline backend) is left untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    signals = [torch.as_tensor(s).detach().float().cpu() for s in (reference, reconstruction)]
    signals = [s.reshape(-1, s.shape[-1]).mean(dim=0) for s in signals]  # (T,) each
    n_fft = 2 ** round(math.log2(0.032 * sample_rate))  # our choice: ~32 ms windows (512 at 16 kHz)
    padded = [torch.nn.functional.pad(s, (0, max(0, n_fft - len(s)))) for s in signals]  # clips shorter than a window
    specs = [20 * torch.log10(stft(s, n_fft, n_fft // 4).abs().clamp(min=1e-8)) for s in padded]  # (n_freq, F) in dB
    vmax = specs[0].max().item()

    fig = Figure(figsize=(12, 6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex="col")
    for col, (name, s, spec) in enumerate(zip(("reference", "reconstruction"), signals, specs)):
        t = np.arange(len(s)) / sample_rate
        axes[0, col].plot(t, s.numpy(), linewidth=0.5)
        axes[0, col].set(title=name, ylim=(-1.05, 1.05), ylabel="amplitude")
        image = axes[1, col].imshow(
            spec.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=vmax - _PLOT_RANGE_DB, vmax=vmax,
            extent=(0, len(s) / sample_rate, 0, sample_rate / 2000),
        )
        axes[1, col].set(xlabel="time (s)", ylabel="frequency (kHz)")
    fig.colorbar(image, ax=axes[1, :], label="dB")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
