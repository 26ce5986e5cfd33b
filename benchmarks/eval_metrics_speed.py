"""Cost of each evaluation metric (common/evaluation.py) on one CPU thread, and the demo corpus's reference numbers.

    python benchmarks/eval_metrics_speed.py                 # per-metric speed
    python benchmarks/eval_metrics_speed.py --reference     # + ground-truth WERs, speaker separation, sanity table
    (results of the last run: benchmarks/results/eval_metrics.txt)

Speed: seconds per second of audio for each metric, measured on `--clips` demo sentences after a first call
that is reported apart (model loading and warm-up). Per-pair metrics are timed on (reference, mu-law copy)
pairs; the Frechet distance on the set of clips against their mu-law copies.

Reference (`--reference`), every number measured on the ground-truth audio of data/demo:
- Whisper-base WER and the pocketsphinx digit-grammar WER per voice group (espeak-ng formant voices vs the
  others) and utterance kind (sentences / digit strings): errors / words over the group, and the mean of the
  per-utterance WERs (what the evaluation table averages);
- speaker similarity: the cosine of resemblyzer embeddings for pairs of utterances of the same voice and of
  different voices (mean +- std), the equal error rate of thresholding it;
- the sanity table: each metric on clean / mu-law 8 bit / white noise at 5 dB, averaged over `--sanity`
  sentences (one per non-espeak voice; digit WER on as many digit utterances).
Every later WER or similarity is to be read against these. Runs on one thread; ~10 minutes with all 397
utterances (`--limit N` keeps N per voice and kind).
"""

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import evaluation as E  # noqa: E402
from common.audio import load  # noqa: E402
from common.data import demo_manifest, read_manifest  # noqa: E402

SR = 16000  # the demo corpus rate


def corpus(limit=None):
    """Manifest entries of the demo corpus, with "wav" (1, T) loaded; at most `limit` per voice and kind."""
    per_voice = defaultdict(int)
    entries = []
    for e in read_manifest(demo_manifest()):
        if limit is None or per_voice[e["speaker"], e["kind"]] < limit:
            per_voice[e["speaker"], e["kind"]] += 1
            entries.append({**e, "wav": load(e["path"])[0]})
    return entries


def group(e):
    return "espeak-ng" if e["engine"] == "espeak-ng" else "other voices"


def speed(entries, n_clips):
    sentences = [e for e in entries if e["kind"] == "sentence" and e["engine"] != "espeak-ng"][:n_clips]
    digits = [e for e in entries if e["kind"] == "digits" and e["engine"] != "espeak-ng"][:n_clips]
    print(f"speed on one thread: {len(sentences)} sentences ({sum(e['wav'].shape[-1] for e in sentences) / SR:.1f} s),"
          f" pairs clean vs mu-law; digit_wer on {len(digits)} digit utterances")
    print(f"{'metric':<14} {'first call s':>12} {'s per s audio':>14} {'s per clip':>11}")
    for name in (m for m in E.METRICS if m in E.available_metrics()):
        metric = E.METRICS[name]
        clips = digits if name == "digit_wer" else sentences
        if not clips:
            continue
        if metric.per_pair:
            calls = [(e["text"] if metric.needs_transcript else e["wav"], E.mu_law(e["wav"]), SR) for e in clips]
        else:  # the Frechet distance: one call on the whole set
            calls = [([e["wav"] for e in clips], [E.mu_law(e["wav"]) for e in clips], SR)]
        t = time.perf_counter()
        metric.fn(*calls[0]) if metric.per_pair else metric.fn([clips[0]["wav"]], [clips[0]["wav"]], SR)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        for args in calls:
            metric.fn(*args)
        total = time.perf_counter() - t
        seconds = sum(e["wav"].shape[-1] for e in clips) / SR
        print(f"{name:<14} {warm:>12.2f} {total / seconds:>14.3f} {total / len(clips):>11.2f}", flush=True)
    print("(first call: includes loading the model and warm-up; s per s counts seconds of the estimate)\n")


def reference_wers(entries):
    print("ground-truth WER (normalised: lowercase, no punctuation, digits as words)")
    print(f"{'ASR':<26} {'group':<13} {'kind':<9} {'utts':>5} {'words':>6} {'WER':>7} {'mean utt WER':>13}")
    rows = []
    digits = [e for e in entries if e["kind"] == "digits"]
    for asr, fn, subset in (("Whisper-base (faster-wh.)", E.transcribe, entries),
                            ("pocketsphinx digit JSGF", None, digits)):
        stats = defaultdict(lambda: [0, 0, []])  # (group, kind) -> errors, words, per-utterance WERs
        t = time.perf_counter()
        for e in subset:
            ref = E.normalize_transcript(e["text"])
            if fn is None:
                w = E.digit_wer(e["text"], e["wav"], SR)
                errors = round(w * len(ref.split()))
            else:
                errors = sum(E.word_errors(ref, E.normalize_transcript(fn(e["wav"], SR))))
            for key in ((group(e), e["kind"]), ("all", e["kind"])):
                s = stats[key]
                s[0] += errors
                s[1] += len(ref.split())
                s[2].append(errors / len(ref.split()))
        elapsed = time.perf_counter() - t
        for (g, kind), (errors, words, per) in sorted(stats.items(), key=lambda kv: (kv[0][1], kv[0][0] == "all", kv[0][0])):
            print(f"{asr:<26} {g:<13} {kind:<9} {len(per):>5} {words:>6} {errors / words:>7.1%} {np.mean(per):>13.1%}")
        print(f"  ({len(subset)} utterances in {elapsed:.0f} s)", flush=True)
        rows.append(stats)
    print()


