"""
AudioLM: a Language Modeling Approach to Audio Generation, in one file.

Borsos, Marinier, Vincent, Kharitonov, Pietquin, Sharifi, Roblek, Teboul, Grangier, Tagliasacchi,
Zeghidour. IEEE/ACM TASLP 2023 (arXiv 2209.03143). No official code was released: this file
follows the paper; lucidrains/audiolm-pytorch (audiolm_pytorch/audiolm_pytorch.py) was read for
contrast. Its
generic LM parts are marked copies of valle.py (attention with a KV cache, Block, filter_logits,
sample) and, through it, of soundstream.py's training blocks (tests/test_copies.py).

Paper -> code (sections of arXiv 2209.03143 v2, as we read them)
  §III-A components ............... tokenizer (semantic + codec), three LMs, the codec decodes
  §III-B semantic tokens .......... mfcc_frames (a stand-in for w2v-BERT: DEVIATION 1),
                                    SemanticTokenizer (standardise, k-means), dedup
          acoustic tokens ......... load_codec (soundstream.py through the codec interface)
          the trade-off (Table I) . probe (phone error rate of a linear CTC probe, speaker id)
  §III-C three stages ............. Layout (the sequences, offsets, start / end tokens, which ids
                                    are legal where), StageLM (a decoder-only transformer with
                                    T5 relative positions), Trainer, train
  §III-D inference ................ StageLM.generate (KV cache, per-row end tokens),
                                    AudioLM.generate (unconditional, continuation, acoustic
                                    generation from given semantic tokens)
  §IV, §V evaluation .............. heldout_loss (against the unigram), evaluate_continuation
                                    (next digit, voice), evaluate_acoustic (resynthesis from
                                    ground-truth semantic tokens)

Shapes: B batch, S sequence, T_s semantic tokens (25 Hz), T frames of acoustic tokens (50 Hz),
Q codebooks (Q' = the coarse ones), K codebook size, D model width, H heads, V a stage's vocabulary.
`F` is torch.nn.functional.

The three stages (§III-C), each its own decoder-only transformer over one flat sequence:
  semantic  [S_BOS] z_1 .. z_n [EOS]                        p(z_t | z_<t)
  coarse    [S_BOS] z_1 .. z_n [A_BOS] y_1^1 .. y_1^Q' y_2^1 .. [EOS]
                                                            p(y_t^q | z, y_<t^<=Q', y_t^<q)
  fine      [C_BOS] y_1^1 .. y_T^Q' [F_BOS] y_1^Q'+1 .. y_1^Q y_2^Q'+1 ..
                                                            p(y_t^q | y^<=Q', y_<t^>Q', y_t^<q)
z are semantic tokens with consecutive repeats removed (stages 1-2, as the paper does), y acoustic
tokens flattened time-major ("row-major", §III-B) with the paper's per-codebook offsets
(o_q = (q - 1) mod Q * K) so that each codebook has its own ids. Only the part after the last
start token is predicted; at each position only the ids of the codebook due there are legal,
and the end token only where a frame would begin.

DEVIATIONS from the paper (each tagged `# DEVIATION` where it happens)
  1. Semantic tokens. §III-B clusters the normalised layer-7 MLM features of a 0.6B w2v-BERT
     (K = 1024, 25 Hz). No such model can be downloaded here, so the built-in features are MFCCs
     with deltas, 4 frames of 10 ms stacked to one per 40 ms (25 Hz), standardised, then k-means:
     HuBERT's first-iteration targets (Hsu et al. 2021), which need nothing downloaded. They keep
     far less phonetic and far more speaker information than w2v-BERT's (`--probe` measures it).
     Real self-supervised features plug in with --features DIR (a .npy per audio file).
  2. Training and evaluation data: the synthetic demo corpus (22 minutes), not Libri-Light's 60k
     hours; metrics offline here: Whisper-base and pocketsphinx's digit grammar for the content,
     resemblyzer for the voice (the paper: a Conformer ASR, a speaker classifier). Compare the
     figures with the ground truth's and the codec's, never with the paper's.
  3. The paper's inference settings are not in its text that we could read; the default
     temperatures (0.6 / 0.8 / 0.6 for the three stages) come from readers' notes of the paper.
     No sliding window: a generation is at most the coarse stage's training context
     (coarse_seconds; stage 1 is capped at as many semantic tokens).
  4. The tiny preset (not the paper's): its transformers also add a sinusoid of each token's
     frame (time) to its embedding, and keep the semantic tokens' repeats, so that a semantic
     token and the acoustic tokens of its frames (and a fine token and the coarse ones of its
     frame) share a position. With T5's buckets alone a frame's semantic token is hundreds of
     positions back, in the last bucket: the coarse stage trained that way scored 4.702 nats on
     held-out coarse codes after their own semantic tokens and 4.733 after another utterance's
     (it ignored them), and the fine stage was 0.03 nats below its unigram (benchmarks/results/
     audiolm_tiny_t5_only_eval.txt).

Where the paper is silent the comment says "our choice" or names lucidrains: pre-norm blocks,
GPT-2's init, AdamW with warm-up and linear decay, no end token as the first token.

Exact resume: on CPU a resumed run repeats the uninterrupted one bit for bit (tested).

Commands
  python audiolm.py --train --preset tiny                      # all three stages, demo corpus
  python audiolm.py --train --preset tiny --stage coarse       # one stage
  python audiolm.py --train --resume --preset tiny             # continue where it stopped
  torchrun --standalone --nproc_per_node=8 audiolm.py --train --preset paper --data libri.jsonl \
      --codec runs/soundstream/model.pt --features w2v_bert_layer7/
  python audiolm.py --sample --ckpt checkpoints/audiolm_tiny.pt --prompt voice.wav --out out.wav
  python audiolm.py --sample --ckpt runs/audiolm_tiny --out babble.wav      # unconditional
  python audiolm.py --eval --ckpt runs/audiolm_tiny
  python audiolm.py --probe --ckpt runs/audiolm_tiny            # the semantic/acoustic trade-off
"""

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
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

from common.audio import AudioError, load, save
from common.data import demo_manifest, read_manifest
from common.metrics import mel_spectrogram

NAME = "audiolm"
STAGES = ("semantic", "coarse", "fine")
CHOICES = {"amp": ("none", "bf16", "fp16"), "stage": ("all",) + STAGES}
CODEC_CLASSES = {"encodec": "EnCodec", "soundstream": "SoundStream", "freqcodec": "FreqCodec",
                 "bigcodec": "BigCodec"}  # checkpoint "model" name -> the codec file's class

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What rebuilds the three models. Defaults: the paper's (§III-C, §IV "implementation")."""
    # The paper: "0.3B per stage". These sizes give 153.3M / 161.7M / 176.3M parameters for the
    # three stages (151M in the blocks; the rest embeddings and heads): about half. We follow the
    # stated sizes; what the 0.3B counts is not said.
    dim: int = 1024                # "embedding dimension of 1024", identical in all stages
    heads: int = 16                # 16 attention heads
    layers: int = 12               # 12 layers
    ffn: int = 4096                # feed-forward 4096
    dropout: float = 0.1           # dropout 0.1
    attn_dropout: float = 0.1      # on the attention weights too (our choice: the same 0.1)
    rel_buckets: int = 32          # "T5-style relative positional embeddings": T5's 32 buckets
    rel_distance: int = 128        # and its max distance 128 (Raffel et al. 2020, §2.1)
    semantic_vocab: int = 1024     # k-means K = 1024 (§III-B)
    semantic_rate: float = 25.0    # 25 Hz: one semantic token per 40 ms (§III-B)
    codebook_size: int = 1024      # SoundStream N = 1024 (§III-B)
    num_codebooks: int = 12        # Q = 12: 50 Hz x 12 x 10 bits = 6 kbps (§III-B, Table I)
    coarse_codebooks: int = 4      # Q' = 4: coarse 2 kbps, fine the other 8 (§III-C)
    frame_rate: float = 50.0       # SoundStream at 16 kHz with M = 320 (§III-B)
    semantic_seconds: float = 30.0  # training crops of 30, 10 and 3 s for the three stages (§IV);
    coarse_seconds: float = 10.0   # the coarse stage generates at most this much (DEVIATION 3)
    fine_seconds: float = 3.0      # the fine stage runs on non-overlapping 3 s chunks (§III-C)
    dedup: bool = True             # stages 1-2 read semantic tokens without repeats (§IV)
    time_positions: bool = False   # a sinusoid of each token's frame too (DEVIATION 4; needs no
                                   # dedup: the semantic stage would not say how long a token is)


@dataclass
class TrainConfig:
    """How a stage is trained: data, tokens, optimiser and the run."""
    stage: str = "all"             # all (semantic, coarse, fine in turn) or one of them
    codec: str = "runs/soundstream/model.pt"  # python soundstream.py --train --preset audiolm
    features: str = "mfcc"         # semantic features: mfcc (built in) or a folder of .npy
    kmeans_frames: int = 200_000   # frames the k-means is fitted on, drawn at random (our choice)
    kmeans_iters: int = 50         # Lloyd iterations after k-means++ (our choice)
    lr: float = 3e-4               # AdamW (the paper: not stated; lucidrains' 3e-4)
    warmup_steps: int = 10_000     # linear warm-up, then linear decay (our choice)
    min_lr_ratio: float = 0.1      # the decay ends at lr * this (our choice)
    betas: tuple[float, ...] = (0.9, 0.95)  # (our choice)
    weight_decay: float = 0.01     # (our choice)
    grad_clip: float = 1.0         # (our choice; lucidrains 0.5)
    batch_size: int = 256          # "batch size of 256" (§IV)
    data: str = ""                 # .jsonl manifest; "": the demo corpus
    out: str = "runs/audiolm"      # OUT/<stage>/ckpt.pt, model.pt, log; the token caches
    steps: int = 1_000_000         # "for 1M steps", each stage (§IV)
    seed: int = 0                  # weights, k-means, batches and crops follow from it
    log_every: int = 100           # steps between log lines (run settings: our choice)
    sample_every: int = 10_000     # steps between samples (OUT/<stage>/samples/stepN.txt)
    ckpt_every: int = 5000         # steps between OUT/<stage>/ckpt.pt and model.pt
    num_workers: int = 0           # DataLoader workers
    threads: int = 0               # CPU threads; 0: the idle cores
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU


PRESETS = {
    "paper": (Config(), TrainConfig()),
    # CPU preset on the shipped SoundStream tokenizer (8 x 256 at 50 Hz; coarse = its first 4):
    # narrow and shallow, K = 128 clusters (HuBERT's first iteration: 100), crops of 8 (whole
    # demo utterances), 3 and 1 s; no dropout on the attention weights (on CPU those masks cost
    # 42 % of a step: valle.py's tiny preset); time positions and the repeats kept (DEVIATION 4)
    "tiny": (Config(dim=128, heads=4, layers=4, ffn=512, dropout=0.1, attn_dropout=0.0,
                    semantic_vocab=128, codebook_size=256, num_codebooks=8, coarse_codebooks=4,
                    semantic_seconds=8.0, coarse_seconds=3.0, fine_seconds=1.0, dedup=False,
                    time_positions=True),
             TrainConfig(codec="checkpoints/soundstream_16khz_8x256.pt", kmeans_iters=30,
                         lr=1e-3, warmup_steps=200, batch_size=8, out="runs/audiolm_tiny",
                         steps=1000, log_every=100, sample_every=1000, ckpt_every=250)),
}

