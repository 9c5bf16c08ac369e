"""Argument normalisation for the subspace-denoiser family.

Turns the user-facing forms (``x`` [B, n] or [P, B, n], ``U`` [K, n, dmax] or [P, K, n, dmax],
scalar or broadcastable ``c``/``phi``/``bias``/``assign``, ``dims`` as a list or tensor) into the
canonical contiguous shapes the ``torch.ops.molrg`` kernels take. Every error names the argument.
The fused op wrappers and the pure-PyTorch reference both use it, so they accept the same inputs.
"""
from __future__ import annotations

import math
import numbers
import operator
import reprlib
from typing import NamedTuple, Optional, Sequence, Union

import torch

MODES = {"soft": 0, "hard": 1}
INDEX_MAX = 2**31 - 1  # the ops index with int32


def as_int(v, name: str, where: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """v as a Python int: an int, a numpy integer or a one-element integer tensor; floats (also
    2.0) and bools are refused instead of truncated. lo: the smallest value allowed; hi: the
    first value not allowed (with lo, the error names the range [lo, hi))."""
    if isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("torch.bool", "bool"):
        raise TypeError(f"{where}: {name} must be an int, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {v!r}") from None
    if hi is not None and (i >= hi or (lo is not None and i < lo)):
        rng = f"[{lo}, {hi})" if lo is not None else f"< {hi}"
        raise ValueError(f"{where}: {name} must be in {rng}, got {i}")
    if lo is not None and i < lo:
        raise ValueError(f"{where}: {name} must be >= {lo}, got {i}")
    return i


def as_int_list(vals, name: str, where: str, lo: Optional[int] = None) -> list[int]:
    """A sequence (or 1-D integer tensor) of ints as a list, each checked as as_int does."""
    if isinstance(vals, torch.Tensor):
        if vals.is_floating_point() or vals.is_complex() or vals.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must hold integers, got dtype {vals.dtype}")
        vals = vals.flatten().tolist()
    if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
        raise TypeError(f"{where}: {name} must be a sequence of ints, got {vals!r}")
    return [as_int(v, f"{name}[{k}]", where, lo) for k, v in enumerate(vals)]


def is_one_value(v) -> bool:
    """True for a number or a 0-d tensor or array (and anything else that is not iterable), False
    for sequences, iterators and generators, strings and 1-D or larger arrays."""
    if getattr(v, "ndim", None) == 0:
        return True
    return not (hasattr(v, "__len__") or hasattr(v, "__iter__"))


def dims_list(dims, K: Optional[int], where: str, name: str = "dims", hi: Optional[int] = None,
              hi_name: str = "n") -> list[int]:
    """Subspace dimensions as a list of K ints in [1, hi] (every parser of ``dims`` uses this).

    One int (or a 0-d integer tensor or array) stands for all K components, and for one when K is
    None; a sequence (or 1-D integer tensor) must have K entries, or any number >= 1 when K is
    None. Floats (also 2.0) and bools are TypeErrors, not truncated; an empty list, a wrong length
    and values out of range are ValueErrors. Messages name ``name`` and, for the upper bound,
    ``hi_name``."""
    if K is not None and K > INDEX_MAX:  # before [d] * K tries to build the list
        raise ValueError(f"{where}: K must be <= 2**31 - 1 (the ops' int32 range), got {K}")
    if is_one_value(dims):
        out = [as_int(dims, name, where, 1)] * (1 if K is None else K)
    else:
        if getattr(dims, "ndim", 1) != 1:
            raise ValueError(f"{where}: {name} must be one int or a 1-D sequence of ints, "
                             f"got shape {tuple(dims.shape)}")
        out = as_int_list(dims, name, where, 1)
    if not out:
        raise ValueError(f"{where}: {name} is empty (K = 0)")
    if K is not None and len(out) != K:
        raise ValueError(f"{where}: {name} must have K = {K} entries, got {len(out)}")
    if hi is not None:
        for k, d in enumerate(out):
            if d > hi:
                raise ValueError(f"{where}: {name}[{k}] = {d} must be <= {hi_name} = {hi}")
    return out


def check_mixture_weights(p: torch.Tensor, K: Optional[int], where: str) -> torch.Tensor:
    """p, after a ValueError unless it is a 1-D tensor of K (any number >= 1 when K is None)
    finite weights >= 0, not all zero, with a finite sum. The caller normalises it (in its own
    dtype), so a sum that overflows would turn every weight into 0."""
    bad_shape = p.dim() != 1 or p.numel() == 0 or (K is not None and p.numel() != K)
    if K is not None:
        if bad_shape or not _weights_ok(p):
            raise ValueError(f"{where}: pi must be K = {K} finite weights >= 0, not all zero, "
                             f"with a finite sum, got {p.tolist()}")
        return p
    if bad_shape:
        raise ValueError(f"{where}: pi must be a 1-D sequence of K weights, got shape "
                         f"{tuple(p.shape)}")
    if not _weights_ok(p):
        raise ValueError(f"{where}: pi must be finite and >= 0, not all zero, with a finite sum, "
                         f"got {p.tolist()}")
    return p


def _weights_ok(p: torch.Tensor) -> bool:
    total = p.sum()
    return bool(torch.isfinite(p).all() and (p >= 0).all() and total > 0 and torch.isfinite(total))


def check_number_or_tensor(v, name: str, where: str):
    """v, after a TypeError naming ``name`` unless it is a real tensor (not complex or bool: a cast
    would drop the imaginary part) or a Python number (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
        raise TypeError(f"{where}: {name} must be a number or a tensor, got {type(v).__name__}")
    if isinstance(v, torch.Tensor) and (v.is_complex() or v.dtype == torch.bool):
        raise TypeError(f"{where}: {name} must be a real (not bool) tensor, got dtype {v.dtype}")
    return v


def number_or_tensor(v, name: str, where: str) -> torch.Tensor:
    """v as a tensor: a Python number becomes a 0-d float64 tensor, an integer tensor the default
    float dtype; bools and other types are TypeErrors naming ``name``."""
    if isinstance(check_number_or_tensor(v, name, where), torch.Tensor):
        return v if v.is_floating_point() else v.to(torch.get_default_dtype())
    return torch.tensor(_float(v, name, where), dtype=torch.float64)


def _float(v, name: str, where: str) -> float:
    """float(v), with an int beyond float64's range a ValueError naming ``name``."""
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{where}: {name} must be within float64's range, got "
                         f"{reprlib.repr(v)}") from None


