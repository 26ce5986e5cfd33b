"""The evaluation tables of a shipped tokenizer's card (checkpoints/README.md): every held-out utterance of the
demo corpus, and the subset without the espeak-ng voices, for the ground truth and each number of codebooks; and
the learning curve, Whisper WER against training steps at the LM's number of codebooks.

    python benchmarks/tokenizer_card.py --file soundstream --ckpt checkpoints/soundstream_16k.pt \\
        [--curve 500=runs/tok/model_500.pt 1000=... ] [--n_q 8] [--metrics mel,pesq,stoi,visqol,wer,digit_wer,spk]

Per-utterance scores come from common/evaluation.py (one thread); each table row is their mean, NaN skipped
(digit WER: digit utterances only). Takes about 7 minutes per checkpoint for the tables, 1 per curve point.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import evaluation  # noqa: E402
from common.audio import load  # noqa: E402
from common.data import demo_manifest, read_manifest  # noqa: E402


def held_out():
    """(path, transcript, kind, is_espeak) of every test utterance of the demo corpus."""
    return [(Path(e["path"]), e["text"], e["kind"], e["engine"] == "espeak-ng")
            for e in read_manifest(demo_manifest(), "test")]


def reconstruct(model, wav, n_q):
    sent = model.encode(wav[None], n_q)
    return model.decode(sent)[0, :, :wav.shape[-1]]


@torch.no_grad()
def scores(model, utts, n_qs, metrics, truth=True):
    """{n_q or "truth": [per-utterance score dicts]}."""
    out = {}
    for n_q in (["truth"] if truth else []) + list(n_qs):
        rows = []
        for path, text, kind, _ in utts:
            wav = load(path, model.sample_rate, 1)[0]
            rec = wav if n_q == "truth" else reconstruct(model, wav, n_q)
            use = [m for m in metrics if m != "digit_wer" or kind == "digits"]
            rows.append(evaluation.score(wav, rec, model.sample_rate, use, text, name=path)[0])
        out[n_q] = rows
        print(f"  n_q {n_q}: done", file=sys.stderr, flush=True)
    return out


def table(model, per_utt, mask, metrics, title):
    columns = (("n_q", "n_q", ""), ("kbps", "kbps", ".2f"))
    print(f"{title}: {sum(mask)} utterances")
    print(evaluation.table_header(metrics, columns))
    for n_q, rows in per_utt.items():
        row = {"n_q": n_q, **evaluation.mean_scores([r for r, keep in zip(rows, mask) if keep]), "notes": 0}
        if n_q != "truth":
            row["kbps"] = model.bitrate(n_q) / 1000
        print(evaluation.table_row(row, metrics, columns))
    print(evaluation.table_legend(metrics))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", required=True, choices=["soundstream", "encodec"])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n_q", type=int, help="the LM's number of codebooks (curve; default: all)")
    p.add_argument("--curve", nargs="*", default=[], metavar="STEPS=CKPT")
    p.add_argument("--metrics", default="mel,pesq,stoi,visqol,wer,digit_wer,spk")
    args = p.parse_args()
    torch.set_num_threads(1)
    codec = importlib.import_module(args.file)
    cls = {"soundstream": "SoundStream", "encodec": "EnCodec"}[args.file]
    metrics = evaluation.check_available(evaluation.parse_metrics(args.metrics))
    utts = held_out()
    t0 = time.time()
    model = getattr(codec, cls).load(args.ckpt)
    n_qs = sorted({1, 2, 4, model.num_codebooks})
    per_utt = scores(model, utts, n_qs, metrics)
    table(model, per_utt, [True] * len(utts), metrics, f"{args.ckpt}, every held-out voice")
    table(model, per_utt, [not e for *_, e in utts], metrics, f"{args.ckpt}, without the espeak-ng voices")
    n_q = args.n_q or model.num_codebooks
    if args.curve:
        print(f"learning curve at {n_q} codebooks (WER over {len(utts)} utterances; ground truth "
              f"{evaluation.mean_scores(per_utt['truth'])['wer']:.1%})")
        print(f"{'steps':>7} {'WER':>7} {'STOI':>6}")
    for point in args.curve:
        steps, path = point.split("=", 1)
        m = getattr(codec, cls).load(path)
        rows = scores(m, utts, [n_q], ["wer", "stoi"], truth=False)[n_q]
        mean = evaluation.mean_scores(rows)
        print(f"{steps:>7} {mean['wer']:>7.1%} {mean['stoi']:>6.3f}", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
