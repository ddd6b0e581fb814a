"""MapSR graph refinement: label propagation on a kNN feature graph, in plain torch (CPU or GPU).

Given node features ``X [N, D]`` (dense encoder features of pixels, or of blocks of pixels), node
positions ``P [N, 2]`` (pixels) and initial class scores ``Y [N, C]`` (cosine matching against the
class prompts), the refined scores are the solution of

    (I - alpha * S) F = Y,        S = D^-1/2 W D^-1/2,   D = diag(W 1)

(Zhou et al. 2004, "Learning with local and global consistency"; the form LPOSS and MapSR use).
``W`` is the symmetrised kNN affinity: for every node ``i`` its ``k`` most cosine-similar nodes
``j`` (itself excluded) get

    a_ij = max(0, cos(x_i, x_j)) ** gamma * exp(-sigma * |p_i - p_j| ** dist_pow) * exp(-color * |c_i - c_j|)

(``c`` the pixels' RGB in [0, 1]; ``color=0``, the default, leaves the image out: the reference's
graph), and ``W = A + A^T`` (a pair that is in each other's kNN gets both weights), diagonal zero. A node
with no edge (all its similarities <= 0) has degree 0 and keeps ``F = Y``. ``S`` has eigenvalues in
[-1, 1], so for ``0 <= alpha < 1`` the system matrix is symmetric positive definite and conjugate
gradient converges; all ``C`` columns are solved at once (one CG per column, vectorised).

Everything is torch: the kNN is a chunked ``X @ X^T`` + ``topk`` (memory ``chunk x N``, no faiss),
the graph a ``torch.sparse_coo_tensor`` (coalesced to CSR for the products), the CG loop
:func:`conjugate_gradient`. Defaults (``RefineConfig``) follow the MapSR reference: pixel windows
k=400, gamma=3, alpha=0.95, sigma=0.01; on superpixel-like blocks k=100, gamma=1, alpha=0.5, sigma=0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F


@contextmanager
def quiet_sparse():
    """Hide torch's notices about its sparse tensors ("Sparse CSR tensor support is in beta state",
    "Sparse invariant checks are implicitly disabled"): they say nothing to a MapSR user, and the
    graphs built here are valid by construction."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse CSR tensor support is in beta", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Sparse invariant checks are implicitly disabled",
                                category=UserWarning)
        yield


@dataclass
class RefineConfig:
    """Graph refinement settings (see the module docstring for the maths).

    ``mode``: ``"window"`` (default; nodes are pixels, the image is cut into ``window`` x ``window``
    pixel windows, each refined on its own graph, like the reference's sliding refinement) or
    ``"blocks"`` (nodes are ``block`` x ``block`` pixel blocks over a ``window``-sized region: a
    regular-grid stand-in for the reference's SLIC superpixels, whose defaults it uses when
    ``k``/``gamma``/``alpha``/``sigma`` are left ``None``). ``maxiter``/``tol``: CG stopping
    (the reference runs 10 iterations at rtol 1e-6). ``chunk``: rows per kNN similarity block.
    ``color``: weight of the image's colour difference in the edge weights (0: off, the reference;
    > 0 needs the image window, :func:`refine_window`'s ``image``): the encoder's features are
    coarser than the pixels (one token per several pixels), so only the image can say where inside
    a token a boundary runs.
    """

    mode: str = "window"
    window: int = 112
    block: int = 4
    k: int | None = None
    gamma: float | None = None
    alpha: float | None = None
    sigma: float | None = None
    dist_pow: float = 1.0
    maxiter: int = 10
    tol: float = 1e-6
    chunk: int = 2048
    color: float = 0.0

    DEFAULTS = {"window": dict(k=400, gamma=3.0, alpha=0.95, sigma=0.01),
                "blocks": dict(k=100, gamma=1.0, alpha=0.5, sigma=0.0)}

    def resolved(self) -> "RefineConfig":
        """A copy with the mode's defaults filled in for the ``None`` fields, checked."""
        if self.mode not in self.DEFAULTS:
            raise ValueError(f"refine mode must be one of {', '.join(self.DEFAULTS)}, got {self.mode!r}")
        d = asdict(self)
        for key, v in self.DEFAULTS[self.mode].items():
            if d[key] is None:
                d[key] = v
        out = RefineConfig(**d)
        if not 0.0 <= out.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {out.alpha}")
        if out.k < 1 or out.window < 2 or out.block < 1 or out.maxiter < 1:
            raise ValueError("k, window, block and maxiter must be positive")
        if out.color < 0 or out.sigma < 0:
            raise ValueError("color and sigma must be >= 0")
        return out


