"""How loud is each term of SoundStream's Eq. 6 to the generator? Prints the gradient norm of each
weighted term at x_hat (the generator's output), for the reconstruction term as soundstream.py
computes it (Eqs. 4-5 normalised, DEVIATION 1) and as the paper writes it (linear-magnitude STFT,
peak-1 mel triangles, sums over the 64 bands; frames averaged), at initialisation and after a few
training steps of the tiny preset on the demo corpus.

    python benchmarks/soundstream_balance.py [--steps 60] [--every 20]

One thread, seed 0, a fixed batch of 8 demo crops of 0.4 s. The discriminators train as usual, so
the adversarial and feature gradients grow from ~0 (random discriminators) as they learn.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import soundstream as ss  # noqa: E402
from common.data import AudioDataset, resolve_files  # noqa: E402
from common.metrics import mel_filterbank  # noqa: E402


def reconstruction_as_written(x, x_hat, sample_rate, scales=(64, 128, 256, 512, 1024, 2048), bins=64):
    """Eqs. 4-5 as the paper writes them: sum over s of ||S_x - S_y||_1 + alpha_s ||log S_x -
    log S_y||_2 over the 64 bands, S a peak-1 mel filterbank over the linear STFT magnitude."""
    x, x_hat = x.squeeze(1), x_hat.squeeze(1)
    loss = 0.0
    for s in scales:
        fb = mel_filterbank(sample_rate, s, bins, htk=True, norm=None)
        window = torch.hann_window(s)
        S_x, S_y = (fb @ torch.stft(v, s, s // 4, window=window, return_complex=True).abs()
                    for v in (x, x_hat))
        l1 = (S_x - S_y).abs().sum(dim=1)
        l2 = ((S_x.clamp(min=1e-5).log() - S_y.clamp(min=1e-5).log()).pow(2).sum(dim=1) + 1e-12).sqrt()
        loss = loss + (l1 + math.sqrt(s / 2) * l2).mean()
    return loss


def grad_norms(trainer, x):
    """Gradient norm at x_hat of each weighted term, without changing any weight."""
    model, disc, w = trainer.model.train(), trainer.disc, ss.loss_weights(trainer.run)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the EMA codebooks move
    x_hat, _, _ = model(x)
    model.load_state_dict(state)
    with torch.no_grad():
        real = disc(x)
    fake = disc(x_hat)
    terms = {"adv": w["adv"] * ss.adversarial_loss(fake), "feat": w["feat"] * ss.feature_loss(real, fake),
             "rec": w["rec"] * trainer.rec_loss(x, x_hat),
             "rec as written": w["rec"] * reconstruction_as_written(x, x_hat, trainer.cfg.sample_rate)}
    out = {}
    for k, v in terms.items():
        grad, = torch.autograd.grad(v, x_hat, retain_graph=True)
        out[k] = (v.item(), grad.norm().item())
    disc.zero_grad(set_to_none=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, run = ss.PRESETS["tiny"]
    ds = AudioDataset(resolve_files(None, "train"), cfg.sample_rate, segment=int(run.segment_seconds * cfg.sample_rate))
    x = torch.stack([ds[i] for i in range(run.batch_size)])  # (8, 1, 6400)
    trainer = ss.Trainer(cfg, run)
    print(f"tiny preset, lambda_adv {run.lambda_adv:g}, lambda_feat {run.lambda_feat:g}, lambda_rec {run.lambda_rec:g}")
    print(f"{'step':>5} {'term':>15} {'value':>10} {'|grad| at x_hat':>16} {'ratio to adv':>13}")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            norms = grad_norms(trainer, x)
            for k, (value, g) in norms.items():
                print(f"{step:>5} {k:>15} {value:>10.4g} {g:>16.3g} {g / norms['adv'][1]:>13.3g}")
        if step < args.steps:
            trainer.step(x)
    with torch.no_grad():
        x_hat = trainer.model.eval()(x)[0]
    print(f"output DC after {args.steps} steps: {x_hat.mean().item():+.4f}")


if __name__ == "__main__":
    main()
