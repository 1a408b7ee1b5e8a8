"""Triton kernels with their autograd and torch.library wrappers (depend on torch and triton only).

Installed as `sgfast.kernels`: import from there.
"""

# With the repository root on sys.path (`python -m pytest`, `python -m sgfast` run from a checkout)
# this folder is also importable as a top-level `kernels`, the name of a PyPI package that
# transformers probes for by importing it half-way through its own import. Under that name, export
# nothing: the probe then sees an empty module with no version (not the PyPI package) instead of
# importing sgfast -> diffusers -> transformers in a circle.
if __name__ == "sgfast.kernels":
    from sgfast.kernels.attention_stats import attention_stats, attention_stats_reference

    __all__ = ["attention_stats", "attention_stats_reference"]
