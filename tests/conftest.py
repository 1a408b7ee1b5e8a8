import os

# The Triton interpreter must be switched on before any kernel is defined: kernels are tested on
# the CPU through it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: on 2 cores shared with other work, torch's thread pool makes small ops' times swing
# by orders of magnitude; results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    from sgfast.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
