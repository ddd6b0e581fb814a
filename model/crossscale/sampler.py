"""The LR-only sampler: a 10x10 utility map over the HR tiles, tile selection, OBR.

The sampler sees only the LR scene (frozen LR encoder tokens ``lr_tokens`` [B, Gl, Gl, D],
Gl a multiple of 10 so that every tile owns a (Gl/10)x(Gl/10) block of cells) plus two
coordinate channels, and predicts one logit per HR tile, flattened in tile order
``t = row * 10 + col`` (row 0 north, col 0 west): ``[B, 100]``. It is trained with
BCE-with-logits against the soft target G* (:mod:`gl10m.model.crossscale.supervision`).

Selection (:func:`select`, defined in :mod:`gl10m.model.crossscale.selection`, the one rule used in training
metrics, evaluation and the sweep): a tile is a candidate when ``sigmoid(logit) > threshold``
(strict, so threshold 1.0 selects nothing); ``top_k`` and per-class ``budgets`` cap how many
candidates a scene keeps (highest logit first, ties to the lower tile index).

OBR (observation budget ratio) = requested HR area / scene area = selected tiles / 100.

Config: the trainer's config (``model/configs/sampler-train*.yaml``) with ``task: sampler``,
``model`` the architecture (a dict, or a file such as ``sampler-tiny.yaml`` that the trainer
reads), and two task keys (:attr:`SamplerTask.config_keys`); other keys belong to the trainer::

    model:       {hidden: int, kernel: odd int, layers: int >= 0}
    supervision: {variant: multiplicative|structural|semantic|additive|coverage, lam: float,
                  novel_concepts: null | [concept ids]}   # held out of s_gain; null: the encoder's
                                                          # held-out list (feature cache), else the profile's
    selection:   {threshold: float in [0, 1] | null, top_k: int in [1, 100]}
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from gl10m import safeyaml
from gl10m.errors import UserError
from gl10m.samples import GRID

from .selection import (check_scores, check_threshold, obr, rank, scene_budgets, select,  # noqa: F401
                        top_k_mask)
from .supervision import N_TILES, VARIANTS, g_star, resolve_novel_concepts

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

DEFAULTS = {
    "model": {"hidden": 64, "kernel": 3, "layers": 1},
    "supervision": {"variant": "multiplicative", "lam": 0.5, "novel_concepts": None},
    "selection": {"threshold": 0.55, "top_k": 12},
}


# -- config -----------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_config(cfg: dict | None) -> dict:
    """The sampler's sections of ``cfg`` merged over :data:`DEFAULTS` and validated."""
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise UserError(f"sampler config: expected a mapping, got {type(cfg).__name__}")
    out = {}
    for section, defaults in DEFAULTS.items():
        given = cfg.get(section) or {}
        if section == "model" and isinstance(given, (str, Path)):
            given = load_model_config(given)
        if not isinstance(given, dict):
            raise UserError(f"sampler config: '{section}' must be a mapping")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise UserError(f"sampler config: unknown key(s) in '{section}': {', '.join(unknown)}")
        out[section] = {**defaults, **given}
    m, s, sel = out["model"], out["supervision"], out["selection"]
    if not (_is_int(m["hidden"]) and m["hidden"] >= 1):
        raise UserError(f"sampler config: model.hidden must be an int >= 1, got {m['hidden']!r}")
    if not (_is_int(m["kernel"]) and m["kernel"] >= 1 and m["kernel"] % 2 == 1):
        raise UserError(f"sampler config: model.kernel must be an odd int >= 1, got {m['kernel']!r}")
    if not (_is_int(m["layers"]) and m["layers"] >= 0):
        raise UserError(f"sampler config: model.layers must be an int >= 0, got {m['layers']!r}")
    if s["variant"] not in VARIANTS:
        raise UserError(f"sampler config: supervision.variant must be one of "
                        f"{', '.join(VARIANTS)}, got {s['variant']!r}")
    if not (isinstance(s["lam"], (int, float)) and not isinstance(s["lam"], bool)
            and math.isfinite(s["lam"])):
        raise UserError(f"sampler config: supervision.lam must be a number, got {s['lam']!r}")
    _check_threshold(sel["threshold"])
    if not (_is_int(sel["top_k"]) and 1 <= sel["top_k"] <= N_TILES):
        raise UserError(f"sampler config: selection.top_k must be an int in [1, 100], "
                        f"got {sel['top_k']!r}")
    return out


