"""Algorithm 1 (SGD on the training loss (6)) for the subspace denoiser, P instances at once.

Each step draws, per instance, M pairs ``(i_m, t_m)`` (sample index, one of L time levels of
``schedule.time_grid(L)``) and Gaussian noise, forms ``x_t = s_t x_i + gamma_t eps``, and steps
on the mean of ``lambda_t ||x_theta(x_t, t) - x_i||^2`` over the M pairs (the paper's SGD step).
The denoiser is (9) (``mode="soft"``) or the hard-max (16) with the assignment (17) computed from
the clean sample; its coefficients ``c, phi, beta`` are those of Lemma 1 / Proposition 1 with
uniform mixture weights. The loss of all P instances is summed before backward, so each
instance gets exactly its own gradient (SGD and Adam act element-wise).

``retraction`` (default ``"qr"``) maps each U_k back to orthonormal columns after every step,
the constraint set ``U_k^T U_k = I`` of problems (12) and (18); ``None`` leaves U free.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .._args import as_int, check_seed, dims_list, parse_dims, parse_mode, real_number
from ..modules import random_orthonormal
from ..ops import hard_assign, subspace_dae
from ..posterior import posterior_mean_coefficients
from ..schedules import Schedule, get_schedule

__all__ = ["SubspaceTrainer", "retract", "paper_init"]


def _mask(dims, dmax, dtype, device=None):
    return (torch.arange(dmax, device=device)[None, :]
            < torch.tensor(dims, device=device)[:, None]).to(dtype)  # [K, dmax]


def _bases(U, name: str, where: str, dims, dtypes) -> list[int]:
    """dims as K ints in [1, min(dmax, n)], after checking that U is a [..., K, n, dmax] tensor of
    one of ``dtypes``."""
    if not isinstance(U, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(U).__name__}")
    if U.dtype not in dtypes:
        raise TypeError(f"{where}: {name} must be {' or '.join(str(d) for d in dtypes)}, got "
                        f"{U.dtype}")
    if U.dim() < 3:
        raise ValueError(f"{where}: {name} must be [..., K, n, dmax], got shape {tuple(U.shape)}")
    K, n, dmax = U.shape[-3:]
    return parse_dims(dims, K, dmax, n, where)


@torch.no_grad()
def retract(U: torch.Tensor, dims, method: Optional[str] = "qr") -> torch.Tensor:
    """Orthonormalise the first ``dims[k]`` columns of each ``U[..., k, :, :]`` (padded columns
    set to 0). ``"qr"``: Q of QR with a positive diagonal of R; ``"polar"``: the nearest
    orthonormal matrix ``A B^T`` from the SVD ``U_k = A S B^T``; ``None``: U unchanged.
    U is float32 or float64 [..., K, n, dmax]; dims K ints in [1, min(dmax, n)]."""
    if method not in ("qr", "polar", None):
        raise ValueError(f"retract: method must be 'qr', 'polar' or None, got {method!r}")
    return _retract(U, _bases(U, "U", "retract", dims, (torch.float32, torch.float64)), method)


def _retract(U: torch.Tensor, dims: list[int], method: Optional[str]) -> torch.Tensor:
    """retract without its checks, for the trainer's steps (U and dims checked by fit; the checks
    were 5 us of a 78 us retraction at (8, 2, 48, 6))."""
    if method is None:
        return U
    out = torch.zeros_like(U)
    for k, d in enumerate(dims):
        Uk = U[..., k, :, :d]
        if method == "qr":
            q, r = torch.linalg.qr(Uk)
            sgn = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            q = q * torch.where(sgn == 0, torch.ones_like(sgn), sgn).unsqueeze(-2)
        else:
            a, _, bh = torch.linalg.svd(Uk, full_matrices=False)
            q = a @ bh
        out[..., k, :, :d] = q
    return out


def paper_init(U_true: torch.Tensor, dims, scale: float = 0.2,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Eq. (48): ``U*_k + scale * Delta`` with i.i.d. standard Gaussian ``Delta``, then QR.
    U_true is a finite real floating [..., K, n, dmax] tensor (computed in float64, returned in
    its dtype); dims K ints in [1, min(dmax, n)]; scale a finite number >= 0."""
    where = "paper_init"
    # any real floating dtype: the perturbation and QR run in float64
    dims = _bases(U_true, "U_true", where, dims,
                  (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    scale = real_number(scale, "scale", where, 0.0)
    if not torch.isfinite(U_true).all():
        raise ValueError(f"{where}: U_true contains NaN or Inf")
    return _paper_init(U_true, dims, scale, generator)


def _paper_init(U_true: torch.Tensor, dims: list[int], scale: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """paper_init without its argument checks (SubspaceTrainer.fit has made them)."""
    U0 = U_true.detach().cpu().to(torch.float64)
    delta = torch.randn(U_true.shape, generator=generator, dtype=torch.float64)
    U0 = U0 + scale * delta
    if not torch.isfinite(U0).all():
        raise ValueError(f"paper_init: scale = {scale:g} overflows float64 in U_true + scale * "
                         f"Delta")
    U0 = U0 * _mask(dims, U_true.shape[-1], torch.float64)[:, None, :]
    return _retract(U0, dims, "qr").to(U_true.dtype)


class SubspaceTrainer:
    """Train the bases ``U`` [P, K, n, dmax] of the subspace denoiser by Algorithm 1.

    Args:
        K: number of subspaces.
        dims: d_k, an int or K ints.
        mode: ``"hard"`` (eq. (16), assignment from the clean sample) or ``"soft"`` (eq. (9)).
        schedule: a :class:`~molrg_ext.schedules.Schedule` or its name (default ``"vp"``).
        optimizer: ``"sgd"`` (the paper) or ``"adam"``.
        lr: learning rate.
        batch: M pairs per step and instance.
        steps: maximal number of steps J.
        retraction: ``"qr"`` (default), ``"polar"`` or ``None``.
        init: ``"paper"`` (eq. (48), needs ``U_true`` in :meth:`fit`) or ``"random"``.
        init_scale: the 0.2 of eq. (48).
        seed: seeds initialisation, sampling of (i, t) and the noise.
        engine: ``"autograd"`` (``molrg_ext.subspace_dae`` + autograd, torch RNG) or
            ``"fused"`` (``molrg_ext.train_step``: loss and dL/dU in one call, (i, t, eps) drawn
            inside the kernel from Philox keyed by ``(seed, step)``). Both compute the same
            loss (6); their random streams differ, so results agree in distribution only.
        tol: early stop when, for every instance, the projectors ``U_k U_k^T`` moved less than
            ``tol`` (Frobenius, summed over k) over the last ``check_every`` steps; ``None``
            disables it.
        check_every: steps between convergence checks.
        levels: number L of time levels (the paper: 64).
        progress: show a tqdm bar.

    After :meth:`fit`: ``U_`` [P, K, n, dmax]; ``history_`` dict with ``"loss"`` and
    ``"grad_norm"`` (tensors [steps_run, P]); ``n_steps_``; ``converged_`` (bool [P]).
    """

    def __init__(self, K: int, dims: Union[int, Sequence[int]], mode: str = "hard",
                 schedule: Union[str, Schedule] = "vp", optimizer: str = "sgd", lr: float = 1e-4,
                 batch: int = 128, steps: int = 10_000, retraction: Optional[str] = "qr",
                 init: str = "paper", init_scale: float = 0.2, seed: int = 0,
                 engine: str = "autograd", tol: Optional[float] = 1e-6, check_every: int = 100,
                 levels: int = 64, progress: bool = False):
        where = "SubspaceTrainer"
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"{where}: K must be a positive int, got {K!r}")
        self.dims = dims_list(dims, K, where)  # 2.9 is an error, not 2
        parse_mode(mode, where)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"{where}: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if retraction not in ("qr", "polar", None):
            raise ValueError(f"{where}: retraction must be 'qr', 'polar' or None, got {retraction!r}")
        if init not in ("paper", "random"):
            raise ValueError(f"{where}: init must be 'paper' or 'random', got {init!r}")
        if engine not in ("autograd", "fused"):
            raise ValueError(f"{where}: engine must be 'autograd' or 'fused', got {engine!r}")
        lr, init_scale = (real_number(v, name, where, 0.0) for v, name in
                          ((lr, "lr"), (init_scale, "init_scale")))
        # the bounds of the fused op (train_step: 32-bit batch, level and step counters, seed
        # < 2**63); torch.Generator.manual_seed takes seeds < 2**64
        fused = engine == "fused"
        batch, levels = (as_int(v, name, where, 1, 2**32) for v, name in
                         ((batch, "batch"), (levels, "levels")))
        steps = as_int(steps, "steps", where, 1, 2**32 if fused else None)
        check_every = as_int(check_every, "check_every", where, 1)
        if tol is not None:  # inf is allowed: stop at the first check
            tol = real_number(tol, "tol", where, 0.0, math.inf)
        self.K, self.mode, self.optimizer, self.lr = K, mode, optimizer, lr
        self.schedule = get_schedule(schedule)
        self.batch, self.steps, self.retraction, self.init = batch, steps, retraction, init
        seed = check_seed(seed, "seed", where, hi=2**63 if fused else 2**64)
        self.init_scale, self.seed, self.engine, self.tol = init_scale, seed, engine, tol
        self.check_every, self.levels, self.progress = check_every, levels, progress

    # ------------------------------------------------------------------------------ helpers
    def _validate(self, X, U_true):
        where = "SubspaceTrainer.fit"
        if not isinstance(X, torch.Tensor):
            raise TypeError(f"{where}: X must be a torch.Tensor")
        if X.dim() == 2:
            X = X.unsqueeze(0)
        if X.dim() != 3:
            raise ValueError(f"{where}: X must be [P, N, n] or [N, n], got {tuple(X.shape)}")
        if X.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: X must be float32 or float64, got {X.dtype}")
        P, N, n = X.shape
        if P == 0 or N == 0:
            raise ValueError(f"{where}: X is empty (shape {tuple(X.shape)})")
        if not torch.isfinite(X).all():
            raise ValueError(f"{where}: X contains NaN or Inf")
        parse_dims(self.dims, self.K, max(self.dims), n, where)
        if U_true is not None:
            if not isinstance(U_true, torch.Tensor) or not U_true.is_floating_point():
                raise TypeError(f"{where}: U_true must be a floating-point tensor")
            if U_true.dim() == 3:
                U_true = U_true.unsqueeze(0).expand(P, *U_true.shape)
            if U_true.shape[:3] != (P, self.K, n) or U_true.shape[3] < max(self.dims):
                raise ValueError(f"{where}: U_true must be [P={P}, K={self.K}, n={n}, >= "
                                 f"{max(self.dims)}], got {tuple(U_true.shape)}")
            U_true = U_true[..., : max(self.dims)]
            if not torch.isfinite(U_true).all():
                raise ValueError(f"{where}: U_true contains NaN or Inf")
        if self.init == "paper" and U_true is None:
            raise ValueError(f"{where}: init='paper' (eq. (48)) needs U_true")
        return X, U_true

    def _init_U(self, P, n, dtype, U_true, g):
        dmax = max(self.dims)
        if self.init == "paper":
            return _paper_init(U_true, self.dims, self.init_scale, g).to(dtype)
        U0 = random_orthonormal(n, dmax, P, self.K, generator=g, dtype=torch.float64)
        return _retract(U0 * _mask(self.dims, dmax, torch.float64)[:, None, :], self.dims,
                       "qr").to(dtype)

    def _coeff_table(self, dtype):
        t, s, sigma, w = self.schedule.levels(self.levels, dtype=torch.float64)
        gamma = s * sigma
        c, phi, bias = posterior_mean_coefficients(s, gamma, self.dims)
        return [v.to(dtype) for v in (s, gamma, c, phi, bias, w)]

    def _loss_autograd(self, X, U, g, table):
        s, gamma, c, phi, bias, w = table
        P, N, n = X.shape
        M = self.batch
        idx = torch.randint(N, (P, M), generator=g)
        lev = torch.randint(self.levels, (P, M), generator=g)
        eps = torch.randn(P, M, n, generator=g, dtype=X.dtype)
        x0 = torch.gather(X, 1, idx[..., None].expand(P, M, n))
        xt = s[lev][..., None] * x0 + gamma[lev][..., None] * eps
        assign = hard_assign(x0, U.detach(), self.dims) if self.mode == "hard" else None
        y = subspace_dae(xt, U, c[lev], phi[lev], bias[lev], self.dims, self.mode, assign)
        return ((y - x0).square().sum(-1) * w[lev]).mean(1)  # [P]

    def _fused_step(self, X, U, step, levels_obj):
        import molrg_ext

        loss, grad = molrg_ext.train_step(X, U.detach(), self.dims, levels_obj, self.batch,
                                          self.seed, step, mode=self.mode)
        return loss, grad.clone()

    # ---------------------------------------------------------------------------------- fit
    def fit(self, X: torch.Tensor, U_true: Optional[torch.Tensor] = None) -> "SubspaceTrainer":
        """Train on ``X`` [P, N, n] (or [N, n]); ``U_true`` [P, K, n, d] for ``init="paper"``."""
        X, U_true = self._validate(X, U_true)
        X = X.detach().contiguous()
        P, N, n = X.shape
        # the optimizer converts lr to X's dtype (SGD's update raised a bare RuntimeError)
        if self.lr > torch.finfo(X.dtype).max:
            raise ValueError(f"SubspaceTrainer.fit: lr must be finite in X's dtype {X.dtype} "
                             f"(<= {torch.finfo(X.dtype).max:g}), got {self.lr:g}")
        g = torch.Generator().manual_seed(self.seed)
        U = torch.nn.Parameter(self._init_U(P, n, X.dtype, U_true, g))
        opt = (torch.optim.SGD([U], lr=self.lr) if self.optimizer == "sgd"
               else torch.optim.Adam([U], lr=self.lr))
        levels_obj = None
        if self.engine == "fused":
            import molrg_ext

            if not (hasattr(molrg_ext, "train_step") and hasattr(molrg_ext, "make_levels")):
                raise RuntimeError(
                    "SubspaceTrainer: engine='fused' needs molrg_ext.train_step (the fused "
                    "training-step op), which this build does not provide; use engine='autograd'")
            levels_obj = molrg_ext.make_levels(self.schedule, L=self.levels, dims=self.dims)
        table = self._coeff_table(X.dtype)
        mask = _mask(self.dims, max(self.dims), X.dtype)
        # rows of preallocated buffers, doubled when full (a list of two [P] tensors per step
        # grew the process by ~5 KB a step in allocator overhead: 41 MB over 10,000 steps for
        # 0.6 MB of history; `steps` alone may be far more than an early stop reaches)
        losses = torch.empty(min(self.steps, 1024), P, dtype=X.dtype, device=X.device)
        gnorms = torch.empty_like(losses)
        converged = torch.zeros(P, dtype=torch.bool)
        prev = U.detach().clone() if self.tol is not None else None
        it = range(self.steps)
        if self.progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="SubspaceTrainer", leave=False)
        step = 0
        for step in it:
            opt.zero_grad(set_to_none=True)
            if self.engine == "autograd":
                loss = self._loss_autograd(X, U, g, table)
                loss.sum().backward()
            else:
                loss, grad = self._fused_step(X, U, step, levels_obj)
                U.grad = grad
            with torch.no_grad():
                U.grad.mul_(mask[:, None, :])
                if step == losses.shape[0]:
                    losses, gnorms = (torch.cat([h, torch.empty_like(h)]) for h in (losses, gnorms))
                losses[step] = loss.detach()
                gnorms[step] = U.grad.flatten(1).norm(dim=1)
                opt.step()
                if self.retraction is not None:
                    U.copy_(_retract(U, self.dims, self.retraction))
                if not torch.isfinite(U).all():
                    raise FloatingPointError(
                        f"SubspaceTrainer: U became non-finite at step {step} (lr = {self.lr} "
                        "too large?)")
            if self.tol is not None and (step + 1) % self.check_every == 0:
                change = _projector_change(U.detach(), prev, mask)
                converged = change < self.tol
                prev = U.detach().clone()
                if bool(converged.all()):
                    break
        self.U_ = U.detach().clone()
        self.n_steps_ = step + 1
        self.converged_ = converged
        self.history_ = {"loss": losses[: step + 1].clone(),
                         "grad_norm": gnorms[: step + 1].clone()}
        return self


def _projector_change(U: torch.Tensor, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per instance ``sqrt(sum_k ||A_k A_k^T - B_k B_k^T||_F^2)`` (A, B: U, V with the columns
    past d_k masked) without forming the n x n projectors ([P, K, n, n]: 360 MB at n = 3072,
    K = 10, where U is 4.7 MB). B is first rotated onto A (B Q with Q the polar factor of
    B^T A, which leaves B B^T unchanged), so D = A - B is as small as the subspaces allow (a
    rotation within the subspace is no change). With that D, ``A A^T - B B^T = G H^T`` for
    G = [D, B] and H = [A, D], so the squared norm is ``tr((G^T G)(H^T H))`` from 2d x 2d Gram
    matrices; every term carries a factor of D, so a small change does not cancel against
    ||A^T A||^2."""
    A, B = U * mask[:, None, :], V * mask[:, None, :]
    W, _, Zh = torch.linalg.svd(B.mT @ A)
    B = B @ (W @ Zh)
    D = A - B
    G, H = torch.cat([D, B], dim=-1), torch.cat([A, D], dim=-1)
    sq = ((G.mT @ G) * (H.mT @ H)).sum(dim=(-1, -2))  # tr(X Y) for symmetric X, Y
    return sq.clamp_min(0).sum(dim=-1).sqrt()
