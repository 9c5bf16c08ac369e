"""molrg_ext: fused PyTorch ops and tools for diffusion models on mixtures of low-rank Gaussians.

Importing the package registers the ``torch.ops.molrg.*`` operators (CPU always, CUDA when built
with it) together with their autograd and fake kernels.
"""
import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

try:
    from . import _C
except ImportError as _err:  # a source checkout without the built extension, e.g. the repo root
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    raise ImportError(
        f"molrg_ext was imported from {_here}, which holds no built extension (_C): a source "
        "tree on sys.path (Python puts the current directory first for 'python -m' and "
        "'python -c') hides an installed molrg_ext. Build it in place "
        "(scripts/build_inplace.sh), or use the installed entry points ('molrg bench', "
        "'pytest'), or run from another directory."
    ) from _err
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
