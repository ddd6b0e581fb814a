"""MapSR's held-out bench (gl10m.model.mapsr.bench, bench/mapsr.py): truth windows, coarse labels from
the truth, the supervised baseline, refinement chosen on val windows only, the bench's report and
records, quiet output."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gl10m.model.mapsr import bench as B
from gl10m.model.mapsr import graph as G
from gl10m.model.mapsr import io as IO
from gl10m.model.mapsr import model as M
from tests.test_mapsr import SMALL_SPEC

ROOT = Path(__file__).resolve().parents[1]


def _small_spec():
    from gl10m.profile import DEFAULT_PROFILE
    return dict(SMALL_SPEC, profile=str(DEFAULT_PROFILE))


# -- truth windows ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [11, 12])
def test_truth_window_has_each_feature_s_class_where_the_layout_puts_it(seed):
    """Pick polygons of the generated layout that nothing else touches near a point inside them; the
    rendered window's 1 m truth at that point is the base class of the polygon's material."""
    import shapely
    from affine import Affine

    from gl10m.testbed import classes as C, layout as L, raster as R, spec as SP

    spec = SP.spec_from_dict(_small_spec())
    regions = L.generate(spec, seed)
    lut = IO.material_to_base()
    checked = set()
    for r in regions:
        crs, tr, shape = R.truth_grid(r, 1.0)
        shapes, cover, z, mat = R.draw_shapes(r, f"EPSG:{crs}")
        tree = shapely.STRtree([s if s is not None else shapely.Point() for s in shapes])
        inv = ~tr
        for i, g in enumerate(shapes):
            if g is None or g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon") or g.area < 400:
                continue
            m = int(mat[i]) or int(C.CLASS_MATERIAL[int(cover[i])])
            want = int(lut[m])
            if want == 255 or want in checked:
                continue
            p = g.representative_point()
            disc = p.buffer(3.0)
            if not g.contains(disc) or any(j != i for j in tree.query(disc, predicate="intersects")):
                continue
            col, row = inv * (p.x, p.y)
            r0, c0 = int(row) - 32, int(col) - 32
            if r0 < 0 or c0 < 0 or r0 + 64 > shape[0] or c0 + 64 > shape[1]:
                continue
            sc = IO.testbed_scene(spec, region=r.code, size=64, cell=32, offset=(r0, c0), seed=seed, regions=regions)
            pr, pc = int(row) - r0, int(col) - c0
            assert sc.truth[pr, pc] == want, (r.code, i, sc.classes[want], sc.truth[pr, pc])
            # and the window sits where the layout's grid says
            assert sc.transform == tr * Affine.translation(c0, r0)
            checked.add(want)
    assert len(checked) >= 3, checked  # several base classes were checked


# -- coarse labels from truth -----------------------------------------------------------------------
def test_coarse_from_truth_is_the_majority_per_cell_on_the_truth_grid():
    t = np.array([[0, 0, 1, 1, 2],
                  [0, 1, 1, 1, 2],
                  [-1, -1, 3, 2, 2],
                  [-1, -1, 2, 3, 4]], np.int16)
    c = B.coarse_from_truth(t, 2, 5)
    assert c.shape == t.shape and c.dtype == np.int16
    want = np.array([[0, 0, 1, 1, 2],
                     [0, 0, 1, 1, 2],
                     [-1, -1, 2, 2, 2],   # a 2-2 tie between classes 2 and 3: the lowest id
                     [-1, -1, 2, 2, 2]])
    np.testing.assert_array_equal(c, want)
    # on random label maps, every cell holds its block's most frequent label
    rng = np.random.default_rng(0)
    for cell in (3, 7):
        lab = rng.integers(0, 4, (20, 23)).astype(np.int16)
        c = B.coarse_from_truth(lab, cell, 4)
        for r0 in range(0, 20, cell):
            for c0 in range(0, 23, cell):
                blk = lab[r0:r0 + cell, c0:c0 + cell]
                assert (c[r0:r0 + cell, c0:c0 + cell] == np.bincount(blk.ravel(), minlength=4).argmax()).all()


# -- the supervised baseline ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_head_learns_a_separable_toy_case(seed):
    """Tokens of two classes in two directions of feature space plus noise (stride 1): the head trained
    on the labels maps them back; trained on shuffled labels it cannot."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = 16, 24, 24
    lab = (torch.rand(h, w, generator=g) > 0.5).long()
    centres = torch.randn(2, d, generator=g) * 3
    tok = centres[lab].permute(2, 0, 1) + 0.5 * torch.randn(d, h, w, generator=g)
    fm = M.FeatureMap(tok, 1, (h, w))
    x, y = B.sample_pixels([fm], [lab.numpy()], 400, seed)
    head = B.train_dense_head(x, y, 2, hidden=8, steps=80, batch=128, lr=1e-2, seed=seed)
    assert B.n_params(head) == 16 * 8 + 8 + 8 * 2 + 2
    acc = (head.predict(fm) == lab.numpy()).mean()
    assert acc > 0.98, acc
    y_shuf = y[torch.randperm(len(y), generator=g)]
    bad = B.train_dense_head(x, y_shuf, 2, hidden=8, steps=80, batch=128, lr=1e-2, seed=seed)
    assert (bad.predict(fm) == lab.numpy()).mean() < 0.9


