"""Tests of soundstream.py: arithmetic of every preset, the quantizer's algorithms on tiny hand-made cases,
streaming == offline, learning, exact resume, DDP on CPU, and clear errors on bad input."""

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
from common.audio import save

ROOT = Path(__file__).resolve().parent.parent

# a very small model and training run for the tests (seconds per step -> tens of milliseconds)
MINI = dataclasses.replace(ss.PRESETS["tiny"], enc_channels=4, dec_channels=4, latent_dim=8, num_quantizers=4,
                           codebook_size=16, wave_disc_channels=4, wave_disc_max_channels=16, stft_disc_channels=4,
                           stft_window=256, stft_hop=64, batch_size=2, segment_seconds=0.2, steps=6, log_every=1,
                           sample_every=1000, ckpt_every=1000, eval_utterances=1, kmeans_iters=2)


# -----------------------------------------------------------------------------------------------------------------
# Presets and arithmetic


@pytest.mark.parametrize("name, sr, frame_rate, n_q, kbps_per_q", [
    ("paper", 24000, 75.0, 24, 0.75),   # §III-C: M = 320 at 24 kHz -> 75 frames/s, 10 bits per quantizer
    ("audiolm", 16000, 50.0, 12, 0.5),  # AudioLM: 50 Hz, 12 x 1024 = 6 kbps
    ("tiny", 16000, 50.0, 8, 0.25),     # 5-bit codebooks (K = 32)
])
def test_frame_counts_and_bitrates(name, sr, frame_rate, n_q, kbps_per_q):
    cfg = ss.PRESETS[name]
    model = ss.SoundStream(cfg).eval()
    assert (model.sample_rate, model.hop_length, model.frame_rate) == (sr, 320, frame_rate)
    assert model.num_codebooks == n_q and model.channels == 1
    assert model.bitrate(1) == pytest.approx(kbps_per_q * 1000)
    assert model.bitrate() == pytest.approx(n_q * kbps_per_q * 1000)
    for T in (1, 319, 320, 321, sr):  # any length: ceil(T / M) frames, decoded to F * M samples
        codes = model.encode(torch.zeros(2, 1, T))
        assert codes.shape == (2, n_q, math.ceil(T / 320)) and codes.dtype == torch.int64
        assert model.decode(codes).shape == (2, 1, math.ceil(T / 320) * 320)
    assert model.encode(torch.zeros(1, 1, 640), n_q=1).shape == (1, 1, 2)


def test_paper_bitrates_map_to_quantizers():
    model = ss.SoundStream(ss.PRESETS["paper"])
    # §V: 3, 6, 12 and 18 kbps with 1024-entry codebooks at 75 Hz
    assert [model.n_q_for_bitrate(k) for k in (3, 6, 12, 18)] == [4, 8, 16, 24]
    with pytest.raises(ValueError, match="quantizers"):
        model.n_q_for_bitrate(24)


def test_paper_preset_is_the_paper():
    cfg = ss.PRESETS["paper"]
    assert (cfg.sample_rate, cfg.enc_channels, cfg.dec_channels, cfg.strides) == (24000, 32, 32, (2, 4, 5, 8))
    assert (cfg.codebook_size, cfg.num_quantizers, cfg.ema_decay, cfg.dead_code_threshold) == (1024, 24, 0.99, 2.0)
    assert (cfg.lambda_adv, cfg.lambda_feat, cfg.lambda_rec) == (1.0, 100.0, 1.0)
    assert (cfg.stft_window, cfg.stft_hop, cfg.mel_bins) == (1024, 256, 64)
    assert cfg.mel_scales == tuple(2 ** i for i in range(6, 12))
    model = ss.SoundStream(cfg)
    # the layers of §III-A/B: 9,183,233 weights + 5,121 per latent dimension (D = 128 is our choice)
    assert sum(p.numel() for p in model.parameters()) == 9_183_233 + 5_121 * 128
    # Fig. 3: residual units with dilations 1, 3, 9 and kernel 7 in every encoder block
    block = model.encoder[1]
    assert [block[i].block[1].dilation[0] for i in range(3)] == [1, 3, 9]
    assert [block[i].block[1].kernel_size[0] for i in range(3)] == [7, 7, 7]
    assert [model.encoder[i + 1][-1].stride[0] for i in range(4)] == [2, 4, 5, 8]


