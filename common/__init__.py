"""Shared code of the project, and the only code the model files share.

- `common.audio`   reading / writing audio files, a band-limited resampler, level and length helpers
- `common.data`    audio folders, JSON-lines manifests, the demo corpus, map-style datasets
- `common.metrics` mel / STFT distances, SI-SDR, PESQ, STOI, codebook statistics, comparison plots

Everything a model needs to *be* a model (layers, quantizers, losses) lives in the model file
itself; `common/` only holds what sits around a model: data in, numbers and pictures out.
"""
