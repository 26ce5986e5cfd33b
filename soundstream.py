"""
SoundStream: An End-to-End Neural Audio Codec, in one file.

Zeghidour, Luebs, Omran, Skoglund, Tagliasacchi. IEEE/ACM TASLP 30, 2022. arXiv 2107.03312.
No official code was released: this file follows the paper (arXiv v1) alone. Reimplementations
read for contrast only: lucidrains/audiolm-pytorch (soundstream.py, v2.4.0), wesbz/SoundStream.

Paper -> code
  §III-A encoder, Fig. 3 ........ Encoder, EncoderBlock, ResidualUnit, CausalConv1d
  §III-B decoder, Fig. 3 ........ Decoder, DecoderBlock, CausalConvTranspose1d
  §III-C RVQ, Algorithm 1 ....... VectorQuantizer (EMA, k-means, dead codes), and
  §III-C quantizer dropout ...... ResidualVectorQuantizer (n_q ~ U{1..N_q} per example)
  §III-D discriminators, Fig. 4 . WaveDiscriminator (MelGAN [15]), STFTDiscriminator
  §III-E Eqs. 1-3 ............... discriminator_loss, adversarial_loss, feature_loss
  §III-E Eqs. 4-6 ............... ReconstructionLoss, balance (DEVIATION 1), Trainer.step
  §III-F Eq. 7, §IV-A noise ..... FiLM, coloured_noise, mix_noise
  streaming (§I, §III-A) ........ SoundStream.streaming()

Shapes: B batch, T samples (mono: (B, 1, T)), L frames (T / M), M hop = prod(strides), D latent
dim, Q codebooks in use, N_q all codebooks, K codebook size (the paper's N), N rows of flattened
(B*L, D) frames in the quantizer. `F` is torch.nn.functional.

DEVIATIONS from the paper (each is tagged `# DEVIATION` where it happens)
  1. Eq. 6's lambda_adv = 1 and lambda_feat = 100 become weights set at every step (balance):
     the adversarial and feature terms' gradients at x_hat are held at a fixed fraction (1%,
     ratio_adv, ratio_feat) of the reconstruction term's. Eqs. 4-5 stay as written (linear-
     magnitude STFT, peak-1 mel triangles, norms over the 64 bands), and so their gradient at
     x_hat is ~10^3-10^9 times the GAN terms' under fixed lambdas (random discriminators at the
     start; benchmarks/soundstream_balance.py): the generator would never see the GAN. This is
     EnCodec's balancer (§3.4: set each term's share of the gradient) anchored on the
     reconstruction term, as VQGAN's adaptive weight is, without EnCodec's EMA (see balance).
  2. Eqs. 1-3 write 1/K with k = 0..K: K + 1 = 4 discriminators. We average over the four, and
     in Eq. 3 over each one's own layers (7 for the STFT discriminator, 6 for the wave ones).
  3. The sqrt in Eq. 5 gets an epsilon of 1e-12: sqrt'(0) is infinite on identical frames.
  4. A VQ-VAE commitment loss beta * ||r_i - sg(Q_i(r_i))||^2 (beta = 0.25, VQ-VAE [31]), summed
     over the quantizers and over the latent dimensions: Eq. 6 has none, but nothing else keeps
     the encoder's output near codebooks that are learnt by EMA.
  5. Quantizer dropout masks which quantizers each example decodes with (and its commitment
     term); every quantizer still runs, and updates its codebook, on every frame.

Where the paper is silent the comment says "our choice". The biggest: D = 128; Adam (3e-4,
betas 0.5/0.9, EnCodec's recipe); where the ELUs sit; the DC-free last bias; gradient clipping; the
noise mixing details; the tiny preset. The paper gives no optimizer, batch, crop or step count.
The parameter count against Table I is worked out in notebooks/soundstream.ipynb (9.84 M here,
8.4 M in Table I: the layers the text describes cannot give 8.4 M).

Exact resume: on CPU a resumed run repeats the uninterrupted one bit for bit (tested). On CUDA,
index_add_ (codebook EMA) and cuDNN are not deterministic, so runs drift apart slowly.

Commands
  python soundstream.py --train --preset tiny                          # demo corpus, CPU, < 10 min
  python soundstream.py --train --preset paper --data /data/LibriTTS   # one GPU
  torchrun --standalone --nproc_per_node=8 soundstream.py --train --preset paper --data DIR
  python soundstream.py --train --resume --out runs/soundstream        # continue where it stopped
  python soundstream.py --reconstruct in.wav --ckpt runs/soundstream/model.pt --out out.wav --n_q 4
  python soundstream.py --encode in.wav --ckpt runs/soundstream/model.pt --out codes.npz --n_q 8
  python soundstream.py --decode codes.npz --ckpt runs/soundstream/model.pt --out out.wav
  python soundstream.py --eval --ckpt runs/soundstream/model.pt [--data DIR]
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

from common.audio import AudioError, load, peak_normalize, random_crop, save
from common import evaluation
from common.data import AudioDataset, demo_manifest, read_manifest, resolve_files
from common.metrics import codebook_stats, mel_filterbank, plot_comparison

NAME = "soundstream"  # the model name in checkpoints and codes files; the generic blocks use it

# -------------------------------------------------------------------------------------------------
# Configuration: the model (saved in model.pt) and the training run (saved in ckpt.pt only)


@dataclass
class Config:
    """What rebuilds the model. Defaults are the paper's 24 kHz model."""
    sample_rate: int = 24000       # f_s = 24 kHz for all training data (§IV-A)
    enc_channels: int = 32         # C_enc = 32, the default model of Table I
    dec_channels: int = 32         # C_dec = 32 (Table I)
    strides: tuple[int, ...] = (2, 4, 5, 8)  # B_enc = 4 blocks, M = 320 samples: 75 Hz (§III-A, C)
    latent_dim: int = 128          # D: not given; our choice: 128, EnCodec's (Defossez et al. 2022)
    num_quantizers: int = 24       # N_q: derived: "trained at 18 kbps" (§V-C) = 75 Hz x 10 x 24
    codebook_size: int = 1024      # N = 1024 entries, 10 bits per quantizer (§III-C)
    quantizer_dropout: bool = True  # n_q ~ U{1..N_q} per training example (§III-C)
    ema_decay: float = 0.99        # EMA decay 0.99 (§III-C; VQ-VAE [31] App. A.1 for the codebook)
    dead_code_threshold: float = 2.0  # replace entries with EMA count < 2 (§III-C, Jukebox [34])
    kmeans_iters: int = 10         # k-means on the first batch (§III-C); iterations: our choice
    film: str = "none"             # "encoder" / "decoder": FiLM conditioning there (§III-F, §V-E)


