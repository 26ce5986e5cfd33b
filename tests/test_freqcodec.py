"""Tests of freqcodec.py: equal to FunCodec (`funcodec` 0.2.0) on identical random weights (the recipe's
16.22 M model, the mag_angle and grouped variants, the MS-STFT discriminator), the STFT round trip, Eq. (3)'s
combinations and their gradient paths, the discriminator-update rule, the losses by hand, training (exact
resume, DDP) and clear errors on bad input."""

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
import torch.nn.functional as F

import freqcodec as ours  # the file at the repository root (conftest puts the root first)

ROOT = Path(__file__).resolve().parent.parent
TINY_CFG, TINY_RUN = ours.PRESETS["tiny"]
# 4 -> 64 channels, 4 x 16 codebooks: fast enough for many steps on 0.2 s inputs
MINI_CFG = dataclasses.replace(TINY_CFG, n_filters=4, dimension=16, num_quantizers=4, codebook_size=16,
                               dropout_choices=(1, 2, 4), kmeans_iters=3, semantic_vocab=8)
MINI_RUN = dataclasses.replace(TINY_RUN, mstft_filters=2, mstft_ffts=(512, 256, 128), mpd_channels=2,
                               msd_channels=4, gan_start=0, batch_size=2, segment_seconds=0.2, steps=6,
                               log_every=2, sample_every=1000, ckpt_every=1000, eval_utterances=0,
                               metrics="mel", num_workers=0, threads=1, semantic_fit_files=4)


def demo_batch(n=2, segment=3200):
    from common.data import AudioDataset, resolve_files
    ds = AudioDataset(resolve_files(None, "train")[:n], 16000, segment=segment, seed=0)
    return torch.stack([ds[i] for i in range(n)])  # (n, 1, segment)


def randomize_codebooks(model):
    """Fresh models have zero codebooks until k-means: fill them as a trained model's."""
    g = torch.Generator().manual_seed(0)
    for vq in model.quantizer.layers:
        vq.embed.copy_(torch.randn(vq.embed.shape, generator=g))
        vq.inited.fill_(1)
    return model

# -------------------------------------------------------------------------------------------------
# The official package (funcodec 0.2.0, --no-deps; it imports torchaudio, whose compiled parts it never uses)


def import_official():
    """FunCodec's classes; ImportError or OSError where the package (or a torchaudio that imports) is missing."""
    import funcodec.models.codec_freq as codec_freq  # needs torchaudio
    from funcodec.models.decoder.seanet_decoder import SEANetDecoder2d
    from funcodec.models.discriminator.multiple_discriminator import MultipleDiscriminator
    from funcodec.models.encoder.seanet_encoder import SEANetEncoder2d
    from funcodec.models.quantizer.costume_quantizer import CostumeQuantizer
    return dict(FreqCodec=codec_freq.FreqCodec, Encoder=SEANetEncoder2d, Decoder=SEANetDecoder2d,
                Quantizer=CostumeQuantizer, Disc=MultipleDiscriminator)


@pytest.fixture(scope="module")
def official():
    try:
        return import_official()
    except (ImportError, OSError) as e:
        pytest.skip(f"the official package does not import ({type(e).__name__}: {e}); CI installs it: "
                    f"requirements-test-nodeps.txt, and .ci/run removes torchaudio's CUDA libraries")


def build_official(official, cfg=ours.Config(), seed=0):
    """FunCodec's FreqCodec as the recipe builds it (egs/LibriTTS/codec/conf/freqcodec_*.yaml), with our
    config's sizes, random weights and random codebooks."""
    torch.manual_seed(seed)
    planes = {"mag_phase": 3, "mag_angle": 2}[cfg.domain]
    ratios = [list(p) for p in zip(cfg.ratios[0::2], cfg.ratios[1::2])]
    common = dict(ratios=ratios, norm="time_group_norm", norm_params={"num_groups": 1}, causal=False,
                  dilation_base=1, n_filters=cfg.n_filters, seq_layer_num=cfg.lstm_layers,
                  conv_group_ratio=cfg.conv_group_ratio)
    enc = official["Encoder"](input_size=planes, dimension=cfg.dimension, **common)
    dec = official["Decoder"](input_size=cfg.dimension, channels=planes,
                              tr_conv_group_ratio=cfg.tr_conv_group_ratio, **common)
    q = official["Quantizer"](input_size=cfg.dimension, codebook_size=cfg.codebook_size,
                              num_quantizers=cfg.num_quantizers, ema_decay=0.99, kmeans_init=True,
                              sampling_rate=16000, quantize_dropout=True,
                              rand_num_quant=list(cfg.dropout_choices), use_ddp=True, encoder_hop_length=320)
    disc = official["Disc"](disc_conf_list=[dict(name="encodec_multi_scale_stft_discriminator", filters=32)])
    m = official["FreqCodec"](input_size=planes, encoder=enc, quantizer=q, decoder=dec, discriminator=disc,
                              odim=cfg.dimension, multi_spectral_window_powers_of_two=[5, 6, 7, 8, 9, 10],
                              target_sample_hz=16000, audio_normalize=True, use_power_spec_loss=True,
                              segment_dur=None, overlap_ratio=None, codec_domain=[cfg.domain, cfg.domain])
    with torch.no_grad():
        m.quantizer.rq.model.embed.normal_()
        m.quantizer.rq.model.inited.fill_(1)
    return m.eval()


