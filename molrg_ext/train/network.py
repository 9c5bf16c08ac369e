"""Trainer for denoisers ``model(x_noisy, sigma) -> x0_hat`` (EDM networks or ``SubspaceDAE``).

Each step draws a mini-batch of training samples and one noise level per sample, forms
``x_noisy = x_0 + sigma eps`` and steps Adam on the weighted mean of ``||model(x_noisy, sigma) - x_0||^2``
(loss (6) in the VE parameterisation; a VP-type schedule is the same problem on ``x_t / s_t``).

Noise levels: ``noise="lognormal"`` is EDM's ``ln sigma ~ N(P_mean, P_std^2)``; or pass a schedule
object (``sigma(t)``; e.g. from :mod:`molrg_ext.schedules`) to draw ``u ~ U[t_min, 1]`` and take
``t = schedule.train_time(u)`` (``t = u``; an ``EDM`` draws sigma log-uniform over its range).
Weighting: ``"edm"`` uses ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (EDM), ``"none"`` uses 1.

The trainer keeps an EMA copy of the model, the loss and gradient-norm history, and the kimg
counter of eq. (47) (``kimg = steps * batch / 1000``). ``save()`` writes model, EMA, optimiser,
RNG states (the trainer's generator and torch's global one, which dropout draws from), step,
settings and history atomically; ``NetworkTrainer(..., checkpoint=path)`` resumes from it, and
the resumed run reproduces the uninterrupted loss curve. A checkpoint trained with other settings
(batch size, noise, weighting, sigma_data, EMA, gradient clipping, or other data) is refused; a
new ``lr`` is used from the resumed step on, with a warning.
"""
from __future__ import annotations

import copy
import io
import math
import os
import warnings
from typing import Optional

import torch
from torch import nn

from .._args import as_int, check_seed, real_number

__all__ = ["NetworkTrainer"]


def _path(p, name: str, where: str) -> str:
    """p (a str or os.PathLike) as a str, after a ValueError if it names something other than a
    regular file (a directory, a device, ...): such a path is never read, moved or written over."""
    s = os.fspath(p) if isinstance(p, (str, os.PathLike)) else None
    if not isinstance(s, str):
        raise TypeError(f"{where}: {name} must be a str or os.PathLike path, got {type(p).__name__}")
    if not s:
        raise ValueError(f"{where}: {name} must be a non-empty path")
    if os.path.exists(s) and not os.path.isfile(s):
        what = "a directory" if os.path.isdir(s) else "not a regular file"
        raise ValueError(f"{where}: {name} must be a checkpoint file or a path that does not exist "
                         f"yet, got {s!r}, which is {what}")
    return s


def _read(path: str) -> io.BytesIO:
    """The file's bytes, for torch.load. An OSError here is the file system's (permission denied,
    an I/O error): the file may be fine. torch.load reading the file itself raises OSError (EINVAL)
    for most truncated checkpoints too, so only its errors on these bytes mean a bad file."""
    with open(path, "rb") as f:
        return io.BytesIO(f.read())


_STATE_KEYS = ("model", "ema", "optimizer", "generator", "step", "history")


def _noise_key(noise):
    """A comparable description of a noise setting: the string, or the schedule's class and its
    number, string and bool attributes."""
    if isinstance(noise, str):
        return noise
    attrs = getattr(noise, "__dict__", {}).items()
    plain = (bool, int, float, str)
    return type(noise).__qualname__, tuple(sorted((k, v) for k, v in attrs if isinstance(v, plain)))


