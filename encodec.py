"""
EnCodec: High Fidelity Neural Audio Compression, in one file.

Defossez, Copet, Synnaeve, Adi. TMLR 2023. arXiv 2210.13438.
Official code: facebookresearch/encodec, compared against PyPI `encodec` 0.1.1 (inference) and
for training against audiocraft's compression solver, which the paper's training followed.

Paper -> code
  §3.1 encoder / decoder ........ SConv1d, SConvTranspose1d, ResnetBlock, SLSTM, Encoder, Decoder
  §3.1 48 kHz: 1 s chunks ....... EnCodec.encode / decode (segment, overlap, scale), overlap_add
  §3.2 RVQ, bandwidths .......... Codebook (EMA, k-means, dead codes), ResidualVectorQuantizer
  released weights .............. EnCodec.from_official (encodec_24khz / 48khz .th, Hugging Face)
  streaming ..................... EnCodec.streaming()

Shapes: B batch, C audio channels, T samples, F frames (T / M), M hop = prod(ratios) = 320,
D latent dim, Q codebooks in use, K codebook size, N rows of flattened (B*F, D) frames.
`F` is torch.nn.functional.

DEVIATIONS from the official code (each tagged `# DEVIATION` where it happens); none changes
what the released weights compute at inference, which is tested equal to `encodec` 0.1.1.
  1. The RVQ residual keeps its gradient path (facebookresearch/encodec issue #25): the official
     straight-through trick inside each layer leaves r_{i+1} with no gradient, so only the first
     codebook's commitment term reaches the encoder. Fixed here, for training only.
  2. Dead-code replacement that takes effect: the official code writes the new entry into
     `embed` and, in the same call, overwrites `embed` with embed_avg / cluster_size, so the
     replacement is undone at once (measured: tests/test_encodec.py). Here the EMA sums and
     counts are replaced too, as soundstream.py does.

Commands
  python encodec.py --reconstruct in.wav --official encodec_24khz-d7cc33bc.th --out out.wav
"""

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

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
    dimension: int = 128           # D = 128 (§3.1)
    lstm_layers: int = 2           # "a two-layer LSTM for sequence modelling" (§3.1)
    true_skip: bool = False        # official code: a 1x1 conv on the residual skip, not identity
    pad_mode: str = "reflect"      # official code: reflect padding (audiocraft: "constant")
    compress: int = 2              # official code: residual branch at half the channels
    kernel_size: int = 7           # first and last convs: kernel 7 (§3.1)
    residual_kernel_size: int = 3  # residual unit: kernel 3 then 1 (§3.1)
    dilation_base: int = 2         # official code: dilation 2^j for residual layer j (one here)
    num_quantizers: int = 32       # 24 kbps at 75 Hz with 10-bit codebooks (§3.2)
    codebook_size: int = 1024      # 1024 entries per codebook (§3.2)
    bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps (§4.1)
    normalize: bool = False        # 48 kHz: each segment divided by its RMS, sent as `scale`
    segment: float = 0.0           # 48 kHz: 1 s segments (§3.1); 0: the whole input at once
    overlap: float = 0.01          # 48 kHz: 10 ms overlap between segments (§3.1)
    ema_decay: float = 0.99        # codebook EMA decay 0.99 (§3.2)
    kmeans_iters: int = 50         # official code: 50 k-means iterations on the first batch
    dead_code_threshold: float = 2.0  # official code: replace entries with EMA count < 2


PRESETS = {
    "24khz": Config(),
    # encodec_model_48khz: stereo, not causal, time-group norm, 150 Hz, 16 x 1024 (§4.1)
    "48khz": Config(sample_rate=48000, channels=2, causal=False, norm="time_group_norm",
                    num_quantizers=16, bandwidths=(3.0, 6.0, 12.0, 24.0), normalize=True,
                    segment=1.0),
    # AudioGen's tokenizer (audiocraft encodec_audiogen_16khz, reference/lms.md §1.2): 16 kHz,
    # 50 Hz, 4 x 2048 (2.2 kbps), 64 filters, identity skips, constant padding, not causal
    "audiogen16k": Config(sample_rate=16000, causal=False, n_filters=64, true_skip=True,
                          pad_mode="constant", num_quantizers=4, codebook_size=2048,
                          bandwidths=(2.2,)),
}
CHOICES = {"norm": ("weight_norm", "time_group_norm", "none"),
           "pad_mode": ("reflect", "constant")}


