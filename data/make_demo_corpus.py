"""Regenerate the demo speech corpus in data/demo/ from Debian's offline TTS engines.

    python data/make_demo_corpus.py [--out data/demo]

About 22 minutes of English speech from 16 voices (flite, festival, RHVoice, SVOX pico and
espeak-ng), 16 kHz mono 16-bit FLAC, with text, espeak-ng IPA phonemes, speaker ids and
train/valid/test splits in manifest.jsonl. The corpus is committed to the repository, so
nobody needs the engines except to rebuild it. Sentences come from the `fortunes` package,
and ~15 % of each voice's utterances are digit strings ("three one four one") for later
language-model tests. Everything is seeded: with the same package versions, the output
is the same. See data/README.md for licences, voices and what this corpus is not.
"""
import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

SEED = 1234
SAMPLE_RATE = 16000
TARGET_SECONDS = 82.0     # per voice: 16 voices x 82 s = ~22 min, which keeps data/demo under 25 MB
DIGIT_FRACTION = 0.15     # share of each voice's utterances that are digit strings
CHUNK = 8                 # utterances synthesised per engine batch
WORKERS = 2               # the reference machine has 2 cores
SENTENCES_PER_VOICE = 150  # disjoint slice of the shuffled sentence list each voice draws from

# (engine, voice, sex, accent, synthesis type, underlying human speaker). Only voices whose
# licence allows redistributing generated audio (see data/README.md). No MBROLA voices (non-free
# databases), no RHVoice evgeniy-eng / lyubov (CC BY-NC-ND), no festival rab/don (they need the
# non-commercial OALD lexicon), no flite awb_time (limited domain: it only reads the time).
VOICES = [
    ("flite", "kal16", "M", "US", "diphone", "kal (CMU)"),
    ("flite", "awb", "M", "Scottish", "clustergen", "awb (CMU ARCTIC)"),
    ("flite", "rms", "M", "US", "clustergen", "rms (CMU ARCTIC)"),
    ("flite", "slt", "F", "US", "clustergen", "slt (CMU ARCTIC)"),
    ("festival", "ked_diphone", "M", "US", "diphone", "ked (CMU)"),
    ("rhvoice", "alan", "M", "Scottish", "HTS", "awb (CMU ARCTIC)"),
    ("rhvoice", "bdl", "M", "US", "HTS", "bdl (CMU ARCTIC)"),
    ("rhvoice", "clb", "F", "US", "HTS", "clb (CMU ARCTIC)"),
    ("rhvoice", "slt", "F", "US", "HTS", "slt (CMU ARCTIC)"),
    ("pico", "en-US", "F", "US", "HMM", "SVOX lh0"),
    ("pico", "en-GB", "F", "British", "HMM", "SVOX kh0"),
    ("espeak-ng", "en-us", "M", "US", "formant", "none (synthetic)"),
    ("espeak-ng", "en-us+f3", "F", "US", "formant", "none (synthetic)"),
    ("espeak-ng", "en-gb-scotland+m3", "M", "Scottish", "formant", "none (synthetic)"),
    ("espeak-ng", "en-029+m1", "M", "Caribbean", "formant", "none (synthetic)"),
    ("espeak-ng", "en-gb-x-rp+f4", "F", "British RP", "formant", "none (synthetic)"),
]
# Held out of train entirely (zero-shot speaker tests): one male, one female, whose human
# speakers appear in no other voice (rhvoice-alan is NOT a good choice: it is awb, as flite-awb).
HELD_OUT = {"festival-ked_diphone", "pico-en-GB"}

FORTUNE_DIR = Path("/usr/share/games/fortunes")
CATEGORIES = ["education", "food", "fortunes", "literature", "people",
              "pets", "platitudes", "science", "wisdom", "work"]   # inoffensive files only
DICTIONARY = Path("/usr/share/dict/american-english")              # wamerican: "is it English?"
# Fortune files are old Usenet humour: drop sentences touching sex, drugs, violence, religion,
# gender jokes or profanity, even inside the inoffensive categories.
BLOCKLIST = set("""sex sexy sexual kiss kissed kissing naked nude virgin lover lovers breast breasts
    drunk drunken drug drugs beer whiskey booze liquor marijuana cocaine kill killed killing kills
    murder murdered rape gun guns suicide bomb war god gods jesus christ church bible pray prayer
    religion satan devil hell damn damned bastard bitch ass crap shit fuck stupid idiot fat ugly
    woman women girl girls wife wives husband blonde racist nazi slave slaves""".split())
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()

