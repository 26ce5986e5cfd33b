"""
VALL-E: Neural Codec Language Models are Zero-Shot Text to Speech Synthesizers, in one file.

Wang, Chen, Wu, Zhang, Zhou, Liu, Chen, Liu, Wang, Li, He, Zhao, Wei. 2023. arXiv 2301.02111.
No official code was released: this file follows the paper; reimplementations read for contrast
(reference/lms.md §1.3): lifeiteng/vall-e (valle/models/valle.py, macros.py), enhuiz/vall-e,
Plachtaa/VALL-E-X. It is the template of the LM files: audiolm.py and audiogen.py copy its
generic LM parts (attention with a KV cache, Block, prefix_lm_mask, sinusoids, filter_logits,
sample) and, through it, soundstream.py's training blocks, as marked copies.

Paper -> code (sections of arXiv 2301.02111)
  §4.1 phonemes, codec codes ....... phoneme_symbols, phonemize, PhonemeVocab; load_codec,
                                     token_cache (any codec of the project, or Meta's EnCodec)
  §4.2.1 AR, Eq. (1) ............... ARModel (prefix_lm_mask: phonemes both ways, audio causal),
                                     ar_batch, ar_loss; the end token is id K
  §4.2.2 NAR, Eq. (2) .............. NARModel (AdaptiveLayerNorm on the stage, the prompt with all
                                     codebooks, heads tied to the embeddings), nar_batch, nar_loss
  §4.3 inference ................... ARModel.generate (sampling, KV cache, per-row end token, the
                                     cap), NARModel.generate (greedy), synthesize (best-of-N)
  §5.1 setup ....................... Config / TrainConfig "paper", TTSDataset, Trainer, train
  §5.2 evaluation .................. eval_pairs, evaluate (WER, speaker similarity, duration)

Shapes: B batch, S sequence (phonemes then audio), X phonemes, P prompt frames, Y target frames,
Q codebooks, K codebook size, D model width, H heads. `F` is torch.nn.functional.

DEVIATIONS from the paper (each tagged `# DEVIATION` where it happens)
  1. The prompt. §4.2 trains the AR as a plain causal LM over 10-20 s crops and takes the NAR's
     prompt from the same utterance; at inference (§4.3) the AR reads the prompt's transcript
     before the target text. Here both stages are trained with a 3 s window (at a random place)
     of ANOTHER utterance of the same speaker as the prompt (the issue's choice, enhuiz's), and
     the phonemes are the target's alone: training matches zero-shot inference, and a prompt
     needs no transcript. Inference takes the first 3 s of the prompt file.
  2. Both stages are one module (VALLE) trained in one step on the summed losses; the paper and
     lifeiteng train them as separate models (lifeiteng: AR first, then NAR).
  3. No crops: an utterance longer than max_seconds is left out, with a note. §5.1 crops random
     10-20 s windows (with their phonemes, from forced alignment); our manifests carry no
     alignments. LibriLight-scale data needs a segmentation step first.
  4. The evaluation (§5.1-5.2) uses what runs offline here: Whisper-base instead of HuBERT-Large
     CTC for the WER, resemblyzer (GE2E) instead of WavLM-TDNN for the speaker similarity, and
     the synthetic demo corpus instead of LibriSpeech test-clean. Compare its figures with the
     ground truth's and the codec's, never with the paper's.

Where the paper is silent the comment says "our choice" or names the reimplementation followed:
lifeiteng's separate sinusoidal positions with a learnt scale for phonemes and audio, pre-norm
blocks, the 16-frames-per-phoneme cap; VALL-E X's best-of-N; GPT-2's init; no end token as the
first token. Tied NAR heads are the paper's (§4.2.2: the j-th prediction layer, which predicts
codebook j+1 from codebooks 1..j, shares the (j+1)-th acoustic embedding's weights); lifeiteng
ties each head to the embedding one further on and leaves the last head untied.

Section numbers follow the arXiv paper's layout (§4 VALL-E, §5 experiments) as we read it; its
text was not available offline here to re-check them, so verify against your copy.

Codebooks are numbered 1..Q in prose (the paper's "codebooks 2..8") and 0..Q-1 in the code.

Exact resume: on CPU a resumed run repeats the uninterrupted one bit for bit (tested).

Commands
  python valle.py --train --preset tiny                       # demo corpus, CPU, < 20 min
  python valle.py --train --preset paper --data libri.jsonl \
      --codec_official encodec_24khz-d7cc33bc.th
  torchrun --standalone --nproc_per_node=8 valle.py --train --preset paper --data libri.jsonl
  python valle.py --train --resume --out runs/valle_tiny       # continue where it stopped
  python valle.py --sample --ckpt runs/valle_tiny/model.pt --prompt voice.wav --text "Hello." \
      --out out.wav [--temperature 1 --top_k 0 --top_p 1 --best_of 4]
  python valle.py --eval --ckpt runs/valle_tiny/model.pt [--n_qs 1,2,4]
"""

import contextlib
import argparse
import dataclasses
import difflib
import inspect
import hashlib
import importlib
import math
import os
import random
import re
import shutil
import signal
import subprocess
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

NAME = "valle"
CHOICES = {"amp": ("none", "bf16", "fp16")}
CODEC_CLASSES = {"encodec": "EnCodec", "soundstream": "SoundStream", "freqcodec": "FreqCodec",
                 "bigcodec": "BigCodec"}  # checkpoint "model" name -> the codec file's class

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What rebuilds the model. Defaults: the paper's AR and NAR transformers (§5.1)."""
    dim: int = 1024                # D = 1024 (§5.1)
    heads: int = 16                # 16 attention heads (§5.1)
    layers: int = 12               # 12 layers (§5.1)
    ffn: int = 4096                # feed-forward 4096 (§5.1)
    dropout: float = 0.1           # dropout 0.1 (§5.1)
    attn_dropout: float = 0.1      # on the attention weights too (lifeiteng: MultiheadAttention's)
    text_vocab: int = 512          # phoneme ids (lifeiteng NUM_TEXT_TOKENS)
    codebook_size: int = 1024      # EnCodec 24 kHz at 6 kbps: 8 x 1024 (§5.1)
    num_codebooks: int = 8         # (§5.1)
    max_len: int = 4096            # positions covered: 54 s at 75 Hz (our choice; 20 s crops fit)


