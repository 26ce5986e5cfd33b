"""bigcodec.py against the official modules (PyPI `bigcodec` 0.0.3, a copy of the official vq/ code) on
identical weights: single-thread CPU seconds per second of audio to encode (waveform -> codes) and to decode
(codes -> waveform) with the released 159M architecture (random weights; speed does not depend on them),
and where the time goes.

    python benchmarks/bigcodec_vs_official.py [--seconds 4] [--repeats 5]

Both models run in one process, alternately, on the same input; the codes are checked equal first.
Ratio = official / ours (above 1: ours is faster). The breakdown times each kind of module on the inputs it
saw in one encode + decode: the anti-aliased activations, the LSTMs, and everything else (the convolutions,
the quantizer). Needs `pip install --no-deps bigcodec==0.0.3` (requirements-test-nodeps.txt).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import bigcodec as ours  # noqa: E402
from test_bigcodec import import_official, official_modules, old_style  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from codec_speed import median_time  # noqa: E402


def parts(modules, run, repeats, seconds):
    """Seconds per second of audio spent in each kind of module (Activation1d, ResLSTM), timed on the
    inputs that `run()` fed them, and the total of `run()`."""
    seen = {"Activation1d": [], "ResLSTM": []}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=type(m).__name__: seen[k].append((m, a[0])))
             for root in modules for m in root.modules() if type(m).__name__ in seen]
    run()
    for h in hooks:
        h.remove()
    out = {k: median_time(lambda v=v: [m(x) for m, x in v], repeats) / seconds for k, v in seen.items()}
    out["total"] = median_time(run, repeats) / seconds
    out["rest"] = out["total"] - out["Activation1d"] - out["ResLSTM"]
    return out


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    official = import_official()
    enc, dec = official_modules(official, full=True)
    model = ours.BigCodec.from_official({"CodecEnc": old_style(enc.state_dict()),
                                         "generator": old_style(dec.state_dict())})
    print(f"torch {torch.__version__}, 1 thread, {args.seconds:g} s of audio, released architecture "
          f"({sum(p.numel() for p in model.parameters()):,} parameters), median of {args.repeats}; "
          f"seconds per second of audio (lower is faster)")
    x = 0.1 * torch.randn(1, 1, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, codes_ref, _ = dec(enc(x), vq=True)
    codes = model.encode(x)
    assert torch.equal(codes, codes_ref.permute(1, 0, 2)), "codes differ"

    def ref_encode():
        return dec(enc(x), vq=True)[1]

    def ref_decode():  # from the codes, as the official vq2emb + model
        return dec(dec.vq2emb(codes_ref.permute(1, 2, 0)).transpose(1, 2), vq=False)

    print(f"{'step':<8} {'official':>9} {'ours':>9} {'ratio':>7}")
    total = {}
    for step, theirs, mine in [("encode", ref_encode, lambda: model.encode(x)),
                               ("decode", ref_decode, lambda: model.decode(codes))]:
        t_ref = median_time(theirs, args.repeats) / args.seconds
        t_ours = median_time(mine, args.repeats) / args.seconds
        total[step] = (t_ref, t_ours)
        print(f"{step:<8} {t_ref:>9.4f} {t_ours:>9.4f} {t_ref / t_ours:>7.2f}", flush=True)
    t_ref, t_ours = (sum(v[i] for v in total.values()) for i in (0, 1))
    print(f"{'both':<8} {t_ref:>9.4f} {t_ours:>9.4f} {t_ref / t_ours:>7.2f}")
    print("where the time goes (encode + decode), seconds per second of audio:")
    mine = parts([model], lambda: model.decode(model.encode(x)), args.repeats, args.seconds)
    theirs = parts([enc, dec], lambda: (ref_encode(), ref_decode()), args.repeats, args.seconds)
    print(f"  {'part':<34} {'official':>9} {'ours':>9}")
    names = {"Activation1d": "anti-aliased activations (72)", "ResLSTM": "LSTMs (2 x 2 layers)",
             "rest": "convolutions, quantizer, the rest", "total": "total"}
    for k, label in names.items():
        print(f"  {label:<34} {theirs[k]:>9.4f} {mine[k]:>9.4f}")


if __name__ == "__main__":
    main()