PACKAGES_MAIN = "espeak-ng flite festival festvox-kdlpc16k sox fortunes fortunes-min wamerican"
PACKAGES_NONFREE = "rhvoice rhvoice-english libttspico-utils"
INSTALL_HELP = f"""Install the engines (Debian 12) as root:
  apt-get update && apt-get install -y {PACKAGES_MAIN}
  # RHVoice and pico live in contrib/non-free, which are not enabled by default:
  sed -i '0,/^Components: main$/s//Components: main contrib non-free/' /etc/apt/sources.list.d/debian.sources
  apt-get update && apt-get install -y {PACKAGES_NONFREE}"""


def speaker_id(engine, voice):
    """flite-slt, espeak-en-us_f3: filesystem-safe, '+' becomes '_'."""
    return f"{'espeak' if engine == 'espeak-ng' else engine}-{voice.replace('+', '_')}"


def check_tools():
    """Fail early, with the apt commands, if an engine, voice or text source is missing."""
    needed = ["espeak-ng", "flite", "festival", "RHVoice-test", "pico2wave", "sox", "dpkg-query"]
    missing = [t for t in needed if shutil.which(t) is None]
    files = [FORTUNE_DIR / c for c in CATEGORIES] + [DICTIONARY,
             Path("/usr/share/festival/voices/english/ked_diphone")]
    files += [Path("/usr/share/RHVoice/voices") / v for e, v, *_ in VOICES if e == "rhvoice"]
    missing += [str(f) for f in files if not f.exists()]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}\n{INSTALL_HELP}")


def package_versions():
    names = (PACKAGES_MAIN + " " + PACKAGES_NONFREE + " libflite1 espeak-ng-data festlex-cmu "
             "libttspico-data").split()
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n"] + names,
                         capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


# ----------------------------------------------------------------------------- text
def load_sentences():
    """Clean English sentences of 5-20 words from the fortune files, deduplicated."""
    english = set(w.lower() for w in DICTIONARY.read_text(encoding="latin-1").split())
    word_re = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*[,;]?")  # apostrophe/hyphen only inside a word
    seen, sentences = set(), []
    for cat in CATEGORIES:
        for fortune in (FORTUNE_DIR / cat).read_text(encoding="latin-1").split("\n%\n"):
            lines = [l.strip() for l in fortune.splitlines()]
            body = " ".join(l for l in lines if l and not l.startswith("-"))  # drop "-- Author"
            for s in re.split(r"(?<=[.!?])\s+", body):
                s = re.sub(r"\s+", " ", s).strip()
                # ASCII letters, spaces and , ; ' - only, starting upper case, one final . ! ?
                if not re.fullmatch(r"[A-Z][A-Za-z ,;'-]*[a-z][.!?]", s) or "--" in s:
                    continue
                words = s[:-1].split()
                cores = [w.rstrip(",;") for w in words]
                if not 5 <= len(words) <= 20 or not all(word_re.fullmatch(w) for w in words):
                    continue
                if any(len(c) > 1 and c.isupper() for c in cores):          # no all-caps words
                    continue
                if any(c in ("He", "Him", "His", "Lord") for c in cores[1:]):  # religious "He"
                    continue
                parts = [p.lower() for c in cores for p in c.split("-")]
                if any(p not in english and p.split("'")[0] not in english for p in parts):
                    continue                                  # not English, a typo or a name
                if any(p.split("'")[0] in BLOCKLIST for p in parts) or s.lower() in seen:
                    continue
                seen.add(s.lower())
                sentences.append(s)
    return sentences


def voice_items(index, speaker, sentences):
    """The ordered utterance list of one voice: its own sentences with digit strings spread
    evenly, so that any first n items hold round(0.15 * n) digit strings."""
    rng = random.Random(f"{SEED}-{speaker}")
    own = iter(sentences[index * SENTENCES_PER_VOICE:(index + 1) * SENTENCES_PER_VOICE])
    items = []
    for i in range(SENTENCES_PER_VOICE):
        if int((i + 1) * DIGIT_FRACTION + 0.5) > int(i * DIGIT_FRACTION + 0.5):
            digits = [rng.choice(DIGIT_WORDS) for _ in range(rng.randint(4, 8))]
            items.append(("digits", " ".join(digits)))
        else:
            items.append(("sentence", next(own)))
    return items


def phonemize(text):
    """espeak-ng IPA: phones of a word joined by '_', words separated by one space."""
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "--sep=_", "-v", "en-us", "--", text],
                         capture_output=True, text=True, check=True).stdout
    # espeak leaves a stray '_' at some word ends and '__' (an empty phone) between two vowels
    words = (re.sub("_+", "_", w).strip("_") for w in out.split())
    return " ".join(w for w in words if w)


