"""
EnCodec: High Fidelity Neural Audio Compression, in one file.

Defossez, Copet, Synnaeve, Adi. TMLR 2023. arXiv 2210.13438.
Official code: facebookresearch/encodec, inference only; this file equals PyPI `encodec` 0.1.1 on
identical weights (tests/test_encodec.py) and loads Meta's released weights unedited. The paper's
training (losses, discriminator, balancer) has no official code: it follows the paper, with
audiocraft's compression solver where the paper is silent.

Paper -> code
  §3.1 encoder / decoder ........ SConv1d, SConvTranspose1d, ResnetBlock, SLSTM, Encoder, Decoder
  §3.1 48 kHz: 1 s segments ..... EnCodec.segments / normalize / decode, overlap_add
  §3.1 streamable padding ....... SConv1d, SConvTranspose1d, EnCodec.streaming()
  §3.2 RVQ, bandwidths .......... Codebook (EMA, k-means, dead codes), ResidualVectorQuantizer,
                                  EnCodec.n_q_for_bandwidth, Trainer.draws
  §3.4 MS-STFT discriminator .... STFTDiscriminator, MultiScaleSTFTDiscriminator
  §3.4 losses, Eqs. 1-4 ......... FrequencyLoss (Eq. 1), feature_loss (Eq. 2), commitment in
                                  ResidualVectorQuantizer (Eq. 3), adversarial_loss,
                                  discriminator_loss, Trainer.step (Eq. 4)
  §3.4 balancer, Eq. 5 .......... Balancer
  §4.4 training recipe .......... TrainConfig, PRESETS
  §3.3 entropy coding ........... EntropyLM, quantized_cdf, ArithmeticCoder, ArithmeticDecoder,
                                  BitPacker, compress / decompress (.ecdc files, the official
                                  format; LM training and the CLI: not yet)
  released weights .............. EnCodec.from_official (encodec_24khz / 48khz .th, Hugging Face)

Shapes: B batch, C audio channels, T samples, F frames (T / M), M hop = prod(ratios) = 320,
D latent dim, Q codebooks in use, K codebook size, N rows of flattened (B*F, D) frames, S
segments. `F` is torch.nn.functional.

DEVIATIONS (each tagged `# DEVIATION` where it happens). None changes what the released weights
compute at inference, which is tested equal to `encodec` 0.1.1.
  1. The RVQ residual keeps its gradient path (facebookresearch/encodec issue #25): the official
     straight-through trick inside each layer leaves r_{i+1} without gradient, so only the first
     codebook's commitment term reaches the encoder. Fixed here, for training only.
  2. Dead-code replacement that takes effect: the official code writes the new entry into
     `embed` and, in the same call, overwrites `embed` with embed_avg / cluster_size, so the
     replacement is undone at once (tested). Here the EMA sum and count are replaced too.
  3. One discriminator for every bandwidth: §3.4 found one per bandwidth "beneficial"; neither
     audiocraft nor this file does it (it multiplies D by the number of bandwidths).
  4. Eq. 1's L2 term compares log mel spectrograms, squared (after audiocraft, which takes log10 of
     a power mel; here the natural log of the magnitude mel); as printed (linear
     mel, a plain norm) the tiny run's mel distance rose with the bandwidth. `--log_l2 false`
     restores Eq. 1 as printed.
  5. The arithmetic coder's quantized CDF never ends past its range: the official one can, when
     float32 probabilities sum above 1, and a stream that then codes the last symbol decodes
     wrongly (tested). Only that piece is cut, so every stream the official coder gets right is
     bit for bit the same.
  6. The commitment term is the official one, the mean of each codebook's mean squared error,
     averaged over the codebooks, not Eq. 3's sum of squared norms (a factor n_q N D apart).
The official architecture differs from §3.1's text, and the released weights need the code's:
a residual unit of kernels 3 and 1 at half the channels with a 1x1 conv skip (§3.1: two
kernel-3 convs and a skip), a skip around each LSTM, reflect padding, GroupNorm(1, C) for the
"layer normalization" of the 48 kHz model. Where §3.4 is silent (hop of D's STFTs, the norms
of Eq. 1, the commitment weight) the comment says whose choice is taken.

Commands
  python encodec.py --train --preset tiny                            # demo corpus, CPU, < 10 min
  python encodec.py --train --preset 24khz --data /data/speech       # one GPU
  torchrun --standalone --nproc_per_node=8 encodec.py --train --preset 24khz --data DIR
  python encodec.py --train --resume --out runs/encodec              # continue where it stopped
  python encodec.py --reconstruct in.wav --official encodec_24khz-d7cc33bc.th --out out.wav \
      --bandwidth 6
  python encodec.py --encode in.wav --ckpt runs/encodec/model.pt --out codes.npz --bandwidth 1
  python encodec.py --decode codes.npz --ckpt runs/encodec/model.pt --out out.wav
  python encodec.py --eval --ckpt runs/encodec/model.pt [--data DIR]
"""

import argparse
import contextlib
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import random
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from common.audio import AudioError, load, save
from common import evaluation
from common.data import AudioDataset, demo_manifest, read_manifest, resolve_files
from common.metrics import codebook_stats, mel_filterbank, plot_comparison