# -------------------------------------------------------------------------------------------------
# Semantic tokens (§III-B): frame features, standardised, clustered by k-means

FEATURE_RATE = 16000  # the built-in features read 16 kHz audio (the paper's rate)


def deltas(x, n=2):
    """Regression deltas over +-n frames (HTK's formula), x (C, T) -> (C, T), edges repeated."""
    pad = F.pad(x[None], (n, n), mode="replicate")[0]
    T = x.shape[-1]
    return sum(k * (pad[:, n + k:n + k + T] - pad[:, n - k:n - k + T])
               for k in range(1, n + 1)) / (2 * sum(k * k for k in range(1, n + 1)))


def mfcc_frames(wav, sample_rate=FEATURE_RATE):
    """The built-in semantic features (DEVIATION 1): (T_s, 156) for a mono wav (T,) at 16 kHz,
    T_s = ceil(T / 640). 13 MFCCs of 40 log-mel bands (25 ms windows every 10 ms), their deltas
    and delta-deltas (HuBERT's first-iteration features, Hsu et al. 2021 §IV-B: 39 x 100 Hz),
    less their utterance mean (cepstral mean normalisation, our choice), and 4 consecutive
    frames stacked into one per 40 ms: the paper's 25 Hz."""
    if sample_rate != FEATURE_RATE:
        raise ValueError(f"the MFCC features read {FEATURE_RATE} Hz audio, got {sample_rate} Hz")
    # 25 ms windows (400) every 10 ms (160), 40 bands (HTK's usual MFCC front end, our choice)
    mel = mel_spectrogram(wav.float(), sample_rate, n_fft=400, hop_length=160, n_mels=40,
                          power=2.0)  # (40, F = 1 + T // 160)
    logmel = torch.log(mel + 1e-6)  # the floor keeps silence finite (our choice)
    k, m = torch.arange(13.0)[:, None], torch.arange(40.0)[None]
    dct = torch.cos(math.pi / 40 * (m + 0.5) * k) * math.sqrt(2 / 40)  # DCT-II, orthonormal
    dct[0] /= math.sqrt(2)
    c = dct @ logmel  # (13, F)
    c = c - c.mean(dim=1, keepdim=True)
    feats = torch.cat([c, deltas(c), deltas(deltas(c))])  # (39, F)
    n = -(-wav.shape[-1] // 640)  # T_s = ceil(T / 640)
    feats = F.pad(feats[None], (0, max(0, 4 * n - feats.shape[-1])), mode="replicate")[0]
    return feats[:, :4 * n].T.reshape(n, 4 * 39)  # (T_s, 156): 4 frames of 39 side by side


def feature_frames(features, path=None, wav=None):
    """Semantic feature frames (T_s, d) of one utterance: the built-in MFCCs of `wav` (T,) at
    16 kHz, or, when `features` is a folder, the user's own (for example w2v-BERT or HuBERT
    layer outputs at the tokenizer's 25 Hz), FOLDER/<the audio file's stem>.npy, (T_s, d)."""
    if features == "mfcc":
        return mfcc_frames(wav)
    f = Path(features) / f"{Path(path).stem}.npy"
    if not f.is_file():
        raise FileNotFoundError(f"semantic features {f} not found (--features {features}: one "
                                f"<audio stem>.npy of (frames, dim) per audio file)")
    x = torch.from_numpy(np.load(f)).float()
    if x.dim() != 2:
        raise ValueError(f"{f}: features must be (frames, dim), got {tuple(x.shape)}")
    return x


def kmeans(x, k, iters, generator):
    """Centroids (k, d) of x (N, d): k-means++ seeding (Arthur & Vassilvitskii 2007), then Lloyd
    iterations; a cluster left empty takes the point farthest from its centroid."""
    if len(x) < k:
        raise ValueError(f"{len(x)} feature frames are fewer than the {k} clusters")
    centroids = x[torch.randint(len(x), (1,), generator=generator)]
    d2 = torch.cdist(x, centroids).pow(2)[:, 0]  # (N,) to the nearest centroid so far
    for _ in range(1, k):
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
        d2 = torch.minimum(d2, (x - x[pick]).pow(2).sum(-1))
    for _ in range(iters):
        dist_ = torch.cdist(x, centroids)  # (N, k)
        assign = dist_.argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            far = dist_.gather(1, assign[:, None])[:, 0].topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


class SemanticTokenizer:
    """Feature frames -> semantic ids: each dimension standardised (zero mean, unit variance over
    the training frames: §III-B, "significantly improves their phonetic discriminability"), then
    the nearest of K k-means centroids. `feature` names the features it was fitted on ("mfcc" or
    "npy"), so that tokens are never read from features of another kind."""

    def __init__(self, feature, mean, std, centroids):
        self.feature, self.mean, self.std, self.centroids = feature, mean, std, centroids

    @classmethod
    def fit(cls, frames, k, feature, iters=50, max_frames=200_000, seed=0):
        """frames: a list of (T_i, d) tensors; fitted on at most max_frames of them (at random)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.cat(frames).float()
        if len(x) > max_frames:
            x = x[torch.randperm(len(x), generator=g)[:max_frames]]
        mean, std = x.mean(0), x.std(0).clamp(min=1e-5)  # (d,) each; the floor: constant dims
        return cls(feature, mean, std, kmeans((x - mean) / std, k, iters, g))

    @property
    def vocab(self):
        return len(self.centroids)

    def kind(self):
        return f"{self.feature} features of dim {len(self.mean)}"

    def check(self, features, dim=None):
        """A one-line error when `features` (a --features value) is not the tokenizer's kind."""
        kind = "mfcc" if features == "mfcc" else "npy"
        if kind != self.feature or (dim is not None and dim != len(self.mean)):
            got = f"{kind} features" + (f" of dim {dim}" if dim is not None else "")
            raise ValueError(f"the semantic tokenizer was fitted on {self.kind()}; got {got} "
                             f"(--features {features})")

    def encode(self, frames):
        """(T_s, d) feature frames -> (T_s,) ids: the nearest centroid of each standardised one."""
        if frames.dim() != 2 or frames.shape[1] != len(self.mean):
            raise ValueError(f"the semantic tokenizer was fitted on {self.kind()}; got frames "
                             f"of shape {tuple(frames.shape)}")
        return torch.cdist((frames.float() - self.mean) / self.std, self.centroids).argmin(1)

    def state(self):
        return {"feature": self.feature, "mean": self.mean, "std": self.std,
                "centroids": self.centroids}

    @classmethod
    def from_state(cls, d):
        return cls(d["feature"], d["mean"], d["std"], d["centroids"])


def repeats_removed(cfg, tokens):
    """The semantic tokens as stages 1-2 read them: without repeats unless cfg.dedup is off."""
    return dedup(tokens) if cfg.dedup else tokens


def dedup(tokens):
    """Consecutive repeats removed (stages 1-2: "removing consecutive repetitions of the semantic
    tokens", §IV after Lakhotia et al. 2021; lucidrains' unique_consecutive): (T,) -> (n,)."""
    return torch.unique_consecutive(tokens)

# -------------------------------------------------------------------------------------------------
# Generic LM parts: attention with a KV cache, the block, sampling (marked copies of valle.py)


# Copied from valle.py: Attention
class Attention(nn.Module):
    """Multi-head self-attention (scaled dot product) with an optional KV cache: `cache` is a dict
    that holds the keys and values of earlier positions, (B, H, S_past, D/H) each, extended in
    place."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask=None, cache=None):  # x (B, S, D), mask (S, S_past + S) bool
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v (B, H, S, D/H) each
        if cache is not None:  # k, v become (B, H, S_past + S, D/H)
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))  # (B, H, S, D/H) -> (B, S, D)


# Copied from valle.py: AdaptiveLayerNorm
class AdaptiveLayerNorm(nn.Module):
    """§4.2.2 (NAR): "adaptive layer normalization" on the stage: LN without its own affine, then
    (1 + gamma(c)) * LN(h) + beta(c), gamma and beta a linear map of the condition embedding c.
    The 1 + is our choice (lifeiteng: gamma(c) on an affine LN): with a small init the norm starts
    as a plain LN; without it the NAR's blocks start switched off (gamma ~ 0): on the tiny preset
    its loss fell 0.09 nats in the first 100 steps, against 0.46 with it (the same batches,
    benchmarks/results/lm_init_ab.txt)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.project = nn.Linear(dim, 2 * dim)

    def forward(self, x, cond):  # x (B, S, D), cond (B, D)
        gamma, beta = self.project(cond)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return (1 + gamma) * self.norm(x) + beta


# Copied from valle.py: Block
class Block(nn.Module):
    """Pre-norm transformer layer (lifeiteng norm_first): x + Attn(LN(x)), then x + FFN(LN(x)),
    with a ReLU feed-forward of width `ffn` and dropout after each sub-layer. adaptive: both norms
    are AdaptiveLayerNorm on `cond` (the NAR's stage)."""

    def __init__(self, dim, heads, ffn, dropout, adaptive=False, attn_dropout=None):
        super().__init__()
        norm = AdaptiveLayerNorm if adaptive else nn.LayerNorm
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.adaptive = adaptive
        self.attn = Attention(dim, heads, dropout if attn_dropout is None else attn_dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache=None, cond=None):  # (B, S, D) -> (B, S, D)
        h = self.norm1(x, cond) if self.adaptive else self.norm1(x)
        x = x + self.drop(self.attn(h, mask, cache))
        h = self.norm2(x, cond) if self.adaptive else self.norm2(x)
        return x + self.drop(self.mlp(h))


# Copied from valle.py: sinusoids
def sinusoids(length, dim, device=None):
    """(length, dim) sine/cosine positions (Vaswani et al. 2017): sin on even, cos on odd
    channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


# Copied from valle.py: check_sampling
def check_sampling(temperature=1.0, top_k=0, top_p=1.0):
    """A one-line error for settings no sampler can use."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 (0: off) and top_p in (0, 1] (1: off); got top_k "
                         f"{top_k}, top_p {top_p}")


