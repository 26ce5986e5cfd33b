"""Tests of bigcodec.py: equal to the official modules (the PyPI repackage `bigcodec` 0.0.3, a copy of
the official vq/ code) on identical random weights, the released parameter count and key layout, the
80 Hz / 1.04 kbps arithmetic, the anti-aliasing filter, the losses by hand, training (overfit, exact
resume, DDP) and clear errors on bad input."""

import dataclasses
import importlib.machinery
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
import torch.nn.functional as F

import bigcodec as ours  # the file at the repository root (conftest puts the root first)

ROOT = Path(__file__).resolve().parent.parent
TINY_CFG, TINY_RUN = ours.PRESETS["tiny"]
# hop 200 (the paper's 80 Hz), a few channels: fast enough for many training steps
MINI_CFG = dataclasses.replace(TINY_CFG, ngf=2, latent_dim=16, dec_channels=64, lstm_layers=1,
                               codebook_size=16, codebook_dim=4)
MINI_RUN = dataclasses.replace(TINY_RUN, mpd_channels=2, mpd_max_channels=8, stft_channels=2,
                               stft_max_channels=8, gan_start=0, batch_size=2,
                               segment_seconds=0.2, steps=6, log_every=2, sample_every=1000,
                               ckpt_every=1000, eval_utterances=0, metrics="mel", num_workers=0,
                               threads=1)


