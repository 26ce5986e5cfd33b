"""Regenerate the captioned sound-event corpus in data/sounds/ (audiogen.py's demo data).

    python data/make_sound_corpus.py [--out data/sounds]

2-second 16 kHz mono clips, each with a caption composed from its attributes, so that a
text-to-audio model can be trained and *checked* offline: every attribute a caption names
(how many events, pitch band, chirp direction, tonal or noise, speech or not) can be measured
back from audio by deterministic analysers (audiogen.py, "Attribute analysers").

- procedural events, written with numpy: beeps (sine tones in a low / mid / high band),
  chirps (exponential sweeps up or down), white-noise bursts; 1 to 3 events per clip;
- instrument notes rendered from the General-MIDI soundfont FluidR3_GM (Debian's
  fluid-soundfont-gm) with fluidsynth, reverb and chorus off: piano, organ, violin, trumpet,
  flute in the same three pitch bands;
- speech: 2-second crops of the demo speech corpus (data/demo), with its split;
- sequences "<A> then <B>": one kind of event in the first second, another in the second.

Everything is seeded (SEED); fluidsynth is deterministic for a given version. See
data/README.md ("Sound-event corpus") for the layout, provenance and licences.
"""
import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

SEED = 4321
SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")   # fluid-soundfont-gm 3.1 (MIT)
INSTALL_HELP = ("Install fluidsynth and the soundfont (Debian 12) as root:\n"
                "  apt-get update && apt-get install -y fluidsynth fluid-soundfont-gm")

# Pitch bands, in Hz of the fundamental. The gaps between them (300-450, 1000-1600 Hz) keep the
# band of every clip unambiguous for the analyser (boundaries 375 and 1270 Hz, the geometric means).
BANDS = {"low": (150.0, 300.0), "mid": (450.0, 1000.0), "high": (1600.0, 3200.0)}
# MIDI notes whose fundamentals fall in those bands: 51-62 = 156-294 Hz, 70-83 = 466-988 Hz,
# 92-103 = 1661-3136 Hz
MIDI_BANDS = {"low": (51, 62), "mid": (70, 83), "high": (92, 103)}
INSTRUMENTS = {"piano": 0, "organ": 19, "violin": 40, "trumpet": 56, "flute": 73}  # GM programs
HIGH_INSTRUMENTS = ("piano", "trumpet", "flute")  # FluidR3's organ and violin are silent there
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# clips per kind: 780 in all, 26 minutes of audio
PLAN = {"beep": 150, "chirp": 100, "noise": 90, "instrument": 160, "speech": 100, "sequence": 180}
SPLIT_SHARES = (("test", 0.12), ("valid", 0.04))  # the rest is train (speech keeps data/demo's)


def plural(word, count):
    return word if count == 1 else word + "s"


def event_times(rng, count, start, stop, dur_range=(0.12, 0.3), gap=0.15):
    """`count` non-overlapping (onset, duration) pairs in [start, stop), at least `gap` s apart."""
    while True:
        durs = [rng.uniform(*dur_range) for _ in range(count)]
        room = (stop - start) - sum(durs) - gap * (count - 1) - 0.1
        if room > 0:
            break
    cuts = sorted(rng.uniform(0, room) for _ in range(count))
    times, t = [], start + 0.05
    for i, d in enumerate(durs):
        onset = t + (cuts[i] - (cuts[i - 1] if i else 0.0))
        times.append((onset, d))
        t = onset + d + gap
    return times


def envelope(n, attack=0.01, release=0.03):
    """Linear attack and release (seconds) over n samples: clicks-free onsets and offsets."""
    a, r = max(1, int(attack * SAMPLE_RATE)), max(1, int(release * SAMPLE_RATE))
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[-r:] = np.minimum(env[-r:], np.linspace(1, 0, r))
    return env


def beep(rng, band, dur):
    f = np.exp(rng.uniform(*np.log(BANDS[band]))) * 1.0
    t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * f * t) * envelope(len(t))


def chirp(rng, direction, dur):
    """Exponential sweep over at least two octaves, inside 250-3200 Hz."""
    lo = np.exp(rng.uniform(np.log(250), np.log(400)))
    hi = np.exp(rng.uniform(np.log(1600), np.log(3200)))
    f0, f1 = (lo, hi) if direction == "rising" else (hi, lo)
    t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
    k = np.log(f1 / f0) / dur
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k  # integral of f0 e^{kt}
    return np.sin(phase) * envelope(len(t))


def noise_burst(rng, dur):
    return rng.standard_normal(int(dur * SAMPLE_RATE)) * 0.35 * envelope(int(dur * SAMPLE_RATE))


def place(clip, sound, onset):
    i = int(onset * SAMPLE_RATE)
    n = min(len(sound), len(clip) - i)
    clip[i:i + n] += sound[:n]