NAME = "encodec"  # the model name in checkpoints and codes files; the generic blocks use it

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What rebuilds the model. Defaults are the released 24 kHz model (encodec_model_24khz)."""
    sample_rate: int = 24000       # 24 kHz mono (§4.1)
    channels: int = 1              # mono; the 48 kHz model is stereo (§4.1)
    causal: bool = True            # streamable: all padding on the past (§3.1)
    norm: str = "weight_norm"      # weight norm when streamable, else "time_group_norm" (§3.1)
    n_filters: int = 32            # C = 32 channels after the first conv (§3.1)
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder strides; the encoder runs 2, 4, 5, 8 (§3.1)
    dimension: int = 128           # D output channels (§3.1); 128: official code
    lstm_layers: int = 2           # "a two-layer LSTM for sequence modeling" (§3.1)
    true_skip: bool = False        # official code: a 1x1 conv on the residual skip, not identity
    pad_mode: str = "reflect"      # official code: reflect padding (audiocraft: "constant")
    residual_compress: int = 2     # official code (`compress`): residual branch at C / 2
    kernel_size: int = 7           # first and last convs: kernel 7 (§3.1)
    residual_kernel_size: int = 3  # kernel 3 (§3.1), then 1 (official code; §3.1: 3 and 3)
    num_quantizers: int = 32       # 24 kbps at 75 Hz with 10-bit codebooks (§3.2)
    codebook_size: int = 1024      # 1024 entries per codebook (§3.2)
    bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps at 24 kHz (§3.2)
    normalize: bool = False        # 48 kHz: "normalize each chunk" (§3.1); by its RMS: official
    segment: float = 0.0           # 48 kHz: 1 s segments (§3.1); 0: the whole input at once
    overlap: float = 0.01          # 48 kHz: 10 ms overlap between segments (§3.1)
    ema_decay: float = 0.99        # codebook EMA decay 0.99 (§3.2)
    kmeans_iters: int = 50         # official code: 50 k-means iterations on the first batch
    dead_code_threshold: float = 2.0  # official code: replace entries with EMA count < 2


@dataclass
class TrainConfig:
    """How the model is trained: discriminator, losses, balancer, optimizer, data, the run."""
    # MS-STFT discriminator (§3.4)
    disc_filters: int = 32         # 32 channels (§3.4)
    disc_windows: tuple[int, ...] = (2048, 1024, 512, 256, 128)  # 5 scales (§3.4)
    disc_kernel: tuple[int, ...] = (3, 8)  # kernel 3 x 8 (§3.4; the official file has 3 x 9)
    disc_prob: float = 2 / 3       # D updated with probability 2/3 at 24 kHz, 0.5 at 48 (§3.4)
    # losses and the balancer (§3.4, §4.4)
    lambda_t: float = 0.1          # lambda_t = 0.1 (§4.4)
    lambda_f: float = 1.0          # lambda_f = 1 (§4.4)
    lambda_g: float = 3.0          # lambda_g = 3 at 24 kHz, 4 at 48 kHz (§4.4)
    lambda_feat: float = 3.0       # lambda_feat = 3 at 24 kHz, 4 at 48 kHz (§4.4)
    lambda_w: float = 1.0          # commitment weight: official code (the paper gives none)
    balancer_decay: float = 0.999  # beta = 0.999 (§3.4)
    mel_bins: int = 64             # 64-bin mel spectrograms (§3.4)
    mel_scales: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)  # 2^i, i = 5..11 (Eq. 1)
    log_l2: bool = True            # DEVIATION 4: Eq. 1's L2 term on log mels (audiocraft's)
    # optimisation (§4.4)
    lr: float = 3e-4               # Adam, learning rate 3e-4 (§4.4)
    betas: tuple[float, ...] = (0.5, 0.9)  # beta_1 = 0.5, beta_2 = 0.9 (§4.4)
    lr_decay: float = 1.0          # lr x lr_decay^step; 1: constant (the paper has no schedule)
    gan_start: int = 0             # steps with l_t and l_f only, D untrained (our choice: tiny)
    grad_clip: float = 100.0       # our choice: clip G and D gradient norms at 100
    batch_size: int = 64           # 64 examples (§4.4)
    segment_seconds: float = 1.0   # of 1 second each (§4.4)
    lm_seconds: float = 5.0        # the entropy-coding LM trains on 5 s sequences (§3.3)
    # the run
    data: str = ""                 # folder or .jsonl manifest; "": the demo corpus in data/demo
    out: str = "runs/encodec"      # checkpoints, log, samples
    steps: int = 600_000           # 300 epochs of 2000 updates (§4.4)
    seed: int = 0                  # weights, crops, bandwidths and D updates follow from it
    log_every: int = 100           # steps between log lines (each with full diagnostics)
    sample_every: int = 5000       # steps between reconstruction wav + spectrogram PNGs
    ckpt_every: int = 5000         # steps between checkpoints
    eval_utterances: int = 20      # held-out utterances in the metrics table at the end
    metrics: str = "default"       # the table's (common/evaluation.py); default: all installed
    num_workers: int = 4           # DataLoader worker processes
    threads: int = 0               # CPU threads; 0: the idle cores (busy cores stall torch)
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU
    compile: bool = False          # torch.compile the codec (CUDA)


PRESETS = {
    "24khz": (Config(), TrainConfig()),
    # encodec_model_48khz: stereo, not causal, time-group norm (§3.1), 150 Hz (§3.1), 16 x 1024
    # (§3.2), 3-24 kbps (§3.4); D's windows doubled, updated with probability 0.5 (§3.4);
    # lambda_g = lambda_feat = 4 (§4.4)
    "48khz": (Config(sample_rate=48000, channels=2, causal=False, norm="time_group_norm",
                     num_quantizers=16, bandwidths=(3.0, 6.0, 12.0, 24.0), normalize=True,
                     segment=1.0),
              TrainConfig(disc_windows=(4096, 2048, 1024, 512, 256), disc_prob=0.5, lambda_g=4.0,
                          lambda_feat=4.0)),
    # AudioGen's tokenizer (audiocraft encodec_audiogen_16khz, reference/lms.md §1.2): 16 kHz,
    # 50 Hz, 4 x 2048 (2.2 kbps), 64 filters, identity skips, constant padding, not causal
    "audiogen16k": (Config(sample_rate=16000, causal=False, n_filters=64, true_skip=True,
                           pad_mode="constant", num_quantizers=4, codebook_size=2048,
                           bandwidths=(2.2,)), TrainConfig()),
    # CPU demo on the 16 kHz demo corpus, ~8 min on 2 idle cores (README). Our choices: narrow nets,
    # K = 32 (5-bit codebooks, 0.25 kbps each at 50 Hz), short crops, a higher learning rate
    # decaying 0.999 per step, and the reconstruction terms only (gan_start = steps: a GAN step
    # costs 4.5x a reconstruction step here, and soundstream.py's tiny run lost STOI to 300 GAN
    # steps); the discriminator, balancer and GAN terms run in the tests and the notebook
    "tiny": (Config(sample_rate=16000, n_filters=8, dimension=32, num_quantizers=8,
                    codebook_size=32, bandwidths=(0.25, 0.5, 1.0, 2.0), kmeans_iters=10),
             TrainConfig(disc_filters=8, disc_windows=(1024, 512, 256, 128, 64), lr=1e-3,
                         lr_decay=0.999, gan_start=3000, batch_size=8, segment_seconds=0.4,
                         steps=3000, log_every=100, sample_every=1500, ckpt_every=500,
                         lm_seconds=1.0,
                         eval_utterances=16, metrics="mel,pesq,stoi", num_workers=0)),
}
CHOICES = {"norm": ("weight_norm", "time_group_norm", "none"),
           "pad_mode": ("reflect", "constant"), "amp": ("none", "bf16", "fp16")}


def check_config(cfg, run=None):
    """One-line errors for values the model cannot be built or trained with."""
    for obj in (cfg, run):
        for name, allowed in CHOICES.items():
            if obj is not None and hasattr(obj, name) and getattr(obj, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(obj, name)!r}")
    for name, low in (("codebook_size", 2), ("kmeans_iters", 1), ("residual_compress", 1),
                      ("num_quantizers", 1), ("n_filters", 1), ("dimension", 1)):
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be at least {low}; got {getattr(cfg, name)}")
    if run is not None:
        if run.batch_size < 1 or len(run.betas) != 2 or len(run.disc_kernel) != 2:
            raise ValueError("batch_size must be at least 1, and betas and disc_kernel pairs "
                             f"(A,B); got {run.batch_size}, {run.betas}, {run.disc_kernel}")
    if cfg.causal and cfg.norm == "time_group_norm":
        raise ValueError("time_group_norm normalises over the whole signal: it cannot be causal")
    per_q = math.ceil(cfg.sample_rate / math.prod(cfg.ratios)) * math.log2(cfg.codebook_size) / 1e3
    for b in cfg.bandwidths:
        if not 1 <= math.floor(b / per_q) <= cfg.num_quantizers:
            raise ValueError(f"bandwidth {b:g} kbps needs {b / per_q:g} codebooks of "
                             f"{per_q:g} kbps; the model has 1..{cfg.num_quantizers}")
    if run is not None:
        evaluation.check_available(evaluation.parse_metrics(run.metrics))
        # the longest window that must fit in a crop: reflect padding needs T > window / 2
        need = max(max(run.mel_scales) // 2 + 1, max(run.disc_windows))  # D: center=False
        have = int(run.segment_seconds * cfg.sample_rate)
        if have < need:
            raise ValueError(f"segment_seconds {run.segment_seconds:g} gives {have} samples; the "
                             f"training losses need at least {need} "
                             f"({need / cfg.sample_rate:.3f} s)")

# -------------------------------------------------------------------------------------------------
# Building blocks: the official code's streamable convolutions (module names = its keys)


def pad1d(x, left, right, mode):
    """F.pad that also reflects inputs shorter than the padding: they are first extended with
    zeros on the right, as the official code does (so a 100-sample input works). No padding, no
    copy (the official code copies: a third of the kernel-1 convs' time)."""
    if left == right == 0:
        return x
    if mode == "reflect" and x.shape[-1] <= max(left, right):
        extra = max(left, right) - x.shape[-1] + 1
        return F.pad(F.pad(x, (0, extra)), (left, right), "reflect")[..., :x.shape[-1] + left
                                                                     + right]
    return F.pad(x, (left, right), mode)


class NormConv(nn.Module):
    """A conv (attribute `conv` or `convtr`, as the official keys) with its normalisation:
    weight norm on the conv, or GroupNorm(1, C) after it ("time_group_norm"), or none."""

    def __init__(self, conv, norm, name):
        super().__init__()
        self.name = name
        setattr(self, name, weight_norm(conv) if norm == "weight_norm" else conv)
        grouped = norm == "time_group_norm"
        self.norm = nn.GroupNorm(1, conv.out_channels) if grouped else nn.Identity()


class SConv1d(nn.Module):
    """Conv1d with the official padding: P = (k - 1) d - (s - 1) in all, on the past when causal
    (else split, the extra sample on the left), plus zeros on the right so that the last window
    is full (the decoder then gives back at least T samples). Streaming: the last P inputs of a
    chunk pad the next one; the first chunk is padded as the offline call pads."""

    def __init__(self, cfg, in_ch, out_ch, kernel_size, stride=1, dilation=1):
        super().__init__()
        self.conv = NormConv(nn.Conv1d(in_ch, out_ch, kernel_size, stride, dilation=dilation),
                             cfg.norm, "conv")
        self.causal, self.pad_mode = cfg.causal, cfg.pad_mode
        self.stride = stride
        self.padding = (kernel_size - 1) * dilation - (stride - 1)  # P
        self.k_eff = (kernel_size - 1) * dilation + 1
        self.streaming, self.state = False, None

    def extra_padding(self, length):  # zeros that make the last window full
        frames = math.ceil((length - self.k_eff + self.padding) / self.stride + 1)
        return (frames - 1) * self.stride + self.k_eff - self.padding - length

    def forward(self, x):  # (B, C_in, T) -> (B, C_out, ceil(T / s))
        P = self.padding
        if self.streaming and self.state is not None:  # the past is the previous chunk's end
            x = torch.cat([self.state, x], dim=-1)
        elif self.causal:
            x = pad1d(x, P, 0 if self.streaming else self.extra_padding(x.shape[-1]),
                      self.pad_mode)
        else:
            extra = self.extra_padding(x.shape[-1])
            x = pad1d(x, P - P // 2, P // 2 + extra, self.pad_mode)
        if self.streaming:
            self.state = x[..., x.shape[-1] - P:]
        return self.conv.norm(self.conv.conv(x))


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d (k = 2s) trimmed by k - s samples: all on the right when causal, split
    otherwise (the extra one on the left). Streaming: the k - s samples that still await the
    next frame's contribution are carried to the next chunk (the bias is added once)."""

    def __init__(self, cfg, in_ch, out_ch, kernel_size, stride):
        super().__init__()
        self.convtr = NormConv(nn.ConvTranspose1d(in_ch, out_ch, kernel_size, stride), cfg.norm,
                               "convtr")
        self.causal, self.stride = cfg.causal, stride
        self.trim = kernel_size - stride
        self.streaming, self.state = False, None

    def forward(self, x):  # (B, C_in, F) -> (B, C_out, F * s)
        conv = self.convtr.convtr
        if not self.streaming:  # official order: the norm sees the samples trimmed next
            y = self.convtr.norm(conv(x))  # (B, C_out, F*s + trim)
            right = self.trim if self.causal else self.trim // 2
            return y[..., self.trim - right:y.shape[-1] - right]
        y = F.conv_transpose1d(x, conv.weight, None, self.stride)  # causal: no GroupNorm
        if self.state is not None:  # add the tail the previous chunk left unfinished
            y = torch.cat([y[..., :self.trim] + self.state, y[..., self.trim:]], dim=-1)
        self.state = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim] + conv.bias[:, None]


class ResnetBlock(nn.Module):
    """§3.1 residual unit: ELU, conv k=3 to C/2, ELU, conv k=1 back to C, plus the skip (a 1x1
    conv in the released models, `shortcut`). Keys: block.1, block.3, shortcut."""

    def __init__(self, cfg, dim, dilation):
        hidden = dim // cfg.residual_compress
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(), SConv1d(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation),
            nn.ELU(), SConv1d(cfg, hidden, dim, 1))
        self.shortcut = nn.Identity() if cfg.true_skip else SConv1d(cfg, dim, dim, 1)

    def forward(self, x):  # (B, C, L) -> (B, C, L)
        return self.shortcut(x) + self.block(x)


class SLSTM(nn.Module):
    """§3.1: a two-layer LSTM over the frames, with a skip connection. Streaming carries its
    hidden and cell states from chunk to chunk."""

    def __init__(self, dim, num_layers):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)
        self.streaming, self.state = False, None

    def forward(self, x):  # (B, D, F) -> (B, D, F)
        x = x.permute(2, 0, 1)  # (F, B, D): the official (time-first) layout
        y, state = self.lstm(x, self.state)
        if self.streaming:
            self.state = state
        return (y + x).permute(1, 2, 0)


class Encoder(nn.Module):
    """§3.1: conv k=7 to C, four blocks (residual unit, ELU, conv k=2s with stride s = 2, 4, 5,
    8 doubling the channels), the LSTM, ELU, conv k=7 to D. Indices as the official `model`:
    0 conv, 1/4/7/10 residual units, 3/6/9/12 down-sampling convs, 13 LSTM, 15 conv."""

    def __init__(self, cfg):
        C = cfg.n_filters
        layers = [SConv1d(cfg, cfg.channels, C, cfg.kernel_size)]
        for s in reversed(cfg.ratios):
            layers += [ResnetBlock(cfg, C, 1), nn.ELU(), SConv1d(cfg, C, 2 * C, 2 * s, s)]
            C *= 2
        layers += [SLSTM(C, cfg.lstm_layers), nn.ELU(), SConv1d(cfg, C, cfg.dimension,
                                                                 cfg.kernel_size)]
        super().__init__()
        self.model = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, T) -> (B, D, F)
        return self.model(x)


