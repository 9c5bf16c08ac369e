"""The fused subspace-denoiser ops against the pure-PyTorch reference, autograd, opcheck, compile."""

import pytest
import torch

import molrg_ext
from molrg_ext import reference

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make_inputs(P=None, B=7, n=10, dims=(4, 2, 3), dtype=torch.float64, seed=0, bias_form="K",
                requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    K, dm = len(dims), max(dims)
    lead = () if P is None else (P,)
    x = torch.randn(*lead, B, n, generator=g, dtype=dtype)
    U = molrg_ext.random_orthonormal(n, dm, *lead, K, generator=g, dtype=dtype)
    c = torch.rand(*lead, B, generator=g, dtype=dtype) + 0.5
    phi = torch.rand(*lead, B, generator=g, dtype=dtype) * 2
    bias = {
        None: None,
        "K": torch.randn(K, generator=g, dtype=dtype),
        "BK": torch.randn(B, K, generator=g, dtype=dtype),
        "PBK": torch.randn(*lead, B, K, generator=g, dtype=dtype),
    }[bias_form]
    tensors = [x, U, c, phi] + ([bias] if bias is not None else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, U, c, phi, bias, list(dims)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("P", [None, 3])
@pytest.mark.parametrize("bias_form", [None, "K", "BK", "PBK"])
def test_forward_backward_match_reference(dtype, mode, P, bias_form):
    x, U, c, phi, bias, dims = make_inputs(P=P, dtype=dtype, bias_form=bias_form,
                                           requires_grad=True)
    y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode)
    y_ref = reference.subspace_dae(x, U, c, phi, bias, dims, mode)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    inputs = [t for t in (x, U, c, phi, bias) if t is not None]
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, inputs, g)
    ref = torch.autograd.grad(y_ref, inputs, g, allow_unused=True)
    for name, a, b in zip(["x", "U", "c", "phi", "bias"], ours, ref):
        b = torch.zeros_like(a) if b is None else b  # reference leaves phi/bias unused in hard mode
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("wanted", [("U",), ("x",), ("c", "bias"), ("phi",), ("x", "U", "c"),
                                    ("bias",)])