def official_codec(m, x):
    """FunCodec's encode and decode (reference/codecs.md §8): codes (B, Q, F) and audio (B, 1, T')."""
    with torch.no_grad():
        emb, scale = m._encode(x)[0]
        codes = m.quantizer.encode(emb)  # (Q, B, F)
        y = m._decode([(m.quantizer.decode(codes).transpose(1, 2), scale)])
    return codes.permute(1, 0, 2), y


def test_paper_preset_has_the_recipes_parameter_count():
    model = ours.FreqCodec(ours.Config())
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    # funcodec 0.2.0 with freqcodec_mag_phase_16k_n32_600k_step.yaml (reference/codecs.md §4)
    assert (count(model.encoder), count(model.decoder), count(model.quantizer)) == (8_111_504, 8_111_129, 0)
    assert sum(b.numel() for b in model.quantizer.state_dict().values()) == 8_421_408  # the codebooks' buffers
    assert model.frame_rate == 50 and model.bitrate(1) == 500 and model.bitrate() == 16_000
    k = dict(model.state_dict())
    assert k["encoder.model.3.conv.conv.weight"].shape == (64, 32, 8, 2)
    assert k["encoder.model.6.conv.conv.weight"].shape == (128, 64, 8, 4)  # the time stride 2
    assert k["decoder.model.16.conv.norm.weight"].shape == (3,)  # Q2: GroupNorm on the output planes


@pytest.mark.parametrize("T", [16000, 16160, 4800])
def test_equal_to_the_official_codec_on_identical_weights(official, T):
    m = build_official(official)
    model = ours.FreqCodec.from_official(m.state_dict())  # strict
    assert model.cfg == ours.Config()
    x = 0.1 * torch.randn(2, 1, T, generator=torch.Generator().manual_seed(T))
    codes, y = official_codec(m, x)
    sent = model.encode(x)
    assert torch.equal(sent.codes, codes)
    out = model.decode(sent)
    assert out.shape == y.shape
    torch.testing.assert_close(out, y, atol=1e-6, rtol=0)
    assert torch.equal(sent.scale, x.pow(2).mean(-1).sqrt() + 1e-8)  # audio_normalize's RMS


@pytest.mark.parametrize("change", [dict(domain="mag_angle"), dict(conv_group_ratio=4, tr_conv_group_ratio=2),
                                    dict(lstm_layers=1, n_filters=8, dimension=32, num_quantizers=4,
                                         codebook_size=64, dropout_choices=(1, 2, 4))])
def test_variants_equal_the_official_ones_and_their_config_is_read_off_the_weights(official, change):
    cfg = dataclasses.replace(ours.Config(), **change)
    m = build_official(official, cfg)
    model = ours.FreqCodec.from_official(m.state_dict())
    assert model.cfg == cfg
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for mod in (m.encoder, m.decoder) for p in mod.parameters())
    x = 0.1 * torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(1))
    codes, y = official_codec(m, x)
    sent = model.encode(x, n_q=cfg.num_quantizers)
    assert torch.equal(sent.codes, codes)
    torch.testing.assert_close(model.decode(sent), y, atol=1e-6, rtol=0)


def test_grouped_presets_cut_parameters_and_say_how():
    dense = sum(p.numel() for p in ours.FreqCodec(ours.Config()).parameters())
    gr8 = sum(p.numel() for p in ours.FreqCodec(ours.PRESETS["gr8"][0]).parameters())
    gr1 = sum(p.numel() for p in ours.FreqCodec(ours.PRESETS["gr1"][0]).parameters())
    assert dense > gr8 > gr1
    # groups = min(in, out) // 2 // ratio: the first residual conv (32 -> 16) has 16 // 8 = 1 group at gr8 and
    # 8 at gr1, so its weight is (16, 32 / groups, 3, 3)
    w = lambda c: c.state_dict()["encoder.model.1.block.1.conv.conv.weight"].shape  # noqa: E731
    assert w(ours.FreqCodec(ours.PRESETS["gr8"][0])) == (16, 32, 3, 3)
    assert w(ours.FreqCodec(ours.PRESETS["gr1"][0])) == (16, 4, 3, 3)


