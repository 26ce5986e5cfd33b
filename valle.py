"""
VALL-E: Neural Codec Language Models are Zero-Shot Text to Speech Synthesizers, in one file.

Wang, Chen, Wu, Zhang, Zhou, Liu, Chen, Liu, Wang, Li, He, Zhao, Wei. 2023. arXiv 2301.02111.
No official code; reimplementations read: lifeiteng/vall-e (valle/models/valle.py, macros.py),
enhuiz/vall-e, Plachtaa/VALL-E-X (reference/lms.md §1.3).

WORK IN PROGRESS (branch wip/valle, issue 15). Here: the generic LM parts that audiolm.py and
audiogen.py will copy (attention with a KV cache, the block, masks, samplers), the AR and NAR
models, their layouts and losses, the phoneme front end, codec loading and the token cache, a
dataset and a trainer of both stages. Not yet: exact resume, DDP, the evaluation, --sample, the
CLI, the README section and the notebook.

Shapes: B batch, S sequence (phonemes then audio), X phonemes, P prompt frames, Y target frames,
Q codebooks, K codebook size, D model width, H heads.
"""

import contextlib
import dataclasses
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

from common.audio import load
from common.data import demo_manifest, read_manifest

NAME = "valle"
CHOICES = {"amp": ("none", "bf16", "fp16")}
CODEC_CLASSES = {"encodec": "EnCodec", "soundstream": "SoundStream", "freqcodec": "FreqCodec",
                 "bigcodec": "BigCodec"}  # checkpoint "model" name -> the codec file's class

# -------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """What rebuilds the model. Defaults: the paper's AR and NAR transformers (§4.1)."""
    dim: int = 1024                # D = 1024 (§4.1)
    heads: int = 16                # 16 attention heads (§4.1)
    layers: int = 12               # 12 layers (§4.1)
    ffn: int = 4096                # feed-forward 4096 (§4.1)
    dropout: float = 0.1           # dropout 0.1 (§4.1)
    text_vocab: int = 512          # phoneme ids (lifeiteng NUM_TEXT_TOKENS)
    codebook_size: int = 1024      # EnCodec 24 kHz at 6 kbps: 8 x 1024 (§4.1)
    num_codebooks: int = 8         # (§4.1)
    max_len: int = 4096            # longest sequence the positions cover


@dataclass
class TrainConfig:
    """How both stages are trained: data, tokens, optimiser and the run."""
    codec: str = "checkpoints/encodec_16khz_8x256.pt"  # the tokenizer (the paper: EnCodec 24 kHz)
    prompt_seconds: float = 3.0    # the prompt: 3 s of another utterance of the speaker (§4.1)
    max_text: int = 256            # phonemes per example (longer ones are refused)
    max_seconds: float = 20.0      # target audio per example (§4.1: 10-20 s crops)
    lr: float = 5e-4               # AdamW peak (our choice; lifeiteng: ScaledAdam 0.05)
    warmup_steps: int = 200        # linear warm-up (lifeiteng --warmup-steps 200), then cosine
    min_lr_ratio: float = 0.1      # cosine decay to lr * this at the last step (our choice)
    betas: tuple[float, ...] = (0.9, 0.95)  # (our choice)
    weight_decay: float = 0.01     # (our choice)
    grad_clip: float = 1.0         # (our choice)
    batch_size: int = 16           # examples per step (the paper: 6k tokens per GPU)
    data: str = ""                 # .jsonl manifest (text, phonemes, speaker); "": the demo corpus
    out: str = "runs/valle"        # checkpoints, log, token cache
    steps: int = 800_000           # 800k steps (§4.1)
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10 ** 9    # no samples during training yet (WIP)
    ckpt_every: int = 5000
    num_workers: int = 0
    threads: int = 0               # CPU threads; 0: the idle cores
    amp: str = "none"              # "bf16" / "fp16" mixed precision on CUDA; ignored on CPU


