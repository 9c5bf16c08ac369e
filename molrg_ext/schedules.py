"""Noise schedules of the forward process ``x_t = s_t x_0 + gamma_t eps``, ``gamma_t = s_t sigma_t``.

Every schedule maps times ``t in [0, 1]`` (tensors in, tensors out, any shape, dtype kept) to the
signal scale ``s(t)``, the noise-to-signal ratio ``sigma(t)`` and ``gamma(t) = s(t) sigma(t)``
(``t = 0`` is the clean data; the training grid below is in ``(0, 1]``). For :class:`EDM`, where
``t`` is ``sigma`` itself, the domain is ``t in [0, inf)``. ``sigma_to_t`` takes the levels the
schedule reaches (``sigma(0) <= sigma <= sigma(1)``, with a relative slack of 1e-5 for round-off)
and ``EDM.precond`` a ``sigma > 0``. Values outside the domain, NaN included, raise a ValueError
naming ``t`` or ``sigma`` (the check is skipped while ``torch.compile`` traces and inside
``torch.func`` transforms, where it cannot run).

``weight(t)`` is the loss weight ``lambda_t`` of eq. (6). **Default: ``lambda_t = 1``** for every
schedule. This is the weighting Algorithm 1 of the paper actually uses (its SGD step is the plain
mean of the squared errors over the mini-batch), it keeps the loss bounded at every level (the
EDM weight ``1/sigma^2``-like factor explodes at ``sigma = 0.002`` for a wrong subspace), and
Theorems 1 and 3 hold for any positive ``lambda_t``. ``EDM(weighting="edm")`` gives EDM's
``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` instead.

``time_grid(L)`` is the paper's "we divide the time interval [0, 1] into 64 time steps":
``t_i = i / L`` for ``i = 1..L`` (t = 0, where gamma = 0 and the posterior coefficients are
undefined, is left out).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from ._args import as_int, check_range, number_or_tensor, real_number

__all__ = ["Schedule", "VP", "VE", "EDM", "get_schedule", "SCHEDULES"]

TensorLike = Union[float, int, torch.Tensor]


_SLACK = 1e-5  # relative round-off slack on the sigma range of sigma_to_t
_MAX_LEVELS = 2**32  # grid sizes: the training step's level index is 32-bit (make_levels)


def _check_grid_dtype(dtype, where: str):
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _sqrt_expm1(x: float) -> float:
    """sqrt(e^x - 1), also where e^x overflows but the result does not (inf beyond float64)."""
    try:
        return math.sqrt(math.expm1(x))
    except OverflowError:
        pass
    try:
        return math.exp(0.5 * x) * math.sqrt(-math.expm1(-x))
    except OverflowError:
        return math.inf


def _karras_log(smin: float, smax: float, rho: float, N: int, device=None) -> torch.Tensor:
    """EDM.sigma_steps' levels (without the final 0) in float64, in a form that neither overflows
    nor loses smin for any rho: sigma_i = smax q^rho, q = (1 - f) + f r, f = i / (N - 1),
    r = (smin / smax)^(1/rho). log q = log1p(f (r - 1)) for r near 1 (large rho), and
    log(e^log(1 - f) + e^(log f + log r)) for small r, where r itself may underflow. In float64
    since rho and rho log q may be beyond float32's range."""
    log_ratio = math.log(smin) - math.log(smax)
    log_r = log_ratio / rho
    f = torch.arange(N, dtype=torch.float64, device=device) / (N - 1)
    if log_r > -1.0:
        log_q = torch.log1p(f * math.expm1(log_r))
    else:
        log_q = torch.logaddexp(torch.log1p(-f), torch.log(f) + log_r)
    if log_ratio > -700:
        return smax * torch.exp(rho * log_q)
    return torch.exp(math.log(smax) + rho * log_q)  # exp(rho log q) would underflow


