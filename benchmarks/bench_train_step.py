"""Fused training step (P instances x M samples) vs the eager and compiled PyTorch step
(randint + randn + gather + denoiser + loss + backward, batched over P), vs that eager step
run one instance at a time (eager-loop) and vs the same step in CuPy with a hand-written
gradient (cupy, on the GPU; skipped without cupy). One group per shape."""
import pytest

from molrg_ext.bench import make_train_case

SHAPES = [(48, 2, 6, 256, 8), (48, 2, 6, 1024, 64)]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("impl", ["ours", "eager", "compile", "eager-loop", "cupy"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-K{}-d{}-M{}-P{}".format(*s))
def test_train_step(benchmark, run_case, full, shape, impl, mode):
    if shape[4] > 8 and not full:
        pytest.skip("large shape: pass --bench-full")
    benchmark.group = f"train {mode} n={shape[0]} K={shape[1]} d={shape[2]} M={shape[3]} P={shape[4]}"
    run_case(make_train_case(impl, *shape, mode=mode), rounds=5)