class Decoder(nn.Module):
    """§3.1, the encoder mirrored: conv k=7, the LSTM, four blocks (ELU, transposed conv k=2s
    halving the channels, residual unit) with s = 8, 5, 4, 2, ELU, conv k=7 to the audio
    channels. No final activation (official code)."""

    def __init__(self, cfg):
        C = cfg.n_filters * 2 ** len(cfg.ratios)
        layers = [SConv1d(cfg, cfg.dimension, C, cfg.kernel_size), SLSTM(C, cfg.lstm_layers)]
        for s in cfg.ratios:
            layers += [nn.ELU(), SConvTranspose1d(cfg, C, C // 2, 2 * s, s),
                       ResnetBlock(cfg, C // 2, 1)]
            C //= 2
        layers += [nn.ELU(), SConv1d(cfg, C, cfg.channels, cfg.kernel_size)]
        super().__init__()
        self.model = nn.Sequential(*layers)

    def forward(self, z):  # (B, D, F) -> (B, C, F * M)
        return self.model(z)

# -------------------------------------------------------------------------------------------------
# Residual vector quantizer (§3.2)


# Copied from soundstream.py: is_distributed
def is_distributed():
    return dist.is_available() and dist.is_initialized()


class Codebook(nn.Module):
    """One codebook, learnt without gradients (§3.2): EMA of the counts (`cluster_size`) and sums
    (`embed_avg`) of the vectors assigned to each entry, entry = sum / count (Laplace-smoothed
    count); k-means on the first training batch; entries whose EMA count is below 2 are replaced
    by random vectors of the batch. Buffers as the official keys. Under DDP counts and sums are
    all-reduced and random choices broadcast from rank 0: codebooks stay identical on all ranks."""

    def __init__(self, cfg):
        super().__init__()
        K, D = cfg.codebook_size, cfg.dimension
        self.size, self.decay, self.threshold = K, cfg.ema_decay, cfg.dead_code_threshold
        self.kmeans_iters = cfg.kmeans_iters
        self.eps = 1e-5  # official code: Laplace smoothing of the counts
        self.register_buffer("inited", torch.zeros(1))  # official: a float flag, until k-means
        self.register_buffer("cluster_size", torch.zeros(K))  # (K,)
        self.register_buffer("embed", torch.zeros(K, D))  # (K, D): the entries
        self.register_buffer("embed_avg", torch.zeros(K, D))  # (K, D): EMA of assigned sums
        self.register_buffer("replaced", torch.zeros((), dtype=torch.long), persistent=False)
        self.checked = False  # `inited` has been read once (reading it syncs with a GPU)

    def nearest(self, z):  # z (N, D) -> codes (N,)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every entry
        # min(...).indices: the same first index as argmin, 3x faster on CPU (torch 2.13)
        return (self.embed.pow(2).sum(1) - 2 * z @ self.embed.t()).min(dim=1).indices  # (N,)

    def lookup(self, codes):  # codes (...) -> vectors (..., D)
        return F.embedding(codes, self.embed)

    def random_rows(self, z):  # (N, D) -> (K, D): rows of z, the same on every rank
        if len(z) >= self.size:  # official code: without replacement when it can
            rows = z[torch.randperm(len(z), device=z.device)[:self.size]]
        else:
            rows = z[torch.randint(len(z), (self.size,), device=z.device)]
        if is_distributed():
            dist.broadcast(rows, src=0)
        return rows

    @torch.no_grad()
    def kmeans_init(self, z):  # z (N, D): this rank's frames of the first batch
        if is_distributed():  # "the first training batch" is every rank's share
            parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, z)
            z = torch.cat(parts)  # (world * N, D)
        self.embed.copy_(self.random_rows(z))
        for _ in range(self.kmeans_iters):  # Lloyd's algorithm, the same on every rank
            codes = self.nearest(z)  # (N,)
            counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,)
            sums = torch.zeros_like(self.embed).index_add_(0, codes, z)  # (K, D)
            self.embed.copy_(torch.where(counts[:, None] > 0,
                                         sums / counts.clamp(min=1)[:, None], self.embed))
        self.cluster_size.copy_(counts)  # official code: the last iteration's counts
        self.embed_avg.copy_(self.embed)  # official code (not embed * counts)
        if is_distributed():  # rank 0's result everywhere (CUDA's index_add_ is not exact)
            for b in (self.embed, self.cluster_size, self.embed_avg):
                dist.broadcast(b, src=0)
        self.inited.fill_(1)

    @torch.no_grad()
    def ema_update(self, z, codes):  # z (N, D), codes (N,)
        # dead codes first, on the counts before this batch (official order)
        dead = (self.cluster_size < self.threshold)[:, None]  # (K, 1)
        new = self.random_rows(z)  # (K, D)
        # DEVIATION 2: the new entry also replaces its EMA sum and count (as `threshold`
        # assignments of itself); the official code sets `embed` only, which the EMA below
        # overwrites in the same call. Written with torch.where: no host sync per codebook.
        self.embed_avg.copy_(torch.where(dead, new * self.threshold, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead[:, 0], self.threshold, self.cluster_size))
        self.replaced += dead.sum()
        counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, codes, z)  # (K, D)
        if is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # never 0
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    def forward(self, z):  # z (N, D) -> codes (N,), quantized (N, D)
        if self.training and not self.checked:
            if not self.inited.item():
                self.kmeans_init(z)
            self.checked = True
        codes = self.nearest(z)
        quantized = self.lookup(codes)
        if self.training:
            self.ema_update(z, codes)
        return codes, quantized


class ResidualVectorQuantizer(nn.Module):
    """§3.2: r_1 = z, codes_i = Q_i(r_i), r_{i+1} = r_i - Q_i(r_i), z_q = sum_i Q_i(r_i) over the
    first n_q codebooks, n_q set by the bandwidth. The commitment term is the mean squared
    distance ||r_i - sg(Q_i(r_i))||^2 of each codebook, averaged over the codebooks (official)."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(Codebook(cfg) for _ in range(cfg.num_quantizers))

    def forward(self, z, n_q):
        """z (B, D, F) -> z_q (B, D, F) (straight-through), codes (B, n_q, F), commitment."""
        B, D, L = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA in float32
            residual = z.float().transpose(1, 2).reshape(B * L, D)  # (N, D)
            z_q = torch.zeros_like(residual)
            codes, commit = [], []
            for vq in self.layers[:n_q]:
                code, q = vq(residual)  # (N,), (N, D)
                z_q = z_q + q
                commit.append(F.mse_loss(residual, q))  # DEVIATION 6: official, not Eq. 3's sum
                # DEVIATION 1: detach q, not r_i: every r_i keeps its path to the encoder, so
                # every codebook's commitment term reaches it (encodec issue #25: it does not)
                residual = residual - q.detach()
                codes.append(code.view(B, L))
            z_q = z_q.view(B, L, D).transpose(1, 2)  # (B, D, F)
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches z
        return z_q, torch.stack(codes, dim=1), torch.stack(commit).mean()  # codes (B, n_q, F)

    def encode(self, z, n_q):  # z (B, D, F) -> codes (B, n_q, F)
        B, D, L = z.shape
        residual = z.transpose(1, 2).reshape(B * L, D)  # (N, D)
        codes = []
        for vq in self.layers[:n_q]:
            code = vq.nearest(residual)  # (N,)
            residual = residual - vq.lookup(code)
            codes.append(code.view(B, L))
        return torch.stack(codes, dim=1)

    def decode(self, codes):  # codes (B, Q, F) -> z_q (B, D, F)
        z_q = sum(vq.lookup(codes[:, i]) for i, vq in enumerate(self.layers[:codes.shape[1]]))
        return z_q.transpose(1, 2)  # (B, F, D) -> (B, D, F)

# -------------------------------------------------------------------------------------------------
# The codec


class Encoded(NamedTuple):
    """What EnCodec sends: codes (B, Q, F), and with `normalize` (48 kHz) the RMS `scale` of each
    segment, (B, S); None otherwise. Segments' codes are concatenated along F."""
    codes: torch.Tensor
    scale: torch.Tensor | None


def overlap_add(frames, stride):
    """Join decoded segments (B, C, T_i), each starting `stride` samples after the previous,
    with triangular weights that peak mid-segment, normalised by their sum (official code)."""
    length = frames[0].shape[-1]
    t = torch.linspace(0, 1, length + 2, dtype=frames[0].dtype, device=frames[0].device)[1:-1]
    weight = 0.5 - (t - 0.5).abs()  # (T_0,) a triangle, never 0
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    out = frames[0].new_zeros(*frames[0].shape[:-1], total)
    sum_weight = frames[0].new_zeros(total)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        out[..., i * stride:i * stride + n] += weight[:n] * frame
        sum_weight[i * stride:i * stride + n] += weight[:n]
    return out / sum_weight