@dataclass
class TrainConfig:
    """How the model is trained: discriminators, losses, optimizer, data and the run itself."""
    # discriminators (§III-D)
    wave_disc_channels: int = 16   # first conv of the MelGAN discriminator [15] that §III-D reuses
    wave_disc_max_channels: int = 1024  # "multiplier of 4 up to a maximum of 1024" (§III-D)
    stft_disc_channels: int = 32   # 32 channels after the 7x7 conv (§III-D, Fig. 4)
    stft_window: int = 1024        # W = 1024 (§III-D)
    stft_hop: int = 256            # H = 256 (§III-D)
    # losses (§III-E)
    lambda_rec: float = 1.0        # lambda_rec = 1 (§III-E)
    # DEVIATION 1: Eq. 6's lambda_adv = 1 and lambda_feat = 100 become weights set each step so
    # that each term's gradient at x_hat is this fraction of the reconstruction term's (balance)
    ratio_adv: float = 0.01        # our choice: the GAN terms within 100x of the reconstruction
    ratio_feat: float = 0.01       # our choice (see ratio_adv)
    commitment_weight: float = 0.25  # DEVIATION 4: beta = 0.25 of VQ-VAE [31]
    mel_bins: int = 64             # 64-bin mel spectrograms (§III-E)
    mel_scales: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # s = 2^6..2^11, hop s/4 (Eq. 4)
    # joint compression and enhancement (§III-F)
    noise_dir: str = ""            # noise to mix in (§IV-A: Freesound); "": coloured, with FiLM
    noisy_fraction: float = 0.5    # our choice: share of training examples that get noise
    # optimisation: the paper gives none of these; our choices
    lr: float = 3e-4               # Adam 3e-4, betas (0.5, 0.9): EnCodec's training recipe
    betas: tuple[float, ...] = (0.5, 0.9)  # (see lr)
    lr_decay: float = 1.0          # lr x lr_decay^step (DAC's ExponentialLR; 1: constant)
    gan_start: int = 0             # steps with the reconstruction loss only, D untrained (PWG)
    grad_clip: float = 100.0       # our choice: clip G and D gradient norms at 100 (DAC: 1000)
    batch_size: int = 32           # global batch, split over DDP ranks
    segment_seconds: float = 3.0   # 3 s crops, the crop §IV-A mixes noise into
    # the run
    data: str = ""                 # folder or .jsonl manifest; "": the demo corpus in data/demo
    out: str = "runs/soundstream"  # checkpoints, log, samples
    steps: int = 1_000_000         # training steps
    seed: int = 0                  # weights, crops, dropout and noise all follow from it
    log_every: int = 100           # steps between log lines (each with full diagnostics)
    sample_every: int = 5000       # steps between reconstruction wav + spectrogram PNGs
    ckpt_every: int = 5000         # steps between checkpoints
    eval_utterances: int = 20      # held-out utterances in the metrics table at the end
    metrics: str = "default"       # the table's (common/evaluation.py); default: all installed
    num_workers: int = 4           # DataLoader worker processes
    threads: int = 0               # CPU threads; 0: the idle cores (busy cores stall torch)
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU
    compile: bool = False          # torch.compile the generator (CUDA)


CHOICES = {"film": ("none", "encoder", "decoder"), "amp": ("none", "bf16", "fp16")}

PRESETS = {
    "paper": (Config(), TrainConfig()),
    # AudioLM's acoustic tokenizer (Borsos et al. 2023, §IV): 16 kHz, M = 320 -> 50 Hz, 12 x 1024
    # (6 kbps). Everything else AudioLM leaves unsaid: the paper preset's (our choice).
    "audiolm": (Config(sample_rate=16000, num_quantizers=12), TrainConfig()),
    # CPU demo on the 16 kHz demo corpus, ~9 min on 2 idle cores (README). Our choices: narrow nets,
    # short crops, a higher learning rate decaying 0.999 per step; K = 32 so that a batch (8 x 0.4
    # s x 50 Hz = 160 frames) gives ~5 frames per entry, above the dead-code threshold of 2; only
    # the cheap metrics in its tables (ViSQOL, WER, MCD would add minutes: --eval has them).
    # The reconstruction loss alone (gan_start = steps, 0.18 s/step against 0.42 with the GAN):
    # 300 GAN steps after 2000 of these lowered STOI from 0.77 to 0.72 (README, "The tiny run").
    "tiny": (Config(sample_rate=16000, enc_channels=8, dec_channels=8, latent_dim=32,
                    num_quantizers=8, codebook_size=32),
             TrainConfig(wave_disc_channels=4, wave_disc_max_channels=64, stft_disc_channels=4,
                         stft_window=512, stft_hop=128, lr=1e-3, lr_decay=0.999, gan_start=2400,
                         batch_size=8, segment_seconds=0.4, steps=2400, log_every=100,
                         sample_every=1200, ckpt_every=400,
                         eval_utterances=16, metrics="mel,pesq,stoi", num_workers=0)),
}


def check_config(cfg, run=None):
    """One-line errors for values the model cannot be built or trained with."""
    for obj in (cfg, run):
        for name, allowed in CHOICES.items():
            if obj is not None and hasattr(obj, name) and getattr(obj, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(obj, name)!r}")
    if run is not None:
        evaluation.check_available(evaluation.parse_metrics(run.metrics))
        # the longest window that must fit in a crop: reflect padding needs T > window / 2
        need = max(max(run.mel_scales), run.stft_window) // 2 + 1
        have = int(run.segment_seconds * cfg.sample_rate)
        if have < need:
            raise ValueError(f"segment_seconds {run.segment_seconds:g} gives {have} samples; the "
                             f"training losses need at least {need} "
                             f"({need / cfg.sample_rate:.3f} s)")

# -------------------------------------------------------------------------------------------------
# Building blocks: causal convolutions that can also run chunk by chunk


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the past only (§III-A: "padding is only applied to the past").

    Offline, the input is left-padded with P = (k - 1) * d + 1 - s zeros. Streaming, the last P
    samples of the previous chunk take their place, so chunked and offline outputs are identical
    whenever chunk lengths are multiples of the stride."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, dilation=1):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, dilation=dilation)
        self.causal_pad = (kernel_size - 1) * dilation + 1 - stride
        self.streaming, self.state = False, None

    def forward(self, x):  # (B, C_in, L) -> (B, C_out, L / s)
        if not self.streaming:
            return super().forward(F.pad(x, (self.causal_pad, 0)))
        if self.state is None:  # the first chunk sees the same zeros as the offline call
            self.state = x.new_zeros(x.shape[0], x.shape[1], self.causal_pad)
        x = torch.cat([self.state, x], dim=-1)  # (B, C_in, P + L)
        self.state = x[..., x.shape[-1] - self.causal_pad:]
        return super().forward(x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv whose output at time t depends on inputs up to t only (§I).

    With kernel k = 2s and stride s, L frames give L*s + (k - s) samples; the last k - s still
    await the next frame's contribution: dropped offline, carried to the next chunk streaming."""

    def __init__(self, in_ch, out_ch, kernel_size, stride):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride)
        self.trim = kernel_size - stride
        self.streaming, self.state = False, None

    def forward(self, x):  # (B, C_in, L) -> (B, C_out, L * s)
        y = F.conv_transpose1d(x, self.weight, None, self.stride)  # (B, C_out, L*s + trim)
        if self.streaming:
            if self.state is not None:  # add the tail the previous chunk left unfinished
                y = torch.cat([y[..., :self.trim] + self.state, y[..., self.trim:]], dim=-1)
            self.state = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim] + self.bias[:, None]


class ResidualUnit(nn.Module):
    """Fig. 3 residual unit: conv k=7 with dilation d, conv k=1, plus the identity. ELUs (§III-A)
    before each conv (pre-activation, as SEANet [45]): our choice, Fig. 3 does not show them."""

    def __init__(self, channels, dilation):
        super().__init__()
        self.block = nn.Sequential(nn.ELU(), CausalConv1d(channels, channels, 7, dilation=dilation),
                                   nn.ELU(), CausalConv1d(channels, channels, 1))

    def forward(self, x):  # (B, N, L) -> (B, N, L)
        return x + self.block(x)


class EncoderBlock(nn.Sequential):
    """Fig. 3 EncBlock(N, S): residual units at N/2 channels with dilations 1, 3, 9 (§III-A), then
    a conv with kernel 2S and stride S to N channels. The ELU before it is our choice."""

    def __init__(self, out_ch, stride):
        half = out_ch // 2
        super().__init__(ResidualUnit(half, 1), ResidualUnit(half, 3), ResidualUnit(half, 9),
                         nn.ELU(), CausalConv1d(half, out_ch, 2 * stride, stride=stride))