def test_the_discriminator_equals_the_official_ms_stft(official):
    m = build_official(official)
    run = ours.TrainConfig()
    d = ours.Discriminators(run).load_official(m.state_dict()).eval()
    assert sum(p.numel() for p in d.parameters()) == 283_398  # reference/codecs.md §4
    x = 0.1 * torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, mine = m.discriminator(x), d(x)
    assert len(theirs) == len(mine) == 3
    for (lt, ft), (lm, fm) in zip(theirs, mine):
        torch.testing.assert_close(lm, lt, atol=1e-5, rtol=1e-5)
        assert len(ft) == len(fm) == 5
        for a, b in zip(ft, fm):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_from_official_refuses_other_state_dicts(tmp_path):
    with pytest.raises(ValueError, match="not a FunCodec FreqCodec state dict"):
        ours.FreqCodec.from_official({"encoder.block.0.weight": torch.zeros(1)})
    broken = ours.FreqCodec(MINI_CFG).state_dict()
    with pytest.raises(ValueError, match="not a FunCodec FreqCodec state dict"):
        ours.FreqCodec.from_official(broken)  # ours, not FunCodec's stacked layout
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth is not a checkpoint.*FunCodec's model.pth"):
        ours.FreqCodec.from_official(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        ours.FreqCodec.from_official(tmp_path / "missing.pth")

# -------------------------------------------------------------------------------------------------
# The domain transformation, shapes and bitrates


def test_stft_analysis_and_synthesis_round_trip_is_near_perfect():
    model = ours.FreqCodec(ours.Config())
    x = 0.3 * torch.randn(2, 1, 16000, generator=torch.Generator().manual_seed(0))
    planes = model.analysis(x)  # (B, 3, 257, 101): log|X|, cos, sin
    assert planes.shape == (2, 3, 257, 101)
    torch.testing.assert_close(planes[:, 1] ** 2 + planes[:, 2] ** 2, torch.ones(2, 257, 101), atol=1e-5, rtol=0)
    # the decoder's planes that mean the same spectrum: softplus^-1(|X|), and the unit phase
    y = torch.stack([torch.log(torch.expm1(planes[:, 0].exp())), planes[:, 1], planes[:, 2]], dim=1)
    back = model.synthesis(y)
    assert back.shape == (2, 1, 16000)
    assert (back - x).abs().max() < 1e-4 * x.abs().max()
    angle = ours.FreqCodec(dataclasses.replace(ours.Config(), domain="mag_angle"))
    p = angle.analysis(x)  # (B, 2, 257, 101): log|X|, angle in (-pi, pi]
    assert p.shape == (2, 2, 257, 101)
    y = torch.stack([torch.log(torch.expm1(p[:, 0].exp())), torch.asin(p[:, 1] / math.pi)], dim=1)
    # angle = pi sin(ch1) covers (-pi, pi]: the asin inverts it
    assert (angle.synthesis(y) - x).abs().max() < 1e-3 * x.abs().max()


@pytest.mark.parametrize("T, frames, out", [(257, 2, 480), (3200, 11, 3360), (16000, 51, 16160),
                                            (16001, 51, 16160), (21434, 68, 21600)])
def test_frames_and_output_length_for_any_length(T, frames, out):
    model = randomize_codebooks(ours.FreqCodec(MINI_CFG)).eval()
    sent = model.encode(0.1 * torch.randn(1, 1, T))
    assert sent.codes.shape == (1, 4, frames)  # F = ceil((1 + T' / 160) / 2), T' = T up to a multiple of 160
    y = model.decode(sent)
    assert y.shape == (1, 1, out) and out >= T  # DEVIATION 7: no sample lost
    assert model.decode(sent.codes).shape == y.shape  # codes alone: unit RMS (DEVIATION 6)


def test_audio_normalize_makes_the_codes_level_free():
    model = randomize_codebooks(ours.FreqCodec(MINI_CFG)).eval()
    x = 0.1 * torch.randn(1, 1, 3200, generator=torch.Generator().manual_seed(3))
    a, b = model.encode(x), model.encode(4 * x)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(b.scale, 4 * a.scale)
    torch.testing.assert_close(model.decode(b), 4 * model.decode(a), atol=1e-5, rtol=1e-4)


def test_bitrate_counts_the_semantic_stream():
    model = ours.FreqCodec(dataclasses.replace(ours.Config(), semantic="res"))
    assert model.bitrate(1) == 500 + 100 * math.log2(100)  # 0.5 kbps + 100 tokens/s of 6.64 bits
    hubert = ours.FreqCodec(dataclasses.replace(ours.Config(), semantic="res", semantic_stride=1, semantic_vocab=500))
    assert hubert.bitrate(1) == 500 + 50 * math.log2(500)  # 50 Hz units: one per codec frame
    assert ours.FreqCodec(TINY_CFG).bitrate(8) == 50 * 8 * 5

# -------------------------------------------------------------------------------------------------
# Semantic augmentation (Eq. 3)


def semantic_model(mode):
    return randomize_codebooks(ours.FreqCodec(dataclasses.replace(MINI_CFG, semantic=mode)))


@pytest.mark.parametrize("mode", ["cat", "add", "res"])
def test_combination_shapes_and_gradient_paths(mode):
    model = semantic_model(mode).train()
    B, D, Fr = 2, MINI_CFG.dimension, 11
    z = torch.randn(B, D, Fr, requires_grad=True)  # V_a
    tokens = torch.randint(8, (B, 21))  # 100 Hz: two per codec frame
    v_s = model.semantic(tokens, Fr)
    assert v_s.shape == (B, D, Fr)
    v_s.retain_grad()
    q_in = model.semantic.quantizer_input(z, v_s)
    z_q, _, commit = model.quantizer(q_in, 4)
    dec_in = model.semantic.decoder_input(z_q, v_s)
    assert dec_in.shape == (B, D, Fr)
    g = torch.randn(B, D, Fr)
    (dec_in * g).sum().backward(retain_graph=True)
    if mode == "cat":  # a conv over [V_s, RVQ(V_a)]: both reach the output through its weights
        assert z.grad.abs().sum() > 0 and v_s.grad.abs().sum() > 0
        assert not torch.allclose(z.grad, g)
        w = model.semantic.cond.conv.conv.weight  # (D, 2D, 3): the first D inputs read V_s (official order)
        with torch.no_grad():
            w[:, D:] = 0
        torch.testing.assert_close(model.semantic.decoder_input(z_q, v_s),
                                   model.semantic.decoder_input(torch.zeros_like(z_q), v_s))
    elif mode == "add":  # RVQ(V_a) + V_s: identity to both (straight-through)
        torch.testing.assert_close(z.grad, g)
        torch.testing.assert_close(v_s.grad, g)
    else:  # RVQ(V_a - V_s) + V_s: the V_s terms cancel under the straight-through estimator
        torch.testing.assert_close(z.grad, g)
        assert v_s.grad.abs().max() == 0  # V_s learns only from the commitment term
        z.grad = None
        commit.backward()
        assert v_s.grad.abs().sum() > 0
    # and the residual mode codes V_a - V_s
    if mode == "res":
        torch.testing.assert_close(q_in, z - v_s)
    # tokens that cover fewer frames (e.g. 50 Hz units, 19 tokens -> 10 frames for 11): the last frame repeated,
    # as codec_semantic_aug.py pads
    short = model.semantic(tokens[:, :19], Fr)
    assert short.shape == (B, D, Fr) and torch.equal(short[..., -1], short[..., -2])


@pytest.mark.parametrize("mode", ["none", "cat", "add", "res"])
def test_the_enc_quant_term_has_a_gradient_only_with_f_add(mode):
    """Q5: ||V_a - RVQ(V_a)||^2 (or, for f_add and f_res, of the decoder's input) has no gradient under the
    straight-through estimator, except through V_s with f_add (RVQ(V_a) + V_s - V_a)."""
    model = semantic_model(mode) if mode != "none" else randomize_codebooks(ours.FreqCodec(MINI_CFG))
    model.train()
    _, _, aux = model(demo_batch(), 4, semantic=torch.randint(8, (2, 21)) if mode != "none" else None)
    assert aux["enc_quant"] > 0
    aux["enc_quant"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    if mode == "add":
        assert grads and all(n.startswith("semantic.") for n in grads)
    else:
        assert not grads


def test_official_output_is_short_when_t_over_160_is_odd(official):
    """DEVIATION 7: FunCodec's output has 2 ceil(L / 2) STFT frames for L = 1 + T // 160: 16100 samples (T // 160
    = 100) come back whole, 16260 (T // 160 = 101) come back 100 short; ours pads and returns at least T."""
    m = build_official(official, dataclasses.replace(ours.Config(), n_filters=8, lstm_layers=1))
    model = ours.FreqCodec.from_official(m.state_dict())
    for T, official_length in [(16100, 16160), (16260, 16160)]:
        x = 0.1 * torch.randn(1, 1, T)
        assert official_codec(m, x)[1].shape[-1] == official_length
        assert model.decode(model.encode(x)).shape[-1] >= T


def test_semantic_tokens_shift_the_codes_and_are_needed_to_decode():
    model = semantic_model("res").eval()
    x = demo_batch(2)
    model.semantic_units.fit([w for w in x], iters=3)
    sent = model.encode(x)
    assert sent.semantic.shape == (2, 21) and sent.semantic.max() < 8
    other = model.encode(x, semantic=torch.zeros_like(sent.semantic))
    assert not torch.equal(sent.codes, other.codes)
    with pytest.raises(ValueError, match="decodes with semantic tokens"):
        model.decode(sent.codes, sent.scale)
    assert model.decode(sent).shape == (2, 1, 3360)
    with pytest.raises(ValueError, match=r"semantic token ids must be in \[0, 8\)"):
        model.encode(x, semantic=torch.full((2, 21), 8))
    with pytest.raises(ValueError, match="has no semantic augmentation"):
        ours.FreqCodec(MINI_CFG).encode(x, semantic=sent.semantic)


def test_mfcc_units_are_deterministic_and_cluster_phones():
    model = semantic_model("add")
    units = model.semantic_units
    with pytest.raises(ValueError, match="not fitted"):
        units(torch.zeros(1, 1, 3200))
    from common.audio import load
    from common.data import resolve_files
    wavs = [load(f, 16000, 1)[0] for f in resolve_files(None, "train")[:3]]
    used = units.fit(wavs, seed=0)
    centroids = units.centroids.clone()
    assert used == 1.0 and units.fit(wavs, seed=0) == used and torch.equal(units.centroids, centroids)
    f = units.features(wavs[0][None])
    assert f.shape == (1, 1 + wavs[0].shape[-1] // 160, 39)
    all_f = torch.cat([units.features(w[None])[0] for w in wavs])
    torch.testing.assert_close(all_f.mean(0), torch.zeros(39), atol=1e-4, rtol=0)  # standardised
    tokens = units(wavs[0][None])
    changes = (tokens[0, 1:] != tokens[0, :-1]).float().mean()
    assert 0.05 < changes < 0.9  # segments of several 10 ms frames, not noise and not one class


def test_mfcc_deltas_and_cepstra_by_hand():
    # a ramp c_t = t has slope 1 inside; at the edges the repeated frames give (1 + 2 * 2) / 10 and so on
    c = torch.arange(10.0)[None, :, None].repeat(1, 1, 13)
    d = ours.mfcc_deltas(c)
    assert d.shape == c.shape and torch.allclose(d[0, 2:-2, 0], torch.ones(6))
    assert math.isclose(d[0, 0, 0].item(), (1 - 0 + 2 * (2 - 0)) / 10, rel_tol=1e-6)  # c_{-1} = c_{-2} = c_0
    assert math.isclose(d[0, 1, 0].item(), (2 - 0 + 2 * (3 - 0)) / 10, rel_tol=1e-6)
    assert math.isclose(d[0, -1, 0].item(), (9 - 8 + 2 * (9 - 7)) / 10, rel_tol=1e-6)
    units = ours.MFCCUnits(MINI_CFG)
    torch.testing.assert_close(units.dct @ units.dct.t(), torch.eye(13), atol=1e-5, rtol=0)  # orthonormal DCT-II
    # c_0 of a frame is sqrt(1/40) * the sum of its 40 log-mel energies: compare with librosa's mel filters
    import librosa
    x = 0.3 * torch.randn(1, 1, 4000, generator=torch.Generator().manual_seed(0))
    power = np.abs(librosa.stft(x[0, 0].numpy(), n_fft=512, hop_length=160, win_length=400, window="hann",
                                center=True, pad_mode="reflect")) ** 2
    logmel = np.log(np.maximum(librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, htk=True, norm=None) @ power,
                               1e-10))
    c0 = units.features(x)[0, :, 0]  # fresh units: mean 0, std 1, so the raw cepstrum
    np.testing.assert_allclose(c0.numpy(), logmel.sum(0) / math.sqrt(40), rtol=1e-4, atol=1e-3)

# -------------------------------------------------------------------------------------------------
# Discriminators and losses


def test_any_combination_of_discriminators_gives_one_list():
    x = 0.1 * torch.randn(2, 1, 3200)
    for names, n in [(("mstft",), 3), (("mpd",), 5), (("msd",), 3), (("msd", "mpd", "mstft"), 11)]:
        d = ours.Discriminators(dataclasses.replace(MINI_RUN, discriminators=names))
        out = d(x)
        assert len(out) == n and all(len(o) == 2 and isinstance(o[1], list) for o in out)
        assert all(lg.shape[0] == 2 for lg, _ in out)
    with pytest.raises(ValueError, match="discriminators must be some of msd, mpd, mstft"):
        ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, discriminators=("hifi",)))


