"""Generalisation metrics for generated samples (Section 4.1 of arXiv 2409.02426).

* :func:`gl_score` (eq. (21)): ``D(x_gen) / D(x_ref)`` with ``D(X) = sum_i min_{j != i} ||x_i - x_j||``;
  near 0 when the generated samples collapse onto (copies of) a few training points, near 1 when
  they are spread like fresh samples of the data distribution.
* :func:`copy_detection_score`: the share of generated samples whose nearest training sample
  (cosine similarity of raw pixels or of a feature map) exceeds a threshold; the paper's real-data
  GL score is ``1 - copy_detection_score(..., threshold=0.6)``.

Nearest neighbours are computed in chunks (``chunk`` rows against ``chunk`` columns at a time), so
no N x N matrix is ever held.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .._args import as_int, number_or_tensor

__all__ = ["nearest_neighbor_distances", "nn_distance_sum", "gl_score", "max_cosine_similarity",
           "copy_detection_score"]


def _as_matrix(x, name: str, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be floating point, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{where}: {name} must be [N, ...] with a feature dimension, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: {name} is empty")
    x = x.reshape(x.shape[0], -1)
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: {name} contains NaN or Inf")
    return x


def _check_chunk(chunk: int, where: str) -> int:
    return as_int(chunk, "chunk", where, 1)


def _check_norms(sq: torch.Tensor, name: str, where: str) -> None:
    """sq: squared row norms of finite rows; Inf where entries of ~1e154 and more overflow."""
    if not torch.isfinite(sq).all():
        raise ValueError(f"{where}: {name} is too large: its squared norms overflow float64; "
                         "rescale it")


@torch.no_grad()
def nearest_neighbor_distances(x: torch.Tensor, y: Optional[torch.Tensor] = None,
                               chunk: int = 1024) -> torch.Tensor:
    """For each row of ``x`` the Euclidean distance to its nearest row of ``y``; with ``y=None``
    the nearest *other* row of ``x`` (the row itself excluded by index, so duplicates give ~0).
    Computed in float64 on rows centred on the mean of ``y`` (so a common offset costs no
    accuracy), ``chunk x chunk`` blocks at a time."""
    return _nn_distances(x, y, chunk, "nearest_neighbor_distances")


@torch.no_grad()
def _nn_distances(x, y, chunk, where: str, x_name: str = "x", y_name: str = "y") -> torch.Tensor:
    """nearest_neighbor_distances with errors naming the caller (where) and its arguments."""
    chunk = _check_chunk(chunk, where)
    x = _as_matrix(x, x_name, where).to(torch.float64)
    self_mode = y is None
    if self_mode:
        if x.shape[0] < 2:
            raise ValueError(f"{where}: {x_name} needs at least 2 rows for nearest neighbours "
                             "among itself")
        y, y_name = x, x_name
    else:
        y = _as_matrix(y, y_name, where).to(torch.float64)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"{where}: {x_name} has {x.shape[1]} features but {y_name} has "
                             f"{y.shape[1]}")
    # |x|^2 + |y|^2 - 2 x.y cancels to round-off when the norms dwarf the distances (a common
    # offset of 1e8 gave every distance 0): centred on the reference rows' mean, it does not
    centre = y.mean(0)
    x = x - centre
    y = x if self_mode else y - centre
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    y_sq = (y * y).sum(1)
    _check_norms(y_sq, y_name, where)
    for i0 in range(0, x.shape[0], chunk):
        xi = x[i0:i0 + chunk]
        xi_sq = (xi * xi).sum(1, keepdim=True)
        if not self_mode:
            _check_norms(xi_sq, x_name, where)
        best = torch.full((xi.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
        for j0 in range(0, y.shape[0], chunk):
            yj = y[j0:j0 + chunk]
            d2 = torch.addmm(y_sq[j0:j0 + chunk][None, :], xi, yj.T, alpha=-2.0).add_(xi_sq)
            if self_mode and i0 == j0:  # rows and columns are aligned chunks of the same matrix
                d2.fill_diagonal_(float("inf"))
            best = torch.minimum(best, d2.min(dim=1).values.clamp_min_(0))
        out[i0:i0 + xi.shape[0]] = best
    return out.sqrt()


def nn_distance_sum(x: torch.Tensor, chunk: int = 1024) -> float:
    """``D(X) = sum_i min_{j != i} ||x_i - x_j||`` (eq. (21))."""
    return float(_nn_distances(x, None, chunk, "nn_distance_sum").sum())


def gl_score(x_gen: torch.Tensor, x_ref: torch.Tensor, chunk: int = 1024) -> float:
    """GL score (21): ``D(x_gen) / D(x_ref)``; ``x_ref`` are fresh samples of the data
    distribution, as many as ``x_gen`` (D grows with N: 1000 against 100 samples of one
    distribution scored 6.25, so unequal counts are an error). Each needs at least 2 rows."""
    where = "gl_score"
    g = _as_matrix(x_gen, "x_gen", where)
    r = _as_matrix(x_ref, "x_ref", where)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"{where}: x_gen has {g.shape[1]} features but x_ref has {r.shape[1]}")
    if g.shape[0] != r.shape[0]:
        raise ValueError(f"{where}: x_gen has {g.shape[0]} samples but x_ref has {r.shape[0]}; "
                         "D(X) grows with the number of samples, so use as many of each")
    if g.shape[0] < 2:
        raise ValueError(f"{where}: x_gen and x_ref need at least 2 samples each, got "
                         f"{g.shape[0]}")
    d_ref = float(_nn_distances(r, None, chunk, where, "x_ref").sum())
    if d_ref <= 0:
        raise ValueError(f"{where}: x_ref has D = 0 (all reference samples coincide)")
    return float(_nn_distances(g, None, chunk, where, "x_gen").sum()) / d_ref


@torch.no_grad()
def max_cosine_similarity(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row of ``x`` the largest cosine similarity to a row of ``y`` (zero rows count as
    similarity 0)."""
    return _max_cos(x, y, chunk, "max_cosine_similarity")


