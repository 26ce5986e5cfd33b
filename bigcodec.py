"""
BigCodec: Pushing the Limits of Low-Bitrate Neural Speech Codec, in one file.

Xin, Tan, Takamichi, Saruwatari. 2024. arXiv 2409.05377. Official code: Aria-K-Alethia/BigCodec
(snapshot 09845ab, 2024-09: vq/, module/, criterions/, config/), weights `bigcodec.pt` (HF
Alethia/BigCodec). This file is equal to the official modules: the released state dict loads
strictly (BigCodec.from_official) and gives the same codes and, to float rounding, the same audio
as the PyPI repackage `bigcodec` 0.0.3 (a copy of the official vq/ code; tests/test_bigcodec.py).

Paper -> code
  §II-A encoder (conv, 5 blocks, LSTM) ........ Encoder, EncoderBlock, ResidualUnit, ResLSTM
  §II-A decoder (mirror, transposed convs) .... Decoder, DecoderBlock
  §II-A snake activations, anti-aliased ...... SnakeBeta, Activation1d (BigVGAN's), kaiser_sinc
  §II-A low-dimensional VQ, one codebook ...... FactorizedVQ (8-d, L2-normalised), ResidualVQ
  §II-B discriminators: MPD + MS-STFT ......... PeriodDiscriminator, SpecDiscriminator
  §II-C mel loss (DAC's, 7 scales) ............ MelLoss
  §II-C least-squares GAN, L1 feature match ... discriminator_loss, adversarial_loss, feature_loss
  §II-C VQ losses, straight-through ........... FactorizedVQ.forward, Trainer.step (weights 15/1/1)
  §III-A training: AdamW, warm-up, decay ...... lr_at (the official WarmupLR), Trainer
  §III-B metrics: PESQ, STOI, MCD, approx. bitrate  evaluate (common/evaluation.py)

Shapes: B batch, T samples (mono: (B, 1, T)), F frames (T / M), M hop = prod(strides) = 200,
D latent dim (1024), d codebook dim (8), Q codebooks (1), K codebook size (8192), C channels.
`F` is torch.nn.functional.

Where the paper (as the reading notes in shared/paper-notes/004 record it) and the released code
differ, this file follows the code, whose weights it loads, and says so. Labelled quirks of the
official code, kept for weight compatibility:
  Q1. The trunc_normal(0.02) init of the official CodecEncoder/Decoder and the normal(0.02) init
      of its STFT discriminator act on `weight`, which weight norm recomputes from g and v before
      every forward: they change nothing. The weights start at PyTorch's default init; only the
      Conv1d biases are zeroed. We do the same (so a fresh model is distributed as theirs).
  Q2. The codebook lookup normalises both sides, but the decoder receives the raw (unnormalised)
      codebook vector, and the commitment and codebook losses compare raw vectors (DAC's
      factorised VQ, which the official code copies).
  Q3. `threshold_ema_dead_code=2` is passed to the quantizer and ignored: no EMA, no k-means, no
      dead-code reset. Unused entries simply get no gradient.
  Q4. The official inference.py pads every input by 200 - T % 200 samples: a whole extra frame
      when T is already a multiple of 200. encode() pads to the next multiple (no extra frame).
  Q5. AdamW with PyTorch's default weight decay 0.01 (the config sets none); the warm-up rises
      quadratically from 1e-5, and the decay is linear (common/schedulers.py), see lr_at.

DEVIATIONS from the paper (tagged `# DEVIATION` where they happen)
  1. The reading notes describe the codebook loss as L1; the official code (whose weights load
     here) uses the squared error for the codebook and the commitment terms. We use the code's.
  2. The tiny CPU preset trains the reconstruction objective alone (gan_start = steps): see
     PRESETS and README. The paper preset trains the whole GAN from step 1, as the code does.

Not here: the paper's speaker similarity uses a WavLM-TDNN verifier that cannot be downloaded on
an offline machine; `--metrics spk` gives resemblyzer's d-vector cosine instead (another model: not
the paper's number). The ablation variants of Table II (BigCodec-base, -300M, small-enc, w/o
LSTM) are size changes whose exact widths we could not check against the paper text here; the
config fields ngf, dec_channels and lstm_layers (0 = w/o LSTM) build them.

Commands
  python bigcodec.py --train                  # CPU: the tiny preset on the demo corpus, < 10 min
  python bigcodec.py --train --preset paper --data /data/LibriSpeech          # one GPU
  torchrun --standalone --nproc_per_node=8 bigcodec.py --train --preset paper --data DIR
  python bigcodec.py --train --resume --out runs/bigcodec          # continue where it stopped
  python bigcodec.py --reconstruct in.wav --official bigcodec.pt --out out.wav   # released weights
  python bigcodec.py --encode in.wav --ckpt runs/bigcodec/model.pt --out codes.npz
  python bigcodec.py --decode codes.npz --ckpt runs/bigcodec/model.pt --out out.wav
  python bigcodec.py --eval --ckpt runs/bigcodec/model.pt [--data DIR]
"""

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from common.audio import AudioError, load, save
from common import evaluation
from common.data import AudioDataset, demo_manifest, read_manifest, resolve_files
from common.metrics import codebook_stats, mel_spectrogram, plot_comparison

NAME = "bigcodec"  # the model name in checkpoints and codes files; the generic blocks use it

# -------------------------------------------------------------------------------------------------
# Configuration: the model (saved in model.pt) and the training run (saved in ckpt.pt only)


@dataclass
class Config:
    """What rebuilds the model. Defaults are the released model (config/model/default.yaml)."""
    sample_rate: int = 16000       # 16 kHz speech, LibriSpeech (§III-A; preprocess sr)
    ngf: int = 48                  # first conv's channels, doubled by each block to 1536 (ngf)
    strides: tuple[int, ...] = (2, 2, 2, 5, 5)  # M = 200 -> 80 Hz (§II-A; up_ratios)
    dilations: tuple[int, ...] = (1, 3, 9)  # the residual units of each block (§II-A; dilations)
    lstm_layers: int = 2           # two-layer unidirectional residual LSTM (§II-A); 0: none
    latent_dim: int = 1024         # D: encoder output, decoder input (out_channels, vq_dim)
    dec_channels: int = 1536       # decoder's first channels, halved per block
                                   # (upsample_initial_channel)
    num_quantizers: int = 1        # a single codebook (§II-A); vq_num_quantizers
    codebook_size: int = 8192      # K = 8192: 13 bits x 80 Hz = 1.04 kbps (§II-A)
    codebook_dim: int = 8          # d: the low-dimensional lookup space (§II-A; codebook_dim)
    act_kernel: int = 12           # Kaiser-sinc taps of each anti-aliased activation (BigVGAN's)


@dataclass
class TrainConfig:
    """How the model is trained: discriminators, losses, optimizer, data and the run itself."""
    # discriminators (§II-B; official config/model/default.yaml: mpd, mstft)
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)  # HiFi-GAN's periods (mpd.periods)
    mpd_channels: int = 16         # first conv, x4 per layer (mpd.channels)
    mpd_max_channels: int = 512    # (mpd.max_downsample_channels)
    stft_ffts: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # hop n/4, window n (mstft)
    stft_channels: int = 32        # (mstft.channels)
    stft_max_channels: int = 512   # (mstft.max_downsample_channels)
    # losses (§II-C; official config/train/default.yaml lambdas)
    lambda_mel: float = 15.0       # the mel loss x 15 (§II-C; lambda_mel_loss)
    lambda_adv: float = 1.0        # (lambda_adv)
    lambda_feat: float = 1.0       # L1 feature matching (lambda_feat_match_loss)
    lambda_commit: float = 0.25    # commitment x 0.25 (§II-C; vq_commit_weight)
    lambda_codebook: float = 1.0   # codebook term x 1 (§II-C; factorized_vector_quantize.py)
    mel_windows: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)  # hop w/4 (mel_loss.py)
    mel_bins: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320)  # one per window (mel_loss.py)
    # optimiser (§III-A; config/train/default.yaml, common/schedulers.py)
    lr: float = 1e-4               # peak lr after the warm-up (max_lr)
    min_lr: float = 1e-5           # the end of the linear decay (min_lr)
    warmup_steps: int = 1000       # 1k warm-up steps (§III-A; warmup_step)
    decay_steps: int = 500_000     # linear decay over 500k steps, then min_lr (down_step)
    betas: tuple[float, ...] = (0.8, 0.9)  # AdamW (§III-A; gen/disc_optim_params)
    weight_decay: float = 0.01     # Q5: AdamW's default; the config sets none
    gan_start: int = 0             # steps with the reconstruction terms only, D untrained (PWG)
    grad_clip: float = 1.0         # gradient norm clip of G and D (gen/disc_grad_clip)
    batch_size: int = 8            # 8 per step (§III-A; dataset.train.batch_size)
    segment_seconds: float = 1.0   # 1 s random crops (§III-A; min_audio_length 16000)
    # the run
    data: str = ""                 # folder or .jsonl manifest; "": the demo corpus in data/demo
    out: str = "runs/bigcodec"     # checkpoints, log, samples
    steps: int = 1_200_000         # 1.2M steps (trainer.max_steps; the paper: converged by 600k)
    seed: int = 0                  # weights and crops follow from it (official: 1024)
    log_every: int = 100           # steps between log lines (each with full diagnostics)
    sample_every: int = 10_000     # steps between reconstruction wav + spectrogram PNGs
    ckpt_every: int = 10_000       # steps between checkpoints (official: every 10k)
    eval_utterances: int = 20      # held-out utterances in the metrics table at the end
    metrics: str = "mel,pesq,stoi,mcd"  # the paper's offline metrics (common/evaluation.py)
    num_workers: int = 4           # DataLoader worker processes (official: 8)
    threads: int = 0               # CPU threads; 0: the idle cores (busy cores stall torch)
    amp: str = "fp16"              # fp16 autocast on CUDA (trainer.precision 16-mixed); CPU: off
    compile: bool = False          # torch.compile the generator (CUDA)