def procedural_event(rng, kind, start, stop, count=None, py=None):
    """(attributes, samples to place) of one kind of procedural event in [start, stop)."""
    count = count or py.choice([1, 2, 3])
    attrs = {"kind": kind, "count": count}
    if kind == "beep":
        attrs["band"] = py.choice(list(BANDS))
        make = lambda d: beep(rng, attrs["band"], d)  # noqa: E731
        durs = (0.12, 0.3)
    elif kind == "chirp":
        attrs["direction"] = py.choice(["rising", "falling"])
        make = lambda d: chirp(rng, attrs["direction"], d)  # noqa: E731
        durs = (0.25, 0.4)
    else:
        make = lambda d: noise_burst(rng, d)  # noqa: E731
        durs = (0.1, 0.25)
    sounds = [(onset, make(d)) for onset, d in event_times(py, count, start, stop, durs)]
    return attrs, sounds


def caption(attrs):
    if attrs["kind"] == "speech":
        return "someone speaking"
    c, word = attrs["count"], COUNT_WORDS[attrs["count"]]
    if attrs["kind"] == "beep":
        return f"{word} {attrs['band']} {plural('beep', c)}"
    if attrs["kind"] == "chirp":
        return f"{word} {attrs['direction']} {plural('chirp', c)}"
    if attrs["kind"] == "noise":
        return f"{word} noise {plural('burst', c)}"
    return f"{word} {attrs['band']} {attrs['instrument']} {plural('note', c)}"


