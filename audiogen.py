"""
AudioGen: Textually Guided Audio Generation, in one file.

Kreuk, Synnaeve, Polyak, Singer, Defossez, Copet, Parikh, Taigman, Adi. ICLR 2023
(arXiv 2209.15352). The released code is audiocraft's re-implementation ("AudioGen v2",
facebookresearch/audiocraft: audiocraft/models/lm.py, modules/codebooks_patterns.py,
modules/conditioners.py); where it differs from the paper, the comment says so. The generic
LM parts are marked copies of valle.py (attention with a KV cache, the text encoder's block,
the sinusoids, the samplers) and, through it, of soundstream.py's training blocks
(tests/test_copies.py).

Paper -> code (sections of arXiv 2209.15352 v2, as we read them)
  §3.1 audio representation ....... load_codec (encodec.py through the codec interface; the
                                    `audiogen16k` preset is the released tokenizer's shape)
  §3.2 audio language model ....... TextEncoder / FeatureText (the text encoder F; T5-large
                                    features plug in through FeatureText: DEVIATION 1),
                                    AudioGenLM (the text as a prefix AND through cross-attention
                                    in every block), lm_loss
        classifier-free guidance .. text_dropout (p = 0.1, Trainer.step), guided_logprobs (the
                                    paper's gamma log p(.|u) + (1 - gamma) log p(.))
        multi-stream .............. Pattern("parallel"): k streams, k embeddings averaged, k
                                    heads; beside it Pattern("delay"), audiocraft's pattern
  §3.3 (data) mixing .............. mix, join_captions, SoundDataset
  inference ....................... AudioGenLM.generate (KV cache, the cross-attention's keys
                                    and values computed once; top-k 250, temperature; audio
                                    continuation from a prompt), AudioGen (model + codec)
  §4 evaluation ................... analyse (deterministic attribute analysers),
                                    attribute_accuracy, evaluate (accuracy against the guidance
                                    scale, a Frechet distance against real audio)

Shapes: B batch, K streams (codebooks), T frames (50 Hz), S pattern steps, L text tokens,
D model width, H heads, N codebook size (`card`). `F` is torch.nn.functional.

The sequence the transformer reads (§3.2): Z = u_1 .. u_L, v_0 .. v_{S-1}: the projected text
features u, then one position per pattern step v_s, whose embedding is the mean of its K
codes' embeddings. Each audio position predicts the K codes of the next step with K heads:
  p(v_{s+1}^k | u, v_<=s)  for k = 1..K, independently (the paper: conditioning stream k on
  stream k-1 "did not improve").
The pattern decides which code sits in which step (Pattern):
  parallel (the paper's multi-stream): step s holds every codebook of frame s - 1;
  delay (audiocraft's, released): step s holds codebook k of frame s - 1 - k.
Step 0 is all special tokens (id N): the start. Cells the pattern leaves empty hold the special
token and are not in the loss.

DEVIATIONS from the paper (each tagged `# DEVIATION` where it happens)
  1. Text encoder. The paper uses a frozen T5-large, a download. Offline, the built-in encoder is
     a small transformer over the caption's words, trained with the model (TextEncoder). T5
     features computed elsewhere plug in unchanged through FeatureText (--text_features FILE:
     {caption: (L, 1024) tensor}); the paper preset expects them.
  2. Data: a synthetic captioned corpus of sound events (data/sounds, 26 minutes: beeps,
     chirps, noise bursts, General-MIDI instrument notes, speech) instead of ~4k hours of 10
     data sets; the captions are composed from attributes, so that generated audio can be
     checked by deterministic analysers. FAD (VGGish) and the PaSST KL cannot be had offline:
     common/evaluation.py's Frechet distance on log-mel frames stands in.
  3. The tiny preset's tokenizer is a tiny EnCodec trained on data/sounds by encodec.py's own
     command: 4 codebooks of 256 at 50 Hz (checkpoints/README.md). The paper's representation is
     one codebook of 2048 at 500 Hz (or k streams); audiocraft's 4 x 2048 at 50 Hz.

Where the paper is silent the comment says "our choice" or names audiocraft.

Exact resume: on CPU a resumed run repeats the uninterrupted one bit for bit (tested).

Commands
  python audiogen.py --train --preset tiny                           # data/sounds, 11 min CPU
  python audiogen.py --train --resume --preset tiny                  # continue where it stopped
  python audiogen.py --sample --ckpt checkpoints/audiogen_tiny.pt \
      --text "two high beeps then a noise burst" --out out.wav [--cfg 3] [--seconds 2]
  python audiogen.py --sample --ckpt C --text "..." --prompt start.wav --prompt_seconds 0.5 \
      --out more.wav                                                 # continuation
  python audiogen.py --eval --ckpt checkpoints/audiogen_tiny.pt      # accuracy vs gamma, Frechet
  torchrun --standalone --nproc_per_node=8 audiogen.py --train --preset paper --data caps.jsonl \
      --codec runs/encodec_audiogen16k/model.pt --text_features t5_large.pt
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
from common.data import read_manifest

NAME = "audiogen"
SOUNDS = Path(__file__).resolve().parent / "data" / "sounds" / "manifest.jsonl"
CHOICES = {"pattern": ("parallel", "delay"), "text_encoder": ("words", "features"),
           "amp": ("none", "bf16", "fp16")}
CODEC_CLASSES = {"encodec": "EnCodec", "soundstream": "SoundStream", "freqcodec": "FreqCodec",
                 "bigcodec": "BigCodec"}  # checkpoint "model" name -> the codec file's class
PAD, NULL, JOIN = "<pad>", "<null>", "and"  # text ids 0 and 1; the word mixing joins with

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What rebuilds the model. Defaults: the paper's method on audiocraft's released model and
    16 kHz tokenizer (encodec.py --preset audiogen16k)."""
    # The paper gives 285M (base) and 1B (large) models; their layer sizes were not in the text
    # we could read. These are the released re-implementation's (audiocraft audiogen-medium,
    # config/model/lm/model_scale/medium.yaml): 1,839,131,136 parameters with the text
    # projection, exactly as audiocraft's builders.get_lm_model counts them (tested)
    dim: int = 1536                # medium: width 1536, 24 heads, 48 layers
    heads: int = 24
    layers: int = 48
    ffn: int = 6144                # hidden_scale 4, GELU (GPT-2; audiocraft activation gelu)
    dropout: float = 0.0           # audiocraft's (the paper: not stated)
    bias: bool = False             # no bias in the attention, FFN and heads (audiocraft bias_*)
    num_codebooks: int = 4         # K streams: audiocraft's 4 x 2048 at 50 Hz (lms.md §1.2)
    codebook_size: int = 2048      # N = 2048, as §3.1's single codebook
    frame_rate: float = 50.0       # 16 kHz / hop 320
    pattern: str = "delay"         # delay: audiocraft's (released); parallel: §3.2's multi-stream
    text_encoder: str = "features"  # features: frozen T5-large (DEVIATION 1); words: built in
    text_dim: int = 1024           # T5-large's d_model; the built-in encoder's width
    text_layers: int = 2           # the built-in encoder's layers (our choice)
    text_heads: int = 8            # and heads (our choice)
    max_text: int = 32             # words per caption, joined captions included (our choice)
    clip_seconds: float = 10.0     # audiocraft trains on 10 s clips (model card)


