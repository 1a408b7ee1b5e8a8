"""The attention-statistics launches a guided step makes, and the bytes each must move.

One `Case` per distinct shape of a default captured layer: SD1.5 at 512px (the 16x16 and 32x32 up
blocks, 8 heads of 160 and 80) and SDXL at 1024px (the 32x32 up block, 20 heads of 64, and the
64x64 one, 10 heads of 64), with 77 text keys. Shared by the offline compile report
(`python -m benchmarks.kernels`) and the GPU measurements (`python -m benchmarks.gpu`).
"""

from dataclasses import dataclass

# Datasheet HBM bandwidths (bytes/s): the floors are bytes over these.
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
SMS = {"sm_80": 108, "sm_90": 132}  # A100, H100/H200

KEYS = 77  # CLIP's context length, SD1.x/2.x and SDXL alike
SELECTED = 4  # tokens a typical guided step reads (an edited word and the words it keeps)


@dataclass(frozen=True)
class Case:
    arch: str
    layer: str  # the up block, e.g. "up_blocks.2"
    layers: int  # how many captured layers of the block share this shape
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    keys: int = KEYS
    selected: int = SELECTED

    @property
    def n(self):
        return self.height * self.width

    @property
    def name(self):
        return f"{self.arch} {self.layer} {self.height}x{self.width} h{self.heads}xd{self.head_dim}"


# (arch, block, layers in it, heads, grid side, head dim)
DEFAULT_LAYERS = [
    ("sd15", "up_blocks.1", 3, 8, 16, 160),
    ("sd15", "up_blocks.2", 3, 8, 32, 80),
    ("sdxl", "up_blocks.0", 30, 20, 32, 64),
    ("sdxl", "up_blocks.1", 6, 10, 64, 64),
]


def default_cases(batches=(1, 8), selected=SELECTED):
    return [
        Case(arch, block, count, batch, heads, side, side, head_dim, selected=selected)
        for batch in batches
        for arch, block, count, heads, side, head_dim in DEFAULT_LAYERS
    ]


def bytes_moved(case, element_size, kernel):
    """The fewest bytes a launch must move through device memory: each input read once, each output
    written once. Forward: Q, K, token indices in; maps [B, S, N] and sums [B, S, 3] (fp32) out.
    Backward: Q, K, token indices, the maps' and sums' gradients in; dQ out."""
    b, h, n, d, t, s = case.batch, case.heads, case.n, case.head_dim, case.keys, case.selected
    qk = b * h * (n + t) * d * element_size + b * s * 8
    stats = b * s * (n + 3) * 4
    if kernel == "forward":
        return qk + stats
    if kernel == "backward":
        return qk + stats + b * h * n * d * element_size
    raise ValueError(f"kernel must be 'forward' or 'backward', got {kernel!r}")


def floor_us(nbytes, bandwidth):
    return nbytes / bandwidth * 1e6
