"""Fused training step of the subspace denoiser (loss (6), Algorithm 1) and its level table.

``train_step`` runs one SGD step for P independent problem instances in one call: the sample
indices, noise levels and Gaussian noise are drawn inside the kernel from a counter-based
Philox4x32-10 generator keyed by ``(seed, step)``, so no ``[P, M, n]`` noise tensor is written.
``philox_draws`` returns the same numbers, for tests and for reference implementations.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple, Optional, Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.molrg.*)
from ._args import (INDEX_MAX, as_int, check_float_pair, check_seed, dims_list, parse_dims,
                    parse_mode, real_number, real_tensor, values_readable)
from .posterior import posterior_mean_coefficients

__all__ = ["Levels", "make_levels", "train_step", "philox_draws"]


class Levels(NamedTuple):
    """Noise-level table: per level ``s``, ``gamma``, ``lam`` (loss weight), ``c``, ``phi`` [L]
    and the logit ``bias`` [L, K] (None when every component has the same dims and weight)."""

    s: torch.Tensor
    gamma: torch.Tensor
    lam: torch.Tensor
    c: torch.Tensor
    phi: torch.Tensor
    bias: Optional[torch.Tensor]

    def table(self, dtype=None, device=None) -> torch.Tensor:
        """The ``[L, 5]`` table (s, gamma, lambda, c, phi) the op takes."""
        fields = dict(s=self.s, gamma=self.gamma, lam=self.lam, c=self.c, phi=self.phi)
        for name, v in fields.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
                raise ValueError(f"Levels: {name} must be a 1-D floating-point tensor of L "
                                 f"values, got {getattr(v, 'shape', type(v).__name__)}")
        if len({v.shape[0] for v in fields.values()}) != 1 or self.s.shape[0] == 0:
            raise ValueError("Levels: s, gamma, lam, c and phi must have the same length L >= 1, "
                             f"got {[tuple(v.shape) for v in fields.values()]}")
        t = torch.stack([self.s, self.gamma, self.lam, self.c, self.phi], dim=1)
        t = t.to(dtype=dtype or t.dtype, device=device).contiguous()
        # x_t = s x_0 + gamma eps needs s, gamma > 0 (the op checks finiteness and lam >= 0);
        # checked after the cast, which can round them to 0 or inf. One reduction, and
        # train_step caches the table, so a training loop pays it once.
        sg = t[:, :2]
        if values_readable(sg):
            ok = (sg > 0) & (sg < math.inf)
            if not bool(ok.all()):
                lvl, j = (~ok).nonzero()[0].tolist()
                raise ValueError(f"Levels: {('s', 'gamma')[j]} must be finite and > 0 (in "
                                 f"{t.dtype}), got {sg[lvl, j].item()} at level {lvl}")
        return t

    @property
    def L(self) -> int:
        """Number of noise levels."""
        return int(self.s.shape[0])


# The last table train_step built: (weak references to the Levels fields, their version counters,
# dtype, device, table). A training loop passes the same Levels every step, and building the table
# anew (three small ATen ops right after the previous step, on caches it has evicted) cost about
# 4% of a soft step at n = 48, P = 64 (paired against the op called with a prepared table). An
# in-place change to a field bumps its version, and another tensor fails the identity check, so a
# stale table is never used.
_last_table = None


def _cached_table(levels: "Levels", dtype, device) -> torch.Tensor:
    global _last_table
    fields = (levels.s, levels.gamma, levels.lam, levels.c, levels.phi)
    if torch.compiler.is_compiling() or not all(isinstance(f, torch.Tensor) for f in fields):
        return levels.table(dtype, device)
    versions = tuple(f._version for f in fields)
    hit = _last_table
    if (hit is not None and hit[2] == dtype and hit[3] == device and hit[1] == versions
            and all(r() is f for r, f in zip(hit[0], fields))):
        return hit[4]
    table = levels.table(dtype, device)
    _last_table = (tuple(weakref.ref(f) for f in fields), versions, dtype, device, table)
    return table


def _schedule_gamma(schedule, t: torch.Tensor) -> torch.Tensor:
    if hasattr(schedule, "gamma"):
        return torch.as_tensor(schedule.gamma(t), dtype=torch.float64)
    if hasattr(schedule, "sigma"):
        return torch.as_tensor(schedule.s(t), dtype=torch.float64) * torch.as_tensor(
            schedule.sigma(t), dtype=torch.float64
        )
    raise TypeError("make_levels: schedule needs gamma(t) (or sigma(t))")


def make_levels(schedule, L: int = 64, dims: Optional[Sequence[int]] = None,
                pi: Optional[Sequence[float]] = None) -> Levels:
    """Build the level table from a schedule with ``s(t)``, ``gamma(t)`` (or ``sigma(t)``),
    ``weight(t)`` and ``time_grid(L)``. ``c``, ``phi`` and ``bias`` are the posterior-mean
    coefficients of Lemma 1 / Proposition 1 (``bias`` only when ``dims`` or ``pi`` differ across
    components; with equal ones every logit gets the same shift and the soft-max ignores it).
    With unequal dims, pass them in the order :func:`train_step` gets them: the table does not
    record them (train_step warns in soft mode when it has no bias for unequal dims).
    Everything is float64; :func:`train_step` casts to the data's dtype."""
    L = as_int(L, "L", "make_levels", 1, 2**32)  # train_step's level index is 32-bit
    for name in ("s", "weight", "time_grid"):
        if not callable(getattr(schedule, name, None)):
            raise TypeError(f"make_levels: schedule has no method {name}()")
    t = torch.as_tensor(schedule.time_grid(L), dtype=torch.float64).reshape(-1)
    if t.numel() != L:
        raise ValueError(f"make_levels: schedule.time_grid({L}) returned {t.numel()} times")
    s = torch.as_tensor(schedule.s(t), dtype=torch.float64).expand(L).clone()
    gamma = _schedule_gamma(schedule, t).expand(L).clone()
    lam = torch.as_tensor(schedule.weight(t), dtype=torch.float64).expand(L).clone()
    for name, v in (("s", s), ("gamma", gamma), ("weight", lam)):
        if not torch.isfinite(v).all():
            raise ValueError(f"make_levels: schedule {name}(t) is not finite on the time grid")
    if (lam < 0).any():
        raise ValueError("make_levels: schedule weight(t) must be >= 0")
    # with dims or pi, posterior_mean_coefficients also validates them (ints >= 1; weights
    # finite, >= 0, not all zero); the bias is kept only where it differs between components
    if pi is not None:
        pi = real_tensor(pi, "pi", "make_levels", torch.float64)
    if dims is not None:  # one int stands for every component (K from pi when given)
        dims = dims_list(dims, None if pi is None else pi.numel(), "make_levels")
    c, phi, bias = posterior_mean_coefficients(s, gamma, dims, pi)
    heterogeneous = False
    if dims is not None and len(set(dims)) > 1:
        heterogeneous = True
    if pi is not None:
        p = pi.reshape(-1)
        if not torch.allclose(p, p[0].expand_as(p)):
            heterogeneous = True
    if not heterogeneous:
        bias = None
    return Levels(s, gamma, lam, c, phi, bias)


