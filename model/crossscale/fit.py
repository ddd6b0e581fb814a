"""`gl10m model fit`: the whole cross-scale model from image shards, in one resumable command.

Parts, in order, each into its own folder of the model dir (the layout `gl10m model eval` reads):

============== ===================== =======================================================
part           folder                what
============== ===================== =======================================================
encoder        ``encoder/``          the bootstrap ViT (SigLIP on HR tiles / LR scenes vs concept
                                     text, novel concepts held out), or given weights copied in
features       ``features/``         the frozen-encoder feature cache of every split
sampler        ``sampler/``          the LR-only sampler (multiplicative supervision)
sampler-<v>    ``sampler-<v>/``      ablation samplers (other supervision variants)
predictor      ``predictor/``        stage I (masks drawn at random and from the sampler)
predictor-nolr ``predictor-nolr/``   stage I without LR context (ablation)
predictor-     ``predictor-stage2/`` stage II from the stage I weights, novel concepts held out
stage2
scene-head     ``scene-head/``       the scene head fitted to convergence on the frozen stage II
                                     predictor's completions (:mod:`.scene_head`); every
                                     evaluation row is scored through it
============== ===================== =======================================================

Resuming: ``MODEL/fit.json`` records each part's input hash (its own settings, the hashes of the
parts it reads and the shards' manifest) and whether it finished. A rerun skips a finished part
whose hash is unchanged, continues an unfinished training run from its last checkpoint, and
redoes a part (and everything after it that reads it) whose inputs changed. A part's folder is
only trusted when fit.json says it finished with the current hash.

The fit config (YAML, see ``configs/fit-cpu.yaml``): ``device`` (auto | cpu | cuda), ``novel``
(concept names or ids held out of the encoder pretraining, the sampler's supervision and stage
II; null: the profile's ``novel: true`` flags), and one section per part, each a base config
file (``base:``, relative to model/configs) deep-merged with the overrides given beside it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.io import atomic_write_text

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_FIT_CONFIG = CONFIGS / "fit-cpu.yaml"
STATE_NAME = "fit.json"
FIT_VERSION = 1
SECTIONS = ("device", "novel", "profile", "encoder", "features", "sampler", "variants", "predictor",
            "predictor_nolr", "stage2", "scene_head")


class FitError(UserError, ValueError):
    """A fit config or model dir that cannot be used; one line."""


# -- config ------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `over` replaces."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, what: str) -> dict:
    return safeyaml.read_mapping(path, what, FitError)


def _part(section: dict | None, name: str) -> dict:
    """A part's full config: its ``base:`` file (with that file's own ``model:`` reference
    resolved) deep-merged with the overrides beside it."""
    section = dict(section or {})
    base = section.pop("base", None)
    cfg: dict = {}
    if base is not None:
        p = Path(base)
        p = p if p.is_absolute() else CONFIGS / p
        cfg = _read_yaml(p, f"{name}: base config")
        if isinstance(cfg.get("model"), str):  # trainer configs name their model YAML beside them
            cfg["model"] = _read_yaml(p.parent / cfg["model"], f"{name}: model config")
    over = dict(section)
    if isinstance(over.get("model"), str):
        mp = Path(over["model"])
        over["model"] = _read_yaml(mp if mp.is_absolute() else CONFIGS / mp, f"{name}: model config")
    return _merge(cfg, over)


def load_fit_config(config: str | os.PathLike | dict | None = None) -> dict:
    """The fit config (a YAML path, a dict, or None for the default), every part resolved."""
    raw = _read_yaml(Path(config), "fit config") if isinstance(config, (str, os.PathLike)) else \
        copy.deepcopy(config) if config is not None else _read_yaml(DEFAULT_FIT_CONFIG, "fit config")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise FitError(f"fit config: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    dev = raw.get("device", "auto")
    if dev not in ("auto", "cpu", "cuda") and not str(dev).startswith("cuda:"):
        raise FitError(f"fit config: device must be auto, cpu or cuda, got {dev!r}")
    from .supervision import VARIANTS  # the one list of G* variants (imports torch: not at module import)

    variants = list(raw.get("variants") or [])
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise FitError(f"fit config: unknown sampler variant {bad[0]!r} (one of {', '.join(VARIANTS)})")
    enc = dict(raw.get("encoder") or {})
    weights = enc.pop("weights", None)
    return {
        "device": dev, "novel": raw.get("novel"), "profile": raw.get("profile"),
        "encoder": {"weights": weights, "config": _part(enc, "encoder")},
        "features": dict(raw.get("features") or {}),
        "sampler": _part(raw.get("sampler"), "sampler"),
        "variants": variants,
        "predictor": _part(raw.get("predictor"), "predictor"),
        "predictor_nolr": bool(raw.get("predictor_nolr", True)),
        "stage2": _part(raw.get("stage2"), "stage2") if raw.get("stage2") is not False else None,
        "scene_head": _scene_head_cfg(raw.get("scene_head"), raw.get("stage2") is not False),
    }


def _scene_head_cfg(section, has_stage2: bool) -> dict | None:
    """The scene head's settings (None: not fitted; false in the config or no stage II)."""
    from .scene_head import head_config

    if section is False:
        return None
    if not has_stage2:
        if section:
            raise FitError("fit config: scene_head needs stage2 (it is fitted on the stage II predictor)")
        return None
    if section is not None and not isinstance(section, dict):
        raise FitError(f"fit config: scene_head must be a mapping or false, got {section!r}")
    return head_config(section)


