"""Where a tiny-preset training step of soundstream.py spends its time, and what two candidate
speed-ups would save. One batch of the tiny preset's shape (8 x 0.4 s, random audio: speed does
not depend on it), milliseconds per call, mean of --repeat calls after two warm-up calls:
  - the whole Trainer.step, as the preset is, with mkldnn off, and with the STFT discriminator's
    hop doubled (W/2 instead of the paper's W/4 ratio);
  - its parts: the generator forward (and backward through the reconstruction loss), each
    discriminator's forward + backward on 2B examples (the D step), the reconstruction loss.

    python benchmarks/soundstream_step_speed.py [--threads 1] [--repeat 6]

Compare ratios measured in one run; absolute numbers depend on the machine and its load.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import soundstream as ss  # noqa: E402


def ms_per_call(f, repeat):
    f()
    f()
    t = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t) / repeat * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, run = ss.PRESETS["tiny"]
    x = 0.1 * torch.randn(run.batch_size, 1, int(run.segment_seconds * cfg.sample_rate))
    print(f"tiny preset, batch {tuple(x.shape)}, {args.threads} thread(s), ms per call")
    for name, r, mkldnn in [("Trainer.step", run, True), ("  mkldnn off", run, False),
                            ("  STFT disc hop 256", dataclasses.replace(run, stft_hop=256), True)]:
        torch.backends.mkldnn.enabled = mkldnn
        trainer = ss.Trainer(cfg, r)
        print(f"{name:<28} {ms_per_call(lambda: trainer.step(x), args.repeat):7.0f}", flush=True)
    torch.backends.mkldnn.enabled = True
    trainer = ss.Trainer(cfg, run)

    def generator():
        x_hat = trainer.model(x)[0]
        trainer.rec_loss(x, x_hat).backward()

    def rec_loss():
        x_hat = x.clone().requires_grad_()
        trainer.rec_loss(x, x_hat).backward()

    def disc(module):
        both = torch.cat([x, x]).requires_grad_()
        outs = [d(both) for d in module] if isinstance(module, torch.nn.ModuleList) else [module(both)]
        sum(lg.sum() + sum(f.sum() for f in fs) for lg, fs in outs).backward()

    print(f"{'G forward + backward (rec)':<28} {ms_per_call(generator, args.repeat):7.0f}")
    print(f"{'  of which the rec loss':<28} {ms_per_call(rec_loss, args.repeat):7.0f}")
    for name, module in trainer.disc.named_children():
        if any(True for _ in module.parameters()):
            label = f"D {name}, fwd + bwd on 2B"
            print(f"{label:<28} {ms_per_call(lambda m=module: disc(m), args.repeat):7.0f}")


if __name__ == "__main__":
    main()
