"""
SoundStream: An End-to-End Neural Audio Codec, in one file.

Zeghidour, Luebs, Omran, Skoglund, Tagliasacchi. IEEE/ACM TASLP 30, 2022 (arXiv 2021). https://arxiv.org/abs/2107.03312
No official code was released, so this file is written against the paper (arXiv v1) alone. Reimplementations
read for contrast only: lucidrains/audiolm-pytorch (soundstream.py, v2.4.0) and wesbz/SoundStream.

Paper -> code
  §III-A encoder, Fig. 3 ............ Encoder, EncoderBlock, ResidualUnit, CausalConv1d
  §III-B decoder, Fig. 3 ............ Decoder, DecoderBlock, CausalConvTranspose1d
  §III-C RVQ, Algorithm 1 ........... VectorQuantizer (EMA, k-means init, dead codes), ResidualVectorQuantizer
  §III-C quantizer dropout .......... ResidualVectorQuantizer.forward (n_q ~ U{1..N_q} per example)
  §III-D discriminators, Fig. 4 ..... WaveDiscriminator (MelGAN [15]), STFTDiscriminator
  §III-E Eqs. 1-6 ................... discriminator_loss, adversarial_loss, feature_loss, reconstruction_loss
  §III-F Eq. 7 (FiLM), §IV-A noise .. FiLM, mix_noise
  streaming (§I, §III-A, §V-D) ...... SoundStream.streaming()

Shapes: B batch, T samples (audio is mono: (B, 1, T)), F frames (T / M), M hop = prod(strides), D latent dim,
Q codebooks in use, N_q all codebooks, K codebook size (the paper's N). C is the paper's channel width (C_enc,
C_dec), and Fig. 3/4 write N for a block's channel count; in the quantizer, N counts the rows of the flattened
(B*F, D) frames. `F` in code is torch.nn.functional.

DEVIATIONS from the paper (each is also tagged `# DEVIATION` where it happens)
  1. Eqs. 4-5 sum the spectral distances over frames; we average over frames, so that the reconstruction loss
     does not grow with the crop length while the adversarial and feature losses (Eqs. 2-3) are time averages.
     This also reweights the scales (the sum gives each scale a weight proportional to its number of frames,
     32 times more for s = 64 than for s = 2048) and makes the term smaller against lambda_feat * L_feat by the
     number of frames; with the paper's (unknown) crop length its balance cannot be reproduced anyway.
  2. Eqs. 1-3 write 1/K (and 1/(KL)) with k = 0..K: K + 1 = 4 discriminators, whose layer counts L differ (7 for
     the STFT discriminator, 6 for the wave ones). We average over the four, as the text says ("averaged over
     multiple discriminators"), and over each one's own layers in Eq. 3 - a constant factor of 3/4 in Eqs. 1-2.
  3. The sqrt in the L2 term (Eq. 5) gets an epsilon of 1e-12: a silent frame gives a zero difference and
     sqrt'(0) is infinite.
  4. A VQ-VAE commitment loss (weight 0.25, VQ-VAE [31]) trains the encoder towards its codes; Eq. 6 has none.
     The codebooks themselves are learnt by EMA, as the paper says, but nothing else in Eq. 6 keeps the encoder's
     output close to them.
  5. Quantizer dropout masks which quantizers each example decodes with (and its commitment loss); every
     quantizer still runs, and updates its codebook, on every frame. The paper: "only use quantizers Q_i for
     i = 1..n_q". Otherwise the deepest codebook would see 1/N_q of the frames and the dead-code rule would
     replace most of its entries at every step (ResidualVectorQuantizer says more).

Where the paper is silent we say "our choice" next to the number. The biggest ones: D = 128; the optimizer
(Adam 3e-4, betas 0.5/0.9, as EnCodec); where the ELUs sit; activations and weight norm in the discriminators;
the noise mixing details; the tiny preset. The paper's optimizer, batch, crop length and number of steps are not
given (§IV describes data and evaluation only).

Parameter count: Table I gives 8.4 M for C_enc = C_dec = 32. The layers §III-A/B and Fig. 3 describe have
9,183,233 weights before the two D-dependent convolutions (+5,121 per latent dimension: 9.84 M at D = 128), so
no choice of D reproduces 8.4 M; with C = 16 the same count is 2,297,857 + 2,561 D (2.63 M at D = 128, Table I:
2.4 M), and the asymmetric rows of Table I are off by as much (C_enc/C_dec = 16/32: 6.30 M here, 5.5 M there;
32/16: 6.17 M, 5.3 M). The paper must count differently or simplify Fig. 3. We follow the text.

Commands
  python soundstream.py --train --preset tiny                          # demo corpus, CPU, < 10 min
  python soundstream.py --train --preset paper --data /data/LibriTTS   # one GPU
  torchrun --standalone --nproc_per_node=8 soundstream.py --train --preset paper --data /data/LibriTTS
  python soundstream.py --train --resume --out runs/soundstream        # continue exactly where it stopped
  python soundstream.py --reconstruct in.wav --ckpt runs/soundstream/model.pt --out out.wav --bitrate 6
  python soundstream.py --encode in.wav --ckpt runs/soundstream/model.pt --out codes.npz --n_q 8
  python soundstream.py --decode codes.npz --ckpt runs/soundstream/model.pt --out out.wav
  python soundstream.py --eval --ckpt runs/soundstream/model.pt [--data DIR]
"""

import argparse
import contextlib
import dataclasses
import math
import os
import random
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
from common.data import AudioDataset, resolve_files
from common.metrics import codebook_stats, mel_distance, mel_filterbank, pesq, plot_comparison, stoi

# -----------------------------------------------------------------------------------------------------------------
# Configuration and presets


