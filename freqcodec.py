"""
FreqCodec (FunCodec): a neural speech codec in the STFT domain, with semantic augmentation.

Du, Zhang, Hu, Zheng. "FunCodec: A Fundamental, Reproducible and Integrable Open-source Toolkit
for Neural Speech Codec", ICASSP 2024. arXiv 2309.07405. Official code: alibaba-damo-academy/
FunCodec (snapshot 3435d87, 2024-01), PyPI `funcodec` 0.2.0: funcodec/models/codec_freq.py,
codec_semantic_aug.py, encoder/seanet_encoder.py (SEANetEncoder2d), decoder/seanet_decoder.py,
quantizer/costume_quantizer.py, modules/quantization/ddp_core_vq.py, and the recipe
egs/LibriTTS/codec/conf/freqcodec_mag_phase_16k_n32_600k_step.yaml (our `paper` preset). This
file equals `funcodec` 0.2.0 on identical weights: the official state dict loads strictly, codes
are identical and the audio matches to float rounding for inputs of a multiple of 160 samples
(DEVIATION 7; tests/test_freqcodec.py).

Paper -> code. Sections by title (the reading notes, shared/paper-notes/001, do not number
them): [arch] model architecture, [rvq] semantic-augmented RVQ, [adv] adversarial training with
multiple discriminators, [setup] experimental setup. Marked copies keep their origin's comments,
whose section and DEVIATION numbers are that file's.
  [arch] domain transformation X_mag,pha . FreqCodec.analysis (STFT 512 / 160, log|X|, X/|X|
                                            or angle), FreqCodec.synthesis (inverse STFT)
  [arch] encoder table, decoder mirrored . SConv2d, SConvTranspose2d, ResnetBlock2d, SLSTM,
                                            Encoder, Decoder; grouped convs ("gr"): groups()
  [rvq] RVQ, k-means, EMA, code reset .... Codebook, ResidualVectorQuantizer (copies of
                                            encodec.py), Trainer.draws (quantizer dropout)
  [rvq] f_cat, f_add, f_res .............. Semantic, MFCCUnits (the offline stand-in for
                                            phoneme labels / HuBERT units)
  [adv] discriminators MSD, MPD, MS-STFT . WaveDiscriminator, PeriodDiscriminator,
                                            STFTDiscriminator, Discriminators (any combination)
  [adv] L_f, L_adv, L_feat, L_cm ......... MultiSpectralLoss (L_f), adversarial_loss,
                                            feature_loss, the RVQ's commitment (L_cm),
                                            Trainer.step (the weights 1, 1, 1/9, 100/9, 1)
  [setup] "D only when its loss exceeds
          the codec's" ................... update_discriminator, Trainer.step
  [setup] ViSQOL, token rate ............. evaluate (common/evaluation.py: --metrics visqol)

Shapes: B batch, T samples (mono: (B, 1, T)), N = n_fft / 2 + 1 = 257 frequency bins, L STFT
frames (100 Hz: 1 + T // 160), F codec frames (50 Hz), D latent dim (128), Q codebooks in use,
K codebook size, C channels (the copied RVQ calls the codec frames L). `F` is
torch.nn.functional.

Labelled quirks of the released code, kept because the weights need them (or harmless):
  Q1. SConv2d puts the extra time padding that makes the last window full on the LEFT (before
      the signal), where every 1-D SEANet conv puts it on the right.
  Q2. The decoder's last conv is followed by GroupNorm(1, 3): the three output planes (log-mag,
      Re, Im) are normalised together over (frequency, time) before the affine.
  Q3. The decoded phase is complex(ch1, ch2), not normalised to unit length: the magnitude the
      inverse STFT sees is softplus(ch0) * |ch1 + i ch2|.
  Q4. The multi-spectral loss uses windows 2^5..2^10 (six; the paper writes 5..11), a fixed
      n_fft of 1024 for all of them, log10 of power (not magnitude) spectra, and per scale
      (L1_S + L1_M) / 2 + (L2_S + L2_M) / 2: half of the paper's sum of the four norms.
  Q5. The ||V - RVQ(V)|| term of L_cm (`enc_quant_loss`, the squared MSE) has no gradient in
      the plain codec, with f_cat and with f_res: the straight-through output is V plus a
      constant. With f_add, RVQ(V_a) + V_s - V_a pulls V_s towards 0. Computed and logged, as
      there.

DEVIATIONS from the official code (tagged `# DEVIATION` where they happen; comments inside the
marked copies refer to their origin's numbering)
  1. The RVQ is encodec.py's (a marked copy): the residual keeps its gradient path and a reset
     dead code stays reset (encodec.py's DEVIATIONS 1 and 2). Inference is unchanged.
  2. The commitment term is averaged over the codebooks in use (L_cm's 1/N; the copied RVQ's
     "official" is EnCodec's); FunCodec averages over all 32, counting the dropped ones as
     zeros, so its weight falls to 1/32 at n_q = 1.
  3. Order of the updates: FunCodec's GAN trainer (generator_first false) runs the
     discriminator's turn first, on a second pass of the codec in training mode (so the
     codebooks get two EMA updates per iteration, each with its own dropout draw), and compares
     D's loss with the previous iteration's generator loss (0 at the first one: D is then always
     updated). Here G is updated first and D judges that output, compared with the same step's
     generator loss: one codec pass and one EMA update per step.
  4. The tiny CPU preset trains the reconstruction terms alone (gan_start = steps), as the other
     tiny presets; the discriminators, the rule and the GAN terms run in the tests.
  5. When the rule says "no update", FunCodec multiplies D's loss by 0 and still steps Adam,
     whose momentum keeps moving D. Here D's step is skipped (the paper's words).
  6. With audio_normalize, decoding needs the input's RMS (`scale`); FunCodec's own
     inference_decoding drops it and returns unit-RMS audio. decode() applies it when given.
  7. FreqCodec.pad: the input is padded with zeros to a multiple of 160 samples. FunCodec codes
     the input as it is, and when T // 160 is odd its output lacks the last T mod 160 samples
     (the decoder returns 2 ceil(L / 2) STFT frames for L = 1 + T // 160). So for T a multiple
     of 160 the codes are FunCodec's; for other T they can differ (another input).
  8. Semantic augmentation on FreqCodec is this file's combination: FunCodec's own
     CodecSemanticAug is its time-domain codec. V_s is built as there, and cut to the codec's
     F frames (there: to T // 320, then the last frame repeated).

Released models (HF/ModelScope alibaba-damo/audio_codec-freqcodec_magphase-en-libritts-16k-
{gr8,gr1}nq32ds320-pytorch): their module tree is this one, but their config.yaml could not be
read offline, and no grouping of the in-repo recipe that we tried reproduces their 4.50 M /
0.52 M parameters (presets gr8 / gr1 below: our reading of "gr"). from_official reads every
shape it can from the state dict and names what it could not match.

Commands
  python freqcodec.py --train                          # CPU: the tiny preset on the demo corpus
  python freqcodec.py --train --semantic res --out runs/freqcodec_res   # with f_res
  python freqcodec.py --train --preset paper --data /data/LibriTTS         # one GPU
  torchrun --standalone --nproc_per_node=2 freqcodec.py --train --preset paper --data DIR
  python freqcodec.py --train --resume --out runs/freqcodec        # continue where it stopped
  python freqcodec.py --reconstruct in.wav --ckpt runs/freqcodec/model.pt --out out.wav --n_q 4
  python freqcodec.py --encode in.wav --ckpt runs/freqcodec/model.pt --out codes.npz
  python freqcodec.py --decode codes.npz --ckpt runs/freqcodec/model.pt --out out.wav
  python freqcodec.py --eval --ckpt runs/freqcodec/model.pt [--data DIR]
  python freqcodec.py --reconstruct in.wav --official model.pth --out out.wav   # FunCodec's
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
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from common.audio import AudioError, load, save
from common import evaluation
from common.data import AudioDataset, demo_manifest, read_manifest, resolve_files
from common.metrics import codebook_stats, mel_filterbank, plot_comparison

NAME = "freqcodec"  # the model name in checkpoints and codes files; the generic blocks use it

# -------------------------------------------------------------------------------------------------
# Configuration: the model (saved in model.pt) and the training run (saved in ckpt.pt only)


@dataclass
class Config:
    """What rebuilds the model. Defaults: freqcodec_mag_phase_16k_n32_600k_step.yaml."""
    sample_rate: int = 16000       # 16 kHz LibriTTS ([setup]; target_sample_hz)
    domain: str = "mag_phase"      # [arch]: log|X|, X_r/|X|, X_i/|X|; or mag_angle (codec_domain)
    n_fft: int = 512               # STFT window 512 ([setup]; domain_conf n_fft)
    hop: int = 160                 # and hop 160: 100 frames/s ([setup]; domain_conf hop_length)
    normalize: bool = True         # divide the input by its RMS, keep the scale (audio_normalize)
    n_filters: int = 32            # channels after the first conv, doubled by each stage ([arch])
    ratios: tuple[int, ...] = (4, 1, 4, 1, 4, 2, 4, 1)  # decoder (freq, time) strides, in pairs;
                                   # the encoder runs them reversed: 257 bins -> 1, time / 2
    dimension: int = 128           # D: the encoder's output (odim, quantizer input_size)
    lstm_layers: int = 2           # two-layer LSTM with a skip (seq_layer_num, res_seq)
    kernel_size: int = 7           # first and last convs (kernel_size, last_kernel_size)
    residual_kernel_size: int = 3  # the residual unit's 3x3 conv, then 1x1 (residual_kernel_size)
    residual_compress: int = 2     # residual branch at C / 2 (compress)
    true_skip: bool = False        # a 1x1 conv on the residual skip, not identity (true_skip)
    norm: str = "time_group_norm"  # GroupNorm(1, C) after every conv, no weight norm (norm)
    pad_mode: str = "reflect"      # (pad_mode)
    causal: bool = False           # (causal); the 2-D codec is not streamable
    conv_group_ratio: int = -1     # "gr" models: residual convs in min(in, out) // 2 // ratio
                                   # groups, strided convs in in // 2 // ratio; -1: dense
    tr_conv_group_ratio: int = -1  # the transposed convs: in // 2 // ratio groups
    num_quantizers: int = 32       # 32 codebooks: 0.5 ... 16 kbps (num_quantizers)
    codebook_size: int = 1024      # K = 1024: 10 bits x 50 Hz = 0.5 kbps each (codebook_size)
    dropout_choices: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # structured dropout (rand_num_quant)
    ema_decay: float = 0.99        # EMA of the codebooks (ema_decay)
    kmeans_iters: int = 50         # k-means on the first batch (ddp_core_vq.py kmeans_iters)
    dead_code_threshold: float = 2.0  # codes used fewer than twice are reset ([rvq])
    semantic: str = "none"         # [rvq]: none, cat, add or res (ppg_usage_mod)
    semantic_vocab: int = 100      # semantic token ids (ppg_dim; HuBERT iteration 1: 100 MFCC
                                   # clusters)
    semantic_stride: int = 2       # token frames per codec frame (ppg_ds_rate: 100 Hz -> 50 Hz)


@dataclass
class TrainConfig:
    """How the model is trained: discriminators, losses, optimizer, data and the run itself."""
    # discriminators [adv]: any combination of msd, mpd, mstft; the recipe uses mstft only
    discriminators: tuple[str, ...] = ("mstft",)  # (discriminator_conf disc_conf_list)
    mstft_filters: int = 32        # (filters: 32)
    mstft_ffts: tuple[int, ...] = (1024, 2048, 512)  # hop n/4 (encodec_disc.py defaults)
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)  # HiFi-GAN's periods
    mpd_channels: int = 16         # bigcodec.py's MPD, 16 -> 512 (FunCodec's HiFi-GAN: 32 -> 1024)
    msd_channels: int = 16         # MelGAN: 16 -> 1024, three scales
    # losses ([setup]: lambda_t, lambda_f, lambda_adv, lambda_feat, lambda_cm = 1, 1, 1/9, 100/9, 1)
    lambda_t: float = 1.0          # (recon_loss_weight)
    lambda_f: float = 1.0          # (multi_spectral_recon_loss_weight)
    lambda_adv: float = 1 / 9      # (adversarial_loss_weight)
    lambda_feat: float = 100 / 9   # (feat_match_loss_weight)
    lambda_cm: float = 1.0         # commitment and ||V - RVQ(V)|| (commit weight, enc_quant)
    spectral_powers: tuple[int, ...] = (5, 6, 7, 8, 9, 10)  # windows 2^i, hop 2^i / 4 (Q4)
    spectral_mels: int = 64        # (multi_spectral_n_mels)
    # optimisation (the recipe's optim_conf)
    lr: float = 3e-4               # Adam 3e-4 for G and D (optim_conf lr)
    betas: tuple[float, ...] = (0.5, 0.9)  # (optim_conf betas)
    gan_start: int = 0             # steps with the reconstruction terms only, D untrained
    grad_clip: float = 0.0         # 0: none (grad_clip: -1)
    batch_size: int = 32           # 32 on two GPUs ([setup]; the yaml: 16 per GPU)
    segment_seconds: float = 3.2   # 3.2 s crops ([setup]; the yaml: 40800 samples = 2.55 s)
    # the run
    data: str = ""                 # folder or .jsonl manifest; "": the demo corpus in data/demo
    out: str = "runs/freqcodec"    # checkpoints, log, samples
    steps: int = 300_000           # 300k updates ([setup]; the yaml: 60 x 10k = 600k)
    seed: int = 0                  # weights, crops, n_q draws follow from it (seed: 0)
    log_every: int = 100           # steps between log lines (each with full diagnostics)
    sample_every: int = 10_000     # steps between reconstruction wav + spectrogram PNGs
    ckpt_every: int = 10_000       # steps between checkpoints
    semantic_fit_files: int = 200  # training files whose MFCC frames fit the semantic k-means
    eval_utterances: int = 20      # held-out utterances in the metrics table at the end
    metrics: str = "mel,pesq,stoi,visqol"  # ViSQOL: the paper's metric ([setup])
    num_workers: int = 4           # DataLoader worker processes
    threads: int = 0               # CPU threads; 0: the idle cores (busy cores stall torch)
    amp: str = "none"              # "bf16" / "fp16" on CUDA (the recipe: use_amp false)
    compile: bool = False          # torch.compile the codec (CUDA)


CHOICES = {"domain": ("mag_phase", "mag_angle"), "norm": ("time_group_norm", "weight_norm",
           "none"), "pad_mode": ("reflect", "constant"), "semantic": ("none", "cat", "add", "res"),
           "amp": ("none", "bf16", "fp16")}
DISCRIMINATORS = ("msd", "mpd", "mstft")

PRESETS = {
    "paper": (Config(), TrainConfig()),
    # freqcodec_mag_angle_16k_n32_600k_step.yaml: log|X| and the angle, two channels
    "mag_angle": (Config(domain="mag_angle"), TrainConfig()),
    # the grouped variants ("gr" of the released names; the results' M4-M7): our reading, the same
    # ratio for conv_group_ratio and tr_conv_group_ratio (the first and last convs and the 1-D
    # convs stay dense); the released configs are unknown (module docstring)
    "gr8": (Config(conv_group_ratio=8, tr_conv_group_ratio=8), TrainConfig()),
    "gr1": (Config(conv_group_ratio=1, tr_conv_group_ratio=1), TrainConfig()),
    # CPU demo on the 16 kHz demo corpus, ~9 min on 2 idle cores (README). Our choices: 8 filters
    # (8 -> 128 channels), D = 64, one LSTM layer, 8 x 32 codebooks (a batch has 208 frames: with
    # K = 256 most entries fell below the reset threshold of 2 every step) with dropout over 1, 2,
    # 4, 8 (0.25 ... 2 kbps), short crops, a higher lr, the spectral loss's windows 2^7..2^10 (the
    # 32 and 64 windows, hops 8 and 16 at n_fft 1024, took 3/4 of a step's time), reconstruction
    # terms only (DEVIATION 4); the discriminators and GAN terms run in the tests
    "tiny": (Config(n_filters=8, dimension=64, lstm_layers=1, num_quantizers=8, codebook_size=32,
                    dropout_choices=(1, 2, 4, 8), kmeans_iters=10),
             TrainConfig(mstft_filters=8, mpd_channels=4, msd_channels=4, lr=2e-3,
                         spectral_powers=(7, 8, 9, 10), gan_start=2000, batch_size=8,
                         segment_seconds=0.5, steps=2000, log_every=100, sample_every=1000,
                         ckpt_every=500, semantic_fit_files=100,
                         eval_utterances=16, metrics="mel,pesq,stoi", num_workers=0)),
}


def check_config(cfg, run=None):
    """One-line errors for values the model cannot be built or trained with."""
    for obj in (cfg, run):
        for name, allowed in CHOICES.items():
            if obj is not None and hasattr(obj, name) and getattr(obj, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(obj, name)!r}")
    if len(cfg.ratios) % 2 or not cfg.ratios or min(cfg.ratios) < 1:
        raise ValueError(f"ratios are (frequency, time) pairs of positive strides, flattened; "
                         f"got {cfg.ratios}")
    bins = cfg.n_fft // 2 + 1
    for f in reversed(cfg.ratios[0::2]):  # the encoder's frequency axis, as SConv2d counts it
        bins = (bins + (2 * f - 1) - (f - 1) - 2 * f) // f + 1
    if bins != 1:
        raise ValueError(f"the frequency strides {cfg.ratios[0::2]} reduce {cfg.n_fft // 2 + 1} "
                         f"bins to {bins}, not 1")
    for name, low in (("codebook_size", 2), ("kmeans_iters", 1), ("num_quantizers", 1),
                      ("n_filters", 2), ("dimension", 1), ("semantic_vocab", 1),
                      ("semantic_stride", 1)):
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be at least {low}; got {getattr(cfg, name)}")
    if not cfg.dropout_choices or not all(1 <= q <= cfg.num_quantizers
                                          for q in cfg.dropout_choices):
        raise ValueError(f"dropout_choices must lie in 1..{cfg.num_quantizers}; got "
                         f"{cfg.dropout_choices}")
    for name in ("conv_group_ratio", "tr_conv_group_ratio"):
        r = getattr(cfg, name)
        if r == 0 or r < -1 or (r > 0 and cfg.n_filters // 2 // r < 1):
            raise ValueError(f"{name} must be -1 (dense) or a ratio r with n_filters // 2 // r >= "
                             f"1; got {r}")
    if cfg.causal and cfg.norm == "time_group_norm":
        raise ValueError("time_group_norm normalises over the whole signal: it cannot be causal")
    if run is not None:
        if not run.discriminators or set(run.discriminators) - set(DISCRIMINATORS):
            raise ValueError(f"discriminators must be some of {', '.join(DISCRIMINATORS)}; got "
                             f"{', '.join(run.discriminators) or 'none'}")
        if run.msd_channels < 4 or run.msd_channels % 4:
            raise ValueError(f"msd_channels must be a multiple of 4 (MelGAN's groups of 4); got "
                             f"{run.msd_channels}")
        if run.batch_size < 1 or len(run.betas) != 2:
            raise ValueError(f"batch_size must be at least 1 and betas a pair (A,B); got "
                             f"{run.batch_size}, {run.betas}")
        evaluation.check_available(evaluation.parse_metrics(run.metrics))
        # the longest window that must fit a crop: reflect padding needs T > n_fft / 2
        need = max(1024, max(run.mstft_ffts)) // 2 + 1
        have = int(run.segment_seconds * cfg.sample_rate)
        if have < need:
            raise ValueError(f"segment_seconds {run.segment_seconds:g} gives {have} samples; the "
                             f"training losses need at least {need} "
                             f"({need / cfg.sample_rate:.3f} s)")

# -------------------------------------------------------------------------------------------------
# Building blocks: FunCodec's 2-D SEANet (module names = its keys)


# Copied from encodec.py: pad1d
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


# Copied from encodec.py: NormConv
class NormConv(nn.Module):
    """A conv (attribute `conv` or `convtr`, as the official keys) with its normalisation:
    weight norm on the conv, or GroupNorm(1, C) after it ("time_group_norm"), or none."""

    def __init__(self, conv, norm, name):
        super().__init__()
        self.name = name
        setattr(self, name, weight_norm(conv) if norm == "weight_norm" else conv)
        grouped = norm == "time_group_norm"
        self.norm = nn.GroupNorm(1, conv.out_channels) if grouped else nn.Identity()


# Copied from encodec.py: SConv1d
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


def pad2d(x, time, freq, mode):
    """F.pad over (frequency, time) of (B, C, N, L); like pad1d, an axis shorter than its
    reflection is first extended with zeros at its end (official pad2d). No padding, no copy."""
    if time == (0, 0) and freq == (0, 0):
        return x
    if mode != "reflect":
        return F.pad(x, (*time, *freq), mode)
    n, length = x.shape[-2:]
    extra_t = max(time) - length + 1 if length <= max(time) else 0
    extra_f = max(freq) - n + 1 if n <= max(freq) else 0
    if extra_t or extra_f:
        x = F.pad(x, (0, extra_t, 0, extra_f))
    x = F.pad(x, (*time, *freq), "reflect")
    return x[..., :x.shape[-2] - extra_f, :x.shape[-1] - extra_t]


class SConv2d(nn.Module):
    """Conv2d over (frequency, time) with the official padding: P = (k - 1) d - (s - 1) on each
    axis, split (the extra one before), plus the time samples that make the last window full,
    also before the signal (Q1). Frequency gets no such extra: 257 bins give 64 with k 8, s 4."""

    def __init__(self, cfg, in_ch, out_ch, kernel_size, stride=(1, 1), dilation=(1, 1), groups=1):
        super().__init__()
        self.conv = NormConv(nn.Conv2d(in_ch, out_ch, kernel_size, stride, dilation=dilation,
                                       groups=groups), cfg.norm, "conv")
        self.pad_mode = cfg.pad_mode
        self.padding = [(k - 1) * d - (s - 1) for k, d, s in zip(kernel_size, dilation, stride)]
        self.k_eff = (kernel_size[1] - 1) * dilation[1] + 1
        self.stride = stride[1]

    def forward(self, x):  # (B, C_in, N, L) -> (B, C_out, ~N / s_f, ceil(L / s_t))
        P_f, P_t = self.padding
        L = x.shape[-1]
        frames = math.ceil((L - self.k_eff + P_t) / self.stride + 1)
        extra = (frames - 1) * self.stride + self.k_eff - P_t - L  # Q1: on the left
        x = pad2d(x, (P_t - P_t // 2 + extra, P_t // 2), (P_f - P_f // 2, P_f // 2), self.pad_mode)
        return self.conv.norm(self.conv.conv(x))


class SConvTranspose2d(nn.Module):
    """ConvTranspose2d (k = 2s on each axis) with its norm, then trimmed by k - s on each axis,
    split (the extra one before); the last decoder layer trims one bin less at the top of the
    frequency axis (last_out_padding (0, 1)): 4 x 64 + 4 - 3 = 257 bins."""

    def __init__(self, cfg, in_ch, out_ch, kernel_size, stride, groups=1, out_padding=(0, 0)):
        super().__init__()
        self.convtr = NormConv(nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride,
                                                  groups=groups), cfg.norm, "convtr")
        f, t = (k - s for k, s in zip(kernel_size, stride))
        self.trim_f = (f - f // 2 - out_padding[0], f // 2 - out_padding[1])
        self.trim_t = (t - t // 2, t // 2)

    def forward(self, x):  # (B, C_in, N, L) -> (B, C_out, N * s_f (+1), L * s_t)
        if x.shape[1] <= 256:  # channels-last: these ran up to 2x faster so (and so does the rest
            x = x.contiguous(memory_format=torch.channels_last)  # of the decoder); 512: slower
        y = self.convtr.norm(self.convtr.convtr(x))  # official order: norm before the trim
        (f0, f1), (t0, t1) = self.trim_f, self.trim_t
        return y[..., f0:y.shape[-2] - f1, t0:y.shape[-1] - t1]


def groups(ratio, channels):
    """The "gr" models' grouping: channels // 2 // ratio groups, or dense (1) for ratio -1."""
    return channels // 2 // ratio if ratio > 0 else 1