PRESETS = {
    "paper": (Config(), TrainConfig()),
    # CPU preset: narrow and shallow, on the shipped 8 x 256 EnCodec tokenizer (50 Hz). No dropout:
    # on CPU its masks were 42 % of a step (torch.profiler, 8 x 420 tokens), and without them
    # attention takes the fused kernel: 2.6x faster in all
    "tiny": (Config(dim=128, heads=4, layers=4, ffn=512, dropout=0.0, text_vocab=128,
                    codebook_size=256, max_len=1024),
             TrainConfig(prompt_seconds=3.0, max_text=200, max_seconds=8.0, lr=1e-3, batch_size=8,
                         out="runs/valle_tiny", steps=2500, log_every=100, ckpt_every=500)),
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
        if cache is not None:  # (B, H, S, D/H) each
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class AdaptiveLayerNorm(nn.Module):
    """§3.3 (NAR): "adaptive layer normalization" on the stage: LN without its own affine, then
    gamma(c) * LN(h) + beta(c), with gamma and beta a linear map of the condition embedding c
    (lifeiteng's AdaptiveLayerNorm)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.project = nn.Linear(dim, 2 * dim)

    def forward(self, x, cond):  # x (B, S, D), cond (B, D)
        gamma, beta = self.project(cond)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return gamma * self.norm(x) + beta


class Block(nn.Module):
    """Pre-norm transformer layer (lifeiteng norm_first): x + Attn(LN(x)), then x + FFN(LN(x)),
    with a ReLU feed-forward of width `ffn` and dropout after each sub-layer. adaptive: both norms
    are AdaptiveLayerNorm on `cond` (the NAR's stage)."""

    def __init__(self, dim, heads, ffn, dropout, adaptive=False):
        super().__init__()
        norm = AdaptiveLayerNorm if adaptive else nn.LayerNorm
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.adaptive = adaptive
        self.attn = Attention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache=None, cond=None):  # (B, S, D) -> (B, S, D)
        n1, n2 = ((lambda h: self.norm1(h, cond)), (lambda h: self.norm2(h, cond))) \
            if self.adaptive else (self.norm1, self.norm2)
        x = x + self.drop(self.attn(n1(x), mask, cache))
        return x + self.drop(self.mlp(n2(x)))


def sinusoids(length, dim, device=None):
    """(length, dim) sine/cosine positions (Vaswani et al. 2017): sin on even, cos on odd
    channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits (0: all) and the smallest set whose probabilities sum to at
    least top_p (1.0: all); the others become -inf. logits (..., V)."""
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
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

# -------------------------------------------------------------------------------------------------
# The AR model (§3.3): phonemes as a bidirectional prefix, then the first codebook, causally


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
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.ffn, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, K + 1, bias=False)
        self.register_buffer("pe", sinusoids(cfg.max_len, D), persistent=False)

    def embed(self, text, audio, audio_offset=0):  # text (B, X), audio (B, Y) -> (B, X + Y, D)
        parts = []
        if text is not None:
            parts.append(self.text_embedding(text) + self.text_alpha * self.pe[:text.shape[1]])
        if audio is not None and audio.shape[1]:
            Y = audio.shape[1]
            pos = self.pe[audio_offset:audio_offset + Y]
            parts.append(self.audio_embedding(audio) + self.audio_alpha * pos)
        return self.drop(torch.cat(parts, dim=1))

    def forward(self, text, audio, text_lengths=None):
        """Logits (B, Y, K + 1) for the audio positions: the prediction at audio position t is of
        token t (read at position t - 1; the first, at the last phoneme slot, is of audio token 0).
        text_lengths (B,): rows whose phonemes are right-padded (id 0) to X; their padding is never
        attended to, and their first prediction is read at the last real phoneme."""
        B, X = text.shape
        h = self.embed(text, audio[:, :-1])  # the last audio token predicts nothing
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
        first = logits[torch.arange(B), text_lengths - 1][:, None]  # at the last real phoneme
        return torch.cat([first, logits[:, X:]], dim=1)  # (B, Y, K + 1)

    @torch.no_grad()
    def generate(self, text, prompt, max_new, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 generator=None):
        """Continue the first-codebook `prompt` (B, P) after `text` (B, X) by up to `max_new`
        tokens. Each row stops at its own end token (later positions hold K, the end id). Returns
        (B, max_new) ids and the number of new tokens of each row (B,). With use_cache the keys and
        values of earlier positions are kept (each step runs one position); without, every step
        recomputes all."""
        B, X = text.shape
        out = torch.full((B, max_new), self.eos, dtype=torch.long, device=text.device)
        done = torch.zeros(B, dtype=torch.bool, device=text.device)
        lengths = torch.full((B,), max_new, dtype=torch.long, device=text.device)
        caches = [{} for _ in self.blocks] if use_cache else None
        audio = prompt
        for t in range(max_new):
            if use_cache and t > 0:  # only the newest token
                h = self.embed(None, audio[:, -1:], audio_offset=audio.shape[1] - 1)
                mask = None  # a single query may see everything before it
            else:
                h = self.embed(text, audio)
                mask = prefix_lm_mask(X, h.shape[1], h.device)
            for i, block in enumerate(self.blocks):
                h = block(h, mask, caches[i] if use_cache else None)
            logits = self.head(self.norm(h[:, -1]))  # (B, K + 1)
            token = sample(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, self.eos, token)
            newly = (token == self.eos) & ~done
            lengths = torch.where(newly, t, lengths)
            done |= newly
            out[:, t] = token
            if done.all():
                break
            audio = torch.cat([audio, token[:, None]], dim=1)
        return out, lengths