def resolve_device(dev: str) -> str:
    import torch

    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise FitError(f"device {dev}: no CUDA device here")
    return dev


def resolve_novel(novel: Sequence | None, labels: Sequence[str], profile: str | None = None) -> list[int]:
    """Concept ids held out as novel: names or ids; None: the profile's flags (the encoder
    pretraining's own rule, :func:`gl10m.model.crossscale.pretrain.novel_ids`)."""
    from .pretrain import novel_ids

    return novel_ids(novel, list(labels), profile)


# -- state -------------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shards_digest(shards: Path) -> str:
    """The shards' identity: the hash of their manifest (which lists every shard's checksum)."""
    from gl10m.shards import MANIFEST_NAME

    p = shards / MANIFEST_NAME
    if not p.is_file():
        raise FitError(f"{shards}: not a shards folder (no {MANIFEST_NAME})")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


@dataclass
class FitState:
    path: Path
    parts: dict = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> "FitState":
        p = model_dir / STATE_NAME
        parts = {}
        if p.is_file():
            try:
                data = json.loads(p.read_text())
                parts = dict(data.get("parts") or {})
            except (OSError, ValueError, AttributeError):
                parts = {}  # unreadable: trust nothing, redo
        return cls(p, parts)

    def done(self, name: str, h: str) -> bool:
        st = self.parts.get(name) or {}
        return st.get("hash") == h and st.get("status") == "done"

    def same_inputs(self, name: str, h: str) -> bool:
        return (self.parts.get(name) or {}).get("hash") == h

    def record(self, name: str, h: str, status: str, **info) -> None:
        self.parts[name] = {"hash": h, "status": status, **info}
        atomic_write_text(self.path, json.dumps({"version": FIT_VERSION, "parts": self.parts}, indent=1,
                                                sort_keys=True, default=str) + "\n")


# -- the parts ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """One part to run: name, its folder, its input hash and the function that makes it."""
    name: str
    folder: Path
    hash: str
    run: Callable[[bool], dict]  # resume flag -> info recorded in fit.json
    trainer: bool = False  # a trainer run dir (resumable from checkpoints)


