"""model/crossscale/features.py: the feature cache (schema, values, resume, rank splitting, text)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gl10m.model import _compat  # noqa: E402

try:  # timm only through model._compat
    _compat.import_timm()
except _compat.DependencyError as e:  # pragma: no cover
    pytest.skip(str(e), allow_module_level=True)

from gl10m import data  # noqa: E402
from gl10m.errors import UserError  # noqa: E402
from gl10m.model import encoders as E  # noqa: E402
from gl10m.model.crossscale import features as F  # noqa: E402
from tests.fixtures.samples import build_shards  # noqa: E402

TINY = dict(backend="vit", width=32, depth=1, heads=2, patch=8, hr_size=32, lr_size=80, pool=2, embed_dim=16)
D, EMB, GL, G = 32, 16, 10, 2
SHAPES = {"lr_tokens": ((GL, GL, D), torch.float16), "hr_tokens": ((100, G, G, D), torch.float16),
          "hr_embed": ((100, EMB), torch.float16), "lr_embed": ((EMB,), torch.float16),
          "s_vis": ((100,), torch.float32), "labels": ((66,), torch.uint8), "tile_frac": ((100, 66), torch.float16)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    sd = build_shards(root, n_train=6, n_val=2, max_bytes=2_500_000)  # several source shards per split
    torch.manual_seed(0)
    enc, _ = E.build_encoder(TINY)
    E.save_encoder(enc, root / "enc", text_raw=E.TextEncoder().concepts(E.concept_labels()),
                   labels=E.concept_labels())
    out = root / "features"
    per = F.sample_bytes(enc.dims(), 66)
    summary = F.write_features(sd, out, root / "enc", batch_size=3, shard_mb=2.5 * per / 2 ** 20)
    return sd, out, root / "enc", summary


def source_items(sd, split, tile_px=None):
    return {it["key"]: it for it in data.load(sd, split=split, tiles="all", decode_meta=False, tile_px=tile_px)}


def test_schema_and_values(env):
    sd, out, enc_dir, summary = env
    meta = json.loads((out / "features.json").read_text())
    assert meta["dims"] == {"D": D, "E": EMB, "Gl": GL, "g": G, "hr_grid": 4}
    assert meta["templates"] == list(E.DEFAULT_TEMPLATES) and len(meta["labels"]) == 66
    assert summary["splits"]["train"]["samples"] == 6 and summary["splits"]["val"]["samples"] == 2
    assert summary["splits"]["train"]["shards"] == 3  # 2 samples a feature shard under that shard_mb
    for tar in (out / "train").glob("*.tar"):  # members are {key}.{field}.npy, nothing else
        with tarfile.open(tar) as t:
            names = t.getnames()
        assert names and all(n.split(".", 1)[1][:-4] in F.FIELDS and n.endswith(".npy") for n in names)
    enc, _ = E.load_encoder(enc_dir)
    for split in ("train", "val"):
        src = source_items(sd, split, enc.tile_px)     # the tiles as the cache reads them
        got = list(F.FeatureDataset(out, split, rank=0, world_size=1))
        assert sorted(g["key"] for g in got) == sorted(src)
        for item in got:
            assert set(item) == {"key", *F.FIELDS}
            for k, (shape, dt) in SHAPES.items():
                assert tuple(item[k].shape) == shape and item[k].dtype == dt, k
            s = src[item["key"]]
            assert torch.equal(item["labels"], s["labels"]) and torch.equal(item["tile_frac"], s["tile_frac"])
            with torch.no_grad():  # values are the encoder's, tile by tile
                pooled, emb, dense = enc.encode_hr(s["hr"][[0, 57]])
                tok, lemb = enc.encode_lr(s["lr"][None])
            torch.testing.assert_close(item["hr_tokens"][[0, 57]].float(), pooled, atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(item["hr_embed"][[0, 57]].float(), emb, atol=2e-3, rtol=1e-2)
            torch.testing.assert_close(item["lr_tokens"].float(), tok[0], atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(item["lr_embed"].float(), lemb[0], atol=2e-3, rtol=1e-2)
            torch.testing.assert_close(item["s_vis"][[0, 57]], enc.saliency(dense), atol=1e-4, rtol=1e-3)
            assert item["s_vis"].std() > 0  # tiles differ
    text = F.load_text(out)
    assert text.shape == (66, EMB) and text.dtype == torch.float16
    torch.testing.assert_close(text.float().norm(dim=-1), torch.ones(66), atol=2e-3, rtol=0)
    assert np.linalg.matrix_rank(text.float().numpy()) == EMB  # distinct concepts


def test_collate_and_dataloader_workers(env):
    _, out, _, _ = env
    ds = F.FeatureDataset(out, "train", rank=0, world_size=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=F.collate_features)
    batches = list(dl)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6
    b = batches[0]
    assert b["hr_tokens"].shape[1:] == (100, G, G, D) and b["labels"].shape[1:] == (66,)


@pytest.mark.parametrize("shuffle", [0, 3])
def test_every_key_once_over_two_ranks(env, shuffle):
    _, out, _, _ = env
    for split, n in (("train", 6), ("val", 2)):  # val: fewer shards than consumers -> sample rule
        per_rank = [[it["key"] for it in F.FeatureDataset(out, split, shuffle=shuffle, seed=1, rank=r, world_size=2)]
                    for r in range(2)]
        allk = per_rank[0] + per_rank[1]
        assert len(allk) == n and len(set(allk)) == n
        assert all(per_rank)


def test_shuffle_is_seeded(env):
    _, out, _, _ = env

    def keys(seed, epoch=0):
        ds = F.FeatureDataset(out, "train", shuffle=4, seed=seed, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return [it["key"] for it in ds]

    assert keys(3) == keys(3)
    assert sorted(keys(3)) == sorted(keys(0, 1))
    assert len({tuple(keys(s)) for s in range(6)}) > 1


def test_resume_skips_done_shards(env):
    sd, out, enc_dir, _ = env
    shards = sorted((out / "train").glob("*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    per = json.loads((out / "features.json").read_text())["shard_mb"]
    s = F.write_features(sd, out, enc_dir, batch_size=3, shard_mb=per)
    assert s["splits"]["train"] == {"shards": 3, "written": 0, "skipped": 3, "samples": 0}
    victim = shards[1]
    before = victim.read_bytes()
    victim.unlink()
    s = F.write_features(sd, out, enc_dir, split="train", batch_size=2, shard_mb=per)
    assert s["splits"]["train"]["written"] == 1 and s["splits"]["train"]["samples"] == 2
    assert victim.read_bytes() == before  # deterministic, batch size does not matter
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != victim)
    assert not list(out.rglob(".*.tmp*"))
    # another encoder into the same folder is refused; a plan change too
    with pytest.raises(UserError):
        F.write_features(sd, out, {**TINY, "pool": 1}, shard_mb=per)
    with pytest.raises(UserError):
        F.write_features(sd, out, enc_dir, shard_mb=per * 2)


def test_cli_features_from_yaml_config(env, tmp_path):
    sd, _, _, _ = env
    cfg = tmp_path / "enc.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"encoder": TINY}))
    lines = []
    s = F.cli_features(sd, tmp_path / "o", cfg, split="train", batch_size=2, num_workers=2, echo=lines.append)
    assert s["splits"] == {"train": {"shards": 1, "written": 1, "skipped": 0, "samples": 6}}
    assert any(line.startswith("train: 1 shards") for line in lines)
    keys = [it["key"] for it in F.FeatureDataset(tmp_path / "o", "train", rank=0, world_size=1)]
    assert sorted(keys) == sorted(source_items(sd, "train"))
    with pytest.raises(UserError):
        F.write_features(sd, tmp_path / "p", cfg, num_workers=-1)


def test_bad_inputs(env, tmp_path):
    sd, out, enc_dir, _ = env
    with pytest.raises(UserError):
        F.FeatureDataset(out, "test")
    with pytest.raises(UserError):
        F.FeatureDataset(tmp_path, "train")
    with pytest.raises(UserError):
        F.FeatureDataset(out, "train", rank=2, world_size=2)
    with pytest.raises(UserError):
        F.write_features(tmp_path, tmp_path / "o", enc_dir)
    with pytest.raises(UserError):
        F.write_features(sd, tmp_path / "o", enc_dir, split="nope")
    with pytest.raises(UserError):
        F.load_text(tmp_path)
