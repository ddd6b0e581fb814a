"""G* supervision: hand-computed values on tiny tensors for every variant."""
from __future__ import annotations

import math

import pytest
import torch

from gl10m.errors import UserError
from gl10m.model.crossscale.supervision import cache_g_star, cover_order, g_star, minmax, s_cover, s_gain


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def scene(tile_dirs, lr_dir, labels, s_vis=None):
    """One scene (B=1) whose 100 HR tile embeddings cycle through `tile_dirs` (2-d vectors),
    with text = the two axes e0, e1."""
    hr = torch.stack([tile_dirs[i % len(tile_dirs)] for i in range(100)])[None]
    lr = lr_dir[None]
    text = torch.eye(2)
    lab = torch.tensor([labels], dtype=torch.uint8)
    vis = torch.ones(1, 100) if s_vis is None else s_vis
    return vis, hr, lr, text, lab


def test_minmax_and_constant_rule():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [0.0, 0.0, 1e-9]])
    out = minmax(x)
    assert torch.allclose(out[0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(out[1], torch.zeros(3))  # constant -> zeros, no NaN
    assert torch.equal(out[2], torch.zeros(3))  # range below eps counts as constant
    assert torch.isfinite(out).all()
    assert torch.allclose(minmax(x[2:], eps=0.0)[0], torch.tensor([0.0, 0.0, 1.0]))


def test_s_gain_hand_values_lam_and_clamp():
    # Tile a along e0, tile b at 45 degrees, tile c along e1; LR embedding along e0.
    a, b, c = unit(1, 0), unit(1, 1), unit(0, 1)
    r = 1 / math.sqrt(2)
    _, hr, lr, text, lab = scene([a, b, c], unit(1, 0), [1, 0])  # concept 0 only
    # cos(F_h, T0) = 1, r, 0; cos(F_g, T0) = 1.
    g = s_gain(hr, lr, text, lab, lam=0.5)[0]
    assert torch.allclose(g[:3], torch.tensor([0.5, r - 0.5, 0.0]), atol=1e-6)  # 0 - 0.5 -> 0
    g = s_gain(hr, lr, text, lab, lam=0.0)[0]
    assert torch.allclose(g[:3], torch.tensor([1.0, r, 0.0]), atol=1e-6)
    g = s_gain(hr, lr, text, lab, lam=1.0)[0]
    assert torch.allclose(g[:3], torch.zeros(3), atol=1e-6)  # r - 1 < 0 clamped
    # Both concepts: max over concepts. Concept 1: cos(F_h, T1) = 0, r, 1; cos(F_g, T1) = 0.
    _, hr, lr, text, lab = scene([a, b, c], unit(1, 0), [1, 1])
    g = s_gain(hr, lr, text, lab, lam=0.5)[0]
    assert torch.allclose(g[:3], torch.tensor([0.5, r, 1.0]), atol=1e-6)


def test_s_gain_no_labels_is_zero_and_unnormalised_embeddings():
    _, hr, lr, text, lab = scene([unit(1, 0), unit(0, 1)], unit(0, 1), [0, 0])
    assert torch.equal(s_gain(hr, lr, text, lab), torch.zeros(1, 100))
    # Cosine does not depend on the embeddings' scale.
    _, hr, lr, text, lab = scene([unit(1, 0), unit(1, 1)], unit(1, 0), [1, 0])
    assert torch.allclose(s_gain(hr * 7.0, lr * 0.1, text, lab), s_gain(hr, lr, text, lab))


def _variants_case():
    # 4 distinct tile directions, s_vis cycling 1, 2, 3, 4.
    dirs = [unit(1, 0), unit(1, 1), unit(0, 1), unit(1, 2)]
    vis = torch.tensor([[float(1 + i % 4) for i in range(100)]])
    return scene(dirs, unit(1, 0), [1, 0], s_vis=vis)


def test_g_star_variants_hand_computed():
    vis, hr, lr, text, lab = _variants_case()
    r = 1 / math.sqrt(2)
    c4 = 1 / math.sqrt(5)  # cos((1,2), e0)
    gain = torch.tensor([0.5, r - 0.5, 0.0, c4 - 0.5]).clamp(min=0)  # lam = 0.5, cos(F_g,T0)=1
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())

    expect = {
        "multiplicative": mm(v * gain),
        "structural": mm(v),
        "semantic": mm(gain),
        "additive": mm((mm(v) + mm(gain)) / 2),
    }
    for variant, want in expect.items():
        got = g_star(vis, hr, lr, text, lab, lam=0.5, variant=variant)
        assert got.shape == (1, 100)
        assert torch.allclose(got[0, :4], want, atol=1e-6), variant
        assert torch.allclose(got[0, 4:8], want, atol=1e-6), variant  # pattern repeats
        assert float(got.min()) == 0.0 and abs(float(got.max()) - 1.0) < 1e-6
    # Default is the paper's multiplicative variant with lam 0.5.
    assert torch.allclose(g_star(vis, hr, lr, text, lab), expect["multiplicative"].repeat(25)[None])
    # lam changes the result: lam = 0 -> gain = cos(F_h, T0) = 1, r, 0, c4.
    got = g_star(vis, hr, lr, text, lab, lam=0.0)
    assert torch.allclose(got[0, :4], mm(v * torch.tensor([1.0, r, 0.0, c4])), atol=1e-6)


def test_g_star_constant_maps_and_unlabelled_scene():
    vis, hr, lr, text, lab = _variants_case()
    lab0 = torch.zeros_like(lab)
    # No labels: s_gain = 0 everywhere -> multiplicative and semantic all zeros.
    for variant in ("multiplicative", "semantic"):
        assert torch.equal(g_star(vis, hr, lr, text, lab0, variant=variant), torch.zeros(1, 100))
    # Additive then falls back to the structural map (the zero term adds nothing).
    assert torch.allclose(g_star(vis, hr, lr, text, lab0, variant="additive"),
                          g_star(vis, hr, lr, text, lab0, variant="structural"))
    # Constant s_vis: structural all zeros, multiplicative follows s_gain alone.
    flat = torch.full_like(vis, 0.3)
    assert torch.equal(g_star(flat, hr, lr, text, lab, variant="structural"), torch.zeros(1, 100))
    assert torch.allclose(g_star(flat, hr, lr, text, lab),
                          g_star(flat, hr, lr, text, lab, variant="semantic"), atol=1e-6)


def test_g_star_batches_are_independent():
    torch.manual_seed(0)
    b, e, c = 3, 5, 4
    vis = torch.rand(b, 100)
    hr = torch.randn(b, 100, e)
    lr = torch.randn(b, e)
    text = torch.nn.functional.normalize(torch.randn(c, e), dim=-1)
    lab = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.uint8)
    for variant in ("multiplicative", "structural", "semantic", "additive"):
        full = g_star(vis, hr, lr, text, lab, variant=variant)
        for i in range(b):
            one = g_star(vis[i:i + 1], hr[i:i + 1], lr[i:i + 1], text, lab[i:i + 1],
                         variant=variant)
            assert torch.allclose(full[i], one[0])
        assert ((full >= 0) & (full <= 1)).all()
    assert torch.equal(g_star(vis, hr, lr, text, lab)[1], torch.zeros(100))


