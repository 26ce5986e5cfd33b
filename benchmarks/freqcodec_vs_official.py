"""freqcodec.py against FunCodec (PyPI `funcodec` 0.2.0) on identical weights, and the cost of each preset.

    python benchmarks/freqcodec_vs_official.py [--seconds 10] [--rounds 7]

1. Speed: the recipe's model (freqcodec_mag_phase_16k_n32_600k_step.yaml) built by FunCodec with random weights
   and loaded into ours (FreqCodec.from_official). Encode + decode of the same signal, one CPU thread, the two
   alternating round after round (so that a slow phase of the machine hits both); prints the median seconds per
   second of audio and the ratio official / ours (above 1: ours is faster). Also checks that the codes agree.
2. Size: parameters and FLOPs per second of audio (encode + decode, torch.utils.flop_counter: convolutions,
   matrix products and the LSTMs' products; one multiply-add = 2 FLOPs) of every preset.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import freqcodec  # noqa: E402


def flops_per_second(model, seconds=1.0):
    wav = 0.1 * torch.randn(1, 1, int(seconds * model.sample_rate))
    with FlopCounterMode(display=False) as counter:
        model.decode(model.encode(wav))
    return counter.get_total_flops() / seconds


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of the test signal")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (median)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from test_freqcodec import build_official, import_official, official_codec
    official = build_official(import_official())
    ours = freqcodec.FreqCodec.from_official(official.state_dict())
    wav = 0.1 * torch.randn(1, 1, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0))
    codes, _ = official_codec(official, wav)
    assert torch.equal(ours.encode(wav).codes, codes), "the codes differ: not the same computation"

    def theirs_once():
        official_codec(official, wav)

    def ours_once():
        ours.decode(ours.encode(wav))

    times = {"official": [], "ours": []}
    theirs_once(), ours_once()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("official", theirs_once), ("ours", ours_once)):
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / args.seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, 1 thread, {args.seconds:g} s of audio, {args.rounds} alternating rounds; "
          f"codes identical")
    print(f"encode + decode, s per s of audio: official {med['official']:.4f}, ours {med['ours']:.4f}; "
          f"official / ours = {med['official'] / med['ours']:.2f}")
    print(f"\n{'preset':<10} {'params':>10} {'GFLOPs/s':>9}  (encode + decode of 1 s, 16 kHz)")
    for name, (cfg, _) in freqcodec.PRESETS.items():
        model = freqcodec.FreqCodec(cfg).eval()
        for vq in model.quantizer.layers:
            vq.embed.normal_()
            vq.inited.fill_(1)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<10} {n:>10,} {flops_per_second(model) / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