class DecoderBlock(nn.Sequential):
    """Fig. 3 DecBlock(N, S): a transposed conv (kernel 2S, stride S) from 2N to N channels, then
    the same three residual units (§III-B). The ELU before it is our choice."""

    def __init__(self, out_ch, stride):
        super().__init__(nn.ELU(), CausalConvTranspose1d(2 * out_ch, out_ch, 2 * stride, stride),
                         ResidualUnit(out_ch, 1), ResidualUnit(out_ch, 3), ResidualUnit(out_ch, 9))


class Encoder(nn.Sequential):
    """§III-A, Fig. 3: conv k=7 to C, B_enc blocks doubling the channels, (ELU, our choice) conv
    k=3 to D. "We do not apply any normalization" (§III-A)."""

    def __init__(self, cfg):
        C = cfg.enc_channels
        blocks = [EncoderBlock(C * 2 ** (i + 1), s) for i, s in enumerate(cfg.strides)]  # 2C..16C
        super().__init__(CausalConv1d(1, C, 7), *blocks,
                         nn.ELU(), CausalConv1d(C * 2 ** len(cfg.strides), cfg.latent_dim, 3))


class Decoder(nn.Sequential):
    """§III-B, Fig. 3: conv k=7 to 16C, blocks with the strides reversed halving the channels,
    (ELU, our choice) conv k=7 to one channel. No output nonlinearity, as in the paper."""

    def __init__(self, cfg):
        C, n = cfg.dec_channels, len(cfg.strides)
        blocks = [DecoderBlock(C * 2 ** (n - 1 - i), s)
                  for i, s in enumerate(reversed(cfg.strides))]
        super().__init__(CausalConv1d(cfg.latent_dim, C * 2 ** n, 7), *blocks,  # 8C .. C
                         nn.ELU(), CausalConv1d(C, 1, 7))


class FiLM(nn.Module):
    """Eq. 7: a~ = gamma * a + beta, gamma and beta from a linear layer on a (possibly
    time-varying) two-dimensional one-hot of the denoising mode (§III-F)."""

    def __init__(self, channels):
        super().__init__()
        self.linear = nn.Linear(2, 2 * channels)
        # our choice: start as the identity (gamma = 1, beta = 0)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias[:channels], 1.0)
        nn.init.zeros_(self.linear.bias[channels:])

    def forward(self, a, denoise):  # a (B, D, L), denoise (B,) or (B, L) bool -> (B, D, L)
        if denoise.dim() == 1:
            denoise = denoise[:, None].expand(-1, a.shape[-1])  # (B, L): one mode per example
        onehot = F.one_hot(denoise.long(), 2).to(a.dtype)  # (B, L, 2)
        gamma, beta = self.linear(onehot).chunk(2, dim=-1)  # (B, L, D) each
        return gamma.transpose(1, 2) * a + beta.transpose(1, 2)