class Schedule:
    """Base class. Subclasses implement ``s(t)`` and ``sigma(t)`` (and ``sigma_to_t``)."""

    name = "base"
    t_max = 1.0  # times live in [0, t_max]

    def _time(self, t: TensorLike, fn: str) -> torch.Tensor:
        """``t`` as a tensor, checked to lie in [0, t_max]."""
        where = f"{type(self).__name__}.{fn}"
        return check_range(number_or_tensor(t, "t", where), "t", where, 0.0, self.t_max)

    def s(self, t: TensorLike) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: TensorLike) -> torch.Tensor:
        raise NotImplementedError

    def sigma_to_t(self, sigma: TensorLike) -> torch.Tensor:
        raise NotImplementedError

    def gamma(self, t: TensorLike) -> torch.Tensor:
        """Noise scale ``gamma_t = s_t sigma_t`` of ``x_t = s_t x_0 + gamma_t eps``."""
        t = self._time(t, "gamma")
        return self.s(t) * self.sigma(t)

    def weight(self, t: TensorLike) -> torch.Tensor:
        """Loss weight ``lambda_t`` (default 1, see the module docstring)."""
        t = self._time(t, "weight")
        return torch.ones_like(t)

    def train_time(self, u: torch.Tensor) -> torch.Tensor:
        """The training time at ``u`` in [0, 1]: ``t = u`` for the schedules whose times are
        [0, 1] (an :class:`EDM` maps u to its own sigma range). :meth:`time_grid` takes u = i / L,
        ``NetworkTrainer`` draws u ~ U[t_min, 1]."""
        return u

    def time_grid(self, L: int = 64, dtype=torch.float64, device=None) -> torch.Tensor:
        """The L training levels ``t_i = train_time(i / L)``, ``i = 1..L`` (``t_i = i / L``, t = 0
        excluded, except for :class:`EDM`); ``1 <= L < 2^32``, ``dtype`` float32 or float64
        (None: torch's default)."""
        where = f"{type(self).__name__}.time_grid"
        L = as_int(L, "L", where, 1, _MAX_LEVELS)
        _check_grid_dtype(dtype, where)
        return self.train_time(torch.arange(1, L + 1, dtype=dtype, device=device) / L)

    def levels(self, L: int = 64, dtype=torch.float64, device=None):
        """``(t, s, sigma, weight)`` on :meth:`time_grid`, each of shape ``[L]``."""
        t = self.time_grid(L, dtype, device)
        return t, self.s(t), self.sigma(t), self.weight(t)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class VP(Schedule):
    """Variance preserving (DDPM / score-SDE): ``alpha_bar_t = exp(-(b0 t + (b1 - b0) t^2 / 2))``,
    ``s_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t) / s_t``."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = real_number(beta_min, "beta_min", "VP", 0.0, lo_open=True)
        self.beta_max = real_number(beta_max, "beta_max", "VP", 0.0, lo_open=True)
        if self.beta_max < self.beta_min:
            raise ValueError("VP: beta_max must be >= beta_min")

    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def _huge(self, dtype: torch.dtype) -> bool:
        """Whether -log alpha_bar(1) comes near the end of dtype's exp range (very large betas),
        where the plain formulas overflow; the guarded forms run only then (decided on Python
        numbers: no device sync, and torch.compile sees a constant)."""
        x1 = self.beta_min + 0.5 * (self.beta_max - self.beta_min)
        return x1 > math.log(torch.finfo(dtype).max) - 2

    def s(self, t):
        return self._s(self._time(t, "s"))

    def _s(self, t):  # s(t) of a checked t
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t):
        return self._sigma(self._time(t, "sigma"))

    def _sigma(self, t):  # sigma(t) of a checked t
        # sqrt(1 - a) / sqrt(a) = sqrt(1/a - 1) = sqrt(expm1(-log a))
        x = -self._log_alpha_bar(t)
        sig = torch.sqrt(torch.expm1(x))
        if not self._huge(x.dtype):
            return sig
        # expm1 overflows before its square root does: e^(x/2) sqrt(1 - e^-x) there. The clamp
        # keeps the unused branch's gradient finite (sqrt'(0) at t = 0 would give NaN).
        xs = x.clamp(min=1.0)
        return torch.where(torch.isinf(sig), torch.exp(0.5 * xs) * torch.sqrt(-torch.expm1(-xs)),
                           sig)

    def gamma(self, t):
        """``gamma_t = s_t sigma_t = sqrt(1 - alpha_bar_t)``."""
        t = self._time(t, "gamma")
        s = self._s(t)
        g = s * self._sigma(t)
        if not self._huge(t.dtype):
            return g
        # where alpha_bar underflows, s (subnormal or 0) times sigma (huge or inf) loses
        # gamma = sqrt(1 - alpha_bar), which is 1 to working precision there (clamped as in sigma)
        stable = torch.sqrt(-torch.expm1(self._log_alpha_bar(t).clamp(max=-1.0)))
        return torch.where(s < torch.finfo(s.dtype).tiny, stable, g)

    def sigma_to_t(self, sigma):
        sig_max = _sqrt_expm1(self.beta_min + 0.5 * (self.beta_max - self.beta_min))
        where = "VP.sigma_to_t"
        sigma = check_range(number_or_tensor(sigma, "sigma", where), "sigma", where, 0.0,
                            sig_max * (1 + _SLACK), what=f"in [0, sigma(1) = {sig_max:g}]")
        huge = self._huge(sigma.dtype)
        # -log alpha_bar = log(1 + sigma^2) = b0 t + (b1 - b0) t^2 / 2: solve the quadratic.
        c = torch.log1p(sigma * sigma)
        if huge:
            # beyond sqrt(float max), log(1 + sigma^2) = 2 log sigma to working precision (the
            # clamp keeps log'(0) out of the gradient at sigma = 0)
            c = torch.where(torch.isinf(c), 2 * torch.log(sigma.clamp(min=1.0)), c)
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        if a == 0:
            return c / b
        t = (-b + torch.sqrt(b * b + 4 * a * c)) / (2 * a)
        if not huge:
            return t
        # b^2 or 4ac overflow for betas near float max: the same root without forming them
        # (on c = 1 where unused, so that sqrt'(0) does not put NaN in the gradient)
        ok = torch.isfinite(t)
        cs = torch.where(ok, torch.ones_like(c), c)
        root = 2 * cs / (b + torch.hypot(torch.full_like(cs, b), 2 * math.sqrt(a) * torch.sqrt(cs)))
        return torch.where(ok, t, root)


class VE(Schedule):
    """Variance exploding (score-SDE): ``s_t = 1``, ``sigma_t = smin (smax / smin)^t``."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_min = real_number(sigma_min, "sigma_min", "VE", 0.0, lo_open=True)
        self.sigma_max = real_number(sigma_max, "sigma_max", "VE", 0.0, lo_open=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError("VE: sigma_max must be > sigma_min")

    def s(self, t):
        return torch.ones_like(self._time(t, "s"))

    def sigma(self, t):
        t = self._time(t, "sigma")
        return self.sigma_min * torch.exp(t * math.log(self.sigma_max / self.sigma_min))

    def sigma_to_t(self, sigma):
        where = "VE.sigma_to_t"
        sigma = check_range(number_or_tensor(sigma, "sigma", where), "sigma", where,
                            self.sigma_min * (1 - _SLACK), self.sigma_max * (1 + _SLACK),
                            what=f"in [sigma_min, sigma_max] = [{self.sigma_min:g}, "
                                 f"{self.sigma_max:g}]")
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


class EDM(Schedule):
    """Karras et al. (EDM): ``s_t = 1``, ``sigma(t) = t`` for ``t in [0, inf)``; sampling grid
    :meth:`sigma_steps` and preconditioning :meth:`precond` for network denoisers. Training
    levels (:meth:`time_grid`, and the draws of ``NetworkTrainer(noise=EDM(...))``) are
    log-uniform over [sigma_min, sigma_max] (:meth:`train_time`).

    ``weighting``: ``"uniform"`` (default, ``lambda = 1``) or ``"edm"``
    (``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``).
    """

    name = "edm"
    t_max = math.inf  # t is sigma

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, weighting: str = "uniform"):
        self.sigma_min = real_number(sigma_min, "sigma_min", "EDM", 0.0, lo_open=True)
        self.sigma_max = real_number(sigma_max, "sigma_max", "EDM", 0.0, lo_open=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError("EDM: sigma_max must be > sigma_min")
        self.rho = real_number(rho, "rho", "EDM", 0.0, lo_open=True)
        self.sigma_data = real_number(sigma_data, "sigma_data", "EDM", 0.0, lo_open=True)
        if weighting not in ("uniform", "edm"):
            raise ValueError(f"EDM: weighting must be 'uniform' or 'edm', got {weighting!r}")
        self.weighting = weighting

    def s(self, t):
        return torch.ones_like(self._time(t, "s"))

    def sigma(self, t):
        return self._time(t, "sigma").clone()

    def train_time(self, u: torch.Tensor) -> torch.Tensor:
        """``sigma_min (sigma_max / sigma_min)^u``: training levels and draws log-uniform over
        [sigma_min, sigma_max]. (The identity map of the other schedules put every EDM training
        level in (0, 1], whatever sigma_min and sigma_max said.)"""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + (hi - lo) * u)

    def sigma_to_t(self, sigma):
        where = "EDM.sigma_to_t"
        return check_range(number_or_tensor(sigma, "sigma", where), "sigma", where, 0.0).clone()

    def weight(self, t):
        t = self._time(t, "weight")
        if self.weighting == "uniform":
            return torch.ones_like(t)
        check_range(t, "t", "EDM.weight", 0.0, lo_open=True)  # the EDM weight is 1/0 at t = 0
        sd2 = self.sigma_data ** 2
        sig = self.sigma(t)
        return (sig * sig + sd2) / (sig * sig * sd2)

    def sigma_steps(self, N: int = 18, dtype=torch.float64, device=None) -> torch.Tensor:
        """EDM sampling grid ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
        i = 0..N-1 (decreasing from sigma_max to sigma_min), followed by a final 0: ``N + 1``
        values; ``2 <= N < 2^32``, ``dtype`` float32 or float64 (None: torch's default). Computed
        in log form where this formula would overflow or round badly (rho well below 1 or
        above ~1e7)."""
        N = as_int(N, "N", "EDM.sigma_steps", 2, _MAX_LEVELS)
        _check_grid_dtype(dtype, "EDM.sigma_steps")
        smin, smax, rho = self.sigma_min, self.sigma_max, self.rho
        out = dtype or torch.get_default_dtype()
        log_r = (math.log(smin) - math.log(smax)) / rho  # r = (smin / smax)^(1/rho)
        # Karras' formula rounds to about rho / r units in the last place (smin^(1/rho) is lost
        # next to smax^(1/rho) when r is small: the last level is 0 for rho = 0.01), and
        # smax^(1/rho) or smin^(1/rho) leave the dtype's range for small rho. It is kept where it
        # is accurate (to ~1e-9 in float64: rho >= 1 over 7 decades of sigma) and in range; the
        # log form, accurate to a few ulps, is used elsewhere.
        if (math.log(rho) - log_r < math.log(1e7)
                and max(abs(math.log(smin)), abs(math.log(smax))) / rho
                < -math.log(torch.finfo(out).tiny) - 1):
            i = torch.arange(N, dtype=dtype, device=device)
            inv = 1.0 / rho
            a, b = smax ** inv, smin ** inv
            sig = (a + i / (N - 1) * (b - a)) ** rho
        else:
            sig = _karras_log(smin, smax, rho, N, device).to(out)
        return torch.cat([sig, sig.new_zeros(1)])

    def precond(self, sigma: TensorLike):
        """EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` at noise level ``sigma``:
        ``D(x) = c_skip x + c_out F(c_in x, c_noise)``; finite ``sigma > 0``."""
        where = "EDM.precond"
        sigma = check_range(number_or_tensor(sigma, "sigma", where), "sigma", where, 0.0,
                            lo_open=True)
        sd = self.sigma_data
        denom = sigma * sigma + sd * sd
        c_skip = sd * sd / denom
        c_out = sigma * sd / torch.sqrt(denom)
        c_in = 1.0 / torch.sqrt(denom)
        c_noise = torch.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise


SCHEDULES = {"vp": VP, "ve": VE, "edm": EDM}


def get_schedule(name: Union[str, Schedule], **kw) -> Schedule:
    """Schedule by name (``"vp"``, ``"ve"``, ``"edm"``, case-insensitive); a Schedule passes through."""
    if isinstance(name, Schedule):
        if kw:
            raise ValueError("get_schedule: keyword arguments given with a Schedule instance")
        return name
    if not isinstance(name, str) or name.lower() not in SCHEDULES:
        raise ValueError(f"get_schedule: unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name.lower()](**kw)
