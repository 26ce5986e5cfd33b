"""encodec.py against Meta's `encodec` 0.1.1 on identical weights: single-thread CPU seconds per second
of audio to encode (waveform -> codes) and to decode (codes -> waveform), for the released 24 kHz and
48 kHz architectures (random weights; speed does not depend on them), and where our time goes.

    python benchmarks/encodec_vs_official.py [--seconds 10] [--repeats 5] [--bandwidth 6]

Both models run in one process, alternately, on the same input; the codes are checked equal first.
Ratio = official / ours (above 1: ours is faster). Needs `pip install --no-deps encodec==0.1.1 einops`.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import encodec as ours  # noqa: E402
from test_encodec import import_official, official_model  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from codec_speed import median_time  # noqa: E402


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth", type=float, default=6.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    official = import_official()
    print(f"torch {torch.__version__}, 1 thread, {args.seconds:g} s of audio, {args.bandwidth:g} kbps, "
          f"median of {args.repeats}; seconds per second of audio (lower is faster)")
    print(f"{'model':<8} {'step':<7} {'official':>9} {'ours':>9} {'ratio':>7}")
    for name in ("24khz", "48khz"):
        ref = official_model(official, name)
        ref.set_target_bandwidth(args.bandwidth)
        model = ours.EnCodec.from_official(ref.state_dict())
        torch.manual_seed(0)
        x = 0.1 * torch.randn(1, model.channels, int(args.seconds * model.sample_rate))
        frames = ref.encode(x)
        sent = model.encode(x, bandwidth=args.bandwidth)
        assert torch.equal(sent.codes, torch.cat([c for c, _ in frames], dim=-1)), "codes differ"
        rows = [("encode", lambda: ref.encode(x), lambda: model.encode(x, bandwidth=args.bandwidth)),
                ("decode", lambda: ref.decode(frames), lambda: model.decode(sent))]
        for step, theirs, mine in rows:
            t_ref = median_time(theirs, args.repeats) / args.seconds
            t_ours = median_time(mine, args.repeats) / args.seconds
            print(f"{name:<8} {step:<7} {t_ref:>9.4f} {t_ours:>9.4f} {t_ref / t_ours:>7.2f}", flush=True)
    # where our time goes: weight norm recomputed per call, or cached for the call; the LSTMs (the
    # same nn.LSTM in both: a memory-bound recurrence, 2 x 4 MB of weights read per frame)
    ref = official_model(official, "24khz")
    model = ours.EnCodec.from_official(ref.state_dict())
    x = 0.1 * torch.randn(1, 1, int(args.seconds * 24000))
    n_q = model.n_q_for_bandwidth(args.bandwidth)
    parts = {
        "encoder (weight norm per call)": lambda: model.encoder(x),
        "encoder (weight norm cached)": lambda: cached(lambda: model.encoder(x)),
        "quantizer encode": lambda: model.quantizer.encode(z, n_q),
        "decoder (weight norm cached)": lambda: cached(lambda: model.decoder(z)),
        "the two LSTMs (encoder + decoder)": lambda: (model.encoder.model[13](h), model.decoder.model[1](h)),
    }
    z = model.encoder(x)
    h = torch.randn(1, 512, z.shape[-1])  # what the LSTMs see: 512 channels at 75 Hz
    print("24khz, ours, seconds per second of audio:")
    for label, fn in parts.items():
        print(f"  {label:<32} {median_time(fn, args.repeats) / args.seconds:.4f}")
    compress_speed(official, min(args.seconds, 2.0), max(1, args.repeats // 2), args.bandwidth)


def compress_speed(official, seconds, repeats, bandwidth):
    """.ecdc compress / decompress with the entropy-coding LM (§3.3), 24 kHz, same bytes."""
    import importlib
    compress_mod = importlib.import_module("official_encodec.compress")
    model_mod = importlib.import_module("official_encodec.model")
    ref = official_model(official, "24khz")
    ref.name = "encodec_24khz"
    ref.set_target_bandwidth(bandwidth)
    torch.manual_seed(2)
    ref_lm = model_mod.LMModel(32, 1024, num_layers=5, dim=200, past_context=int(3.5 * 75)).eval()
    ref.get_lm_model = lambda: ref_lm
    compress_mod.MODELS = {ref.name: lambda: ref}
    model = ours.EnCodec.from_official(ref.state_dict())
    lm = ours.EntropyLM.from_official(ref_lm.state_dict(), model)
    wav = 0.1 * torch.randn(1, int(seconds * 24000))
    data = compress_mod.compress(ref, wav, use_lm=True)
    assert ours.compress(model, wav, bandwidth, lm) == data, "bytes differ"
    rows = [("compress", lambda: compress_mod.compress(ref, wav, use_lm=True),
             lambda: ours.compress(model, wav, bandwidth, lm)),
            ("decompress", lambda: compress_mod.decompress(data), lambda: ours.decompress(data, model, lm))]
    print(f".ecdc with the LM, 24khz, {seconds:g} s, {8 * len(data) / seconds / 1000:.2f} kbps coded "
          f"of {bandwidth:g} nominal (random LM: no saving expected)")
    for step, theirs, mine in rows:
        t_ref = median_time(theirs, repeats) / seconds
        t_ours = median_time(mine, repeats) / seconds
        print(f"24khz    {step:<10} {t_ref:>9.4f} {t_ours:>9.4f} {t_ref / t_ours:>7.2f}", flush=True)


def cached(fn):
    with torch.nn.utils.parametrize.cached():
        return fn()


if __name__ == "__main__":
    main()