def load_model_config(name_or_path: str | Path) -> dict:
    """A sampler architecture (the ``model`` section): a YAML path, or a bundled name
    ("tiny", "base") or file name ("sampler-tiny.yaml") under ``model/configs``."""
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"sampler-{name_or_path}.yaml"
    elif not p.is_absolute() and not p.is_file():
        p = CONFIG_DIR / p
    if not p.is_file():
        raise UserError(f"sampler config not found: {p}")
    try:
        raw = safeyaml.load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sampler config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"sampler config {p}: expected a mapping")
    return dict(raw or {})


# -- the model --------------------------------------------------------------------------------
class Sampler(nn.Module):
    """LR tokens [B, Gl, Gl, D] -> tile logits [B, 100] (tile order ``row * 10 + col``).

    Two coordinate channels are appended (x = column, y = row, cell centres scaled to
    [-1, 1]; y = -1 is the north edge), then a 1x1 conv (D+2 -> hidden) + GELU, ``layers``
    kxk convs + GELU, average pooling of each tile's (Gl/10)x(Gl/10) block, and a 1x1 conv
    to one logit per tile."""

    def __init__(self, dim: int, hidden: int = 64, kernel: int = 3, layers: int = 1):
        super().__init__()
        self.dim = dim
        self.proj = nn.Conv2d(dim + 2, hidden, 1)
        self.spatial = nn.ModuleList(
            nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(layers))
        self.head = nn.Conv2d(hidden, 1, 1)
        self.act = nn.GELU()

    @staticmethod
    def coords(gl: int, *, device=None, dtype=None) -> torch.Tensor:
        """[2, Gl, Gl]: channel 0 = x (west -1 .. east +1), channel 1 = y (north -1 .. south +1)."""
        c = (torch.arange(gl, device=device, dtype=dtype) + 0.5) / gl * 2 - 1
        y, x = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([x, y])

    def forward(self, lr_tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(lr_tokens, torch.Tensor) or lr_tokens.dim() != 4:
            raise UserError("lr_tokens: expected a tensor [B, Gl, Gl, D]")
        b, gh, gw, d = lr_tokens.shape
        if gh != gw or gh % GRID or gh == 0:
            raise UserError(f"lr_tokens: expected a square grid with Gl a multiple of {GRID}, "
                            f"got {gh}x{gw}")
        if d != self.dim:
            raise UserError(f"lr_tokens: expected D={self.dim} channels, got {d}")
        x = lr_tokens.permute(0, 3, 1, 2)
        xy = self.coords(gh, device=x.device, dtype=x.dtype).expand(b, -1, -1, -1)
        x = self.act(self.proj(torch.cat([x, xy], dim=1)))
        for conv in self.spatial:
            x = self.act(conv(x))
        if gh != GRID:
            x = F.avg_pool2d(x, gh // GRID)
        return self.head(x).flatten(1)  # [B, 1, 10, 10] -> [B, 100], row-major = tile order


def build_sampler(cfg: dict | None, dim: int) -> Sampler:
    m = resolve_config(cfg)["model"]
    if not (_is_int(dim) and dim >= 1):
        raise UserError(f"sampler: feature dim D must be an int >= 1, got {dim!r}")
    return Sampler(dim, hidden=m["hidden"], kernel=m["kernel"], layers=m["layers"])


def load_sampler(path: str | Path, map_location="cpu", *, state: dict | None = None) -> Sampler:
    """A trained sampler (in eval mode) from a trainer checkpoint ({"model": state dict,
    "config", "dims"}), loaded with ``weights_only=True`` (or from its already read ``state``).
    Usable as the predictor's scorer: its logits rank tiles like its probabilities."""
    from .checkpoint import load_weights, read_checkpoint

    st = state if state is not None else read_checkpoint(path, "sampler", map_location)
    task = (st["config"] or {}).get("task")
    if task != "sampler":
        raise UserError(f"checkpoint {path} is for task {task!r}, not 'sampler'")
    return load_weights(SamplerTask().build_model(st["config"], st["dims"]), st, "sampler", path)


def sampler_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits against soft targets in [0, 1] (both [B, 100])."""
    if logits.shape != target.shape:
        raise UserError(f"sampler loss: logits {list(logits.shape)} vs target {list(target.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


# -- selection: the one rule lives in model/crossscale/selection.py ----------------------------------------
_check_threshold = check_threshold
_check_scores = check_scores


def precision_at_k(scores: torch.Tensor, target: torch.Tensor, k: int = 12,
                   eps: float = 1e-6) -> float:
    """Mean |top-k(scores) & top-k(target)| / k over the scenes whose target is not constant
    (a constant G* has no top-k); NaN when no scene qualifies."""
    _check_scores(scores)
    _check_scores(target, "target")
    pred = top_k_mask(scores, k)
    true = top_k_mask(target, k)
    t = target.float()
    valid = (t.amax(dim=1) - t.amin(dim=1)) > eps
    if not bool(valid.any()):
        return float("nan")
    hits = (pred & true).sum(dim=1).float() / k
    return float(hits[valid].mean())


# -- the training task ------------------------------------------------------------------------
class SamplerTask:
    """The trainer's task protocol for the sampler: G* is computed on the fly from the
    feature batch (``s_vis``, ``hr_embed``, ``lr_embed``, ``labels``) and the text embeddings;
    the model sees ``lr_tokens`` only."""

    name = "sampler"
    config_keys = ("supervision", "selection")
    needs = ("lr_tokens", "s_vis", "hr_embed", "lr_embed", "labels")  # + tile_frac for the coverage variant

    def __init__(self, cfg: dict | None = None):
        self.cfg = resolve_config(cfg)

    def build_model(self, cfg: dict | None, dims: dict) -> Sampler:
        self.cfg = resolve_config(cfg)
        nc = dims.get("n_concepts") if isinstance(dims, dict) else None
        novel = self.cfg["supervision"]["novel_concepts"]
        if novel is not None and nc:
            self.cfg["supervision"]["novel_concepts"] = resolve_novel_concepts(novel, {}, int(nc), "sampler")
        # The trainer gives the LR token width as D_lr when it differs from the HR width D.
        if not isinstance(dims, dict) or ("D_lr" not in dims and "D" not in dims):
            raise UserError("sampler: dims must give the LR token width (D_lr or D)")
        return build_sampler(self.cfg, dims.get("D_lr", dims.get("D")))

    def targets(self, batch: dict, text: torch.Tensor) -> torch.Tensor:
        need = self.needs + (("tile_frac",) if self.cfg["supervision"]["variant"] == "coverage" else ())
        missing = [k for k in need if k not in batch]
        if missing:
            raise UserError(f"sampler batch lacks {', '.join(missing)}")
        sup = self.cfg["supervision"]
        dev = batch["s_vis"].device
        with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
            return g_star(batch["s_vis"], batch["hr_embed"], batch["lr_embed"], text.to(dev),
                          batch["labels"], lam=sup["lam"], variant=sup["variant"], novel=sup["novel_concepts"],
                          tile_frac=batch.get("tile_frac"))

    def loss(self, model: nn.Module, batch: dict, text: torch.Tensor,
             step: int) -> tuple[torch.Tensor, dict[str, float]]:
        target = self.targets(batch, text)
        logits = model(batch["lr_tokens"])
        loss = sampler_loss(logits, target.to(logits.device))
        sel = self.cfg["selection"]
        with torch.no_grad():
            lg = logits.detach().float()
            metrics = {"bce": float(loss.detach())}
            if sel["threshold"] is not None:  # the evaluation's rule, on the same scores
                _, mean = obr(select(lg, threshold=sel["threshold"]))
                metrics[f"obr@{sel['threshold']:g}"] = mean
            k = sel["top_k"]
            metrics[f"precision@{k}"] = precision_at_k(lg, target.to(lg.device), k=k)
        return loss, metrics


TASKS = {SamplerTask.name: SamplerTask}
