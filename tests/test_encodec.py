"""Tests of encodec.py: equal to Meta's `encodec` 0.1.1 on identical (random) weights, the
released parameter counts and key layout, bandwidth arithmetic, streaming == offline, the
48 kHz segments and scales, and clear errors on bad input."""

import dataclasses
import importlib.util
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
    stub = None
    try:
        import torchaudio  # noqa: F401 - the real one, where it imports
    except (ImportError, OSError):  # imported at the top of encodec/utils.py, unused by the model
        stub = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    spec = importlib.util.spec_from_file_location("official_encodec", origin,
                                                  submodule_search_locations=[str(Path(origin).parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_encodec"] = module
    try:
        spec.loader.exec_module(module)
        importlib.import_module("official_encodec.quantization.core_vq")
    finally:
        if stub is not None:  # others (transformers) must not find a module without a spec
            del sys.modules["torchaudio"]
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
    model = ours.EnCodec(ours.PRESETS[name][0])
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_official_weights_load_strictly_and_agree(official, name):
    ref = official_model(official, name)
    model = ours.EnCodec.from_official(ref.state_dict())  # the preset is told from the shapes
    assert model.cfg == ours.PRESETS[name][0]
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
        assert model.cfg == ours.PRESETS[name][0]
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


# a very small model and run for the tests (tens of milliseconds per step)
MINI_CFG = dataclasses.replace(ours.PRESETS["tiny"][0], n_filters=2, dimension=8, lstm_layers=1,
                               num_quantizers=4, codebook_size=16, bandwidths=(0.2, 0.4, 0.8),
                               kmeans_iters=2)
MINI_RUN = dataclasses.replace(ours.PRESETS["tiny"][1], disc_filters=4, disc_windows=(256, 128, 64),
                               gan_start=0, disc_prob=1.0, batch_size=2, segment_seconds=0.2,
                               steps=6, log_every=1, sample_every=1000, ckpt_every=1000,
                               eval_utterances=1, threads=1)


def demo_batch(n=2, segment=3200):
    from common.data import AudioDataset, resolve_files
    ds = AudioDataset(resolve_files(None, "train")[:n], 16000, segment=segment)
    return torch.stack([ds[i] for i in range(n)])  # (n, 1, segment): real utterances


def with_random_codebooks(model):
    for vq in model.quantizer.layers:
        vq.embed.normal_()
        vq.inited.fill_(1)
    return model.eval()

# -------------------------------------------------------------------------------------------------
# Arithmetic, shapes, segments


@pytest.mark.parametrize("name, frame_rate, per_q_kbps, n_qs", [
    ("24khz", 75, 0.75, [2, 4, 8, 16, 32]),   # §3.2: 1.5 .. 24 kbps at 75 Hz, 10 bits
    ("48khz", 150, 1.5, [2, 4, 8, 16]),       # 3 .. 24 kbps at 150 Hz
    ("audiogen16k", 50, 0.55, [4]),           # 4 x 2048 at 50 Hz = 2.2 kbps
    ("tiny", 50, 0.25, [1, 2, 4, 8]),         # 5-bit codebooks at 50 Hz
])
def test_frame_rates_and_bandwidths(name, frame_rate, per_q_kbps, n_qs):
    cfg = ours.PRESETS[name][0]
    model = ours.EnCodec(dataclasses.replace(cfg, n_filters=2, lstm_layers=1))  # same arithmetic
    assert model.frame_rate == frame_rate and model.hop_length == 320
    assert model.bitrate(1) == pytest.approx(per_q_kbps * 1000)
    assert [model.n_q_for_bandwidth(b) for b in cfg.bandwidths] == n_qs
    with pytest.raises(ValueError, match="this model codes"):
        model.n_q_for_bandwidth(5.0)


def test_codes_have_one_frame_per_hop_for_any_length():
    model = with_random_codebooks(ours.EnCodec(MINI_CFG))
    for T in (1, 100, 320, 321, 3200 + 17):
        codes, scale = model.encode(0.1 * torch.randn(2, 1, T), bandwidth=0.4)
        assert codes.shape == (2, 2, math.ceil(T / 320)) and scale is None
        assert model.decode(codes).shape == (2, 1, 320 * math.ceil(T / 320))


def test_overlap_add_by_hand():
    # weights of a 5-sample segment: 0.5 - |t - 0.5| at t = 1/6 .. 5/6 -> 1/6, 2/6, 3/6, 2/6, 1/6
    a, b = torch.ones(1, 1, 5), 3 * torch.ones(1, 1, 5)
    y = ours.overlap_add([a, b], stride=3)[0, 0]
    expected = [1, 1, 1, (2 / 6 + 3 / 6) / (3 / 6), (1 / 6 + 6 / 6) / (3 / 6), 3, 3, 3]
    assert torch.allclose(y, torch.tensor(expected))


def test_48khz_segments_scale_and_are_scale_invariant():
    cfg = dataclasses.replace(ours.PRESETS["48khz"][0], n_filters=2, lstm_layers=1)
    model = with_random_codebooks(ours.EnCodec(cfg))
    # 1 s segments every 0.99 s (§3.1: 10 ms overlap)
    assert model.segments(2 * 48000 + 100) == [(0, 48000), (47520, 48000), (95040, 1060)]
    torch.manual_seed(0)
    x = 0.1 * torch.randn(2, 2, 48000 + 4800)
    codes, scale = model.encode(x, bandwidth=6.0)
    assert codes.shape == (2, 4, 150 + 17) and scale.shape == (2, 2)  # 5280 samples: 17
    rms = x[..., :48000].mean(dim=1).pow(2).mean(dim=-1).sqrt()  # of the mono mix
    assert torch.allclose(scale[:, 0], rms + 1e-8)
    codes10, scale10 = model.encode(10 * x, bandwidth=6.0)
    assert torch.equal(codes, codes10) and torch.allclose(scale10, 10 * scale)
    y, y10 = model.decode(codes, scale), model.decode(codes10, scale10)
    assert torch.allclose(y10, 10 * y, atol=1e-5)
    with pytest.raises(ValueError, match="decode needs the `scale`"):
        model.decode(codes)
    # decode splits the codes back into segments from (frames, segments) alone, for any length,
    # also where the second-to-last segment is cut short (47521 samples: 149 + 1 frames)
    for T in (1, 320, 47520, 47521, 47840, 47841, 48000, 48001, 95040, 95140, 95361, 150000):
        sizes = [math.ceil(n / 320) for _, n in model.segments(T)]
        assert model.segment_frames(sum(sizes), len(sizes)) == sizes, T
    with pytest.raises(ValueError, match="do not belong together"):
        model.decode(codes, scale[:, :1].repeat(1, 5))
    # the training pass (here without codebook updates) normalises too, and puts the scale back
    with torch.no_grad():
        x_hat, x_hat10 = model(x[..., :9600], 2)[0], model(10 * x[..., :9600], 2)[0]
    assert torch.allclose(x_hat10, 10 * x_hat, atol=1e-5) and x_hat.abs().max() < 1


def test_streaming_equals_offline_and_needs_a_long_enough_first_chunk():
    cfg = dataclasses.replace(ours.PRESETS["24khz"][0], n_filters=4, num_quantizers=4,
                              bandwidths=(1.5, 3.0))
    model = with_random_codebooks(ours.EnCodec(cfg))
    M = model.hop_length
    x = 0.1 * torch.randn(2, 1, 20 * M)
    codes = model.encode(x, n_q=4).codes
    y = model.decode(codes)
    with model.streaming():
        parts = [model.encode(x[..., :7 * M], n_q=4).codes]
        parts += [model.encode(x[..., i:i + 2 * M], n_q=4).codes for i in range(7 * M, 20 * M, 2 * M)]
    streamed = torch.cat(parts, dim=-1)
    assert torch.equal(streamed, codes)
    with model.streaming():
        ys = [model.decode(codes[..., :7])] + [model.decode(codes[..., i:i + 1]) for i in range(7, 20)]
    assert torch.allclose(torch.cat(ys, dim=-1), y, atol=1e-6)
    with model.streaming(), pytest.raises(ValueError, match="the first at least 2240"):
        model.encode(x[..., :6 * M])
    with model.streaming(), pytest.raises(ValueError, match="multiples of 320 samples"):
        model.encode(x[..., :7 * M + 1])
    with pytest.raises(ValueError, match="only a causal model"):
        with ours.EnCodec(dataclasses.replace(cfg, causal=False)).streaming():
            pass


def test_encoder_is_causal():
    cfg = dataclasses.replace(ours.PRESETS["24khz"][0], n_filters=4, num_quantizers=4,
                              bandwidths=(1.5, 3.0))
    model = with_random_codebooks(ours.EnCodec(cfg))
    x = 0.1 * torch.randn(1, 1, 30 * 320)
    x2 = x.clone()
    x2[..., 20 * 320:] += 1.0  # change the future only
    with torch.no_grad():
        z, z2 = model.encoder(x), model.encoder(x2)
    # reflect padding at the very start reads 6 frames ahead (first chunk of streaming); past
    # those, frame t depends on samples up to its end only
    assert torch.equal(z[..., 7:20], z2[..., 7:20]) and not torch.equal(z[..., 20:], z2[..., 20:])

# -------------------------------------------------------------------------------------------------
# The quantizer


def test_commitment_is_eq_3_averaged_and_reaches_the_encoder_from_every_codebook():
    """The commitment term, mean over codebooks of mean ||r_i - q_i||^2, and its gradient at z,
    mean_i 2 (r_i - q_i) / (N D): DEVIATION 1 (issue #25) gives every codebook's term a path."""
    torch.manual_seed(0)
    rvq = ours.ResidualVectorQuantizer(MINI_CFG)
    for vq in rvq.layers:
        vq.embed.normal_()
        vq.inited.fill_(1)
    rvq.eval()  # no EMA update: the entries stay as they are for the hand computation
    z = torch.randn(2, 8, 5, requires_grad=True)
    z_q, codes, commit = rvq(z, 3)
    r = z.detach().transpose(1, 2).reshape(10, 8)
    expected, grad = 0.0, torch.zeros_like(r)
    for i in range(3):
        q = rvq.layers[i].embed[codes[:, i].reshape(10)]
        expected += (r - q).pow(2).mean() / 3
        grad += 2 * (r - q) / r.numel() / 3
        r = r - q
    assert commit.item() == pytest.approx(expected.item(), rel=1e-5)
    commit.backward()
    assert torch.allclose(z.grad.transpose(1, 2).reshape(10, 8), grad, atol=1e-7)
    assert torch.allclose(z_q, z + (z_q - z))  # straight-through value is the quantized one


def test_ema_update_and_kmeans_by_hand():
    """§3.2: counts and sums are EMAs (decay 0.99) of the batch's assignments, an entry is the
    ratio with Laplace-smoothed counts; k-means on the first batch finds its clusters."""
    cfg = dataclasses.replace(MINI_CFG, dimension=2, codebook_size=2, kmeans_iters=5,
                              dead_code_threshold=0.0)
    vq = ours.Codebook(cfg)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.embed_avg.copy_(vq.embed * 4)
    vq.cluster_size.fill_(4.0)
    vq.inited.fill_(1)
    vq.train()
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])  # two frames to entry 0, one to 1
    codes, q = vq(z)
    assert codes.tolist() == [0, 0, 1] and torch.equal(q[2], torch.tensor([10.0, 10.0]))
    counts = torch.tensor([0.99 * 4 + 0.01 * 2, 0.99 * 4 + 0.01 * 1])
    sums = torch.stack([0.99 * torch.zeros(2) + 0.01 * torch.tensor([1.0, 1.0]),
                        0.99 * torch.tensor([40.0, 40.0]) + 0.01 * torch.tensor([9.0, 9.0])])
    n = counts.sum()
    smoothed = (counts + 1e-5) / (n + 2 * 1e-5) * n
    assert torch.allclose(vq.cluster_size, counts) and torch.allclose(vq.embed_avg, sums)
    assert torch.allclose(vq.embed, sums / smoothed[:, None])
    # k-means: Lloyd's fixed point, each entry the mean of the frames nearest to it; then, as the
    # official code, counts = the last assignment counts and embed_avg = embed (not embed * count)
    km = ours.Codebook(cfg)
    torch.manual_seed(0)
    frames = torch.cat([torch.randn(5, 2) * 0.1 + 5, torch.randn(3, 2) * 0.1 - 5])
    km.kmeans_init(frames)
    codes = km.nearest(frames)
    for k in range(2):
        assert torch.allclose(km.embed[k], frames[codes == k].mean(0), atol=1e-6)
        assert km.cluster_size[k] == (codes == k).sum()
    assert torch.equal(km.embed_avg, km.embed) and km.inited.item() == 1


def test_dead_codes_are_replaced_here_and_undone_in_the_official_code(official):
    """DEVIATION 2, measured: the official codebook writes a batch vector into the dead entry
    and overwrites it in the same call; ours keeps it."""
    torch.manual_seed(0)
    core = importlib.import_module("official_encodec.quantization.core_vq")
    theirs = core.EuclideanCodebook(dim=2, codebook_size=4, kmeans_init=False)
    theirs.cluster_size.copy_(torch.tensor([5.0, 5.0, 5.0, 0.5]))  # entry 3 is dead (< 2)
    theirs.embed_avg.copy_(theirs.embed * theirs.cluster_size[:, None])
    mine = ours.Codebook(dataclasses.replace(MINI_CFG, dimension=2, codebook_size=4))
    for b in ("embed", "embed_avg", "cluster_size"):
        getattr(mine, b).copy_(getattr(theirs, b))
    mine.inited.fill_(1)
    theirs.train(), mine.train()
    batch = torch.full((16, 2), 100.0)  # far from every entry: no frame picks entry 3
    batch[:, 1] += torch.arange(16.0)
    theirs(batch[None])
    mine(batch)
    assert not (theirs.embed[3] >= 99).all()  # undone: not a batch vector
    assert (mine.embed[3] >= 99).all() and int(mine.replaced) == 1  # a batch vector

# -------------------------------------------------------------------------------------------------
# Losses and the balancer


def test_balancer_on_the_official_toy_case_and_its_ema_by_hand():
    # official encodec/balancer.py test: l_1 = |x - 1|, l_2 = 100 |x + 1| at x = 0: gradients -1
    # and +100; balanced with equal weights, each is scaled to norm 1/2: they cancel
    grads = {"a": torch.tensor([[-1.0]]), "b": torch.tensor([[100.0]])}
    out, norms, _ = ours.Balancer({"a": 1, "b": 1})(grads)
    assert out.item() == pytest.approx(0.0, abs=1e-9) and norms["b"].item() == 100
    out, _, _ = ours.Balancer({"a": 3, "b": 1})(grads)  # shares 3/4 and 1/4
    assert out.item() == pytest.approx(-0.75 + 0.25)
    # the EMA of the norms, bias-corrected: after norms 1 then 4 with beta = 0.5,
    # (0.5 * 1 + 4) / (0.5 + 1) = 3
    bal = ours.Balancer({"a": 1}, decay=0.5)
    bal({"a": torch.tensor([[1.0]])})
    out, _, averaged = bal({"a": torch.tensor([[4.0]])})
    assert averaged["a"].item() == pytest.approx(3.0) and out.item() == pytest.approx(4 / 3)
    # norms per example, averaged over the batch: examples of norm 3 and 5 -> 4
    _, norms, _ = ours.Balancer({"a": 1})({"a": torch.tensor([[3.0, 0.0], [0.0, 5.0]])})
    assert norms["a"].item() == pytest.approx(4.0)


def test_hinge_losses_by_hand():
    real = [(torch.tensor([2.0, 0.5]), []), (torch.tensor([-1.0]), [])]
    fake = [(torch.tensor([-2.0, 0.0]), []), (torch.tensor([1.0]), [])]
    # D_1: relu(1-2)=0, relu(1-0.5)=.5 -> .25; relu(1-2)=0, relu(1+0)=1 -> .5; D_2: 2 + 2
    assert ours.discriminator_loss(real, fake).item() == pytest.approx((0.25 + 0.5 + 2 + 2) / 2)
    # l_g: D_1 mean(relu(1+2), relu(1-0)) = 2, D_2 relu(1-1) = 0 -> mean 1
    assert ours.adversarial_loss(fake).item() == pytest.approx(1.0)


def test_relative_feature_loss_eq_2_by_hand():
    r1, f1 = torch.tensor([1.0, -3.0]), torch.tensor([2.0, -1.0])  # mean|r-f| 1.5, mean|r| 2
    r2, f2 = torch.tensor([4.0]), torch.tensor([0.0])                # 4 / 4 = 1
    r3, f3 = torch.tensor([0.5, 0.5]), torch.tensor([0.5, 1.5])      # 0.5 / 0.5 = 1
    real = [(None, [r1, r2]), (None, [r3])]
    fake = [(None, [f1, f2]), (None, [f3])]
    assert ours.feature_loss(real, fake).item() == pytest.approx((0.75 + 1 + 1) / 3)


@pytest.mark.parametrize("log_l2", [True, False])
def test_frequency_loss_eq_1_on_an_impulse_by_hand(log_l2):
    """An impulse against a quieter impulse: each frame's normalised STFT magnitude is
    a w(n)/sqrt(s) in every bin (w the Hann window at the impulse, a its height), so
    S = (sum of each band's weights) x a w / sqrt(s). Per scale: mean |S_x - S_y| plus, with
    DEVIATION 4, mean (log S_x - log S_y)^2 (floor 1e-5), else sqrt(mean (S_x - S_y)^2)."""
    from common.metrics import mel_filterbank
    T, p = 4096, 2000
    x, x_hat = torch.zeros(1, 1, T), torch.zeros(1, 1, T)
    x[..., p], x_hat[..., p] = 1.0, 0.25
    scales = (32, 256)
    loss = ours.FrequencyLoss(16000, scales, 64, log_l2)(x, x_hat)
    expected = 0.0
    for s in scales:
        h = s // 4
        w = torch.hann_window(s)
        frames = torch.arange(T // h + 1)
        n = p - frames * h + s // 2  # the impulse's index in each (centred) frame
        amp = torch.where((n >= 0) & (n < s), w[n.clamp(0, s - 1)], torch.zeros(())) / math.sqrt(s)
        band = mel_filterbank(16000, s, 64, htk=True, norm=None).sum(1)[:, None]
        S_x, S_y = band * amp[None], band * 0.25 * amp[None]
        expected += (S_x - S_y).abs().mean()
        if log_l2:
            expected += (S_x.clamp(min=1e-5).log() - S_y.clamp(min=1e-5).log()).pow(2).mean()
        else:
            expected += (S_x - S_y).pow(2).mean().sqrt()
    assert loss.item() == pytest.approx(expected.item() / len(scales), rel=1e-4)


def test_discriminator_shapes_follow_section_3_4():
    run = ours.PRESETS["24khz"][1]
    disc = ours.MultiScaleSTFTDiscriminator(run)
    assert [d.window for d in disc.discriminators] == [2048, 1024, 512, 256, 128]
    out = disc(torch.randn(1, 2, 24000))  # stereo: each channel judged apart (§3.4)
    for (logits, features), w in zip(out, run.disc_windows):
        frames = (24000 - w) // (w // 4) + 1  # center=False
        assert len(features) == 5 and all(f.shape[:2] == (2, 32) for f in features)
        # frequency: W/2 + 1 bins, one fewer after the first conv (kernel 8, padding 3), then
        # halved by each of the three strided convs
        bins = w // 2
        for _ in range(3):
            bins = (bins - 2) // 2 + 1
        assert logits.shape == (2, frames, bins)

# -------------------------------------------------------------------------------------------------
# Training


def test_the_step_balances_and_logs_what_it_did():
    torch.manual_seed(0)
    trainer = ours.Trainer(MINI_CFG, MINI_RUN)
    stats = trainer.step(demo_batch(), diagnose=True)
    for k in ("d", "t", "f", "g", "feat", "commit", "|g_t|", "|g_f|", "|g_g|", "|g_feat|", "|G|",
              "|D|", "z_rms", "dc", "ppl", "dead", "kbps"):
        assert k in stats, k
    assert stats["kbps"] in MINI_CFG.bandwidths and len(stats["ppl"]) == MINI_CFG.num_quantizers


def test_the_codec_gets_the_balanced_gradient_and_the_commitment():
    """Trainer.step sends exactly Balancer(grads at x_hat) into the codec, plus lambda_w times the
    commitment's gradient: replaying it by hand gives the same parameter gradients."""
    torch.manual_seed(0)
    run = dataclasses.replace(MINI_RUN, lambda_w=0.7, disc_prob=0.0)  # D fixed: ref sees the same
    trainer = ours.Trainer(MINI_CFG, run)
    x = demo_batch()
    trainer.step(x)  # k-means, EMA and the balancer's first norms
    ref = ours.Trainer(MINI_CFG, run)
    ref.model.load_state_dict(trainer.model.state_dict())
    ref.disc.load_state_dict(trainer.disc.state_dict())
    ref.balancer.load_state_dict(trainer.balancer.state_dict())
    ref.step_count = trainer.step_count
    bandwidth, _ = trainer.draws()
    state = torch.get_rng_state()
    trainer.opt_g.step = lambda: None  # keep the gradients, skip the update
    trainer.step(x)
    torch.set_rng_state(state)
    ref.model.train()
    x_hat, codes, aux = ref.model(x, ref.model.n_q_for_bandwidth(bandwidth))
    ref.disc.requires_grad_(False)
    real, fake = ref.disc(x), ref.disc(x_hat)
    losses = {"t": F_l1(x_hat, x), "f": ref.freq_loss(x, x_hat),
              "g": ours.adversarial_loss(fake), "feat": ours.feature_loss(real, fake)}
    grads = {k: torch.autograd.grad(v, x_hat, retain_graph=True)[0] for k, v in losses.items()}
    g, _, _ = ref.balancer(grads)
    torch.autograd.backward([x_hat, aux["commit"]], [g, torch.tensor(0.7)])
    scale = min(1.0, run.grad_clip / (torch.stack([p.grad.norm() for p in ref.model.parameters()
                                                    if p.grad is not None]).norm() + 1e-6))
    for (name, a), b in zip(trainer.model.named_parameters(), ref.model.parameters()):
        if b.grad is not None:
            assert torch.allclose(a.grad, scale * b.grad, rtol=1e-3, atol=1e-7), name


def F_l1(a, b):
    return (a - b).abs().mean()


def test_overfitting_one_batch_with_the_gan_terms():
    """Eq. 4 through the balancer with every term on (the GAN terms 6/7.1 of the gradient, as in
    the paper): the reconstruction of one batch still improves."""
    torch.manual_seed(0)
    run = dataclasses.replace(MINI_RUN, lr=1e-2)
    cfg = dataclasses.replace(MINI_CFG, bandwidths=(0.8,))
    trainer = ours.Trainer(cfg, run)
    x = demo_batch()
    history = [trainer.step(x) for _ in range(50)]
    first, last = np.mean([h["f"] for h in history[:3]]), np.mean([h["f"] for h in history[-5:]])
    assert last < 0.75 * first, (first, last)
    assert all(h["g"] > 0 and h["feat"] > 0 and h["|g_g|"] > 0 for h in history)


def test_the_discriminator_step_lowers_its_hinge_loss():
    """One D update (Trainer.step) lowers L_d on the very pair it was computed on. (Whether D
    wins a long overfit is chaotic at these sizes: it changed with the thread count.)"""
    torch.manual_seed(0)
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, lr=1e-2))
    x = demo_batch()
    seen, forward = [], trainer.model.forward
    trainer.model.forward = lambda *a, **k: seen.append(forward(*a, **k)) or seen[-1]
    stats = trainer.step(x)
    with torch.no_grad():
        after = ours.discriminator_loss(trainer.disc(x), trainer.disc(seen[0][0].detach()))
    assert after.item() < stats["d"] - 2e-4, (stats["d"], after.item())


