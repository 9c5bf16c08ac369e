"""Subspace-recovery and clustering metrics (paper Section E.1, eq. after (48)).

``subspace_distance`` is ``min_Pi (1/K) sum_k ||U_Pi(k) U_Pi(k)^T - U*_k U*_k^T||`` with the
permutation found by Hungarian matching (``scipy.optimize.linear_sum_assignment``) on the K x K
matrix of pairwise distances, which gives the exact minimum over permutations. The projector is
``U U^T`` of the first ``d_k`` columns as written in the paper (no re-orthonormalisation: a
non-orthonormal estimate is penalised).
"""
from __future__ import annotations

import numpy as np
import torch

from .._args import _check_tensor, dims_list, number_or_tensor

__all__ = ["subspace_distance", "recovery_success", "clustering_accuracy", "projectors"]

NORMS = {"spectral": 2, "fro": "fro"}


def _as4(U, name):
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"subspace_distance: {name} must be a torch.Tensor")
    if U.is_complex() or U.dtype == torch.bool:
        raise TypeError(f"subspace_distance: {name} must be real, got dtype {U.dtype}")
    if U.dim() == 3:
        return U.unsqueeze(0), False
    if U.dim() == 4:
        return U, True
    raise ValueError(f"subspace_distance: {name} must be [K, n, d] or [P, K, n, d], "
                     f"got shape {tuple(U.shape)}")


def projectors(U: torch.Tensor, dims) -> torch.Tensor:
    """``[P, K, n, n]`` (``[K, n, n]`` for ``[K, n, dmax]``) projectors ``U_k U_k^T`` from the
    first ``dims[k]`` columns of ``U`` ``[P, K, n, dmax]`` (real, finite); ``dims``: one int or K
    ints in [1, dmax]."""
    where = "projectors"
    _check_tensor(U, "U", where)
    if U.dim() not in (3, 4):
        raise ValueError(f"{where}: U must be [K, n, dmax] or [P, K, n, dmax], got shape "
                         f"{tuple(U.shape)}")
    if U.is_complex() or U.dtype == torch.bool:
        raise TypeError(f"{where}: U must be real, got dtype {U.dtype}")
    dims = dims_list(dims, U.shape[-3], where, hi=U.shape[-1], hi_name="dmax")
    if not torch.isfinite(U).all():
        raise ValueError(f"{where}: U contains NaN or Inf")
    return _projectors(U, dims)


def _projectors(U: torch.Tensor, dims: list) -> torch.Tensor:
    """projectors for checked arguments."""
    mask = (torch.arange(U.shape[-1], device=U.device)[None, :]
            < torch.as_tensor(dims, device=U.device)[:, None]).to(U.dtype)  # [K, dmax]
    Um = U * mask[:, None, :]
    return Um @ Um.transpose(-1, -2)


def subspace_distance(U_est: torch.Tensor, U_true: torch.Tensor, dims=None,
                      norm: str = "spectral", dims_true=None, return_perm: bool = False):
    """Recovery distance per instance.

    Args:
        U_est: ``[P, K, n, d]`` (or ``[K, n, d]``) estimated bases.
        U_true: ground truth, same layout (``d`` may differ from ``U_est``'s).
        dims: the K dimensions d_k used for both (default: all columns); ``dims_true`` overrides
            them for ``U_true``.
        norm: ``"spectral"`` (default, as in the paper's experiments) or ``"fro"``.
        return_perm: also return the ``[P, K]`` matching, ``perm[p, k]`` = estimate matched to
            true component k.

    Returns:
        float64 tensor ``[P]`` (a 0-d tensor for unbatched inputs).
    """
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"subspace_distance: norm must be one of {sorted(NORMS)}, got {norm!r}")
    if not isinstance(return_perm, (bool, np.bool_)):
        raise TypeError(f"subspace_distance: return_perm must be a bool, got {return_perm!r}")
    A, batched = _as4(U_est, "U_est")
    B, batched_t = _as4(U_true, "U_true")
    if A.shape[1] != B.shape[1] or A.shape[2] != B.shape[2]:
        raise ValueError(f"subspace_distance: U_est {tuple(A.shape)} and U_true "
                         f"{tuple(B.shape)} differ in K or n")
    if A.shape[0] != B.shape[0]:
        if A.shape[0] == 1 or B.shape[0] == 1:
            P = max(A.shape[0], B.shape[0])
            A, B = A.expand(P, *A.shape[1:]), B.expand(P, *B.shape[1:])
        else:
            raise ValueError(f"subspace_distance: {A.shape[0]} estimated instances but "
                             f"{B.shape[0]} true ones")
    K = A.shape[1]
    if K == 0:
        raise ValueError("subspace_distance: K = 0")
    w = "subspace_distance"
    dmax_e, dmax_t = A.shape[-1], B.shape[-1]
    dims_e = [dmax_e] * K if dims is None else dims_list(dims, K, w, hi=dmax_e, hi_name="dmax")
    if dims_true is not None:
        dims_t = dims_list(dims_true, K, w, "dims_true", hi=dmax_t, hi_name="dmax of U_true")
    elif dims is None:
        dims_t = [dmax_t] * K
    else:
        dims_t = dims_list(dims_e, K, w, hi=dmax_t, hi_name="dmax of U_true")
    A = A.detach().to(torch.float64)
    B = B.detach().to(torch.float64).to(A.device)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise ValueError("subspace_distance: bases contain NaN or Inf")
    PA, PB = _projectors(A, dims_e), _projectors(B, dims_t)  # [P, K, n, n]
    for name, Pr in (("U_est", PA), ("U_true", PB)):
        if not torch.isfinite(Pr).all():  # finite entries of ~1e154 and more overflow U U^T
            raise ValueError(f"subspace_distance: {name} is too large: U U^T overflows float64 "
                             "(bases should have unit-norm columns)")
    diff = PA[:, :, None] - PB[:, None, :]  # [P, K_est, K_true, n, n]
    cost = torch.linalg.matrix_norm(diff, ord=NORMS[norm]).cpu().numpy()
    dist = np.empty(cost.shape[0])
    perms = np.empty((cost.shape[0], K), dtype=np.int64)
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize costs 0.4 s to import

    for p in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[p])
        dist[p] = cost[p][rows, cols].mean()
        perms[p, cols] = rows
    out = torch.from_numpy(dist)
    perm_t = torch.from_numpy(perms)
    if not (batched or batched_t):
        out, perm_t = out[0], perm_t[0]
    return (out, perm_t) if return_perm else out