@dataclass
class Config:
    # audio and architecture (§III-A, §III-B)
    sample_rate: int = 24000              # f_s = 24 kHz for all training data (§IV-A)
    enc_channels: int = 32                # C_enc = 32, the default model of Table I
    dec_channels: int = 32                # C_dec = 32 (Table I)
    strides: tuple[int, ...] = (2, 4, 5, 8)  # B_enc = 4 blocks, M = 2*4*5*8 = 320 samples (§III-A): 75 frames per
                                          # second at 24 kHz (§III-C)
    latent_dim: int = 128                 # D: not given in the paper; our choice: 128, as EnCodec (Defossez et
                                          # al. 2022), the SoundStream-style codec whose D is published
    # residual vector quantizer (§III-C)
    num_quantizers: int = 24              # N_q: not stated; derived: the scalable model is "trained at 18 kbps"
                                          # (§V-C, Fig. 7) = 75 Hz x 10 bits x 24, with N = 1024 as in §III-C
    codebook_size: int = 1024             # N = 1024 = 2^10 entries, 10 bits per quantizer (§III-C)
    quantizer_dropout: bool = True        # n_q ~ U{1..N_q} per training example (§III-C)
    ema_decay: float = 0.99               # §III-C: the EMA of each entry's assignments decays at 0.99. The codebook
                                          # EMA "following VQ-VAE-2 [32]" has no decay given; our choice: the same
                                          # 0.99 (VQ-VAE [31] App. A.1), one EMA serving both
    dead_code_threshold: float = 2.0      # replace entries whose EMA assignment count falls below 2 (§III-C, a rule
                                          # "proposed in [34]", Jukebox)
    kmeans_iters: int = 10                # k-means on the first batch (§III-C); iterations: our choice
    commitment_weight: float = 0.25       # DEVIATION 4: not in Eq. 6; the VQ-VAE [31] commitment term, beta 0.25
    # joint compression and enhancement (§III-F)
    film: str = "none"                    # "encoder" or "decoder": FiLM at that side of the bottleneck (§V-E)
    noise_dir: str = ""                   # folder of noise to mix in (§IV-A used Freesound); "" = synthetic coloured
                                          # noise with FiLM, no noise without it
    noisy_fraction: float = 0.5           # our choice: share of training examples that get noise
    # discriminators (§III-D)
    wave_disc_channels: int = 16          # first conv of the MelGAN discriminator [15], which §III-D reuses
    wave_disc_max_channels: int = 1024    # "channel multiplier of 4 up to a maximum of 1024" (§III-D)
    stft_disc_channels: int = 32          # 32 channels after the 7x7 conv (§III-D, Fig. 4)
    stft_window: int = 1024               # W = 1024 (§III-D)
    stft_hop: int = 256                   # H = 256 (§III-D)
    # losses (§III-E)
    lambda_adv: float = 1.0               # lambda_adv = 1 (§III-E)
    lambda_feat: float = 100.0            # lambda_feat = 100 (§III-E)
    lambda_rec: float = 1.0               # lambda_rec = 1 (§III-E)
    mel_bins: int = 64                    # 64-bin mel spectrograms (§III-E)
    mel_scales: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)  # s in 2^6..2^11, hop s/4 (Eq. 4)
    # training: the paper gives none of these; our choices
    data: str = ""                        # folder or .jsonl manifest; "" = the demo corpus shipped in data/demo
    out: str = "runs/soundstream"         # checkpoints, log, samples
    steps: int = 1_000_000                # our choice
    batch_size: int = 32                  # global batch (split over DDP ranks); our choice
    segment_seconds: float = 3.0          # training crops of 3 s: the crop §IV-A uses to mix noise into speech
    lr: float = 3e-4                      # Adam, lr 3e-4, betas (0.5, 0.9): our choice, EnCodec's training recipe
    betas: tuple[float, ...] = (0.5, 0.9)  # (see lr)
    log_every: int = 100
    sample_every: int = 5000              # write a reconstruction wav + spectrogram PNG
    ckpt_every: int = 5000
    eval_utterances: int = 20             # held-out utterances for the final metrics table
    num_workers: int = 4
    seed: int = 0
    amp: str = "none"                     # "bf16" / "fp16" on CUDA; ignored on CPU
    compile: bool = False                 # torch.compile the generator (CUDA)


PRESETS = {
    "paper": Config(),
    # The acoustic tokenizer of AudioLM (Borsos et al., TASLP 2023): 16 kHz, strides (2, 4, 5, 8) -> 50 Hz,
    # 12 quantizers x 1024 entries = 6 kbps. AudioLM gives nothing else about its SoundStream: every other field
    # (C = 32, D = 128, discriminators and losses tuned at 24 kHz) is the paper preset's (our choice).
    "audiolm": Config(sample_rate=16000, num_quantizers=12),
    # CPU demo on the 16 kHz demo corpus, under 10 minutes on 2 cores (README): 500 steps, since a step took 0.47 s
    # on one 2-core build machine (Intel Xeon) and 0.88 s on another (AMD EPYC). Our choices: narrow nets, short
    # crops, a higher learning rate; K = 32 so that a batch (8 x 0.4 s x 50 Hz = 160 frames) assigns ~5 frames
    # per code, above the dead-code threshold of 2 (with K = 1024 almost every code would be "dead" every step).
    "tiny": Config(sample_rate=16000, enc_channels=8, dec_channels=8, latent_dim=32, num_quantizers=8,
                   codebook_size=32, wave_disc_channels=4, wave_disc_max_channels=64, stft_disc_channels=4,
                   stft_window=512, stft_hop=128, steps=500, batch_size=8, segment_seconds=0.4, lr=1e-3,
                   log_every=50, sample_every=250, ckpt_every=250, eval_utterances=16, num_workers=0),
}

# -----------------------------------------------------------------------------------------------------------------
# Building blocks: causal convolutions that can also run chunk by chunk


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the past only (§III-A: "padding is only applied to the past but not the future").

    Offline, the input is left-padded with P = (k - 1) * d + 1 - s zeros. In streaming mode the last P input
    samples of the previous chunk take the place of those zeros, so chunked and offline outputs are identical
    whenever chunk lengths are multiples of the stride.
    """

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
    """Transposed conv whose output at time t only depends on inputs up to t ("both the encoder and the decoder
    only use causal convolutions", §I).

    With kernel k = 2s and stride s, L input frames give L*s + (k - s) samples; the last k - s are incomplete
    (they still await the next frame's contribution), so they are dropped offline and carried to the next chunk
    in streaming mode.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride)
        self.trim = kernel_size - stride
        self.streaming, self.state = False, None

    def forward(self, x):  # (B, C_in, L) -> (B, C_out, L * s)
        y = F.conv_transpose1d(x, self.weight, None, self.stride)  # (B, C_out, L*s + trim), bias added last
        if self.streaming:
            if self.state is not None:  # add the tail the previous chunk left unfinished
                y = torch.cat([y[..., :self.trim] + self.state, y[..., self.trim:]], dim=-1)
            self.state = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim] + self.bias[:, None]


class ResidualUnit(nn.Module):
    """Fig. 3 residual unit: conv k=7 with dilation d, then conv k=1, plus the identity. ELU activations (§III-A);
    their placement before each conv (pre-activation, as in SEANet [45]) is our choice: Fig. 3 does not show it."""

    def __init__(self, channels, dilation):
        super().__init__()
        self.block = nn.Sequential(nn.ELU(), CausalConv1d(channels, channels, 7, dilation=dilation),
                                   nn.ELU(), CausalConv1d(channels, channels, 1))

    def forward(self, x):  # (B, N, L) -> (B, N, L)
        return x + self.block(x)