@dataclass
class TrainConfig:
    """How both stages are trained: data, tokens, optimiser and the run."""
    codec: str = "official:encodec_24khz-d7cc33bc.th"  # EnCodec 24 kHz, 6 kbps (§5.1): Meta's file
    prompt_seconds: float = 3.0    # 3 s prompts (§5.1; from another utterance: DEVIATION 1)
    max_text: int = 256            # phonemes per example; longer ones are left out (our choice)
    max_seconds: float = 20.0      # longer ones are left out (§5.1 crops 10-20 s: DEVIATION 3)
    lr: float = 5e-4               # AdamW, peak 5e-4 (§5.1)
    warmup_steps: int = 32_000     # warmed up over the first 32k updates, then linear decay (§5.1)
    min_lr_ratio: float = 0.0      # the decay ends at lr * this (our choice: 0, to the last step)
    betas: tuple[float, ...] = (0.9, 0.95)  # (our choice)
    weight_decay: float = 0.01     # (our choice)
    grad_clip: float = 1.0         # (our choice)
    batch_size: int = 16           # examples per step (our choice; the paper: 6k tokens per GPU)
    data: str = ""                 # .jsonl manifest (text, phonemes, speaker); "": the demo corpus
    out: str = "runs/valle"        # checkpoints, log, token cache
    steps: int = 800_000           # 800k steps (§5.1)
    seed: int = 0                  # weights, batches, prompts and stages follow from it
    log_every: int = 100           # steps between log lines (run settings: our choice)
    sample_every: int = 5000       # steps between samples (OUT/samples/stepN.wav)
    ckpt_every: int = 5000         # steps between OUT/ckpt.pt and OUT/model.pt
    num_workers: int = 0           # DataLoader workers
    threads: int = 0               # CPU threads; 0: the idle cores
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU


PRESETS = {
    "paper": (Config(), TrainConfig()),
    # CPU preset: narrow and shallow, on the shipped 8 x 256 EnCodec tokenizer (50 Hz). No dropout
    # on the attention weights: on CPU those masks were 42 % of a step (torch.profiler, 8 x 420
    # tokens), and without them attention takes the fused kernel (2.6x faster steps). Dropout
    # elsewhere, and 800 steps: on 281 utterances the held-out loss stops falling after ~400-800
    # steps and then rises while the training loss falls, fast without dropout
    # (benchmarks/results/valle_tiny_overfit.txt, valle_tiny_curve.txt)
    "tiny": (Config(dim=128, heads=4, layers=4, ffn=512, dropout=0.1, attn_dropout=0.0,
                    text_vocab=128, codebook_size=256, max_len=1024),
             TrainConfig(codec="checkpoints/encodec_16khz_8x256.pt", prompt_seconds=3.0,
                         max_text=200, max_seconds=8.0, lr=1e-3, warmup_steps=200,
                         min_lr_ratio=0.1, batch_size=8,
                         out="runs/valle_tiny", steps=800, log_every=100, ckpt_every=200,
                         sample_every=400)),
}


# -------------------------------------------------------------------------------------------------
# Generic LM parts: attention with a KV cache, the block, masks, sampling


def prefix_lm_mask(prefix, total, device=None):
    """(total, total) boolean mask, True where attention is allowed: the first `prefix` positions
    (the phonemes) see each other in both directions and never the audio; each audio position
    sees every phoneme and the audio up to itself (lifeiteng's x-bidirectional, y-causal mask)."""
    i = torch.arange(total, device=device)
    causal = i[None, :] <= i[:, None]  # (query, key)
    in_prefix = i[None, :] < prefix
    return causal | (in_prefix & (i[:, None] < prefix))


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


def sinusoids(length, dim, device=None):
    """(length, dim) sine/cosine positions (Vaswani et al. 2017): sin on even, cos on odd
    channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


def check_sampling(temperature=1.0, top_k=0, top_p=1.0):
    """A one-line error for settings no sampler can use."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 (0: off) and top_p in (0, 1] (1: off); got top_k "
                         f"{top_k}, top_p {top_p}")


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


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One id per row of logits (B, V): greedy at temperature 0, else multinomial over the filtered
    softmax(logits / temperature)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

# -------------------------------------------------------------------------------------------------
# The AR model (§4.2.1): phonemes as a bidirectional prefix, then the first codebook, causally