# -------------------------------------------------------------------------------------------------
# Residual vector quantizer (§III-C, Algorithm 1)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """One codebook Q_i of Algorithm 1, learnt without gradients (§III-C):
    - EMA updates as in VQ-VAE-2 [32]: smoothed counts and sums of the vectors assigned to each
      entry, the entry being their ratio;
    - k-means on the first training batch instead of a random initialization;
    - an entry whose EMA count falls below 2 is replaced by a random vector of the batch ([34]).
    Under DDP counts and sums are all-reduced and random choices are broadcast from rank 0, so
    the codebooks stay identical on every rank. No host synchronisation on the hot path."""

    def __init__(self, dim, size, decay, threshold, kmeans_iters):
        super().__init__()
        self.size, self.decay, self.threshold = size, decay, threshold
        self.kmeans_iters = kmeans_iters
        self.eps = 1e-5  # Laplace smoothing of the counts, as Sonnet's VQ-VAE-2 EMA code
        self.register_buffer("codebook", torch.randn(size, dim))  # (K, D), until k-means
        self.register_buffer("cluster_size", torch.zeros(size))  # (K,) EMA of assignment counts
        self.register_buffer("embed_sum", torch.zeros(size, dim))  # (K, D) EMA of assigned sums
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("replaced", torch.zeros((), dtype=torch.long), persistent=False)
        self.checked = False  # `initialized` has been read once (reading it syncs with a GPU)

    def nearest(self, z):  # z (N, D) -> codes (N,)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 is the same for every entry
        return (self.codebook.pow(2).sum(1) - 2 * z @ self.codebook.t()).argmin(dim=1)  # (N,)

    def lookup(self, codes):  # codes (...) -> vectors (..., D)
        return F.embedding(codes, self.codebook)

    def random_rows(self, z):  # (N, D) -> (K, D): rows of z drawn with replacement, same on ranks
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
        self.codebook.copy_(self.random_rows(z))  # our choice: start from random frames
        for _ in range(self.kmeans_iters):  # Lloyd's algorithm, the same on every rank
            codes = self.nearest(z)  # (N,)
            counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,)
            sums = torch.zeros_like(self.codebook).index_add_(0, codes, z)  # (K, D)
            mean = sums / counts.clamp(min=1)[:, None]
            self.codebook.copy_(torch.where(counts[:, None] > 0, mean, self.codebook))
        # our choice: every entry starts as a replaced one does (below), as `threshold` assignments
        # of itself, so an entry that the next batches stop choosing is replaced at once. Counted
        # from the batch (~5 per entry in the tiny preset) it would linger for ~90 steps of decay
        # while the young encoder's latent moves (z_rms 0.06 -> 0.25 in the first 50 steps of the
        # tiny run, 4410 entries replaced meanwhile: benchmarks/results/soundstream_tiny_log.txt).
        self.cluster_size.fill_(self.threshold)
        self.embed_sum.copy_(self.codebook * self.threshold)
        if is_distributed():  # rank 0's result everywhere (CUDA's index_add_ is not deterministic)
            for b in (self.codebook, self.cluster_size, self.embed_sum):
                dist.broadcast(b, src=0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z, codes):  # z (N, D), codes (N,)
        counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)  # (K, D)
        if is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # never 0
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        # dead codes: the same decision on every rank (cluster_size is all-reduced). Written with
        # torch.where, not `if dead.any()`, which would wait for the GPU once per quantizer.
        dead = (self.cluster_size < self.threshold)[:, None]  # (K, 1)
        new = self.random_rows(z)  # (K, D) candidates from the batch
        self.codebook.copy_(torch.where(dead, new, self.codebook))
        # our choice: a new entry counts as `threshold` assignments of itself, so it is replaced
        # again unless at least `threshold` frames choose it (0.99 * 2 + 0.01 n >= 2)
        self.cluster_size.copy_(torch.where(dead[:, 0], self.threshold, self.cluster_size))
        self.embed_sum.copy_(torch.where(dead, new * self.threshold, self.embed_sum))
        self.replaced += dead.sum()

    def forward(self, z):  # z (N, D) -> codes (N,), quantized (N, D)
        if self.training and not self.checked:
            if not self.initialized:
                self.kmeans_init(z)
            self.checked = True
        codes = self.nearest(z)
        quantized = self.lookup(codes)
        if self.training:
            self.ema_update(z, codes)
        return codes, quantized


class ResidualVectorQuantizer(nn.Module):
    """Algorithm 1: y_hat = sum_i Q_i(r_i), r_1 = z, r_{i+1} = r_i - Q_i(r_i).

    Quantizer dropout (§III-C): in training each example draws n_q ~ U{1..N_q}; its decoder input
    and commitment term use Q_1..Q_{n_q} only. DEVIATION 5: every quantizer still runs, and
    updates its codebook, on every frame. r_i does not depend on later quantizers, so the decoder
    gets the same z_q either way, while Q_24 would otherwise see 1/24 of the frames and the
    "count below 2" rule would discard most of its entries at every step."""

    def __init__(self, cfg):
        super().__init__()
        self.dropout = cfg.quantizer_dropout
        self.layers = nn.ModuleList(
            VectorQuantizer(cfg.latent_dim, cfg.codebook_size, cfg.ema_decay,
                            cfg.dead_code_threshold, cfg.kmeans_iters)
            for _ in range(cfg.num_quantizers))

    def forward(self, z, n_q=None):
        """z (B, D, L) -> z_q (B, D, L) (straight-through), codes (B, Q, L), commitment loss.
        n_q: None (training: dropout; else all), an int, or a (B,) tensor of per-example counts."""
        B, D, L = z.shape
        N_q = len(self.layers)
        if torch.is_tensor(n_q):
            n_q_b, run = n_q.to(z.device), N_q  # given per example (the tests use this)
        elif n_q is None and self.training and self.dropout:
            n_q_b, run = torch.randint(1, N_q + 1, (B,), device=z.device), N_q  # (B,)
        else:
            run = n_q or N_q
            n_q_b = torch.full((B,), run, device=z.device)  # (B,)
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA in float32
            residual = z.float().transpose(1, 2).reshape(B * L, D)  # (N, D)
            z_q = torch.zeros_like(residual)
            codes, commit = [], residual.new_zeros(())
            for i, vq in enumerate(self.layers[:run]):
                active = (n_q_b > i).float().repeat_interleave(L)[:, None]  # (N, 1): uses Q_i
                code, q = vq(residual)  # (N,), (N, D); DEVIATION 5: on every frame
                z_q = z_q + active * q
                # DEVIATION 4: beta ||r_i - sg(Q_i(r_i))||^2, summed over D, averaged over the
                # frames whose example uses Q_i, summed over i (not a mean over D and over the
                # quantizers, 24 * 128 times smaller): our choice, to give it a say at all.
                sq = (residual - q).pow(2).sum(1, keepdim=True)  # (N, 1)
                commit = commit + (sq * active).sum() / active.sum().clamp(min=1)
                # Detach q, not r_i: every r_i keeps its gradient path to the encoder, so every
                # quantizer's commitment term reaches it (cf. EnCodec issue #25, where it does not).
                residual = residual - q.detach()
                codes.append(code.view(B, L))
            z_q = z_q.view(B, L, D).transpose(1, 2)  # (B, D, L)
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        return z_q, torch.stack(codes, dim=1), commit  # codes (B, Q, L)

    def decode(self, codes):  # codes (B, Q, L) -> z_q (B, D, L)
        z_q = sum(vq.lookup(codes[:, i]) for i, vq in enumerate(self.layers[:codes.shape[1]]))
        return z_q.transpose(1, 2)  # (B, L, D) -> (B, D, L)

# -------------------------------------------------------------------------------------------------
# The codec


class SoundStream(nn.Module):
    """Encoder -> (FiLM) -> residual vector quantizer -> (FiLM) -> decoder (§III, Fig. 2).

    The codec interface of every codec file: sample_rate, channels, frame_rate, num_codebooks,
    codebook_size, encode(wav) -> codes (B, Q, L), decode(codes) -> wav (B, 1, L*M), forward for
    training, save/load. Inputs of any length are right-padded to a multiple of M; decode returns
    L*M samples (trim to the input's length, as `reconstruct` does)."""

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.film = FiLM(cfg.latent_dim) if cfg.film != "none" else None
        # Our choice (no DC): the last bias is set so that silence decodes to silence. PyTorch's
        # default biases (kept: zero biases learnt worse in the tiny demo, README) give the
        # untrained output a DC of +0.3..+0.5, which the mel loss hardly sees (the DC bin has
        # weight 0 in every mel filterbank); the DC of an untrained model hardly depends on its
        # input, so this removes it for speech too (tested).
        with torch.no_grad():
            silence = self.decoder(self.encoder(torch.zeros(1, 1, 16 * self.hop_length)))
            self.decoder[-1].bias -= silence[..., -self.hop_length:].mean()  # past the start

    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: 1)  # "a single channel recording" (§III)
    hop_length = property(lambda self: math.prod(self.cfg.strides))  # M
    frame_rate = property(lambda self: self.cfg.sample_rate / self.hop_length)  # 75 Hz (paper)
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bitrate(self, n_q=None):
        """Bits per second with n_q quantizers: frame_rate * n_q * log2(K) (§III-C)."""
        return self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size)

    def n_q_for_bitrate(self, kbps):
        step = self.bitrate(1) / 1000
        n_q = round(kbps / step)
        if not 1 <= n_q <= self.num_codebooks or abs(n_q * step - kbps) > 1e-6:
            raise ValueError(f"this model codes {step:g} to {self.num_codebooks * step:g} kbps in "
                             f"steps of {step:g} ({self.num_codebooks} quantizers); got {kbps:g}")
        return n_q

    def check_wav(self, wav, sample_rate=None):
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"SoundStream expects {self.sample_rate} Hz audio, got "
                             f"{sample_rate} Hz; resample first (common.audio.resample)")
        if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 3:
            raise ValueError(f"SoundStream expects a float tensor (batch, 1, samples), got "
                             f"{type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
        if wav.shape[1] != 1:
            raise ValueError(f"SoundStream is mono (§III); got {wav.shape[1]} channels: mix down "
                             f"first, e.g. wav.mean(dim=1, keepdim=True)")
        if wav.shape[-1] == 0:
            raise ValueError("SoundStream got an empty signal (0 samples)")
        if not torch.isfinite(wav).all():
            raise ValueError("SoundStream got NaN or Inf samples")

    def denoise_mode(self, denoise, B, device):
        """The denoising mode as a (B,) or (B, L) bool tensor; None for a model without FiLM."""
        if self.film is None:
            if denoise is not None and torch.as_tensor(denoise).any():
                raise ValueError("this model has no denoising mode (trained with film='none')")
            return None
        if isinstance(denoise, bool) or denoise is None:
            return torch.full((B,), bool(denoise), device=device)
        return denoise.to(device)

    def encode_latent(self, wav, denoise):  # wav (B, 1, T) -> z (B, D, L)
        wav = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))  # (B, 1, L*M)
        z = self.encoder(wav)  # (B, D, L)
        return self.film(z, denoise) if self.cfg.film == "encoder" else z  # §V-E "encoder side"

    def decode_latent(self, z_q, denoise):  # z_q (B, D, L) -> (B, 1, L*M)
        if self.cfg.film == "decoder":
            z_q = self.film(z_q, denoise)
        return self.decoder(z_q)

    def forward(self, wav, denoise=None, n_q=None):
        """Training pass: wav (B, 1, T) -> x_hat (B, 1, T), codes (B, N_q, L), and a dict with
        the commitment loss and the latent's RMS (a diagnostic)."""
        self.check_wav(wav)
        denoise = self.denoise_mode(denoise, wav.shape[0], wav.device)
        z = self.encode_latent(wav, denoise)
        z_q, codes, commit = self.quantizer(z, n_q)
        x_hat = self.decode_latent(z_q, denoise)[..., :wav.shape[-1]]
        return x_hat, codes, {"commit": commit, "latent_rms": z.detach().pow(2).mean().sqrt()}

    @torch.no_grad()
    def encode(self, wav, n_q=None, denoise=False, sample_rate=None):
        """wav (B, 1, T) -> codes (B, n_q, ceil(T / M)) int64; n_q defaults to all."""
        self.check_wav(wav, sample_rate)
        if n_q is not None and not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in 1..{self.num_codebooks}, got {n_q}")
        if self.encoder[0].streaming and wav.shape[-1] % self.hop_length:
            raise ValueError(f"streaming chunks must be multiples of {self.hop_length} samples, "
                             f"got {wav.shape[-1]}")
        was_training = self.training
        self.eval()  # never update codebooks while encoding
        z = self.encode_latent(wav, self.denoise_mode(denoise, wav.shape[0], wav.device))
        codes = self.quantizer(z, n_q)[1]
        self.train(was_training)
        return codes

    @torch.no_grad()
    def decode(self, codes, denoise=False):
        """codes (B, Q, L), 1 <= Q <= N_q, ids in [0, K) -> wav (B, 1, L * M)."""
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
        z_q = self.quantizer.decode(codes.long())
        return self.decode_latent(z_q, self.denoise_mode(denoise, codes.shape[0], codes.device))

    @contextlib.contextmanager
    def streaming(self):
        """Inside this block encode/decode calls continue one stream: every causal conv keeps its
        left context between calls (§III-A). Chunks must be multiples of M samples (encode) or
        whole frames (decode); outputs equal the offline call on the concatenated input."""
        convs = [m for m in self.modules() if isinstance(m, (CausalConv1d, CausalConvTranspose1d))]
        for m in convs:
            m.streaming, m.state = True, None
        try:
            yield self
        finally:
            for m in convs:
                m.streaming, m.state = False, None

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