def test_discriminator_shapes_follow_section_III_D():
    cfg = ss.PRESETS["paper"]
    d = ss.Discriminators(cfg)
    T = 24000
    out = d(torch.randn(2, 1, T))
    assert len(out) == 4  # k = 0 (STFT) and three wave resolutions (K = 3)
    logits, feats = out[0]
    # §III-D: T / (H * 2^3) frames after the last residual block, F / 2^6 = 8 bins aggregated by a 1 x 8 conv
    assert logits.shape == (2, T // (256 * 8) + 1) or logits.shape == (2, T // (256 * 8))
    assert feats[-1].shape[-1] == 512 // 2 ** 6 and len(feats) == 7
    assert [f.shape[1] for f in feats] == [32, 64, 128, 128, 256, 256, 512]  # Fig. 4 channels for C = 32
    # the wave discriminators see the signal at 1x, 1/2x and 1/4x; each logit covers 4^4 = 256 input samples
    assert [l.shape[-1] for l, _ in out[1:]] == [math.ceil(T / 256), math.ceil(T / 512), math.ceil(T / 1024)]
    assert [f.shape[1] for f in out[1][1]] == [16, 64, 256, 1024, 1024, 1024]  # MelGAN widths, max 1024


# -----------------------------------------------------------------------------------------------------------------
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
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])  # two frames go to entry 0, one to entry 1
    vq.train()
    codes, q = vq(z)
    assert codes.tolist() == [0, 0, 1]
    assert torch.equal(q, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))  # the pre-update codebook
    # EMA with decay 0.5: counts 0.5*1 + 0.5*2 = 1.5 and 0.5*1 + 0.5*1 = 1; sums 0.5*0 + 0.5*(4,4), 0.5*10 + 0.5*9
    assert torch.allclose(vq.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.embed_sum, torch.tensor([[2.0, 2.0], [9.5, 9.5]]))
    n, eps = 2.5, vq.eps  # Laplace smoothing of the counts
    smoothed = (torch.tensor([1.5, 1.0]) + eps) / (n + 2 * eps) * n
    assert torch.allclose(vq.codebook, vq.embed_sum / smoothed[:, None])
    assert torch.allclose(vq.codebook, torch.tensor([[4 / 3, 4 / 3], [9.5, 9.5]]), atol=1e-4)
    vq.eval()  # no update in eval mode
    before = vq.codebook.clone()
    vq(z)
    assert torch.equal(vq.codebook, before)


def test_kmeans_initialization_finds_the_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = (centers[:, None] + 0.1 * torch.randn(4, 50, 2)).reshape(-1, 2)
    vq = ss.VectorQuantizer(2, 4, 0.99, 2.0, kmeans_iters=20).train()
    assert not vq.initialized
    vq(z)  # the first training batch runs k-means (§III-C)
    assert vq.initialized
    # every true centre has a code within 0.1 of it
    dist_ = torch.cdist(centers, vq.codebook)
    assert dist_.min(dim=1).values.max() < 0.1
    assert vq.cluster_size.sum() == pytest.approx(200, rel=0.05)  # statistics start from the k-means counts


