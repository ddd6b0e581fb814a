"""The feature cache: frozen-encoder features of every scene, as WebDataset shards.

Layout (``OUT`` = ``out_dir``)::

    OUT/features.json                      encoder config, dims, grid sizes, prompt templates,
                                           concept labels, source shards, the shard plan, versions,
                                           novel (the profile's), encoder_novel (held out of the
                                           encoder's pretraining; null when it records none)
    OUT/text.npy                           float16 [C, E] concept text embeddings (templates
                                           averaged, L2-normalised)
    OUT/{split}/feat-{split}-NNNNNN.tar    members "{key}.{field}.npy" (np.save, no pickle):

      lr_tokens  float16 [Gl, Gl, D]      LR patch tokens (Gl a multiple of 10)
      hr_tokens  float16 [100, g, g, D]   each HR tile's tokens average-pooled to g x g
      hr_embed   float16 [100, E]         each tile's vision-language embedding
      lr_embed   float16 [E]              the LR image's vision-language embedding
      s_vis      float32 [100]            structural saliency per tile
      labels     uint8 [66]               copied from the sample
      tile_frac  float16 [100, 66]        copied from the sample

Plan: a split's source shards (manifest order) are grouped, consecutively, so that each feature
shard stays under ``shard_mb`` (the per-sample size is exact from the dims); feature shard ``j``
holds the samples of group ``j`` in source order. Each shard is written atomically, so a rerun
with ``resume=True`` skips the shards already there. A rerun with another encoder or plan into
the same folder is refused.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from gl10m.errors import UserError
from gl10m.model.encoders import TextEncoder, TileEncoder, build_encoder, concept_labels
from gl10m.samples import N_TILES
from gl10m.samples import encode_npy as _npy

FIELDS = ("lr_tokens", "hr_tokens", "hr_embed", "lr_embed", "s_vis", "labels", "tile_frac")
META_NAME = "features.json"
TEXT_NAME = "text.npy"
SHARD_NAME = "feat-{split}-{n:06d}.tar"
FORMAT = "gl10m-features/1"
_HR_CHUNK = 256  # HR tiles per forward pass


class FeatureError(UserError, ValueError):
    """A feature cache that cannot be written or read."""


def _member_bytes(nbytes: int) -> int:
    """Tar bytes of an .npy member of `nbytes` data (128-byte npy header, 512 tar header, padding)."""
    n = nbytes + 128
    return 512 + n + (-n % 512)


def sample_bytes(dims: dict, n_concepts: int) -> int:
    d, e, gl, g = dims["D"], dims["E"], dims["Gl"], dims["g"]
    n = N_TILES
    sizes = [gl * gl * d * 2, n * g * g * d * 2, n * e * 2, e * 2, n * 4, n_concepts, n * n_concepts * 2]
    return sum(_member_bytes(s) for s in sizes)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _source_plan(shards_dir: Path, splits: Sequence[str] | None) -> dict[str, list[tuple[str, int]]]:
    """{split: [(shard name, samples), ...]} in manifest order."""
    from gl10m.shards import INDEX_NAME, MANIFEST_NAME, read_index

    mf = shards_dir / MANIFEST_NAME
    try:
        manifest = json.loads(mf.read_text())
        listed = manifest["shards"]
    except FileNotFoundError:
        raise FeatureError(f"{shards_dir}: not a shards folder (no {MANIFEST_NAME})") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FeatureError(f"{mf}: not a gl10m manifest ({e})") from None
    if splits is None:
        splits = sorted(listed)
    for s in splits:
        if s not in listed:
            raise FeatureError(f"{shards_dir}: no split {s!r}; it has {', '.join(sorted(listed))}")
    counts: dict[str, int] = {}
    if (shards_dir / INDEX_NAME).exists():
        df = read_index(shards_dir / INDEX_NAME)
        counts = df.groupby("shard").size().to_dict()
    out = {}
    for s in splits:
        names = [e.get("name") if isinstance(e, dict) else e for e in listed[s]]
        out[s] = [(n, int(counts.get(n, 1))) for n in names]
    return out


def _versions() -> dict:
    import gl10m

    v = {"torch": torch.__version__, "numpy": np.__version__, "gl10m": getattr(gl10m, "__version__", None)}
    try:
        import timm

        v["timm"] = timm.__version__
    except Exception:  # pragma: no cover - timm import is guaranteed once an encoder exists
        pass
    return v


@torch.inference_mode()
def encode_batch(enc: TileEncoder, lr: torch.Tensor, hr: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """lr uint8 [B, 3, 268, 268], hr uint8 [B, 100, 3, 268, 268] -> {field: [B, ...] numpy} (no labels)."""
    b, n = hr.shape[:2]
    amp = device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        lr_tok, lr_emb = enc.encode_lr(lr.to(device))
        flat = hr.reshape(b * n, *hr.shape[2:])
        pooled, embed, svis = [], [], []
        for i in range(0, b * n, _HR_CHUNK):
            p, e, dense = enc.encode_hr(flat[i:i + _HR_CHUNK].to(device))
            pooled.append(p.float())
            embed.append(e.float())
            svis.append(enc.saliency(dense.float()))
    g, d = pooled[0].shape[1], pooled[0].shape[-1]

    def f16(t):
        return t.float().cpu().numpy().astype(np.float16)

    return {"lr_tokens": f16(lr_tok), "lr_embed": f16(lr_emb),
            "hr_tokens": f16(torch.cat(pooled).reshape(b, n, g, g, d)),
            "hr_embed": f16(torch.cat(embed).reshape(b, n, -1)),
            "s_vis": torch.cat(svis).float().cpu().numpy().reshape(b, n).astype(np.float32)}


def _novel_ids(profile: str | os.PathLike | None, labels: Sequence[str]) -> list[int]:
    """The concepts the profile marks ``novel: true`` (held out of stage II), as label indices;
    empty when the labels are not the profile's."""
    from gl10m import profile as prof_mod

    prof = prof_mod.load(profile)
    ordered = sorted(prof.concepts, key=lambda c: c.id)
    if [c.label for c in ordered] != list(labels):
        return []
    return [i for i, c in enumerate(ordered) if c.novel]


