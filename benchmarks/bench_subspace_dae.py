"""Denoiser fwd+bwd (grad wrt U): fused op vs eager PyTorch vs torch.compile (vs CuPy / CUDA
when present). One pytest-benchmark group per shape."""
import pytest

from molrg_ext._cuda_check import cuda_skip_reason
from molrg_ext.bench import make_dae_case



SMALL = [(48, 2, 6, 1024), (3072, 10, 40, 256), (48, 3, 8, 65536)]
LARGE = [(48, 2, 6, 65536), (3072, 10, 40, 4096)]
IMPLS = ["ours", "eager", "compile", "cupy", "cuda"]


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SMALL + LARGE, ids=lambda s: "n{}-K{}-d{}-B{}".format(*s))
def test_dae_fwd_bwd(benchmark, run_case, full, shape, impl, mode):
    if shape in LARGE and not full:
        pytest.skip("large shape: pass --bench-full")
    benchmark.group = f"dae {mode} n={shape[0]} K={shape[1]} d={shape[2]} B={shape[3]}"
    if impl == "cuda":
        reason = cuda_skip_reason("subspace_dae")
        if reason is not None:
            pytest.skip(reason)
        fn = make_dae_case("ours", *shape, mode=mode, device="cuda")
    else:
        fn = make_dae_case(impl, *shape, mode=mode)
    run_case(fn, rounds=3 if shape[3] * shape[0] > 10**6 else 10)