# Copied from valle.py: filter_logits
def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits (0: all) and the smallest set whose probabilities sum to at
    least top_p (1.0: all); the others become -inf. logits (..., V)."""
    check_sampling(1.0, top_k, top_p)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# Copied from valle.py: sample
def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One id per row of logits (B, V): greedy at temperature 0, else multinomial over the filtered
    softmax(logits / temperature)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -------------------------------------------------------------------------------------------------
# The sequences of the three stages (§III-B, §III-C): ids, offsets, start and end tokens


class Layout:
    """One stage's vocabulary and sequence. Ids: the semantic tokens [0, Ks) (semantic and coarse
    stages), then each codebook's K ids at its offset (§III-B: o_q = (q - 1) mod Q * K, shifted
    past the semantic ids in the coarse stage), then the special tokens. The predicted part (after
    the last start token) cycles through `groups` (one codebook, or the semantic ids, per
    position); `legal` (period, V) says which ids may come at each place of that cycle. The end
    token is legal where a new frame (or semantic token) would begin, never as the very first
    predicted token (our choice, as valle.py's), and not at all in the fine stage, whose length
    the coarse tokens fix."""

    def __init__(self, cfg, stage):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        Ks, K, Q, Qc = (cfg.semantic_vocab, cfg.codebook_size, cfg.num_codebooks,
                        cfg.coarse_codebooks)
        if not 1 <= Qc < Q:
            raise ValueError(f"coarse_codebooks must be in 1..{Q - 1} (num_codebooks {Q}), got "
                             f"{Qc}")
        self.stage, self.Ks, self.K, self.Q, self.Qc = stage, Ks, K, Q, Qc
        self.ratio = int(cfg.frame_rate / cfg.semantic_rate)  # frames per semantic token: 2
        if stage == "semantic":
            specials, ids, self.groups = ("S_BOS", "EOS", "PAD"), Ks, [(0, Ks)]
        elif stage == "coarse":  # semantic ids, then the coarse codebooks' (offset by Ks)
            specials, ids = ("S_BOS", "A_BOS", "EOS", "PAD"), Ks + Qc * K
            self.groups = [(Ks + q * K, Ks + (q + 1) * K) for q in range(Qc)]
        else:  # every codebook's ids (the coarse ones are read, the fine ones predicted)
            specials, ids = ("C_BOS", "F_BOS", "PAD"), Q * K
            self.groups = [(q * K, (q + 1) * K) for q in range(Qc, Q)]
        for i, name in enumerate(specials):
            setattr(self, name.lower(), ids + i)
        self.vocab = ids + len(specials)
        self.eos = getattr(self, "eos", None)
        self.offsets = torch.tensor([lo for lo, _ in self.groups]) if stage != "semantic" else None
        self.coarse_offsets = (torch.arange(Qc) * K + (Ks if stage == "coarse" else 0))
        self.period = len(self.groups)
        self.legal = torch.zeros(self.period, self.vocab, dtype=torch.bool)
        for g, (lo, hi) in enumerate(self.groups):
            self.legal[g, lo:hi] = True
        if self.eos is not None:
            self.legal[0, self.eos] = True  # only where a frame (or a token) would begin

    def legal_at(self, j):
        """(N, V) bool: the ids legal at predicted indices j (N,), counted from 0 after the
        stage's last start token."""
        legal = self.legal[j % self.period]
        if self.eos is not None:
            legal[:, self.eos] &= j != 0
        return legal

    def sequence(self, semantic=None, coarse=None, fine=None, end=True):
        """The stage's training sequence and the index of its first predicted token.
        semantic (n,) ids (as the stage reads them: repeats_removed), coarse (Q', T) and fine
        (Q - Q', T) codes.
        end: the end token closes it (semantic, coarse: when the crop reaches the utterance's
        end)."""
        t = lambda *xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        if self.stage == "semantic":
            body = [t(self.s_bos), semantic.long()]
        elif self.stage == "coarse":
            body = [t(self.s_bos), semantic.long(), t(self.a_bos), flatten(coarse, self.offsets)]
        else:
            body = [t(self.c_bos), flatten(coarse, self.coarse_offsets), t(self.f_bos),
                    flatten(fine, self.offsets)]
        start = sum(len(b) for b in body[:-1])
        if end and self.eos is not None:
            body.append(t(self.eos))
        return torch.cat(body), start

    def times(self, tokens):
        """(B, S) ids -> (B, S) the frame of each token (Config.time_positions): semantic token i
        at frame ratio * i, an acoustic token at its own frame (counted from its part's start),
        start tokens and padding at 0, the end token at the frame after the last."""
        t = torch.zeros_like(tokens)
        if self.stage == "fine":
            for lo, hi, n in ((0, self.Qc * self.K, self.Qc),
                              (self.Qc * self.K, self.Q * self.K, self.Q - self.Qc)):
                part = (tokens >= lo) & (tokens < hi)
                t = torch.where(part, (part.cumsum(1) - 1) // n, t)
            return t
        sem = tokens < self.Ks
        t = torch.where(sem, (sem.cumsum(1) - 1) * self.ratio, t)
        if self.stage == "semantic":
            return torch.where(tokens == self.eos, sem.cumsum(1) * self.ratio, t)
        ac = (tokens >= self.Ks) & (tokens < self.Ks + self.Qc * self.K)
        t = torch.where(ac, (ac.cumsum(1) - 1) // self.Qc, t)
        return torch.where(tokens == self.eos, ac.cumsum(1) // self.Qc, t)

    def codes(self, predicted):
        """The predicted ids of the coarse or fine stage (n * period,) -> codes (period, n)."""
        return unflatten(predicted, self.offsets)


def flatten(codes, offsets):
    """codes (n_q, T) -> (T * n_q,) ids, time-major ("row-major", §III-B: y_1^1 .. y_1^Q y_2^1
    ..), codebook q's ids shifted by offsets[q]."""
    return (codes.long() + offsets[:, None]).T.reshape(-1)


def unflatten(ids, offsets):
    """The inverse of flatten: (T * n_q,) -> (n_q, T)."""
    n_q = len(offsets)
    if ids.numel() % n_q:
        raise ValueError(f"{ids.numel()} acoustic ids are not whole frames of {n_q} codebooks")
    return ids.view(-1, n_q).T - offsets[:, None]


def t5_buckets(distance, buckets, max_distance):
    """T5's unidirectional relative-position buckets (Raffel et al. 2020; HF T5Attention's
    _relative_position_bucket with bidirectional=False) of query - key distances >= 0: exact
    below buckets / 2, logarithmic up to max_distance, the last bucket beyond."""
    exact = buckets // 2
    d = distance.clamp(min=0)
    far = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (buckets - exact)).long()
    return torch.where(d < exact, d, far.clamp(max=buckets - 1))


class RelativeBias(nn.Module):
    """A learnt bias per head and distance bucket added to the attention logits, shared by all
    layers (T5's relative position embeddings, §IV), with the causal mask and the key padding
    folded in as -inf."""

    def __init__(self, heads, buckets, max_distance):
        super().__init__()
        self.buckets, self.max_distance = buckets, max_distance
        self.bias = nn.Embedding(buckets, heads)

    def forward(self, q_start, n_q, n_k, pad=None):
        """Additive mask (1 or B, H, n_q, n_k) for queries at positions q_start .. q_start + n_q
        - 1 over keys 0 .. n_k - 1. pad (B, n_k) bool: keys that are padding, hidden from every
        query but their own position (a padding query must see something, or softmax is NaN)."""
        q = torch.arange(q_start, q_start + n_q, device=self.bias.weight.device)[:, None]
        k = torch.arange(n_k, device=q.device)[None]
        bias = self.bias(t5_buckets(q - k, self.buckets, self.max_distance))  # (n_q, n_k, H)
        allowed = (k <= q)[None]  # (1, n_q, n_k)
        if pad is not None:
            allowed = allowed & (~pad[:, None, :] | (k == q)[None])  # (B, n_q, n_k)
        return bias.permute(2, 0, 1)[None].masked_fill(~allowed[:, None], float("-inf"))

# -------------------------------------------------------------------------------------------------
# One stage's model (§III-C): a decoder-only transformer over the stage's sequence


class StageLM(nn.Module):
    """Token embedding, pre-norm blocks with T5 relative positions, and a head over the stage's
    vocabulary, of which only the ids legal at each position are scored (Layout). It keeps the
    semantic tokenizer, the codec path and the feature kind it was trained with (for save)."""

    def __init__(self, cfg, stage, tokenizer=None, codec_path="", features="mfcc"):
        super().__init__()
        self.cfg, self.stage, self.layout = cfg, stage, Layout(cfg, stage)
        self.tokenizer, self.codec_path, self.features = tokenizer, str(codec_path), features
        D = cfg.dim
        self.embedding = nn.Embedding(self.layout.vocab, D)
        self.rel = RelativeBias(cfg.heads, cfg.rel_buckets, cfg.rel_distance)
        if cfg.time_positions:  # DEVIATION 4; embeddings times sqrt(D), as valle.py's (measured)
            frames = self.layout.ratio * int(max(cfg.semantic_seconds, cfg.coarse_seconds)
                                             * cfg.semantic_rate) + 2
            self.register_buffer("pe", sinusoids(frames, D), persistent=False)
            self.time_alpha = nn.Parameter(torch.ones(1))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.ffn, cfg.dropout,
                                          attn_dropout=cfg.attn_dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, self.layout.vocab, bias=False)
        for m in self.modules():  # GPT-2's init (our choice): N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, tokens, start=0):
        """Embeddings (B, S - start, D) of tokens[:, start:] (the earlier ones set their times)."""
        h = self.embedding(tokens[:, start:])
        if not self.cfg.time_positions:
            return self.drop(h)
        times = self.layout.times(tokens)[:, start:].clamp(max=len(self.pe) - 1)
        return self.drop(h * math.sqrt(self.cfg.dim) + self.time_alpha * self.pe[times])

    def forward(self, tokens, pad=None):
        """tokens (B, S) -> logits (B, S, V); position s predicts token s + 1, causally. pad
        (B, S) bool: padding keys (left-padded rows); right padding needs none."""
        h = self.embed(tokens)
        mask = self.rel(0, tokens.shape[1], tokens.shape[1], pad)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))

    def save(self, path):
        atomic_save({"model": NAME, "stage": self.stage, "config": dataclasses.asdict(self.cfg),
                     "tokenizer": self.tokenizer.state(), "codec": self.codec_path,
                     "features": self.features, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        ckpt = load_checkpoint(path, map_location)
        if ckpt.get("stage") not in STAGES:
            raise ValueError(f"{path} is not one stage's checkpoint (stage {ckpt.get('stage')!r})")
        model = cls(config_from_dict(Config, ckpt["config"], path), ckpt["stage"],
                    SemanticTokenizer.from_state(ckpt["tokenizer"]), ckpt["codec"],
                    ckpt.get("features", "mfcc"))
        model.load_state_dict(ckpt["state_dict"])  # model.pt and ckpt.pt both hold it
        return model.eval()

    @torch.no_grad()
    def generate(self, prefix, max_new, first=0, temperature=1.0, top_k=0, top_p=1.0,
                 use_cache=True, generator=None):
        """Continue `prefix` (B, S0), rows left-padded with PAD, by up to max_new tokens; `first`
        is the predicted index of the first new token (Layout.legal_at). Only legal ids are
        sampled, the end token never as the first new one. Every row is at the same predicted
        index. Each row stops at its own end token (later places hold PAD). Returns (B, max_new)
        ids and the number of new tokens of each row before its end token (B,). With use_cache
        the keys and values of earlier positions are kept (each step runs one position);
        without, every step recomputes all."""
        B, dev, L = prefix.shape[0], prefix.device, self.layout
        out = torch.full((B, max_new), L.pad, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_new, dtype=torch.long, device=dev)
        caches = [{} for _ in self.blocks] if use_cache else None
        seq, pad = prefix, prefix == L.pad
        for t in range(max_new):
            start = seq.shape[1] - 1 if use_cache and t > 0 else 0  # only the newest token
            h = self.embed(seq, start)
            mask = self.rel(start, seq.shape[1] - start, seq.shape[1], pad)
            for i, block in enumerate(self.blocks):
                h = block(h, mask, caches[i] if use_cache else None)
            logits = self.head(self.norm(h[:, -1])).float()  # (B, V)
            legal = L.legal_at(torch.tensor([first + t])).to(dev)  # (1, V)
            if t == 0 and L.eos is not None:  # at least one new token (our choice)
                legal[:, L.eos] = False
            token = sample(logits.masked_fill(~legal, float("-inf")), temperature, top_k, top_p,
                           generator)
            token = torch.where(done, L.pad, token)
            if L.eos is not None:
                newly = (token == L.eos) & ~done
                lengths = torch.where(newly, t, lengths)
                done |= newly
            out[:, t] = torch.where(token == L.eos, L.pad, token) if L.eos is not None else token
            if done.all():
                break
            seq, pad = torch.cat([seq, token[:, None]], 1), torch.cat([pad, done[:, None]], 1)
        return out, lengths


def stage_loss(model, layout, tokens, starts, lengths, reduction="mean"):
    """Cross-entropy, averaged over every predicted token of the batch ("sum": summed): tokens
    (B, L) right-padded, each row's first predicted index starts (B,) and real length lengths
    (B,); at each position over
    the ids legal there (one codebook's, and the end token where it may come). model: the
    StageLM or its DDP wrapper; layout: its Layout."""
    logits = model(tokens[:, :-1])  # (B, L - 1, V): position p predicts token p + 1
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)[None]
    j = pos - starts[:, None]  # (B, L - 1): the predicted index of token p + 1
    real = (j >= 0) & (pos < lengths[:, None])
    legal = layout.legal_at(j[real].cpu()).to(tokens.device)  # (N, V)
    return F.cross_entropy(logits[real].float().masked_fill(~legal, float("-inf")),
                           tokens[:, 1:][real], reduction=reduction)

# -------------------------------------------------------------------------------------------------
# Tokens: the codec's (through the codec interface) and the semantic tokenizer's, cached on disk


def resolve_path(path):
    """A path as stored in a checkpoint: relative to the working directory, or else to this
    file's folder (the shipped checkpoints/...)."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (Path(__file__).parent / p).is_file():
        return Path(__file__).parent / p
    return p


def load_codec(path):
    """A codec file's model.pt -> (the codec in eval mode, its kind); its "model" field names the
    codec file. A checkpoint of another kind, or one that cannot be read, gets one line."""
    path = resolve_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codec checkpoint {path} not found")
    try:
        kind = torch.load(path, map_location="cpu", weights_only=True).get("model")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read "
                         f"({type(e).__name__})") from None
    if kind not in CODEC_CLASSES:
        raise ValueError(f"{path} is a {kind!r} checkpoint, not a codec's (one of "
                         f"{', '.join(CODEC_CLASSES)})")
    module = importlib.import_module(kind)  # the codec file whose tokens the LMs model
    return getattr(module, CODEC_CLASSES[kind]).load(path), kind


def check_codec(codec, cfg, path):
    """A one-line error when the codec's tokens are not the ones the config models."""
    have = (codec.num_codebooks, codec.codebook_size, float(codec.frame_rate))
    if have != (cfg.num_codebooks, cfg.codebook_size, cfg.frame_rate):
        raise ValueError(f"{path}: {have[0]} x {have[1]} codes at {have[2]:g} Hz; the model takes "
                         f"{cfg.num_codebooks} x {cfg.codebook_size} at {cfg.frame_rate:g} Hz")
    ratio = cfg.frame_rate / cfg.semantic_rate
    if ratio != int(ratio):
        raise ValueError(f"frame_rate {cfg.frame_rate:g} Hz is not a whole multiple of "
                         f"semantic_rate {cfg.semantic_rate:g} Hz")


def utterance_features(features, path):
    """The semantic feature frames of an audio file (the built-in ones read it at 16 kHz)."""
    wav = load(path, FEATURE_RATE, 1)[0][0] if features == "mfcc" else None
    return feature_frames(features, path, wav)


def fit_tokenizer(cfg, run, entries):
    """§III-B: k-means (K = semantic_vocab) over the training split's feature frames."""
    frames = [utterance_features(run.features, e["path"]) for e in entries]
    return SemanticTokenizer.fit(frames, cfg.semantic_vocab, "mfcc" if run.features == "mfcc"
                                 else "npy", run.kmeans_iters, run.kmeans_frames, run.seed)


@torch.no_grad()
def token_cache(tokenizer, features, codec, codec_path, entries, cache_dir):
    """{path: (semantic ids (T_s,), codes (Q, T))} of every entry, int16, computed once and kept
    in cache_dir/tokens-<key>.pt, keyed by the tokenizer, the codec file's bytes and the audio
    paths: another tokenizer, codec or corpus recomputes."""
    h = hashlib.sha256(resolve_path(codec_path).read_bytes())
    for v in tokenizer.state().values():
        h.update(v.numpy().tobytes() if torch.is_tensor(v) else str(v).encode())
    h.update("".join(e["path"] for e in entries).encode())
    cache = Path(cache_dir) / f"tokens-{h.hexdigest()[:16]}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    tokens = {e["path"]: tuple(t.to(torch.int16) for t in
                               utterance_tokens(tokenizer, features, codec, e["path"]))
              for e in entries}
    atomic_save(tokens, cache)
    return tokens