# -------------------------------------------------------------------------------------------------
# Discriminators (§III-D)


class WaveDiscriminator(nn.Module):
    """One scale of the wave-based discriminator: MelGAN's block [15] that §III-D reuses. A plain
    conv, four grouped convs (groups of 4, stride 4, channels x4 up to 1024), two plain convs.
    Kernels 15/41/5/3, reflection padding, LeakyReLU(0.2) and weight norm: MelGAN (App. A)."""

    def __init__(self, channels=16, max_channels=1024):
        super().__init__()
        convs = [nn.Sequential(nn.ReflectionPad1d(7), weight_norm(nn.Conv1d(1, channels, 15)))]
        c = channels
        for _ in range(4):
            c_out = min(c * 4, max_channels)
            convs.append(weight_norm(nn.Conv1d(c, c_out, 41, stride=4, padding=20, groups=c // 4)))
            c = c_out
        convs.append(weight_norm(nn.Conv1d(c, c, 5, padding=2)))
        self.convs = nn.ModuleList(convs)
        self.out = weight_norm(nn.Conv1d(c, 1, 3, padding=1))

    def forward(self, x):  # (B, 1, T) -> logits (B, T_k), features [(B, C_l, T_kl)] x 6
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.out(x).squeeze(1), features


class ResidualUnit2d(nn.Module):
    """Fig. 4 residual block: conv 3x3 to N channels, then conv (s_t+2)x(s_f+2) with stride
    (s_t, s_f) to m*N. The shortcut is a strided 1x1 conv (our choice: the skip changes shape)."""

    def __init__(self, in_ch, N, m, stride):
        super().__init__()
        s_t, s_f = stride
        self.conv1 = weight_norm(nn.Conv2d(in_ch, N, 3, padding=1))
        self.conv2 = weight_norm(nn.Conv2d(N, m * N, (s_t + 2, s_f + 2), stride=stride, padding=1))
        self.skip = weight_norm(nn.Conv2d(in_ch, m * N, 1, stride=stride))

    def forward(self, x):  # (B, in_ch, t, f) -> (B, m*N, ~t/s_t, f/s_f)
        y = self.conv2(F.leaky_relu(self.conv1(x), 0.2))
        s = self.skip(x)
        return y + s[..., :y.shape[-2], :y.shape[-1]]  # the 1x1 path rounds odd lengths up


class STFTDiscriminator(nn.Module):
    """§III-D, Fig. 4: the complex STFT (W = 1024, H = 256) as real and imaginary channels, a 7x7
    conv to 32 channels, six residual blocks with strides alternating (1, 2) and (2, 2), and a
    1 x F/2^6 conv to one logit per (down-sampled) frame. F = W/2 bins: the Nyquist bin is
    dropped. LeakyReLU 0.2, weight norm, Hann window, centred frames: our choices."""

    def __init__(self, channels=32, window=1024, hop=256):
        super().__init__()
        self.window, self.hop = window, hop
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        C = channels
        self.conv_in = weight_norm(nn.Conv2d(2, C, 7, padding=3))
        spec = [(C, 2, (1, 2)), (2 * C, 2, (2, 2)), (4 * C, 1, (1, 2)),  # (N, m, stride), Fig. 4
                (4 * C, 2, (2, 2)), (8 * C, 1, (1, 2)), (8 * C, 2, (2, 2))]
        blocks, in_ch = [], C
        for N, m, s in spec:
            blocks.append(ResidualUnit2d(in_ch, N, m, s))
            in_ch = m * N
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = weight_norm(nn.Conv2d(in_ch, 1, (1, window // 2 // 2 ** 6)))  # 1 x F/2^6

    def forward(self, x):  # (B, 1, T) -> logits (B, frames/8), features [(B, C_l, t_l, f_l)] x 7
        spec = torch.stft(x.squeeze(1).float(), self.window, self.hop, window=self.hann,
                          return_complex=True)  # (B, W/2 + 1, frames)
        spec = torch.view_as_real(spec[:, :-1]).permute(0, 3, 2, 1)  # (B, 2, frames, W/2)
        # .contiguous(): torch 2.13's CPU conv2d backward corrupts the heap on this channels-last
        # view ("free(): invalid next size", found here)
        x = F.leaky_relu(self.conv_in(spec.contiguous()), 0.2)
        features = [x]
        for block in self.blocks:
            x = F.leaky_relu(block(x), 0.2)
            features.append(x)
        return self.conv_out(x).squeeze(3).squeeze(1), features


class Discriminators(nn.Module):
    """k = 0: the STFT discriminator; k = 1..3: the wave discriminator at the original rate and
    down-sampled 2x and 4x by average pooling, as MelGAN (§III-D)."""

    def __init__(self, run):
        super().__init__()
        self.stft = STFTDiscriminator(run.stft_disc_channels, run.stft_window, run.stft_hop)
        self.waves = nn.ModuleList(WaveDiscriminator(run.wave_disc_channels,
                                                     run.wave_disc_max_channels) for _ in range(3))
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)  # MelGAN's 2x

    def forward(self, x):  # (B, 1, T) -> [(logits (B, T_k), [features])] for k = 0..3
        outputs = [self.stft(x)]
        for i, d in enumerate(self.waves):
            outputs.append(d(x))
            if i < len(self.waves) - 1:
                x = self.pool(x)  # (B, 1, T / 2), then T / 4
        return outputs

# -------------------------------------------------------------------------------------------------
# Losses (§III-E)


def discriminator_loss(real, fake):
    """Eq. 1: hinge loss, averaged over time and over the discriminators (DEVIATION 2)."""
    per_disc = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake)]
    return sum(per_disc) / len(per_disc)


def adversarial_loss(fake):
    """Eq. 2: max(0, 1 - D_k(G(x))), averaged over time and over the discriminators."""
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)


def feature_loss(real, fake):
    """Eq. 3: mean |D_k^l(x) - D_k^l(G(x))| over every internal layer l (not the logits),
    averaged over each discriminator's own layers, then over the discriminators (DEVIATION 2)."""
    per_disc = [sum((fr.detach() - ff).abs().mean() for fr, ff in zip(r, f)) / len(r)
                for (_, r), (_, f) in zip(real, fake)]
    return sum(per_disc) / len(per_disc)


class ReconstructionLoss(nn.Module):
    """Eqs. 4-5 as written: for each scale s, S^s is a 64-band mel spectrogram (window s, hop
    s/4) of the STFT magnitude; the term is ||S_x - S_y||_1 + alpha_s ||log S_x - log S_y||_2
    over the bands of each frame, alpha_s = sqrt(s/2) (Gritsenko et al. [48]), summed over the
    scales. Frames (and the batch) are averaged, not summed: a sum would tie the loss to the
    crop length. HTK mel scale with peak-1 triangles, Hann window and the log floor 1e-5 are our
    choices. Filterbanks and windows are buffers. Always float32, also under AMP (half precision
    cannot hold the 1e-5 floor)."""

    def __init__(self, sample_rate, scales, n_mels):
        super().__init__()
        self.scales = tuple(scales)
        for s in self.scales:
            fb = mel_filterbank(sample_rate, s, n_mels, htk=True, norm=None)  # (64, s/2 + 1)
            self.register_buffer(f"fb{s}", fb, persistent=False)
            self.register_buffer(f"win{s}", torch.hann_window(s), persistent=False)

    def mel(self, x, s):  # x (B, T) -> S^s (B, 64, frames)
        window = getattr(self, f"win{s}")
        spec = torch.stft(x, s, s // 4, window=window, return_complex=True).abs()  # (B, s/2+1, fr)
        return getattr(self, f"fb{s}") @ spec

    def forward(self, x, x_hat):  # (B, 1, T) each -> scalar
        with torch.autocast(x.device.type, enabled=False):
            x, x_hat = x.squeeze(1).float(), x_hat.squeeze(1).float()  # (B, T)
            loss = 0.0
            for s in self.scales:
                # at s = 64 (33 bins) many bands are empty: 0 for both signals, they add 0
                S_x, S_y = self.mel(x, s), self.mel(x_hat, s)  # (B, 64, frames) each
                log_diff = S_x.clamp(min=1e-5).log() - S_y.clamp(min=1e-5).log()
                l1 = (S_x - S_y).abs().sum(dim=1)  # (B, frames): Eq. 4's L1 over the bands
                l2 = (log_diff.pow(2).sum(dim=1) + 1e-12).sqrt()  # (B, frames); DEVIATION 3
                loss = loss + (l1 + math.sqrt(s / 2) * l2).mean()  # Eq. 5's alpha_s
        return loss


def balance(grads, ratios):
    """DEVIATION 1: the adversarial and feature terms' weights are set each step so that their
    gradients at x_hat are fixed fractions of the reconstruction term's. grads: {"rec", "adv",
    "feat": (B, 1, T) gradient at x_hat}; ratios: {"adv", "feat": fraction}. Returns the gradient
    to send into the generator, g_rec + sum_k ratio_k * |g_rec| / |g_k| * g_k, and the norms
    (per example, averaged over the batch, as EnCodec's balancer; over every rank under DDP).
    It is the idea of EnCodec's balancer (Defossez et al. 2022, §3.4: fix each term's share of
    the gradient, not its loss weight), anchored on the reconstruction term as VQGAN's adaptive
    weight is (Esser et al. 2021, Eq. 7), and without EnCodec's EMA of the norms: in the first
    steps the norms change by orders of magnitude (|g_adv| ~300x in 30 steps), an EMA that
    remembers them skews the shares for hundreds of steps, and the tiny demo learnt much worse
    with EnCodec's balancer (decay 0.999 or 0.9; README, "How the objective was chosen")."""
    names = list(grads)
    norms = torch.stack([grads[k].flatten(1).norm(dim=1).mean() for k in names])
    if is_distributed():  # every rank weighs with the norms of the global batch
        dist.all_reduce(norms)
        norms = norms / dist.get_world_size()
    norms = dict(zip(names, norms))
    out = grads["rec"] + sum(ratios[k] * norms["rec"] / (norms[k] + 1e-12) * grads[k]
                             for k in ratios)
    return out, norms


# -------------------------------------------------------------------------------------------------
# Noise for joint compression and enhancement (§III-F, §IV-A)


def coloured_noise(length, generator):
    """Our stand-in for Freesound noise when no --noise_dir is given: Gaussian noise (1, T) with a
    random spectral slope between -6 dB/octave (brown) and +3 dB/octave (blue)."""
    spec = torch.fft.rfft(torch.randn(1, length, generator=generator))  # (1, T/2 + 1)
    octave = torch.arange(spec.shape[-1], dtype=torch.float32).clamp(min=1).log2()  # of the bin
    slope = torch.empty(()).uniform_(-6, 3, generator=generator)  # dB per octave
    spec = spec * 10 ** (slope * octave / 20)
    spec[..., 0] = 0  # no DC offset
    return torch.fft.irfft(spec, n=length)  # (1, T)


class SpeechAndNoise(torch.utils.data.Dataset):
    """Training crops (1, T) with a noise crop (1, T) each: from the files of `noise_dir`, or
    coloured noise. Like AudioDataset, a pure function of (seed, epoch, index): a resumed run
    sees the same noise. Noise is read here, in the DataLoader's workers."""

    def __init__(self, speech, noise_files):
        self.speech, self.noise_files = speech, noise_files
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.speech.set_epoch(epoch)

    def __len__(self):
        return len(self.speech)

    def __getitem__(self, index):
        clean = self.speech[index]  # (1, T)
        g = self.speech._generator(index)
        g.manual_seed((g.initial_seed() + 1) % 2 ** 63)  # our choice: apart from the crop's stream
        if not self.noise_files:
            return clean, coloured_noise(clean.shape[-1], g)
        path = self.noise_files[int(torch.randint(len(self.noise_files), (), generator=g))]
        noise = load(path, self.speech.sample_rate, 1)[0]  # (1, T_noise)
        return clean, random_crop(noise, clean.shape[-1], g)


def mix_noise(clean, noise, noisy_fraction, generator):
    """(inputs, targets, denoise) of §III-F from clean (B, 1, T) and noise (B, 1, T) crops.
    A share of the examples (our choice) gets noise at a gain uniform in [-30, 0] dB relative to
    the peak-normalised speech (§IV-A); denoise is on for half of them (our choice); targets are
    the clean speech when denoise is on, the input otherwise (§III-F)."""
    B = clean.shape[0]
    clean = peak_normalize(clean)
    gain = 10 ** (torch.empty(B, 1, 1).uniform_(-30, 0, generator=generator) / 20)  # §IV-A
    noisy = (torch.rand(B, 1, 1, generator=generator) < noisy_fraction).float()
    # our reading: the gain is relative to peak-normalised noise (§IV-A normalises the speech)
    inputs = clean + noisy * gain * peak_normalize(noise)
    denoise = torch.rand(B, generator=generator) < 0.5  # our choice: either mode equally often
    targets = torch.where(denoise[:, None, None], clean, inputs)
    # our choice: scale a mixture that exceeds [-1, 1] back into it (targets by the same factor)
    peak = inputs.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    return inputs / peak, targets / peak, denoise

# -------------------------------------------------------------------------------------------------
# Training infrastructure. Generic: no model name inside, so that the other codec files carry
# these blocks as verbatim `# Copied from soundstream.py: ...` copies (tests/test_copies.py).


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


def rng_state():
    """Every RNG a step could touch, as tensors and plain types (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def config_from_dict(cls, d, path="checkpoint"):
    """Rebuild a config dataclass; a field it does not know is named in a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} field(s) {', '.join(unknown)} "
                         f"(written by another version of {Path(__file__).name}?)")
    return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items()})


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


