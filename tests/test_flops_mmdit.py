"""The MMDiT FLOP benchmark builds the published architectures: each transformer's parameter count on
the meta device is the one the architectures folder's README lists."""

import re

import pytest

from benchmarks.flops_mmdit import ARCHS, transformer_on_meta
from benchmarks.models import default_arch_dir


def readme_millions(config_name):
    """The parameter count (millions) the README gives for `config_name`."""
    text = (default_arch_dir() / "README.md").read_text()
    entry = text[text.index(f"`{config_name}`"):]
    entry = entry[: entry.index("\n- ")] if "\n- " in entry else entry
    numbers = re.findall(r"([\d,]+\.\d\d) M\b", entry)
    return float(numbers[0].replace(",", ""))


@pytest.mark.parametrize("arch", ARCHS)
def test_built_transformers_have_the_published_parameter_counts(arch):
    config, published, _ = ARCHS[arch]
    model = transformer_on_meta(arch, default_arch_dir())
    built = sum(p.numel() for p in model.parameters()) / 1e6
    assert published == readme_millions(config)
    assert built == pytest.approx(published, abs=0.005)
