"""Deterministic samplers for denoisers ``D(x, sigma) ~ E[x_0 | x_0 + sigma eps = x]``.

* :func:`heun_sample`: EDM's 2nd-order Heun sampler for the probability-flow ODE
  ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, Algorithm 1 with S_churn = 0);
  18 steps on the EDM grid by default (``EDM.sigma_steps``), the last step is an Euler step to 0.
* :func:`ddim_sample`: DDIM (eta = 0), i.e. ``x_{i+1} = s_{i+1} (x0_hat + sigma_{i+1} / sigma_i
  (x_i / s_i - x0_hat))`` with ``x_t = s_t (x_0 + sigma_t eps)``; ``scales`` gives ``s_t`` for
  VP-type schedules (default 1, VE/EDM).

Both start from ``x_T = s_0 sigma_0 noise`` (``noise`` is standard normal, supplied by the caller,
so the result is a deterministic function of it) and can return the whole trajectory.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional

import torch

from ._args import as_int, real_tensor
from .schedules import _MAX_LEVELS, EDM

__all__ = ["Trajectory", "default_sigma_steps", "heun_sample", "ddim_sample"]


class Trajectory(NamedTuple):
    """``x[i]`` is the state at noise level ``sigma[i]`` (``x[0]`` the initial noise, ``x[-1]``
    the sample at sigma = 0); ``denoised[i]`` is ``D(x[i], sigma[i])`` for the non-final levels."""

    x: torch.Tensor  # [S + 1, B, ...]
    sigma: torch.Tensor  # [S + 1]
    denoised: torch.Tensor  # [S, B, ...]


def default_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        rho: float = 7.0, dtype=torch.float64) -> torch.Tensor:
    """The EDM sampling grid (``molrg_ext.schedules.EDM.sigma_steps``): ``num_steps`` decreasing
    levels, without the trailing 0."""
    return _edm_grid(num_steps, "default_sigma_steps", sigma_min, sigma_max, rho, dtype)


def _edm_grid(num_steps, where: str, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: float = 7.0, dtype=torch.float64) -> torch.Tensor:
    """default_sigma_steps with num_steps checked once, in the name of the caller ``where``."""
    num_steps = as_int(num_steps, "num_steps", where, 2, _MAX_LEVELS)
    grid = EDM(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).sigma_steps(num_steps, dtype=dtype)
    return grid[:-1]  # without the final 0, which the samplers append


def _prepare(noise, sigmas, num_steps, where):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"{where}: noise must be a floating-point tensor")
    if noise.dim() < 2 or noise.shape[0] == 0:
        raise ValueError(f"{where}: noise must be a non-empty batch [B, ...], got {tuple(noise.shape)}")
    if not torch.isfinite(noise).all():
        raise ValueError(f"{where}: noise contains NaN or Inf")
    if sigmas is None:
        sigmas = _edm_grid(num_steps, where)
    elif num_steps is not None:
        # unused with sigmas, but not ignored when it is not an int (None is fine: not given)
        as_int(num_steps, "num_steps", where, 1, _MAX_LEVELS)
    # real_tensor refuses bools and complex numbers: a cast would give a grid of ones or drop
    # the imaginary part
    sigmas = real_tensor(sigmas, "sigmas", where, noise.dtype, noise.device)
    if sigmas.dim() > 1:
        raise ValueError(f"{where}: sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    sigmas = sigmas.reshape(-1)
    if sigmas.numel() > 1 and sigmas[-1] == 0:
        sigmas = sigmas[:-1]  # a grid given with its final 0 (EDM.sigma_steps)
    if sigmas.numel() < 1 or not torch.isfinite(sigmas).all() or not (sigmas > 0).all():
        raise ValueError(f"{where}: sigmas must be a non-empty 1-D list of finite levels > 0")
    if sigmas.numel() > 1 and not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"{where}: sigmas must be strictly decreasing")
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _call(denoiser, x, sigma, where):
    out = denoiser(x, sigma.expand(x.shape[0]))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: the denoiser's output must be a tensor, got "
                        f"{type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{where}: denoiser returned shape {tuple(out.shape)} for input "
                         f"{tuple(x.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"{where}: denoiser returned dtype {out.dtype} for input of dtype "
                        f"{x.dtype}")
    return out


def _mode_dependent(m: torch.nn.Module) -> bool:
    """Whether m, in training mode, computes something else than in eval mode: dropout with
    p > 0 (attention's dropout included) or a normalisation by batch statistics."""
    nn = torch.nn
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    return isinstance(m, nn.modules.batchnorm._NormBase)


def _warn_if_training(denoiser, where):
    """Dropout or batch statistics in training mode make the sample a random function of the
    noise: the samplers are meant to be deterministic given it. Warns when such a submodule is in
    training mode (not for modules whose output does not depend on the mode, as SubspaceDAE or a
    plain MLP: that warning had fired for the package's own rank-vs-snr experiment). A custom
    module that branches on self.training by itself is not seen."""
    if isinstance(denoiser, torch.nn.Module) and any(
            m.training and _mode_dependent(m) for m in denoiser.modules()):
        warnings.warn(f"{where}: the denoiser has dropout or batch normalisation in training mode "
                      "(call .eval() first): the samples are not deterministic", stacklevel=3)


@torch.no_grad()
def heun_sample(denoiser: Callable, noise: torch.Tensor, sigmas: Optional[torch.Tensor] = None,
                num_steps: int = 18, return_trajectory: bool = False, progress: bool = False):
    """EDM Heun sampler. ``denoiser(x, sigma[B]) -> x0_hat``; ``noise`` standard normal [B, ...];
    ``sigmas`` decreasing levels > 0, optionally ending in 0 (default
    ``default_sigma_steps(num_steps)``; ``num_steps`` is checked even when ``sigmas`` is given,
    though then unused). Returns the samples,
    or a :class:`Trajectory` when ``return_trajectory``.

    A step from sigma_i to a level sigma_{i+1} > 0 so much smaller that ``eps * sigma_i /
    sigma_{i+1} > 1e-3`` (eps of the noise's dtype; float32: a ratio above about 8e3) takes the
    Euler step, with a warning: its second-order correction would multiply the denoiser's
    rounding error by sigma_i / (2 sigma_{i+1}) (float32, sigmas [80, 1, 1e-10]: samples 62 away
    from the training points where they belong). The default grids have ratios below 4."""
    t = _prepare(noise, sigmas, num_steps, "heun_sample")
    _warn_if_training(denoiser, "heun_sample")
    ratio = t[:-1] / t[1:]  # inf for a last level 0, which takes the Euler step anyway
    euler = (t[1:] > 0) & (torch.finfo(noise.dtype).eps * ratio > 1e-3)
    if bool(euler.any()):
        i = int(euler.nonzero()[0, 0])
        warnings.warn(f"heun_sample: {int(euler.sum())} step(s) shrink sigma by too large a "
                      f"factor for {noise.dtype} (first: {float(t[i]):g} -> {float(t[i + 1]):g}); "
                      "they take the Euler step, as Heun's correction would amplify the "
                      "denoiser's rounding error by half that factor", UserWarning, stacklevel=2)
    x = noise * t[0]
    xs, dens = _keep(return_trajectory, x)
    steps = range(t.numel() - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="heun", leave=False)
    for i in steps:
        d0 = _call(denoiser, x, t[i], "heun_sample")
        dens.append(d0)
        slope = (x - d0) / t[i]
        x_next = x + (t[i + 1] - t[i]) * slope
        if t[i + 1] > 0 and not euler[i]:
            d1 = _call(denoiser, x_next, t[i + 1], "heun_sample")
            slope2 = (x_next - d1) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * 0.5 * (slope + slope2)
        x = x_next
        xs.append(x)
    if return_trajectory:
        return Trajectory(torch.stack(xs), t, torch.stack(dens))
    return x


class _Discard(list):
    """A list that keeps nothing: the samplers' trajectory lists when none is returned (every
    state and denoiser output was kept, (2 steps + 1) x the batch)."""

    def append(self, _item) -> None:
        pass


def _keep(trajectory: bool, x0: torch.Tensor) -> tuple:
    """(states, denoiser outputs) lists: real ones holding x0 first, or discarding ones."""
    return ([x0], []) if trajectory else (_Discard(), _Discard())


@torch.no_grad()
def ddim_sample(denoiser: Callable, noise: torch.Tensor, sigmas: Optional[torch.Tensor] = None,
                num_steps: int = 18, scales: Optional[torch.Tensor] = None,
                return_trajectory: bool = False, progress: bool = False):
    """Deterministic DDIM. ``scales`` are the signal scales ``s_i`` at the levels ``sigmas``
    (``x_t = s_t (x_0 + sigma_t eps)``; default 1 for VE/EDM, VP gives ``sqrt(alpha_bar)``); the
    denoiser always sees the unscaled ``x_t / s_t``. Trajectory states are the scaled ``x_t``."""
    t = _prepare(noise, sigmas, num_steps, "ddim_sample")
    _warn_if_training(denoiser, "ddim_sample")
    if scales is None:
        s = torch.ones_like(t)
    else:
        s = real_tensor(scales, "scales", "ddim_sample", noise.dtype, noise.device).reshape(-1)
        if s.numel() != t.numel() - 1 or not torch.isfinite(s).all() or not (s > 0).all():
            raise ValueError(f"ddim_sample: scales must be {t.numel() - 1} finite values > 0")
        s = torch.cat([s, s.new_ones(1)])  # the clean sample has scale 1
    x = noise * t[0] * s[0]
    xs, dens = _keep(return_trajectory, x)
    steps = range(t.numel() - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="ddim", leave=False)
    for i in steps:
        z = x / s[i]
        d0 = _call(denoiser, z, t[i], "ddim_sample")
        dens.append(d0)
        x = s[i + 1] * (d0 + (t[i + 1] / t[i]) * (z - d0))
        xs.append(x)
    if return_trajectory:
        return Trajectory(torch.stack(xs), t, torch.stack(dens))
    return x
