"""AR sampling speed of valle.py with the KV cache against full recomputation, one CPU thread.

    python benchmarks/valle_sampling_speed.py [--tokens 300] [--dim 256] [--layers 4]

A random-weight AR model (its end token suppressed, so that every run generates exactly --tokens tokens) continues
a 75-frame prompt after 20 phonemes, greedily, both ways; prints seconds, tokens per second, the ratio, and
whether the two token sequences are identical.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import valle  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = valle.Config(dim=args.dim, heads=4, layers=args.layers, ffn=4 * args.dim, dropout=0.0,
                       text_vocab=64, codebook_size=256, max_len=1024)
    torch.manual_seed(0)
    model = valle.ARModel(cfg).eval()
    with torch.no_grad():
        model.head.weight[cfg.codebook_size] = -10.0  # the end token never wins
    text, prompt = torch.randint(64, (1, 20)), torch.randint(256, (1, 75))
    out, seconds = {}, {}
    for cache in (True, False):
        t = time.perf_counter()
        out[cache], _, _ = model.generate(text, prompt, args.tokens, temperature=0, use_cache=cache)
        seconds[cache] = time.perf_counter() - t
    print(f"torch {torch.__version__}, 1 thread, d {args.dim}, {args.layers} layers, {args.tokens} new tokens "
          f"after 20 phonemes + 75 prompt frames")
    for cache, name in ((True, "KV cache"), (False, "recompute")):
        print(f"{name:<10} {seconds[cache]:6.2f} s  {args.tokens / seconds[cache]:7.1f} tokens/s")
    print(f"cache is {seconds[False] / seconds[True]:.1f}x faster; tokens identical: "
          f"{torch.equal(out[True], out[False])}")


if __name__ == "__main__":
    main()