def test_dead_codes_are_replaced_by_batch_vectors():
    vq = make_vq(size=3, decay=0.99, threshold=2.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))
    vq.cluster_size.copy_(torch.tensor([10.0, 10.0, 2.0]))  # entry 2 is at the threshold and gets nothing now
    vq.embed_sum.copy_(vq.codebook * vq.cluster_size[:, None])
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.0, 0.9], [0.9, 1.0]])
    torch.manual_seed(0)
    vq.train()(z)
    # entry 2's count decayed to 1.98 < 2: it now holds one of the batch's vectors, with fresh statistics
    assert any(torch.equal(vq.codebook[2], v) for v in z)
    assert vq.cluster_size[2] == 2.0 and torch.equal(vq.embed_sum[2], vq.codebook[2] * 2.0)
    # the used entries were only EMA-updated, towards their inputs
    assert torch.allclose(vq.codebook[0], torch.tensor([0.0, 0.0]), atol=0.01)
    assert torch.allclose(vq.codebook[1], torch.tensor([1.0, 1.0]), atol=0.01)


def test_residual_energy_falls_as_quantizers_are_added():
    cfg = dataclasses.replace(MINI, latent_dim=16, num_quantizers=6, codebook_size=32, kmeans_iters=10)
    rvq = ss.ResidualVectorQuantizer(cfg)
    torch.manual_seed(0)
    z = torch.randn(8, 16, 50)  # (B, D, F)
    rvq.train()(z)  # k-means init of every layer on its residual
    rvq.eval()
    errors = [(z - rvq.decode(rvq(z, n_q)[1])).pow(2).mean().item() for n_q in range(1, 7)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0]
    # Algorithm 1: decoding the codes gives exactly the quantized latent the quantizer returned
    z_q, codes, _ = rvq(z, 3)
    assert torch.allclose(z_q, rvq.decode(codes), atol=1e-6)


def test_quantizer_dropout_draws_every_n_q_uniformly():
    cfg = dataclasses.replace(MINI, latent_dim=4, num_quantizers=5, codebook_size=8)
    rvq = ss.ResidualVectorQuantizer(cfg).train()
    torch.manual_seed(0)
    z = torch.randn(64, 4, 3)
    rvq(z)  # the first training forward runs k-means before quantizing; start after it
    seen = []
    for _ in range(10):
        snapshot = ss.ResidualVectorQuantizer(cfg)  # the codebooks this forward quantizes with
        snapshot.load_state_dict(rvq.state_dict())
        z_q, codes, _ = rvq(z)  # (training also EMA-updates rvq's codebooks after quantizing)
        for b in range(z.shape[0]):  # which prefix of the codes does example b's z_q consist of?
            prefix = [n for n in range(1, 6)
                      if torch.allclose(z_q[b], snapshot.decode(codes[b:b + 1, :n])[0], atol=1e-5)]
            assert len(prefix) >= 1
            seen.append(prefix[0])
    counts = np.bincount(seen, minlength=6)[1:]
    assert (counts > 0).all(), counts  # the whole range 1..N_q is drawn
    assert counts.min() > 0.12 * len(seen)  # roughly uniform (expected 0.2 each)
    assert codes.shape[1] == 5  # every quantizer still runs (and updates its codebook) on every frame


def test_commitment_loss_reaches_the_encoder_through_every_quantizer():
    cfg = dataclasses.replace(MINI, latent_dim=4, num_quantizers=3, codebook_size=8, quantizer_dropout=False)
    rvq = ss.ResidualVectorQuantizer(cfg).train()
    z = torch.randn(2, 4, 5, requires_grad=True)
    rvq(z)  # initialize
    _, _, commit = rvq(z)
    commit.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# -----------------------------------------------------------------------------------------------------------------
# Streaming, FiLM, losses


def test_streaming_equals_offline():
    torch.manual_seed(0)
    cfg = dataclasses.replace(ss.PRESETS["tiny"], num_quantizers=4)
    model = ss.SoundStream(cfg).eval()
    M = model.hop_length
    x = 0.3 * torch.randn(2, 1, 23 * M)
    codes = model.encode(x)
    audio = model.decode(codes)
    with model.streaming():
        chunks, pieces, i = [3, 1, 7, 1, 2, 5, 4], [], 0
        for n in chunks:  # chunks of 3, 1, 7, ... frames
            c = model.encode(x[..., i * M:(i + n) * M])
            pieces.append((c, model.decode(c)))
            i += n
    assert i == 23
    assert torch.equal(torch.cat([c for c, _ in pieces], dim=-1), codes)
    assert torch.allclose(torch.cat([a for _, a in pieces], dim=-1), audio, atol=1e-5)
    # state is dropped on leaving the block: offline calls are unaffected
    assert torch.equal(model.encode(x), codes)
    with model.streaming(), pytest.raises(ValueError, match="multiples of 320"):
        model.encode(x[..., :100])