class ARModel(nn.Module):
    """Decoder-only transformer over [phonemes x ; first-codebook tokens y]. x and y have their own
    embeddings and their own sinusoidal positions, each scaled by a learnt alpha (lifeiteng); the
    head predicts the next audio token or the end token (id K)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, K = cfg.dim, cfg.codebook_size
        self.eos = K
        self.text_embedding = nn.Embedding(cfg.text_vocab, D)
        self.audio_embedding = nn.Embedding(K + 1, D)  # + the end token
        self.text_alpha, self.audio_alpha = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        # embeddings times sqrt(D) (Vaswani et al. §3.4; our choice): at N(0, 0.02) they would be
        # ~30x smaller than the positions; with it the AR's loss at step 150 of the tiny preset
        # was 4.28 against 4.96 (benchmarks/results/lm_init_ab.txt)
        self.scale = math.sqrt(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.ffn, cfg.dropout,
                                          attn_dropout=cfg.attn_dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, K + 1, bias=False)
        self.register_buffer("pe", sinusoids(cfg.max_len, D), persistent=False)

    def embed(self, text, audio, audio_offset=0):  # text (B, X), audio (B, Y) -> (B, X + Y, D)
        parts = []
        n = max(text.shape[1] if text is not None else 0,
                audio_offset + (audio.shape[1] if audio is not None else 0))
        if n > self.cfg.max_len:
            raise ValueError(f"{n} positions; the model has max_len {self.cfg.max_len}")
        if text is not None:
            x = self.text_embedding(text) * self.scale
            parts.append(x + self.text_alpha * self.pe[:text.shape[1]])
        if audio is not None and audio.shape[1]:
            Y = audio.shape[1]
            pos = self.pe[audio_offset:audio_offset + Y]
            parts.append(self.audio_embedding(audio) * self.scale + self.audio_alpha * pos)
        return self.drop(torch.cat(parts, dim=1))

    def forward(self, text, audio, text_lengths=None):
        """Logits (B, Y, K + 1) for the audio positions: the prediction at audio position t is of
        token t (read at position t - 1; the first, at the last phoneme slot, is of audio token 0).
        text_lengths (B,): rows whose phonemes are right-padded (id 0) to X; their padding is never
        attended to, and their first prediction is read at the last real phoneme."""
        B, X = text.shape
        h = self.embed(text, audio[:, :-1])  # (B, S = X + A - 1, D): the last predicts nothing
        mask = prefix_lm_mask(X, h.shape[1], h.device)  # (S, S)
        if text_lengths is not None:
            real = torch.arange(h.shape[1], device=h.device)[None, :] >= X  # audio keys
            real = real | (torch.arange(h.shape[1], device=h.device)[None, :]
                           < text_lengths[:, None])  # (B, S): keys that are no padding
            mask = (mask[None] & real[:, None, :])[:, None]  # (B, 1, S, S)
        for block in self.blocks:
            h = block(h, mask)
        logits = self.head(self.norm(h))  # (B, S, K + 1)
        if text_lengths is None:
            return logits[:, X - 1:]
        rows = torch.arange(B, device=h.device)
        first = logits[rows, text_lengths - 1][:, None]  # (B, 1, K + 1): at the last real phoneme
        return torch.cat([first, logits[:, X:]], dim=1)  # (B, Y, K + 1)

    @torch.no_grad()
    def generate(self, text, prompt, max_new, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 generator=None):
        """Continue the first-codebook `prompt` (B, P) after `text` (B, X) by up to `max_new`
        tokens. Each row stops at its own end token (later positions hold K, the end id). Returns
        (B, max_new) ids, the number of new tokens of each row before its end token (B,; never 0:
        the end token cannot come first), and the log-probability of each row's sampled tokens,
        its end token included, under the model's own distribution (temperature 1, no filtering)
        (B,). With use_cache the keys and values of earlier positions are kept (each step runs one
        position); without, every step recomputes all."""
        B, X = text.shape
        dev = text.device
        out = torch.full((B, max_new), self.eos, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), max_new, dtype=torch.long, device=dev)
        logp = torch.zeros(B, device=dev)
        caches = [{} for _ in self.blocks] if use_cache else None
        audio = prompt
        for t in range(max_new):
            if use_cache and t > 0:  # only the newest token
                h = self.embed(None, audio[:, -1:], audio_offset=audio.shape[1] - 1)  # (B, 1, D)
                mask = None  # a single query may see everything before it
            else:
                h = self.embed(text, audio)  # (B, X + P + t, D)
                mask = prefix_lm_mask(X, h.shape[1], h.device)
            for i, block in enumerate(self.blocks):
                h = block(h, mask, caches[i] if use_cache else None)
            logits = self.head(self.norm(h[:, -1])).float()  # (B, K + 1)
            if t == 0:  # an utterance has at least one frame: no end token first (our choice)
                logits[:, self.eos] = float("-inf")
            token = sample(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, self.eos, token)
            step_logp = logits.log_softmax(-1).gather(1, token[:, None])[:, 0]  # (B,)
            logp = logp + torch.where(done, 0.0, step_logp)
            newly = (token == self.eos) & ~done
            lengths = torch.where(newly, t, lengths)
            done |= newly
            out[:, t] = token
            if done.all():
                break
            audio = torch.cat([audio, token[:, None]], dim=1)  # (B, P + t + 1)
        return out, lengths, logp

# -------------------------------------------------------------------------------------------------
# The NAR model (§4.2.2): codebooks 2..8, each from the ones before it, non-causally


class NARModel(nn.Module):
    """Non-autoregressive transformer for codebooks 1..Q-1 (0-based). At stage j the input is
    [phonemes ; the prompt's codes summed over all Q codebooks ; the target's codes summed over
    codebooks < j], attention is bidirectional, every norm is adaptive on the stage's embedding,
    and the head of stage j predicts codebook j at the target positions. The head of codebook j
    shares its weight with the input embedding of codebook j (§4.2.2; see the docstring's note
    on lifeiteng's share_embedding, one codebook further on)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, K, Q = cfg.dim, cfg.codebook_size, cfg.num_codebooks
        self.text_embedding = nn.Embedding(cfg.text_vocab, D)
        self.audio_embeddings = nn.ModuleList(nn.Embedding(K, D) for _ in range(Q))
        self.stage_embedding = nn.Embedding(Q, D)  # stages 1..Q-1 used
        self.text_alpha, self.audio_alpha = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        self.scale = math.sqrt(D)  # embeddings (not the tied heads) times sqrt(D), as the AR's
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.ffn, cfg.dropout, adaptive=True,
                                          attn_dropout=cfg.attn_dropout)
                                    for _ in range(cfg.layers))
        self.norm = AdaptiveLayerNorm(D)
        self.register_buffer("pe", sinusoids(cfg.max_len, D), persistent=False)

    def embed_codes(self, codes):  # (B, n, L) -> (B, L, D): the sum of the n codebooks' embeddings
        n = codes.shape[1]
        return self.scale * sum(self.audio_embeddings[k](codes[:, k]) for k in range(n))

    def forward(self, text, prompt, target, stage, lengths=None):
        """Logits (B, Y, K) of codebook `stage` (B,) at the target positions. text (B, X), prompt
        (B, Q, P) all codebooks, target (B, Q, Y) of which codebooks < stage are read (per row).
        lengths: (text, prompt, target) lengths (B,) each, for right-padded rows: padding is never
        attended to, and a row's target positions continue its own prompt's."""
        B, X = text.shape
        P, Y = prompt.shape[-1], target.shape[-1]
        Q, dev = self.cfg.num_codebooks, target.device
        seen = (torch.arange(Q, device=dev)[None, :] < stage[:, None])  # (B, Q)
        emb = torch.stack([self.audio_embeddings[k](target[:, k]) for k in range(Q)], 1)
        emb = self.scale * emb  # (B, Q, Y, D)
        tgt = (emb * seen[:, :, None, None]).sum(1)  # (B, Y, D): codebooks < stage, per row
        p_len = lengths[1] if lengths is not None else torch.full((B,), P, device=dev)
        if max(X, P + Y) > self.cfg.max_len:
            raise ValueError(f"{max(X, P + Y)} positions; the model has max_len {self.cfg.max_len}")
        tgt_pos = self.pe[p_len[:, None] + torch.arange(Y, device=dev)[None]]  # (B, Y, D)
        h = torch.cat([self.text_embedding(text) * self.scale + self.text_alpha * self.pe[:X],
                       self.embed_codes(prompt) + self.audio_alpha * self.pe[:P],
                       tgt + self.audio_alpha * tgt_pos], dim=1)  # (B, S = X + P + Y, D)
        h = self.drop(h)
        mask = None
        if lengths is not None:  # keys that are no padding, in each of the three parts
            keep = [torch.arange(n, device=dev)[None] < n_real[:, None]
                    for n, n_real in zip((X, P, Y), lengths)]
            mask = torch.cat(keep, dim=1)[:, None, None, :]  # (B, 1, 1, S)
        cond = self.stage_embedding(stage) * self.scale  # (B, D)
        for block in self.blocks:
            h = block(h, mask, cond=cond)
        h = self.norm(h[:, X + P:], cond)  # (B, Y, D)
        weight = torch.stack([e.weight for e in self.audio_embeddings])[stage]  # (B, K, D): tied
        return torch.einsum("byd,bkd->byk", h, weight)  # (B, Y, K)

    @torch.no_grad()
    def generate(self, text, prompt, first):
        """Greedy codebooks 1..Q-1 (§4.3: NAR greedy) for the first codebook `first` (B, Y) ->
        (B, Q, Y)."""
        B, Y = first.shape
        Q = self.cfg.num_codebooks
        codes = torch.zeros(B, Q, Y, dtype=torch.long, device=first.device)
        codes[:, 0] = first
        for j in range(1, Q):
            stage = torch.full((B,), j, dtype=torch.long, device=first.device)
            codes[:, j] = self(text, prompt, codes, stage).argmax(dim=-1)  # (B, Y, K) -> (B, Y)
        return codes

# -------------------------------------------------------------------------------------------------
# Phonemes (§4.1: "phoneme sequence" from G2P): espeak-ng IPA, or the manifest's


