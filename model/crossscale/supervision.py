"""Offline supervision for the sampler: the 10x10 utility map G*.

GL-10M's sampler regresses G* = s_vis * s_gain, normalised over the 100 HR tiles of a scene:

- ``s_vis`` [B, 100]: structural saliency of each HR tile (from frozen dense features; it is
  computed upstream and read from the feature cache).
- ``s_gain(p) = max(0, cos(F_h_p, F_T) - lam * cos(F_g, F_T))``: how much more the HR tile p
  says about the scene's concepts than the LR scene embedding already does, in a
  vision-language space. ``F_h_p`` is the HR tile embedding (``hr_embed``), ``F_g`` the global
  LR embedding (``lr_embed``) and ``F_T`` the text embeddings of the scene's concepts.

Novel concepts (``novel``: ids; the sampler config's ``supervision.novel_concepts``, see
:func:`resolve_novel_concepts`) are held out: their labels are ignored, so G* never rewards a
tile for showing a concept that is evaluated zero-shot.

A scene usually has several concepts. We aggregate over them by **max**: a tile is worth
observing if it adds information about at least one of the scene's concepts,
``s_gain(p) = max(0, max_{c in labels} (cos(F_h_p, T_c) - lam * cos(F_g, T_c)))``.
A scene without any label has no concept to gain information about: its s_gain is 0 on every
tile (so its multiplicative and semantic G* are all zeros, see the constant-map rule below).

Normalisation (:func:`minmax`) is min-max over the 100 tiles of each scene to [0, 1]. A map
whose range is at most ``eps`` (constant, e.g. all zeros) has no preferred tile and becomes
all zeros: the sampler is then taught to request nothing there, and no division by zero
happens.

Variants (ablations of the paper's supervision):

- ``multiplicative`` (default, the paper's): minmax(s_vis * s_gain)
- ``structural``: minmax(s_vis)
- ``semantic``: minmax(s_gain)
- ``additive``: minmax((minmax(s_vis) + minmax(s_gain)) / 2); each term is normalised first
  and the mean is normalised again so that every variant's G* has the same range (max 1
  unless the map is constant).
- ``coverage`` (ours, not the paper's): minmax(s_cover), where the scene's concepts *are*,
  from the sample's own per-tile concept fractions (``tile_frac``) instead of a frozen
  encoder's features: ``s_cover(p) = sum_{c in labels} [frac(p, c) > 0] / n_c`` with ``n_c``
  the number of the scene's tiles that hold concept c. A concept in one tile makes that tile
  worth a whole concept; large cover spread over 60 tiles adds 1/60 to each (LR sees it
  anyway). Novel concepts are held out as in s_gain. Why it exists: with the CPU bootstrap
  encoder, the paper's feature-derived G* picks tiles that do not hold the scene's concepts
  on the held-out states (an oracle sampler regressing G* perfectly gains little there, one
  covering the labelled concepts recovers most of the full-HR gap; README, "The model").
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from gl10m.errors import UserError
from gl10m.samples import N_TILES

VARIANTS = ("multiplicative", "structural", "semantic", "additive", "coverage")


def minmax(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise ``x`` [B, N] to [0, 1] along the last dim; rows whose range is
    ``<= eps`` (constant maps) become all zeros."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    rng = hi - lo
    flat = rng <= eps
    out = (x - lo) / torch.where(flat, torch.ones_like(rng), rng)
    return torch.where(flat, torch.zeros_like(out), out)


def _check(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise UserError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{name}: contains NaN or infinite values")


def resolve_novel_concepts(given, recorded: dict, n_concepts: int, what: str) -> list[int]:
    """The novel concept ids a training run holds out.

    ``given``: the config's list (ids), or None for the default: what the encoder held out of its
    pretraining (``recorded["encoder_novel"]``, from the feature cache), else the concepts the
    profile marks ``novel: true`` (``recorded["novel"]``). Refused (one line): an id out of range,
    a list that omits a concept the profile marks novel, or one naming a concept the encoder was
    pretrained on (it would not be zero-shot downstream either)."""
    profile = [int(c) for c in recorded.get("novel") or []]
    enc = recorded.get("encoder_novel")
    if given is None:
        novel = [int(c) for c in enc] if enc is not None else profile
    else:
        if isinstance(given, (str, bytes)) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                       for c in given):
            raise UserError(f"{what}: novel_concepts must be a list of concept ids, got {given!r}")
        novel = [int(c) for c in given]
    bad = [c for c in novel if not 0 <= c < n_concepts]
    if bad:
        raise UserError(f"{what}: novel concept {bad[0]} is outside 0..{n_concepts - 1}")
    omitted = sorted(set(profile) - set(novel))
    if omitted:
        raise UserError(f"{what}: novel_concepts omits concept(s) {omitted} that the profile marks novel")
    if enc is not None:
        seen = sorted(set(novel) - {int(c) for c in enc})
        if seen:
            raise UserError(f"{what}: novel concept(s) {seen} were not held out of the encoder's pretraining "
                            f"(it held out {sorted(int(c) for c in enc)}); pretrain it with them held out")
    return sorted(set(novel))


def _drop_novel(labels: torch.Tensor, novel) -> torch.Tensor:
    if not novel:
        return labels
    out = labels.clone()
    out[:, list(novel)] = 0
    return out


def s_gain(hr_embed: torch.Tensor, lr_embed: torch.Tensor, text: torch.Tensor,
           labels: torch.Tensor, *, lam: float = 0.5, novel=None) -> torch.Tensor:
    """Information gain of each HR tile over the LR scene embedding, [B, 100] (>= 0).

    Cosine similarities are taken after L2-normalising ``hr_embed`` and ``lr_embed``; ``text``
    is normalised too (a no-op for the cache's already normalised embeddings). Aggregated over
    the scene's concepts by max; scenes without labels get 0. ``novel``: concept ids held out
    (their labels are ignored, so s_gain never sees them)."""
    _check("hr_embed", hr_embed, (None, N_TILES, None))
    b, _, e = hr_embed.shape
    _check("lr_embed", lr_embed, (b, e))
    _check("text", text, (None, e))
    _check("labels", labels, (b, text.shape[0]))
    if not (isinstance(lam, (int, float)) and math.isfinite(lam)):
        raise UserError(f"lam: expected a finite number, got {lam!r}")
    if novel:  # held-out concepts are never a reason to observe a tile: treated as absent
        bad = [c for c in novel if not 0 <= int(c) < text.shape[0]]
        if bad:
            raise UserError(f"novel concept {bad[0]} is outside 0..{text.shape[0] - 1}")
        labels = _drop_novel(labels, [int(c) for c in novel])
    f_h = F.normalize(hr_embed.float(), dim=-1)
    f_g = F.normalize(lr_embed.float(), dim=-1)
    f_t = F.normalize(text.float(), dim=-1)
    sim_h = torch.einsum("bpe,ce->bpc", f_h, f_t)  # [B, 100, C]
    sim_g = f_g @ f_t.T  # [B, C]
    gain = sim_h - lam * sim_g[:, None, :]
    present = (labels > 0)[:, None, :]
    gain = gain.masked_fill(~present, float("-inf")).amax(dim=-1)  # -inf when no label
    return gain.clamp(min=0.0)


def s_cover(tile_frac: torch.Tensor, labels: torch.Tensor, *, novel=None) -> torch.Tensor:
    """Where the scene's concepts are, [B, 100] (>= 0): ``sum_c [frac(p, c) > 0] / n_c`` over
    the scene's labelled, non-novel concepts c, with ``n_c`` the number of tiles holding c (a
    labelled concept found in no tile adds nothing). ``tile_frac`` [B, 100, C]: the sample's
    per-tile concept fractions."""
    _check("tile_frac", tile_frac, (None, N_TILES, None))
    b, _, c = tile_frac.shape
    _check("labels", labels, (b, c))
    lab = labels
    if novel:
        bad = [k for k in novel if not 0 <= int(k) < c]
        if bad:
            raise UserError(f"novel concept {bad[0]} is outside 0..{c - 1}")
        lab = _drop_novel(labels, [int(k) for k in novel])
    present = (tile_frac.float() > 0) & (lab > 0)[:, None, :]  # [B, 100, C]
    n = present.sum(dim=1, keepdim=True)  # tiles per concept
    w = present.float() / n.clamp(min=1).float()
    return w.sum(dim=-1)


def cover_order(tile_frac: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scores [B, 100] whose order is a greedy cover of each scene's labelled concepts: the tile
    holding the most concepts not yet covered first (ties: the higher :func:`s_cover`, then the
    lower index), and so on; the first tile scores 100, the last 1. Reads the labels: an
    upper bound for a sampler (the evaluation's ``oracle_cover`` row), never a method."""
    _check("tile_frac", tile_frac, (None, N_TILES, None))
    b, n, c = tile_frac.shape
    _check("labels", labels, (b, c))
    present = (tile_frac.float() > 0) & (labels > 0)[:, None, :]
    tie = s_cover(tile_frac, labels)
    tie = tie / tie.amax(dim=1, keepdim=True).clamp(min=1e-9) * 1e-3  # < 1: only breaks ties
    covered = torch.zeros(b, c, dtype=torch.bool)
    taken = torch.zeros(b, n, dtype=torch.bool)
    out = torch.zeros(b, n)
    rows = torch.arange(b)
    for r in range(n):
        gain = (present & ~covered[:, None, :]).sum(dim=-1).float() + tie
        gain = gain.masked_fill(taken, -1.0)
        j = gain.argmax(dim=1)
        out[rows, j] = float(n - r)
        taken[rows, j] = True
        covered |= present[rows, j]
    return out


