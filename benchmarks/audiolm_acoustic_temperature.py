"""Acoustic generation from ground-truth semantic tokens (stages 2-3, no acoustic prompt) at several coarse
temperatures: the digit WER (pocketsphinx's digit grammar) on the digit strings of the validation and test splits.

    python benchmarks/audiolm_acoustic_temperature.py [--ckpt checkpoints/audiolm_tiny.pt]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import audiolm  # noqa: E402
from common import evaluation  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="checkpoints/audiolm_tiny.pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = audiolm.AudioLM.load(args.ckpt)
    codec, _ = audiolm.load_codec(lm.codec_path)
    pairs = []
    for split in ("valid", "test"):
        entries, items = audiolm.split_items(lm, codec, split)
        pairs += [(e, it) for e, it in zip(entries, items) if e.get("kind") == "digits"]
    resynth = [evaluation.digit_wer(e["text"], codec.decode(codes[None].long())[0], codec.sample_rate)
               for e, (_, codes) in pairs]
    print(f"{len(pairs)} digit strings; codec resynthesis: dWER {np.mean(resynth):.1%}")
    for t_coarse in (0.0, 0.4, 0.8, 1.0):
        g, errors, t0 = torch.Generator().manual_seed(0), [], time.time()
        for e, (semantic, _) in pairs:
            wav = lm.generate(codec, semantic=audiolm.repeats_removed(lm.cfg, semantic.long()),
                              temperatures=(0.6, t_coarse, 0.6), generator=g)[0][0]
            errors.append(evaluation.digit_wer(e["text"], wav, codec.sample_rate))
        print(f"coarse temperature {t_coarse}: dWER {np.mean(errors):.1%} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
