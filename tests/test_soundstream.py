"""Tests of soundstream.py: every equation on tiny hand-made inputs, the quantizer's algorithms on
hand-made cases, streaming == offline, a GAN that learns, exact resume, DDP on CPU, and clear
errors on bad input.

How to test a GAN cheaply: tiny shapes (MINI below: a 4-channel codec, 0.2 s crops, batch 2), a
handful of steps, and hand-computed values for each loss term, so that one wrong line (a mean
for a sum, a missing mask or detach, a hop) changes a number the test knows."""

import copy
import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import soundstream as ss
from common import evaluation
from common.audio import load, save
from common.data import AudioDataset, resolve_files
from common.metrics import mel_filterbank

ROOT = Path(__file__).resolve().parent.parent

# a very small model and run for the tests (seconds per step -> tens of milliseconds)
TINY_CFG, TINY_RUN = ss.PRESETS["tiny"]
MINI_CFG = dataclasses.replace(TINY_CFG, enc_channels=4, dec_channels=4, latent_dim=8,
                               num_quantizers=4, codebook_size=16, kmeans_iters=2)
MINI_RUN = dataclasses.replace(TINY_RUN, wave_disc_channels=4, wave_disc_max_channels=16,
                               stft_disc_channels=4, stft_window=256, stft_hop=64, batch_size=2,
                               segment_seconds=0.2, steps=6, log_every=1, sample_every=1000,
                               ckpt_every=1000, eval_utterances=1, threads=1, gan_start=0,
                               lr_decay=1.0)


def demo_batch(n=2, segment=3200):
    ds = AudioDataset(resolve_files(None, "train")[:n], 16000, segment=segment)
    return torch.stack([ds[i] for i in range(n)])  # (n, 1, segment): real utterances

# -------------------------------------------------------------------------------------------------
# Presets and arithmetic


@pytest.mark.parametrize("name, sr, frame_rate, n_q, kbps_per_q", [
    ("paper", 24000, 75.0, 24, 0.75),   # §III-C: M = 320 at 24 kHz -> 75 frames/s, 10 bits
    ("audiolm", 16000, 50.0, 12, 0.5),  # AudioLM: 50 Hz, 12 x 1024 = 6 kbps
    ("tiny", 16000, 50.0, 8, 0.25),     # 5-bit codebooks (K = 32)
])
def test_frame_counts_and_bitrates(name, sr, frame_rate, n_q, kbps_per_q):
    model = ss.SoundStream(ss.PRESETS[name][0]).eval()
    assert (model.sample_rate, model.hop_length, model.frame_rate) == (sr, 320, frame_rate)
    assert model.num_codebooks == n_q and model.channels == 1
    assert model.bitrate(1) == pytest.approx(kbps_per_q * 1000)
    assert model.bitrate() == pytest.approx(n_q * kbps_per_q * 1000)
    for T in (1, 319, 321):  # any length: ceil(T / M) frames, decoded to F * M samples
        codes = model.encode(torch.zeros(2, 1, T))
        assert codes.shape == (2, n_q, math.ceil(T / 320)) and codes.dtype == torch.int64
        assert model.decode(codes).shape == (2, 1, math.ceil(T / 320) * 320)
    assert model.encode(torch.zeros(1, 1, 640), n_q=1).shape == (1, 1, 2)


def test_bitrates_map_to_quantizers():
    model = ss.SoundStream(ss.PRESETS["paper"][0])
    # §V: 3, 6, 12 and 18 kbps with 1024-entry codebooks at 75 Hz
    assert [model.n_q_for_bitrate(k) for k in (3, 6, 12, 18)] == [4, 8, 16, 24]
    tiny = ss.SoundStream(TINY_CFG)
    assert [tiny.n_q_for_bitrate(k) for k in (0.25, 1, 2)] == [1, 4, 8]
    for kbps in (0.1, 3, 0.3):  # below, above, between the steps
        with pytest.raises(ValueError, match=r"codes 0.25 to 2 kbps in steps of 0.25 \(8 quant"):
            tiny.n_q_for_bitrate(kbps)


def test_paper_preset_is_the_paper():
    cfg, run = ss.PRESETS["paper"]
    assert (cfg.sample_rate, cfg.enc_channels, cfg.dec_channels, cfg.strides) == \
        (24000, 32, 32, (2, 4, 5, 8))
    assert (cfg.codebook_size, cfg.num_quantizers, cfg.ema_decay, cfg.dead_code_threshold) == \
        (1024, 24, 0.99, 2.0)
    assert (run.lambda_rec, run.commitment_weight) == (1.0, 0.25)  # lambda_rec; VQ-VAE's beta
    assert (run.stft_window, run.stft_hop, run.mel_bins) == (1024, 256, 64)
    assert run.mel_scales == tuple(2 ** i for i in range(6, 12))
    model = ss.SoundStream(cfg)
    # the layers of §III-A/B: 9,183,233 weights + 5,121 per latent dimension (D = 128: our choice)
    assert sum(p.numel() for p in model.parameters()) == 9_183_233 + 5_121 * 128
    block = model.encoder[1]  # Fig. 3: dilations 1, 3, 9, kernel 7, in every encoder block
    assert [block[i].block[1].dilation[0] for i in range(3)] == [1, 3, 9]
    assert [block[i].block[1].kernel_size[0] for i in range(3)] == [7, 7, 7]
    assert [model.encoder[i + 1][-1].stride[0] for i in range(4)] == [2, 4, 5, 8]


