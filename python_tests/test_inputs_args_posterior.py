"""Input handling of posterior_mean_coefficients and the shared argument helpers in _args.py:
the bias for extreme (tiny s or huge gamma) noise levels, complex and bool tensors, mixture weights
whose sum overflows, huge K, shapes that do not broadcast and pi that is not a real sequence."""
import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from molrg_ext import posterior_mean_coefficients as pmc
from molrg_ext._args import (check_mixture_weights, check_number_or_tensor, dims_list,
                             number_or_tensor, real_tensor)
from molrg_ext.data import sample_molrg
from molrg_ext.schedules import VP

DIMS, PI = [1, 3], [0.25, 0.75]


def exact_coefficients(s: float, g: float):
    """(c, phi, bias) from the closed form in 50-digit decimals, rounded to float64 at the end
    (decimals neither overflow nor underflow in this range)."""
    with localcontext() as ctx:
        ctx.prec = 50
        S, G = Decimal(s), Decimal(g)
        total = S * S + G * G
        c = S / total
        phi = S * S / (2 * G * G * total)
        log_ratio = (total / (G * G)).ln()
        bias = [Decimal(p).ln() - Decimal(d) / 2 * log_ratio for d, p in zip(DIMS, PI)]
        return float(c), float(phi), [float(b) for b in bias]


@pytest.mark.parametrize("s,g", [(1e-200, 0.3), (0.5, 1e160), (1e200, 1e201), (1e-201, 1e-200),
                                 (1e-170, 1e-160), (1e-100, 1e200), (1e200, 1e-200), (2.0, 1e-170),
                                 (1e-100, 1e-100), (1e100, 2e100), (3e120, 1e100), (1e-160, 1e-10)])
