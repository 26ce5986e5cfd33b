"""The paper's multi-stream (parallel) pattern against audiocraft's delay pattern, trained alike.

    python audiogen.py --train --preset tiny                                   # runs/audiogen_tiny (delay)
    python audiogen.py --train --preset tiny --pattern parallel --out runs/audiogen_tiny_parallel
    python benchmarks/audiogen_patterns.py runs/audiogen_tiny/model.pt runs/audiogen_tiny_parallel/model.pt

For each model: the pattern's steps per 2 s clip, the held-out cross-entropy after the clip's own caption and
after none, attribute accuracy and the log-mel Frechet distance of clips generated at gamma 3 for the 127
held-out captions, and the time to generate 16 clips (KV cache, guidance, one thread).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import audiogen  # noqa: E402


def main(paths):
    torch.set_num_threads(1)
    entries = audiogen.captioned(None, "test")
    print(f"torch {torch.__version__}, 1 thread; {len(entries)} held-out captions of data/sounds")
    header = (f"{'pattern':<9}{'params':>11}{'steps':>7}{'CE own':>8}{'CE none':>9}{'count':>7}{'band':>7}"
              f"{'dir.':>7}{'noise':>7}{'speech':>7}{'all':>7}{'FD':>8}{'16 clips':>10}")
    lines = [header]
    print(header)
    for path in paths:
        model = audiogen.AudioGen.load(path)
        lm = model.lm
        frames = audiogen.frames_for(lm.cfg, model.codec)
        ce = audiogen.heldout_ce(model, entries)
        row = audiogen.evaluate(model, entries, scales=(3.0,), seed=0)[-1]
        t = time.perf_counter()
        model.lm.generate(lm.text_ids([e["caption"] for e in entries[:16]]), frames, 3.0,
                          generator=torch.Generator().manual_seed(0))
        dt = time.perf_counter() - t
        n = sum(p.numel() for p in lm.parameters())
        lines.append(f"{lm.cfg.pattern:<9}{n:>11,}{lm.pattern.steps(frames):>7}{ce['own'][0]:>8.3f}"
                     f"{ce['none'][0]:>9.3f}" + "".join(f"{100 * row[k]:>7.1f}" for k in
                                                         ("count", "band", "direction", "noise", "speech", "all"))
                     + f"{row['FD logmel']:>8.1f}{dt:>9.2f}s")
        print(lines[-1], flush=True)
    print("CE: nats per code, mean over the 4 codebooks; accuracy (%) and FD (log-mel Frechet distance to the "
          "real clips) of one clip per caption at gamma 3, top-k 250")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/audiogen_tiny/model.pt", "runs/audiogen_tiny_parallel/model.pt"])