class EncoderBlock(nn.Sequential):
    """Fig. 3 EncBlock(N, S): residual units at N/2 channels with dilations 1, 3, 9 (§III-A), then a strided conv
    with kernel 2S that doubles the channels to N. The ELU before the strided conv is our choice."""

    def __init__(self, out_ch, stride):
        super().__init__(ResidualUnit(out_ch // 2, 1), ResidualUnit(out_ch // 2, 3), ResidualUnit(out_ch // 2, 9),
                         nn.ELU(), CausalConv1d(out_ch // 2, out_ch, 2 * stride, stride=stride))


class DecoderBlock(nn.Sequential):
    """Fig. 3 DecBlock(N, S): a transposed conv (kernel 2S, stride S) that halves the channels to N, then the same
    three residual units (§III-B). The ELU before the transposed conv is our choice."""

    def __init__(self, out_ch, stride):
        super().__init__(nn.ELU(), CausalConvTranspose1d(2 * out_ch, out_ch, 2 * stride, stride),
                         ResidualUnit(out_ch, 1), ResidualUnit(out_ch, 3), ResidualUnit(out_ch, 9))


class Encoder(nn.Sequential):
    """§III-A, Fig. 3: conv k=7 to C, B_enc blocks doubling the channels, (ELU, our choice) conv k=3 to D.
    "We do not apply any normalization" (§III-A)."""

    def __init__(self, cfg):
        C = cfg.enc_channels
        blocks = [EncoderBlock(C * 2 ** (i + 1), s) for i, s in enumerate(cfg.strides)]  # 2C, 4C, 8C, 16C
        super().__init__(CausalConv1d(1, C, 7), *blocks,
                         nn.ELU(), CausalConv1d(C * 2 ** len(cfg.strides), cfg.latent_dim, 3))


class Decoder(nn.Sequential):
    """§III-B, Fig. 3: conv k=7 to 16C, blocks with the strides reversed halving the channels, (ELU, our choice)
    conv k=7 to one channel. There is no output nonlinearity in the paper, and none here."""

    def __init__(self, cfg):
        C, n = cfg.dec_channels, len(cfg.strides)
        blocks = [DecoderBlock(C * 2 ** (n - 1 - i), s) for i, s in enumerate(reversed(cfg.strides))]  # 8C..C
        super().__init__(CausalConv1d(cfg.latent_dim, C * 2 ** n, 7), *blocks, nn.ELU(), CausalConv1d(C, 1, 7))


class FiLM(nn.Module):
    """Eq. 7: a~_{n,c} = gamma_{n,c} a_{n,c} + beta_{n,c}, with gamma and beta from a linear layer on a (possibly
    time-varying) two-dimensional one-hot of the denoising mode (§III-F)."""

    def __init__(self, channels):
        super().__init__()
        self.linear = nn.Linear(2, 2 * channels)
        # our choice: start as the identity (gamma = 1, beta = 0), so FiLM does nothing until it is trained
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias[:channels], 1.0)
        nn.init.zeros_(self.linear.bias[channels:])

    def forward(self, a, denoise):  # a (B, D, F), denoise (B,) or (B, F) bool -> (B, D, F)
        if denoise.dim() == 1:
            denoise = denoise[:, None].expand(-1, a.shape[-1])  # (B, F): one mode for the whole example
        gamma, beta = self.linear(F.one_hot(denoise.long(), 2).to(a.dtype)).chunk(2, dim=-1)  # (B, F, D) each
        return gamma.transpose(1, 2) * a + beta.transpose(1, 2)


# -----------------------------------------------------------------------------------------------------------------
# Residual vector quantizer (§III-C, Algorithm 1)


def _is_distributed():
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """One codebook Q_i of Algorithm 1, learnt without gradients (§III-C):
    - EMA updates of the codebook as in VQ-VAE-2 [32] (VQ-VAE [31] App. A.1): counts and sums of the vectors
      assigned to each entry are smoothed over batches and the entry is their ratio;
    - k-means on the first training batch instead of a random initialization;
    - an entry whose EMA assignment count falls below 2 is replaced by a random input vector of the batch, "as
      proposed in [34]" (Jukebox, Dhariwal et al. 2020).
    Under DDP the counts and sums are all-reduced and every random choice is made on rank 0 and broadcast, so
    the codebooks stay identical on every rank."""

    def __init__(self, dim, size, decay, threshold, kmeans_iters):
        super().__init__()
        self.size, self.decay, self.threshold, self.kmeans_iters = size, decay, threshold, kmeans_iters
        self.eps = 1e-5  # Laplace smoothing of the counts, as the VQ-VAE-2 reference EMA code (Sonnet) does
        # random until k-means on the first training batch replaces them (§III-C); an untrained model's latents
        # are far from these entries, so its codes carry almost nothing
        self.register_buffer("codebook", torch.randn(size, dim))       # (K, D)
        self.register_buffer("cluster_size", torch.zeros(size))        # (K,) EMA of assignment counts
        self.register_buffer("embed_sum", torch.zeros(size, dim))      # (K, D) EMA of assigned vector sums
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z):  # z (N, D) -> codes (N,)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term is the same for every entry
        dist_ = -2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)  # (N, K)
        return dist_.argmin(dim=1)

    def lookup(self, codes):  # codes (...) -> vectors (..., D)
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def kmeans_init(self, z):  # z (N, D): this process's frames of the first batch
        if _is_distributed():  # "the first training batch" is the union of every rank's share (equal shares)
            parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, z)
            z = torch.cat(parts)  # (world * N, D)
        if not _is_distributed() or dist.get_rank() == 0:
            # our choice: start from random frames of the batch (drawn with replacement, in case N < K)
            self.codebook.copy_(z[torch.randint(len(z), (self.size,), device=z.device)])  # (K, D)
            for _ in range(self.kmeans_iters):  # Lloyd's algorithm
                codes = self.nearest(z)  # (N,)
                counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,)
                sums = torch.zeros_like(self.codebook).index_add_(0, codes, z)  # (K, D)
                self.codebook.copy_(torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None],
                                                self.codebook))  # an empty cluster keeps its centroid
            # our choice: the EMA statistics start from the final clustering, counted over the whole batch like the
            # updates (the paper does not say how they start)
            self.cluster_size.copy_(torch.bincount(self.nearest(z), minlength=self.size).to(z.dtype))
            self.embed_sum.copy_(self.codebook * self.cluster_size[:, None])
        if _is_distributed():  # rank 0's result everywhere
            for b in (self.codebook, self.cluster_size, self.embed_sum):
                dist.broadcast(b, src=0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, z, codes):  # z (N, D), codes (N,)
        counts = torch.bincount(codes, minlength=self.size).to(z.dtype)  # (K,) frames assigned to each entry
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)  # (K, D) and their sum
        if _is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # never zero
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        # dead codes: the same decision on every rank, because cluster_size is all-reduced
        dead = self.cluster_size < self.threshold  # (K,)
        if dead.any():
            new = z[torch.randint(len(z), (self.size,), device=z.device)]  # (K, D) candidates from the batch
            if _is_distributed():
                dist.broadcast(new, src=0)
            self.codebook[dead] = new[dead]
            # our choice: restart the statistics consistently: the entry counts as `threshold` assignments of
            # itself; it is replaced again at the next step unless at least `threshold` inputs choose it
            # (0.99 * 2 + 0.01 n >= 2)
            self.cluster_size[dead] = self.threshold
            self.embed_sum[dead] = new[dead] * self.threshold

    def forward(self, z):  # z (N, D) -> codes (N,), quantized (N, D)
        if self.training and not self.initialized:
            self.kmeans_init(z)
        codes = self.nearest(z)
        quantized = self.lookup(codes)
        if self.training:
            self.ema_update(z, codes)
        return codes, quantized


class ResidualVectorQuantizer(nn.Module):
    """Algorithm 1: y_hat = sum_i Q_i(residual_i), residual_{i+1} = residual_i - Q_i(residual_i).

    Quantizer dropout (§III-C): during training each example uses its own n_q ~ U{1..N_q}: its decoder input and
    its commitment loss use Q_1..Q_{n_q} only. DEVIATION 5: every quantizer still runs, and updates its codebook,
    on every frame (the paper: "only use quantizers Q_i for i = 1..n_q"). The residual seen by Q_i does not
    depend on later quantizers, so the decoder receives the same z_q either way, while each codebook keeps
    receiving all frames: with per-example dropout, Q_24 would see 1/24 of them and the "count below 2" rule
    would discard most of its entries at every step."""

    def __init__(self, cfg):
        super().__init__()
        self.dropout = cfg.quantizer_dropout
        self.layers = nn.ModuleList(
            VectorQuantizer(cfg.latent_dim, cfg.codebook_size, cfg.ema_decay, cfg.dead_code_threshold,
                            cfg.kmeans_iters) for _ in range(cfg.num_quantizers))

    def forward(self, z, n_q=None):
        """z (B, D, F) -> z_q (B, D, F) with straight-through gradients, codes (B, Q, F), commitment loss."""
        B, D, Fr = z.shape
        N_q = len(self.layers)
        if self.training and self.dropout:
            n_q_b = torch.randint(1, N_q + 1, (B,), device=z.device)  # (B,) quantizer dropout
            run = N_q
        else:
            run = n_q or N_q
            n_q_b = torch.full((B,), run, device=z.device)
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA statistics in float32
            residual = z.float().transpose(1, 2).reshape(B * Fr, D)  # (N, D), N = B*F
            z_q = torch.zeros_like(residual)
            codes, commit = [], []
            for i, vq in enumerate(self.layers[:run]):
                active = (n_q_b > i).float().repeat_interleave(Fr)[:, None]  # (N, 1): 1 where Q_i is used
                code, q = vq(residual)  # (N,), (N, D)  DEVIATION 5: on every frame
                z_q = z_q + active * q
                if self.training and active.any():  # DEVIATION 4: the VQ-VAE commitment loss
                    # ||r_i - sg(Q_i(r_i))||^2, averaged over the frames whose example uses Q_i
                    commit.append(((residual - q).pow(2) * active).sum() / (active.sum() * D))
                # Detaching q (not the residual) keeps the gradient path to the encoder for every r_i, so each
                # quantizer's commitment loss reaches the encoder (cf. EnCodec issue #25, where it does not).
                residual = residual - q.detach()
                codes.append(code.view(B, Fr))
            z_q = z_q.view(B, Fr, D).transpose(1, 2)  # (B, D, F)
        z_q = z + (z_q - z).detach()  # straight-through estimator: the decoder's gradient goes to the encoder
        codes = torch.stack(codes, dim=1)  # (B, Q, F)
        commit = torch.stack(commit).mean() if commit else z.new_zeros(())  # mean over the quantizers in use
        return z_q, codes, commit

    def decode(self, codes):  # codes (B, Q, F) -> z_q (B, D, F)
        z_q = sum(vq.lookup(codes[:, i]) for i, vq in enumerate(self.layers[:codes.shape[1]]))  # (B, F, D)
        return z_q.transpose(1, 2)


