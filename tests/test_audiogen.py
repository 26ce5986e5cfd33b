"""Tests of audiogen.py: both codebook patterns against a naive loop (build, revert, the valid cells), the
classifier-free guidance formula (gamma 1 is the conditional model, 0 the unconditional), dropped text that no
longer matters, text padding that never matters, causality, the KV cache against recomputation, the loss over the
valid cells by hand, mixing (lengths, SNR, captions), continuation that keeps the prompt, the vocabulary and the
frozen-feature interface, the attribute analysers on synthetic signals, exact resume, a DDP step, one-line errors
for bad input, the paper preset's parameter count, and the shipped checkpoint against its card."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import audiogen

ROOT = Path(__file__).resolve().parent.parent
CODEC = "checkpoints/encodec_sounds_16khz_4x256.pt"
CFG = audiogen.Config(dim=32, heads=4, layers=2, ffn=64, dropout=0.0, bias=True, num_codebooks=3, codebook_size=7,
                      pattern="delay", text_encoder="words", text_dim=16, text_layers=1, text_heads=2, max_text=12,
                      clip_seconds=0.2)
VOCAB = audiogen.Vocab.from_captions(["two high beeps", "a low noise burst", "someone speaking"])


def small_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return audiogen.AudioGenLM(dataclasses.replace(CFG, **kw), VOCAB).eval()


def random_codes(B, K, T, N, seed=1):
    return torch.randint(N, (B, K, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Patterns


def naive_build(codes, delays, special):
    B, K, T = codes.shape
    S = T + max(delays) + 1
    seq = [[[special] * S for _ in range(K)] for _ in range(B)]
    for b in range(B):
        for s in range(S):
            for k in range(K):
                t = s - 1 - delays[k]
                if 0 <= t < T:
                    seq[b][k][s] = int(codes[b, k, t])
    return torch.tensor(seq)


@pytest.mark.parametrize("kind,delays", [("parallel", [0, 0, 0]), ("delay", [0, 1, 2])])
def test_patterns_match_a_naive_loop_and_round_trip(kind, delays):
    p = audiogen.Pattern(kind, 3)
    assert p.delays == delays
    codes = random_codes(2, 3, 5, 7)
    seq = p.build(codes, 7)
    assert torch.equal(seq, naive_build(codes, delays, 7))
    assert torch.equal(p.revert(seq, 5), codes)
    assert torch.equal(p.valid(5), seq[0] != 7)  # codes are < 7: the special token marks the empty cells
    assert p.steps(5) == 5 + max(delays) + 1


def test_delay_pattern_valid_cells_by_hand():
    # K = 2, T = 2, delays 0, 1: S = 4; step 0 is the start, codebook 1 at steps 1-2, codebook 2 at 2-3
    assert audiogen.Pattern("delay", 2).valid(2).tolist() == [[False, True, True, False], [False, False, True, True]]
    assert audiogen.Pattern("parallel", 2).valid(2).tolist() == [[False, True, True], [False, True, True]]


# ---------------------------------------------------------------------------------------------------------------
# Guidance, text and masks


def test_guidance_formula_by_hand():
    cond, uncond = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    lc, lu = cond.log_softmax(-1), uncond.log_softmax(-1)
    assert torch.allclose(audiogen.guided_logprobs(cond, uncond, 1.0), lc)  # gamma 1: the conditional
    assert torch.allclose(audiogen.guided_logprobs(cond, uncond, 0.0), lu)  # gamma 0: the unconditional
    assert torch.allclose(audiogen.guided_logprobs(cond, uncond, 3.0), 3 * lc - 2 * lu)


def test_cfg_scale_one_samples_the_conditional_model_alone():
    lm = small_lm()
    text = lm.text_ids(["two high beeps", "someone speaking"])
    a = lm.generate(text, 4, cfg_scale=1.0, temperature=0, top_k=0)  # greedy: the conditional argmax
    seq = torch.full((2, 3, lm.pattern.steps(4)), 7)
    u, m = lm.encode_text(text)
    for s in range(1, seq.shape[-1]):  # greedy decoding by hand from the conditional logits
        ids = lm.decode(u, m, seq[:, :, :s])[:, :, -1].argmax(-1)
        seq[:, :, s] = torch.where(lm.pattern.valid(4)[:, s], ids, torch.full_like(ids, 7))
    assert torch.equal(a, lm.pattern.revert(seq, 4))
    b = lm.generate(text, 4, cfg_scale=3.0, temperature=0, top_k=0)
    assert not torch.equal(a, b)  # guidance changes the choice somewhere (a random model)
    seq = torch.full((2, 3, lm.pattern.steps(4)), 7)  # and gamma 3 by hand: 3 log p(.|u) - 2 log p(.)
    nu, nm = lm.encode_text(text, drop=torch.ones(2, dtype=torch.bool))
    for s in range(1, seq.shape[-1]):
        mixed = audiogen.guided_logprobs(lm.decode(u, m, seq[:, :, :s])[:, :, -1],
                                         lm.decode(nu, nm, seq[:, :, :s])[:, :, -1], 3.0)
        ids = mixed.argmax(-1)
        seq[:, :, s] = torch.where(lm.pattern.valid(4)[:, s], ids, torch.full_like(ids, 7))
    assert torch.equal(b, lm.pattern.revert(seq, 4))


def test_dropped_text_no_longer_matters_and_kept_text_does():
    lm = small_lm()
    steps = lm.pattern.build(random_codes(2, 3, 4, 7), 7)
    t1, t2 = lm.text_ids(["two high beeps", "two"]), lm.text_ids(["someone speaking", "a low noise burst"])
    drop = torch.tensor([True, False])
    a, b = lm(t1, steps, drop), lm(t2, steps, drop)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # row 0 dropped: the same whatever its text
    assert not torch.allclose(a[1], b[1], atol=1e-3)  # row 1 kept


def test_a_caption_without_known_words_is_the_null_text():
    lm = small_lm()
    steps = lm.pattern.build(random_codes(2, 3, 4, 7), 7)
    empty = (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    out = lm(empty, steps)
    assert torch.isfinite(out).all()
    dropped = lm(lm.text_ids(["two high beeps", "a"]), steps, torch.tensor([True, True]))
    assert torch.allclose(out, dropped, atol=1e-5)


def test_text_padding_and_later_steps_never_change_logits():
    lm = small_lm()
    steps = lm.pattern.build(random_codes(1, 3, 4, 7), 7)
    ids, mask = lm.text_ids(["two high beeps"])
    padded = torch.nn.functional.pad(ids, (0, 4))
    a = lm((ids, mask), steps)
    assert torch.allclose(a, lm((padded, padded != 0), steps), atol=1e-5)
    later = steps.clone()
    later[:, :, 3:] = (later[:, :, 3:] + 1) % 7
    b = lm((ids, mask), later)
    assert torch.allclose(a[:, :, :3], b[:, :, :3], atol=1e-6) and not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_the_text_reaches_the_audio_through_the_prefix_and_through_cross_attention():
    lm = small_lm()
    steps = lm.pattern.build(random_codes(1, 3, 4, 7), 7)
    t1, t2 = lm.text_ids(["two high beeps"]), lm.text_ids(["someone speaking"])
    for block in lm.blocks:  # cross-attention off: the prefix alone still carries the text
        block.cross.out.weight.data.zero_()
        block.cross.out.bias.data.zero_()
    assert not torch.allclose(lm(t1, steps), lm(t2, steps), atol=1e-4)
    u, m = lm.encode_text(t1)
    u2, m2 = lm.encode_text(t2)
    lm2 = small_lm()  # and the cross-attention alone: the same prefix, other text in the cross-attention keys
    x1 = lm2.blocks[0].cross(torch.ones(1, 2, 32), u, m)
    x2 = lm2.blocks[0].cross(torch.ones(1, 2, 32), u2, m2)
    assert not torch.allclose(x1, x2, atol=1e-4)


@pytest.mark.parametrize("pattern", ["delay", "parallel"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_kv_cache_is_token_identical_to_recomputation(pattern, scale):
    lm = small_lm(pattern=pattern)
    text = lm.text_ids(["two high beeps", "someone speaking then two"])
    a = lm.generate(text, 6, scale, generator=torch.Generator().manual_seed(3))
    b = lm.generate(text, 6, scale, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 3, 6)


def test_incremental_logits_equal_the_full_forward():
    lm = small_lm()
    text = lm.text_ids(["two high beeps", "a burst"])
    u, m = lm.encode_text(text)
    steps = lm.pattern.build(random_codes(2, 3, 4, 7), 7)
    full = lm.decode(u, m, steps)
    caches = [{} for _ in lm.blocks]
    parts = [lm.step_logits(u, m, steps[:, :, :2], caches, 0)]
    parts += [lm.step_logits(u, m, steps[:, :, s:s + 1], caches, s) for s in range(2, steps.shape[-1])]
    assert torch.allclose(torch.cat(parts, dim=2), full, atol=1e-5)
    assert "xk" in caches[0] and caches[0]["xk"].shape[2] == u.shape[1]  # the text's keys: computed once


def test_loss_is_the_cross_entropy_over_valid_cells_by_hand():
    lm = small_lm()
    codes = random_codes(2, 3, 3, 7)
    text = lm.text_ids(["two high beeps", "a low noise burst"])
    loss, per_q = audiogen.lm_loss(lm, text, codes)
    seq = lm.pattern.build(codes, 7)
    logits = lm(text, seq[:, :, :-1])
    expect = []
    for k in range(3):  # codebook k of frame t sits at step t + 1 + k, predicted from step t + k
        terms = [-logits[b, k, t + k].log_softmax(-1)[codes[b, k, t]] for b in range(2) for t in range(3)]
        expect.append(torch.stack(terms).mean())
    assert torch.allclose(per_q, torch.stack(expect), atol=1e-5)
    assert torch.allclose(loss, torch.stack(expect).mean(), atol=1e-5)


def test_continuation_keeps_the_prompt_codes():
    lm = small_lm()
    prompt = random_codes(2, 3, 3, 7, seed=5)
    out = lm.generate(lm.text_ids(["two", "beeps"]), 6, 3.0, prompt=prompt,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :3], prompt) and out.shape == (2, 3, 6)
    with pytest.raises(ValueError, match="the prompt has 3 frames; generate at least as many"):
        lm.generate(lm.text_ids(["two", "beeps"]), 2, prompt=prompt)


def test_vocabulary_unknown_words_and_empty_text():
    ids, unknown = VOCAB.encode("Two HIGH beeps, like a dog!", 12)
    assert [VOCAB.symbols[i] for i in ids] == ["two", "high", "beeps", "a"] and unknown == ["like", "dog"]
    assert VOCAB.symbols[:2] == ["<pad>", "<null>"] and "and" in VOCAB.symbols
    with pytest.raises(ValueError, match="has no words"):
        VOCAB.encode("  ", 12)
    with pytest.raises(ValueError, match="none of the words of 'a dog barking' are in|none of the words"):
        VOCAB.encode("dog barking", 12)
    with pytest.raises(ValueError, match="at most 2"):
        VOCAB.encode("two high beeps", 2)


def test_frozen_text_features_plug_in_through_the_same_interface(tmp_path):
    feats = {"two high beeps": torch.randn(3, 16), "a noise burst": torch.randn(5, 16)}
    torch.save(feats, tmp_path / "t5.pt")
    torch.manual_seed(0)
    lm = audiogen.AudioGenLM(dataclasses.replace(CFG, text_encoder="features"), None, "",
                             str(tmp_path / "t5.pt")).eval()
    u, mask = lm.encode_text(["two high beeps", "a noise burst"])
    assert u.shape == (2, 5, 32) and mask.sum(1).tolist() == [3, 5]
    assert lm.generate(["two high beeps"], 3, 3.0).shape == (1, 3, 3)
    with pytest.raises(ValueError, match="holds no features for 'a dog'"):
        lm.encode_text(["a dog"])
    torch.save({"x": torch.randn(3, 8)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"expected \(L, 16\)"):
        audiogen.FeatureText(tmp_path / "bad.pt", 16)
    with pytest.raises(ValueError, match="needs --text_features"):
        audiogen.FeatureText("", 16)


# ---------------------------------------------------------------------------------------------------------------
# Mixing


def test_mixing_keeps_the_length_and_sets_the_snr():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 0.1, torch.randn(1000, generator=g) * 0.3
    for snr in (-5.0, 0.0, 4.0):
        m = audiogen.mix(a, b, snr)
        assert m.shape == a.shape
        other = m - a
        assert 10 * math.log10(a.pow(2).mean() / other.pow(2).mean()) == pytest.approx(snr, abs=1e-4)
    loud = audiogen.mix(a * 9, b * 9, 0.0)
    assert loud.abs().max() <= 0.99 + 1e-6  # scaled down, never clipped
    with pytest.raises(ValueError, match="one length"):
        audiogen.mix(a, b[:10], 0.0)
    assert audiogen.join_captions("two beeps", "a chirp") == "two beeps and a chirp"


def test_dataset_mixes_the_share_asked_and_joins_captions_consistently():
    wavs = torch.randn(6, 800) * 0.1
    codes = random_codes(6, 3, 5, 7)
    captions = ["two high beeps", "a low noise burst", "someone speaking", "two", "high", "beeps"]
    cfg = dataclasses.replace(CFG, max_text=12)
    run = dataclasses.replace(audiogen.PRESETS["tiny"][1], mix_prob=0.5)
    ds = audiogen.SoundDataset(cfg, run, wavs, codes, captions, VOCAB, seed=0)
    mixed = 0
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i in range(6):
            item = ds[i]
            words = [VOCAB.symbols[t] for t in item["text"] if t]
            assert item["wav"].shape == (800,) and item["text"].shape == (12,)
            if item["mixed"]:
                mixed += 1
                assert words[:len(captions[i].split())] == captions[i].split() and "and" in words
                assert not torch.equal(item["wav"], wavs[i])
            else:
                assert words == captions[i].split() and torch.equal(item["codes"], codes[i])
                assert torch.equal(item["wav"], wavs[i])
    assert 18 <= mixed <= 42  # about half of 60
    again = audiogen.SoundDataset(cfg, run, wavs, codes, captions, VOCAB, seed=0)
    for epoch in (3, 7):  # drawn from (seed, epoch, index): another instance draws the same
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        assert all(torch.equal(ds[i]["wav"], again[i]["wav"]) and torch.equal(ds[i]["text"], again[i]["text"])
                   for i in range(6))
    none = audiogen.SoundDataset(cfg, dataclasses.replace(run, mix_prob=0.0), wavs, codes, captions, VOCAB)
    assert not any(none[i]["mixed"] for i in range(6))


# ---------------------------------------------------------------------------------------------------------------
# Attribute analysers


def tone(f, seconds, sr=16000):
    t = torch.arange(int(seconds * sr)) / sr
    return torch.sin(2 * math.pi * f * t) * 0.5


def silence(seconds, sr=16000):
    return torch.randn(int(seconds * sr), generator=torch.Generator().manual_seed(0)) * 3e-5


def test_analysers_on_synthetic_signals():
    two_low = torch.cat([silence(0.2), tone(250, 0.2), silence(0.3), tone(250, 0.2), silence(0.3)])
    a = audiogen.analyse(two_low)
    assert (a["count"], a["band"], a["noise"], a["speech"], a["direction"]) == (2, "low", False, False, "steady")
    assert audiogen.analyse(torch.cat([silence(0.2), tone(2500, 0.3), silence(0.2)]))["band"] == "high"
    assert audiogen.analyse(torch.cat([silence(0.2), tone(700, 0.3), silence(0.2)]))["band"] == "mid"
    t = torch.arange(4800) / 16000
    up = torch.sin(2 * math.pi * 300 * (torch.exp(t * math.log(8) / 0.3) - 1) / (math.log(8) / 0.3)) * 0.5
    assert audiogen.analyse(torch.cat([silence(0.2), up, silence(0.2)]))["direction"] == "rising"
    assert audiogen.analyse(torch.cat([silence(0.2), up.flip(0), silence(0.2)]))["direction"] == "falling"
    noise = torch.randn(3200, generator=torch.Generator().manual_seed(1)) * 0.3
    three = torch.cat([silence(0.1), noise, silence(0.2), noise, silence(0.2), noise, silence(0.2)])
    n = audiogen.analyse(three)
    assert n["noise"] and n["count"] == 3 and not n["speech"]


def test_analysers_hear_speech_and_sequences_are_checked_by_halves():
    rows = [json.loads(x) for x in audiogen.SOUNDS.read_text().splitlines()]
    speech = next(r for r in rows if r["kind"] == "speech")
    wav = audiogen.load(audiogen.SOUNDS.parent / speech["audio"], 16000, 1)[0][0]
    assert audiogen.analyse(wav)["speech"]
    clip = torch.cat([silence(0.2), tone(250, 0.2), silence(0.6), torch.randn(3200) * 0.3, silence(0.8)])
    events = [{"kind": "beep", "count": 1, "band": "low"}, {"kind": "noise", "count": 1}]
    checks = audiogen.attribute_checks(clip, 16000, events)
    assert checks == {"count": [True, True], "band": [True], "direction": [], "noise": [True, True], "speech": []}
    swapped = audiogen.attribute_checks(clip, 16000, events[::-1])
    assert swapped["noise"] == [False, False]
    acc = audiogen.attribute_accuracy([clip, clip], 16000, [events, events[::-1]])
    assert acc["noise"] == 0.5 and acc["all"] == 0.5 and math.isnan(acc["direction"])


def test_text_is_dropped_for_the_share_asked():
    torch.manual_seed(0)
    share = audiogen.text_dropout_mask(20000, 0.1).float().mean().item()
    assert share == pytest.approx(0.1, abs=0.01)
    assert not audiogen.text_dropout_mask(100, 0.0).any()


def test_derangement_has_no_fixed_point():
    p = audiogen.derangement(7, seed=3)
    assert sorted(p) == list(range(7)) and all(i != j for i, j in enumerate(p))


# ---------------------------------------------------------------------------------------------------------------
# Presets, errors


def test_paper_preset_has_audiocrafts_parameter_count():
    with torch.device("meta"):
        lm = audiogen.AudioGenLM(audiogen.PRESETS["paper"][0])
    # audiocraft builders.get_lm_model (audiogen_lm, medium) + the T5 output_proj: 1,837,556,736 + 1,574,400
    assert sum(p.numel() for p in lm.parameters()) == 1_839_131_136
    layer = sum(p.numel() for p in lm.blocks[0].parameters())
    assert layer == 16 * 1536 ** 2 + 6 * 1536  # 4d^2 self, 4d^2 cross, 8d^2 FFN, three LayerNorms


def test_learning_rate_warms_up_then_follows_a_cosine():
    cfg, run = audiogen.PRESETS["tiny"]
    run = dataclasses.replace(run, lr=1.0, warmup_steps=10, steps=110)
    t = audiogen.Trainer.__new__(audiogen.Trainer)
    t.run = run
    assert [t.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [t.lr_at(s) for s in (10, 60, 110, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_bad_prompts_codecs_and_checkpoints_get_one_line_errors(tmp_path):
    codec = audiogen.load_codec(CODEC)[0]
    for wav, rate, match in ((torch.zeros(1, 8000), 24000, "at 24000 Hz; the codec reads 16000"),
                             (torch.zeros(1, 2, 8000), 16000, "2 channels"),
                             (torch.full((1, 8000), float("nan")), 16000, "NaN"),
                             (torch.zeros(1, 0), 16000, "not empty"),
                             (torch.zeros(1, 8000, dtype=torch.int16), 16000, "float tensor")):
        with pytest.raises(ValueError, match=match):
            audiogen.check_prompt(wav, rate, codec)
    with pytest.raises(ValueError, match="is a 'valle' checkpoint, not a codec's"):
        audiogen.load_codec("checkpoints/valle_tiny.pt")
    with pytest.raises(ValueError, match="8 x 256 codes at 50 Hz, 1 channel.*takes 3 x 7"):
        audiogen.check_codec(audiogen.load_codec("checkpoints/encodec_16khz_8x256.pt")[0], CFG, "c.pt")
    with pytest.raises(ValueError, match="is a 'soundstream' checkpoint, not a 'audiogen' one"):
        audiogen.AudioGenLM.load("checkpoints/soundstream_16khz_8x256.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        audiogen.load_codec(tmp_path / "junk.pt")


def test_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit):
        audiogen.main(["--sample", "--ckpt", "x", "--temprature", "1"])
    assert "did you mean --temperature" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--ckpt is required"):
        audiogen.main(["--sample", "--text", "a beep"])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        audiogen.main(["--sample", "--ckpt", "x", "--temperature", "-1"])
    for text, match in (("", "has no words"), ("dog barking", "none of the words")):
        with pytest.raises(ValueError, match=match):
            audiogen.main(["--sample", "--ckpt", "checkpoints/audiogen_tiny.pt", "--text", text, "--out",
                           "/tmp/never.wav"])


def test_bad_configs_get_one_line_errors(tmp_path):
    cfg, run = audiogen.PRESETS["tiny"]
    for c, r, match in ((dataclasses.replace(cfg, pattern="zigzag"), run, "pattern must be one of"),
                        (dataclasses.replace(cfg, dim=30), run, "must divide by heads"),
                        (cfg, dataclasses.replace(run, text_dropout=1.0), "text_dropout must be in"),
                        (cfg, dataclasses.replace(run, mix_snr=(5.0, -5.0)), "mix_snr")):
        with pytest.raises(ValueError, match=match):
            audiogen.check_config(c, r)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": str(ROOT / "data/sounds/audio/beep_0006.flac")}) + "\n")
    with pytest.raises(ValueError, match="needs a \"caption\""):
        audiogen.captioned(str(tmp_path / "m.jsonl"), "train")


# ---------------------------------------------------------------------------------------------------------------
# Training: resume and DDP on a small manifest


def small_manifest(tmp_path, n_train=8):
    rows = [json.loads(x) for x in audiogen.SOUNDS.read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][:n_train]
    valid = [r for r in rows if r["split"] == "valid"][:1]
    path = tmp_path / "small.jsonl"
    with open(path, "w") as f:
        for r in train + valid:
            f.write(json.dumps({**r, "audio": str(audiogen.SOUNDS.parent / r["audio"])}) + "\n")
    return str(path)


TRAIN_CFG = dataclasses.replace(CFG, num_codebooks=4, codebook_size=256, frame_rate=50.0, clip_seconds=0.4,
                                dropout=0.1, max_text=32)


def small_run(tmp_path, out, **kw):
    _, run = audiogen.PRESETS["tiny"]
    kw = {"batch_size": 4, "steps": 4, "log_every": 2, "ckpt_every": 1000, "sample_every": 1000, "threads": 1,
          "mix_prob": 0.5, "warmup_steps": 2, "codec": CODEC, **kw}
    return dataclasses.replace(run, data=small_manifest(tmp_path), out=str(out), **kw)


def test_resume_continues_bit_exactly(tmp_path):
    _, full = audiogen.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "full"))
    _, first = audiogen.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"), interrupt_after=2)
    assert len(first) == 2
    _, rest = audiogen.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"), resume=True)
    assert first + rest == full
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already holds a training run"):
        audiogen.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"))
    model = audiogen.AudioGen.load(tmp_path / "full" / "model.pt")  # loads with the codec it names
    wav, codes = model.generate(["two high beeps"], 0.2, generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 3200) and codes.shape == (1, 4, 10)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    trainer, _ = audiogen.train(TRAIN_CFG, small_run(Path(tmp), out, steps=2))
    torch.save(trainer.model.state_dict(), f"{out}/rank{rank}.pt")


def test_ddp_two_processes_keep_the_model_identical(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(out)), nprocs=2, join=True)
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], saved[k]) for k in a)
    torch.manual_seed(0)  # the initial weights, which training moved
    vocab = audiogen.Vocab(torch.load(out / "ckpt.pt", weights_only=True)["vocab"])
    init = audiogen.AudioGenLM(TRAIN_CFG, vocab).state_dict()
    assert not torch.equal(a["heads.0.weight"], init["heads.0.weight"])


# ---------------------------------------------------------------------------------------------------------------
# The shipped checkpoints against their card (checkpoints/README.md)


def card_line(pattern):
    import re
    m = re.search(pattern, (ROOT / "checkpoints" / "README.md").read_text(), re.M)
    assert m, pattern
    return m


def test_the_shipped_sound_tokenizer_and_model_match_their_card():
    import hashlib
    for name in ("encodec_sounds_16khz_4x256.pt", "audiogen_tiny.pt"):
        m = card_line(rf"^- file: `\w+\.py`, checkpoint: `checkpoints/{name}`\n- sha256: `([0-9a-f]{{64}})`")
        assert hashlib.sha256((ROOT / "checkpoints" / name).read_bytes()).hexdigest() == m[1], name
        assert (ROOT / "checkpoints" / name).stat().st_size < 16 * 2 ** 20
    model = audiogen.AudioGen.load(ROOT / "checkpoints" / "audiogen_tiny.pt")
    entries = audiogen.captioned(None, "test")[:16]
    m = card_line(r"^- test check, the first 16 held-out clips: CE own ([\d.]+), none ([\d.]+) nats; "
                  r"codec resynthesis attribute accuracy \(all\) ([\d.]+) %")
    ce = audiogen.heldout_ce(model, entries)
    assert ce["own"][0] == pytest.approx(float(m[1]), abs=0.01) and ce["none"][0] == pytest.approx(float(m[2]),
                                                                                                   abs=0.01)
    real = torch.stack([audiogen.read_clip(e["path"], model.lm.cfg, model.codec) for e in entries])
    rec = model.codec.decode(audiogen.encode_clips(model.codec, real))[:, 0, :real.shape[-1]]
    acc = audiogen.attribute_accuracy(list(rec), 16000, [e["events"] for e in entries])
    assert 100 * acc["all"] >= float(m[3]) - 10


def test_training_on_frozen_text_features_with_mixtures_and_a_sample(tmp_path):
    data = small_manifest(tmp_path)
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    g = torch.Generator().manual_seed(0)
    feats = {r["caption"]: torch.randn(len(r["caption"].split()), 16, generator=g) for r in rows}
    torch.save(feats, tmp_path / "t5.pt")
    cfg = dataclasses.replace(TRAIN_CFG, text_encoder="features")
    run = small_run(tmp_path, tmp_path / "feat", text_features=str(tmp_path / "t5.pt"), mix_prob=1.0, steps=2,
                    sample_every=2)
    trainer, history = audiogen.train(cfg, run)
    assert len(history) == 2 and all(math.isfinite(h["ce"]) for h in history)
    assert (tmp_path / "feat" / "samples" / "step0000002.wav").is_file()
    assert trainer.model.text is None and trainer.model.vocab is None
    a, b = tuple(feats)[:2]
    assert torch.equal(trainer.model.features((a, b)), torch.cat([feats[a], feats[b]]))  # a mixture's text