def write_features(shards_dir: str | os.PathLike, out_dir: str | os.PathLike, encoder: Any, *,
                   split: str | Sequence[str] | None = None, batch_size: int = 8, device: str = "cpu",
                   shard_mb: float = 256, resume: bool = True, num_workers: int = 0,
                   labels: Sequence[str] | None = None,
                   profile: str | os.PathLike | None = None, progress=None,
                   text_encoder: TextEncoder | None = None) -> dict:
    """Encode every scene of ``shards_dir`` (one split, a list, or all) into the feature cache
    ``out_dir``. ``encoder``: a :class:`TileEncoder`, a saved encoder folder / ``encoder.pt``, or
    a config (YAML path or dict). Concept labels: ``labels``, else the saved encoder's, else the
    profile's. ``num_workers``: DataLoader workers decoding the source shards (the samples' order
    inside a feature shard then follows the workers' interleaving). Returns a summary: per split shards written / skipped and samples encoded."""
    from gl10m import data
    from gl10m.io import atomic_write_bytes, atomic_write_text
    from gl10m.shards import pack, write_shard

    t0 = time.time()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FeatureError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise FeatureError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if not shard_mb or float(shard_mb) <= 0:
        raise FeatureError(f"shard_mb must be positive, got {shard_mb!r}")
    src = Path(shards_dir)
    out = Path(out_dir)
    dev = torch.device(device)
    if isinstance(encoder, TileEncoder):
        enc, info = encoder.to(dev).eval(), {"encoder": encoder.cfg.to_dict(), "text_raw": None, "labels": None}
        source_desc = "TileEncoder object"
    else:
        enc, info = build_encoder(encoder, device=device)
        source_desc = str(encoder) if isinstance(encoder, (str, os.PathLike)) else "config"
    labels = list(labels) if labels else (info.get("labels") or concept_labels(profile))
    dims = enc.dims()
    per_sample = sample_bytes(dims, len(labels))
    splits = [split] if isinstance(split, str) else (list(split) if split is not None else None)
    plan = _source_plan(src, splits)
    groups = {s: pack([(name, n * per_sample) for name, n in v], int(float(shard_mb) * 2 ** 20))
              for s, v in plan.items()}
    fingerprint = {"format": FORMAT, "encoder": enc.cfg.to_dict(), "dims": dims, "labels": labels,
                   "source": str(src.resolve()), "shard_mb": float(shard_mb)}

    meta_path = out / META_NAME
    old = None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = None
    if resume and old is not None:
        for k, v in fingerprint.items():
            if old.get(k) != v:
                raise FeatureError(f"{out}: holds features made with another {k}; use a new folder or resume=False")
    merged_groups = dict((old or {}).get("groups", {})) if resume else {}
    for s, g in groups.items():
        if resume and s in merged_groups and merged_groups[s] != g:
            raise FeatureError(f"{out}: split {s!r} was planned from other source shards; use resume=False")
        merged_groups[s] = g
    meta = {**fingerprint, "templates": list(enc.cfg.templates), "encoder_source": source_desc,
            "novel": _novel_ids(profile, labels),
            # what the encoder held out of its pretraining (None: not recorded): the sampler's s_gain
            # and stage II hold out the same concepts by default
            "encoder_novel": (list(info["novel"]) if info.get("novel") is not None and info.get("labels") == labels
                              else None),
            "fields": {"lr_tokens": ["float16", [dims["Gl"], dims["Gl"], dims["D"]]],
                       "hr_tokens": ["float16", [N_TILES, dims["g"], dims["g"], dims["D"]]],
                       "hr_embed": ["float16", [N_TILES, dims["E"]]], "lr_embed": ["float16", [dims["E"]]],
                       "s_vis": ["float32", [N_TILES]], "labels": ["uint8", [len(labels)]],
                       "tile_frac": ["float16", [N_TILES, len(labels)]]},
            "saliency": enc.cfg.saliency, "groups": merged_groups, "versions": _versions(),
            "shards": {s: [SHARD_NAME.format(split=s, n=j) for j in range(len(g))] for s, g in merged_groups.items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    text_path = out / TEXT_NAME
    if not (resume and text_path.exists()):
        raw = info.get("text_raw")
        if raw is None or raw.shape[0] != len(labels) or info.get("labels") != labels:
            raw = enc.text_raw(labels, text_encoder)
        with torch.inference_mode():
            txt = enc.encode_text(raw.to(dev)).float().cpu().numpy().astype(np.float16)
        atomic_write_bytes(text_path, _npy(txt))

    summary: dict[str, Any] = {"out": str(out), "splits": {}}
    for s, gs in groups.items():
        st = {"shards": len(gs), "written": 0, "skipped": 0, "samples": 0}
        for j, names in enumerate(gs):
            path = out / s / SHARD_NAME.format(split=s, n=j)
            if resume and path.exists():
                st["skipped"] += 1
                continue
            ds = data.load([str(src / s / n) for n in names], split=s, tiles="all", rank=0, world_size=1,
                           decode_meta=False, tile_px=enc.tile_px)
            dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=data.collate, pin_memory=dev.type == "cuda")

            def samples(dl=dl):
                for batch in dl:
                    hr = batch["hr"]
                    if not isinstance(hr, torch.Tensor) or hr.shape[1] != N_TILES:
                        raise FeatureError(f"{s}: a sample lacks some of its {N_TILES} HR tiles")
                    if batch["labels"].shape[1] != len(labels):
                        raise FeatureError(f"{s}: samples have {batch['labels'].shape[1]} concepts, "
                                           f"the encoder's labels {len(labels)}")
                    feats = encode_batch(enc, batch["lr"], hr, dev)
                    lab = batch["labels"].numpy().astype(np.uint8)
                    frac = batch["tile_frac"].numpy().astype(np.float16)
                    for i, key in enumerate(batch["key"]):
                        f = {k: v[i] for k, v in feats.items()}
                        f.update(labels=lab[i], tile_frac=frac[i])
                        st["samples"] += 1
                        yield key, {f"{k}.npy": _npy(f[k]) for k in FIELDS}

            write_shard(path, samples(), s)
            st["written"] += 1
            if progress is not None:
                progress(s, j, len(gs))
        summary["splits"][s] = st
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_meta(out_dir: str | os.PathLike) -> dict:
    p = Path(out_dir) / META_NAME
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FeatureError(f"{out_dir}: not a feature cache (no {META_NAME})") from None
    except json.JSONDecodeError as e:
        raise FeatureError(f"{p}: not valid JSON ({e})") from None


def load_text(out_dir: str | os.PathLike) -> torch.Tensor:
    """The concept text embeddings, float16 [C, E]."""
    from gl10m.samples import SampleError, decode_npy

    p = Path(out_dir) / TEXT_NAME
    try:
        return torch.from_numpy(decode_npy(p.read_bytes(), str(p)))
    except FileNotFoundError:
        raise FeatureError(f"{out_dir}: no {TEXT_NAME} (not a feature cache?)") from None
    except SampleError as e:
        raise FeatureError(str(e)) from None


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise FeatureError("RANK/WORLD_SIZE must be integers") from None


def _iter_shard(path: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(key, {field: array}) of one feature shard, in tar order; refuses unsafe or foreign members
    (read with :func:`gl10m.shards.iter_tar`'s checks, arrays with :func:`gl10m.samples.decode_npy`)."""
    from gl10m import samples as smp
    from gl10m.shards import ShardError, iter_tar

    key, cur = None, {}
    try:
        with open(path, "rb") as fh:
            for m in iter_tar(fh, path.name):
                if not m.field.endswith(".npy") or m.field[:-4] not in FIELDS:
                    raise FeatureError(f"{path.name}: member {m.key + '.' + m.field!r} is not a feature field")
                if m.key != key:
                    if key is not None:
                        yield key, cur
                    key, cur = m.key, {}
                try:
                    cur[m.field[:-4]] = smp.decode_npy(m.read(), f"{path.name}: member {m.key}.{m.field}")
                except smp.SampleError as e:  # an object array (a pickle) or not an .npy at all
                    raise FeatureError(str(e).splitlines()[0]) from None
    except ShardError as e:
        raise FeatureError(str(e)) from None
    except OSError as e:
        raise FeatureError(f"{path}: cannot read feature shard ({e})") from None
    if key is not None:
        yield key, cur


class FeatureDataset(IterableDataset):
    """The feature cache of one split as dicts of tensors (``key`` + :data:`FIELDS`).

    Splitting over DDP ranks x DataLoader workers (consumers): with at least as many shards as
    consumers, consumer ``c`` reads shards ``c, c + C, ...``; otherwise each reads every shard and
    keeps samples ``c`` modulo ``C``. Every sample is yielded once per epoch over all consumers.
    ``shuffle=K``: shard order permuted by (seed, epoch) and a K-sample buffer; ``set_epoch(e)``.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, *, shuffle: int = 0, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.out = Path(out_dir)
        meta = read_meta(self.out)
        shards = meta.get("shards", {})
        if split not in shards:
            raise FeatureError(f"{out_dir}: no split {split!r} in the feature cache; it has {', '.join(sorted(shards))}")
        self.paths = [self.out / split / n for n in shards[split]]
        missing = [p.name for p in self.paths if not p.exists()]
        if missing:
            raise FeatureError(f"{out_dir}: feature shard {split}/{missing[0]} is missing (run write_features again)")
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise FeatureError(f"shuffle must be a non-negative integer, got {shuffle!r}")
        if (rank is None) != (world_size is None):
            raise FeatureError("give both rank and world_size, or neither")
        self.rank, self.world_size = (rank, world_size) if rank is not None else _rank_world()
        if not 0 <= self.rank < self.world_size:
            raise FeatureError(f"rank {self.rank} / world_size {self.world_size}: need 0 <= rank < world_size")
        self.split, self.shuffle, self.seed, self.epoch = split, shuffle, seed, 0
        self.meta = meta

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        nw, w = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        n_cons, cons = self.world_size * nw, self.rank * nw + w
        order = list(range(len(self.paths)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(order)).tolist()
        if len(order) >= n_cons:
            mine, keep = order[cons::n_cons], None
        else:
            mine, keep = order, cons

        def items():
            pos = 0
            for i in mine:
                for key, f in _iter_shard(self.paths[i]):
                    if keep is None or pos % n_cons == keep:
                        missing = [k for k in FIELDS if k not in f]
                        if missing:
                            raise FeatureError(f"{self.paths[i].name}: sample {key} lacks {missing[0]}")
                        out = {"key": key}
                        out.update({k: torch.from_numpy(f[k]) for k in FIELDS})
                        yield out
                    pos += 1

        if self.shuffle <= 1:
            yield from items()
            return
        rng = np.random.default_rng([self.seed, self.epoch, cons])
        buf: list = []
        for it in items():
            buf.append(it)
            if len(buf) >= self.shuffle:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


def collate_features(batch: Sequence[dict]) -> dict:
    """Stack a list of feature samples: tensors -> [B, ...], ``key`` -> list."""
    if not batch:
        raise FeatureError("collate_features: empty batch")
    out: dict[str, Any] = {"key": [b["key"] for b in batch]}
    for k in FIELDS:
        out[k] = torch.stack([b[k] for b in batch])
    return out


def cli_features(shards: str | os.PathLike, out: str | os.PathLike, encoder: str | os.PathLike, *,
                 split: str | None = None, batch_size: int = 8, device: str = "cpu", shard_mb: float = 256,
                 resume: bool = True, num_workers: int = 0, profile: str | None = None, echo=print) -> dict:
    """``gl10m model features SHARDS OUT --encoder (SAVED_DIR | encoder.pt | CONFIG.yaml) [--split S]
    [--batch-size N] [--device cpu|cuda] [--shard-mb MB] [--num-workers N] [--no-resume] [--profile YAML]``: write
    the feature cache; prints one line per split. Returns :func:`write_features`' summary."""
    s = write_features(shards, out, encoder, split=split, batch_size=batch_size, device=device, shard_mb=shard_mb,
                       resume=resume, num_workers=num_workers, profile=profile,
                       progress=lambda sp, j, n: echo(f"{sp}: feature shard {j + 1}/{n} written"))
    for sp, st in s["splits"].items():
        echo(f"{sp}: {st['shards']} shards ({st['written']} written, {st['skipped']} already there), "
             f"{st['samples']} samples encoded")
    echo(f"features -> {s['out']} ({s['seconds']} s)")
    return s