CHOICES = {"amp": ("none", "bf16", "fp16")}

PRESETS = {
    "paper": (Config(), TrainConfig()),
    # CPU demo on the 16 kHz demo corpus, 9 min on 2 idle cores (README). Our choices: ngf 6
    # (channels 6 -> 192), D = 64, K = 1024 (10 bits: 0.8 kbps; 8192 entries would see ~40
    # frames per step between them), 0.25 s crops, a short warm-up to a 10x higher peak lr, and
    # the reconstruction terms alone (gan_start = steps; DEVIATION 2): a GAN step costs more than a
    # reconstruction step, and soundstream.py's tiny run lost STOI to its first GAN steps. The
    # discriminators and GAN terms run in the tests. The 72 anti-aliased activations dominate the
    # cost at this width (benchmarks/bigcodec_vs_official.py), so the net is narrow.
    "tiny": (Config(ngf=6, latent_dim=64, dec_channels=192, codebook_size=1024),
             TrainConfig(mpd_channels=4, mpd_max_channels=64, stft_channels=4,
                         stft_max_channels=64, lr=1e-3, warmup_steps=100, decay_steps=1000,
                         gan_start=1000, batch_size=8, segment_seconds=0.25, steps=1000,
                         log_every=100, sample_every=500, ckpt_every=200, eval_utterances=16,
                         num_workers=0, amp="none")),
}


def check_config(cfg, run=None):
    """One-line errors for values the model cannot be built or trained with."""
    if any(s < 1 for s in cfg.strides) or not cfg.strides:
        raise ValueError(f"strides must be positive integers, got {cfg.strides}")
    if cfg.codebook_size < 2 or cfg.num_quantizers < 1 or cfg.codebook_dim < 1:
        raise ValueError("codebook_size must be >= 2, num_quantizers and codebook_dim >= 1")
    if cfg.dec_channels % 2 ** len(cfg.strides):
        raise ValueError(f"dec_channels {cfg.dec_channels} must be divisible by "
                         f"2^{len(cfg.strides)}"
                         f" (each decoder block halves it)")
    if run is not None:
        for name, allowed in CHOICES.items():
            if getattr(run, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(run, name)!r}")
        if len(run.mel_windows) != len(run.mel_bins):
            raise ValueError(f"mel_windows and mel_bins need one entry each per scale, got "
                             f"{len(run.mel_windows)} and {len(run.mel_bins)}")
        evaluation.check_available(evaluation.parse_metrics(run.metrics))
        # the longest window that must fit in a crop: reflect padding needs T > window / 2
        need = max(max(run.mel_windows), max(run.stft_ffts)) // 2 + 1
        have = int(run.segment_seconds * cfg.sample_rate)
        if have < need:
            raise ValueError(f"segment_seconds {run.segment_seconds:g} gives {have} samples; the "
                             f"training losses need at least {need} "
                             f"({need / cfg.sample_rate:.3f} s)")

# -------------------------------------------------------------------------------------------------
# Building blocks: BigVGAN's anti-aliased snake activation (module names = the official keys)


def kaiser_sinc(cutoff, half_width, taps):
    """A windowed-sinc low-pass filter (taps,), sum 1: cutoff and transition half-width in units
    of the sample rate, the Kaiser window's beta from Kaiser's formula for the attenuation A that
    the width buys (Oppenheim & Schafer Eq. 7.62-7.63). BigVGAN's alias_free_torch (after julius),
    even `taps`: the filter is symmetric about the half-sample point between the middle taps."""
    half = taps // 2
    A = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # attenuation (dB) for the width
    if A > 50:
        beta = 0.1102 * (A - 8.7)
    elif A >= 21:
        beta = 0.5842 * (A - 21) ** 0.4 + 0.07886 * (A - 21)
    else:
        beta = 0.0
    window = torch.kaiser_window(taps, beta=beta, periodic=False)
    t = torch.arange(-half, half) + 0.5 if taps % 2 == 0 else torch.arange(taps) - half
    h = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return h / h.sum()  # unit DC gain: no leakage of a constant through the activation


def replicate_pad(x, left, right):  # (B, C, L) -> (B, C, left + L + right)
    """F.pad(x, (left, right), mode="replicate"), the same samples: torch's replication-pad kernel
    took ~3 ms on (1, 48, 16000) here, a concatenation a fifth of that."""
    return torch.cat([x[..., :1].expand(-1, -1, left), x, x[..., -1:].expand(-1, -1, right)], -1)