def test_g_star_bad_input():
    vis, hr, lr, text, lab = _variants_case()
    with pytest.raises(UserError, match="variant"):
        g_star(vis, hr, lr, text, lab, variant="product")
    with pytest.raises(UserError, match="s_vis"):
        g_star(vis[:, :99], hr, lr, text, lab)
    with pytest.raises(UserError, match="hr_embed"):
        g_star(vis, hr[:, :50], lr, text, lab)
    with pytest.raises(UserError, match="labels"):
        g_star(vis, hr, lr, text, torch.ones(1, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match="lr_embed"):
        g_star(vis, hr, lr[:, :1], text, lab)
    with pytest.raises(UserError, match="NaN"):
        g_star(vis * float("nan"), hr, lr, text, lab)
    with pytest.raises(UserError, match="lam"):
        g_star(vis, hr, lr, text, lab, lam=float("inf"))
    with pytest.raises(UserError, match="batch size"):
        g_star(torch.cat([vis, vis]), hr, lr, text, lab)


def test_cache_g_star_over_batches():
    vis, hr, lr, text, lab = _variants_case()
    batch = {"s_vis": vis, "hr_embed": hr, "lr_embed": lr, "labels": lab}
    out = list(cache_g_star([batch, dict(batch, key=["k9"])], text))
    assert [k for k, _ in out] == [[0], ["k9"]]
    assert torch.allclose(out[1][1], g_star(vis, hr, lr, text, lab))
    with pytest.raises(UserError, match="lacks"):
        list(cache_g_star([{"s_vis": vis}], text))


def test_s_gain_never_sees_novel_concepts():
    """A tile whose only gain is for a held-out (novel) concept gains nothing, whatever that
    concept's label says; base concepts are unaffected."""
    from gl10m.model.crossscale.supervision import g_star, s_gain
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    hr = torch.randn(2, 100, 8, generator=g) * 0.1
    hr[:, 7] = text[2] * 5            # tile 7 shows concept 2
    lr = torch.randn(2, 8, generator=g)
    labels = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.uint8)
    full = s_gain(hr, lr, text, labels)
    held = s_gain(hr, lr, text, labels, novel=[2])
    assert full[0, 7] > 0.5 and torch.all(held[0] == 0)                 # scene 0 has only the novel concept
    base = torch.tensor([[0, 0, 0], [1, 0, 0]], dtype=torch.uint8)
    assert torch.equal(held, s_gain(hr, lr, text, base))                # == as if the label were absent
    s_vis = torch.rand(2, 100, generator=g)
    assert torch.equal(g_star(s_vis, hr, lr, text, labels, novel=[2]), g_star(s_vis, hr, lr, text, base))


