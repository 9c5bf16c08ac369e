import math

import pytest
import torch

from molrg_ext.schedules import EDM, VE, VP, Schedule, get_schedule


@pytest.mark.parametrize("sched", [VP(), VE(), EDM(), VP(0.5, 5.0), VE(0.01, 10.0)])
def test_gamma_is_s_sigma_and_sigma_to_t_inverts(sched):
    t = sched.time_grid(64)
    top = sched.sigma_max if isinstance(sched, EDM) else 1.0  # EDM: t is sigma
    assert t.shape == (64,) and t[0] > 0 and math.isclose(t[-1].item(), top, rel_tol=1e-12)
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


def test_edm_training_levels_cover_its_sigma_range():
    """EDM's time is sigma, and the levels t = i / L of the other schedules put every EDM
    training level in (0, 1] whatever sigma_min and sigma_max said (make_levels, SubspaceTrainer
    with schedule='edm', NetworkTrainer(noise=EDM())). They are now log-uniform over the range."""
    from molrg_ext import make_levels
    from molrg_ext.models import make_mlp_denoiser
    from molrg_ext.train import NetworkTrainer

    for smin, smax in ((0.002, 80.0), (0.5, 2.0)):
        sched = EDM(smin, smax)
        t = sched.time_grid(8)
        expect = smin * (smax / smin) ** (torch.arange(1, 9, dtype=torch.float64) / 8)
        torch.testing.assert_close(t, expect, rtol=1e-12, atol=0)
        torch.testing.assert_close(make_levels(sched, 8).gamma, expect, rtol=1e-12, atol=0)
    tr = NetworkTrainer(make_mlp_denoiser(4, 8, 1), torch.randn(16, 4), noise=EDM(),
                        weighting="none", seed=0)
    sig = tr.sample_sigma(20000).double()
    assert sig.min() >= 0.002 and sig.max() <= 80.0 and sig.max() > 60.0
    u = (sig.log() - math.log(0.002)) / (math.log(80.0) - math.log(0.002))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs((u < 0.25).double().mean().item() - 0.25) < 0.01
    # a schedule object with sigma(t) only still draws t ~ U[t_min, 1]
    class Lin:
        def sigma(self, t):
            return 2.0 * t
    sig = NetworkTrainer(make_mlp_denoiser(4, 8, 1), torch.randn(16, 4), noise=Lin(),
                         weighting="none", seed=0).sample_sigma(1000)
    assert sig.min() >= 2e-3 and sig.max() <= 2.0


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


@pytest.mark.parametrize("call, where, name", [
    (lambda: VP().sigma(-0.5), "VP.sigma", "t"),
    (lambda: VP().s(1.5), "VP.s", "t"),
    (lambda: VP().gamma(float("nan")), "VP.gamma", "t"),
    (lambda: VP().weight(-1.0), "VP.weight", "t"),
    (lambda: VE().sigma(3.0), "VE.sigma", "t"),
    (lambda: VE().s(-0.1), "VE.s", "t"),
    (lambda: VE().sigma_to_t(-1.0), "VE.sigma_to_t", "sigma"),
    (lambda: VE().sigma_to_t(0.0), "VE.sigma_to_t", "sigma"),
    (lambda: VE().sigma_to_t(100.0), "VE.sigma_to_t", "sigma"),  # t would be > 1
    (lambda: VE().sigma_to_t(1e-3), "VE.sigma_to_t", "sigma"),  # t would be < 0
    (lambda: VP().sigma_to_t(-1.0), "VP.sigma_to_t", "sigma"),
    (lambda: VP().sigma_to_t(1e3), "VP.sigma_to_t", "sigma"),
    (lambda: VP().sigma_to_t(float("nan")), "VP.sigma_to_t", "sigma"),
    (lambda: EDM().sigma(-1.0), "EDM.sigma", "t"),
    (lambda: EDM().sigma(float("inf")), "EDM.sigma", "t"),
    (lambda: EDM().sigma_to_t(-2.0), "EDM.sigma_to_t", "sigma"),
    (lambda: EDM().precond(-1.0), "EDM.precond", "sigma"),
    (lambda: EDM().precond(0.0), "EDM.precond", "sigma"),
    (lambda: EDM().precond(float("nan")), "EDM.precond", "sigma"),
    (lambda: EDM(weighting="edm").weight(0.0), "EDM.weight", "t"),
])
def test_schedules_reject_values_outside_their_domain(call, where, name):
    with pytest.raises(ValueError, match=rf"{where}: {name} must be in"):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schedule_domain_checked_on_tensors(dtype):
    t = torch.tensor([0.2, 0.5, 1.0], dtype=dtype)
    for sched in (VP(), VE()):
        for bad in (-0.5, 1.01, float("nan")):
            tb = t.clone()
            tb[1] = bad
            for fn in (sched.s, sched.sigma, sched.gamma, sched.weight):
                with pytest.raises(ValueError, match="t must be in"):
                    fn(tb)
        # the sigma range the schedule reaches is accepted (round-off at sigma(1) included)
        sig = sched.sigma(t)
        assert sig.dtype == dtype
        torch.testing.assert_close(sched.sigma_to_t(sig), t)
        with pytest.raises(ValueError, match="sigma must be in"):
            sched.sigma_to_t(torch.cat([sig, sig[-1:] * 1.01]))
    with pytest.raises(ValueError, match="EDM.precond: sigma"):
        EDM().precond(torch.tensor([0.5, -0.1], dtype=dtype))
    # valid edge values keep working: t = 0 (clean data) and EDM levels above 1
    assert float(VP().sigma(0.0)) == 0.0 and float(VP().s(0.0)) == 1.0
    assert float(VP().sigma_to_t(0.0)) == 0.0
    assert math.isclose(float(VE().sigma(0.0)), 0.002, rel_tol=1e-12)
    torch.testing.assert_close(EDM().sigma(torch.tensor([0.0, 80.0], dtype=dtype)),
                               torch.tensor([0.0, 80.0], dtype=dtype))
    assert torch.isfinite(torch.stack(EDM().precond(torch.tensor([0.002, 80.0])))).all()


def test_schedule_checks_do_not_break_torch_compile():
    sched = EDM()

    def f(sig):
        c_skip, c_out, c_in, c_noise = sched.precond(sig)
        return c_skip + c_out * c_in + c_noise + VP().sigma(sig / 80) + VE().s(sig / 80)

    sig = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(comp(sig), f(sig))