# ----------------------------------------------------------------------------- audio
def synthesize(engine, voice, texts, wavs, tmp):
    """Write one native-rate WAV per text, using each engine's batch mode where it has one."""
    run = lambda cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, **kw)
    if engine == "festival":  # one festival process per chunk: loading the voice costs ~0.5 s
        script = tmp / "batch.scm"
        lines = [f"(voice_{voice})"] + [f'(utt.save.wave (utt.synth (Utterance Text "{t}")) '
                                         f'"{w}" \'riff)' for t, w in zip(texts, wavs)]
        script.write_text("\n".join(lines) + "\n")
        run(["festival", "-b", str(script)])
        return
    for text, wav in zip(texts, wavs):  # flite/espeak/pico/RHVoice write one file per process
        txt = tmp / "utt.txt"
        txt.write_text(text + "\n")
        if engine == "flite":
            run(["flite", "-voice", voice, "-f", str(txt), "-o", str(wav)])
        elif engine == "espeak-ng":
            run(["espeak-ng", "-v", voice, "-f", str(txt), "-w", str(wav)])
        elif engine == "rhvoice":  # reads stdin; always 24 kHz
            run(["RHVoice-test", "-p", voice, "-o", str(wav)], input=text.encode())
        elif engine == "pico":     # needs a .wav output name
            run(["pico2wave", "-l", voice, "-w", str(wav), text])


def to_flac(wav, norm, flac):
    """Native rate -> 16 kHz mono 16-bit with sox's high-quality resampler ('rate -h'), peak
    -3 dBFS, then trim leading/trailing silence below -50 dBFS and pad 0.15 s each side.
    'gain -6' first leaves headroom, or resampling a full-scale input clips a few samples.
    -D: no dither, so the output is deterministic and the pads are true digital silence.
    Any sox warning is an error."""
    for cmd in (["sox", "-D", str(wav), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(norm),
                 "gain", "-6", "rate", "-h", "norm", "-3"],
                ["sox", "-D", str(norm), "-C", "8", str(flac), "silence", "1", "0.02", "-50d",
                 "reverse", "silence", "1", "0.02", "-50d", "reverse", "pad", "0.15", "0.15"]):
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        if result.stderr.strip():
            raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


def check_audio(norm, flac):
    """Duration of the FLAC; raise if it is silent, clipped, NaN, too short or lost speech."""
    y, sr = sf.read(flac, dtype="float64")
    x, _ = sf.read(norm, dtype="float64")
    duration = len(y) / sr
    problems = []
    if sr != SAMPLE_RATE or y.ndim != 1 or sf.info(flac).subtype != "PCM_16":
        problems.append("format")
    if not np.all(np.isfinite(y)):
        problems.append("NaN")
    if duration < 0.8:
        problems.append(f"short {duration:.2f} s")
    if np.sqrt(np.mean(y ** 2)) < 1e-3:
        problems.append("silent")
    if np.max(np.abs(y)) > 0.72:  # norm -3 gives a peak of 0.708; anything near 1.0 is clipped
        problems.append("clipped")
    # the trimmed file holds exactly the samples of the untrimmed one minus the cut ends: if the
    # ends held speech, energy would be lost. Require that 99.9 % of the energy is kept.
    if np.sum(y ** 2) < 0.999 * np.sum(x ** 2):
        problems.append("trim cut speech")
    if problems:
        raise RuntimeError(f"{flac}: {', '.join(problems)}")
    return duration


def build_voice(index, spec, sentences, out):
    """Synthesise a voice's items chunk by chunk until it has TARGET_SECONDS of audio (the
    last item is kept when that brings the total closer to the target), then phonemize."""
    engine, voice = spec[:2]
    speaker = speaker_id(engine, voice)
    items = voice_items(index, speaker, sentences)
    (out / speaker).mkdir(parents=True, exist_ok=True)
    rows, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        indexed = list(enumerate(items))
        for start in range(0, len(items), CHUNK):
            chunk = indexed[start:start + CHUNK]
            wavs = [tmp / f"{i:04d}.wav" for i, _ in chunk]
            synthesize(engine, voice, [text for _, (_, text) in chunk], wavs, tmp)
            for (i, (kind, text)), wav in zip(chunk, wavs):
                rel = f"{speaker}/{speaker}_{i:04d}.flac"
                norm = tmp / f"{i:04d}_16k.wav"
                to_flac(wav, norm, tmp / "out.flac")
                duration = check_audio(norm, tmp / "out.flac")
                if total + duration / 2 > TARGET_SECONDS:
                    return rows
                shutil.move(tmp / "out.flac", out / rel)
                total += duration
                rows.append(dict(audio=rel, text=text, phonemes=phonemize(text), speaker=speaker,
                                 engine=engine, voice=voice, duration=round(duration, 3),
                                 split=None, kind=kind, sample_rate=SAMPLE_RATE))
    raise RuntimeError(f"{speaker}: ran out of text; raise SENTENCES_PER_VOICE")