# -- the coverage variant ---------------------------------------------------------------------
def _frac(c=3, **tiles):
    """[1, 100, c] per-tile fractions: tiles={concept: [tile ids]} (fraction 0.3 there)."""
    f = torch.zeros(1, 100, c)
    for k, ids in tiles.items():
        f[0, ids, int(k[1:])] = 0.3
    return f


def test_s_cover_hand_values_rarity_and_novel():
    # c0: one pool in tile 7; c1: forest over tiles 0..59; c2 (novel): tile 8 only.
    frac = _frac(c0=[7], c1=list(range(60)), c2=[8])
    lab = torch.tensor([[1, 1, 1]], dtype=torch.uint8)
    s = s_cover(frac, lab, novel=[2])[0]
    assert s[7] == pytest.approx(1 + 1 / 60)  # the only tile with c0 is worth a whole concept
    assert s[0] == pytest.approx(1 / 60) and s[59] == pytest.approx(1 / 60)
    assert s[8] == pytest.approx(1 / 60)  # the novel concept adds nothing
    assert s[60:].abs().sum() == 0 and s[8] < s[7]
    assert int(s.argmax()) == 7
    # without the novel hold-out, tile 8 holds a whole concept too
    assert s_cover(frac, lab)[0][8] == pytest.approx(1 + 1 / 60)
    # an unlabelled concept counts for nothing, even where the fractions say it is there
    s = s_cover(frac, torch.tensor([[0, 1, 0]], dtype=torch.uint8))[0]
    assert s[7] == pytest.approx(1 / 60) and s.max() == pytest.approx(1 / 60)
    # a labelled concept in no tile, or no label at all: zeros, no NaN
    assert torch.equal(s_cover(torch.zeros(1, 100, 3), lab), torch.zeros(1, 100))
    assert torch.equal(s_cover(frac, torch.zeros(1, 3, dtype=torch.uint8)), torch.zeros(1, 100))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coverage_g_star_ranks_the_rare_concepts_tiles_first(seed):
    """On random scenes: every tile holding a concept found in <= 2 tiles ranks above every tile
    holding only concepts spread over >= 30 tiles, and G* is min-max normalised."""
    g = torch.Generator().manual_seed(seed)
    b, c = 6, 8
    frac = torch.zeros(b, 100, c)
    rare, common = [], []
    for i in range(b):
        perm = torch.randperm(100, generator=g)
        rare.append(perm[:4].tolist())  # concepts 0, 1 in two tiles each
        frac[i, perm[:2], 0] = 0.1
        frac[i, perm[2:4], 1] = 0.1
        common.append(perm[4:70].tolist())  # concepts 2..7 spread over ~30+ tiles each
        for k in range(2, c):
            idx = perm[4 + torch.randperm(66, generator=g)[:30 + k]]
            frac[i, idx, k] = torch.rand(len(idx), generator=g) * 0.9 + 0.05
    lab = torch.ones(b, c, dtype=torch.uint8)
    vis = torch.rand(b, 100, generator=g)
    hr, lr, text = torch.randn(b, 100, 4, generator=g), torch.randn(b, 4, generator=g), torch.randn(c, 4, generator=g)
    gs = g_star(vis, hr, lr, text, lab, variant="coverage", tile_frac=frac)
    assert gs.shape == (b, 100) and float(gs.min()) == 0.0 and torch.allclose(gs.amax(1), torch.ones(b))
    for i in range(b):
        assert gs[i, rare[i]].min() > gs[i, common[i]].max()
    # it reads neither the features nor s_vis: only where the labelled concepts are
    assert torch.equal(gs, g_star(torch.rand(b, 100), hr * 2, -lr, text, lab, variant="coverage", tile_frac=frac))


