"""Shared code of the project, and the only code the model files share.

- `common.audio`   reading / writing audio files, a band-limited resampler, level and length helpers
- `common.data`    audio folders, JSON-lines manifests, the demo corpus, map-style datasets
- `common.metrics` mel / STFT distances, SI-SDR, PESQ, STOI, codebook statistics, comparison plots
- `common.evaluation` the papers' metrics offline (ViSQOL, Whisper WER, speaker similarity, MCD, a FAD
  stand-in; optional packages in requirements-eval*.txt), `score` and the evaluation table of every `--eval`

Everything a model needs to *be* a model (layers, quantizers, losses) lives in the model file
itself; `common/` only holds what sits around a model: data in, numbers and pictures out.
"""
