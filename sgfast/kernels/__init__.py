"""Triton kernels with their autograd and torch.library wrappers (depend on torch and triton only).

The ops' sources live in the repository's top-level `kernels/` folder, which has no `__init__.py`: a
PyPI package named `kernels` exists (transformers imports it), and a regular package of that name on
the repository root would shadow it whenever the root is on `sys.path` (`python -m sgfast`, pytest).
A wheel carries those sources here, beside this file (setup.py's build step); in a checkout this
package's path reaches the folder instead.
"""

import os

_checkout_sources = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")
if os.path.isfile(os.path.join(_checkout_sources, "attention_stats.py")):
    __path__.append(_checkout_sources)

from sgfast.kernels.attention_stats import attention_stats, attention_stats_reference  # noqa: E402
from sgfast.kernels.joint_attention_stats import (  # noqa: E402
    joint_attention_stats,
    joint_attention_stats_reference,
    sdpa_with_logsumexp,
)

__all__ = [
    "attention_stats",
    "attention_stats_reference",
    "joint_attention_stats",
    "joint_attention_stats_reference",
    "sdpa_with_logsumexp",
]