def test_coverage_needs_tile_fractions_and_batches_carry_them():
    vis, hr, lr, text, lab = scene([unit(1, 0)], unit(1, 0), [1, 0])
    with pytest.raises(UserError, match="tile_frac"):
        g_star(vis, hr, lr, text, lab, variant="coverage")
    with pytest.raises(UserError, match="tile_frac: expected shape"):
        g_star(vis, hr, lr, text, lab, variant="coverage", tile_frac=torch.zeros(1, 99, 2))
    batch = {"s_vis": vis, "hr_embed": hr, "lr_embed": lr, "labels": lab}
    with pytest.raises(UserError, match="lacks tile_frac"):
        list(cache_g_star([batch], text, variant="coverage"))
    frac = _frac(c=2, c0=[5])
    (_, got), = cache_g_star([{**batch, "tile_frac": frac}], text, variant="coverage")
    assert int(got[0].argmax()) == 5 and got[0].sum() == 1.0


def test_cover_order_is_a_greedy_cover_of_the_labelled_concepts():
    # c0 in tiles 1, 2; c1 in 2, 3; c2 in 50; c3 (unlabelled) in 70 only
    frac = _frac(c=4, c0=[1, 2], c1=[2, 3], c2=[50], c3=[70])
    lab = torch.tensor([[1, 1, 1, 0]], dtype=torch.uint8)
    o = cover_order(frac, lab)[0]
    first = o.argsort(descending=True)[:2].tolist()
    assert first == [2, 50]  # two tiles cover all three labelled concepts
    assert sorted(o.tolist()) == [float(v) for v in range(1, 101)]  # a full order, no ties
    assert o[70] < o[1] and o[70] < o[3]  # what the labels do not name comes after what they do


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cover_order_covers_with_few_tiles(seed):
    """Random scenes: the greedy cover's first k tiles hold every labelled concept that some tile
    holds whenever k tiles could (checked against k = the number of such concepts, a loose bound)."""
    g = torch.Generator().manual_seed(seed)
    b, c = 5, 10
    frac = (torch.rand(b, 100, c, generator=g) > 0.97).float() * 0.2
    lab = (torch.rand(b, c, generator=g) > 0.3).to(torch.uint8)
    o = cover_order(frac, lab)
    for i in range(b):
        present = (frac[i] > 0) & (lab[i] > 0)[None]
        want = int(present.any(0).sum())
        top = o[i].topk(max(want, 1)).indices
        assert int(present[top].any(0).sum()) == want