def test_encoder_and_decoder_are_causal():
    torch.manual_seed(0)
    model = ss.SoundStream(ss.PRESETS["tiny"]).eval()
    x = 0.3 * torch.randn(1, 1, 20 * 320)
    y = x.clone()
    y[..., 10 * 320:] = 0.0  # change the future only: from frame 10 on
    with torch.no_grad():
        zx, zy = model._encode_latent(x, None), model._encode_latent(y, None)  # (1, D, 20)
    assert torch.equal(zx[..., :10], zy[..., :10]) and not torch.equal(zx, zy)
    codes = torch.randint(0, 32, (1, 8, 20))
    other = codes.clone()
    other[..., 10:] = torch.randint(0, 32, (1, 8, 10))
    a, b = model.decode(codes), model.decode(other)
    assert torch.equal(a[..., :10 * 320], b[..., :10 * 320]) and not torch.equal(a, b)


def test_film_switches_denoising_and_starts_as_identity():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MINI, film="encoder")
    model = ss.SoundStream(cfg).eval()
    x = 0.3 * torch.randn(1, 1, 1600)
    # Eq. 7 with the identity initialization: both modes give the same codes before training
    assert torch.equal(model.encode(x, denoise=True), model.encode(x, denoise=False))
    with torch.no_grad():
        model.film.linear.weight.normal_()
    assert not torch.equal(model.encode(x, denoise=True), model.encode(x, denoise=False))
    # a time-varying mode: one flag per frame
    a = torch.randn(1, cfg.latent_dim, 5)
    per_frame = model.film(a, torch.tensor([[0, 0, 1, 1, 1]]).bool())
    assert torch.allclose(per_frame[..., :2], model.film(a, torch.tensor([False]))[..., :2])
    assert torch.allclose(per_frame[..., 2:], model.film(a, torch.tensor([True]))[..., 2:])
    with pytest.raises(ValueError, match="no denoising mode"):
        ss.SoundStream(MINI).encode(x, denoise=True)


def test_noise_mixing_builds_the_tuples_of_section_III_F():
    g = torch.Generator().manual_seed(0)
    clean = 0.5 * torch.randn(64, 1, 800, generator=g)
    noise = ss.coloured_noise(clean.shape, g)
    inputs, targets, denoise = ss.mix_noise(clean, noise, MINI, g)
    assert inputs.abs().max() <= 1.0 + 1e-6
    noisy = ~torch.isclose(inputs, targets).all(dim=-1).squeeze(1)  # targets differ from inputs...
    assert (noisy <= denoise).all()  # ...only when denoising is on
    assert noisy.any() and (denoise & ~noisy).any() and (~denoise).any()
    # when denoise is on the target is the clean crop (peak-normalized, same gain as the input)
    b = int(noisy.nonzero()[0])
    ratio = targets[b] / clean[b]
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)