def run_training(tmp_path, name, **kwargs):
    return ours.train(MINI_CFG, dataclasses.replace(MINI_RUN, out=str(tmp_path / name)), **kwargs)


def test_resume_continues_bit_exactly_and_refuses_to_overwrite(tmp_path, capsys):
    full = run_training(tmp_path, "full")
    first = run_training(tmp_path, "split", interrupt_after=3)
    assert len(first) == 3 and "continue with" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        run_training(tmp_path, "split")
    rest = run_training(tmp_path, "split", resume=True)
    assert first + rest == full  # losses, bandwidths, D draws, balancer: to the last bit
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["config"] == dataclasses.asdict(MINI_CFG) and "out" not in a["config"]
    assert len({h["kbps"] for h in full}) > 1  # the bandwidth is drawn per batch (§3.2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank_, world_, device = ours.setup_distributed()
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, batch_size=4), rank_, world_,
                           device)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    stats = [trainer.step(0.3 * torch.randn(2, 1, 3200, generator=g)) for _ in range(3)]
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({"disc." + k: v.clone() for k, v in trainer.disc.state_dict().items()})
    state["kbps"] = torch.tensor([s["kbps"] for s in stats])
    torch.save(state, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_codebooks_and_weights_identical(tmp_path):
    mp.spawn(_ddp_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    codebooks = [k for k in a if k.startswith("quantizer.")]
    assert codebooks and all(torch.equal(a[k], b[k]) for k in codebooks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights, bandwidths and D draws
    assert a["quantizer.layers.0.inited"].item() == 1

# -------------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    with_random_codebooks(ours.EnCodec(MINI_CFG)).save(path)
    return path


def test_bad_tensors_and_configs_get_clear_errors():
    model = with_random_codebooks(ours.EnCodec(MINI_CFG))
    x = torch.zeros(1, 1, 1600)
    cases = [
        (lambda: model.encode(x, sample_rate=44100), "expects 16000 Hz"),
        (lambda: model.encode(torch.zeros(1, 2, 1600)), "takes 1 channel"),
        (lambda: model.encode(torch.zeros(1600)), r"\(batch, 1, samples\)"),
        (lambda: model.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: model.encode(torch.full((1, 1, 1600), float("nan"))), "NaN"),
        (lambda: model.encode(torch.zeros(1, 1, 1600, dtype=torch.int16)), "float tensor"),
        (lambda: model.encode(x, n_q=5), "n_q must be in 1..4"),
        (lambda: model.encode(x, bandwidth=1.5), "codes 0.2, 0.4, 0.8 kbps; got 1.5"),
        (lambda: model.encode(x, n_q=2, bandwidth=0.4), "not both"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, kmeans_iters=0)), "at least 1"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, codebook_size=1)), "at least 2"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, betas=(0.5,))), "pairs"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, normalize=True)).streaming().__enter__(),
         "only a causal model without segments or normalisation"),
        (lambda: model.decode(torch.zeros(1, 5, 3, dtype=torch.long)), "5 codebooks; this model"),
        (lambda: model.decode(torch.full((1, 2, 3), 16)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.full((1, 2, 3), -1)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.zeros(1, 2, 3)), "integer tensor"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, norm="batch")), "norm must be one"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, norm="time_group_norm")),
         "cannot be causal"),
        (lambda: ours.EnCodec(dataclasses.replace(MINI_CFG, bandwidths=(1.6,))),
         "needs 8 codebooks of 0.2 kbps; the model has 1..4"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, amp="fp61")), "amp must be"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, segment_seconds=0.05)),
         r"gives 800 samples; the training losses need at least 1025"),
        (lambda: ours.EnCodec.from_official({"encoder.model.0.conv.conv.weight_v":
                                             torch.zeros(8, 1, 7)}), "neither released model"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_checkpoints_from_other_models_or_versions_are_refused(tmp_path, mini_ckpt):
    other = tmp_path / "soundstream.pt"
    torch.save({"model": "soundstream", "config": {}, "state_dict": {}}, other)
    with pytest.raises(ValueError, match="'soundstream' checkpoint, not a 'encodec' one"):
        ours.EnCodec.load(other)
    old = torch.load(mini_ckpt, weights_only=True)
    old["config"]["data"] = "x"
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"unknown Config field\(s\) data"):
        ours.EnCodec.load(tmp_path / "old.pt")
    assert ours.EnCodec.load(mini_ckpt).cfg == MINI_CFG


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "encodec.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_round_trip_official_weights_and_clear_errors(tmp_path, mini_ckpt, official):
    from common.audio import save
    wav = 0.3 * torch.sin(torch.arange(44100 * 2) / 44100 * 2 * math.pi * 220)
    save(tmp_path / "in.wav", torch.stack([wav, wav]), 44100)  # stereo 44.1 kHz: converted
    r = cli("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "codes.npz",
            "--bandwidth", 0.4)
    assert r.returncode == 0, r.stderr
    assert "converted 44100 Hz, 2 ch -> 16000 Hz, 1 ch" in r.stderr
    npz = np.load(tmp_path / "codes.npz")
    assert npz["codes"].shape == (2, 100) and int(npz["num_samples"]) == 32000
    r = cli("--decode", tmp_path / "codes.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "out.wav")
    assert r.returncode == 0, r.stderr
    r = cli("--reconstruct", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out",
            tmp_path / "rec.wav", "--streaming", "--metrics", "mel,stoi")
    assert r.returncode == 0 and "stoi" in r.stdout and "rec.png" in r.stdout, r.stderr
    # Meta's weight file, as torch.hub stores it (random weights here): 48 kHz stereo, scales
    torch.save(official_model(official, "48khz").state_dict(), tmp_path / "encodec_48khz.th")
    r = cli("--encode", tmp_path / "in.wav", "--official", tmp_path / "encodec_48khz.th",
            "--out", tmp_path / "c48.npz", "--bandwidth", 6)
    assert r.returncode == 0 and "4 codebooks x 303 frames" in r.stdout, r.stderr  # 150+150+3
    assert np.load(tmp_path / "c48.npz")["scale"].shape == (3,)  # 2 s: three 1 s segments
    r = cli("--decode", tmp_path / "c48.npz", "--official", tmp_path / "encodec_48khz.th", "--out",
            tmp_path / "o48.wav")
    assert r.returncode == 0, r.stderr
    out = ["--out", tmp_path / "x.wav"]
    for args, message in [
        (("--reconstruct", tmp_path / "missing.wav", "--ckpt", mini_ckpt, *out), "not found"),
        (("--decode", tmp_path / "c48.npz", "--ckpt", mini_ckpt, *out), "48000 Hz, 150 frames/s"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, *out, "--bandwidth", 3),
         "codes 0.2, 0.4, 0.8 kbps; got 3"),
        (("--encode", tmp_path / "in.wav", *out), "give --ckpt"),
        (("--encode", tmp_path / "in.wav", "--official", tmp_path / "in.wav", *out),
         "in.wav is not"),
        (("--reconstrct", tmp_path / "in.wav"), "unknown flag --reconstrct; did you mean --recon"),
        (("--train", "--preset", "tiny", "--segment_seconds", 0.05, "--out", tmp_path / "r"),
         "gives 800 samples; the training losses need at least 1025"),
    ]:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

