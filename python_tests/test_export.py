"""Deployment paths: torch.export (static and dynamic batch, saved and loaded in a fresh
interpreter) and AOTInductor packages of models that call the molrg ops. They rely on the ops'
schemas and fake kernels, as torch.compile does."""

import pytest
import torch

from molrg_ext import OptimalDenoiser, SubspaceDAE, hard_assign

N = 16

# torch 2.7 warns when it unlifts the constants that forward makes from Python numbers
# (torch.as_tensor of sigma, of dims); torch 2.8 and later keep those warnings to themselves
pytestmark = [
    pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning"),
    pytest.mark.filterwarnings("ignore:Node .* does not reference an nn.Module:UserWarning"),
]


class _Denoise(torch.nn.Module):
    """A network-shaped wrapper: a layer, then the subspace denoiser, and the hard labels."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(N, N)
        self.dae = SubspaceDAE(N, [3, 2], mode=mode)

    def forward(self, x, sigma):
        h = self.lin(x)
        return self.dae(h, sigma), hard_assign(h, self.dae.U)


def _inputs(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, generator=g), torch.tensor(0.4)


def _models():
    torch.manual_seed(0)
    return {"soft": _Denoise("soft"), "hard": _Denoise("hard"),
            "optimal": OptimalDenoiser(torch.randn(60, N))}


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["soft", "hard", "optimal"])
def test_export_with_a_dynamic_batch(name):
    model = _models()[name]
    args = _inputs(32)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, args, dynamic_shapes=({0: batch}, None))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(o.startswith("molrg.") for o in ops), ops
    for B in (32, 7, 300):
        x, sigma = _inputs(B, seed=B)
        _same(ep.module()(x, sigma), model(x, sigma))


def test_saved_program_runs_in_a_fresh_interpreter(tmp_path, fresh_interpreter):
    """torch.export.save / load: the loading process needs the ops, i.e. `import molrg_ext`."""
    model = _models()["soft"]
    args = _inputs(20)
    ep = torch.export.export(model, args)
    path = tmp_path / "dae.pt2"
    torch.export.save(ep, str(path))
    torch.save({"args": args, "out": model(*args)}, tmp_path / "ref.pt")
    code = ("import torch, molrg_ext; ep = torch.export.load(r'{p}'); "
            "r = torch.load(r'{r}'); out = ep.module()(*r['args']); "
            "print(all(torch.equal(a, b) for a, b in zip(out, r['out'])))").format(
                p=path, r=tmp_path / "ref.pt")
    assert fresh_interpreter(code, tmp_path).splitlines()[-1] == "True"


@pytest.mark.slow
def test_aot_inductor_package(tmp_path):
    """An AOTInductor package (C++ wrapper compiled ahead of time) calls the ops' CPU kernels
    and gives the eager outputs; 13-20 s on 2 cores, mostly compiling the wrapper."""
    model = _models()["hard"]
    args = _inputs(24)
    ep = torch.export.export(model, args)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    out = loaded(*args)
    ref = model(*args)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    assert torch.equal(out[1], ref[1])