def log_line(step, total, stats, seconds_per_step):
    """One fixed-format line: every number of `stats` (lists are joined with '/')."""
    def fmt(v):
        return "/".join(f"{u:.3g}" for u in v) if isinstance(v, list) else f"{v:.4g}"
    parts = " | ".join(f"{k} {fmt(v)}" for k, v in stats.items())
    return f"step {step}/{total} | {parts} | {seconds_per_step:.2f} s/step"


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


def save_checkpoint(trainer, out):
    """OUT/ckpt.pt (resume) and OUT/model.pt (inference), by rank 0; every rank must call it."""
    state = trainer.state_dict()
    if trainer.rank == 0:
        atomic_save(state, Path(out) / "ckpt.pt")
        trainer.model.save(Path(out) / "model.pt")


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


def bitrate_ladder(num_codebooks):
    """1, 2, 4, ... codebooks, and all of them: the rows of the evaluation table."""
    return sorted({2 ** i for i in range(int(math.log2(num_codebooks)) + 1)} | {num_codebooks})

# -------------------------------------------------------------------------------------------------
# Training: the model-specific part


class Trainer:
    """The generator G, the discriminators D and their optimizers; `step()` is one GAN update."""

    def __init__(self, cfg, run, rank=0, world=1, device="cpu"):
        check_config(cfg, run)
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)  # identical initial weights (and codebooks) on every rank
        self.model = SoundStream(cfg).to(self.device)
        self.disc = Discriminators(run).to(self.device)
        self.rec_loss = ReconstructionLoss(cfg.sample_rate, run.mel_scales, run.mel_bins)
        self.rec_loss.to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=run.lr, betas=tuple(run.betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=run.lr, betas=tuple(run.betas))
        cuda = self.device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.amp_dtype = amp if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.amp == "fp16")
        self.G, self.D = self.model, self.disc
        if world > 1:  # the codebooks are kept identical by the quantizer, not by DDP's broadcast
            ddp = nn.parallel.DistributedDataParallel
            # torch 2.13 renamed broadcast_buffers (a FutureWarning); older releases have only it
            new = "forward_sync_buffers" in inspect.signature(ddp).parameters
            no_sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
            ids = [self.device.index] if cuda else None
            self.G = ddp(self.model, ids, **no_sync)
            self.D = ddp(self.disc, ids, **no_sync)
        if run.compile and cuda:
            self.G = torch.compile(self.G)
        torch.manual_seed(run.seed + rank)  # from here on each rank draws its own dropout
        self.step_count = 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def make_batch(self, batch):
        """(inputs, targets, denoise) on the device. With FiLM: the tuples of §III-F. Without FiLM
        but with noise files: noisy speech is plain training data (§IV-A), inputs = targets. The
        mixing draws from a generator seeded by (seed, step, rank): the same after a resume."""
        if not isinstance(batch, (list, tuple)):
            x = batch.to(self.device)
            return x, x, None
        clean, noise = batch
        # 1_000_003 and 1_009 (primes, our choice) spread (seed, step, rank) over distinct seeds
        g = torch.Generator().manual_seed((self.run.seed * 1_000_003 + self.step_count) * 1_009
                                          + self.rank)
        inputs, targets, denoise = (v.to(self.device) for v in
                                    mix_noise(clean, noise, self.run.noisy_fraction, g))
        return (inputs, targets, denoise) if self.cfg.film != "none" else (inputs, inputs, None)

    def step(self, batch, diagnose=False):
        """One update of D (Eq. 1), then of G (Eq. 6, balanced: DEVIATION 1). Returns the logged
        numbers as floats, with each term's raw gradient norm at x_hat; with `diagnose`, also the
        latent RMS, the output's DC, per-codebook perplexity and the codes replaced since the
        last diagnosis."""
        self.model.train()  # evaluation and samples leave it in eval mode
        lr = self.run.lr * self.run.lr_decay ** self.step_count  # from the step: exact on resume
        for group in self.opt_g.param_groups + self.opt_d.param_groups:
            group["lr"] = lr
        x, target, denoise = self.make_batch(batch)
        with self.autocast():
            x_hat, codes, aux = self.G(x, denoise)
        if self.step_count < self.run.gan_start:
            return self.warmup_step(x_hat, codes, aux, target, diagnose)
        # discriminators: real and fake in one forward (one DDP forward per backward)
        with self.autocast():
            both = self.D(torch.cat([target, x_hat.detach()]))  # 2B examples
            B = len(x)
            real = [(lg[:B], [f[:B] for f in fs]) for lg, fs in both]  # the first B: x
            fake = [(lg[B:], [f[B:] for f in fs]) for lg, fs in both]  # the last B: G(x)
            d_loss = discriminator_loss(real, fake)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.unscale_(self.opt_d)  # clip the true gradient, not the scaled one
        d_norm = nn.utils.clip_grad_norm_(self.disc.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt_d)
        # generator: D is only evaluated here: the bare module (no DDP sync), parameters frozen
        self.disc.requires_grad_(False)
        with self.autocast():
            with torch.no_grad():
                real = self.disc(target)
            fake = self.disc(x_hat)
            losses = {"adv": adversarial_loss(fake), "feat": feature_loss(real, fake),
                      "rec": self.rec_loss(target, x_hat), "commit": aux["commit"]}
        # the balanced gradient at x_hat (DEVIATION 1); under fp16 the loss scale S comes off
        # each term's gradient before the norms, and goes back on for the backward through G
        S = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        grads = {k: torch.autograd.grad(S * losses[k], x_hat, retain_graph=True)[0].float() / S
                 for k in ("rec", "adv", "feat")}
        g_x_hat, norms = balance(grads, {"adv": self.run.ratio_adv, "feat": self.run.ratio_feat})
        # g_x_hat (B, 1, T); then one backward through G from x_hat and the commitment term
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(
            [x_hat, losses["commit"]],
            [S * self.run.lambda_rec * g_x_hat.to(x_hat.dtype),
             S * self.run.commitment_weight * torch.ones_like(losses["commit"])])
        self.scaler.unscale_(self.opt_g)
        stats = {"d": d_loss, **losses}
        stats.update({f"|g_{k}|": v for k, v in norms.items()})  # raw, before balancing
        stats["|G|"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        stats["|D|"] = d_norm
        self.scaler.step(self.opt_g)
        self.disc.requires_grad_(True)
        return self.finish_step(stats, x_hat, codes, aux, diagnose)

    def warmup_step(self, x_hat, codes, aux, target, diagnose):
        """A generator update on the reconstruction and commitment terms only, D untouched: the
        first `gan_start` steps, as Parallel WaveGAN (Yamamoto et al. 2020) fixes D for its
        first 100k steps."""
        with self.autocast():
            rec = self.rec_loss(target, x_hat)
        self.opt_g.zero_grad(set_to_none=True)
        loss = self.run.lambda_rec * rec + self.run.commitment_weight * aux["commit"]
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt_g)
        stats = {"rec": rec, "commit": aux["commit"],
                 "|G|": nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)}
        self.scaler.step(self.opt_g)
        return self.finish_step(stats, x_hat, codes, aux, diagnose)

    def finish_step(self, stats, x_hat, codes, aux, diagnose):
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
        """A reconstruction of the first validation file, as wav and comparison PNG."""
        model = self.model.eval()
        wav, sr = load(self.valid_file, model.sample_rate, 1)
        rec = reconstruct(model, wav.to(self.device)).cpu()
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        save(f"{stem}.wav", rec, sr)
        plot_comparison(f"{stem}.png", wav, rec, sr, title=f"{Path(self.valid_file).name}: "
                        f"original vs SoundStream, {model.bitrate() / 1000:g} kbps")
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
                "scaler": self.scaler.state_dict(), "rng": rngs}

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


