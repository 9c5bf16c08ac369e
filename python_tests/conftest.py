"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (thread-count-independent timings and results)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def dispatched_ops():
    """A function running fn() and returning the ops it dispatched, in order, as (name, args)
    pairs: the torch ops that reach the dispatcher from Python or from the autograd engine (e.g.
    the zero gradients autograd materialises)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((str(func), args))
            return func(*args, **(kwargs or {}))

    def run(fn):
        with _Log() as log:
            fn()
        return log.calls

    return run


@pytest.fixture
def backward_is_one_op(dispatched_ops):
    """A function running y.backward(gy) and asserting that it dispatched exactly one call of
    the op named `op` and no zero or fill op (no zero gradients materialised by autograd)."""
    def check(y, gy, op):
        ops = [name for name, _ in dispatched_ops(lambda: y.backward(gy))]
        assert ops.count(op) == 1, ops
        assert not [o for o in ops if "zero" in o or "fill" in o], ops

    return check


def _two_point_queries(X, s, gamma, g):
    """float64 queries x_b = s_b (X_a + X_c) / 2 + t_b gamma_b^2 d / (s_b ||d||^2) on the segment
    between two random training points X_a, X_c (d = X_a - X_c, t_b uniform in [-2, 2]), for
    per-query scales s [B] and noise levels gamma [B]. The Gaussian-kernel logit gap
    l_a - l_c = s <x - s (X_a + X_c) / 2, d> / gamma^2 is t_b: the posterior mixes the two
    points at any noise level, where its mean and gradient are most sensitive."""
    X64, N, B = X.double(), X.shape[0], s.shape[0]
    a = torch.randint(0, N, (B,), generator=g)
    c = (a + 1 + torch.randint(0, N - 1, (B,), generator=g)) % N
    s, gamma = s.double()[:, None], gamma.double()[:, None]
    d = X64[a] - X64[c]
    t = torch.rand(B, 1, generator=g, dtype=torch.float64) * 4 - 2
    return s * (X64[a] + X64[c]) / 2 + t * gamma**2 * d / (s * (d * d).sum(1, keepdim=True))


@pytest.fixture
def two_point_queries():
    """_two_point_queries(X, s, gamma, g): queries where the posterior over training points
    mixes two of them (the optimal denoiser's tests)."""
    return _two_point_queries


@pytest.fixture
def package_copy(tmp_path):
    """A copy of the imported molrg_ext package under tmp_path whose compiled module ``_C`` is
    given bytes: ``package_copy(library_bytes)`` makes it and returns a function running
    ``import molrg_ext; print('imported')`` on it in a fresh interpreter (keyword arguments: extra
    environment variables), which returns the CompletedProcess."""
    import importlib.machinery
    import os
    import shutil
    import subprocess
    import sys

    import molrg_ext

    def make(library_bytes):
        src = os.path.dirname(os.path.abspath(molrg_ext.__file__))
        pkg = tmp_path / "molrg_ext"
        shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
        (pkg / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(library_bytes)

        def import_(**env):
            return subprocess.run([sys.executable, "-c", "import molrg_ext; print('imported')"],
                                  capture_output=True, text=True, cwd=tmp_path,
                                  env=dict(os.environ, PYTHONPATH=str(tmp_path), **env))

        return import_

    return make


@pytest.fixture
def fresh_interpreter():
    """A function returning the stdout (stripped) of `python -c code` run in a new interpreter
    in ``cwd``. It runs outside the source tree (where ./molrg_ext may be an unbuilt checkout),
    pointed at the very copy of the package this session imported (installed or in-place
    build); a non-zero exit fails the test with the end of its stderr."""
    import os
    import subprocess
    import sys

    import molrg_ext

    def run(code, cwd):
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(molrg_ext.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [pkg_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=cwd, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    return run


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms, with the process's setting (and warn_only) restored
    after the test."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