def check_config(cfg):
    """One-line errors for values the model cannot be built with."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; "
                             f"got {getattr(cfg, name)!r}")
    if cfg.causal and cfg.norm == "time_group_norm":
        raise ValueError("time_group_norm normalises over the whole signal: it cannot be causal")

# -------------------------------------------------------------------------------------------------
# Building blocks: the official code's streamable convolutions (module names = its keys)


def pad1d(x, left, right, mode):
    """F.pad that also reflects inputs shorter than the padding: they are first extended with
    zeros on the right, as the official code does (so a 100-sample input works)."""
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
        self.norm = nn.GroupNorm(1, conv.out_channels) if norm == "time_group_norm" else nn.Identity()


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
        y = F.conv_transpose1d(x, conv.weight, None, self.stride)  # causal: no norm but WN
        if self.state is not None:  # add the tail the previous chunk left unfinished
            y = torch.cat([y[..., :self.trim] + self.state, y[..., self.trim:]], dim=-1)
        self.state = y[..., y.shape[-1] - self.trim:]
        return y[..., :y.shape[-1] - self.trim] + conv.bias[:, None]


class ResnetBlock(nn.Module):
    """§3.1 residual unit: ELU, conv k=3 to C/2, ELU, conv k=1 back to C, plus the skip (a 1x1
    conv in the released models, `shortcut`). Keys: block.1, block.3, shortcut."""

    def __init__(self, cfg, dim, dilation):
        hidden = dim // cfg.compress
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
        return (self.embed.pow(2).sum(1) - 2 * z @ self.embed.t()).argmin(dim=1)  # (N,)

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
                commit.append(F.mse_loss(residual, q))
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

    sample_rate = property(lambda self: self.cfg.sample_rate)
    channels = property(lambda self: self.cfg.channels)
    hop_length = property(lambda self: math.prod(self.cfg.ratios))  # M = 320
    # official code: frames per second rounded up (75 Hz at 24 kHz, 150 Hz at 48 kHz)
    frame_rate = property(lambda self: math.ceil(self.cfg.sample_rate / self.hop_length))
    num_codebooks = property(lambda self: self.cfg.num_quantizers)
    codebook_size = property(lambda self: self.cfg.codebook_size)

    def bandwidth(self, n_q=None):
        """kbps with n_q codebooks: frame_rate * n_q * log2(K) / 1000."""
        return self.frame_rate * (n_q or self.num_codebooks) * math.log2(self.codebook_size) / 1e3

    def n_q_for_bandwidth(self, kbps=None):
        """The official rule: n_q = max(1, floor(kbps / per-codebook kbps)); None: all."""
        if kbps is None:
            return self.num_codebooks
        if kbps not in self.cfg.bandwidths:
            raise ValueError(f"this model codes {', '.join(f'{b:g}' for b in self.cfg.bandwidths)}"
                             f" kbps; got {kbps:g}")
        return max(1, math.floor(kbps / self.bandwidth(1)))

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
    def encode(self, wav, bandwidth=None, sample_rate=None):
        """wav (B, C, T) -> Encoded(codes (B, n_q, F), scale (B, S) or None)."""
        self.check_wav(wav, sample_rate)
        n_q = self.n_q_for_bandwidth(bandwidth)
        codes, scales = [], []
        with parametrize.cached():  # weight norm computed once per call, not per chunk
            for start, length in self.segments(wav.shape[-1]):
                x, scale = self.normalize(wav[..., start:start + length])
                codes.append(self.quantizer.encode(self.encoder(x), n_q))
                scales.append(scale)
        scale = torch.cat(scales, dim=1) if self.cfg.normalize else None
        return Encoded(torch.cat(codes, dim=-1), scale)

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
        if self.cfg.segment:  # F frames per full segment; the last one may be shorter
            per = math.ceil(int(self.cfg.segment * self.sample_rate) / self.hop_length)
            chunks = codes.split(per, dim=-1)
        else:
            chunks = [codes]
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
        if not self.cfg.causal or self.cfg.segment:
            raise ValueError("only a causal model without segments can stream (the 24 kHz one)")
        mods = [m for m in self.modules() if isinstance(m, (SConv1d, SConvTranspose1d, SLSTM))]
        for m in mods:
            m.streaming, m.state = True, None
        try:
            yield self
        finally:
            for m in mods:
                m.streaming, m.state = False, None

    @classmethod
    def from_official(cls, source, cfg=None):
        """Meta's released weights, unedited: a path to encodec_24khz-d7cc33bc.th or
        encodec_48khz-7e698e3e.th, or a state dict in the official or the Hugging Face
        `transformers` naming. Without `cfg` the preset is told from the weights' shapes."""
        state = source if isinstance(source, dict) else torch.load(source, map_location="cpu",
                                                                   weights_only=True)
        if cfg is None:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            conv0 = next(v for k, v in shapes.items() if re.match(
                r"encoder\.(model|layers)\.0\..*(weight_v|conv\.weight|original1)$", k))
            embeds = [v for k, v in shapes.items() if k.endswith("codebook.embed")]
            found = (conv0[1], conv0[0], len(embeds), embeds[0][0] if embeds else 0)
            known = {(c.channels, c.n_filters, c.num_quantizers, c.codebook_size): name
                     for name, c in PRESETS.items() if name in ("24khz", "48khz")}
            if found not in known:
                raise ValueError(f"these weights ({found[0]} channel(s), {found[1]} filters, "
                                 f"{found[2]} x {found[3]} codebooks) are neither released "
                                 f"model; pass cfg=")
            cfg = PRESETS[known[found]]
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