def write_midi(path, clips, spacing):
    """A format-0 MIDI file: clip i's notes start at i * spacing seconds (120 bpm, 480 ticks per
    quarter, so one tick is 1/960 s). clips: [(program, [(onset, duration, note), ...]), ...]."""
    tick = 960
    events = []  # (time in ticks, order, bytes)
    for i, (program, notes) in enumerate(clips):
        base = int(round(i * spacing * tick))
        events.append((base, 0, bytes([0xC0, program])))
        for onset, dur, note in notes:
            events.append((base + int(onset * tick), 2, bytes([0x90, note, 100])))
            events.append((base + int((onset + dur) * tick), 1, bytes([0x80, note, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    track, now = bytearray(), 0
    for time, _, data in events + [(events[-1][0], 3, bytes([0xFF, 0x2F, 0x00]))]:
        delta, var = time - now, bytearray([(time - now) & 0x7F])
        delta >>= 7
        while delta:
            var.insert(0, 0x80 | (delta & 0x7F))
            delta >>= 7
        track += var + data
        now = time
    head = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
    head += (480).to_bytes(2, "big")
    Path(path).write_bytes(head + b"MTrk" + len(track).to_bytes(4, "big") + bytes(track))


def render_instruments(plans, tmp):
    """Render every instrument clip in one fluidsynth call (one soundfont load), then cut it."""
    spacing = CLIP_SECONDS + 1.0  # 1 s for the release tails between clips
    midi = Path(tmp) / "notes.mid"
    wav = Path(tmp) / "notes.wav"
    write_midi(midi, [(INSTRUMENTS[p["instrument"]], p["notes"]) for p in plans], spacing)
    subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(SAMPLE_RATE),
                    "-o", "synth.reverb.active=0", "-o", "synth.chorus.active=0",
                    "-F", str(wav), str(SOUNDFONT), str(midi)], check=True,
                   stdout=subprocess.DEVNULL)
    audio, sr = sf.read(wav, dtype="float64", always_2d=True)
    assert sr == SAMPLE_RATE, sr
    audio = audio.mean(axis=1)
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    out = []
    for i in range(len(plans)):
        start = int(round(i * spacing * SAMPLE_RATE))
        clip = audio[start:start + n]
        out.append(np.pad(clip, (0, n - len(clip))))
    return out


def instrument_event(py, start, stop, count=None):
    count = count or py.choice([1, 2, 3])
    band = py.choice(list(MIDI_BANDS))
    name = py.choice([n for n in INSTRUMENTS if band != "high" or n in HIGH_INSTRUMENTS])
    notes = [(onset, d, py.randint(*MIDI_BANDS[band]))
             for onset, d in event_times(py, count, start, stop, (0.2, 0.35), gap=0.2)]
    return {"kind": "instrument", "count": count, "band": band, "instrument": name}, notes


def speech_clips(py, count):
    """2 s crops (from 0.2 s in) of demo utterances, keeping each utterance's split."""
    manifest = Path(__file__).resolve().parent / "demo" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["duration"] >= 1.6]
    py.shuffle(rows)
    out = []
    for r in rows[:count]:
        wav, sr = sf.read(manifest.parent / r["audio"], dtype="float64")
        assert sr == SAMPLE_RATE
        n = int(CLIP_SECONDS * SAMPLE_RATE)
        clip = wav[int(0.2 * SAMPLE_RATE):][:n]
        split = "train" if r["split"] == "train" else "test"
        out.append((np.pad(clip, (0, n - len(clip))), split, r["audio"]))
    return out


def normalise(clip, py):
    """Peak at a random -12..-3 dBFS."""
    peak = np.abs(clip).max()
    assert peak > 0.01, "a silent clip: a note the soundfont does not play?"
    clip = clip / peak * 10 ** (py.uniform(-12, -3) / 20) if peak > 0 else clip
    return clip


def main(argv=None):
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(here / "sounds"))
    args = p.parse_args(argv)
    if shutil.which("fluidsynth") is None or not SOUNDFONT.is_file():
        sys.exit(f"missing: fluidsynth or {SOUNDFONT}\n{INSTALL_HELP}")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "audio").mkdir(parents=True)
    py, rng = random.Random(SEED), np.random.default_rng(SEED)
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    items = []  # (kind, events, samples or None, source)
    for kind in ("beep", "chirp", "noise"):
        for _ in range(PLAN[kind]):
            attrs, sounds = procedural_event(rng, kind, 0.0, CLIP_SECONDS, py=py)
            clip = np.zeros(n)
            for onset, s in sounds:
                place(clip, s, onset)
            items.append({"kind": kind, "events": [attrs], "wav": clip})
    plans = []
    for _ in range(PLAN["instrument"]):
        attrs, notes = instrument_event(py, 0.0, CLIP_SECONDS)
        plans.append({"instrument": attrs["instrument"], "notes": notes})
        items.append({"kind": "instrument", "events": [attrs], "wav": None})
    seq_plans = []
    for _ in range(PLAN["sequence"]):
        kinds = py.sample(["beep", "chirp", "noise", "instrument"], 2)
        clip, events, notes = np.zeros(n), [], []
        for half, kind in enumerate(kinds):
            start, stop = half * 1.0, half * 1.0 + 1.0
            count = py.choice([1, 2]) if kind != "chirp" else 1
            if kind == "instrument":
                attrs, part = instrument_event(py, start, stop, count)
                notes.append((attrs["instrument"], part))
            else:
                attrs, sounds = procedural_event(rng, kind, start, stop, count, py=py)
                for onset, s in sounds:
                    place(clip, s, onset)
            events.append(attrs)
        item = {"kind": "sequence", "events": events, "wav": clip}
        if notes:
            seq_plans.append((len(items), notes[0]))
        items.append(item)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = render_instruments(plans + [{"instrument": name, "notes": part}
                                               for _, (name, part) in seq_plans], tmp)
    it = iter(rendered)
    for item in items:
        if item["kind"] == "instrument":
            item["wav"] = next(it)
    for index, _ in seq_plans:
        note_audio = next(it)
        other = items[index]["wav"]
        # the tones were written at unit peak; the rendered notes are quieter: match their peaks
        scale = np.abs(other).max() / max(np.abs(note_audio).max(), 1e-9) if other.any() else 1.0
        items[index]["wav"] = other + note_audio * scale
    for wav, split, source in speech_clips(py, PLAN["speech"]):
        items.append({"kind": "speech", "events": [{"kind": "speech"}], "wav": wav,
                      "split": split, "source": f"data/demo/{source}"})
    order = list(range(len(items)))
    py.shuffle(order)
    rows = []
    counts = {}
    for number, i in enumerate(order):
        item = items[i]
        if "split" not in item:
            u = py.random()
            item["split"] = next((s for s, share in SPLIT_SHARES if (u := u - share) < 0), "train")
        name = f"audio/{item['kind']}_{number:04d}.flac"
        wav = normalise(item["wav"], py)
        # a noise floor of 1 LSB rms (-90 dBFS): no digital silence, whose log mel (at the codec
        # losses' floor) made the least output noise cost more than the events themselves
        wav = wav + rng.standard_normal(len(wav)) / 32768
        sf.write(out / name, np.clip(wav, -1, 1).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        text = " then ".join(caption(e) for e in item["events"])
        row = {"audio": name, "caption": text, "kind": item["kind"], "events": item["events"],
               "split": item["split"], "duration": CLIP_SECONDS, "sample_rate": SAMPLE_RATE}
        if "source" in item:
            row["source"] = item["source"]
        rows.append(row)
        counts[item["split"]] = counts.get(item["split"], 0) + 1
    rows.sort(key=lambda r: r["audio"])
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    size = sum(f.stat().st_size for f in out.rglob("*.flac")) / 1e6
    print(f"{len(rows)} clips ({counts}), {len(rows) * CLIP_SECONDS / 60:.1f} min, "
          f"{size:.1f} MB in {out}")


if __name__ == "__main__":
    main()
