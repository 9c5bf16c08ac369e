"""The ops under torch.autocast (molrg_ext/_autocast.py): float16 / bfloat16 activations are cast
to float32, the ops run and return float32, gradients flow back through the casts; float64 is
left alone; outside autocast half precision is still refused."""
import pytest
import torch

import molrg_ext
from molrg_ext import OptimalDenoiser, SubspaceDAE, hard_assign, optimal_denoiser, subspace_dae
from molrg_ext._cuda_check import cuda_skip_reason

HALF = [torch.bfloat16, torch.float16]
N, K, D, B = 16, 2, 3, 24


def _problem(seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(N, K * D, generator=g, dtype=torch.float64))[0]
    U = U.T.reshape(K, D, N).transpose(1, 2).contiguous().to(dtype)
    x = torch.randn(B, N, generator=g, dtype=dtype)
    lin = torch.nn.Linear(N, N, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(N, dtype=dtype) + 0.1 * torch.randn(N, N, generator=g,
                                                                        dtype=dtype))
        lin.bias.zero_()
    return U.to(device), x.to(device), lin.to(device)


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_subspace_dae_behind_a_half_layer(half, mode):
    """A Linear under autocast hands on half precision; the denoiser returns float32 equal to the
    float32 call on the same activations, and the layer's gradients equal those of that call."""
    U, x, lin = _problem()
    with torch.autocast("cpu", dtype=half):
        h = lin(x)
        assert h.dtype == half
        y = subspace_dae(h, U, 0.9, 3.0, mode=mode)
    assert y.dtype == torch.float32
    (y * torch.linspace(-1, 1, N)).sum().backward()
    got = lin.weight.grad.clone()

    lin.weight.grad = None
    with torch.autocast("cpu", dtype=half):
        h2 = lin(x)
        y2 = subspace_dae(h2.float(), U, 0.9, 3.0, mode=mode)
    (y2 * torch.linspace(-1, 1, N)).sum().backward()
    assert torch.equal(y, y2)
    assert torch.equal(got, lin.weight.grad) and got.abs().sum() > 0


@pytest.mark.parametrize("half", HALF)
def test_direct_op_calls_are_cast_too(half):
    U, x, _ = _problem()
    xh, Uh = x.to(half), U.to(half)
    c = torch.full((1, B), 0.9)
    phi = torch.full((1, B), 3.0, dtype=half)
    with torch.autocast("cpu", dtype=half):
        y, proj, w = torch.ops.molrg.subspace_dae(xh[None], Uh[None], c, phi, None, None,
                                                  [D] * K, 0)
        labels = torch.ops.molrg.hard_assign(xh[None], Uh[None], [D] * K)
        yo, lse = torch.ops.molrg.optimal_denoiser(xh, xh[:7], torch.ones(B, dtype=half),
                                                   torch.full((B,), 0.5), 64)
    ref = torch.ops.molrg.subspace_dae(xh[None].float(), Uh[None].float(), c, phi.float(), None,
                                       None, [D] * K, 0)
    assert y.dtype == proj.dtype == w.dtype == torch.float32
    assert torch.equal(y, ref[0]) and torch.equal(w, ref[2])
    assert torch.equal(labels, torch.ops.molrg.hard_assign(xh[None].float(), Uh[None].float(),
                                                           [D] * K))
    assert yo.dtype == torch.float32
    assert torch.equal(yo, torch.ops.molrg.optimal_denoiser(
        xh.float(), xh[:7].float(), torch.ones(B), torch.full((B,), 0.5), 64)[0])