WORD = " "  # the word-boundary symbol between the phones of two words


def phoneme_symbols(phonemes):
    """The manifest's format (phones of a word joined by '_', words separated by spaces) -> symbols,
    with WORD between words: "h_ə l_oʊ" -> ['h', 'ə', ' ', 'l', 'oʊ']."""
    out = []
    for i, word in enumerate(phonemes.split()):
        if i:
            out.append(WORD)
        out += [s for s in word.split("_") if s]
    return out


def phonemize(text, data=None):
    """New text -> phonemes in the manifest's format: espeak-ng's IPA (the command
    data/make_demo_corpus.py used) when the engine is installed, otherwise the phonemes the
    manifest (`data`, or the demo corpus) stores for the same text; a one-line error when neither
    has it."""
    if not text or not text.strip():
        raise ValueError("the text is empty")
    if shutil.which("espeak-ng") is None:
        key = " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())
        for e in read_manifest(data or demo_manifest()):
            if " ".join(re.sub(r"[^\w\s']", " ", e["text"].lower()).split()) == key:
                return e["phonemes"]
        raise ValueError("espeak-ng is not installed (apt-get install espeak-ng) and the manifest "
                         "has no phonemes for this text: install it, or pass --phonemes")
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "--sep=_", "-v", "en-us", "--", text],
                         capture_output=True, text=True, check=True).stdout
    words = (re.sub("_+", "_", w).strip("_") for w in out.split())
    return " ".join(w for w in words if w)


class PhonemeVocab:
    """Symbol <-> id; id 0 is padding. Built from the training manifest's phonemes, saved with the
    model (its symbol list), so that text the model cannot read gets a clear error."""

    def __init__(self, symbols):
        self.symbols = ["<pad>"] + sorted(set(symbols) - {"<pad>"})
        self.ids = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_entries(cls, entries):
        return cls(s for e in entries for s in phoneme_symbols(e.get("phonemes", "")))

    def encode(self, phonemes):  # manifest-format phonemes -> (X,) int64
        symbols = phoneme_symbols(phonemes)
        if not symbols:
            raise ValueError("the text has no phonemes")
        unknown = sorted({s for s in symbols if s not in self.ids})
        if unknown:
            raise ValueError(f"the text has symbols this model's vocabulary lacks: "
                             f"{' '.join(unknown)} (it knows {len(self.symbols) - 1})")
        return torch.tensor([self.ids[s] for s in symbols])

# -------------------------------------------------------------------------------------------------
# Codec tokens: any codec checkpoint of the project, through the codec interface, cached on disk


OFFICIAL = "official:"  # a codec spec "official:PATH": Meta's released EnCodec weights (PATH .th)


class FirstCodebooks:
    """A codec that sends only its first n codebooks: EnCodec 24 kHz at 6 kbps, the paper's
    tokenizer, is the 32-codebook model's first 8 (§5.1). Everything else is the codec's."""

    def __init__(self, codec, n):
        self.codec, self.num_codebooks = codec, n

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode(self, wav):
        return self.codec.encode(wav, n_q=self.num_codebooks)


def codec_file(spec):
    """The file a codec spec names (a codec checkpoint path, or official:PATH)."""
    spec = str(spec)
    return resolve_codec_path(spec[len(OFFICIAL):] if spec.startswith(OFFICIAL) else spec)


def load_codec(spec, num_codebooks=8):
    """A codec spec -> (the codec in eval mode, its kind). A codec file's model.pt: its "model"
    field names the codec file, and a checkpoint of another kind gets a one-line error.
    official:PATH: Meta's EnCodec weights (encodec.py's from_official), cut to their first
    num_codebooks codebooks (the paper: 8, 6 kbps)."""
    spec, path = str(spec), codec_file(spec)
    if not path.is_file():
        raise FileNotFoundError(f"codec checkpoint {path} not found")
    if spec.startswith(OFFICIAL):
        from encodec import EnCodec
        return FirstCodebooks(EnCodec.from_official(path), num_codebooks), "encodec (Meta's)"
    try:
        kind = torch.load(path, map_location="cpu", weights_only=True).get("model")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ValueError(f"{path} is not a checkpoint torch.load(weights_only=True) can read "
                         f"({type(e).__name__})") from None
    if kind not in CODEC_CLASSES:
        raise ValueError(f"{path} is a {kind!r} checkpoint, not a codec's (one of "
                         f"{', '.join(CODEC_CLASSES)})")
    module = importlib.import_module(kind)  # the codec file whose tokens the LM models
    model = getattr(module, CODEC_CLASSES[kind]).load(path)
    if model.num_codebooks < 2:
        raise ValueError(f"{path}: a {kind} with {model.num_codebooks} codebook; VALL-E needs at "
                         f"least 2 (the AR's first, the NAR's others)")
    return model, kind


def check_codec(codec, cfg, spec):
    """A one-line error when the codec's tokens are not the ones the config models."""
    if codec.codebook_size != cfg.codebook_size or codec.num_codebooks != cfg.num_codebooks:
        raise ValueError(f"{spec}: {codec.num_codebooks} x {codec.codebook_size} codes; the "
                         f"model takes {cfg.num_codebooks} x {cfg.codebook_size}")