class LowPassFilter1d(nn.Module):
    """Replicate-padded depthwise low-pass filter, here with stride 2: the downsampler."""

    def __init__(self, cutoff, half_width, stride, taps):
        super().__init__()
        self.stride, self.pad = stride, (taps // 2 - int(taps % 2 == 0), taps // 2)
        self.register_buffer("filter", kaiser_sinc(cutoff, half_width, taps).view(1, 1, taps))

    def forward(self, x):  # (B, C, L) -> (B, C, L / stride)
        C = x.shape[1]
        h = self.filter.expand(C, -1, -1).contiguous()  # (C, 1, taps): an expanded (strided)
        # weight sends depthwise convs to a slow generic kernel (5x slower here); so does the
        # official code
        return F.conv1d(replicate_pad(x, *self.pad), h, stride=self.stride, groups=C)


class UpSample1d(nn.Module):
    """x2 upsampling: zero-stuffing and the Kaiser-sinc low-pass (cutoff at the old Nyquist),
    as one transposed depthwise conv; replicate padding, trimmed back to exactly 2L samples."""

    def __init__(self, ratio=2, taps=12):
        super().__init__()
        self.ratio, self.taps = ratio, taps
        self.pad = taps // ratio - 1  # input samples of context on each side
        self.trim = (self.pad * ratio + (taps - ratio) // 2,  # output samples to drop, left
                     self.pad * ratio + (taps - ratio + 1) // 2)  # and right
        # cutoff at the old Nyquist, transition half-width 0.6 / ratio (alias_free_torch, BigVGAN)
        self.register_buffer("filter", kaiser_sinc(0.5 / ratio, 0.6 / ratio, taps).view(1, 1, taps))

    def forward(self, x):  # (B, C, L) -> (B, C, ratio * L)
        C = x.shape[1]
        x = replicate_pad(x, self.pad, self.pad)  # (B, C, L + 2 pad)
        # x ratio: zero-stuffing keeps 1/ratio of the energy (the filter has unit DC gain). The
        # official code scales the output; scaling the taps instead is bit-identical for ratio 2
        # (a power of two) and saves a pass over the signal
        h = (self.ratio * self.filter).expand(C, -1, -1).contiguous()  # (C, 1, taps)
        left, right = self.trim
        if left == right:  # even taps: the transposed conv's own padding trims, output contiguous
            return F.conv_transpose1d(x, h, stride=self.ratio, padding=left, groups=C)
        return F.conv_transpose1d(x, h, stride=self.ratio, groups=C)[..., left:-right]


class DownSample1d(nn.Module):
    def __init__(self, ratio=2, taps=12):
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, ratio, taps)  # as UpSample1d

    def forward(self, x):  # (B, C, 2L) -> (B, C, L)
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """x + 1/beta sin^2(alpha x), per channel, alpha and beta on a log scale initialised to 0
    (= 1): BigVGAN's SnakeBeta (Lee et al. 2023), after Snake (Ziyin et al. 2020)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))  # log alpha: frequency
        self.beta = nn.Parameter(torch.zeros(channels))   # log beta: 1 / magnitude

    def forward(self, x):  # (B, C, L) -> (B, C, L)
        alpha = self.alpha.exp()[None, :, None]
        inv_beta = 1.0 / (self.beta.exp()[None, :, None] + 1e-9)  # official: 1e-9 against 1/0
        if torch.is_grad_enabled():
            s = torch.sin(x * alpha)
            return torch.addcmul(x, s * s, inv_beta)  # x + inv_beta sin^2: the official rounding
        # inference: the same operations in place, in one buffer (no autograd to keep inputs for)
        return (x * alpha).sin_().square_().mul_(inv_beta).add_(x)


class Activation1d(nn.Module):
    """The anti-aliased activation (§II-A, BigVGAN §3.2): a nonlinearity makes frequencies above
    Nyquist that fold back as aliases, so it runs at twice the rate: upsample x2, SnakeBeta,
    low-pass and downsample x2. Measured stop-band attenuation: tests/test_bigcodec.py."""

    def __init__(self, channels, taps=12):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample1d(2, taps)
        self.downsample = DownSample1d(2, taps)

    def forward(self, x):  # (B, C, L) -> (B, C, L)
        return self.downsample(self.act(self.upsample(x)))


def WNConv1d(*args, **kwargs):
    return weight_norm(nn.Conv1d(*args, **kwargs))


def WNConvTranspose1d(*args, **kwargs):
    return weight_norm(nn.ConvTranspose1d(*args, **kwargs))


class ResidualUnit(nn.Module):
    """act -> conv k7 (dilation d) -> act -> conv k1, plus the input (§II-A; DAC's unit)."""

    def __init__(self, channels, dilation, taps):
        super().__init__()
        self.block = nn.Sequential(
            Activation1d(channels, taps),
            WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),  # 'same'
            Activation1d(channels, taps),
            WNConv1d(channels, channels, 1))

    def forward(self, x):  # (B, C, L) -> (B, C, L)
        return x + self.block(x)


class EncoderBlock(nn.Module):
    """Residual units at C/2 channels, act, then a strided conv (kernel 2s) to C channels."""

    def __init__(self, channels, stride, dilations, taps):
        super().__init__()
        c = channels // 2
        self.block = nn.Sequential(
            *[ResidualUnit(c, d, taps) for d in dilations],
            Activation1d(c, taps),
            WNConv1d(c, channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))

    def forward(self, x):  # (B, C/2, L) -> (B, C, L / s)
        return self.block(x)


class DecoderBlock(nn.Module):
    """act, a transposed conv (kernel 2s, stride s) from C_in to C_out, then residual units."""

    def __init__(self, in_ch, out_ch, stride, dilations, taps):
        super().__init__()
        self.block = nn.Sequential(
            Activation1d(in_ch, taps),
            # padding ceil(s/2) and output_padding s % 2 give exactly s * L samples
            WNConvTranspose1d(in_ch, out_ch, 2 * stride, stride=stride,
                              padding=stride // 2 + stride % 2, output_padding=stride % 2),
            *[ResidualUnit(out_ch, d, taps) for d in dilations])

    def forward(self, x):  # (B, C_in, L) -> (B, C_out, s * L)
        return self.block(x)


class ResLSTM(nn.Module):
    """Unidirectional LSTM over the frames with a skip connection (§II-A)."""

    def __init__(self, channels, layers):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, layers, batch_first=True)

    def forward(self, x):  # (B, C, F) -> (B, C, F)
        y = x.transpose(1, 2)  # (B, F, C)
        return (self.lstm(y)[0] + y).transpose(1, 2)


def zero_conv_biases(module):
    """Q1: the official init_weights; its trunc_normal on the weights is undone by weight norm."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d):  # ConvTranspose1d is not a Conv1d: its biases stay
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """conv k7 (1 -> ngf), 5 EncoderBlocks doubling the channels (48 -> 1536) while the rate
    falls by 2, 2, 2, 5, 5; the residual LSTM; act; conv k3 to D (§II-A, official CodecEncoder)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.ngf
        layers = [WNConv1d(1, c, 7, padding=3)]
        for s in cfg.strides:
            c *= 2
            layers.append(EncoderBlock(c, s, cfg.dilations, cfg.act_kernel))
        if cfg.lstm_layers:
            layers.append(ResLSTM(c, cfg.lstm_layers))
        layers += [Activation1d(c, cfg.act_kernel), WNConv1d(c, cfg.latent_dim, 3, padding=1)]
        self.block = nn.Sequential(*layers)
        zero_conv_biases(self)

    def forward(self, x):  # (B, 1, T) -> z (B, D, T / M)
        return self.block(x)

# -------------------------------------------------------------------------------------------------
# Low-dimensional vector quantization (§II-A): DAC's factorised codes, one codebook


class FactorizedVQ(nn.Module):
    """Project D -> d = 8 (weight-normed Linear), find the nearest of K entries by cosine
    (both sides L2-normalised), and project the entry back to D. Codebook learnt by gradient:
    the codebook term pulls each chosen entry to its inputs, the commitment term the encoder
    to its entries; the straight-through estimator passes the decoder's gradient to z_e (§II-C).
    Official FactorizedVectorQuantize; `_codebook` is its key."""

    def __init__(self, dim, size, codebook_dim):
        super().__init__()
        proj = dim != codebook_dim
        self.in_proj = weight_norm(nn.Linear(dim, codebook_dim)) if proj else nn.Identity()
        self.out_proj = weight_norm(nn.Linear(codebook_dim, dim)) if proj else nn.Identity()
        self._codebook = nn.Embedding(size, codebook_dim)  # N(0, 1) entries, PyTorch's default

    def nearest(self, z_e):  # z_e (N, d) -> codes (N,)
        e, c = F.normalize(z_e), F.normalize(self._codebook.weight)  # (N, d), (K, d)
        # the official expression of the squared distance, term by term, so that near-ties
        # round the same way (|e| = |c| = 1 up to rounding: the ranking is the cosine's)
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1]  # (N,)

    def forward(self, z):  # z (B, F, D) -> z_q (B, F, D), codes (B, F), losses {(B,)}
        z_e = self.in_proj(z)  # (B, F, d)
        codes = self.nearest(z_e.reshape(-1, z_e.shape[-1])).view(z_e.shape[:2])  # (B, F)
        z_q = self._codebook(codes)  # (B, F, d): Q2, the raw entry
        losses = {}
        if self.training:  # per example, as the official code (its eval mode returns zeros)
            # DEVIATION 1: squared errors (the code), not the L1 the reading notes record
            losses["commit"] = (z_e - z_q.detach()).pow(2).mean((1, 2))    # sg on the codebook
            losses["codebook"] = (z_q - z_e.detach()).pow(2).mean((1, 2))  # sg on the encoder
        z_q = z_e + (z_q - z_e).detach()  # straight-through: forward z_q, backward identity
        return self.out_proj(z_q), codes, losses

    def decode(self, codes):  # codes (B, F) -> (B, F, D)
        return self.out_proj(self._codebook(codes))