def philox_draws(seed: int, step: int, P: int, batch: int, N: int, L: int, n: int,
                 dtype: torch.dtype = torch.float32):
    """The random numbers of ``train_step(..., seed, step)``: ``(idx [P, M], level [P, M]``
    int64 and ``eps [P, M, n])``."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"philox_draws: dtype must be float32 or float64, got {dtype}")
    w, u32 = "philox_draws", 2**32
    args = (check_seed(seed, "seed", w, hi=2**63), as_int(step, "step", w, 0, u32),
            as_int(P, "P", w, 0, u32), as_int(batch, "batch", w, 1, u32),
            as_int(N, "N", w, 1, u32), as_int(L, "L", w, 1, u32),
            as_int(n, "n", w, 0, INDEX_MAX + 1))
    return torch.ops.molrg.philox_draws(*args, dtype == torch.float64)


def train_step(X: torch.Tensor, U: torch.Tensor, dims, levels: Levels, batch: int, seed: int,
               step: int, mode: str = "hard", lr: Optional[float] = None):
    """One fused SGD step on loss (6) for P independent instances.

    Args:
        X: training sets ``[P, N, n]`` (or ``[N, n]`` for one instance), float32 or float64.
            The kernel reads X contiguously: a non-contiguous X (a transposed view, or one set
            expanded over P) is copied on every call, so make it contiguous once in a loop.
        U: bases ``[P, K, n, dmax]`` (or ``[K, n, dmax]``), same dtype and device as X.
        dims: the K subspace dimensions (None: all dmax).
        levels: a :class:`Levels` table from :func:`make_levels`.
        batch: M, the batch size per instance.
        seed, step: key of the Philox stream (seed >= 0, 0 <= step < 2^32).
        mode: ``"hard"`` (eq. (16), component from the clean sample, eq. (17)) or ``"soft"``.
        lr: when given, also apply ``U -= lr * grad_U`` in place (U must not require grad).

    Returns:
        ``(loss [P], grad_U)`` with ``loss_p = mean_m lambda_l ||x_theta(s_l x_i + gamma_l eps)
        - x_i||^2`` and ``grad_U = d loss / d U`` (shapes follow the unbatched inputs).

    On the CPU the loss does not depend on the number of threads, and neither does ``grad_U``
    as long as P >= 2 x threads in both runs (each instance is then one thread's, block after
    block) or P < 2 x threads in both (instances split into chunks summed in chunk order). With
    batch > 256 a run on either side of that line sums an instance's blocks in another order, so
    ``grad_U`` can differ in the last bits between the two. On CUDA ``grad_U`` is summed with
    atomic adds, so its last bits can differ from run to run: under
    ``torch.use_deterministic_algorithms(True)`` the CUDA op raises (``warn_only=True``: warns),
    as torch's own nondeterministic kernels do.

    Range: as in :func:`molrg_ext.subspace_dae`, float32 needs the squared projections and the
    weighted loss inside its normal range (training data of norm about 1e-19 to 1e19 at most,
    less with large lambda); the op does not rescale X. Use float64 beyond that.
    """
    check_float_pair(X, U, "X", "U", "train_step")
    if not isinstance(levels, Levels):
        raise TypeError("train_step: levels must be a Levels table from make_levels()")
    batched = X.dim() == 3
    if X.dim() not in (2, 3):
        raise ValueError(f"train_step: X must be [N, n] or [P, N, n], got shape {tuple(X.shape)}")
    if U.dim() != X.dim() + 1:
        raise ValueError(
            f"train_step: U must be {'[P, K, n, dmax]' if batched else '[K, n, dmax]'} to match "
            f"X of shape {tuple(X.shape)}, got shape {tuple(U.shape)}"
        )
    X3 = X if batched else X.unsqueeze(0)
    U4 = U if batched else U.unsqueeze(0)
    if U4.shape[0] != X3.shape[0]:
        raise ValueError(f"train_step: U has {U4.shape[0]} instances but X has {X3.shape[0]}")
    if U4.shape[2] != X3.shape[2]:
        raise ValueError(f"train_step: U has n = {U4.shape[2]} rows but X has n = {X3.shape[2]}")
    if X3.shape[1] == 0:
        raise ValueError("train_step: X holds no training samples (N = 0)")
    K, dmax = U4.shape[1], U4.shape[3]
    if dmax == 0:
        raise ValueError("train_step: U must have at least one column (dmax = 0)")
    dims_l = parse_dims(dims, K, dmax, X3.shape[2], "train_step")
    mode_i = parse_mode(mode, "train_step")
    batch = as_int(batch, "batch", "train_step", 1, 2**32)
    seed = check_seed(seed, "seed", "train_step", hi=2**63)
    step = as_int(step, "step", "train_step", 0, 2**32)
    table = _cached_table(levels, X.dtype, X.device)
    if mode == "soft" and levels.bias is None and len(set(dims_l)) > 1:
        # a table of make_levels(schedule) without dims: every logit gets the same shift, which
        # is the posterior mean only for equal dims (dims [1, 6] at the true bases: loss 2.816
        # against 2.763 with the bias)
        warnings.warn(f"train_step: soft mode with unequal dims {dims_l}, but levels has no "
                      "logit bias: the denoiser is not the posterior mean of Lemma 1 (build "
                      "the table with make_levels(schedule, L, dims=...), in this dims order)",
                      UserWarning, stacklevel=2)
    bias = None
    if levels.bias is not None:
        if levels.bias.shape != (levels.L, K):
            raise ValueError(
                f"train_step: levels.bias has shape {tuple(levels.bias.shape)}, expected "
                f"[L, K] = [{levels.L}, {K}]"
            )
        bias = levels.bias.to(dtype=X.dtype, device=X.device).contiguous()
    if lr is not None:
        lr = real_number(lr, "lr", "train_step")
        if abs(lr) > torch.finfo(X.dtype).max:  # the update is in X's dtype
            raise ValueError(f"train_step: lr = {lr:g} overflows X's dtype {X.dtype} "
                             f"(largest finite value {torch.finfo(X.dtype).max:g})")
        if U.requires_grad:
            raise ValueError("train_step: lr updates U in place, so U must not require grad")
        if any(st == 0 and sz > 1 for st, sz in zip(U.stride(), U.shape)):
            raise ValueError(f"train_step: lr updates U in place, but U is an expanded view "
                             f"(strides {tuple(U.stride())}: several entries share memory); pass "
                             f"U.clone()")
    Uc = U4.contiguous()
    loss, grad = torch.ops.molrg.train_step(X3.contiguous(), Uc, table, bias, dims_l, batch, seed,
                                            step, mode_i)
    if lr is not None:
        with torch.no_grad():
            U.sub_(grad.view_as(U) * float(lr))
    if not batched:
        return loss.squeeze(0), grad.squeeze(0)
    return loss, grad


@torch.library.register_fake("molrg::philox_draws")
def _philox_draws_fake(seed, step, P, batch, N, L, n, float64):
    eps_dtype = torch.float64 if float64 else torch.float32
    return (torch.empty((P, batch), dtype=torch.long), torch.empty((P, batch), dtype=torch.long),
            torch.empty((P, batch, n), dtype=eps_dtype))


@torch.library.register_fake("molrg::train_step")
def _train_step_fake(X, U, levels, level_bias, dims, batch, seed, step, mode):
    return X.new_empty((X.shape[0],)), U.new_empty(U.shape)