@torch.no_grad()
def token_cache(codec, codec_path, entries, cache_dir):
    """Codes (Q, F) int16 of every entry's audio, computed once and kept in cache_dir/<key>.pt,
    keyed by the codec file's bytes and the audio paths: a new codec or a new corpus recomputes.
    Returns {path: codes}."""
    key = hashlib.sha256(codec_file(codec_path).read_bytes()).hexdigest()[:16]
    key = hashlib.sha256((key + "".join(e["path"] for e in entries)).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"tokens-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    codes = {}
    for e in entries:
        wav = load(e["path"], codec.sample_rate, codec.channels)[0]
        sent = codec.encode(wav[None])
        codes[e["path"]] = getattr(sent, "codes", sent)[0].to(torch.int16)  # (Q, F)
    atomic_save(codes, cache)
    return codes

# -------------------------------------------------------------------------------------------------
# Sequence layouts and losses (§4.2)


def ar_batch(texts, prompts, targets, eos):
    """Lists of phoneme ids (X_i,), prompt first-codebook tokens (P_i,) and target ones (Y_i,) ->
    text (B, X) right-padded with 0, text_lengths (B,), audio (B, A) = [prompt ; target ; end]
    right-padded with the end id, and loss_mask (B, A): True on the target tokens and the end
    token, the positions the AR is trained to predict (the prompt is given, not predicted)."""
    B = len(texts)
    X = max(len(t) for t in texts)
    A = max(len(p) + len(y) + 1 for p, y in zip(prompts, targets))
    text = torch.zeros(B, X, dtype=torch.long)
    audio = torch.full((B, A), eos, dtype=torch.long)
    loss_mask = torch.zeros(B, A, dtype=torch.bool)
    for i, (t, p, y) in enumerate(zip(texts, prompts, targets)):
        text[i, :len(t)] = t
        audio[i, :len(p)], audio[i, len(p):len(p) + len(y)] = p, y
        loss_mask[i, len(p):len(p) + len(y) + 1] = True
    return text, torch.tensor([len(t) for t in texts]), audio, loss_mask


def ar_loss(model, text, text_lengths, audio, loss_mask):
    """Eq. (1): mean cross-entropy of the AR's predictions at the loss_mask positions."""
    logits = model(text, audio, text_lengths)  # (B, A, K + 1)
    return F.cross_entropy(logits[loss_mask], audio[loss_mask])  # (N, K + 1) against (N,)


def nar_batch(texts, prompts, targets):
    """Lists of phoneme ids (X_i,), prompt codes (Q, P_i) and target codes (Q, Y_i) -> text (B, X),
    prompt (B, Q, P), target (B, Q, Y), each right-padded with 0, and their lengths (3 x (B,))."""
    B, Q = len(texts), targets[0].shape[0]
    dims = [max(len(t) for t in texts), max(p.shape[-1] for p in prompts),
            max(y.shape[-1] for y in targets)]
    text = torch.zeros(B, dims[0], dtype=torch.long)
    prompt = torch.zeros(B, Q, dims[1], dtype=torch.long)
    target = torch.zeros(B, Q, dims[2], dtype=torch.long)
    for i, (t, p, y) in enumerate(zip(texts, prompts, targets)):
        text[i, :len(t)], prompt[i, :, :p.shape[-1]], target[i, :, :y.shape[-1]] = t, p, y
    lengths = tuple(torch.tensor(v) for v in ([len(t) for t in texts],
                                              [p.shape[-1] for p in prompts],
                                              [y.shape[-1] for y in targets]))
    return text, prompt, target, lengths


def nar_loss(model, text, prompt, target, lengths, stage):
    """Eq. (2), one codebook per row: mean cross-entropy of codebook `stage` (B,) over each row's
    real target frames."""
    logits = model(text, prompt, target, stage, lengths)  # (B, Y, K)
    truth = target[torch.arange(len(stage), device=stage.device), stage]  # (B, Y): each row's
    frames = torch.arange(target.shape[-1], device=target.device)
    real = frames[None] < lengths[2][:, None]  # (B, Y): no padding
    return F.cross_entropy(logits[real], truth[real])

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


class VALLE(nn.Module):
    """Both stages, the phoneme vocabulary and the codec they speak (its checkpoint path)."""

    def __init__(self, cfg, symbols, codec_path):
        super().__init__()
        self.cfg, self.symbols, self.codec_path = cfg, list(symbols), str(codec_path)
        self.vocab = PhonemeVocab(self.symbols[1:])
        self.ar, self.nar = ARModel(cfg), NARModel(cfg)
        for m in self.modules():  # GPT-2's init (our choice): N(0, 0.02) weights, zero biases; the
            if isinstance(m, (nn.Linear, nn.Embedding)):  # NAR's tied heads start near uniform
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, batch, stage):
        """Both stages' losses on a batch of TTSDataset items (padded, with lengths): the AR's
        cross-entropy on the target's first codebook and its end token, the NAR's on codebook
        `stage` (B,) of each example. One forward, so that DDP syncs both stages' gradients
        (DEVIATION 2: the paper trains the two as separate models)."""
        B = len(batch["text"])
        texts = [batch["text"][i, :batch["text_len"][i]] for i in range(B)]  # (X_i,) each
        prompts = [batch["prompt"][i, :, :batch["prompt_len"][i]] for i in range(B)]  # (Q, P_i)
        targets = [batch["target"][i, :, :batch["target_len"][i]] for i in range(B)]  # (Q, Y_i)
        dev = batch["text"].device
        ar_in = ar_batch(texts, [p[0] for p in prompts], [y[0] for y in targets], self.ar.eos)
        ar = ar_loss(self.ar, *(t.to(dev) for t in ar_in))
        text, prompt, target, lengths = nar_batch(texts, prompts, targets)
        nar = nar_loss(self.nar, text.to(dev), prompt.to(dev), target.to(dev),
                       tuple(n.to(dev) for n in lengths), stage)
        return ar, nar

    def save(self, path):
        atomic_save({"model": NAME, "config": dataclasses.asdict(self.cfg), "symbols": self.symbols,
                     "codec": self.codec_path, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(Config, ckpt["config"], path), ckpt["symbols"], ckpt["codec"])
        model.load_state_dict(ckpt["state_dict"])  # model.pt and ckpt.pt both hold it
        return model.eval()


class TTSDataset(torch.utils.data.Dataset):
    """Examples of equal shape (so that the generic fit's DataLoader stacks them): the phoneme ids,
    the target's codes and a prompt of `prompt_frames` from another utterance of the same speaker
    (a random window, drawn from (seed, epoch, index)), each right-padded, with their lengths.
    VALLE.forward cuts each batch back to its longest row, so the padding costs no compute."""
    # DEVIATION 1: the prompt comes from another utterance of the speaker, for both stages

    def __init__(self, entries, codes, vocab, cfg, run, frame_rate, seed=0):
        self.max_text, self.Q = run.max_text, cfg.num_codebooks
        self.max_frames = int(run.max_seconds * frame_rate)
        self.prompt_frames = int(run.prompt_seconds * frame_rate)
        items = [(vocab.encode(e["phonemes"]), codes[e["path"]].long(), e["speaker"])
                 for e in entries]
        self.items = [it for it in items
                      if len(it[0]) <= self.max_text and it[1].shape[-1] <= self.max_frames]
        if len(self.items) < len(items):  # DEVIATION 3: left out, not cropped
            print(f"note: {len(items) - len(self.items)} of {len(items)} utterances are longer "
                  f"than max_text {self.max_text} phonemes or max_seconds {run.max_seconds:g}: "
                  f"left out")
        self.by_speaker = {}
        for i, (_, _, s) in enumerate(self.items):
            self.by_speaker.setdefault(s, []).append(i)
        lonely = sorted(s for s, v in self.by_speaker.items() if len(v) < 2)
        if lonely:
            raise ValueError(f"speakers with one utterance have no prompt: {', '.join(lonely)}")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 62)
        text, codes, speaker = self.items[i]
        others = [j for j in self.by_speaker[speaker] if j != i]
        prompt = self.items[others[int(torch.randint(len(others), (1,), generator=g))]][1]  # (Q, F)
        n = min(self.prompt_frames, prompt.shape[-1])
        start = int(torch.randint(prompt.shape[-1] - n + 1, (1,), generator=g))
        pad = lambda x, L: F.pad(x, (0, L - x.shape[-1]))  # noqa: E731
        # text (max_text,), prompt (Q, prompt_frames), target (Q, max_frames), lengths ()
        return {"text": pad(text, self.max_text), "text_len": torch.tensor(len(text)),
                "prompt": pad(prompt[:, start:start + n], self.prompt_frames),
                "prompt_len": torch.tensor(n), "target": pad(codes, self.max_frames),
                "target_len": torch.tensor(codes.shape[-1])}


