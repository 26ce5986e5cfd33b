"""Tests of valle.py's generic LM parts (work in progress, branch wip/valle): the prefix-LM mask, causality by
gradient, the KV cache against full recomputation, per-row end tokens, and the samplers by hand."""

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
        a, la = m.generate(text, prompt, 30, use_cache=True, generator=torch.Generator().manual_seed(0), **kw)
        b, lb = m.generate(text, prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(a, b) and torch.equal(la, lb), kw


def test_each_row_stops_at_its_own_end_token(monkeypatch):
    m = model()
    script = iter([torch.tensor([3, 16, 5]), torch.tensor([16, 7, 9]), torch.tensor([2, 2, 16])])
    monkeypatch.setattr(valle, "sample", lambda logits, *a, **k: next(script))
    out, lengths = m.generate(torch.randint(20, (3, 2)), torch.zeros(3, 0, dtype=torch.long), 5)
    assert lengths.tolist() == [1, 0, 2]  # new tokens before each row's end token
    assert out[:, :3].tolist() == [[3, 16, 16], [16, 16, 16], [5, 9, 16]]  # after the end: the end id
    assert (out[:, 3:] == 16).all()  # all rows done: the loop stopped


def test_length_cap_without_an_end_token(monkeypatch):
    m = model()
    monkeypatch.setattr(valle, "sample", lambda logits, *a, **k: torch.zeros(len(logits), dtype=torch.long))
    out, lengths = m.generate(torch.randint(20, (2, 2)), torch.zeros(2, 1, dtype=torch.long), 7)
    assert lengths.tolist() == [7, 7] and (out == 0).all()


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
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([valle.sample(logits, 1.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert inf == -math.inf


def test_sinusoids_by_hand():
    pe = valle.sinusoids(3, 4)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(pe[2], torch.tensor([math.sin(2), math.cos(2), math.sin(2 / 100), math.cos(2 / 100)]))
