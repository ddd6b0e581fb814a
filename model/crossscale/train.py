"""One training entry point for every registered task ("predictor", "predictor_stage2",
"sampler").

train(config, features_dir, out_dir, resume=..., max_steps=...) builds the task's model from the
feature cache's dims, runs AdamW with a warmup + cosine schedule (bf16 autocast on CUDA, fp32 on
CPU, DDP when launched by torchrun), logs every step to out_dir/metrics.jsonl and saves
checkpoints (plain state dicts, loadable with torch.load(weights_only=True)) atomically to
out_dir/checkpoints/. A resumed run continues the same run: data order, masks and RNG states are
restored, so its losses equal an uninterrupted run's.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.io import atomic_path, jsonable

from .tasks import PredictorStage2Task, PredictorTask, unwrap

CKPT_DIR = "checkpoints"
DEFAULTS: dict[str, Any] = {
    "task": "predictor",
    "model": None,           # dict, or a YAML file name (relative to the config's folder)
    "seed": 0,
    "split": "train",
    "batch_size": 8,
    "steps": 1000,
    "lr": 3e-4,
    "min_lr_ratio": 0.0,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "ckpt_every": 500,
    "keep_checkpoints": 2,
    "num_workers": 0,
    "shuffle_buffer": 256,   # FeatureDataset shuffle buffer (samples); shard order is seeded per epoch
    "progress": True,
    "init_from": None,       # a checkpoint whose model weights start this run (e.g. stage I)
}


# -- tasks ---------------------------------------------------------------------------------------

def get_task(name: str):
    """A fresh task object by its registered name."""
    if name == "predictor":
        return PredictorTask()
    if name == "predictor_stage2":
        return PredictorStage2Task()
    if name == "sampler":
        try:
            mod = importlib.import_module(f"{__package__}.sampler")
        except ModuleNotFoundError as e:
            raise UserError(f"task 'sampler' is not available ({e})") from None
        return mod.SamplerTask()
    raise UserError(f"unknown task {name!r} (known: predictor, predictor_stage2, sampler)")


# -- config --------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    return safeyaml.read_mapping(path, "config")


def load_config(config: str | Path | dict) -> dict:
    """The full config: defaults, the given keys (names in cfg["_given"]), `model` resolved to a
    dict. Task-specific keys are checked against the task's `config_keys` in `train`."""
    base = Path.cwd()
    if isinstance(config, dict):
        given = dict(config)
    else:
        path = Path(config)
        given = _read_yaml(path)
        base = path.parent
    cfg = {**DEFAULTS, **given}
    cfg["_given"] = sorted(given)
    if isinstance(cfg["model"], str):
        mpath = Path(cfg["model"])
        if not mpath.is_absolute():
            mpath = base / mpath
        cfg["model"] = _read_yaml(mpath)
    for key in ("batch_size", "steps", "ckpt_every"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UserError(f"config {key} must be a positive integer, got {cfg[key]!r}")
    return cfg


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# -- data ----------------------------------------------------------------------------------------

def _to_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def default_collate(samples: list[dict]) -> dict:
    """Stack each tensor field; other fields become lists."""
    out: dict = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], (torch.Tensor, np.ndarray)):
            out[k] = torch.stack([_to_tensor(v) for v in vals])
        else:
            out[k] = vals
    return out


def _features_module():
    try:
        return importlib.import_module(f"{__package__}.features")
    except ModuleNotFoundError:
        return None