class ResnetBlock2d(nn.Module):
    """The residual unit of the encoder table [arch]: ELU, conv 3x3 to C/2, ELU, conv 1x1 back to
    C, plus a 1x1 conv skip (`shortcut`). Keys: block.1, block.3, shortcut."""

    def __init__(self, cfg, dim, ratio):
        super().__init__()
        hidden, k = dim // cfg.residual_compress, cfg.residual_kernel_size
        self.block = nn.Sequential(
            nn.ELU(), SConv2d(cfg, dim, hidden, (k, k), groups=groups(ratio, min(dim, hidden))),
            nn.ELU(inplace=True),  # in place where nothing else reads its input
            SConv2d(cfg, hidden, dim, (1, 1), groups=groups(ratio, min(dim, hidden))))
        self.shortcut = (nn.Identity() if cfg.true_skip else
                         SConv2d(cfg, dim, dim, (1, 1), groups=groups(ratio, dim)))

    def forward(self, x):  # (B, C, N, L) -> (B, C, N, L)
        return self.shortcut(x) + self.block(x)


class Squeeze(nn.Module):
    """(B, C, 1, F) <-> (B, C, F): the official ReshapeModule, between the 2-D and 1-D parts."""

    def __init__(self, unsqueeze=False):
        super().__init__()
        self.unsqueeze = unsqueeze

    def forward(self, x):  # contiguous: the LSTM's output is a permuted view, which the official
        # code's first transposed conv (512 channels) reads as channels-last: 3x slower
        return x.unsqueeze(2).contiguous() if self.unsqueeze else x.squeeze(2)