# -------------------------------------------------------------------------------------------------
# The NAR model (§3.3): codebooks 2..8, each from the ones before it, non-causally


class NARModel(nn.Module):
    """Non-autoregressive transformer for codebooks 1..Q-1 (0-based). At stage j the input is
    [phonemes ; the prompt's codes summed over all Q codebooks ; the target's codes summed over
    codebooks < j], attention is bidirectional, every norm is adaptive on the stage's embedding,
    and the head of stage j predicts codebook j at the target positions. The head of codebook j
    shares its weight with the input embedding of codebook j (lifeiteng share_embedding)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, K, Q = cfg.dim, cfg.codebook_size, cfg.num_codebooks
        self.text_embedding = nn.Embedding(cfg.text_vocab, D)
        self.audio_embeddings = nn.ModuleList(nn.Embedding(K, D) for _ in range(Q))
        self.stage_embedding = nn.Embedding(Q, D)  # stages 1..Q-1 used
        self.text_alpha, self.audio_alpha = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.ffn, cfg.dropout, adaptive=True)
                                    for _ in range(cfg.layers))
        self.norm = AdaptiveLayerNorm(D)
        self.register_buffer("pe", sinusoids(cfg.max_len, D), persistent=False)

    def embed_codes(self, codes):  # (B, n, L) -> (B, L, D): the sum of the n codebooks' embeddings
        return sum(self.audio_embeddings[k](codes[:, k]) for k in range(codes.shape[1]))

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
        # emb (B, Q, Y, D)
        tgt = (emb * seen[:, :, None, None]).sum(1)  # (B, Y, D): codebooks < stage, per row
        p_len = lengths[1] if lengths is not None else torch.full((B,), P, device=dev)
        tgt_pos = self.pe[p_len[:, None] + torch.arange(Y, device=dev)[None]]  # (B, Y, D)
        h = torch.cat([self.text_embedding(text) + self.text_alpha * self.pe[:X],
                       self.embed_codes(prompt) + self.audio_alpha * self.pe[:P],
                       tgt + self.audio_alpha * tgt_pos], dim=1)
        h = self.drop(h)
        mask = None
        if lengths is not None:  # keys that are no padding, in each of the three parts
            keep = [torch.arange(n, device=dev)[None] < n_real[:, None]
                    for n, n_real in zip((X, P, Y), lengths)]
            mask = torch.cat(keep, dim=1)[:, None, None, :]  # (B, 1, 1, S)
        cond = self.stage_embedding(stage)  # (B, D)
        for block in self.blocks:
            h = block(h, mask, cond=cond)
        h = self.norm(h[:, X + P:], cond)  # (B, Y, D)
        weight = torch.stack([e.weight for e in self.audio_embeddings])[stage]  # (B, K, D): tied
        return torch.einsum("byd,bkd->byk", h, weight)

    @torch.no_grad()
    def generate(self, text, prompt, first):
        """Greedy codebooks 1..Q-1 (§3.4: NAR greedy) for the first codebook `first` (B, Y) ->
        (B, Q, Y)."""
        B, Y = first.shape
        Q = self.cfg.num_codebooks
        codes = torch.zeros(B, Q, Y, dtype=torch.long, device=first.device)
        codes[:, 0] = first
        for j in range(1, Q):
            stage = torch.full((B,), j, dtype=torch.long, device=first.device)
            codes[:, j] = self(text, prompt, codes, stage).argmax(dim=-1)
        return codes

# -------------------------------------------------------------------------------------------------
# Phonemes (§3.1: "phoneme sequence" from G2P): espeak-ng IPA, or the manifest's


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


def phonemize(text):
    """espeak-ng IPA of new text, in the manifest's format (the command data/make_demo_corpus.py
    used), or a one-line error when the engine is not installed."""
    if not text or not text.strip():
        raise ValueError("the text is empty")
    if shutil.which("espeak-ng") is None:
        raise ValueError("espeak-ng is not installed, and new text needs it for its phonemes "
                         "(apt-get install espeak-ng), or pass the phonemes themselves")
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


def load_codec(path):
    """A codec file's model.pt -> (its model in eval mode, its module name). The checkpoint's
    "model" field names the codec file; a checkpoint of another kind gets a one-line error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"codec checkpoint {path} not found")
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