def test_losses_are_the_equations():
    real = [(torch.tensor([[2.0, 0.5]]), [torch.ones(1, 2, 2)])]
    fake = [(torch.tensor([[-2.0, 0.0]]), [torch.zeros(1, 2, 2)])]
    # Eq. 1: mean(max(0, 1 - D(x))) + mean(max(0, 1 + D(G(x)))) = (0 + 0.5)/2 + (0 + 1)/2
    assert ss.discriminator_loss(real, fake).item() == pytest.approx(0.75)
    # Eq. 2: mean(max(0, 1 - D(G(x)))) = (3 + 1) / 2
    assert ss.adversarial_loss(fake).item() == pytest.approx(2.0)
    # Eq. 3: mean |D_l(x) - D_l(G(x))|
    assert ss.feature_loss(real, fake).item() == pytest.approx(1.0)
    cfg = ss.PRESETS["tiny"]
    x = 0.3 * torch.randn(2, 1, 4000)
    assert ss.reconstruction_loss(x, x, cfg).item() == pytest.approx(0.0, abs=1e-3)
    y = x.clone().requires_grad_()
    loss = ss.reconstruction_loss(x, y * 0.5, cfg)
    loss.backward()
    assert loss.item() > 1.0 and torch.isfinite(y.grad).all()
    silent = torch.zeros(1, 1, 4000, requires_grad=True)  # silent frames: the epsilon keeps the gradient finite
    ss.reconstruction_loss(torch.zeros(1, 1, 4000), silent, cfg).backward()
    assert torch.isfinite(silent.grad).all()


# -----------------------------------------------------------------------------------------------------------------
# Training: learning, exact resume, DDP


def test_overfitting_one_batch_lowers_the_loss():
    torch.manual_seed(0)
    cfg = dataclasses.replace(MINI, lr=3e-3, num_quantizers=2, quantizer_dropout=False)
    trainer = ss.Trainer(cfg)
    from common.data import AudioDataset, resolve_files
    ds = AudioDataset(resolve_files(None, "train")[:2], cfg.sample_rate, segment=3200)
    batch = torch.stack([ds[0], ds[1]])  # (2, 1, 3200): two real utterances
    history = [trainer.step(batch) for _ in range(80)]
    first, last = np.mean([h["rec"] for h in history[:3]]), np.mean([h["rec"] for h in history[-3:]])
    assert last < 0.5 * first, (first, last)


def run_training(tmp_path, name, **kwargs):
    cfg = dataclasses.replace(MINI, out=str(tmp_path / name))
    return ss.train(cfg, **kwargs)