class ResidualVQ(nn.Module):
    """Q factorised VQs on successive residuals (the official ResidualVQ, Q = 1 in the paper)."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(
            FactorizedVQ(cfg.latent_dim, cfg.codebook_size, cfg.codebook_dim)
            for _ in range(cfg.num_quantizers))

    def forward(self, z):  # z (B, D, F) -> z_q (B, D, F), codes (B, Q, F), losses {scalar}
        residual = z.transpose(1, 2)  # (B, F, D)
        z_q, codes, losses = 0.0, [], {}
        for layer in self.layers:
            q, c, l = layer(residual)
            residual = residual - q
            z_q = z_q + q
            codes.append(c)
            for k, v in l.items():  # mean over the batch, summed over the quantizers
                losses[k] = losses.get(k, 0.0) + v.mean()
        return z_q.transpose(1, 2), torch.stack(codes, 1), losses

    def decode(self, codes):  # codes (B, Q, F), Q <= the quantizers -> z_q (B, D, F)
        return sum(layer.decode(codes[:, i]) for i, layer in enumerate(self.layers[:codes.shape[1]])
                   ).transpose(1, 2)


class Decoder(nn.Module):
    """The quantizer (the official CodecDecoder owns it: keys `quantizer.*`), then `model`: conv
    k7 (D -> 1536), the residual LSTM, 5 DecoderBlocks (x5, x5, x2, x2, x2, halving the
    channels), act, conv k7 to 1 channel, tanh (§II-A, official CodecDecoder)."""

    def __init__(self, cfg):
        super().__init__()
        self.quantizer = ResidualVQ(cfg)
        c = cfg.dec_channels
        layers = [WNConv1d(cfg.latent_dim, c, 7, padding=3)]
        if cfg.lstm_layers:
            layers.append(ResLSTM(c, cfg.lstm_layers))
        for s in reversed(cfg.strides):
            layers.append(DecoderBlock(c, c // 2, s, cfg.dilations, cfg.act_kernel))
            c //= 2
        layers += [Activation1d(c, cfg.act_kernel), WNConv1d(c, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        zero_conv_biases(self)

    def forward(self, z_q):  # (B, D, F) -> (B, 1, F * M)
        return self.model(z_q)

# -------------------------------------------------------------------------------------------------
# The codec


class BigCodec(nn.Module):
    """Encoder -> one factorised VQ -> decoder (§II-A, Fig. 1).

    The codec interface of every codec file: sample_rate, channels, frame_rate, num_codebooks,
    codebook_size, encode(wav) -> codes (B, Q, F), decode(codes) -> wav (B, 1, F*M), forward for
    training, save/load, and from_official for the released weights. Inputs of any length are
    right-padded to a multiple of M = 200; decode returns F*M samples (trim to the input's length,
    as `reconstruct` does)."""

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)  # the official CodecEnc
        self.decoder = Decoder(cfg)  # the official generator (with the quantizer)

    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: 1)  # speech, mono
    hop_length = property(lambda self: math.prod(self.cfg.strides))  # M = 200
    frame_rate = property(lambda self: self.cfg.sample_rate / self.hop_length)  # 80 Hz
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bitrate(self, n_q=None):
        """Bits per second: frame_rate * Q * log2(K) = 80 * 13 = 1040 (§II-A)."""
        return self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size)

    def check_wav(self, wav, sample_rate=None):
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"BigCodec expects {self.sample_rate} Hz audio, got "
                             f"{sample_rate} Hz; resample first (common.audio.resample)")
        if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 3:
            raise ValueError(f"BigCodec expects a float tensor (batch, 1, samples), got "
                             f"{type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
        if wav.shape[1] != 1:
            raise ValueError(f"BigCodec is mono (speech); got {wav.shape[1]} channels: mix down "
                             f"first, e.g. wav.mean(dim=1, keepdim=True)")
        if wav.shape[-1] == 0:
            raise ValueError("BigCodec got an empty signal (0 samples)")
        if not torch.isfinite(wav).all():
            raise ValueError("BigCodec got NaN or Inf samples")

    def forward(self, wav):
        """Training pass: wav (B, 1, T) -> x_hat (B, 1, T), codes (B, Q, F), and a dict with the
        commitment and codebook losses and the latent's RMS (a diagnostic)."""
        self.check_wav(wav)
        x = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))  # (B, 1, F*M)
        z = self.encoder(x)  # (B, D, F)
        z_q, codes, losses = self.decoder.quantizer(z)
        x_hat = self.decoder(z_q)[..., :wav.shape[-1]]  # (B, 1, T)
        return x_hat, codes, {**losses, "latent_rms": z.detach().pow(2).mean().sqrt()}

    @torch.no_grad()
    def encode(self, wav, n_q=None, sample_rate=None):
        """wav (B, 1, T) -> codes (B, n_q, ceil(T / M)) int64; n_q: the first codebooks of a
        residual VQ (default and paper: all, i.e. the one)."""
        self.check_wav(wav, sample_rate)
        if n_q is not None and not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in 1..{self.num_codebooks}, got {n_q}")
        was_training = self.training
        self.eval()
        x = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))  # (B, 1, F*M); Q4
        codes = self.decoder.quantizer(self.encoder(x))[1][:, :n_q]
        self.train(was_training)
        return codes

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, Q, F), ids in [0, K) -> wav (B, 1, F * M)."""
        if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dim() != 3:
            raise ValueError(f"codes must be an integer tensor (batch, codebooks, frames), got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} "
                             f"{tuple(getattr(codes, 'shape', ()))}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; this model has "
                             f"1..{self.num_codebooks}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"code ids must be in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return self.decoder(self.decoder.quantizer.decode(codes.long()))  # (B, 1, F*M)

    # Copied from soundstream.py: SoundStream.save
    def save(self, path):
        """Inference checkpoint: the model config and the weights (with the codebooks)."""
        atomic_save({"model": NAME, "config": dataclasses.asdict(self.cfg),
                     "state_dict": self.state_dict()}, path)

    # Copied from soundstream.py: SoundStream.load
    @classmethod
    def load(cls, path, map_location="cpu"):
        """model.pt or a training ckpt.pt -> the model, in eval mode."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(Config, ckpt["config"], path))
        model.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt["generator"])
        return model.eval()

    @classmethod
    def from_official(cls, source):
        """The authors' weights: a path to `bigcodec.pt` or its dict {'CodecEnc': ...,
        'generator': ...} (old-style weight norm, weight_g / weight_v), or the PyPI/HF layout
        {'encoder.*', 'decoder.*'} (parametrized weight norm). Loaded strictly, unedited: our
        module names are the official ones, and torch's weight-norm parametrization reads the old
        keys. The config is read off the tensors' shapes (config_from_official)."""
        state = source
        if not isinstance(source, dict):
            if not Path(source).is_file():
                raise FileNotFoundError(f"official checkpoint {source} not found")
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{source} is not a checkpoint torch.load(weights_only=True) can "
                                 f"read ({type(e).__name__}); expected the released bigcodec.pt"
                                 ) from None
        if isinstance(state, dict) and {"CodecEnc", "generator"} <= set(state):
            state = {**{f"encoder.{k}": v for k, v in state["CodecEnc"].items()},
                     **{f"decoder.{k}": v for k, v in state["generator"].items()}}
        if not isinstance(state, dict) or not any(str(k).startswith("encoder.block.0.")
                                                  for k in state):
            what = sorted(state)[:3] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{source if not isinstance(source, dict) else 'the state dict'} is "
                             f"not BigCodec's released checkpoint (expected the keys CodecEnc and "
                             f"generator, found {what})")
        model = cls(config_from_official(state))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise ValueError(f"the official weights do not fit this file's BigCodec: "
                             f"{first}") from None
        return model.eval()


def _weight(state, prefix):
    """A weight-normed layer's weight shape, from either key style (v, or original1)."""
    for key in (f"{prefix}.weight_v", f"{prefix}.parametrizations.weight.original1"):
        if key in state:
            return tuple(state[key].shape)
    raise ValueError(f"the official state dict has no weight for {prefix}")


def config_from_official(state):
    """The Config that an official state dict was built with, read off its shapes. The
    dilations and the activation's taps leave no trace in the shapes: the released values."""
    n = 1
    while f"encoder.block.{n}.block.0.block.0.act.alpha" in state:  # EncoderBlocks
        n += 1
    blocks = range(1, n)
    n_units = sum(1 for k in state if k.startswith("encoder.block.1.block.")
                  and k.endswith(".block.0.act.alpha"))
    strides = tuple(_weight(state, f"encoder.block.{i}.block.{n_units + 1}")[-1] // 2  # kernel 2s
                    for i in blocks)
    lstm_key = rf"encoder\.block\.{n}\.lstm\.weight_ih_l\d+"
    lstm_layers = sum(1 for k in state if re.fullmatch(lstm_key, k))
    last = n + 1 + (lstm_layers > 0)  # the last conv's index: [LSTM,] act, conv
    codebook = state["decoder.quantizer.layers.0._codebook.weight"].shape
    return Config(ngf=_weight(state, "encoder.block.0")[0], strides=strides,
                  dilations=Config.dilations[:n_units], lstm_layers=lstm_layers,
                  latent_dim=_weight(state, f"encoder.block.{last}")[0],
                  dec_channels=_weight(state, "decoder.model.0")[0],
                  num_quantizers=sum(1 for k in state if k.endswith("._codebook.weight")),
                  codebook_size=codebook[0], codebook_dim=codebook[1],
                  act_kernel=state["encoder.block.1.block.0.block.0.upsample.filter"].shape[-1])