@torch.no_grad()
def token_cache(codec, codec_path, entries, cache_dir):
    """Codes (Q, F) int16 of every entry's audio, computed once and kept in cache_dir/<key>.pt,
    keyed by the codec file's bytes and the audio paths: a new codec or a new corpus recomputes.
    Returns {path: codes}."""
    key = hashlib.sha256(Path(codec_path).read_bytes()).hexdigest()[:16]
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
# Sequence layouts and losses (§3.3)


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
    """Mean cross-entropy of the AR's predictions at the loss_mask positions."""
    logits = model(text, audio, text_lengths)  # (B, A, K + 1)
    return F.cross_entropy(logits[loss_mask], audio[loss_mask])


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
    """Mean cross-entropy of codebook `stage` (B,) over each row's real target frames."""
    logits = model(text, prompt, target, stage, lengths)  # (B, Y, K)
    truth = target[torch.arange(len(stage)), stage]  # (B, Y): codebook `stage` of each row
    real = torch.arange(target.shape[-1])[None] < lengths[2][:, None]
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
# Training: the model-specific part (WIP)


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
        `stage` (B,) of each example. One forward, so that DDP syncs both stages' gradients."""
        B = len(batch["text"])
        X, P, Y = (int(batch[k].max()) for k in ("text_len", "prompt_len", "target_len"))
        texts = [batch["text"][i, :batch["text_len"][i]] for i in range(B)]
        prompts = [batch["prompt"][i, :, :batch["prompt_len"][i]] for i in range(B)]
        targets = [batch["target"][i, :, :batch["target_len"][i]] for i in range(B)]
        dev = batch["text"].device
        ar_in = ar_batch(texts, [p[0] for p in prompts], [y[0] for y in targets], self.ar.eos)
        ar = ar_loss(self.ar, *(t.to(dev) for t in ar_in))
        nar = nar_loss(self.nar, *nar_batch(texts, prompts, targets), stage)
        return ar, nar

    def save(self, path):
        atomic_save({"model": NAME, "config": dataclasses.asdict(self.cfg), "symbols": self.symbols,
                     "codec": self.codec_path, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location="cpu"):
        ckpt = load_checkpoint(path, map_location)
        model = cls(config_from_dict(Config, ckpt["config"], path), ckpt["symbols"], ckpt["codec"])
        model.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt["generator"])
        return model.eval()


