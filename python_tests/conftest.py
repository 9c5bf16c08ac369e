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