def _epoch_batches(dataset, cfg: dict, epoch: int, rank: int, world: int, collate) -> Iterable[dict]:
    """Batches of one epoch, in an order fixed by (seed, epoch).

    Map-style datasets (len + getitem) are shuffled here and split by rank; other iterables
    (FeatureDataset) are asked to set_epoch(epoch) if they can and do their own rank split.
    """
    bs = cfg["batch_size"]
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
        gen = torch.Generator().manual_seed(int(cfg["seed"]) * 9973 + epoch)
        idx = torch.randperm(n, generator=gen).tolist()
        idx = idx[:len(idx) - len(idx) % world][rank::world]  # every rank the same count
        full = len(idx) // bs
        batches = [idx[i * bs:(i + 1) * bs] for i in range(full)] or ([idx] if idx else [])
        for b in batches:
            yield collate([dataset[i] for i in b])
        return
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if int(cfg["num_workers"]) > 0:  # the dataset splits itself over workers (FeatureDataset does)
        yield from torch.utils.data.DataLoader(dataset, batch_size=bs, collate_fn=collate,
                                               num_workers=int(cfg["num_workers"]))
        return
    buf: list = []
    for sample in dataset:
        buf.append(sample)
        if len(buf) == bs:
            yield collate(buf)
            buf = []
    if buf:
        yield collate(buf)


def _dims(sample: dict, text: torch.Tensor | None) -> dict:
    try:
        hr = _to_tensor(sample["hr_tokens"])
        lr = _to_tensor(sample["lr_tokens"])
    except KeyError as e:
        raise UserError(f"feature samples lack field {e}") from None
    if hr.ndim != 4 or hr.shape[0] != 100 or lr.ndim != 3:
        raise UserError(f"feature sample shapes hr {tuple(hr.shape)} lr {tuple(lr.shape)}: "
                        "expected [100, g, g, D] and [Gl, Gl, D]")
    e = None
    if "hr_embed" in sample:
        e = int(_to_tensor(sample["hr_embed"]).shape[-1])
    elif text is not None:
        e = int(text.shape[-1])
    nc = int(_to_tensor(sample["labels"]).shape[-1]) if "labels" in sample else (
        int(text.shape[0]) if text is not None else 0)
    return {"D": int(hr.shape[-1]), "g": int(hr.shape[1]), "Gl": int(lr.shape[0]),
            "D_lr": int(lr.shape[-1]), "E": e, "n_concepts": nc}


# -- checkpoints ---------------------------------------------------------------------------------

