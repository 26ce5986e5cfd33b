"""Tests of encodec.py: equal to Meta's `encodec` 0.1.1 on identical (random) weights, the
released parameter counts and key layout, bandwidth arithmetic, streaming == offline, the
48 kHz segments and scales, and clear errors on bad input."""

import dataclasses
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import encodec as ours  # the file at the repository root (conftest puts the root first)

ROOT = Path(__file__).resolve().parent.parent


def import_official():
    """Meta's package, imported as `official_encodec` from site-packages: its module is also
    called `encodec`, and our file (first on sys.path) must never shadow it, nor it ours."""
    if "official_encodec" in sys.modules:
        return sys.modules["official_encodec"]
    origin = None
    for entry in sys.path:
        if entry and Path(entry).resolve() != ROOT:
            spec = importlib.machinery.PathFinder.find_spec("encodec", [entry])
            if spec and spec.submodule_search_locations:  # a package, not our single file
                origin = spec.origin
                break
    if origin is None:
        pytest.skip("the official package is not installed: pip install --no-deps encodec==0.1.1 "
                    "einops (requirements-test-nodeps.txt)")
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):  # imported at the top of encodec/utils.py, unused by the model
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    spec = importlib.util.spec_from_file_location("official_encodec", origin,
                                                  submodule_search_locations=[str(Path(origin).parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_encodec"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official():
    return import_official()


def official_model(official, name):
    """The released architecture with random weights; its k-means codebooks start at zero
    (every code would be 0), so they get random entries first (reference/codecs.md §8)."""
    torch.manual_seed(0)
    model = getattr(official.EncodecModel, f"encodec_model_{name}")(pretrained=False)
    for layer in model.quantizer.vq.layers:
        layer._codebook.embed.normal_()
        layer._codebook.inited.fill_(1)
    return model.eval()


@pytest.mark.parametrize("name, params", [("24khz", 14_851_810), ("48khz", 14_856_294)])
def test_parameter_counts_are_the_released_ones(name, params):
    model = ours.EnCodec(ours.PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_official_weights_load_strictly_and_agree(official, name):
    ref = official_model(official, name)
    model = ours.EnCodec.from_official(ref.state_dict())  # the preset is told from the shapes
    assert model.cfg == ours.PRESETS[name]
    torch.manual_seed(1)
    T = {"24khz": 24000 + 977, "48khz": 2 * 48000 + 4321}[name]  # odd lengths, B = 2
    x = 0.1 * torch.randn(2, model.channels, T)
    for bw in model.cfg.bandwidths:
        ref.set_target_bandwidth(bw)
        with torch.no_grad():
            frames = ref.encode(x)
            y_ref = ref.decode(frames)
        codes, scale = model.encode(x, bandwidth=bw)
        assert torch.equal(codes, torch.cat([c for c, _ in frames], dim=-1)), bw
        assert codes.shape[1] == model.n_q_for_bandwidth(bw)
        if name == "48khz":
            assert torch.allclose(scale, torch.cat([s for _, s in frames], dim=1))
        else:
            assert scale is None
        y = model.decode(codes, scale)
        assert y.shape == y_ref.shape
        assert (y - y_ref).abs().max() < 1e-5 * max(1.0, y_ref.abs().max()), bw


def test_hugging_face_weights_load_and_agree():
    """transformers' EncodecModel (random weights, its own key names) loads into ours; at 24 kHz
    codes and audio are identical. At 48 kHz its chunking pads the input (not the official
    segments), so there the decoders are compared on the same codes."""
    transformers = pytest.importorskip("transformers")  # requirements-test-nodeps.txt
    torch.manual_seed(0)
    confs = {"24khz": transformers.EncodecConfig(),
             "48khz": transformers.EncodecConfig(sampling_rate=48000, audio_channels=2,
                                                 use_causal_conv=False, normalize=True,
                                                 norm_type="time_group_norm",
                                                 target_bandwidths=[3.0, 6.0, 12.0, 24.0])}
    for name, conf in confs.items():
        hf = transformers.EncodecModel(conf).eval()
        for layer in hf.quantizer.layers:  # zeros until k-means, as the official ones
            layer.codebook.embed.normal_()
            layer.codebook.inited.fill_(True)
        model = ours.EnCodec.from_official(hf.state_dict())
        assert model.cfg == ours.PRESETS[name]
        x = 0.1 * torch.randn(2, model.channels, 24000 + 977)
        codes, scale = model.encode(x, bandwidth=6.0)
        with torch.no_grad():
            if name == "24khz":
                out = hf.encode(x, bandwidth=6.0)
                assert torch.equal(out.audio_codes[0], codes)
                y_hf = hf.decode(out.audio_codes, out.audio_scales)[0]
            else:
                y_hf = hf.decoder(hf.quantizer.decode(codes.transpose(0, 1)))
        y = model.decode(codes, None if name == "24khz" else torch.ones_like(scale))
        assert y.shape == y_hf.shape
        assert (y - y_hf).abs().max() < 1e-5, name
