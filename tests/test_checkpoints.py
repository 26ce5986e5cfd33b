"""The shipped tokenizers in checkpoints/ (issue 14): each loads with weights_only, matches the sha256 of its card
(checkpoints/README.md), and still reconstructs held-out speech that Whisper understands as well as the card says.
A change to a codec file that silently breaks the shipped weights fails here."""

import hashlib
import importlib
import re
from pathlib import Path

import pytest
import torch

from common import evaluation
from common.audio import load
from common.data import demo_manifest, read_manifest

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "checkpoints" / "README.md"
# how far the figures may move (threads, BLAS) before this fails: WER by 10 points, mel and STOI by 0.02.
# WER alone would not do: a codec that outputs silence scores 100 %, below the shipped EnCodec's figure.
MARGINS = {"wer": 0.10, "mel": 0.02, "stoi": -0.02}


def shipped():
    """(file, checkpoint path, sha256, n_q, {metric: card figure}) of each card section's machine-read lines."""
    text = CARD.read_text()
    out = []
    for m in re.finditer(r"^- file: `(\w+)\.py`, checkpoint: `(checkpoints/[\w.]+\.pt)`\n"
                         r"- sha256: `([0-9a-f]{64})`\n"
                         r"- test check at (\d+) codebooks: WER ([\d.]+) %, mel ([\d.]+), STOI ([\d.]+)", text, re.M):
        out.append((m[1], ROOT / m[2], m[3], int(m[4]),
                    {"wer": float(m[5]) / 100, "mel": float(m[6]), "stoi": float(m[7])}))
    return out


def check_utterances():
    """The held-out sentences of the non-espeak voices, the first of each voice: what the card's test
    check line was measured on."""
    seen, out = set(), []
    for e in read_manifest(demo_manifest(), "test"):
        if e["engine"] != "espeak-ng" and e["kind"] == "sentence" and e["speaker"] not in seen:
            seen.add(e["speaker"])
            out.append((Path(e["path"]), e["text"]))
    return out


def test_the_card_lists_both_tokenizers_within_25_mb():
    entries = shipped()
    assert sorted(f for f, *_ in entries) == ["encodec", "soundstream"]
    lms = ("valle_tiny.pt", "audiolm_tiny.pt", "audiogen_tiny.pt")
    sounds = "encodec_sounds_16khz_4x256.pt"  # issue 17's sound tokenizer: its card, tests/test_audiogen.py
    tokenizers = [p for p in (ROOT / "checkpoints").iterdir() if p.name not in lms + (sounds,)]
    assert sum(p.stat().st_size for p in tokenizers) < 25 * 2 ** 20
    # the tiny VALL-E, AudioLM and AudioGen (issues 15-17; their own card sections, checked by their test files)
    # on top: 10 MB at most each; the sound tokenizer 16 MB
    for name in lms:
        assert (ROOT / "checkpoints" / name).stat().st_size < 10 * 2 ** 20
    assert (ROOT / "checkpoints" / sounds).stat().st_size < 16 * 2 ** 20


@pytest.mark.parametrize("entry", shipped(), ids=lambda e: e[0])
def test_shipped_checkpoint_loads_matches_its_card_and_is_intelligible(entry):
    name, path, sha, n_q, card = entry
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    torch.load(path, weights_only=True)  # data, never code
    codec = importlib.import_module(name)
    model = getattr(codec, {"soundstream": "SoundStream", "encodec": "EnCodec"}[name]).load(path)
    assert model.sample_rate == 16000 and model.frame_rate == 50 and model.num_codebooks >= n_q
    if "wer" not in evaluation.available_metrics():
        pytest.skip("faster-whisper is not installed (requirements-eval.txt)")
    torch.set_num_threads(1)
    scores = []
    for f, text in check_utterances():
        wav = load(f, 16000, 1)[0]
        with torch.no_grad():
            rec = model.decode(model.encode(wav[None], n_q))[0, :, :wav.shape[-1]]
        scores.append(evaluation.score(wav, rec, 16000, list(card), text)[0])
    mean = evaluation.mean_scores(scores)
    for k, margin in MARGINS.items():  # lower is better for WER and mel, higher for STOI
        assert (mean[k] - card[k] - margin) * (1 if margin > 0 else -1) <= 0, (k, mean[k], card[k])