def real_number(v, name: str, where: str, lo: Optional[float] = None,
                hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False) -> float:
    """v as a Python float: a real number (Python or numpy, not a bool) or a one-element real
    tensor or array (not bool or complex). NaN is refused, and so is inf unless the range allows
    it (hi = inf or lo = -inf, closed); lo/hi bound it ((lo, hi) with lo_open/hi_open). Errors
    name ``name``: TypeError for a wrong type, ValueError for a wrong value (an int beyond
    float64 too). While torch.compile traces, a Python float passes unchecked: with
    dynamic=True it may be symbolic (no value to compare, and torch.compile cannot trace the
    type inspection below); the same call in eager mode checks it."""
    if torch.compiler.is_compiling() and isinstance(v, float):
        return v
    dt = getattr(v, "dtype", None)
    if isinstance(v, bool) or (dt is not None and (str(dt) in ("bool", "torch.bool")
                                                   or "complex" in str(dt))):
        got = type(v).__name__ if isinstance(v, bool) else f"dtype {dt}"
        raise TypeError(f"{where}: {name} must be a real number, got {got}")
    if isinstance(v, torch.Tensor) or (dt is not None and not isinstance(v, numbers.Real)):
        if getattr(dt, "kind", "f") not in "iuf" or not hasattr(v, "item"):  # strings, objects
            raise TypeError(f"{where}: {name} must be a real number, got an array of dtype {dt}")
        if (v.numel() if isinstance(v, torch.Tensor) else v.size) != 1:
            raise ValueError(f"{where}: {name} must be one number, got a tensor of shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    elif not isinstance(v, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(v).__name__}")
    f = _float(v, name, where)
    lo_ok = lo is None or (f > lo if lo_open else f >= lo)
    hi_ok = hi is None or (f < hi if hi_open else f <= hi)
    if not (lo_ok and hi_ok and (math.isfinite(f) or f in (lo, hi))):
        if lo is None and hi is None:
            what = "finite"
        elif hi is None:
            what = f"finite and {'>' if lo_open else '>='} {lo:g}"
        elif lo is None:
            what = f"finite and {'<' if hi_open else '<='} {hi:g}"
        else:
            what = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{where}: {name} must be {what}, got {f}")
    return f