def test_a_gan_step_with_all_three_discriminators():
    run = dataclasses.replace(MINI_RUN, discriminators=("msd", "mpd", "mstft"), lambda_t=0.0, lambda_f=0.0)
    trainer = ours.Trainer(MINI_CFG, run)
    d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    stats = trainer.step(demo_batch())
    assert stats["d_step"] == 1.0 and math.isfinite(stats["adv"]) and math.isfinite(stats["feat"])
    moved = {k.split(".")[1] for k, v in trainer.disc.state_dict().items() if not torch.equal(d0[k], v)}
    assert moved == {"0", "1", "2"}  # every sub-discriminator learnt


def test_hinge_and_feature_losses_by_hand():
    real = [(torch.tensor([2.0, 0.0]), [torch.tensor([1.0, 1.0]), torch.tensor([0.0])]),
            (torch.tensor([0.5]), [torch.tensor([3.0])])]
    fake = [(torch.tensor([-2.0, 1.0]), [torch.tensor([0.0, 2.0]), torch.tensor([1.0])]),
            (torch.tensor([0.0]), [torch.tensor([1.0])])]
    # D: mean(relu(1 - r)) + mean(relu(1 + f)), averaged: ((0 + 1)/2 + (0 + 2)/2 + 0.5 + 1) / 2
    assert math.isclose(ours.discriminator_loss(real, fake).item(), (0.5 + 1.0 + 0.5 + 1.0) / 2)
    # G: mean(relu(1 - f)) averaged: ((3 + 0)/2 + 1) / 2
    assert math.isclose(ours.adversarial_loss(fake).item(), (1.5 + 1.0) / 2)
    # features: the mean |difference| of each of the 3 maps, averaged over the maps: (1 + 1 + 2) / 3
    assert math.isclose(ours.feature_loss(real, fake).item(), 4 / 3, rel_tol=1e-6)


