"""How hard does each term of SoundStream's Eq. 6 pull on the generator's output x_hat? For the
tiny preset on the demo corpus, prints each term's gradient norm at x_hat (per example, averaged
over the batch):
  - weighted by the paper's lambdas (adv 1, feat 100, rec 1): what fixed weights would send;
  - after soundstream.py's balance (DEVIATION 1): what the generator is sent, each GAN term
    rescaled to ratio_adv / ratio_feat of the reconstruction term's norm.

    python benchmarks/soundstream_balance.py [--steps 100] [--every 25]

One thread, seed 0, the training crops of the tiny preset (batch 8 x 0.4 s). The training is the
real one (Trainer.step), so the adversarial and feature gradients grow from ~0 (random
discriminators) as the discriminators learn.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import soundstream as ss  # noqa: E402
from common.data import AudioDataset, resolve_files  # noqa: E402

PAPER_LAMBDAS = {"adv": 1.0, "feat": 100.0, "rec": 1.0}  # §III-E


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, run = ss.PRESETS["tiny"]
    ds = AudioDataset(resolve_files(None, "train"), cfg.sample_rate,
                      segment=int(run.segment_seconds * cfg.sample_rate), seed=0)
    trainer = ss.Trainer(cfg, run)
    seen = {}
    balance = ss.balance

    def recording_balance(grads, ratios):  # the step's own call, with what it was given
        out, norms = balance(grads, ratios)
        # what each term adds to the gradient sent into G (out is the sum of these parts)
        parts = {"rec": grads["rec"]}
        for k, r in ratios.items():
            parts[k] = r * norms["rec"] / (norms[k] + 1e-12) * grads[k]
        seen.update({k: v.flatten(1).norm(dim=1).mean().item() for k, v in parts.items()})
        return out, norms

    ss.balance = recording_balance
    print(f"tiny preset; ratio_adv {run.ratio_adv:g}, ratio_feat {run.ratio_feat:g}")
    print(f"{'step':>5} | {'paper lambdas: adv':>18} {'feat':>9} {'rec':>9} {'rec/adv':>9} | "
          f"{'balanced: adv':>13} {'feat':>9} {'rec':>9} {'rec/adv':>9}")
    for step in range(1, args.steps + 1):
        batch = torch.stack([ds[(step * run.batch_size + i) % len(ds)]
                             for i in range(run.batch_size)])
        stats = trainer.step(batch)
        if step == 1 or step % args.every == 0:
            fixed = {k: PAPER_LAMBDAS[k] * stats[f"|g_{k}|"] for k in PAPER_LAMBDAS}
            sent = dict(seen)
            print(f"{step:>5} | {fixed['adv']:>18.3g} {fixed['feat']:>9.3g} {fixed['rec']:>9.3g} "
                  f"{fixed['rec'] / fixed['adv']:>9.3g} | {sent['adv']:>13.3g} "
                  f"{sent['feat']:>9.3g} "
                  f"{sent['rec']:>9.3g} {sent['rec'] / sent['adv']:>9.3g}")


if __name__ == "__main__":
    main()
