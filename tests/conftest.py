import os

import pytest
import torch

# Kernels are tested compiled on CUDA where there is a GPU, and through the Triton interpreter on
# the CPU elsewhere. The switch must be set before any kernel is defined (sgfast.kernels imported);
# set by hand, it must be "0" or "1".
_interpret = os.environ.get("TRITON_INTERPRET")
if _interpret is None:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
elif _interpret not in ("0", "1"):
    raise pytest.UsageError(f"TRITON_INTERPRET must be 0 or 1 (or unset: chosen by the machine), got {_interpret!r}")

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


@pytest.fixture(scope="session")
def default_sg():
    """The built-in model wrapped (reference mode), shared by the test modules that use it."""
    from sgfast import SelfGuidancePipeline
    from sgfast.shapes import load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return SelfGuidancePipeline.from_pipe(pipe)