def eval_utterances(data, limit=None):
    """Held-out (file, transcript or None) pairs: the test split of the demo corpus or of a
    manifest (its "text" field)."""
    entries = read_manifest(data or demo_manifest(), "test")
    return [(Path(e["path"]), e.get("text")) for e in entries][:limit]


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
    speech = AudioDataset(files, cfg.sample_rate, channels=1, segment=int(run.segment_seconds
                          * cfg.sample_rate), seed=run.seed)
    noise_files = resolve_files(run.noise_dir) if run.noise_dir else None
    use_noise = cfg.film != "none" or noise_files
    dataset = SpeechAndNoise(speech, noise_files) if use_noise else speech
    held_out = eval_utterances(run.data, run.eval_utterances) if is_manifest else None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        m = trainer.model
        n_g = sum(p.numel() for p in m.parameters()) / 1e6
        n_d = sum(p.numel() for p in trainer.disc.parameters()) / 1e6
        how = f"resumed at step {trainer.step_count}" if start else "new run"
        print(f"SoundStream {how}: "
              f"{n_g:.2f}M generator + {n_d:.2f}M discriminator parameters, {m.frame_rate:g} Hz, "
              f"{m.bitrate(1) / 1000:g}..{m.bitrate() / 1000:g} kbps, {len(files)} training files, "
              f"{world} process(es) on {device}"
              + (f", {threads} CPU thread(s){why}" if threads else ""), flush=True)
        if not start and held_out:  # the untrained model, to compare with the final table
            evaluate(m, held_out, [cfg.num_quantizers], "untrained model (step 0)",
                     evaluation.parse_metrics(run.metrics))
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
            evaluate(trainer.model, held_out, bitrate_ladder(cfg.num_quantizers),
                     f"step {trainer.step_count}", evaluation.parse_metrics(run.metrics))
        elif held_out is None:  # a folder (eval_utterances 0: no table)
            print(f"note: {run.data} is a folder, which has no held-out split; evaluate on another "
                  f"folder with --eval --data DIR")
        print(f"saved {out / 'model.pt'} (inference) and {out / 'ckpt.pt'} (resume)")
    if world > 1:
        dist.destroy_process_group()
    return history

