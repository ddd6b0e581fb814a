"""MapSR's denser features and coarse prior (gl10m.model.mapsr.model): shifted encoder passes that cut
the token stride, the image's colour as extra feature channels, and the coarse map as a prior at
prediction time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gl10m.model import mapsr as M
from tests.test_mapsr import _tiny_encoder, geo  # noqa: F401  (geo: a fixture); patch 4, hr_size 32


def _img(seed, h, w):
    return np.random.default_rng(seed).integers(0, 255, (3, h, w), dtype=np.uint8)


# -- shifted passes -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 4])
def test_shifted_passes_put_a_token_every_stride_over_n_pixels(seed, n):
    """64 px chips shrunk to the encoder's 32 (8 tokens a side, so a token every s = 8 px); with n
    shifts a token every u = 8 / n px, and fine token (k, l) is the encoder's token (i, j) of the image
    shifted by ((s - u) / 2 + a u, (s - u) / 2 + b u) px, k = i n - a, l = j n - b (one chip a pass
    here, so no stitching is involved)."""
    enc = _tiny_encoder(seed)
    img = _img(seed, 40, 37)
    fm = M.dense_features(enc, img, chip=64, shifts=n, progress=False)
    s, u = 8, 8 // n
    assert fm.stride == u and fm.shape == (40, 37)
    assert tuple(fm.tokens.shape[1:]) == (-(-40 // u), -(-37 // u))
    x = torch.as_tensor(img)[None].float()
    rng = np.random.default_rng(seed)
    picks = [(0, 0), (fm.tokens.shape[1] - 1, fm.tokens.shape[2] - 1)] + \
        [tuple(rng.integers(0, fm.tokens.shape[1:])) for _ in range(6)]
    for k, l in picks:
        a, b = (-k) % n, (-l) % n
        i, j = (k + a) // n, (l + b) // n
        top, left = (s - u) // 2 + a * u, (s - u) // 2 + b * u
        shifted = F.pad(x, (left, 64 - 37 - left, top, 64 - 40 - top), mode="replicate").to(torch.uint8)
        _, _, dense = enc.encode_hr(shifted)
        torch.testing.assert_close(fm.tokens[:, k, l], dense[0, i, j], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_shifted_passes_agree_with_the_plain_grid_where_they_coincide_and_track_a_shifted_image(seed):
    """shifts=1 is the plain grid; with n shifts, moving the image by u px moves the fine tokens by one
    (away from the padded edges, and with one chip a pass)."""
    enc = _tiny_encoder(seed)
    img = _img(seed, 48, 48)
    assert torch.equal(M.dense_features(enc, img, chip=64, progress=False).tokens,
                       M.dense_features(enc, img, chip=64, shifts=1, progress=False).tokens)
    n, u = 2, 4
    a = M.dense_features(enc, img[:, :40, :40], chip=64, shifts=n, progress=False).tokens
    b = M.dense_features(enc, img[:, u:40 + u, u:40 + u], chip=64, shifts=n, progress=False).tokens
    # b's token k sits where a's token k + 1 does; compare the interior (edge tokens see padding)
    inner = a[:, 3:7, 3:7], b[:, 2:6, 2:6]
    err = (inner[0] - inner[1]).abs().mean() / inner[0].abs().mean()
    other = (a[:, 3:7, 3:7] - b[:, 3:7, 3:7]).abs().mean() / inner[0].abs().mean()
    assert err < 0.35 * other, (float(err), float(other))


def test_shifts_that_do_not_fit_the_stride_are_one_line_errors():
    enc = _tiny_encoder()
    img = _img(0, 32, 32)
    for n in (0, 3, 8):  # chip 32: stride 4; 3 does not divide it, 8 exceeds it; 4: u=1, s-u=3 odd
        with pytest.raises(M.MapSRError, match="shifts"):
            M.dense_features(enc, img, shifts=n, progress=False)
    with pytest.raises(M.MapSRError, match="shifts"):
        M.dense_features(enc, img, shifts=4, progress=False)


# -- colour channels --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_colour_channels_follow_the_unit_token_feature(seed):
    enc = _tiny_encoder(seed)
    img = _img(seed, 30, 41)
    plain = M.dense_features(enc, img, progress=False)
    fm = M.dense_features(enc, img, progress=False, color=2.0)
    d = plain.tokens.shape[0]
    assert fm.dim == d + 3 and plain.dim == d
    win = fm.window(3, 27, 5, 40)
    torch.testing.assert_close(win[:d], F.normalize(plain.window(3, 27, 5, 40), dim=0))
    want = 2.0 * (2.0 * torch.as_tensor(img[:, 3:27, 5:40]).float() / 255.0 - 1.0)
    torch.testing.assert_close(win[d:], want)
    rows, cols = torch.tensor([3, 10, 26]), torch.tensor([5, 33, 39])
    torch.testing.assert_close(fm.points(rows, cols), win[:, rows - 3, cols - 5].T, rtol=1e-4, atol=1e-5)


def test_colour_channels_separate_what_the_tokens_cannot():
    """Blue and black stripes 3 to 11 px wide under tokens of 8 px (64 px chips for a 32 px encoder):
    the bilinear token features blur the narrow stripes; with the colour channels cosine matching
    splits them."""
    enc = _tiny_encoder(0)
    edges = np.cumsum([0, 5, 7, 3, 9, 3, 6, 4, 11])
    img = np.zeros((3, 48, 48), np.uint8)
    lab = np.zeros((48, 48), np.int16)
    for i in range(len(edges) - 1):
        if i % 2 == 0:
            img[2, :, edges[i]:edges[i + 1]] = 200
        else:
            lab[:, edges[i]:edges[i + 1]] = 1
    acc = {}
    for color in (0.0, 1.0):
        m = M.MapSR(enc, ["blue", "black"], M.MapSRConfig(chip=64, color_feature=color, probe_steps=60,
                                                          progress=False))
        m.fit([(img, lab)])
        acc[color] = float((m.predict(img, refine=False)["cosine"] == lab).mean())
    assert acc[1.0] > 0.98 and acc[1.0] > acc[0.0] + 0.05, acc


# -- the coarse prior ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("radius", [0, 1, 3])
def test_coarse_prior_is_each_class_share_within_the_radius(seed, radius):
    c = np.random.default_rng(seed).integers(-1, 3, (9, 11))
    p = M.coarse_prior(c, 3, radius).numpy()
    assert p.shape == (3, 9, 11)
    for y in range(9):
        for x in range(11):
            box = c[max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1]
            box = box[box >= 0]
            want = [(box == k).mean() if len(box) else 0.0 for k in range(3)]
            np.testing.assert_allclose(p[:, y, x], want, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_prior_pulls_cosine_matching_toward_the_coarse_map(seed):
    enc = _tiny_encoder(seed)
    rng = np.random.default_rng(seed)
    img = _img(seed, 48, 48)
    coarse = np.repeat(np.repeat(rng.integers(0, 3, (3, 3)), 16, 0), 16, 1).astype(np.int16)
    coarse[:16, :16] = -1
    m = M.MapSR(enc, ["a", "b", "c"], M.MapSRConfig(probe_steps=30, progress=False)).fit([(img, coarse)])
    base = m.predict(img, refine=False)["cosine"]
    assert (base != coarse)[coarse >= 0].any()  # random features: cosine matching ignores the coarse map
    # prior 0 with a coarse map given: nothing changes
    assert np.array_equal(m.predict(img, refine=False, coarse=coarse)["cosine"], base)
    m.cfg.prior, m.cfg.prior_radius = 10.0, 0
    out = m.predict(img, refine=True, coarse=coarse)
    ok = coarse >= 0
    assert np.array_equal(out["cosine"][ok], coarse[ok])  # a large prior: the coarse label wins
    assert np.array_equal(out["cosine"][~ok], base[~ok])  # no coarse label, no prior
    m.cfg.prior = 1e-4
    assert (m.predict(img, refine=False, coarse=coarse)["cosine"] != base).mean() < 0.05
    m.cfg.prior = 0.1
    with pytest.raises(M.MapSRError, match="needs the coarse map"):
        m.predict(img, refine=False)
    with pytest.raises(M.MapSRError, match="not on the image grid"):
        m.predict(img, refine=False, coarse=coarse[:40])


def test_cli_fit_with_shifts_and_colour_predict_with_the_coarse_prior(geo):
    """`mapsr fit --shifts --color-feature` saves them (predict's features follow); `predict --prior W
    --coarse nlcd.tif` pulls the map to the coarse labels; --prior without --coarse is a one-line error."""
    import json

    import rasterio
    from typer.testing import CliRunner

    from gl10m.model.mapsr import io as IO
    from gl10m.model.mapsr.cli import mapsr_app
    from tests.test_mapsr import TINY

    enc_yaml = geo / "enc.yaml"
    enc_yaml.write_text("encoder:\n" + "".join(f"  {k}: {v}\n" for k, v in TINY.items()))
    r = CliRunner()
    res = r.invoke(mapsr_app, ["fit", "--image", str(geo / "naip.tif"), "--coarse", str(geo / "nlcd.tif"),
                               "--classes", str(geo / "classes.yaml"), "-e", str(enc_yaml), "-o", str(geo / "m.pt"),
                               "--probe-steps", "30", "--shifts", "2", "--color-feature", "0.5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((geo / "m.pt.json").read_text())["config"]
    assert cfg["shifts"] == 2 and cfg["color_feature"] == 0.5
    base = ["predict", "-m", str(geo / "m.pt"), "--image", str(geo / "naip.tif"), "--no-refine", "--device", "cpu"]
    res = r.invoke(mapsr_app, base + ["-o", str(geo / "p.tif"), "--prior", "10", "--coarse", str(geo / "nlcd.tif")])
    assert res.exit_code == 0, res.output
    lab = IO.coarse_on_grid(geo / "nlcd.tif", IO.read_image(geo / "naip.tif")[1], IO.ClassMap.load(geo / "classes.yaml"))
    with rasterio.open(geo / "p.tif") as b:
        out = b.read(1).astype(int) - 1
    assert np.array_equal(out[lab >= 0], lab[lab >= 0])
    res = r.invoke(mapsr_app, base + ["-o", str(geo / "q.tif"), "--prior", "0.5"])
    assert res.exit_code == 2 and "--prior needs --coarse" in res.output
    assert len(res.output.strip().splitlines()) == 1
