"""Tests of audiolm.py: the three stages' sequence layouts against naive loops, which ids are legal where (the end
token only where a frame begins), causality by gradient, the KV cache against full recomputation for each stage,
per-row end tokens, T5's relative buckets by hand, the loss over the legal ids, the semantic tokenizer (MFCC frames,
k-means, repeats removed, the feature check), the shapes of every generation mode, exact resume and a DDP step,
one-line errors for bad input, the evaluation's scoring rules, and the shipped checkpoint against its card."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import audiolm

ROOT = Path(__file__).resolve().parent.parent
CFG = audiolm.Config(dim=32, heads=4, layers=2, ffn=64, dropout=0.0, attn_dropout=0.0, rel_buckets=8,
                     rel_distance=16, semantic_vocab=10, codebook_size=6, num_codebooks=5, coarse_codebooks=2,
                     semantic_seconds=1.0, coarse_seconds=0.4, fine_seconds=0.1)


TIMED = dataclasses.replace(CFG, dedup=False, time_positions=True)  # the tiny preset's DEVIATION 4


def stage_model(stage, seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return audiolm.StageLM(cfg, stage).eval()


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def naive_sequence(stage, semantic, coarse, fine, end, cfg=CFG):
    """The layouts of the module docstring, one token at a time."""
    Ks, K, Q, Qc = cfg.semantic_vocab, cfg.codebook_size, cfg.num_codebooks, cfg.coarse_codebooks
    seq = []
    if stage == "semantic":
        seq = [Ks] + list(semantic) + ([Ks + 1] if end else [])  # S_BOS = Ks, EOS = Ks + 1
        return seq, 1
    if stage == "coarse":
        base = Ks + Qc * K  # S_BOS, A_BOS, EOS, PAD
        seq = [base] + list(semantic) + [base + 1]
        start = len(seq)
        for t in range(coarse.shape[1]):
            for q in range(Qc):
                seq.append(Ks + q * K + int(coarse[q, t]))
        return seq + ([base + 2] if end else []), start
    base = Q * K  # C_BOS, F_BOS, PAD
    seq = [base]
    for t in range(coarse.shape[1]):
        for q in range(Qc):
            seq.append(q * K + int(coarse[q, t]))
    seq.append(base + 1)
    start = len(seq)
    for t in range(fine.shape[1]):
        for q in range(Q - Qc):
            seq.append((Qc + q) * K + int(fine[q, t]))
    return seq, start


@pytest.mark.parametrize("stage", audiolm.STAGES)
@pytest.mark.parametrize("end", [True, False])
def test_sequences_match_a_naive_loop_and_round_trip(stage, end):
    g = torch.Generator().manual_seed(1)
    semantic = torch.randint(10, (4,), generator=g)
    coarse, fine = torch.randint(6, (2, 3), generator=g), torch.randint(6, (3, 3), generator=g)
    layout = audiolm.Layout(CFG, stage)
    seq, start = layout.sequence(semantic=semantic, coarse=coarse, fine=fine, end=end)
    expect, expect_start = naive_sequence(stage, semantic.tolist(), coarse, fine, end)
    assert seq.tolist() == expect and start == expect_start
    if stage == "coarse":
        body = seq[start:len(seq) - end]
        assert torch.equal(layout.codes(body), coarse)
    if stage == "fine":
        assert torch.equal(layout.codes(seq[start:]), fine)


def test_vocabularies_and_offsets_by_hand():
    sem, coarse, fine = (audiolm.Layout(CFG, s) for s in audiolm.STAGES)
    assert (sem.vocab, sem.s_bos, sem.eos, sem.pad) == (13, 10, 11, 12)
    assert (coarse.vocab, coarse.s_bos, coarse.a_bos, coarse.eos, coarse.pad) == (26, 22, 23, 24, 25)
    assert coarse.groups == [(10, 16), (16, 22)]
    assert (fine.vocab, fine.c_bos, fine.f_bos, fine.pad, fine.eos) == (33, 30, 31, 32, None)
    assert fine.groups == [(12, 18), (18, 24), (24, 30)]


def test_the_end_token_is_legal_only_where_a_frame_begins_and_never_first():
    coarse = audiolm.Layout(CFG, "coarse")
    legal = coarse.legal_at(torch.arange(6))  # codebooks 0 1 0 1 0 1
    assert legal[:, coarse.eos].tolist() == [False, False, True, False, True, False]
    assert legal[1, 16:22].all() and not legal[1, 10:16].any() and not legal[1, :10].any()
    sem = audiolm.Layout(CFG, "semantic")
    assert sem.legal_at(torch.arange(3))[:, sem.eos].tolist() == [False, True, True]
    fine = audiolm.Layout(CFG, "fine")
    legal = fine.legal_at(torch.arange(4))
    assert legal.sum(1).tolist() == [6, 6, 6, 6] and legal[3, 12:18].all()  # fine: no end token at all


def test_dataset_crops_keep_semantic_and_acoustic_windows_aligned():
    cfg = dataclasses.replace(CFG, coarse_seconds=0.16)  # 4 semantic tokens, 8 frames
    semantic = torch.tensor([1, 1, 2, 3, 3, 4, 5, 6, 7, 8])
    codes = torch.arange(5 * 20).view(5, 20) % 6
    ds = audiolm.StageDataset(cfg, "coarse", [(semantic, codes)], seed=0)
    for epoch in range(5):
        ds.set_epoch(epoch)
        item = ds[0]
        seq = item["tokens"][:item["length"]]
        n_sem = int((seq[1:] < 10).long().cumprod(0).sum())  # semantic ids up to A_BOS
        z = seq[1:1 + n_sem]
        body = seq[int(item["start"]):]
        frames = audiolm.Layout(cfg, "coarse").codes(body[:len(body) // 2 * 2])
        # find the window: its deduplicated semantic ids, and frames 2s .. 2s + 8 of the first two codebooks
        starts = [s for s in range(7) if torch.equal(audiolm.dedup(semantic[s:s + 4]), z)
                  and torch.equal(codes[:2, 2 * s:2 * s + 8], frames)]
        assert starts, (epoch, seq)
        assert len(seq) <= ds.max_len and bool(seq[-1] == 24) == (starts[0] + 4 >= 10)  # the end token: at the end only


# ---------------------------------------------------------------------------------------------------------------
# The transformer: causality, relative positions, the KV cache, end tokens


@pytest.mark.parametrize("stage", audiolm.STAGES)
@pytest.mark.parametrize("cfg", [CFG, TIMED], ids=["t5", "timed"])
def test_causality_by_gradient(stage, cfg):
    m = stage_model(stage, cfg=cfg)
    tokens = torch.randint(10, (1, 7))
    h0 = m.embed(tokens).detach().requires_grad_(True)
    mask = m.rel(0, 7, 7)
    h = h0
    for block in m.blocks:
        h = block(h, mask)
    for i in range(7):
        g, = torch.autograd.grad(h[0, i].sum(), h0, retain_graph=True)
        seen = g[0].abs().sum(-1) > 0
        assert seen.tolist() == [j <= i for j in range(7)]


def test_t5_buckets_by_hand():
    d = torch.tensor([0, 1, 15, 16, 20, 40, 127, 128, 1000])
    # T5 (32 buckets, 128): exact below 16, then 16 + floor(log(d / 16) / log(8) * 16), at most 31
    expect = [0, 1, 15, 16, 16 + int(math.log(20 / 16) / math.log(8) * 16),
              16 + int(math.log(40 / 16) / math.log(8) * 16), 16 + int(math.log(127 / 16) / math.log(8) * 16), 31, 31]
    assert audiolm.t5_buckets(d, 32, 128).tolist() == expect
    assert audiolm.t5_buckets(torch.tensor([-3]), 32, 128).tolist() == [0]


def test_relative_bias_is_the_table_at_the_buckets_and_hides_padding_but_self():
    rel = audiolm.RelativeBias(2, 8, 16)
    torch.nn.init.normal_(rel.bias.weight)
    m = rel(0, 3, 3)
    assert m.shape == (1, 2, 3, 3)
    assert torch.equal(m[0, :, 2, 0], rel.bias.weight[2]) and torch.equal(m[0, :, 1, 1], rel.bias.weight[0])
    assert torch.isinf(m[0, :, 0, 1]).all() and torch.isinf(m[0, :, 1, 2]).all()
    pad = torch.tensor([[True, False, False]])
    m = rel(0, 3, 3, pad)
    assert torch.isinf(m[0, :, 1, 0]).all() and torch.isinf(m[0, :, 2, 0]).all()
    assert torch.isfinite(m[0, :, 0, 0]).all()  # a padding query sees itself (no NaN rows)
    one = rel(2, 1, 3)  # a cached step: the query at position 2 over all three keys
    assert torch.equal(one[0, :, 0], rel(0, 3, 3)[0, :, 2])


def test_changing_a_later_token_never_changes_earlier_logits():
    m = stage_model("coarse")
    a = torch.randint(22, (1, 9))
    b = a.clone()
    b[0, 6] = (b[0, 6] + 1) % 22
    la, lb = m(a), m(b)
    assert torch.allclose(la[0, :6], lb[0, :6]) and not torch.allclose(la[0, 6], lb[0, 6])


@pytest.mark.parametrize("stage", audiolm.STAGES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("cfg", [CFG, TIMED], ids=["t5", "timed"])
def test_kv_cache_is_token_identical_to_recomputation(stage, temperature, cfg):
    m = stage_model(stage, seed=3, cfg=cfg)
    L = m.layout
    prefix = {"semantic": lambda: [L.s_bos, 1, 2], "coarse": lambda: [L.s_bos, 3, 4, L.a_bos],
              "fine": lambda: [L.c_bos, 0, 6, 1, 7, L.f_bos]}[stage]()
    prefix = torch.tensor([prefix] * 3)
    runs = [m.generate(prefix, 12, 0, temperature, use_cache=c, generator=torch.Generator().manual_seed(5))
            for c in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ids, n = runs[0]
    legal = L.legal_at(torch.arange(12))
    for row, k in zip(ids, n):  # every sampled id is legal at its place
        assert all(legal[j, int(row[j])] for j in range(int(k)))


@pytest.mark.parametrize("cfg", [CFG, TIMED], ids=["t5", "timed"])
def test_kv_cache_with_left_padded_rows_matches_each_row_alone(cfg):
    m = stage_model("coarse", seed=4, cfg=cfg)
    L = m.layout
    a, b = [L.s_bos, 1, 2, 3, L.a_bos], [L.s_bos, 5, L.a_bos]
    batch = audiolm.left_pad([torch.tensor(a), torch.tensor(b)], L.pad)
    ids, n = m.generate(batch, 8, 0, 0.0)
    for row, seq in enumerate((a, b)):
        alone, k = m.generate(torch.tensor([seq]), 8, 0, 0.0)
        assert torch.equal(ids[row], alone[0]) and n[row] == k[0]


def test_each_row_stops_at_its_own_end_token_and_only_where_a_frame_begins():
    m = stage_model("coarse")
    L = m.layout
    with torch.no_grad():  # a head that always prefers the end token: it comes at the first legal place
        m.head.weight[L.eos] = 0
        m.head.bias = None
        m.norm.weight.zero_()
        m.norm.bias.zero_()
        m.norm.bias[0] = 1.0
        m.head.weight[L.eos, 0] = 50.0
    prefix = torch.tensor([[L.s_bos, 1, L.a_bos]] * 2)
    ids, n = m.generate(prefix, 10, 0, 1.0, generator=torch.Generator().manual_seed(0))
    assert n.tolist() == [2, 2]  # never first: after one whole frame of Q' = 2 tokens
    assert (ids[:, 2:] == L.pad).all()
    ids, n = m.generate(prefix, 10, 1, 1.0, generator=torch.Generator().manual_seed(0))
    assert n.tolist() == [1, 1]  # predicted index 1 + 1 = 2 starts a frame


def test_loss_is_cross_entropy_over_the_legal_ids_by_hand():
    m = stage_model("coarse", seed=2)
    L = m.layout
    seq, start = L.sequence(semantic=torch.tensor([1, 2]), coarse=torch.tensor([[0, 5], [3, 1]]), end=True)
    tokens = seq[None]
    loss = audiolm.stage_loss(m, L, tokens, torch.tensor([start]), torch.tensor([len(seq)]))
    logits = m(tokens)[0]
    expect = []
    for p in range(start - 1, len(seq) - 1):  # position p predicts token p + 1
        j = p + 1 - start
        allowed = L.legal_at(torch.tensor([j]))[0].nonzero()[:, 0]
        target = int(seq[p + 1])
        expect.append(-(logits[p, allowed].log_softmax(0)[(allowed == target).nonzero()[0, 0]]))
    assert torch.allclose(loss, torch.stack(expect).mean(), atol=1e-6)
    assert start == 4 and len(expect) == 5  # 2 frames x 2 codebooks and the end token


def test_right_padding_changes_no_row_of_the_loss():
    m = stage_model("semantic")
    L = m.layout
    a, sa = L.sequence(semantic=torch.tensor([1, 2, 3]))
    b, sb = L.sequence(semantic=torch.tensor([4, 5, 6, 7, 8]))
    batch = torch.stack([torch.nn.functional.pad(a, (0, len(b) - len(a)), value=L.pad), b])
    total = audiolm.stage_loss(m, L, batch, torch.tensor([sa, sb]), torch.tensor([len(a), len(b)]), "sum")
    alone = sum(audiolm.stage_loss(m, L, s[None], torch.tensor([st]), torch.tensor([len(s)]), "sum")
                for s, st in ((a, sa), (b, sb)))
    assert torch.allclose(total, alone, atol=1e-5)


def test_unigram_cross_entropy_by_hand():
    L = audiolm.Layout(CFG, "semantic")
    train = [L.sequence(semantic=torch.tensor([1, 1, 2]))]  # predicted: 1 1 2 EOS
    test = [L.sequence(semantic=torch.tensor([2]))]  # predicted: 2 (j = 0, no EOS legal), EOS (j = 1)
    counts = torch.ones(13, dtype=torch.float64)
    counts[1] += 2
    counts[2] += 1
    counts[11] += 1  # add-one over the legal ids of each place
    p_two = counts[2] / counts[:10].sum()
    p_eos = counts[11] / (counts[:10].sum() + counts[11])
    expect = -(math.log(p_two) + math.log(p_eos)) / 2  # (4 / 16) then (2 / 17)
    assert audiolm.unigram_ce(L, train, test) == pytest.approx(expect, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The semantic tokenizer


def test_mfcc_frames_are_25_hz_stacks_of_39_mean_normalised_cepstra():
    wav = torch.randn(16000) * 0.1
    x = audiolm.mfcc_frames(wav)
    assert x.shape == (25, 156)
    assert audiolm.mfcc_frames(torch.randn(16001)).shape == (26, 156)  # ceil(T / 640)
    cepstra = x.view(25, 4, 39)[..., :13].reshape(-1, 13)
    assert cepstra.mean(0).abs().max() < 0.5  # cepstral mean normalisation (up to the last stack's padding)
    with pytest.raises(ValueError, match="16000 Hz"):
        audiolm.mfcc_frames(wav, 8000)


def test_deltas_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.allclose(audiolm.deltas(x)[0, 2:4], torch.ones(2))  # a ramp of slope 1
    assert torch.allclose(audiolm.deltas(x)[0, 0], torch.tensor((1 * 1 + 2 * 2) / 10.0))  # edges repeated


def test_kmeans_finds_separated_clusters_and_the_tokenizer_standardises():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    tok = audiolm.SemanticTokenizer.fit([x[:75], x[75:]], 3, "mfcc", iters=10)
    ids = tok.encode(x)
    assert len({tuple(ids[i * 50:(i + 1) * 50].unique().tolist()) for i in range(3)}) == 3
    assert all(len(ids[i * 50:(i + 1) * 50].unique()) == 1 for i in range(3))
    assert torch.allclose(tok.mean, x.mean(0)) and torch.allclose(tok.std, x.std(0))
    state = audiolm.SemanticTokenizer.from_state(tok.state())
    assert torch.equal(state.encode(x), ids)


def test_dedup_and_align_by_hand():
    assert audiolm.dedup(torch.tensor([3, 3, 1, 1, 1, 3, 2])).tolist() == [3, 1, 3, 2]
    assert audiolm.align("a b c d".split(), "a x c d".split()) == [(0, 0), (2, 2), (3, 3)]
    assert audiolm.align("a b c".split(), "b c".split()) == [(1, 0), (2, 1)]
    assert audiolm.align("a b".split(), []) == []
    assert audiolm.digits_of("Seven, 4 oh nine dogs") == ["seven", "four", "zero", "nine"]


def test_a_tokenizer_fitted_for_another_feature_is_a_one_line_error(tmp_path):
    tok = audiolm.SemanticTokenizer("npy", torch.zeros(1024), torch.ones(1024), torch.zeros(4, 1024))
    with pytest.raises(ValueError, match="fitted on npy features of dim 1024; got mfcc"):
        tok.check("mfcc")
    with pytest.raises(ValueError, match=r"fitted on npy features of dim 1024; got frames of shape \(3, 156\)"):
        tok.encode(torch.zeros(3, 156))
    mfcc = audiolm.SemanticTokenizer("mfcc", torch.zeros(156), torch.ones(156), torch.zeros(4, 156))
    with pytest.raises(ValueError, match="fitted on mfcc features of dim 156; got npy"):
        mfcc.check(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="utt.npy not found"):
        audiolm.feature_frames(str(tmp_path), "a/utt.flac")


# ---------------------------------------------------------------------------------------------------------------
# Generation modes on the shipped tokenizer, a small model


def shipped_codec():
    codec, _ = audiolm.load_codec("checkpoints/soundstream_16khz_8x256.pt")
    return codec


SMALL = audiolm.Config(dim=32, heads=2, layers=1, ffn=64, dropout=0.0, attn_dropout=0.0, semantic_vocab=16,
                       codebook_size=256, num_codebooks=8, coarse_codebooks=4, semantic_seconds=2.0,
                       coarse_seconds=1.0, fine_seconds=0.4)


def small_lm(seed=0):
    torch.manual_seed(seed)
    tok = audiolm.SemanticTokenizer("mfcc", torch.zeros(156), torch.ones(156), torch.randn(16, 156))
    return audiolm.AudioLM(*(audiolm.StageLM(SMALL, s, tok, "checkpoints/soundstream_16khz_8x256.pt").eval()
                             for s in audiolm.STAGES))


def test_every_mode_gives_the_right_shapes_and_keeps_the_prompt():
    from common.audio import load
    lm, codec = small_lm(), shipped_codec()
    wav, sr = load(ROOT / "data/demo/flite-awb/flite-awb_0003.flac", 16000)
    prompt = lm.prompt_tokens(codec, wav[:, :9000], sr)
    semantic, codes = prompt
    assert codes.shape == (8, 28) and len(semantic) <= 14  # cut to 8960 samples: 14 semantic tokens, 28 frames
    g = torch.Generator().manual_seed(0)
    for mode, kw in (("continuation", dict(prompt=prompt)), ("unconditional", {}),
                     ("acoustic", dict(semantic=torch.tensor([1, 2, 3, 4])))):
        outs = lm.generate(codec, batch=2, generator=g, **kw)
        assert len(outs) == 2
        for w, c in outs:
            assert c.shape[0] == 8 and c.shape[1] <= 50 and w.shape == (1, c.shape[1] * 320), mode
            assert c.min() >= 0 and c.max() < 256
            if mode == "continuation":
                assert torch.equal(c[:, :28], codes)  # the prompt's codes, all eight codebooks, come first
    sems = audiolm.sample_semantic(lm.semantic, semantic, 3, generator=g)
    assert all(torch.equal(s[:len(semantic)], semantic) and len(s) <= 50 for s in sems)


def test_fine_stage_runs_on_chunks_and_keeps_the_coarse_codes():
    lm = small_lm()
    coarse = torch.randint(256, (4, 45))
    codes = audiolm.sample_fine(lm.fine, coarse, torch.randint(256, (4, 5)), generator=torch.Generator())
    assert codes.shape == (8, 45) and torch.equal(codes[:4], coarse)
    seen = []
    orig = lm.fine.generate
    lm.fine.generate = lambda prefix, n, *a, **k: seen.append((prefix.shape, n)) or orig(prefix, n, *a, **k)
    audiolm.sample_fine(lm.fine, coarse, None, generator=torch.Generator())
    assert seen == [((3, 2 + 20 * 4), 20 * 4)]  # chunks of 0.4 s = 20 frames, 20 + 20 + 5: one batch of three


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each


def test_bad_prompts_get_one_line_errors():
    lm, codec = small_lm(), shipped_codec()
    ok = torch.zeros(1, 16000)
    for wav, rate, match in ((ok, 24000, "at 24000 Hz; the codec takes 16000"),
                             (torch.zeros(2, 16000), 16000, "2 channel"),
                             (torch.full((1, 16000), float("nan")), 16000, "NaN"),
                             (torch.zeros(1, 4000), 16000, "0.24 s; it needs at least 0.5 s"),  # cut to 6 x 640
                             (torch.zeros(16000), 16000, "float tensor")):
        with pytest.raises(ValueError, match=match):
            lm.prompt_tokens(codec, wav, rate)


def test_codec_and_model_checkpoints_of_the_wrong_kind(tmp_path):
    with pytest.raises(ValueError, match="is a 'valle' checkpoint, not a codec's"):
        audiolm.load_codec("checkpoints/valle_tiny.pt")
    with pytest.raises(ValueError, match="is a 'soundstream' checkpoint, not a 'audiolm' one"):
        audiolm.AudioLM.load("checkpoints/soundstream_16khz_8x256.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        audiolm.load_codec(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no trained semantic, coarse, fine stage"):
        audiolm.AudioLM.load(tmp_path)
    with pytest.raises(ValueError, match="8 x 256 codes at 50 Hz; the model takes 5 x 6 at 50 Hz"):
        audiolm.check_codec(shipped_codec(), CFG, "codec.pt")


def test_command_line_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        audiolm.main(["--sample", "--ckpt", "x", "--temprature", "1"])
    assert "did you mean --temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        audiolm.main(["--sample", "--ckpt", "x", "--temperature", "1,2"])
    assert "one value or three" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        audiolm.main(["--sample", "--ckpt", "x", "--temperature", "-1"])
    with pytest.raises(ValueError, match="--ckpt is required"):
        audiolm.main(["--eval"])


# ---------------------------------------------------------------------------------------------------------------
# Training: resume and DDP on a small manifest


def small_manifest(tmp_path, n_train=8):
    rows = [json.loads(line) for line in (ROOT / "data/demo/manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["speaker"] in ("flite-awb", "rhvoice-bdl") and r["duration"] < 3.0]
    train = [r for r in rows if r["split"] == "train"][:n_train]
    valid = [r for r in rows if r["split"] == "valid"][:1]
    path = tmp_path / "small.jsonl"
    with open(path, "w") as f:
        for r in train + valid:
            f.write(json.dumps({**r, "audio": str(ROOT / "data/demo" / r["audio"])}) + "\n")
    return str(path)


TRAIN_CFG = audiolm.Config(dim=32, heads=2, layers=1, ffn=64, dropout=0.1, attn_dropout=0.0, semantic_vocab=8,
                           codebook_size=256, num_codebooks=8, coarse_codebooks=4, semantic_seconds=2.0,
                           coarse_seconds=0.4, fine_seconds=0.2)


def small_run(tmp_path, out, **kw):
    _, run = audiolm.PRESETS["tiny"]
    kw = {"batch_size": 4, "steps": 4, "log_every": 2, "ckpt_every": 1000, "sample_every": 1000, "threads": 1,
          "kmeans_iters": 5, **kw}
    return dataclasses.replace(run, data=small_manifest(tmp_path), out=str(out), **kw)


def test_resume_continues_bit_exactly_in_every_stage(tmp_path):
    full = audiolm.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "full"))
    first = audiolm.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"), interrupt_after=2)
    assert list(first) == ["semantic"] and len(first["semantic"][1]) == 2
    rest = audiolm.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"), resume=True)
    assert first["semantic"][1] + rest["semantic"][1] == full["semantic"][1]
    for stage in audiolm.STAGES:
        if stage != "semantic":
            assert rest[stage][1] == full[stage][1]
        a = torch.load(tmp_path / "full" / stage / "model.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "split" / stage / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    again = audiolm.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"), resume=True)
    assert again == {}  # every stage finished: nothing runs
    with pytest.raises(ValueError, match="already holds a training run"):
        audiolm.train(TRAIN_CFG, small_run(tmp_path, tmp_path / "split"))
    lm = audiolm.AudioLM.load(tmp_path / "full")  # a run's folder loads as the three stages
    assert lm.tokenizer.vocab == 8 and lm.cfg == TRAIN_CFG


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, tmp, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    results = audiolm.train(TRAIN_CFG, small_run(Path(tmp), out, stage="coarse", steps=2))
    torch.save(results["coarse"][0].model.state_dict(), f"{out}/rank{rank}.pt")


def test_ddp_two_processes_keep_the_stage_identical(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(out)), nprocs=2, join=True)
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(out / "coarse" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], saved["state_dict"][k]) for k in a)
    torch.manual_seed(0 + audiolm.STAGES.index("coarse"))  # the stage's initial weights, which training moved
    init = audiolm.StageLM(TRAIN_CFG, "coarse").state_dict()
    assert not torch.equal(a["head.weight"], init["head.weight"])


def test_learning_rate_warms_up_then_decays_linearly():
    _, run = audiolm.PRESETS["tiny"]
    run = dataclasses.replace(run, lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    tok = audiolm.SemanticTokenizer("mfcc", torch.zeros(156), torch.ones(156), torch.zeros(128, 156))
    t = audiolm.Trainer(audiolm.PRESETS["tiny"][0], run, "semantic", tok)
    assert [t.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [t.lr_at(s) for s in (10, 60, 110, 200)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation wiring


def test_continuation_items_cut_inside_a_recognised_digit():
    pytest.importorskip("pocketsphinx")
    from common import evaluation
    assert evaluation.digit_segments(torch.zeros(100).numpy(), 16000) == []  # too short: no hypothesis (None)
    items = audiolm.continuation_items()
    assert len(items) >= 40
    for it in items[:10]:
        e, k, cut = it["entry"], it["k"], it["cut"]
        assert e["kind"] == "digits" and 0 <= k < len(e["text"].split()) and cut >= audiolm.MIN_PROMPT_SECONDS
        assert it["other"]["speaker"] != e["speaker"]
        assert it["splice"] is None or (it["splice"]["entry"]["speaker"] == e["speaker"]
                                        and it["splice"]["entry"] is not e)


def test_heldout_loss_pairs_each_stage_with_its_unigram():
    lm = small_lm()
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(16, (30,), generator=g), torch.randint(256, (8, 60), generator=g)) for _ in range(3)]
    out = audiolm.heldout_loss(lm, items[:2], items[2:])
    assert set(out) == set(audiolm.STAGES)
    for stage, (ce, uni) in out.items():  # an untrained model: near uniform over the legal ids
        legal = 16 if stage == "semantic" else 256
        assert abs(ce - math.log(legal)) < 0.3 and abs(uni - math.log(legal)) < 0.3, stage


def test_bad_configs_and_a_stale_tokenizer_get_one_line_errors(tmp_path):
    _, run = audiolm.PRESETS["tiny"]
    for cfg, r, match in ((TRAIN_CFG, dataclasses.replace(run, batch_size=0), "batch_size must be positive"),
                          (dataclasses.replace(TRAIN_CFG, heads=3), run, "must divide by heads"),
                          (dataclasses.replace(TRAIN_CFG, fine_seconds=0.01), run, "holds no frame"),
                          (TRAIN_CFG, dataclasses.replace(run, stage="acoustic"), "stage must be one of")):
        with pytest.raises(ValueError, match=match):
            audiolm.train(cfg, dataclasses.replace(r, out=str(tmp_path / "x")))
    run = small_run(tmp_path, tmp_path / "stale", stage="semantic", steps=1)
    audiolm.train(TRAIN_CFG, run)
    with pytest.raises(ValueError, match="was fitted on .* seed 0.*; this run asks for .* seed 1"):
        audiolm.train(TRAIN_CFG, dataclasses.replace(run, seed=1, stage="coarse"))
    audiolm.train(TRAIN_CFG, dataclasses.replace(run, seed=1), overwrite=True)  # --overwrite refits


def test_a_prompt_longer_than_the_context_is_an_error_before_any_sampling():
    lm, codec = small_lm(), shipped_codec()
    prompt = lm.prompt_tokens(codec, torch.randn(1, 17000) * 0.1, 16000)  # 1.04 s > coarse_seconds 1.0
    with pytest.raises(ValueError, match="generates at most 1 s in all"):
        lm.generate(codec, prompt)


def test_split_entries_without_a_split_is_empty_and_without_splits_is_everything(tmp_path):
    path = Path(small_manifest(tmp_path))
    assert audiolm.split_entries(str(path), "test") == []
    assert len(audiolm.split_entries(str(path), "valid")) == 1
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (tmp_path / "nosplit.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                                                    for r in rows))
    assert len(audiolm.split_entries(str(tmp_path / "nosplit.jsonl"), "valid")) == len(rows)


def test_next_digit_rule_by_hand():
    truth = "one two three four".split()
    assert audiolm.next_digit_right(truth, 1, "one two nine".split())  # the prompt's "one", then the cut "two"
    assert not audiolm.next_digit_right(truth, 1, "one nine two".split())  # "two" only later: wrong
    assert not audiolm.next_digit_right(truth, 1, "two".split())  # the prompt's digit lost
    assert not audiolm.next_digit_right(truth, 2, [])


def test_token_times_by_hand():
    """A semantic token i at frame 2 i, an acoustic token at its frame, starts and padding at 0, the end token at
    the frame after the last (CFG: Ks 10, K 6, Q 5, Q' 2)."""
    sem, coarse, fine = (audiolm.Layout(CFG, s) for s in audiolm.STAGES)
    seq, _ = sem.sequence(semantic=torch.tensor([3, 3, 7]))
    assert sem.times(seq[None])[0].tolist() == [0, 0, 2, 4, 6]  # S_BOS z z z EOS
    seq, _ = coarse.sequence(semantic=torch.tensor([3, 7]), coarse=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert coarse.times(seq[None])[0].tolist() == [0, 0, 2, 0, 0, 0, 1, 1, 2, 2, 3]
    seq, _ = fine.sequence(coarse=torch.tensor([[0, 1], [2, 3]]), fine=torch.tensor([[0, 1], [2, 3], [4, 5]]))
    assert fine.times(seq[None])[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    padded = torch.tensor([[coarse.pad, coarse.pad, coarse.s_bos, 3, coarse.a_bos, 10, 16]])
    assert coarse.times(padded)[0].tolist() == [0, 0, 0, 0, 0, 0, 0]  # left padding counts for nothing


def test_time_positions_move_each_token_by_the_sinusoid_of_its_frame():
    m = stage_model("coarse", cfg=TIMED)
    seq, _ = m.layout.sequence(semantic=torch.tensor([3, 7]), coarse=torch.tensor([[0, 1], [3, 4]]))
    h = m.embed(seq[None])[0]
    times = m.layout.times(seq[None])[0]
    expect = m.embedding(seq) * math.sqrt(TIMED.dim) + m.time_alpha * audiolm.sinusoids(64, TIMED.dim)[times]
    assert torch.allclose(h, expect, atol=1e-5)
    assert not hasattr(stage_model("coarse"), "time_alpha")  # the paper's preset: T5's buckets alone
    _, run = audiolm.PRESETS["tiny"]
    with pytest.raises(ValueError, match="time_positions needs dedup false"):
        audiolm.check_config(dataclasses.replace(TIMED, dedup=True), run)


def test_semantic_reliance_pairs_each_utterances_codes_with_the_next_ones_semantic_tokens(monkeypatch):
    seen = []
    monkeypatch.setattr(audiolm, "model_ce", lambda model, seqs: seen.append(seqs) or len(seen))
    lm = small_lm()
    items = [(torch.tensor([1, 2]), torch.zeros(8, 4, dtype=torch.long)),
             (torch.tensor([3, 4]), torch.ones(8, 4, dtype=torch.long))]
    assert audiolm.semantic_reliance(lm, items) == (1, 2)
    L = lm.coarse.layout
    own, other = ([s.tolist() for s, _ in run] for run in seen)
    assert own[0][1:3] == [1, 2] and other[0][1:3] == [3, 4]  # the first utterance's codes after the second's
    assert other[0][4:8] == [L.groups[q][0] for q in range(4)]  # ... tokens and its own codes (zeros)
    assert other[1][1:3] == [1, 2] and other[1][4] == L.groups[0][0] + 1


def test_word_at_the_cut_by_hand():
    seg = [("one", 0.1, 0.4), ("two", 0.4, 0.8), ("three", 0.9, 1.2)]
    assert audiolm.word_at(seg, 0.6) == "two"  # the word the cut splits
    assert audiolm.word_at(seg, 0.85) == "three"  # between words: the next one
    assert audiolm.word_at(seg, 1.3) is None and audiolm.word_at([], 0.0) is None


def test_the_shipped_checkpoint_matches_its_card():
    import hashlib
    import re
    card = (ROOT / "checkpoints" / "README.md").read_text()
    m = re.search(r"- file: `audiolm\.py`, checkpoint: `checkpoints/audiolm_tiny\.pt`\n- sha256: `([0-9a-f]{64})`\n"
                  r"- test check, teacher-forced on the first 6 test utterances: semantic ([\d.]+), coarse ([\d.]+), "
                  r"fine ([\d.]+) nats", card)
    assert m, "the card's AudioLM section is missing or malformed"
    path = ROOT / "checkpoints" / "audiolm_tiny.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m[1]
    lm = audiolm.AudioLM.load(path)
    codec, _ = audiolm.load_codec(lm.codec_path)
    first = {e["path"] for e in audiolm.split_entries(None, "test")[:6]}
    _, items = audiolm.split_items(lm, codec, "test", keep=lambda e: e["path"] in first)
    for stage, expect in zip(audiolm.STAGES, m.groups()[1:]):
        ce = audiolm.model_ce(lm.stages()[stage], audiolm.eval_sequences(lm.cfg, stage, items))
        assert ce == pytest.approx(float(expect), abs=0.01), stage
