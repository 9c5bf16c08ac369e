"""Subspace-recovery baselines with a scikit-learn style interface.

* :class:`PCASubspace` -- K = 1, Theorem 1 / problem (12): top-d left singular vectors.
* :class:`KSubspaces` -- problem (18) by K-subspaces (the paper's ref. [45], Wang, Liu, So,
  Balzano 2022): alternate the assignment ``argmax_k ||U_k^T x||`` and per-cluster top-d_k PCA;
  ``n_init`` restarts keep the largest objective ``sum_k sum_{i in C_k} ||U_k^T x_i||^2``;
  ``init="auto"`` (``"neighbors"``: k-means++-like seeds, each basis spanned by its seed and the
  seed's nearest points by angle), ``"random"`` (random orthonormal bases), ``"points"`` (spans of
  d_k random data points) or ``"spectral"`` (spectral clustering of the absolute
  cosine-similarity graph, then per-cluster PCA).
* :class:`EnSC` -- elastic-net subspace clustering: self-expressive coefficients by
  ``sklearn.linear_model.ElasticNet`` per point, affinity ``|C| + |C|^T``,
  ``sklearn.cluster.SpectralClustering(affinity="precomputed")``, per-cluster PCA bases.

All take ``X`` as ``[N, n]`` (numpy or torch), set ``bases_`` (torch ``[K, n, dmax]``, columns
past d_k zero, X's dtype; float64 for numpy input) and ``labels_`` (int64 ``[N]``).

The estimators follow scikit-learn's conventions (they derive from ``sklearn.base.BaseEstimator``):
``__init__`` stores its arguments unchanged, ``get_params``/``set_params``/``sklearn.base.clone``
work, and every argument is validated in ``fit``. With heterogeneous ``dims``, ``bases_[k]`` always
has ``dims[k]`` columns and ``labels_ == k`` marks the points fitted by it: a clustering that does
not come with a dimension per cluster (spectral clustering) is matched to ``dims`` by the
assignment of minimum total residual energy (Hungarian, ``scipy.optimize.linear_sum_assignment``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.validation import check_is_fitted

from ._args import as_int, as_int_list, dims_list, real_number
from ._warnings import ignoring, recording

__all__ = ["PCASubspace", "KSubspaces", "EnSC", "top_subspace", "match_dims"]


def _as_array(X, where: str, name: str = "X", min_rows: int = 1):
    """X as a float64 numpy ``[N, n]`` array (at least ``min_rows`` rows, n >= 1, finite, with a
    finite squared norm) and the torch dtype of the results (X's floating dtype; float64 for
    integer tensors and numpy input). Errors name the argument as ``name``."""
    if isinstance(X, torch.Tensor):
        if X.is_complex():
            raise TypeError(f"{where}: {name} must be real, got dtype {X.dtype}")
        dtype = X.dtype if X.is_floating_point() else torch.float64
        Xn = X.detach().cpu().to(torch.float64).numpy()
    else:
        dtype = torch.float64
        if X is None:  # np.asarray makes it a 0-d NaN
            raise TypeError(f"{where}: {name} must be a numeric [N, n] array, got None")
        if hasattr(X, "toarray") and hasattr(X, "nnz"):  # a scipy.sparse matrix or array
            raise TypeError(f"{where}: {name} is a sparse matrix; sparse input is not supported, "
                            f"pass {name}.toarray()")
        try:  # np.iscomplexobj raises too for a ragged list
            is_complex = np.iscomplexobj(X)
            if not is_complex:
                Xn = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as e:
            if "NAType" in str(e):  # a pandas nullable column holding pd.NA
                raise ValueError(f"{where}: {name} contains missing values (pd.NA)") from e
            raise TypeError(f"{where}: {name} must be a numeric [N, n] array") from e
        if is_complex:
            raise TypeError(f"{where}: {name} must be real, got a complex array")
    if Xn.ndim != 2:
        raise ValueError(f"{where}: {name} must be [N, n], got shape {Xn.shape}")
    N, n = Xn.shape
    if N < min_rows or n == 0:
        raise ValueError(f"{where}: {name} is empty (shape {Xn.shape})")
    # one pass for both checks: the energy is NaN or Inf for non-finite entries, and Inf when
    # finite entries (|x| ~ 1e154 and more) overflow the projection energies the fits compare
    if not np.isfinite(np.einsum("ij,ij->", Xn, Xn)):
        if not np.isfinite(Xn).all():
            raise ValueError(f"{where}: {name} contains NaN or Inf")
        raise ValueError(f"{where}: {name} is too large: its squared norm overflows float64 "
                         f"(largest |entry| {np.abs(Xn).max():.3g}); rescale it")
    return Xn, dtype


def _validate_X(X, K: int, dims, where: str, name: str = "dims"):
    """(Xn, dtype, dims as K ints): X as ``_as_array`` gives it, K <= N checked before ``dims`` is
    expanded to K entries (K = 2**40 would not fit in memory), every d_k < n."""
    Xn, dtype = _as_array(X, where)
    N, n = Xn.shape
    if K > N:
        raise ValueError(f"{where}: K = {K} clusters but only N = {N} samples")
    dims = dims_list(dims, K, where, name=name)
    for k, d in enumerate(dims):
        if d >= n:
            what = name if name == "d" else f"{name}[{k}]"  # PCASubspace's one d
            raise ValueError(f"{where}: {what} = {d} must be < n = {n}")
    return Xn, dtype, dims


def _check_seed(seed, where: str, sklearn: bool = False):
    """seed as numpy's default_rng takes it: None, a Generator, BitGenerator or SeedSequence, a
    RandomState, an int >= 0 or a list of them. sklearn=True: as SpectralClustering's
    random_state also takes it (None, a RandomState or an int in [0, 2**32))."""
    if seed is None or isinstance(seed, np.random.RandomState):
        return seed
    if isinstance(seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)):
        if not sklearn:
            return seed
        raise TypeError(f"{where}: seed must be None, an int or a numpy RandomState for spectral "
                        f"clustering (sklearn takes no {type(seed).__name__}), got one")
    if isinstance(seed, (list, tuple)) and not sklearn:
        return as_int_list(seed, "seed", where, 0)
    return as_int(seed, "seed", where, 0, 2 ** 32 if sklearn else None)


def _rng(seed) -> np.random.Generator:
    """np.random.default_rng(seed) for a seed _check_seed has passed. A RandomState is wrapped
    by hand (a Generator on its bit generator, drawing from and advancing its state, as
    default_rng does in numpy 2): numpy 1.x's default_rng refuses it."""
    if isinstance(seed, np.random.RandomState):
        return np.random.Generator(seed._bit_generator)
    return np.random.default_rng(seed)