def import_official():
    """The PyPI package, imported as `official_bigcodec` from site-packages: its module is also
    called `bigcodec`, and our file (first on sys.path) must never shadow it, nor it ours."""
    if "official_bigcodec" in sys.modules:
        return sys.modules["official_bigcodec"]
    origin = None
    for entry in sys.path:
        if entry and Path(entry).resolve() != ROOT:
            spec = importlib.machinery.PathFinder.find_spec("bigcodec", [entry])
            if spec and spec.submodule_search_locations:  # a package, not our single file
                origin = spec.origin
                break
    if origin is None:
        pytest.skip("the official modules are not installed: pip install --no-deps bigcodec==0.0.3 "
                    "(requirements-test-nodeps.txt)")
    stub = None
    try:
        import torchaudio  # noqa: F401 - the real one, where it imports
    except (ImportError, OSError):  # imported at the top of bigcodec/modules.py, never used
        stub = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    spec = importlib.util.spec_from_file_location("official_bigcodec", origin,
                                                  submodule_search_locations=[str(Path(origin).parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["official_bigcodec"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if stub is not None:  # others must not find a module without a spec
            del sys.modules["torchaudio"]
    return module


@pytest.fixture(scope="module")
def official():
    return import_official()


def official_modules(official, full=False, seed=0):
    """The official CodecEncoder / CodecDecoder with random weights; SnakeBeta's log-scale alpha
    and beta (0 at init) randomised too, so that a mix-up of the two is seen."""
    torch.manual_seed(seed)
    if full:
        enc, dec = official.CodecEncoder(), official.CodecDecoder()
    else:  # the reference's small configuration (shared/reference/codecs.md §8)
        enc = official.CodecEncoder(ngf=8, up_ratios=(2, 5), out_channels=32)
        dec = official.CodecDecoder(in_channels=32, upsample_initial_channel=64, up_ratios=(5, 2),
                                    vq_dim=32, codebook_size=64, codebook_dim=4)
    with torch.no_grad():
        for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
            if name.endswith((".alpha", ".beta")):
                p.normal_(0, 0.3)
    return enc.eval(), dec.eval()


def old_style(state):
    """A parametrized state dict with the released file's old weight-norm names."""
    return {k.replace("parametrizations.weight.original0", "weight_g")
             .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}


def official_codec(enc, dec, x):
    """inference.py's calls: codes (n_q, B, F) and audio (B, 1, T)."""
    with torch.no_grad():
        q, codes, _ = dec(enc(x), vq=True)
        return codes, dec(q, vq=False)


def demo_batch(n=2, segment=3200):
    from common.data import AudioDataset, resolve_files
    ds = AudioDataset(resolve_files(None, "train")[:n], 16000, segment=segment, seed=0)
    return torch.stack([ds[i] for i in range(n)])  # (n, 1, segment)

# -------------------------------------------------------------------------------------------------
# The released model and the official modules


def test_paper_preset_is_the_released_model():
    model = ours.BigCodec(ours.Config())
    assert sum(p.numel() for p in model.parameters()) == 159_436_290  # the official count
    enc = sum(p.numel() for p in model.encoder.parameters())
    vq = sum(p.numel() for p in model.decoder.quantizer.parameters())
    assert (enc, vq) == (76_530_704, 83_984)  # reference/codecs.md §3
    assert model.frame_rate == 80 and model.bitrate() == 1040  # 16000 / 200; 80 x 13 bits
    keys = model.state_dict().keys()
    assert len(keys) == 533  # the released file's 533 keys (in the parametrized names)
    assert "decoder.quantizer.layers.0._codebook.weight" in keys
    assert "encoder.block.1.block.0.block.0.upsample.filter" in keys  # persistent buffers
    run = ours.TrainConfig()
    assert (run.lambda_mel, run.lambda_adv, run.lambda_feat, run.lambda_commit,
            run.lambda_codebook) == (15.0, 1.0, 1.0, 0.25, 1.0)
    assert run.mel_bins == (5, 10, 20, 40, 80, 160, 320) and len(run.mel_windows) == 7
    assert (run.betas, run.grad_clip, run.batch_size, run.segment_seconds) == ((0.8, 0.9), 1.0, 8, 1.0)


def test_official_weights_load_strictly_and_agree(official, tmp_path):
    """The official modules' random weights, in both key styles, give our model the same codes
    and the same audio to float rounding (B = 2, a length that is no multiple of 200)."""
    torch.set_num_threads(1)
    enc, dec = official_modules(official)
    x = 0.3 * torch.randn(2, 1, 3000, generator=torch.Generator().manual_seed(1))
    codes, y = official_codec(enc, dec, F.pad(x, (0, 200)))  # 3200: no padding in our encode
    released = {"CodecEnc": old_style(enc.state_dict()), "generator": old_style(dec.state_dict())}
    assert any(k.endswith("weight_g") for k in released["CodecEnc"])
    torch.save(released, tmp_path / "bigcodec.pt")
    pypi = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
            **{f"decoder.{k}": v for k, v in dec.state_dict().items()}}
    for source in (tmp_path / "bigcodec.pt", released, pypi):
        model = ours.BigCodec.from_official(source)
        assert model.cfg == dataclasses.replace(ours.Config(), ngf=8, strides=(2, 5), latent_dim=32,
                                                dec_channels=64, codebook_size=64, codebook_dim=4)
        ours_codes = model.encode(F.pad(x, (0, 200)))
        assert torch.equal(ours_codes, codes.permute(1, 0, 2))  # (n_q, B, F) -> (B, Q, F)
        assert (model.decode(ours_codes) - y).abs().max() < 1e-5
    # the training pass (dropout-free, no EMA): the official forward in train mode, same numbers
    enc.train(), dec.train(), model.train()
    with torch.no_grad():
        q, _, vq_loss = dec(enc(x[..., :2000]), vq=True)
        y_train = dec(q, vq=False)
        x_hat, _, aux = model(x[..., :2000])
    assert (x_hat - y_train).abs().max() < 1e-5
    assert torch.allclose(0.25 * aux["commit"] + aux["codebook"], vq_loss.sum(), rtol=1e-5)


@pytest.mark.slow
def test_the_full_size_official_model_agrees(official):
    torch.set_num_threads(1)
    enc, dec = official_modules(official, full=True)
    assert sum(p.numel() for p in [*enc.parameters(), *dec.parameters()]) == 159_436_290
    model = ours.BigCodec.from_official({"CodecEnc": old_style(enc.state_dict()),
                                         "generator": old_style(dec.state_dict())})
    assert model.cfg == ours.Config()
    x = 0.3 * torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(2))
    codes, y = official_codec(enc, dec, x)
    assert torch.equal(model.encode(x), codes.permute(1, 0, 2))
    assert (model.decode(model.encode(x)) - y).abs().max() < 1e-5


def test_a_fresh_model_starts_like_the_official_one(official):
    """Q1: the official init zeroes the Conv1d biases and leaves every weight at PyTorch's default
    (weight norm undoes its trunc_normal, which only draws from the RNG): the same draws give the
    same weights. Each module is seeded apart, since those dead draws shift what follows."""
    cfg = dataclasses.replace(ours.Config(), ngf=8, strides=(2, 5), latent_dim=32, dec_channels=64,
                              codebook_size=64, codebook_dim=4)
    for build_official, build_ours in [
            (lambda: official.CodecEncoder(ngf=8, up_ratios=(2, 5), out_channels=32),
             lambda: ours.Encoder(cfg)),
            (lambda: official.CodecDecoder(in_channels=32, upsample_initial_channel=64,
                                           up_ratios=(5, 2), vq_dim=32, codebook_size=64,
                                           codebook_dim=4), lambda: ours.Decoder(cfg))]:
        torch.manual_seed(0)
        theirs = build_official().state_dict()
        torch.manual_seed(0)
        mine = build_ours()
        assert list(mine.state_dict()) == list(theirs)
        assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items())
        assert not any(m.bias.any() for m in mine.modules() if isinstance(m, torch.nn.Conv1d))
    assert any(m.bias.any() for m in mine.modules() if isinstance(m, torch.nn.ConvTranspose1d))

# -------------------------------------------------------------------------------------------------
# Shapes, bitrate, the anti-aliased activation


@pytest.mark.parametrize("T, frames", [(1, 1), (200, 1), (201, 2), (3210, 17), (16000, 80)])
def test_one_frame_per_200_samples_for_any_length(T, frames):
    model = ours.BigCodec(MINI_CFG)
    x = 0.1 * torch.randn(2, 1, T)
    codes = model.encode(x)
    assert codes.shape == (2, 1, frames) and codes.dtype == torch.int64
    assert model.decode(codes).shape == (2, 1, 200 * frames)
    assert ours.reconstruct(model, x[0]).shape == (1, T)
    x_hat, codes_train, aux = model.train()(x)
    assert x_hat.shape == x.shape and codes_train.shape == (2, 1, frames)


def test_bitrate_arithmetic():
    assert ours.BigCodec(TINY_CFG).bitrate() == 80 * 10  # K = 1024: 0.8 kbps
    two = ours.BigCodec(dataclasses.replace(MINI_CFG, num_quantizers=2, codebook_size=256))
    assert two.bitrate() == 80 * 2 * 8 and two.encode(torch.zeros(1, 1, 400)).shape == (1, 2, 2)


def test_kaiser_filter_response_and_stop_band_attenuation():
    h = ours.kaiser_sinc(0.25, 0.3, 12)  # the x2 resampler's low-pass (cutoff: the old Nyquist)
    assert torch.allclose(h, h.flip(0)) and abs(h.sum().item() - 1) < 1e-6  # linear phase, DC 1
    f = torch.linspace(0, 0.5, 1001)  # cycles per sample at the doubled rate
    n = torch.arange(12) - 5.5
    H = (h[None] * torch.exp(-2j * math.pi * f[:, None] * n[None])).sum(1).abs()
    db = 20 * torch.log10(H + 1e-12)
    assert db[:201].min() > -0.1 and db[:201].max() < 0.1  # pass band to 0.1 (3.2 kHz at 16 kHz)
    assert abs(db[500].item() + 6.0) < 0.1  # -6 dB at the cutoff, 0.25
    assert db[800:].max() < -52.5  # stop band from 0.4: at least 52.5 dB (measured 53.0 at 0.44)
    assert H[-1] < 1e-6  # an even symmetric filter has a zero at Nyquist


def test_anti_aliasing_removes_the_folded_harmonics():
    """A 3 kHz sine through SnakeBeta makes harmonics at 12 and 18 kHz that fold to 4 and 2 kHz at
    16 kHz. Plain: -7 and -14 dB below the fundamental; anti-aliased: below -45 dB (measured)."""
    sr = 16000
    x = (0.9 * torch.sin(2 * math.pi * 3000 * torch.arange(sr) / sr))[None, None]
    act = ours.Activation1d(1)
    with torch.no_grad():
        act.act.alpha.fill_(math.log(3.0))
        spectra = [20 * torch.log10(torch.fft.rfft(y[0, 0] * torch.hann_window(sr)).abs() + 1e-9)
                   for y in (act.act(x), act(x))]  # 1 Hz bins
    (plain, aa) = [[s[k] - s[3000] for k in (4000, 2000)] for s in spectra]
    assert plain[0] > -10 and plain[1] > -17
    assert aa[0] < -50 and aa[1] < -40


def test_snake_beta_by_hand():
    act = ours.SnakeBeta(2)
    with torch.no_grad():
        act.alpha.copy_(torch.tensor([math.log(2.0), 0.0]))
        act.beta.copy_(torch.tensor([math.log(4.0), 0.0]))
    y = act(torch.tensor([[[0.5], [-1.0]]]))
    assert torch.allclose(y[0, :, 0], torch.tensor([0.5 + math.sin(1.0) ** 2 / 4,
                                                      -1.0 + math.sin(-1.0) ** 2]), atol=1e-6)

# -------------------------------------------------------------------------------------------------
# The factorised quantizer


def test_lookup_is_by_cosine_and_the_decoder_gets_the_raw_entry():
    vq = ours.FactorizedVQ(2, 3, 2)  # dim == codebook_dim: no projections
    with torch.no_grad():
        vq._codebook.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1], [-1.0, -1.0]]))
    z = torch.tensor([[[1.0, 0.2], [0.1, 5.0], [-3.0, -2.0]]])  # (1, 3, 2)
    z_q, codes, _ = vq.eval()(z)
    # (1, 0.2) is 1.0 from (0, 0.1) and 9.0 from (10, 0), but its angle is (10, 0)'s
    assert codes.tolist() == [[0, 1, 2]]
    assert torch.allclose(z_q, vq._codebook.weight[None], atol=1e-6)  # Q2: raw entries out
    assert torch.allclose(vq.decode(codes), z_q, atol=1e-6)


