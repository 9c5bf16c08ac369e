"""Argument checks of the samplers, the generic Jacobian API and optimal_denoiser's noise levels
(fuzz report B, findings 2, 3, 5 and 6)."""
import math

import numpy as np
import pytest
import torch

import molrg_ext as M
from molrg_ext.hidden_gaussian import optimal_denoiser
from molrg_ext.sampling import ddim_sample, default_sigma_steps, heun_sample

F64 = torch.float64
SAMPLERS = (heun_sample, ddim_sample)


def _half(x, s):
    return 0.5 * x


def _x(B=4, n=6):
    return torch.randn(B, n, dtype=F64, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_names_a_denoiser_output_that_is_not_a_tensor(sampler):
    z = _x()
    for den, got in ((lambda x, s: None, "NoneType"), (lambda x, s: x.tolist(), "list")):
        with pytest.raises(TypeError, match=f"^{sampler.__name__}: the denoiser's output must be "
                                            f"a tensor, got {got}$"):
            sampler(den, z, [10.0, 1.0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_checks_num_steps_even_with_sigmas(sampler):
    z, name = _x(), sampler.__name__
    for bad, err, match in (("abc", TypeError, "num_steps must be an int, got 'abc'"),
                            (math.nan, TypeError, "num_steps must be an int, got nan"),
                            (-1, ValueError, r"num_steps must be in \[1, 4294967296\), got -1")):
        with pytest.raises(err, match=f"^{name}: {match}"):
            sampler(_half, z, [10.0, 1.0], num_steps=bad)
    # the grid is still given by sigmas alone; num_steps None or 1 (unused) stay valid with it
    ref = sampler(_half, z, [10.0, 1.0])
    for ok in (7, None, 1):
        torch.testing.assert_close(sampler(_half, z, [10.0, 1.0], num_steps=ok), ref, rtol=0,
                                   atol=0)
    with pytest.raises(ValueError, match=f"^{name}: num_steps must be in \\[2, 4294967296\\), "
                                         "got 1"):
        sampler(_half, z, num_steps=1)  # the default grid needs two levels


@pytest.mark.parametrize("where", ["heun_sample", "ddim_sample", "default_sigma_steps"])
def test_huge_num_steps_is_named_by_the_caller(where):
    fn = {"heun_sample": lambda: heun_sample(_half, _x(), num_steps=2**70),
          "ddim_sample": lambda: ddim_sample(_half, _x(), num_steps=2**70),
          "default_sigma_steps": lambda: default_sigma_steps(2**70)}[where]
    with pytest.raises(ValueError, match=rf"^{where}: num_steps must be in \[2, 4294967296\), "
                                         rf"got {2**70}"):
        fn()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_refuses_complex_and_bool_sigmas(sampler):
    z = _x()
    for bad in (torch.tensor([10.0, 1.0], dtype=torch.complex64), [10 + 1j, 1.0], True, [True],
                torch.tensor([True, True]), np.array([2.0, 1.0], dtype=np.complex128), "abc"):
        with pytest.raises(TypeError, match=f"^{sampler.__name__}: sigmas must hold real numbers"):
            sampler(_half, z, bad)


def test_ddim_refuses_complex_and_bool_scales():
    z = _x()
    for bad in (torch.tensor([1.0, 0.5], dtype=torch.complex64), [1.0, 0.5 + 0.1j], [True, True],
                torch.ones(2, dtype=torch.bool)):
        with pytest.raises(TypeError, match="^ddim_sample: scales must hold real numbers"):
            ddim_sample(_half, z, [10.0, 1.0], scales=bad)
    # real scales as before: x_T = s_0 sigma_0 noise, then x = s_1 (d0 + sigma_1 / sigma_0 (z - d0))
    out = ddim_sample(_half, z, [10.0, 1.0], scales=np.array([0.5, 0.25]))
    zt = z * 10.0
    x1 = 0.25 * (0.5 * zt + 0.1 * (zt - 0.5 * zt))
    torch.testing.assert_close(out, 0.5 * x1 / 0.25)


# ------------------------------------------------------------------------- generic Jacobian API
@pytest.mark.parametrize("method", ["jacrev", "lanczos"])
def test_jacobian_spectrum_checks_the_denoiser_output(method):
    x = _x()
    for den, err, match in (
            (lambda x, s: None, TypeError, "must be a tensor, got NoneType"),
            (lambda x, s: x[:, :2], ValueError, r"must have the input's shape \(\d+, 6\), got "
                                                r"\(\d+, 2\)"),
            (lambda x, s: x.long(), TypeError, "must be real floating point, got dtype torch.int64"),
            (lambda x, s: x * math.nan, ValueError, r"contains NaN or Inf values \(sigma = 1.0\)"),
            (lambda x, s: x + math.inf, ValueError, "contains NaN or Inf values")):
        with pytest.raises(err, match="^jacobian_spectrum: the denoiser's output " + match):
            M.jacobian_spectrum(den, x, 1.0, method, k=2 if method == "lanczos" else None)
        with pytest.raises(err, match="^jacobian_spectrum: the denoiser's output " + match):
            M.jacobian_rank(den, x, 1.0, method=method)


def test_jacobian_spectrum_checks_chunk_size():
    x = _x()
    with pytest.raises(TypeError, match="^jacobian_spectrum: chunk_size must be an int, got 'a'"):
        M.jacobian_spectrum(_half, x, 1.0, "jacrev", chunk_size="a")
    with pytest.raises(TypeError, match="^jacobian_spectrum: chunk_size must be an int, got 1.5"):
        M.jacobian_spectrum(_half, x, 1.0, "jacrev", chunk_size=1.5)
    with pytest.raises(ValueError, match="^jacobian_spectrum: chunk_size must be >= 1, got 0"):
        M.jacobian_spectrum(_half, x, 1.0, chunk_size=0)
    # valid chunks (and the output check on the way) leave the values alone: J = I / 2
    sp = M.jacobian_spectrum(_half, x, 1.0, "jacrev", vectors=True, chunk_size=np.int64(2))
    torch.testing.assert_close(sp.svals, torch.full((4, 6), 0.5, dtype=F64))
    lz = M.jacobian_spectrum(_half, x, 1.0, "lanczos", 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lz.svals, torch.full((4, 3), 0.5, dtype=F64))


@pytest.mark.parametrize("method", ["auto", "jacrev", "lanczos"])
def test_jacobian_rank_checks_k_for_every_method(method):
    x = _x()
    for k, err, match in (("abc", TypeError, "k must be an int, got 'abc'"),
                          (math.nan, TypeError, "k must be an int, got nan"),
                          (2.0, TypeError, "k must be an int, got 2.0"),
                          (True, TypeError, "k must be an int, got True"),
                          (0, ValueError, "k must be >= 1, got 0"),
                          (-1, ValueError, "k must be >= 1, got -1"),
                          (7, ValueError, r"k must be an int in \[1, n = 6\], got 7")):
        with pytest.raises(err, match="^jacobian_rank: " + match):
            M.jacobian_rank(_half, x, 1.0, method=method, k=k)
    # a valid k: the exact methods do not use it; J = I / 2 has rank n everywhere
    rank = M.jacobian_rank(_half, x, 1.0, method=method, k=np.int64(6))
    assert rank.tolist() == [6] * 4


def test_jacobian_directions_requires_k():
    with pytest.raises(TypeError, match="^jacobian_directions: k must be an int .*got None"):
        M.jacobian_directions(_half, _x(), 1.0, None)
    with pytest.raises(TypeError, match="^jacobian_spectrum: k must be an int, got 'abc'"):
        M.jacobian_directions(_half, _x(), 1.0, "abc")
    assert M.jacobian_directions(_half, _x(), 1.0, 2).shape == (4, 2, 6)


# ------------------------------------------------------------------------------ optimal_denoiser
def test_optimal_denoiser_names_a_level_beyond_the_dtype_range():
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    x = X[:3] + 0.1
    for kw, name in ((dict(sigma=1e300), "sigma"), (dict(sigma=1.0, s=1e300), "s"),
                     (dict(sigma=10**400), "sigma")):
        with pytest.raises(ValueError, match=rf"^optimal_denoiser: {name} must be <= 3.40282e\+38 "
                                             r"\(the largest torch.float32 value, x_t's dtype\), "
                                             "got 1"):
            optimal_denoiser(x, X, **kw)
    with pytest.raises(ValueError, match=r"^optimal_denoiser: sigma must be <= 1.79769e\+308"):
        optimal_denoiser(x.double(), X.double(), 10**400)
    # in range: at a huge noise level every training point has the same weight
    y = optimal_denoiser(x.double(), X.double(), 1e300)
    torch.testing.assert_close(y, X.double().mean(0).expand(3, 4))
    y32 = optimal_denoiser(x, X, 3e38)
    torch.testing.assert_close(y32, X.mean(0).expand(3, 4))


def test_jacobian_iteration_counts_are_ints():
    """iters, oversample and probes go through as_int: True was taken as 1, 2.5 was a ValueError
    and numpy ints were refused."""
    x = _x()
    for name in ("iters", "oversample", "probes"):
        with pytest.raises(TypeError, match=f"^jacobian_spectrum: {name} must be an int, got True"):
            M.jacobian_spectrum(_half, x, 1.0, "lanczos", k=2, **{name: True})
        with pytest.raises(TypeError, match=f"^jacobian_spectrum: {name} must be an int, got 2.5"):
            M.jacobian_spectrum(_half, x, 1.0, "lanczos", k=2, **{name: 2.5})
        with pytest.raises(ValueError, match=f"^jacobian_spectrum: {name} must be >= 0, got -1"):
            M.jacobian_spectrum(_half, x, 1.0, "lanczos", k=2, **{name: -1})
    a = M.jacobian_spectrum(_half, x, 1.0, "lanczos", k=2, iters=np.int64(3), probes=np.int64(4))
    b = M.jacobian_spectrum(_half, x, 1.0, "lanczos", k=2, iters=3, probes=4)
    torch.testing.assert_close(a.svals, b.svals)  # (lanczos: equal up to summation order)