def top_subspace(Xk, d: int, rng: np.random.Generator) -> np.ndarray:
    """n x d orthonormal basis (float64 numpy): top-d left singular vectors of ``Xk`` ([m, n]
    rows, m >= 0, numpy or torch), 1 <= d <= n. When the rows span fewer than d directions,
    random orthonormal directions from ``rng`` (a numpy Generator or RandomState) complete the
    basis."""
    where = "top_subspace"
    Xk, _ = _as_array(Xk, where, "Xk", min_rows=0)
    n = Xk.shape[1]
    d = as_int(d, "d", where, 1)
    if d > n:
        raise ValueError(f"{where}: d = {d} must be <= n = {n}")
    if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
        raise TypeError(f"{where}: rng must be a numpy Generator or RandomState, got "
                        f"{type(rng).__name__}")
    return _top_subspace(Xk, d, rng)


def _top_subspace(Xk: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    """top_subspace for checked arguments (Xk a finite float64 [m, n] array, 1 <= d <= n)."""
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


def _feature_names(X) -> Optional[np.ndarray]:
    """X's column names when it is a DataFrame-like table whose names are all strings (the
    names scikit-learn records), else None."""
    cols = getattr(X, "columns", None)
    if cols is None or isinstance(X, (np.ndarray, torch.Tensor)):
        return None
    names = np.asarray(list(cols), dtype=object)
    if names.ndim != 1 or not all(isinstance(c, str) for c in names):
        return None
    return names


class _Base(ClusterMixin, BaseEstimator):
    """scikit-learn plumbing: ``get_params``/``set_params`` (unknown names are a ValueError that
    names them), ``clone`` and ``repr`` come from ``BaseEstimator``, which reads the parameter
    names off ``__init__``; subclasses store their arguments there unchanged and validate them
    in ``fit``. ``fit`` records ``n_features_in_`` and, for a DataFrame with string column
    names, ``feature_names_in_``; ``predict`` refuses a table whose names differ (a reordered
    DataFrame silently gave other labels)."""

    def fit_predict(self, X, y=None) -> torch.Tensor:
        return self.fit(X).labels_

    def _record_features(self, X, n: int) -> None:
        self.n_features_in_ = n
        names = _feature_names(X)
        if names is not None:
            self.feature_names_in_ = names
        elif hasattr(self, "feature_names_in_"):  # a refit without names drops the old ones
            del self.feature_names_in_

    def _check_features(self, X, where: str) -> None:
        names, fitted = _feature_names(X), getattr(self, "feature_names_in_", None)
        if names is not None and fitted is not None:
            if not np.array_equal(names, fitted):
                raise ValueError(f"{where}: X's column names {list(names)} differ from those "
                                 f"seen in fit {list(fitted)} (the same names in the same order "
                                 "are needed)")
        elif fitted is not None:
            warnings.warn(f"{where}: X has no feature names, but the estimator was fitted with "
                          "feature names", UserWarning, stacklevel=3)
        elif names is not None:
            warnings.warn(f"{where}: X has feature names, but the estimator was fitted without "
                          "feature names", UserWarning, stacklevel=3)


class PCASubspace(_Base):
    """Single subspace by SVD (Theorem 1): ``bases_`` is ``[1, n, d]``."""

    def __init__(self, d: int):
        self.d = d

    def fit(self, X, y=None) -> "PCASubspace":
        Xn, dtype, dims = _validate_X(X, 1, self.d, "PCASubspace", name="d")
        self._record_features(X, Xn.shape[1])
        B = _top_subspace(Xn, dims[0], np.random.default_rng(0))
        self.bases_ = _pack([B], Xn.shape[1], dtype)
        self.labels_ = torch.zeros(Xn.shape[0], dtype=torch.int64)
        self.objective_ = float(np.sum((Xn @ B) ** 2))
        return self


def _energies(Xn: np.ndarray, bases) -> np.ndarray:
    """``[N, K]`` projection energies ``||U_k^T x_i||^2`` (bases: n x d_k arrays, or one
    ``[K, n, dmax]`` array with zero padding)."""
    return np.stack([np.sum((Xn @ B) ** 2, axis=1) for B in bases], axis=1)


def _assign(Xn: np.ndarray, bases) -> tuple:
    scores = _energies(Xn, bases)  # [N, K]
    labels = np.argmax(scores, axis=1)  # ties -> lowest k, as in eq. (17)
    return labels, float(scores[np.arange(len(labels)), labels].sum())


def match_dims(Xn, labels, dims) -> np.ndarray:
    """Relabel a K-clustering so that cluster k is the one fitted with ``dims[k]``.

    Cluster c fitted with the top d (uncentred) principal directions leaves the residual energy
    ``sum_{i > d} sigma_i(X_c)^2``; the one-to-one map of clusters to entries of ``dims`` with
    the least total residual is found with ``scipy.optimize.linear_sum_assignment``. The labels
    are returned unchanged when all d_k are equal or when they are already optimal (within
    rounding), so equal-dimension runs and ties keep their numbering.

    Args: ``Xn`` ``[N, n]`` (numpy or torch, finite), ``labels`` N integers in [0, K),
    ``dims`` K ints in [1, n]. Returns int64 ``[N]``."""
    where = "match_dims"
    Xn, _ = _as_array(Xn, where, "Xn")
    N, n = Xn.shape
    dims = dims_list(dims, None, where, hi=n)
    try:
        lab = np.asarray(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: labels must be an integer array, got "
                        f"{type(labels).__name__}") from None
    if lab.dtype.kind not in "iu":
        raise TypeError(f"{where}: labels must be integers, got dtype {lab.dtype}")
    if lab.shape != (N,):
        raise ValueError(f"{where}: labels must be [N] = [{N}] (one per row of Xn), got shape "
                         f"{lab.shape}")
    K = len(dims)
    bad = lab[(lab < 0) | (lab >= K)]
    if bad.size:
        raise ValueError(f"{where}: labels must be in [0, K) = [0, {K}) (K = len(dims)), got "
                         f"{bad[0]}")
    return _match_dims(Xn, lab, dims)


def _match_dims(Xn: np.ndarray, labels: np.ndarray, dims: list) -> np.ndarray:
    """match_dims for checked arguments."""
    K = len(dims)
    labels = np.asarray(labels, dtype=np.int64)
    if K == 1 or len(set(dims)) == 1:
        return labels
    cost = np.empty((K, K))
    for c in range(K):
        Xc = Xn[labels == c]
        s2 = np.linalg.svd(Xc, compute_uv=False) ** 2 if Xc.shape[0] else np.zeros(0)
        for k, d in enumerate(dims):
            cost[c, k] = s2[d:].sum()
    rows, cols = linear_sum_assignment(cost)
    tol = 1e-12 * max(float(np.sum(Xn ** 2)), np.finfo(float).tiny)
    if cost[rows, cols].sum() >= np.trace(cost) - tol:
        return labels
    return cols[labels]  # rows == arange(K): cluster c becomes cluster cols[c]


def _fit_clusters(Xn: np.ndarray, labels: np.ndarray, dims: list, rng) -> tuple:
    """(labels matched to dims, per-cluster top-d_k bases) for a clustering of ``Xn``."""
    labels = _match_dims(Xn, labels, dims)
    return labels, [_top_subspace(Xn[labels == k], d, rng) for k, d in enumerate(dims)]


def _unit_rows(Xn: np.ndarray) -> tuple:
    """(rows of Xn scaled to unit norm, which rows have a direction): zero rows stay zero."""
    norms = np.linalg.norm(Xn, axis=1, keepdims=True)
    return Xn / np.maximum(norms, 1e-300), norms[:, 0] > 0


def _distinct_rows(Xn: np.ndarray) -> tuple:
    """(first, pos): the indices of the first copy of every distinct row of Xn, ascending, and
    for every row the position in ``first`` of its first copy. Without repeated rows: arange(N)
    twice."""
    _, first, inverse = np.unique(Xn, axis=0, return_index=True, return_inverse=True)
    order = np.sort(first)
    return order, np.searchsorted(order, first[inverse.reshape(-1)])


def _neighborhood_bases(Xn: np.ndarray, Y: np.ndarray, has_dir: np.ndarray, distinct: tuple,
                        K: int, d: int, rng: np.random.Generator) -> list:
    """K initial d-dimensional bases, seeded like k-means++ (Y, has_dir: ``_unit_rows(Xn)``;
    distinct: ``_distinct_rows(Xn)``): each seed row is drawn with probability proportional to
    the squared residual of its unit vector against the bases so far (uniformly for the first,
    or when every row is explained; never a zero row), and its basis is the top-d principal
    directions of the seed and its d nearest distinct rows by |cosine|. For a union of subspaces
    the nearest rows by angle mostly lie in the seed's own subspace, and the residual draw keeps
    later seeds off the subspaces already found. Bases are d = max(dims) wide, so a seed in a
    larger subspace is not cut down to a smaller d_k: the first alternation fits each cluster
    with its own d_k after match_dims has paired clusters and dims. Repeated rows count once
    among the neighbours: copies of the seed (cosine 1) would otherwise fill its neighbourhood
    and leave the basis one direction wide (every point five times over: 17% of single restarts
    recovered noiseless data, against 100% without copies)."""
    N = Xn.shape[0]
    rows, pos = distinct
    Yd = Y[rows]
    # a zero row has no direction: its residual stays 0, so it is never a seed (all-zero data:
    # every row may be)
    first = has_dir.astype(float) if has_dir.any() else np.ones(N)
    res = first
    bases = []
    for _ in range(K):
        total = res.sum()
        # every row explained to rounding (total ~ 0, e.g. K above the number of subspaces):
        # a uniform draw over the rows with a direction, as for the first seed
        p = res / total if bases and total > 1e-12 else first / first.sum()
        i = rng.choice(N, p=p)
        sim = np.abs(Yd @ Y[i])
        sim[pos[i]] = np.inf  # the seed itself first
        near = rows[np.argsort(-sim, kind="stable")[: min(len(rows), d + 1)]]
        B = _top_subspace(Xn[near], d, rng)
        bases.append(B)
        res = np.minimum(res, np.clip(1.0 - ((Y @ B) ** 2).sum(axis=1), 0.0, 1.0))
    return bases


def _spectral_labels(W: np.ndarray, K: int, seed) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    if K == 1:
        return np.zeros(W.shape[0], dtype=np.int64)
    # keep the graph connected for the solver: 1e-12 off the diagonal (one copy of W; the
    # dense eye and its complement were three more N x N arrays)
    diag = W.diagonal().copy()
    W = W + 1e-12
    np.fill_diagonal(W, diag)
    sc = SpectralClustering(n_clusters=K, affinity="precomputed", random_state=seed,
                            assign_labels="kmeans")
    with ignoring(("", Warning)):
        return sc.fit_predict(W).astype(np.int64)


class KSubspaces(_Base):
    """K-subspaces for problem (18).

    Args:
        K: number of subspaces (an int >= 1).
        dims: subspace dimension(s), an int or K ints (each >= 1); ``bases_[k]`` has ``dims[k]``
            columns.
        n_init: restarts; the run with the largest objective (18) is kept.
        max_iter: alternations per restart (stops earlier when the labels stop changing).
        init: ``"auto"`` (default: ``"neighbors"``), ``"neighbors"`` (see below),
            ``"random"`` (random orthonormal bases), ``"points"`` (basis k spans d_k random data
            points) or ``"spectral"`` (the first restart uses the spectral clustering labels,
            later restarts are random). ``"neighbors"`` seeds the bases one at a time, like
            k-means++: the seed point is drawn with probability proportional to its squared
            residual (as a unit vector) against the bases chosen so far, and the basis is the top
            ``max(dims)`` principal directions of the seed and its ``max(dims)`` nearest points by
            angle (repeated rows counted once); the first alternation then fits each cluster with
            its own d_k. On noiseless MoLRG data (eight settings from dims [3, 1, 2] to
            [4, 4, 4, 4] and [6, 6, 6] with 12 points each, five datasets each, 40 single
            restarts per dataset) every restart recovered the clusters, where ``"points"``
            recovered 0.5-71% and random bases 0-48% of them; with noise (std 0.1 and 0.3) its
            mean clustering accuracy per restart was the highest of the three in every setting.
            ``"auto"`` meant ``"points"`` (unequal dims) or ``"random"`` (equal dims) before;
            pass those to reproduce earlier runs.
        seed: numpy seed.

    Each alternation fits cluster k with its top-``dims[k]`` PCA basis, after relabelling the
    clusters (when the d_k differ) so that the dimensions go to the clusters they fit best (see
    :func:`match_dims`; this never lowers the objective), then reassigns every point to the basis
    with the largest projection energy. ``labels_`` is that assignment for the final ``bases_``,
    so ``fit_predict(X)`` equals ``fit(X).predict(X)``. ``fit`` warns when a cluster ends with no
    sample: its basis was fitted to nothing and is random.
    """

    def __init__(self, K: int, dims: Union[int, Sequence[int]], n_init: int = 10,
                 max_iter: int = 100, init: str = "auto", seed: int = 0):
        self.K = K
        self.dims = dims
        self.n_init = n_init
        self.max_iter = max_iter
        self.init = init
        self.seed = seed

    def fit(self, X, y=None) -> "KSubspaces":
        where = "KSubspaces"
        K = as_int(self.K, "K", where, 1)
        n_init = as_int(self.n_init, "n_init", where, 1)
        max_iter = as_int(self.max_iter, "max_iter", where, 1)
        if not isinstance(self.init, str) or self.init not in ("auto", "neighbors", "random",
                                                                "points", "spectral"):
            raise ValueError(f"{where}: init must be 'auto', 'neighbors', 'random', 'points' or "
                             f"'spectral', got {self.init!r}")
        seed = _check_seed(self.seed, where, sklearn=self.init == "spectral")
        Xn, dtype, dims = _validate_X(X, K, self.dims, where)
        self._record_features(X, Xn.shape[1])
        init = "neighbors" if self.init == "auto" else self.init
        N, n = Xn.shape
        if init in ("spectral", "neighbors"):
            Y, has_dir = _unit_rows(Xn)  # once for all restarts
        if init == "neighbors":
            distinct = _distinct_rows(Xn)
        rng = _rng(seed)
        best = None
        for r in range(n_init):
            if init == "spectral" and r == 0:
                G = Y @ Y.T
                lab = _spectral_labels(np.abs(G, out=G), K, seed)
                _, bases = _fit_clusters(Xn, lab, dims, rng)
            elif init == "neighbors":
                bases = _neighborhood_bases(Xn, Y, has_dir, distinct, K, max(dims), rng)
            elif init == "points":  # the span of d_k distinct random data points
                bases = [_top_subspace(Xn[rng.choice(N, size=min(d, N), replace=False)], d, rng)
                         for d in dims]
            else:
                bases = [_top_subspace(np.zeros((0, n)), d, rng) for d in dims]
            labels, obj = _assign(Xn, bases)
            for it in range(max_iter):
                labels, bases = _fit_clusters(Xn, labels, dims, rng)
                new, obj = _assign(Xn, bases)
                if np.array_equal(new, labels):
                    break
                labels = new
            if best is None or obj > best[0] + 1e-12 * max(1.0, abs(best[0])):
                best = (obj, bases, it + 1)
        _, bases, iters = best
        self.bases_ = _pack(bases, n, dtype)
        # labels_ = the projection assignment for the stored bases_ (what predict computes)
        labels, obj = _assign(Xn, self.bases_.to(torch.float64).numpy())
        empty = np.flatnonzero(np.bincount(labels, minlength=K) == 0)
        if empty.size:
            # its basis was fitted to no point: random orthonormal columns (_top_subspace)
            warnings.warn(f"{where}: {empty.size} of K = {K} clusters hold no sample (clusters "
                          f"{empty.tolist()}; more clusters than the data has subspaces or "
                          "distinct points?), so their bases_ are arbitrary directions",
                          UserWarning, stacklevel=2)
        self.objective_ = obj
        self.n_iter_ = iters
        self.labels_ = torch.from_numpy(labels.astype(np.int64))
        return self

    def predict(self, X) -> torch.Tensor:
        """Index of the fitted subspace with the largest projection energy ``||U_k^T x||^2`` for
        every row of ``X`` ``[N, n]`` (ties: lowest k); int64 ``[N]``."""
        check_is_fitted(self, "bases_")
        where = f"{type(self).__name__}.predict"
        Xn, _ = _as_array(X, where)
        self._check_features(X, where)
        n = self.bases_.shape[1]
        if Xn.shape[1] != n:
            raise ValueError(f"{where}: X has n = {Xn.shape[1]} columns but the estimator was "
                             f"fitted with n = {n}")
        labels, _ = _assign(Xn, self.bases_.to(torch.float64).numpy())
        return torch.from_numpy(labels.astype(np.int64))


_ENET_MAX_ITER = 5000  # EnSC's ElasticNet coordinate-descent sweeps per sample


class EnSC(_Base):
    """Elastic-net subspace clustering (self-expressive coefficients + spectral clustering).

    Each ``x_i`` is regressed on the other samples with ``ElasticNet(alpha, l1_ratio,
    fit_intercept=False)``; the affinity ``|C| + |C|^T`` goes to spectral clustering; the
    clusters are matched to ``dims`` (:func:`match_dims`) and cluster k gets its top-``dims[k]``
    PCA basis. ``fit`` warns when some samples get no edge in the affinity (an ``alpha`` too
    large for the data zeroes their coefficients, as it does those of zero samples): spectral
    clustering labels them arbitrarily. ``n_isolated_`` counts them.

    ``alpha`` is ElasticNet's absolute penalty, so it depends on the scale of ``X``: fitting
    ``c X`` is fitting ``X`` with ``alpha / c^2``. The default 1e-3 suits rows of norm about 1
    (MoLRG data); for other data rescale the rows or scale alpha with them. ``fit`` warns when
    elastic-net fits stop unconverged (often a sign of a mis-scaled alpha) and
    ``n_unconverged_`` counts them.
    """

    def __init__(self, K: int, dims: Union[int, Sequence[int]], alpha: float = 1e-3,
                 l1_ratio: float = 0.9, seed: int = 0):
        self.K = K
        self.dims = dims
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.seed = seed

    def _enet_params(self, where: str) -> tuple:
        """(alpha, l1_ratio) as floats: alpha finite and > 0, l1_ratio in [0, 1]."""
        return (real_number(self.alpha, "alpha", where, 0.0, lo_open=True),
                real_number(self.l1_ratio, "l1_ratio", where, 0.0, 1.0))

    def coefficients(self, Xn) -> np.ndarray:
        """``[N, N]`` self-expressive coefficients of the rows of ``Xn`` ``[N, n]`` (zero
        diagonal)."""
        return self._coefficients(Xn, "EnSC.coefficients")[0]

    def _coefficients(self, Xn, where: str) -> tuple:
        """(coefficients, the number of ElasticNet fits that stopped at max_iter unconverged)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import ElasticNet

        alpha, l1_ratio = self._enet_params(where)
        Xn, _ = _as_array(Xn, where, "Xn")
        N = Xn.shape[0]
        if N < 2:
            raise ValueError(f"{where}: needs at least 2 samples")
        C = np.zeros((N, N))
        model = ElasticNet(alpha=alpha, l1_ratio=l1_ratio, fit_intercept=False,
                           max_iter=_ENET_MAX_ITER)
        unconverged = 0
        for i in range(N):
            if not Xn[i].any():
                # a zero sample's coefficients are zero (the objective's only minimiser);
                # scikit-learn 1.3 scaled its tolerance by |x_i|^2 = 0, ran all max_iter sweeps
                # and warned that the fit had not converged
                continue
            others = np.delete(np.arange(N), i)
            # sklearn's ConvergenceWarning is the only sign of a fit that ran out of sweeps
            # (n_iter_ == max_iter also when the last sweep converged); fit() warns once
            with recording(ConvergenceWarning) as caught:
                model.fit(Xn[others].T, Xn[i])
            unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            for w in caught:  # other warnings pass through as they would have
                if not issubclass(w.category, ConvergenceWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            C[i, others] = model.coef_
        return C, unconverged

    def fit(self, X, y=None) -> "EnSC":
        where = "EnSC"
        K = as_int(self.K, "K", where, 1)
        self._enet_params(where)
        seed = _check_seed(self.seed, where, sklearn=True)
        Xn, dtype, dims = _validate_X(X, K, self.dims, where)
        if Xn.shape[0] < 2:
            raise ValueError(f"{where}: needs at least 2 samples")
        self._record_features(X, Xn.shape[1])
        C, self.n_unconverged_ = self._coefficients(Xn, where)
        if self.n_unconverged_:
            warnings.warn(f"{where}: {self.n_unconverged_} of {Xn.shape[0]} elastic-net fits "
                          f"stopped at max_iter = {_ENET_MAX_ITER} without converging, so their "
                          "coefficients are approximate. A common cause is an alpha too small "
                          "for X's scale: alpha is absolute (fitting c X is fitting X with "
                          "alpha / c^2)", UserWarning, stacklevel=2)
        np.abs(C, out=C)  # (C is not needed after this: one N x N temporary fewer)
        W = C + C.T
        self.n_isolated_ = isolated = int(np.count_nonzero(~(W > 0).any(axis=1)))
        if isolated and K > 1:
            # ElasticNet gives a sample no coefficient when alpha outweighs every correlation
            # (or the sample is zero): it has no edge in the affinity, and spectral clustering
            # labels it arbitrarily.
            warnings.warn(f"{where}: {isolated} of {Xn.shape[0]} samples have no nonzero "
                          f"self-expressive coefficient (alpha = {self.alpha} too large for this "
                          "data, or zero samples), so their labels carry no information",
                          UserWarning, stacklevel=2)
        self.affinity_ = W
        labels = _spectral_labels(W, K, seed)
        labels, bases = _fit_clusters(Xn, labels, dims, _rng(seed))
        self.labels_ = torch.from_numpy(labels)
        self.bases_ = _pack(bases, Xn.shape[1], dtype)
        return self
