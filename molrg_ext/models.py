"""Network denoisers with EDM preconditioning (Karras et al. 2022, Table 1).

``EDMDenoiser(net, sigma_data, image_shape)`` turns a raw network ``F(x_in, c_noise)`` into a
denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with

    c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = log(sigma) / 4.

``precond="x0"`` keeps ``c_in`` and ``c_noise`` but sets ``c_skip = 0`` and ``c_out = sd``: the net
predicts x0 directly, as the DAE ``x_theta`` of loss (6) and the subspace DAE (9) do. On low-rank
data (MoLRG) this matters: with EDM's ``c_skip -> 1`` at small sigma the net must cancel the
off-subspace noise through a gain ``~ sd / sigma`` on a tiny input, which a small net trained for a
few thousand steps does not learn, so its Jacobian stays near the identity at high SNR and samples
keep off-subspace noise of size ``~ sigma`` at the level where it stops projecting. Train x0 models
with ``NetworkTrainer(weighting="none")`` (EDM's weight ``1 / c_out^2`` is meant for ``precond="edm"``).

``forward(x, sigma)`` returns the x0 estimate in the shape of ``x``: flat ``[B, n]`` inputs are
reshaped to ``image_shape`` (e.g. MoLRG samples with n = 48 as 3 x 4 x 4) for a convolutional net.
Two raw nets are provided: a small DDPM++-style U-Net (:class:`UNet`) and an MLP
(:class:`MLPNet`); :func:`make_unet_denoiser` / :func:`make_mlp_denoiser` build the wrapped models.
Every module here is a plain ``nn.Module`` built from ``torch.func``-friendly layers, so Jacobians
of the denoiser can be taken with ``jacrev`` / ``jvp``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ._args import (_check_tensor, as_int, as_int_list, check_number_or_tensor, check_positive,
                    number_or_tensor, real_number, real_tensor)

__all__ = [
    "EDMDenoiser",
    "UNet",
    "MLPNet",
    "make_unet_denoiser",
    "make_mlp_denoiser",
    "sigma_vector",
]


# Depth and block counts: far beyond any trainable net here (3 to 8 layers), and a typo such as
# 2**40 would otherwise spend hours building the module list instead of failing.
_MAX_LAYERS = 2**16
# Widths, channel counts, the resolution: below 2**31 (the int32 range; one such layer already
# needs gigabytes), so that an overflowing size is a named error, not torch's TypeError.
_MAX_WIDTH = 2**31


def _dropout(p, where: str) -> float:
    return real_number(p, "dropout", where, 0.0, 1.0, hi_open=True)


def _image_shape(shape, where: str) -> tuple:
    """(C, H, W) as three positive ints (a string, floats or another length are errors)."""
    out = as_int_list(shape, "image_shape", where, 1)
    if len(out) != 3:
        raise ValueError(f"{where}: image_shape must be (C, H, W), 3 ints, got {out}")
    return tuple(out)


def sigma_vector(sigma, batch: int, like: torch.Tensor, where: str = "denoiser") -> torch.Tensor:
    """Noise level(s) as a ``[batch]`` tensor of ``like``'s dtype/device; must be finite and > 0."""
    _check_tensor(like, "like", where)
    if not torch.compiler.is_compiling():  # batch may be a symbolic size there
        batch = as_int(batch, "batch", where, 0)
    if isinstance(sigma, (int, float, torch.Tensor)):  # kept apart: real_tensor breaks compile
        check_number_or_tensor(sigma, "sigma", where)  # bools, complex or bool tensors
        s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    else:  # sequences and arrays
        s = real_tensor(sigma, "sigma", where, like.dtype, like.device)
    if s.dim() > 1 or (s.dim() == 1 and s.numel() not in (1, batch)):
        raise ValueError(f"{where}: sigma must be a scalar or have shape [{batch}], got {tuple(s.shape)}")
    # values are checked eagerly; inside torch.func transforms (vmap/jacrev) they cannot be read
    return check_positive(s, "sigma", where).reshape(-1).expand(batch)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise conditioning ``c_noise`` (DDPM++ style)."""

    def __init__(self, dim: int, max_positions: int = 10000):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"PositionalEmbedding: dim must be an even number >= 2, got {dim}")
        self.dim, self.max_positions = dim, max_positions

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.arange(half, dtype=c.dtype, device=c.device) / half
        freqs = (1.0 / self.max_positions) ** freqs
        # c_noise = log(sigma)/4 lies in about [-1.6, 1.1]; scale so the phases spread out.
        arg = (1000.0 * c)[:, None] * freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def _groups(channels: int, max_groups: int = 32) -> int:
    g = min(max_groups, channels // 4 if channels >= 4 else 1)
    while channels % g:
        g -= 1
    return max(g, 1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the noise embedding (scale/shift), -> GroupNorm -> SiLU ->
    dropout -> conv, with a 1x1 skip when the channel count changes; output scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) / math.sqrt(2.0)


class UNet(nn.Module):
    """A small DDPM++-style U-Net: ``forward(x [B, C, H, W], c_noise [B]) -> [B, C, H, W]``.

    Args:
        channels: image channels C.
        resolution: image side H = W; must be divisible by 2^(len(channel_mult) - 1).
        model_channels: base channel count.
        channel_mult: channel multiplier per resolution level (each level after the first halves
            the resolution with average pooling).
        num_blocks: residual blocks per level (the decoder uses one more, as in DDPM++).
        emb_dim: noise-embedding width >= 1 (None: 4 * model_channels).
        dropout: dropout inside the residual blocks, in [0, 1).
    """

    def __init__(self, channels: int, resolution: int, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_blocks: int = 1,
                 emb_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        where = "UNet"
        channels = as_int(channels, "channels", where, 1, _MAX_WIDTH)
        resolution = as_int(resolution, "resolution", where, 1, _MAX_WIDTH)
        model_channels = as_int(model_channels, "model_channels", where, 1, _MAX_WIDTH)
        num_blocks = as_int(num_blocks, "num_blocks", where, 1, _MAX_LAYERS)
        channel_mult = as_int_list(channel_mult, "channel_mult", where, 1)
        if not channel_mult:
            raise ValueError(f"UNet: channel_mult must be positive ints, got {channel_mult}")
        if model_channels * max(channel_mult) >= _MAX_WIDTH:
            raise ValueError(f"{where}: model_channels * max(channel_mult) must be < 2**31, got "
                             f"{model_channels} * {max(channel_mult)}")
        if emb_dim is not None:
            emb_dim = as_int(emb_dim, "emb_dim", where, 1, _MAX_WIDTH)
        dropout = _dropout(dropout, where)
        if resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"UNet: resolution {resolution} is not divisible by "
                             f"2^{len(channel_mult) - 1} (len(channel_mult) = {len(channel_mult)})")
        self.channels, self.resolution = channels, resolution
        self.pool_factor = 2 ** (len(channel_mult) - 1)  # input sides must be divisible by it
        emb_dim = emb_dim or 4 * model_channels
        self.embed = PositionalEmbedding(model_channels if model_channels % 2 == 0 else model_channels + 1)
        self.emb_mlp = nn.Sequential(nn.Linear(self.embed.dim, emb_dim), nn.SiLU(),
                                     nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(channels, model_channels, 3, padding=1)
        # encoder: conv_in, then per level [avg-pool (levels > 0)] + num_blocks blocks; every
        # one of these outputs is kept as a skip. The decoder uses num_blocks + 1 blocks per level,
        # each consuming one skip (DDPM++ layout), so the counts match.
        self.down = nn.ModuleList()
        skips = [model_channels]
        c = model_channels
        for level, mult in enumerate(channel_mult):
            if level > 0:
                skips.append(c)  # the pooled feature map
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(ResBlock(c, model_channels * mult, emb_dim, dropout))
                c = model_channels * mult
                skips.append(c)
            self.down.append(blocks)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout), ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), model_channels * mult, emb_dim, dropout))
                c = model_channels * mult
            self.up.append(blocks)
        assert not skips
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.emb_mlp(self.embed(c_noise))
        h = self.conv_in(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = F.avg_pool2d(h, 2)
                hs.append(h)
            for blk in blocks:
                h = blk(h, emb)
                hs.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for i, blocks in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.out_norm(h)))


class MLPNet(nn.Module):
    """MLP ``forward(x [B, n], c_noise [B]) -> [B, n]``: the noise embedding (``emb_dim`` wide,
    even) is projected and added to every one of the ``depth`` hidden layers (width ``hidden``)."""

    def __init__(self, n: int, hidden: int = 256, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        where = "MLPNet"
        n = as_int(n, "n", where, 1, _MAX_WIDTH)
        hidden = as_int(hidden, "hidden", where, 1, _MAX_WIDTH)
        depth = as_int(depth, "depth", where, 1, _MAX_LAYERS)
        emb_dim = as_int(emb_dim, "emb_dim", where, 2, _MAX_WIDTH)
        if emb_dim % 2:  # cosine and sine halves
            raise ValueError(f"{where}: emb_dim must be even, got {emb_dim}")
        self.n = n
        self.embed = PositionalEmbedding(emb_dim)
        self.inp = nn.Linear(n, hidden)
        self.emb_proj = nn.ModuleList([nn.Linear(emb_dim, hidden) for _ in range(depth)])
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        e = self.embed(c_noise)
        h = F.silu(self.inp(x) + self.emb_proj[0](e))
        for lin, proj in zip(self.hidden, self.emb_proj[1:]):
            h = F.silu(lin(h) + proj(e))
        return self.out(h)


class EDMDenoiser(nn.Module):
    """EDM-preconditioned denoiser ``D(x, sigma)`` around a raw net ``net(x_in, c_noise)``.

    Args:
        net: raw network taking ``(x_in, c_noise)``; image-shaped input when ``image_shape`` is set.
        sigma_data: data standard deviation used by the preconditioning (per coordinate).
        image_shape: ``(C, H, W)``, three ints >= 1: flat ``[B, n]`` inputs (n = C H W) are
            reshaped for ``net`` and the output is flattened back. Image-shaped inputs pass
            through unchanged. Without it a :class:`UNet` takes ``[B, C, H, W]`` images only.
        precond: ``"edm"`` (Karras et al., Table 1) or ``"x0"`` (``c_skip = 0``, ``c_out = sd``:
            direct x0 prediction; see the module docstring).
    """

    PRECONDS = ("edm", "x0")

    def __init__(self, net: nn.Module, sigma_data: float = 0.5,
                 image_shape: Optional[Sequence[int]] = None, precond: str = "edm"):
        super().__init__()
        if not callable(net):
            raise TypeError(f"EDMDenoiser: net must be callable as net(x_in, c_noise), got "
                            f"{type(net).__name__}")
        sigma_data = real_number(sigma_data, "sigma_data", "EDMDenoiser", 0.0, lo_open=True)
        if precond not in self.PRECONDS:
            raise ValueError(f"EDMDenoiser: precond must be one of {self.PRECONDS}, got {precond!r}")
        self.net = net
        self.precond = precond
        self.sigma_data = float(sigma_data)
        self.image_shape = None if image_shape is None else _image_shape(image_shape, "EDMDenoiser")
        self.n = math.prod(self.image_shape) if self.image_shape else getattr(net, "n", None)

    @staticmethod
    def _levels(sigma, where: str) -> torch.Tensor:
        """sigma (a number or a tensor) as a tensor, checked finite and > 0 (eagerly)."""
        return check_positive(number_or_tensor(sigma, "sigma", where), "sigma", where)

    def preconditioning(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (finite, > 0)."""
        return self._preconditioning(self._levels(sigma, "EDMDenoiser.preconditioning"))

    def _preconditioning(self, sigma: torch.Tensor):
        # unchecked: forward passes the levels sigma_vector has checked (no second device sync)
        sd2 = self.sigma_data ** 2
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        if self.precond == "x0":
            return torch.zeros_like(sigma), torch.full_like(sigma, self.sigma_data), c_in, c_noise
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``1 / c_out^2``: EDM's ``(sigma^2 + sd^2) / (sigma sd)^2`` for ``precond="edm"``,
        the constant ``1 / sd^2`` for ``precond="x0"``."""
        sigma = self._levels(sigma, "EDMDenoiser.loss_weight")
        if self.precond == "x0":
            return torch.full_like(sigma, 1.0 / self.sigma_data ** 2)
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def _name_mismatch(self, x: torch.Tensor) -> None:
        """After the net failed: the error naming x when its dtype or device is not the net's
        parameters' (checked only then, so nets that cast their input keep working and valid
        calls pay nothing)."""
        p = next(self.net.parameters(), None) if isinstance(self.net, nn.Module) else None
        if p is None or torch.is_autocast_enabled(x.device.type):
            return
        if x.dtype != p.dtype:
            raise TypeError(f"EDMDenoiser: x has dtype {x.dtype} but the net's parameters "
                            f"have {p.dtype}; convert x or the model (.to(dtype))")
        if x.device != p.device:
            raise ValueError(f"EDMDenoiser: x is on {x.device} but the net's parameters are "
                             f"on {p.device}")

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("EDMDenoiser: x must be a floating-point tensor")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"EDMDenoiser: x must be a non-empty batch [B, ...], got {tuple(x.shape)}")
        B = x.shape[0]
        flat_in = self.image_shape is not None and x.dim() == 2
        if flat_in:
            if x.shape[1] != self.n:
                raise ValueError(f"EDMDenoiser: x has {x.shape[1]} features but image_shape "
                                 f"{self.image_shape} holds {self.n}")
            xi = x.reshape(B, *self.image_shape)
        else:
            if self.image_shape is not None and tuple(x.shape[1:]) != self.image_shape:
                raise ValueError(f"EDMDenoiser: x has shape {tuple(x.shape)}, expected "
                                 f"[B, {self.n}] or [B, {', '.join(map(str, self.image_shape))}]")
            if self.image_shape is None and self.n is not None and (x.dim() != 2 or x.shape[1] != self.n):
                raise ValueError(f"EDMDenoiser: x must have shape [B, {self.n}], got {tuple(x.shape)}")
            if self.image_shape is None and isinstance(self.net, UNet):
                C, f = self.net.channels, self.net.pool_factor
                if x.dim() != 4 or x.shape[1] != C or x.shape[2] % f or x.shape[3] % f:
                    raise ValueError(f"EDMDenoiser: x must be images [B, {C}, H, W] with H and W "
                                     f"divisible by {f} for its UNet (give image_shape to pass "
                                     f"flat [B, n] x), got shape {tuple(x.shape)}")
            xi = x
        s = sigma_vector(sigma, B, x, "EDMDenoiser")
        c_skip, c_out, c_in, c_noise = self._preconditioning(s)
        view = (B,) + (1,) * (xi.dim() - 1)
        try:
            f = self.net(xi * c_in.reshape(view), c_noise)
        except RuntimeError:
            self._name_mismatch(x)  # torch's own error names no argument
            raise
        out = c_skip.reshape(view) * xi + c_out.reshape(view) * f
        return out.reshape(B, -1) if flat_in else out


def make_unet_denoiser(image_shape: Sequence[int], model_channels: int = 32,
                       channel_mult: Sequence[int] = (1, 2), num_blocks: int = 1,
                       sigma_data: float = 0.5, dropout: float = 0.0,
                       precond: str = "edm") -> EDMDenoiser:
    """EDM-wrapped :class:`UNet` for images ``(C, H, W)`` (flat inputs are reshaped)."""
    C, H, W = _image_shape(image_shape, "make_unet_denoiser")
    if H != W:
        raise ValueError(f"make_unet_denoiser: images must be square, got {H} x {W}")
    net = UNet(C, H, model_channels, channel_mult, num_blocks, dropout=dropout)
    return EDMDenoiser(net, sigma_data, (C, H, W), precond=precond)


def make_mlp_denoiser(n: int, hidden: int = 256, depth: int = 3, sigma_data: float = 0.5,
                      precond: str = "edm") -> EDMDenoiser:
    """EDM-wrapped :class:`MLPNet` for flat ``[B, n]`` data."""
    return EDMDenoiser(MLPNet(n, hidden, depth), sigma_data, precond=precond)