# Copied from encodec.py: SLSTM
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


def stage_ratios(cfg):
    """[(freq, time)] strides in the decoder's order (the yaml's `ratios`)."""
    return list(zip(cfg.ratios[0::2], cfg.ratios[1::2]))


class Encoder(nn.Module):
    """The encoder table [arch]: conv 7x7 to C, four stages (residual unit, ELU, conv k = 2s with
    strides (4, 1), (4, 2), (4, 1), (4, 1) doubling the channels), frequency 257 -> 1 squeezed
    out, the LSTM, ELU, conv k=7 to D. Indices as the official `model`: 0 conv, 1/4/7/10 residual
    units, 3/6/9/12 strided convs, 13 squeeze, 14 LSTM, 16 conv."""

    def __init__(self, cfg):
        channels = {"mag_phase": 3, "mag_angle": 2}[cfg.domain]
        C, k, r = cfg.n_filters, cfg.kernel_size, cfg.conv_group_ratio
        layers = [SConv2d(cfg, channels, C, (k, k))]
        for f, t in reversed(stage_ratios(cfg)):
            layers += [ResnetBlock2d(cfg, C, r), nn.ELU(inplace=True),
                       SConv2d(cfg, C, 2 * C, (2 * f, 2 * t), (f, t), groups=groups(r, C))]
            C *= 2
        layers += [Squeeze()] + ([SLSTM(C, cfg.lstm_layers)] if cfg.lstm_layers else [])
        layers += [nn.ELU(inplace=True), SConv1d(cfg, C, cfg.dimension, k)]
        super().__init__()
        self.model = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, N, L) -> (B, D, F)
        return self.model(x)


