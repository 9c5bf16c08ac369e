"""Mixture of low-rank Gaussians (MoLRG, Definition 1 and eq. (15)), batched over P instances.

``x = U*_k a + e`` with probability ``pi_k``, ``a ~ N(0, I_{d_k})``, ``U*_k`` n x d_k orthonormal and
``e ~ N(0, noise_std^2 I_n)``. Bases are, per instance, disjoint column blocks of one random
orthogonal n x n matrix (``basis="orthogonal"``, needs ``sum d_k <= n``) or independent random
orthonormal matrices (``basis="independent"``, subspaces may overlap). Everything is drawn in
float64 from one seeded ``torch.Generator`` and then cast, so a seed gives the same data for every
dtype.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._args import (as_int, as_int_list, check_mixture_weights, check_seed, dims_list,
                    real_number, real_tensor)

_SIZE_END = 2**63  # tensor sizes are int64

__all__ = ["MoLRGData", "sample_molrg", "sample_from_bases"]


@dataclass
class MoLRGData:
    """Samples and ground truth of P MoLRG instances.

    Attributes:
        X: ``[P, N, n]`` samples.
        labels: ``[P, N]`` int64 component of each sample.
        bases: ``[P, K, n, dmax]`` true bases, columns past ``dims[k]`` are zero.
        dims: the K subspace dimensions.
        pi: ``[K]`` float64 mixture weights (with ``counts`` and no ``pi``: the counts'
            proportions, so that :meth:`sample` draws from the training set's mixture).
        noise_std: std of the isotropic noise ``e``.
        seed: the seed the data was drawn with (None when not known).
    """

    X: torch.Tensor
    labels: torch.Tensor
    bases: torch.Tensor
    dims: list
    pi: torch.Tensor
    noise_std: float = 0.0
    seed: Optional[int] = None

    @property
    def instances(self) -> int:
        return self.X.shape[0]

    @property
    def K(self) -> int:
        return len(self.dims)

    @property
    def n(self) -> int:
        return self.X.shape[-1]

    def counts(self) -> torch.Tensor:
        """``[P, K]`` number of samples of each component."""
        lab = self.labels
        if lab.dtype != torch.int64:
            raise TypeError(f"MoLRGData.counts: labels must be int64, got {lab.dtype}")
        if lab.numel():
            lo, hi = (v.item() for v in torch.aminmax(lab))
            if lo < 0 or hi >= self.K:
                raise ValueError(f"MoLRGData.counts: labels must be in [0, K = {self.K}), got "
                                 f"values in [{lo}, {hi}]")
        return torch.nn.functional.one_hot(lab, self.K).sum(1)

    def sample(self, N: Optional[int] = None, counts: Optional[Sequence[int]] = None,
               seed: int = 1):
        """Fresh samples ``(X [P, N, n], labels [P, N])`` from the same bases (e.g. the reference
        set of the GL score). Use a seed different from the training one: with the same seed the
        draws repeat training samples (74 of 200 for data drawn with seed 1), and this warns."""
        if self.seed is not None and not isinstance(seed, bool) and seed == self.seed:
            warnings.warn(f"MoLRGData.sample: seed {seed} is the seed the training data was "
                          "drawn with, so these samples repeat training samples; pass another "
                          "seed", UserWarning, stacklevel=2)
        return sample_from_bases(self.bases, self.dims, N=N, counts=counts, pi=self.pi,
                                 noise_std=self.noise_std, seed=seed, dtype=self.X.dtype)


def _parse_pi(pi, K: int, where: str) -> torch.Tensor:
    if pi is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    p = check_mixture_weights(real_tensor(pi, "pi", where, torch.float64).flatten(), K, where)
    return p / p.sum()


def _draw_labels(P, N, counts, pi, g, where):
    K = pi.numel()
    if counts is not None:
        counts = as_int_list(counts, "counts", where)
        if len(counts) != K:
            raise ValueError(f"{where}: counts must have K = {K} entries, got {len(counts)}")
        if any(c < 0 for c in counts) or not 0 < sum(counts) < _SIZE_END:
            raise ValueError(f"{where}: counts must be >= 0 with a total in [1, 2**63), got "
                             f"{counts}")
        if N is not None and as_int(N, "N", where, 1, _SIZE_END) != sum(counts):
            raise ValueError(f"{where}: N = {N} but sum(counts) = {sum(counts)}")
        base = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
        perm = torch.argsort(torch.rand(P, base.numel(), generator=g, dtype=torch.float64), dim=1)
        return base[perm]
    if N is None:
        raise ValueError(f"{where}: give N or counts")
    N = as_int(N, "N", where, 1, _SIZE_END)
    return torch.multinomial(pi.expand(P, K), N, replacement=True, generator=g)


def _draw_samples(bases64, dims, labels, noise_std, g):
    P, K, n, dmax = bases64.shape
    N = labels.shape[1]
    a = torch.randn(P, N, dmax, generator=g, dtype=torch.float64)
    d_of = torch.tensor(dims)[labels]  # [P, N]
    a = a * (torch.arange(dmax) < d_of[..., None])  # zero the coefficients past d_k
    # coefficients scattered to their component, [P, N, K, dmax] (zero elsewhere), contracted
    # with all K bases at once: gathering each sample's basis ([P, N, n, dmax] float64) took 14x
    # the memory of the float32 output
    A = a.new_zeros(P, N, K, dmax)
    A.scatter_(2, labels[..., None, None].expand(P, N, 1, dmax), a[:, :, None, :])
    X = torch.einsum("pknd,pmkd->pmn", bases64, A)
    if noise_std > 0:
        X = X + noise_std * torch.randn(P, N, n, generator=g, dtype=torch.float64)
    return X


def sample_molrg(
    n: int,
    dims,
    N: Optional[int] = None,
    counts: Optional[Sequence[int]] = None,
    instances: int = 1,
    pi=None,
    noise_std: float = 0.0,
    basis: str = "orthogonal",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    K: Optional[int] = None,
) -> MoLRGData:
    """Draw ``instances`` independent MoLRG problems.

    Args:
        n: ambient dimension.
        dims: the d_k (a sequence; heterogeneous allowed) or one int (with ``K``, default 1).
        N: samples per instance, labels drawn i.i.d. from ``pi``; or
        counts: exact number of samples N_k of each component (shuffled order).
        instances: P.
        pi: mixture weights (default uniform; with ``counts``, their proportions), normalised.
        noise_std: std of the isotropic noise ``e``.
        basis: ``"orthogonal"`` or ``"independent"``.
        seed: seed of the ``torch.Generator``; same seed, same data.
        dtype: float32 or float64.
        K: number of components when ``dims`` is an int.
    """
    where = "sample_molrg"
    n = as_int(n, "n", where, 1, _SIZE_END)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: dtype must be float32 or float64, got {dtype}")
    instances = as_int(instances, "instances", where, 1, _SIZE_END)
    if basis not in ("orthogonal", "independent"):
        raise ValueError(f"{where}: basis must be 'orthogonal' or 'independent', got {basis!r}")
    K = None if K is None else as_int(K, "K", where, 1, _SIZE_END)
    # each orthogonal component takes >= 1 of the n directions: refuse a larger K before dims
    # builds its K-entry list
    if basis == "orthogonal" and K is not None and K > n:
        raise ValueError(f"{where}: orthogonal bases need K = {K} <= n = {n}")
    dims = dims_list(dims, K, where, hi=n)
    K = len(dims)
    pi_t = _parse_pi(pi, K, where)
    noise_std = real_number(noise_std, "noise_std", where, 0.0)
    seed = check_seed(seed, "seed", where)
    if basis == "orthogonal" and sum(dims) > n:
        raise ValueError(f"{where}: orthogonal bases need sum(dims) = {sum(dims)} <= n = {n}")
    g = torch.Generator().manual_seed(int(seed))
    P, dmax = instances, max(dims)
    bases = torch.zeros(P, K, n, dmax, dtype=torch.float64)
    if basis == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(P, n, n, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar
        start = 0
        for k, d in enumerate(dims):
            bases[:, k, :, :d] = q[:, :, start:start + d]
            start += d
    else:
        for k, d in enumerate(dims):
            q, r = torch.linalg.qr(torch.randn(P, n, d, generator=g, dtype=torch.float64))
            bases[:, k, :, :d] = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    labels = _draw_labels(P, N, counts, pi_t, g, where)
    if counts is not None and pi is None:  # the training set's proportions (checked above)
        c = torch.tensor(as_int_list(counts, "counts", where), dtype=torch.float64)
        pi_t = c / c.sum()
    X = _finite_cast(_draw_samples(bases, dims, labels, noise_std, g), dtype, where)
    return MoLRGData(X, labels, bases.to(dtype), dims, pi_t, noise_std, int(seed))


def _finite_cast(X: torch.Tensor, dtype, where: str) -> torch.Tensor:
    """X (drawn in float64) in dtype, refused where that overflows (a huge noise_std)."""
    out = X.to(dtype)
    if not torch.isfinite(out).all():
        raise ValueError(f"{where}: the samples overflow {dtype} (noise_std or the data scale "
                         "is too large for it)")
    return out


def sample_from_bases(bases: torch.Tensor, dims=None, N: Optional[int] = None,
                      counts: Optional[Sequence[int]] = None, pi=None, noise_std: float = 0.0,
                      seed: int = 1, dtype: Optional[torch.dtype] = None):
    """Fresh MoLRG samples ``(X [P, N, n], labels [P, N])`` from given bases ``[P, K, n, dmax]``
    (or ``[K, n, dmax]``: then P = 1)."""
    where = "sample_from_bases"
    if not isinstance(bases, torch.Tensor) or bases.dim() not in (3, 4):
        raise ValueError(f"{where}: bases must be a [P, K, n, dmax] or [K, n, dmax] tensor")
    if not bases.is_floating_point():  # an integer, bool or complex basis is cast below
        raise TypeError(f"{where}: bases must be a real floating tensor, got {bases.dtype}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: dtype must be float32 or float64, got {dtype!r}")
    if bases.dim() == 3:
        bases = bases.unsqueeze(0)
    P, K, n, dmax = bases.shape
    if n == 0:
        raise ValueError(f"{where}: bases must have n >= 1 rows, got shape {tuple(bases.shape)}")
    if dims is None:
        dims = [dmax] * K
    dims = dims_list(dims, K, where, hi=dmax, hi_name="dmax")
    if not torch.isfinite(bases).all():
        raise ValueError(f"{where}: bases contain NaN or Inf")
    pi_t = _parse_pi(pi, K, where)
    noise_std = real_number(noise_std, "noise_std", where, 0.0)
    g = torch.Generator().manual_seed(check_seed(seed, "seed", where))
    labels = _draw_labels(P, N, counts, pi_t, g, where)
    X = _draw_samples(bases.detach().cpu().to(torch.float64), dims, labels, noise_std, g)
    return _finite_cast(X, dtype or bases.dtype, where), labels