def g_star(s_vis: torch.Tensor, hr_embed: torch.Tensor, lr_embed: torch.Tensor,
           text: torch.Tensor, labels: torch.Tensor, *, lam: float = 0.5,
           variant: str = "multiplicative", eps: float = 1e-6, novel=None,
           tile_frac: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler's soft target G* [B, 100] in [0, 1] (see the module docstring); ``novel``
    concept ids are held out of s_gain (and s_cover). ``tile_frac`` [B, 100, C]: needed by
    the ``coverage`` variant only."""
    if variant not in VARIANTS:
        raise UserError(f"unknown G* variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise UserError(f"eps: expected a number >= 0, got {eps!r}")
    if variant == "coverage":
        if tile_frac is None:
            raise UserError("G* variant 'coverage' needs the per-tile concept fractions (tile_frac)")
        _check("s_vis", s_vis, (None, N_TILES))
        return minmax(s_cover(tile_frac, labels, novel=novel), eps)
    _check("s_vis", s_vis, (None, N_TILES))
    vis = s_vis.float()
    if variant == "structural":
        # Still validate the other inputs: a bad cache should fail the same way in every variant.
        s_gain(hr_embed, lr_embed, text, labels, lam=lam, novel=novel)
        return minmax(vis, eps)
    gain = s_gain(hr_embed, lr_embed, text, labels, lam=lam, novel=novel)
    if gain.shape[0] != vis.shape[0]:
        raise UserError(f"s_vis has batch size {vis.shape[0]}, hr_embed {gain.shape[0]}")
    if variant == "multiplicative":
        return minmax(vis * gain, eps)
    if variant == "semantic":
        return minmax(gain, eps)
    return minmax((minmax(vis, eps) + minmax(gain, eps)) / 2, eps)


def cache_g_star(batches: Iterable[dict], text: torch.Tensor, *, lam: float = 0.5,
                 variant: str = "multiplicative", eps: float = 1e-6, novel=None
                 ) -> Iterator[tuple[list, torch.Tensor]]:
    """Compute G* over an iterable of collated feature batches (e.g. a DataLoader over the
    feature cache). Yields ``(keys, g_star [B, 100])``; ``keys`` is the batch's ``"key"``
    (or ``"__key__"``) entry when present, else running integer indices."""
    seen = 0
    for batch in batches:
        need = ("s_vis", "hr_embed", "lr_embed", "labels") + (("tile_frac",) if variant == "coverage" else ())
        missing = [k for k in need if k not in batch]
        if missing:
            raise UserError(f"feature batch lacks {', '.join(missing)}")
        g = g_star(batch["s_vis"], batch["hr_embed"], batch["lr_embed"], text, batch["labels"],
                   lam=lam, variant=variant, eps=eps, novel=novel, tile_frac=batch.get("tile_frac"))
        keys = batch.get("key", batch.get("__key__"))
        if keys is None:
            keys = list(range(seen, seen + g.shape[0]))
        seen += g.shape[0]
        yield list(keys), g