# -------------------------------------------------------------------------------------------------
# Discriminators (§II-B): HiFi-GAN's multi-period and a multi-resolution STFT discriminator


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's period discriminator [Kong et al. 2020] as ParallelWaveGAN implements it (the
    official module/mpd.py): the wave reflect-padded to a multiple of p and folded to (T/p, p),
    five (5 x 1) convs with strides 3, 3, 3, 3, 1 and channels x4 (16 -> 512), LeakyReLU 0.1,
    then a (2 x 1) conv to one channel. Weight norm throughout."""

    def __init__(self, period, channels=16, max_channels=512):
        super().__init__()
        self.period = period
        layers, c_in, c = [], 1, channels
        for s in (3, 3, 3, 3, 1):  # downsample_scales (official default)
            layers.append(nn.Sequential(weight_norm(nn.Conv2d(c_in, c, (5, 1), (s, 1), (2, 0))),
                                        nn.LeakyReLU(0.1)))
            c_in, c = c, min(c * 4, max_channels)
        self.convs = nn.ModuleList(layers)
        # official quirk: kernel (kernel_sizes[1] - 1) = 2 rows, padded by 1: one row more out
        self.output_conv = weight_norm(nn.Conv2d(c_in, 1, (2, 1), 1, (1, 0)))

    def forward(self, x):  # (B, 1, T) -> [features (B, C_l, T_l, p)] x 5 + [logits (B, T_out * p)]
        B, _, T = x.shape
        x = F.pad(x, (0, -T % self.period), mode="reflect")
        x = x.view(B, 1, -1, self.period)  # (B, 1, T/p, p)
        outs = []
        for layer in self.convs:
            x = layer(x)
            outs.append(x)
        outs.append(self.output_conv(x).flatten(1))
        return outs


class NLayerSpecDiscriminator(nn.Module):
    """One resolution: (5 x 5) conv stride 2, three (5 x 5) convs stride 2 doubling the channels,
    a (3 x 3) conv doubling again (capped), and a (3 x 3) conv to the logits; LeakyReLU 0.2
    (official module/mstft.py, kernel_sizes (5, 3), downsample_scales (2, 2, 2))."""

    def __init__(self, channels=32, max_channels=512):
        super().__init__()
        layers, c = [nn.Conv2d(1, channels, 5, 2, 2)], channels
        for _ in range(3):
            layers.append(nn.Conv2d(c, min(c * 2, max_channels), 5, 2, 2))
            c = min(c * 2, max_channels)
        layers.append(nn.Conv2d(c, min(c * 2, max_channels), 3, 1, 1))
        c = min(c * 2, max_channels)
        self.convs = nn.ModuleList(weight_norm(m) for m in layers)
        self.out = weight_norm(nn.Conv2d(c, 1, 3, 1, 1))

    def forward(self, spec):  # (B, 1, n/2+1, frames) -> [features] x 5 + [logits map]
        outs = []
        for conv in self.convs:
            spec = F.leaky_relu(conv(spec), 0.2)
            outs.append(spec)
        outs.append(self.out(spec))
        return outs


class SpecDiscriminator(nn.Module):
    """STFT magnitudes at five resolutions (n = 128 ... 2048, hop n/4, Hann window n), each
    through its own NLayerSpecDiscriminator (official module/mstft.py; EnCodec's MS-STFT idea on
    magnitudes). |X| = sqrt(clamp(re^2 + im^2, 1e-7, 1e3)) as the official stft()."""

    def __init__(self, ffts, channels=32, max_channels=512):
        super().__init__()
        self.ffts = tuple(ffts)
        self.discs = nn.ModuleList(NLayerSpecDiscriminator(channels, max_channels) for _ in ffts)
        for n in self.ffts:
            self.register_buffer(f"win{n}", torch.hann_window(n), persistent=False)

    def forward(self, x):  # (B, 1, T) -> [[features..., logits]] per resolution
        x = x.squeeze(1).float()  # (B, T); the STFT in float32, also under AMP
        outs = []
        for n, disc in zip(self.ffts, self.discs):
            with torch.autocast(x.device.type, enabled=False):
                spec = torch.stft(x, n, n // 4, window=getattr(self, f"win{n}"),
                                  return_complex=True)  # (B, n/2+1, frames)
                mag = (spec.real.pow(2) + spec.imag.pow(2)).clamp(1e-7, 1e3).sqrt()
            outs.append(disc(mag[:, None]))  # (B, 1, n/2+1, frames)
        return outs


class Discriminators(nn.Module):
    """Both discriminators of the official configuration; outputs in one list, MPD first."""

    def __init__(self, run):
        super().__init__()
        self.mpd = nn.ModuleList(PeriodDiscriminator(p, run.mpd_channels, run.mpd_max_channels)
                                 for p in run.mpd_periods)
        self.mstft = SpecDiscriminator(run.stft_ffts, run.stft_channels, run.stft_max_channels)

    def forward(self, x):  # (B, 1, T) -> [[features..., logits]] x (5 periods + 5 resolutions)
        return [d(x) for d in self.mpd] + self.mstft(x)

# -------------------------------------------------------------------------------------------------
# Losses (§II-C; official criterions/ and lightning_module.py)


def discriminator_loss(real, fake):
    """Least squares (LSGAN, Mao et al. 2017): sum over the discriminators of
    mean((D(x) - 1)^2) + mean(D(G(x))^2); only the last output (the logits) of each."""
    return sum(F.mse_loss(r[-1], torch.ones_like(r[-1]))
               + F.mse_loss(f[-1], torch.zeros_like(f[-1])) for r, f in zip(real, fake))


def adversarial_loss(fake):
    """The generator's least-squares term: sum over the discriminators of mean((D(G(x)) - 1)^2)."""
    return sum(F.mse_loss(f[-1], torch.ones_like(f[-1])) for f in fake)


def feature_loss(real, fake):
    """L1 feature matching (HiFi-GAN): mean |D_l(x) - D_l(G(x))| summed over every layer but the
    logits and over the discriminators (real features carry no gradient)."""
    return sum(F.l1_loss(ff, fr.detach())
               for r, f in zip(real, fake) for fr, ff in zip(r[:-1], f[:-1]))


class MelLoss(nn.Module):
    """DAC's multi-scale mel loss (Kumar et al. 2023), as the official criterions/mel_loss.py: for
    windows w = 32 ... 2048 (hop w/4) with 5 ... 320 Slaney mel bands of the STFT magnitude,
    the mean |log10 max(S_x, 1e-5) - log10 max(S_y, 1e-5)|, summed over the 7 scales. Always
    float32 (half precision cannot hold the 1e-5 floor)."""

    def __init__(self, sample_rate, windows, n_mels):
        super().__init__()
        self.sample_rate, self.scales = sample_rate, tuple(zip(windows, n_mels))

    def forward(self, x, x_hat):  # (B, 1, T) each -> scalar
        with torch.autocast(x.device.type, enabled=False):
            x, x_hat = x.squeeze(1).float(), x_hat.squeeze(1).float()  # (B, T)
            loss = 0.0
            for w, n in self.scales:
                S_x, S_y = (mel_spectrogram(v, self.sample_rate, w, w // 4, n)
                            .clamp(min=1e-5).log10() for v in (x, x_hat))  # (B, n, frames) each
                loss = loss + (S_x - S_y).abs().mean()
        return loss


def lr_at(step, run):
    """The official WarmupLR (common/schedulers.py), a function of the step, so that a resumed run
    continues exactly: from 1e-5, a quadratic rise to `lr` over the warm-up, then a straight
    line down to `min_lr` over `decay_steps`, then min_lr (Q5). Paper: 1k warm-up steps, 1e-4 to
    1e-5 (§III-A)."""
    s1, s2 = run.warmup_steps, run.warmup_steps + run.decay_steps
    if step < s1:
        return 1e-5 + (run.lr - 1e-5) * (step / s1) ** 2  # official: init lr 1e-5, fixed
    if step < s2:
        return run.lr + (run.min_lr - run.lr) * (step - s1) / (s2 - s1)
    return run.min_lr

# -------------------------------------------------------------------------------------------------
# Training infrastructure: the generic parts (marked copies of soundstream.py, tests/test_copies.py)


# Copied from soundstream.py: setup_distributed
def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # gloo on CPU
    return rank, world, device


# Copied from soundstream.py: busy_cores
def busy_cores():
    """Cores that other processes keep busy now: /proc/stat sampled 0.2 s apart (Linux), else
    the 1-minute load average."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    try:
        (all0, idle0), _, (all1, idle1) = sample(), time.sleep(0.2), sample()
        return round(os.cpu_count() * (1 - (idle1 - idle0) / max(1, all1 - all0)))
    except (OSError, IndexError, ValueError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


# Copied from soundstream.py: pick_threads
def pick_threads(requested, world=1):
    """CPU threads for this process: `requested`, or with 0 the cores other processes leave
    idle. torch's threads spin-wait for one another: two threads on a 2-core machine with one
    busy core ran 10-20 times slower than one thread (measured here). Returns (threads, why)."""
    if requested:
        return requested, ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = min(busy_cores(), cores - 1)
    why = f" ({busy} of {cores} cores busy with other work)" if busy else ""
    return max(1, (cores - busy) // world), why


# Copied from soundstream.py: rng_state
def rng_state():
    """Every RNG a step could touch, as tensors and plain types (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# Copied from soundstream.py: set_rng_state
def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Copied from soundstream.py: atomic_save
def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Copied from soundstream.py: load_checkpoint
def load_checkpoint(path, map_location="cpu"):
    """A model.pt or ckpt.pt of this file's model, loaded as data (weights_only), or one line
    that says what is wrong with it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own message (advice to set weights_only=False) misleads
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read "
                         f"({type(e).__name__}); expected --train's model.pt or ckpt.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("model") != NAME:
        kind = ckpt.get("model", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is a {kind!r} checkpoint, not a {NAME!r} one")
    return ckpt


# Copied from soundstream.py: config_from_dict
def config_from_dict(cls, d, path="checkpoint"):
    """Rebuild a config dataclass; a field it does not know is named in a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} field(s) {', '.join(unknown)} "
                         f"(written by another version of {Path(__file__).name}?)")
    return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items()})