def test_vq_losses_by_hand_and_the_straight_through_gradient():
    vq = ours.FactorizedVQ(2, 2, 2).train()
    with torch.no_grad():
        vq._codebook.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    z = torch.tensor([[[2.0, 1.0], [0.5, 3.0]]], requires_grad=True)  # picks entries 0 and 1
    z_q, codes, losses = vq(z)
    assert codes.tolist() == [[0, 1]]
    sq = ((2 - 1) ** 2 + 1 ** 2 + 0.5 ** 2 + 1 ** 2) / 4  # mean over (F, d)
    assert torch.allclose(losses["commit"], torch.tensor([sq])) and torch.allclose(
        losses["codebook"], torch.tensor([sq]))
    # straight through: d z_q / d z = identity; the commitment pulls z, the codebook term the entry
    (z_q.sum() + losses["commit"].sum()).backward(retain_graph=True)
    assert torch.allclose(z.grad, 1 + 2 * (z - vq._codebook.weight[codes]).detach() / 4)
    assert vq._codebook.weight.grad is None  # the commitment and z_q send it nothing
    losses["codebook"].sum().backward()
    g = vq._codebook.weight.grad
    assert torch.allclose(g, 2 * (vq._codebook.weight - z[0].detach()) / 4)


def test_unused_entries_get_no_gradient():
    """Q3: no dead-code reset, and only the chosen entries learn."""
    vq = ours.FactorizedVQ(8, 32, 4).train()
    z = torch.randn(1, 5, 8)
    z_q, codes, losses = vq(z)
    (z_q.pow(2).sum() + losses["commit"].sum() + losses["codebook"].sum()).backward()
    used = set(codes.flatten().tolist())
    rows = vq._codebook.weight.grad.abs().sum(1)
    assert all((rows[i] > 0) == (i in used) for i in range(32))