def test_discriminator_shapes_follow_section_III_D():
    d = ss.Discriminators(ss.PRESETS["paper"][1])
    T = 24000
    out = d(torch.randn(1, 1, T))
    assert len(out) == 4  # k = 0 (STFT) and three wave resolutions (K = 3)
    logits, feats = out[0]
    # §III-D: about T / (H * 2^3) logits: 1 + T // H = 94 centred frames -> 47 -> 23 -> 11 by the
    # three time strides of 2 (kernel 4, padding 1); F / 2^6 = 8 bins left for the 1 x 8 conv
    assert logits.shape == (1, 11)
    assert feats[-1].shape[-1] == 512 // 2 ** 6 and len(feats) == 7
    assert [f.shape[1] for f in feats] == [32, 64, 128, 128, 256, 256, 512]  # Fig. 4, C = 32
    # the wave discriminators see 1x, 1/2x and 1/4x; each logit covers 4^4 = 256 input samples
    assert [lg.shape[-1] for lg, _ in out[1:]] == [math.ceil(T / 256), math.ceil(T / 512),
                                                   math.ceil(T / 1024)]
    assert [f.shape[1] for f in out[1][1]] == [16, 64, 256, 1024, 1024, 1024]  # MelGAN, max 1024

# -------------------------------------------------------------------------------------------------
# The quantizer, on tiny deterministic cases


def make_vq(size=2, dim=2, decay=0.5, threshold=0.1):
    vq = ss.VectorQuantizer(dim, size, decay, threshold, kmeans_iters=10)
    vq.initialized.fill_(True)
    return vq


def test_ema_update_follows_vq_vae_2():
    vq = make_vq()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.cluster_size.copy_(torch.tensor([1.0, 1.0]))
    vq.embed_sum.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])  # two frames to entry 0, one to 1
    codes, q = vq.train()(z)
    assert codes.tolist() == [0, 0, 1]
    assert torch.equal(q, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))  # pre-update
    # decay 0.5: counts 0.5*1 + 0.5*2 = 1.5 and 1; sums 0.5*0 + 0.5*(4,4), 0.5*10 + 0.5*9
    assert torch.allclose(vq.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.embed_sum, torch.tensor([[2.0, 2.0], [9.5, 9.5]]))
    n, eps = 2.5, vq.eps  # Laplace smoothing of the counts
    smoothed = (torch.tensor([1.5, 1.0]) + eps) / (n + 2 * eps) * n
    assert torch.allclose(vq.codebook, vq.embed_sum / smoothed[:, None])
    assert torch.allclose(vq.codebook, torch.tensor([[4 / 3, 4 / 3], [9.5, 9.5]]), atol=1e-4)
    assert int(vq.replaced) == 0
    before = vq.codebook.clone()
    vq.eval()(z)  # no update in eval mode
    assert torch.equal(vq.codebook, before)


def test_kmeans_initialization_finds_the_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = (centers[:, None] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    vq = ss.VectorQuantizer(2, 4, 0.99, 2.0, kmeans_iters=20).train()
    assert not vq.initialized
    vq(z)  # the first training batch runs k-means (§III-C)
    assert vq.initialized
    assert torch.cdist(centers, vq.codebook).min(dim=1).values.max() < 0.1
    # every entry starts as `threshold` assignments of itself, then one EMA step with 50 frames
    assert torch.allclose(vq.cluster_size, torch.full((4,), 0.99 * 2 + 0.01 * 50))


def test_dead_codes_are_replaced_by_batch_vectors():
    vq = make_vq(size=3, decay=0.99, threshold=2.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    vq.cluster_size.copy_(torch.tensor([10.0, 10.0, 2.0]))  # entry 2: at the threshold, unused
    vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.0, 0.9], [0.9, 1.0]])
    torch.manual_seed(0)
    vq.train()(z)
    # entry 2's count decayed to 1.98 < 2: it now holds a vector of the batch, fresh statistics
    assert any(torch.equal(vq.codebook[2], v) for v in z)
    assert vq.cluster_size[2] == 2.0 and torch.equal(vq.embed_sum[2], vq.codebook[2] * 2.0)
    assert int(vq.replaced) == 1  # counted for the log line
    # the used entries were only EMA-updated, towards their inputs (0.99 * 10 + 0.01 * 2 > 2)
    assert torch.allclose(vq.codebook[0], torch.tensor([0.0, 0.0]), atol=0.01)
    assert torch.allclose(vq.codebook[1], torch.tensor([1.0, 1.0]), atol=0.01)
    assert vq.cluster_size[0] == pytest.approx(0.99 * 10 + 0.01 * 2)


def test_residual_energy_falls_as_quantizers_are_added():
    cfg = dataclasses.replace(MINI_CFG, latent_dim=16, num_quantizers=6, codebook_size=32,
                              kmeans_iters=10)
    rvq = ss.ResidualVectorQuantizer(cfg)
    torch.manual_seed(0)
    z = torch.randn(8, 16, 50)  # (B, D, L)
    rvq.train()(z)  # k-means init of every layer on its residual
    rvq.eval()
    errors = [(z - rvq.decode(rvq(z, n_q)[1])).pow(2).mean().item() for n_q in range(1, 7)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0]
    z_q, codes, _ = rvq(z, 3)  # Algorithm 1: decoding the codes gives the quantized latent
    assert torch.allclose(z_q, rvq.decode(codes), atol=1e-6)


def test_quantizer_dropout_draws_every_n_q_uniformly():
    cfg = dataclasses.replace(MINI_CFG, latent_dim=4, num_quantizers=5, codebook_size=8)
    rvq = ss.ResidualVectorQuantizer(cfg).train()
    torch.manual_seed(0)
    z = torch.randn(64, 4, 3)
    rvq(z)  # the first training forward runs k-means; start after it
    seen = []
    for _ in range(6):
        snapshot = ss.ResidualVectorQuantizer(cfg)  # the codebooks this forward quantizes with
        snapshot.load_state_dict(rvq.state_dict())
        z_q, codes, _ = rvq(z)
        for b in range(z.shape[0]):  # which prefix of the codes is example b's z_q?
            prefix = [n for n in range(1, 6)
                      if torch.allclose(z_q[b], snapshot.decode(codes[b:b + 1, :n])[0], atol=1e-5)]
            assert prefix
            seen.append(prefix[0])
    counts = np.bincount(seen, minlength=6)[1:]
    assert counts.min() > 0.1 * len(seen), counts  # all of 1..N_q, about uniformly (0.2 each)
    assert codes.shape[1] == 5  # every quantizer still runs on every frame (DEVIATION 5)