# Copied from soundstream.py: batches_for_epoch
def batches_for_epoch(n_items, batch_size, epoch, seed, rank, world):
    """Index batches of one epoch: a seeded permutation split over ranks (as DistributedSampler),
    full batches only. Deterministic: a resumed run continues with the batch it would have seen."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = batch_size // world
    n_batches = n_items // (per_rank * world)
    if n_batches == 0:
        raise ValueError(f"{n_items} training files are fewer than one batch of {batch_size}")
    return [perm[(b * world + rank) * per_rank:(b * world + rank + 1) * per_rank]
            for b in range(n_batches)]


# Copied from soundstream.py: log_line
def log_line(step, total, stats, seconds_per_step):
    """One fixed-format line: every number of `stats` (lists are joined with '/')."""
    def fmt(v):
        return "/".join(f"{u:.3g}" for u in v) if isinstance(v, list) else f"{v:.4g}"
    parts = " | ".join(f"{k} {fmt(v)}" for k, v in stats.items())
    return f"step {step}/{total} | {parts} | {seconds_per_step:.2f} s/step"


# Copied from soundstream.py: fit
def fit(trainer, run, dataset, interrupt_after=None):
    """The training loop around `trainer.step(batch, diagnose)`. Ctrl-C or SIGTERM finishes the
    step, saves and leaves; every rank takes the same decisions (all-reduced flags), and an error
    on rank 0 (logging, samples, saving) stops every rank instead of leaving them waiting in a
    collective. Returns the stats of every step this process ran. interrupt_after: stop as if
    interrupted after that many steps (for the tests)."""
    out, master = Path(run.out), trainer.rank == 0
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    per_epoch = len(batches_for_epoch(len(dataset), run.batch_size, 0, run.seed, 0, trainer.world))
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=run.steps, initial=trainer.step_count, dynamic_ncols=True)
    history, t_last, n_last = [], time.time(), trainer.step_count
    try:
        while trainer.step_count < run.steps and not stop["now"]:
            epoch, offset = divmod(trainer.step_count, per_epoch)
            dataset.set_epoch(epoch)
            batches = batches_for_epoch(len(dataset), run.batch_size, epoch, run.seed,
                                        trainer.rank, trainer.world)[offset:]
            # a private generator: a DataLoader iterator must not draw from the global RNG, or a
            # resumed run (which creates one mid-epoch) would drift from the uninterrupted one
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, num_workers=run.num_workers,
                generator=torch.Generator().manual_seed(run.seed + epoch))
            for batch in loader:
                step = trainer.step_count + 1
                log_now = step % run.log_every == 0 or step == run.steps or step == 1
                stats = trainer.step(batch, diagnose=log_now)
                history.append(stats)
                leave = stop["now"] or step >= run.steps or len(history) == interrupt_after
                # losses only: gradient norms (|...|) are inf on an fp16 step that GradScaler skips
                finite = all(math.isfinite(v) for k, v in stats.items()
                             if not isinstance(v, list) and not k.startswith("|"))
                error = None
                if master:  # rank 0's own work; its failure is shared through `flags`
                    try:
                        if progress:
                            progress.update(1)
                        if log_now:
                            dt = (time.time() - t_last) / max(1, step - n_last)
                            t_last, n_last = time.time(), step
                            line = log_line(step, run.steps, stats, dt)
                            with open(out / "log.txt", "a") as f:
                                f.write(line + "\n")
                            (progress.write if progress else print)(line)
                        if step % run.sample_every == 0:
                            trainer.write_sample(out / "samples" / f"step{step:07d}")
                    except Exception as e:  # noqa: BLE001 - re-raised below, after the others know
                        error = e
                flags = torch.tensor([leave, not finite, error is not None], dtype=torch.float32,
                                     device=trainer.device)
                if trainer.world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[2]:
                    # no local may keep the exception: a frame that holds the exception it
                    # raises is a cycle that keeps the trainer and gloo's threads alive until
                    # exit, where they abort the process (SIGABRT, 1 run in 8 before this)
                    failure, error = error or RuntimeError("rank 0 failed; see its message"), None
                    try:
                        raise failure
                    finally:
                        del failure
                if flags[1]:
                    raise FloatingPointError(f"training diverged: non-finite loss at step {step} "
                                             f"({stats}); the last checkpoint is {out / 'ckpt.pt'}")
                if step % run.ckpt_every == 0 or flags[0]:
                    save_checkpoint(trainer, out)  # an interrupted run keeps everything so far
                if flags[0]:
                    stop["now"] = True
                    break
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        if progress:
            progress.close()
    return history


# Copied from soundstream.py: save_checkpoint
def save_checkpoint(trainer, out):
    """OUT/ckpt.pt (resume) and OUT/model.pt (inference), by rank 0; every rank must call it."""
    state = trainer.state_dict()
    if trainer.rank == 0:
        atomic_save(state, Path(out) / "ckpt.pt")
        trainer.model.save(Path(out) / "model.pt")


# Copied from soundstream.py: evaluate
@torch.no_grad()
def evaluate(model, utterances, n_qs, title, metrics, what="held-out utterances", notice=False):
    """The evaluation table (common/evaluation.py): `metrics` averaged over `utterances`, (file,
    transcript or None) pairs, for the ground truth scored against itself (its WER is the
    recogniser's own) and for each n_q, with the codebook entropy bitrate (the paper's entropy
    bound). Returns the rows. Progress goes to stderr, and so does every note (a metric that
    could not be computed on a file, named), counted in the table's last column."""
    model.eval()
    device = next(model.parameters()).device
    if not any(text for _, text in utterances):  # e.g. a folder: nothing to compute a WER from
        metrics = [m for m in metrics if not evaluation.METRICS[m].needs_transcript]
    print(f"{title}: {len(utterances)} {what}", flush=True)
    wavs = [load(f, model.sample_rate, model.channels, notice=notice)[0].to(device)
            for f, _ in utterances]
    columns = (("n_q", "n_q", ""), ("kbps", "kbps", ".2f"), ("entropy_kbps", "H-kbps", ".2f"))
    print(evaluation.table_header(metrics, columns), flush=True)
    rows = []
    for n_q in ["truth", *n_qs]:
        scores, codes, notes = [], [], []
        for i, ((f, text), wav) in enumerate(zip(utterances, wavs)):
            if sys.stderr.isatty():  # progress
                print(f"\r  n_q {n_q}: {i + 1}/{len(wavs)}", end="", file=sys.stderr, flush=True)
            if n_q == "truth":
                rec = wav.cpu()
            else:
                sent = model.encode(wav[None], n_q)  # codes (1, n_q, L), or with side info
                codes.append(getattr(sent, "codes", sent).cpu())  # e.g. EnCodec's (codes, scale)
                rec = model.decode(sent)[0, :, :wav.shape[-1]].cpu()
            s, n = evaluation.score(wav.cpu(), rec, model.sample_rate, metrics, text, name=f)
            scores.append(s)
            notes += n
        if sys.stderr.isatty():
            print("\r", end="", file=sys.stderr)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        row = {"n_q": n_q, **evaluation.mean_scores(scores), "notes": len(notes)}
        if codes:
            h = codebook_stats(codes, model.codebook_size, model.frame_rate)["bitrate_entropy"]
            row.update(kbps=model.bitrate(n_q) / 1000, entropy_kbps=h / 1000)
        rows.append(row)
        print(evaluation.table_row(row, metrics, columns), flush=True)
    print(evaluation.table_legend(metrics), flush=True)
    return rows


# Copied from soundstream.py: eval_utterances
def eval_utterances(data, limit=None):
    """Held-out (file, transcript or None) pairs: the test split of the demo corpus or of a
    manifest (its "text" field)."""
    entries = read_manifest(data or demo_manifest(), "test")
    return [(Path(e["path"]), e.get("text")) for e in entries][:limit]


# -------------------------------------------------------------------------------------------------
# Training: the model-specific part