def test_codebook_usage_is_reported(capsys):
    from common.data import resolve_files
    torch.manual_seed(0)
    model = ours.BigCodec(MINI_CFG)
    with torch.no_grad():  # spread the untrained encoder's outputs over the entries
        model.decoder.quantizer.layers[0].in_proj.parametrizations.weight.original0.mul_(50)
    files = [(f, None) for f in resolve_files(None, "test")[:2]]
    s = ours.codebook_usage(model, files)
    codes = torch.cat([model.encode(ours.load(f, 16000, 1)[0][None])[0, 0] for f, _ in files])
    counts = torch.bincount(codes, minlength=16).double()
    p = counts[counts > 0] / counts.sum()
    assert f"codebook usage: {int((counts > 0).sum())} of 16 entries" in capsys.readouterr().out
    assert 1 < (counts > 0).sum() < 16
    assert math.isclose(s["bitrate_entropy"], 80 * -(p * p.log2()).sum().item(), rel_tol=1e-6)

# -------------------------------------------------------------------------------------------------
# Discriminators and losses


def test_discriminator_shapes_follow_the_official_configuration():
    disc = ours.Discriminators(ours.TrainConfig())
    outs = disc(torch.randn(1, 1, 16000))
    assert len(outs) == 10 and all(len(o) == 6 for o in outs)  # 5 periods + 5 resolutions
    mpd = disc.mpd[1]  # period 3
    assert [m[0].out_channels for m in mpd.convs] == [16, 64, 256, 512, 512]
    assert [m[0].stride for m in mpd.convs] == [(3, 1)] * 4 + [(1, 1)]
    assert outs[1][0].shape == (1, 16, 1778, 3)  # 5334 rows (16002 / 3), / 3; 3 columns
    assert outs[1][-1].shape == (1, (66 + 1) * 3)  # 1778 -> 593 -> 198 -> 66; (2 x 1) adds a row
    spec = disc.mstft.discs[0]
    assert [c.out_channels for c in spec.convs] == [32, 64, 128, 256, 512]
    assert outs[5][0].shape == (1, 32, 33, 251)  # n = 128: 65 bins, 501 frames, stride 2
    assert sum(p.numel() for p in disc.parameters()) > 0


