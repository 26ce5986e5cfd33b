"""Quality and speed of common.audio.resample, the figures the README and tests/test_common.py refer to.

    python benchmarks/resample_quality.py

For every pair of 16, 22.05, 24, 44.1 and 48 kHz: a full-scale 1 kHz sine (1 s) is resampled and compared with
the ideal sine at the new rate, away from the first and last 50 ms (where the filter sees the zero padding):
amplitude change and error power, both in dB. Then the attenuation of tones above the new Nyquist frequency
going 48 kHz -> 16 kHz (they would alias into the band), and the time to resample 10 s of 44.1 kHz audio to
16 kHz on one thread. Time axes are built in float64: a float32 phase at t ~ 1 s is itself noisy at about -55 dB.
"""

import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.audio import resample  # noqa: E402

RATES = (16000, 22050, 24000, 44100, 48000)


def sine(freq, rate, n):
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / rate)  # (n,)


def main():
    torch.set_num_threads(1)
    print(f"{'from':>6} {'to':>6} {'amplitude dB':>13} {'error dB':>9}")
    worst_amp, worst_err = 0.0, -math.inf
    for a, b in itertools.permutations(RATES, 2):
        y = resample(sine(1000.0, a, a), a, b)
        ideal = sine(1000.0, b, y.shape[-1])
        cut = int(0.05 * b)
        y, ideal = y[cut:-cut], ideal[cut:-cut]
        amp = 10 * math.log10(y.pow(2).mean() / ideal.pow(2).mean())
        err = 10 * math.log10((y - ideal).pow(2).mean() / ideal.pow(2).mean())
        worst_amp, worst_err = max(worst_amp, abs(amp)), max(worst_err, err)
        print(f"{a:>6} {b:>6} {amp:>+13.5f} {err:>9.1f}")
    print(f"worst: |amplitude| {worst_amp:.5f} dB, error {worst_err:.1f} dB (bar: 0.1 dB and -60 dB)")
    for freq in (8500.0, 10000.0, 15000.0):
        y = resample(sine(freq, 48000, 48000), 48000, 16000)[800:-800]
        print(f"{freq:>7.0f} Hz, 48 kHz -> 16 kHz: {10 * math.log10(y.pow(2).mean() / 0.5):.1f} dB (bar: -60 dB)")
    x = torch.randn(441000)  # 10 s at 44.1 kHz
    resample(x[:1000], 44100, 16000)  # build and cache the filter
    times = []
    for _ in range(5):
        t = time.perf_counter()
        resample(x, 44100, 16000)
        times.append(time.perf_counter() - t)
    print(f"10 s of 44.1 kHz -> 16 kHz: {1000 * sorted(times)[2]:.1f} ms (median of 5, one thread)")


if __name__ == "__main__":
    main()