def speaker_separation(entries):
    t = time.perf_counter()
    emb = np.stack([E.speaker_embedding(e["wav"], SR) for e in entries])  # (N, 256), unit norm
    speakers = np.array([e["speaker"] for e in entries])
    cos = emb @ emb.T  # (N, N)
    same_mask = speakers[:, None] == speakers[None, :]
    upper = np.triu(np.ones_like(cos, dtype=bool), k=1)
    same, diff = cos[same_mask & upper], cos[~same_mask & upper]
    thresholds = np.linspace(-1, 1, 2001)
    far = np.array([(diff >= th).mean() for th in thresholds])  # false accepts
    frr = np.array([(same < th).mean() for th in thresholds])  # false rejects
    i = np.argmin(np.abs(far - frr))
    centroids = {s: emb[speakers == s].mean(0) for s in np.unique(speakers)}
    names = list(centroids)
    cmat = np.stack([centroids[s] / np.linalg.norm(centroids[s]) for s in names])
    ident = np.mean([names[int(np.argmax(cmat @ x))] == s for x, s in zip(emb, speakers)])
    print(f"speaker similarity (resemblyzer cosine), {len(entries)} utterances of {len(names)} voices, "
          f"{time.perf_counter() - t:.0f} s")
    print(f"  same voice       {same.mean():.3f} +- {same.std():.3f}  ({len(same)} pairs)")
    print(f"  different voices {diff.mean():.3f} +- {diff.std():.3f}  ({len(diff)} pairs)")
    print(f"  EER {(far[i] + frr[i]) / 2:.1%} at threshold {thresholds[i]:.2f}; voice identification by nearest "
          f"centroid (centroids include the utterance) {ident:.1%}\n", flush=True)


def sanity(entries, n):
    voices = [s for s in dict.fromkeys(e["speaker"] for e in entries if e["engine"] != "espeak-ng")][:n]
    sentences = [next(e for e in entries if e["speaker"] == s and e["kind"] == "sentence") for s in voices]
    digits = [next(e for e in entries if e["speaker"] == s and e["kind"] == "digits") for s in voices
              if any(e["speaker"] == s and e["kind"] == "digits" for e in entries)]
    conditions = {"clean": lambda w: w, "mu-law 8 bit": E.mu_law, "noise 5 dB": lambda w: E.add_noise(w, 5.0)}
    pair_metrics = [m for m in E.METRICS if m in E.available_metrics() and E.METRICS[m].per_pair]
    t = time.perf_counter()
    print(f"sanity table: mean over {len(sentences)} sentences (one per non-espeak voice; dWER over "
          f"{len(digits)} digit utterances); ViSQOL-poly = speech mode with the old polynomial mapping")
    rows = []
    for cond, degrade in conditions.items():
        scores, notes = [], 0
        for e in sentences:
            s, n = E.score(e["wav"], degrade(e["wav"]), SR, [m for m in pair_metrics if m != "digit_wer"],
                           transcript=e["text"], name=e["audio"])
            scores.append(s)
            notes += len(n)
        row = E.mean_scores(scores)
        if "digit_wer" in pair_metrics:
            row["digit_wer"] = float(np.mean([E.digit_wer(e["text"], degrade(e["wav"]), SR) for e in digits]))
        if "visqol" in pair_metrics:
            row["visqol_poly"] = float(np.mean([_visqol_poly(e["wav"], degrade(e["wav"])) for e in sentences]))
        for feats in ("logmel", "whisper"):
            if feats == "logmel" or "fd" in E.available_metrics():
                row[f"fd_{feats}"] = E.frechet_distance([e["wav"] for e in sentences],
                                                        [degrade(e["wav"]) for e in sentences], SR, features=feats)
        rows.append({"condition": cond, **row, "notes": notes})
    print(E.format_table(rows, pair_metrics, columns=(("condition", f"{'condition':<12}", "<12"),)))
    extra = [(k, h) for k, h in (("visqol_poly", "ViSQOL-poly"), ("fd_logmel", "FD log-mel"), ("fd_whisper", "FD Whisper"))
             if k in rows[0]]
    print(f"{'condition':<12} " + " ".join(f"{h:>11}" for _, h in extra) + f"   (FD: the {len(sentences)} clips as one set)")
    for row in rows:
        print(f"{row['condition']:<12} " + " ".join(f"{row[k]:>11.2f}" for k, _ in extra))
    print(f"  ({time.perf_counter() - t:.0f} s)\n", flush=True)


@__import__("functools").cache
def _poly_api():
    from visqol.api import VisqolApi
    api = VisqolApi()
    api.create(mode="speech", use_lattice_model=False)
    return api


def _visqol_poly(reference, estimate):
    ref, est = (x[0].double().numpy() for x in (reference, estimate))
    return float(_poly_api().measure_from_arrays(ref, est, SR).moslqo)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", action="store_true", help="also the ground-truth numbers and the sanity table")
    p.add_argument("--clips", type=int, default=6, help="sentences timed per metric")
    p.add_argument("--sanity", type=int, default=8, help="utterances (voices) in the sanity table")
    p.add_argument("--limit", type=int, default=None, help="at most N utterances per voice and kind (subsample)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"common/evaluation.py metrics; available: {', '.join(E.available_metrics())}")
    print(f"torch {torch.__version__}, 1 thread; {time.strftime('%Y-%m-%d')}\n")
    entries = corpus(args.limit)
    if args.limit:
        print(f"SUBSAMPLED: at most {args.limit} utterances per voice and kind ({len(entries)} of the corpus)\n")
    speed(entries, args.clips)
    if args.reference:
        sanity(entries, args.sanity)
        if "spk" in E.available_metrics():
            speaker_separation(entries)
        if "wer" in E.available_metrics():
            reference_wers(entries)


if __name__ == "__main__":
    main()
