"""Test setup shared by every test file.

- HF_HUB_OFFLINE=1 so nothing waits on a model hub.
- Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be set
  before any kernel module is imported: that is why it is set here, at conftest import.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
