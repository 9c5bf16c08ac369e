import math

import pytest
import torch

from molrg_ext.schedules import EDM, VE, VP, Schedule, get_schedule


@pytest.mark.parametrize("sched", [VP(), VE(), EDM(), VP(0.5, 5.0), VE(0.01, 10.0)])
def test_gamma_is_s_sigma_and_sigma_to_t_inverts(sched):
    t = sched.time_grid(64)
    assert t.shape == (64,) and t[0] > 0 and t[-1] == 1.0
    assert torch.allclose(sched.gamma(t), sched.s(t) * sched.sigma(t))
    assert torch.allclose(sched.sigma_to_t(sched.sigma(t)), t, rtol=1e-9, atol=1e-12)
    assert (torch.diff(sched.sigma(t)) > 0).all()  # noise grows with t
    assert torch.equal(sched.weight(t), torch.ones_like(t))


def test_vp_matches_alpha_bar_formula_and_preserves_variance():
    sched = VP(0.1, 20.0)
    t = torch.tensor([0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    ab = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
    assert torch.allclose(sched.s(t), ab.sqrt())
    assert torch.allclose(sched.sigma(t), torch.sqrt(1 - ab) / ab.sqrt())
    # variance preserving: s^2 + gamma^2 = 1
    assert torch.allclose(sched.s(t) ** 2 + sched.gamma(t) ** 2, torch.ones_like(t))


def test_ve_endpoints_and_dtype_kept():
    sched = VE(0.002, 80.0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float32)
    sig = sched.sigma(t)
    assert sig.dtype == torch.float32
    assert torch.allclose(sig, torch.tensor([0.002, 80.0]), rtol=1e-5)
    assert torch.equal(sched.s(t), torch.ones(2))


def test_edm_sigma_steps_match_karras_formula():
    sched = EDM()
    st = sched.sigma_steps(18)
    assert st.shape == (19,) and st[-1] == 0
    assert math.isclose(st[0].item(), 80.0, rel_tol=1e-12)
    assert math.isclose(st[17].item(), 0.002, rel_tol=1e-9)
    i = 5
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(st[i].item(), expect, rel_tol=1e-12)
    assert (torch.diff(st) < 0).all()
    assert torch.equal(sched.sigma(torch.tensor(0.3)), torch.tensor(0.3))


def test_edm_precond_closed_forms():
    sched = EDM(sigma_data=0.5)
    sig = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = sched.precond(sig)
    sd = 0.5
    assert torch.allclose(c_skip, sd**2 / (sig**2 + sd**2))
    assert torch.allclose(c_in, 1 / torch.sqrt(sig**2 + sd**2))
    assert torch.allclose(c_noise, torch.log(sig) / 4)
    # c_out^2 = sd^2 sigma^2 / (sigma^2 + sd^2) = (1 - c_skip) sd^2, and EDM's loss weight is
    # 1 / c_out^2 (unit effective weight on F's target)
    assert torch.allclose(c_out**2, (1 - c_skip) * sd**2)
    w = EDM(weighting="edm").weight(sig)
    assert torch.allclose(w * c_out**2, torch.ones_like(sig))


def test_get_schedule_and_errors():
    assert isinstance(get_schedule("VP"), VP)
    assert get_schedule("edm", rho=5.0).rho == 5.0
    s = VE()
    assert get_schedule(s) is s
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="sigma_min"):
        VE(sigma_min=-1.0)
    with pytest.raises(ValueError, match="weighting"):
        EDM(weighting="snr")
    with pytest.raises(ValueError, match="L must"):
        VP().time_grid(0)
    with pytest.raises(ValueError, match="N must"):
        EDM().sigma_steps(1)
    with pytest.raises(TypeError, match="t must"):
        VP().s("a")
    with pytest.raises(NotImplementedError):
        Schedule().s(0.5)