@pytest.mark.parametrize("mode, with_assign", [("soft", False), ("hard", False), ("hard", True)])
def test_gradients_of_any_subset_of_inputs(wanted, mode, with_assign, dispatched_ops):
    # The autograd kernel asks the backward op for dx and dU only when they are needed, and maps
    # which inputs want a gradient by position (bias, when given, is the fifth tensor; a given
    # assign comes after it). Each subset gets the reference's gradients, and dx and dU are
    # computed exactly when x and U require grad.
    x, U, c, phi, bias, dims = make_inputs(P=2, bias_form="PBK")
    if "bias" not in wanted:
        bias = None
    named = {"x": x, "U": U, "c": c, "phi": phi, "bias": bias}
    for name in wanted:
        named[name].requires_grad_()
    assign = molrg_ext.hard_assign(x, U, dims) if with_assign else None
    y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode, assign)
    y_ref = reference.subspace_dae(x, U, c, phi, bias, dims, mode, assign)
    g = torch.randn_like(y)
    inputs = [named[n] for n in wanted]
    ours = []
    calls = dispatched_ops(lambda: ours.extend(torch.autograd.grad(y, inputs, g)))
    flags = [tuple(args[9:11]) for name, args in calls
             if name == "molrg.subspace_dae_backward.default"]  # need_dx, need_dU
    assert flags == [("x" in wanted, "U" in wanted)]
    # the reference's hard y does not depend on phi and bias at all; ours has zero gradients
    ref = (torch.autograd.grad(y_ref, inputs, g, allow_unused=True) if y_ref.requires_grad
           else [None] * len(inputs))
    for name, a, b in zip(wanted, ours, ref):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_panels_of_several_chunks_match_reference(mode):
    # n = 150 and K d = 4 * 50: the packed panels span several column chunks with AVX2 and with
    # AVX-512 (U is 120 KB in float64, so this runs the batched-GEMM path; float32 at n = 150,
    # d = 25 stays on the blocked kernels: 60 KB)
    for dtype, dims in ((torch.float64, (20, 17, 50, 9)), (torch.float32, (25, 11, 25, 19))):
        x, U, c, phi, bias, dims = make_inputs(P=2, B=90, n=150, dims=dims, dtype=dtype,
                                               requires_grad=True)
        y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode)
        y_ref = reference.subspace_dae(x, U, c, phi, bias, dims, mode)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        g = torch.randn_like(y)
        ours = torch.autograd.grad(y, (x, U), g)
        ref = torch.autograd.grad(y_ref, (x, U), g)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"],
                                       atol=TOL[dtype]["atol"] * b.abs().max().item())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_more_than_four_components_match_reference(mode):
    # K <= 4 runs the per-sample soft-max math one sample per vector lane (templated on K); K = 6
    # takes the generic code, sample by sample
    x, U, c, phi, bias, dims = make_inputs(P=2, B=150, n=20, dims=(3, 5, 2, 4, 6, 1),
                                           bias_form="PBK", requires_grad=True)
    y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode)
    y_ref = reference.subspace_dae(x, U, c, phi, bias, dims, mode)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    inputs = (x, U, c, phi, bias)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, inputs, g)
    ref = torch.autograd.grad(y_ref, inputs, g, allow_unused=True)
    for name, a, b in zip(["x", "U", "c", "phi", "bias"], ours, ref):
        b = torch.zeros_like(a) if b is None else b  # reference leaves phi/bias unused in hard mode
        torch.testing.assert_close(a, b, **TOL[torch.float64],
                                   msg=lambda m: f"grad {name}: {m}")


def test_heterogeneous_dims_ignore_padded_columns():
    x, U, c, phi, bias, dims = make_inputs(dims=(1, 4, 2))
    U_noisy = U.clone()
    for k, d in enumerate(dims):
        U_noisy[k, :, d:] = 123.0  # garbage in the padding must not matter
    for mode in ("soft", "hard"):
        y = molrg_ext.subspace_dae(x, U_noisy, c, phi, bias, dims, mode)
        torch.testing.assert_close(y, reference.subspace_dae(x, U, c, phi, bias, dims, mode))
    Ur = U_noisy.clone().requires_grad_(True)
    molrg_ext.subspace_dae(x, Ur, c, phi, bias, dims).sum().backward()
    for k, d in enumerate(dims):
        assert torch.all(Ur.grad[k, :, d:] == 0)


def test_scalar_coefficients_and_shared_U():
    x, U, c, phi, bias, dims = make_inputs(P=2)
    y = molrg_ext.subspace_dae(x, U[0], 0.7, 1.5, None, dims)
    y_ref = reference.subspace_dae(x, U[0].expand(2, *U.shape[1:]), 0.7, 1.5, None, dims)
    torch.testing.assert_close(y, y_ref)


def test_hard_assign_and_given_assignment():
    x, U, c, phi, _, dims = make_inputs(P=2, B=50)
    k0 = molrg_ext.hard_assign(x, U, dims)
    assert k0.dtype == torch.int64 and k0.shape == (2, 50)
    assert torch.equal(k0, reference.hard_assign(x, U, dims))
    # Given assignment: the output uses exactly that component (eq. (16) with weights from x0).
    forced = torch.zeros_like(k0)
    y = molrg_ext.subspace_dae(x, U, c, phi, None, dims, "hard", assign=forced)
    U0 = U[:, 0, :, : dims[0]]
    expected = c[..., None] * torch.einsum("pni,pbi->pbn", U0, torch.einsum("pni,pbn->pbi", U0, x))
    torch.testing.assert_close(y, expected)