def check_seed(seed, name: str, where: str, lo: int = 0, hi: int = 2**64) -> int:
    """A seed as an int in [lo, hi) (torch.Generator.manual_seed takes [-2**63, 2**64))."""
    return as_int(seed, name, where, lo, hi)


def real_tensor(v, name: str, where: str, dtype: Optional[torch.dtype] = None,
                device=None) -> torch.Tensor:
    """torch.as_tensor(v, dtype, device) for real numbers, sequences of them, arrays and tensors;
    strings, complex or bool numbers, arrays and sequence elements, and anything torch cannot
    convert are errors naming ``name`` (TypeError, ValueError for a ragged or out-of-range
    sequence)."""
    kind = str(getattr(v, "dtype", ""))
    if (isinstance(v, (str, bytes, bool, complex)) or "complex" in kind or "bool" in kind
            or (isinstance(v, (list, tuple)) and _has_bool_or_complex(v))):
        raise TypeError(f"{where}: {name} must hold real numbers, got {reprlib.repr(v)}")
    try:
        return torch.as_tensor(v, dtype=dtype, device=device)
    except TypeError:
        raise TypeError(f"{where}: {name} must hold real numbers, got {reprlib.repr(v)}") from None
    except (ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{where}: {name} must be a rectangular sequence of real numbers within "
                         f"range, got {reprlib.repr(v)} ({e})") from None


def _has_bool_or_complex(seq) -> bool:
    """Whether a (nested) list or tuple holds a bool or complex element (a number, array or
    tensor): torch.as_tensor with a real dtype would cast it silently (True to 1, 1j to 0)."""
    stack = list(seq)
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, (bool, complex)):
            return True
        else:
            kind = str(getattr(x, "dtype", ""))
            if "bool" in kind or "complex" in kind:
                return True
    return False


def values_readable(v) -> bool:
    """Whether v's values can be read in Python (a device sync): not while torch.compile traces,
    not for a tensor wrapped by a torch.func transform (vmap, grad, jacrev, jvp), where
    ``bool(t)`` fails with a data-dependent-control-flow error, and not on the meta device."""
    if torch.compiler.is_compiling():
        return False
    if not isinstance(v, torch.Tensor):
        return True
    return not (v.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(v))


