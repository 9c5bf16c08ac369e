"""Subspace-recovery baselines with a scikit-learn style interface.

* :class:`PCASubspace` -- K = 1, Theorem 1 / problem (12): top-d left singular vectors.
* :class:`KSubspaces` -- problem (18) by K-subspaces (the paper's ref. [45], Wang, Liu, So,
  Balzano 2022): alternate the assignment ``argmax_k ||U_k^T x||`` and per-cluster top-d_k PCA;
  ``n_init`` restarts keep the largest objective ``sum_k sum_{i in C_k} ||U_k^T x_i||^2``;
  ``init="random"`` (random orthonormal bases) or ``"spectral"`` (spectral clustering of the
  absolute cosine-similarity graph, then per-cluster PCA).
* :class:`EnSC` -- elastic-net subspace clustering: self-expressive coefficients by
  ``sklearn.linear_model.ElasticNet`` per point, affinity ``|C| + |C|^T``,
  ``sklearn.cluster.SpectralClustering(affinity="precomputed")``, per-cluster PCA bases.

All take ``X`` as ``[N, n]`` (numpy or torch), set ``bases_`` (torch ``[K, n, dmax]``, columns
past d_k zero, X's dtype; float64 for numpy input) and ``labels_`` (int64 ``[N]``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["PCASubspace", "KSubspaces", "EnSC", "top_subspace"]


def _as_dims(dims, K: int, where: str) -> list:
    if isinstance(dims, (int, np.integer)):
        dims = [int(dims)] * K
    dims = [int(d) for d in dims]
    if len(dims) != K:
        raise ValueError(f"{where}: dims must have K = {K} entries, got {len(dims)}")
    if any(d < 1 for d in dims):
        raise ValueError(f"{where}: every d_k must be >= 1, got {dims}")
    return dims


def _validate_X(X, K: int, dims: list, where: str):
    if isinstance(X, torch.Tensor):
        dtype = X.dtype if X.is_floating_point() else torch.float64
        Xn = X.detach().cpu().to(torch.float64).numpy()
    else:
        dtype = torch.float64
        try:
            Xn = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{where}: X must be a numeric [N, n] array") from e
    if Xn.ndim != 2:
        raise ValueError(f"{where}: X must be [N, n], got shape {Xn.shape}")
    N, n = Xn.shape
    if N == 0 or n == 0:
        raise ValueError(f"{where}: X is empty (shape {Xn.shape})")
    if not np.isfinite(Xn).all():
        raise ValueError(f"{where}: X contains NaN or Inf")
    if K < 1:
        raise ValueError(f"{where}: K must be >= 1, got {K}")
    if K > N:
        raise ValueError(f"{where}: K = {K} clusters but only N = {N} samples")
    for k, d in enumerate(dims):
        if d >= n:
            raise ValueError(f"{where}: dims[{k}] = {d} must be < n = {n}")
    return Xn, dtype


def top_subspace(Xk: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    """n x d orthonormal basis: top-d left singular vectors of ``Xk`` ([m, n] rows). When the
    cluster spans fewer than d directions, random orthonormal directions complete the basis."""
    n = Xk.shape[1]
    if Xk.shape[0] > 0:
        u, s, _ = np.linalg.svd(Xk.T, full_matrices=False)
        tol = max(Xk.shape) * np.finfo(float).eps * (s[0] if s.size else 0.0)
        r = int(min(d, (s > tol).sum()))
        B = u[:, :r]
    else:
        B = np.zeros((n, 0))
    if B.shape[1] < d:
        R = rng.standard_normal((n, d - B.shape[1]))
        R -= B @ (B.T @ R)
        q, _ = np.linalg.qr(R)
        q -= B @ (B.T @ q)
        q, _ = np.linalg.qr(q)
        B = np.concatenate([B, q], axis=1)
    return B


def _pack(bases: list, n: int, dtype) -> torch.Tensor:
    dmax = max(b.shape[1] for b in bases)
    out = np.zeros((len(bases), n, dmax))
    for k, b in enumerate(bases):
        out[k, :, : b.shape[1]] = b
    return torch.from_numpy(out).to(dtype)


class _Base:
    def fit_predict(self, X, y=None) -> torch.Tensor:
        return self.fit(X).labels_

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in self._params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._params)})"


class PCASubspace(_Base):
    """Single subspace by SVD (Theorem 1): ``bases_`` is ``[1, n, d]``."""

    _params = ("d",)

    def __init__(self, d: int):
        self.d = d

    def fit(self, X, y=None) -> "PCASubspace":
        dims = _as_dims(self.d, 1, "PCASubspace")
        Xn, dtype = _validate_X(X, 1, dims, "PCASubspace")
        B = top_subspace(Xn, dims[0], np.random.default_rng(0))
        self.bases_ = _pack([B], Xn.shape[1], dtype)
        self.labels_ = torch.zeros(Xn.shape[0], dtype=torch.int64)
        self.objective_ = float(np.sum((Xn @ B) ** 2))
        return self


def _assign(Xn: np.ndarray, bases: list) -> tuple:
    scores = np.stack([np.sum((Xn @ B) ** 2, axis=1) for B in bases], axis=1)  # [N, K]
    labels = np.argmax(scores, axis=1)  # ties -> lowest k, as in eq. (17)
    return labels, float(scores[np.arange(len(labels)), labels].sum())


def _spectral_labels(W: np.ndarray, K: int, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    if K == 1:
        return np.zeros(W.shape[0], dtype=np.int64)
    W = W + 1e-12 * (1.0 - np.eye(W.shape[0]))  # keep the graph connected for the solver
    sc = SpectralClustering(n_clusters=K, affinity="precomputed", random_state=seed,
                            assign_labels="kmeans")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.fit_predict(W).astype(np.int64)


class KSubspaces(_Base):
    """K-subspaces for problem (18).

    Args:
        K: number of subspaces.
        dims: subspace dimension(s), an int or K ints.
        n_init: restarts; the run with the largest objective (18) is kept.
        max_iter: alternations per restart (stops earlier when the labels stop changing).
        init: ``"random"`` or ``"spectral"`` (the first restart uses the spectral clustering
            labels, later restarts are random).
        seed: numpy seed.
    """

    _params = ("K", "dims", "n_init", "max_iter", "init", "seed")

    def __init__(self, K: int, dims: Union[int, Sequence[int]], n_init: int = 10,
                 max_iter: int = 100, init: str = "random", seed: int = 0):
        self.K, self.dims, self.n_init, self.max_iter, self.init, self.seed = (
            K, dims, n_init, max_iter, init, seed)

    def fit(self, X, y=None) -> "KSubspaces":
        where = "KSubspaces"
        if self.init not in ("random", "spectral"):
            raise ValueError(f"{where}: init must be 'random' or 'spectral', got {self.init!r}")
        if int(self.n_init) < 1 or int(self.max_iter) < 1:
            raise ValueError(f"{where}: n_init and max_iter must be >= 1")
        dims = _as_dims(self.dims, int(self.K), where)
        Xn, dtype = _validate_X(X, int(self.K), dims, where)
        N, n = Xn.shape
        rng = np.random.default_rng(self.seed)
        best = None
        for r in range(int(self.n_init)):
            if self.init == "spectral" and r == 0:
                norms = np.linalg.norm(Xn, axis=1, keepdims=True)
                Y = Xn / np.maximum(norms, 1e-300)
                lab = _spectral_labels(np.abs(Y @ Y.T), len(dims), self.seed)
                bases = [top_subspace(Xn[lab == k], d, rng) for k, d in enumerate(dims)]
            else:
                bases = [top_subspace(np.zeros((0, n)), d, rng) for d in dims]
            labels, obj = _assign(Xn, bases)
            for it in range(int(self.max_iter)):
                bases = [top_subspace(Xn[labels == k], d, rng) for k, d in enumerate(dims)]
                new, obj = _assign(Xn, bases)
                if np.array_equal(new, labels):
                    break
                labels = new
            if best is None or obj > best[0] + 1e-12 * max(1.0, abs(best[0])):
                best = (obj, labels, bases, it + 1)
        obj, labels, bases, iters = best
        self.objective_ = obj
        self.n_iter_ = iters
        self.labels_ = torch.from_numpy(labels.astype(np.int64))
        self.bases_ = _pack(bases, n, dtype)
        return self


class EnSC(_Base):
    """Elastic-net subspace clustering (self-expressive coefficients + spectral clustering).

    Each ``x_i`` is regressed on the other samples with ``ElasticNet(alpha, l1_ratio,
    fit_intercept=False)``; the affinity ``|C| + |C|^T`` goes to spectral clustering; each
    cluster gets its top-d_k PCA basis.
    """

    _params = ("K", "dims", "alpha", "l1_ratio", "seed")

    def __init__(self, K: int, dims: Union[int, Sequence[int]], alpha: float = 1e-3,
                 l1_ratio: float = 0.9, seed: int = 0):
        self.K, self.dims, self.alpha, self.l1_ratio, self.seed = K, dims, alpha, l1_ratio, seed

    def coefficients(self, Xn: np.ndarray) -> np.ndarray:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import ElasticNet

        N = Xn.shape[0]
        C = np.zeros((N, N))
        model = ElasticNet(alpha=float(self.alpha), l1_ratio=float(self.l1_ratio),
                           fit_intercept=False, max_iter=5000)
        for i in range(N):
            others = np.delete(np.arange(N), i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Xn[others].T, Xn[i])
            C[i, others] = model.coef_
        return C

    def fit(self, X, y=None) -> "EnSC":
        where = "EnSC"
        if not float(self.alpha) > 0 or not 0 <= float(self.l1_ratio) <= 1:
            raise ValueError(f"{where}: need alpha > 0 and 0 <= l1_ratio <= 1")
        dims = _as_dims(self.dims, int(self.K), where)
        Xn, dtype = _validate_X(X, int(self.K), dims, where)
        if Xn.shape[0] < 2:
            raise ValueError(f"{where}: needs at least 2 samples")
        C = self.coefficients(Xn)
        W = np.abs(C) + np.abs(C).T
        self.affinity_ = W
        labels = _spectral_labels(W, len(dims), self.seed)
        rng = np.random.default_rng(self.seed)
        bases = [top_subspace(Xn[labels == k], d, rng) for k, d in enumerate(dims)]
        self.labels_ = torch.from_numpy(labels)
        self.bases_ = _pack(bases, Xn.shape[1], dtype)
        return self
