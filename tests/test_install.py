"""The install: no import name of ours shadows another distribution's, and the environment is the lock.

transformers 5.25 imports the PyPI package `kernels`; a top-level `kernels/__init__.py` of ours on the
repository root (pytest's `pythonpath = .`, `python -m sgfast`) answered that import instead and broke
every model import. These tests fail if such a name comes back.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"sgfast"}


def importable_from_root(root=REPO):
    """Top-level names `import` finds in `root`: regular packages (folders with __init__.py) and modules."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[:-3])
    return names


def shadowed(root=REPO):
    """{our top-level name: the installed distributions whose top-level package has that name}."""
    installed = importlib.metadata.packages_distributions()
    return {name: installed[name] for name in sorted(importable_from_root(root) - OURS) if name in installed}


def test_no_top_level_name_of_ours_is_an_installed_distributions_package():
    assert shadowed() == {}, "a top-level folder or module of the repository shadows an installed package"


def test_the_check_sees_a_shadowing_package(tmp_path):
    # A folder named as an installed distribution's package (pytest's own), with an __init__.py, is found.
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()  # a plain folder of sources, as ours: not importable as a package
    (tmp_path / "_pytest.py").write_text("")
    found = shadowed(str(tmp_path))
    assert set(found) == {"pytest", "_pytest"}
    assert found["pytest"] == ["pytest"]


def test_kernels_is_a_folder_of_sources_not_a_package():
    assert os.path.isfile(os.path.join(REPO, "kernels", "attention_stats.py"))
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py")), (
        "kernels/__init__.py makes the folder a top-level package `kernels`, the name of a PyPI package "
        "transformers imports: keep the ops importable as sgfast.kernels only"
    )


def run_at_root(code):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_from_the_root_transformers_imports_and_kernels_is_not_ours():
    # The working directory comes first on sys.path in `python -c`, as the root does under pytest.
    where = run_at_root(
        "import transformers.activations, importlib.util as u\n"
        "spec = u.find_spec('kernels')\n"
        "print(repr(spec.origin) if spec else 'absent')"
    )
    if where != "absent":
        assert os.path.join(REPO, "kernels") not in where, f"`import kernels` gives the checkout's folder: {where}"
    assert where == "absent" or "site-packages" in where or "dist-packages" in where


def test_sgfast_kernels_imports_from_the_root_and_elsewhere(tmp_path):
    code = (
        "import importlib, sgfast\n"
        "m = importlib.import_module('sgfast.kernels.attention_stats')\n"
        "from sgfast.kernels import attention_stats, attention_stats_reference\n"
        "print(m.__file__)"
    )
    assert run_at_root(code) == os.path.join(REPO, "kernels", "attention_stats.py")


def test_a_wheel_carries_the_kernels(tmp_path):
    pytest.importorskip("setuptools")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("sgfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sgfast/kernels/__init__.py", "sgfast/kernels/attention_stats.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)


def locked_versions():
    text = open(os.path.join(REPO, "requirements.lock")).read()
    return {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, re.MULTILINE)
    }


def test_the_lock_pins_every_requirement_of_setup():
    locked = locked_versions()
    distribution = importlib.metadata.distribution("sgfast")
    wanted = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in distribution.requires}
    wanted -= {"xformers"}  # GPU-only extra, never installed on the CPU machines
    assert wanted - set(locked) == set()
    assert locked["torch"].endswith("+cpu"), "the lock holds torch's CPU build"
    assert "kernels" in locked  # transformers' own requirement, locked like every transitive package


@pytest.mark.skipif(os.environ.get("SGFAST_UNLOCKED") == "1", reason="make test-latest runs unlocked versions")
def test_the_environment_is_the_lock():
    differs = {}
    for name, version in locked_versions().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differs[name] = (installed, version)
    assert differs == {}, "installed (left) differs from requirements.lock (right): run `make test` on a fresh clone"


def test_no_module_puts_its_own_folder_on_sys_path():
    # benchmarks/ on sys.path makes benchmarks/kernels.py the `kernels` transformers imports.
    offenders = []
    for folder in ("sgfast", "benchmarks", "kernels"):
        for dirpath, _, filenames in os.walk(os.path.join(REPO, folder)):
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    if re.search(r"sys\.path\.(insert|append)\(", open(path).read()):
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


def test_the_charts_command_leaves_transformers_importable(tmp_path):
    where = run_at_root(
        "from benchmarks import charts\n"
        f"charts.main(['--out', {str(tmp_path)!r}])\n"
        "import transformers.activations, importlib.util as u\n"
        "spec = u.find_spec('kernels')\n"
        "print(repr(spec.origin) if spec else 'absent')"
    )
    assert "benchmarks" not in where and os.path.join(REPO, "kernels") not in where