def assign_splits(rows):
    """Held-out voices: half valid, half test. Other voices: 80/10/10 by utterance. Both by
    block randomisation (every block of 10, resp. 2, consecutive items gets a shuffled copy of
    the pattern), per kind, so every split gets its share of digit strings and of each voice."""
    rng = random.Random(SEED)
    groups = {}
    for r in sorted(rows, key=lambda r: r["audio"]):
        held = r["speaker"] in HELD_OUT
        key = (held, r["speaker"] if held else "", r["kind"])
        groups.setdefault(key, []).append((r["speaker"], rng.random(), r))
    for (held, _, _), group in sorted(groups.items(), key=lambda g: g[0]):
        group.sort(key=lambda g: g[:2])            # by voice, random order within a voice
        pattern = ["valid", "test"] if held else ["train"] * 8 + ["valid", "test"]
        for start in range(0, len(group), len(pattern)):
            block = pattern[:]
            rng.shuffle(block)
            for (_, _, r), split in zip(group[start:start + len(pattern)], block):
                r["split"] = split
    for split in ("train", "valid", "test"):
        kinds = {r["kind"] for r in rows if r["split"] == split}
        assert kinds == {"sentence", "digits"}, f"{split} lacks a kind: {kinds}"
    assert not any(r["speaker"] in HELD_OUT and r["split"] == "train" for r in rows)


def summary(rows, out, versions):
    """Markdown tables (voices, splits, totals), printed and written into data/README.md."""
    minutes = lambda rs: sum(r["duration"] for r in rs) / 60
    durations = sorted(r["duration"] for r in rows)
    lines = ["| speaker | engine | voice | sex | accent | type | human speaker | utts | digits | "
             "minutes | splits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for engine, voice, sex, accent, kind, human in VOICES:
        sp = speaker_id(engine, voice)
        rs = [r for r in rows if r["speaker"] == sp]
        role = "held out: valid/test" if sp in HELD_OUT else "train/valid/test"
        lines.append(f"| {sp} | {engine} | {voice} | {sex} | {accent} | {kind} | {human} | "
                     f"{len(rs)} | {sum(r['kind'] == 'digits' for r in rs)} | "
                     f"{minutes(rs):.2f} | {role} |")
    lines += ["", "| split | voices | utterances | digit utterances | minutes |",
              "|---|---|---|---|---|"]
    for split in ("train", "valid", "test"):
        rs = [r for r in rows if r["split"] == split]
        lines.append(f"| {split} | {len({r['speaker'] for r in rs})} | {len(rs)} | "
                     f"{sum(r['kind'] == 'digits' for r in rs)} | {minutes(rs):.2f} |")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    du = subprocess.run(["du", "-sh", str(out)], capture_output=True, text=True).stdout.split()[0]
    lines += ["", f"Total: {len(VOICES)} voices, {len(rows)} utterances "
              f"({sum(r['kind'] == 'digits' for r in rows)} digit strings), "
              f"{minutes(rows):.2f} minutes; duration min/median/max "
              f"{durations[0]:.2f} / {np.median(durations):.2f} / {durations[-1]:.2f} s; "
              f"{size / 1e6:.1f} MB of files (`du -sh`: {du}).", "",
              "Package versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent / "demo"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    args = parser.parse_args()
    check_tools()
    start = time.time()
    versions = package_versions()
    sentences = load_sentences()
    random.Random(SEED).shuffle(sentences)
    print(f"{len(sentences)} clean sentences; building {len(VOICES)} voices ...", flush=True)
    for engine, voice, *_ in VOICES:                 # remove only what this script writes
        shutil.rmtree(args.out / speaker_id(engine, voice), ignore_errors=True)
    with ThreadPoolExecutor(WORKERS) as pool:
        jobs = [pool.submit(build_voice, i, v, sentences, args.out) for i, v in enumerate(VOICES)]
        rows = [r for job in jobs for r in job.result()]
    assign_splits(rows)
    rows.sort(key=lambda r: r["audio"])
    with open(args.out / "manifest.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    text = summary(rows, args.out, versions)
    print(f"{text}\n\ngenerated in {time.time() - start:.0f} s with {WORKERS} workers")
    readme = Path(__file__).resolve().parent / "README.md"
    begin, end = "<!-- summary:begin -->", "<!-- summary:end -->"
    if args.out.resolve() == default_out and readme.exists() and begin in readme.read_text():
        head, rest = readme.read_text().split(begin, 1)
        readme.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
        print(f"updated the summary in {readme}")


if __name__ == "__main__":
    main()