class TTSDataset(torch.utils.data.Dataset):
    """Examples of equal shape (so that the generic fit's DataLoader stacks them): the phoneme ids,
    the target's codes and a prompt of `prompt_frames` from another utterance of the same speaker
    (a random window, drawn from (seed, epoch, index)), each right-padded, with their lengths."""

    def __init__(self, entries, codes, vocab, cfg, run, frame_rate, seed=0):
        self.max_text, self.Q = run.max_text, cfg.num_codebooks
        self.max_frames = int(run.max_seconds * frame_rate)
        self.prompt_frames = int(run.prompt_seconds * frame_rate)
        items = [(vocab.encode(e["phonemes"]), codes[e["path"]].long(), e["speaker"])
                 for e in entries]
        self.items = [it for it in items
                      if len(it[0]) <= self.max_text and it[1].shape[-1] <= self.max_frames]
        if len(self.items) < len(items):
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
        prompt = self.items[others[int(torch.randint(len(others), (1,), generator=g))]][1]
        n = min(self.prompt_frames, prompt.shape[-1])
        start = int(torch.randint(prompt.shape[-1] - n + 1, (1,), generator=g))
        pad = lambda x, L: F.pad(x, (0, L - x.shape[-1]))  # noqa: E731
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
        self.G = self.model
        if world > 1:
            ids = [self.device.index] if cuda else None
            self.G = nn.parallel.DistributedDataParallel(self.model, ids)
        torch.manual_seed(run.seed + rank)  # dropout differs per rank
        self.step_count = 0

    def lr_at(self, step):
        """Linear warm-up over warmup_steps, then a cosine from lr down to lr * min_lr_ratio at
        the last step (our choice, in the place of lifeiteng's Eden schedule)."""
        run = self.run
        if step < run.warmup_steps:
            return run.lr * (step + 1) / run.warmup_steps
        done = (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * cosine)

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
            ar, nar = self.G(b, stage.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(ar + nar).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradient, not the scaled one
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return {"ar": ar.item(), "nar": nar.item(), "|g|": norm.item(),
                "lr": self.opt.param_groups[0]["lr"]}

    def write_sample(self, stem):  # WIP: samples during training come with --sample
        pass

    def state_dict(self):
        """Everything an exact resume needs. Collective under DDP: every rank's RNG state."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"model": NAME, "config": dataclasses.asdict(self.cfg),
                "train_config": dataclasses.asdict(self.run), "step": self.step_count,
                "symbols": self.model.symbols, "generator": self.model.state_dict(),
                "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs}

    def load_state_dict(self, ckpt):
        self.model.load_state_dict(ckpt["generator"])
        self.opt.load_state_dict(ckpt["opt"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step_count = ckpt["step"]
        set_rng_state(ckpt["rng"][self.rank % len(ckpt["rng"])])


def train(cfg, run, resume=False, interrupt_after=None):
    """WIP: one process, both stages at once, on the demo corpus (or a manifest). resume: continue
    the run in run.out exactly (its vocabulary, weights, optimiser, step and RNG)."""
    rank, world, device = setup_distributed()
    master = rank == 0
    start = load_checkpoint(Path(run.out) / "ckpt.pt") if resume else None
    threads, why = pick_threads(run.threads, world) if device.type == "cpu" else (0, "")
    if threads:
        torch.set_num_threads(threads)
    entries = read_manifest(run.data or demo_manifest(), "train")
    codec, kind = load_codec(run.codec)
    if codec.codebook_size != cfg.codebook_size or codec.num_codebooks != cfg.num_codebooks:
        raise ValueError(f"{run.codec}: {codec.num_codebooks} x {codec.codebook_size} codes; the "
                         f"config models {cfg.num_codebooks} x {cfg.codebook_size}")
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
# Inference (§3.4) and the command line (WIP)


@torch.no_grad()
def synthesize(model, codec, phonemes, prompt_wav, temperature=1.0, top_k=0, top_p=1.0,
               max_frames=None, generator=None):
    """Zero-shot TTS: the AR samples the first codebook after the prompt's (a cap of 16 frames
    per phoneme unless max_frames, lifeiteng's), the NAR fills the others greedily, the codec
    decodes. phonemes: the manifest's format; prompt_wav (1, T) at the codec's rate. Returns the
    waveform (1, T'), the codes (Q, Y) and whether the cap was hit."""
    model.eval()
    text = model.vocab.encode(phonemes)[None]  # (1, X)
    if prompt_wav.shape[-1] < codec.sample_rate // 2:
        raise ValueError(f"the prompt is {prompt_wav.shape[-1] / codec.sample_rate:.2f} s; it "
                         f"needs at least 0.5 s (the paper: 3 s)")
    sent = codec.encode(prompt_wav[None])
    prompt = getattr(sent, "codes", sent).long()  # (1, Q, P)
    cap = max_frames or 16 * text.shape[1]
    first, n = model.ar.generate(text, prompt[:, 0], cap, temperature, top_k, top_p,
                                 generator=generator)
    first = first[:, :max(1, int(n[0]))]
    codes = model.nar.generate(text, prompt, first)  # (1, Q, Y)
    wav = codec.decode(codes)[0]
    return wav, codes[0], int(n[0]) == cap


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="VALL-E (WIP): train, sample.")
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--train", action="store_true")
    act.add_argument("--sample", action="store_true")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    p.add_argument("--ckpt")
    p.add_argument("--text", help="new text (needs espeak-ng)")
    p.add_argument("--phonemes", help="phonemes in the manifest's format, instead of --text")
    p.add_argument("--prompt", help="a prompt wav of the target voice")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train:
        cfg, run = PRESETS[args.preset]
        run = dataclasses.replace(run, **{k: v for k, v in (("steps", args.steps),
                                                            ("out", args.out)) if v is not None})
        trainer, _ = train(cfg, run)
        return
    if not (args.ckpt and args.prompt and args.out and (args.text or args.phonemes)):
        raise ValueError("--sample needs --ckpt, --prompt, --out and --text or --phonemes")
    model = VALLE.load(args.ckpt)
    codec, _ = load_codec(model.codec_path)
    phonemes = args.phonemes or phonemize(args.text)
    wav, _ = load(args.prompt, codec.sample_rate, codec.channels, notice=True)
    out, codes, capped = synthesize(model, codec, phonemes, wav,
                                    generator=torch.Generator().manual_seed(args.seed))
    from common.audio import save
    save(args.out, out, codec.sample_rate)
    print(f"{args.out}: {out.shape[-1] / codec.sample_rate:.2f} s, {codes.shape[-1]} frames"
          + (" (the length cap was hit)" if capped else ""))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