# -- refinement chosen on val windows -------------------------------------------------------------
class _Model:
    """A stand-in MapSR whose prediction depends on the refinement config (alpha picks a shift)."""
    classes = ["a", "b"]

    def __init__(self):
        self.refine_cfg = None

    def predict(self, image, refine=True, fmap=None, coarse=None):
        t = fmap  # the truth is passed as the "feature map"
        if not refine:
            return {"cosine": np.where(np.arange(t.size).reshape(t.shape) % 3 == 0, 1 - t, t)}
        err = {0.5: 5, 0.9: 0}[self.refine_cfg.alpha]
        out = t.copy()
        out.ravel()[:err] = 1 - out.ravel()[:err]
        return {"cosine": t, "refined": out}


def test_select_refinement_takes_the_best_on_the_windows_given_and_none_on_a_tie():
    t = (np.arange(64).reshape(8, 8) % 2).astype(np.int16)
    items = [B.Scored(B.BenchWindow(B.Window("val", 1, "X", 0, 0, 8), None, t, {}, ["a", "b"]), t)]
    c5 = G.RefineConfig(mode="blocks", alpha=0.5)
    c9 = G.RefineConfig(mode="blocks", alpha=0.9)
    best, rows = B.select_refinement(_Model(), items, [None, c5, c9])
    assert best is c9 and [r["refine"] for r in rows][0] == "none"
    assert rows[2]["val_miou"] == 1.0 and rows[1]["val_miou"] < 1.0 and rows[0]["val_miou"] < rows[1]["val_miou"]

    class Same(_Model):
        def predict(self, image, refine=True, fmap=None, coarse=None):
            return {"cosine": fmap, "refined": fmap}
    best, _ = B.select_refinement(Same(), items, [None, c5, c9])
    assert best is None  # a tie: refinement does not earn its place


TINY_CFG = dict(size=64, cells=(16, 64), n_train=3, n_val=2, n_test=3, grid="tiny", pixels=3000, probe_steps=30,
                head_steps=40, priors=(0.0, 0.3, 5.0))


