"""model/encoders.py + model/crossscale/pretrain.py + model/_compat.py: shapes, normalisation, saliency,
text embeddings, the bootstrap SigLIP training, save/load."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from gl10m.model import _compat  # noqa: E402

try:  # timm only through model._compat (it shims torchvision where needed)
    _compat.import_timm()
except _compat.DependencyError as e:  # pragma: no cover - timm not installed
    pytest.skip(str(e), allow_module_level=True)

from gl10m import samples as smp, shards  # noqa: E402
from gl10m.errors import UserError  # noqa: E402
from gl10m.model import encoders as E  # noqa: E402
from gl10m.model.crossscale import pretrain as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backend="vit", width=48, depth=2, heads=2, patch=8, hr_size=64, lr_size=80, pool=2, embed_dim=32)


def tiny(**kw):
    torch.manual_seed(0)
    enc, _ = E.build_encoder({**TINY, **kw})
    return enc


def rand_u8(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 268, 268), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def text_encoder():
    return E.TextEncoder()


# -- compat ------------------------------------------------------------------------------------
def test_compat_shim_only_when_torchvision_fails_natively():
    _compat.import_timm()
    code = ("import sys\ntry:\n import torchvision\nexcept RuntimeError as e:\n"
            " sys.exit(3 if 'torchvision::nms does not exist' in str(e) else 4)\n")
    rc = subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode
    assert rc in (0, 3)
    assert _compat._SHIMMED == (rc == 3)
    import torchvision.transforms  # noqa: F401  (works either way once shimmed)


# -- shapes, alignment, normalisation --------------------------------------------------------
@pytest.mark.parametrize("lr_size,per_tile", [(80, 1), (160, 2)])
def test_shapes_and_tile_alignment(lr_size, per_tile):
    enc = tiny(lr_size=lr_size)
    x = rand_u8(3)
    with torch.no_grad():
        pooled, emb, dense = enc.encode_hr(x)
        tok, lemb = enc.encode_lr(x)
    assert pooled.shape == (3, 2, 2, 48) and dense.shape == (3, 8, 8, 48) and emb.shape == (3, 32)
    gl = 10 * per_tile
    assert tok.shape == (3, gl, gl, 48) and lemb.shape == (3, 32)
    assert enc.dims() == {"D": 48, "E": 32, "Gl": gl, "g": 2, "hr_grid": 8}
    # pooled = mean of each quadrant of the dense grid
    torch.testing.assert_close(pooled[:, 0, 1], dense[:, :4, 4:].mean((1, 2)))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(lemb.norm(dim=-1), torch.ones(3))
    # channels-last views (as gl10m.data yields them) give the same result
    with torch.no_grad():
        tok2, _ = enc.encode_lr(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
    torch.testing.assert_close(tok2, tok)


@pytest.mark.parametrize("lr_size,k", [(80, 1), (160, 2)])
def test_lr_tokens_are_tile_aligned(lr_size, k):
    """With no transformer blocks each token sees only its own patch: changing the inside of HR
    tile (r, c) in the LR image changes exactly the k x k LR tokens of that tile."""
    enc = tiny(lr_size=lr_size, depth=1)
    enc.backbone.blocks = torch.nn.Sequential()  # patch embedding + positions + norm only
    x = rand_u8(1, seed=4)
    y = x.clone()
    r, c = 3, 7
    px = 268 / 10
    rows = slice(int(r * px) + 4, int((r + 1) * px) - 4)
    cols = slice(int(c * px) + 4, int((c + 1) * px) - 4)
    y[..., rows, cols] = 255 - y[..., rows, cols]
    with torch.no_grad():
        diff = (enc.encode_lr(x)[0] - enc.encode_lr(y)[0]).abs().amax(-1)[0]
    changed = (diff > 1e-5).nonzero().tolist()
    assert changed == [[r * k + i, c * k + j] for i in range(k) for j in range(k)]


@pytest.mark.parametrize("bad", [dict(lr_size=72), dict(hr_size=60), dict(pool=9), dict(backend="nope"),
                                 dict(widht=3), dict(templates=["no label here"]), dict(weights="/nonexistent.pth"),
                                 dict(backend="timm", model="")])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        E.build_encoder({**TINY, **bad})


def test_uint8_is_normalised_inside():
    enc = tiny()
    x = rand_u8(2, seed=1)
    with torch.no_grad():
        _, _, dense = enc.encode_hr(x)
        f = x.float() / 255
        f = torch.nn.functional.interpolate(f, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        f = (f - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = enc.backbone.forward_features(f)[:, enc.n_prefix:].reshape(2, 8, 8, 48)
    torch.testing.assert_close(dense, ref)
    with pytest.raises(UserError):
        enc.encode_hr(x.float())


def test_tile_px_asks_readers_for_tiles_no_larger_than_needed():
    """An encoder at hr_size < 268 names it (readers decode at 67 px for 64); at 268 none; and a
    67 px tile encodes close to the 268 px one it was scaled from (the resize goes to hr_size
    either way), much closer than another tile does."""
    enc = tiny()
    assert enc.tile_px == enc.cfg.hr_size == 64
    assert E.TileEncoder(E.EncoderConfig.from_dict({**enc.cfg.to_dict(), "hr_size": 268, "patch": 4, "lr_size": 40,
                                                    "pool": 1})).tile_px is None
    x = rand_u8(2, seed=3)
    small = torch.nn.functional.interpolate(x.float(), size=(67, 67), mode="area").round().to(torch.uint8)
    with torch.no_grad():
        a, b = enc.encode_hr(x)[0], enc.encode_hr(small)[0]
        other = enc.encode_hr(rand_u8(2, seed=4))[0]
    assert a.shape == b.shape
    assert (a - b).norm() < 0.5 * (a - other).norm()


def test_svis_textured_above_flat():
    enc = tiny()
    rng = np.random.default_rng(0)
    flat = np.stack([np.full((3, 268, 268), v, np.uint8) for v in (30, 128, 220)])
    yy, xx = np.mgrid[0:268, 0:268]
    checker = (((yy // 17 + xx // 17) % 2) * 255).astype(np.uint8)
    textured = np.stack([rng.integers(0, 256, (3, 268, 268)).astype(np.uint8), np.stack([checker] * 3),
                         np.stack([checker, 255 - checker, checker])])
    with torch.no_grad():
        s_flat = enc.saliency(enc.encode_hr(torch.from_numpy(flat))[2])
        s_tex = enc.saliency(enc.encode_hr(torch.from_numpy(textured))[2])
    assert s_flat.dtype == torch.float32 and s_flat.shape == (3,)
    assert s_tex.min() > 2 * s_flat.max(), (s_tex, s_flat)
    # identical tokens -> exactly zero variety
    assert float(E.saliency_variety(torch.ones(1, 4, 4, 8))) == pytest.approx(0.0, abs=1e-6)


def test_text_embeddings_normalised_and_distinct(text_encoder):
    labels = E.concept_labels()
    assert len(labels) == 66
    raw = text_encoder.concepts(labels)
    assert raw.shape == (66, 384)
    torch.testing.assert_close(raw.norm(dim=-1), torch.ones(66), atol=1e-4, rtol=0)
    sim = raw @ raw.t()
    off = sim[~torch.eye(66, dtype=torch.bool)]
    assert off.max() < 0.98
    enc = tiny()
    with torch.no_grad():
        t = enc.encode_text(raw)
    assert t.shape == (66, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(66))
    # related prompts are closer than unrelated ones: the real MiniLM, not noise
    e = text_encoder.embed(["a satellite image of a forest.", "an aerial photo of woods and trees.",
                            "a satellite image of a parking lot."])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


# -- save / load --------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    enc = tiny()
    raw = torch.randn(5, 384)
    E.save_encoder(enc, tmp_path / "enc", text_raw=raw, labels=list("abcde"))
    enc2, info = E.load_encoder(tmp_path / "enc")
    x = rand_u8(2, seed=3)
    with torch.no_grad():
        for a, b in zip(enc.eval().encode_hr(x) + enc.encode_lr(x), enc2.encode_hr(x) + enc2.encode_lr(x)):
            assert torch.equal(a, b)
        assert torch.equal(enc.encode_text(raw), enc2.encode_text(info["text_raw"]))
    assert info["labels"] == list("abcde") and info["dims"]["Gl"] == 10
    (tmp_path / "enc" / "encoder.pt").write_bytes(b"garbage")
    with pytest.raises(UserError):
        E.load_encoder(tmp_path / "enc")
    with pytest.raises(UserError):
        E.load_encoder(tmp_path / "nothing")


def test_timm_backend_loads_weights_from_local_file_only(tmp_path):
    cfg = dict(backend="timm", model="vit_tiny_patch16_224", patch=16, hr_size=64, lr_size=160, embed_dim=16)
    torch.manual_seed(1)
    a, _ = E.build_encoder(cfg)
    path = tmp_path / "w.pth"
    torch.save(a.backbone.state_dict(), path)
    torch.manual_seed(2)
    b, _ = E.build_encoder({**cfg, "weights": str(path)})
    c, _ = E.build_encoder(cfg)  # random init, differs
    x = rand_u8(1)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_hr(x)[2], b.encode_hr(x)[2])
        assert not torch.allclose(a.encode_hr(x)[2], c.encode_hr(x)[2])
        assert c.encode_lr(x)[0].shape == (1, 10, 10, 192)
    with pytest.raises(UserError):
        E.build_encoder({**cfg, "patch": 14, "hr_size": 56, "lr_size": 140})


# -- open_clip backend ---------------------------------------------------------------------------
CLIP_TINY = dict(backend="open_clip", name="ViT-S-32", patch=32, hr_size=64, lr_size=320, embed_dim=384)


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def clip_enc():
    try:
        _compat.import_open_clip()
    except _compat.DependencyError as e:  # pragma: no cover - open-clip-torch not installed
        pytest.skip(str(e))
    torch.manual_seed(0)
    return E.build_encoder(CLIP_TINY)[0]


def test_open_clip_shapes_embeddings_and_text(clip_enc, no_network):
    enc = clip_enc
    assert enc.cfg.model == "ViT-S-32" and enc.cfg.mean == E.CLIP_MEAN and not hasattr(enc, "hr_head")
    x = rand_u8(2)
    with torch.no_grad():
        pooled, emb, dense = enc.encode_hr(x)
        tok, lemb = enc.encode_lr(x)
        # the HR embedding is CLIP's image projection of the mean patch token (after ln_post), the
        # same map embed_tokens applies to pooled (observed or predicted) tokens -- not the CLS token
        ref = enc.embed_tokens(pooled)
        cls = enc.backbone.encode_image(enc._prep(x, 64), normalize=True)
        ref_lr = torch.nn.functional.normalize(tok.mean((1, 2)) @ enc.backbone.visual.proj, dim=-1)
        raw = enc.text_raw(["a forest", "a parking lot", "water"])
        txt = enc.encode_text(raw)
    assert pooled.shape == (2, 2, 2, 384) and dense.shape == (2, 2, 2, 384) and emb.shape == (2, 384)
    assert tok.shape == (2, 10, 10, 384) and lemb.shape == (2, 384)
    assert enc.dims() == {"D": 384, "E": 384, "Gl": 10, "g": 2, "hr_grid": 2}
    torch.testing.assert_close(emb, ref)
    torch.testing.assert_close(lemb, ref_lr)
    assert not torch.allclose(emb, cls, atol=1e-3)
    for e in (emb, lemb, txt):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(e)))
    assert raw.shape == (3, len(E.DEFAULT_TEMPLATES), 77) and not raw.dtype.is_floating_point
    assert txt.shape == (3, enc.embed_dim) and (emb @ txt.t()).shape == (2, 3)  # one CLIP space
    assert enc.saliency(dense).shape == (2,)
    with pytest.raises(UserError):  # MiniLM embeddings are not CLIP text
        enc.encode_text(torch.randn(3, 384))


def test_hr_embedding_is_embed_tokens_of_the_pooled_tokens():
    """Every backend embeds an observed tile exactly as it embeds predicted tokens."""
    torch.manual_seed(0)
    enc = E.build_encoder(dict(backend="vit", width=32, depth=1, heads=2, patch=8, hr_size=48, lr_size=80,
                               pool=2, embed_dim=16))[0]
    with torch.no_grad():
        pooled, emb, _ = enc.encode_hr(rand_u8(3))
        torch.testing.assert_close(emb, enc.embed_tokens(pooled))


def test_open_clip_lr_tokens_are_tile_aligned(clip_enc):
    import copy

    enc = copy.deepcopy(clip_enc)
    enc.backbone.visual.transformer.resblocks = torch.nn.ModuleList()  # embedding + positions + norms only
    x = rand_u8(1, seed=4)
    y = x.clone()
    r, c = 6, 2
    px = 268 / 10
    y[..., int(r * px) + 4:int((r + 1) * px) - 4, int(c * px) + 4:int((c + 1) * px) - 4] ^= 255
    with torch.no_grad():
        diff = (enc.encode_lr(x)[0] - enc.encode_lr(y)[0]).abs().amax(-1)[0]
    assert (diff > 1e-5).nonzero().tolist() == [[r, c]]


def test_open_clip_weights_from_local_file_and_save_load(clip_enc, tmp_path, no_network):
    path = tmp_path / "clip.pt"
    torch.save(clip_enc.backbone.state_dict(), path)
    torch.manual_seed(5)
    b, _ = E.build_encoder({**CLIP_TINY, "weights": str(path)})
    torch.manual_seed(6)
    c, _ = E.build_encoder(CLIP_TINY)  # random init, differs
    x = rand_u8(1, seed=2)
    with torch.no_grad():
        raw = clip_enc.text_raw(["a forest"])
        for a_, b_ in zip(clip_enc.encode_hr(x) + clip_enc.encode_lr(x), b.encode_hr(x) + b.encode_lr(x)):
            assert torch.equal(a_, b_)
        assert torch.equal(clip_enc.encode_text(raw), b.encode_text(raw))
        assert not torch.allclose(clip_enc.encode_hr(x)[1], c.encode_hr(x)[1])
    E.save_encoder(b, tmp_path / "enc", text_raw=raw, labels=["a forest"])
    d, info = E.load_encoder(tmp_path / "enc")
    assert torch.equal(info["text_raw"], raw)
    with torch.no_grad():
        assert torch.equal(d.encode_lr(x)[1], b.encode_lr(x)[1])
        assert torch.equal(d.encode_text(info["text_raw"]), b.encode_text(raw))


@pytest.mark.parametrize("bad", [dict(embed_dim=256), dict(patch=16, hr_size=64, lr_size=160), dict(name="nope-B-32"),
                                 dict(name="hf-hub:laion/CLIP-ViT-B-32"), dict(name=""), dict(lr_size=288),
                                 dict(model="ViT-B-32")])
def test_open_clip_bad_config(bad, clip_enc):  # clip_enc: skips without open-clip-torch
    with pytest.raises(UserError):
        E.build_encoder({**CLIP_TINY, **bad})


# -- the bootstrap ------------------------------------------------------------------------------
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float32)


def colour_sample(key: str, seed: int) -> tuple[smp.Sample, np.ndarray]:
    """Tiles of three textured colour classes; concept k covers 0.9 of the tiles of class k."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, 100)
    hr = np.empty((100, 268, 268, 3), np.uint8)
    for i in range(100):
        noise = rng.normal(0, 25, (268 // 4, 268 // 4, 1)).repeat(4, 0).repeat(4, 1)
        hr[i] = np.clip(COLOURS[cls[i]] + noise, 0, 255).astype(np.uint8)
    frac = np.zeros((100, 66), np.float16)
    frac[np.arange(100), cls] = 0.9
    frac[:, 10] = rng.uniform(0, 0.05, 100)  # below the threshold: negative everywhere
    labels = (frac.max(0) >= 0.1).astype(np.uint8)
    lr = hr.reshape(10, 10, 268, 268, 3)[:, :, ::10, ::10].transpose(0, 2, 1, 3, 4).reshape(270, 270, 3)[:268, :268]
    return smp.Sample(key=key, split="train", lr=np.ascontiguousarray(lr), hr=hr, labels=labels, tile_frac=frac,
                      meta={"n": seed}), cls


@pytest.fixture(scope="module")
def colour_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    entries, classes = [], {}
    for i in range(4):
        s, cls = colour_sample(f"CA-c{i}", i)
        classes[s.key] = cls
        entries.append(shards.Entry(s.key, "train", "CA", smp.write_staged(root, s)))
    shards.build(entries, root / "shards")
    return root / "shards", classes


def test_bootstrap_loss_falls_and_learns_concepts(colour_shards, text_encoder, tmp_path):
    sd, classes = colour_shards
    # pos_threshold 0.1 (the default counts any presence, 1e-4): concept 10's 0-5 % of every tile
    # must then be a negative everywhere
    cfg = {"encoder": TINY, "train": dict(steps=40, batch_size=4, tiles_per_scene=8, lr=2e-3, seed=0, shuffle=0,
                                           weight_decay=0.0, pos_threshold=0.1)}
    path = P.pretrain_encoder(sd, tmp_path / "boot", cfg, text_encoder=text_encoder)
    assert path == tmp_path / "boot" / "encoder.pt"
    import json

    log = json.loads((tmp_path / "boot" / "pretrain_log.json").read_text())
    assert len(log) == 40
    first = np.mean([r["loss_hr"] for r in log[:5]])
    last = np.mean([r["loss_hr"] for r in log[-5:]])
    assert last < 0.7 * first, (first, last)
    enc, info = E.load_encoder(path)
    assert info["labels"] == E.concept_labels() and info["train"]["steps"] == 40
    # the trained embeddings rank the right concept first among the three colour concepts
    from gl10m import data

    ds = data.load(sd, split="train", tiles="all", decode_meta=False)
    with torch.no_grad():
        txt = enc.encode_text(info["text_raw"])[:3]
        hits = tot = 0
        for item in ds:
            _, emb, _ = enc.encode_hr(item["hr"])
            pred = (emb @ txt.t()).argmax(1).numpy()
            hits += int((pred == classes[item["key"]]).sum())
            tot += 100
    assert hits / tot > 0.9, hits / tot


def test_cli_pretrain_overrides(colour_shards, text_encoder, tmp_path, monkeypatch):
    sd, _ = colour_shards
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"encoder": TINY, "train": {"steps": 99, "batch_size": 2, "tiles_per_scene": 2}}))
    monkeypatch.setattr(P, "TextEncoder", lambda: text_encoder)
    lines = []
    path = P.cli_pretrain_encoder(sd, tmp_path / "o", cfg, steps=2, seed=5, echo=lines.append)
    _, info = E.load_encoder(path)
    assert info["train"]["steps"] == 2 and info["train"]["seed"] == 5 and info["train"]["batch_size"] == 2
    assert lines[-1] == f"encoder -> {path}" and lines[0].startswith("step 0: loss ")


