"""Reading a trainer checkpoint for inference: one place for the checks every loader makes."""
from __future__ import annotations

from pathlib import Path

import torch

from gl10m.errors import UserError


def read_checkpoint(path: str | Path, what: str, map_location="cpu") -> dict:
    """A trainer checkpoint ({"model": state dict, "config", "dims", ...}) loaded with
    ``weights_only=True``; one-line errors name `what` ("sampler", "predictor")."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} checkpoint not found: {p}")
    try:
        st = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{what} checkpoint {p}: cannot be read ({type(e).__name__})") from None
    if not isinstance(st, dict) or not {"model", "config", "dims"} <= set(st):
        raise UserError(f"{what} checkpoint {p}: expected model, config and dims entries")
    return st


def load_weights(model: torch.nn.Module, st: dict, what: str, path) -> torch.nn.Module:
    """``model`` with the checkpoint's weights, in eval mode."""
    try:
        model.load_state_dict(st["model"])
    except RuntimeError:
        raise UserError(f"{what} checkpoint {path}: weights do not match its config") from None
    return model.eval()
