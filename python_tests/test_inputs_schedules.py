"""Argument checks and floating-point range of molrg_ext.schedules (fuzz findings 7, 14, 15, 17)."""
import math

import numpy as np
import pytest
import torch

from molrg_ext.schedules import EDM, VE, VP, _karras_log


def _karras(smin, smax, rho, N):
    """The Karras et al. grid as sigma_steps has always computed it."""
    i = torch.arange(N, dtype=torch.float64)
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return (a + i / (N - 1) * (b - a)) ** rho


def _karras_exact(smin, smax, rho, N):
    """The same grid in 400-digit arithmetic: smax ((1 - f) + f r)^rho, r = (smin/smax)^(1/rho)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(400):
        R = mpmath.mpf(rho)
        r = mpmath.exp((mpmath.log(smin) - mpmath.log(smax)) / R)
        return torch.tensor([float(smax * ((1 - f) + f * r) ** R)
                             for f in (mpmath.mpf(i) / (N - 1) for i in range(N))],
                            dtype=torch.float64)


def test_grid_sizes_are_parsed_by_as_int_with_the_training_steps_bound():
    with pytest.raises(ValueError, match=r"VP.time_grid: L must be in \[1, 4294967296\), "
                                         r"got 1180591620717411303424"):
        VP().time_grid(2**70)
    with pytest.raises(ValueError, match=r"EDM.sigma_steps: N must be in \[2, 4294967296\), "
                                         r"got 1180591620717411303424"):
        EDM().sigma_steps(2**70)
    with pytest.raises(ValueError, match=r"VE.time_grid: L must be in \[1, 4294967296\)"):
        VE().levels(2**32)
    # numpy and 0-d tensor ints are taken as sigma_steps always took them
    torch.testing.assert_close(VP().time_grid(np.int64(4)), VP().time_grid(4), rtol=0, atol=0)
    torch.testing.assert_close(VE().time_grid(torch.tensor(4)), VE().time_grid(4), rtol=0, atol=0)
    # bools and floats are not truncated to ints
    for bad in (True, 4.0):
        with pytest.raises(TypeError, match=rf"VP.time_grid: L must be an int, got {bad}"):
            VP().time_grid(bad)
    with pytest.raises(TypeError, match="EDM.sigma_steps: N must be an int, got True"):
        EDM().sigma_steps(True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.complex64, torch.bool,
                                   "float32", np.float32])
def test_grid_dtype_must_be_float32_or_float64(dtype):
    msg = "dtype must be torch.float32 or torch.float64, got"
    with pytest.raises(TypeError, match=f"VP.time_grid: {msg}"):
        VP().time_grid(8, dtype=dtype)
    with pytest.raises(TypeError, match=f"EDM.levels|EDM.time_grid: {msg}"):
        EDM().levels(8, dtype=dtype)
    with pytest.raises(TypeError, match=f"EDM.sigma_steps: {msg}"):
        EDM().sigma_steps(8, dtype=dtype)


PARAMS = [(VP, "beta_min"), (VP, "beta_max"), (VE, "sigma_min"), (VE, "sigma_max"),
          (EDM, "sigma_min"), (EDM, "sigma_max"), (EDM, "rho"), (EDM, "sigma_data")]


@pytest.mark.parametrize("cls, name", PARAMS)
def test_schedule_parameters_are_checked_by_name(cls, name):
    where = cls.__name__
    for bad in ("x", "0.5", None, True, [1.0, 2.0], complex(1, 1), np.bool_(True),
                torch.tensor([True]), torch.tensor(0.5 + 0j)):
        with pytest.raises(TypeError, match=rf"{where}: {name} must be a real number"):
            cls(**{name: bad})
    for bad in (torch.tensor([0.5, 1.0]), torch.zeros(0)):
        with pytest.raises(ValueError,
                           match=rf"{where}: {name} must be one number, got a tensor of shape"):
            cls(**{name: bad})
    with pytest.raises(ValueError,
                       match=rf"{where}: {name} must be within float64's range, got 1000"):
        cls(**{name: 10**400})
    # the numbers accepted before are accepted as before (0.75 and 1 fit every parameter's bounds)
    for ok in (0.75, np.float32(0.75), torch.tensor(0.75),
               torch.tensor([0.75], dtype=torch.float64)):
        assert getattr(cls(**{name: ok}), name) == 0.75
    for ok in (1, np.int64(1), torch.tensor(1)):
        assert getattr(cls(**{name: ok}), name) == 1.0


@pytest.mark.parametrize("call, where, name", [
    (lambda v: VP().s(v), "VP.s", "t"),
    (lambda v: VE().sigma(v), "VE.sigma", "t"),
    (lambda v: EDM().gamma(v), "EDM.gamma", "t"),
    (lambda v: VP().sigma_to_t(v), "VP.sigma_to_t", "sigma"),
    (lambda v: EDM().precond(v), "EDM.precond", "sigma"),
])
def test_complex_and_bool_levels_are_refused_by_name(call, where, name):
    for bad in (torch.tensor([0.5 + 0.5j]), torch.tensor([0.5 + 0j], dtype=torch.complex128),
                torch.tensor([True, False])):
        with pytest.raises(TypeError, match=rf"{where}: {name} must be a real"):
            call(bad)


def test_edm_steps_log_form_agrees_with_karras_on_the_usual_range():
    for smin, smax in ((0.002, 80.0), (0.01, 1.0), (1e-3, 100.0)):
        for rho in (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 100.0):
            for N in (2, 5, 18, 64):
                old = _karras(smin, smax, rho, N)
                # (at rho = 1 Karras' own rounding, ~rho / r ulps, is 2e-12 for 0.002..80)
                torch.testing.assert_close(_karras_log(smin, smax, rho, N), old,
                                           rtol=1e-12 if rho > 1 else 1e-11, atol=0)
                # and sigma_steps there is the Karras formula, bit for bit
                st = EDM(smin, smax, rho).sigma_steps(N)
                assert torch.equal(st[:-1], old) and st[-1] == 0


@pytest.mark.parametrize("rho", [1e-3, 0.005, 0.01, 0.3, 0.5, 1e9, 1e100, 1e300])
def test_edm_steps_stay_accurate_for_extreme_rho(rho):
    st = EDM(rho=rho).sigma_steps(18)  # small rho: OverflowError, 0.01: last level 0 (was 0.002)
    assert torch.isfinite(st).all() and (torch.diff(st) < 0).all() and st[-1] == 0
    torch.testing.assert_close(st[:-1], _karras_exact(0.002, 80.0, rho, 18), rtol=1e-12, atol=0)
    assert math.isclose(st[0].item(), 80.0, rel_tol=1e-13)
    assert math.isclose(st[17].item(), 0.002, rel_tol=1e-12)
    st32 = EDM(rho=rho).sigma_steps(18, dtype=torch.float32)
    assert st32.dtype == torch.float32
    torch.testing.assert_close(st32, st.float(), rtol=1e-6, atol=0)
    # the edm_sigma_grid case of the report, and a range over 600 decades
    torch.testing.assert_close(EDM(1e-300, 1e300, rho).sigma_steps(5)[:-1],
                               _karras_exact(1e-300, 1e300, rho, 5), rtol=1e-12, atol=0)


def test_vp_large_beta_is_computed_where_the_result_is_representable():
    sched = VP(beta_max=2000.0)  # alpha_bar(1) = e^-1000.05, sigma(1) = e^500.025
    b, a = 0.1, 999.95
    t_half = (-b + math.sqrt(b * b + 4 * a * math.log(2.0))) / (2 * a)  # sigma = 1: alpha_bar = 1/2
    assert math.isclose(float(sched.sigma_to_t(1.0)), t_half, rel_tol=1e-12)
    assert math.isclose(float(sched.sigma(1.0)), math.exp(500.025), rel_tol=1e-12)
    assert float(sched.gamma(1.0)) == 1.0  # was inf (0 * inf in s * sigma)
    t = torch.tensor([0.3, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.sigma(t)), t, rtol=1e-12, atol=0)
    # sigma^2 beyond float64 (sigma = 1e200 <= sigma(1)): log(1 + sigma^2) = 2 log sigma
    c = 2 * math.log(1e200)
    expect = (-b + math.sqrt(b * b + 4 * a * c)) / (2 * a)
    assert math.isclose(float(sched.sigma_to_t(1e200)), expect, rel_tol=1e-12)
    # float32: sigma(1) = e^50 is representable although expm1(100) is not
    s32 = VP(beta_max=200.0)
    one = torch.tensor([1.0])
    assert math.isclose(float(s32.sigma(one)), math.exp(50.025), rel_tol=1e-5)  # x = 100.05 rounded
    assert float(s32.gamma(one)) == 1.0
    # betas near float max: b^2 and 4ac overflow, the root does not
    for bmin, bmax in ((1e200, 1e300), (0.1, 1.7e308)):
        sch = VP(bmin, bmax)
        tt = float(sch.sigma_to_t(1.0))
        ah = 0.5 * (bmax - bmin)
        assert 0 < tt < 1 and math.isclose(bmin * tt + ah * tt * tt, math.log(2.0), rel_tol=1e-12)