def knn_cosine(x: torch.Tensor, k: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x [N, D]`` the ``k`` most cosine-similar other rows: ``(sims [N, k], idx
    [N, k])``, best first. Chunked ``x @ x^T`` + ``topk``; self matches are excluded.
    ``k`` is capped at ``N - 1``."""
    n = x.shape[0]
    k = min(int(k), n - 1)
    if k < 1:
        return x.new_zeros((n, 0)), torch.zeros((n, 0), dtype=torch.long, device=x.device)
    xn = F.normalize(x.float(), dim=-1)
    sims, idx = [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        sim = xn[s:e] @ xn.T
        sim[torch.arange(e - s, device=x.device), torch.arange(s, e, device=x.device)] = float("-inf")
        v, i = sim.topk(k, dim=1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@quiet_sparse()
def knn_graph(x: torch.Tensor, k: int, gamma: float = 1.0, sigma: float = 0.0, pos: torch.Tensor | None = None,
              dist_pow: float = 1.0, chunk: int = 2048, color: float = 0.0,
              rgb: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric kNN affinity ``W = A + A^T`` (sparse COO, coalesced, ``[N, N]``) of the module
    docstring: ``a_ij = max(0, cos)^gamma * exp(-sigma * |p_i - p_j|^dist_pow) * exp(-color *
    |c_i - c_j|)`` for ``j`` in the kNN of ``i``. ``pos [N, 2]`` is needed only when ``sigma > 0``,
    ``rgb [N, 3]`` (in [0, 1]) only when ``color > 0``."""
    n = x.shape[0]
    sims, idx = knn_cosine(x, k, chunk)
    w = sims.clamp_min(0.0) ** gamma
    if sigma and sigma > 0:
        if pos is None:
            raise ValueError("sigma > 0 needs node positions")
        p = pos.float().to(x.device)
        d = (p[:, None, :] - p[idx]).norm(dim=-1)
        w = w * torch.exp(-sigma * d ** dist_pow)
    if color and color > 0:
        if rgb is None:
            raise ValueError("color > 0 needs the nodes' colours")
        c = rgb.float().to(x.device)
        w = w * torch.exp(-color * (c[:, None, :] - c[idx]).norm(dim=-1))
    rows = torch.arange(n, device=x.device).repeat_interleave(idx.shape[1])
    cols = idx.reshape(-1)
    vals = w.reshape(-1)
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    ij = torch.cat([torch.stack([rows, cols]), torch.stack([cols, rows])], 1)
    return torch.sparse_coo_tensor(ij, torch.cat([vals, vals]), (n, n)).coalesce()


@quiet_sparse()
def normalize_graph(w: torch.Tensor) -> torch.Tensor:
    """``S = D^-1/2 W D^-1/2`` of a sparse ``W`` (diagonal dropped first; degree-0 nodes get 0 rows)."""
    w = w.coalesce()
    ij, v = w.indices(), w.values()
    off = ij[0] != ij[1]
    ij, v = ij[:, off], v[off]
    deg = torch.zeros(w.shape[0], dtype=v.dtype, device=v.device).index_add_(0, ij[0], v)
    dinv = torch.where(deg > 0, deg.clamp_min(1e-30).rsqrt(), torch.zeros_like(deg))
    return torch.sparse_coo_tensor(ij, v * dinv[ij[0]] * dinv[ij[1]], w.shape).coalesce()


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor | None = None,
                       maxiter: int = 10, tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Solve ``A X = B`` for symmetric positive definite ``A`` (given as ``matvec`` on ``[N, C]``),
    every column an independent CG run, vectorised. Stops when every column's residual norm is
    ``<= tol * |b_col|`` or after ``maxiter`` iterations. Returns ``(X, iterations)``."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(0)
    bnorm = b.norm(dim=0).clamp_min(1e-30)
    it = 0
    for it in range(1, maxiter + 1):
        if bool((rs.sqrt() <= tol * bnorm).all()):
            it -= 1
            break
        ap = matvec(p)
        pap = (p * ap).sum(0)
        a = torch.where(pap > 0, rs / pap.clamp_min(1e-30), torch.zeros_like(rs))
        x = x + a * p
        r = r - a * ap
        rs_new = (r * r).sum(0)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + beta * p
        rs = rs_new
    return x, it


@quiet_sparse()
def propagate(s: torch.Tensor, y: torch.Tensor, alpha: float, maxiter: int = 10, tol: float = 1e-6) -> torch.Tensor:
    """Label propagation: ``F = (I - alpha S)^-1 Y`` by CG, ``S`` a normalised sparse graph
    (:func:`normalize_graph`), ``Y [N, C]``."""
    y = y.float()
    s_csr = s.to_sparse_csr() if s.layout == torch.sparse_coo else s

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return v - alpha * (s_csr @ v)

    out, _ = conjugate_gradient(matvec, y, maxiter=maxiter, tol=tol)
    return out


def refine_nodes(feats: torch.Tensor, scores: torch.Tensor, pos: torch.Tensor | None, cfg: RefineConfig,
                 rgb: torch.Tensor | None = None) -> torch.Tensor:
    """One graph: node features ``[N, D]``, initial scores ``[N, C]``, positions ``[N, 2]`` (and
    colours ``[N, 3]`` in [0, 1] when ``cfg.color > 0``) -> refined scores ``[N, C]``."""
    c = cfg.resolved()
    w = knn_graph(feats, c.k, c.gamma, c.sigma, pos, c.dist_pow, c.chunk, c.color, rgb)
    return propagate(normalize_graph(w), scores, c.alpha, c.maxiter, c.tol)


def _grid_pos(h: int, w: int, scale: float, device) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([yy, xx], -1).reshape(-1, 2).float() * scale


def refine_window(feats: torch.Tensor, scores: torch.Tensor, cfg: RefineConfig,
                  image: torch.Tensor | None = None) -> torch.Tensor:
    """Refine one window: ``feats [D, h, w]`` (pixel features), ``scores [C, h, w]`` -> ``[C, h, w]``;
    ``image [3, h, w]`` (uint8 or [0, 1] floats) is needed only when ``cfg.color > 0``.
    ``window`` mode: every pixel a node. ``blocks`` mode: features and scores average-pooled over
    ``block`` x ``block`` pixels (the nodes, positions at block centres in pixels), refined, and the
    refined block scores upsampled back (nearest) and added to the pixel scores' deviation from
    their block mean, so within-block detail of the cosine matching is kept."""
    c = cfg.resolved()
    d, h, w = feats.shape
    nc = scores.shape[0]
    rgb = None
    if c.color > 0:
        if image is None:
            raise ValueError("refinement with color > 0 needs the image")
        rgb = torch.as_tensor(image)[:3].to(feats.device).float()
        if torch.as_tensor(image).dtype == torch.uint8:
            rgb = rgb / 255.0
    if c.mode == "window":
        x = feats.reshape(d, -1).T
        y = scores.reshape(nc, -1).T
        out = refine_nodes(x, y, _grid_pos(h, w, 1.0, feats.device), c,
                           None if rgb is None else rgb.reshape(3, -1).T)
        return out.T.reshape(nc, h, w)
    b = c.block
    fx = F.avg_pool2d(feats[None], b, b, ceil_mode=True)[0]
    sy = F.avg_pool2d(scores[None], b, b, ceil_mode=True)[0]
    hb, wb = fx.shape[1:]
    cb = None if rgb is None else F.avg_pool2d(rgb[None], b, b, ceil_mode=True)[0].reshape(3, -1).T
    out = refine_nodes(fx.reshape(d, -1).T, sy.reshape(nc, -1).T, _grid_pos(hb, wb, float(b), feats.device), c, cb)
    out = out.T.reshape(nc, hb, wb)
    return out.repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :h, :w]
