"""Speed, memory and FLOP benchmarks of sgfast against diffusers (plain and Attend-and-Excite).

    python -m benchmarks            # side-by-side table, JSON and chart (see benchmarks/speed.py)
    python -m benchmarks.flops      # exact FLOPs on the real architectures, meta device
    python -m pytest benchmarks/test_steps.py --benchmark-only   # per-step regressions

Results: benchmarks/RESULTS.md.
"""