def quantizer_by_hand(rvq, z, n_q_b):
    """The RVQ's commitment term and its gradient at z, computed independently with numpy:
    commit = sum_i mean_{frames of examples with n_q > i} ||r_i - Q_i(r_i)||^2."""
    B, D, L = z.shape
    r = z.detach().double().numpy().transpose(0, 2, 1).reshape(B * L, D)  # (N, D)
    active_b = np.repeat(n_q_b.numpy(), L)  # (N,)
    commit, grad = 0.0, np.zeros_like(r)
    for i, vq in enumerate(rvq.layers):
        cb = vq.codebook.double().numpy()
        q = cb[((r[:, None, :] - cb[None]) ** 2).sum(-1).argmin(1)]  # (N, D) nearest entries
        act = active_b > i
        if act.any():
            commit += ((r - q) ** 2).sum(1)[act].mean()
            grad[act] += 2 * (r - q)[act] / act.sum()  # every r_i has dr_i/dz = I (q detached)
        r = r - q
    return commit, grad.reshape(B, L, D).transpose(0, 2, 1)


def test_commitment_term_and_its_gradient_through_every_quantizer():
    """DEVIATION 4 by hand, with quantizer dropout masking it per example. Catches a commitment
    term that is averaged instead of summed, unmasked, or whose later quantizers lose their path
    to the encoder (the EnCodec issue #25 class of bug: a detached residual)."""
    cfg = dataclasses.replace(MINI_CFG, latent_dim=3, num_quantizers=3, codebook_size=4)
    rvq = ss.ResidualVectorQuantizer(cfg).eval()  # eval: the codebooks stay put
    torch.manual_seed(0)
    for vq in rvq.layers:
        vq.codebook.normal_()
    z = torch.randn(3, 3, 4, requires_grad=True)  # (B, D, L)
    n_q_b = torch.tensor([1, 3, 2])  # per example, as quantizer dropout would draw
    z_q, codes, commit = rvq(z, n_q_b)
    expected, expected_grad = quantizer_by_hand(rvq, z, n_q_b)
    assert commit.item() == pytest.approx(expected, rel=1e-5)
    commit.backward()
    assert torch.allclose(z.grad.double(), torch.from_numpy(expected_grad), atol=1e-5)
    # each quantizer's own term reaches z: the gradient differs from the first quantizer's alone
    first_only, _ = quantizer_by_hand(rvq, z, torch.tensor([1, 1, 1]))
    assert first_only < expected
    # the decoder input is the masked sum: example 0 uses Q_1 only, example 1 all three
    assert torch.allclose(z_q[0], rvq.decode(codes[:1, :1])[0], atol=1e-6)
    assert torch.allclose(z_q[1], rvq.decode(codes[1:2])[0], atol=1e-6)
    assert torch.allclose(z_q[2], rvq.decode(codes[2:, :2])[0], atol=1e-6)

# -------------------------------------------------------------------------------------------------
# Streaming, causality, FiLM, noise, DC


def test_streaming_equals_offline():
    torch.manual_seed(0)
    model = ss.SoundStream(dataclasses.replace(TINY_CFG, num_quantizers=4)).eval()
    M = model.hop_length
    x = 0.3 * torch.randn(2, 1, 23 * M)
    codes = model.encode(x)
    audio = model.decode(codes)
    with model.streaming():
        pieces, i = [], 0
        for n in [3, 1, 7, 1, 2, 5, 4]:  # chunks of 3, 1, 7, ... frames
            c = model.encode(x[..., i * M:(i + n) * M])
            pieces.append((c, model.decode(c)))
            i += n
    assert torch.equal(torch.cat([c for c, _ in pieces], dim=-1), codes)
    assert torch.allclose(torch.cat([a for _, a in pieces], dim=-1), audio, atol=1e-5)
    assert torch.equal(model.encode(x), codes)  # the state is dropped on leaving the block
    with model.streaming(), pytest.raises(ValueError, match="multiples of 320"):
        model.encode(x[..., :100])


def test_encoder_and_decoder_are_causal():
    torch.manual_seed(0)
    model = ss.SoundStream(TINY_CFG).eval()
    for conv in model.modules():  # non-zero biases, so that they are part of the check
        if isinstance(conv, (ss.CausalConv1d, ss.CausalConvTranspose1d)):
            torch.nn.init.normal_(conv.bias, std=0.1)
    x = 0.3 * torch.randn(1, 1, 20 * 320)
    y = x.clone()
    y[..., 10 * 320:] = 0.0  # change the future only: from frame 10 on
    with torch.no_grad():
        zx, zy = model.encode_latent(x, None), model.encode_latent(y, None)  # (1, D, 20)
    assert torch.equal(zx[..., :10], zy[..., :10]) and not torch.equal(zx, zy)
    codes = torch.randint(0, 32, (1, 8, 20))
    other = codes.clone()
    other[..., 10:] = torch.randint(0, 32, (1, 8, 10))
    a, b = model.decode(codes), model.decode(other)
    assert torch.equal(a[..., :10 * 320], b[..., :10 * 320]) and not torch.equal(a, b)