def test_discriminator_inputs_the_fold_and_the_magnitude():
    """MPD reflect-pads to a multiple of p and folds to (T/p, p); the STFT discriminator sees
    sqrt(clamp(|X|^2, 1e-7, 1e3)) of a Hann STFT with hop n/4, frequency first."""
    seen = []
    mpd = ours.PeriodDiscriminator(3, channels=2, max_channels=4)
    mpd.convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    mpd(torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]]))
    assert torch.equal(seen[0], torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 4.0]]]]))  # 5 -> 6: reflect
    spec = ours.SpecDiscriminator((128,), channels=2, max_channels=4)
    spec.discs[0].convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(1, 1, 1000, generator=torch.Generator().manual_seed(0))
    x[..., 500:] = 0  # silence: the 1e-7 floor
    spec(x)
    X = torch.stft(x[:, 0], 128, 32, window=torch.hann_window(128), return_complex=True)
    expected = (X.real ** 2 + X.imag ** 2).clamp(1e-7, 1e3).sqrt()[:, None]  # (1, 1, 65, 32)
    assert seen[1].shape == (1, 1, 65, 32) and torch.allclose(seen[1], expected)
    assert math.isclose(seen[1].min().item(), math.sqrt(1e-7), rel_tol=1e-5)  # the floor, in silence


def test_least_squares_and_feature_losses_by_hand():
    real = [[torch.ones(1, 2), torch.tensor([[2.0, 0.0]])], [torch.zeros(1, 1), torch.tensor([[1.0]])]]
    fake = [[torch.zeros(1, 2), torch.tensor([[0.5, 1.0]])], [torch.ones(1, 1), torch.tensor([[-1.0]])]]
    # D: mean((r - 1)^2) + mean(f^2): [(1 + 1) / 2 + (0.25 + 1) / 2] + [0 + 1]
    assert torch.isclose(ours.discriminator_loss(real, fake), torch.tensor(1.0 + 0.625 + 1.0))
    # G: mean((f - 1)^2): (0.25 + 0) / 2 + 4
    assert torch.isclose(ours.adversarial_loss(fake), torch.tensor(0.125 + 4.0))
    # features: every output but the last: mean |1 - 0| + mean |0 - 1|
    assert torch.isclose(ours.feature_loss(real, fake), torch.tensor(2.0))