def test_hard_assign_ties_go_to_lowest_index():
    n = 4
    U = torch.zeros(3, n, 1, dtype=torch.float64)
    U[0, 0, 0] = U[1, 1, 0] = U[2, 2, 0] = 1.0
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]],
                     dtype=torch.float64)
    assert molrg_ext.hard_assign(x, U).tolist() == [0, 1, 0]


def test_soft_max_is_stable_for_huge_phi():
    x, U, c, phi, _, dims = make_inputs(dtype=torch.float32)
    phi = torch.full_like(phi, 1e12)
    xg, Ug = x.clone().requires_grad_(), U.clone().requires_grad_()
    y = molrg_ext.subspace_dae(xg, Ug, c, phi, None, dims, "soft")
    assert torch.isfinite(y).all()
    # With phi -> infinity the soft weights become the hard assignment (the float64 reference's
    # hard mode on the same inputs; its soft mode would overflow the logits in float32).
    y_hard = reference.subspace_dae(x.double(), U.double(), c.double(), phi.double(), None, dims,
                                    "hard")
    torch.testing.assert_close(y.double(), y_hard, rtol=1e-5, atol=1e-5)
    # the backward stays finite too, and the weights' gradient (phi times ||P_k||^2 ~ 1e12) is
    # not spread into x or U: they get the hard mode's gradients
    gy = torch.randn_like(y)
    dx, dU = torch.autograd.grad(y, (xg, Ug), gy)
    x64, U64 = x.double().requires_grad_(), U.double().requires_grad_()
    yh = reference.subspace_dae(x64, U64, c.double(), phi.double(), None, dims, "hard")
    dx_ref, dU_ref = torch.autograd.grad(yh, (x64, U64), gy.double())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dU.double(), dU_ref, rtol=1e-4, atol=1e-4)


