"""Test setup shared by every test file.

- HF_HUB_OFFLINE=1 so nothing waits on a model hub.
- Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be set
  before any kernel module is imported: that is why it is set here, at conftest import.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: one thread each (oversubscribed OpenMP threads spin
    # and slow small ops by 10-100x); subprocesses started by tests inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