def needs_composite(*args) -> bool:
    """Whether an op call must run its pure-PyTorch composition instead of the C++ kernels: a
    tensor among ``args`` is wrapped by a torch.func transform (grad, jacrev, jacfwd, jvp, vmap,
    hessian) or carries a forward-mode tangent (torch.autograd.forward_ad). The kernels have
    reverse-mode autograd only and are not functorch-aware: jvp through them gave zero tangents
    without an error, and grad / jacrev failed with a message about autograd.Function. False
    while torch.compile traces (the wrapped tensors cannot be inspected there): a transform
    compiled together with the op reaches the kernels, which refuse forward-mode tangents."""
    if torch.compiler.is_compiling():
        return False
    fw = torch.autograd.forward_ad._current_level >= 0  # inside a dual_level context
    if not fw and torch._C._functorch.maybe_current_level() is None:  # no transform active
        return False
    for t in args:
        if isinstance(t, torch.Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                return True
            if fw and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                return True
    return False


def check_range(v: torch.Tensor, name: str, where: str, lo: float, hi: float = math.inf,
                lo_open: bool = False, what: str = "") -> torch.Tensor:
    """v, after a ValueError naming ``name`` unless every entry is finite and in [lo, hi] ((lo, hi]
    when ``lo_open``); ``what`` replaces the interval in the message. One reduction (a device
    sync), skipped while torch.compile traces and inside torch.func transforms, where values
    cannot be read."""
    if not values_readable(v):
        return v
    ok = (v > lo) if lo_open else (v >= lo)
    ok = ok & ((v <= hi) if hi < math.inf else (v < math.inf))  # NaN fails both comparisons
    if not bool(ok.all()):
        bad = v.detach()[~ok].flatten()[0].item()
        if not what:
            what = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{']' if hi < math.inf else ')'}"
        raise ValueError(f"{where}: {name} must be {what}, got {bad}")
    return v


def check_positive(v: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """check_range for finite values > 0 (noise levels and scales)."""
    return check_range(v, name, where, 0.0, lo_open=True, what="finite and > 0")


class DaeArgs(NamedTuple):
    x: torch.Tensor  # [P, B, n]
    U: torch.Tensor  # [P, K, n, dmax]
    c: torch.Tensor  # [P, B]
    phi: torch.Tensor  # [P, B]
    bias: Optional[torch.Tensor]  # [P, B, K]
    assign: Optional[torch.Tensor]  # [P, B] int64
    dims: list[int]
    mode: int
    batched: bool  # x had a leading instance dimension
    # (P, B) when one U (3-D, or 4-D with one instance) is shared by the P instances of a 3-D x:
    # the instances are folded into one batch of P B samples (x [1, P B, n]) instead of U
    # copied P times; restore unfolds
    fold: Optional[tuple] = None


def parse_mode(mode: str, where: str = "subspace_dae") -> int:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def parse_dims(dims, K: int, dmax: int, n: int, where: str = "subspace_dae") -> list[int]:
    """dims as K ints with 1 <= d_k <= min(dmax, n); None means every subspace uses dmax."""
    if K == 0:
        raise ValueError(f"{where}: U must hold at least one subspace (K = 0)")
    out = [int(dmax)] * K if dims is None else dims_list(dims, K, where, hi=dmax, hi_name="dmax")
    for k, d in enumerate(out):
        if d > n:
            raise ValueError(f"{where}: dims[{k}] = {d} exceeds the ambient dimension n = {n}")
    return out


def _check_tensor(t, name: str, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_pair(a, b, name_a: str, name_b: str, where: str) -> None:
    """Both tensors; a float32 or float64; b with a's dtype and device (errors name them)."""
    _check_tensor(a, name_a, where)
    _check_tensor(b, name_b, where)
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: {name_a} must be float32 or float64, got {a.dtype}")
    if b.dtype != a.dtype:
        raise TypeError(f"{where}: {name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}")
    if b.device != a.device:
        raise ValueError(f"{where}: {name_b} is on {b.device} but {name_a} is on {a.device}")


def check_denoiser_data(denoiser, X0, where: str) -> None:
    """A callable denoiser(x, sigma) and a non-empty, finite, floating [N, *shape] sample X0."""
    if not callable(denoiser):
        raise TypeError(f"{where}: denoiser must be callable(x, sigma)")
    if not isinstance(X0, torch.Tensor) or X0.dim() < 2 or X0.shape[0] == 0:
        raise ValueError(f"{where}: X0 must be a non-empty [N, *shape] tensor")
    if not X0.is_floating_point() or not torch.isfinite(X0).all():
        raise ValueError(f"{where}: X0 must be floating point and finite")


def check_denoiser_output(y, x: torch.Tensor, sigma, where: str,
                          values: bool = True) -> torch.Tensor:
    """y = denoiser(x, sigma), after an error unless it is a finite real floating tensor of x's
    shape and device (a wrong one would otherwise be fitted or scored silently). values=False
    skips the finiteness scan, for use under torch.func transforms (jacobian), where the values
    cannot be read and are checked on the plain output afterwards."""
    what = f"{where}: the denoiser's output"
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(y).__name__}")
    if y.shape != x.shape:
        raise ValueError(f"{what} must have the input's shape {tuple(x.shape)}, got "
                         f"{tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{what} must be real floating point, got dtype {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"{what} is on {y.device} but its input is on {x.device}")
    if values and not torch.isfinite(y).all():
        raise ValueError(f"{what} contains NaN or Inf values (sigma = {sigma})")
    return y


def check_generator(generator, where: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")


def _as_float(v, like: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Python numbers (not bools) become tensors of x's dtype/device; tensors must already
    match."""
    if isinstance(v, bool):
        raise TypeError(f"{where}: {name} must be a number or a tensor, got bool")
    if isinstance(v, torch.Tensor):
        if v.device != like.device:
            raise ValueError(f"{where}: {name} is on {v.device} but x is on {like.device}")
        if v.dtype != like.dtype:
            raise TypeError(f"{where}: {name} has dtype {v.dtype} but x has dtype {like.dtype}")
        return v
    if isinstance(v, (int, float)):
        return torch.tensor(_float(v, name, where), dtype=like.dtype, device=like.device)
    raise TypeError(f"{where}: {name} must be a number or a tensor, got {type(v).__name__}")


def _broadcast(t: torch.Tensor, shape: Sequence[int], name: str, where: str) -> torch.Tensor:
    try:
        return torch.broadcast_to(t, tuple(shape))
    except RuntimeError as e:
        raise ValueError(
            f"{where}: {name} of shape {tuple(t.shape)} does not broadcast to {tuple(shape)}"
        ) from e


def prepare_dae_args(
    x: torch.Tensor,
    U: torch.Tensor,
    c: Union[float, torch.Tensor],
    phi: Union[float, torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    dims=None,
    mode: str = "soft",
    assign: Optional[torch.Tensor] = None,
    where: str = "subspace_dae",
    x_name: str = "x",
) -> DaeArgs:
    """x and U as the ops take them ([P, B, n], [P, K, n, dmax]), the per-sample arguments as
    [P, B] (and [P, B, K]) tensors. Errors name the function (where) and x as x_name."""
    check_float_pair(x, U, x_name, "U", where)
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{where}: {x_name} must be [B, n] or [P, B, n], got shape {tuple(x.shape)}"
        )
    if U.dim() not in (3, 4):
        raise ValueError(
            f"{where}: U must be [K, n, dmax] or [P, K, n, dmax], got shape {tuple(U.shape)}"
        )
    mode_i = parse_mode(mode, where)
    batched = x.dim() == 3
    if not batched:
        if U.dim() == 4:
            raise ValueError(
                f"{where}: U has an instance dimension (shape {tuple(U.shape)}) but {x_name} is "
                f"[B, n]; pass {x_name} as [P, B, n]"
            )
        x3, U4 = x.unsqueeze(0), U.unsqueeze(0)
    else:
        x3 = x
        U4 = U.unsqueeze(0) if U.dim() == 3 else U
        if U4.shape[0] not in (1, x3.shape[0]):
            raise ValueError(
                f"{where}: U has {U4.shape[0]} instances but {x_name} has {x3.shape[0]}"
            )
    fold = (x3.shape[0], x3.shape[1]) if batched and U4.shape[0] == 1 else None
    P, B, n = x3.shape
    K, n_u, dmax = U4.shape[1:]
    if n_u != n:
        raise ValueError(f"{where}: U has n = {n_u} rows but {x_name} has n = {n}")
    if dmax == 0:
        raise ValueError(f"{where}: U must have at least one column (dmax = 0)")
    dims_l = parse_dims(dims, K, dmax, n, where)

    def per_sample(v, name, trailing=()):
        # [B, ...] forms are given for unbatched x; broadcast there, then add the P axis.
        if batched:
            return _broadcast(v, (P, B, *trailing), name, where)
        return _broadcast(v, (B, *trailing), name, where).unsqueeze(0)

    def per_sample_scale(v, name):
        # a Python number straight into a [P, B] tensor (one op; ~4 us less per argument than a
        # 0-d tensor broadcast and copied, a third of the wrapper's time at small B)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                return torch.full((P, B), float(v), dtype=x.dtype, device=x.device)
            except (RuntimeError, OverflowError):
                # beyond float32's range: rounded to inf below, which the op names; an int
                # beyond float64's: _as_float names it
                pass
        return per_sample(_as_float(v, x, name, where), name).contiguous()

    c2, phi2 = per_sample_scale(c, "c"), per_sample_scale(phi, "phi")
    bias3 = None
    if bias is not None:
        bias3 = per_sample(_as_float(bias, x, "bias", where), "bias", (K,)).contiguous()
    assign2 = None
    if assign is not None:
        if mode_i != MODES["hard"]:
            raise ValueError(f"{where}: assign is only used with mode='hard'")
        _check_tensor(assign, "assign", where)
        if assign.dtype != torch.int64:
            raise TypeError(f"{where}: assign must be int64, got {assign.dtype}")
        if assign.device != x.device:
            raise ValueError(
                f"{where}: assign is on {assign.device} but {x_name} is on {x.device}"
            )
        assign2 = per_sample(assign, "assign").contiguous()
    x3 = x3.contiguous()
    if fold is not None:  # one shared U: P B samples of one instance (U copied P times was
        # saved for the backward, and the GEMM path copied it twice more: 2.8 x x's memory)
        x3 = x3.reshape(1, P * B, n)
        c2, phi2 = c2.reshape(1, P * B), phi2.reshape(1, P * B)
        bias3 = None if bias3 is None else bias3.reshape(1, P * B, K)
        assign2 = None if assign2 is None else assign2.reshape(1, P * B)
    return DaeArgs(
        x3, U4.contiguous(), c2, phi2, bias3, assign2, dims_l, mode_i, batched, fold
    )


def restore(y: torch.Tensor, a: DaeArgs) -> torch.Tensor:
    if a.fold is not None:
        return y.reshape(*a.fold, *y.shape[2:])
    return y if a.batched else y.squeeze(0)