@torch.no_grad()
def utterance_tokens(tokenizer, features, codec, path):
    """An audio file's semantic ids (T_s,) and codec codes (Q, T)."""
    semantic = tokenizer.encode(utterance_features(features, path))
    sent = codec.encode(load(path, codec.sample_rate, codec.channels)[0][None])
    return semantic, getattr(sent, "codes", sent)[0]

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


# -------------------------------------------------------------------------------------------------
# Training: the model-specific part


class StageDataset(torch.utils.data.Dataset):
    """Training sequences of one stage, random crops (§IV: 30, 10 and 3 s for the three stages)
    drawn from (seed, epoch, index), right-padded with PAD to one length (so that the generic
    fit's DataLoader stacks them), with the first predicted index and the real length. The
    trainer cuts each batch back to its longest row, so the padding costs no compute.
    items: (semantic ids (T_s,), codes (Q, T)) per utterance."""

    def __init__(self, cfg, stage, items, seed=0):
        self.cfg, self.layout, self.items = cfg, Layout(cfg, stage), items
        self.ratio = int(cfg.frame_rate / cfg.semantic_rate)  # frames per semantic token: 2
        self.window = {"semantic": int(cfg.semantic_seconds * cfg.semantic_rate),
                       "coarse": int(cfg.coarse_seconds * cfg.semantic_rate),  # semantic units
                       "fine": int(cfg.fine_seconds * cfg.frame_rate)}[stage]  # frames
        W, Qc, Q = self.window, cfg.coarse_codebooks, cfg.num_codebooks
        self.max_len = {"semantic": W + 2, "coarse": W + 3 + self.ratio * W * Qc,
                        "fine": 2 + W * Q}[stage]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def crop(self, i, g=None):
        """The (unpadded) sequence of item i and its first predicted index; g: the generator of
        the crop's start (None: the start of the utterance)."""
        semantic, codes = self.items[i]
        semantic, codes = semantic.long(), codes.long()
        L, W, Qc = self.layout, self.window, self.cfg.coarse_codebooks
        pick = lambda n: int(torch.randint(n, (1,), generator=g)) if g and n > 1 else 0  # noqa
        if L.stage == "fine":  # the third stage ignores the semantic tokens (§III-C)
            a = pick(codes.shape[-1] - W + 1)
            return L.sequence(coarse=codes[:Qc, a:a + W], fine=codes[Qc:, a:a + W])
        s = pick(len(semantic) - W + 1)
        z, end = repeats_removed(self.cfg, semantic[s:s + W]), s + W >= len(semantic)
        if L.stage == "semantic":
            return L.sequence(semantic=z, end=end)
        frames = codes[:Qc, self.ratio * s:self.ratio * (s + W)]
        return L.sequence(semantic=z, coarse=frames, end=end or self.ratio * (s + W)
                          >= codes.shape[-1])

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 62)
        seq, start = self.crop(i, g)
        tokens = F.pad(seq, (0, self.max_len - len(seq)), value=self.layout.pad)
        return {"tokens": tokens, "start": torch.tensor(start), "length": torch.tensor(len(seq))}