def test_multi_spectral_loss_by_hand():
    loss = ours.MultiSpectralLoss(16000, (5, 6, 7, 8, 9, 10), 64)
    x = 10 * torch.randn(1, 1, 8000, generator=torch.Generator().manual_seed(0))
    # x_hat = x / 10: every log10 power and log10 mel is 2 lower (none near the 1e-5 floor), so each scale
    # gives (0.5 * 2 + 0.5 * 2) + (0.5 * 4 + 0.5 * 4) = 6, and so does their average
    assert math.isclose(loss(x, x / 10).item(), 6.0, rel_tol=1e-5)
    assert loss(x, x).item() == 0.0
    assert loss.windows == [32, 64, 128, 256, 512, 1024]  # Q4: the code's 2^5 .. 2^10
    S, M = loss.spectra(x, 256)
    frames = (8000 + 2 * ((1024 - 64) // 2) - 1024) // 64 + 1  # reflect-padded by (n_fft - hop) / 2, not centred
    assert S.shape == (1, 513, frames) and M.shape == (1, 64, frames)
    # the spectra themselves, against librosa: window 256 (Hann, centred in 1024 points), hop 64, Slaney mel
    import librosa
    pad = np.pad(x[0, 0].numpy(), (480, 480), mode="reflect")
    power = np.abs(librosa.stft(pad, n_fft=1024, hop_length=64, win_length=256, window="hann", center=False)) ** 2
    np.testing.assert_allclose(S[0].numpy(), np.log10(np.maximum(power, 1e-5)), atol=2e-4, rtol=0)
    mel = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64) @ power
    np.testing.assert_allclose(M[0].numpy(), np.log10(np.maximum(mel, 1e-5)), atol=2e-4, rtol=0)


def test_the_paper_loss_weights_and_the_recipes_optimiser():
    run = ours.TrainConfig()
    assert (run.lambda_t, run.lambda_f, run.lambda_adv, run.lambda_feat, run.lambda_cm) == (1, 1, 1 / 9, 100 / 9, 1)
    assert (run.lr, run.betas, run.discriminators) == (3e-4, (0.5, 0.9), ("mstft",))


def test_the_generator_step_weighs_the_terms(monkeypatch):
    """The G update's loss is 1 L_t + 1 L_f + 1/9 L_adv + 100/9 L_feat + 1 (commit + enc_quant): replace each
    term by a constant times a shared scalar and read the weight off the scalar's gradient."""
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, lambda_t=2.0))
    knob = torch.tensor(1.0, requires_grad=True)
    monkeypatch.setattr(ours.F, "l1_loss", lambda a, b, **k: knob * 1.0 + 0 * a.sum())
    monkeypatch.setattr(trainer, "spectral", lambda a, b: knob * 10.0 + 0 * b.sum())
    monkeypatch.setattr(ours, "adversarial_loss", lambda fake: knob * 100.0 + 0 * fake[0][0].sum())
    monkeypatch.setattr(ours, "feature_loss", lambda r, f: knob * 1000.0 + 0 * f[0][0].sum())
    forward = trainer.model.forward

    def with_fixed_commit(*a, **k):
        x_hat, codes, aux = forward(*a, **k)
        return x_hat, codes, {**aux, "commit": knob * 1e4 + 0 * x_hat.sum(), "enc_quant": knob * 1e5}
    monkeypatch.setattr(trainer, "G", with_fixed_commit)
    monkeypatch.setattr(ours, "update_discriminator", lambda d, g, world=1: False)
    trainer.step(demo_batch())
    assert math.isclose(knob.grad.item(), 2.0 + 10 + 100 / 9 + 1000 * 100 / 9 + 1e4 + 1e5, rel_tol=1e-6)