def test_neg_inf_bias_switches_a_component_off():
    x, U, c, phi, _, dims = make_inputs(requires_grad=True)
    bias = torch.tensor([0.0, float("-inf"), 0.0], dtype=torch.float64)
    y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims)
    # the reference with that component removed, on copies of the same inputs
    x2, U2, c2, phi2 = (t.detach().clone().requires_grad_() for t in (x, U, c, phi))
    y_ref = reference.subspace_dae(x2, U2[[0, 2]], c2, phi2, None, [dims[0], dims[2]])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, U, c, phi), gy)
    want = torch.autograd.grad(y_ref, (x2, U2, c2, phi2), gy)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (got[1][1] == 0).all()  # the switched-off basis gets no gradient


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradcheck_float64(mode):
    x, U, c, phi, bias, dims = make_inputs(P=2, B=3, n=6, dims=(3, 1), requires_grad=True,
                                           bias_form="PBK")

    def f(x, U, c, phi, bias):
        return molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode)

    assert torch.autograd.gradcheck(f, (x, U, c, phi, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_backward_runs_one_op_and_no_zero_fills(mode, backward_is_one_op):
    # proj and w are non-differentiable outputs: the backward gets None for them, not zero
    # tensors of their shapes that autograd would otherwise allocate and fill on every call
    # (at (48, 2, 6, 65536) those fills took 5-7% of a forward + backward)
    x, U, c, phi, bias, dims = make_inputs(P=2, dtype=torch.float32, bias_form=None)
    U.requires_grad_()
    y = molrg_ext.subspace_dae(x, U, c, phi, None, dims, mode)
    backward_is_one_op(y, torch.randn_like(y), "molrg.subspace_dae_backward.default")
    assert U.grad is not None and U.grad.abs().sum() > 0


def test_wrapper_adds_no_graph_nodes_and_takes_numbers_for_c_and_phi():
    """U with x's instance count reaches the op itself (no expand view, whose backward node cost
    ~13 us a call at small B), so U's gradient goes straight to its AccumulateGrad; numbers for c
    and phi (made [P, B] in one op) give exactly what tensors of those values give."""
    x, U, c, phi, _, dims = make_inputs(P=2, dtype=torch.float32, bias_form=None)
    U.requires_grad_()
    y = molrg_ext.subspace_dae(x, U, 0.75, 3.0, None, dims)
    feeds = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert feeds == ["AccumulateGrad"], feeds
    y2 = molrg_ext.subspace_dae(x, U, torch.full_like(c, 0.75), torch.full_like(phi, 3.0), None,
                                dims)
    assert torch.equal(y, y2)
    # a shared [K, n, dmax] U is still expanded over the instances, and its gradient summed
    U3 = U[0].detach().clone().requires_grad_()
    molrg_ext.subspace_dae(x, U3, 0.75, 3.0, None, dims).sum().backward()
    Ue = U[0].detach().expand(2, *U3.shape).clone().requires_grad_()
    molrg_ext.subspace_dae(x, Ue, 0.75, 3.0, None, dims).sum().backward()
    torch.testing.assert_close(U3.grad, Ue.grad.sum(0))


def test_outputs_require_grad_exactly_when_a_graph_is_recorded():
    x, U, c, phi, _, dims = make_inputs(P=2, dtype=torch.float32, bias_form=None)
    assert not molrg_ext.subspace_dae(x, U, c, phi, None, dims).requires_grad
    U.requires_grad_()
    with torch.no_grad():
        assert not molrg_ext.subspace_dae(x, U, c, phi, None, dims).requires_grad
    y = molrg_ext.subspace_dae(x, U, c, phi, None, dims)
    assert y.requires_grad and y.grad_fn is not None
    y_raw, proj, w = torch.ops.molrg.subspace_dae(x, U, c, phi, None, None, dims, 0)
    assert y_raw.requires_grad and not proj.requires_grad and not w.requires_grad
    # the same values with and without the graph
    torch.testing.assert_close(y.detach(), molrg_ext.subspace_dae(x, U.detach(), c, phi, None,
                                                                  dims), rtol=0, atol=0)


def test_opcheck():
    x, U, c, phi, bias, dims = make_inputs(P=2, B=5, n=6, dims=(3, 2), bias_form="PBK",
                                           requires_grad=True)
    for mode, b, assign in [(0, bias, None), (1, None, None),
                            (1, None, torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]]))]:
        torch.library.opcheck(torch.ops.molrg.subspace_dae, (x, U, c, phi, b, assign, dims, mode))
    with torch.no_grad():
        y, proj, w = torch.ops.molrg.subspace_dae(x, U, c, phi, bias, None, dims, 0)
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.molrg.subspace_dae_backward,
                          (gy, x.detach(), U.detach(), c.detach(), phi.detach(), proj, w, dims, 0,
                           True, False))
    torch.library.opcheck(torch.ops.molrg.hard_assign, (x.detach(), U.detach(), dims))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_torch_compile_round_trip(mode):
    torch._dynamo.reset()
    x, U, c, phi, bias, dims = make_inputs(P=2, dtype=torch.float32, requires_grad=True)

    def loss_fn(x, U, c, phi, bias):
        return molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, U, c, phi, bias)
    grads_c = torch.autograd.grad(loss_c, (x, U, c))
    loss_e = loss_fn(x, U, c, phi, bias)
    grads_e = torch.autograd.grad(loss_e, (x, U, c))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    x, U, c, phi, bias, dims = make_inputs(dtype=torch.float32)
    f = torch.compile(lambda x, U: molrg_ext.subspace_dae(x, U, c, phi, bias, dims) * 2.0,
                      fullgraph=True)
    torch.testing.assert_close(f(x, U), 2.0 * molrg_ext.subspace_dae(x, U, c, phi, bias, dims))


def test_empty_batch():
    x, U, c, phi, bias, dims = make_inputs(B=0, requires_grad=True)
    y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert torch.all(U.grad == 0)
    assert molrg_ext.hard_assign(x.detach(), U.detach(), dims).shape == (0,)