@torch.no_grad()
def _max_cos(x, y, chunk, where: str, x_name: str = "x", y_name: str = "y") -> torch.Tensor:
    """max_cosine_similarity with errors naming the caller (where) and its arguments."""
    chunk = _check_chunk(chunk, where)
    x = _as_matrix(x, x_name, where).to(torch.float64)
    y = _as_matrix(y, y_name, where).to(torch.float64)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"{where}: {x_name} has {x.shape[1]} features but {y_name} has "
                         f"{y.shape[1]}")
    x_norm, y_norm = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
    _check_norms(x_norm, x_name, where)  # an Inf norm would turn the row into zeros
    _check_norms(y_norm, y_name, where)
    xn = x / x_norm.clamp_min(1e-300)
    yn = y / y_norm.clamp_min(1e-300)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i0 in range(0, x.shape[0], chunk):
        xi = xn[i0:i0 + chunk]
        best = torch.full((xi.shape[0],), -float("inf"), dtype=torch.float64, device=x.device)
        for j0 in range(0, yn.shape[0], chunk):
            best = torch.maximum(best, (xi @ yn[j0:j0 + chunk].T).max(dim=1).values)
        out[i0:i0 + xi.shape[0]] = best
    return out


def copy_detection_score(x_gen: torch.Tensor, x_train: torch.Tensor, threshold: float = 0.6,
                         features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         chunk: int = 1024) -> float:
    """Share of generated samples whose most similar training sample has cosine similarity
    ``> threshold``, on raw values or on ``features(x)`` (a feature map applied to both sets)."""
    where = "copy_detection_score"
    if isinstance(threshold, torch.Tensor) and (threshold.is_complex()
                                                or threshold.dtype == torch.bool):
        raise TypeError(f"{where}: threshold must be real, got dtype {threshold.dtype}")
    t = number_or_tensor(threshold.item() if isinstance(threshold, np.generic) else threshold,
                         "threshold", where)
    if t.numel() != 1:
        raise ValueError(f"{where}: threshold must be one number, got shape {tuple(t.shape)}")
    thr = float(t)
    if not -1.0 <= thr <= 1.0:
        raise ValueError(f"{where}: threshold must be in [-1, 1], got {threshold}")
    names = ("x_gen", "x_train")
    if features is not None:
        if not callable(features):
            raise TypeError(f"{where}: features must be callable (a feature map) or None, got "
                            f"{type(features).__name__}")
        with torch.no_grad():
            x_gen, x_train = features(x_gen), features(x_train)
        names = ("features(x_gen)", "features(x_train)")
    sim = _max_cos(x_gen, x_train, chunk, where, *names)
    return float((sim > thr).double().mean())