class Trainer:
    """The generator G, the discriminators D and their optimizers; `step()` is one GAN update."""

    def __init__(self, cfg, run, rank=0, world=1, device="cpu"):
        check_config(cfg, run)
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = BigCodec(cfg).to(self.device)
        self.disc = Discriminators(run).to(self.device)
        self.mel_loss = MelLoss(cfg.sample_rate, run.mel_windows, run.mel_bins)
        # AdamW (§III-A); the lr is set at every step from lr_at (Q5)
        adamw = dict(lr=run.lr, betas=tuple(run.betas), weight_decay=run.weight_decay)
        self.opt_g = torch.optim.AdamW(self.model.parameters(), **adamw)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), **adamw)
        cuda = self.device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.amp_dtype = amp if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.amp == "fp16")
        self.G, self.D = self.model, self.disc
        if world > 1:
            ids = [self.device.index] if cuda else None
            self.G = nn.parallel.DistributedDataParallel(self.model, ids)
            self.D = nn.parallel.DistributedDataParallel(self.disc, ids)
        if run.compile and cuda:
            self.G = torch.compile(self.G)
        torch.manual_seed(run.seed + rank)
        self.step_count = 0

    # Copied from soundstream.py: Trainer.autocast
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def step(self, batch, diagnose=False):
        """One update of D, then of G on 15 mel + adv + feat + 0.25 commit + codebook (§II-C),
        as the official training_step: D first on the detached output, then G. Returns the
        logged numbers (unweighted terms) as floats."""
        self.model.train()  # evaluation and samples leave it in eval mode
        lr = lr_at(self.step_count, self.run)  # from the step: exact on resume
        for group in self.opt_g.param_groups + self.opt_d.param_groups:
            group["lr"] = lr
        x = batch.to(self.device)  # (B, 1, T)
        with self.autocast():
            x_hat, codes, aux = self.G(x)
        run = self.run
        if self.step_count < run.gan_start:
            return self.warmup_step(x, x_hat, codes, aux, diagnose)
        # discriminators: real and fake in one forward (one DDP forward per backward)
        with self.autocast():
            both = self.D(torch.cat([x, x_hat.detach()]))  # 2B examples
            B = len(x)
            real = [[o[:B] for o in outs] for outs in both]  # the first B: x
            fake = [[o[B:] for o in outs] for outs in both]  # the last B: G(x)
            d_loss = discriminator_loss(real, fake)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.unscale_(self.opt_d)  # clip the true gradient, not the scaled one
        d_norm = nn.utils.clip_grad_norm_(self.disc.parameters(), run.grad_clip)
        self.scaler.step(self.opt_d)
        # generator: D only evaluated, as the bare module (no DDP sync), its parameters frozen
        self.disc.requires_grad_(False)
        with self.autocast():
            with torch.no_grad():
                real = self.disc(x)
            fake = self.disc(x_hat)
            losses = {"mel": self.mel_loss(x, x_hat), "adv": adversarial_loss(fake),
                      "feat": feature_loss(real, fake), "commit": aux["commit"],
                      "codebook": aux["codebook"]}
            weights = {"mel": run.lambda_mel, "adv": run.lambda_adv, "feat": run.lambda_feat,
                       "commit": run.lambda_commit, "codebook": run.lambda_codebook}
            g_loss = sum(weights[k] * v for k, v in losses.items())
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.unscale_(self.opt_g)
        stats = {"d": d_loss, **losses,
                 "|G|": nn.utils.clip_grad_norm_(self.model.parameters(), run.grad_clip),
                 "|D|": d_norm}
        self.scaler.step(self.opt_g)
        self.disc.requires_grad_(True)
        return self.finish_step(stats, lr, x_hat, codes, aux, diagnose)

    def warmup_step(self, x, x_hat, codes, aux, diagnose):
        """A generator update on the mel and VQ terms only, D untouched: the first `gan_start`
        steps, as Parallel WaveGAN (Yamamoto et al. 2020) fixes D for its first 100k steps."""
        run = self.run
        with self.autocast():
            mel = self.mel_loss(x, x_hat)
            loss = (run.lambda_mel * mel + run.lambda_commit * aux["commit"]
                    + run.lambda_codebook * aux["codebook"])
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt_g)
        stats = {"mel": mel, "commit": aux["commit"], "codebook": aux["codebook"],
                 "|G|": nn.utils.clip_grad_norm_(self.model.parameters(), run.grad_clip)}
        self.scaler.step(self.opt_g)
        return self.finish_step(stats, lr_at(self.step_count, run), x_hat, codes, aux, diagnose)

    def finish_step(self, stats, lr, x_hat, codes, aux, diagnose):
        self.scaler.update()
        self.step_count += 1
        stats = {k: v.item() for k, v in stats.items()}
        stats["lr"] = lr
        if diagnose:  # usage: the share of the K entries this batch used (Q3: no reset)
            s = codebook_stats(codes.cpu(), self.cfg.codebook_size, 1)
            stats["z_rms"] = aux["latent_rms"].item()
            stats["dc"] = x_hat.detach().mean().item()
            stats["ppl"] = [round(p, 1) for p in s["perplexity"]]
            stats["use"] = [round(u, 3) for u in s["usage"]]
        return stats

    # Copied from soundstream.py: Trainer.write_sample with SoundStream->BigCodec
    def write_sample(self, stem):
        """A reconstruction of the first validation file, as wav and comparison PNG."""
        model = self.model.eval()
        wav, sr = load(self.valid_file, model.sample_rate, 1)
        rec = reconstruct(model, wav.to(self.device)).cpu()
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        save(f"{stem}.wav", rec, sr)
        plot_comparison(f"{stem}.png", wav, rec, sr, title=f"{Path(self.valid_file).name}: "
                        f"original vs BigCodec, {model.bitrate() / 1000:g} kbps")
        model.train()

    # Copied from soundstream.py: Trainer.state_dict
    def state_dict(self):
        """Everything an exact resume needs. Collective under DDP: every rank's RNG state."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": NAME, "config": dataclasses.asdict(self.cfg),
                "train_config": dataclasses.asdict(self.run), "step": self.step_count,
                "generator": self.model.state_dict(), "discriminators": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs}

    # Copied from soundstream.py: Trainer.load_state_dict
    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["generator"])
        self.disc.load_state_dict(ckpt["discriminators"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count = ckpt["step"]
        if len(ckpt["rng"]) != self.world and self.rank == 0:
            print(f"note: the checkpoint was written by {len(ckpt['rng'])} process(es), this run "
                  f"has {self.world}: training continues, but not bit-exactly")
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


def codebook_usage(model, utterances):
    """Entries used on the utterances (of K) and the entropy bitrate (§III-B: approx. bitrate)."""
    device = next(model.parameters()).device
    codes = [model.encode(load(f, model.sample_rate, 1)[0][None].to(device)).cpu()  # (1, Q, F)
             for f, _ in utterances]
    s = codebook_stats(codes, model.codebook_size, model.frame_rate)
    used = round(s["usage"][0] * model.codebook_size)
    print(f"codebook usage: {used} of {model.codebook_size} entries ({100 * s['usage'][0]:.1f} %) "
          f"on {sum(c.shape[-1] for c in codes)} frames; entropy bitrate "
          f"{s['bitrate_entropy'] / 1000:.3f} of {model.bitrate() / 1000:.3f} kbps", flush=True)
    return s


def train(cfg, run, resume=False, overwrite=False, interrupt_after=None):
    """A whole training run; returns this process's per-step stats (the tests compare them)."""
    rank, world, device = setup_distributed()
    out = Path(run.out)
    start = load_checkpoint(out / "ckpt.pt") if resume else None
    if not resume and not overwrite and (out / "ckpt.pt").is_file():
        raise ValueError(f"{out} already holds a training run (ckpt.pt); continue it with "
                         f"--resume, or start over with --overwrite")
    if run.batch_size % world:
        raise ValueError(f"batch_size {run.batch_size} is not divisible by {world} processes")
    threads, why = pick_threads(run.threads, world) if device.type == "cpu" else (0, "")
    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(cfg, run, rank, world, device)
    if start:
        trainer.load_state_dict(start)
    master = rank == 0
    files = resolve_files(run.data or None, "train")
    is_manifest = not run.data or run.data.endswith(".jsonl")
    trainer.valid_file = (resolve_files(run.data or None, "valid") if is_manifest else files)[0]
    dataset = AudioDataset(files, cfg.sample_rate, channels=1, segment=int(run.segment_seconds
                           * cfg.sample_rate), seed=run.seed)
    held_out = eval_utterances(run.data, run.eval_utterances) if is_manifest else None
    metrics = evaluation.parse_metrics(run.metrics)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        m = trainer.model
        n_g = sum(p.numel() for p in m.parameters()) / 1e6
        n_d = sum(p.numel() for p in trainer.disc.parameters()) / 1e6
        how = f"resumed at step {trainer.step_count}" if start else "new run"
        print(f"BigCodec {how}: {n_g:.2f}M generator + {n_d:.2f}M discriminator parameters, "
              f"{m.frame_rate:g} Hz x {m.num_codebooks} x {m.codebook_size} entries = "
              f"{m.bitrate() / 1000:g} kbps, {len(files)} training files, {world} process(es) on "
              f"{device}" + (f", {threads} CPU thread(s){why}" if threads else ""), flush=True)
        if not start and held_out:  # the untrained model, to compare with the final table
            evaluate(m, held_out, [cfg.num_quantizers], "untrained model (step 0)", metrics)
    try:
        history = fit(trainer, run, dataset, interrupt_after)
    except BaseException:
        if world > 1:  # a process that leaves with a live process group aborts in C++
            dist.destroy_process_group()
        raise
    if master and trainer.step_count < run.steps:
        print(f"stopped at step {trainer.step_count}; saved {out / 'ckpt.pt'}; continue with: "
              f"python {Path(__file__).name} --train --resume --out {run.out}")
    elif master:
        trainer.write_sample(out / "samples" / "final")
        if held_out:
            evaluate(trainer.model, held_out, [cfg.num_quantizers], f"step {trainer.step_count}",
                     metrics)
            codebook_usage(trainer.model, held_out)
        elif held_out is None:  # a folder (eval_utterances 0: no table)
            print(f"note: {run.data} is a folder, which has no held-out split; evaluate on another "
                  f"folder with --eval --data DIR")
        print(f"saved {out / 'model.pt'} (inference) and {out / 'ckpt.pt'} (resume)")
    if world > 1:
        dist.destroy_process_group()
    return history

