"""The ops under ``torch.autocast``: they run in float32.

The kernels take float32 and float64. Inside an autocast region a network's layers hand on
float16 / bfloat16 activations, and a denoiser behind them then failed with "x must be float32
or float64". The ops follow the float32 policy of torch's own precision-sensitive ops (softmax,
norms, losses): float16 and bfloat16 tensors on a device where autocast is enabled are cast to
float32, float64 and other tensors are left as they are, and the outputs are float32. Gradients
flow back through the casts. Outside autocast nothing changes: half-precision input is still
refused with the TypeError naming the argument.

Two layers do it: the Python API casts before its checks (:func:`to_float32`), and autocast
kernels registered on the ops (:func:`register`) do it for code that calls ``torch.ops.molrg.*``
directly.
"""
from __future__ import annotations

import torch

# the ops that take activations; train_step, philox_draws, the backward ops and the Jacobian
# spectrum take parameters, data or gradients, and fall through autocast unchanged
OPS = ("molrg::subspace_dae", "molrg::hard_assign", "molrg::optimal_denoiser")
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


def register() -> None:
    """Autocast kernels (float32) for :data:`OPS` on every device type autocast supports here."""
    for device in _DEVICES:
        if torch._C._is_autocast_available(device):
            for op in OPS:
                torch.library.register_autocast(op, device, torch.float32)