def test_resume_continues_bit_exactly(tmp_path, capsys):
    full = run_training(tmp_path, "full")
    first = run_training(tmp_path, "split", interrupt_after=3)
    assert len(first) == 3 and (tmp_path / "split" / "ckpt.pt").is_file()
    assert "continue with" in capsys.readouterr().out
    rest = ss.train(dataclasses.replace(MINI, out=str(tmp_path / "split")), resume=True)
    assert len(rest) == 3
    assert first + rest == full  # the same losses, to the last bit
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank_, world_, device = ss.setup_distributed()
    cfg = dataclasses.replace(MINI, batch_size=4)
    trainer = ss.Trainer(cfg, rank_, world_, device)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        trainer.step(0.3 * torch.randn(2, 1, 3200, generator=g))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({"disc." + k: v.clone() for k, v in trainer.disc.state_dict().items()})
    torch.save(state, Path(result_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_keep_codebooks_and_weights_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    codebooks = [k for k in a if k.startswith("quantizer.")]
    assert codebooks and all(torch.equal(a[k], b[k]) for k in codebooks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were averaged: the same weights everywhere
    assert a["quantizer.layers.0.initialized"]


@pytest.mark.slow
def test_torchrun_cli_trains_with_two_processes(tmp_path):
    out = tmp_path / "run"
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in dataclasses.asdict(MINI).items()
            if k not in ("out", "data", "noise_dir")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "soundstream.py"), "--train", "--preset", "tiny", "--steps", "2", "--out", str(out)]
    r = subprocess.run(cmd + [a for a in args if not a.startswith("--steps")], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and (out / "model.pt").is_file()


# -----------------------------------------------------------------------------------------------------------------
# Bad input and the command line


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    ss.SoundStream(MINI).save(path)
    return path


def test_bad_tensors_get_clear_errors():
    model = ss.SoundStream(MINI).eval()
    x = torch.zeros(1, 1, 1600)
    cases = [
        (lambda: model.encode(x, sample_rate=44100), "expects 16000 Hz"),
        (lambda: model.encode(torch.zeros(1, 2, 1600)), "mono"),
        (lambda: model.encode(torch.zeros(1600)), r"\(batch, 1, samples\)"),
        (lambda: model.encode(torch.zeros(1, 1, 0)), "empty"),
        (lambda: model.encode(torch.full((1, 1, 1600), float("nan"))), "NaN"),
        (lambda: model.encode(torch.zeros(1, 1, 1600, dtype=torch.int16)), "float tensor"),
        (lambda: model.encode(x, n_q=5), "n_q must be in 1..4"),
        (lambda: model.decode(torch.zeros(1, 5, 3, dtype=torch.long)), "5 codebooks; this model has 1..4"),
        (lambda: model.decode(torch.full((1, 2, 3), 16)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.full((1, 2, 3), -1)), r"ids must be in \[0, 16\)"),
        (lambda: model.decode(torch.zeros(1, 2, 3)), "integer tensor"),
        (lambda: model.decode(torch.zeros(2, 3, dtype=torch.long)), "integer tensor"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_checkpoints_from_other_models_are_refused(tmp_path, mini_ckpt):
    other = tmp_path / "encodec.pt"
    torch.save({"model": "encodec", "config": {}, "state_dict": {}}, other)
    with pytest.raises(ValueError, match="'encodec' checkpoint, not a SoundStream"):
        ss.SoundStream.load(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a checkpoint torch.load"):
        ss.SoundStream.load(junk)
    with pytest.raises(FileNotFoundError):
        ss.SoundStream.load(tmp_path / "missing.pt")
    model = ss.SoundStream.load(mini_ckpt)  # and a real one loads
    assert model.cfg == MINI


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "soundstream.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_cli_round_trip_and_clear_errors(tmp_path, mini_ckpt):
    wav = 0.3 * torch.sin(torch.arange(44100 * 2) / 44100 * 2 * math.pi * 220)
    save(tmp_path / "in.wav", torch.stack([wav, wav]), 44100)  # stereo 44.1 kHz: converted, with a notice
    r = cli("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "codes.npz", "--n_q", 2)
    assert r.returncode == 0, r.stderr
    assert "converted 44100 Hz, 2 ch -> 16000 Hz, 1 ch" in r.stderr
    npz = np.load(tmp_path / "codes.npz")
    assert npz["codes"].shape == (2, 100) and int(npz["num_samples"]) == 32000
    r = cli("--decode", tmp_path / "codes.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "out.wav")
    assert r.returncode == 0, r.stderr
    r = cli("--reconstruct", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "rec.wav", "--streaming")
    assert r.returncode == 0 and "PESQ" in r.stdout, r.stderr
    assert (tmp_path / "rec.png").is_file()

    bad_codes = tmp_path / "bad.npz"
    np.savez(bad_codes, codes=np.zeros((2, 5), np.int16), num_samples=1600, model="encodec", codebook_size=1024,
             sample_rate=24000, frame_rate=75.0)
    other_rate = tmp_path / "24k.npz"  # SoundStream codes of a 24 kHz model
    np.savez(other_rate, codes=np.zeros((2, 5), np.int16), num_samples=1600, model="soundstream",
             codebook_size=16, sample_rate=24000, frame_rate=75.0)
    empty = tmp_path / "empty.wav"
    save(empty, np.zeros((1, 0), np.float32), 16000)
    for args, message in [
        (("--reconstruct", tmp_path / "missing.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"), "not found"),
        (("--reconstruct", empty, "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"), "empty.wav"),
        (("--decode", bad_codes, "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"), "holds encodec codes"),
        (("--decode", other_rate, "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"), "24000 Hz, 75 frames/s"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "c.npz", "--bitrate", 0),
         "0 kbps needs 0 quantizers"),
        (("--decode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"),
         "not a codes file written by --encode (not a .npz archive)"),
        (("--decode", tmp_path / "missing.npz", "--ckpt", mini_ckpt, "--out", tmp_path / "x.wav"),
         "missing.npz: file not found"),
        (("--encode", tmp_path / "in.wav", "--ckpt", tmp_path / "in.wav", "--out", tmp_path / "c.npz"),
         "in.wav is not a checkpoint torch.load"),
        (("--encode", tmp_path / "in.wav", "--ckpt", mini_ckpt, "--out", tmp_path / "c.npz", "--n_q", 9),
         "n_q must be"),
        (("--train", "--resume", "--out", tmp_path / "nothing"), "not found"),
    ]:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("noise", ["synthetic", "folder"])
def test_training_with_film_and_noise(tmp_path, noise):
    noise_dir = ""
    if noise == "folder":  # any folder of audio works as the noise source (§IV-A used Freesound)
        g = torch.Generator().manual_seed(0)
        save(tmp_path / "noise" / "hum.wav", 0.1 * torch.randn(1, 8000, generator=g), 16000)
        noise_dir = str(tmp_path / "noise")
    cfg = dataclasses.replace(MINI, film="decoder", noise_dir=noise_dir)
    trainer = ss.Trainer(cfg)
    clean = 0.3 * torch.randn(2, 1, 3200)
    inputs, targets, denoise = trainer.make_batch(clean)
    assert inputs.shape == targets.shape == clean.shape and denoise.dtype == torch.bool
    stats = [trainer.step(clean) for _ in range(2)]
    assert all(math.isfinite(v) for s in stats for v in s.values())
    assert trainer.model.film.linear.weight.abs().sum() > 0  # FiLM is trained


def _ddp_train_worker(rank, world, port, out, kwargs, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = dataclasses.replace(MINI, batch_size=4, out=out)
    history = ss.train(cfg, **kwargs)
    torch.save(history, f"{result}.rank{rank}.pt")


def test_ddp_resume_continues_bit_exactly_on_every_rank(tmp_path):
    # each rank draws its own quantizer dropout: the checkpoint must hold every rank's RNG state
    runs = [("full", {}, "full"), ("split", {"interrupt_after": 3}, "first"), ("split", {"resume": True}, "rest")]
    for out, kwargs, name in runs:
        mp.spawn(_ddp_train_worker, args=(2, _free_port(), str(tmp_path / out), kwargs, str(tmp_path / name)),
                 nprocs=2, join=True)
    for rank in (0, 1):
        full, first, rest = (torch.load(tmp_path / f"{n}.rank{rank}.pt", weights_only=True)
                             for n in ("full", "first", "rest"))
        assert len(first) == 3 and len(rest) == 3 and first + rest == full
    full0 = torch.load(tmp_path / "full.rank0.pt", weights_only=True)
    full1 = torch.load(tmp_path / "full.rank1.pt", weights_only=True)
    assert full0 != full1  # different data (and dropout) on each rank


def test_reconstruction_loss_stays_float32_under_autocast():
    cfg = ss.PRESETS["tiny"]
    x, y = 0.3 * torch.randn(2, 1, 4000), 0.3 * torch.randn(2, 1, 4000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ss.reconstruction_loss(x, y, cfg)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(ss.reconstruction_loss(x, y, cfg).item(), rel=1e-6)


def test_ctrl_c_saves_and_the_run_resumes(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "soundstream.py"), "--train", "--preset", "tiny", "--out", str(out),
            "--steps", "400", "--log_every", "1", "--eval_utterances", "1", "--batch_size", "2",
            "--segment_seconds", "0.2", "--enc_channels", "4", "--dec_channels", "4", "--latent_dim", "8",
            "--codebook_size", "16", "--num_quantizers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # wait until training runs, then press Ctrl-C
        if line.startswith("step 3/"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "stopped at step" in stdout and "Traceback" not in stderr
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= step < 400
    r = subprocess.run([sys.executable, str(ROOT / "soundstream.py"), "--train", "--resume", "--out", str(out),
                        "--steps", str(step + 2)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"resumed at step {step}" in r.stdout and f"step {step + 2}/{step + 2}" in r.stdout