def test_mel_loss_is_dacs_seven_scales_by_hand():
    librosa = pytest.importorskip("librosa")
    g = torch.Generator().manual_seed(0)
    x, y = 0.3 * torch.randn(1, 1, 4000, generator=g), 0.3 * torch.randn(1, 1, 4000, generator=g)
    run = ours.TrainConfig()
    loss = ours.MelLoss(16000, run.mel_windows, run.mel_bins)(x, y)
    expected = 0.0
    for w, n in zip(run.mel_windows, run.mel_bins):
        fb = librosa.filters.mel(sr=16000, n_fft=w, n_mels=n)  # Slaney scale and norm
        S = [fb @ np.abs(librosa.stft(v[0, 0].double().numpy(), n_fft=w, hop_length=w // 4,
                                      window="hann", center=True, pad_mode="reflect"))
             for v in (x, y)]
        expected += np.abs(np.log10(np.maximum(S[0], 1e-5)) - np.log10(np.maximum(S[1], 1e-5))).mean()
    assert abs(loss.item() - expected) < 1e-4 * expected


def test_lr_schedule_is_the_official_warmup_lr_by_hand():
    run = dataclasses.replace(ours.TrainConfig(), warmup_steps=1000, decay_steps=500_000)
    assert math.isclose(ours.lr_at(0, run), 1e-5)
    assert math.isclose(ours.lr_at(500, run), 1e-5 + (1e-4 - 1e-5) / 4)  # quadratic rise
    assert math.isclose(ours.lr_at(1000, run), 1e-4)
    assert math.isclose(ours.lr_at(251_000, run), (1e-4 + 1e-5) / 2)  # linear decay
    assert math.isclose(ours.lr_at(501_000, run), 1e-5) and ours.lr_at(10 ** 7, run) == 1e-5

# -------------------------------------------------------------------------------------------------
# Training


def test_the_step_weighs_the_terms_15_1_1_025_1():
    """With lr 0 nothing moves, so G's gradients in the step are those of the weighted sum of
    its logged terms, recomputed here at the same weights and D."""
    run = dataclasses.replace(MINI_RUN, lr=0.0, min_lr=0.0, warmup_steps=0, grad_clip=1e9)
    trainer = ours.Trainer(MINI_CFG, run)
    grads = {}
    step = trainer.opt_g.step
    trainer.opt_g.step = lambda: grads.update({n: p.grad.clone() for n, p in
                                               trainer.model.named_parameters()}) or step()
    x = demo_batch()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.manual_seed(5)
    stats = trainer.step(x)
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad()
    x_hat, _, aux = trainer.model.train()(x)
    real, fake = trainer.disc(x), trainer.disc(x_hat)
    terms = {"mel": trainer.mel_loss(x, x_hat), "adv": ours.adversarial_loss(fake),
             "feat": ours.feature_loss(real, fake), "commit": aux["commit"], "codebook": aux["codebook"]}
    for k, v in terms.items():
        assert math.isclose(stats[k], v.item(), rel_tol=1e-5), k
    (15 * terms["mel"] + terms["adv"] + terms["feat"] + 0.25 * terms["commit"]
     + terms["codebook"]).backward()
    for n, p in trainer.model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7), n


def test_overfitting_one_batch_with_the_gan_terms():
    torch.manual_seed(0)
    run = dataclasses.replace(MINI_RUN, lr=3e-3, warmup_steps=0, decay_steps=10 ** 6)
    trainer = ours.Trainer(MINI_CFG, run)
    x = demo_batch()
    mels = [trainer.step(x)["mel"] for _ in range(40)]
    assert np.mean(mels[-5:]) < 0.8 * np.mean(mels[:5])