def test_untrained_output_has_no_dc():
    """PyTorch's default bias init gives an untrained output of mean +0.3..+0.5 (tiny, 3 seeds);
    the decoder's last bias is set so that silence decodes to silence, which removes it for
    speech too, while the other biases keep their default init (not zero)."""
    x = demo_batch(4, 6400)
    for seed in range(3):
        torch.manual_seed(seed)
        model = ss.SoundStream(TINY_CFG).train()
        x_hat, _, aux = model(x)
        assert abs(x_hat.mean().item()) < 1e-3 and x_hat.std().item() > 1e-2, seed
        with torch.no_grad():
            silence = model.decode_latent(model.encode_latent(torch.zeros(1, 1, 6400), None), None)
        # past the first frames, silence decodes to a frame-periodic ripple (transposed convs)
        # without DC
        assert abs(silence[..., -4 * 320:].mean().item()) < 1e-5, seed
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        assert len(biases) == 60 and sum(bool((b == 0).all()) for b in biases) == 0
        with torch.no_grad():  # the DC that the last bias takes away is really there
            model.decoder[-1].bias.zero_()
        assert abs(model(x)[0].mean().item()) > 0.1, seed
    torch.manual_seed(0)
    model = ss.SoundStream(TINY_CFG)
    x_hat, _, aux = model(x)
    assert aux["latent_rms"].item() == pytest.approx(
        model.encode_latent(x, None).pow(2).mean().sqrt().item(), rel=1e-5)


def test_film_switches_denoising_and_starts_as_identity():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MINI_CFG, film="encoder")
    model = ss.SoundStream(cfg).eval()
    x = 0.3 * torch.randn(1, 1, 1600)
    # Eq. 7 with the identity initialization: both modes give the same codes before training
    assert torch.equal(model.encode(x, denoise=True), model.encode(x, denoise=False))
    with torch.no_grad():
        model.film.linear.weight.normal_()
    assert not torch.equal(model.encode(x, denoise=True), model.encode(x, denoise=False))
    a = torch.randn(1, cfg.latent_dim, 5)  # a time-varying mode: one flag per frame
    per_frame = model.film(a, torch.tensor([[0, 0, 1, 1, 1]]).bool())
    assert torch.allclose(per_frame[..., :2], model.film(a, torch.tensor([False]))[..., :2])
    assert torch.allclose(per_frame[..., 2:], model.film(a, torch.tensor([True]))[..., 2:])
    with pytest.raises(ValueError, match="no denoising mode"):
        ss.SoundStream(MINI_CFG).encode(x, denoise=True)


def test_noise_mixing_builds_the_tuples_of_section_III_F():
    g = torch.Generator().manual_seed(0)
    clean = 0.5 * torch.randn(64, 1, 800, generator=g)
    noise = torch.stack([ss.coloured_noise(800, g) for _ in range(64)])  # (64, 1, 800)
    assert noise.mean(dim=-1).abs().max() < 1e-5  # no DC
    inputs, targets, denoise = ss.mix_noise(clean, noise, 0.5, g)
    assert inputs.abs().max() <= 1.0 + 1e-6
    noisy = ~torch.isclose(inputs, targets).all(dim=-1).squeeze(1)  # targets differ from inputs
    assert (noisy <= denoise).all()  # ...only when denoising is on
    assert noisy.any() and (denoise & ~noisy).any() and (~denoise).any()
    b = int(noisy.nonzero()[0])  # denoise on: the target is the clean crop, same gain
    ratio = targets[b] / clean[b]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)
    none = ss.mix_noise(clean, noise, 0.0, g)  # noisy_fraction 0: inputs are clean speech
    assert torch.equal(none[0], none[1])

# -------------------------------------------------------------------------------------------------
# Losses, by hand (Eqs. 1-5)

# Two discriminators of different depths, logits of different lengths: k = 0 has 2 layers and 3
# logits, k = 1 has 3 layers and 2 logits.
REAL = [(torch.tensor([[2.0, 0.5, -1.0]]), [torch.ones(1, 2, 2), torch.ones(1, 1, 3)]),
        (torch.tensor([[0.0, 3.0]]), [torch.zeros(1, 2), torch.zeros(1, 4), torch.zeros(1, 1)])]
FAKE = [(torch.tensor([[-2.0, 0.0, 0.5]]), [torch.zeros(1, 2, 2), 3 * torch.ones(1, 1, 3)]),
        (torch.tensor([[1.5, -0.5]]), [torch.ones(1, 2), torch.zeros(1, 4), 6 * torch.ones(1, 1)])]


def test_discriminator_hinge_loss_eq_1():
    # k = 0: mean(max(0, 1 - r)) = (0 + 0.5 + 2) / 3, mean(max(0, 1 + f)) = (0 + 1 + 1.5) / 3
    # k = 1: (1 + 0) / 2 and (2.5 + 0.5) / 2; the mean of the two discriminators
    expected = ((2.5 / 3 + 2.5 / 3) + (0.5 + 1.5)) / 2
    assert ss.discriminator_loss(REAL, FAKE).item() == pytest.approx(expected)


def test_adversarial_loss_eq_2():
    # k = 0: mean(max(0, 1 - f)) = (3 + 1 + 0.5) / 3; k = 1: (0 + 1.5) / 2
    assert ss.adversarial_loss(FAKE).item() == pytest.approx((1.5 + 0.75) / 2)


def test_feature_loss_eq_3():
    # k = 0: layer means 1 and 2 -> 1.5; k = 1: layer means 1, 0, 6 -> 7/3; the mean of the two
    assert ss.feature_loss(REAL, FAKE).item() == pytest.approx((1.5 + 7 / 3) / 2)
    # the real features are targets: no gradient flows into them
    real = [(lg, [f.clone().requires_grad_() for f in fs]) for lg, fs in REAL]
    fake = [(lg, [f.clone().requires_grad_() for f in fs]) for lg, fs in FAKE]
    ss.feature_loss(real, fake).backward()
    assert all(f.grad is None for _, fs in real for f in fs)
    # d/d fake of |fake - real| / (layer size * layers * discriminators): k = 1, layer 2 (1 value)
    assert fake[1][1][2].grad.item() == pytest.approx(1 / (1 * 3 * 2))