def _same(a, b) -> bool:
    """Equal settings, floats up to rounding (a sum over the data may move in the last bits)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (a != a and b != b)
    return a == b


def _check_state(state, name: str, where: str) -> None:
    """A ValueError naming ``name`` unless state has the layout state_dict() writes (checked
    before anything is loaded, so a wrong file leaves the trainer as it was)."""
    if not isinstance(state, dict):
        raise ValueError(f"{where}: {name} is not a NetworkTrainer checkpoint (a dict), got "
                         f"{type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{where}: {name} is not a NetworkTrainer checkpoint: missing {missing}")
    hist = state["history"]
    if (isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0
            or not isinstance(state["generator"], torch.Tensor)
            or not isinstance(hist, dict) or not all(isinstance(hist.get(k), list)
                                                     for k in ("loss", "grad_norm", "kimg"))):
        raise ValueError(f"{where}: {name} is not a NetworkTrainer checkpoint: step, generator or "
                         f"history has the wrong type")


class NetworkTrainer:
    """Adam + EMA trainer with EDM noise sampling and resumable checkpoints.

    Args:
        model: denoiser ``model(x, sigma[B])`` returning the x0 estimate, same shape as ``x``.
        data: training samples ``[N, ...]`` (flat or image-shaped, whatever ``model`` takes).
        batch_size: samples per step (drawn with replacement).
        lr: Adam learning rate.
        ema_decay: EMA factor per step (``ema_halflife_kimg`` overrides it, as in EDM).
        noise: ``"lognormal"`` or a schedule object with ``sigma(t)``.
        P_mean, P_std: log-normal parameters (EDM: -1.2, 1.2).
        t_min: smallest ``t`` when sampling from a schedule.
        weighting: ``"edm"`` or ``"none"``.
        sigma_data: for the EDM weighting, finite and > 0 (default: ``model.sigma_data`` if
            present, else 0.5).
        grad_clip: clip the total gradient norm to this finite value > 0 (None: no clipping; the
            norm is recorded either way).
        seed: seeds the trainer's own generator (batches, noise levels, noise).
        checkpoint: file path (str or os.PathLike); if it exists the trainer resumes from it,
            ``save()`` writes it. A regular file torch cannot unpickle is moved to
            ``checkpoint + ".corrupt"`` with a warning, and training starts from step 0; a file
            torch reads that is not a trainer checkpoint, or a path that is a directory (or
            anything else but a regular file), is a ValueError and is left alone.
        post_step: optional callable run on the model after each optimiser step (e.g.
            ``SubspaceDAE.orthonormalize_``).
    """

    def __init__(self, model: nn.Module, data: torch.Tensor, batch_size: int = 64, lr: float = 1e-3,
                 ema_decay: float = 0.999, ema_halflife_kimg: Optional[float] = None,
                 noise="lognormal", P_mean: float = -1.2, P_std: float = 1.2, t_min: float = 1e-3,
                 weighting: str = "edm", sigma_data: Optional[float] = None,
                 grad_clip: Optional[float] = None, seed: int = 0,
                 checkpoint: Optional[str] = None, post_step=None):
        where = "NetworkTrainer"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module")
        if not isinstance(data, torch.Tensor) or not data.is_floating_point():
            raise TypeError(f"{where}: data must be a floating-point tensor")
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"{where}: data must be a non-empty batch [N, ...], got {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError(f"{where}: data contains NaN or Inf")
        params = [p for p in model.parameters() if p.is_floating_point()]
        if params and data.dtype not in {p.dtype for p in params}:
            raise TypeError(f"{where}: data has dtype {data.dtype} but model's parameters have "
                            f"dtype {params[0].dtype}")
        if params and data.device not in {p.device for p in params}:
            raise ValueError(f"{where}: data is on {data.device} but model's parameters are on "
                             f"{params[0].device}")
        # with replacement, so batch_size may exceed N; the bound keeps a batch's element count
        # within int64
        batch_size = as_int(batch_size, "batch_size", where, 1, 2**63 // max(1, data[0].numel()))
        lr = real_number(lr, "lr", where, 0.0, lo_open=True)
        if not 0 <= real_number(ema_decay, "ema_decay", where) < 1:
            raise ValueError(f"{where}: ema_decay must be in [0, 1), got {ema_decay}")
        P_mean = real_number(P_mean, "P_mean", where)
        if real_number(P_std, "P_std", where) < 0:
            raise ValueError(f"{where}: P_std must be >= 0, got {P_std}")
        if weighting not in ("edm", "none"):
            raise ValueError(f"{where}: weighting must be 'edm' or 'none', got {weighting!r}")
        if isinstance(noise, str):
            if noise != "lognormal":
                raise ValueError(f"{where}: noise must be 'lognormal' or a schedule, got {noise!r}")
        elif not hasattr(noise, "sigma"):
            raise TypeError(f"{where}: a noise schedule must provide sigma(t)")
        if not 0 < real_number(t_min, "t_min", where) < 1:
            raise ValueError(f"{where}: t_min must be in (0, 1), got {t_min}")
        if sigma_data is None:
            sigma_data = getattr(model, "sigma_data", 0.5)
        sigma_data = real_number(sigma_data, "sigma_data", where, 0.0, lo_open=True)
        if grad_clip is not None:
            # <= 0 would zero (0) or reverse (< 0) every step inside clip_grad_norm_
            grad_clip = real_number(grad_clip, "grad_clip", where, 0.0, lo_open=True)
        seed = check_seed(seed, "seed", where, lo=-2**63)  # what Generator.manual_seed takes
        if post_step is not None and not callable(post_step):
            raise TypeError(f"{where}: post_step must be callable or None")
        self.model, self.data = model, data
        self.batch_size, self.lr = int(batch_size), float(lr)
        if ema_halflife_kimg is not None:
            ema_halflife_kimg = real_number(ema_halflife_kimg, "ema_halflife_kimg", where, 0.0,
                                            lo_open=True)
            ema_decay = 0.5 ** (self.batch_size / (ema_halflife_kimg * 1000.0))
        self.ema_decay = float(ema_decay)
        self.noise, self.P_mean, self.P_std, self.t_min = noise, float(P_mean), float(P_std), float(t_min)
        self.weighting = weighting
        self.sigma_data = sigma_data
        self.grad_clip, self.post_step = grad_clip, post_step
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        self.generator = torch.Generator(device=data.device).manual_seed(int(seed))
        self.step = 0
        self.history: dict[str, list[float]] = {"loss": [], "grad_norm": [], "kimg": []}
        path = None if checkpoint is None else _path(checkpoint, "checkpoint", where)
        self.checkpoint = checkpoint
        if path is not None and os.path.exists(path):
            raw = _read(path)
            try:
                state = torch.load(raw, map_location=self.data.device, weights_only=False)
            except Exception as e:  # not a readable checkpoint (this class saves atomically)
                os.replace(path, path + ".corrupt")
                warnings.warn(f"NetworkTrainer: {path} could not be read ({e}); moved to "
                              f"{path}.corrupt, training from step 0", RuntimeWarning,
                              stacklevel=2)
            else:
                # readable but not a checkpoint: likely another file given by mistake, so it
                # stays where it is (as with a checkpoint of another batch_size)
                _check_state(state, f"checkpoint {path!r}", where)
                self._load_state(state)

    @property
    def kimg(self) -> float:
        """Training images seen, in thousands (eq. (47): steps * batch / 1000)."""
        return self.step * self.batch_size / 1000.0

    def sample_sigma(self, B: int) -> torch.Tensor:
        B = as_int(B, "B", "NetworkTrainer.sample_sigma", 0, 2**63)
        g, dt, dev = self.generator, self.data.dtype, self.data.device
        if isinstance(self.noise, str):
            return (torch.randn(B, generator=g, dtype=dt, device=dev) * self.P_std + self.P_mean).exp()
        u = self.t_min + (1 - self.t_min) * torch.rand(B, generator=g, dtype=dt, device=dev)
        # a schedule's training time at u (molrg_ext.schedules: u itself, or EDM's log-uniform
        # sigma); a plain object with sigma(t) only: t = u
        train_time = getattr(self.noise, "train_time", None)
        t = train_time(u) if callable(train_time) else u
        return torch.as_tensor(self.noise.sigma(t), dtype=dt, device=dev)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.weighting == "none":
            return torch.ones_like(sigma)
        sd2 = self.sigma_data ** 2
        return (sigma ** 2 + sd2) / (sigma ** 2 * sd2)

    def train_step(self) -> float:
        g, N = self.generator, self.data.shape[0]
        idx = torch.randint(N, (self.batch_size,), generator=g, device=self.data.device)
        x0 = self.data[idx]
        sigma = self.sample_sigma(self.batch_size)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype, device=x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        self.model.train()
        out = self.model(x0 + sigma.reshape(view) * eps, sigma)
        per = ((out - x0) ** 2).reshape(self.batch_size, -1).sum(1)
        loss = (self.loss_weight(sigma) * per).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"NetworkTrainer: loss became {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = float("inf") if self.grad_clip is None else float(self.grad_clip)
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        self.optimizer.step()
        if self.post_step is not None:
            self.post_step(self.model)
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm.detach(), 1.0 - self.ema_decay)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        self.step += 1
        loss = float(loss.detach())
        self.history["loss"].append(loss)
        self.history["grad_norm"].append(float(gnorm))
        self.history["kimg"].append(self.kimg)
        return loss

    def train(self, steps: int, progress: bool = False, save_every: Optional[int] = None,
              callback=None) -> dict:
        """Run ``steps`` (an int >= 0) more steps (saving every ``save_every`` steps and at the end
        when a checkpoint path is set); ``callback(trainer)`` runs after each step. Returns the history."""
        where = "NetworkTrainer.train"
        steps = as_int(steps, "steps", where, 0)
        if save_every is not None:
            save_every = as_int(save_every, "save_every", where, 0)  # 0: only at the end
        if callback is not None and not callable(callback):
            raise TypeError(f"{where}: callback must be callable or None")
        it = range(steps)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="train", leave=False)
        for _ in it:
            loss = self.train_step()
            if progress and self.step % 50 == 0:
                it.set_postfix(loss=f"{loss:.4g}", kimg=f"{self.kimg:.1f}")
            if callback is not None:
                callback(self)
            if save_every and self.checkpoint and self.step % save_every == 0:
                self.save()
        if self.checkpoint and steps:
            self.save()
        return self.history

    def _settings(self) -> dict:
        """What a resumed run must share with the run that saved it (besides batch_size): the
        noise draws, the loss, the EMA, and the training data (shape, dtype and two sums)."""
        if getattr(self, "_data_key", None) is None:  # once: save() runs this every few steps
            d = self.data.detach()
            self._data_key = (tuple(d.shape), str(d.dtype), float(d.sum(dtype=torch.float64)),
                              float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2))
        return {
            "noise": _noise_key(self.noise), "P_mean": self.P_mean, "P_std": self.P_std,
            "t_min": self.t_min, "weighting": self.weighting, "sigma_data": self.sigma_data,
            "ema_decay": self.ema_decay, "grad_clip": self.grad_clip,
            "data": self._data_key,
        }

    def state_dict(self) -> dict:
        """Model, EMA, optimiser, the trainer's generator and torch's global random state (which
        dropout draws from), step, batch size, settings and history."""
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "settings": self._settings(),
            "history": copy.deepcopy(self.history),
        }
        if self.data.is_cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.data.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "state", "NetworkTrainer.load_state_dict")
        self._load_state(state)

    def _load_state(self, state: dict) -> None:
        """load_state_dict of a state _check_state has accepted."""
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(f"NetworkTrainer: checkpoint used batch_size {state['batch_size']}, "
                             f"this trainer {self.batch_size}")
        saved = state.get("settings")  # checkpoints before these were recorded: not checked
        if isinstance(saved, dict):
            mine = self._settings()
            diff = [f"{k} {saved[k]!r} -> {mine[k]!r}" for k in mine
                    if k in saved and not _same(saved[k], mine[k])]
            if diff:
                raise ValueError("NetworkTrainer: the checkpoint was trained with other settings "
                                 f"({'; '.join(diff)}); resume with the same ones, or start a "
                                 "new checkpoint")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if isinstance(state.get("torch_rng"), torch.Tensor):
            torch.set_rng_state(state["torch_rng"])
        if self.data.is_cuda and isinstance(state.get("cuda_rng"), torch.Tensor):
            torch.cuda.set_rng_state(state["cuda_rng"], self.data.device)
        # the optimiser's state brings back the saved lr: the lr asked for here wins
        old_lr = state.get("lr", self.optimizer.param_groups[0]["lr"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if not _same(old_lr, self.lr):
            warnings.warn(f"NetworkTrainer: resuming at step {int(state['step'])} with lr "
                          f"{self.lr:g}; the checkpoint was trained with lr {old_lr:g}",
                          UserWarning, stacklevel=3)
        self.step = int(state["step"])
        self.history = copy.deepcopy(state["history"])

    def save(self, path: Optional[str] = None) -> str:
        """Write the checkpoint atomically (temp file + rename) to ``path`` or ``self.checkpoint``."""
        where, name = "NetworkTrainer.save", "path"
        if path is None or path == "":
            name, path = "checkpoint", self.checkpoint
        if path is None:
            raise ValueError("NetworkTrainer.save: no checkpoint path given")
        p = _path(path, name, where)
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        tmp = f"{p}.tmp"
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, p)
        except BaseException:
            if os.path.isfile(tmp):
                os.remove(tmp)
            raise
        return path

    def load(self, path: str) -> None:
        """Load the checkpoint file ``path`` (str or os.PathLike) written by ``save()``."""
        where = "NetworkTrainer.load"
        p = _path(path, "path", where)
        raw = _read(p)
        try:
            state = torch.load(raw, map_location=self.data.device, weights_only=False)
        except Exception as e:
            raise ValueError(f"{where}: path {p!r} could not be read as a checkpoint ({e})") from e
        _check_state(state, f"path {p!r}", where)
        self._load_state(state)
