"""Tests of valle.py: the generic LM parts (the prefix-LM mask, causality by gradient, the KV cache against full
recomputation, per-row end tokens, the samplers by hand), the AR and NAR layouts against naive loops, positions,
the adaptive norm, tied heads, the dataset's prompts, exact resume and a DDP step, one-line errors for bad input,
the evaluation's wiring, the paper's tokenizer from Meta's package, and the shipped checkpoint against its card."""

import math

import torch

import valle

CFG = valle.Config(dim=32, heads=4, layers=2, ffn=64, dropout=0.0, text_vocab=20, codebook_size=16, max_len=128)


def model(seed=0):
    torch.manual_seed(seed)
    return valle.ARModel(CFG).eval()


def test_prefix_lm_mask_by_hand():
    m = valle.prefix_lm_mask(2, 5)
    expect = torch.tensor([[1, 1, 0, 0, 0],   # phoneme 0 sees both phonemes, no audio
                           [1, 1, 0, 0, 0],
                           [1, 1, 1, 0, 0],   # audio 0 sees the phonemes and itself
                           [1, 1, 1, 1, 0],
                           [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)


def test_causality_by_gradient():
    """d(output at position i) / d(input at position j) is zero exactly where the mask forbids it."""
    m = model()
    text, audio = torch.randint(20, (1, 3)), torch.randint(16, (1, 5))
    h = m.embed(text, audio).detach().requires_grad_(True)  # (1, 8, D)
    mask = valle.prefix_lm_mask(3, 8)
    out = h
    for block in m.blocks:
        out = block(out, mask)
    for i in range(8):
        g, = torch.autograd.grad(out[0, i].sum(), h, retain_graph=True)
        seen = g[0].abs().sum(-1) > 0  # (8,)
        assert torch.equal(seen, mask[i]), (i, seen)


def test_changing_a_later_token_never_changes_earlier_logits():
    m = model()
    text, audio = torch.randint(20, (2, 4)), torch.randint(16, (2, 6))
    base = m(text, audio)
    other = audio.clone()
    other[:, 3] = (other[:, 3] + 1) % 16
    changed = m(text, other)
    # logits at audio position t predict token t; they read tokens < t only: positions 0..3 unchanged
    assert torch.equal(base[:, :4], changed[:, :4]) and not torch.equal(base[:, 4:], changed[:, 4:])
    text2 = text.clone()
    text2[:, -1] = (text2[:, -1] + 1) % 20
    assert not torch.equal(m(text2, audio)[:, 0], base[:, 0])  # every prediction reads the phonemes


def test_kv_cache_is_token_identical_to_recomputation():
    m = model(1)
    text, prompt = torch.randint(20, (3, 5)), torch.randint(16, (3, 4))
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=5), dict(temperature=0.8, top_p=0.9)):
        a, la, pa = m.generate(text, prompt, 30, use_cache=True, generator=torch.Generator().manual_seed(0), **kw)
        b, lb, pb = m.generate(text, prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(a, b) and torch.equal(la, lb), kw
        assert torch.allclose(pa, pb, atol=1e-4), kw


def test_each_row_stops_at_its_own_end_token(monkeypatch):
    m = model()
    script = iter([torch.tensor([3, 16, 5]), torch.tensor([16, 7, 9]), torch.tensor([2, 2, 16])])
    monkeypatch.setattr(valle, "sample", lambda logits, *a, **k: next(script))
    out, lengths, _ = m.generate(torch.randint(20, (3, 2)), torch.zeros(3, 0, dtype=torch.long), 5)
    assert lengths.tolist() == [1, 0, 2]  # new tokens before each row's end token
    assert out[:, :3].tolist() == [[3, 16, 16], [16, 16, 16], [5, 9, 16]]  # after the end: the end id
    assert (out[:, 3:] == 16).all()  # all rows done: the loop stopped


def test_length_cap_without_an_end_token(monkeypatch):
    m = model()
    monkeypatch.setattr(valle, "sample", lambda logits, *a, **k: torch.zeros(len(logits), dtype=torch.long))
    out, lengths, _ = m.generate(torch.randint(20, (2, 2)), torch.zeros(2, 1, dtype=torch.long), 7)
    assert lengths.tolist() == [7, 7] and (out == 0).all()


def test_generate_log_probability_is_that_of_teacher_forcing(monkeypatch):
    """The score best-of-N ranks by: log p of each sampled token, the end token included, nothing after it, under
    the model's own distribution (not the tempered or filtered one), equal to the log-softmax of a teacher-forced
    forward pass at the same tokens; at the first step the end token is excluded (an utterance has a frame)."""
    m = model(2)
    text, prompt = torch.randint(20, (2, 3)), torch.randint(16, (2, 2))
    script = iter([torch.tensor([4, 5]), torch.tensor([16, 7]), torch.tensor([9, 16])])
    monkeypatch.setattr(valle, "sample", lambda logits, *a, **k: next(script))
    out, lengths, logp = m.generate(text, prompt, 3, temperature=0.5, top_k=3)
    assert lengths.tolist() == [1, 2]
    full = torch.cat([prompt, torch.tensor([[4, 16, 16], [5, 7, 16]])], dim=1)  # (2, 5): prompt, new tokens
    logits = m(text, full)  # (2, 5, 17): the prediction of audio token t at index t
    lp = logits.log_softmax(-1)
    first = logits[:, 2].clone()
    first[:, 16] = float("-inf")
    lp0 = first.log_softmax(-1)
    expect = torch.stack([lp0[0, 4] + lp[0, 3, 16], lp0[1, 5] + lp[1, 3, 7] + lp[1, 4, 16]])
    assert torch.allclose(logp, expect, atol=1e-5)


def test_the_end_token_never_comes_first():
    m = model(3)
    with torch.no_grad():  # the final norm outputs e_0 everywhere: logits = head.weight[:, 0]
        m.norm.weight.zero_()
        m.norm.bias.zero_()
        m.norm.bias[0] = 1.0
        m.head.weight[:, 0] = 0.0
        m.head.weight[16, 0] = 50.0  # the end token: all but certain at every step
    out, lengths, _ = m.generate(torch.randint(20, (4, 3)), torch.randint(16, (4, 2)), 5,
                                 generator=torch.Generator().manual_seed(0))
    assert lengths.tolist() == [1, 1, 1, 1] and (out[:, 0] != 16).all() and (out[:, 1:] == 16).all()


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    k2 = valle.filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.equal(k2[0, :2], logits[0, :2])
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: the first two stay
    p = valle.filter_logits(logits, top_p=0.7)
    assert torch.equal(torch.isinf(p), torch.tensor([[False, False, True, True]]))
    # top_p 0.5: the first token alone reaches it
    assert torch.equal(torch.isinf(valle.filter_logits(logits, top_p=0.5)), torch.tensor([[False, True, True, True]]))
    # order does not matter: the same set on a permuted row
    perm = logits[:, [2, 0, 3, 1]]
    assert torch.equal(torch.isinf(valle.filter_logits(perm, top_p=0.7)), torch.tensor([[True, False, True, False]]))
    assert valle.sample(logits, temperature=0).tolist() == [0]
    import pytest
    for kw, what in ((dict(temperature=-1), "temperature must be >= 0"), (dict(top_k=-1), "top_k must be >= 0"),
                     (dict(top_p=0.0), r"top_p in \(0, 1\]"), (dict(top_p=1.5), r"top_p in \(0, 1\]")):
        with pytest.raises(ValueError, match=what):
            valle.sample(logits, **{"temperature": 1.0, **kw})
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([valle.sample(logits, 1.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert inf == -math.inf


def test_sinusoids_by_hand():
    pe = valle.sinusoids(3, 4)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(pe[2], torch.tensor([math.sin(2), math.cos(2), math.sin(2 / 100), math.cos(2 / 100)]))


def nar(seed=0):
    torch.manual_seed(seed)
    return valle.NARModel(CFG).eval()


def test_nar_stage_reads_only_the_codebooks_below_it_and_the_whole_prompt():
    m = nar()
    text, prompt, target = torch.randint(20, (1, 3)), torch.randint(16, (1, 8, 5)), torch.randint(16, (1, 8, 6))
    for j in (1, 4, 7):
        stage = torch.tensor([j])
        base = m(text, prompt, target, stage)
        later = target.clone()
        later[:, j:] = (later[:, j:] + 3) % 16  # codebooks >= j: not inputs of stage j
        assert torch.equal(m(text, prompt, later, stage), base)
        earlier = target.clone()
        earlier[:, j - 1] = (earlier[:, j - 1] + 3) % 16
        assert not torch.allclose(m(text, prompt, earlier, stage), base)
        p2 = prompt.clone()
        p2[:, 7] = (p2[:, 7] + 3) % 16  # the prompt enters with all its codebooks
        assert not torch.allclose(m(text, p2, target, stage), base)


def test_nar_stage_is_per_row_and_conditions_the_norms():
    m = nar()
    text, prompt, target = torch.randint(20, (2, 3)), torch.randint(16, (2, 8, 5)), torch.randint(16, (2, 8, 6))
    both = m(text, prompt, target, torch.tensor([2, 6]))
    torch.testing.assert_close(both[:1], m(text[:1], prompt[:1], target[:1], torch.tensor([2])))
    torch.testing.assert_close(both[1:], m(text[1:], prompt[1:], target[1:], torch.tensor([6])))
    # the stage embedding alone changes the output: same inputs (all codebooks >= 1 zero), stages 1 and 2 differ
    # only through codebook 1's embedding and the adaptive norms; zero codebook 1's weight to isolate the norms
    t = target.clone()
    t[:, 1:] = 0
    with torch.no_grad():
        m.audio_embeddings[1].weight.zero_()
        m.audio_embeddings[2].weight.copy_(torch.randn(16, CFG.dim))
    a = m(text, prompt, t, torch.tensor([2, 2]))
    with torch.no_grad():
        m.stage_embedding.weight[2] += 1.0
    assert not torch.allclose(m(text, prompt, t, torch.tensor([2, 2])), a)


def test_nar_head_of_codebook_j_is_the_transpose_of_codebook_js_embedding():
    m = nar()
    text, target = torch.randint(20, (1, 3)), torch.randint(16, (1, 8, 6))
    prompt = torch.zeros(1, 8, 0, dtype=torch.long)  # no prompt: codebook 3's embedding is no input of stage 3
    stage = torch.tensor([3])
    before = m(text, prompt, target, stage)
    with torch.no_grad():  # ... but its output layer
        m.audio_embeddings[3].weight.mul_(2)
    torch.testing.assert_close(m(text, prompt, target, stage), 2 * before)
    codes = m.generate(text, prompt, target[:, 0])
    assert codes.shape == (1, 8, 6) and torch.equal(codes[:, 0], target[:, 0])


def naive_ar_layout(text, prompt, target, eos):
    """The layout written out for one row: [phonemes] then [prompt ; target ; end], the loss on target and end."""
    audio = list(prompt) + list(target) + [eos]
    return list(text), audio, [False] * len(prompt) + [True] * (len(target) + 1)


def test_ar_batch_matches_a_naive_loop():
    rows = [([3, 4], [1, 2, 3], [5, 6]), ([7], [], [8, 9, 10, 11]), ([1, 2, 3, 4], [12], [13])]
    text, lengths, audio, mask = valle.ar_batch([torch.tensor(r[0]) for r in rows],
                                                [torch.tensor(r[1], dtype=torch.long) for r in rows],
                                                [torch.tensor(r[2]) for r in rows], eos=16)
    assert lengths.tolist() == [2, 1, 4]
    for i, (t, p, y) in enumerate(rows):
        nt, na, nm = naive_ar_layout(t, p, y, 16)
        assert text[i, :len(nt)].tolist() == nt and (text[i, len(nt):] == 0).all()
        assert audio[i, :len(na)].tolist() == na and (audio[i, len(na):] == 16).all()
        assert mask[i, :len(nm)].tolist() == nm and not mask[i, len(nm):].any()


def test_padding_changes_no_row_of_the_ar_loss():
    m = model()
    rows = [(torch.randint(1, 20, (3,)), torch.randint(16, (4,)), torch.randint(16, (5,))),
            (torch.randint(1, 20, (6,)), torch.randint(16, (2,)), torch.randint(16, (9,)))]
    text, lengths, audio, mask = valle.ar_batch(*zip(*rows), eos=16)
    both = m(text, audio, lengths)
    for i, (t, p, y) in enumerate(rows):
        ti, li, ai, mi = valle.ar_batch([t], [p], [y], eos=16)
        alone = m(ti, ai, li)
        n = ai.shape[1]
        torch.testing.assert_close(both[i, :n][mi[0]], alone[0][mi[0]], atol=1e-5, rtol=1e-5)
    # and the unpadded call agrees with the padded one on a full-length row
    torch.testing.assert_close(m(text[1:], audio[1:])[:, :], both[1:], atol=1e-5, rtol=1e-5)
    loss = valle.ar_loss(m, text, lengths, audio, mask)
    assert math.isclose(loss.item(), torch.nn.functional.cross_entropy(both[mask], audio[mask]).item(), rel_tol=1e-6)


def test_padding_changes_no_row_of_the_nar_logits():
    m = nar()
    rows = [(torch.randint(1, 20, (3,)), torch.randint(16, (8, 4)), torch.randint(16, (8, 5))),
            (torch.randint(1, 20, (6,)), torch.randint(16, (8, 2)), torch.randint(16, (8, 9)))]
    text, prompt, target, lengths = valle.nar_batch(*zip(*rows))
    stage = torch.tensor([3, 6])
    both = m(text, prompt, target, stage, lengths)
    for i, (t, p, y) in enumerate(rows):
        alone = m(t[None], p[None], y[None], stage[i:i + 1])
        torch.testing.assert_close(both[i, :y.shape[-1]], alone[0], atol=1e-5, rtol=1e-5)
    loss = valle.nar_loss(m, text, prompt, target, lengths, stage)
    flat = torch.cat([both[0, :5], both[1, :9]])
    truth = torch.cat([target[0, 3, :5], target[1, 6, :9]])
    assert math.isclose(loss.item(), torch.nn.functional.cross_entropy(flat, truth).item(), rel_tol=1e-6)


def test_zero_shot_synthesis_runs_end_to_end_on_the_shipped_tokenizer():
    from pathlib import Path
    from common.audio import load
    from common.data import demo_manifest, read_manifest
    codec_path = Path(__file__).resolve().parent.parent / "checkpoints" / "encodec_16khz_8x256.pt"
    codec, kind = valle.load_codec(codec_path)
    entries = read_manifest(demo_manifest(), "train")
    vocab = valle.PhonemeVocab.from_entries(entries)
    cfg = valle.Config(dim=32, heads=4, layers=1, ffn=64, dropout=0.0, text_vocab=len(vocab.symbols),
                       codebook_size=256, max_len=512)
    torch.manual_seed(0)
    model = valle.VALLE(cfg, vocab.symbols, codec_path)
    wav = load(entries[0]["path"], 16000, 1)[0]
    prompt = valle.prompt_codes(codec, wav, 16000)
    assert prompt.shape == (1, 8, min(150, wav.shape[-1] // 320))  # the first 3 s at 50 Hz
    out, codes, capped = valle.synthesize(model, codec, entries[1]["phonemes"], prompt, max_frames=10,
                                          generator=torch.Generator().manual_seed(0))
    assert kind == "encodec" and codes.shape[0] == 8 and codes.shape[1] <= 10 and out.shape[0] == 1
    assert out.shape[-1] == codes.shape[1] * 320
    # best-of-N keeps the sample with the highest log-probability per token, its end token counted (a row at the
    # cap has none): the raw sum would pick row 0, a count without the end token row 2
    rows = torch.arange(30).view(3, 10) % 256
    scripted = (rows, torch.tensor([2, 5, 10]), torch.tensor([-3.3, -5.4, -9.5]))
    seen = {}

    def fake_generate(text, prompt_first, cap, *a, **k):
        seen.update(batch=text.shape[0], cap=cap)
        return scripted
    model.ar.generate = fake_generate
    _, codes, capped = valle.synthesize(model, codec, entries[1]["phonemes"], prompt, best_of=3, max_frames=10)
    assert seen == {"batch": 3, "cap": 10} and torch.equal(codes[0], rows[1, :5]) and not capped


def test_resume_continues_bit_exactly(tmp_path):
    import dataclasses
    cfg = valle.Config(dim=32, heads=4, layers=1, ffn=64, dropout=0.1, text_vocab=128, codebook_size=256,
                       max_len=512)
    _, run = valle.PRESETS["tiny"]
    run = dataclasses.replace(run, batch_size=4, steps=4, log_every=2, ckpt_every=1000, max_seconds=3.0,
                              max_text=64, threads=1)
    _, full = valle.train(cfg, dataclasses.replace(run, out=str(tmp_path / "full")))
    _, first = valle.train(cfg, dataclasses.replace(run, out=str(tmp_path / "split")), interrupt_after=2)
    _, rest = valle.train(cfg, dataclasses.replace(run, out=str(tmp_path / "split")), resume=True)
    assert len(first) == 2 and first + rest == full
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    import dataclasses
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = valle.Config(dim=32, heads=4, layers=1, ffn=64, dropout=0.1, text_vocab=128, codebook_size=256,
                       max_len=512)
    _, run = valle.PRESETS["tiny"]
    run = dataclasses.replace(run, batch_size=4, steps=2, log_every=1, ckpt_every=1000, max_seconds=3.0,
                              max_text=64, threads=1, out=out)
    trainer, _ = valle.train(cfg, run)
    torch.save(trainer.model.state_dict(), f"{out}/rank{rank}.pt")


def test_ddp_two_processes_keep_both_stages_identical(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], saved["state_dict"][k]) for k in a)  # rank 0 saved what both hold
    torch.manual_seed(0)  # the run's seed: the initial weights, which training moved
    init = valle.VALLE(valle.config_from_dict(valle.Config, saved["config"]), saved["symbols"], "x").state_dict()
    assert not torch.equal(a["ar.head.weight"], init["ar.head.weight"])
    assert not torch.equal(a["nar.blocks.0.attn.qkv.weight"], init["nar.blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each a one-line error that names the problem


def shipped_codec():
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "checkpoints" / "encodec_16khz_8x256.pt"
    return valle.load_codec(path)[0], path


def small_valle(codec_path, num_codebooks=8):
    from common.data import demo_manifest, read_manifest
    vocab = valle.PhonemeVocab.from_entries(read_manifest(demo_manifest(), "train"))
    cfg = valle.Config(dim=32, heads=4, layers=1, ffn=64, dropout=0.0, text_vocab=len(vocab.symbols),
                       codebook_size=256, num_codebooks=num_codebooks, max_len=512)
    torch.manual_seed(0)
    return valle.VALLE(cfg, vocab.symbols, str(codec_path))


def test_bad_text_and_prompts_get_one_line_errors(monkeypatch):
    import pytest
    codec, path = shipped_codec()
    model = small_valle(path)
    wav = torch.randn(1, 16000 * 2) * 0.1
    for text in ("", "   "):
        with pytest.raises(ValueError, match="the text is empty"):
            valle.phonemize(text)
    with pytest.raises(ValueError, match="has no phonemes"):
        model.vocab.encode("  ")
    with pytest.raises(ValueError, match=r"lacks: q ʘ \(it knows 99\)"):
        model.vocab.encode("h_ə q_ʘ")
    with pytest.raises(ValueError, match="is 0.50 s; it needs at least 1 s"):
        valle.prompt_codes(codec, wav[:, :8000], 16000)
    with pytest.raises(ValueError, match="at 24000 Hz; the codec takes 16000 Hz"):
        valle.prompt_codes(codec, wav, 24000)
    with pytest.raises(ValueError, match="has 2 channel"):
        valle.prompt_codes(codec, wav.expand(2, -1), 16000)
    nan = wav.clone()
    nan[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        valle.prompt_codes(codec, nan, 16000)
    with pytest.raises(ValueError, match=r"prompt codes must be \(1, 8, frames\)"):
        valle.synthesize(model, codec, "h_ə", torch.zeros(1, 4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="best_of must be at least 1"):
        valle.synthesize(model, codec, "h_ə", valle.prompt_codes(codec, wav, 16000), best_of=0)
    assert valle.prompt_codes(codec, wav, 16000).shape == (1, 8, 100)  # 2 s: all of it (less than 3 s)


def test_codec_checkpoints_of_the_wrong_kind_or_with_too_few_codebooks(tmp_path):
    import pytest
    import encodec as ours
    codec, path = shipped_codec()
    model = small_valle(path)
    model.save(tmp_path / "valle.pt")
    with pytest.raises(ValueError, match="is a 'valle' checkpoint, not a codec's"):
        valle.load_codec(tmp_path / "valle.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        valle.load_codec(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="torch.load"):
        valle.load_codec(tmp_path / "junk.pt")
    cfg, _ = ours.PRESETS["tiny"]
    import dataclasses
    ours.EnCodec(dataclasses.replace(cfg, num_quantizers=1, bandwidths=(0.25,))).save(tmp_path / "one.pt")
    with pytest.raises(ValueError, match="with 1 codebook; VALL-E needs at least 2"):
        valle.load_codec(tmp_path / "one.pt")
    with pytest.raises(ValueError, match="8 x 256 codes; the model takes 4 x 256"):
        valle.check_codec(codec, small_valle(path, num_codebooks=4).cfg, "codec.pt")
    with pytest.raises(ValueError, match="is a 'encodec' checkpoint, not a 'valle' one"):
        valle.VALLE.load(path)


def test_without_espeak_new_text_uses_the_manifests_phonemes(monkeypatch):
    import pytest
    from common.data import demo_manifest, read_manifest
    e = read_manifest(demo_manifest())[0]
    monkeypatch.setattr(valle.shutil, "which", lambda name: None)
    assert valle.phonemize(e["text"].upper() + "  ") == e["phonemes"]  # case and spacing do not matter
    with pytest.raises(ValueError, match="espeak-ng is not installed"):
        valle.phonemize("Zebras quietly juggle marmalade.")


def test_command_line_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    run = lambda *a: subprocess.run([sys.executable, "valle.py", *a], cwd=root, capture_output=True,  # noqa: E731
                                    text=True)
    r = run("--sample", "--ckpt", str(tmp_path / "none.pt"), "--prompt", "x.wav", "--text", "hi", "--out", "o.wav")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'none.pt'} not found"]
    r = run("--sample", "--best_off", "2")
    assert r.returncode == 2 and "unknown flag --best_off; did you mean --best_of?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sample_command_writes_speech_in_the_prompts_voice(tmp_path):
    codec, path = shipped_codec()
    small_valle(path).save(tmp_path / "model.pt")
    from common.data import demo_manifest, read_manifest
    e = read_manifest(demo_manifest(), "test")[0]
    valle.main(["--sample", "--ckpt", str(tmp_path / "model.pt"), "--prompt", e["path"], "--phonemes", "h_ə l_oʊ",
                "--max_frames", "12", "--best_of", "2", "--out", str(tmp_path / "out.wav")])
    import soundfile
    wav, sr = soundfile.read(tmp_path / "out.wav")
    assert sr == 16000 and 320 <= len(wav) <= 12 * 320
    import pytest
    with pytest.raises(ValueError, match="needs --prompt"):
        valle.main(["--sample", "--ckpt", str(tmp_path / "model.pt"), "--phonemes", "h_ə"])
    with pytest.raises(ValueError, match="the text is empty"):
        valle.main(["--sample", "--ckpt", str(tmp_path / "model.pt"), "--prompt", e["path"], "--phonemes", " ",
                    "--out", str(tmp_path / "o.wav")])


def test_learning_rate_warms_up_then_decays_linearly():
    import dataclasses
    cfg, run = valle.PRESETS["tiny"]
    run = dataclasses.replace(run, lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    t = valle.Trainer(valle.Config(dim=32, heads=4, layers=1, ffn=64, text_vocab=8, codebook_size=16, max_len=64),
                      run, ["<pad>", "a"])
    assert math.isclose(t.lr_at(0), 1e-4) and math.isclose(t.lr_at(9), 1e-3)
    assert math.isclose(t.lr_at(10), 1e-3) and math.isclose(t.lr_at(35), 1e-3 * (1 - 0.9 * 0.25))
    assert math.isclose(t.lr_at(110), 1e-4) and math.isclose(t.lr_at(500), 1e-4)
    paper = valle.PRESETS["paper"][1]
    assert (paper.lr, paper.warmup_steps, paper.min_lr_ratio, paper.steps) == (5e-4, 32_000, 0.0, 800_000)


def test_eval_pairs_hold_voices_out_and_prompt_from_another_utterance():
    from common.data import demo_manifest, read_manifest
    rows = read_manifest(demo_manifest())
    trained = {e["speaker"] for e in rows if e["split"] == "train"}
    pairs = valle.eval_pairs()
    assert len(pairs) == 24  # the 12 test utterances of each of the two held-out voices
    assert {t["speaker"] for t, _, _ in pairs} == {"festival-ked_diphone", "pico-en-GB"}
    for target, prompt, other in pairs:
        assert target["split"] == "test" and target["speaker"] not in trained
        assert prompt["speaker"] == target["speaker"] and prompt["path"] != target["path"]
        assert prompt["split"] != "train" and other["speaker"] != target["speaker"]


def test_evaluate_scores_each_output_against_the_right_reference(monkeypatch):
    """The metrics replaced by lengths: every column is the mean of what it was computed on, so a swapped
    reference (the target's voice for the prompt's, or the output for the truth) shows."""
    from common import evaluation
    from common.audio import load
    codec, path = shipped_codec()
    model = small_valle(path)
    pairs = valle.eval_pairs(limit=2)
    lengths = []
    monkeypatch.setattr(evaluation, "wer", lambda text, x, sr: lengths.append(x.shape[-1]) or x.shape[-1])
    monkeypatch.setattr(evaluation, "digit_wer", lambda text, x, sr: -1.0)
    monkeypatch.setattr(evaluation, "speaker_similarity", lambda ref, x, sr: ref.shape[-1] * 1000 + x.shape[-1])
    rows = {r["name"]: r for r in valle.evaluate(model, codec, pairs, n_qs=[1])}
    n = lambda e: load(e["path"], 16000, 1)[0].shape[-1]  # noqa: E731
    truth = [n(t) for t, _, _ in pairs]
    assert lengths[0::4] == truth  # per pair: truth, VALL-E, resynthesis, VALL-E at n_q = 1
    assert rows["truth"]["wer"] == sum(truth) / 2 and rows["truth"]["ratio"] == 1.0
    assert rows["truth"]["spk"] == sum(min(n(p), 48000) * 1000 + n(t) for t, p, _ in pairs) / 2  # the 3 s prompt
    assert rows["truth"]["spk_other"] == sum(n(o) * 1000 + n(t) for t, _, o in pairs) / 2
    assert lengths[2::4] == truth  # the resynthesis is trimmed to the input's length
    assert lengths[1::4] == lengths[3::4]  # fewer codebooks decoded: the same frames
    assert math.isclose(rows["valle"]["ratio"], sum(y / t for y, t in zip(lengths[1::4], truth)) / 2)
    assert rows["valle"]["cap"] in (0.0, 0.5, 1.0) and rows["truth"]["cap"] == 0.0
    assert rows["truth"]["n"] == 2 and rows["truth"]["n_digits"] == 0
    assert "held-out utterances" in valle.format_eval(list(rows.values()))


def test_positions_past_max_len_are_an_error_and_the_cap_stays_within_them():
    import pytest
    m = model()  # max_len 128
    with pytest.raises(ValueError, match="129 positions; the model has max_len 128"):
        m(torch.randint(20, (1, 3)), torch.randint(16, (1, 130)))
    nar = valle.NARModel(CFG)
    with pytest.raises(ValueError, match="130 positions; the model has max_len 128"):
        nar(torch.randint(20, (1, 3)), torch.randint(16, (1, 8, 100)), torch.randint(16, (1, 8, 30)),
            torch.tensor([1]))
    out, n, _ = m.generate(torch.randint(20, (1, 3)), torch.randint(16, (1, 100)), 28)  # 128 positions: fine
    assert out.shape == (1, 28)


def test_the_shipped_checkpoint_matches_its_card():
    """checkpoints/valle_tiny.pt: the sha256 on its card, and the teacher-forced loss of both stages on the first 6
    held-out utterances within 0.01 nats of the card's: a change to valle.py that breaks the shipped weights (a
    layout, a mask, a position, a norm) fails here."""
    import hashlib
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    card = (root / "checkpoints" / "README.md").read_text()
    m = re.search(r"^- file: `valle\.py`, checkpoint: `(checkpoints/valle_tiny\.pt)`\n- sha256: `([0-9a-f]{64})`\n"
                  r"- test check, teacher-forced on the first 6 held-out utterances: AR ([\d.]+), NAR ([\d.]+) nats",
                  card, re.M)
    assert m, "the card has no valle_tiny.pt section"
    path = root / m[1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m[2]
    model = valle.VALLE.load(path)
    codec, _ = valle.load_codec(model.codec_path)
    ar, nar = valle.heldout_loss(model, codec, valle.eval_pairs(limit=6))
    assert abs(ar - float(m[3])) < 0.01 and abs(nar - float(m[4])) < 0.01, (ar, nar)


# ---------------------------------------------------------------------------------------------------------------
# Positions, the adaptive norm, the dataset's prompts and the stage draw, each by hand


def test_ar_positions_restart_at_zero_for_the_audio():
    """lifeiteng's separate positions: phoneme i gets pe[i], audio token t gets pe[t] (not pe[X + t]), each scaled by
    its own alpha; the embeddings are scaled by sqrt(D)."""
    m = model()
    with torch.no_grad():
        m.text_alpha.fill_(0.5)
        m.audio_alpha.fill_(2.0)
    text, audio = torch.randint(20, (1, 3)), torch.randint(16, (1, 4))
    h = m.embed(text, audio)
    D = CFG.dim
    torch.testing.assert_close(h[0, :3], m.text_embedding.weight[text[0]] * D ** 0.5 + 0.5 * m.pe[:3])
    torch.testing.assert_close(h[0, 3:], m.audio_embedding.weight[audio[0]] * D ** 0.5 + 2.0 * m.pe[:4])
    # with the cache, the newest token's position is its index in the audio
    torch.testing.assert_close(m.embed(None, audio[:, 3:], audio_offset=3)[0, 0], h[0, 6])


def test_nar_target_positions_continue_the_prompts():
    """NAR input at stage j: [phonemes + pe[:X]; prompt (all codebooks) + pe[:P]; target codebooks < j + pe[P:P+Y]]:
    read off the first block's input by a forward hook."""
    m = nar()
    with torch.no_grad():
        m.text_alpha.fill_(0.5)
        m.audio_alpha.fill_(2.0)
    X, P, Y = 2, 3, 4
    text, prompt, target = torch.randint(20, (1, X)), torch.randint(16, (1, 8, P)), torch.randint(16, (1, 8, Y))
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    m(text, prompt, target, torch.tensor([3]))
    h, s = seen["h"][0], CFG.dim ** 0.5
    emb = lambda q, ids: m.audio_embeddings[q].weight[ids]  # noqa: E731
    torch.testing.assert_close(h[:X], m.text_embedding.weight[text[0]] * s + 0.5 * m.pe[:X])
    torch.testing.assert_close(h[X:X + P], sum(emb(q, prompt[0, q]) for q in range(8)) * s + 2.0 * m.pe[:P])
    torch.testing.assert_close(h[X + P:], sum(emb(q, target[0, q]) for q in range(3)) * s + 2.0 * m.pe[P:P + Y])


def test_adaptive_layer_norm_by_hand():
    torch.manual_seed(0)
    norm = valle.AdaptiveLayerNorm(4)
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 4)
    gamma, beta = norm.project(cond).chunk(2, dim=-1)  # (2, 4) each
    plain = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x, cond), (1 + gamma[:, None]) * plain + beta[:, None])


def test_dataset_prompts_come_from_another_utterance_of_the_same_speaker():
    import dataclasses
    items = {f"u{i}": torch.full((8, 40 + i), i) for i in range(6)}  # utterance i: every code is i
    entries = [{"path": f"u{i}", "phonemes": "a_b c", "speaker": "s0" if i < 3 else "s1"} for i in range(6)]
    vocab = valle.PhonemeVocab(["a", "b", "c", " "])
    cfg = dataclasses.replace(CFG, num_codebooks=8)
    _, run = valle.PRESETS["tiny"]
    run = dataclasses.replace(run, prompt_seconds=0.5, max_seconds=1.0, max_text=8)  # 25 and 50 frames at 50 Hz
    ds = valle.TTSDataset(entries, items, vocab, cfg, run, frame_rate=50)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(6):
            x = ds[i]
            source = int(x["prompt"][0, 0])
            assert source != i and (source < 3) == (i < 3)  # another utterance, the same speaker
            assert x["prompt_len"] == 25 and (x["prompt"] == source).all()
            assert x["target_len"] == 40 + i and (x["target"][:, :40 + i] == i).all()
            assert (x["target"][:, 40 + i:] == 0).all() and x["target"].shape == (8, 50)
            assert x["text_len"] == 4 and x["text"].tolist()[:4] == vocab.encode("a_b c").tolist()
    with __import__("pytest").raises(ValueError, match="speakers with one utterance have no prompt: s2"):
        valle.TTSDataset(entries + [{"path": "u0", "phonemes": "a", "speaker": "s2"}], items, vocab, cfg, run, 50)


def test_the_stage_is_drawn_per_example_from_codebooks_1_to_q_minus_1(monkeypatch):
    import dataclasses
    _, run = valle.PRESETS["tiny"]
    run = dataclasses.replace(run, warmup_steps=1, steps=10)
    trainer = valle.Trainer(dataclasses.replace(CFG, text_vocab=8), run, ["<pad>", "a"])
    drawn = []
    monkeypatch.setattr(trainer, "wrapped", lambda batch, stage: (drawn.append(stage) or
                                                                  (torch.zeros((), requires_grad=True),) * 2))
    batch = {"text": torch.ones(16, 2, dtype=torch.long)}
    for _ in range(20):
        trainer.step(batch)
    stages = torch.cat(drawn)
    assert stages.min() == 1 and stages.max() == CFG.num_codebooks - 1  # never codebook 0 (the AR's)
    assert len(set(tuple(s.tolist()) for s in drawn)) == 20  # per example, not one per batch


def test_the_papers_tokenizer_loads_from_metas_weights(tmp_path):
    """--codec_official: Meta's EnCodec 24 kHz file (built here by the official package with random weights, saved
    as its state dict, as the released .th is) gives the paper's tokens, 8 x 1024 at 75 Hz (6 kbps), which the
    paper preset takes; a VALL-E trained on it stores the spec and reloads the same codec."""
    from test_encodec import import_official, official_model
    official = import_official()
    torch.save(official_model(official, "24khz").state_dict(), tmp_path / "encodec_24khz.th")
    spec = valle.OFFICIAL + str(tmp_path / "encodec_24khz.th")
    codec, kind = valle.load_codec(spec, num_codebooks=8)
    cfg = valle.PRESETS["paper"][0]
    valle.check_codec(codec, cfg, spec)  # no error: the paper preset's 8 x 1024
    assert kind == "encodec (Meta's)" and (codec.sample_rate, codec.frame_rate) == (24000, 75)
    codes = codec.encode(torch.randn(1, 1, 24000) * 0.1).codes
    assert codes.shape == (1, 8, 75) and codes.max() < 1024
    assert codec.decode(codes).shape[-1] == 24000
    full = codec.codec.encode(torch.randn(1, 1, 24000) * 0.1).codes  # the model itself sends all 32
    assert full.shape[1] == 32
    with __import__("pytest").raises(ValueError, match="8 x 1024 codes; the model takes 8 x 256"):
        valle.check_codec(codec, valle.PRESETS["tiny"][0], spec)
