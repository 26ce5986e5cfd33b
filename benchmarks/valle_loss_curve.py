"""Teacher-forced loss of VALL-E checkpoints on held-out voices, on seen voices and on training utterances.

    python benchmarks/valle_loss_curve.py runs/valle_tiny_curve/model_*.pt

For each checkpoint (a --train model.pt), valle.heldout_loss (AR: the first codebook and the end token; NAR: the
mean over codebooks 2..8; nats) on three sets, each target with a 3 s prompt from another utterance of its speaker:
the test utterances of the voices held out of training (valle.eval_pairs), the validation utterances of the
training voices, and 24 training utterances. Training loss falling while the other two rise is memorisation.
"""

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import valle  # noqa: E402
from common.data import demo_manifest, read_manifest  # noqa: E402


def with_prompts(entries, pool):
    """(target, prompt, None) triples: the prompt the next utterance of the target's speaker in `pool`."""
    out = []
    for e in entries:
        same = [r for r in pool if r["speaker"] == e["speaker"] and r["path"] != e["path"]]
        if same:
            out.append((e, same[0], None))
    return out


def main():
    paths = sorted(sys.argv[1:], key=lambda p: int(re.findall(r"\d+", Path(p).stem)[-1])
                   if re.findall(r"\d+", Path(p).stem) else 0)
    if not paths:
        sys.exit("usage: python benchmarks/valle_loss_curve.py MODEL.pt [MODEL.pt ...]")
    torch.set_num_threads(1)
    rows = read_manifest(demo_manifest())
    trained = {e["speaker"] for e in rows if e["split"] == "train"}
    valid = [e for e in rows if e["split"] == "valid" and e["speaker"] in trained]
    train = [e for e in rows if e["split"] == "train"]
    sets = {"held-out voices": valle.eval_pairs(), "seen voices (valid)": with_prompts(valid, valid),
            "training utterances": with_prompts(train[:24], train)}
    print(" | ".join([f"{'checkpoint':<40}"] + [f"{k} ({len(v)}): AR / NAR" for k, v in sets.items()]))
    for path in paths:
        model = valle.VALLE.load(path)
        codec, _ = valle.load_codec(model.codec_path)
        cells = [f"{path:<40}"]
        for pairs in sets.values():
            ar, nar = valle.heldout_loss(model, codec, pairs)
            cells.append(f"{ar:.3f} / {nar:.3f}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
