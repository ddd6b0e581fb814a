"""``gl10m mapsr fit|predict|eval``: MapSR land-cover map super-resolution from the command line.

A typer sub-app; register it in gl10m/cli.py with::

    from gl10m.model.mapsr.cli import mapsr_app
    app.add_typer(mapsr_app, name="mapsr")

Bad input (a missing file, a raster without CRS, a coarse value not in the class map, an unknown
class name...) exits with status 2 and one line on stderr, no traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from gl10m.errors import UserError

mapsr_app = typer.Typer(
    help="MapSR: turn a coarse land-cover map into a map at the imagery's resolution (frozen encoder "
         "features, a linear probe on the coarse labels, class prompts, cosine matching, graph refinement).",
    no_args_is_help=True, add_completion=False)

TINY_ENCODER = {"backend": "vit", "patch": 4, "hr_size": 32, "lr_size": 40, "width": 64, "depth": 1, "heads": 2}

_ENC_HELP = ("Frozen encoder: a saved encoder folder / encoder.pt, or a YAML config (its encoder: section; "
             "random init unless it names local weights). Random-init encoders are seeded with --seed.")


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device here")
    return device


def _encoder(spec: Optional[str], seed: int, device: str):
    import torch

    from gl10m.model.encoders import build_encoder
    from gl10m.model.mapsr import MapSRError

    torch.manual_seed(seed)  # random-init encoders: the same seed gives the same weights
    if spec is None:
        enc, _ = build_encoder(dict(TINY_ENCODER), device)
        return enc, None
    p = Path(spec)
    if not p.exists():
        raise MapSRError(f"encoder {spec}: no such file or folder")
    enc, _ = build_encoder(p, device)
    return enc, str(p.resolve())


def _refine_cfg(mode, window, k, gamma, alpha, sigma, maxiter, color=0.0):
    from gl10m.model.mapsr.graph import RefineConfig

    from gl10m.model.mapsr import MapSRError
    try:
        return RefineConfig(mode=mode, window=window, k=k, gamma=gamma, alpha=alpha, sigma=sigma,
                            maxiter=maxiter, color=color).resolved()
    except ValueError as e:
        raise MapSRError(f"refinement: {e}") from None


def _pairs(images: List[Path], coarse: List[Path]):
    from gl10m.model.mapsr import MapSRError
    if len(images) != len(coarse):
        raise MapSRError(f"give one --coarse per --image ({len(images)} images, {len(coarse)} coarse maps)")
    return list(zip(images, coarse))


def _shard_scenes(shards: Path, split: Optional[str], max_samples: int, min_frac: float):
    from gl10m import data
    from gl10m.model.mapsr import sample_scene

    ds = data.load(str(shards), split=split, tiles="all")
    for i, s in enumerate(ds):
        if i >= max_samples:
            break
        img, coarse = sample_scene({k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in s.items()}, min_frac)
        yield s, img, coarse


@mapsr_app.command("fit")
def fit_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the fitted model (.pt; a .pt.json beside it)."),
    image: List[Path] = typer.Option([], "--image", help="Image GeoTIFF (NAIP-like; repeat for several scenes)."),
    coarse: List[Path] = typer.Option([], "--coarse", help="Coarse land-cover GeoTIFF for each --image, any grid/CRS."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class map YAML (classes:, map:, ignore:) for "
                                           "GeoTIFF inputs."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="Fit on gl10m shards instead: coarse map = each "
                                          "tile's dominant concept."),
    split: Optional[str] = typer.Option(None, help="Shards split."),
    max_samples: int = typer.Option(4, help="Shards: samples to fit on."),
    min_frac: float = typer.Option(0.0, help="Shards: a tile whose top concept fraction is <= this is unlabelled."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help=_ENC_HELP + " Default: a tiny random ViT "
                                          "(for trying the pipeline only)."),
    probe_steps: int = typer.Option(200, help="Probe training steps (full batch AdamW)."),
    probe_pixels: int = typer.Option(200_000, help="Labelled pixels sampled for the probe."),
    balanced: bool = typer.Option(True, "--balanced/--no-balanced", help="Class-balanced probe loss."),
    chip: Optional[int] = typer.Option(None, help="Chip size in pixels (default: the encoder's hr_size)."),
    overlap: Optional[int] = typer.Option(None, help="Overlap between chips in pixels (default chip/4)."),
    shifts: int = typer.Option(1, help="Shifted encoder passes per side: a token every chip/grid/shifts pixels "
                               "(shifts^2 times the encoder calls; 1: none)."),
    color_feature: float = typer.Option(0.0, help="Weight of the image's own colour as extra feature channels "
                                        "(0: off)."),
    seed: int = typer.Option(0, help="Seed (probe init and pixel sampling; random-init encoders)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
):
    """Fit MapSR: train the linear probe on the coarse labels and compute the class prompts."""
    try:
        from gl10m.model.mapsr import ClassMap, MapSR, MapSRConfig, MapSRError, coarse_on_grid, read_image
        from gl10m.testbed.classes import CONCEPT_NAMES

        dev = _device(device)
        cfg = MapSRConfig(chip=chip, overlap=overlap, shifts=shifts, color_feature=color_feature,
                          probe_steps=probe_steps, probe_pixels=probe_pixels, probe_balanced=balanced, seed=seed)
        if shards is not None:
            if image or coarse:
                raise MapSRError("give either --shards or --image/--coarse, not both")
            if not shards.exists():
                raise MapSRError(f"shards {shards}: no such folder")
            scenes = [(img, c) for _, img, c in _shard_scenes(shards, split, max_samples, min_frac)]
            names, cmap = list(CONCEPT_NAMES), None
        else:
            if not image:
                raise MapSRError("give --image and --coarse (or --shards)")
            if classes is None:
                raise MapSRError("GeoTIFF inputs need --classes (a class map YAML)")
            cmap = ClassMap.load(classes)
            names = cmap.classes
            scenes = []
            for ip, cp in _pairs(image, coarse):
                img, prof = read_image(ip)
                scenes.append((img, coarse_on_grid(cp, prof, cmap)))
        enc, enc_spec = _encoder(encoder, seed, dev)
        m = MapSR(enc, names, cfg).fit(scenes)
        m.save(out, extra={"encoder_spec": enc_spec, "class_map": cmap.to_dict() if cmap else None,
                           "inputs": [str(p) for p in image] or str(shards)})
        n = int(m.has_prompt.sum())
        typer.echo(f"wrote {out}: {n} class prompts ({', '.join(c for c, h in zip(names, m.has_prompt.tolist()) if h)})")
    except UserError as e:
        _fail(e)


@mapsr_app.command("predict")
def predict_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="A model written by `mapsr fit`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output GeoTIFF (with --image) or folder (with --shards)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image GeoTIFF to map."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="Map every sample's 10x10 tile mosaic instead."),
    split: Optional[str] = typer.Option(None, help="Shards split."),
    max_samples: int = typer.Option(1_000_000, help="Shards: at most this many samples."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help=_ENC_HELP + " Default: the one fit used."),
    refine: bool = typer.Option(True, "--refine/--no-refine", help="Graph refinement after cosine matching."),
    cosine_out: Optional[Path] = typer.Option(None, help="Also write the cosine-matching map here (--image)."),
    coarse: Optional[Path] = typer.Option(None, "--coarse", help="The image's coarse land-cover GeoTIFF (class map "
                                          "of fit), for --prior (with --shards: each tile's dominant concept)."),
    prior: float = typer.Option(0.0, help="Weight of the coarse map as a prior on the cosine scores (0: off; "
                                "bench/mapsr.py chooses it on val windows)."),
    prior_radius: int = typer.Option(0, help="The prior is each class's share of the coarse map within this "
                                     "many pixels (0: the pixel's own coarse label)."),
    refine_mode: str = typer.Option("window", help="window (pixel nodes) or blocks (block x block pixel nodes)."),
    window: int = typer.Option(112, help="Refinement window in pixels."),
    k: Optional[int] = typer.Option(None, "-k", help="kNN neighbours (default 400 window, 100 blocks)."),
    gamma: Optional[float] = typer.Option(None, help="Similarity exponent (default 3 window, 1 blocks)."),
    alpha: Optional[float] = typer.Option(None, help="Propagation strength in [0, 1) (default 0.95 / 0.5)."),
    sigma: Optional[float] = typer.Option(None, help="Spatial decay per pixel (default 0.01 / 0)."),
    maxiter: int = typer.Option(10, help="Conjugate-gradient iterations."),
    color: float = typer.Option(0.0, help="Weight of the image's colour difference in the graph's edges (0: off, "
                                "the reference's graph; bench/mapsr.py chooses it on val windows)."),
    seed: int = typer.Option(0, help="Seed of a random-init encoder (as given to fit)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
):
    """Predict the high-resolution map: cosine matching against the prompts, then graph refinement."""
    try:
        from gl10m.model.mapsr import MapSR, MapSRError, read_image, sample_profile, write_map

        if not model.is_file():
            raise MapSRError(f"model {model}: no such file")
        meta = json.loads(Path(str(model) + ".json").read_text()) if Path(str(model) + ".json").is_file() else {}
        dev = _device(device)
        enc, _ = _encoder(encoder or meta.get("encoder_spec"), seed, dev)
        m, meta = MapSR.load(model, enc)
        m.refine_cfg = _refine_cfg(refine_mode, window, k, gamma, alpha, sigma, maxiter, color)
        m.cfg.prior, m.cfg.prior_radius = float(prior), int(prior_radius)
        key = "refined" if refine else "cosine"
        if (image is None) == (shards is None):
            raise MapSRError("give exactly one of --image or --shards")
        if image is not None:
            img, prof = read_image(image)
            grid = None
            if prior > 0:
                if coarse is None:
                    raise MapSRError("--prior needs --coarse (the image's coarse land-cover GeoTIFF)")
                if not meta.get("class_map"):
                    raise MapSRError(f"model {model}: fitted without a class map, so --coarse cannot be read")
                from gl10m.model.mapsr import ClassMap, coarse_on_grid
                grid = coarse_on_grid(coarse, prof, ClassMap.from_dict(meta["class_map"]))
            res = m.predict(img, refine=refine, coarse=grid)
            write_map(out, res[key], prof, m.classes, {"mapsr": key, "fit_hash": m.fit_hash})
            if cosine_out:
                write_map(cosine_out, res["cosine"], prof, m.classes, {"mapsr": "cosine"})
            typer.echo(f"wrote {out}")
            return
        if not shards.exists():
            raise MapSRError(f"shards {shards}: no such folder")
        n = 0
        for s, img, tiles in _shard_scenes(shards, split, max_samples, 0.0):
            res = m.predict(img, refine=refine, coarse=tiles if prior > 0 else None)
            write_map(out / f"{s['key']}.tif", res[key], sample_profile(s, img.shape[1:]), m.classes, {"mapsr": key})
            n += 1
        typer.echo(f"wrote {n} maps to {out}")
    except UserError as e:
        _fail(e)


@mapsr_app.command("eval")
def eval_cmd(
    pred: Optional[Path] = typer.Option(None, "--pred", help="A predicted map GeoTIFF (codes 1..C, 0 no data)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="The HR reference map GeoTIFF (any grid/CRS)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class map YAML for the truth's values."),
    testbed: bool = typer.Option(False, "--testbed", help="Evaluate on a rendered window of the offline testbed, "
                                 "whose 1 m truth is known: mIoU of coarse upsampled, cosine matching, refined."),
    spec: Optional[Path] = typer.Option(None, help="Testbed spec (default manifests/testbed.yaml)."),
    region: str = typer.Option("CA", help="Testbed region code."),
    size: int = typer.Option(256, help="Testbed window side in 1 m pixels."),
    cell: int = typer.Option(64, help="Testbed coarse cell in pixels (30: NLCD-like, 268: gl10m tiles)."),
    row: Optional[int] = typer.Option(None, help="Testbed window row offset (default centred)."),
    col: Optional[int] = typer.Option(None, help="Testbed window column offset (default centred)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help=_ENC_HELP + " Default: a tiny random ViT."),
    k: Optional[int] = typer.Option(None, "-k", help="kNN neighbours for refinement (default 400)."),
    window: int = typer.Option(112, help="Refinement window in pixels."),
    probe_pixels: int = typer.Option(200_000, help="Labelled pixels sampled for the probe."),
    seed: int = typer.Option(0, help="Seed."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the scores as JSON here."),
):
    """Score maps against an HR reference: per-class IoU, mIoU, OA (or run the testbed benchmark)."""
    try:
        import numpy as np

        from gl10m.io import atomic_write_text
        from gl10m.model.mapsr import (ClassMap, MapSR, MapSRConfig, MapSRError, evaluate,
                                       read_truth, testbed_scene)
        from gl10m.model.mapsr.graph import RefineConfig

        if testbed:
            dev = _device(device)
            off = None if row is None and col is None else (row or 0, col or 0)
            sc = testbed_scene(str(spec) if spec else None, region=region, size=size, cell=cell, offset=off)
            enc, _ = _encoder(encoder, seed, dev)
            m = MapSR(enc, sc.classes, MapSRConfig(seed=seed, probe_pixels=probe_pixels,
                                                   refine=RefineConfig(k=k, window=window)))
            m.fit([(sc.image, sc.coarse)])
            res = m.predict(sc.image)
            n = len(sc.classes)
            rep = {"setting": {"region": region, "size": size, "cell": cell, "encoder": encoder or TINY_ENCODER,
                               "refine": vars(m.refine_cfg)},
                   "coarse_upsampled": evaluate(sc.coarse, sc.truth, n, sc.classes),
                   "cosine": evaluate(res["cosine"], sc.truth, n, sc.classes),
                   "refined": evaluate(res["refined"], sc.truth, n, sc.classes)}
            for name in ("coarse_upsampled", "cosine", "refined"):
                typer.echo(f"{name:17s} mIoU {rep[name]['miou']:.4f}  OA {rep[name]['oa']:.4f}")
        else:
            if pred is None or truth is None or classes is None:
                raise MapSRError("give --pred, --truth and --classes (or --testbed)")
            cmap = ClassMap.load(classes)
            import rasterio
            if not pred.is_file():
                raise MapSRError(f"prediction {pred}: no such file")
            with rasterio.open(pred) as src:
                if src.crs is None:
                    raise MapSRError(f"prediction {pred}: has no CRS")
                p = src.read(1).astype(np.int64) - 1  # codes 1..C -> 0..C-1, no data -> -1
                prof = src.profile.copy()
            t = read_truth(truth, prof, cmap)
            rep = evaluate(p, t, len(cmap.classes), cmap.classes)
            typer.echo(f"mIoU {rep['miou']:.4f}  OA {rep['oa']:.4f}  ({rep['pixels']} pixels)")
            for c, v in rep["iou"].items():
                typer.echo(f"  {c:20s} {'-' if v is None else f'{v:.4f}'}")
        if report:
            atomic_write_text(report, json.dumps(rep, indent=1, default=str) + "\n")
    except UserError as e:
        _fail(e)


if __name__ == "__main__":  # python -m gl10m.model.mapsr.cli
    mapsr_app()
