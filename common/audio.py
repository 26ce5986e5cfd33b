"""Audio files in and out, a band-limited resampler, and small level / length helpers.

Shape letters: B batch, C audio channels, T samples. Audio is float32 in [-1, 1], channels first.

- `load` / `save` / `info`: soundfile (libsndfile) for wav, flac, ogg (and mp3 where libsndfile
  supports it), with every bad input turned into an `AudioError` that names the file.
- `resample`: windowed-sinc polyphase resampling for any rational ratio, in torch (this project
  does not use torchaudio). The filter is designed with Kaiser's formulas; the numbers and where
  they come from are at the top of the resampler section.
- `normalize_rms` / `denormalize_rms`: EnCodec's per-item volume normalisation.
- `peak_normalize`, `pad_or_crop`, `pad_to_multiple`, `random_crop`.
"""

import functools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F


class AudioError(ValueError):
    """Bad audio input: a missing, unreadable, empty or non-finite file, or an impossible request.

    The message names the file (when there is one) and says what is wrong in plain words.
    """


# ---------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------

_SAVE_SUBTYPE = "PCM_16"  # our choice: 16-bit PCM, what CD audio and most speech corpora use
# our choice: more "channels" than this almost always means a (T, C) array was passed as (C, T)
_MAX_SAVE_CHANNELS = 8