class EnCodec(nn.Module):
    """Encoder -> residual vector quantizer -> decoder (§3, Fig. 1).

    The codec interface of every codec file: sample_rate, channels, frame_rate, num_codebooks,
    codebook_size, encode(wav) -> Encoded(codes (B, Q, F), scale), decode(codes, scale) -> wav
    (B, C, >= T), forward for training, save / load, and from_official for Meta's weights. The
    bandwidth (kbps) chooses Q: n_q = bandwidth / (frame_rate * log2(K)) (§3.2)."""

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.streaming_calls = None  # inside streaming(): calls so far, {"encode", "decode"}

    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: self.cfg.channels)
    hop_length = property(lambda self: math.prod(self.cfg.ratios))  # M = 320
    # official code: frames per second rounded up (75 Hz at 24 kHz, 150 Hz at 48 kHz)
    frame_rate = property(lambda self: math.ceil(self.cfg.sample_rate / self.hop_length))
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bitrate(self, n_q=None):
        """Bits per second with n_q codebooks: frame_rate * n_q * log2(K) (§3.2)."""
        return self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size)

    def n_q_for_bandwidth(self, kbps=None):
        """The official rule, n_q = max(1, floor(kbps / per-codebook kbps)); None: all. Only the
        bandwidths the model was trained for (cfg.bandwidths) are accepted."""
        if kbps is None:
            return self.num_codebooks
        if kbps not in self.cfg.bandwidths:
            raise ValueError(f"this model codes {', '.join(f'{b:g}' for b in self.cfg.bandwidths)}"
                             f" kbps; got {kbps:g}")
        return max(1, math.floor(kbps * 1000 / self.bitrate(1)))

    def check_wav(self, wav, sample_rate=None):
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"EnCodec expects {self.sample_rate} Hz audio, got {sample_rate} Hz;"
                             f" resample first (common.audio.resample)")
        if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 3:
            raise ValueError(f"EnCodec expects a float tensor (batch, {self.channels}, samples), "
                             f"got {type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
        if wav.shape[1] != self.channels:
            raise ValueError(f"this EnCodec takes {self.channels} channel(s); got "
                             f"{wav.shape[1]}")
        if wav.shape[-1] == 0:
            raise ValueError("EnCodec got an empty signal (0 samples)")
        if not torch.isfinite(wav).all():
            raise ValueError("EnCodec got NaN or Inf samples")

    def segments(self, T):
        """(start, length) of each segment the input is coded in (§3.1: 1 s, 10 ms overlap)."""
        if not self.cfg.segment:
            return [(0, T)]
        length = int(self.cfg.segment * self.sample_rate)
        stride = max(1, int((1 - self.cfg.overlap) * length))
        return [(i, min(length, T - i)) for i in range(0, T, stride)]

    def segment_frames(self, frames, S):
        """Frames of each of S segments that hold `frames` in all. Every segment but the last two
        is full; those two depend on the input length, which the codes do not carry, so the
        last segment's length r is searched for (the split depends on r only through F)."""
        if S == 1:
            return [frames]
        length = int(self.cfg.segment * self.sample_rate)
        stride = max(1, int((1 - self.cfg.overlap) * length))
        full = math.ceil(length / self.hop_length)
        for r in range(1, length + 1):
            tail = [math.ceil(min(length, stride + r) / self.hop_length),
                    math.ceil(r / self.hop_length)]
            if full * (S - 2) + sum(tail) == frames:
                return [full] * (S - 2) + tail
        raise ValueError(f"{frames} frames cannot be {S} segments of this model: codes and scale "
                         f"do not belong together")

    def normalize(self, x):  # (B, C, T) -> x / scale, scale (B, 1): RMS of the mono mix
        if not self.cfg.normalize:
            return x, None
        scale = 1e-8 + x.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
        return x / scale, scale.view(-1, 1)

    def forward(self, wav, n_q=None):
        """Training pass: wav (B, C, T) -> x_hat (B, C, T), codes (B, n_q, F), and a dict with
        the commitment loss and the latent's RMS (a diagnostic)."""
        self.check_wav(wav)
        x, scale = self.normalize(wav)
        z = self.encoder(x)  # (B, D, F)
        z_q, codes, commit = self.quantizer(z, n_q or self.num_codebooks)
        x_hat = self.decoder(z_q)[..., :wav.shape[-1]]
        if scale is not None:
            x_hat = x_hat * scale[:, :, None]
        return x_hat, codes, {"commit": commit, "latent_rms": z.detach().pow(2).mean().sqrt()}

    @torch.no_grad()
    def encode(self, wav, n_q=None, bandwidth=None, sample_rate=None):
        """wav (B, C, T) -> Encoded(codes (B, n_q, F), scale (B, S) or None). n_q, or the
        bandwidth in kbps, picks the codebooks; default: all."""
        self.check_wav(wav, sample_rate)
        if n_q is not None and bandwidth is not None:
            raise ValueError("give n_q or bandwidth, not both")
        n_q = self.n_q_for_bandwidth(bandwidth) if n_q is None else n_q
        if not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in 1..{self.num_codebooks}, got {n_q}")
        if self.streaming_calls is not None:
            self.check_chunk(wav.shape[-1] / self.hop_length, "encode", "samples")
        codes, scales = [], []
        with parametrize.cached():  # weight norm computed once per call, not per conv call
            for start, length in self.segments(wav.shape[-1]):
                x, scale = self.normalize(wav[..., start:start + length])
                codes.append(self.quantizer.encode(self.encoder(x), n_q))
                scales.append(scale)
        scale = torch.cat(scales, dim=1) if self.cfg.normalize else None
        return Encoded(torch.cat(codes, dim=-1), scale)

    def check_chunk(self, frames, call, unit):
        need = self.cfg.kernel_size if self.streaming_calls[call] == 0 else 1
        if frames != int(frames) or frames < need:
            M = self.hop_length if unit == "samples" else 1
            raise ValueError(f"streaming {call} chunks must be multiples of {M} {unit}, the first "
                             f"at least {self.cfg.kernel_size * M} (the official reflect padding "
                             f"reads that far); got {int(frames * M)}")
        self.streaming_calls[call] += 1  # counted once accepted

    @torch.no_grad()
    def decode(self, codes, scale=None):
        """codes (B, Q, F) (and the scale of each segment) -> wav (B, C, T') with T' >= T."""
        if isinstance(codes, Encoded):
            codes, scale = codes
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
        if self.cfg.normalize and (scale is None or scale.shape[0] != codes.shape[0]):
            raise ValueError("this EnCodec normalises its input: decode needs the `scale` that "
                             "encode returned beside the codes")
        if self.streaming_calls is not None:
            self.check_chunk(codes.shape[-1], "decode", "frames")
        chunks = [codes]
        if self.cfg.segment:
            chunks = codes.split(self.segment_frames(codes.shape[-1], scale.shape[1]), dim=-1)
        frames = []
        with parametrize.cached():
            for i, chunk in enumerate(chunks):
                y = self.decoder(self.quantizer.decode(chunk.long()))  # (B, C, F_i * M)
                frames.append(y * scale[:, i, None, None] if scale is not None else y)
        if len(frames) == 1:
            return frames[0]
        length = int(self.cfg.segment * self.sample_rate)
        return overlap_add(frames, max(1, int((1 - self.cfg.overlap) * length)))

    @contextlib.contextmanager
    def streaming(self):
        """Inside this block encode/decode calls continue one stream (causal models only): each
        conv keeps its last inputs, each transposed conv its unfinished tail and the LSTMs their
        states. Chunks must be multiples of M samples, and the first one at least 7 frames (the
        official reflect padding reads that far into it); outputs equal the offline call."""
        if not self.cfg.causal or self.cfg.segment or self.cfg.normalize:
            raise ValueError("only a causal model without segments or normalisation can stream "
                             "(the 24 kHz one)")
        mods = [m for m in self.modules() if isinstance(m, (SConv1d, SConvTranspose1d, SLSTM))]
        for m in mods:
            m.streaming, m.state = True, None
        self.streaming_calls = {"encode": 0, "decode": 0}
        try:
            with parametrize.cached():  # weight norm computed once for the whole stream
                yield self
        finally:
            for m in mods:
                m.streaming, m.state = False, None
            self.streaming_calls = None

    def save(self, path):
        """Inference checkpoint: the model config and the weights (with the codebooks)."""
        atomic_save({"model": NAME, "config": dataclasses.asdict(self.cfg),
                     "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        """model.pt or a training ckpt.pt -> the model, in eval mode."""
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(Config, ckpt["config"], path))
        model.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt["generator"])
        return model.eval()

    @classmethod
    def from_official(cls, source, cfg=None):
        """Meta's released weights, unedited: a path to encodec_24khz-d7cc33bc.th or
        encodec_48khz-7e698e3e.th, or a state dict in the official or the Hugging Face
        `transformers` naming. Without `cfg` the preset is told from the weights' shapes."""
        state = source
        if not isinstance(source, dict):
            if not Path(source).is_file():
                raise FileNotFoundError(f"{source}: file not found")
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
                raise ValueError(f"{source} is not a weights file torch.load(weights_only=True) "
                                 f"can read ({type(e).__name__})") from None
        shapes = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
        conv0 = [v for k, v in shapes.items() if re.match(
            r"encoder\.(model|layers)\.0\..*(weight_v|conv\.weight|original1)$", k)]
        if not conv0:
            raise ValueError(f"{source if not isinstance(source, dict) else 'the state dict'} is "
                             f"not an EnCodec state dict (no encoder.model.0 conv weights)")
        if cfg is None:
            conv0 = conv0[0]
            embeds = [v for k, v in shapes.items() if k.endswith("codebook.embed")]
            found = (conv0[1], conv0[0], len(embeds), embeds[0][0] if embeds else 0)
            known = {(c.channels, c.n_filters, c.num_quantizers, c.codebook_size): name
                     for name, (c, _) in PRESETS.items() if name in ("24khz", "48khz")}
            if found not in known:
                raise ValueError(f"these weights ({found[0]} channel(s), {found[1]} filters, "
                                 f"{found[2]} x {found[3]} codebooks) are neither released "
                                 f"model; pass cfg=")
            cfg = PRESETS[known[found]][0]
        model = cls(cfg)
        model.load_state_dict(ours_from_official(state, model))
        return model.eval()


def ours_from_official(state, model):
    """Official keys -> ours: here each codebook is one module (quantizer.vq.layers.i._codebook.
    embed -> quantizer.layers.i.embed); weight norm's weight_g / weight_v load into the
    parametrization (torch's own load hook). Hugging Face keys are matched through their
    spelling of our keys: the five renames of reference/codecs.md §1."""
    if not any(k.startswith("encoder.layers.") for k in state):  # the official naming
        return {re.sub(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.", r"quantizer.layers.\1.", k):
                v for k, v in state.items()}

    def hf(k):
        for old, new in ((".model.", ".layers."), (".conv.conv.", ".conv."),
                         (".convtr.convtr.", ".conv."), (".conv.norm.", ".norm."),
                         (".convtr.norm.", ".norm.")):
            k = k.replace(old, new)
        return re.sub(r"^quantizer\.layers\.(\d+)\.", r"quantizer.layers.\1.codebook.", k)

    ours = {hf(k): k for k in model.state_dict()}
    return {ours.get(k, k): v for k, v in state.items()}

# -------------------------------------------------------------------------------------------------
# Entropy coding (§3.3): bit packing and the arithmetic coder of the .ecdc format


class BitPacker:
    """Writes `bits`-bit integers to a byte stream, least significant bits first, as the official
    .ecdc payload without the LM does (10-bit codes: 4 codes in 5 bytes)."""

    def __init__(self, bits, fo):
        self.bits, self.fo = bits, fo
        self.value, self.filled = 0, 0  # pending bits, and how many

    def push(self, value):
        self.value += value << self.filled
        self.filled += self.bits
        while self.filled >= 8:  # a full byte is ready
            self.fo.write(bytes([self.value & 0xFF]))
            self.value >>= 8
            self.filled -= 8

    def flush(self):  # the last, partial byte, padded with zeros
        if self.filled:
            self.fo.write(bytes([self.value]))
            self.value, self.filled = 0, 0


class BitUnpacker:
    """Reads back what BitPacker wrote; None at the end of the stream."""

    def __init__(self, bits, fo):
        self.bits, self.fo = bits, fo
        self.value, self.filled = 0, 0

    def pull(self):
        while self.filled < self.bits:
            byte = self.fo.read(1)
            if not byte:
                return None
            self.value += byte[0] << self.filled
            self.filled += 8
        out = self.value & ((1 << self.bits) - 1)
        self.value >>= self.bits
        self.filled -= self.bits
        return out


def quantized_cdf(pdf, total_range_bits=24, roundoff=1e-8, min_range=2):
    """The probabilities (K,) as integer interval ends (K,) in [0, 2^24]: symbol k owns
    [cdf[k-1], cdf[k]). Coder and decoder must build exactly the same integers, so the floats are
    first rounded down to multiples of 1e-8 (official ac.py; §3.3 says 1e-6) (an LM evaluated on
    two machines differs in the last
    bits), and every symbol gets at least 2 units (one that the LM thought impossible must still
    be codable). The official constants, for identical bitstreams."""
    pdf = (pdf.detach() / roundoff).floor() * roundoff
    total = 2 ** total_range_bits
    alpha = min_range * len(pdf) / total  # the share of the range given away as minimums
    widths = (((1 - alpha) * total) * pdf).floor().long() + min_range
    cdf = torch.cumsum(widths, dim=-1)
    # DEVIATION 5: float32 probabilities can sum to a little over 1, and then the official CDF ends
    # past 2^24: coding the last symbol then corrupts the interval, and the stream decodes wrongly
    # (tested). Its piece is cut at 2^24; every other piece is the official one, so streams that
    # the official coder gets right are byte for byte the same.
    if cdf[-1] > total:
        cdf[-1] = total
        if len(cdf) > 1 and cdf[-1] - cdf[-2] < min_range:  # rarer still: too little left for
            widths[widths.argmax()] -= int(widths.sum()) - total  # it; the excess comes off
            cdf = torch.cumsum(widths, dim=-1)  # the widest piece instead
    return cdf


def piece(symbol, cdf, width, bits):
    """The symbol's piece of an interval `width` units wide, as offsets from its low end: its CDF
    piece [cdf[k-1], cdf[k]) scaled from 2^bits units to `width` (official float expressions)."""
    lo = 0 if symbol == 0 else int(cdf[symbol - 1])
    hi = int(cdf[symbol]) - 1
    scale = width / 2 ** bits
    return int(math.ceil(lo * scale)), int(math.floor(hi * scale))


class ArithmeticCoder:
    """Arithmetic coding, for a reader who has never seen it. The message is one number in [0, 1).
    Start from the whole interval; for each symbol, cut the current interval into pieces
    proportional to the symbol probabilities and keep the symbol's piece. A likely symbol keeps
    most of the interval, so it costs few bits: a message whose pieces multiply to p needs about
    -log2 p bits to name a number inside its final interval. In integers: the interval is
    [low, high] on max_bit + 1 bits. When its width falls under 2^24 it is doubled (one more bit
    of precision, renormalisation); when low and high agree on their leading bit, that bit can
    never change again and is written out. The decoder repeats the same cuts with the same
    quantized CDFs and finds the piece that contains the number read so far. Written as the
    official coder (ac.py), float expressions included, so that the bitstreams are identical."""

    def __init__(self, fo, total_range_bits=24):
        self.bits = total_range_bits
        self.packer = BitPacker(1, fo)
        self.low, self.high, self.max_bit = 0, 0, -1

    def push(self, symbol, cdf):
        while self.high - self.low + 1 < 2 ** self.bits:  # renormalise: one more bit
            self.low, self.high, self.max_bit = 2 * self.low, 2 * self.high + 1, self.max_bit + 1
        lo, hi = piece(symbol, cdf, self.high - self.low + 1, self.bits)
        self.low, self.high = self.low + lo, self.low + hi
        while self.max_bit >= 0 and self.low >> self.max_bit == self.high >> self.max_bit:
            bit = self.low >> self.max_bit  # settled: write it, drop it from low and high
            self.low -= bit << self.max_bit
            self.high -= bit << self.max_bit
            self.max_bit -= 1
            self.packer.push(bit)

    def flush(self):  # low's remaining bits name a number inside the final interval
        while self.max_bit >= 0:
            self.packer.push((self.low >> self.max_bit) & 1)
            self.max_bit -= 1
        self.packer.flush()


class ArithmeticDecoder:
    """Reads what ArithmeticCoder wrote: the same intervals, plus `current`, the number read so
    far; each pull finds, by binary search, the piece that contains it."""

    def __init__(self, fo, total_range_bits=24):
        self.bits = total_range_bits
        self.unpacker = BitUnpacker(1, fo)
        self.low, self.high, self.current, self.max_bit = 0, 0, 0, -1

    def pull(self, cdf):
        """The next symbol, or None when the stream has ended."""
        while self.high - self.low + 1 < 2 ** self.bits:
            bit = self.unpacker.pull()
            if bit is None:
                return None
            self.low, self.high, self.max_bit = 2 * self.low, 2 * self.high + 1, self.max_bit + 1
            self.current = 2 * self.current + bit
        first, last = 0, len(cdf) - 1
        while True:  # the pieces are ordered: binary search for the one holding `current`
            if last < first:
                raise ValueError("corrupt .ecdc stream: no symbol matches the coded number")
            mid = (first + last) // 2
            lo, hi = piece(mid, cdf, self.high - self.low + 1, self.bits)
            if self.current < self.low + lo:
                last = mid - 1
            elif self.current > self.low + hi:
                first = mid + 1
            else:
                break
        self.low, self.high = self.low + lo, self.low + hi
        while self.max_bit >= 0 and self.low >> self.max_bit == self.high >> self.max_bit:
            bit = self.low >> self.max_bit
            self.low -= bit << self.max_bit
            self.high -= bit << self.max_bit
            self.current -= bit << self.max_bit
            self.max_bit -= 1
        return mid

class StreamingTransformerLayer(nn.Module):
    """One post-norm transformer layer of the entropy-coding LM (official `encodec` modules/
    transformer.py; keys as torch's nn.TransformerEncoderLayer): self-attention over the past
    `past_context` inputs of this layer and the current ones, then a GELU feed-forward."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, past, past_context):  # x (B, T, dim), past (B, H, dim) -> (B, T, dim)
        T, H = x.shape[1], past.shape[1]
        keys = torch.cat([past, x], dim=1)  # (B, H + T, dim)
        delta = torch.arange(H, H + T)[:, None] - torch.arange(H + T)[None, :]  # query - key
        blocked = ~((delta >= 0) & (delta <= past_context)).to(x.device)  # causal, 3.5 s back
        a = self.self_attn(x, keys, keys, attn_mask=blocked, need_weights=False)[0]
        x = self.norm1(x + a)
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x))))


class EntropyLM(nn.Module):
    """§3.3: a small transformer that predicts, for each frame, a distribution over every
    codebook's next code from the past frames: 5 layers, 8 heads, 200 channels, feed-forward 800,
    no dropout, a causal receptive field of 3.5 s (§3.3; the official LMModel). Inputs are the
    previous frame's codes + 1 (0: no frame yet), one embedding table per codebook, summed; one
    linear head per codebook. Called frame by frame with its state, as the coder uses it.
    Keys as the official LM checkpoints (encodec_lm_24khz-1608e3c0.th)."""

    def __init__(self, n_q, card, frame_rate, dim=200, heads=8, layers=5, hidden_scale=4,
                 past_seconds=3.5, max_period=10000):
        super().__init__()
        self.past_context = int(past_seconds * frame_rate)  # official: int(3.5 * frame_rate)
        self.max_period = max_period
        self.transformer = nn.Module()  # key layout: transformer.norm_in, transformer.layers
        self.transformer.norm_in = nn.LayerNorm(dim)
        self.transformer.layers = nn.ModuleList(
            StreamingTransformerLayer(dim, heads, hidden_scale * dim) for _ in range(layers))
        self.emb = nn.ModuleList(nn.Embedding(card + 1, dim) for _ in range(n_q))
        self.linears = nn.ModuleList(nn.Linear(dim, card) for _ in range(n_q))

    def positions(self, T, offset, dim, device):  # sinusoids, cos then sin (official order)
        pos = torch.arange(T, device=device).view(1, -1, 1) + offset  # (1, T, 1)
        half = dim // 2
        phase = pos / self.max_period ** (torch.arange(half, device=device) / (half - 1))
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)  # (1, T, dim)

    def forward(self, inputs, states=None, offset=0):
        """inputs (B, K, T): codes + 1 of the previous frames -> probabilities (B, card, K, T),
        the new states (each layer's last `past_context` inputs) and the new offset."""
        x = sum(self.emb[k](inputs[:, k]) for k in range(inputs.shape[1]))  # (B, T, dim)
        B, T, D = x.shape
        if states is None:  # official: one zero frame of past in every layer
            states = [x.new_zeros(B, 1, D) for _ in self.transformer.layers]
        x = self.transformer.norm_in(x) + self.positions(T, offset, D, x.device)
        new_states = []
        for layer, past in zip(self.transformer.layers, states):
            new_states.append(torch.cat([past, x], dim=1)[:, -self.past_context:])
            x = layer(x, past, self.past_context)
        heads = self.linears[:inputs.shape[1]]  # the official: as many as input codebooks
        logits = torch.stack([head(x) for head in heads], dim=1)  # (B, K, T, card)
        return logits.permute(0, 3, 1, 2).softmax(dim=1), new_states, offset + T

    @classmethod
    def from_official(cls, source, model):
        """Meta's LM weights (encodec_lm_24khz-1608e3c0.th, encodec_lm_48khz-7add9fc3.th, or a
        state dict) for `model`, unedited."""
        state = source if isinstance(source, dict) else torch.load(source, map_location="cpu",
                                                                   weights_only=True)
        lm = cls(model.num_codebooks, model.codebook_size, model.frame_rate)
        lm.load_state_dict(state)
        return lm.eval()

    def save(self, path):  # the weights alone, as the official LM files: --lm reads either
        atomic_save(self.state_dict(), path)


ECDC = struct.Struct("!4sBI")  # official .ecdc header: magic, version 0, metadata length
OFFICIAL_NAMES = {"24khz": "encodec_24khz", "48khz": "encodec_48khz"}  # the header's "m"


def model_name(model):
    """The name an .ecdc header gives the model: the official one for the released presets,
    else one that spells out what decoding needs (the official tool refuses both kinds)."""
    for preset, name in OFFICIAL_NAMES.items():
        if model.cfg == PRESETS[preset][0]:
            return name
    return (f"{NAME}-{model.sample_rate}hz-{model.channels}ch-{model.num_codebooks}x"
            f"{model.codebook_size}")


def compress(model, wav, bandwidth=None, lm=None):
    """wav (C, T) -> the bytes of an .ecdc file, as the official `encodec.compress` writes them:
    the header (magic, version, JSON metadata), then per segment its scale (a float32, 48 kHz)
    and its codes, frame by frame and codebook by codebook: bit-packed (log2 K bits each) or,
    with the LM, arithmetic-coded with the LM's probabilities given the previous frames."""
    sent = model.encode(wav[None], bandwidth=bandwidth)
    K = sent.codes.shape[1]
    sizes = [math.ceil(n / model.hop_length) for _, n in model.segments(wav.shape[-1])]
    fo = io.BytesIO()
    meta = json.dumps({"m": model_name(model), "al": wav.shape[-1], "nc": K, "lm": lm is not None})
    fo.write(ECDC.pack(b"ECDC", 0, len(meta.encode())) + meta.encode())
    for i, codes in enumerate(sent.codes.split(sizes, dim=-1)):  # (1, K, F_i) per segment
        if sent.scale is not None:
            fo.write(struct.pack("!f", sent.scale[0, i].item()))
        if lm is None:
            packer = BitPacker(int(math.log2(model.codebook_size)), fo)
            for value in codes[0].t().flatten().tolist():  # (F_i * K,): frame by frame
                packer.push(value)
            packer.flush()
            continue
        coder, states, offset = ArithmeticCoder(fo), None, 0
        previous = torch.zeros(1, K, 1, dtype=torch.long)  # 0: no frame yet
        with torch.no_grad():
            for t in range(codes.shape[-1]):
                probs, states, offset = lm(previous, states, offset)  # (1, K_lm, K, 1)
                for k, value in enumerate(codes[0, :, t].tolist()):
                    coder.push(value, quantized_cdf(probs[0, :, k, 0]))
                previous = 1 + codes[:, :, t:t + 1]
        coder.flush()
    return fo.getvalue()


def read_exactly(fo, n, what):
    data = fo.read(n)
    if len(data) < n:
        raise ValueError(f"truncated .ecdc file: it ends inside {what}")
    return data


def decompress(data, model, lm=None):
    """The bytes of an .ecdc file (ours or the official tool's) -> (wav (C, T), the codes)."""
    fo = io.BytesIO(data)
    magic, version, size = ECDC.unpack(read_exactly(fo, ECDC.size, "the header"))
    if magic != b"ECDC" or version != 0:
        raise ValueError("not an .ecdc file (no ECDC magic, version 0)")
    try:
        meta = json.loads(read_exactly(fo, size, "the header").decode())
        name, T, K, uses_lm = meta["m"], int(meta["al"]), int(meta["nc"]), bool(meta["lm"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt .ecdc header ({e})") from None
    if name != model_name(model):
        raise ValueError(f"this .ecdc file was written by model {name!r}; the model given is "
                         f"{model_name(model)!r} ({model.sample_rate} Hz, {model.channels} ch)")
    if uses_lm and lm is None:
        raise ValueError("this .ecdc file was compressed with the entropy-coding LM: open it with "
                         "the LM (--lm)")
    codes, scales = [], []
    for _, n in model.segments(T):
        frames = int(math.ceil(n / model.sample_rate * model.frame_rate))  # official rule
        if model.cfg.normalize:
            scales.append(struct.unpack("!f", read_exactly(fo, 4, "a segment's scale"))[0])
        segment = torch.zeros(1, K, frames, dtype=torch.long)
        if uses_lm:
            decoder, states, offset = ArithmeticDecoder(fo), None, 0
            previous = torch.zeros(1, K, 1, dtype=torch.long)
        else:
            unpacker = BitUnpacker(int(math.log2(model.codebook_size)), fo)
        with torch.no_grad():
            for t in range(frames):
                if uses_lm:
                    probs, states, offset = lm(previous, states, offset)
                for k in range(K):
                    value = (decoder.pull(quantized_cdf(probs[0, :, k, 0])) if uses_lm
                             else unpacker.pull())
                    if value is None:
                        raise ValueError("truncated .ecdc file: it ends inside the codes")
                    segment[0, k, t] = value
                previous = 1 + segment[:, :, t:t + 1]
        codes.append(segment)
    codes = torch.cat(codes, dim=-1)  # (1, K, F)
    scale = torch.tensor([scales]) if scales else None  # (1, S)
    return model.decode(codes, scale)[0, :, :T], codes

# -------------------------------------------------------------------------------------------------
# Discriminator (§3.4)


class STFTDiscriminator(nn.Module):
    """One scale of the MS-STFT discriminator (§3.4): the complex STFT (window W, hop W/4,
    normalised) as real and imaginary channels, a conv with kernel 3x8 and 32 channels, three
    convs with stride 2 over frequency and time dilations 1, 2, 4, a 3x3 conv, and a 3x3 conv to
    one logit map. LeakyReLU(0.2) and weight norm on every conv (official file: none on the
    first, kernel 3x9). Layout (B, 2, time, frequency). Stereo channels are judged apart (§3.4)."""

    def __init__(self, filters, window, kernel=(3, 8), dilations=(1, 2, 4)):
        super().__init__()
        self.window, self.hop = window, window // 4  # hop W/4: audiocraft's; the paper has none
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        k_t, k_f = kernel
        pad_f = (k_f - 1) // 2
        convs = [weight_norm(nn.Conv2d(2, filters, kernel, padding=((k_t - 1) // 2, pad_f)))]
        for d in dilations:  # stride 2 over frequency, dilation d over time
            convs.append(weight_norm(nn.Conv2d(filters, filters, kernel, stride=(1, 2),
                                               dilation=(d, 1),
                                               padding=((k_t - 1) * d // 2, pad_f))))
        convs.append(weight_norm(nn.Conv2d(filters, filters, (k_t, k_t), padding=(k_t - 1) // 2)))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(filters, 1, (k_t, k_t), padding=(k_t - 1) // 2))

    def forward(self, x):  # (B, C, T) -> logits (B*C, t, f), features [(B*C, 32, t, f_l)] x 5
        spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), self.window, self.hop,
                          window=self.hann, normalized=True, center=False,
                          return_complex=True)  # (B*C, W/2 + 1, frames)
        z = torch.view_as_real(spec).permute(0, 3, 2, 1).contiguous()  # (B*C, 2, frames, W/2+1)
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            features.append(z)
        return self.conv_post(z).squeeze(1), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """§3.4: five STFT discriminators with windows 2048, 1024, 512, 256, 128 (doubled at 48 kHz,
    whose preset sets them)."""

    def __init__(self, run):
        super().__init__()
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(run.disc_filters, w, tuple(run.disc_kernel))
            for w in run.disc_windows)
        # DEVIATION 3: one discriminator for every bandwidth (§3.4: one per bandwidth helped)

    def forward(self, x):  # (B, C, T) -> [(logits, [features])] for each scale
        return [d(x) for d in self.discriminators]

# -------------------------------------------------------------------------------------------------
# Losses (§3.4) and the balancer (§3.4, Eq. 5)


def discriminator_loss(real, fake):
    """L_d = 1/K sum_k max(0, 1 - D_k(x)) + max(0, 1 + D_k(x_hat)), averaged over each logit map."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for (r, _), (f, _) in zip(real, fake)) / len(real)


def adversarial_loss(fake):
    """l_g = 1/K sum_k max(0, 1 - D_k(x_hat)), averaged over each logit map (§3.4)."""
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)


def feature_loss(real, fake):
    """Eq. 2, relative feature matching: 1/(KL) sum_k sum_l |D_k^l(x) - D_k^l(x_hat)| /
    mean |D_k^l(x)|. The numerator is a mean, as audiocraft's (Eq. 2's sum would weigh each layer
    by its size)."""
    terms = [(fr.detach() - ff).abs().mean() / fr.detach().abs().mean().clamp(min=1e-12)
             for (_, r), (_, f) in zip(real, fake) for fr, ff in zip(r, f)]
    return sum(terms) / len(terms)


class FrequencyLoss(nn.Module):
    """Eq. 1: l_f = 1/(|alpha| |s|) sum_i ||S_i(x) - S_i(x_hat)||_1
                                          + alpha_i ||S_i(x) - S_i(x_hat)||_2
    over the scales i = 5..11: S_i a 64-bin mel spectrogram of a normalised STFT, window 2^i,
    hop 2^i/4, alpha_i = 1 (§3.4). DEVIATION 4 (`log_l2`, on by default): the L2 term compares
    log mel spectrograms, squared and averaged, after audiocraft's MultiScaleMelSpectrogramLoss
    (log10 of a power mel there, ln of the magnitude mel here);
    Eq. 1 as printed (linear, `--log_l2 false`) made the tiny run's mel distance worse with
    bandwidth (README). Our choices where Eq. 1 is silent: norms as means over the elements (the
    L2 as a root mean square when linear), averaged over the scales; log floor 1e-5; HTK mel scale
    with peak-1 triangles; Hann window. Always float32, also under AMP."""

    def __init__(self, sample_rate, scales, n_mels, log_l2=True):
        super().__init__()
        self.scales, self.log_l2 = tuple(scales), log_l2
        for s in self.scales:
            fb = mel_filterbank(sample_rate, s, n_mels, htk=True, norm=None)  # (64, s/2 + 1)
            self.register_buffer(f"fb{s}", fb, persistent=False)
            self.register_buffer(f"win{s}", torch.hann_window(s), persistent=False)

    def mel(self, x, s):  # x (B*C, T) -> S_i (B*C, 64, frames)
        spec = torch.stft(x, s, s // 4, window=getattr(self, f"win{s}"), normalized=True,
                          return_complex=True).abs()  # (B*C, s/2 + 1, frames)
        return getattr(self, f"fb{s}") @ spec

    def forward(self, x, x_hat):  # (B, C, T) each -> scalar
        with torch.autocast(x.device.type, enabled=False):
            x, x_hat = (v.reshape(-1, v.shape[-1]).float() for v in (x, x_hat))  # (B*C, T)
            loss = 0.0
            for s in self.scales:
                S_x, S_y = self.mel(x, s), self.mel(x_hat, s)
                l1 = (S_x - S_y).abs().mean()
                if self.log_l2:  # DEVIATION 4
                    l2 = (S_x.clamp(min=1e-5).log() - S_y.clamp(min=1e-5).log()).pow(2).mean()
                else:
                    l2 = (S_x - S_y).pow(2).mean().sqrt()
                loss = loss + l1 + l2  # alpha_i = 1
        return loss / len(self.scales)


class Balancer:
    """§3.4, Eq. 5: each loss l_i sends into the model the gradient at x_hat
        g~_i = R * lambda_i / sum_j lambda_j * g_i / <||g_i||_2>_beta,
    so that lambda_i / sum_j lambda_j is the fraction of the gradient that comes from l_i,
    whatever l_i's scale. <.>_beta is an exponential moving average (beta = 0.999, bias-corrected
    as the official code) of the norm per example, averaged over the batch (and over the ranks
    under DDP); R = 1. Its state (the running sums) is part of ckpt.pt."""

    def __init__(self, weights, decay=0.999, total_norm=1.0, eps=1e-12):
        self.weights, self.decay, self.total_norm, self.eps = dict(weights), decay, total_norm, eps
        self.sums, self.counts = {}, {}  # EMA numerators and denominators (the bias correction)

    def __call__(self, grads):
        """grads {name: (B, C, T) gradient of l_i at x_hat} -> (the gradient to send, the raw
        norms, the averaged norms)."""
        names = list(grads)
        norms = torch.stack([grads[k].flatten(1).norm(dim=1).mean() for k in names])
        if is_distributed():
            dist.all_reduce(norms)
            norms = norms / dist.get_world_size()
        ok = torch.isfinite(norms).all()  # an fp16 step that overflowed is skipped by GradScaler:
        norms = dict(zip(names, norms))  # it must not enter the EMA either (no host sync here)
        for k in names:
            old_sum, old_count = self.sums.get(k, norms[k] * 0), self.counts.get(k, norms[k] * 0)
            self.sums[k] = torch.where(ok, self.decay * old_sum + norms[k].detach(), old_sum)
            self.counts[k] = torch.where(ok, self.decay * old_count + 1, old_count)
        averaged = {k: self.sums[k] / self.counts[k] for k in names}
        total = sum(self.weights[k] for k in names)
        out = sum(self.weights[k] / total * self.total_norm / (self.eps + averaged[k]) * grads[k]
                  for k in names)
        return out, norms, averaged

    def state_dict(self):
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])

# -------------------------------------------------------------------------------------------------
# Training: the generic parts (the same in every codec file; marked copies of soundstream.py)


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

# -------------------------------------------------------------------------------------------------
# Training: the model-specific part


class Trainer:
    """The codec G, the MS-STFT discriminator D and their optimizers; `step()` is one update."""

    def __init__(self, cfg, run, rank=0, world=1, device="cpu"):
        check_config(cfg, run)
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = EnCodec(cfg).to(self.device)
        self.disc = MultiScaleSTFTDiscriminator(run).to(self.device)
        self.freq_loss = FrequencyLoss(cfg.sample_rate, run.mel_scales, run.mel_bins,
                                       run.log_l2).to(self.device)
        self.balancer = Balancer({"t": run.lambda_t, "f": run.lambda_f, "g": run.lambda_g,
                                  "feat": run.lambda_feat}, run.balancer_decay)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=run.lr, betas=tuple(run.betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=run.lr, betas=tuple(run.betas))
        cuda = self.device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.amp_dtype = amp if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.amp == "fp16")
        # G, D: what the updates run through (DDP-wrapped under torchrun); model, disc: the bare
        # modules, for D's passes in the G update (no DDP hooks, parameters frozen) and saving
        self.G, self.D = self.model, self.disc
        if world > 1:  # the codebooks are kept identical by the quantizer, not by DDP's broadcast
            ddp = nn.parallel.DistributedDataParallel
            new = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch 2.13 name
            no_sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
            ids = [self.device.index] if cuda else None
            self.G = ddp(self.model, ids, **no_sync)
            self.D = ddp(self.disc, ids, **no_sync)
        if run.compile and cuda:
            self.G = torch.compile(self.G)
        torch.manual_seed(run.seed + rank)
        self.step_count = 0

    # Copied from soundstream.py: Trainer.autocast
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def draws(self):
        """This step's bandwidth, one for the whole batch (§3.4), and whether D is updated: the
        same on every rank (a generator
        seeded by the run's seed and the step), and the same after a resume."""
        # 1_000_003 (a prime, our choice) keeps (seed, step) pairs on distinct seeds
        g = torch.Generator().manual_seed(self.run.seed * 1_000_003 + self.step_count)
        bandwidth = self.cfg.bandwidths[int(torch.randint(len(self.cfg.bandwidths), (1,),
                                                           generator=g))]
        update_d = torch.rand((), generator=g).item() < self.run.disc_prob
        return bandwidth, update_d and self.step_count >= self.run.gan_start

    def step(self, batch, diagnose=False):
        """One update: a bandwidth for the whole batch, D with probability run.disc_prob (§3.4:
        2/3 at 24 kHz, 0.5 at 48 kHz), then G through the balancer (Eq. 5), the commitment term
        beside it. Returns the logged numbers: each term and its raw gradient norm at x_hat
        (before the balancer); with `diagnose`, also the latent RMS,
        the output's DC, per-codebook perplexity and the codes replaced since the last one."""
        self.model.train()
        lr = self.run.lr * self.run.lr_decay ** self.step_count
        for group in self.opt_g.param_groups + self.opt_d.param_groups:
            group["lr"] = lr
        x = batch.to(self.device)
        bandwidth, update_d = self.draws()
        n_q = self.model.n_q_for_bandwidth(bandwidth)
        gan = self.step_count >= self.run.gan_start
        with self.autocast():
            x_hat, codes, aux = self.G(x, n_q)
        stats = {"kbps": torch.tensor(bandwidth, dtype=torch.float64)}
        if update_d:
            with self.autocast():
                both = self.D(torch.cat([x, x_hat.detach()]))  # 2B examples, one DDP forward
                n = len(x) * self.cfg.channels  # real rows first; stereo channels apart
                real = [(lg[:n], [f[:n] for f in fs]) for lg, fs in both]
                fake = [(lg[n:], [f[n:] for f in fs]) for lg, fs in both]
                d_loss = discriminator_loss(real, fake)
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(d_loss).backward()
            self.scaler.unscale_(self.opt_d)
            stats["|D|"] = nn.utils.clip_grad_norm_(self.disc.parameters(), self.run.grad_clip)
            self.scaler.step(self.opt_d)
            stats["d"] = d_loss
        with self.autocast():
            losses = {"t": F.l1_loss(x_hat.float(), x.float()), "f": self.freq_loss(x, x_hat)}
            if gan:
                self.disc.requires_grad_(False)
                with torch.no_grad():
                    real = self.disc(x)
                fake = self.disc(x_hat)
                losses.update(g=adversarial_loss(fake), feat=feature_loss(real, fake))
        S = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        grads = {k: torch.autograd.grad(S * v, x_hat, retain_graph=True)[0].float() / S
                 for k, v in losses.items()}
        g_x_hat, norms, averaged = self.balancer(grads)
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward([x_hat, aux["commit"]],  # l_w outside the balancer (§3.4)
                                [S * g_x_hat.to(x_hat.dtype),
                                 S * self.run.lambda_w * torch.ones_like(aux["commit"])])
        self.scaler.unscale_(self.opt_g)
        stats.update(losses, commit=aux["commit"])
        stats.update({f"|g_{k}|": v for k, v in norms.items()})  # raw, before balancing
        stats["|G|"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt_g)
        self.disc.requires_grad_(True)
        self.scaler.update()
        self.step_count += 1
        stats = {k: v.item() for k, v in stats.items()}
        if diagnose:
            stats["z_rms"] = aux["latent_rms"].item()
            stats["dc"] = x_hat.detach().mean().item()
            ppl = codebook_stats(codes.cpu(), self.cfg.codebook_size, 1)["perplexity"]
            stats["ppl"] = [round(p, 1) for p in ppl]
            stats["dead"] = sum(int(vq.replaced) for vq in self.model.quantizer.layers)
            for vq in self.model.quantizer.layers:
                vq.replaced.zero_()
        return stats

    def write_sample(self, stem):
        """A reconstruction of the first validation file at the highest bandwidth: wav and PNG."""
        model = self.model.eval()
        wav, sr = load(self.valid_file, model.sample_rate, model.channels)
        rec = reconstruct(model, wav.to(self.device)).cpu()
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        save(f"{stem}.wav", rec, sr)
        plot_comparison(f"{stem}.png", wav, rec, sr, title=f"{Path(self.valid_file).name}: "
                        f"original vs EnCodec, {model.bitrate() / 1000:g} kbps")
        model.train()

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
                "scaler": self.scaler.state_dict(), "balancer": self.balancer.state_dict(),
                "rng": rngs}

    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["generator"])
        self.disc.load_state_dict(ckpt["discriminators"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.balancer.load_state_dict(ckpt["balancer"])
        self.step_count = ckpt["step"]
        if len(ckpt["rng"]) != self.world and self.rank == 0:
            print(f"note: the checkpoint was written by {len(ckpt['rng'])} process(es), this run "
                  f"has {self.world}: training continues, but not bit-exactly")
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


# Copied from soundstream.py: eval_utterances
def eval_utterances(data, limit=None):
    """Held-out (file, transcript or None) pairs: the test split of the demo corpus or of a
    manifest (its "text" field)."""
    entries = read_manifest(data or demo_manifest(), "test")
    return [(Path(e["path"]), e.get("text")) for e in entries][:limit]


def bandwidth_ladder(model):
    """The n_q of each bandwidth the model codes: the rows of the evaluation table."""
    return [model.n_q_for_bandwidth(b) for b in model.cfg.bandwidths]


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
    dataset = AudioDataset(files, cfg.sample_rate, channels=cfg.channels,
                           segment=int(run.segment_seconds * cfg.sample_rate), seed=run.seed)
    held_out = eval_utterances(run.data, run.eval_utterances) if is_manifest else None
    metrics = evaluation.parse_metrics(run.metrics)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        m = trainer.model
        n_g = sum(p.numel() for p in m.parameters()) / 1e6
        n_d = sum(p.numel() for p in trainer.disc.parameters()) / 1e6
        how = f"resumed at step {trainer.step_count}" if start else "new run"
        print(f"EnCodec {how}: {n_g:.2f}M codec + {n_d:.2f}M discriminator parameters, "
              f"{m.frame_rate} Hz, {', '.join(f'{b:g}' for b in cfg.bandwidths)} kbps, "
              f"{len(files)} training files, {world} process(es) on {device}"
              + (f", {threads} CPU thread(s){why}" if threads else ""), flush=True)
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
            evaluate(trainer.model, held_out, bandwidth_ladder(trainer.model),
                     f"step {trainer.step_count}", metrics)
        elif held_out is None:  # a folder (eval_utterances 0: no table)
            print(f"note: {run.data} is a folder, which has no held-out split; evaluate on another "
                  f"folder with --eval --data DIR")
        print(f"saved {out / 'model.pt'} (inference) and {out / 'ckpt.pt'} (resume)")
    if world > 1:
        dist.destroy_process_group()
    return history

class CodeWindows(torch.utils.data.Dataset):
    """Windows of `frames` frames (Q, frames) of precomputed codes (Q, F_i) of each file; the
    window's start is a pure function of (seed, epoch, index), as AudioDataset's crops."""

    def __init__(self, codes, frames, seed=0):
        self.codes, self.frames, self.seed, self.epoch = codes, frames, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, index):
        c = F.pad(self.codes[index], (0, max(0, self.frames - self.codes[index].shape[-1])))
        # primes (our choice, as Trainer.draws) spread (seed, epoch, index) over distinct seeds
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + index)
        start = int(torch.randint(c.shape[-1] - self.frames + 1, (1,), generator=g))
        return c[:, start:start + self.frames]  # (Q, frames)


class LMTrainer:
    """Trains the entropy-coding LM on a frozen codec's codes (§3.3): cross-entropy of each
    frame's codes given the previous frames, all codebooks of a frame predicted at once; its
    value in bits is the bits per code the arithmetic coder will spend. The sinusoidal positions
    start at a random offset, "to emulate being in a longer sequence" (§3.3)."""

    def __init__(self, codec, run, rank=0, world=1, device="cpu"):
        self.run, self.rank, self.world = run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)
        self.codec = codec
        self.model = EntropyLM(codec.num_codebooks, codec.codebook_size, codec.frame_rate)
        self.model.to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=run.lr, betas=tuple(run.betas))
        self.G = self.model
        if world > 1:
            self.G = nn.parallel.DistributedDataParallel(self.model)
        self.step_count = 0

    def loss(self, codes, offset=0):  # codes (B, Q, T) -> mean cross-entropy in bits per code
        B, Q, T = codes.shape
        previous = torch.cat([codes.new_zeros(B, Q, 1), 1 + codes[..., :-1]], dim=-1)
        probs = self.G(previous, None, offset)[0]  # (B, K, Q, T)
        return F.nll_loss(probs.clamp(min=1e-12).log(), codes) / math.log(2)

    def step(self, batch, diagnose=False):
        self.model.train()
        g = torch.Generator().manual_seed(self.run.seed * 1_000_003 + self.step_count)  # as draws
        offset = int(torch.randint(1000, (1,), generator=g))  # our choice: up to 1000 frames
        bits = self.loss(batch.to(self.device), offset)
        self.opt.zero_grad(set_to_none=True)
        bits.backward()
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.opt.step()
        self.step_count += 1
        return {"bits_per_code": bits.item(), "|G|": norm.item()}

    def write_sample(self, stem):  # nothing to listen to: the codes are the codec's
        pass

    def state_dict(self):
        return {"model": NAME + "-lm", "step": self.step_count, "lm": self.model.state_dict(),
                "opt": self.opt.state_dict(), "rng": [rng_state()]}

    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["lm"])
        self.opt.load_state_dict(ckpt["opt"])
        self.step_count = ckpt["step"]
        set_rng_state(ckpt["rng"][0])


def codes_of(codec, files, bandwidth=None):
    """Each file's codes (Q, F) at the bandwidth (default: all codebooks)."""
    return [codec.encode(load(f, codec.sample_rate, codec.channels)[0][None],
                         bandwidth=bandwidth).codes[0] for f in files]


def coded_kbps(codec, lm, files, bandwidth=None):
    """Nominal kbps and .ecdc kbps with and without the LM (headers and scales included),
    summed over `files`: what the entropy coder saves (§3.3, §4.5: 25-40 % in the paper)."""
    seconds = plain = coded = 0.0
    for f in files:
        wav = load(f, codec.sample_rate, codec.channels)[0]
        seconds += wav.shape[-1] / codec.sample_rate
        plain += 8 * len(compress(codec, wav, bandwidth))
        coded += 8 * len(compress(codec, wav, bandwidth, lm))
    n_q = codec.n_q_for_bandwidth(bandwidth)
    return codec.bitrate(n_q) / 1000, plain / seconds / 1000, coded / seconds / 1000


def train_lm(codec_path, run, lm_out=None, resume=False, interrupt_after=None):
    """Train the LM on the demo corpus's (or run.data's) codes of a trained codec, then print the
    bits per code on held-out utterances and the bandwidth saved. Saves OUT/lm.pt (the weights,
    loadable by --lm) and OUT/ckpt.pt."""
    codec = EnCodec.load(codec_path)
    out = Path(run.out)
    trainer = LMTrainer(codec, run)
    if resume:
        trainer.load_state_dict(load_lm_checkpoint(out / "ckpt.pt"))
    files = resolve_files(run.data or None, "train")
    dataset = CodeWindows(codes_of(codec, files), int(run.lm_seconds * codec.frame_rate), run.seed)
    out.mkdir(parents=True, exist_ok=True)
    print(f"entropy-coding LM: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
          f"parameters, codes of {len(files)} files from {codec_path}", flush=True)
    history = fit(trainer, run, dataset, interrupt_after)
    is_manifest = not run.data or run.data.endswith(".jsonl")  # a folder has no held-out split
    if trainer.step_count >= run.steps and is_manifest:
        held_out = [f for f, _ in eval_utterances(run.data, run.eval_utterances)]
        lm = trainer.model.eval()
        with torch.no_grad():
            bits = [trainer.loss(c[None]).item() for c in codes_of(codec, held_out)]
        nominal, plain, coded = coded_kbps(codec, lm, held_out)
        print(f"held-out: {sum(bits) / len(bits):.3f} bits per code (of "
              f"{math.log2(codec.codebook_size):g}); {nominal:g} kbps nominal, {plain:.3f} "
              f"as .ecdc without the LM, {coded:.3f} with it: {100 * (1 - coded / plain):.1f} % "
              f"saved", flush=True)
    return history


def load_lm_checkpoint(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("model") != NAME + "-lm":
        raise ValueError(f"{path} is not an entropy-coding LM training checkpoint")
    return ckpt

# -------------------------------------------------------------------------------------------------
# Inference helpers and the command line


def reconstruct(model, wav, bandwidth=None):
    """wav (C, T) or (B, C, T) -> the reconstruction, same shape."""
    x = wav if wav.dim() == 3 else wav[None]
    y = model.decode(model.encode(x, bandwidth=bandwidth))[..., :x.shape[-1]]
    return y if wav.dim() == 3 else y[0]


def read_codes(path, model):
    """The codes (Q, F), scales (S,) or None, and sample count of an --encode file."""
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
        scale = torch.from_numpy(npz["scale"]) if "scale" in npz else None
        num_samples = int(npz["num_samples"])
        meta = (str(npz["model"]), int(npz["codebook_size"]), int(npz["sample_rate"]),
                float(npz["frame_rate"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a codes file written by --encode ({e})") from None
    mine = (NAME, model.codebook_size, model.sample_rate, float(model.frame_rate))
    if meta != mine:
        raise ValueError(f"{path} holds {meta[0]} codes ({meta[1]}-entry codebooks, {meta[2]} Hz, "
                         f"{meta[3]:g} frames/s); this checkpoint is a {NAME} with {mine[1]}-entry "
                         f"codebooks at {mine[2]} Hz, {mine[3]:g} frames/s")
    if codes.dim() != 2:
        raise ValueError(f"{path}: codes must be (codebooks, frames), got {tuple(codes.shape)}")
    return codes, scale, num_samples


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


def build_parser():
    p = Parser(description="EnCodec (Defossez et al. 2022): train, encode, decode, evaluate; "
               "Meta's released weights with --official.", allow_abbrev=False)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train (DDP when launched by torchrun)")
    act.add_argument("--encode", metavar="WAV", help="audio file -> codes .npz")
    act.add_argument("--decode", metavar="NPZ", help="codes .npz -> audio file")
    act.add_argument("--reconstruct", metavar="WAV", help="encode + decode; prints metrics")
    act.add_argument("--eval", action="store_true", help="metrics table over held-out files")
    act.add_argument("--compress", metavar="WAV", help="audio file -> .ecdc file (§3.3)")
    act.add_argument("--train_lm", action="store_true", help="train the entropy-coding LM on "
                     "the codes of the codec --ckpt (§3.3); OUT/model.pt is then an --lm")
    act.add_argument("--decompress", metavar="ECDC", help=".ecdc file (ours or the official "
                     "tool's) -> audio file")
    p.add_argument("--lm", metavar="TH", help="entropy-coding LM weights for --compress / "
                   "--decompress, e.g. Meta's encodec_lm_24khz-1608e3c0.th")
    p.add_argument("--preset", choices=sorted(PRESETS), default="24khz", help="default: 24khz")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--ckpt", help="model.pt (or ckpt.pt) for encode/decode/reconstruct/eval")
    p.add_argument("--official", metavar="TH", help="Meta's released weights instead of --ckpt: "
                   "encodec_24khz-d7cc33bc.th or encodec_48khz-7e698e3e.th")
    p.add_argument("--bandwidth", type=float, help="kbps (default: the highest); one of the "
                   "model's: 1.5, 3, 6, 12, 24 at 24 kHz; 3, 6, 12, 24 at 48 kHz; "
                   "0.25, 0.5, 1, 2 for tiny")
    p.add_argument("--streaming", action="store_true", help="reconstruct frame by frame (causal)")
    for cls in (Config, TrainConfig):  # every config field is a flag, typed from its default
        group = p.add_argument_group(f"{cls.__name__} fields ({cls.__doc__.split('.')[0].lower()})")
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            values = {name: getattr(c if cls is Config else r, f.name)
                      for name, (c, r) in PRESETS.items()}
            shown = ", ".join(f"{n}: {v}" for n, v in values.items() if n in ("24khz", "tiny"))
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
        cfg, run = configs_from_args(args)
        train(cfg, run, resume=args.resume, overwrite=args.overwrite)
        return
    if args.train_lm:
        if not args.ckpt:
            raise ValueError("--train_lm needs --ckpt: the trained codec whose codes it models")
        _, run = PRESETS[args.preset]
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
        train_lm(args.ckpt, dataclasses.replace(run, **given), resume=args.resume)
        return
    if bool(args.ckpt) == bool(args.official):
        raise ValueError("give --ckpt (a model.pt of --train) or --official (Meta's .th weights)")
    model = EnCodec.load(args.ckpt) if args.ckpt else EnCodec.from_official(args.official)
    bw = args.bandwidth
    n_q = model.n_q_for_bandwidth(bw)  # checks the value
    metrics = evaluation.check_available(evaluation.parse_metrics(args.metrics))
    source = args.ckpt or args.official
    if args.eval:
        n_qs = [n_q] if bw else bandwidth_ladder(model)
        if args.data and not args.data.endswith(".jsonl"):  # a user's folder: all of its files
            files = [(f, None) for f in resolve_files(args.data)[:args.eval_utterances]]
            evaluate(model, files, n_qs, source, metrics, f"files of {args.data}", notice=True)
        else:
            evaluate(model, eval_utterances(args.data, args.eval_utterances), n_qs, source,
                     metrics)
        return
    if not args.out:
        raise ValueError("--out is required")
    lm = None
    if args.lm:
        if not Path(args.lm).is_file():
            raise FileNotFoundError(f"{args.lm}: file not found")
        try:
            lm = EntropyLM.from_official(args.lm, model)
        except Exception as e:  # noqa: BLE001 - unreadable, or another model's LM: one line
            raise ValueError(f"{args.lm} is not an entropy-coding LM for this model "
                             f"({type(e).__name__})") from None
    if args.compress:
        wav, sr = load(args.compress, model.sample_rate, model.channels, notice=True)
        data = compress(model, wav, bw, lm)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(data)
        kbps = 8 * len(data) / (wav.shape[-1] / sr) / 1000  # the header and scales included
        print(f"{args.compress} -> {args.out}: {len(data)} bytes, {kbps:.2f} kbps achieved "
              f"against {model.bitrate(n_q) / 1000:g} kbps nominal"
              + (" (with the LM)" if lm else ""))
    elif args.decompress:
        if not Path(args.decompress).is_file():
            raise FileNotFoundError(f"{args.decompress}: file not found")
        wav, _ = decompress(Path(args.decompress).read_bytes(), model, lm)
        save(args.out, wav, model.sample_rate)
        print(f"{args.decompress} -> {args.out} ({wav.shape[-1] / model.sample_rate:.2f} s)")
    elif args.encode:
        wav, sr = load(args.encode, model.sample_rate, model.channels, notice=True)
        codes, scale = model.encode(wav[None], bandwidth=bw)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if model.codebook_size <= 2 ** 15 else np.int32  # holds every id
        extra = {"scale": scale[0].numpy()} if scale is not None else {}
        np.savez(args.out, codes=codes[0].numpy().astype(dtype), sample_rate=sr, model=NAME,
                 num_samples=wav.shape[-1], codebook_size=model.codebook_size,
                 frame_rate=float(model.frame_rate), **extra)
        print(f"{args.encode}: {codes.shape[1]} codebooks x {codes.shape[2]} frames "
              f"({model.bitrate(codes.shape[1]) / 1000:g} kbps) -> {args.out}")
    elif args.decode:
        codes, scale, num_samples = read_codes(args.decode, model)
        wav = model.decode(codes[None], None if scale is None else scale[None])
        save(args.out, wav[0, :, :num_samples], model.sample_rate)
        print(f"{args.decode} -> {args.out} ({num_samples / model.sample_rate:.2f} s)")
    else:  # --reconstruct
        wav, sr = load(args.reconstruct, model.sample_rate, model.channels, notice=True)
        if args.streaming:  # 7 frames first (see EnCodec.streaming), then one frame at a time
            M, first = model.hop_length, model.cfg.kernel_size * model.hop_length
            x = F.pad(wav[None], (0, -wav.shape[-1] % M + max(0, first - wav.shape[-1])))
            with model.streaming():
                starts = [0] + list(range(first, x.shape[-1], M))
                ends = starts[1:] + [x.shape[-1]]
                rec = torch.cat([model.decode(model.encode(x[..., a:b], bandwidth=bw))
                                 for a, b in zip(starts, ends)], dim=-1)[0, :, :wav.shape[-1]]
        else:
            rec = reconstruct(model, wav, bw)
        save(args.out, rec, sr)
        png = Path(args.out).with_suffix(".png")
        plot_comparison(png, wav, rec, sr, title=Path(args.reconstruct).name)
        per_pair = [m for m in metrics if not evaluation.METRICS[m].needs_transcript]
        q, notes = evaluation.score(wav, rec, sr, per_pair)
        shown = ", ".join(f"{k} {v:.3f}" if math.isfinite(v) else f"{k} n/a" for k, v in q.items())
        print(f"{args.reconstruct} -> {args.out} (and the spectrograms {png}) at "
              f"{model.bitrate(n_q) / 1000:g} kbps: {shown}")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


# Copied from soundstream.py: parse_bool
def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