def test_the_discriminator_is_updated_only_when_its_loss_exceeds_the_generators():
    assert ours.update_discriminator(torch.tensor(2.0), torch.tensor(1.9))
    assert not ours.update_discriminator(torch.tensor(2.0), torch.tensor(2.0))
    x = demo_batch()
    for scale, expect in [(1000.0, False), (0.0, True)]:  # G's loss far above D's (~2), or zero
        run = dataclasses.replace(MINI_RUN, lambda_t=scale, lambda_f=scale, lambda_adv=0.0, lambda_feat=0.0)
        trainer = ours.Trainer(MINI_CFG, run)
        d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
        stats = trainer.step(x)
        moved = not all(torch.equal(d0[k], v) for k, v in trainer.disc.state_dict().items())
        assert moved == expect and stats["d_step"] == float(expect) and stats["d_share"] == float(expect)


def test_warmup_steps_train_the_reconstruction_terms_only():
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, gan_start=2))
    d0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    stats = [trainer.step(demo_batch()) for _ in range(2)]
    assert "adv" not in stats[1] and "d" not in stats[1]
    assert all(torch.equal(d0[k], v) for k, v in trainer.disc.state_dict().items())
    assert "adv" in trainer.step(demo_batch())


def test_quantizer_dropout_draws_each_choice_and_repeats_on_resume():
    trainer = ours.Trainer(MINI_CFG, MINI_RUN)
    draws = []
    for s in range(300):
        trainer.step_count = s
        draws.append(trainer.draws())
    assert set(draws) == {1, 2, 4}
    assert all(abs(draws.count(q) / 300 - 1 / 3) < 0.1 for q in (1, 2, 4))  # random.choice's uniform
    again = ours.Trainer(MINI_CFG, MINI_RUN)
    again.step_count = 123
    assert again.draws() == draws[123]