# -------------------------------------------------------------------------------------------------
# Entropy coding (§3.3): the arithmetic coder and the bit packer, against the official ones


def coder_cases():
    """(probability vectors, symbols): random, adversarial (near-zero and near-one
    probabilities, the least likely symbol every time, one symbol only, long runs)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for K, sharpness, pick in [(1024, 1, "sample"), (17, 5, "sample"), (2, 20, "least"),
                               (3, 30, "most"), (1, 1, "most"), (1024, 50, "least")]:
        pdfs = [torch.softmax(sharpness * torch.randn(K, generator=g), 0) for _ in range(200)]
        if pick == "sample":
            symbols = [int(torch.multinomial(p, 1, generator=g)) for p in pdfs]
        else:
            symbols = [int(p.argmin() if pick == "least" else p.argmax()) for p in pdfs]
        cases.append((pdfs, symbols))
    return cases


def test_arithmetic_coder_is_the_official_one_bit_for_bit_and_near_the_ideal_length(official):
    """Every case round-trips exactly, within 2 % + 40 bits of -sum log2 p (p the quantized
    probabilities); where the official CDF is valid, the bytes are the official coder's. Where it
    is not (DEVIATION 5: float32 probabilities summing above 1 end its CDF past 2^24), the
    official stream decodes wrongly and ours does not."""
    import io
    ac = importlib.import_module("official_encodec.quantization.ac")
    overflowed = lost = 0
    for pdfs, symbols in coder_cases():
        ours_io, theirs_io = io.BytesIO(), io.BytesIO()
        mine, theirs = ours.ArithmeticCoder(ours_io), ac.ArithmeticCoder(theirs_io)
        ideal, affected = 0.0, False
        for p, s in zip(pdfs, symbols):
            cdf, official_cdf = ours.quantized_cdf(p), ac.build_stable_quantized_cdf(p, 24, check=False)
            assert int(cdf[-1]) <= 2 ** 24 and (cdf[1:] - cdf[:-1] >= 2).all() and cdf[0] >= 2
            over = official_cdf[-1] > 2 ** 24
            recut = over and len(p) > 1 and 2 ** 24 - official_cdf[-2] < 2  # rarer: re-cut
            if over:
                overflowed += 1
                affected |= recut or s == len(p) - 1  # the official codes past its interval
            if not recut:  # every piece but an overflowing last one is the official one
                assert torch.equal(cdf[:-1], official_cdf[:-1])
            mine.push(s, cdf)
            theirs.push(s, official_cdf)
            width = int(cdf[s]) - (int(cdf[s - 1]) if s else 0)
            ideal -= math.log2(width / 2 ** 24)  # -log2 of the quantized probability
        mine.flush()
        theirs.flush()
        ours_io.seek(0)
        decoder = ours.ArithmeticDecoder(ours_io)
        assert [decoder.pull(ours.quantized_cdf(p)) for p in pdfs] == symbols
        bits = 8 * len(ours_io.getvalue())
        print(f"K {len(pdfs[0]):4}: {bits} bits coded, {ideal:.1f} ideal, margin {bits - ideal:.1f}")
        # the final flush (<= 24 bits), the last byte, and the rounding of each piece to whole
        # units (up to a bit per symbol of the minimum width 2 / 2^24)
        assert ideal <= bits <= 1.02 * ideal + 40
        if not affected:
            assert ours_io.getvalue() == theirs_io.getvalue()
        else:
            theirs_io.seek(0)
            official_decoder = ac.ArithmeticDecoder(theirs_io)
            decoded = [official_decoder.pull(ac.build_stable_quantized_cdf(p, 24, check=False))
                       for p in pdfs]
            lost += decoded != symbols  # the official stream decodes to other symbols
    assert overflowed >= 1 and lost >= 1  # the adversarial cases hit the official overflow


def test_bit_packer_round_trips_and_is_the_official_one(official):
    import io
    binary = importlib.import_module("official_encodec.binary")
    g = torch.Generator().manual_seed(0)
    for bits in (1, 5, 10, 11, 16):
        values = torch.randint(2 ** bits, (101,), generator=g).tolist()
        a, b = io.BytesIO(), io.BytesIO()
        pa, pb = ours.BitPacker(bits, a), binary.BitPacker(bits, b)
        for v in values:
            pa.push(v)
            pb.push(v)
        pa.flush()
        pb.flush()
        assert a.getvalue() == b.getvalue() and len(a.getvalue()) == math.ceil(101 * bits / 8)
        a.seek(0)
        unpacker = ours.BitUnpacker(bits, a)
        assert [unpacker.pull() for _ in values] == values


def test_entropy_lm_equals_the_official_one_frame_by_frame(official):
    """§3.3's LM with the official LM's (random) weights: the same probabilities for every frame,
    fed one frame at a time with its state, past its 3.5 s context (262 frames at 75 Hz)."""
    model_mod = importlib.import_module("official_encodec.model")
    torch.manual_seed(0)
    ref = model_mod.LMModel(4, 1024, num_layers=5, dim=200, past_context=int(3.5 * 75)).eval()
    codec = ours.EnCodec(dataclasses.replace(ours.PRESETS["24khz"][0], n_filters=2, lstm_layers=1,
                                             num_quantizers=4, bandwidths=(3.0,)))
    lm = ours.EntropyLM.from_official(ref.state_dict(), codec)
    assert lm.past_context == 262
    codes = torch.randint(1024, (1, 4, 270))
    previous, a, b = torch.zeros(1, 4, 1, dtype=torch.long), (None, 0), (None, 0)
    with torch.no_grad():
        for t in range(270):
            p_ref, *a = ref(previous, *a)
            p, *b = lm(previous, *b)
            assert torch.allclose(p, p_ref, atol=1e-6, rtol=0), t
            previous = 1 + codes[:, :, t:t + 1]


@pytest.mark.parametrize("name, bandwidths, use_lm", [("24khz", (1.5, 6.0), False),
                                                     ("24khz", (3.0,), True),
                                                     ("48khz", (6.0,), False),
                                                     ("48khz", (3.0,), True)])
def test_ecdc_files_are_the_official_ones_both_ways(official, name, bandwidths, use_lm):
    """The official tool's .ecdc bytes equal ours, for both models, with and without the LM, and
    each decompresses the other's (random weights: the package's model table and LM loader are
    pointed at them, as it would download them otherwise)."""
    compress_mod = importlib.import_module("official_encodec.compress")
    model_mod = importlib.import_module("official_encodec.model")
    ref = official_model(official, name)
    ref.name = f"encodec_{name}"
    torch.manual_seed(2)
    ref_lm = model_mod.LMModel(ref.quantizer.n_q, 1024, num_layers=5, dim=200,
                               past_context=int(3.5 * ref.frame_rate)).eval()
    ref.get_lm_model = lambda: ref_lm
    compress_mod.MODELS = {ref.name: lambda: ref}
    model = ours.EnCodec.from_official(ref.state_dict())
    lm = ours.EntropyLM.from_official(ref_lm.state_dict(), model) if use_lm else None
    T = {"24khz": 24000 // 3 + 77, "48khz": 48000 + 961}[name]  # odd; 48 kHz: two segments
    wav = 0.1 * torch.randn(model.channels, T)
    for bw in bandwidths:
        ref.set_target_bandwidth(bw)
        theirs = compress_mod.compress(ref, wav, use_lm=use_lm)
        mine = ours.compress(model, wav, bandwidth=bw, lm=lm)
        assert mine == theirs, bw
        y, codes = ours.decompress(theirs, model, lm)
        assert torch.equal(codes, model.encode(wav[None], bandwidth=bw).codes)
        y_ref, sr = compress_mod.decompress(mine)
        assert sr == model.sample_rate and y.shape == y_ref.shape == wav.shape
        assert (y - y_ref).abs().max() < 1e-5


def test_bad_ecdc_files_get_one_line_errors(tmp_path):
    model = with_random_codebooks(ours.EnCodec(MINI_CFG))
    wav = 0.1 * torch.randn(1, 3200)
    good = ours.compress(model, wav, bandwidth=0.4)
    y, codes = ours.decompress(good, model)
    assert y.shape == wav.shape and codes.shape == (1, 2, 10)
    lm = ours.EntropyLM(MINI_CFG.num_quantizers, MINI_CFG.codebook_size, 50).eval()
    with_lm = ours.compress(model, wav, bandwidth=0.4, lm=lm)
    assert torch.equal(ours.decompress(with_lm, model, lm)[1], codes)
    other = ours.EnCodec(dataclasses.replace(ours.PRESETS["24khz"][0], n_filters=2, lstm_layers=1))
    for data, who, message in [
        (good[:-1], model, "truncated .ecdc file: it ends inside the codes"),
        (good[:5], model, "truncated .ecdc file: it ends inside the header"),
        (b"RIFF" + good[4:], model, "not an .ecdc file"),
        (good, other, "written by model 'encodec-16000hz-1ch-4x16'; the model given is "
                      "'encodec-24000hz-1ch-32x1024'"),
        (with_lm, model, "compressed with the entropy-coding LM"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours.decompress(data, who, None)


def test_cli_compress_and_decompress(tmp_path, mini_ckpt):
    from common.audio import save
    save(tmp_path / "in.wav", 0.1 * torch.randn(1, 16000), 16000)
    lm = ours.EntropyLM(MINI_CFG.num_quantizers, MINI_CFG.codebook_size, 50)
    torch.save(lm.state_dict(), tmp_path / "lm.th")
    for extra in ([], ["--lm", tmp_path / "lm.th"]):
        r = cli("--compress", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out",
                tmp_path / "x.ecdc", "--bandwidth", 0.8, *extra)
        assert r.returncode == 0 and "kbps achieved against 0.8 kbps nominal" in r.stdout, r.stderr
        r = cli("--decompress", tmp_path / "x.ecdc", "--ckpt", mini_ckpt, "--out",
                tmp_path / "y.wav", *extra)
        assert r.returncode == 0 and "1.00 s" in r.stdout, r.stderr
    r = cli("--decompress", tmp_path / "x.ecdc", "--ckpt", mini_ckpt, "--out", tmp_path / "y.wav")
    assert r.returncode != 0 and "compressed with the entropy-coding LM" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("--compress", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "z.ecdc",
            "--lm", tmp_path / "in.wav")
    assert r.returncode != 0 and "not an entropy-coding LM" in r.stderr and "Traceback" not in r.stderr


def test_entropy_lm_training_learns_resumes_exactly_and_its_weights_code_files(tmp_path, mini_ckpt):
    """§3.3's LM trained on a codec's codes (a random mini codec: its codes still have structure,
    silence): bits per code fall below log2 K, the run resumes bit for bit, and OUT/model.pt is an
    --lm for compress."""
    from common.data import resolve_files
    folder = tmp_path / "data"  # a few files: encoding all 281 would take most of the test
    folder.mkdir()
    for f in resolve_files(None, "train")[:8]:
        (folder / f.name).symlink_to(f)
    run = dataclasses.replace(MINI_RUN, steps=8, lr=3e-3, lm_seconds=0.4, batch_size=4,
                              data=str(folder))
    full = ours.train_lm(mini_ckpt, dataclasses.replace(run, out=str(tmp_path / "full")))
    first = ours.train_lm(mini_ckpt, dataclasses.replace(run, out=str(tmp_path / "split")),
                          interrupt_after=3)
    rest = ours.train_lm(mini_ckpt, dataclasses.replace(run, out=str(tmp_path / "split")),
                         resume=True)
    assert first + rest == full
    assert full[-1]["bits_per_code"] < full[0]["bits_per_code"] < math.log2(16) + 0.5
    codec = ours.EnCodec.load(mini_ckpt)
    lm = ours.EntropyLM.from_official(tmp_path / "full" / "model.pt", codec)
    wav = load_demo_utterance(codec)
    data = ours.compress(codec, wav, lm=lm)
    assert torch.equal(ours.decompress(data, codec, lm)[1], codec.encode(wav[None]).codes)


def load_demo_utterance(codec):
    from common.audio import load
    (f, _), = ours.eval_utterances("", 1)
    return load(f, codec.sample_rate, codec.channels)[0]
