"""Sampling speed of audiolm.py's three stages with the KV cache against full recomputation, one CPU thread.

    python benchmarks/audiolm_sampling_speed.py [--ckpt checkpoints/audiolm_tiny.pt] [--frames 100]

Each stage of the model continues a fixed prefix by a fixed number of tokens (greedy, so that both ways must give
the same tokens): the semantic stage 50 tokens after 25, the coarse stage --frames frames (x Q' tokens) after 50
semantic tokens and 25 frames, the fine stage one chunk (fine_seconds) after its coarse codes. End tokens are
made illegal so that every run generates exactly that many. Prints seconds, tokens per second, the ratio and whether
the tokens are identical.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import audiolm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="checkpoints/audiolm_tiny.pt")
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = audiolm.AudioLM.load(args.ckpt)
    cfg, g = lm.cfg, torch.Generator().manual_seed(0)
    Qc, W = cfg.coarse_codebooks, int(cfg.fine_seconds * cfg.frame_rate)
    sem = torch.randint(cfg.semantic_vocab, (50,), generator=g)
    coarse = torch.randint(cfg.codebook_size, (cfg.num_codebooks, 25), generator=g)
    L = {s: m.layout for s, m in lm.stages().items()}
    jobs = {"semantic": (torch.cat([torch.tensor([L["semantic"].s_bos]), sem[:25]]), 50, 25),
            "coarse": (L["coarse"].sequence(semantic=sem, coarse=coarse[:Qc], end=False)[0],
                       args.frames * Qc, 25 * Qc),
            "fine": (L["fine"].sequence(coarse=torch.randint(cfg.codebook_size, (Qc, W), generator=g),
                                        fine=torch.zeros(cfg.num_codebooks - Qc, 0, dtype=torch.long))[0],
                     W * (cfg.num_codebooks - Qc), 0)}
    print(f"torch {torch.__version__}, 1 thread, {args.ckpt}: d {cfg.dim}, {cfg.layers} layers")
    for stage, (prefix, n, first) in jobs.items():
        model = lm.stages()[stage]
        if model.layout.eos is not None:
            model.layout.legal[:, model.layout.eos] = False  # the end token is never legal
        out, sec = {}, {}
        for cache in (True, False):
            t = time.perf_counter()
            out[cache] = model.generate(prefix[None], n, first, temperature=0, use_cache=cache)[0]
            sec[cache] = time.perf_counter() - t
        print(f"{stage:<9} {n:4d} tokens after {len(prefix):3d}: KV cache {sec[True]:6.2f} s "
              f"({n / sec[True]:6.1f} tokens/s), recompute {sec[False]:6.2f} s ({n / sec[False]:6.1f} tokens/s): "
              f"{sec[False] / sec[True]:4.1f}x; tokens identical: {torch.equal(out[True], out[False])}")


if __name__ == "__main__":
    main()