def test_non_contiguous_inputs_are_handled_by_wrapper_and_rejected_by_raw_op():
    x, U, c, phi, bias, dims = make_inputs(P=2)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(molrg_ext.subspace_dae(xt, U, c, phi, bias, dims),
                               molrg_ext.subspace_dae(x, U, c, phi, bias, dims))
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.molrg.subspace_dae(xt, U, c, phi, None, None, dims, 0)


BAD = [
    (dict(x=torch.randn(10, dtype=torch.float64)), ValueError, "x must be"),
    (dict(U=torch.randn(10, 4, dtype=torch.float64)), ValueError, "U must be"),
    (dict(U=torch.randn(3, 9, 4, dtype=torch.float64)), ValueError, "n = 9"),
    (dict(U=torch.randn(3, 10, 4, dtype=torch.float32)), TypeError, "U has dtype"),
    (dict(x=torch.randn(7, 10, dtype=torch.float16)), TypeError, "x must be float32 or float64"),
    (dict(U=torch.randn(0, 10, 4, dtype=torch.float64), dims=[]), ValueError, "K = 0"),
    (dict(dims=[4, 2]), ValueError, "dims must have K = 3"),
    (dict(dims=[5, 2, 3]), ValueError, r"dims\[0\] = 5"),
    (dict(dims=[0, 2, 3]), ValueError, r"dims\[0\] must be >= 1, got 0"),
    (dict(c=torch.randn(6, dtype=torch.float64)), ValueError, "c of shape"),
    (dict(phi=torch.randn(7, dtype=torch.float32)), TypeError, "phi has dtype"),
    (dict(c=torch.tensor(float("nan"), dtype=torch.float64)), RuntimeError, "c contains NaN"),
    (dict(phi=torch.tensor(float("inf"), dtype=torch.float64)), RuntimeError, "phi contains NaN"),
    (dict(bias=torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)), RuntimeError,
     "bias contains NaN"),
    (dict(bias=torch.full((3,), float("-inf"), dtype=torch.float64)), RuntimeError,
     "bias is -Inf for every subspace"),
    (dict(mode="fuzzy"), ValueError, "mode must be one of"),
    (dict(mode=["soft"]), ValueError, r"mode must be one of .* got \['soft'\]"),
    (dict(assign=torch.zeros(7, dtype=torch.int64)), ValueError, "assign is only used"),
    (dict(mode="hard", assign=torch.full((7,), 3, dtype=torch.int64)), RuntimeError,
     r"assign values must be in \[0, K = 3\)"),
    (dict(mode="hard", assign=torch.zeros(7, dtype=torch.int32)), TypeError, "assign must be int64"),
    (dict(c="1.0"), TypeError, "c must be a number or a tensor"),
]


