"""``SubspaceDAE``: the paper's low-rank denoiser (eqs. (9), (11), (16)) as an ``nn.Module``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._args import (INDEX_MAX, as_int, check_mixture_weights, dims_list, is_one_value,
                    parse_dims, parse_mode, real_tensor, values_readable)
from .ops import hard_assign, subspace_dae
from .posterior import posterior_mean_coefficients
from .schedules import SCHEDULES, get_schedule

__all__ = ["SubspaceDAE", "random_orthonormal"]


def random_orthonormal(n: int, d: int, *batch: int, generator=None, dtype=torch.float32,
                       device=None) -> torch.Tensor:
    """Random n x d matrices with orthonormal columns (QR of a Gaussian), shape [*batch, n, d]."""
    where = "random_orthonormal"
    n, d = as_int(n, "n", where, 1), as_int(d, "d", where, 1)
    if d > n:
        raise ValueError(f"{where}: d = {d} orthonormal columns need d <= n = {n}")
    batch = tuple(as_int(b, f"batch[{i}]", where, 0) for i, b in enumerate(batch))
    numel = math.prod(batch) * n * d
    if numel >= 2**63:  # torch's sizes are int64; randn would fail with an unnamed overflow
        raise ValueError(f"{where}: the result [*batch, n, d] = {[*batch, n, d]} would hold "
                         f"{numel} elements, more than a tensor can (2**63 - 1)")
    g = torch.randn(*batch, n, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.to(dtype=dtype, device=device).contiguous()


def _schedule(schedule, where: str):
    """None, a schedule object (with callable s and sigma) or the name of one."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        if schedule.lower() not in SCHEDULES:
            raise ValueError(f"{where}: schedule must be a schedule object or one of "
                             f"{sorted(SCHEDULES)}, got {schedule!r}")
        return get_schedule(schedule)
    if not (callable(getattr(schedule, "s", None)) and callable(getattr(schedule, "sigma", None))):
        raise TypeError(f"{where}: schedule must have methods s(t) and sigma(t) (see "
                        f"molrg_ext.schedules) or be a name in {sorted(SCHEDULES)}, got "
                        f"{type(schedule).__name__}")
    return schedule