class Trainer:
    """The AR and NAR transformers and their optimiser; step() updates both on one batch."""

    def __init__(self, cfg, run, symbols, rank=0, world=1, device="cpu"):
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.device = torch.device(device)
        torch.manual_seed(run.seed)
        self.model = VALLE(cfg, symbols, run.codec).to(self.device)
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
        self.codec, self.sample_pair = None, None  # set by train(), for write_sample

    def lr_at(self, step):
        """§5.1: linear warm-up over warmup_steps to lr, then a linear decay to lr * min_lr_ratio
        at the last step (and there it stays)."""
        run = self.run
        if step < run.warmup_steps:
            return run.lr * (step + 1) / run.warmup_steps
        done = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        return run.lr * (1 - (1 - run.min_lr_ratio) * done)

    def step(self, batch, diagnose=False):
        """One update of both stages: the AR's and the NAR's cross-entropy summed (VALLE.forward),
        the NAR's codebook drawn per example, uniformly from 1..Q-1, from (seed, step): the same
        draw on every rank and after a resume. With amp (CUDA) the forward runs in bf16 / fp16,
        fp16 with a GradScaler; an fp16 step whose gradients overflow is skipped by the scaler."""
        self.model.train()
        b = {k: v.to(self.device) for k, v in batch.items()}
        g = torch.Generator().manual_seed(self.run.seed * 1_000_003 + self.step_count)
        stage = torch.randint(1, self.cfg.num_codebooks, (len(b["text"]),), generator=g)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        with (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype
              else contextlib.nullcontext()):
            ar, nar = self.wrapped(b, stage.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(ar + nar).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradient, not the scaled one
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return {"ar": ar.item(), "nar": nar.item(), "|g|": norm.item(),
                "lr": self.opt.param_groups[0]["lr"]}

    def write_sample(self, stem):
        """stem.wav: a validation sentence spoken in the voice of another of its speaker's
        utterances (3 s), sampled with its own generator (the training RNG is not touched)."""
        if self.sample_pair is None:  # a manifest without a validation split
            return
        target, prompt_entry = self.sample_pair
        codec = self.codec
        try:
            self.model.vocab.encode(target["phonemes"])
        except ValueError:  # a symbol the training split lacks: no sample, no crash
            return
        ref = load(prompt_entry["path"], codec.sample_rate, codec.channels)[0]
        wav, codes, capped = synthesize(self.model, codec, target["phonemes"],
                                        prompt_codes(codec, ref, codec.sample_rate),
                                        generator=torch.Generator(self.device).manual_seed(0))
        save(Path(f"{stem}.wav"), wav.cpu(), codec.sample_rate)

    def state_dict(self):
        """Everything an exact resume needs. Collective under DDP: every rank's RNG state."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": NAME, "config": dataclasses.asdict(self.cfg),
                "train_config": dataclasses.asdict(self.run), "step": self.step_count,
                "symbols": self.model.symbols, "state_dict": self.model.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs}

    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count = ckpt["step"]
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


def train(cfg, run, resume=False, overwrite=False, interrupt_after=None):
    """A whole run: both stages at once, on the demo corpus's training split (or a manifest's),
    with DDP under torchrun. resume: continue the run in run.out exactly (its vocabulary,
    weights, optimiser, step and RNG). Returns the trainer and this process's per-step stats."""
    rank, world, device = setup_distributed()
    master = rank == 0
    out = Path(run.out)
    if not resume and not overwrite and (out / "ckpt.pt").is_file():
        raise ValueError(f"{out} already holds a training run (ckpt.pt); continue it with "
                         f"--resume, or start over with --overwrite")
    if run.batch_size % world:
        raise ValueError(f"batch_size {run.batch_size} is not divisible by {world} processes")
    start = load_checkpoint(out / "ckpt.pt") if resume else None
    threads, why = pick_threads(run.threads, world) if device.type == "cpu" else (0, "")
    if threads:
        torch.set_num_threads(threads)
    entries = read_manifest(run.data or demo_manifest(), "train")
    codec, kind = load_codec(run.codec, cfg.num_codebooks)
    check_codec(codec, cfg, run.codec)
    t0 = time.time()
    if master:  # rank 0 fills the cache, the others read it
        codes = token_cache(codec, run.codec, entries, run.out)
    if world > 1:
        dist.barrier()
        codes = token_cache(codec, run.codec, entries, run.out)
    vocab = (PhonemeVocab(start["symbols"][1:]) if start else PhonemeVocab.from_entries(entries))
    if len(vocab.symbols) > cfg.text_vocab:
        raise ValueError(f"{len(vocab.symbols)} phoneme symbols; the config has text_vocab "
                         f"{cfg.text_vocab}")
    if master:
        print(f"{len(entries)} utterances, {kind} tokens {codec.num_codebooks} x "
              f"{codec.codebook_size} at {codec.frame_rate:g} Hz ({time.time() - t0:.1f} s), "
              f"{len(vocab.symbols) - 1} phoneme symbols, {world} process(es)"
              + (f", {threads} thread(s){why}" if threads else ""), flush=True)
    dataset = TTSDataset(entries, codes, vocab, cfg, run, codec.frame_rate, run.seed)
    trainer = Trainer(cfg, run, vocab.symbols, rank, world, device)
    if start:
        trainer.load_state_dict(start)
    trainer.codec = codec
    valid = read_manifest(run.data or demo_manifest(), "valid")
    if master and valid:  # a sample during training: a validation sentence, another one's prompt
        same = [e for e in valid if e["speaker"] == valid[0]["speaker"]]
        trainer.sample_pair = (valid[0], same[1] if len(same) > 1 else valid[0])
    if master:
        Path(run.out).mkdir(parents=True, exist_ok=True)
        n = sum(p.numel() for p in trainer.model.parameters()) / 1e6
        print(f"VALL-E: {n:.2f}M parameters (AR + NAR)", flush=True)
    try:
        history = fit(trainer, run, dataset, interrupt_after)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return trainer, history


# -------------------------------------------------------------------------------------------------
# Inference (§4.3): AR sampling of the first codebook, NAR greedy for the others, the codec decodes

MIN_PROMPT_SECONDS = 1.0  # our choice: below 1 s the voice is barely defined (the paper: 3 s)


def prompt_codes(codec, wav, sample_rate, seconds=3.0):
    """The acoustic prompt (1, Q, P): the first `seconds` of `wav` (C, T) at `sample_rate`, coded
    by the codec. A tensor at another rate or channel count, NaN, or shorter than
    MIN_PROMPT_SECONDS gets a one-line error."""
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
                         f"{MIN_PROMPT_SECONDS:g} s of the voice (the paper: 3 s)")
    sent = codec.encode(wav[None, :, :int(seconds * sample_rate)])
    return getattr(sent, "codes", sent).long()  # (1, Q, P)


