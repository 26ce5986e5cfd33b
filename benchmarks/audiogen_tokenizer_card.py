"""The sound tokenizer's card (checkpoints/README.md): what its resynthesis keeps of data/sounds' held-out clips.

    python benchmarks/audiogen_tokenizer_card.py [checkpoints/encodec_sounds_16khz_4x256.pt]

For 1, 2 and 4 codebooks: the attribute accuracy of the resynthesis (audiogen.py's analysers against the
captions; the real clips' own accuracy is the first row), the mel distance (common/metrics.py) and the log-mel
Frechet distance to the real clips, on the 127 test clips.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import audiogen  # noqa: E402
from common.evaluation import frechet_distance  # noqa: E402
from common.metrics import mel_distance  # noqa: E402

KEYS = ("count", "band", "direction", "noise", "speech", "all")


def main(path):
    torch.set_num_threads(1)
    codec = audiogen.load_codec(path)[0]
    cfg = audiogen.PRESETS["tiny"][0]
    entries = audiogen.captioned(None, "test")
    real = torch.stack([audiogen.read_clip(e["path"], cfg, codec) for e in entries])
    events = [e["events"] for e in entries]
    n = sum(p.numel() for p in codec.parameters())
    print(f"{path}: {n:,} parameters, {codec.num_codebooks} x {codec.codebook_size} at {codec.frame_rate:g} Hz; "
          f"{len(entries)} test clips of data/sounds")
    print(f"{'n_q':>5}{'kbps':>6}" + "".join(f"{k:>10}" for k in KEYS) + f"{'mel':>8}{'FD':>8}")
    acc = audiogen.attribute_accuracy(list(real), codec.sample_rate, events)
    print(f"{'real':>5}{'-':>6}" + "".join(f"{100 * acc[k]:>10.1f}" for k in KEYS) + f"{0:>8.3f}{0:>8.2f}")
    codes = audiogen.encode_clips(codec, real)
    for n_q in (1, 2, 4):
        rec = codec.decode(codes[:, :n_q])[:, 0, :real.shape[-1]]
        acc = audiogen.attribute_accuracy(list(rec), codec.sample_rate, events)
        mel = sum(float(mel_distance(a, b, codec.sample_rate)) for a, b in zip(real, rec)) / len(real)
        fd = frechet_distance(list(real.numpy()), list(rec.numpy()), codec.sample_rate, features="logmel")
        print(f"{n_q:>5}{codec.frame_rate * n_q * 8 / 1000:>6.1f}" + "".join(f"{100 * acc[k]:>10.1f}" for k in KEYS)
              + f"{mel:>8.3f}{fd:>8.2f}", flush=True)
    print("accuracy (%) of audiogen.py's analysers against the captions; mel: common.metrics.mel_distance; "
          "FD: log-mel Frechet distance to the real clips")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/encodec_sounds_16khz_4x256.pt")