class SubspaceDAE(nn.Module):
    """Denoiser ``x_theta(x_t, t) = c_t sum_k w_k U_k U_k^T x_t`` with learnable bases ``U``.

    Coefficients ``c``, ``phi`` and the logit bias follow Lemma 1 / Proposition 1 from the noise
    level, so with ``U = U*`` the module is the exact posterior mean ``E[x_0 | x_t]``.

    Args:
        n: ambient dimension.
        dims: the subspace dimensions d_k (a list), or one int used for all ``K`` subspaces.
        K: number of subspaces when ``dims`` is an int.
        mode: ``"soft"`` (eq. (9)) or ``"hard"`` (eq. (16)).
        pi: mixture weights (default uniform); they enter the logit bias.
        instances: when given, train that many independent problem instances: ``U`` is
            ``[P, K, n, dmax]`` and inputs are ``[P, B, n]``.
        U: initial bases ``[K, n, dmax]`` (or ``[P, K, n, dmax]``), a finite floating-point
            tensor; default random orthonormal.
        schedule: an object with ``s(t)`` and ``sigma(t)`` (see :mod:`molrg_ext.schedules`), or
            the name of one (``"vp"``, ``"ve"``, ``"edm"``, with its default parameters), used
            when ``forward`` is called with ``t=``.
        dtype: ``torch.float32`` or ``torch.float64`` (the ops' dtypes).
    """

    def __init__(
        self,
        n: int,
        dims: Union[int, Sequence[int]],
        K: Optional[int] = None,
        *,
        mode: str = "soft",
        pi: Optional[Sequence[float]] = None,
        instances: Optional[int] = None,
        U: Optional[torch.Tensor] = None,
        schedule=None,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        where = "SubspaceDAE"
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if K is not None:
            K = as_int(K, "K", where, 1)
        if K is None and is_one_value(dims):
            as_int(dims, "dims", where, 1)  # a non-int is a TypeError first
            raise ValueError("SubspaceDAE: K is required when dims is an int")
        dims = dims_list(dims, K, where)
        K = len(dims)
        self.n = as_int(n, "n", where, 1, INDEX_MAX + 1)  # the ops index with int32
        self.K, self.dmax = K, max(dims) if dims else 0
        self.dims = parse_dims(dims, K, self.dmax, self.n, "SubspaceDAE")
        parse_mode(mode, "SubspaceDAE")
        self.mode = mode
        if instances is not None:
            instances = as_int(instances, "instances", where, 1, INDEX_MAX + 1)
        self.instances = instances
        self.schedule = _schedule(schedule, where)
        if pi is not None:
            pi_t = check_mixture_weights(real_tensor(pi, "pi", where, torch.float64), K, where)
            self.register_buffer("pi", (pi_t / pi_t.sum()).to(dtype))
        else:
            self.pi = None
        batch = () if instances is None else (instances,)
        shape = (*batch, K, self.n, self.dmax)
        if U is None:
            U = random_orthonormal(self.n, self.dmax, *batch, K, generator=generator, dtype=dtype,
                                   device=device)
        else:
            if not isinstance(U, torch.Tensor):
                raise TypeError(f"{where}: U must be a torch.Tensor, got {type(U).__name__}")
            if not U.is_floating_point():  # a cast would drop an imaginary part or make 0/1 bases
                raise TypeError(f"{where}: U must be a floating-point tensor, got dtype {U.dtype}")
            if tuple(U.shape) != shape:
                raise ValueError(f"SubspaceDAE: U must have shape {shape}, got {tuple(U.shape)}")
            if not bool(torch.isfinite(U).all()):
                raise ValueError(f"{where}: U contains NaN or Inf values")
        self.U = nn.Parameter(U.detach().to(dtype=dtype, device=device).clone())

    def coefficients(self, sigma, s=1.0):
        """(c, phi, bias) at noise level ``sigma`` (x_t = s x_0 + s sigma eps); ``sigma`` and ``s``
        finite and > 0 (numbers, sequences or tensors that broadcast together)."""
        where = "SubspaceDAE.coefficients"
        return self._coefficients(self._level(sigma, "sigma", where), self._level(s, "s", where),
                                  where)

    def _level(self, v, name: str, where: str):
        """A noise level or scale as a tensor of U's dtype and device; a Python number stays one
        (checked here, without a device sync)."""
        if isinstance(v, bool):
            raise TypeError(f"{where}: {name} must be a number or a tensor, got bool")
        if isinstance(v, (int, float)):
            if not 0 < v < math.inf:  # NaN fails too
                raise ValueError(f"{where}: {name} must be finite and > 0, got {v}")
            big = torch.finfo(self.U.dtype).max
            if v > big:
                raise ValueError(f"{where}: {name} must be <= {big:g} (the module's dtype is "
                                 f"{self.U.dtype}), got {v}")
            return v
        if isinstance(v, torch.Tensor) and v.dtype == self.U.dtype and v.device == self.U.device:
            return v  # already what real_tensor would make (saves ~3 us per call)
        return real_tensor(v, name, where, self.U.dtype, self.U.device)

    def _coefficients(self, sigma, s, where: str, t=None, check_phi: bool = True):
        """posterior_mean_coefficients(s, s sigma) with errors that name sigma and s (or t, where
        the schedule gave them at t) and the function called, not s and gamma."""
        shapes = [tuple(v.shape) for v in (sigma, s) if isinstance(v, torch.Tensor)]
        try:
            if len(shapes) == 2 and shapes[0] != shapes[1] and all(shapes):  # (7 us otherwise)
                torch.broadcast_shapes(*shapes)
        except RuntimeError:
            raise ValueError(f"{where}: sigma and s must broadcast together, got shapes "
                             f"{shapes[0]} and {shapes[1]}") from None
        sigma = torch.as_tensor(sigma, dtype=self.U.dtype, device=self.U.device)
        s = torch.as_tensor(s, dtype=self.U.dtype, device=self.U.device)
        # The checks cost nothing on valid levels: posterior_mean_coefficients refuses s or gamma
        # = s sigma out of range (naming gamma), and only then are sigma, s, t looked at to name
        # them. One reduction over phi (check_phi) finds levels whose phi overflows (c overflows
        # only where phi does); forward leaves that to the op's own finiteness check and names the
        # level when it fails. Checking all of it up front cost 57 us per forward at B = 16.
        try:
            c, phi, bias = posterior_mean_coefficients(s, s * sigma, self.dims, self.pi)
        except ValueError:
            if values_readable(sigma) and values_readable(s):
                self._bad_level(sigma, s, where, t)
            raise
        if check_phi:
            self._check_phi(sigma, s, c, phi, where, t)
        return c, phi, bias

    def _check_phi(self, sigma, s, c, phi, where: str, t):
        """The ValueError naming sigma (or t) where phi (and c) overflowed the dtype."""
        if values_readable(phi) and not bool(torch.isfinite(phi).all()):
            self._bad_level(sigma, s, where, t, torch.isfinite(c) & torch.isfinite(phi))

    def _bad_level(self, sigma, s, where: str, t, ok=None):
        """Raise the ValueError for the first sample where sigma, s or s sigma, or (given ok, where
        the coefficients are finite) c and phi are out of range; return if there is none."""
        sigma, s = (torch.as_tensor(v, dtype=self.U.dtype, device=self.U.device)
                    for v in (sigma, s))  # forward's may be Python numbers
        shape = torch.broadcast_shapes(sigma.shape, s.shape, () if t is None else t.shape)
        sig, sc = torch.broadcast_to(sigma, shape).flatten(), torch.broadcast_to(s, shape).flatten()
        levels = ok is None  # the levels themselves, not the coefficients
        if levels:
            ok = (sig > 0) & (sc > 0) & (sig * sc < math.inf)
        bad = (~ok.flatten()).nonzero()
        if bad.numel() == 0:
            return  # not a level out of range: the caller raises its own error
        i = int(bad[0, 0])
        at = f"sigma = {sig[i].item():g}, s = {sc[i].item():g}"
        if t is not None:
            at = f"t = {torch.broadcast_to(t, shape).flatten()[i].item():g} (the schedule's {at})"
        dt = self.U.dtype
        if levels:
            if t is not None:
                raise ValueError(f"{where}: t must give a finite noise level sigma(t) > 0 and "
                                 f"scale s(t) > 0 from the schedule, got {at}")
            if not (0 < sig[i] < math.inf):
                raise ValueError(f"{where}: sigma must be finite and > 0 (in {dt}), got "
                                 f"{sig[i].item()}")
            if not (0 < sc[i] < math.inf):
                raise ValueError(f"{where}: s must be finite and > 0 (in {dt}), got {sc[i].item()}")
            raise ValueError(f"{where}: s * sigma must be <= {torch.finfo(dt).max:g} (in {dt}), "
                             f"got {at}")
        # phi = 1 / (2 s^2 sigma^2 (1 + sigma^2)) (and c = 1 / (s (1 + sigma^2)), which overflows
        # only where phi does) beyond the dtype: not representable, so no other way to compute it
        what = "t" if t is not None else "sigma" if sc[i] == 1 else "s * sigma"
        raise ValueError(f"{where}: {what} is too small for {dt}: at {at}, phi = 1 / (2 s^2 "
                         f"sigma^2 (1 + sigma^2)) overflows; s * sigma must be >= about "
                         f"{math.sqrt(0.5 / torch.finfo(dt).max):.3g}")

    def forward(self, x_t: torch.Tensor, sigma=None, *, t=None, s=None, assign=None):
        """Denoise ``x_t`` at noise level ``sigma`` (scalar or per sample), or at time ``t`` of
        ``self.schedule``. ``s`` is the signal scale (1 for VE/EDM). sigma and s (or the
        schedule's sigma(t), s(t)) must be finite and > 0."""
        where = "SubspaceDAE.forward"
        if t is not None:
            if sigma is not None or s is not None:
                raise ValueError("SubspaceDAE: pass either sigma (and s) or t, not both: t sets "
                                 "both from the schedule")
            if self.schedule is None:
                raise ValueError("SubspaceDAE: forward(t=...) needs a schedule")
            t = real_tensor(t, "t", where, self.U.dtype, self.U.device)
            self._check_levels_shape(x_t, t, "t", where)
            s, sigma = self.schedule.s(t), self.schedule.sigma(t)
        else:
            if sigma is None:
                raise ValueError("SubspaceDAE: pass sigma or t")
            sigma = self._level(sigma, "sigma", where)
            s = self._level(1.0 if s is None else s, "s", where)
            self._check_levels_shape(x_t, sigma, "sigma", where)
            self._check_levels_shape(x_t, s, "s", where)
        c, phi, bias = self._coefficients(sigma, s, where, t, check_phi=False)
        try:
            return subspace_dae(x_t, self.U, c, phi, bias, self.dims, self.mode, assign)
        except RuntimeError:  # the op refuses non-finite c, phi: name the level that made them
            self._check_phi(sigma, s, c, phi, where, t)
            raise

    @staticmethod
    def _check_levels_shape(x_t, v, name: str, where: str):
        """v must be one value or broadcast to x_t's per-sample shape ([B] or [P, B])."""
        if not (isinstance(v, torch.Tensor) and isinstance(x_t, torch.Tensor)
                and x_t.dim() in (2, 3)):
            return  # a number, or a bad x_t that subspace_dae names
        per, vs = tuple(x_t.shape[:-1]), tuple(v.shape)
        try:
            ok = vs == per or not vs or torch.broadcast_shapes(vs, per) == per
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{where}: {name} must be one value or broadcast to x_t's per-sample "
                             f"shape {list(per)}, got shape {tuple(v.shape)}")

    def assign(self, x0: torch.Tensor) -> torch.Tensor:
        """Hard assignment ``argmax_k ||U_k^T x0||`` (eq. (17))."""
        return hard_assign(x0, self.U.detach(), self.dims)

    def bases(self) -> list[torch.Tensor]:
        """The K bases ``U_k`` [..., n, d_k] (padded columns dropped)."""
        return [self.U[..., k, :, :d] for k, d in enumerate(self.dims)]

    @torch.no_grad()
    def orthonormalize_(self) -> "SubspaceDAE":
        """Retract each U_k onto the Stiefel manifold (QR with positive diagonal)."""
        for k, d in enumerate(self.dims):
            q, r = torch.linalg.qr(self.U[..., k, :, :d])
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            self.U[..., k, :, :d] = q
            self.U[..., k, :, d:] = 0
        return self

    def extra_repr(self) -> str:
        inst = f", instances={self.instances}" if self.instances else ""
        return f"n={self.n}, dims={self.dims}, mode={self.mode!r}{inst}"
