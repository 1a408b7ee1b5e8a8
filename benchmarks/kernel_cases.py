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


# ---------------------------------------------------------------------------------------------------
# MMDiT joint attention (`sgfast.kernels.joint_attention_stats`) at 1024px: 64 x 64 = 4096 image tokens
# ---------------------------------------------------------------------------------------------------

# Dense tensor-core peaks (FLOP/s, datasheet, no sparsity) per target: fp16/bf16 inputs and tf32.
TENSOR_PEAK = {"sm_80": {"fp16": 312e12, "tf32": 156e12}, "sm_90": {"fp16": 989e12, "tf32": 494e12}}


@dataclass(frozen=True)
class JointCase:
    arch: str
    batch: int
    heads: int
    head_dim: int
    height: int
    width: int
    text: int  # text keys of the joint sequence
    selected: int = SELECTED

    @property
    def n(self):
        return self.height * self.width

    @property
    def image_keys(self):
        return self.n  # MMDiT self-attention: every image token is a key

    @property
    def name(self):
        return f"{self.arch} {self.height}x{self.width}+{self.text} h{self.heads}xd{self.head_dim}"


# (arch, heads, head dim, text tokens): SD3-medium's 77 CLIP + 256 T5 positions; FLUX.1-dev's 512 T5 tokens.
JOINT_LAYERS = [("sd3-medium", 24, 64, 333), ("flux-dev", 24, 128, 512)]

# The joint op's launches: the forward with SDPA's row logsumexp given or computing it, and the
# backward's three (dq; the normaliser's share of dk for the image keys, and for the text keys).
JOINT_KERNELS = ("forward_lse_given", "forward_lse_computed", "backward_dq", "backward_dk_image", "backward_dk_text")


def joint_cases(batches=(1,), selected=SELECTED):
    return [JointCase(arch, batch, heads, head_dim, 64, 64, text, selected)
            for batch in batches for arch, heads, head_dim, text in JOINT_LAYERS]


def joint_cost(case, element_size, kernel):
    """(bytes, FLOPs on input-dtype tiles, FLOPs in tf32) one launch must move and do: each input read
    once and each output written once; the dots of the kernel's design (Q K^T, P @ K and
    P^T @ (r Q) on fp16/bf16 tiles; the selected columns' W @ K_sel and W^T @ Q in tf32)."""
    b, h, n, d, m, t, s = case.batch, case.heads, case.n, case.head_dim, case.image_keys, case.text, case.selected
    keys = m + t
    q_bytes, lse_bytes, maps_bytes = b * h * n * d * element_size, b * h * n * 4, b * s * n * 4
    k_bytes = b * h * keys * d * element_size
    select = 2 * b * h * n * s * d
    if kernel == "forward_lse_given":
        return q_bytes + b * h * s * d * element_size + lse_bytes + maps_bytes, select, 0
    if kernel == "forward_lse_computed":
        return q_bytes + k_bytes + 2 * lse_bytes + maps_bytes, 2 * b * h * n * keys * d + select, 0
    if kernel == "backward_dq":
        # Q, K, lse, the maps' gradient in; dq, r and the selected dk shares out.
        return 2 * q_bytes + k_bytes + 2 * lse_bytes + maps_bytes, 4 * b * h * n * keys * d + select, 2 * select
    if kernel in ("backward_dk_image", "backward_dk_text"):
        rows = m if kernel == "backward_dk_image" else t
        # Q, lse, r, these keys in; their dk (fp32) out.
        return q_bytes + 2 * lse_bytes + b * h * rows * d * (element_size + 4), 4 * b * h * rows * n * d, 0
    raise ValueError(f"kernel must be one of {JOINT_KERNELS}, got {kernel!r}")


def joint_floor_us(case, element_size, kernel, bandwidth, peaks):
    """The launch's floor: its bytes at the memory bandwidth or its dots at the tensor-core peaks,
    whichever is longer."""
    nbytes, tile_flops, tf32_flops = joint_cost(case, element_size, kernel)
    return max(nbytes / bandwidth, tile_flops / peaks["fp16"] + tf32_flops / peaks["tf32"]) * 1e6
