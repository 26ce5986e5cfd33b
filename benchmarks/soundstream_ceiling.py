"""Is a trained SoundStream limited by its quantizer or by its autoencoder? For a checkpoint,
prints on held-out utterances:
  - mel distance and STOI at every n_q = 1..N_q, and with the continuous latent z (no quantizer
    at all): the autoencoder's own ceiling, which no bitrate can exceed;
  - the residual energy ||r_i||^2 / ||z||^2 after each quantizer (Algorithm 1), i.e. how much of
    z the first i codebooks still leave out.
When the rows reach the ceiling after a few codebooks, the finer codebooks carry information
(their residual energy keeps falling) that the decoder does not use: more bits cannot help until
the autoencoder is better trained.

    python benchmarks/soundstream_ceiling.py --ckpt runs/soundstream/model.pt [--utterances 16]

One thread; the test split of the demo corpus (or --data).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import soundstream as ss  # noqa: E402
from common.audio import load  # noqa: E402
from common.metrics import mel_distance, stoi  # noqa: E402


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/soundstream/model.pt")
    p.add_argument("--data", default="")
    p.add_argument("--utterances", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ss.SoundStream.load(args.ckpt).eval()
    files = [f for f, _ in ss.eval_utterances(args.data, args.utterances)]
    N_q = model.num_codebooks
    rows = {n_q: [] for n_q in range(1, N_q + 1)}
    rows["z"] = []
    energy = []  # (utterances, N_q + 1): ||r_i||^2 / ||z||^2, i = 0..N_q
    for f in files:
        wav = load(f, model.sample_rate, 1)[0]  # (1, T)
        z = model.encode_latent(wav[None], model.denoise_mode(False, 1, wav.device))  # (1, D, L)
        residual = z[0].t()  # (L, D)
        e = [1.0]
        for vq in model.quantizer.layers:  # Algorithm 1, by hand
            residual = residual - vq(residual)[1]
            e.append(float(residual.pow(2).sum() / z.pow(2).sum()))
        energy.append(e)
        outputs = {n_q: model.decode(model.encode(wav[None], n_q)) for n_q in range(1, N_q + 1)}
        outputs["z"] = model.decode_latent(z, None)
        for k, out in outputs.items():
            out = out[0, :, :wav.shape[-1]]
            rows[k].append((float(mel_distance(wav, out, model.sample_rate)),
                            stoi(wav, out, model.sample_rate)))
    print(f"{args.ckpt}: {len(files)} utterances")
    print(f"{'n_q':>4} {'mel':>7} {'STOI':>6} {'residual':>9}")
    for k, v in rows.items():
        mel, st = np.nanmean(np.array(v), axis=0)
        res = f"{np.mean([e[k] for e in energy]):9.4f}" if k != "z" else f"{'':>9}"
        label = "z" if k == "z" else str(k)
        print(f"{label:>4} {mel:7.3f} {st:6.3f} {res}")
    print("(z: the continuous latent, no quantizer; residual: ||r_{n_q+1}||^2 / ||z||^2)")


if __name__ == "__main__":
    main()