def test_warmup_steps_leave_the_discriminators_alone():
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, gan_start=2))
    d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    g0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    x = demo_batch()
    stats = [trainer.step(x) for _ in range(3)]
    assert "adv" not in stats[0] and "adv" in stats[2]
    assert math.isclose(stats[0]["lr"], ours.lr_at(0, MINI_RUN))
    d1 = trainer.disc.state_dict()
    assert not all(torch.equal(g0[k], v) for k, v in trainer.model.state_dict().items())
    # D moved only in the third step: compare with a run of two warm-up steps
    t2 = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, gan_start=2))
    [t2.step(x) for _ in range(2)]
    assert all(torch.equal(d0[k], v) for k, v in t2.disc.state_dict().items())
    assert not all(torch.equal(d0[k], v) for k, v in d1.items())


def run_training(tmp_path, name, **kwargs):
    return ours.train(MINI_CFG, dataclasses.replace(MINI_RUN, out=str(tmp_path / name)), **kwargs)


def test_resume_continues_bit_exactly_and_refuses_to_overwrite(tmp_path, capsys):
    full = run_training(tmp_path, "full")
    first = run_training(tmp_path, "split", interrupt_after=3)
    assert len(first) == 3 and "continue with" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        run_training(tmp_path, "split")
    rest = run_training(tmp_path, "split", resume=True)
    assert first + rest == full  # losses, lr, usage: to the last bit
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["config"] == dataclasses.asdict(MINI_CFG)
    assert len({h["lr"] for h in full}) == len(full)  # the schedule moves every step


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
    for _ in range(2):
        trainer.step(0.3 * torch.randn(2, 1, 3200, generator=g))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({"disc." + k: v.clone() for k, v in trainer.disc.state_dict().items()})
    torch.save(state, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_weights_and_codebooks_identical(tmp_path):
    mp.spawn(_ddp_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    t = ours.Trainer(MINI_CFG, MINI_RUN)  # and they moved from the initial weights
    assert not torch.equal(a["decoder.quantizer.layers.0._codebook.weight"],
                           t.model.state_dict()["decoder.quantizer.layers.0._codebook.weight"])

# -------------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    ours.BigCodec(MINI_CFG).save(path)
    return path


def test_bad_tensors_and_configs_get_clear_errors():
    model = ours.BigCodec(MINI_CFG)
    x = torch.zeros(1, 1, 1600)
    cases = [
        (lambda: model.encode(x, sample_rate=44100), "expects 16000 Hz"),
        (lambda: model.encode(torch.zeros(1, 2, 1600)), "mono.*2 channels"),
        (lambda: model.encode(torch.zeros(1600)), r"\(batch, 1, samples\)"),
        (lambda: model.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: model.encode(torch.full((1, 1, 1600), float("nan"))), "NaN"),
        (lambda: model.encode(torch.zeros(1, 1, 1600, dtype=torch.int16)), "float tensor"),
        (lambda: model.decode(torch.zeros(1, 2, 3, dtype=torch.long)), "2 codebooks; this model has 1..1"),
        (lambda: model.encode(x, n_q=2), "n_q must be in 1..1"),
        (lambda: model.decode(torch.full((1, 1, 3), 16)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.full((1, 1, 3), -1)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.zeros(1, 1, 3)), "integer tensor"),
        (lambda: model.decode(torch.zeros(1, 3, dtype=torch.long)), "integer tensor"),
        (lambda: ours.BigCodec(dataclasses.replace(MINI_CFG, codebook_size=1)), "codebook_size"),
        (lambda: ours.BigCodec(dataclasses.replace(MINI_CFG, dec_channels=48)), "divisible by 2"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, amp="fp61")), "amp must be"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, mel_bins=(5,))), "one entry each"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, segment_seconds=0.05)),
         r"gives 800 samples; the training losses need at least 1025"),
        (lambda: ours.BigCodec.from_official({"encoder.x": torch.zeros(1)}), "not BigCodec's released"),
        (lambda: ours.BigCodec.from_official({"CodecEnc": {}, "generator": {}}), "not BigCodec's released"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_checkpoints_from_other_models_or_versions_are_refused(tmp_path, mini_ckpt):
    other = tmp_path / "encodec.pt"
    torch.save({"model": "encodec", "config": {}, "state_dict": {}}, other)
    with pytest.raises(ValueError, match="'encodec' checkpoint, not a 'bigcodec' one"):
        ours.BigCodec.load(other)
    old = torch.load(mini_ckpt, weights_only=True)
    old["config"]["data"] = "x"
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"unknown Config field\(s\) data"):
        ours.BigCodec.load(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint torch.load"):
        ours.BigCodec.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="is not a checkpoint torch.load.*bigcodec.pt"):
        ours.BigCodec.from_official(tmp_path / "junk.pt")
    assert ours.BigCodec.load(mini_ckpt).cfg == MINI_CFG


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "bigcodec.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_round_trip_official_weights_and_clear_errors(tmp_path, mini_ckpt, official):
    from common.audio import save
    wav = 0.3 * torch.sin(torch.arange(44100) / 44100 * 2 * math.pi * 220)
    save(tmp_path / "in.wav", torch.stack([wav, wav]), 44100)  # stereo 44.1 kHz: converted
    r = cli("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "codes.npz")
    assert r.returncode == 0, r.stderr
    assert "converted 44100 Hz, 2 ch -> 16000 Hz, 1 ch" in r.stderr
    npz = np.load(tmp_path / "codes.npz")
    assert npz["codes"].shape == (1, 80) and int(npz["num_samples"]) == 16000
    r = cli("--decode", tmp_path / "codes.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "out.wav")
    assert r.returncode == 0, r.stderr
    r = cli("--reconstruct", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out",
            tmp_path / "rec.wav", "--metrics", "mel,stoi")
    assert r.returncode == 0 and "stoi" in r.stdout and "0.8 kbps" not in r.stdout, r.stderr
    enc, dec = official_modules(official)
    torch.save({"CodecEnc": old_style(enc.state_dict()), "generator": old_style(dec.state_dict())},
               tmp_path / "bigcodec.pt")
    r = cli("--encode", tmp_path / "in.wav", "--official", tmp_path / "bigcodec.pt",
            "--out", tmp_path / "c.npz")
    assert r.returncode == 0 and "1 codebook x 1600 frames" in r.stdout, r.stderr  # hop 10
    out = ["--out", tmp_path / "x.wav"]
    for args, message in [
        (("--reconstruct", tmp_path / "missing.wav", "--ckpt", mini_ckpt, *out), "not found"),
        (("--decode", tmp_path / "c.npz", "--ckpt", mini_ckpt, *out), "1600 frames/s"),
        (("--encode", tmp_path / "in.wav", *out), "--ckpt"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--official", tmp_path / "bigcodec.pt",
          *out), "not both"),
        (("--encode", tmp_path / "in.wav", "--official", tmp_path / "in.wav", *out), "in.wav is not"),
        (("--encode", tmp_path / "in.wav", "--ckpt", tmp_path / "codes.npz", *out), "codes.npz is not"),
        (("--reconstrct", tmp_path / "in.wav"), "unknown flag --reconstrct; did you mean --recon"),
        (("--train", "--segment_seconds", 0.05, "--out", tmp_path / "r"),
         "gives 800 samples; the training losses need at least 1025"),
    ]:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_front_door_says_what_it_trains_and_why(monkeypatch, capsys):
    """`python bigcodec.py --train`: no GPU -> the tiny preset on the demo corpus, in one line."""
    seen = {}
    monkeypatch.setattr(ours, "train", lambda cfg, run, **kw: seen.update(cfg=cfg, run=run))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ours.main(["--train"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("preset tiny (no GPU here") and "the demo corpus" in line
    assert (seen["cfg"], seen["run"]) == ours.PRESETS["tiny"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ours.main(["--train", "--data", "/data/ls"])
    assert capsys.readouterr().out.startswith("preset paper (a GPU is available); data: /data/ls")
    assert seen["cfg"] == ours.Config() and seen["run"].data == "/data/ls"


def test_evaluation_table_and_usage_after_training(tmp_path, capsys):
    run = dataclasses.replace(MINI_RUN, out=str(tmp_path / "r"), steps=2, eval_utterances=2,
                              metrics="mel,stoi")
    ours.train(MINI_CFG, run)
    out = capsys.readouterr().out
    assert "untrained model (step 0): 2 held-out utterances" in out
    assert "step 2: 2 held-out utterances" in out and "codebook usage:" in out
    assert out.count(" truth ") == 2 and "H-kbps" in out