class Trainer:
    """One stage's transformer and its optimiser; step() updates it on one batch."""

    def __init__(self, cfg, run, stage, tokenizer, rank=0, world=1, device="cpu"):
        self.cfg, self.run, self.stage, self.rank, self.world = cfg, run, stage, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed + STAGES.index(stage))
        self.model = StageLM(cfg, stage, tokenizer, run.codec, run.features).to(self.device)
        kw = dict(lr=run.lr, betas=tuple(run.betas), weight_decay=run.weight_decay)
        self.opt = torch.optim.AdamW(self.model.parameters(), **kw)
        cuda = self.device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.amp_dtype = amp if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.amp == "fp16")
        self.wrapped = self.model  # what step() calls: the model, or its DDP wrapper
        if world > 1:
            ids = [self.device.index] if cuda else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, ids)
        torch.manual_seed(run.seed + rank)  # dropout differs per rank
        self.step_count = 0
        self.codec, self.sample_item = None, None  # set by train(), for write_sample

    def lr_at(self, step):
        """Linear warm-up over warmup_steps to lr, then a linear decay to lr * min_lr_ratio at the
        last step (our choice; the paper does not say)."""
        run = self.run
        if step < run.warmup_steps:
            return run.lr * (step + 1) / run.warmup_steps
        done = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        return run.lr * (1 - (1 - run.min_lr_ratio) * done)

    def step(self, batch, diagnose=False):
        """One update: the stage's cross-entropy on the predicted part of each sequence. With amp
        (CUDA) the forward runs in bf16 / fp16, fp16 with a GradScaler."""
        self.model.train()
        b = {k: v.to(self.device) for k, v in batch.items()}
        tokens = b["tokens"][:, :int(b["length"].max())]  # cut the padding every row shares
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        with (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype
              else contextlib.nullcontext()):
            loss = stage_loss(self.wrapped, self.model.layout, tokens, b["start"], b["length"])
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradient, not the scaled one
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return {self.stage: loss.item(), "|g|": norm.item(), "lr": self.opt.param_groups[0]["lr"]}

    def write_sample(self, stem):
        """What this stage alone can show, with its own generator (the training RNG is not
        touched): semantic, ids sampled from nothing (stem.txt); coarse, the coarse codes of a
        validation utterance's semantic tokens, decoded with the first Q' codebooks (stem.wav);
        fine, its fine codes from its true coarse ones (stem.wav)."""
        if self.sample_item is None:  # a manifest without a validation split
            return
        semantic, codes = (t.long() for t in self.sample_item)
        model, cfg = self.model, self.cfg
        g = torch.Generator(device=self.device).manual_seed(0)  # where the model samples
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        model.eval()
        if self.stage == "semantic":
            ids = sample_semantic(model, torch.zeros(0, dtype=torch.long), 1, None,
                                  TEMPERATURES[0], generator=g)[0]
            Path(f"{stem}.txt").write_text(" ".join(str(int(v)) for v in ids) + "\n")
            return
        if self.stage == "coarse":
            coarse = sample_coarse(model, [repeats_removed(cfg, semantic)], None, None,
                                   TEMPERATURES[1],
                                   generator=g)[0]
            wav = self.codec.decode(coarse[None].to(next(self.codec.parameters()).device))
        else:
            fine = sample_fine(model, codes[:cfg.coarse_codebooks], None, TEMPERATURES[2],
                               generator=g)
            wav = self.codec.decode(fine[None].to(next(self.codec.parameters()).device))
        save(Path(f"{stem}.wav"), wav[0].cpu(), self.codec.sample_rate)

    def state_dict(self):
        """Everything an exact resume needs. Collective under DDP: every rank's RNG state."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": NAME, "stage": self.stage, "config": dataclasses.asdict(self.cfg),
                "train_config": dataclasses.asdict(self.run), "step": self.step_count,
                "tokenizer": self.model.tokenizer.state(), "codec": self.model.codec_path,
                "features": self.model.features, "state_dict": self.model.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs}

    # Copied from valle.py: Trainer.load_state_dict
    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count = ckpt["step"]
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


def split_entries(data, split):
    """The utterances of one split of a manifest ([] if it has none of them; every utterance of
    a manifest without splits)."""
    rows = read_manifest(data or demo_manifest())
    return rows if not any("split" in e for e in rows) else [e for e in rows
                                                              if e.get("split") == split]


def check_config(cfg, run):
    """One-line errors for values no stage can be built or trained with."""
    for obj, names in ((cfg, ("dim", "heads", "layers", "ffn", "semantic_vocab", "codebook_size",
                              "num_codebooks", "semantic_rate", "frame_rate")),
                       (run, ("batch_size", "steps", "log_every", "sample_every", "ckpt_every",
                              "kmeans_iters", "kmeans_frames", "lr"))):
        bad = [n for n in names if not getattr(obj, n) > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive")
    if cfg.dim % cfg.heads or cfg.rel_buckets < 2 or cfg.rel_distance <= cfg.rel_buckets // 2:
        raise ValueError(f"dim {cfg.dim} must divide by heads {cfg.heads}, rel_buckets must be at "
                         f"least 2 and rel_distance above rel_buckets / 2")
    for name in ("semantic_seconds", "coarse_seconds"):
        if getattr(cfg, name) * cfg.semantic_rate < 1:
            raise ValueError(f"{name} {getattr(cfg, name)} holds no semantic token")
    if cfg.fine_seconds * cfg.frame_rate < 1:
        raise ValueError(f"fine_seconds {cfg.fine_seconds} holds no frame")
    if cfg.time_positions and cfg.dedup:
        raise ValueError("time_positions needs dedup false: the semantic stage does not say how "
                         "many frames a token without its repeats lasts")
    if len(run.betas) != 2:
        raise ValueError(f"betas must be two numbers, got {run.betas}")
    if run.stage not in CHOICES["stage"]:
        raise ValueError(f"stage must be one of {', '.join(CHOICES['stage'])}, got {run.stage!r}")


def fitted_on(cfg, run):
    """What a semantic tokenizer was fitted with: a run that asks for another gets one line."""
    return (f"data {run.data or 'the demo corpus'}, features {run.features}, K "
            f"{cfg.semantic_vocab}, seed {run.seed}, {run.kmeans_iters} iterations on at most "
            f"{run.kmeans_frames} frames")


def prepare(cfg, run, split="train", rank=0, world=1, overwrite=False):
    """The codec, the semantic tokenizer (fitted on the training split by rank 0 and kept in
    OUT/semantic_tokenizer.pt, or read from there) and the tokens of `split`, cached in OUT."""
    out = Path(run.out)
    entries = read_manifest(run.data or demo_manifest(), split)
    codec, kind = load_codec(run.codec)
    check_codec(codec, cfg, run.codec)
    path = out / "semantic_tokenizer.pt"
    if rank == 0 and (overwrite or not path.is_file()):
        train_entries = entries if split == "train" else read_manifest(
            run.data or demo_manifest(), "train")
        atomic_save({**fit_tokenizer(cfg, run, train_entries).state(),
                     "fitted_on": fitted_on(cfg, run)}, path)
    if world > 1:
        dist.barrier()
    state = torch.load(path, weights_only=True)
    if state.get("fitted_on") != fitted_on(cfg, run):
        raise ValueError(f"{path} was fitted on {state.get('fitted_on')}; this run asks for "
                         f"{fitted_on(cfg, run)} (another --out, or --overwrite to refit)")
    tokenizer = SemanticTokenizer.from_state(state)
    tokenizer.check(run.features)
    if tokenizer.vocab != cfg.semantic_vocab:
        raise ValueError(f"{path} has {tokenizer.vocab} clusters; the config has semantic_vocab "
                         f"{cfg.semantic_vocab}")
    if rank == 0:  # rank 0 fills the cache, the others read it
        tokens = token_cache(tokenizer, run.features, codec, run.codec, entries, out)
    if world > 1:
        dist.barrier()
        tokens = token_cache(tokenizer, run.features, codec, run.codec, entries, out)
    return codec, kind, tokenizer, entries, tokens


def train(cfg, run, resume=False, overwrite=False, interrupt_after=None):
    """The stages run.stage names ("all": semantic, coarse, fine in turn), each in OUT/<stage>, on
    the demo corpus's training split (or a manifest's), with DDP under torchrun. resume: continue
    each stage's run exactly (a finished stage is left as it is). Returns {stage: (trainer,
    this process's per-step stats)}."""
    check_config(cfg, run)
    rank, world, device = setup_distributed()
    master, out = rank == 0, Path(run.out)
    stages = STAGES if run.stage == "all" else (run.stage,)
    for stage in stages:
        if not resume and not overwrite and (out / stage / "ckpt.pt").is_file():
            raise ValueError(f"{out / stage} already holds a training run (ckpt.pt); continue it "
                             f"with --resume, or start over with --overwrite")
    if run.batch_size % world:
        raise ValueError(f"batch_size {run.batch_size} is not divisible by {world} processes")
    threads, why = pick_threads(run.threads, world) if device.type == "cpu" else (0, "")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    codec, kind, tokenizer, entries, tokens = prepare(cfg, run, "train", rank, world,
                                                      overwrite and not resume)
    if master:
        print(f"{len(entries)} utterances, {kind} tokens {codec.num_codebooks} x "
              f"{codec.codebook_size} at {codec.frame_rate:g} Hz, {tokenizer.vocab} semantic "
              f"clusters of {tokenizer.kind()} ({time.time() - t0:.1f} s), {world} process(es)"
              + (f", {threads} thread(s){why}" if threads else ""), flush=True)
    items = [tokens[e["path"]] for e in entries]
    valid = split_entries(run.data, "valid")
    results = {}
    try:
        for stage in stages:
            stage_run = dataclasses.replace(run, out=str(out / stage))  # run.stage: as asked
            start = None
            if resume and (out / stage / "ckpt.pt").is_file():
                start = load_checkpoint(out / stage / "ckpt.pt")
                if not torch.equal(start["tokenizer"]["centroids"], tokenizer.centroids):
                    raise ValueError(f"{out / stage / 'ckpt.pt'} was trained on other semantic "
                                     f"tokens than {out / 'semantic_tokenizer.pt'}")
                if start["step"] >= run.steps:
                    if master:
                        print(f"{stage}: finished ({start['step']} steps)", flush=True)
                    continue
            trainer = Trainer(cfg, stage_run, stage, tokenizer, rank, world, device)
            if start:
                trainer.load_state_dict(start)
            trainer.codec = codec
            if master and valid:  # samples during training: the first validation utterance
                trainer.sample_item = token_cache(tokenizer, run.features, codec, run.codec,
                                                  valid[:1], out)[valid[0]["path"]]
            if master:
                (out / stage).mkdir(parents=True, exist_ok=True)
                n = sum(p.numel() for p in trainer.model.parameters())
                print(f"AudioLM {stage} stage: {n:,} parameters", flush=True)
            t1 = time.time()
            history = fit(trainer, stage_run, StageDataset(cfg, stage, items, run.seed),
                          interrupt_after)
            if master:
                print(f"{stage}: {len(history)} steps in {time.time() - t1:.0f} s", flush=True)
            results[stage] = (trainer, history)
            if interrupt_after and len(history) == interrupt_after:
                break
    finally:
        if world > 1:
            dist.destroy_process_group()
    return results

# -------------------------------------------------------------------------------------------------
# Inference (§III-D): each stage sampled in turn, the codec decodes

MIN_PROMPT_SECONDS = 0.5  # our choice: the demo corpus's digit strings are 1.2-2.8 s long
TEMPERATURES = (0.6, 0.8, 0.6)  # semantic, coarse, fine: DEVIATION 3 (readers' notes of the paper)


def left_pad(rows, pad):
    """Sequences of different lengths -> (B, S), left-padded with `pad` (StageLM.generate)."""
    S = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (S - len(r), 0), value=pad) for r in rows])


def sample_semantic(model, prompt, batch=1, max_tokens=None, temperature=1.0, top_k=0,
                    top_p=1.0, generator=None):
    """Stage 1: `batch` semantic sequences continuing `prompt` (n,) ids (empty: unconditional),
    each up to its end token or max_tokens in all (default: the training context). Returns a
    list of (n_i,) ids, the prompt's included."""
    L, dev = model.layout, next(model.parameters()).device
    cap = max_tokens or int(model.cfg.semantic_seconds * model.cfg.semantic_rate)
    if len(prompt) >= cap:
        raise ValueError(f"the semantic prompt has {len(prompt)} tokens; the cap is {cap}")
    prefix = torch.cat([torch.tensor([L.s_bos]), prompt.long().cpu()]).to(dev)
    new, n = model.generate(prefix.expand(batch, -1), cap - len(prompt), len(prompt),
                            temperature, top_k, top_p, generator=generator)
    return [torch.cat([prompt.long().cpu(), new[b, :n[b]].cpu()]) for b in range(batch)]


def sample_coarse(model, semantics, prompt=None, max_frames=None, temperature=1.0, top_k=0,
                  top_p=1.0, generator=None):
    """Stage 2: for each semantic sequence (n_i,) (repeats_removed), coarse codes (Q', T_i)
    continuing the acoustic prompt (Q', P) (None: from nothing) up to the end token or
    max_frames in all (default: the training context, coarse_seconds). Returns a list."""
    L, cfg, dev = model.layout, model.cfg, next(model.parameters()).device
    Qc = cfg.coarse_codebooks
    prompt = torch.zeros(Qc, 0, dtype=torch.long) if prompt is None else prompt.long().cpu()
    cap = max_frames or int(cfg.coarse_seconds * cfg.frame_rate)
    if prompt.shape[-1] >= cap:
        raise ValueError(f"the acoustic prompt has {prompt.shape[-1]} frames; the cap is {cap}")
    rows = [L.sequence(semantic=z.cpu(), coarse=prompt, end=False)[0] for z in semantics]
    P = prompt.shape[-1]  # rows: (n_i + 2 + P Q',) each, left-padded to (B, S0) below
    new, n = model.generate(left_pad(rows, L.pad).to(dev), (cap - P) * Qc, P * Qc, temperature,
                            top_k, top_p, generator=generator)
    # new (B, (cap - P) Q') -> each row's codes (Q', P + n_b / Q')
    return [torch.cat([prompt, L.codes(new[b, :n[b]].cpu())], 1) for b in range(len(rows))]