class Decoder(nn.Module):
    """The encoder mirrored: conv k=7, the LSTM, unsqueeze, four stages (ELU, transposed conv
    k = 2s halving the channels, residual unit), ELU, conv 7x7 to the 3 (or 2) planes, followed
    by its GroupNorm (Q2). Indices: 0 conv, 1 LSTM, 2 unsqueeze, 4/7/10/13 transposed convs,
    5/8/11/14 residual units, 16 conv."""

    def __init__(self, cfg):
        channels = {"mag_phase": 3, "mag_angle": 2}[cfg.domain]
        ratios, k = stage_ratios(cfg), cfg.kernel_size
        C = cfg.n_filters * 2 ** len(ratios)
        layers = [SConv1d(cfg, cfg.dimension, C, k)]
        layers += ([SLSTM(C, cfg.lstm_layers)] if cfg.lstm_layers else []) + [Squeeze(True)]
        for i, (f, t) in enumerate(ratios):
            last = (0, 1) if i == len(ratios) - 1 else (0, 0)  # last_out_padding [(0, 1), (0, 0)]
            layers += [nn.ELU(inplace=True),
                       SConvTranspose2d(cfg, C, C // 2, (2 * f, 2 * t), (f, t),
                                        groups(cfg.tr_conv_group_ratio, C), last),
                       ResnetBlock2d(cfg, C // 2, cfg.conv_group_ratio)]
            C //= 2
        layers += [nn.ELU(inplace=True), SConv2d(cfg, C, channels, (k, k))]
        super().__init__()
        self.model = nn.Sequential(*layers)

    def forward(self, z):  # (B, D, F) -> (B, 3, N, 2F)
        return self.model(z)

# -------------------------------------------------------------------------------------------------
# Residual vector quantizer [rvq]: encodec.py's, whose buffers FunCodec stacks (from_official)


# Copied from soundstream.py: is_distributed
def is_distributed():
    return dist.is_available() and dist.is_initialized()


# Copied from encodec.py: Codebook
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


# Copied from encodec.py: ResidualVectorQuantizer
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
# Semantic augmentation [rvq] and its offline semantic tokens


def mfcc_deltas(c):
    """HTK's regression over +-2 frames, d_t = (c_{t+1} - c_{t-1} + 2 (c_{t+2} - c_{t-2})) / 10, the
    edge frames repeated. c (B, L, n) -> (B, L, n)."""
    p = F.pad(c.transpose(1, 2), (2, 2), mode="replicate").transpose(1, 2)  # (B, L + 4, n)
    return (p[:, 3:-1] - p[:, 1:-3] + 2 * (p[:, 4:] - p[:, :-4])) / 10


class MFCCUnits(nn.Module):
    """Offline semantic tokens: k-means clusters of 39-d MFCC frames (13 cepstra, deltas and
    delta-deltas; 25 ms windows every 10 ms), the targets of HuBERT's first iteration (Hsu et al.
    2021: 100 clusters of MFCC features). One token per STFT frame of the codec (1 + T // 160).
    `fit` learns the standardisation and the centroids; they are buffers, saved with the model,
    so the receiver's tokens are the sender's. Real HuBERT (or phoneme) tokens can be passed to
    FreqCodec.forward / encode instead (`semantic=`)."""

    def __init__(self, cfg):
        super().__init__()
        self.sample_rate, self.hop, self.n_fft = cfg.sample_rate, cfg.hop, cfg.n_fft
        self.window = int(0.025 * cfg.sample_rate)  # 25 ms (HTK / Kaldi MFCC)
        self.register_buffer("mel", mel_filterbank(cfg.sample_rate, cfg.n_fft, 40, htk=True,
                                                   norm=None))  # (40, N): 40 HTK bands (our choice)
        n, k = torch.arange(40.0), torch.arange(13.0)[:, None]  # 13 cepstra + deltas = 39 (HuBERT)
        dct = torch.cos(math.pi / 40 * (n + 0.5) * k) * math.sqrt(2 / 40)  # DCT-II, orthonormal
        dct[0] /= math.sqrt(2)
        self.register_buffer("dct", dct)  # (13, 40)
        self.register_buffer("mean", torch.zeros(39))
        self.register_buffer("std", torch.ones(39))
        self.register_buffer("centroids", torch.zeros(cfg.semantic_vocab, 39))
        self.register_buffer("fitted", torch.zeros(()))

    def features(self, wav):  # (B, 1, T) -> (B, L, 39), standardised
        hann = torch.hann_window(self.window, device=wav.device)
        spec = torch.stft(wav.squeeze(1).float(), self.n_fft, self.hop, self.window, hann,
                          return_complex=True)  # (B, N, L), centred: L = 1 + T // hop
        logmel = (self.mel @ spec.abs().pow(2)).clamp(min=1e-10).log()  # (B, 40, L); floor: ours
        c = (self.dct @ logmel).transpose(1, 2)  # (B, L, 13)
        d = mfcc_deltas(c)
        return (torch.cat([c, d, mfcc_deltas(d)], dim=-1) - self.mean) / self.std

    def forward(self, wav):  # (B, 1, T) -> tokens (B, L) int64
        if not self.fitted:
            raise ValueError("the semantic tokenizer is not fitted: train the model (train() "
                             "fits it) or call model.semantic_units.fit(wavs)")
        x = self.features(wav)  # (B, L, 39)
        d = self.centroids.pow(2).sum(1) - 2 * x @ self.centroids.t()  # ||c||^2 - 2 x.c
        return d.min(dim=-1).indices  # as argmin, faster

    @torch.no_grad()
    def fit(self, wavs, iters=30, seed=0):
        """k-means (Lloyd, seeded random rows as the start; 30 iterations: our choice) over the
        frames of `wavs`, a list of (1, T) tensors. Returns the share of clusters used."""
        self.fitted.zero_()
        self.mean.zero_()  # features() then returns the raw features
        self.std.fill_(1)
        frames = torch.cat([self.features(w[None].to(self.mel.device))[0] for w in wavs])
        self.mean.copy_(frames.mean(0))
        self.std.copy_(frames.std(0).clamp(min=1e-5))
        x = (frames - self.mean) / self.std  # (N, 39), standardised as features() now does
        K = len(self.centroids)
        g = torch.Generator().manual_seed(seed)
        c = x[torch.randperm(len(x), generator=g)[:K].to(x.device)]
        if len(c) < K:
            raise ValueError(f"{len(x)} MFCC frames are fewer than the {K} semantic clusters")
        for _ in range(iters):
            ids = (c.pow(2).sum(1) - 2 * x @ c.t()).argmin(1)
            counts = torch.bincount(ids, minlength=K).to(x.dtype)
            sums = torch.zeros_like(c).index_add_(0, ids, x)
            c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        self.centroids.copy_(c)
        self.fitted.fill_(1)
        return float((counts > 0).float().mean())


class Semantic(nn.Module):
    """V_s and the combinations of [rvq], as codec_semantic_aug.py builds V_s: an embedding of the
    token ids, conv k=7 (GroupNorm), ELU, and a conv k = 2s with stride s (s = 2: 100 Hz tokens to
    the 50 Hz codec frames), cut or edge-padded to the codec's F frames.
        f_cat(V_a, V_s) = Concat(RVQ(V_a), V_s), then a conv k=3 from 2D back to D channels
        f_add(V_a, V_s) = RVQ(V_a) + V_s
        f_res(V_a, V_s) = RVQ(V_a - V_s) + V_s
    (for f_cat the official code concatenates [V_s, RVQ(V_a)], in that order)."""

    def __init__(self, cfg):
        super().__init__()
        D, s = cfg.dimension, cfg.semantic_stride
        self.mode = cfg.semantic
        self.embedding = nn.Embedding(cfg.semantic_vocab, D)  # (ppg_embedding)
        plain = dataclasses.replace(cfg, norm="none")
        self.ds = nn.Sequential(SConv1d(cfg, D, D, 7), nn.ELU(),  # (ppg_ds_layer)
                                SConv1d(plain, D, D, 2 * s, s))
        if cfg.semantic == "cat":
            self.cond = SConv1d(plain, 2 * D, D, 3)  # (ppg_cond_layer)

    def forward(self, tokens, frames):  # tokens (B, L) -> V_s (B, D, F)
        v = self.ds(self.embedding(tokens).transpose(1, 2))  # (B, D, ~L / s)
        if v.shape[-1] < frames:  # official: replicate the last frame
            v = F.pad(v, (0, frames - v.shape[-1]), mode="replicate")
        return v[..., :frames]

    def quantizer_input(self, z, v_s):  # V_a -> what the RVQ codes
        return z - v_s if self.mode == "res" else z

    def decoder_input(self, z_q, v_s):  # RVQ(.) -> what the decoder reads
        if self.mode == "cat":
            return self.cond(torch.cat([v_s, z_q], dim=1))
        return z_q + v_s  # add and res

# -------------------------------------------------------------------------------------------------
# The codec


class Encoded(NamedTuple):
    """What FreqCodec sends: codes (B, Q, F); with `normalize` the input's RMS `scale` (B, 1)
    (else None); with semantic augmentation the semantic tokens (B, L) (else None)."""
    codes: torch.Tensor
    scale: torch.Tensor | None
    semantic: torch.Tensor | None


class FreqCodec(nn.Module):
    """STFT -> log-magnitude and phase planes -> 2-D encoder -> RVQ -> 2-D decoder -> planes ->
    inverse STFT ([arch] and its figure), with the optional semantic tokens of [rvq].

    The codec interface of every codec file: sample_rate, channels, frame_rate, num_codebooks,
    codebook_size, encode(wav) -> Encoded(codes (B, Q, F), scale, semantic), decode(codes, scale,
    semantic) -> wav (B, 1, (2F - 1) * 160) (trim to the input's length, as `reconstruct` does),
    forward for training, bitrate, save / load, and from_official for FunCodec's weights."""

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ResidualVectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        if cfg.semantic != "none":
            self.semantic = Semantic(cfg)
            self.semantic_units = MFCCUnits(cfg)
        self.register_buffer("hann", torch.hann_window(cfg.n_fft), persistent=False)

    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: 1)  # speech, mono
    hop_length = property(lambda self: self.cfg.hop * math.prod(self.cfg.ratios[1::2]))  # 320
    frame_rate = property(lambda self: self.cfg.sample_rate / self.hop_length)  # 50 Hz
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bitrate(self, n_q=None):
        """Bits per second: frame_rate * n_q * log2(K) (0.5 kbps per codebook), plus, with
        semantic augmentation, the semantic tokens the decoder also needs: 100 Hz * log2(vocab)."""
        bits = self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size)
        if self.cfg.semantic != "none":  # semantic_stride tokens per codec frame
            bits += self.frame_rate * self.cfg.semantic_stride * math.log2(self.cfg.semantic_vocab)
        return bits

    def check_wav(self, wav, sample_rate=None):
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"FreqCodec expects {self.sample_rate} Hz audio, got {sample_rate} "
                             f"Hz; resample first (common.audio.resample)")
        if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 3:
            raise ValueError(f"FreqCodec expects a float tensor (batch, 1, samples), got "
                             f"{type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
        if wav.shape[1] != 1:
            raise ValueError(f"FreqCodec is mono (speech); got {wav.shape[1]} channels: mix down "
                             f"first, e.g. wav.mean(dim=1, keepdim=True)")
        if wav.shape[-1] == 0:
            raise ValueError("FreqCodec got an empty signal (0 samples)")
        if wav.shape[-1] <= self.cfg.n_fft // 2:
            raise ValueError(f"FreqCodec needs more than {self.cfg.n_fft // 2} samples (the "
                             f"STFT's reflect padding); got {wav.shape[-1]}")
        if not torch.isfinite(wav).all():
            raise ValueError("FreqCodec got NaN or Inf samples")

    def check_semantic(self, tokens, B):
        if self.cfg.semantic == "none":
            if tokens is not None:
                raise ValueError("this FreqCodec has no semantic augmentation (semantic none); "
                                 "do not pass semantic tokens")
            return
        if tokens is None:
            raise ValueError(f"this FreqCodec decodes with semantic tokens (f_{self.cfg.semantic})"
                             f": pass the Encoded that encode() returned, or semantic=")
        if (not torch.is_tensor(tokens) or tokens.dtype.is_floating_point or tokens.dim() != 2
                or tokens.shape[0] != B or tokens.shape[1] == 0):
            raise ValueError(f"semantic tokens must be an integer tensor (batch {B}, frames), "
                             f"got {getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if tokens.min() < 0 or tokens.max() >= self.cfg.semantic_vocab:
            raise ValueError(f"semantic token ids must be in [0, {self.cfg.semantic_vocab}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def pad(self, wav):
        """DEVIATION 7: zeros up to a multiple of the STFT hop (160), so that the output is never
        shorter than the input. FunCodec codes the unpadded input; when T // 160 is odd its output
        then lacks the last T mod 160 samples. For T a multiple of 160 both are the same."""
        return F.pad(wav, (0, -wav.shape[-1] % self.cfg.hop))

    def normalize(self, x):  # (B, 1, T) -> x / scale, scale (B, 1): the RMS (audio_normalize)
        if not self.cfg.normalize:
            return x, None
        scale = 1e-8 + x.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt()
        return x / scale, scale.view(-1, 1)

    def analysis(self, x):
        """[arch]: (B, 1, T) -> the encoder's planes (B, 3, N, L): log|X|, X_r/|X|, X_i/|X|
        (mag_phase), or (B, 2, N, L): log|X|, angle(X) (mag_angle); |X| floored at 1e-6."""
        X = torch.stft(x.squeeze(1).float(), self.cfg.n_fft, self.cfg.hop, window=self.hann,
                       pad_mode="reflect", return_complex=True)  # (B, N, L), centred
        mag = X.abs().clamp(min=1e-6)
        if self.cfg.domain == "mag_angle":
            return torch.stack([mag.log(), X.angle()], dim=1)
        return torch.stack([mag.log(), X.real / mag, X.imag / mag], dim=1)

    def synthesis(self, y):
        """The decoder's planes (B, 3, N, L) -> (B, 1, (L - 1) * hop): |X| = softplus(ch0), the
        phase complex(ch1, ch2) unnormalised (Q3), or angle = pi sin(ch1) (mag_angle); inverse
        STFT (official: torchaudio InverseSpectrogram, Hann 512, hop 160, centred)."""
        mag = F.softplus(y[:, 0].float())
        if self.cfg.domain == "mag_angle":
            angle = torch.sin(y[:, 1].float()) * math.pi
            X = torch.complex(mag * torch.cos(angle), mag * torch.sin(angle))
        else:
            X = mag * torch.complex(y[:, 1].float(), y[:, 2].float())
        return torch.istft(X, self.cfg.n_fft, self.cfg.hop, window=self.hann)[:, None]

    def tokens_for(self, x, semantic):  # the semantic tokens of x, or the given ones
        if self.cfg.semantic == "none":
            self.check_semantic(semantic, len(x))
            return None
        if semantic is None:
            semantic = self.semantic_units(x)  # (B, L)
        self.check_semantic(semantic, len(x))
        return semantic

    def forward(self, wav, n_q=None, semantic=None):
        """Training pass: wav (B, 1, T) -> x_hat (B, 1, T), codes (B, n_q, F), and a dict with
        the commitment term, ||V - RVQ(V)||^2 (Q5) and the latent's RMS (a diagnostic)."""
        self.check_wav(wav)
        padded = self.pad(wav)
        tokens = self.tokens_for(padded, semantic)
        x, scale = self.normalize(padded)
        z = self.encoder(self.analysis(x))  # V_a (B, D, F)
        v_s = self.semantic(tokens, z.shape[-1]) if tokens is not None else None
        q_in = self.semantic.quantizer_input(z, v_s) if v_s is not None else z
        z_q, codes, commit = self.quantizer(q_in, n_q or self.num_codebooks)
        dec_in = self.semantic.decoder_input(z_q, v_s) if v_s is not None else z_q
        x_hat = self.synthesis(self.decoder(dec_in))[..., :wav.shape[-1]]
        if scale is not None:
            x_hat = x_hat * scale[:, :, None]
        # Q5: the official `enc_quant_loss`: RVQ(V_a) against V_a, and for f_add and f_res the
        # decoder's input against V_a (codec_freq.py, codec_semantic_aug.py)
        enc_quant = F.mse_loss(dec_in if self.cfg.semantic in ("add", "res") else z_q, z) ** 2
        return x_hat, codes, {"commit": commit, "enc_quant": enc_quant,
                              "latent_rms": z.detach().pow(2).mean().sqrt()}

    @torch.no_grad()
    def encode(self, wav, n_q=None, sample_rate=None, semantic=None):
        """wav (B, 1, T) -> Encoded(codes (B, n_q, F), scale, semantic), F = ceil((1 + T' / 160)
        / 2) with T' = T rounded up to a multiple of 160 (DEVIATION 7); n_q: the first codebooks."""
        self.check_wav(wav, sample_rate)
        n_q = self.num_codebooks if n_q is None else n_q
        if not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in 1..{self.num_codebooks}, got {n_q}")
        wav = self.pad(wav)
        tokens = self.tokens_for(wav, semantic)
        x, scale = self.normalize(wav)
        z = self.encoder(self.analysis(x))
        if tokens is not None:
            z = self.semantic.quantizer_input(z, self.semantic(tokens, z.shape[-1]))
        return Encoded(self.quantizer.encode(z, n_q), scale, tokens)

    @torch.no_grad()
    def decode(self, codes, scale=None, semantic=None):
        """codes (B, Q, F) (and the scale and semantic tokens that encode returned) -> wav
        (B, 1, (2F - 1) * 160). Without `scale` the output has unit RMS (DEVIATION 6)."""
        if isinstance(codes, Encoded):
            codes, scale, semantic = codes
        if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dim() != 3:
            raise ValueError(f"codes must be an integer tensor (batch, codebooks, frames), got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} "
                             f"{tuple(getattr(codes, 'shape', ()))}")
        if not 1 <= codes.shape[1] <= self.num_codebooks:
            raise ValueError(f"codes have {codes.shape[1]} codebooks; this model has "
                             f"1..{self.num_codebooks}")
        if codes.shape[-1] == 0:
            raise ValueError("codes have 0 frames")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"code ids must be in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if scale is not None and (not torch.is_tensor(scale) or scale.numel() != len(codes)):
            raise ValueError(f"scale must hold one RMS per example ({len(codes)}), got "
                             f"{tuple(getattr(scale, 'shape', ()))}")
        self.check_semantic(semantic, len(codes))
        z_q = self.quantizer.decode(codes.long())  # (B, D, F)
        if semantic is not None:
            z_q = self.semantic.decoder_input(z_q, self.semantic(semantic, z_q.shape[-1]))
        wav = self.synthesis(self.decoder(z_q))
        return wav * scale.reshape(-1, 1, 1) if scale is not None else wav

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
    def from_official(cls, source, cfg=None):
        """FunCodec's weights: a path to a FreqCodec `model.pth` or its state dict (the whole
        FreqCodec: encoder, quantizer, decoder, discriminator, STFT windows, mel bases). The
        codec's keys load strictly (ours_from_official); the discriminator's go to
        Discriminators.load_official, the deterministic windows and mel bases are dropped.
        Without `cfg` the config is read off the shapes (config_from_official)."""
        state = source
        if not isinstance(source, dict):
            if not Path(source).is_file():
                raise FileNotFoundError(f"official checkpoint {source} not found")
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
                raise ValueError(f"{source} is not a checkpoint torch.load(weights_only=True) can "
                                 f"read ({type(e).__name__}); expected FunCodec's model.pth"
                                 ) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        name = source if not isinstance(source, dict) else "the state dict"
        if (not isinstance(state, dict) or "quantizer.rq.model.embed" not in state
                or "encoder.model.0.conv.conv.weight" not in state):
            what = sorted(state)[:3] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name} is not a FunCodec FreqCodec state dict (expected the keys "
                             f"encoder.model.0.conv.conv.weight and quantizer.rq.model.embed, "
                             f"found {what})")
        model = cls(cfg or config_from_official(state))
        try:
            model.load_state_dict(ours_from_official(state), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise ValueError(f"the official weights do not fit this file's FreqCodec: "
                             f"{first}") from None
        return model.eval()


def ours_from_official(state):
    """FunCodec keys -> ours. The codec's module names are the official ones; only the RVQ's
    buffers differ: FunCodec stacks them (quantizer.rq.model.embed (Q, K, D)), encodec.py keeps
    one module per codebook (quantizer.layers.i.embed (K, D)). Dropped: the discriminator
    (Discriminators.load_official), and the STFT windows and mel bases (enc_trans_func.window,
    dec_trans_func.window, mel_spec_transforms.*), which are functions of the config."""
    ours = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        m = re.fullmatch(r"quantizer\.rq\.model\.(inited|cluster_size|embed|embed_avg)", k)
        if m:
            for i, part in enumerate(v):
                ours[f"quantizer.layers.{i}.{m[1]}"] = part.reshape(-1) if m[1] == "inited" \
                    else part
        elif not re.match(r"(discriminator|enc_trans_func|dec_trans_func|mel_spec_transforms)\.",
                          k):
            ours[k] = v
    return ours


def config_from_official(state):
    """The Config an official state dict was built with, read off its shapes: filters, domain
    (3 or 2 input planes), strides (kernel = 2 x stride), LSTM layers, latent, codebooks, the
    groups of the "gr" models, kernel sizes, skip and norm. Not in the weights: the STFT hop
    (160), audio_normalize (true) and the dropout choices: the recipe's values."""
    w = {k.removeprefix("module."): v for k, v in state.items()}
    conv0 = w["encoder.model.0.conv.conv.weight"]  # (C, planes, k, k)
    stages = sorted(int(m[1]) for k in w if (m := re.fullmatch(
        r"encoder\.model\.(\d+)\.conv\.conv\.weight", k)) and w[k].dim() == 4 and m[1] != "0")
    strided = [w[f"encoder.model.{i}.conv.conv.weight"] for i in stages]  # encoder order
    ratios = tuple(r for t in reversed(strided) for r in (t.shape[2] // 2, t.shape[3] // 2))
    C = conv0.shape[0]
    g_enc = C // strided[0].shape[1]  # groups of the first strided conv, in_ch = C
    lstm = sum(1 for k in w if re.fullmatch(r"encoder\.model\.\d+\.lstm\.weight_ih_l\d+", k))
    tr = [k for k in w if re.fullmatch(r"decoder\.model\.\d+\.convtr\.convtr\.weight", k)]
    first_tr = w[min(tr, key=lambda k: int(k.split(".")[2]))]  # (C_in, C_out / groups, kf, kt)
    g_tr = (first_tr.shape[0] // 2) // first_tr.shape[1]
    res = w["encoder.model.1.block.1.conv.conv.weight"]  # (hidden, C / groups, k, k)
    embed = w["quantizer.rq.model.embed"]  # (Q, K, D)
    norm = ("time_group_norm" if "encoder.model.0.conv.norm.weight" in w else
            "weight_norm" if any(k.startswith("encoder.model.0.conv.conv.weight_") or
                                 "parametrizations" in k for k in w) else "none")
    return Config(domain={3: "mag_phase", 2: "mag_angle"}[conv0.shape[1]],
                  n_fft=(len(w["enc_trans_func.window"]) if "enc_trans_func.window" in w
                         else Config.n_fft), n_filters=C, ratios=ratios,
                  dimension=embed.shape[2], lstm_layers=lstm, kernel_size=conv0.shape[-1],
                  residual_kernel_size=res.shape[-1], residual_compress=C // res.shape[0],
                  true_skip="encoder.model.1.shortcut.conv.conv.weight" not in w, norm=norm,
                  conv_group_ratio=C // 2 // g_enc if g_enc > 1 else -1,
                  tr_conv_group_ratio=(first_tr.shape[0] // 2 // g_tr) if g_tr > 1 else -1,
                  num_quantizers=embed.shape[0], codebook_size=embed.shape[1],
                  dropout_choices=tuple(q for q in Config.dropout_choices if q <= embed.shape[0]))

# -------------------------------------------------------------------------------------------------
# Discriminators [adv]: MSD, MPD and MS-STFT behind one interface


# Copied from soundstream.py: WaveDiscriminator
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


class MultiScaleDiscriminator(nn.Module):
    """MSD: the wave discriminator at the original rate and down-sampled 2x and 4x by average
    pooling (MelGAN's three scales, as soundstream.py's Discriminators)."""

    def __init__(self, channels):
        super().__init__()
        self.waves = nn.ModuleList(WaveDiscriminator(channels) for _ in range(3))
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)

    def forward(self, x):  # (B, 1, T) -> [(logits, [features])] x 3
        outputs = []
        for i, d in enumerate(self.waves):
            outputs.append(d(x))
            if i < len(self.waves) - 1:
                x = self.pool(x)
        return outputs


# Copied from bigcodec.py: PeriodDiscriminator
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


class MultiPeriodDiscriminator(nn.Module):
    """MPD: one period discriminator per period (2, 3, 5, 7, 11: HiFi-GAN's)."""

    def __init__(self, periods, channels):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x):  # (B, 1, T) -> [(logits, [features])] per period
        return [(outs[-1], outs[:-1]) for outs in (d(x) for d in self.periods)]


class NormConv2d(nn.Module):
    """A Conv2d under the official attribute `conv`, weight-normed or plain (its key layout)."""

    def __init__(self, *args, norm=True, **kwargs):
        super().__init__()
        conv = nn.Conv2d(*args, **kwargs)
        self.conv = weight_norm(conv) if norm else conv

    def forward(self, x):
        return self.conv(x)


class STFTDiscriminator(nn.Module):
    """One scale of FunCodec's MS-STFT discriminator (encodec_disc.py, EnCodec's design): the
    complex STFT (window n, hop n/4, not centred, divided by the window's L2 norm) as real and
    imaginary channels (B, 2, frames, bins); a conv 3x9 without weight norm, three convs 3x9
    with stride (1, 2) and time dilations 1, 2, 4, a conv 3x3, each followed by LeakyReLU(0.2),
    and a conv 3x3 to one logit map. Not encodec.py's copy: the first conv has no weight norm and
    the kernel is 3x9 here, as the weights FunCodec trained."""

    def __init__(self, filters, n_fft, kernel=(3, 9), dilations=(1, 2, 4)):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("hann", torch.hann_window(n_fft), persistent=False)
        k_t, k_f = kernel
        convs = [NormConv2d(2, filters, kernel, padding=((k_t - 1) // 2, (k_f - 1) // 2),
                            norm=False)]
        for d in dilations:
            convs.append(NormConv2d(filters, filters, kernel, stride=(1, 2), dilation=(d, 1),
                                    padding=((k_t - 1) * d // 2, (k_f - 1) // 2)))
        convs.append(NormConv2d(filters, filters, (k_t, k_t), padding=(k_t - 1) // 2))
        self.convs = nn.ModuleList(convs)
        self.conv_post = NormConv2d(filters, 1, (k_t, k_t), padding=(k_t - 1) // 2)

    def forward(self, x):  # (B, 1, T) -> logits (B, 1, t, f), features [(B, C, t, f_l)] x 5
        spec = torch.stft(x.squeeze(1).float(), self.n_fft, self.hop, window=self.hann,
                          center=False, return_complex=True)  # (B, n/2 + 1, frames)
        spec = spec / self.hann.pow(2).sum().sqrt()  # torchaudio's normalized=True ("window")
        z = torch.view_as_real(spec).permute(0, 3, 2, 1).contiguous()  # (B, 2, frames, n/2+1)
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            features.append(z)
        return self.conv_post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """MS-STFT: windows 1024, 2048, 512 (FunCodec's order), each logit map average-pooled
    (kernel 4, stride 2) as encodec_disc.py does."""

    def __init__(self, filters, ffts):
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(filters, n) for n in ffts)
        self.downsample = nn.AvgPool2d(4, stride=2, padding=1, count_include_pad=False)

    def forward(self, x):  # (B, 1, T) -> [(logits, [features])] per window
        return [(self.downsample(lg), fs) for lg, fs in (d(x) for d in self.discriminators)]


class Discriminators(nn.Module):
    """[adv]: a unified interface for MSD, MPD and MS-STFT: any combination, in the order given,
    whose outputs form one list of (logits, [features]), one per sub-discriminator (as FunCodec's
    MultipleDiscriminator). The MS-STFT is FunCodec's (its weights load); the MSD is MelGAN's
    (soundstream.py's) and the MPD ParallelWaveGAN's (bigcodec.py's), not FunCodec's HiFi-GAN
    modules (funcodec/models/discriminator/hifigan.py), which its recipe does not use."""

    def __init__(self, run):
        super().__init__()
        build = {"msd": lambda: MultiScaleDiscriminator(run.msd_channels),
                 "mpd": lambda: MultiPeriodDiscriminator(run.mpd_periods, run.mpd_channels),
                 "mstft": lambda: MultiScaleSTFTDiscriminator(run.mstft_filters, run.mstft_ffts)}
        self.names = tuple(run.discriminators)
        self.discriminators = nn.ModuleList(build[n]() for n in self.names)

    def forward(self, x):  # (B, 1, T) -> [(logits, [features])]
        return [out for d in self.discriminators for out in d(x)]

    def load_official(self, state):
        """The `discriminator.*` keys of a FunCodec state dict (the recipe's MS-STFT), strictly;
        weight norm's weight_g / weight_v load into the parametrization (torch's own hook)."""
        sub = {k.removeprefix("module.")[len("discriminator."):]: v for k, v in state.items()
               if k.removeprefix("module.").startswith("discriminator.")
               and not k.endswith("spec_transform.window")}  # torchaudio's Hann window buffers
        self.load_state_dict(sub, strict=True)
        return self

# -------------------------------------------------------------------------------------------------
# Losses [adv] (codec_freq.py _forward_generator / _forward_discriminator)


# Copied from encodec.py: discriminator_loss
def discriminator_loss(real, fake):
    """L_d = 1/K sum_k max(0, 1 - D_k(x)) + max(0, 1 + D_k(x_hat)), averaged over each logit map."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
               for (r, _), (f, _) in zip(real, fake)) / len(real)


# Copied from encodec.py: adversarial_loss
def adversarial_loss(fake):
    """l_g = 1/K sum_k max(0, 1 - D_k(x_hat)), averaged over each logit map (§3.4)."""
    return sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)


def feature_loss(real, fake):
    """L_feat: mean |D_k^l(x) - D_k^l(x_hat)| over every layer l of every sub-discriminator k,
    averaged over the K * L maps (real features carry no gradient)."""
    terms = [F.l1_loss(ff, fr.detach()) for (_, r), (_, f) in zip(real, fake)
             for fr, ff in zip(r, f)]
    return sum(terms) / len(terms)


class MultiSpectralLoss(nn.Module):
    """L_f: for windows 2^i (i = 5..10, Q4), hop 2^i / 4, a 1024-point FFT of the reflect-
    padded signal (not centred): S_i = log10 max(|X|^2, 1e-5) over the 513 bins and M_i = log10
    max(mel_64 |X|^2, 1e-5); per scale (L1(S) + L1(M)) / 2 + (L2(S) + L2(M)) / 2, with L1 and L2
    the mean absolute and the mean squared error, averaged over the scales (official Audio2Mel
    with use_power_spec_loss). Always float32."""

    def __init__(self, sample_rate, powers, n_mels, n_fft=1024):
        super().__init__()
        self.windows, self.n_fft = [2 ** p for p in powers], n_fft
        self.register_buffer("mel", mel_filterbank(sample_rate, n_fft, n_mels))  # librosa's
        for w in self.windows:
            self.register_buffer(f"hann{w}", torch.hann_window(w), persistent=False)

    def spectra(self, x, w):  # (B, 1, T) -> log power (B, 513, frames), log mel (B, 64, frames)
        p = (self.n_fft - w // 4) // 2
        x = F.pad(x.float(), (p, p), "reflect").squeeze(1)
        X = torch.stft(x, self.n_fft, w // 4, w, getattr(self, f"hann{w}"), center=False,
                       return_complex=True)
        power = X.real.pow(2) + X.imag.pow(2)
        return power.clamp(min=1e-5).log10(), (self.mel @ power).clamp(min=1e-5).log10()

    def forward(self, x, x_hat):  # (B, 1, T) each -> scalar
        with torch.autocast(x.device.type, enabled=False):
            total = 0.0
            for w in self.windows:
                (S, M), (S_hat, M_hat) = self.spectra(x, w), self.spectra(x_hat, w)
                l1 = 0.5 * F.l1_loss(M_hat, M) + 0.5 * F.l1_loss(S_hat, S)
                l2 = 0.5 * F.mse_loss(M_hat, M) + 0.5 * F.mse_loss(S_hat, S)
                total = total + l1 + l2
        return total / len(self.windows)

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


def update_discriminator(d_loss, g_loss, world=1):
    """[setup]: to keep the discriminator from becoming too strong, it is updated only when its
    loss exceeds the codec model's: d_loss > g_loss, with g_loss the generator's weighted
    reconstruction and GAN terms of the same step (official `self.gen_loss`: without the
    commitment terms). Under DDP both are first averaged over the ranks, so that all agree."""
    pair = torch.stack([d_loss.detach().float(), g_loss.detach().float()])
    if world > 1:
        dist.all_reduce(pair)
    return bool(pair[0] > pair[1])


class Trainer:
    """The codec G, the discriminators D and their optimizers; `step()` is one update of G, then
    of D when the rule allows it (update_discriminator)."""

    def __init__(self, cfg, run, rank=0, world=1, device="cpu"):
        check_config(cfg, run)
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = FreqCodec(cfg).to(self.device)
        self.disc = Discriminators(run).to(self.device)
        self.spectral = MultiSpectralLoss(cfg.sample_rate, run.spectral_powers,
                                          run.spectral_mels).to(self.device)
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
        self.d_updates = self.gan_steps = 0  # this process's, for the log's share of D updates

    # Copied from soundstream.py: Trainer.autocast
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def draws(self):
        """This step's number of codebooks, one for the whole batch: structured quantizer dropout
        over cfg.dropout_choices (1, 2, 4, 8, 16, 32: rand_num_quant). The same on every rank and
        after a resume (a generator seeded by the run's seed and the step)."""
        # 1_000_003 (a prime, our choice) keeps (seed, step) pairs on distinct seeds
        g = torch.Generator().manual_seed(self.run.seed * 1_000_003 + self.step_count)
        choices = self.cfg.dropout_choices
        return choices[int(torch.randint(len(choices), (1,), generator=g))]

    def step(self, batch, diagnose=False):
        """G on lambda_t L_t + lambda_f L_f + lambda_adv L_adv + lambda_feat L_feat + lambda_cm
        L_cm ([setup]: 1, 1, 1/9, 100/9, 1), then D on the hinge loss if its loss exceeds G's.
        Before run.gan_start: L_t, L_f and L_cm only, D untouched. Returns the logged numbers."""
        self.model.train()
        run = self.run
        x = batch.to(self.device)  # (B, 1, T)
        n_q = self.draws()
        gan = self.step_count >= run.gan_start
        with self.autocast():
            x_hat, codes, aux = self.G(x, n_q)
            losses = {"t": F.l1_loss(x_hat.float(), x.float()), "f": self.spectral(x, x_hat)}
            if gan:
                self.disc.requires_grad_(False)
                with torch.no_grad():
                    real = self.disc(x)
                fake = self.disc(x_hat)
                losses.update(adv=adversarial_loss(fake), feat=feature_loss(real, fake))
        weights = {"t": run.lambda_t, "f": run.lambda_f, "adv": run.lambda_adv,
                   "feat": run.lambda_feat}
        g_loss = sum(weights[k] * v for k, v in losses.items())
        loss = g_loss + run.lambda_cm * (aux["commit"] + aux["enc_quant"])
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt_g)
        params = self.model.parameters()
        g_norm = (nn.utils.clip_grad_norm_(params, run.grad_clip) if run.grad_clip > 0 else
                  nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        self.scaler.step(self.opt_g)
        self.disc.requires_grad_(True)
        stats = {"n_q": torch.tensor(float(n_q)), **losses, "commit": aux["commit"],
                 "enc_quant": aux["enc_quant"], "|G|": g_norm}
        if gan:  # DEVIATION 3: D judges this step's output, not a second pass of the codec
            with self.autocast():
                both = self.D(torch.cat([x, x_hat.detach()]))  # 2B examples, one DDP forward
                B = len(x)
                real = [(lg[:B], [f[:B] for f in fs]) for lg, fs in both]
                fake = [(lg[B:], [f[B:] for f in fs]) for lg, fs in both]
                d_loss = discriminator_loss(real, fake)
            update = update_discriminator(d_loss, g_loss, self.world)
            if update or self.world > 1:  # under DDP every rank runs the same backward
                self.opt_d.zero_grad(set_to_none=True)
                self.scaler.scale(d_loss * float(update)).backward()
            if update:  # DEVIATION 5: no step at all when the rule says no
                self.scaler.unscale_(self.opt_d)
                if run.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.disc.parameters(), run.grad_clip)
                self.scaler.step(self.opt_d)
            self.d_updates += update
            self.gan_steps += 1
            stats.update(d=d_loss, d_step=torch.tensor(float(update)))
        self.scaler.update()
        self.step_count += 1
        stats = {k: v.item() for k, v in stats.items()}
        if self.gan_steps:
            stats["d_share"] = self.d_updates / self.gan_steps
        if diagnose:
            stats["z_rms"] = aux["latent_rms"].item()
            stats["dc"] = x_hat.detach().mean().item()
            ppl = codebook_stats(codes.cpu(), self.cfg.codebook_size, 1)["perplexity"]
            stats["ppl"] = [round(p, 1) for p in ppl]
            stats["dead"] = sum(int(vq.replaced) for vq in self.model.quantizer.layers)
            for vq in self.model.quantizer.layers:
                vq.replaced.zero_()
        return stats

    # Copied from soundstream.py: Trainer.write_sample with SoundStream->FreqCodec
    def write_sample(self, stem):
        """A reconstruction of the first validation file, as wav and comparison PNG."""
        model = self.model.eval()
        wav, sr = load(self.valid_file, model.sample_rate, 1)
        rec = reconstruct(model, wav.to(self.device)).cpu()
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        save(f"{stem}.wav", rec, sr)
        plot_comparison(f"{stem}.png", wav, rec, sr, title=f"{Path(self.valid_file).name}: "
                        f"original vs FreqCodec, {model.bitrate() / 1000:g} kbps")
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


def fit_semantic_units(model, files, limit, seed, quiet=False):
    """Fit the model's MFCC k-means tokens on the first `limit` training files (a new run with
    semantic augmentation); prints what it did."""
    t0 = time.time()
    wavs = [load(f, model.sample_rate, 1)[0] for f in files[:limit]]
    used = model.semantic_units.fit(wavs, seed=seed)
    frames = sum(1 + w.shape[-1] // model.cfg.hop for w in wavs)
    if quiet:
        return
    print(f"semantic tokens (f_{model.cfg.semantic}): k-means of 39-d MFCC frames, "
          f"{model.cfg.semantic_vocab} clusters ({100 * used:.0f} % used) over {frames} frames "
          f"of {len(wavs)} files, {time.time() - t0:.1f} s", flush=True)


def codebook_usage(model, utterances):
    """Entries used per codebook on the utterances and the entropy bitrate of the codes."""
    device = next(model.parameters()).device
    codes = [model.encode(load(f, model.sample_rate, 1)[0][None].to(device)).codes.cpu()
             for f, _ in utterances]
    s = codebook_stats(codes, model.codebook_size, model.frame_rate)
    print(f"codebook usage on {sum(c.shape[-1] for c in codes)} frames: "
          f"{' '.join(f'{100 * u:.0f}%' for u in s['usage'])} of {model.codebook_size} entries; "
          f"entropy bitrate {s['bitrate_entropy'] / 1000:.3f} of "
          f"{s['bitrate_nominal'] / 1000:.3f} kbps", flush=True)
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
    m = trainer.model
    if cfg.semantic != "none" and not start:  # every rank fits the same (deterministic)
        fit_semantic_units(m, files, run.semantic_fit_files, run.seed, quiet=not master)
    n_qs = sorted(set(cfg.dropout_choices))  # the token rates it was trained for
    if master:
        out.mkdir(parents=True, exist_ok=True)
        n_g = sum(p.numel() for p in m.parameters()) / 1e6
        n_d = sum(p.numel() for p in trainer.disc.parameters()) / 1e6
        how = f"resumed at step {trainer.step_count}" if start else "new run"
        print(f"FreqCodec {how}: {n_g:.2f}M codec + {n_d:.2f}M discriminator parameters, "
              f"{m.frame_rate:g} Hz x {m.num_codebooks} x {m.codebook_size} entries = "
              f"{m.bitrate(1) / 1000:.3g} ... {m.bitrate() / 1000:.3g} kbps"
              f"{' (with the semantic tokens)' if cfg.semantic != 'none' else ''}, {len(files)} "
              f"training files, {world} process(es) on {device}"
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
            evaluate(trainer.model, held_out, n_qs, f"step {trainer.step_count}", metrics)
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


def reconstruct(model, wav, n_q=None):
    """wav (1, T) or (B, 1, T) -> the reconstruction with n_q codebooks (default all)."""
    x = wav if wav.dim() == 3 else wav[None]
    y = model.decode(model.encode(x, n_q))[..., :x.shape[-1]]
    return y if wav.dim() == 3 else y[0]


def read_codes(path, model):
    """The Encoded (batch 1) and sample count of an --encode file, checked against the model."""
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
        scale = torch.from_numpy(npz["scale"]).float() if "scale" in npz else None
        semantic = (torch.from_numpy(npz["semantic"].astype(np.int64))[None]
                    if "semantic" in npz else None)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a codes file written by --encode ({e})") from None
    mine = (NAME, model.codebook_size, model.sample_rate, model.frame_rate)
    if meta != mine:
        raise ValueError(f"{path} holds {meta[0]} codes ({meta[1]}-entry codebooks, {meta[2]} Hz, "
                         f"{meta[3]:g} frames/s); this checkpoint is a {NAME} with {mine[1]}-entry "
                         f"codebooks at {mine[2]} Hz, {mine[3]:g} frames/s")
    if codes.dim() != 2:
        raise ValueError(f"{path}: codes must be (codebooks, frames), got {tuple(codes.shape)}")
    return Encoded(codes[None], scale, semantic), num_samples


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
                    "recipe's size")


def build_parser():
    p = Parser(description="FreqCodec (FunCodec, Du et al. 2024): train, encode, decode, "
               "evaluate.", allow_abbrev=False)
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
    p.add_argument("--official", metavar="PATH", help="FunCodec's model.pth instead of --ckpt")
    p.add_argument("--n_q", type=int, help="codebooks for encode/reconstruct (default: all)")
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
        raise ValueError("--ckpt (e.g. runs/freqcodec/model.pt) or --official model.pth "
                         "is required")
    model = FreqCodec.from_official(args.official) if args.official else FreqCodec.load(args.ckpt)
    source = args.official or args.ckpt
    metrics = evaluation.check_available(evaluation.parse_metrics(args.metrics or
                                                                  TrainConfig.metrics))
    if args.n_q is not None and not 1 <= args.n_q <= model.num_codebooks:
        raise ValueError(f"--n_q must be in 1..{model.num_codebooks}, got {args.n_q}")
    if args.eval:
        limit = args.eval_utterances or TrainConfig.eval_utterances
        n_qs = [args.n_q] if args.n_q else sorted(set(model.cfg.dropout_choices))
        if args.data and not args.data.endswith(".jsonl"):  # a user's folder: all of its files
            files = [(f, None) for f in resolve_files(args.data)[:limit]]
            evaluate(model, files, n_qs, source, metrics, f"files of {args.data}", notice=True)
        else:
            files = eval_utterances(args.data, limit)
            evaluate(model, files, n_qs, source, metrics)
        codebook_usage(model, files)
        return
    if not args.out:
        raise ValueError("--out is required")
    if args.encode:
        wav, sr = load(args.encode, model.sample_rate, 1, notice=True)
        sent = model.encode(wav[None], args.n_q)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if model.codebook_size <= 2 ** 15 else np.int32  # holds every id
        extra = {"scale": sent.scale[0].numpy()} if sent.scale is not None else {}
        if sent.semantic is not None:
            extra["semantic"] = sent.semantic[0].numpy().astype(np.int16)
        np.savez(args.out, codes=sent.codes[0].numpy().astype(dtype), sample_rate=sr, model=NAME,
                 num_samples=wav.shape[-1], codebook_size=model.codebook_size,
                 frame_rate=model.frame_rate, **extra)
        Q, L = sent.codes.shape[1:]
        print(f"{args.encode}: {Q} codebooks x {L} frames ({model.bitrate(Q) / 1000:g} kbps) "
              f"-> {args.out}")
    elif args.decode:
        sent, num_samples = read_codes(args.decode, model)
        wav = model.decode(sent)[0, :, :num_samples]  # (1, T)
        save(args.out, wav, model.sample_rate)
        print(f"{args.decode} -> {args.out} ({num_samples / model.sample_rate:.2f} s)")
    else:  # --reconstruct
        wav, sr = load(args.reconstruct, model.sample_rate, 1, notice=True)
        rec = reconstruct(model, wav, args.n_q)
        save(args.out, rec, sr)
        png = Path(args.out).with_suffix(".png")
        plot_comparison(png, wav, rec, sr, title=Path(args.reconstruct).name)
        per_pair = [m for m in metrics if not evaluation.METRICS[m].needs_transcript]
        q, notes = evaluation.score(wav, rec, sr, per_pair)
        shown = ", ".join(f"{k} {v:.3f}" if math.isfinite(v) else f"{k} n/a" for k, v in q.items())
        print(f"{args.reconstruct} -> {args.out} (and the spectrograms {png}) at "
              f"{model.bitrate(args.n_q) / 1000:g} kbps: {shown}")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