@torch.no_grad()
def synthesize(model, codec, phonemes, prompt, temperature=1.0, top_k=0, top_p=1.0, best_of=1,
               max_frames=None, generator=None):
    """Zero-shot TTS (§4.3): the AR samples the first codebook after the prompt's, up to its end
    token or a cap of 16 frames per phoneme unless max_frames (lifeiteng's); the NAR fills the
    other codebooks greedily; the codec decodes. phonemes: the manifest's format; prompt: codes
    (1, Q, P) (prompt_codes); the cap never passes the model's max_len. best_of N: N AR samples
    in one batch, the one with the highest log-probability per token (end token included) kept
    (VALL-E X's best_of). Returns the waveform (C, T), the codes (Q, Y) and whether the cap was
    hit."""
    model.eval()
    if best_of < 1:
        raise ValueError(f"best_of must be at least 1, got {best_of}")
    if prompt.dim() != 3 or prompt.shape[:2] != (1, model.cfg.num_codebooks):
        raise ValueError(f"prompt codes must be (1, {model.cfg.num_codebooks}, frames), got "
                         f"{tuple(prompt.shape)}")
    dev = next(model.parameters()).device
    text, prompt = model.vocab.encode(phonemes)[None].to(dev), prompt.to(dev)  # (1, X), (1, Q, P)
    cap = min(max_frames or 16 * text.shape[1], model.cfg.max_len - prompt.shape[-1])
    if cap < 1:
        raise ValueError(f"the prompt's {prompt.shape[-1]} frames fill the model's max_len "
                         f"{model.cfg.max_len} positions; use a shorter prompt")
    first, n, logp = model.ar.generate(text.expand(best_of, -1), prompt[:, 0].expand(best_of, -1),
                                       cap, temperature, top_k, top_p, generator=generator)
    best = int((logp / (n + (n < cap)).clamp(min=1)).argmax())  # per token, the end one included
    codes = model.nar.generate(text, prompt, first[best:best + 1, :int(n[best])])  # (1, Q, Y)
    codes = codes.cpu()
    return codec.decode(codes)[0], codes[0], int(n[best]) == cap


