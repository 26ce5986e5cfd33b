"""Where training and evaluation audio comes from: folders, manifests, the demo corpus, datasets.

Shape letters: C audio channels, T samples.

Two ways to name data, both accepted by every model file's `--data` flag (`resolve_files`):

- a folder: every audio file below it, recursively (no splits: pass different folders for
  training and evaluation);
- a manifest: JSON lines, one object per utterance, paths relative to the manifest's folder:

      {"audio": "wav/0001.flac", "text": "The birch canoe slid on the smooth planks.",
       "phonemes": "ð_ə b_ɜː_tʃ k_ə_n_uː ...", "speaker": "rhvoice-clb", "engine": "rhvoice",
       "voice": "clb", "duration": 2.84, "split": "train", "kind": "sentence"}

  Only `audio` is required. `phonemes` is espeak-ng IPA, the phones of a word joined by `_`
  and words separated by single spaces; `split` is "train", "valid" or "test"; `kind` is
  "sentence" or "digits".

Without `--data`, the demo corpus under data/demo/ (its manifest.jsonl) is used.
"""

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from common.audio import AudioError, info, load, pad_or_crop, random_crop

# What libsndfile reads; mp3 only where the installed libsndfile (>= 1.1) was built with it.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg") + ((".mp3",) if "MP3" in sf.available_formats() else ())
SPLITS = ("train", "valid", "test")
DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


def list_audio_files(root):
    """All audio files below `root` (recursive, sorted, extension matched case-insensitively).

    Raises AudioError naming the folder when it does not exist or holds no audio.
    """
    root = Path(root)
    if not root.is_dir():
        raise AudioError(f"{root}: folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise AudioError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder or below it")
    return files