def info(path):
    """Header of an audio file (`soundfile.info`: `.samplerate`, `.channels`, `.frames`, ...).

    Raises AudioError when the file is missing or libsndfile cannot parse it.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    try:
        return sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: cannot read audio header ({e})") from None


def load(path, sample_rate=None, channels=None, notice=False, start=0, frames=-1):
    """Read an audio file into a float32 tensor (C, T) and return it with its sample rate.

    Args:
        path: wav / flac / ogg file (mp3 too when the installed libsndfile reads it).
        sample_rate: if given and different from the file's rate, the audio is resampled with
            `resample` and this rate is returned.
        channels: None keeps the file's channels; 1 mixes down (mean over channels); 2 duplicates
            a mono file and keeps a stereo one. Anything else (or 2 for a file with more than two
            channels) raises AudioError.
        notice: print one `note: ...` line to stderr when a conversion happened (for CLIs).
        start, frames: read only `frames` samples from sample `start` on (at the file's rate,
            before resampling; -1 reads to the end), like `soundfile.read`. Datasets use this to
            crop long files without decoding all of them.

    Returns:
        (wav, sample_rate): wav float32 (C, T).

    Raises:
        AudioError naming the file: missing, unreadable or corrupt, empty, NaN / Inf samples,
        or an unsupported channel request.
    """
    path = Path(path)
    if channels not in (None, 1, 2):
        raise AudioError(f"{path}: channels must be None, 1 or 2, got {channels!r}")
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    try:
        data, file_sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: file has no samples" + (f" from sample {start} on" if start else ""))
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: file contains NaN or Inf samples")
    wav = torch.from_numpy(data.T.copy())  # (T, C) -> (C, T)

    file_channels = wav.shape[0]
    if channels == 1 and file_channels > 1:
        wav = wav.mean(dim=0, keepdim=True)  # (1, T)
    elif channels == 2 and file_channels == 1:
        wav = wav.expand(2, -1).clone()  # (2, T)
    elif channels == 2 and file_channels > 2:
        raise AudioError(f"{path}: has {file_channels} channels; only mono and stereo files can be read as stereo")
    out_sr = file_sr if sample_rate is None else int(sample_rate)
    if out_sr != file_sr:
        wav = resample(wav, file_sr, out_sr)
    if notice and (out_sr != file_sr or wav.shape[0] != file_channels):
        print(f"note: {path}: converted {file_sr} Hz, {file_channels} ch -> {out_sr} Hz, {wav.shape[0]} ch", file=sys.stderr)
    return wav, out_sr


def save(path, wav, sample_rate):
    """Write `wav` ((C, T) or (T,), tensor or numpy, float in [-1, 1]) as 16-bit PCM .wav or .flac.

    The format follows the suffix (.wav or .flac; anything else raises AudioError). Parent folders
    are created. Samples outside [-1, 1] are clipped to [-1, 1], and never silently: a warning says
    how many samples were clipped and what the peak was. NaN or Inf samples raise AudioError.
    """
    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise AudioError(f"{path}: cannot save as {path.suffix!r}; use a .wav or .flac file name")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    wav = np.asarray(wav)
    if not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"{path}: expected float samples in [-1, 1], got dtype {wav.dtype}")
    if wav.ndim == 1:
        wav = wav[None]  # (T,) -> (1, T)
    if wav.ndim != 2 or wav.shape[0] > _MAX_SAVE_CHANNELS:
        raise AudioError(f"{path}: expected audio of shape (C, T) or (T,), got {tuple(wav.shape)}")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio to save contains NaN or Inf samples")
    over = np.abs(wav) > 1.0
    if over.any():
        warnings.warn(f"{path}: clipped {int(over.sum())} samples to [-1, 1] (peak {np.abs(wav).max():.3f})", stacklevel=2)
        wav = np.clip(wav, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.T, int(sample_rate), subtype=_SAVE_SUBTYPE, format=fmt)  # soundfile wants (T, C)


# ---------------------------------------------------------------------------------------------
# Resampling: Kaiser-windowed sinc, polyphase, as one strided conv1d
# ---------------------------------------------------------------------------------------------
# Filter design with Kaiser's empirical formulas (Kaiser 1974; Oppenheim & Schafer,
# "Discrete-Time Signal Processing", 3rd ed., §7.6.1). Frequencies are fractions of the lower
# of the two Nyquist frequencies, so one design serves every pair of rates.
_STOPBAND_DB = 80.0  # our choice: ripple 1e-4, so passband error ~-80 dB, under the -60 dB we test
_PASSBAND_EDGE = 0.88  # our choice: flat up to 88 % of the lower Nyquist (7.04 kHz when going to 16 kHz)
_STOPBAND_EDGE = 1.0  # our choice: full attenuation from the lower Nyquist on, so nothing aliases
_ROLLOFF = (_PASSBAND_EDGE + _STOPBAND_EDGE) / 2  # sinc cutoff in the middle of the transition band: 0.94
_BETA = 0.1102 * (_STOPBAND_DB - 8.7)  # Kaiser's beta for A > 50 dB: 7.857
# Kaiser's length, (N - 1) = (A - 7.95) / (2.285 dw), counted in sinc zero crossings per side
# (spacing 1 / (2 fc)) so that it no longer depends on the rates: 39.3 -> 40.
_ZEROS = math.ceil((_STOPBAND_DB - 7.95) * _ROLLOFF / (2.285 * 2 * math.pi * (_STOPBAND_EDGE - _PASSBAND_EDGE)))
# our choice: refuse filters over 2^24 values (64 MB in float32). Pairs of standard rates (8 k ...
# 96 kHz) need at most 7 x 10^5; near-coprime pairs such as 16000 -> 16001 would need 2.6 x 10^8.
_MAX_KERNEL_SIZE = 2**24


def _filter_size(orig, new):
    """Cutoff fc (cycles per input sample), window half-length and padding W (input samples)."""
    fc = _ROLLOFF * min(1.0, new / orig) / 2
    half = _ZEROS / (2 * fc)  # _ZEROS sinc zero crossings, spaced 1 / (2 fc), on each side
    return fc, half, math.ceil(half)


@functools.lru_cache(maxsize=64)
def _resample_kernel(orig, new, dtype, device):
    """Polyphase filter bank (new, 1, K) for reduced rates orig -> new, K = orig + 2 W + 1.

    Output sample n = q * new + j sits at input time q * orig + j * orig / new. Phase j is the
    windowed sinc evaluated at the K input samples q * orig + m, m in [-W, orig + W], so that one
    conv1d with stride `orig` produces all `new` phases of period q at once.
    """
    fc, half, width = _filter_size(orig, new)
    m = torch.arange(-width, orig + width + 1, dtype=torch.float64)  # (K,)
    j = torch.arange(new, dtype=torch.float64)[:, None]  # (new, 1)
    tau = m[None, :] - j * orig / new  # (new, K): distance of each tap from the output instant
    # Ideal low-pass with unit DC gain: h(t) = 2 fc sinc(2 fc t); torch.sinc(x) = sin(pi x) / (pi x).
    h = 2 * fc * torch.sinc(2 * fc * tau)
    beta = torch.tensor(_BETA, dtype=torch.float64)
    window = torch.special.i0(beta * torch.sqrt((1 - (tau / half) ** 2).clamp(min=0))) / torch.special.i0(beta)
    kernel = torch.where(tau.abs() <= half, h * window, torch.zeros_like(h))
    return kernel[:, None, :].to(dtype=dtype, device=device)  # (new, 1, K)


def resample(wav, orig_sr, new_sr):
    """Band-limited resampling of `wav` (..., T) from `orig_sr` to `new_sr` Hz (any rational ratio).

    The rates are reduced by their gcd to orig / new. The filter is a Kaiser-windowed sinc with
    its cutoff at 0.94 of the lower Nyquist frequency (flat to 0.88, >= 80 dB down from 1.0),
    40 zero crossings on each side, in `new` phases of orig + 2 W + 1 taps; near-coprime rates
    (16000 -> 16001: 16001 phases x 16089 taps) are refused with a ValueError. The signal is
    taken as zero outside [0, T), so the first and last 40 zero crossings (2.7 ms at 16 kHz)
    see a little of that edge.

    Returns:
        (..., ceil(T * new_sr / orig_sr)) tensor of the same dtype and device; the input itself
        when the rates are equal.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    if not torch.is_floating_point(wav):
        raise TypeError(f"resample expects a floating-point tensor, got {wav.dtype}")
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    *lead, length = wav.shape
    out_len = -(-length * new // orig)  # ceil(T * new / orig) in exact integer arithmetic
    if length == 0:
        return wav.new_zeros(*lead, 0)
    width = _filter_size(orig, new)[2]
    taps = orig + 2 * width + 1  # K
    if new * taps > _MAX_KERNEL_SIZE:
        raise ValueError(
            f"resampling {orig_sr} -> {new_sr} Hz reduces to {orig} -> {new}; its polyphase filter would need "
            f"{new} phases x {taps} taps. Use rates with a larger common divisor (e.g. a standard rate)."
        )
    kernel = _resample_kernel(orig, new, wav.dtype, wav.device)  # (new, 1, K)
    periods = -(-out_len // new)  # conv output frames: each gives `new` output samples
    needed = (periods - 1) * orig + taps  # padded input length those frames read
    x = wav.reshape(-1, 1, length)  # (N, 1, T)
    x = F.pad(x, (width, max(0, needed - width - length)))  # (N, 1, W + T + right)
    y = F.conv1d(x, kernel, stride=orig)  # (N, new, periods)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :out_len]  # (N, periods * new) -> (N, T')
    return y.reshape(*lead, out_len)  # (..., T')


# ---------------------------------------------------------------------------------------------
# Levels and lengths
# ---------------------------------------------------------------------------------------------


def normalize_rms(wav, eps=1e-8):
    """Divide each item of `wav` (B, C, T) by its RMS; return (wav / scale, scale (B, 1)).

    This is EnCodec's volume normalisation (`encodec/model.py`, `EncodecModel._encode_frame`):
    the RMS of the channel mean over time, plus `eps` so silence stays finite. FunCodec does the
    same. A codec then sees every input at about the same level and sends `scale` as side
    information; `denormalize_rms` puts it back.
    """
    if wav.dim() != 3:
        raise ValueError(f"normalize_rms expects (B, C, T), got shape {tuple(wav.shape)}")
    mono = wav.mean(dim=1)  # (B, T)
    scale = mono.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps  # (B, 1)
    return wav / scale[:, :, None], scale


def denormalize_rms(wav, scale):
    """Inverse of `normalize_rms`: `wav` (B, C, T) times `scale` (B, 1)."""
    return wav * scale.reshape(-1, 1, 1)


def peak_normalize(wav, peak_db=0.0):
    """Scale so that max |x| equals 10^(peak_db / 20).

    For (B, C, T) each item is scaled on its own (peak over C and T); a (C, T) or (T,) tensor is
    scaled as a whole. Silent items (peak 0) are returned unchanged.
    """
    target = 10.0 ** (peak_db / 20.0)
    dims = (-2, -1) if wav.dim() == 3 else tuple(range(wav.dim()))
    peak = wav.abs().amax(dim=dims, keepdim=True)  # (B, 1, 1) or (1, 1) / (1,)
    gain = torch.where(peak > 0, target / peak.clamp(min=torch.finfo(wav.dtype).tiny), torch.ones_like(peak))
    return wav * gain


def pad_or_crop(wav, length, offset=0):
    """`wav[..., offset:offset + length]`, zero-padded on the right to exactly `length` samples."""
    out = wav[..., offset : offset + length]
    return F.pad(out, (0, length - out.shape[-1])) if out.shape[-1] < length else out


def pad_to_multiple(wav, multiple):
    """Right-pad `wav` (..., T) with zeros to a multiple of `multiple`; return (padded, T).

    Codecs need a whole number of frames (T divisible by the hop); keep T to cut the decoded
    audio back to the input length.
    """
    length = wav.shape[-1]
    padded_len = -(-length // multiple) * multiple  # ceil to a multiple
    return F.pad(wav, (0, padded_len - length)), length


def random_crop(wav, length, generator):
    """A `length`-sample window of `wav` (..., T) at a uniformly random offset.

    The offset is drawn from `generator` (a `torch.Generator`), so a seeded generator gives a
    reproducible crop. Inputs shorter than `length` are zero-padded on the right (offset 0).
    """
    slack = wav.shape[-1] - length
    offset = int(torch.randint(0, slack + 1, (1,), generator=generator)) if slack > 0 else 0
    return pad_or_crop(wav, length, offset)
