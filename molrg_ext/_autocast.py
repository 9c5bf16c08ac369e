"""The ops under ``torch.autocast``: they run in float32.

The kernels take float32 and float64. Inside an autocast region a network's layers hand on
float16 / bfloat16 activations, and a denoiser behind them then failed with "x must be float32
or float64". The ops follow the float32 policy of torch's own precision-sensitive ops (softmax,
norms, losses): float16 and bfloat16 tensors on a device where autocast is enabled are cast to
float32, float64 and other tensors are left as they are, and the floating outputs are float32.
Gradients flow back through the casts. Outside autocast nothing changes: half-precision input
is still refused with the TypeError naming the argument.

Three layers do it: the Python API casts before its checks (:func:`to_float32`); the
pure-PyTorch compositions that run under torch.func transforms run with autocast off
(:func:`disabled`), or their matrix products would be bfloat16; and C++ autocast kernels on the
ops (``csrc/autocast.cpp``) cast for code that calls ``torch.ops.molrg.*`` directly. A
transform's backward called inside an autocast region (``jacrev`` within ``torch.autocast``)
is autocast as any PyTorch backward is: call transforms outside the region.
"""
from __future__ import annotations

import contextlib

import torch

_HALF = (torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda")


def to_float32(*values):
    """``values`` with every float16 / bfloat16 tensor cast to float32 when autocast is enabled
    for its device (a list, in order; anything else unchanged)."""
    out = list(values)
    for i, v in enumerate(out):
        if (isinstance(v, torch.Tensor) and v.dtype in _HALF and v.device.type in _DEVICES
                and torch.is_autocast_enabled(v.device.type)):
            out[i] = v.float()
    return out


def disabled(x: torch.Tensor):
    """A context that turns autocast off for ``x``'s device while a float32 composition runs
    (a no-op context when it is not on)."""
    device = x.device.type
    if device in _DEVICES and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