def recovery_success(dist: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Boolean success ``dist <= threshold`` (the paper uses 0.5). ``dist``: real distances (no
    NaN); ``threshold``: a number >= 0 (0: exact recovery; inf: always), or a tensor of them
    that broadcasts to ``dist``."""
    where = "recovery_success"
    d = _number_tensor(dist, "dist", where, integer=False)
    if torch.isnan(d).any():
        raise ValueError(f"{where}: dist contains NaN")
    if isinstance(threshold, np.generic):
        threshold = threshold.item()
    thr = number_or_tensor(threshold, "threshold", where)  # complex and bool refused there
    if bool((torch.isnan(thr) | (thr < 0)).any()):
        raise ValueError(f"{where}: threshold must be >= 0 (not NaN), got {threshold}")
    try:
        shape = torch.broadcast_shapes(d.shape, thr.shape)
    except RuntimeError:
        shape = None
    if shape != d.shape:
        raise ValueError(f"{where}: threshold of shape {tuple(thr.shape)} does not broadcast to "
                         f"dist's shape {tuple(d.shape)}")
    # a Python number is compared as a float (2**70 as an int does not fit the tensor's type)
    return d <= (threshold if isinstance(threshold, torch.Tensor) else float(threshold))


def _number_tensor(v, name: str, where: str, integer: bool) -> torch.Tensor:
    """v as a tensor of integers (``integer``) or of real numbers (also integers); TypeErrors
    name ``name``."""
    try:
        t = torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: {name} must be a tensor or array of numbers, got "
                        f"{type(v).__name__}") from None
    if t.is_complex() or t.dtype == torch.bool or (integer and t.is_floating_point()):
        raise TypeError(f"{where}: {name} must be {'integers' if integer else 'real'}, got dtype "
                        f"{t.dtype}")
    return t


def clustering_accuracy(labels, pred) -> torch.Tensor:
    """Fraction of samples whose predicted cluster matches the true label after the best
    one-to-one relabelling (Hungarian). ``labels``/``pred``: ``[N]`` or ``[P, N]`` ints; returns
    float64 ``[P]`` (0-d for 1-D inputs). Predicted clusters may outnumber the true ones. Label
    values are arbitrary integers >= 0 (only which samples share one matters)."""
    lab = _number_tensor(labels, "labels", "clustering_accuracy", integer=True)
    prd = _number_tensor(pred, "pred", "clustering_accuracy", integer=True)
    if lab.shape != prd.shape:
        raise ValueError(f"clustering_accuracy: labels {tuple(lab.shape)} and pred "
                         f"{tuple(prd.shape)} differ in shape")
    if lab.dim() not in (1, 2) or lab.shape[-1] == 0:
        raise ValueError("clustering_accuracy: labels must be a non-empty [N] or [P, N]")
    if (lab < 0).any() or (prd < 0).any():
        raise ValueError("clustering_accuracy: labels and pred must be >= 0")
    single = lab.dim() == 1
    lab2, prd2 = lab.reshape(-1, lab.shape[-1]).cpu(), prd.reshape(-1, prd.shape[-1]).cpu()
    acc = np.empty(lab2.shape[0])
    from scipy.optimize import linear_sum_assignment  # here: see subspace_distance

    for p in range(lab2.shape[0]):
        # the confusion matrix of the distinct values only (labels like 2**40 would size it by
        # the largest value); dropping all-zero rows and columns keeps the best matching
        _, lt = np.unique(lab2[p].numpy(), return_inverse=True)
        _, pt = np.unique(prd2[p].numpy(), return_inverse=True)
        conf = np.zeros((pt.max() + 1, lt.max() + 1))
        np.add.at(conf, (pt, lt), 1)
        rows, cols = linear_sum_assignment(conf, maximize=True)
        acc[p] = conf[rows, cols].sum() / lab2.shape[1]
    out = torch.from_numpy(acc)
    return out[0] if single else out