# -------------------------------------------------------------------------------------------------
# Inference helpers and the command line


def reconstruct(model, wav):
    """wav (1, T) or (B, 1, T) -> the reconstruction, same shape."""
    x = wav if wav.dim() == 3 else wav[None]
    y = model.decode(model.encode(x))[..., :x.shape[-1]]
    return y if wav.dim() == 3 else y[0]


# Copied from soundstream.py: read_codes
def read_codes(path, model):
    """The codes (Q, L) and sample count of an --encode file, checked against the model."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        npz = np.load(path, allow_pickle=False)  # plain arrays, never pickled objects
    except (OSError, ValueError):
        raise ValueError(f"{path} is not a codes file written by --encode "
                         f"(not a .npz archive)") from None
    try:
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not a .npz archive")
        codes = torch.from_numpy(npz["codes"].astype(np.int64))
        num_samples = int(npz["num_samples"])
        meta = (str(npz["model"]), int(npz["codebook_size"]), int(npz["sample_rate"]),
                float(npz["frame_rate"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a codes file written by --encode ({e})") from None
    mine = (NAME, model.codebook_size, model.sample_rate, model.frame_rate)
    if meta != mine:
        raise ValueError(f"{path} holds {meta[0]} codes ({meta[1]}-entry codebooks, {meta[2]} Hz, "
                         f"{meta[3]:g} frames/s); this checkpoint is a {NAME} with {mine[1]}-entry "
                         f"codebooks at {mine[2]} Hz, {mine[3]:g} frames/s")
    if codes.dim() != 2:
        raise ValueError(f"{path}: codes must be (codebooks, frames), got {tuple(codes.shape)}")
    return codes, num_samples


# Copied from soundstream.py: field_help
def field_help(cls):
    """The comment after each field in the dataclass's source: the -h text of its flag."""
    helps, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"    (\w+): [^#]*#\s*(.*)", line)
        if m:
            name, helps[m[1]] = m[1], m[2]
        elif name and re.match(r"\s{20,}#\s*(.*)", line):  # a continued comment
            helps[name] += " " + line.strip()[1:].strip()
    return helps


# Copied from soundstream.py: Parser
class Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):  # name a mistyped flag before anything else
        known = [o for a in self._actions for o in a.option_strings]
        for arg in sys.argv[1:] if args is None else args:
            flag = str(arg).split("=")[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                self.error(f"unknown flag {flag}{hint}")
        return super().parse_args(args, namespace)

    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"error: {message} (python {Path(__file__).name} -h lists the flags)\n")


def default_preset():
    """`--train` without --preset: the paper's model where there is a GPU to train it, else the
    CPU demo. Returns (name, why)."""
    if torch.cuda.is_available():
        return "paper", "a GPU is available"
    return "tiny", ("no GPU here: the CPU demo, about 9 minutes; --preset paper for the "
                    "released size")


def build_parser():
    p = Parser(description="BigCodec (Xin et al. 2024): train, encode, decode, evaluate.",
               allow_abbrev=False)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train (DDP when launched by torchrun)")
    act.add_argument("--encode", metavar="WAV", help="audio file -> codes .npz")
    act.add_argument("--decode", metavar="NPZ", help="codes .npz -> audio file")
    act.add_argument("--reconstruct", metavar="WAV", help="encode + decode; prints metrics")
    act.add_argument("--eval", action="store_true", help="metrics table over held-out files")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="default: paper with a GPU, tiny without one")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--ckpt", help="model.pt (or ckpt.pt) for encode/decode/reconstruct/eval")
    p.add_argument("--official", metavar="PATH", help="the authors' bigcodec.pt instead of --ckpt")
    for cls in (Config, TrainConfig):  # every config field is a flag, typed from its default
        group = p.add_argument_group(f"{cls.__name__} fields ({cls.__doc__.split('.')[0].lower()})")
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            values = {name: getattr(c if cls is Config else r, f.name)
                      for name, (c, r) in PRESETS.items()}
            shown = ", ".join(f"{n}: {v}" for n, v in values.items())
            kw = {"help": f"{helps.get(f.name, '')} [{shown}]".replace("%", "%%")}
            if isinstance(f.default, bool):
                kw.update(type=parse_bool, metavar="BOOL")
            elif isinstance(f.default, tuple):
                kw.update(type=lambda s, t=type(f.default[0]): tuple(t(v) for v in s.split(",")),
                          metavar="A,B")
            else:
                kw.update(type=type(f.default), choices=CHOICES.get(f.name))
            group.add_argument(f"--{f.name}", **kw)
    return p


# Copied from soundstream.py: parse_bool
def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# run settings a resumed run may change; everything else is fixed by its checkpoint
RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "eval_utterances",
                    "metrics", "num_workers", "threads")


# Copied from soundstream.py: configs_from_args
def configs_from_args(args):
    """(Config, TrainConfig): the preset with the flags given on the command line."""
    cfg, run = PRESETS[args.preset]
    given = [{f.name: getattr(args, f.name) for f in dataclasses.fields(c)
              if getattr(args, f.name) is not None} for c in (Config, TrainConfig)]
    if args.resume:
        ckpt = load_checkpoint(Path(args.out or run.out) / "ckpt.pt")
        cfg = config_from_dict(Config, ckpt["config"], args.out)
        run = config_from_dict(TrainConfig, ckpt["train_config"], args.out)
        changed = sorted(k for d, c in zip(given, (cfg, run)) for k, v in d.items()
                         if k not in RESUME_OVERRIDES + ("out",) and v != getattr(c, k))
        if changed:
            raise ValueError(f"cannot change {', '.join(changed)} when resuming; only "
                             f"{', '.join(RESUME_OVERRIDES)}")
    return dataclasses.replace(cfg, **given[0]), dataclasses.replace(run, **given[1])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.train:
        if args.preset is None:
            args.preset, why = default_preset()
            data = args.data or "the demo corpus (data/demo; --data DIR for yours)"
            if not args.resume:
                print(f"preset {args.preset} ({why}); data: {data}", flush=True)
        cfg, run = configs_from_args(args)
        train(cfg, run, resume=args.resume, overwrite=args.overwrite)
        return
    if args.official and args.ckpt:
        raise ValueError("give --ckpt or --official, not both")
    if not (args.ckpt or args.official):
        raise ValueError("--ckpt (e.g. runs/bigcodec/model.pt) or --official bigcodec.pt "
                         "is required")
    model = BigCodec.from_official(args.official) if args.official else BigCodec.load(args.ckpt)
    source = args.official or args.ckpt
    metrics = evaluation.check_available(evaluation.parse_metrics(args.metrics or
                                                                  TrainConfig.metrics))
    if args.eval:
        limit = args.eval_utterances or TrainConfig.eval_utterances
        if args.data and not args.data.endswith(".jsonl"):  # a user's folder: all of its files
            files = [(f, None) for f in resolve_files(args.data)[:limit]]
            evaluate(model, files, [model.num_codebooks], source, metrics, f"files of {args.data}",
                     notice=True)
        else:
            files = eval_utterances(args.data, limit)
            evaluate(model, files, [model.num_codebooks], source, metrics)
        codebook_usage(model, files)
        return
    if not args.out:
        raise ValueError("--out is required")
    if args.encode:
        wav, sr = load(args.encode, model.sample_rate, 1, notice=True)
        codes = model.encode(wav[None])[0]  # (Q, F)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if model.codebook_size <= 2 ** 15 else np.int32  # holds every id
        np.savez(args.out, codes=codes.numpy().astype(dtype), sample_rate=sr, model=NAME,
                 num_samples=wav.shape[-1], codebook_size=model.codebook_size,
                 frame_rate=model.frame_rate)
        print(f"{args.encode}: {codes.shape[0]} codebook x {codes.shape[1]} frames "
              f"({model.bitrate() / 1000:g} kbps) -> {args.out}")
    elif args.decode:
        codes, num_samples = read_codes(args.decode, model)
        wav = model.decode(codes[None])[0, :, :num_samples]  # (1, T)
        save(args.out, wav, model.sample_rate)
        print(f"{args.decode} -> {args.out} ({num_samples / model.sample_rate:.2f} s)")
    else:  # --reconstruct
        wav, sr = load(args.reconstruct, model.sample_rate, 1, notice=True)
        rec = reconstruct(model, wav)
        save(args.out, rec, sr)
        png = Path(args.out).with_suffix(".png")
        plot_comparison(png, wav, rec, sr, title=Path(args.reconstruct).name)
        per_pair = [m for m in metrics if not evaluation.METRICS[m].needs_transcript]
        q, notes = evaluation.score(wav, rec, sr, per_pair)
        shown = ", ".join(f"{k} {v:.3f}" if math.isfinite(v) else f"{k} n/a" for k, v in q.items())
        print(f"{args.reconstruct} -> {args.out} (and the spectrograms {png}) at "
              f"{model.bitrate() / 1000:g} kbps: {shown}")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