def reconstruction_by_hand(x, y, sample_rate, scales, n_mels):
    """Eqs. 4-5 as written, with an explicit numpy DFT (centred, reflect-padded frames, periodic
    Hann window, hop s/4), peak-1 mel triangles, norms over the bands, frames averaged."""
    total = 0.0
    for s in scales:
        hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(s) / s)
        fb = mel_filterbank(sample_rate, s, n_mels, htk=True, norm=None).double().numpy()
        mels = []
        for v in (x, y):
            v = np.pad(v, s // 2, mode="reflect")
            frames = np.stack([v[i:i + s] for i in range(0, len(v) - s + 1, s // 4)])  # (fr, s)
            spec = np.abs(np.fft.rfft(frames * hann, axis=1))  # (fr, s/2 + 1)
            mels.append(spec @ fb.T)  # (fr, n_mels)
        l1 = np.abs(mels[0] - mels[1]).sum(1)
        log_diff = np.log(np.maximum(mels[0], 1e-5)) - np.log(np.maximum(mels[1], 1e-5))
        l2 = np.sqrt((log_diff ** 2).sum(1) + 1e-12)
        total += (l1 + math.sqrt(s / 2) * l2).mean()
    return total


def test_reconstruction_loss_eqs_4_5_by_hand():
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(2, 1, 64, generator=g)
    y = 0.1 * torch.randn(2, 1, 64, generator=g)
    loss = ss.ReconstructionLoss(16000, (8, 16), 4)  # two scales, 4 mel bands
    expected = np.mean([reconstruction_by_hand(x[b, 0].double().numpy(), y[b, 0].double().numpy(),
                                               16000, (8, 16), 4) for b in range(2)])
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-4)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    silent = torch.zeros(1, 1, 64, requires_grad=True)  # the epsilon keeps the gradient finite
    loss(torch.zeros(1, 1, 64), silent).backward()
    assert torch.isfinite(silent.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 under autocast
        mixed = loss(x, y)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(expected, rel=1e-4)


def test_balance_by_hand():
    """DEVIATION 1 on hand-made gradients: per-example norms averaged over the batch, and each
    GAN term rescaled to its ratio of the reconstruction gradient's norm."""
    g_rec = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])  # per-example norms 5 and 1: mean 3
    g_adv = torch.tensor([[[0.0, 0.5]], [[0.5, 0.0]]])  # norms 0.5 and 0.5: mean 0.5
    g_feat = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # norms 1 and 1: mean 1
    out, norms = ss.balance({"rec": g_rec, "adv": g_adv, "feat": g_feat},
                            {"adv": 0.1, "feat": 0.5})
    assert [norms[k].item() for k in ("rec", "adv", "feat")] == pytest.approx([3.0, 0.5, 1.0])
    # g_rec + 0.1 * 3 / 0.5 * g_adv + 0.5 * 3 / 1 * g_feat
    assert torch.allclose(out, g_rec + 0.6 * g_adv + 1.5 * g_feat)
    out, _ = ss.balance({"rec": g_rec, "adv": 1e-6 * g_adv, "feat": g_feat},
                        {"adv": 0.1, "feat": 0.0})
    assert torch.allclose(out, g_rec + 0.6 * g_adv, atol=1e-5)  # however small the raw gradient


# -------------------------------------------------------------------------------------------------
# Training: balance, clipping, learning, exact resume, DDP


def test_the_step_balances_and_clips_and_logs_what_it_did():
    torch.manual_seed(0)
    trainer = ss.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, grad_clip=1e-3))
    x = demo_batch()
    stats = trainer.step(x, diagnose=True)
    for key in ("d", "adv", "feat", "rec", "commit", "|g_adv|", "|g_feat|", "|g_rec|", "|G|",
                "|D|", "z_rms", "dc", "dead"):
        assert math.isfinite(stats[key]), key
    assert len(stats["ppl"]) == MINI_CFG.num_quantizers
    # the gradients were clipped to 1e-3 after the step's norms were logged
    g_norm = torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm()
    d_norm = torch.cat([p.grad.flatten() for p in trainer.disc.parameters()]).norm()
    assert stats["|G|"] > 1e-2 and g_norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert stats["|D|"] > 1e-3 and d_norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert "z_rms" not in trainer.step(x)  # the costly diagnostics only on log steps


@pytest.mark.parametrize("ratios", [(0.0, 0.0), (0.5, 0.0), (0.0, 2.0), (0.1, 0.3)])
def test_the_generator_gets_the_balanced_gradient_and_the_commitment(ratios):
    """The generator's parameter gradients, rebuilt by hand: the reconstruction term's gradient
    at x_hat plus each GAN term's, rescaled to its ratio of the reconstruction's norm (per
    example), times lambda_rec, back through G; plus beta times the commitment's own gradient."""
    ratio_adv, ratio_feat = ratios
    cfg = dataclasses.replace(MINI_CFG, quantizer_dropout=False)
    run = dataclasses.replace(MINI_RUN, grad_clip=1e9, ratio_adv=ratio_adv, ratio_feat=ratio_feat,
                              lambda_rec=2.0, commitment_weight=0.5)
    torch.manual_seed(0)
    trainer = ss.Trainer(cfg, run)
    model, disc = (copy.deepcopy(m) for m in (trainer.model, trainer.disc))  # before the step
    x = demo_batch()
    stats = trainer.step(x)
    torch.manual_seed(run.seed)  # the RNG state the step began with (Trainer's last seed)
    x_hat, _, aux = model(x)  # the same k-means init on the same batch: the same x_hat
    with torch.no_grad():  # D as the step saw it, after its own update
        disc.load_state_dict(trainer.disc.state_dict())
        real = disc(x)
    fake = disc(x_hat)
    terms = {"rec": trainer.rec_loss(x, x_hat), "adv": ss.adversarial_loss(fake),
             "feat": ss.feature_loss(real, fake)}
    grads, norms = {}, {}
    for k, v in terms.items():
        grads[k], = torch.autograd.grad(v, x_hat, retain_graph=True)
        norms[k] = grads[k].flatten(1).norm(dim=1).mean()
        assert stats[f"|g_{k}|"] == pytest.approx(norms[k].item(), rel=1e-4)
    g_x_hat = grads["rec"] + sum(r * norms["rec"] / norms[k] * grads[k]
                                 for k, r in (("adv", ratio_adv), ("feat", ratio_feat)))
    torch.autograd.backward([x_hat, 0.5 * aux["commit"]], [2.0 * g_x_hat, None])
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_overfitting_one_batch_with_the_gan_terms():
    """Eq. 6 with every term on (the GAN terms at 30% of the reconstruction's gradient): the
    reconstruction of one batch improves and the discriminators learn to tell it apart."""
    torch.manual_seed(0)
    run = dataclasses.replace(MINI_RUN, lr=1e-2, ratio_adv=0.3, ratio_feat=0.3)
    cfg = dataclasses.replace(MINI_CFG, num_quantizers=2, quantizer_dropout=False)
    trainer = ss.Trainer(cfg, run)
    x = demo_batch()
    history = [trainer.step(x) for _ in range(60)]
    # medians over the last 10 steps: a GAN on one batch of two has spikes (one step in the last 3
    # at 2x the loss, on a fresh install of the CI's packages), which the median of the trend ignores
    first = np.mean([h["rec"] for h in history[:3]])
    last = np.median([h["rec"] for h in history[-10:]])
    assert last < 0.75 * first, (first, last)
    assert np.median([h["d"] for h in history[-10:]]) < 1.5  # d = 2: a discriminator that knows nothing
    assert all(h["adv"] > 0 and h["feat"] > 0 for h in history)