def _rng_state() -> dict:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
          "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
          "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py_state_to_list(state) -> list:
    version, internal, gauss = state
    return [int(version), [int(x) for x in internal], None if gauss is None else float(gauss)]


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_gauss"][0], st["numpy_gauss"][1]))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_paths(out_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    return sorted((Path(out_dir) / CKPT_DIR).glob("step-*.pt"))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    path = out_dir / CKPT_DIR / f"step-{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in checkpoint_paths(out_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


# -- the loop ------------------------------------------------------------------------------------

def _dist_setup(device: str | None):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
            backend = "nccl"
        else:
            dev = torch.device(device or "cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return dev, dist.get_rank(), world
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, 0, 1


def _all_have(flag: bool, world: int, dev: torch.device) -> bool:
    """True when every rank has `flag` (one tiny all-reduce per step under DDP)."""
    if world <= 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([1 if flag else 0], device=dev if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _to_device(batch: dict, dev: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(dev, non_blocking=True)
            if v.is_floating_point() and v.dtype != torch.float32:
                v = v.float()
        out[k] = v
    return out


def _resolve_holdout(cfg: dict, task, features_dir, feats, dims: dict) -> None:
    """Novel concepts held out by stage II (``novel_concepts``) and by the sampler's s_gain
    (``supervision.novel_concepts``): null takes what the feature cache records (the encoder's
    held-out list, else the profile's novel flags); a list must agree with them
    (:func:`~gl10m.model.crossscale.supervision.resolve_novel_concepts`). The resolved list is written into the
    config saved with every checkpoint."""
    from .supervision import resolve_novel_concepts

    if getattr(task, "stage2", False):
        where = cfg
    elif cfg["task"] == "sampler":
        cfg["supervision"] = dict(cfg.get("supervision") or {})
        where = cfg["supervision"]
    else:
        return
    recorded = {}
    if features_dir is not None and feats is not None:
        m = feats.read_meta(features_dir)
        recorded = {"novel": m.get("novel") or [], "encoder_novel": m.get("encoder_novel")}
    n = int(dims.get("n_concepts") or 0)
    given = where.get("novel_concepts")
    if n:
        where["novel_concepts"] = resolve_novel_concepts(given, recorded, n, cfg["task"])
    elif given is None:
        where["novel_concepts"] = []


def _param_groups(model: torch.nn.Module, cfg: dict, lr_mult=None) -> list[dict]:
    """AdamW groups: weight decay on matrices only, and the task's per-parameter learning-rate
    multiplier (``lr_mult(name)``, default 1); a fixed order (decayed first, then by multiplier)."""
    groups: dict[tuple[bool, float], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            m = 1.0 if lr_mult is None else float(lr_mult(n))
            groups.setdefault((p.ndim >= 2, m), []).append(p)
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    return [{"params": ps, "weight_decay": wd if dec else 0.0, "lr": lr * m}
            for (dec, m), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def train(config: str | Path | dict, features_dir: str | Path | None, out_dir: str | Path, *,
          resume: bool = False, max_steps: int | None = None, device: str | None = None,
          dataset: Any = None, text: torch.Tensor | None = None, task: Any = None) -> dict:
    """Train the config's task; returns {"step", "loss", "checkpoint", "metrics", "out_dir",
    "model" (the trained module, unwrapped from DDP)}.

    features_dir: the feature cache (FeatureDataset + load_text from crossscale.features); tests may
    pass `dataset` (map-style or iterable of sample dicts) and `text` instead. `max_steps` stops
    this call at that global step (the schedule still spans cfg["steps"]); `resume` continues from
    the newest checkpoint in out_dir. `task` overrides the registered task object (e.g. a
    PredictorTask with a sampler scorer).
    """
    cfg = load_config(config)
    out_dir = Path(out_dir)
    dev, rank, world = _dist_setup(device)
    is_main = rank == 0
    torch.manual_seed(int(cfg["seed"]) + rank)
    np.random.seed((int(cfg["seed"]) + rank) % 2**32)
    random.seed(int(cfg["seed"]) + rank)

    feats = _features_module()
    collate = default_collate
    if dataset is None:
        if features_dir is None:
            raise UserError("train needs a features folder (or a dataset)")
        if feats is None or not hasattr(feats, "FeatureDataset"):
            raise UserError("gl10m.model.crossscale.features (FeatureDataset) is not available")
        if not Path(features_dir).is_dir():
            raise UserError(f"features folder not found: {features_dir}")
        dataset = feats.FeatureDataset(features_dir, cfg["split"], shuffle=int(cfg["shuffle_buffer"]),
                                       seed=int(cfg["seed"]))
        collate = getattr(feats, "collate_features", default_collate)
    if text is None and features_dir is not None and feats is not None and hasattr(feats, "load_text"):
        text = feats.load_text(features_dir)
    if text is not None:
        text = _to_tensor(text).float().to(dev)

    first = dataset[0] if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") else next(iter(dataset))
    dims = _dims(first, text)

    task = task if task is not None else get_task(cfg["task"])
    _resolve_holdout(cfg, task, features_dir, feats, dims)
    allowed = getattr(task, "config_keys", None)  # a task may declare its own keys
    if allowed is not None:
        unknown = set(cfg["_given"]) - set(DEFAULTS) - set(allowed)
        if unknown:
            raise UserError(f"unknown training config keys for task {cfg['task']!r}: {sorted(unknown)}")
    model = task.build_model(cfg, dims).to(dev)
    if cfg["init_from"] and not resume:
        init = load_checkpoint(cfg["init_from"])
        missing, unexpected = model.load_state_dict(init["model"], strict=False)
        if unexpected:
            raise UserError(f"init_from {cfg['init_from']}: unexpected weights {unexpected[:3]}...")
    opt = torch.optim.AdamW(_param_groups(model, cfg, getattr(task, "lr_mult", None)),
                            lr=float(cfg["lr"]), betas=tuple(cfg["betas"]))
    total = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, int(cfg["warmup_steps"]), total, float(cfg["min_lr_ratio"])))

    step, epoch, batch_in_epoch = 0, 0, 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        ckpts = checkpoint_paths(out_dir)
        if not ckpts:
            raise UserError(f"nothing to resume: no checkpoint in {out_dir / CKPT_DIR}")
        st = load_checkpoint(ckpts[-1], map_location=dev)
        if st["config"].get("task") != cfg["task"]:
            raise UserError(f"checkpoint task {st['config'].get('task')!r} != config task {cfg['task']!r}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        _set_rng_state(st["rng"])
        if is_main and metrics_path.exists():  # drop lines logged after that checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= step]
            with atomic_path(metrics_path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in lines))
    elif checkpoint_paths(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints: pass resume or use a new folder")

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()

    writer = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            with atomic_path(metrics_path) as tmp:
                tmp.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed: optional
            writer = None
    stop = total if max_steps is None else min(total, int(max_steps))
    bar = None
    if is_main and cfg["progress"]:
        from gl10m.pipelines.runner import progress_bar
        bar = progress_bar(unit="steps")
        bar_task = bar.add_task(cfg["task"], total=stop, completed=step)
        bar.start()
    use_amp = dev.type == "cuda"

    def state() -> dict:
        return {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": _rng_state(), "config": jsonable(cfg),
                "dims": dims}

    last_ckpt: Path | None = None
    last_loss = float("nan")
    mf = open(metrics_path, "a") if is_main else None
    try:
        while step < stop:
            n_batches = 0
            batches = iter(_epoch_batches(dataset, cfg, epoch, rank, world, collate))
            i = -1
            while True:
                batch = next(batches, None)
                if not _all_have(batch is not None, world, dev):
                    break  # epoch over (under DDP: over as soon as any rank runs out)
                i += 1
                n_batches += 1
                if i < batch_in_epoch:
                    continue  # resumed mid-epoch: these batches were already trained on
                t0 = time.perf_counter()
                batch = _to_device(batch, dev)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, logs = task.loss(model, batch, text, step)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss at step {step}: {float(loss)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
                lr_now = opt.param_groups[0]["lr"]  # the rate this step used
                opt.step()
                sched.step()
                step += 1
                batch_in_epoch = i + 1
                last_loss = float(loss.detach())
                if is_main:
                    rec = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr_now,
                           "grad_norm": float(gn), "time_s": round(time.perf_counter() - t0, 4),
                           **{k: v for k, v in logs.items() if k != "loss"}}
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    if writer is not None:
                        for k, v in rec.items():
                            if k not in ("step", "epoch"):
                                writer.add_scalar(k, v, step)
                    if bar is not None:
                        bar.update(bar_task, advance=1, description=f"{cfg['task']} loss {last_loss:.4f}")
                if step % int(cfg["ckpt_every"]) == 0 or step >= stop:
                    if is_main:
                        last_ckpt = _save_checkpoint(out_dir, state(), int(cfg["keep_checkpoints"]))
                if step >= stop:
                    break
            if step >= stop:
                break
            if n_batches == 0:
                raise UserError(f"the {cfg['split']} split yields no batches")
            epoch += 1
            batch_in_epoch = 0
    finally:
        if mf is not None:
            mf.close()
        if bar is not None:
            bar.stop()
        if writer is not None:
            writer.close()
    if is_main and last_ckpt is None:
        last_ckpt = _save_checkpoint(out_dir, state(), int(cfg["keep_checkpoints"]))
    return {"step": step, "loss": last_loss, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": str(metrics_path), "out_dir": str(out_dir), "model": unwrap(model)}


def cli_train(config: str | Path, features: str | Path, out: str | Path, *, resume: bool = False,
              max_steps: int | None = None, device: str | None = None, echo=print) -> dict:
    """``gl10m model train --config C --features DIR --out DIR [--resume] [--max-steps N]
    [--device D]``: train the config's task; prints one summary line (rank 0)."""
    res = train(config, features, out, resume=resume, max_steps=max_steps, device=device)
    if int(os.environ.get("RANK", "0")) == 0:
        echo(f"trained to step {res['step']}: loss {res['loss']:.4f}; checkpoint {res['checkpoint']}; "
             f"metrics {res['metrics']}")
    return res