def sample_fine(model, coarse, prompt=None, temperature=1.0, top_k=0, top_p=1.0,
                generator=None):
    """Stage 3 on non-overlapping chunks of fine_seconds, all in one batch (§III-C): the fine
    codes (Q - Q', T) of each chunk of `coarse` (Q', T), after the fine prompt's frames (Q - Q',
    P) where the chunk holds them. Returns all codes (Q, T)."""
    L, cfg, dev = model.layout, model.cfg, next(model.parameters()).device
    Qf, T = cfg.num_codebooks - cfg.coarse_codebooks, coarse.shape[-1]
    W = int(cfg.fine_seconds * cfg.frame_rate)
    prompt = torch.zeros(Qf, 0, dtype=torch.long) if prompt is None else prompt.long().cpu()
    coarse = coarse.long().cpu()
    # (start, coarse (Q', W_c), fine prompt (Q - Q', P_c)) per chunk; W_c = W but the last's
    chunks = [(a, coarse[:, a:a + W], prompt[:, a:a + W]) for a in range(0, T, W)]
    if not chunks:
        return torch.zeros(cfg.num_codebooks, 0, dtype=torch.long)
    rows = [L.sequence(coarse=c, fine=p)[0] for _, c, p in chunks]
    need = [(c.shape[-1] - p.shape[-1]) * Qf for _, c, p in chunks]  # fine tokens to generate
    new = torch.zeros(len(rows), 0, dtype=torch.long)
    if max(need):  # each chunk's fine prompt is whole frames: every row starts at codebook Q'+1
        new = model.generate(left_pad(rows, L.pad).to(dev), max(need), 0, temperature, top_k,
                             top_p, generator=generator)[0].cpu()
    fine = [torch.cat([p, L.codes(new[i, :need[i]])], 1) for i, (_, _, p) in enumerate(chunks)]
    return torch.cat([coarse, torch.cat(fine, 1)])  # (Q', T) over (Q - Q', T) -> (Q, T)


def check_prompt(wav, sample_rate, codec):
    """A one-line error for a prompt tensor no stage can read: another rate or channel count,
    NaN, shorter than MIN_PROMPT_SECONDS."""
    if not torch.is_tensor(wav) or not wav.is_floating_point() or wav.dim() != 2:
        raise ValueError(f"the prompt must be a float tensor (channels, samples), got "
                         f"{type(wav).__name__} {tuple(getattr(wav, 'shape', ()))}")
    if sample_rate != codec.sample_rate:
        raise ValueError(f"the prompt is at {sample_rate} Hz; the codec takes {codec.sample_rate} "
                         f"Hz (common.audio.load(path, {codec.sample_rate}) converts a file)")
    if wav.shape[0] != codec.channels:
        raise ValueError(f"the prompt has {wav.shape[0]} channel(s); the codec takes "
                         f"{codec.channels}")
    if not torch.isfinite(wav).all():
        raise ValueError("the prompt has NaN or Inf samples")
    if wav.shape[-1] < MIN_PROMPT_SECONDS * sample_rate:
        raise ValueError(f"the prompt is {wav.shape[-1] / sample_rate:.2f} s; it needs at least "
                         f"{MIN_PROMPT_SECONDS:g} s")