@dataclass
class TrainConfig:
    """How the model is trained: data, augmentation, optimiser and the run."""
    codec: str = "runs/encodec_audiogen16k/model.pt"  # encodec.py --train --preset audiogen16k;
                                   # --sample / --eval: another file than the checkpoint's
    text_features: str = ""        # {caption: (L, text_dim)} .pt of frozen T5 features
    text_dropout: float = 0.1      # text omitted with p = 0.1 (§3.2; audiocraft training_dropout)
    mix_prob: float = 0.5          # share of mixed (audiocraft's aug_p 0.5; the paper: not stated)
    mix_snr: tuple[float, ...] = (-5.0, 5.0)  # SNR range in dB, uniform (audiocraft's mix_snr_low,
                                   # _high; the paper: not stated)
    lr: float = 5e-4               # AdamW 5e-4 (audiocraft's audiogen_base_16khz solver)
    warmup_steps: int = 3000       # its warm-up 3000; then cosine to 0 (our choice; audiocraft:
                                   # inverse_sqrt)
    betas: tuple[float, ...] = (0.9, 0.95)  # audiocraft's AdamW betas
    weight_decay: float = 0.1      # audiocraft's
    grad_clip: float = 1.0         # audiocraft's max_norm
    batch_size: int = 256          # audiocraft's 256, "matching AudioGen paper setup"
    data: str = ""                 # .jsonl manifest with "caption"; "": data/sounds
    out: str = "runs/audiogen"     # ckpt.pt, model.pt, log.txt, samples/, the token cache
    steps: int = 200_000           # "200k steps" for the large model (§4)
    seed: int = 0                  # weights, batches, mixing and text dropout follow from it
    log_every: int = 100           # steps between log lines (run settings: our choice)
    sample_every: int = 10_000     # steps between samples (OUT/samples/stepN.wav)
    ckpt_every: int = 5000         # steps between OUT/ckpt.pt and model.pt
    num_workers: int = 0           # DataLoader workers
    threads: int = 0               # CPU threads; 0: the idle cores
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU


PRESETS = {
    "paper": (Config(), TrainConfig()),
    # CPU preset on the shipped sound tokenizer (4 x 256 at 50 Hz, 2 s clips of data/sounds):
    # narrow and shallow, the built-in word encoder, audiocraft's delay pattern; mixing in a
    # quarter of the batches (the corpus has 649 training clips)
    "tiny": (Config(dim=128, heads=4, layers=4, ffn=512, dropout=0.1, bias=True,
                    codebook_size=256, pattern="delay", text_encoder="words", text_dim=128,
                    text_layers=2, text_heads=4, clip_seconds=2.0),
             TrainConfig(codec="checkpoints/encodec_sounds_16khz_4x256.pt", mix_prob=0.25,
                         lr=2e-3, warmup_steps=200, batch_size=16, out="runs/audiogen_tiny",
                         steps=3000, log_every=100, sample_every=1000, ckpt_every=250)),
}

# -------------------------------------------------------------------------------------------------
# Text: the caption's words, the built-in encoder and frozen features (§3.2, DEVIATION 1)


def words(text):
    """Lower-case words of a caption ("Two high beeps, then.." -> ['two', 'high', 'beeps', ..])."""
    return re.findall(r"[a-z]+", str(text).lower())


class Vocab:
    """The training captions' words: id 0 pads; id 1 (<null>) is reserved and never encoded
    (the null condition is a zero feature vector: AudioGenLM.encode_text)."""

    def __init__(self, symbols):
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_captions(cls, captions):
        return cls([PAD, NULL] + sorted({w for c in captions for w in words(c)} | {JOIN}))

    def __len__(self):
        return len(self.symbols)

    def encode(self, text, max_len, strict=True):
        """A caption -> (ids (L,), unknown words). strict: a one-line error for an empty caption,
        one of only unknown words, or one longer than max_len words."""
        ws = words(text)
        known, unknown = [self.index[w] for w in ws if w in self.index], [w for w in ws
                                                                          if w not in self.index]
        if strict and not ws:
            raise ValueError(f"the text {text!r} has no words; describe the sound, e.g. "
                             f"\"two high beeps\"")
        if strict and not known:
            raise ValueError(f"none of the words of {text!r} are in the model's vocabulary; it "
                             f"knows: {' '.join(self.symbols[2:])}")
        if strict and len(known) > max_len:
            raise ValueError(f"the text {text!r} has {len(known)} known words; the model reads at "
                             f"most {max_len}")
        return torch.tensor(known[:max_len], dtype=torch.long), unknown


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


class TextEncoder(nn.Module):
    """The built-in text encoder F (DEVIATION 1): word embeddings with sine positions, then
    `layers` bidirectional pre-norm blocks (valle.py's) and a final LayerNorm; trained with the
    model. encode(ids (B, L), mask (B, L)) -> u (B, L, text_dim)."""

    def __init__(self, vocab, dim, layers, heads, dropout, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # FFN 4 x width, as T5's and GPT-2's (our choice)
        self.blocks = nn.ModuleList([Block(dim, heads, 4 * dim, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("pos", sinusoids(max_len, dim), persistent=False)

    def forward(self, ids, mask):  # ids, mask (B, L) -> (B, L, D_t)
        x = self.embed(ids) * math.sqrt(self.embed.embedding_dim) + self.pos[:ids.shape[1]]
        keys = mask[:, None, None, :] | torch.eye(ids.shape[1], dtype=torch.bool,
                                                   device=ids.device)  # pads see themselves
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x)


class FeatureText:
    """Frozen text features computed elsewhere (T5-large's encoder in the paper), read from a .pt
    file {caption: (L, text_dim) float tensor}. The interface of the built-in encoder: a caption
    -> (L, text_dim) features; nothing here is trained. A recipe, where transformers and the
    weights exist:  tok = T5Tokenizer.from_pretrained("t5-large"); enc =
    T5EncoderModel.from_pretrained("t5-large"); feats[c] = enc(**tok(c, return_tensors="pt"))
    .last_hidden_state[0]; torch.save(feats, "t5_large.pt")."""

    def __init__(self, path, dim):
        if not path:
            raise ValueError("text_encoder features needs --text_features FILE.pt ({caption: "
                             "(L, text_dim) tensor}, e.g. frozen T5-large outputs); offline, use "
                             "--text_encoder words")
        if not Path(path).is_file():
            raise FileNotFoundError(f"text features {path} not found")
        self.path, self.table = str(path), torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self.table, dict) or not self.table:
            raise ValueError(f"{path}: expected a non-empty dict {{caption: (L, {dim}) tensor}}")
        for caption, f in self.table.items():
            if not torch.is_tensor(f) or f.dim() != 2 or f.shape[1] != dim or not len(f):
                raise ValueError(f"{path}: the features of {caption!r} are "
                                 f"{tuple(getattr(f, 'shape', ()))}; expected (L, {dim})")

    def __call__(self, caption):
        """(L, text_dim) features of a caption; of a tuple of captions (a mixture's), their
        features one after the other (the paper concatenates the captions)."""
        if isinstance(caption, tuple):
            return torch.cat([self(c) for c in caption])
        if not str(caption).strip():
            raise ValueError("the text is empty; describe the sound, e.g. \"two high beeps\"")
        if caption not in self.table:
            raise ValueError(f"{self.path} holds no features for {caption!r}")
        return self.table[caption].float()

# -------------------------------------------------------------------------------------------------
# Codebook patterns: the paper's multi-stream (parallel) and audiocraft's delay


class Pattern:
    """Where each code of a (K, T) grid sits in the LM's sequence of S = T + max delay + 1 steps:
    codebook k of frame t at step t + 1 + delay_k. Step 0 is the start; a cell no code fills holds
    the special token N and is not predicted.
      parallel (the paper's multi-stream, §3.2): delays 0, 0, .., 0: every stream of a frame in
        one step, the K codes predicted at once by K heads;
      delay (audiocraft's DelayedPatternProvider, delays 0, 1, .., K-1): codebook k of frame t
        comes k steps after codebook 1, so each is predicted after the coarser ones of its
        frame."""

    def __init__(self, kind, num_codebooks):
        if kind not in CHOICES["pattern"]:
            raise ValueError(f"pattern must be one of {', '.join(CHOICES['pattern'])}, got "
                             f"{kind!r}")
        self.kind, self.K = kind, num_codebooks
        self.delays = [0] * num_codebooks if kind == "parallel" else list(range(num_codebooks))

    def steps(self, frames):
        return frames + max(self.delays) + 1

    def valid(self, frames, device=None):
        """(K, S) bool: the cells that hold a code."""
        s = torch.arange(self.steps(frames), device=device)
        d = torch.tensor(self.delays, device=device)[:, None]
        return (s >= 1 + d) & (s < 1 + d + frames)

    def build(self, codes, special):
        """codes (B, K, T) -> the pattern's sequence (B, K, S), special where no code is."""
        B, K, T = codes.shape
        seq = codes.new_full((B, K, self.steps(T)), special)
        for k, d in enumerate(self.delays):
            seq[:, k, 1 + d:1 + d + T] = codes[:, k]
        return seq

    def revert(self, seq, frames):
        """The inverse of build: (B, K, S) -> codes (B, K, frames)."""
        return torch.stack([seq[:, k, 1 + d:1 + d + frames] for k, d in enumerate(self.delays)],
                           dim=1)

# -------------------------------------------------------------------------------------------------
# The audio language model (§3.2)


class SelfAttention(Attention):
    """valle.py's Attention (the KV cache) with or without biases (audiocraft: bias_attn
    false)."""

    def __init__(self, dim, heads, dropout, bias=False):
        super().__init__(dim, heads, dropout)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)


class CrossAttention(nn.Module):
    """Multi-head attention from the audio positions to the text (the paper: "cross-attention
    between audio and text" in every block). cache: a dict that keeps the text's keys and values,
    computed once per generation."""

    def __init__(self, dim, heads, dropout, bias=False):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.kv = nn.Linear(dim, dim, bias=bias), nn.Linear(dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, text, mask, cache=None):  # x (B, S, D), text (B, L, D), mask (B, L)
        B, S, D = x.shape
        H = self.heads
        if cache is not None and "xk" in cache:
            k, v = cache["xk"], cache["xv"]
        else:
            k, v = self.kv(text).view(B, -1, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, .)
            if cache is not None:
                cache["xk"], cache["xv"] = k, v
        q = self.q(x).view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class GenBlock(nn.Module):
    """A GPT-2-like pre-norm layer with cross-attention (§3.2): x + SelfAttn(LN(x)), then
    x + CrossAttn(LN(x), text), then x + FFN(LN(x)) with a GELU feed-forward; dropout after each
    sub-layer (audiocraft's StreamingTransformerLayer with cross_attention, norm_first)."""

    def __init__(self, dim, heads, ffn, dropout, bias=False):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, bias)
        self.cross = CrossAttention(dim, heads, dropout, bias)  # audiocraft: norm_cross is norm2
        self.mlp = nn.Sequential(nn.Linear(dim, ffn, bias=bias), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, dim, bias=bias))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, text, text_mask, cache=None):  # (B, S, D) -> (B, S, D)
        x = x + self.drop(self.attn(self.norm1(x), mask, cache))
        x = x + self.drop(self.cross(self.norm2(x), text, text_mask, cache))
        return x + self.drop(self.mlp(self.norm3(x)))