def plan(shards: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | dict | None = None, *,
         encoder: str | os.PathLike | None = None, device: str | None = None,
         echo: Callable[[str], None] = print) -> tuple[list[Plan], dict]:
    """The parts `fit` would run, in order, with their hashes (nothing is run or written)."""
    from ..encoders import concept_labels

    cfg = load_fit_config(config)
    src, md = Path(shards), Path(out)
    sd = shards_digest(src)
    dev = resolve_device(device or cfg["device"])
    if encoder is not None:
        cfg["encoder"]["weights"] = str(encoder)
    weights = cfg["encoder"]["weights"]
    if weights is not None and not Path(weights).exists():
        raise FitError(f"encoder weights {weights}: no such file or folder")
    labels = concept_labels(cfg["profile"])
    novel = resolve_novel(cfg["novel"], labels, cfg["profile"])
    plans: list[Plan] = []

    # encoder
    enc_cfg = _merge(cfg["encoder"]["config"], {"train": {"device": dev, "novel": novel}})
    if cfg["profile"]:
        enc_cfg["train"]["profile"] = cfg["profile"]
    h_enc = _digest({"shards": sd, "weights": _file_digest(weights) if weights else None,
                     "config": None if weights else enc_cfg, "v": FIT_VERSION})

    def run_encoder(resume: bool) -> dict:
        from .pretrain import pretrain_encoder

        folder = md / "encoder"
        shutil.rmtree(folder, ignore_errors=True)
        if weights is not None:
            w = Path(weights)
            shutil.copytree(w if w.is_dir() else w.parent, folder)
            return {"source": str(w)}
        t0 = time.time()
        pretrain_encoder(src, folder, enc_cfg, progress=lambda s, loss: echo(f"encoder: step {s} loss {loss:.4f}"))
        return {"seconds": round(time.time() - t0, 1)}

    plans.append(Plan("encoder", md / "encoder", h_enc, run_encoder))

    # features
    fcfg = {"batch_size": 32, "num_workers": 0, "shard_mb": 256, **cfg["features"]}
    h_feat = _digest({"encoder": h_enc, "features": fcfg})

    def run_features(resume: bool) -> dict:
        from .features import write_features

        if not resume:
            shutil.rmtree(md / "features", ignore_errors=True)
        t0 = time.time()
        s = write_features(src, md / "features", md / "encoder", batch_size=int(fcfg["batch_size"]), device=dev,
                           shard_mb=float(fcfg["shard_mb"]), num_workers=int(fcfg["num_workers"]), resume=True,
                           profile=cfg["profile"],
                           progress=lambda sp, j, n: echo(f"features: {sp} shard {j + 1}/{n}"))
        secs = time.time() - t0
        n = sum(int(st.get("samples", 0)) for st in s["splits"].values())
        return {"seconds": round(secs, 1), "scenes": n, "scenes_per_s": round(n / secs, 2) if secs > 0 else None}

    plans.append(Plan("features", md / "features", h_feat, run_features))

    def trainer(name: str, tcfg: dict, after: Sequence[str]) -> None:
        tcfg = {**tcfg, "progress": False}
        h = _digest({"features": h_feat, "after": [p.hash for p in plans if p.name in after], "config": tcfg})

        def run(resume: bool, tcfg=tcfg, name=name) -> dict:
            from .train import checkpoint_paths, train

            c = dict(tcfg)
            for key, part in (("sampler_checkpoint", "sampler"), ("init_from", "predictor")):
                if c.get(key) == "@" + part:  # a reference to an earlier part's final checkpoint
                    c[key] = str(checkpoint_paths(md / part)[-1])
            folder = md / name
            if not resume:
                shutil.rmtree(folder, ignore_errors=True)
            t0 = time.time()
            r = train(c, md / "features", folder, resume=resume and bool(checkpoint_paths(folder)), device=dev)
            secs = time.time() - t0
            echo(f"{name}: step {r['step']} loss {r['loss']:.4f} ({secs:.0f} s)")
            return {"step": r["step"], "loss": r["loss"], "seconds": round(secs, 1),
                    "checkpoint": r["checkpoint"]}

        plans.append(Plan(name, md / name, h, run, trainer=True))

    scfg = _with_novel(cfg["sampler"], novel)
    trainer("sampler", scfg, [])
    for v in cfg["variants"]:
        trainer(f"sampler-{v}", _merge(scfg, {"supervision": {"variant": v}}), [])
    pcfg = _merge(cfg["predictor"], {"sampler_checkpoint": "@sampler"}) if cfg["predictor"].get(
        "sampler_mix", 0) else cfg["predictor"]
    trainer("predictor", pcfg, ["sampler"] if pcfg.get("sampler_checkpoint") else [])
    if cfg["predictor_nolr"]:
        trainer("predictor-nolr", _merge(pcfg, {"model": {"use_lr": False}}),
                ["sampler"] if pcfg.get("sampler_checkpoint") else [])
    if cfg["stage2"] is not None:
        s2 = _merge(cfg["stage2"], {"task": "predictor_stage2", "init_from": "@predictor", "novel_concepts": novel})
        if pcfg.get("sampler_checkpoint") and s2.get("sampler_mix", pcfg.get("sampler_mix", 0)):
            s2["sampler_checkpoint"] = "@sampler"
        if "model" not in cfg["stage2"] or not cfg["stage2"]["model"]:
            s2["model"] = pcfg.get("model")
        trainer("predictor-stage2", s2, ["predictor", "sampler"])
        if cfg["scene_head"] is not None:
            hcfg = cfg["scene_head"]
            h_head = _digest({"features": h_feat, "after": [p.hash for p in plans if p.name == "predictor-stage2"],
                              "config": hcfg})

            def run_head(resume: bool) -> dict:
                from .scene_head import fit_scene_head
                from .train import checkpoint_paths

                folder = md / "scene-head"
                shutil.rmtree(folder, ignore_errors=True)
                t0 = time.time()
                fit_scene_head(md / "features", checkpoint_paths(md / "predictor-stage2")[-1], folder, hcfg,
                               device=dev, progress=lambda s, loss: echo(f"scene-head: step {s} loss {loss:.4f}"))
                return {"seconds": round(time.time() - t0, 1)}

            plans.append(Plan("scene-head", md / "scene-head", h_head, run_head))
    info = {"device": dev, "novel": novel, "novel_names": [labels[i] for i in novel], "shards": sd,
            "parts": [p.name for p in plans]}
    return plans, info