@pytest.fixture(scope="module")
def tiny_bench():
    """One tiny bench run (tiny random encoder, small worlds of three seeds), recording every window
    render and every refinement selection in order."""
    from gl10m.model.encoders import build_encoder
    from gl10m.model.mapsr.cli import TINY_ENCODER

    events = []
    render = B.WorldWindows.render

    def spy_render(self, split, *a, **k):
        out = render(self, split, *a, **k)
        events.append(("render", split, [w.window for w in out]))
        return out

    def spy_select(model, items, candidates, progress=None):
        events.append(("select", {it.window.window.split for it in items}, [it.window.window for it in items]))
        return B.select_refinement(model, items, candidates, progress)

    select_prior = B.select_prior

    def spy_prior(model, items, weights, radius, progress=None):
        events.append(("prior", {it.window.window.split for it in items}, [it.window.window for it in items]))
        assert all(it.coarse is not None for it in items)
        return select_prior(model, items, weights, radius, progress)

    torch.manual_seed(0)
    enc = build_encoder(dict(TINY_ENCODER))[0]
    cfg = B.BenchConfig(**TINY_CFG, seeds={"train": 11, "val": 12, "test": 13}, spec=_small_spec(),
                        features={"tiny": {"chip": 64, "shifts": 2}})
    B.WorldWindows.render = spy_render
    B.select_prior = spy_prior
    try:
        rep = B.run({"tiny": enc}, cfg, select=spy_select)
    finally:
        B.WorldWindows.render = render
        B.select_prior = select_prior
    return rep, events


def test_refinement_is_chosen_on_val_windows_only_before_test_windows_exist(tiny_bench):
    rep, events = tiny_bench
    kinds = [e[0] for e in events]
    selects = [e for e in events if e[0] in ("select", "prior")]
    assert len(selects) == 4  # refinement and coarse prior, one each per coarse cell size
    for _, splits, wins in selects:
        assert splits == {"val"}, splits
        assert {w.key for w in wins} == set(rep["windows"]["val"])
    # test windows are rendered once, after every selection
    test_idx = [i for i, e in enumerate(events) if e[0] == "render" and e[1] == "test"]
    assert len(test_idx) == 1 and test_idx[0] > max(i for i, k in enumerate(kinds) if k in ("select", "prior"))


def test_tiny_bench_report_and_records(tiny_bench, monkeypatch):
    rep, events = tiny_bench
    w = rep["windows"]
    assert (len(w["train"]), len(w["val"]), len(w["test"])) == (3, 2, 3)
    assert len(set(w["train"]) | set(w["val"]) | set(w["test"])) == 8
    wins = {e[1]: e[2] for e in events if e[0] == "render"}
    assert {x.seed for x in wins["train"]} == {11} and {x.seed for x in wins["test"]} == {13}
    for x in wins["test"]:  # windows of one seed never overlap
        for y in wins["test"]:
            if x != y and x.region == y.region:
                assert abs(x.row - y.row) >= 64 or abs(x.col - y.col) >= 64
    res = rep["results"]["tiny"]
    assert set(res["cells"]) == {16, 64}
    assert res["stride"] == 4 and res["features"] == {"chip": 64, "shifts": 2}  # 8 px tokens, 2 shifts
    for cell, rc in res["cells"].items():
        assert set(rc["rows"]) == set(B.METHODS)
        for k, r in rc["rows"].items():
            mean, lo, hi = r["window_miou"]
            assert lo <= mean <= hi and 0 <= lo and hi <= 1
            assert np.mean(r["per_window_miou"]) == pytest.approx(mean) and len(r["per_window_miou"]) == 3
            pooled, lo, hi = r["miou"]
            assert 0 <= lo <= hi <= 1 and 0 <= pooled <= 1
            assert pooled == pytest.approx(np.nanmean([np.nan if v is None else v for v in r["iou"].values()]))
        assert rc["rows"]["coarse"]["params"] == 0
        assert rc["rows"]["cosine"]["params"] == (64 + 1) * 5  # the probe: Linear(D=64, 5 classes)
        assert rc["rows"]["supervised"]["params"] == 64 * 32 + 32 + 32 * 5 + 5
        assert rc["refine"] in {r["refine"] for r in rc["val_table"]}
        # the prior: the best weight on val (ties to the earlier), its radius half a cell
        assert [r["prior"] for r in rc["prior_table"]] == [0.0, 0.3, 5.0] and rc["prior_radius"] == cell // 2
        best = max(rc["prior_table"], key=lambda r: r["val_miou"])
        assert rc["prior"] == best["prior"]
        if rc["prior"] == 0:
            assert rc["rows"]["cosine_noprior"]["per_window_miou"] == rc["rows"]["cosine"]["per_window_miou"]
        if rc["refine"] == "none":
            assert rc["rows"]["refined"]["per_window_miou"] == rc["rows"]["cosine"]["per_window_miou"]
        d = rc["diffs"]["cosine-coarse"][0]
        assert d == pytest.approx(rc["rows"]["cosine"]["miou"][0] - rc["rows"]["coarse"]["miou"][0])
    txt = B.table(rep)
    assert "encoder tiny (features: chip 64, shifts 2; a token every 4 px), coarse cell 16 px" in txt
    assert "supervised" in txt and "cosine_noprior" in txt
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the bench scripts import bench/_results.py
    spec = importlib.util.spec_from_file_location("bench_mapsr", ROOT / "bench" / "mapsr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recs = mod.records(rep)
    names = {r["name"] for r in recs}
    assert "tiny/cell16/refined/miou" in names and "tiny/cell64/refined-cosine" in names
    assert len(recs) == 2 * (5 + 5)
    for r in recs:
        assert set(r) >= {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "meaning"}


def test_pooled_ci_sums_confusions_and_pairs_the_resamples():
    rng = np.random.default_rng(1)
    t = [rng.integers(0, 3, (6, 6)) for _ in range(8)]
    good = np.stack([M.confusion(x, x, 3) for x in t])
    bad = np.stack([M.confusion(np.where(rng.random(x.shape) < 0.3, (x + 1) % 3, x), x, 3) for x in t])
    v, lo, hi = B.pooled_ci(good)
    assert (v, lo, hi) == (1.0, 1.0, 1.0)
    v, lo, hi = B.pooled_ci(bad)
    assert v == pytest.approx(M.scores_from_confusion(bad.sum(0))["miou"]) and lo <= hi < 1.0
    d, dlo, dhi = B.pooled_ci(good, bad)
    assert d == pytest.approx(1.0 - v) and 0 < dlo <= dhi


def test_bootstrap_ci_covers_the_mean_and_narrows_with_more_windows():
    rng = np.random.default_rng(0)
    small = B.bootstrap_ci(rng.normal(0.5, 0.1, 10))
    big = B.bootstrap_ci(rng.normal(0.5, 0.1, 400))
    assert small[1] <= small[0] <= small[2] and big[1] <= big[0] <= big[2]
    assert (big[2] - big[1]) < (small[2] - small[1]) / 3
    assert B.bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))