# -----------------------------------------------------------------------------------------------------------------
# The codec


class SoundStream(nn.Module):
    """Encoder -> (FiLM) -> residual vector quantizer -> (FiLM) -> decoder (§III, Fig. 2).

    The codec interface shared by every codec file: sample_rate, channels, frame_rate, num_codebooks,
    codebook_size, encode(wav) -> codes (B, Q, F), decode(codes) -> wav (B, 1, F*M), forward for training,
    save/load. Inputs of any length are right-padded with zeros to a multiple of M = prod(strides); decode
    returns F*M samples (trim to the original length yourself, as `reconstruct` does)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.film not in ("none", "encoder", "decoder"):
            raise ValueError(f"film must be 'none', 'encoder' or 'decoder', got {cfg.film!r}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.film = FiLM(cfg.latent_dim) if cfg.film != "none" else None

    # the codec interface
    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: 1)                                  # "a single channel recording" (§III)
    hop_length = property(lambda self: math.prod(self.cfg.strides))      # M
    frame_rate = property(lambda self: self.cfg.sample_rate / self.hop_length)  # 75 Hz for the paper preset
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bitrate(self, n_q=None):
        """Bits per second with n_q quantizers: frame_rate * n_q * log2(K) (§III-C: 75 * 8 * 10 = 6 kbps)."""
        return self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size)

    def n_q_for_bitrate(self, kbps):
        n_q = int(round(kbps * 1000 / self.bitrate(1)))
        if not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"{kbps} kbps needs {n_q} quantizers; this model has 1..{self.num_codebooks} "
                             f"({self.bitrate(1) / 1000:g}..{self.bitrate() / 1000:g} kbps)")
        return n_q

    def _check_wav(self, wav, sample_rate):
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"SoundStream expects {self.sample_rate} Hz audio, got {sample_rate} Hz; resample "
                             f"first (common.audio.resample(wav, {sample_rate}, {self.sample_rate}))")
        if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 3:
            raise ValueError(f"SoundStream expects a float tensor (batch, 1, samples), got "
                             f"{type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
        if wav.shape[1] != 1:
            raise ValueError(f"SoundStream is mono (§III: 'a single channel recording'); got {wav.shape[1]} channels "
                             f"- mix down first, e.g. wav.mean(dim=1, keepdim=True)")
        if wav.shape[-1] == 0:
            raise ValueError("SoundStream got an empty signal (0 samples)")
        if not torch.isfinite(wav).all():
            raise ValueError("SoundStream got NaN or Inf samples")

    def _denoise(self, denoise, B, device):
        """The denoising mode as (B,) or (B, F) bool, from a bool or a tensor; None for a model without FiLM."""
        if self.film is None:
            if denoise is not None and torch.as_tensor(denoise).any():
                raise ValueError("this model has no denoising mode (trained with film='none')")
            return None
        if isinstance(denoise, bool) or denoise is None:
            return torch.full((B,), bool(denoise), device=device)
        return denoise.to(device)

    def _encode_latent(self, wav, denoise):  # wav (B, 1, T) -> z (B, D, F)
        wav = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))  # (B, 1, F*M)
        z = self.encoder(wav)  # (B, D, F)
        if self.cfg.film == "encoder":
            z = self.film(z, denoise)  # denoise before quantization (§V-E "encoder side")
        return z

    def _decode_latent(self, z_q, denoise):  # z_q (B, D, F) -> (B, 1, F*M)
        if self.cfg.film == "decoder":
            z_q = self.film(z_q, denoise)
        return self.decoder(z_q)

    def forward(self, wav, denoise=None, sample_rate=None):
        """Training pass. wav (B, 1, T) -> x_hat (B, 1, T), codes (B, N_q, F), {"commit": loss}."""
        self._check_wav(wav, sample_rate)
        denoise = self._denoise(denoise, wav.shape[0], wav.device)
        z = self._encode_latent(wav, denoise)
        z_q, codes, commit = self.quantizer(z)
        x_hat = self._decode_latent(z_q, denoise)[..., :wav.shape[-1]]
        return x_hat, codes, {"commit": commit}

    @torch.no_grad()
    def encode(self, wav, n_q=None, denoise=False, sample_rate=None):
        """wav (B, 1, T) at self.sample_rate -> codes (B, n_q, ceil(T / M)) int64. n_q defaults to all."""
        self._check_wav(wav, sample_rate)
        if n_q is not None and not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in 1..{self.num_codebooks}, got {n_q}")
        if self.encoder[0].streaming and wav.shape[-1] % self.hop_length:
            raise ValueError(f"streaming chunks must be multiples of {self.hop_length} samples, "
                             f"got {wav.shape[-1]}")
        was_training = self.training
        self.eval()  # never update codebooks while encoding
        z = self._encode_latent(wav, self._denoise(denoise, wav.shape[0], wav.device))
        _, codes, _ = self.quantizer(z, n_q)
        self.train(was_training)
        return codes

    @torch.no_grad()
    def decode(self, codes, denoise=False):
        """codes (B, Q, F) with 1 <= Q <= N_q and ids in [0, K) -> wav (B, 1, F * M)."""
        if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dim() != 3:
            raise ValueError(f"codes must be an integer tensor (batch, codebooks, frames), got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; this model has 1..{self.num_codebooks}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"code ids must be in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        z_q = self.quantizer.decode(codes.long())
        return self._decode_latent(z_q, self._denoise(denoise, codes.shape[0], codes.device))

    @contextlib.contextmanager
    def streaming(self):
        """Inside this block, encode/decode calls continue one stream: every causal conv keeps its left context
        between calls (§III-A: "no padding is used in streaming inference"). Chunks must be multiples of M
        samples (encode) or whole frames (decode); outputs equal the offline call on the concatenated input.
        Every call of the model's convolutions inside the block (model.encoder(x) too) continues that stream:
        run offline calls outside it."""
        convs = [m for m in self.modules() if isinstance(m, (CausalConv1d, CausalConvTranspose1d))]
        for m in convs:
            m.streaming, m.state = True, None
        try:
            yield self
        finally:
            for m in convs:
                m.streaming, m.state = False, None

    def save(self, path):
        """Inference checkpoint: config + weights (+ codebook buffers)."""
        _atomic_save({"model": "soundstream", "config": dataclasses.asdict(self.cfg),
                      "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        ckpt = _load_checkpoint(path, map_location)
        key = "state_dict" if "state_dict" in ckpt else "generator"  # model.pt or a training ckpt.pt
        model = cls(config_from_dict(ckpt["config"]))
        model.load_state_dict(ckpt[key])
        return model.eval()


def _atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def _load_checkpoint(path, map_location="cpu"):
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)  # a checkpoint is data, not code
    except Exception as e:  # torch's own message (many lines, advice to set weights_only=False) would mislead
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read ({type(e).__name__}); "
                         f"expected the model.pt or ckpt.pt that --train writes") from None
    if not isinstance(ckpt, dict) or ckpt.get("model") != "soundstream":
        kind = ckpt.get("model", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is a {kind!r} checkpoint, not a SoundStream one")
    return ckpt


def config_from_dict(d):
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return Config(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in d.items()})


# -----------------------------------------------------------------------------------------------------------------
# Discriminators (§III-D)


class WaveDiscriminator(nn.Module):
    """One scale of the wave-based discriminator: the MelGAN discriminator block [15] that §III-D reuses: an
    initial plain conv, four grouped convs (group size 4, stride 4, channels x4 up to 1024), two plain convs.
    Kernel sizes 15/41/5/3, reflection padding, LeakyReLU(0.2) and weight norm come from MelGAN (App. A)."""

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

    def forward(self, x):  # (B, 1, T) -> logits (B, T_k), features [(B, C_l, T_kl)]
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.out(x).squeeze(1), features


class ResidualUnit2d(nn.Module):
    """Fig. 4 residual block: conv 3x3 to N channels, then conv (s_t+2)x(s_f+2) with stride (s_t, s_f) to m*N.
    The shortcut is a strided 1x1 conv (our choice: Fig. 4's skip must change shape too)."""

    def __init__(self, in_ch, N, m, stride):
        super().__init__()
        s_t, s_f = stride
        self.conv1 = weight_norm(nn.Conv2d(in_ch, N, 3, padding=1))
        self.conv2 = weight_norm(nn.Conv2d(N, m * N, (s_t + 2, s_f + 2), stride=stride, padding=1))
        self.skip = weight_norm(nn.Conv2d(in_ch, m * N, 1, stride=stride))

    def forward(self, x):  # (B, in_ch, t, f) -> (B, m*N, ~t/s_t, f/s_f)
        y = self.conv2(F.leaky_relu(self.conv1(x), 0.2))
        s = self.skip(x)
        return y + s[..., :y.shape[-2], :y.shape[-1]]  # the 1x1 path rounds odd lengths up: crop to match


class STFTDiscriminator(nn.Module):
    """§III-D, Fig. 4: complex STFT (W = 1024, H = 256) as real and imaginary channels, a 7x7 conv to 32
    channels, six residual blocks alternating strides (1, 2) and (2, 2), and a 1 x F/2^6 conv that aggregates
    the frequency axis into one logit per (down-sampled) frame. The paper's F = W/2 bins: we drop the Nyquist
    bin. Activations (LeakyReLU 0.2, as the wave discriminator), weight norm, the Hann window and centred frames
    (torch.stft's default padding) are our choices."""

    def __init__(self, channels=32, window=1024, hop=256):
        super().__init__()
        self.window, self.hop = window, hop
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        C = channels
        self.conv_in = weight_norm(nn.Conv2d(2, C, 7, padding=3))
        spec = [(C, 2, (1, 2)), (2 * C, 2, (2, 2)), (4 * C, 1, (1, 2)),  # (N, m, (s_t, s_f)) of Fig. 4
                (4 * C, 2, (2, 2)), (8 * C, 1, (1, 2)), (8 * C, 2, (2, 2))]
        blocks, in_ch = [], C
        for N, m, s in spec:
            blocks.append(ResidualUnit2d(in_ch, N, m, s))
            in_ch = m * N
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = weight_norm(nn.Conv2d(in_ch, 1, (1, window // 2 // 2 ** 6)))  # 1 x F/2^6

    def forward(self, x):  # (B, 1, T) -> logits (B, T/(H*8)), features [(B, C_l, t_l, f_l)]
        spec = torch.stft(x.squeeze(1).float(), self.window, self.hop, window=self.hann,
                          return_complex=True)  # (B, W/2 + 1, frames)
        spec = torch.view_as_real(spec[:, :-1]).permute(0, 3, 2, 1)  # (B, 2, frames, W/2): real|imag, time, freq
        # .contiguous(): the permuted view has channels-last strides, and torch 2.13's CPU conv2d backward in that
        # memory format corrupts the heap on these blocks (found here: "free(): invalid next size")
        spec = spec.contiguous()
        x = F.leaky_relu(self.conv_in(spec), 0.2)
        features = [x]
        for block in self.blocks:
            x = F.leaky_relu(block(x), 0.2)
            features.append(x)
        return self.conv_out(x).squeeze(3).squeeze(1), features  # (B, frames / 8)


class Discriminators(nn.Module):
    """k = 0: the STFT discriminator; k = 1..3: the wave discriminator at the original rate and down-sampled 2x and
    4x (§III-D). Down-sampling by average pooling, as in MelGAN. One forward returns every (logits, features)."""

    def __init__(self, cfg):
        super().__init__()
        self.stft = STFTDiscriminator(cfg.stft_disc_channels, cfg.stft_window, cfg.stft_hop)
        self.waves = nn.ModuleList(WaveDiscriminator(cfg.wave_disc_channels, cfg.wave_disc_max_channels)
                                   for _ in range(3))
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)  # MelGAN's 2x down-sampling

    def forward(self, x):  # (B, 1, T) -> [(logits (B, T_k), [features])] for k = 0..3
        outputs = [self.stft(x)]
        for i, d in enumerate(self.waves):
            outputs.append(d(x))
            if i < len(self.waves) - 1:
                x = self.pool(x)  # (B, 1, T / 2), then T / 4
        return outputs


# -----------------------------------------------------------------------------------------------------------------
# Losses (§III-E)


def discriminator_loss(real, fake):
    """Eq. 1: hinge loss, averaged over time and over the discriminators."""
    per_disc = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake)]
    return sum(per_disc) / len(per_disc)  # DEVIATION 2: divided by the 4 discriminators, not by K = 3


def adversarial_loss(fake):
    """Eq. 2: the generator's hinge loss max(0, 1 - D(G(x))), averaged over time and discriminators."""
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)  # DEVIATION 2, as in Eq. 1