def _with_novel(sampler_cfg: dict, novel: list[int]) -> dict:
    """The sampler's supervision must not see novel concepts (their s_gain is never computed)."""
    return _merge(sampler_cfg, {"supervision": {"novel_concepts": novel}})


def _file_digest(path: str | os.PathLike) -> str:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for q in files:
        h.update(q.name.encode())
        h.update(q.read_bytes())
    return h.hexdigest()[:16]


def fit(shards: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | dict | None = None, *,
        encoder: str | os.PathLike | None = None, device: str | None = None, dry_run: bool = False,
        echo: Callable[[str], None] = print) -> dict:
    """Train every part into ``out`` (see the module doc); returns {"parts": {name: status/info},
    "device", "novel", ...}. ``dry_run``: say what would run, run nothing."""
    md = Path(out)
    if md.exists() and not md.is_dir():
        raise FitError(f"{md}: exists and is not a folder")
    plans, info = plan(shards, md, config, encoder=encoder, device=device, echo=echo)
    state = FitState.read(md)
    result: dict = {**info, "model_dir": str(md), "parts": {}}
    for p in plans:
        if state.done(p.name, p.hash) and p.folder.exists():
            result["parts"][p.name] = {**(state.parts[p.name] or {}), "status": "done (up to date)"}
            if not dry_run:
                echo(f"{p.name}: up to date")
            continue
        resume = p.trainer and state.same_inputs(p.name, p.hash) and p.folder.exists()
        what = "resume" if resume else "run"
        result["parts"][p.name] = {"status": f"would {what}" if dry_run else what}
        if dry_run:
            echo(f"{p.name}: would {what} -> {p.folder}")
            continue
        md.mkdir(parents=True, exist_ok=True)
        echo(f"{p.name}: {'resuming' if resume else 'training' if p.trainer else 'running'} -> {p.folder}")
        state.record(p.name, p.hash, "running")
        got = p.run(resume)
        state.record(p.name, p.hash, "done", **got)
        result["parts"][p.name] = {"status": "done", **got}
    return result


def cli_fit(shards: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None, *,
            encoder: str | os.PathLike | None = None, device: str | None = None, dry_run: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    res = fit(shards, out, config, encoder=encoder, device=device, dry_run=dry_run, echo=echo)
    novel = ", ".join(res["novel_names"]) or "none"
    if dry_run:
        echo(f"dry run: {len(res['parts'])} parts on {res['device']}; novel concepts held out: {novel}")
    else:
        echo(f"model -> {res['model_dir']} ({res['device']}; novel concepts held out: {novel}); "
             f"`gl10m model eval --checkpoint {res['model_dir']} --shards {shards}` evaluates it")
    return res