@pytest.mark.parametrize("override,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_gives_clear_error(override, exc, match):
    x, U, c, phi, bias, dims = make_inputs()
    args = dict(x=x, U=U, c=c, phi=phi, bias=bias, dims=dims, mode="soft", assign=None)
    args.update(override)
    if "U" in override and "dims" not in override:
        args["dims"] = None
    with pytest.raises(exc, match=match):
        molrg_ext.subspace_dae(**args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_check_scans_every_value_of_a_large_input(dtype):
    # c and phi are scanned in parallel chunks by a vector loop: a NaN or an infinity anywhere
    # (first value, a chunk boundary, the last value) is found, and the largest finite values
    # are not mistaken for infinities
    B, n = 3 * 2**16 + 5, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, B, n, generator=g, dtype=dtype)
    U = molrg_ext.random_orthonormal(n, 2, 1, 2, generator=g, dtype=dtype)
    phi = torch.ones(1, B, dtype=dtype)
    big = torch.finfo(dtype).max
    c = torch.full((1, B), big, dtype=dtype)
    c[0, ::2] = -big
    molrg_ext.subspace_dae(x, U, c, phi, None, None, "soft")  # finite: accepted
    for pos in (0, 2**16 - 1, 2**16, B - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            c2 = c.clone()
            c2[0, pos] = bad
            with pytest.raises(RuntimeError, match="c contains NaN or Inf"):
                molrg_ext.subspace_dae(x, U, c2, phi, None, None, "soft")


def test_hard_assign_errors_name_x0():
    """hard_assign's first argument is the clean sample x0: the wrapper's and the op's errors
    call it so (they had said x)."""
    x, U, c, phi, bias, dims = make_inputs(P=2)
    for bad, exc, msg in [
        ("abc", TypeError, "hard_assign: x0 must be a torch.Tensor"),
        (x[0, 0], ValueError, r"hard_assign: x0 must be \[B, n\] or \[P, B, n\]"),
        (x[:, :, :-1], ValueError, "hard_assign: U has n = 10 rows but x0 has n = 9"),
        (torch.cat([x, x]), ValueError, "hard_assign: U has 2 instances but x0 has 4"),
        (x.float(), TypeError, "hard_assign: U has dtype torch.float64 but x0 has dtype"),
    ]:
        with pytest.raises(exc, match=msg):
            molrg_ext.hard_assign(bad, U, dims)
    with pytest.raises(ValueError, match="but x0 is \\[B, n\\]; pass x0 as"):
        molrg_ext.hard_assign(x[0], U, dims)
    with pytest.raises(RuntimeError, match="hard_assign: x0 must be contiguous"):
        torch.ops.molrg.hard_assign(x.transpose(0, 1), U, dims)  # the op's own check


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_non_finite_inputs(mode):
    """U and hard_assign's inputs must be finite (an argmax of NaN energies would be a silent
    label); a NaN or an infinity in x stays in its own sample's output, as in torch's ops."""
    x, U, c, phi, bias, dims = make_inputs(P=2)
    for bad in (float("nan"), float("inf")):
        Ub = U.clone()
        Ub[1, 2, 3, 0] = bad
        with pytest.raises(RuntimeError, match="U contains NaN or Inf"):
            molrg_ext.subspace_dae(x, Ub, c, phi, bias, dims, mode)
        with pytest.raises(RuntimeError, match="hard_assign: U contains NaN or Inf"):
            molrg_ext.hard_assign(x, Ub, dims)
        xb = x.clone()
        xb[1, 4, 2] = bad
        with pytest.raises(RuntimeError, match="hard_assign: x0 contains NaN or Inf"):
            molrg_ext.hard_assign(xb, U, dims)
        y = molrg_ext.subspace_dae(xb, U, c, phi, bias, dims, mode)
        assert not torch.isfinite(y[1, 4]).any()
        keep = torch.ones(2, 7, dtype=torch.bool)
        keep[1, 4] = False
        y_ref = reference.subspace_dae(x, U, c, phi, bias, dims, mode)
        torch.testing.assert_close(y[keep], y_ref[keep])


def test_d_k_larger_than_n_is_rejected():
    x = torch.randn(5, 3, dtype=torch.float64)
    U = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="exceeds the ambient dimension n = 3"):
        molrg_ext.subspace_dae(x, U, 1.0, 1.0)


def test_raw_op_validates_shapes():
    x, U, c, phi, bias, dims = make_inputs(P=2)
    with pytest.raises(RuntimeError, match="c must have shape"):
        torch.ops.molrg.subspace_dae(x, U, c[:, :3].contiguous(), phi, None, None, dims, 0)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        torch.ops.molrg.subspace_dae(x, U, c, phi, None, None, dims, 7)
    with pytest.raises(RuntimeError, match="U has 1 instances"):
        torch.ops.molrg.subspace_dae(x, U[:1].contiguous(), c, phi, None, None, dims, 0)


def test_float32_and_float64_agree():
    x, U, c, phi, bias, dims = make_inputs(P=2, B=64, n=32, dims=(5, 8, 3))
    y64 = molrg_ext.subspace_dae(x, U, c, phi, bias, dims)
    y32 = molrg_ext.subspace_dae(*(t.float() for t in (x, U, c, phi, bias)), dims)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("B", [2500, 1000])
def test_block_split_results_do_not_depend_on_the_threads(mode, B):
    # One instance of 2500 samples: 40 blocks in 4 chunks of 10 (chunk_blocks: under 64 blocks
    # and a small accumulator), or of 1000: 16 blocks in 4 chunks of 4, claimed by the threads
    # in any order; dU sums the chunks' partial gradients in chunk order.
    x, U, c, phi, bias, dims = make_inputs(P=1, B=B, n=24, dims=(5, 3), dtype=torch.float32,
                                           seed=4, requires_grad=True)
    g = torch.randn(1, B, 24, generator=torch.Generator().manual_seed(5))
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims, mode)
            results.append((y.detach(), *torch.autograd.grad(y, (x, U), g)))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_parallel_backward_matches_single_thread():
    x, U, c, phi, bias, dims = make_inputs(P=3, B=500, n=20, dims=(4, 6), requires_grad=True)
    g = torch.randn(3, 500, 20, dtype=torch.float64)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = molrg_ext.subspace_dae(x, U, c, phi, bias, dims)
            results.append(torch.autograd.grad(y, (x, U), g))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("one_instance_4d", [False, True])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_shared_U_folds_instances_instead_of_copying_U(mode, one_instance_4d, dispatched_ops):
    """A 3-D U shared by the P instances of a 3-D x was expanded and copied P times (saved for
    the backward too: 2.8 x x's memory at n = 3072); the instances are now one batch of P B
    samples, with the same y and the summed dU."""
    g = torch.Generator().manual_seed(4)
    P, B, n, dims = 3, 7, 10, [3, 2]
    U = torch.linalg.qr(torch.randn(2, n, 3, generator=g, dtype=torch.float64))[0].contiguous()
    if one_instance_4d:  # [1, K, n, dmax] broadcasts over the P instances too
        U = U[None]
    x = torch.randn(P, B, n, generator=g, dtype=torch.float64)
    c = torch.rand(P, B, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(P, B, 2, generator=g, dtype=torch.float64)
    kw = dict(mode=mode, bias=bias if mode == "soft" else None)
    Ur = U.clone().requires_grad_(True)
    calls = dispatched_ops(lambda: molrg_ext.subspace_dae(x, Ur, c, 1.3, dims=dims, **kw))
    fwd = [args for name, args in calls if name.startswith("molrg.subspace_dae")]
    assert fwd and tuple(fwd[0][0].shape) == (1, P * B, n) and fwd[0][1].shape[0] == 1
    y = molrg_ext.subspace_dae(x, Ur, c, 1.3, dims=dims, **kw)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dU,) = torch.autograd.grad(y, Ur, gy)
    Ue = U.expand(P, 2, n, 3).clone().requires_grad_(True)
    y_ref = reference.subspace_dae(x, Ue, c, 1.3, dims=dims, **kw)
    (dU_ref,) = torch.autograd.grad(y_ref, Ue, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dU, dU_ref.sum(0).reshape(U.shape), rtol=1e-10, atol=1e-12)
    sv = molrg_ext.dae_jacobian_spectrum(x, U, c, 1.3, dims=dims, mode=mode)
    sv_ref = molrg_ext.dae_jacobian_spectrum(x, Ue.detach(), c, 1.3, dims=dims, mode=mode)
    torch.testing.assert_close(sv, sv_ref, rtol=1e-10, atol=1e-12)
    labels = molrg_ext.hard_assign(x, U, dims)
    assert labels.shape == (P, B)
    assert torch.equal(labels, reference.hard_assign(x, U, dims))
