import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be switched on
# before triton is first imported. On a GPU machine the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Small CPU tests: two intra-op threads on a 2-core machine spin against each other (3x the CPU time).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/gpu_check.sh on a lent GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
