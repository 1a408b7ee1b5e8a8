import json
import os
from pathlib import Path

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

# SGFAST_NO_SKIP=1 (CI): a skipped test fails instead, so a missing browser, Ray or extra shows up as
# a failure rather than as a quietly smaller suite.
_no_skip = os.environ.get("SGFAST_NO_SKIP", "0")
if _no_skip not in ("0", "1"):
    raise pytest.UsageError(f"SGFAST_NO_SKIP must be 0 or 1, got {_no_skip!r}")


def _fail_skips(report):
    if _no_skip == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under SGFAST_NO_SKIP=1: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_skips((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_skips((yield).get_result())  # a module skipped at import (importorskip at its top)


# One thread: on 2 cores shared with other work, torch's thread pool makes small ops' times swing
# by orders of magnitude; results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    from sgfast.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one torch thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def pytest_collection_modifyitems(config, items):
    """Under mutmut (which names the mutant in MUTANT_UNDER_TEST), run each module's fastest tests
    first, the modules in the order of their fastest test, by the durations of mutmut's statistics
    run: mutmut stops at the first failure, so a killed mutant then costs the cheap tests only. A
    module's tests stay together, so its module-scoped fixtures are built once."""
    stats = Path("mutmut-stats.json")
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    duration = {id(item): durations.get(item.nodeid, 0.0) for item in items}
    modules = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = [sorted(group, key=lambda item: duration[id(item)]) for group in modules.values()]
    groups.sort(key=lambda group: duration[id(group[0])])
    items[:] = [item for group in groups for item in group]


_exit_status = {}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # Leave without the interpreter's finalization: native threads of torch and the serving tests'
    # daemon threads waking during it can abort the process ("terminate called without an active
    # exception") after every test passed, turning a green run red at random.
    # Only when pytest is the program: a tool that runs pytest inside its own process (mutmut's
    # statistics and clean runs, `make mutate`) must get control back.
    import sys

    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    standalone = (main_spec is not None and main_spec.name in ("pytest", "pytest.__main__")) or os.path.basename(
        sys.argv[0]) in ("pytest", "py.test")
    if "code" in _exit_status and standalone:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