class AudioLM:
    """The three stages with the semantic tokenizer and the codec they were trained on: what
    generation needs. load(): a bundle file (save()) or a training run's folder."""

    def __init__(self, semantic, coarse, fine):
        self.semantic, self.coarse, self.fine = semantic, coarse, fine
        self.cfg, self.tokenizer = semantic.cfg, semantic.tokenizer
        self.codec_path, self.features = semantic.codec_path, semantic.features

    def stages(self):
        return {"semantic": self.semantic, "coarse": self.coarse, "fine": self.fine}

    def save(self, path, half=False):
        """One file with all three stages; half: the weights in float16 (a shipped file)."""
        cast = (lambda t: t.half() if t.is_floating_point() else t) if half else (lambda t: t)
        atomic_save({"model": NAME, "stage": "all", "config": dataclasses.asdict(self.cfg),
                     "tokenizer": self.tokenizer.state(), "codec": self.codec_path,
                     "features": self.features,
                     "stages": {s: {k: cast(v) for k, v in m.state_dict().items()}
                                for s, m in self.stages().items()}}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        path = Path(path)
        if path.is_dir():  # a training run: OUT/<stage>/model.pt
            missing = [s for s in STAGES if not (path / s / "model.pt").is_file()]
            if missing:
                raise FileNotFoundError(f"{path} has no trained {', '.join(missing)} stage "
                                        f"(OUT/<stage>/model.pt); train it with --stage")
            return cls(*(StageLM.load(path / s / "model.pt", map_location) for s in STAGES))
        ckpt = load_checkpoint(resolve_path(path), map_location)
        if ckpt.get("stage") != "all":
            raise ValueError(f"{path} is one stage ({ckpt.get('stage')}); give its run's folder")
        cfg = config_from_dict(Config, ckpt["config"], path)
        tok = SemanticTokenizer.from_state(ckpt["tokenizer"])
        models = []
        for s in STAGES:
            m = StageLM(cfg, s, tok, ckpt["codec"], ckpt["features"])
            m.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in ckpt["stages"][s].items()})
            models.append(m.eval())
        return cls(*models)

    def to(self, device):
        for m in self.stages().values():
            m.to(device)
        return self

    def prompt_tokens(self, codec, wav, sample_rate, path=None):
        """The prompt's semantic ids (n,) (repeats_removed) and its codes (Q, P): `wav` (C, T) cut
        to whole semantic tokens (640 samples at 16 kHz), so that P = 2 n_raw. path: the audio
        file (features from a folder are looked up by its stem)."""
        hop = int(codec.sample_rate / self.cfg.semantic_rate)
        check_prompt(wav[..., :wav.shape[-1] // hop * hop] if torch.is_tensor(wav) else wav,
                     sample_rate, codec)
        wav = wav[:, :wav.shape[-1] // hop * hop]
        if self.features == "mfcc":
            self.tokenizer.check("mfcc")
            frames = mfcc_frames(wav.mean(0) if codec.sample_rate == FEATURE_RATE
                                 else load_resampled(wav, codec.sample_rate))
        else:
            if path is None:
                raise ValueError("this model's semantic features come from a folder: give the "
                                 "prompt's audio path (its stem names the .npy)")
            frames = feature_frames(self.features, path)[:wav.shape[-1] // hop]
        semantic = repeats_removed(self.cfg, self.tokenizer.encode(frames))
        sent = codec.encode(wav[None].to(next(codec.parameters()).device))
        return semantic, getattr(sent, "codes", sent)[0].long().cpu()

    @torch.no_grad()
    def generate(self, codec, prompt=None, batch=1, temperatures=TEMPERATURES, top_k=0,
                 top_p=1.0, semantic=None, max_frames=None, generator=None):
        """§III-D. Unconditional (prompt None), continuation (prompt: (semantic ids, codes) from
        prompt_tokens: stage 1 continues its semantic ids, stage 2 its coarse codes after all the
        semantic ids, stage 3 its fine codes), or acoustic generation from given `semantic` ids
        (n,) (repeats_removed; stages 2-3 only). Returns `batch` (waveform (C, T), codes (Q, T))
        pairs, the prompt's part included."""
        t_sem, t_coarse, t_fine = temperatures
        cfg, Qc = self.cfg, self.cfg.coarse_codebooks
        p_sem, p_codes = prompt if prompt is not None else (torch.zeros(0, dtype=torch.long),
                                                             None)
        window = int(cfg.coarse_seconds * cfg.semantic_rate)  # DEVIATION 3: no sliding window
        frames = max_frames or int(cfg.coarse_seconds * cfg.frame_rate)
        if p_codes is not None and p_codes.shape[-1] >= frames:
            raise ValueError(f"the prompt is {p_codes.shape[-1] / cfg.frame_rate:.2f} s; the "
                             f"model generates at most {frames / cfg.frame_rate:g} s in all "
                             f"(coarse_seconds): give a shorter prompt")
        if semantic is not None:
            sems = [semantic.long().cpu()] * batch
        else:
            sems = sample_semantic(self.semantic, p_sem, batch, window, t_sem, top_k, top_p,
                                   generator)
        coarse = sample_coarse(self.coarse, sems, None if p_codes is None else p_codes[:Qc],
                               frames, t_coarse, top_k, top_p, generator)
        outs = []
        for c in coarse:
            codes = sample_fine(self.fine, c, None if p_codes is None else p_codes[Qc:], t_fine,
                                top_k, top_p, generator)
            dev = next(codec.parameters()).device
            outs.append((codec.decode(codes[None].to(dev))[0].cpu(), codes))
        return outs


def load_resampled(wav, sample_rate):
    """A (C, T) prompt at another rate as the mono 16 kHz signal the MFCCs read."""
    from common.audio import resample
    return resample(wav.mean(0, keepdim=True), sample_rate, FEATURE_RATE)[0]

# -------------------------------------------------------------------------------------------------
# Evaluation: held-out cross-entropy against the unigram; continuation of digit strings (content
# and voice); acoustic generation from ground-truth semantic tokens; the token trade-off (Table I)


def split_items(lm, codec, split, data=None, out=None, keep=None):
    """(entries, token items) of a split, through the model's tokenizer and codec (cached in out,
    or recomputed); keep: a filter of the entries, applied first."""
    entries = [e for e in split_entries(data, split) if keep is None or keep(e)]
    if out:
        tokens = token_cache(lm.tokenizer, lm.features, codec, lm.codec_path, entries, out)
    else:
        tokens = {e["path"]: utterance_tokens(lm.tokenizer, lm.features, codec, e["path"])
                  for e in entries}
    return entries, [tokens[e["path"]] for e in entries]


def eval_sequences(cfg, stage, items):
    """Deterministic sequences for the held-out loss: semantic and coarse from the start of each
    utterance (one training window), fine every non-overlapping window."""
    ds = StageDataset(cfg, stage, items)
    if stage != "fine":
        return [ds.crop(i) for i in range(len(items))]
    W, Qc, L = ds.window, cfg.coarse_codebooks, ds.layout
    return [L.sequence(coarse=c[:Qc, a:a + W].long(), fine=c[Qc:, a:a + W].long())
            for _, c in items for a in range(0, c.shape[-1], W)]


def predicted(layout, seqs):
    """(ids, predicted indices j) of every predicted token of (sequence, start) pairs."""
    ids = torch.cat([s[start:] for s, start in seqs])
    j = torch.cat([torch.arange(len(s) - start) for s, start in seqs])
    return ids, j


def unigram_ce(layout, train_seqs, test_seqs):
    """Cross-entropy (nats per token) of the test sequences' predicted tokens under the training
    tokens' unigram (add-one), renormalised over the ids legal at each position: the baseline a
    stage must beat."""
    ids, _ = predicted(layout, train_seqs)
    counts = torch.bincount(ids, minlength=layout.vocab).double() + 1
    ids, j = predicted(layout, test_seqs)
    p = counts[None].expand(len(ids), -1).masked_fill(~layout.legal_at(j), 0)
    return -(p.gather(1, ids[:, None])[:, 0] / p.sum(1)).log().mean().item()


@torch.no_grad()
def model_ce(model, seqs, batch=16):
    """Teacher-forced cross-entropy (nats per token) of the stage's model on (sequence, start)
    pairs."""
    model.eval()
    dev, total, n = next(model.parameters()).device, 0.0, 0
    for b in range(0, len(seqs), batch):
        part = seqs[b:b + batch]
        L = max(len(s) for s, _ in part)
        tokens = torch.stack([F.pad(s, (0, L - len(s)), value=model.layout.pad) for s, _ in part])
        starts = torch.tensor([st for _, st in part])
        lengths = torch.tensor([len(s) for s, _ in part])
        total += stage_loss(model, model.layout, tokens.to(dev), starts.to(dev), lengths.to(dev),
                            reduction="sum").item()
        n += int((lengths - starts).sum())
    return total / n


def heldout_loss(lm, train_items, test_items):
    """{stage: (model CE, unigram CE)} in nats per predicted token on the test items."""
    out = {}
    for stage, model in lm.stages().items():
        train_seqs = eval_sequences(lm.cfg, stage, train_items)
        test_seqs = eval_sequences(lm.cfg, stage, test_items)
        out[stage] = (model_ce(model, test_seqs),
                      unigram_ce(model.layout, train_seqs, test_seqs))
    return out


def semantic_reliance(lm, items):
    """Does the coarse stage read the semantic tokens? Its held-out cross-entropy on each item's
    coarse codes after the item's own semantic tokens, and after the next item's (the same codes,
    the wrong content). Returns (own, other) in nats per token."""
    shifted = [(items[(i + 1) % len(items)][0], items[i][1]) for i in range(len(items))]
    return tuple(model_ce(lm.coarse, eval_sequences(lm.cfg, "coarse", x))
                 for x in (items, shifted))


def align(ref, hyp):
    """The pairs (i, j) of equal words that a minimum edit-distance alignment of the word lists
    ref and hyp matches."""
    n, m = len(ref), len(hyp)
    cost = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]),
                             cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    pairs, i, j = [], n, m
    while i and j:
        if cost[i][j] == cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def next_digit_right(truth, k, heard):
    """The continuation test's rule: digit k (0-based) is right when the recognised digits begin
    with the transcript's first k + 1, the k of the prompt and the one it cuts. Strict on purpose:
    a rule that aligned the digits freely would let a random string of digits match digit k
    somewhere (53 % of spliced continuations did, against 10 % for one random digit)."""
    return heard[:k + 1] == truth[:k + 1]


def word_at(segments, seconds):
    """The first recognised word (digit_segments) that ends after `seconds`: the one a cut there
    splits, or else the one after it; None if there is none."""
    return next((w for w, _, end in segments if end > seconds), None)


def digits_of(text):
    """The digit words of a transcript ("oh" read as zero)."""
    from common.evaluation import normalize_transcript
    return ["zero" if w == "oh" else w for w in normalize_transcript(text).split()
            if w in ("oh", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                     "nine")]


def continuation_items(data=None):
    """Digit strings of the corpus with a cut: (entry, k, cut seconds, other) where pocketsphinx's
    digit grammar, run on the ground truth, hears digit k where the transcript has it (aligned),
    k the word nearest the middle of the utterance that starts after MIN_PROMPT_SECONDS; the
    cut is the middle of that word, so that the prompt holds the first half of digit k and the
    continuation must finish it. other: a digit string of another voice (SPK to another voice)
    and `splice`: another digit string of the same voice, cut likewise (the chance baseline)."""
    from common import evaluation
    rows = [e for e in read_manifest(data or demo_manifest()) if e.get("kind") == "digits"]
    cuts = []
    for e in rows:
        wav, rate = load(e["path"], FEATURE_RATE, 1)
        seg = evaluation.digit_segments(wav[0].numpy(), rate)
        truth = digits_of(e["text"])
        pairs = [(i, j) for i, j in align(truth, [w for w, _, _ in seg])
                 if seg[j][1] >= MIN_PROMPT_SECONDS]
        mid = wav.shape[-1] / rate / 2
        if pairs:
            i, j = min(pairs, key=lambda p: abs((seg[p[1]][1] + seg[p[1]][2]) / 2 - mid))
            cuts.append((e, i, (seg[j][1] + seg[j][2]) / 2))
    items = []
    for n, (e, k, cut) in enumerate(cuts):
        same = [c for c in cuts if c[0]["speaker"] == e["speaker"] and c[0] is not e]
        others = [c for c in cuts if c[0]["speaker"] != e["speaker"]]
        items.append({"entry": e, "k": k, "cut": cut,
                      "other": others[n % len(others)][0] if others else None,
                      "splice": {"entry": same[0][0], "cut": same[0][2]} if same else None})
    return items


@torch.no_grad()
def evaluate_continuation(lm, codec, items, samples=3, temperatures=TEMPERATURES, top_k=0,
                          top_p=1.0, seed=0, out=None):
    """Next-digit accuracy and voice of continuations (§V's speech continuation, on digit
    strings): each prompt is its utterance up to the middle of digit k; a system is right when
    pocketsphinx's digit grammar hears digit k at the cut (word_at), and when the digits Whisper
    hears in prompt + continuation begin with the transcript's first k + 1 (next_digit_right).
    Systems: the ground truth, its codec resynthesis, the prompt alone, chance (the prompt
    spliced to another digit string of the voice, cut likewise, through the codec as AudioLM's
    output is) and AudioLM (`samples` per prompt). SPK: resemblyzer cosine of the continuation
    (after the cut) to the prompt and to another voice. Returns rows."""
    from common import evaluation
    if lm.features != "mfcc":
        raise ValueError("the continuation test needs semantic features of the prompt alone; "
                         "features from a folder were computed on whole files")
    rate, g = codec.sample_rate, torch.Generator().manual_seed(seed)
    names = ("truth", "resynthesis", "prompt only", "chance (splice)", "AudioLM")
    acc = {n: {"sphinx": [], "whisper": [], "spk": [], "spk_other": [], "seconds": []}
           for n in names}
    hop = int(rate / lm.cfg.semantic_rate)
    for it in items:
        e, k = it["entry"], it["k"]
        wav = load(e["path"], rate, codec.channels)[0]
        cut = int(it["cut"] * rate) // hop * hop
        prompt = wav[:, :cut]
        truth = digits_of(e["text"])
        outputs = {"truth": [wav], "resynthesis": [codec.decode(codec.encode(wav[None]))[0]],
                   "prompt only": [prompt]}
        if it["splice"] is not None:
            other = load(it["splice"]["entry"]["path"], rate, codec.channels)[0]
            splice = torch.cat([prompt, other[:, int(it["splice"]["cut"] * rate):]], 1)
            outputs["chance (splice)"] = [codec.decode(codec.encode(splice[None]))[0]]
        gen = lm.generate(codec, lm.prompt_tokens(codec, prompt, rate, e["path"]), samples,
                          temperatures, top_k, top_p, generator=g)
        outputs["AudioLM"] = [w for w, _ in gen]
        if out:
            for s, w in enumerate(outputs["AudioLM"]):
                save(Path(out) / f"{Path(e['path']).stem}_{s}.wav", w, rate)
        other_wav = load(it["other"]["path"], rate, codec.channels)[0] if it["other"] else None
        for name, xs in outputs.items():
            for x in xs:
                a = acc[name]
                seg = evaluation.digit_segments(x[0].numpy(), rate)
                a["sphinx"].append(float(word_at(seg, cut / rate) == truth[k]))
                heard = digits_of(evaluation.transcribe(x, rate))
                a["whisper"].append(float(next_digit_right(truth, k, heard)))
                rest = x[:, cut:]
                a["seconds"].append(rest.shape[-1] / rate)
                if rest.shape[-1] >= 0.3 * rate:  # resemblyzer needs some speech (our choice)
                    a["spk"].append(evaluation.speaker_similarity(prompt, rest, rate))
                    if other_wav is not None:
                        a["spk_other"].append(evaluation.speaker_similarity(other_wav, rest,
                                                                            rate))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return [{"name": n, **{m: mean(v) for m, v in acc[n].items()}, "n": len(acc[n]["sphinx"]),
             "n_spk": len(acc[n]["spk"])} for n in names]


def format_continuation(rows, n_prompts):
    lines = [f"{'system':<16} {'next digit (sphinx)':>19} {'(whisper)':>9} {'SPK':>6} "
             f"{'SPK-other':>9} {'cont. s':>7} {'n':>4}"]
    for r in rows:
        lines.append(f"{r['name']:<16} {r['sphinx']:>19.1%} {r['whisper']:>9.1%} {r['spk']:>6.3f} "
                     f"{r['spk_other']:>9.3f} {r['seconds']:>7.2f} {r['n']:>4}")
    lines.append(f"{n_prompts} prompts, each a digit string cut in the middle of a digit (chance "
                 f"for a random digit: 10%); next digit: pocketsphinx hears it at the cut, "
                 f"Whisper's digits begin with the prompt's and it;\nSPK: resemblyzer cosine of "
                 f"the continuation to the prompt, SPK-other: to another voice; cont. s: seconds "
                 f"after the cut")
    return "\n".join(lines)


@torch.no_grad()
def evaluate_acoustic(lm, codec, entries, items, seed=0, temperatures=TEMPERATURES, top_k=0,
                      top_p=1.0):
    """Table II's test: speech from the ground-truth semantic tokens through stages 2-3 (no
    acoustic prompt: the voice is the model's choice), against the ground truth and the codec's
    resynthesis: Whisper WER and, on digit strings, pocketsphinx's digit WER. Utterances longer
    than the coarse stage's context (coarse_seconds) are left out."""
    from common import evaluation
    rate, g = codec.sample_rate, torch.Generator().manual_seed(seed)
    names = ("truth", "resynthesis", "AudioLM (true semantic)")
    acc = {n: {"wer": [], "dwer": []} for n in names}
    for e, (semantic, codes) in zip(entries, items):
        if codes.shape[-1] > lm.cfg.coarse_seconds * lm.cfg.frame_rate:
            continue
        wav = load(e["path"], rate, codec.channels)[0]
        gen = lm.generate(codec, semantic=repeats_removed(lm.cfg, semantic.long()),
                          temperatures=temperatures,
                          top_k=top_k, top_p=top_p, generator=g)[0][0]
        outputs = {"truth": wav, "resynthesis": codec.decode(codes[None].long())[0],
                   "AudioLM (true semantic)": gen}
        for name, x in outputs.items():
            acc[name]["wer"].append(evaluation.wer(e["text"], x, rate))
            if e.get("kind") == "digits":
                acc[name]["dwer"].append(evaluation.digit_wer(e["text"], x, rate))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return [{"name": n, "wer": mean(acc[n]["wer"]), "dwer": mean(acc[n]["dwer"]),
             "n": len(acc[n]["wer"]), "n_digits": len(acc[n]["dwer"])} for n in names]


def format_acoustic(rows):
    lines = [f"{'system':<24} {'WER':>7} {'dWER':>7}"]
    lines += [f"{r['name']:<24} {r['wer']:>7.1%} {r['dwer']:>7.1%}" for r in rows]
    lines.append(f"{rows[0]['n']} utterances ({rows[0]['n_digits']} digit strings); WER: Whisper-"
                 f"base, dWER: pocketsphinx's digit grammar")
    return "\n".join(lines)


def phones(phonemes):
    """The manifest's phonemes ("p_h_o w_o_r_d") -> a list of phones, stress marks dropped."""
    return [p for w in phonemes.replace("ˈ", "").replace("ˌ", "").split() for p in w.split("_")
            if p]


def ctc_probe(train_x, train_y, test_x, test_y, n_in, n_out, steps=300, seed=0):
    """Phone error rate of a linear CTC probe: each frame's ids (T, n) (summed rows of one
    weight matrix: a linear map of their one-hots) or features (T, d) float -> phone logits
    (blank = 0), trained full-batch with Adam on train, greedy-decoded on test."""
    from common.evaluation import word_errors
    torch.manual_seed(seed)
    ids = not train_x[0].is_floating_point()
    lin = nn.EmbeddingBag(n_in, n_out + 1, mode="sum") if ids else nn.Linear(n_in, n_out + 1)
    # our choice: rates that converge within a few hundred full-batch steps on the demo corpus
    opt = torch.optim.Adam(lin.parameters(), lr=0.05 if ids else 0.01)

    def padded(xs):
        T = max(len(x) for x in xs)
        return torch.cat([F.pad(x, (0, 0, 0, T - len(x))) for x in xs]), T  # (B * T, n or d)

    def logits(flat, B, T):
        return lin(flat).view(B, T, -1)  # (B, T, P + 1)

    lengths = torch.tensor([len(x) for x in train_x])
    target = torch.cat(train_y)
    flat, T = padded(train_x)
    for _ in range(steps):
        lp = logits(flat, len(train_x), T).log_softmax(-1).transpose(0, 1)  # (T, B, P + 1)
        loss = F.ctc_loss(lp, target, lengths, torch.tensor([len(y) for y in train_y]),
                          zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    errors, total = 0, 0
    with torch.no_grad():
        for x, y in zip(test_x, test_y):
            best = torch.unique_consecutive(logits(x, 1, len(x))[0].argmax(-1))
            hyp = " ".join(str(int(v)) for v in best if v)
            errors += sum(word_errors(" ".join(str(int(v)) for v in y), hyp))
            total += len(y)
    return errors / total


def speaker_probe(train_x, train_s, test_x, test_s, n_in, steps=300, seed=0):
    """Speaker accuracy of a linear classifier (softmax regression) on each utterance's token
    histogram (ids (T, n): counts of each id, divided by T), trained on train, scored on test."""
    torch.manual_seed(seed)
    names = sorted(set(train_s))
    hist = lambda xs: torch.stack([torch.bincount(x.reshape(-1), minlength=n_in).float()  # noqa
                                   / len(x) for x in xs])
    a, b = hist(train_x), hist(test_x)
    lin = nn.Linear(n_in, len(names))
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)  # full batch (our choice, as ctc_probe)
    y = torch.tensor([names.index(s) for s in train_s])
    for _ in range(steps):
        loss = F.cross_entropy(lin(a * 10), y)  # x10: histograms sum to 1 (our choice)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = lin(b * 10).argmax(-1)
    return float(np.mean([names[int(p)] == s for p, s in zip(pred, test_s)]))


def probe(lm, codec, data=None, steps=300, out=None, limit=None, codebooks=None, mfcc=True):
    """The trade-off of Table I, measured here: what the semantic tokens keep of the phones
    (phone error rate of a linear CTC probe; the paper: ABX) and of the voice (speaker accuracy
    of a linear classifier on token histograms), against the codec's tokens at 1, Q' and Q
    codebooks and the continuous MFCC features they were clustered from. Trained on the training
    split, scored on the validation and test utterances of the training voices. limit: N of each
    (spread over the voices); codebooks: the acoustic streams (default 1, Q' and Q); mfcc: the
    continuous features too. Returns rows."""
    cfg = lm.cfg
    def spread(rows):  # `limit` of them, evenly spread (the manifest is sorted by speaker)
        step = max(1, len(rows) // limit) if limit else 1
        return {e["path"] for e in rows[::step][:limit]}
    every = split_entries(data, "train")
    trained, chosen = {e["speaker"] for e in every}, spread(every)
    chosen |= spread([e for s in ("valid", "test") for e in split_entries(data, s)
                      if e["speaker"] in trained])
    train_e, train_i = split_items(lm, codec, "train", data, out, lambda e: e["path"] in chosen)
    test_e, test_i = [], []
    for split in ("valid", "test"):
        e, i = split_items(lm, codec, split, data, out, lambda e: e["path"] in chosen)
        test_e, test_i = test_e + e, test_i + i
    symbols = sorted({p for e in train_e for p in phones(e["phonemes"])})
    index = {p: n + 1 for n, p in enumerate(symbols)}
    ys = lambda es: [torch.tensor([index[p] for p in phones(e["phonemes"]) if p in index])  # noqa
                     for e in es]
    K, Ks = cfg.codebook_size, cfg.semantic_vocab
    streams = [("semantic (ours)", cfg.semantic_rate * math.log2(Ks), Ks,
                lambda it: it[0].long()[:, None])]
    for n in codebooks or sorted({1, cfg.coarse_codebooks, cfg.num_codebooks}):
        streams.append((f"acoustic {n} codebook{'s' * (n > 1)}",
                        cfg.frame_rate * n * math.log2(K), n * K,
                        lambda it, n=n: (it[1][:n].long() + torch.arange(n)[:, None] * K).T))
    rows = []
    for name, bps, n_in, get in streams:
        a, b = [get(it) for it in train_i], [get(it) for it in test_i]
        rows.append({"tokens": name, "bps": bps,
                     "per": ctc_probe(a, ys(train_e), b, ys(test_e), n_in, len(symbols), steps),
                     "speaker": speaker_probe(a, [e["speaker"] for e in train_e], b,
                                              [e["speaker"] for e in test_e], n_in, steps)})
    if mfcc and lm.features == "mfcc":  # the features the semantic tokens were clustered from
        feats = lambda es: [(utterance_features("mfcc", e["path"]) - lm.tokenizer.mean)  # noqa
                            / lm.tokenizer.std for e in es]
        rows.append({"tokens": "MFCC frames (continuous)", "bps": float("nan"),
                     "per": ctc_probe(feats(train_e), ys(train_e), feats(test_e), ys(test_e),
                                      len(lm.tokenizer.mean), len(symbols), steps),
                     "speaker": float("nan")})
    return rows


def format_probe(rows, n_test=None):
    lines = [f"{'tokens':<26} {'bps':>6} {'phone error rate':>16} {'speaker acc.':>12}"]
    for r in rows:
        lines.append(f"{r['tokens']:<26} {r['bps']:>6.0f} {r['per']:>16.1%} {r['speaker']:>12.1%}")
    lines.append("phone error rate: a linear CTC probe (lower: more phonetic); speaker acc.: a "
                 "linear classifier on token histograms (lower: less of the voice)")
    return "\n".join(lines)

# -------------------------------------------------------------------------------------------------
# The command line

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


# Copied from soundstream.py: parse_bool
def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")



def parse_floats(text):
    """"0.6,0.8,0.6" (one per stage) or one value for all three -> a 3-tuple."""
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or three, got {text!r}") from None
    if len(v) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected one value or three (semantic, coarse, fine), "
                                         f"got {text!r}")
    return v * 3 if len(v) == 1 else v


def build_parser():
    p = Parser(description="AudioLM (Borsos et al. 2023): train the three stages, continue or "
               "generate speech, evaluate, measure the token trade-off.", allow_abbrev=False)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train the stages (DDP by torchrun)")
    act.add_argument("--sample", action="store_true", help="continue --prompt, or generate from "
                     "nothing, into --out")
    act.add_argument("--eval", action="store_true", help="held-out loss against the unigram, "
                     "digit continuation, acoustic generation from true semantic tokens")
    act.add_argument("--probe", action="store_true", help="what the semantic and acoustic "
                     "tokens keep of the phones and the voice (Table I)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="default: paper")
    p.add_argument("--resume", action="store_true", help="continue the runs in OUT/<stage>")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--ckpt", help="a run's folder or a bundle (checkpoints/audiolm_tiny.pt)")
    p.add_argument("--prompt", metavar="WAV", help="--sample: the audio to continue")
    p.add_argument("--prompt_seconds", type=float, help="--sample: the prompt's first N seconds")
    p.add_argument("--samples", type=int, default=1, help="--sample: continuations in a batch "
                   "(OUT, OUT_1.wav, ...)")
    p.add_argument("--temperature", type=parse_floats, default=TEMPERATURES, metavar="T[,T,T]",
                   help="per stage (semantic, coarse, fine); default 0.6,0.8,0.6; 0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k best (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus (1: all)")
    p.add_argument("--limit", type=int, help="--eval: the first N items of each test")
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


# run settings a resumed run may change; everything else is fixed by its checkpoint
RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "num_workers", "threads",
                    "stage")


def configs_from_args(args):
    """(Config, TrainConfig): the preset with the flags given on the command line; with --resume,
    the configs of the run in OUT (its first stage's ckpt.pt)."""
    cfg, run = PRESETS[args.preset]
    given = [{f.name: getattr(args, f.name) for f in dataclasses.fields(c)
              if getattr(args, f.name) is not None} for c in (Config, TrainConfig)]
    if args.resume:
        out = Path(args.out or run.out)
        found = [out / s / "ckpt.pt" for s in STAGES if (out / s / "ckpt.pt").is_file()]
        if not found:
            raise FileNotFoundError(f"nothing to resume: no {out}/<stage>/ckpt.pt")
        ckpt = load_checkpoint(found[0])
        cfg = config_from_dict(Config, ckpt["config"], found[0])
        run = config_from_dict(TrainConfig, ckpt["train_config"], found[0])
        run = dataclasses.replace(run, out=str(out))  # the stage as first asked, unless given
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
        raise ValueError("--ckpt is required (a run's folder, e.g. runs/audiolm_tiny, or "
                         "checkpoints/audiolm_tiny.pt)")
    for t in args.temperature:
        check_sampling(t, args.top_k, args.top_p)  # before any work
    lm = AudioLM.load(args.ckpt)
    if args.features is not None and args.features != lm.features:
        lm.tokenizer.check(args.features)
        lm.features = args.features  # the same kind of features, from another folder
    codec, _ = load_codec(lm.codec_path)
    check_codec(codec, lm.cfg, lm.codec_path)
    seed = args.seed if args.seed is not None else 0
    kw = dict(temperatures=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.probe:
        print(format_probe(probe(lm, codec, args.data)))
        return
    if args.eval:
        n = sum(p.numel() for m in lm.stages().values() for p in m.parameters())
        print(f"{args.ckpt}: {n:,} parameters in the three stages", flush=True)
        _, train_items = split_items(lm, codec, "train", args.data)
        test_e, test_items = [], []
        for split in ("valid", "test"):
            e, i = split_items(lm, codec, split, args.data)
            test_e, test_items = test_e + e, test_items + i
        print("held-out cross-entropy (nats per token) on the validation and test splits:")
        for stage, (ce, uni) in heldout_loss(lm, train_items, test_items).items():
            print(f"  {stage:<9} {ce:.3f}  unigram {uni:.3f}", flush=True)
        own, other = semantic_reliance(lm, test_items)
        print(f"  coarse after its own semantic tokens {own:.3f}, after another utterance's "
              f"{other:.3f}", flush=True)
        items = [it for it in continuation_items(args.data)
                 if it["entry"].get("split") != "train"][:args.limit]
        print(format_continuation(evaluate_continuation(lm, codec, items, seed=seed, **kw),
                                  len(items)), flush=True)
        print(format_acoustic(evaluate_acoustic(lm, codec, test_e[:args.limit],
                                                test_items[:args.limit], seed, **kw)))
        return
    if not args.out or not args.out.endswith(".wav"):
        raise ValueError("--sample needs --out FILE.wav")
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    g, prompt = torch.Generator().manual_seed(seed), None
    if args.prompt:
        wav, sr = load(args.prompt, codec.sample_rate, codec.channels, notice=True)
        if args.prompt_seconds:
            wav = wav[:, :int(args.prompt_seconds * sr)]
        prompt = lm.prompt_tokens(codec, wav, sr, args.prompt)
    outs = lm.generate(codec, prompt, args.samples, generator=g, **kw)
    for n, (wav, codes) in enumerate(outs):
        path = args.out if n == 0 else args.out[:-4] + f"_{n}.wav"
        save(path, wav, codec.sample_rate)
        print(f"{path}: {wav.shape[-1] / codec.sample_rate:.2f} s, {codes.shape[-1]} frames of "
              f"{codes.shape[0]} codebooks")


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
