import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be switched on
# before triton is first imported. On a GPU machine the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Small CPU tests: two intra-op threads on a 2-core machine spin against each other (3x the CPU time).
    torch.set_num_threads(1)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like in the test starts as NaN (ints: a sentinel), so an element a kernel
    forgets to write fails the comparison. Kernel test files opt in with ``usefixtures`` or by name."""
    from tests.helpers import poison

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


@pytest.fixture
def column_ranges(monkeypatch):
    """ITC: every row program of the forward and the row backward splits its columns into ranges of one tile (tiny
    batches would not split otherwise); returns the split counts the plans chose, for the test to check."""
    from mome.kernels import itc, itc_configs

    monkeypatch.setattr(itc_configs, "MIN_SPLIT_TILES", 1)
    chosen = []
    original = itc.column_splits
    monkeypatch.setattr(itc, "column_splits", lambda *a: chosen.append(original(*a)) or chosen[-1])
    return chosen


@pytest.fixture
def cuda_extension():
    """Skips, saying why, unless a GPU is here and mome._C runs on it (the CUDA backend's own tests)."""
    import mome.cuda

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    why = mome.cuda.device_reason(torch.device("cuda"))
    if why is not None:
        pytest.skip(f"mome._C cannot run here: {why}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/gpu_check.sh on a lent GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