def causal_mask(text_mask, steps):
    """(B, 1, L + S, L + S) bool, True where attention is allowed, over [text; audio]: causal
    self-attention over the concatenation (Fig. 1: "text and audio embeddings are concatenated
    over the time dimension and fed in ... causal self-attention"), never onto padded text; a
    padded position sees itself (so that no row of the softmax is empty)."""
    B, L = text_mask.shape
    n = L + steps
    i = torch.arange(n, device=text_mask.device)
    keys = torch.cat([text_mask, text_mask.new_ones(B, steps)], dim=1)  # (B, L + S)
    return ((i[None, :] <= i[:, None]) & keys[:, None, :] | (i[None, :] == i[:, None]))[:, None]


def guided_logprobs(cond, uncond, scale):
    """Classifier-free guidance (§3.2): sample from gamma log p(v | u, v_<) + (1 - gamma)
    log p(v | v_<), the conditional and unconditional log-probabilities of the same model.
    gamma = 1: the conditional distribution; 0: the unconditional. (audiocraft mixes logits,
    uncond + (cond - uncond) * gamma: the same distribution after the softmax.)"""
    return scale * cond.log_softmax(dim=-1) + (1 - scale) * uncond.log_softmax(dim=-1)


class AudioGenLM(nn.Module):
    """The transformer decoder over [text prefix u; audio steps v] with cross-attention to u in
    every block and K prediction heads."""

    def __init__(self, cfg, vocab=None, codec_path="", text_features=""):
        super().__init__()
        self.cfg, self.vocab, self.codec_path = cfg, vocab, str(codec_path)
        self.pattern = Pattern(cfg.pattern, cfg.num_codebooks)
        self.special = cfg.codebook_size  # id N: the start step and the empty cells
        self.text_features = str(text_features)
        if cfg.text_encoder == "words":
            if vocab is None:
                raise ValueError("the built-in text encoder needs the captions' vocabulary")
            self.text = TextEncoder(len(vocab), cfg.text_dim, cfg.text_layers, cfg.text_heads,
                                    cfg.dropout, cfg.max_text)
        else:
            self.text, self.features = None, None  # read at the first encode_text
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)  # audiocraft's output_proj
        # §3.2 multi-stream: "k embedding layers ... the final embedding is their average"
        self.embed = nn.ModuleList([nn.Embedding(cfg.codebook_size + 1, cfg.dim)
                                    for _ in range(cfg.num_codebooks)])
        self.blocks = nn.ModuleList([GenBlock(cfg.dim, cfg.heads, cfg.ffn, cfg.dropout, cfg.bias)
                                     for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleList([nn.Linear(cfg.dim, cfg.codebook_size, bias=False)  # k heads
                                    for _ in range(cfg.num_codebooks)])
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections / sqrt(2 layers)
            # (by name: the text encoder's blocks too, by the LM's depth; the shipped model's init)
            if name.endswith(("attn.out.weight", "cross.out.weight", "mlp.3.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @staticmethod
    def _init(m):  # GPT-2's init (our choice; audiocraft: gaussian with depthwise scaling)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # --- the text ---------------------------------------------------------------------------

    def text_ids(self, captions, strict=True):
        """Captions -> (ids (B, L), mask (B, L)), right-padded; unknown words are left out."""
        rows = [self.vocab.encode(c, self.cfg.max_text, strict)[0] for c in captions]
        L = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return ids, ids != 0

    def encode_text(self, text, drop=None):
        """The text features u (B, L, D) and their mask (B, L). text: (ids, mask) for the
        built-in encoder, a list of captions for frozen features. drop (B,) bool: those rows get
        the null condition, whatever their text: one zero feature vector before the projection
        (so the model sees the projection's bias; audiocraft: zeros after it, masked), as do rows
        without a known word."""
        if self.text is not None:
            ids, mask = (t.to(self.text_proj.weight.device) for t in text)
            u = self.text(ids, mask)
        else:
            if self.features is None:
                self.features = FeatureText(self.text_features, self.cfg.text_dim)
            feats = [self.features(c) for c in text]
            L = max(len(f) for f in feats)
            u = torch.zeros(len(feats), L, self.cfg.text_dim, device=self.text_proj.weight.device)
            mask = torch.zeros(len(feats), L, dtype=torch.bool, device=u.device)
            for i, f in enumerate(feats):
                u[i, :len(f)], mask[i, :len(f)] = f.to(u.device), True
        empty = ~mask.any(dim=1)  # no known word: the null text (no all-masked attention row)
        drop = empty if drop is None else drop.to(mask.device) | empty
        if drop.any():
            keep = ~drop[:, None]
            u = u * keep[..., None]
            mask = (mask & keep) | (drop[:, None] & (torch.arange(u.shape[1], device=u.device)
                                                     == 0))
        return self.text_proj(u), mask

    # --- the transformer --------------------------------------------------------------------

    def embed_steps(self, steps, start=0):
        """steps (B, K, S) -> (B, S, D): the mean of the K embeddings, plus the sine position of
        each step (audiocraft: positional_embedding sin, on the audio only)."""
        x = torch.stack([e(steps[:, k]) for k, e in enumerate(self.embed)]).mean(dim=0)
        return x + sinusoids(start + steps.shape[-1], self.cfg.dim, x.device)[start:]

    def forward(self, text, steps, drop=None):
        """Teacher forcing: text as encode_text takes it (drop: the rows whose text is dropped),
        steps (B, K, S) -> logits (B, K, S, N): at step s, the K codes of step s + 1."""
        return self.decode(*self.encode_text(text, drop), steps)

    def decode(self, u, text_mask, steps):
        """forward on text already encoded: u (B, L, D), text_mask (B, L)."""
        B, L, _ = u.shape
        S = steps.shape[-1]
        x = torch.cat([u, self.embed_steps(steps)], dim=1)  # (B, L + S, D)
        mask = causal_mask(text_mask, S)
        for block in self.blocks:
            x = block(x, mask, u, text_mask)
        h = self.norm(x[:, L:])
        return torch.stack([head(h) for head in self.heads], dim=1)

    def step_logits(self, u, text_mask, steps, caches, start):
        """Incremental: the new steps (B, K, S_new) after `start` audio steps already in
        `caches` (a dict per block; empty at the start, then the text prefix goes in first)
        -> logits (B, K, S_new, N)."""
        B, L, _ = u.shape
        S = steps.shape[-1]
        x = self.embed_steps(steps, start)
        if start == 0:  # the first call: the text prefix, then the steps
            x = torch.cat([u, x], dim=1)
            mask = causal_mask(text_mask, S)
        else:  # S new queries over the text, the past steps and the new ones causally
            past = torch.cat([text_mask, text_mask.new_ones(B, start)], dim=1)  # (B, L + start)
            causal = torch.ones(S, S, dtype=torch.bool, device=u.device).tril()
            mask = torch.cat([past[:, None, :].expand(B, S, -1), causal.expand(B, S, S)],
                             dim=2)[:, None]  # (B, 1, S, L + start + S)
        for block, cache in zip(self.blocks, caches):
            x = block(x, mask, u, text_mask, cache)
        h = self.norm(x[:, -S:])
        return torch.stack([head(h) for head in self.heads], dim=1)

    # --- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, text, frames, cfg_scale=3.0, temperature=1.0, top_k=250, top_p=1.0,
                 prompt=None, generator=None, use_cache=True):
        """Sample codes (B, K, frames). text: what encode_text takes (B rows). cfg_scale: the
        guidance scale gamma (1: the conditional model alone; then no second pass). prompt
        (B, K, P) codes: audio continuation, its cells kept as given. use_cache False
        recomputes the whole sequence at every step (the check of the cache)."""
        check_sampling(temperature, top_k, top_p)
        u, text_mask = self.encode_text(text)
        B = u.shape[0]
        if cfg_scale != 1:  # [conditional; unconditional] in one batch of 2B (audiocraft)
            null_u, null_mask = self.encode_text(text, drop=torch.ones(B, dtype=torch.bool,
                                                                      device=u.device))
            L = max(u.shape[1], null_u.shape[1])
            u = torch.cat([F.pad(u, (0, 0, 0, L - u.shape[1])),
                           F.pad(null_u, (0, 0, 0, L - null_u.shape[1]))])
            text_mask = torch.cat([F.pad(text_mask, (0, L - text_mask.shape[1])),
                                   F.pad(null_mask, (0, L - null_mask.shape[1]))])
        K, S, N = self.cfg.num_codebooks, self.pattern.steps(frames), self.special
        seq = torch.full((B, K, S), N, dtype=torch.long, device=u.device)  # (B, K, S) steps
        valid = self.pattern.valid(frames, u.device)  # (K, S)
        known = torch.zeros(B, K, S, dtype=torch.bool, device=u.device)  # prompt cells (B, K, S)
        if prompt is not None:
            P = prompt.shape[-1]
            if P > frames:
                raise ValueError(f"the prompt has {P} frames; generate at least as many "
                                 f"({frames} asked)")
            given = self.pattern.build(F.pad(prompt, (0, frames - P)), N).to(u.device)  # (B,K,S)
            known = self.pattern.valid(P, u.device)[None].expand(B, K, -1)
            known = F.pad(known, (0, S - known.shape[-1]))
            seq = torch.where(known, given, seq)
        caches = [{} for _ in self.blocks]
        for s in range(1, S):
            if use_cache:
                new = seq[:, :, s - 1:s]
                logits = self.step_logits(u, text_mask, torch.cat([new, new]) if cfg_scale != 1
                                          else new, caches, s - 1)[:, :, -1]  # (B', K, N)
            else:
                full = torch.cat([seq[:, :, :s]] * (2 if cfg_scale != 1 else 1))
                logits = self.decode(u, text_mask, full)[:, :, -1]
            if cfg_scale != 1:
                logits = guided_logprobs(logits[:B], logits[B:], cfg_scale)
            ids = sample(logits.reshape(B * K, N), temperature, top_k, top_p,  # (B, K)
                         generator).view(B, K)
            ids = torch.where(valid[:, s], ids, torch.full_like(ids, N))
            seq[:, :, s] = torch.where(known[:, :, s], seq[:, :, s], ids)
        return self.pattern.revert(seq, frames)

    # --- files ------------------------------------------------------------------------------

    def save(self, path, half=False):
        state = {k: v.half() if half and v.is_floating_point() else v
                 for k, v in self.state_dict().items()}
        atomic_save({"model": NAME, "config": dataclasses.asdict(self.cfg),
                     "vocab": self.vocab.symbols if self.vocab else None,
                     "codec": self.codec_path, "text_features": self.text_features,
                     "state_dict": state}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        """--train's model.pt or ckpt.pt (or a shipped checkpoint) -> the model in eval mode."""
        ckpt = load_checkpoint(resolve_path(path), map_location)
        cfg = config_from_dict(Config, ckpt["config"], path)
        vocab = Vocab(ckpt["vocab"]) if ckpt.get("vocab") else None
        model = cls(cfg, vocab, ckpt.get("codec", ""), ckpt.get("text_features", ""))
        model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
        return model.eval()


def lm_loss(model, text, codes, drop=None, reduction="mean"):
    """The cross-entropy of §3.2 on codes (B, K, T) through the pattern, over the valid cells
    only, per codebook then averaged over the K codebooks (audiocraft's _compute_cross_entropy).
    model: the AudioGenLM or its DDP wrapper. Returns (loss, per-codebook losses (K,));
    reduction "none": per-row sums (B, K) and the cells counted per row (K,)."""
    inner = model.module if hasattr(model, "module") else model
    seq = inner.pattern.build(codes, inner.special)  # (B, K, S)
    logits = model(text, seq[:, :, :-1], drop)  # (B, K, S - 1, N): step s predicts step s + 1
    target = seq[:, :, 1:]
    valid = inner.pattern.valid(codes.shape[-1], codes.device)[:, 1:]  # (K, S - 1)
    target = target.masked_fill(~valid, 0)  # an empty cell's special id is not a class
    ce = F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), reduction="none").view(
        target.shape) * valid  # (B, K, S - 1)
    if reduction == "none":
        return ce.sum(-1), valid.sum(-1).float()
    per_q = ce.sum(dim=(0, 2)) / (valid.sum(-1) * codes.shape[0])
    return per_q.mean(), per_q.detach()


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
# Mixing augmentation (§3.3): two clips summed at a random SNR, their captions joined


def mix(first, second, snr_db):
    """first + g * second with g such that 10 log10(P(first) / P(g * second)) = snr_db (P: mean
    power; both (T,), the same length); the sum is scaled down if it would clip. A silent clip
    is added as it is. The two start together (our choice; audiocraft shifts the second by a
    random offset, at least half overlapping)."""
    if first.shape != second.shape:
        raise ValueError(f"mix needs clips of one length, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    p1, p2 = first.pow(2).mean(), second.pow(2).mean()
    g = (p1 / (p2 * 10 ** (snr_db / 10))).sqrt() if p1 > 0 and p2 > 0 else torch.tensor(1.0)
    out = first + g * second
    peak = out.abs().max()
    return out / peak * 0.99 if peak > 0.99 else out


def join_captions(first, second):
    """The mixture's caption: both captions, joined by "and" (the paper concatenates them;
    audiocraft's sound_dataset joins them with a space)."""
    return f"{first} {JOIN} {second}"

# -------------------------------------------------------------------------------------------------
# Codec tokens (through the codec interface), cached on disk


# Copied from audiolm.py: resolve_path
def resolve_path(path):
    """A path as stored in a checkpoint: relative to the working directory, or else to this
    file's folder (the shipped checkpoints/...)."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (Path(__file__).parent / p).is_file():
        return Path(__file__).parent / p
    return p


# Copied from audiolm.py: load_codec
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
    have = (codec.num_codebooks, codec.codebook_size, float(codec.frame_rate), codec.channels)
    if have != (cfg.num_codebooks, cfg.codebook_size, cfg.frame_rate, 1):
        raise ValueError(f"{path}: {have[0]} x {have[1]} codes at {have[2]:g} Hz, {have[3]} "
                         f"channel(s); the model takes {cfg.num_codebooks} x {cfg.codebook_size} "
                         f"at {cfg.frame_rate:g} Hz, mono")


def clip_samples(cfg, codec):
    return int(round(cfg.clip_seconds * codec.sample_rate))


def read_clip(path, cfg, codec):
    """An audio file at the codec's rate, mono, cut or zero-padded to clip_seconds: (T,)."""
    wav = load(path, codec.sample_rate, 1)[0][0]
    n = clip_samples(cfg, codec)
    return F.pad(wav[:n], (0, max(0, n - wav.shape[-1])))


@torch.no_grad()
def encode_clips(codec, wavs, batch=32):
    """(B, T) waveforms -> codes (B, K, frames) with the codec, in batches."""
    out = []
    for i in range(0, len(wavs), batch):
        enc = codec.encode(wavs[i:i + batch, None].to(next(codec.parameters()).device),
                           sample_rate=codec.sample_rate)
        out.append(getattr(enc, "codes", enc).cpu())
    return torch.cat(out)


def token_cache(cfg, codec, codec_path, entries, cache_dir):
    """(waveforms (B, T) float, codes (B, K, frames) int16) of every entry, computed once and
    kept in cache_dir/tokens-<key>.pt, keyed by the codec file's bytes, the clip length and the
    audio paths."""
    h = hashlib.sha256(resolve_path(codec_path).read_bytes())
    h.update(f"{cfg.clip_seconds}|".encode() + "".join(e["path"] for e in entries).encode())
    cache = Path(cache_dir) / f"tokens-{h.hexdigest()[:16]}.pt"
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        return data["wav"].float(), data["codes"].long()
    wavs = torch.stack([read_clip(e["path"], cfg, codec) for e in entries])
    codes = encode_clips(codec, wavs)
    atomic_save({"wav": wavs.half(), "codes": codes.to(torch.int16)}, cache)
    return wavs.half().float(), codes
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


class SoundDataset(torch.utils.data.Dataset):
    """Training examples: a clip, its codes and its caption's ids (right-padded to max_text, so
    that the generic fit's DataLoader stacks them). A share mix_prob of the examples is mixed
    with another training clip at an SNR drawn uniformly from mix_snr, their captions joined
    (§3.3); a mixture's codes are the codec's of the sum, left to the trainer (`mixed` marks
    them). Drawn from (seed, epoch, index): a resumed run sees the same examples."""

    def __init__(self, cfg, run, wavs, codes, captions, vocab, seed=0):
        self.cfg, self.run, self.wavs, self.codes = cfg, run, wavs, codes
        self.captions, self.vocab = captions, vocab
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.captions)

    def example(self, i, g=None):
        """(waveform (T,), codes (K, frames) or None for a mixture, caption[, the other clip]) of
        example i; g: the generator of the mixing draws (None: no mixing)."""
        if g is None or len(self) < 2 or torch.rand(1, generator=g).item() >= self.run.mix_prob:
            return self.wavs[i], self.codes[i], self.captions[i]
        j = int(torch.randint(len(self) - 1, (1,), generator=g))
        j += j >= i  # another clip
        lo, hi = self.run.mix_snr
        snr = lo + (hi - lo) * torch.rand(1, generator=g).item()
        caption = join_captions(self.captions[i], self.captions[j])
        if len(words(caption)) > self.cfg.max_text:  # a caption cut short would not say it all
            return self.wavs[i], self.codes[i], self.captions[i]
        return mix(self.wavs[i], self.wavs[j], snr), None, caption, j

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 62)
        wav, codes, caption, *other = self.example(i, g)
        ids = (self.vocab.encode(caption, self.cfg.max_text, strict=False)[0] if self.vocab
               else torch.zeros(0, dtype=torch.long))
        return {"wav": wav, "codes": torch.zeros_like(self.codes[i]) if codes is None else codes,
                "mixed": torch.tensor(codes is None),
                "text": F.pad(ids, (0, self.cfg.max_text - len(ids))),
                "pair": torch.tensor([i, other[0] if other else -1])}  # frozen features: captions


def text_dropout_mask(n, p):
    """(n,) bool: the rows whose text is dropped, each with probability p (§3.2: one coin per
    example; audiocraft's ClassifierFreeGuidanceDropout: one per batch), from the global RNG
    (saved in ckpt.pt, so a resumed run drops the same rows)."""
    return torch.rand(n) < p


class Trainer:
    """The LM and its optimiser; step() updates it on one batch."""

    def __init__(self, cfg, run, vocab, codec, rank=0, world=1, device="cpu"):
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)
        self.model = AudioGenLM(cfg, vocab, run.codec, run.text_features).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        other = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                      {"params": other, "weight_decay": 0.0}],
                                     lr=run.lr, betas=tuple(run.betas))
        cuda = self.device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.amp_dtype = amp if cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and run.amp == "fp16")
        self.wrapped = self.model  # what step() calls: the model, or its DDP wrapper
        if world > 1:
            ids = [self.device.index] if cuda else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, ids)
        torch.manual_seed(run.seed + rank)  # dropout and text dropout differ per rank
        self.codec = codec.to(self.device)
        self.step_count, self.sample_caption, self.captions = 0, None, []

    def lr_at(self, step):
        """Linear warm-up over warmup_steps, then a cosine decay to 0 at the last step
        (audiocraft's musicgen/audiogen solvers: cosine with warm-up)."""
        run = self.run
        if step < run.warmup_steps:
            return run.lr * (step + 1) / run.warmup_steps
        done = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        return run.lr * 0.5 * (1 + math.cos(math.pi * done))

    def text(self, ids):
        ids = ids[:, :max(1, int((ids != 0).sum(1).max()))]  # cut the padding every row shares
        return ids, ids != 0

    def step(self, batch, diagnose=False):
        """One update: the mixtures' codes from the codec, the text of a share text_dropout of
        the rows dropped (§3.2, one coin per example; audiocraft: one per batch), then the
        cross-entropy. With amp (CUDA) the forward runs in bf16 / fp16."""
        self.model.train()
        b = {k: v.to(self.device) for k, v in batch.items()}
        codes = b["codes"].long()
        if b["mixed"].any():
            codes[b["mixed"]] = encode_clips(self.codec, b["wav"][b["mixed"]]).to(self.device)
        drop = text_dropout_mask(len(codes), self.run.text_dropout)
        if self.model.text is not None:
            text = self.text(b["text"])
        else:  # frozen features are looked up by caption; a mixture's are both captions'
            text = [self.captions[i] if j < 0 else (self.captions[i], self.captions[j])
                    for i, j in batch["pair"].tolist()]
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        with (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype
              else contextlib.nullcontext()):
            loss, per_q = lm_loss(self.wrapped, text, codes, drop.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradient, not the scaled one
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return {"ce": loss.item(), "ce_q": per_q.tolist(), "|g|": norm.item(),
                "lr": self.opt.param_groups[0]["lr"]}

    def write_sample(self, stem):
        """A clip for the first validation caption at gamma 3, with its own generator (the
        training RNG is not touched): stem.wav and stem.txt (the caption)."""
        if self.sample_caption is None:
            return
        model = self.model.eval()
        g = torch.Generator(device=self.device).manual_seed(0)
        try:
            text = (model.text_ids([self.sample_caption]) if model.text is not None
                    else [self.sample_caption])
            model.encode_text(text)
        except ValueError:  # no known word, or no features for it: no sample
            return
        codes = model.generate(text, frames_for(self.cfg, self.codec), 3.0, generator=g)
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        save(Path(f"{stem}.wav"), self.codec.decode(codes)[0].cpu(), self.codec.sample_rate)
        Path(f"{stem}.txt").write_text(self.sample_caption + "\n")

    def state_dict(self):
        """Everything an exact resume needs. Collective under DDP: every rank's RNG state."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": NAME, "config": dataclasses.asdict(self.cfg),
                "train_config": dataclasses.asdict(self.run), "step": self.step_count,
                "vocab": self.model.vocab.symbols if self.model.vocab else None,
                "codec": self.model.codec_path, "text_features": self.model.text_features,
                "state_dict": self.model.state_dict(), "opt": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs}

    # Copied from valle.py: Trainer.load_state_dict
    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count = ckpt["step"]
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


def frames_for(cfg, codec, seconds=None):
    """Codec frames in `seconds` (default: clip_seconds)."""
    return max(1, round((cfg.clip_seconds if seconds is None else seconds) * codec.frame_rate))


def captioned(data, split):
    """The clips of one split of a manifest whose rows have a "caption" (a one-line error for a
    manifest without captions)."""
    rows = read_manifest(data or SOUNDS)
    if not all(isinstance(e.get("caption"), str) for e in rows):
        raise ValueError(f"{data or SOUNDS}: every row needs a \"caption\" string (a text-to-audio "
                         f"manifest, as data/sounds/manifest.jsonl)")
    return rows if not any("split" in e for e in rows) else [e for e in rows
                                                              if e.get("split") == split]


def check_config(cfg, run):
    """One-line errors for values the model cannot be built or trained with."""
    for obj, names in ((cfg, ("dim", "heads", "layers", "ffn", "num_codebooks", "codebook_size",
                              "frame_rate", "text_dim", "text_heads", "max_text",
                              "clip_seconds")),
                       (run, ("batch_size", "steps", "log_every", "sample_every", "ckpt_every",
                              "lr"))):
        bad = [n for n in names if not getattr(obj, n) > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be positive")
    if cfg.dim % cfg.heads or cfg.text_dim % cfg.text_heads:
        raise ValueError(f"dim {cfg.dim} must divide by heads {cfg.heads}, text_dim "
                         f"{cfg.text_dim} by text_heads {cfg.text_heads}")
    for obj, name in ((cfg, "pattern"), (cfg, "text_encoder"), (run, "amp")):
        if getattr(obj, name) not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got "
                             f"{getattr(obj, name)!r}")
    if not 0 <= run.text_dropout < 1 or not 0 <= run.mix_prob <= 1:
        raise ValueError(f"text_dropout must be in [0, 1) and mix_prob in [0, 1]; got "
                         f"{run.text_dropout}, {run.mix_prob}")
    if len(run.betas) != 2 or len(run.mix_snr) != 2 or run.mix_snr[0] > run.mix_snr[1]:
        raise ValueError(f"betas and mix_snr must be two numbers (mix_snr low, high); got "
                         f"{run.betas}, {run.mix_snr}")


def train(cfg, run, resume=False, overwrite=False, interrupt_after=None):
    """Train on the training split of run.data (default data/sounds), with DDP under torchrun.
    resume: continue the run in OUT exactly. Returns (trainer, this process's per-step stats)."""
    check_config(cfg, run)
    rank, world, device = setup_distributed()
    master, out = rank == 0, Path(run.out)
    try:
        if not resume and not overwrite and (out / "ckpt.pt").is_file():
            raise ValueError(f"{out} already holds a training run (ckpt.pt); continue it with "
                             f"--resume, or start over with --overwrite")
        if run.batch_size % world:
            raise ValueError(f"batch_size {run.batch_size} is not divisible by {world} processes")
        threads, why = pick_threads(run.threads, world) if device.type == "cpu" else (0, "")
        if threads:
            torch.set_num_threads(threads)
        t0 = time.time()
        entries = captioned(run.data, "train")
        codec, kind = load_codec(run.codec)
        check_codec(codec, cfg, run.codec)
        vocab = Vocab.from_captions(e["caption"] for e in entries)
        if master:  # rank 0 fills the cache, the others read it
            wavs, codes = token_cache(cfg, codec, run.codec, entries, out)
        if world > 1:
            dist.barrier()
            wavs, codes = token_cache(cfg, codec, run.codec, entries, out)
        trainer = Trainer(cfg, run, vocab if cfg.text_encoder == "words" else None, codec, rank,
                          world, device)
        trainer.captions = [e["caption"] for e in entries]
        if resume and (out / "ckpt.pt").is_file():
            start = load_checkpoint(out / "ckpt.pt")
            if start["vocab"] != (trainer.model.vocab.symbols if trainer.model.vocab else None):
                raise ValueError(f"{out / 'ckpt.pt'} was trained on other captions (another "
                                 f"vocabulary) than {run.data or SOUNDS}")
            trainer.load_state_dict(start)
        valid = captioned(run.data, "valid")
        trainer.sample_caption = valid[0]["caption"] if valid else None
        if master:
            out.mkdir(parents=True, exist_ok=True)
            n = sum(p.numel() for p in trainer.model.parameters())
            print(f"{len(entries)} clips, {kind} tokens {codec.num_codebooks} x "
                  f"{codec.codebook_size} at {codec.frame_rate:g} Hz ({time.time() - t0:.1f} s), "
                  f"{len(vocab) - 2} words, AudioGen LM {n:,} parameters, {cfg.pattern} pattern, "
                  f"{world} process(es)" + (f", {threads} thread(s){why}" if threads else ""),
                  flush=True)
        if trainer.step_count >= run.steps:
            if master:
                print(f"finished ({trainer.step_count} steps)", flush=True)
            return trainer, []
        t1 = time.time()
        history = fit(trainer, run, SoundDataset(cfg, run, wavs, codes, trainer.captions,
                                                 trainer.model.vocab, run.seed), interrupt_after)
        if master:
            print(f"{len(history)} steps in {time.time() - t1:.0f} s", flush=True)
        return trainer, history
    finally:
        if world > 1:
            dist.destroy_process_group()

# -------------------------------------------------------------------------------------------------
# Inference: text (and an audio prompt) -> audio


def check_prompt(wav, sample_rate, codec):
    """One-line errors for a prompt tensor the codec cannot read: (B, T) or (B, 1, T) at the
    codec's rate, finite, not empty."""
    if not torch.is_tensor(wav) or not wav.is_floating_point():
        raise ValueError(f"the prompt must be a float tensor (batch, samples), got "
                         f"{getattr(wav, 'dtype', type(wav).__name__)}")
    if wav.dim() == 3 and wav.shape[1] != 1:
        raise ValueError(f"the prompt has {wav.shape[1]} channels; the codec reads mono")
    if wav.dim() not in (2, 3) or wav.shape[-1] == 0:
        raise ValueError(f"the prompt must be (batch, samples) and not empty, got "
                         f"{tuple(wav.shape)}")
    if sample_rate != codec.sample_rate:
        raise ValueError(f"the prompt is at {sample_rate} Hz; the codec reads {codec.sample_rate} "
                         f"Hz (resample it with common.audio.resample)")
    if not torch.isfinite(wav).all():
        raise ValueError("the prompt holds NaN or infinite samples")
    return wav if wav.dim() == 2 else wav[:, 0]


class AudioGen:
    """The LM and its codec: captions (and a prompt) in, waveforms out."""

    def __init__(self, lm, codec):
        self.lm, self.codec = lm, codec
        check_codec(codec, lm.cfg, lm.codec_path)

    @classmethod
    def load(cls, path, codec=None):
        """A model.pt / ckpt.pt; the codec from the path it names (or the one given)."""
        lm = AudioGenLM.load(path)
        return cls(lm, load_codec(codec or lm.codec_path)[0])

    def text(self, captions):
        """(ids, mask) of the captions, with a one-line notice for the words the model does not
        know (they are left out); a one-line error for an empty caption or one of only unknown
        words."""
        if self.lm.text is None:
            return list(captions)
        for c in captions:
            unknown = self.lm.vocab.encode(c, self.lm.cfg.max_text)[1]
            if unknown:
                print(f"notice: {' '.join(unknown)}: not in the model's vocabulary, left out of "
                      f"{c!r}", file=sys.stderr)
        return self.lm.text_ids(captions)

    @torch.no_grad()
    def generate(self, captions, seconds=None, cfg_scale=3.0, temperature=1.0, top_k=250,
                 top_p=1.0, prompt=None, sample_rate=None, generator=None):
        """Waveforms (B, T) for the captions. prompt (B, T_p) at sample_rate: continued (its
        codes kept as the first frames). Defaults: the paper's (top-k 250, temperature 1,
        guidance 3, audiocraft's inference_coef)."""
        if isinstance(captions, str):
            captions = [captions]
        frames = frames_for(self.lm.cfg, self.codec, seconds)
        codes = None
        if prompt is not None:
            wav = check_prompt(prompt, sample_rate, self.codec)
            if len(wav) != len(captions):
                raise ValueError(f"{len(wav)} prompts for {len(captions)} captions")
            codes = encode_clips(self.codec, wav)[..., :frames]
        out = self.lm.generate(self.text(captions), frames, cfg_scale, temperature, top_k, top_p,
                               codes, generator)
        n = round(frames * self.codec.sample_rate / self.codec.frame_rate)
        return self.codec.decode(out)[:, 0, :n], out

# -------------------------------------------------------------------------------------------------
# Evaluation (§4, offline): deterministic attribute analysers, accuracy against the guidance
# scale, a Frechet distance against real audio (DEVIATION 2)

ANALYSIS_RATE = 16000
BAND_EDGES = (375.0, 1270.0)  # low | mid | high: the geometric means of data/sounds' band gaps


def _frames(x, win, hop):
    n = 1 + max(0, (len(x) - win) // hop)
    return x[np.arange(win)[None] + hop * np.arange(n)[:, None]]  # (n, win)


def _f0(segment, sample_rate):
    """The fundamental of a segment by autocorrelation: the smallest lag past the first zero
    crossing whose correlation is within 10 % of the best (80-4000 Hz)."""
    seg = segment - segment.mean()
    spec = np.fft.rfft(seg, 2 * len(seg))
    ac = np.fft.irfft(spec * spec.conj())[:len(seg)]  # the autocorrelation, by FFT
    ac = ac / max(ac[0], 1e-12)
    hi = int(sample_rate / 80)
    neg = np.nonzero(ac[:hi] < 0)[0]
    lo = max(int(neg[0]) if len(neg) else 2, int(sample_rate / 4000))
    if lo >= hi:
        return 0.0
    r = ac[lo:hi]
    return sample_rate / (lo + int(np.argmax(r >= 0.9 * r.max())))


def analyse(wav, sample_rate=ANALYSIS_RATE):
    """What can be measured back of a caption's attributes, by fixed rules (thresholds set on
    data/sounds' training clips; the `real` row of evaluate is their accuracy on held-out ones):
      count      events: runs of 20 ms frames (10 ms hop) within 24 dB of the loudest, gaps
                 under 40 ms merged, runs under 30 ms dropped;
      noise      the median spectral flatness (100-7000 Hz) of the active frames above 0.06 (the
                 geometric mean of data/sounds' tonal clips, below 0.006, and its noise, 0.55; the
                 tokenizers colour noise down to 0.12-0.27);
      band       the median f0 of the events: low < 375 Hz <= mid < 1270 Hz <= high;
      direction  per event, the peak frequency of its last third over its first: above 1.25
                 rising, below 0.8 falling, else steady (the median over events);
      speech     not noise, active in at least half of the frames, and a spectral centroid that
                 moves (mean |d log centroid| between active frames at least 0.08: phones).
    wav: (T,) array or tensor. Returns a dict of the five."""
    x = np.asarray(wav.detach().cpu() if torch.is_tensor(wav) else wav, np.float64).reshape(-1)
    if sample_rate != ANALYSIS_RATE:
        from common.audio import resample
        x = resample(torch.from_numpy(x)[None], sample_rate, ANALYSIS_RATE)[0].numpy()
    x = np.pad(x, (0, max(0, 512 - len(x))))
    rms = np.sqrt((_frames(x, 320, 160) ** 2).mean(1) + 1e-12)
    act = rms > max(rms.max() * 10 ** (-24 / 20), 1e-3)
    runs, i = [], 0
    while i < len(act):  # runs of active frames, short gaps merged, short runs dropped
        if act[i]:
            j = i
            while j < len(act) and act[j]:
                j += 1
            if runs and i - runs[-1][1] < 4:
                runs[-1][1] = j
            else:
                runs.append([i, j])
            i = j
        else:
            i += 1
    events = [(a, b) for a, b in runs if b - a >= 3]
    spec = np.abs(np.fft.rfft(_frames(np.pad(x, (256, 256)), 512, 160) * np.hanning(512)))
    power = (spec ** 2 + 1e-12)[:len(act)]
    freqs = np.fft.rfftfreq(512, 1 / ANALYSIS_RATE)
    band = power[:, (freqs >= 100) & (freqs <= 7000)]
    flat = np.exp(np.log(band).mean(1)) / band.mean(1)
    peak = freqs[(freqs >= 100) & (freqs <= 7000)][band.argmax(1)]
    centroid = (power * freqs).sum(1) / power.sum(1)
    noise = bool(act.any() and np.median(flat[act]) > 0.06)
    f0s, ratios = [], []
    for a, b in events:
        f0s.append(_f0(x[a * 160:b * 160 + 160], ANALYSIS_RATE))
        k = max(1, (b - a) // 3)
        ratios.append(np.median(peak[b - k:b]) / max(np.median(peak[a:a + k]), 1.0))
    f0 = float(np.median(f0s)) if f0s else 0.0
    ratio = float(np.median(ratios)) if ratios else 1.0
    both = act[1:] & act[:-1]
    moving = float(np.abs(np.diff(np.log(centroid)))[both].mean()) if both.any() else 0.0
    return {"count": len(events), "noise": noise,
            "band": "low" if f0 < BAND_EDGES[0] else "mid" if f0 < BAND_EDGES[1] else "high",
            "direction": "rising" if ratio > 1.25 else "falling" if ratio < 0.8 else "steady",
            "speech": bool(not noise and act.mean() >= 0.5 and moving >= 0.08)}


ATTRIBUTES = ("count", "band", "direction", "noise", "speech")


def attribute_checks(wav, sample_rate, events):
    """{attribute: [right or wrong, ...]} of one clip against the events its caption names
    (data/sounds' "events"): two events ("A then B") are checked on the two halves, one on the
    whole clip. Every event is checked for tonal against noise and, on a whole clip, speech
    against not; beeps and notes for their band, chirps for their direction."""
    parts = [wav] if len(events) == 1 else list(torch.as_tensor(wav).chunk(len(events)))
    checks = {a: [] for a in ATTRIBUTES}
    for part, event in zip(parts, events):
        got = analyse(part, sample_rate)
        if len(events) == 1:
            checks["speech"].append(got["speech"] == (event["kind"] == "speech"))
        if event["kind"] == "speech":
            continue
        checks["count"].append(got["count"] == event["count"])
        checks["noise"].append(got["noise"] == (event["kind"] == "noise"))
        if "band" in event:
            checks["band"].append(got["band"] == event["band"])
        if "direction" in event:
            checks["direction"].append(got["direction"] == event["direction"])
    return checks


def attribute_accuracy(clips, sample_rate, events):
    """{attribute: accuracy} over clips (a list of (T,)) and their captions' events, plus "all":
    the share of clips whose every check is right."""
    pooled, whole = {a: [] for a in ATTRIBUTES}, []
    for wav, ev in zip(clips, events):
        checks = attribute_checks(wav, sample_rate, ev)
        for a, v in checks.items():
            pooled[a] += v
        whole.append(all(all(v) for v in checks.values()))
    acc = {a: float(np.mean(v)) if v else float("nan") for a, v in pooled.items()}
    return {**acc, "all": float(np.mean(whole))}


def derangement(n, seed=0):
    """A seeded permutation with no fixed point: each clip paired with another's caption."""
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(n, generator=g)
        if n < 2 or not (p == torch.arange(n)).any():
            return p.tolist()


def evaluate(model, entries, scales=(1.0, 3.0, 5.0), seed=0, top_k=250, temperature=1.0,
             frechet=("logmel",), batch=64, out=None):
    """Rows of the table: attribute accuracy of real clips against their own captions (the
    analysers' ceiling), against another clip's caption (chance), of the codec's resynthesis,
    and of clips generated from the captions at each guidance scale; and the Frechet distance
    of each set to the real clips. entries: manifest rows with "caption" and "events"."""
    from common.evaluation import frechet_distance
    codec, cfg = model.codec, model.lm.cfg
    sr = codec.sample_rate
    real = torch.stack([read_clip(e["path"], cfg, codec) for e in entries])
    events = [e["events"] for e in entries]
    sets = {"real": real}
    sets["chance"] = real  # scored against deranged captions below
    codes = encode_clips(codec, real)
    sets["codec"] = torch.cat([codec.decode(codes[i:i + batch])[:, 0, :real.shape[-1]]
                               for i in range(0, len(codes), batch)])
    for scale in scales:
        g = torch.Generator().manual_seed(seed)
        wavs = [model.generate([e["caption"] for e in entries[i:i + batch]], None, scale,
                               temperature, top_k, generator=g)[0]
                for i in range(0, len(entries), batch)]
        sets[f"gamma {scale:g}"] = torch.cat(wavs)
    perm = derangement(len(entries), seed)
    rows = []
    for name, wavs in sets.items():
        ev = [events[j] for j in perm] if name == "chance" else events
        row = {"set": name, **attribute_accuracy(list(wavs), sr, ev)}
        for kind in frechet:
            row[f"FD {kind}"] = (float("nan") if name in ("real", "chance") else frechet_distance(
                [w.numpy() for w in real], [w.numpy() for w in wavs], sr, features=kind))
        rows.append(row)
        if out is not None and name.startswith("gamma"):
            Path(out).mkdir(parents=True, exist_ok=True)
            for i in range(min(4, len(wavs))):
                save(Path(out) / f"{name.replace(' ', '')}_{i}.wav", wavs[i][None], sr)
    return rows


@torch.no_grad()
def heldout_ce(model, entries, batch=64):
    """Teacher-forced cross-entropy (nats per code, per codebook) of held-out clips after their
    own caption, after no caption (the null text) and after another clip's caption: how much the
    model reads its text. Returns {"own" | "none" | "other": (mean, per-codebook list)}."""
    lm, codec = model.lm.eval(), model.codec
    wavs = torch.stack([read_clip(e["path"], lm.cfg, codec) for e in entries])
    codes = encode_clips(codec, wavs)
    captions = [e["caption"] for e in entries]
    other = [captions[j] for j in derangement(len(captions))]
    out = {}
    for name, caps, drop in (("own", captions, False), ("none", captions, True),
                             ("other", other, False)):
        sums, counts = 0, 0
        for i in range(0, len(codes), batch):
            c = caps[i:i + batch]
            text = lm.text_ids(c, strict=False) if lm.text is not None else c
            d = torch.full((len(c),), drop) if drop else None
            s, n = lm_loss(lm, text, codes[i:i + batch], d, reduction="none")
            sums, counts = sums + s.sum(0), counts + n * len(c)
        per_q = (sums / counts).tolist()
        out[name] = (float(np.mean(per_q)), per_q)
    return out


def format_eval(rows, n):
    keys = [k for k in rows[0] if k != "set"]
    lines = [f"attribute accuracy (%) on {n} held-out captions; FD: Frechet distance to the real "
             f"clips", f"{'':<10}" + "".join(f"{k:>11}" for k in keys)]
    for r in rows:
        lines.append(f"{r['set']:<10}" + "".join(
            f"{'-':>11}" if math.isnan(r[k]) else f"{100 * r[k]:>11.1f}" if not k.startswith("FD")
            else f"{r[k]:>11.2f}" for k in keys))
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


def build_parser():
    p = Parser(description="AudioGen (Kreuk et al. 2023): train the text-to-audio LM, generate "
               "sound from a caption, evaluate attribute accuracy against the guidance scale.",
               allow_abbrev=False)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train (DDP when launched by torchrun)")
    act.add_argument("--sample", action="store_true", help="--text (and --prompt) -> --out WAV")
    act.add_argument("--eval", action="store_true", help="attribute accuracy at each guidance "
                     "scale against chance, and a Frechet distance to real clips")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="default: paper")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--ckpt", help="model.pt or ckpt.pt (checkpoints/audiogen_tiny.pt)")
    p.add_argument("--text", help="--sample: the caption")
    p.add_argument("--seconds", type=float, help="--sample: length (default: clip_seconds)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale gamma (1: conditional "
                   "only; default 3, audiocraft's)")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1 (0: greedy)")
    p.add_argument("--top_k", type=int, default=250, help="default 250 (the paper's; 0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus (1: off)")
    p.add_argument("--prompt", metavar="WAV", help="--sample: audio to continue")
    p.add_argument("--prompt_seconds", type=float, help="--sample: the prompt's first N seconds")
    p.add_argument("--samples", type=int, default=1, help="--sample: clips (OUT, OUT_1.wav, ..)")
    p.add_argument("--scales", default="1,3,5", help="--eval: guidance scales (default 1,3,5)")
    p.add_argument("--frechet", default="logmel", help="--eval: Frechet features, logmel and/or "
                   "whisper (common/evaluation.py)")
    p.add_argument("--limit", type=int, help="--eval: the first N held-out clips")
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


# run settings a resumed run may change; everything else is fixed by its checkpoint
RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "num_workers", "threads")


def configs_from_args(args):
    """(Config, TrainConfig): the preset with the flags given on the command line; with --resume,
    the configs of the run in OUT."""
    cfg, run = PRESETS[args.preset]
    given = [{f.name: getattr(args, f.name) for f in dataclasses.fields(c)
              if getattr(args, f.name) is not None} for c in (Config, TrainConfig)]
    if args.resume:
        path = Path(args.out or run.out) / "ckpt.pt"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {path}")
        ckpt = load_checkpoint(path)
        cfg = config_from_dict(Config, ckpt["config"], path)
        run = config_from_dict(TrainConfig, ckpt["train_config"], path)
        changed = sorted(k for d, c in zip(given, (cfg, run)) for k, v in d.items()
                         if k not in RESUME_OVERRIDES and v != getattr(c, k))
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
        raise ValueError("--ckpt is required (e.g. checkpoints/audiogen_tiny.pt or "
                         "runs/audiogen_tiny/model.pt)")
    check_sampling(args.temperature, args.top_k, args.top_p)  # before any work
    if args.cfg < 0:
        raise ValueError(f"--cfg must be >= 0 (1: no guidance), got {args.cfg}")
    model = AudioGen.load(args.ckpt, args.codec)
    seed = args.seed if args.seed is not None else 0
    g = torch.Generator().manual_seed(seed)
    sr = model.codec.sample_rate
    if args.eval:
        n = sum(p.numel() for p in model.lm.parameters())
        entries = [e for e in captioned(args.data, "test") if "events" in e][:args.limit]
        if not entries:
            raise ValueError(f"{args.data or SOUNDS}: no test clips with \"events\" to check")
        scales = tuple(float(v) for v in args.scales.split(","))
        bad = [k for k in args.frechet.split(",") if k not in ("logmel", "whisper")]
        if bad:
            raise ValueError(f"--frechet takes logmel and/or whisper, got {', '.join(bad)}")
        print(f"{args.ckpt}: {n:,} parameters; {len(entries)} test captions, guidance "
              f"{', '.join(f'{v:g}' for v in scales)}, top-k {args.top_k}, temperature "
              f"{args.temperature:g}", flush=True)
        print("held-out cross-entropy (nats per code; codebooks 1..K) after the clip's own "
              "caption, no caption, another clip's:")
        for name, (mean, per_q) in heldout_ce(model, entries).items():
            print(f"  {name:<6} {mean:.3f}  ({' / '.join(f'{v:.3f}' for v in per_q)})", flush=True)
        rows = evaluate(model, entries, scales, seed, args.top_k, args.temperature,
                        tuple(args.frechet.split(",")), out=args.out)
        print(format_eval(rows, len(entries)))
        return
    if args.text is None:
        raise ValueError("--sample needs --text \"a caption\"")
    if not args.out or not args.out.endswith(".wav"):
        raise ValueError("--sample needs --out FILE.wav")
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    prompt = None
    if args.prompt:
        wav, _ = load(args.prompt, sr, 1, notice=True)
        if args.prompt_seconds is not None:
            if args.prompt_seconds <= 0:
                raise ValueError(f"--prompt_seconds must be positive, got {args.prompt_seconds}")
            wav = wav[:, :int(args.prompt_seconds * sr)]
        prompt = wav.expand(args.samples, -1)
    wavs, codes = model.generate([args.text] * args.samples, args.seconds, args.cfg,
                                 args.temperature, args.top_k, args.top_p, prompt, sr, g)
    for n, wav in enumerate(wavs):
        path = args.out if n == 0 else args.out[:-4] + f"_{n}.wav"
        save(path, wav[None], sr)
        print(f"{path}: {wav.shape[-1] / sr:.2f} s, {codes.shape[-1]} frames of "
              f"{codes.shape[1]} codebooks, guidance {args.cfg:g}")


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