def test_warmup_steps_train_the_reconstruction_only_and_lr_decays():
    """gan_start: the first steps update G on Eq. 4-5 and the commitment only, D untouched (and
    unused); lr_decay: lr x decay^step, set from the step count (so a resume continues it)."""
    torch.manual_seed(0)
    run = dataclasses.replace(MINI_RUN, gan_start=2, lr_decay=0.5)
    trainer = ss.Trainer(MINI_CFG, run)
    d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    x = demo_batch()
    warm = [trainer.step(x) for _ in range(2)]
    assert all(set(h) == {"rec", "commit", "|G|"} for h in warm)
    assert all(torch.equal(v, trainer.disc.state_dict()[k]) for k, v in d0.items())
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(run.lr * 0.5)  # step 2 of 0, 1
    gan = trainer.step(x)
    assert {"d", "adv", "feat"} <= set(gan) and trainer.opt_d.param_groups[0]["lr"] == run.lr / 4
    assert not all(torch.equal(v, trainer.disc.state_dict()[k]) for k, v in d0.items())


def run_training(tmp_path, name, **kwargs):
    return ss.train(MINI_CFG, dataclasses.replace(MINI_RUN, out=str(tmp_path / name)), **kwargs)


def test_resume_continues_bit_exactly_and_refuses_to_overwrite(tmp_path, capsys):
    full = run_training(tmp_path, "full")
    first = run_training(tmp_path, "split", interrupt_after=3)
    assert len(first) == 3 and (tmp_path / "split" / "ckpt.pt").is_file()
    assert "continue with" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        run_training(tmp_path, "split")
    rest = run_training(tmp_path, "split", resume=True)
    assert len(rest) == 3
    assert first + rest == full  # the same losses and diagnostics, to the last bit
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # model.pt holds the model config only; the run's settings live in ckpt.pt
    assert a["config"] == dataclasses.asdict(MINI_CFG) and "out" not in a["config"]
    log = (tmp_path / "full" / "log.txt").read_text().splitlines()
    assert len(log) == 6 and all(k in log[0] for k in ("z_rms", "ppl", "dead", "|g_rec|", "dc"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_train_worker(rank, world, port, out, kwargs, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run = dataclasses.replace(MINI_RUN, batch_size=4, out=out, steps=4)
    if kwargs.pop("fail_on_rank0", False) and rank == 0:
        ss.Trainer.write_sample = lambda self, stem: 1 / 0  # rank 0 fails while rank 1 waits
        run = dataclasses.replace(run, sample_every=2)
    try:
        history = ss.train(MINI_CFG, run, **kwargs)
    except (ZeroDivisionError, RuntimeError) as e:
        history = [type(e).__name__]
    state = {k: v.clone() for k, v in ss.SoundStream.load(Path(out) / "model.pt").state_dict().items()} \
        if (Path(out) / "model.pt").is_file() else {}
    torch.save({"history": history, "state": state}, f"{result}.rank{rank}.pt")


def spawn(tmp_path, out, kwargs, name):
    mp.spawn(_ddp_train_worker, args=(2, _free_port(), str(tmp_path / out), kwargs,
                                      str(tmp_path / name)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]


def _ddp_step_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank_, world_, device = ss.setup_distributed()
    trainer = ss.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, batch_size=4), rank_, world_, device)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        trainer.step(0.3 * torch.randn(2, 1, 3200, generator=g))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({"disc." + k: v.clone() for k, v in trainer.disc.state_dict().items()})
    torch.save(state, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_codebooks_and_weights_identical(tmp_path):
    mp.spawn(_ddp_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    codebooks = [k for k in a if k.startswith("quantizer.")]
    assert codebooks and all(torch.equal(a[k], b[k]) for k in codebooks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were averaged: same weights
    assert a["quantizer.layers.0.initialized"]


def test_ddp_resumes_bit_exactly_on_every_rank(tmp_path):
    # each rank draws its own quantizer dropout: the checkpoint must hold every rank's RNG state
    full = spawn(tmp_path, "full", {}, "full")
    first = spawn(tmp_path, "split", {"interrupt_after": 2}, "first")
    rest = spawn(tmp_path, "split", {"resume": True}, "rest")
    for rank in (0, 1):
        assert len(first[rank]["history"]) == 2 and len(rest[rank]["history"]) == 2
        assert first[rank]["history"] + rest[rank]["history"] == full[rank]["history"]
    assert full[0]["history"] != full[1]["history"]  # different data (and dropout) per rank
    a, b = full[0]["state"], rest[0]["state"]  # model.pt of the whole and of the resumed run
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_rank_0_stops_every_rank(tmp_path):
    r0, r1 = spawn(tmp_path, "fail", {"fail_on_rank0": True}, "fail")  # must not hang
    assert r0["history"] == ["ZeroDivisionError"] and r1["history"] == ["RuntimeError"]


@pytest.mark.slow
def test_torchrun_cli_trains_with_two_processes(tmp_path):
    out = tmp_path / "run"
    args = ["--enc_channels=4", "--dec_channels=4", "--latent_dim=8", "--num_quantizers=2",
            "--codebook_size=16", "--wave_disc_max_channels=16", "--stft_window=256",
            "--stft_hop=64", "--batch_size=2", "--segment_seconds=0.2", "--eval_utterances=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "soundstream.py"), "--train", "--preset", "tiny", "--steps", "2", "--out",
           str(out)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and (out / "model.pt").is_file()

# -------------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    ss.SoundStream(MINI_CFG).save(path)
    return path


def test_bad_tensors_and_configs_get_clear_errors():
    model = ss.SoundStream(MINI_CFG).eval()
    x = torch.zeros(1, 1, 1600)
    cases = [
        (lambda: model.encode(x, sample_rate=44100), "expects 16000 Hz"),
        (lambda: model.encode(torch.zeros(1, 2, 1600)), "mono"),
        (lambda: model.encode(torch.zeros(1600)), r"\(batch, 1, samples\)"),
        (lambda: model.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: model.encode(torch.full((1, 1, 1600), float("nan"))), "NaN"),
        (lambda: model.encode(torch.zeros(1, 1, 1600, dtype=torch.int16)), "float tensor"),
        (lambda: model.encode(x, n_q=5), "n_q must be in 1..4"),
        (lambda: model.decode(torch.zeros(1, 5, 3, dtype=torch.long)), "5 codebooks; this model"),
        (lambda: model.decode(torch.full((1, 2, 3), 16)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.full((1, 2, 3), -1)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.zeros(1, 2, 3)), "integer tensor"),
        (lambda: model.decode(torch.zeros(2, 3, dtype=torch.long)), "integer tensor"),
        (lambda: ss.SoundStream(dataclasses.replace(MINI_CFG, film="both")), "film must be one"),
        (lambda: ss.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, amp="fp61")), "amp must be"),
        (lambda: ss.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, segment_seconds=0.05)),
         r"gives 800 samples; the training losses need at least 1025"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_checkpoints_from_other_models_or_versions_are_refused(tmp_path, mini_ckpt):
    other = tmp_path / "encodec.pt"
    torch.save({"model": "encodec", "config": {}, "state_dict": {}}, other)
    with pytest.raises(ValueError, match="'encodec' checkpoint, not a 'soundstream' one"):
        ss.SoundStream.load(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a checkpoint torch.load"):
        ss.SoundStream.load(junk)
    with pytest.raises(FileNotFoundError):
        ss.SoundStream.load(tmp_path / "missing.pt")
    old = torch.load(mini_ckpt, weights_only=True)
    old["config"]["num_workers"] = 4  # a run setting that old versions kept in model.pt
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"unknown Config field\(s\) num_workers"):
        ss.SoundStream.load(tmp_path / "old.pt")
    assert ss.SoundStream.load(mini_ckpt).cfg == MINI_CFG  # and a real one loads


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "soundstream.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_round_trip_and_clear_errors(tmp_path, mini_ckpt):
    wav = 0.3 * torch.sin(torch.arange(44100 * 2) / 44100 * 2 * math.pi * 220)
    save(tmp_path / "in.wav", torch.stack([wav, wav]), 44100)  # stereo 44.1 kHz: converted
    r = cli("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "codes.npz",
            "--bitrate", 0.4)  # 2 of the 4-bit quantizers at 50 Hz
    assert r.returncode == 0, r.stderr
    assert "converted 44100 Hz, 2 ch -> 16000 Hz, 1 ch" in r.stderr
    npz = np.load(tmp_path / "codes.npz")
    assert npz["codes"].shape == (2, 100) and int(npz["num_samples"]) == 32000
    r = cli("--decode", tmp_path / "codes.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "out.wav")
    assert r.returncode == 0, r.stderr
    r = cli("--reconstruct", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out",
            tmp_path / "rec.wav", "--streaming", "--metrics", "mel,pesq,stoi")
    assert r.returncode == 0 and "pesq" in r.stdout and "rec.png" in r.stdout, r.stderr
    assert (tmp_path / "rec.png").is_file()
    save(tmp_path / "short.wav", 0.1 * torch.randn(1, 100), 16000)  # valid audio of any length
    r = cli("--reconstruct", tmp_path / "short.wav", "--ckpt", mini_ckpt, "--out",
            tmp_path / "short_rec.wav", "--metrics", "mel,pesq,stoi")
    assert r.returncode == 0 and "mel n/a" in r.stdout and "Traceback" not in r.stderr, r.stderr

    bad_codes = tmp_path / "bad.npz"
    np.savez(bad_codes, codes=np.zeros((2, 5), np.int16), num_samples=1600, model="encodec",
             codebook_size=1024, sample_rate=24000, frame_rate=75.0)
    other_rate = tmp_path / "24k.npz"  # SoundStream codes of a 24 kHz model
    np.savez(other_rate, codes=np.zeros((2, 5), np.int16), num_samples=1600, model="soundstream",
             codebook_size=16, sample_rate=24000, frame_rate=75.0)
    empty = tmp_path / "empty.wav"
    save(empty, np.zeros((1, 0), np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "in.wav", "split": "train"}\n')
    out = ["--out", tmp_path / "x.wav"]
    for args, message in [
        (("--reconstruct", tmp_path / "missing.wav", "--ckpt", mini_ckpt, *out), "not found"),
        (("--reconstruct", empty, "--ckpt", mini_ckpt, *out), "empty.wav"),
        (("--decode", bad_codes, "--ckpt", mini_ckpt, *out), "holds encodec codes"),
        (("--decode", other_rate, "--ckpt", mini_ckpt, *out), "24000 Hz, 75 frames/s"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, *out, "--bitrate", 0.1),
         "codes 0.2 to 0.8 kbps in steps of 0.2 (4 quantizers); got 0.1"),
        (("--decode", tmp_path / "in.wav", "--ckpt", mini_ckpt, *out),
         "not a codes file written by --encode (not a .npz archive)"),
        (("--decode", tmp_path / "missing.npz", "--ckpt", mini_ckpt, *out), "missing.npz: file not"),
        (("--encode", tmp_path / "in.wav", "--ckpt", tmp_path / "in.wav", *out),
         "in.wav is not a checkpoint torch.load"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, *out, "--n_q", 9), "n_q must be"),
        (("--train", "--resume", "--out", tmp_path / "nothing"), "not found"),
        (("--reconstrct", tmp_path / "in.wav"), "unknown flag --reconstrct; did you mean --recon"),
        (("--eval", "--ckpt", mini_ckpt, "--bitrat", 1), "unknown flag --bitrat; did you mean"),
        (("--train", "--amp", "fp61"), "invalid choice: 'fp61'"),
        (("--train", "--preset", "tiny", "--segment_seconds", 0.05, "--out", tmp_path / "r"),
         "gives 800 samples; the training losses need at least 1025"),
        (("--eval", "--ckpt", mini_ckpt, "--data", manifest), "no utterances with split 'test'"),
        (("--eval", "--ckpt", mini_ckpt, "--metrics", "mel,wre"), "unknown metric(s) wre; choose"),
    ]:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluation_table_scores_the_truth_and_counts_notes(tmp_path, capsys):
    """evaluate(): a ground-truth row (the reference against itself: mel 0, STOI 1), one row per
    n_q with its bitrate, NaN-free means over the files a metric could be computed on, and the
    notes of a file that is too short for STOI counted in its row and named on stderr."""
    model = ss.SoundStream(MINI_CFG).eval()
    (f, text), = ss.eval_utterances("", 1)
    short = tmp_path / "short.wav"
    save(short, 0.1 * torch.randn(1, 2000), 16000)  # 0.125 s: too few frames for STOI
    rows = ss.evaluate(model, [(f, text), (short, None)], [1, 2], "t", ["mel", "stoi"])
    assert [r["n_q"] for r in rows] == ["truth", 1, 2]
    assert rows[0]["mel"] == 0 and rows[0]["stoi"] == pytest.approx(1, abs=1e-6)
    assert [r.get("kbps") for r in rows] == [None, model.bitrate(1) / 1000, model.bitrate(2) / 1000]
    wav = load(f, 16000, 1)[0]
    rec = ss.reconstruct(model, wav, 2)
    alone = evaluation.score(wav, rec, 16000, ["stoi"])[0]["stoi"]  # the short file has no STOI
    assert rows[2]["stoi"] == pytest.approx(alone, abs=1e-6) and rows[2]["notes"] == 1
    err = capsys.readouterr().err
    assert "short.wav: stoi" in err
    # no transcripts (a folder): the transcript metrics leave the table instead of NaN rows
    ss.evaluate(model, [(short, None)], [1], "t", ["mel", "wer"])
    assert "WER" not in capsys.readouterr().out


def test_help_documents_every_flag():
    text = ss.build_parser().format_help()
    for cls in (ss.Config, ss.TrainConfig):
        helps = ss.field_help(cls)
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f.name  # a source comment for every field
            assert f"--{f.name}" in text
    assert "tiny: 32]" in text  # codebook_size, for example


@pytest.mark.parametrize("noise", ["synthetic", "folder"])
def test_training_with_film_and_noise(tmp_path, noise):
    noise_dir = ""
    if noise == "folder":  # any folder of audio is a noise source (§IV-A used Freesound)
        g = torch.Generator().manual_seed(0)
        save(tmp_path / "noise" / "hum.wav", 0.1 * torch.randn(1, 8000, generator=g), 16000)
        noise_dir = str(tmp_path / "noise")
    cfg = dataclasses.replace(MINI_CFG, film="decoder")
    run = dataclasses.replace(MINI_RUN, noise_dir=noise_dir, steps=2, out=str(tmp_path / "run"))
    history = ss.train(cfg, run)
    assert len(history) == 2 and all(math.isfinite(v) for v in history[-1].values()
                                      if not isinstance(v, list))
    speech = AudioDataset(resolve_files(None, "train")[:4], 16000, segment=3200, seed=0)
    ds = ss.SpeechAndNoise(speech, ss.resolve_files(noise_dir) if noise_dir else None)
    clean, n1 = ds[1]
    assert clean.shape == n1.shape == (1, 3200) and torch.equal(ds[1][1], n1)  # reproducible
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], n1)  # and new in the next epoch


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "soundstream.py"), "--train", "--preset", "tiny", "--out",
            str(out), "--steps", "400", "--log_every", "1", "--eval_utterances", "1",
            "--batch_size", "2", "--segment_seconds", "0.2", "--enc_channels", "4",
            "--dec_channels", "4", "--latent_dim", "8", "--codebook_size", "16",
            "--num_quantizers", "2", "--mel_scales", "64,256", "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    for line in proc.stdout:  # wait until training runs, then press Ctrl-C
        if line.startswith("step 3/"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= step < 400
    r = subprocess.run([sys.executable, str(ROOT / "soundstream.py"), "--train", "--resume",
                        "--out", str(out), "--steps", str(step + 2)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {step}" in r.stdout and f"step {step + 2}/{step + 2}" in r.stdout
