"""Test setup shared by the whole suite.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter, which must be
switched on before any kernel is decorated, i.e. before engine's op modules are imported.
Tests marked ``gpu`` run only where CUDA is available (the GPU machine).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The bench scripts (and the tests of them) import their siblings (hardware.py, throughput.py)
# by name. bench/ goes LAST on the path: first, its kernels.py would shadow the installed
# `kernels` package, which transformers imports (via diffusers) when present.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs every run; the seed is printed so a failure can be replayed
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)
    yield seed