def test_hard_assign_and_optimal_denoiser_under_autocast():
    U, x, lin = _problem(1)
    X_train = torch.randn(40, N, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        labels = hard_assign(h, U)
        y = optimal_denoiser(h, X_train, torch.tensor(0.7, dtype=torch.bfloat16))
        y_mod = OptimalDenoiser(X_train)(h, 0.7)
    assert torch.equal(labels, hard_assign(h.float(), U))
    assert y.dtype == y_mod.dtype == torch.float32
    sigma = torch.tensor(0.7, dtype=torch.bfloat16).float()
    assert torch.equal(y, optimal_denoiser(h.float(), X_train, sigma))
    assert torch.equal(y_mod, optimal_denoiser(h.float(), X_train, 0.7))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_float64_is_left_alone_and_half_is_refused_outside_autocast():
    U, x, lin = _problem(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = subspace_dae(x, U, 0.9, 3.0)
        yo = optimal_denoiser(x, x[:5], 0.4)
    assert y.dtype == yo.dtype == torch.float64
    assert torch.equal(y, subspace_dae(x, U, 0.9, 3.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 beside a cast half: a mix
        with pytest.raises(TypeError, match="U has dtype torch.float32 but x has dtype"):
            subspace_dae(x, U.bfloat16(), 0.9, 3.0)
    with pytest.raises(TypeError, match="x must be float32 or float64, got torch.bfloat16"):
        subspace_dae(x.bfloat16(), U.float(), 0.9, 3.0)
    with pytest.raises(TypeError, match="x0 must be float32 or float64"):
        hard_assign(x.half(), U.float())
    # autocast for another device type does not reach CPU tensors
    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=torch.float16):
            with pytest.raises(TypeError, match="x must be float32 or float64"):
                subspace_dae(x.half(), U.float(), 0.9, 3.0)


def test_jacobian_spectrum_under_autocast():
    U, x, lin = _problem(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        sv, vecs = molrg_ext.dae_jacobian_spectrum(h, U, 0.8, 2.0, return_vectors=True)
    assert sv.dtype == vecs.dtype == torch.float32
    ref_sv, ref_vecs = molrg_ext.dae_jacobian_spectrum(h.float(), U, 0.8, 2.0,
                                                       return_vectors=True)
    assert torch.equal(sv, ref_sv) and torch.equal(vecs, ref_vecs)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_transforms_of_a_function_that_enters_autocast(mode):
    """torch.func runs the pure-PyTorch composition: with autocast on it must still compute in
    float32 (its products would otherwise be bfloat16). jacrev and vmap of a function that enters
    autocast equal those of the same function handing the op float32."""
    from torch.func import jacrev, vmap
    U, x, lin = _problem(5)
    X_train = torch.randn(30, N, generator=torch.Generator().manual_seed(6))

    def f(xi, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(xi).reshape(-1, N)  # the ops take [B, n]; vmap hands on one sample
            # one cast per op, as the ops do (two bfloat16 gradients summed, not one cast of
            # the float32 sum: that rounds differently)
            h1, h2 = (h.float(), h.float()) if cast else (h, h)
            y = subspace_dae(h1, U, 0.9, 3.0, mode=mode) + optimal_denoiser(h2, X_train, 0.7)
            return y.reshape(xi.shape)

    J = jacrev(lambda xi: f(xi, False))(x[0])
    assert J.dtype == torch.float32 and J.abs().sum() > 0
    assert torch.equal(J, jacrev(lambda xi: f(xi, True))(x[0]))
    Y = vmap(lambda xi: f(xi, False))(x)
    assert Y.dtype == torch.float32
    assert torch.equal(Y, vmap(lambda xi: f(xi, True))(x))
    # the vmapped composition agrees with the kernels (float32 rounding apart)
    torch.testing.assert_close(Y, f(x, False), rtol=1e-5, atol=1e-5)


def test_the_autocast_kernels_only_see_arguments_they_handle():
    """csrc/autocast.cpp casts plain and optional Tensor arguments and replaces them on the stack:
    a Tensor[] argument would pass uncast, and an argument written in place would be written in
    a copy. None of the ops it is registered for has either; an op that gains one must extend
    the kernel first."""
    for name in ("subspace_dae", "hard_assign", "optimal_denoiser", "dae_jacobian_spectrum"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molrg::{name}", "AutocastCPU")
        for arg in getattr(torch.ops.molrg, name).default._schema.arguments:
            assert arg.alias_info is None or not arg.alias_info.is_write, (name, arg.name)
            assert "Tensor" not in str(arg.type) or str(arg.type) in (
                "Tensor", "Optional[Tensor]"), (name, arg.name, str(arg.type))


def test_module_under_autocast_compiles():
    """SubspaceDAE behind a half-precision layer, eager and torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    m = SubspaceDAE(N, D, K)
    _, x, lin = _problem(3)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(lin(x), 0.5)

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(cuda_skip_reason() is not None, reason=cuda_skip_reason() or "")
def test_cuda_autocast_matches_float32():
    U, x, lin = _problem(device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        h = lin(x)
        assert h.dtype == torch.float16
        y = subspace_dae(h, U, 0.9, 3.0)
        y_op = torch.ops.molrg.subspace_dae(h[None], U[None], torch.full((1, B), 0.9, device="cuda"),
                                            torch.full((1, B), 3.0, device="cuda"), None, None,
                                            [D] * K, 0)[0][0]
    assert y.dtype == y_op.dtype == torch.float32
    assert torch.equal(y, subspace_dae(h.float(), U, 0.9, 3.0))
    assert torch.equal(y_op, y)
    assert molrg_ext.built_with_cuda