def feature_loss(real, fake):
    """Eq. 3: mean absolute difference of every internal layer's output for x and G(x) (all layers but the
    logits), averaged over the layers of each discriminator and over the discriminators."""
    per_disc = [sum((fr.detach() - ff).abs().mean() for fr, ff in zip(r, f)) / len(r)  # 1/L_k: 7 or 6 layers
                for (_, r), (_, f) in zip(real, fake)]
    return sum(per_disc) / len(per_disc)  # DEVIATION 2: 1/(K L) read as a mean over layers, then discriminators


def reconstruction_loss(x, x_hat, cfg):
    """Eqs. 4-5: sum over scales s of ||S^s(x) - S^s(x_hat)||_1 + alpha_s ||log S^s(x) - log S^s(x_hat)||_2, with
    S^s a 64-bin mel spectrogram (window s, hop s/4) and alpha_s = sqrt(s/2) (Gritsenko et al. [48]). The norms
    are taken over the mel bins of each frame (DEVIATION 1: frames are averaged, not summed). Mel scale and
    window are our choices (HTK mel scale without area normalization, Hann window, magnitude spectrogram); the
    log uses a floor of 1e-5 (our choice). Always float32, also under AMP: half precision cannot hold 1e-5."""
    with torch.autocast(x.device.type, enabled=False):
        x, x_hat = x.squeeze(1).float(), x_hat.squeeze(1).float()  # (B, T)
        loss = 0.0
        for s in cfg.mel_scales:
            # 64 triangles over s/2 + 1 STFT bins: at s = 64 (33 bins) many mel bands are empty, as the paper's
            # spec implies; they are 0 for both signals and add nothing
            fb = mel_filterbank(cfg.sample_rate, s, cfg.mel_bins, htk=True, norm=None).to(x.device)  # (64, s/2+1)
            window = torch.hann_window(s, device=x.device)
            S_x, S_y = (fb @ torch.stft(v, s, s // 4, window=window, return_complex=True).abs()
                        for v in (x, x_hat))  # (B, 64, frames) each
            l1 = (S_x - S_y).abs().sum(dim=1)  # (B, frames): Eq. 4, ||.||_1 over the mel bins
            log_diff = S_x.clamp(min=1e-5).log() - S_y.clamp(min=1e-5).log()  # (B, 64, frames)
            l2 = (log_diff.pow(2).sum(dim=1) + 1e-12).sqrt()  # (B, frames): Eq. 5; DEVIATION 3: epsilon in the sqrt
            loss = loss + (l1 + math.sqrt(s / 2) * l2).mean()  # DEVIATION 1: mean over frames (and the batch)
    return loss


def loss_weights(cfg):
    """Eq. 6 plus the commitment term, keyed by the names in the training log."""
    return {"adv": cfg.lambda_adv, "feat": cfg.lambda_feat, "rec": cfg.lambda_rec, "commit": cfg.commitment_weight}


# -----------------------------------------------------------------------------------------------------------------
# Noise for joint compression and enhancement (§III-F, §IV-A)


def coloured_noise(shape, generator):
    """Our stand-in for Freesound noise when no --noise_dir is given: Gaussian noise with a random spectral slope
    between -6 dB/octave (brown) and +3 dB/octave (blue), drawn per example."""
    n = torch.randn(shape, generator=generator)  # (B, 1, T)
    spec = torch.fft.rfft(n)  # (B, 1, T/2 + 1)
    f = torch.arange(spec.shape[-1], dtype=torch.float32).clamp(min=1)  # bin index, a proxy for frequency
    slope = torch.empty(shape[0], 1, 1).uniform_(-6, 3, generator=generator)  # dB per octave
    spec = spec * (f.log2() * slope / 20 * math.log(10)).exp()  # amplitude = 10^(slope * log2(f) / 20)
    spec[..., 0] = 0  # no DC offset
    return torch.fft.irfft(spec, n=shape[-1])  # (B, 1, T)


def mix_noise(clean, noise, cfg, generator):
    """Build (inputs, targets, denoise) tuples (§III-F) from a batch of clean crops:
    a share of the examples (cfg.noisy_fraction, our choice) gets noise at a gain uniform in [-30 dB, 0 dB]
    relative to the peak-normalized speech (§IV-A); denoise is on for half of the examples (our choice);
    targets are the clean speech when denoise is on and the input otherwise (§III-F). Clean (B, 1, T) and
    noise (B, 1, T) in; inputs, targets (B, 1, T) and denoise (B,) bool out."""
    B = clean.shape[0]
    clean = peak_normalize(clean)
    gain = 10 ** (torch.empty(B, 1, 1).uniform_(-30, 0, generator=generator) / 20)  # §IV-A
    noisy = (torch.rand(B, 1, 1, generator=generator) < cfg.noisy_fraction).float()
    # our reading: the gain is relative to a peak-normalized noise (§IV-A normalizes the speech, not the noise)
    inputs = clean + noisy * gain * peak_normalize(noise)
    denoise = torch.rand(B, generator=generator) < 0.5  # our choice: either mode equally often
    targets = torch.where(denoise[:, None, None], clean, inputs)
    # our choice: scale a mixture that exceeds [-1, 1] back into it (targets by the same factor)
    peak = inputs.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    return inputs / peak, targets / peak, denoise


# -----------------------------------------------------------------------------------------------------------------
# Training (plain PyTorch; DDP when launched by torchrun)


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # NCCL on GPUs, gloo on CPU
    return rank, world, device


def rng_state():
    """Every RNG a training step could touch, as tensors and plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, gauss], "python": random.getstate()}
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


class Trainer:
    """Holds the generator G, the discriminators D and their optimizers; `step()` is one GAN update."""

    def __init__(self, cfg, rank=0, world=1, device="cpu"):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, torch.device(device)
        torch.manual_seed(cfg.seed)  # identical initial weights (and codebooks) on every rank
        self.model = SoundStream(cfg).to(self.device)
        self.disc = Discriminators(cfg).to(self.device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp == "fp16")
        self.G, self.D = self.model, self.disc
        if world > 1:  # codebook buffers are kept identical by the quantizer itself, not by DDP's broadcast
            ids = [self.device.index] if cuda else None
            self.G = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            self.D = nn.parallel.DistributedDataParallel(self.disc, device_ids=ids, broadcast_buffers=False)
        if cfg.compile and cuda:
            self.G = torch.compile(self.G)
        torch.manual_seed(cfg.seed + rank)  # from here on each rank draws its own quantizer dropout
        self.step_count = 0
        self.noise_files = resolve_files(cfg.noise_dir) if cfg.noise_dir else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def make_batch(self, clean):
        """(inputs, targets, denoise) on the device. With FiLM: the tuples of §III-F. Without FiLM and with a
        --noise_dir: noisy speech is plain training data (§IV-A), inputs = targets. The noise draw uses a generator
        seeded by (seed, rank, step), so the batch is the same after a resume and differs between ranks."""
        if self.cfg.film == "none" and not self.noise_files:
            clean = clean.to(self.device)
            return clean, clean, None
        # 1_000_003 and 1_009 (primes, our choice) spread (seed, step, rank) over distinct generator seeds
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.step_count) * 1_009 + self.rank)
        if self.noise_files:
            noise = torch.stack([random_crop(load(self.noise_files[int(torch.randint(len(self.noise_files), (),
                                 generator=g))], self.cfg.sample_rate, 1)[0], clean.shape[-1], g)
                                 for _ in range(clean.shape[0])])  # (B, 1, T)
        else:
            noise = coloured_noise(clean.shape, g)
        inputs, targets, denoise = (v.to(self.device) for v in mix_noise(clean, noise, self.cfg, g))
        return (inputs, targets, denoise) if self.cfg.film != "none" else (inputs, inputs, None)

    def step(self, clean):
        """One update of D (Eq. 1) then G (Eq. 6). Returns the logged losses as floats."""
        x, target, denoise = self.make_batch(clean)
        w = loss_weights(self.cfg)
        with self.autocast():
            x_hat, _, q_losses = self.G(x, denoise)
        # discriminator: real and fake in one forward (one DDP forward per backward)
        with self.autocast():
            both = self.D(torch.cat([target, x_hat.detach()]))  # 2B examples through every discriminator
            real = [(l[:len(x)], [f[:len(x)] for f in fs]) for l, fs in both]  # the first B: x
            fake = [(l[len(x):], [f[len(x):] for f in fs]) for l, fs in both]  # the last B: G(x)
            d_loss = discriminator_loss(real, fake)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(d_loss).backward()
        self.scaler.step(self.opt_d)
        # generator: D is only evaluated here, so use the bare module (no DDP gradient sync) with its parameters
        # frozen (no gradients computed for them)
        self.disc.requires_grad_(False)
        with self.autocast():
            with torch.no_grad():
                real = self.disc(target)
            fake = self.disc(x_hat)
            losses = {"adv": adversarial_loss(fake), "feat": feature_loss(real, fake),
                      "rec": reconstruction_loss(target, x_hat, self.cfg), "commit": q_losses["commit"]}
            g_loss = sum(w[k] * losses[k] for k in w)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(g_loss).backward()
        self.scaler.step(self.opt_g)
        self.disc.requires_grad_(True)
        self.scaler.update()
        self.step_count += 1
        return {"g": g_loss.item(), "d": d_loss.item(), **{k: v.item() for k, v in losses.items()}}

    def state_dict(self):
        """Everything a bit-exact resume needs. Collective under DDP (every rank must call it): the RNG state of
        each rank is gathered, since each draws its own quantizer dropout."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": "soundstream", "config": dataclasses.asdict(self.cfg), "step": self.step_count,
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
        rngs = ckpt["rng"]
        if len(rngs) != self.world and self.rank == 0:
            print(f"note: the checkpoint was written by {len(rngs)} process(es), this run has {self.world}: "
                  f"training continues, but not bit-exactly")
        set_rng_state(rngs[self.rank % len(rngs)])


def batches_for_epoch(n_items, batch_size, epoch, seed, rank, world):
    """Index batches of one epoch: a seeded permutation split over ranks (what DistributedSampler does), in full
    batches. Deterministic, so a resumed run continues with exactly the batch it would have seen."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = batch_size // world
    n_batches = n_items // (per_rank * world)
    if n_batches == 0:
        raise ValueError(f"{n_items} training files are fewer than one batch of {batch_size}")
    return [perm[(b * world + rank) * per_rank:(b * world + rank + 1) * per_rank] for b in range(n_batches)]


def save_checkpoint(trainer, out):
    """OUT/ckpt.pt (resume) and OUT/model.pt (inference), written by rank 0; every rank must call it."""
    state = trainer.state_dict()
    if trainer.rank == 0:
        _atomic_save(state, Path(out) / "ckpt.pt")
        trainer.model.save(Path(out) / "model.pt")


def log_line(step, total, stats, dt):
    parts = " | ".join(f"{k} {v:.4g}" for k, v in stats.items())
    return f"step {step}/{total} | {parts} | {dt:.2f} s/step"


def train(cfg, resume=False, interrupt_after=None):
    """The whole training run. Returns the list of per-step loss dicts of this process (tests compare them).
    interrupt_after: stop (as if interrupted) after that many steps, saving the checkpoint - for the tests."""
    rank, world, device = setup_distributed()
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    start = _load_checkpoint(ckpt_path) if resume else {}
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    trainer = Trainer(cfg, rank, world, device)
    if start:
        trainer.load_state_dict(start)
    master = rank == 0  # rank 0 alone logs, samples and saves
    files = resolve_files(cfg.data or None, "train")
    segment = int(cfg.segment_seconds * cfg.sample_rate)
    dataset = AudioDataset(files, cfg.sample_rate, channels=1, segment=segment, seed=cfg.seed)
    valid = resolve_files(cfg.data or None, "valid") if not cfg.data or cfg.data.endswith(".jsonl") else files
    if master:
        out.mkdir(parents=True, exist_ok=True)
        n_g = sum(p.numel() for p in trainer.model.parameters())
        n_d = sum(p.numel() for p in trainer.disc.parameters())
        print(f"SoundStream {'resumed at step ' + str(trainer.step_count) if start else 'new run'}: "
              f"{n_g / 1e6:.2f}M generator + {n_d / 1e6:.2f}M discriminator parameters, "
              f"{trainer.model.frame_rate:g} Hz frames, {trainer.model.bitrate(1) / 1000:g}.."
              f"{trainer.model.bitrate() / 1000:g} kbps, {len(files)} training files, {world} process(es) on {device}")
        if not start:  # the untrained model's quality, to compare with the final table
            evaluate(trainer.model, resolve_eval_files(cfg), cfg.eval_utterances, n_qs=[cfg.num_quantizers],
                     title="untrained model (step 0)")
    history = []
    stop = {"now": False}

    def request_stop(signum, frame):  # Ctrl-C or a scheduler's SIGTERM: finish this step, save, leave
        stop["now"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    old_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    per_epoch = len(batches_for_epoch(len(dataset), cfg.batch_size, 0, cfg.seed, rank, world))
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=trainer.step_count, dynamic_ncols=True)
    t0 = time.time()
    try:
        while trainer.step_count < cfg.steps and not stop["now"]:
            epoch, offset = divmod(trainer.step_count, per_epoch)
            dataset.set_epoch(epoch)
            batches = batches_for_epoch(len(dataset), cfg.batch_size, epoch, cfg.seed, rank, world)[offset:]
            # a private generator: creating a DataLoader iterator must not draw from the global RNG, or a resumed
            # run (which creates one mid-epoch) would drift from the uninterrupted one
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                                 generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for clean in loader:
                trainer.model.train()
                stats = trainer.step(clean)
                history.append(stats)
                step = trainer.step_count
                # every rank takes the same decisions, or some would wait forever in the next collective
                leave = stop["now"] or step >= cfg.steps or bool(interrupt_after and len(history) >= interrupt_after)
                flags = torch.tensor([leave, not all(math.isfinite(v) for v in stats.values())],
                                     dtype=torch.float32, device=trainer.device)
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[1]:
                    raise FloatingPointError(f"training diverged: non-finite loss at step {step} ({stats}); the "
                                             f"last checkpoint is {ckpt_path}")
                if progress:
                    progress.update(1)
                if master and (step % cfg.log_every == 0 or step == cfg.steps):
                    line = log_line(step, cfg.steps, stats, (time.time() - t0) / max(1, len(history)))
                    with open(out / "log.txt", "a") as f:
                        f.write(line + "\n")
                    (progress.write if progress else print)(line)
                if master and step % cfg.sample_every == 0:
                    write_sample(trainer.model, valid[0], out / "samples" / f"step{step:07d}", cfg)
                if step % cfg.ckpt_every == 0 or step == cfg.steps or (flags[0] and step < cfg.steps):
                    save_checkpoint(trainer, out)  # interrupted runs keep everything done so far
                if flags[0]:
                    stop["now"] = True
                    break
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if progress:
        progress.close()
    if master and trainer.step_count < cfg.steps:
        print(f"stopped at step {trainer.step_count}; saved {ckpt_path}; continue with: "
              f"python soundstream.py --train --resume --out {cfg.out}")
    elif master:
        write_sample(trainer.model, valid[0], out / "samples" / "final", cfg)
        n_qs = sorted({2 ** i for i in range(int(math.log2(cfg.num_quantizers)) + 1)} | {cfg.num_quantizers})
        evaluate(trainer.model, resolve_eval_files(cfg), cfg.eval_utterances, n_qs, title=f"step {trainer.step_count}")
        print(f"saved {out / 'model.pt'} (inference) and {ckpt_path} (resume)")
    if world > 1:
        dist.destroy_process_group()
    return history


# -----------------------------------------------------------------------------------------------------------------
# Evaluation, samples and the command line


def resolve_eval_files(cfg):
    """Held-out files: the test split of the demo corpus or of a manifest. A folder has no split: its files are
    used as they are (evaluate on a held-out folder with `--eval --data DIR`)."""
    if cfg.data and not cfg.data.endswith(".jsonl"):
        print(f"note: {cfg.data} is a folder, which has no held-out split; the metrics below use its files")
    return resolve_files(cfg.data or None, "test")


def reconstruct(model, wav, n_q=None, denoise=False):
    """wav (1, T) or (B, 1, T) at model.sample_rate -> reconstruction of the same shape."""
    x = wav if wav.dim() == 3 else wav[None]
    y = model.decode(model.encode(x, n_q, denoise), denoise)[..., :x.shape[-1]]
    return y if wav.dim() == 3 else y[0]


def quality(reference, estimate, sample_rate):
    return {"mel": mel_distance(reference, estimate, sample_rate), "pesq": pesq(reference, estimate, sample_rate),
            "stoi": stoi(reference, estimate, sample_rate)}


@torch.no_grad()
def evaluate(model, files, limit, n_qs, title=""):
    """Prints mel distance (lower is better), wide-band PESQ and STOI (higher is better), and the codebook
    entropy bitrate, averaged over up to `limit` files, for each number of quantizers. Returns the rows."""
    model.eval()
    device = next(model.parameters()).device
    wavs = [load(f, model.sample_rate, 1)[0].to(device) for f in files[:limit]]
    rows = []
    print(f"{title}: {len(wavs)} held-out utterances")
    print(f"{'n_q':>4} {'kbps':>6} {'mel':>7} {'PESQ':>6} {'STOI':>6} {'H-kbps':>7}")
    for n_q in n_qs:
        scores, codes = [], []
        for wav in wavs:
            c = model.encode(wav[None], n_q)
            codes.append(c.cpu())
            scores.append(quality(wav.cpu(), model.decode(c)[0, :, :wav.shape[-1]].cpu(), model.sample_rate))
        row = {"n_q": n_q, "kbps": model.bitrate(n_q) / 1000,
               **{k: float(np.nanmean([s[k] for s in scores])) for k in scores[0]},
               "entropy_kbps": codebook_stats(codes, model.codebook_size, model.frame_rate)["bitrate_entropy"] / 1000}
        rows.append(row)
        print(f"{n_q:>4} {row['kbps']:>6.2f} {row['mel']:>7.3f} {row['pesq']:>6.2f} {row['stoi']:>6.3f} "
              f"{row['entropy_kbps']:>7.2f}")
    return rows


def write_sample(model, file, stem, cfg):
    wav, sr = load(file, cfg.sample_rate, 1)
    rec = reconstruct(model.eval(), wav.to(next(model.parameters()).device)).cpu()
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    save(f"{stem}.wav", rec, sr)
    plot_comparison(f"{stem}.png", wav, rec, sr, title=f"{Path(file).name}: original vs SoundStream, "
                                                        f"{model.bitrate() / 1000:g} kbps")


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser():
    p = argparse.ArgumentParser(description="SoundStream (Zeghidour et al. 2021): train, encode, decode, evaluate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train (DDP when launched with torchrun)")
    act.add_argument("--encode", metavar="WAV", help="audio file -> codes .npz")
    act.add_argument("--decode", metavar="NPZ", help="codes .npz -> audio file")
    act.add_argument("--reconstruct", metavar="WAV", help="encode + decode, print metrics")
    act.add_argument("--eval", action="store_true", help="metrics table over held-out files")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--ckpt", help="model.pt (or ckpt.pt) for encode/decode/reconstruct/eval")
    p.add_argument("--n_q", type=int, help="number of quantizers to use (default: all)")
    p.add_argument("--bitrate", type=float, help="target kbps, e.g. 3, 6, 12, 18 (sets n_q)")
    p.add_argument("--denoise", action="store_true", help="denoising mode on (models trained with --film)")
    p.add_argument("--streaming", action="store_true", help="reconstruct frame by frame with carried state")
    for f in dataclasses.fields(Config):  # every config field is a flag, typed from its default
        kind = type(f.default)
        if kind is bool:
            p.add_argument(f"--{f.name}", type=parse_bool, metavar="BOOL")
        elif kind is tuple:
            elem = type(f.default[0])
            p.add_argument(f"--{f.name}", type=lambda s, t=elem: tuple(t(v) for v in s.split(",")), metavar="A,B")
        else:
            p.add_argument(f"--{f.name}", type=kind)
    return p


def config_from_args(args):
    cfg = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **overrides)


RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "eval_utterances", "num_workers")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.train and args.resume:  # the run's own config, plus the schedule flags given on this command line
        out = args.out or PRESETS[args.preset].out
        cfg = config_from_dict(_load_checkpoint(Path(out) / "ckpt.pt")["config"])
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
        fixed = sorted(k for k in given if k not in RESUME_OVERRIDES + ("out",) and given[k] != getattr(cfg, k))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} when resuming; only {', '.join(RESUME_OVERRIDES)}")
        train(dataclasses.replace(cfg, **given), resume=True)
        return
    if args.train:
        train(config_from_args(args))
        return
    if not args.ckpt:
        raise ValueError("--ckpt is required (e.g. runs/soundstream/model.pt)")
    model = SoundStream.load(args.ckpt)
    n_q = model.n_q_for_bitrate(args.bitrate) if args.bitrate is not None else args.n_q
    if args.eval:
        cfg = dataclasses.replace(model.cfg, data=args.data or "")
        files = resolve_files(args.data) if args.data and not args.data.endswith(".jsonl") else resolve_eval_files(cfg)
        n_qs = [n_q] if n_q is not None else sorted({2 ** i for i in range(int(math.log2(model.num_codebooks)) + 1)}
                                        | {model.num_codebooks})
        evaluate(model, files, args.eval_utterances or len(files), n_qs, title=f"{args.ckpt}")
        return
    if not args.out:
        raise ValueError("--out is required")
    if args.encode:
        wav, sr = load(args.encode, model.sample_rate, 1, notice=True)
        codes = model.encode(wav[None], n_q, args.denoise)[0]  # (Q, F)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if model.codebook_size <= 2 ** 15 else np.int32  # the smallest type that holds the ids
        np.savez(args.out, codes=codes.numpy().astype(dtype), sample_rate=sr, num_samples=wav.shape[-1],
                 model="soundstream", codebook_size=model.codebook_size, frame_rate=model.frame_rate)
        print(f"{args.encode}: {codes.shape[0]} codebooks x {codes.shape[1]} frames "
              f"({model.bitrate(codes.shape[0]) / 1000:g} kbps) -> {args.out}")
    elif args.decode:
        if not Path(args.decode).is_file():
            raise FileNotFoundError(f"{args.decode}: file not found")
        try:
            npz = np.load(args.decode, allow_pickle=False)  # a codes file is plain arrays, never pickled objects
        except (OSError, ValueError):
            raise ValueError(f"{args.decode} is not a codes file written by --encode (not a .npz archive)") from None
        try:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not a .npz archive")
            codes, num_samples = torch.from_numpy(npz["codes"].astype(np.int64)), int(npz["num_samples"])
            kind, size = str(npz["model"]), int(npz["codebook_size"])
            rate, frame_rate = int(npz["sample_rate"]), float(npz["frame_rate"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{args.decode} is not a codes file written by --encode ({e})") from None
        if (kind, size, rate, frame_rate) != ("soundstream", model.codebook_size, model.sample_rate, model.frame_rate):
            raise ValueError(f"{args.decode} holds {kind} codes ({size}-entry codebooks, {rate} Hz, {frame_rate:g} "
                             f"frames/s); this checkpoint is a SoundStream with {model.codebook_size}-entry codebooks "
                             f"at {model.sample_rate} Hz, {model.frame_rate:g} frames/s")
        wav = model.decode(codes[None], args.denoise)[0, :, :num_samples]
        save(args.out, wav, model.sample_rate)
        print(f"{args.decode} -> {args.out} ({num_samples / model.sample_rate:.2f} s)")
    else:  # --reconstruct
        wav, sr = load(args.reconstruct, model.sample_rate, 1, notice=True)
        if args.streaming:  # one frame (M samples) at a time, as a real-time sender and receiver would
            M = model.hop_length
            x = F.pad(wav[None], (0, -wav.shape[-1] % M))
            with model.streaming():
                rec = torch.cat([model.decode(model.encode(x[..., i:i + M], n_q, args.denoise), args.denoise)
                                 for i in range(0, x.shape[-1], M)], dim=-1)[0, :, :wav.shape[-1]]
        else:
            rec = reconstruct(model, wav, n_q, args.denoise)
        save(args.out, rec, sr)
        plot_comparison(Path(args.out).with_suffix(".png"), wav, rec, sr, title=Path(args.reconstruct).name)
        q = quality(wav, rec, sr)
        print(f"{args.reconstruct} -> {args.out} at {model.bitrate(n_q) / 1000:g} kbps: mel distance "
              f"{q['mel']:.3f}, PESQ {q['pesq']:.2f}, STOI {q['stoi']:.3f}")


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # a clear message, no traceback
        sys.exit(f"error: {e}")