# -------------------------------------------------------------------------------------------------
# Inference helpers and the command line


def reconstruct(model, wav, n_q=None, denoise=False):
    """wav (1, T) or (B, 1, T) -> the reconstruction, same shape."""
    x = wav if wav.dim() == 3 else wav[None]
    y = model.decode(model.encode(x, n_q, denoise), denoise)[..., :x.shape[-1]]
    return y if wav.dim() == 3 else y[0]


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
    p = Parser(description="SoundStream (Zeghidour et al. 2021): train, encode, decode, evaluate.",
               allow_abbrev=False)  # --bitrat must not silently mean --bitrate
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train (DDP when launched by torchrun)")
    act.add_argument("--encode", metavar="WAV", help="audio file -> codes .npz")
    act.add_argument("--decode", metavar="NPZ", help="codes .npz -> audio file")
    act.add_argument("--reconstruct", metavar="WAV", help="encode + decode; prints metrics")
    act.add_argument("--eval", action="store_true", help="metrics table over held-out files")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="default: paper")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--ckpt", help="model.pt (or ckpt.pt) for encode/decode/reconstruct/eval")
    p.add_argument("--n_q", type=int, help="quantizers to use (default: all)")
    p.add_argument("--bitrate", type=float, help="kbps, sets n_q: 0.25..2 in steps of 0.25 for "
                   "tiny; 0.75..18 in steps of 0.75 for paper (§V: 3, 6, 12, 18)")
    p.add_argument("--denoise", action="store_true", help="denoising on (models trained with film)")
    p.add_argument("--streaming", action="store_true", help="reconstruct frame by frame")
    for cls in (Config, TrainConfig):  # every config field is a flag, typed from its default
        group = p.add_argument_group(f"{cls.__name__} fields ({cls.__doc__.split('.')[0].lower()})")
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            values = {name: getattr(c if cls is Config else r, f.name)
                      for name, (c, r) in PRESETS.items()}
            shown = ", ".join(f"{n}: {v}" for n, v in values.items() if n in ("paper", "tiny"))
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


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# run settings a resumed run may change; everything else is fixed by its checkpoint
RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "eval_utterances",
                    "metrics", "num_workers", "threads")


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
    if not args.ckpt:
        raise ValueError("--ckpt is required (e.g. runs/soundstream/model.pt)")
    model = SoundStream.load(args.ckpt)
    n_q = model.n_q_for_bitrate(args.bitrate) if args.bitrate is not None else args.n_q
    if n_q is not None and not 1 <= n_q <= model.num_codebooks:
        raise ValueError(f"n_q must be in 1..{model.num_codebooks}, got {n_q}")
    metrics = evaluation.check_available(evaluation.parse_metrics(args.metrics))
    if args.eval:
        n_qs = [n_q] if n_q else bitrate_ladder(model.num_codebooks)
        if args.data and not args.data.endswith(".jsonl"):  # a user's folder: all of its files
            files = [(f, None) for f in resolve_files(args.data)[:args.eval_utterances]]
            evaluate(model, files, n_qs, args.ckpt, metrics, f"files of {args.data}", notice=True)
        else:
            evaluate(model, eval_utterances(args.data, args.eval_utterances), n_qs, args.ckpt,
                     metrics)
        return
    if not args.out:
        raise ValueError("--out is required")
    if args.encode:
        wav, sr = load(args.encode, model.sample_rate, 1, notice=True)
        codes = model.encode(wav[None], n_q, args.denoise)[0]  # (Q, L)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if model.codebook_size <= 2 ** 15 else np.int32  # holds every id
        np.savez(args.out, codes=codes.numpy().astype(dtype), sample_rate=sr, model=NAME,
                 num_samples=wav.shape[-1], codebook_size=model.codebook_size,
                 frame_rate=model.frame_rate)
        print(f"{args.encode}: {codes.shape[0]} codebooks x {codes.shape[1]} frames "
              f"({model.bitrate(codes.shape[0]) / 1000:g} kbps) -> {args.out}")
    elif args.decode:
        codes, num_samples = read_codes(args.decode, model)
        wav = model.decode(codes[None], args.denoise)[0, :, :num_samples]  # (1, T)
        save(args.out, wav, model.sample_rate)
        print(f"{args.decode} -> {args.out} ({num_samples / model.sample_rate:.2f} s)")
    else:  # --reconstruct
        wav, sr = load(args.reconstruct, model.sample_rate, 1, notice=True)
        if args.streaming:  # one frame (M samples) at a time, as a real-time link would
            M = model.hop_length
            x = F.pad(wav[None], (0, -wav.shape[-1] % M))  # (1, 1, L*M)
            with model.streaming():
                chunks = [model.decode(model.encode(x[..., i:i + M], n_q, args.denoise),
                                       args.denoise) for i in range(0, x.shape[-1], M)]
            rec = torch.cat(chunks, dim=-1)[0, :, :wav.shape[-1]]  # (1, T)
        else:
            rec = reconstruct(model, wav, n_q, args.denoise)
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


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