def test_extreme_levels_match_closed_form(s, g):
    """A tiny s or huge gamma gave bias = -inf for every component (log((s^2 + g^2) / g^2) was
    computed as 2 log(s / g) + log1p((g / s)^2) with (g / s)^2 = inf); phi was inf or 0 where
    only its denominator 2 g^2 (s^2 + g^2) over- or underflowed (s = g = 1e-100)."""
    c, phi, bias = pmc(s, g, DIMS, PI)
    c_ref, phi_ref, bias_ref = exact_coefficients(s, g)
    dt = torch.float64
    torch.testing.assert_close(c, torch.tensor(c_ref, dtype=dt), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(phi, torch.tensor(phi_ref, dtype=dt), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(bias, torch.tensor(bias_ref, dtype=dt), rtol=1e-12, atol=0)


def test_extreme_levels_float32():
    s = torch.tensor([1e-30, 0.5], dtype=torch.float32)
    c, phi, bias = pmc(s, 0.3, DIMS, PI)
    assert bias.dtype == torch.float32 and torch.isfinite(bias).all()
    for i, si in enumerate(s.tolist()):
        c_ref, phi_ref, bias_ref = exact_coefficients(si, 0.3)
        torch.testing.assert_close(c[i].item(), c_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(bias[i], torch.tensor(bias_ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("s,g", [
    (np.geomspace(1e-150, 1e-175, 101), 0.3),  # s^2 underflows from s ~ 1.6e-162 on
    (0.5, np.geomspace(1e150, 1e160, 101)),  # gamma^2 overflows from gamma ~ 1.3e154 on
    (np.geomspace(1e100, 1e200, 101) * 1e-200, np.geomspace(1e100, 1e200, 101)),  # s / g fixed
    (np.geomspace(1e100, 1e200, 101) * 0.5, np.geomspace(1e100, 1e200, 101)),
    (np.geomspace(1e-100, 1e-200, 101) * 0.5, np.geomspace(1e-100, 1e-200, 101)),
])
def test_continuous_across_the_branch_boundary(s, g):
    """Both sides of the switch to the overflow-safe formulas agree with the float64 closed form
    log((s^2 + gamma^2) / gamma^2) = log1p(q^2), q = s / gamma <= 1, for the bias, and with the
    decimal values for c and phi."""
    s_np, g_np = np.broadcast_arrays(np.asarray(s, dtype=np.float64), np.asarray(g, np.float64))
    with np.errstate(over="ignore", under="ignore"):
        regular = np.isfinite(s_np**2 + g_np**2) & (s_np**2 > 0) & (g_np**2 > 0)
    assert regular.any() and not regular.all()  # the sweep crosses the boundary
    c, phi, bias = pmc(torch.from_numpy(s_np.copy()), torch.from_numpy(g_np.copy()), DIMS, PI)
    for i, (si, gi) in enumerate(zip(s_np.tolist(), g_np.tolist())):
        q = si / gi
        log_ratio = math.log1p(q * q)
        expected = [math.log(p) - d / 2 * log_ratio for d, p in zip(DIMS, PI)]
        assert bias[i].tolist() == pytest.approx(expected, rel=1e-13, abs=0)
        c_ref, phi_ref, _ = exact_coefficients(si, gi)
        assert c[i].item() == pytest.approx(c_ref, rel=1e-13, abs=1e-300)
        assert phi[i].item() == pytest.approx(phi_ref, rel=1e-13, abs=1e-300)


@pytest.mark.parametrize("v", [torch.tensor([0.5 + 0.5j]), torch.tensor([True]),
                               torch.tensor(0.5, dtype=torch.complex128)])
def test_complex_and_bool_tensors_refused(v):
    """They were cast (dropping the imaginary part, with only a warning)."""
    kind = "complex" if v.is_complex() else "bool"
    with pytest.raises(TypeError, match=f"^f: t must be a real \\(not bool\\) tensor, got dtype "
                                        f"torch.{kind}"):
        check_number_or_tensor(v, "t", "f")
    with pytest.raises(TypeError, match=f": t must be a real .*{kind}"):
        VP().s(v)
    with pytest.raises(TypeError, match=f"^posterior_mean_coefficients: s must be a real .*{kind}"):
        pmc(v, 0.5)
    with pytest.raises(TypeError, match=f"^posterior_mean_coefficients: gamma must be a real "
                                        f".*{kind}"):
        pmc(0.5, v)
    # real tensors and numbers as before
    assert number_or_tensor(torch.tensor([1, 2]), "t", "f").dtype == torch.get_default_dtype()
    assert number_or_tensor(2, "t", "f").dtype == torch.float64
    torch.testing.assert_close(pmc(torch.tensor([1, 2]), 1.0)[0],
                               torch.tensor([0.5, 0.4], dtype=torch.float64))


def test_python_bool_s_refused():
    """check_number_or_tensor and as_int refuse bools; posterior_mean_coefficients took True."""
    with pytest.raises(TypeError, match="^posterior_mean_coefficients: s must be a number or a "
                                        "tensor, got bool"):
        pmc(True, 0.5)
    with pytest.raises(TypeError, match="^posterior_mean_coefficients: gamma must be a number"):
        pmc(0.5, "0.5")


def test_mixture_weights_sum_must_be_finite():
    """[1e308, 1e308] passed the check; normalising by the infinite sum gave bias = -inf and an
    invalid multinomial distribution."""
    p = torch.tensor([1e308, 1e308], dtype=torch.float64)
    with pytest.raises(ValueError, match="^f: pi must be K = 2 finite weights >= 0, not all zero, "
                                         "with a finite sum, got \\[1e\\+308, 1e\\+308\\]"):
        check_mixture_weights(p, 2, "f")
    with pytest.raises(ValueError, match="^f: pi must be finite and >= 0, not all zero, with a "
                                         "finite sum"):
        check_mixture_weights(p, None, "f")
    with pytest.raises(ValueError, match="^posterior_mean_coefficients: pi must be .*finite sum"):
        pmc(0.5, 0.5, dims=[1, 2], pi=[1e308, 1e308])
    with pytest.raises(ValueError, match="sample_molrg: pi must be .*finite sum"):
        sample_molrg(8, [2, 3], N=10, pi=[1e308, 1e308])
    # large weights with a finite sum stay valid
    _, _, bias = pmc(0.5, 0.5, dims=[1, 1], pi=[1e307, 1e307])
    torch.testing.assert_close(bias, pmc(0.5, 0.5, dims=[1, 1], pi=[1.0, 1.0])[2])


@pytest.mark.parametrize("K", [2**40, 2**70])
def test_dims_list_huge_K(K):
    """One int for dims built [d] * K before anything checked K (MemoryError, OverflowError)."""
    with pytest.raises(ValueError, match=f"^f: K must be <= 2\\*\\*31 - 1 .*, got {K}$"):
        dims_list(2, K, "f")
    assert dims_list(2, 3, "f") == [2, 2, 2]


def test_s_gamma_shapes_must_broadcast():
    with pytest.raises(ValueError, match="^posterior_mean_coefficients: s and gamma must "
                                         "broadcast together, got shapes \\(3,\\) and \\(2,\\)"):
        pmc(torch.ones(3), torch.ones(2))


@pytest.mark.parametrize("pi,err,match", [
    ("x", TypeError, "pi must hold real numbers, got 'x'"),
    ([1 + 1j, 1], TypeError, "pi must hold real numbers, got \\[\\(1\\+1j\\), 1\\]"),
    (torch.tensor([1 + 1j, 1]), TypeError, "pi must hold real numbers"),
    (np.array([1 + 1j, 1]), TypeError, "pi must hold real numbers"),
    (torch.tensor([True, True]), TypeError, "pi must hold real numbers"),
    (np.array([True, False]), TypeError, "pi must hold real numbers"),
    ([None, 1.0], TypeError, "pi must hold real numbers"),
    ([[1.0, 2.0], [3.0]], ValueError, "pi must be a rectangular sequence of real numbers"),
    ([10**400, 1], ValueError, "pi must be a rectangular sequence of real numbers within range"),
])
def test_pi_not_real_named(pi, err, match):
    """pi='x' said "new(): invalid data type 'str'"; complex tensors were cast silently."""
    with pytest.raises(err, match="^posterior_mean_coefficients: " + match):
        pmc(0.5, 0.5, dims=[1, 2], pi=pi)
    with pytest.raises(err, match="^f: " + match):
        real_tensor(pi, "pi", "f", torch.float64)


def test_real_tensor_is_as_tensor_for_real_input():
    for v in ([0.1, 0.7], (1, 2), np.array([0.1, 0.7]), torch.tensor([0.1, 0.7]), 0.3):
        for dtype in (None, torch.float32, torch.float64):
            a, b = real_tensor(v, "pi", "f", dtype), torch.as_tensor(v, dtype=dtype)
            assert a.dtype == b.dtype and torch.equal(a, b)
    _, _, b1 = pmc(0.5, 0.3, dims=[1, 2], pi=[0.1, 0.7])
    _, _, b2 = pmc(0.5, 0.3, dims=[1, 2], pi=np.array([0.1, 0.7]))
    assert torch.equal(b1, b2)