def read_manifest(path, split=None):
    """Parse a JSON-lines manifest into a list of dicts, one per utterance, in file order.

    Each dict holds the line's fields plus `path`: `audio` resolved against the manifest's
    folder, as an absolute path string. With `split` ("train", "valid" or "test") only the
    utterances of that split are kept; a manifest without any `split` field is not split, and
    then every utterance is returned whatever `split` says. Blank lines are skipped.

    Raises AudioError for a missing manifest, a malformed line (its line number is given), a
    split with no utterances, or audio files that do not exist (all of them are named).
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not path.is_file():
        raise AudioError(f"{path}: manifest not found")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise AudioError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str) or not entry["audio"]:
            raise AudioError(f"{path} line {number}: expected a JSON object with an \"audio\" path string")
        entry["path"] = str((path.parent / entry["audio"]).resolve())
        entries.append(entry)
    if not entries:
        raise AudioError(f"{path}: manifest has no utterances")
    present = sorted({str(e["split"]) for e in entries if "split" in e})
    if split is not None and present:
        entries = [e for e in entries if e.get("split") == split]
        if not entries:
            raise AudioError(f"{path}: no utterances with split {split!r} (splits present: {', '.join(present)})")
    missing = [e["path"] for e in entries if not Path(e["path"]).is_file()]
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise AudioError(f"{path}: {len(missing)} audio file(s) listed but not found:\n  {shown}")
    return entries


def demo_manifest():
    """Path of the demo corpus manifest (data/demo/manifest.jsonl); AudioError if it is missing."""
    manifest = DEMO_DIR / "manifest.jsonl"
    if not manifest.is_file():
        raise AudioError(f"{manifest}: the demo corpus is missing; regenerate it with `python data/make_demo_corpus.py`")
    return manifest


def resolve_files(data=None, split="train"):
    """The audio files that a `--data` argument names, as a list of Paths.

    - None: the demo corpus, utterances of `split`;
    - a .jsonl manifest: its utterances of `split` (all of them if it has no split fields);
    - a folder: every audio file below it (`list_audio_files`). Folders have no splits, so
      `split` is ignored: train and evaluate on different folders.
    """
    if data is None:
        data = demo_manifest()
    data = Path(data)
    if data.is_dir():
        return list_audio_files(data)
    if data.suffix.lower() == ".jsonl":
        return [Path(e["path"]) for e in read_manifest(data, split)]
    if not data.exists():
        raise AudioError(f"{data}: not found (expected a folder of audio files or a .jsonl manifest)")
    raise AudioError(f"{data}: expected a folder of audio files or a .jsonl manifest")


def _check_headers(files, channels):
    """(sample rate, frames) of every file; one AudioError listing all bad files, if any."""
    sizes, problems = [], []
    for f in files:
        try:
            header = info(f)
        except AudioError as e:
            problems.append(str(e))
            continue
        if header.frames == 0:
            problems.append(f"{f}: file has no samples")
        elif channels == 2 and header.channels > 2:
            problems.append(f"{f}: has {header.channels} channels; only mono and stereo files can be read as stereo")
        sizes.append((header.samplerate, header.frames))
    if problems:
        raise AudioError(f"{len(problems)} of {len(files)} audio files cannot be used:\n  " + "\n  ".join(problems))
    return sizes


class AudioDataset(torch.utils.data.Dataset):
    """Audio files as float32 tensors (C, T) at one sample rate: random crops or whole files.

    Args:
        files: audio file paths (e.g. from `resolve_files`).
        sample_rate: files at other rates are resampled (`common.audio.resample`).
        channels: 1 mixes down, 2 makes stereo (see `common.audio.load`).
        segment: crop length in samples for training; `__getitem__` then returns (C, segment),
            a uniformly random window, with files shorter than `segment` zero-padded on the right.
            None returns each whole file (C, T) for evaluation.
        seed: with the epoch (`set_epoch`) and the index, fixes each crop. The crop is a pure
            function of (seed, epoch, index), so resumed training sees the same crops, and the
            number of DataLoader workers does not matter.
        validate: read every header now and raise one AudioError listing every unreadable or
            empty file, instead of failing later inside a DataLoader worker.

    A plain map-style dataset: works with `DistributedSampler` (call its `set_epoch` and ours).
    DataLoader workers get a copy of the dataset when an epoch's iterator starts, so call
    `set_epoch` before iterating; with `persistent_workers=True` they would keep the old epoch.
    """

    def __init__(self, files, sample_rate, channels=1, segment=None, seed=0, validate=True):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise AudioError("AudioDataset: the list of audio files is empty")
        self.sample_rate, self.channels, self.segment, self.seed = int(sample_rate), channels, segment, seed
        self.epoch = 0
        # (rate, frames) tell whether a crop can be read straight from the file (same rate, long enough).
        self._sizes = _check_headers(self.files, channels) if validate else [None] * len(self.files)

    def set_epoch(self, epoch):
        """Select the crops of `epoch`; call once per epoch, like `DistributedSampler.set_epoch`."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.files)

    def _generator(self, index):
        """The torch.Generator of item `index` in the current epoch."""
        # SeedSequence mixes the three numbers into well-spread seeds (nearby tuples do not
        # give related streams, as seed + epoch + index would).
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def __getitem__(self, index):
        path = self.files[index]
        if self.segment is None:
            return load(path, self.sample_rate, self.channels)[0]  # (C, T)
        g = self._generator(index)
        if self._sizes[index] is None:  # validate=False: read the header now
            header = info(path)
            self._sizes[index] = (header.samplerate, header.frames)
        file_sr, frames = self._sizes[index]
        if file_sr == self.sample_rate and frames >= self.segment:
            # Fast path: decode only the crop (same distribution as random_crop below). The pad
            # guards against compressed formats whose header overstates the length a little.
            offset = int(torch.randint(0, frames - self.segment + 1, (1,), generator=g))
            wav, _ = load(path, channels=self.channels, start=offset, frames=self.segment)
            return pad_or_crop(wav, self.segment)  # (C, segment)
        wav, _ = load(path, self.sample_rate, self.channels)  # (C, T)
        return random_crop(wav, self.segment, g)  # (C, segment)


class ManifestDataset(torch.utils.data.Dataset):
    """Utterances of a manifest: each item is a dict of all its fields plus `wav` (C, T) float32.

    For the language-model files, which need the text, phonemes and speaker with the audio.
    Items have different lengths and string fields, so a DataLoader needs a `collate_fn` that
    pads (the default one cannot stack them).
    """

    def __init__(self, manifest, sample_rate, channels=1, split=None):
        self.entries = read_manifest(manifest, split)
        self.sample_rate, self.channels = int(sample_rate), channels

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = dict(self.entries[index])
        entry["wav"], _ = load(entry["path"], self.sample_rate, self.channels)  # (C, T)
        return entry