# -- colour in the graph, quiet output --------------------------------------------------------------
def test_colour_term_scales_edges_by_colour_distance():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2]])
    rgb = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.4, 0.0]])
    w0 = G.knn_graph(x, k=1, gamma=1.0).to_dense()
    w1 = G.knn_graph(x, k=1, gamma=1.0, color=2.0, rgb=rgb).to_dense()
    assert w1[0, 1] == pytest.approx(w0[0, 1].item())          # same colour: unchanged
    assert w1[1, 2] == pytest.approx(w0[1, 2].item() * np.exp(-2.0 * 0.5), rel=1e-5)  # |dc| = 0.5
    with pytest.raises(ValueError, match="colours"):
        G.knn_graph(x, k=1, color=2.0)


def test_refinement_prints_no_torch_sparse_notices():
    """torch warns once per process ("Sparse CSR tensor support is in beta state", "Sparse invariant
    checks are implicitly disabled"): a fresh interpreter shows whether refinement lets them out."""
    code = ("import torch\nfrom gl10m.model.mapsr.graph import RefineConfig, refine_window\n"
            "torch.manual_seed(0)\nf = torch.randn(8, 16, 16)\ns = torch.rand(3, 16, 16)\n"
            "img = (torch.rand(3, 16, 16) * 255).to(torch.uint8)\n"
            "refine_window(f, s, RefineConfig(k=8, window=16), img)\n"
            "refine_window(f, s, RefineConfig(mode='blocks', k=4, window=16, color=2.0), img)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "Sparse" not in r.stderr and "Warning" not in r.stderr, r.stderr


def test_progress_is_silent_off_a_terminal(capsys):
    assert list(M._progress(iter(range(3)), 3, "features")) == [0, 1, 2]
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