def resolve_codec_path(path):
    """A codec path as stored in a VALL-E checkpoint: relative to the working directory, or else
    to this file's folder (the shipped checkpoints/...)."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (Path(__file__).parent / p).is_file():
        return Path(__file__).parent / p
    return p

# -------------------------------------------------------------------------------------------------
# Evaluation (§5.2): WER, speaker similarity and duration on voices held out of training


def eval_pairs(data=None, limit=None):
    """(target, prompt, other) manifest entries for the evaluation: every test utterance of a voice
    with no training utterance (the demo corpus holds out two), its prompt the next utterance of
    that voice (test or valid split, in the manifest's order), `other` an utterance of another
    held-out voice (for the similarity to a different voice). A manifest without held-out
    voices: its test voices, said in a note."""
    rows = read_manifest(data or demo_manifest())
    trained = {e["speaker"] for e in rows if e["split"] == "train"}
    test = [e for e in rows if e["split"] == "test"]
    held = sorted({e["speaker"] for e in test} - trained)
    if not held:
        print("note: no test voice is held out of training; the evaluation uses seen voices",
              file=sys.stderr)
        held = sorted({e["speaker"] for e in test})
    pool = {s: [e for e in rows if e["speaker"] == s and e["split"] != "train"] for s in held}
    pairs = []
    for e in test:
        if e["speaker"] not in pool or len(pool[e["speaker"]]) < 2:
            continue
        same = pool[e["speaker"]]
        prompt = same[(same.index(e) + 1) % len(same)]
        others = [s for s in held if s != e["speaker"]] or [s for s in trained]
        other_voice = others[len(pairs) % len(others)]
        other = pool[other_voice][0] if other_voice in pool else next(
            r for r in rows if r["speaker"] == other_voice)
        pairs.append((e, prompt, other))
    return pairs[:limit]


def readable_pairs(model, pairs):
    """The pairs whose text the model's vocabulary covers; a note names each one left out."""
    out = []
    for p in pairs:
        try:
            model.vocab.encode(p[0]["phonemes"])
            out.append(p)
        except ValueError as e:
            print(f"note: {p[0]['path']} left out: {e}", file=sys.stderr)
    return out


@torch.no_grad()
def heldout_loss(model, codec, pairs):
    """Teacher-forced cross-entropy (nats) of both stages on `pairs` (eval_pairs), the prompt the
    first 3 s of the prompt's utterance: the AR's on the target's first codebook and end token,
    the NAR's averaged over codebooks 2..Q. Returns (AR, NAR), each a mean over utterances."""
    model.eval()
    Q, rate, ar, nar = model.cfg.num_codebooks, codec.sample_rate, [], []
    for target, prompt_entry, _ in readable_pairs(model, pairs):
        prompt = prompt_codes(codec, load(prompt_entry["path"], rate, codec.channels)[0], rate)[0]
        sent = codec.encode(load(target["path"], rate, codec.channels)[0][None])
        codes = getattr(sent, "codes", sent)[0].long()  # (Q, Y)
        text = model.vocab.encode(target["phonemes"])
        ar.append(ar_loss(model.ar, *ar_batch([text], [prompt[0]], [codes[0]], model.ar.eos)))
        batch = nar_batch([text] * (Q - 1), [prompt] * (Q - 1), [codes] * (Q - 1))
        nar.append(nar_loss(model.nar, *batch, torch.arange(1, Q)))
    return torch.stack(ar).mean().item(), torch.stack(nar).mean().item()


def evaluate(model, codec, pairs, temperature=1.0, top_k=0, top_p=1.0, best_of=1, n_qs=None,
             seed=0, out=None):
    """The evaluation table over `pairs` (eval_pairs): for the ground truth, the codec's
    resynthesis and VALL-E (a 3 s prompt from another utterance of the voice): Whisper WER, the
    digit WER of the digit strings (pocketsphinx), the speaker similarity to the 3 s prompt
    (SPK, §5.1's measure) and to a different voice's utterance (SPK-other), the duration ratio to
    the ground truth and the share of outputs that hit the length cap. n_qs: also VALL-E decoded
    with only its first n codebooks (the NAR's contribution). out: a folder for the outputs.
    Returns the rows (dicts)."""
    from common import evaluation
    pairs = readable_pairs(model, pairs)
    rate, g = codec.sample_rate, torch.Generator().manual_seed(seed)
    names = ["truth", "resynthesis", "valle"] + [f"valle n_q={n}" for n in (n_qs or [])]
    acc = {n: {"wer": [], "dwer": [], "spk": [], "spk_other": [], "ratio": [], "cap": []}
           for n in names}
    for i, (target, prompt_entry, other) in enumerate(pairs):
        wav = load(target["path"], rate, codec.channels)[0]
        ref = load(prompt_entry["path"], rate, codec.channels)[0]
        other_wav = load(other["path"], rate, codec.channels)[0]
        prompt = prompt_codes(codec, ref, rate)
        out_wav, codes, capped = synthesize(model, codec, target["phonemes"], prompt, temperature,
                                            top_k, top_p, best_of, generator=g)
        sent = codec.encode(wav[None])
        outputs = {"truth": (wav, False), "valle": (out_wav, capped),
                   "resynthesis": (codec.decode(sent)[0, :, :wav.shape[-1]], False)}
        for n in n_qs or []:
            outputs[f"valle n_q={n}"] = (codec.decode(codes[None, :n])[0], capped)
        if out:
            save(Path(out) / f"{Path(target['path']).stem}.wav", out_wav, rate)
        for name, (x, hit) in outputs.items():
            a = acc[name]
            a["wer"].append(evaluation.wer(target["text"], x, rate))
            if target.get("kind") == "digits":
                a["dwer"].append(evaluation.digit_wer(target["text"], x, rate))
            a["spk"].append(evaluation.speaker_similarity(ref[:, :3 * rate], x, rate))
            a["spk_other"].append(evaluation.speaker_similarity(other_wav, x, rate))
            a["ratio"].append(x.shape[-1] / wav.shape[-1])
            a["cap"].append(float(hit))
        if sys.stderr.isatty():
            print(f"\r  {i + 1}/{len(pairs)}", end="", file=sys.stderr, flush=True)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    rows = [{"name": n, **{k: mean(v) for k, v in acc[n].items()}, "n": len(acc[n]["wer"]),
             "n_digits": len(acc[n]["dwer"])} for n in names]
    return rows


def format_eval(rows):
    """The evaluation table as text, one line per system."""
    head = (f"{'system':<14} {'WER':>6} {'dWER':>6} {'SPK':>6} {'SPK-oth':>7} {'dur':>5} "
            f"{'cap':>5}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['name']:<14} {r['wer']:>6.1%} {r['dwer']:>6.1%} {r['spk']:>6.3f} "
                     f"{r['spk_other']:>7.3f} {r['ratio']:>5.2f} {r['cap']:>5.0%}")
    r = rows[0]
    lines.append(f"{r['n']} held-out utterances ({r['n_digits']} digit strings). WER: Whisper-base,"
                 f" "
                 f"dWER: pocketsphinx digits,\nSPK: resemblyzer cosine to the 3 s prompt, SPK-oth: "
                 f"to another voice's utterance, dur: duration / the truth's, cap: outputs at the "
                 f"length cap")
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


def build_parser():
    p = Parser(description="VALL-E (Wang et al. 2023): train, zero-shot TTS, evaluate.",
               allow_abbrev=False)
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true", help="train both stages (DDP by torchrun)")
    act.add_argument("--sample", action="store_true", help="text + prompt wav -> speech (--out)")
    act.add_argument("--eval", action="store_true", help="WER / speaker / duration table on the "
                     "held-out voices")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="default: paper")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that has a run")
    p.add_argument("--codec_official", metavar="TH", help="Meta's EnCodec weights as the "
                   "tokenizer (its first num_codebooks codebooks), instead of --codec")
    p.add_argument("--ckpt", help="model.pt (or ckpt.pt) for --sample / --eval")
    p.add_argument("--text", help="new text (needs espeak-ng for its phonemes)")
    p.add_argument("--phonemes", help="phonemes in the manifest's format, instead of --text")
    p.add_argument("--prompt", metavar="WAV", help="3 s (or more) of the target voice")
    p.add_argument("--temperature", type=float, default=1.0, help="AR sampling (0: greedy)")
    p.add_argument("--top_k", type=int, default=0, help="AR sampling: keep the k best (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="AR sampling: nucleus (1: all)")
    p.add_argument("--best_of", type=int, default=1, help="N AR samples, the most likely kept")
    p.add_argument("--max_frames", type=int, help="AR length cap (default: 16 per phoneme)")
    p.add_argument("--limit", type=int, help="--eval: the first N held-out utterances")
    p.add_argument("--n_qs", default="", help="--eval: also decode with these numbers of "
                   "codebooks, e.g. 1,2,4")
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


# Copied from soundstream.py: parse_bool
def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# run settings a resumed run may change; everything else is fixed by its checkpoint
RESUME_OVERRIDES = ("steps", "log_every", "sample_every", "ckpt_every", "num_workers", "threads")


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
    if args.codec_official:
        if args.codec:
            raise ValueError("give --codec or --codec_official, not both")
        args.codec = OFFICIAL + args.codec_official
    if args.train:
        cfg, run = configs_from_args(args)
        train(cfg, run, resume=args.resume, overwrite=args.overwrite)
        return
    if not args.ckpt:
        raise ValueError("--ckpt is required (e.g. runs/valle_tiny/model.pt)")
    model = VALLE.load(args.ckpt)
    codec, _ = load_codec(model.codec_path, model.cfg.num_codebooks)
    check_codec(codec, model.cfg, model.codec_path)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              best_of=args.best_of)
    check_sampling(args.temperature, args.top_k, args.top_p)  # before any work
    if args.best_of < 1:
        raise ValueError(f"best_of must be at least 1, got {args.best_of}")
    seed = args.seed if args.seed is not None else 0
    if args.eval:
        n_qs = [int(v) for v in args.n_qs.split(",") if v]
        pairs = readable_pairs(model, eval_pairs(args.data, args.limit))
        print(f"{args.ckpt}: {len(pairs)} held-out utterances, prompts of 3 s from another "
              f"utterance of the voice", flush=True)
        ar, nar = heldout_loss(model, codec, pairs)
        print(f"teacher-forced loss: AR {ar:.3f}, NAR {nar:.3f} nats", flush=True)
        print(format_eval(evaluate(model, codec, pairs, n_qs=n_qs, seed=seed, out=args.out,
                                   **kw)))
        return
    if not (args.prompt and args.out):
        raise ValueError("--sample needs --prompt (a wav of the voice) and --out (the wav to "
                         "write)")
    if args.phonemes is None and args.text is None:
        raise ValueError("--sample needs --text (or --phonemes)")
    phonemes = args.phonemes if args.phonemes is not None else phonemize(args.text, args.data)
    if not phonemes.strip():
        raise ValueError("the text is empty")
    wav, sr = load(args.prompt, codec.sample_rate, codec.channels, notice=True)
    prompt = prompt_codes(codec, wav, sr, 3.0)
    out, codes, capped = synthesize(model, codec, phonemes, prompt, max_frames=args.max_frames,
                                    generator=torch.Generator().manual_seed(seed), **kw)
    save(args.out, out, codec.sample_rate)
    print(f"{args.out}: {out.shape[-1] / codec.sample_rate:.2f} s, {codes.shape[-1]} frames of "
          f"{codes.shape[0]} codebooks" + (" (the length cap was hit)" if capped else ""))


if __name__ == "__main__":
    try:
        main()
    except (AudioError, ValueError, FileNotFoundError, FloatingPointError) as e:  # no traceback
        sys.exit(f"error: {e}")
