"""molrg_ext: fused PyTorch ops and tools for diffusion models on mixtures of low-rank Gaussians.

Importing the package registers the ``torch.ops.molrg.*`` operators (CPU always, CUDA when built
with it) together with their autograd and fake kernels.
"""
import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)


_REBUILD = ("rebuild it with this torch: pip install --no-build-isolation --force-reinstall "
            "--no-deps . (from the source tree), or scripts/build_inplace.sh for an in-place "
            "build.")


def _release(version: str) -> tuple:
    """(major, minor) of a torch version string: '2.13.0+cpu' -> ('2', '13')."""
    return tuple(version.split("+")[0].split(".")[:2])


def _build_mismatch(built: str, running: str):
    """The warning for an extension built against another torch release than the running one
    (None when the releases agree or the build did not record its torch)."""
    if built == "unknown" or _release(built) == _release(running):
        return None
    return (f"molrg_ext was built against torch {built} but runs with torch {running}: a build "
            f"for one torch release may fail or misbehave with another: {_REBUILD}")


def _check_cpu() -> None:
    """Refuse, before it loads, a compiled module built for instructions this CPU lacks (it
    would stop the interpreter with SIGILL): see _cpu_features."""
    import importlib.util
    import os

    from . import _cpu_features

    # where the import below will load _C from (an editable install's build folder too)
    spec = importlib.util.find_spec(__name__ + "._C")
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        _cpu_features.check(spec.origin)


_check_cpu()
try:
    from . import _C
except ImportError as _err:
    import importlib.machinery as _machinery
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _built = [f for f in (_os.path.join(_here, "_C" + s)
                          for s in _machinery.EXTENSION_SUFFIXES) if _os.path.exists(f)]
    if _built:  # there is a build for this Python, and it did not load
        raise ImportError(
            f"molrg_ext's compiled module {_built[0]} did not load with torch "
            f"{torch.__version__}: {_err}. An undefined symbol usually means it was built "
            f"against another torch release; {_REBUILD}"
        ) from _err
    # a source checkout without the built extension, e.g. the repo root
    raise ImportError(
        f"molrg_ext was imported from {_here}, which holds no built extension (_C) for this "
        "Python: a source tree on sys.path (Python puts the current directory first for "
        "'python -m' and 'python -c') hides an installed molrg_ext. Build it in place "
        "(scripts/build_inplace.sh), or use the installed entry points ('molrg bench', "
        "'pytest'), or run from another directory."
    ) from _err
# (a build older than the attribute records nothing)
_mismatch = _build_mismatch(getattr(_C, "torch_version", "unknown"), torch.__version__)
if _mismatch:
    import warnings as _warnings

    _warnings.warn(_mismatch, RuntimeWarning, stacklevel=2)
from . import reference
from .ops import hard_assign, subspace_dae
from .posterior import posterior_mean_coefficients
from .modules import SubspaceDAE, random_orthonormal
from .train_step import Levels, make_levels, philox_draws, train_step
from .jacobian import (
    dae_jacobian_spectrum,
    jacobian_directions,
    jacobian_rank,
    jacobian_spectrum,
    numerical_rank,
)
from . import hidden_gaussian
from .hidden_gaussian import GaussianDenoiser, OptimalDenoiser, optimal_denoiser

__version__ = "0.1.0"
built_with_cuda: bool = bool(_C.built_with_cuda)

__all__ = [
    "subspace_dae",
    "hard_assign",
    "posterior_mean_coefficients",
    "SubspaceDAE",
    "random_orthonormal",
    "reference",
    "train_step",
    "make_levels",
    "philox_draws",
    "Levels",
    "built_with_cuda",
    "dae_jacobian_spectrum",
    "numerical_rank",
    "jacobian_spectrum",
    "jacobian_rank",
    "jacobian_directions",
    "hidden_gaussian",
    "optimal_denoiser",
    "OptimalDenoiser",
    "GaussianDenoiser",
]