def test_overfitting_one_batch():
    torch.manual_seed(0)
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, lr=3e-3, gan_start=10 ** 6))
    x = demo_batch()
    f = [trainer.step(x)["f"] for _ in range(30)]
    assert np.mean(f[-5:]) < 0.75 * np.mean(f[:5])

# -------------------------------------------------------------------------------------------------
# Training runs: resume and DDP


def run_training(tmp_path, name, cfg=MINI_CFG, **kwargs):
    return ours.train(cfg, dataclasses.replace(MINI_RUN, out=str(tmp_path / name)), **kwargs)


def test_resume_continues_bit_exactly_and_refuses_to_overwrite(tmp_path, capsys):
    cfg = dataclasses.replace(MINI_CFG, semantic="res")
    full = run_training(tmp_path, "full", cfg)
    assert "semantic tokens (f_res): k-means of 39-d MFCC frames" in capsys.readouterr().out
    first = run_training(tmp_path, "split", cfg, interrupt_after=2)  # at a log step: `dead` counts since the last
    assert len(first) == 2 and "continue with" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a training run.*--resume.*--overwrite"):
        run_training(tmp_path, "split", cfg)
    rest = run_training(tmp_path, "split", cfg, resume=True)
    strip = lambda h: [{k: v for k, v in s.items() if k != "d_share"} for s in h]  # noqa: E731 - per process
    assert strip(first + rest) == strip(full)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["state_dict"]["semantic_units.fitted"] == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank_, world_, device = ours.setup_distributed()
    trainer = ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, batch_size=4, lambda_t=0.0, lambda_f=0.0),
                           rank_, world_, device)  # G's loss small: D is updated
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(2):
        stats = trainer.step(0.3 * torch.randn(2, 1, 3200, generator=g))
    assert stats["d_step"] == 1.0
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({"disc." + k: v.clone() for k, v in trainer.disc.state_dict().items()})
    torch.save(state, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_weights_and_codebooks_identical(tmp_path):
    mp.spawn(_ddp_step_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    t = ours.Trainer(MINI_CFG, MINI_RUN)  # and they moved from the initial weights
    fresh = {**t.model.state_dict(), **{"disc." + k: v for k, v in t.disc.state_dict().items()}}
    assert not torch.equal(a["quantizer.layers.0.embed"], fresh["quantizer.layers.0.embed"])
    assert not all(torch.equal(a[k], fresh[k]) for k in a if k.startswith("disc."))

# -------------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    randomize_codebooks(ours.FreqCodec(MINI_CFG)).save(path)
    return path


def test_bad_tensors_and_configs_get_clear_errors():
    model = randomize_codebooks(ours.FreqCodec(MINI_CFG))
    x = torch.zeros(1, 1, 1600)
    cases = [
        (lambda: model.encode(x, sample_rate=44100), "expects 16000 Hz"),
        (lambda: model.encode(torch.zeros(1, 2, 1600)), "mono.*2 channels"),
        (lambda: model.encode(torch.zeros(1600)), r"\(batch, 1, samples\)"),
        (lambda: model.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: model.encode(torch.zeros(1, 1, 256)), "more than 256 samples"),
        (lambda: model.encode(torch.full((1, 1, 1600), float("nan"))), "NaN"),
        (lambda: model.encode(torch.zeros(1, 1, 1600, dtype=torch.int16)), "float tensor"),
        (lambda: model.encode(x, n_q=5), "n_q must be in 1..4"),
        (lambda: model.decode(torch.zeros(1, 5, 3, dtype=torch.long)), "5 codebooks; this model has 1..4"),
        (lambda: model.decode(torch.full((1, 1, 3), 16)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.full((1, 1, 3), -1)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.zeros(1, 1, 3)), "integer tensor"),
        (lambda: model.decode(torch.zeros(1, 3, dtype=torch.long)), "integer tensor"),
        (lambda: model.decode(torch.zeros(1, 1, 0, dtype=torch.long)), "0 frames"),
        (lambda: model.decode(torch.zeros(2, 1, 3, dtype=torch.long), torch.ones(3)), "one RMS per example"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, codebook_size=1)), "codebook_size"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, ratios=(4, 1, 4, 1))), "257 bins to 16, not 1"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, ratios=(4, 1, 4))), r"\(frequency, time\) pairs"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, domain="mel")), "domain must be one of"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, semantic="mul")), "semantic must be one of"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, dropout_choices=(8,))), "dropout_choices"),
        (lambda: ours.FreqCodec(dataclasses.replace(MINI_CFG, conv_group_ratio=0)), "conv_group_ratio"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, amp="fp61")), "amp must be"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, msd_channels=2)), "multiple of 4"),
        (lambda: ours.Trainer(MINI_CFG, dataclasses.replace(MINI_RUN, segment_seconds=0.02)),
         "needs? at least 513"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_checkpoints_from_other_models_or_versions_are_refused(tmp_path, mini_ckpt):
    other = tmp_path / "bigcodec.pt"
    torch.save({"model": "bigcodec", "config": {}, "state_dict": {}}, other)
    with pytest.raises(ValueError, match="'bigcodec' checkpoint, not a 'freqcodec' one"):
        ours.FreqCodec.load(other)
    old = torch.load(mini_ckpt, weights_only=True)
    old["config"]["bandwidths"] = [1.0]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"unknown Config field\(s\) bandwidths"):
        ours.FreqCodec.load(tmp_path / "old.pt")
    assert ours.FreqCodec.load(mini_ckpt).cfg == MINI_CFG


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "freqcodec.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_round_trip_and_clear_errors(tmp_path, mini_ckpt):
    from common.audio import save
    wav = 0.3 * torch.sin(torch.arange(44100) / 44100 * 2 * math.pi * 220)
    save(tmp_path / "in.wav", torch.stack([wav, wav]), 44100)  # stereo 44.1 kHz: converted
    r = cli("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "codes.npz", "--n_q", 2)
    assert r.returncode == 0, r.stderr
    assert "converted 44100 Hz, 2 ch -> 16000 Hz, 1 ch" in r.stderr and "2 codebooks x 51 frames" in r.stdout
    npz = np.load(tmp_path / "codes.npz")
    assert npz["codes"].shape == (2, 51) and int(npz["num_samples"]) == 16000 and npz["scale"].shape == (1,)
    r = cli("--decode", tmp_path / "codes.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "out.wav")
    assert r.returncode == 0, r.stderr
    from common.audio import load
    model = ours.FreqCodec.load(mini_ckpt)
    x = load(tmp_path / "in.wav", 16000, 1)[0][None]
    expect = model.decode(model.encode(x, 2))[0, :, :16000]
    torch.testing.assert_close(load(tmp_path / "out.wav")[0], expect, atol=1e-4, rtol=0)  # 16-bit file
    r = cli("--reconstruct", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "rec.wav",
            "--metrics", "mel,stoi", "--n_q", 1)
    assert r.returncode == 0 and "stoi" in r.stdout and "at 0.2 kbps" in r.stdout, r.stderr
    out = ["--out", tmp_path / "x.wav"]
    for args, message in [
        (("--reconstruct", tmp_path / "missing.wav", "--ckpt", mini_ckpt, *out), "not found"),
        (("--encode", tmp_path / "in.wav", *out), "--ckpt"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--n_q", 9, *out), "--n_q must be in 1..4"),
        (("--encode", tmp_path / "in.wav", "--official", tmp_path / "in.wav", *out), "in.wav is not"),
        (("--decode", tmp_path / "in.wav", "--ckpt", mini_ckpt, *out), "not a codes file"),
        (("--reconstrct", tmp_path / "in.wav"), "unknown flag --reconstrct; did you mean --recon"),
        (("--train", "--semantic", "mul", "--out", tmp_path / "r"), "invalid choice: 'mul'"),
    ]:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_front_door_says_what_it_trains_and_why(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(ours, "train", lambda cfg, run, **kw: seen.update(cfg=cfg, run=run))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ours.main(["--train"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("preset tiny (no GPU here") and "the demo corpus" in line
    assert (seen["cfg"], seen["run"]) == ours.PRESETS["tiny"]
    ours.main(["--train", "--semantic", "res", "--discriminators", "msd,mpd,mstft"])
    assert seen["cfg"] == dataclasses.replace(TINY_CFG, semantic="res")
    assert seen["run"].discriminators == ("msd", "mpd", "mstft")


def test_evaluation_table_at_every_trained_rate_after_training(tmp_path, capsys):
    run = dataclasses.replace(MINI_RUN, out=str(tmp_path / "r"), steps=2, eval_utterances=2, metrics="mel,stoi")
    ours.train(MINI_CFG, run)
    out = capsys.readouterr().out
    assert "untrained model (step 0): 2 held-out utterances" in out and "step 2: 2 held-out utterances" in out
    rows = [line.split()[0] for line in out.split("step 2:")[1].splitlines()[2:6]]
    assert rows == ["truth", "1", "2", "4"] and "codebook usage on" in out