def test_pretrain_is_deterministic(colour_shards, text_encoder, tmp_path):
    sd, _ = colour_shards
    cfg = {"encoder": TINY, "train": dict(steps=3, batch_size=2, tiles_per_scene=3, shuffle=4, seed=7)}
    a = P.pretrain_encoder(sd, tmp_path / "a", cfg, text_encoder=text_encoder)
    b = P.pretrain_encoder(sd, tmp_path / "b", cfg, text_encoder=text_encoder)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_config_errors(colour_shards, tmp_path):
    sd, _ = colour_shards
    for bad in ({"train": {"stepz": 3}}, {"train": {"steps": 0}}, {"train": {"pos_threshold": 2}},
                {"encoder": {"lr_size": 90}}, "not a mapping"):
        with pytest.raises(UserError):
            P.pretrain_encoder(sd, tmp_path / "x", bad)


def test_shipped_configs_build():
    for p in sorted((ROOT / "model" / "configs").glob("encoder-*.yaml")):
        d = E.load_config(p)
        cfg = E.EncoderConfig.from_dict(d["encoder"])
        assert cfg.lr_grid % 10 == 0, p
        if "train" in d:
            P._train_cfg(d)


def test_pretraining_never_sees_novel_concepts(colour_shards, text_encoder, tmp_path):
    """With Tennis (concept 0, positive on a third of the tiles) held out, neither its text nor its
    labels reach the loss: a run whose Tennis text is replaced by noise trains the same weights."""
    sd, _ = colour_shards
    cfg = {"encoder": TINY, "train": dict(steps=3, batch_size=2, tiles_per_scene=2, seed=0, shuffle=0)}

    class Noisy:
        name = "noisy"

        def concepts(self, labels, templates):
            t = text_encoder.concepts(labels, templates).clone()
            t[0] = torch.nn.functional.normalize(torch.randn(t.shape[1], generator=torch.Generator().manual_seed(9)),
                                                 dim=0)
            return t

    a = P.pretrain_encoder(sd, tmp_path / "a", cfg, text_encoder=text_encoder, novel=["Tennis"])
    b = P.pretrain_encoder(sd, tmp_path / "b", cfg, text_encoder=Noisy(), novel=["0"])
    ea, ia = E.load_encoder(a)
    eb, _ = E.load_encoder(b)
    for (k, va), vb in zip(ea.state_dict().items(), eb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ia["novel"] == [0] and ia["novel_labels"] == ["Tennis"]
    c = P.pretrain_encoder(sd, tmp_path / "c", cfg, text_encoder=Noisy())   # not held out: it is learned
    assert not torch.equal(E.load_encoder(c)[0].text_proj.weight, ea.text_proj.weight)
    assert E.load_encoder(c)[1]["novel"] == []                               # the default profile marks none
    with pytest.raises(UserError, match="not one of"):
        P.pretrain_encoder(sd, tmp_path / "d", cfg, text_encoder=text_encoder, novel=["volcano"])


def test_text_encoder_prints_no_raw_bar_off_a_terminal():
    """Loading MiniLM in a pipeline or log (stderr not a terminal) prints no "Loading weights" bar."""
    r = subprocess.run([sys.executable, "-c", "from gl10m.model.encoders import TextEncoder; TextEncoder()"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "it/s" not in r.stderr, r.stderr
