"""Cross-attention statistics for self-guidance: one op, Triton kernels + autograd + torch reference.

For queries `q` [B, heads, N, d] over an H x W grid (position p = i * W + j) and text keys `k`
[B, heads, T, d], the op computes the head-averaged attention probabilities

    A = softmax(scale * q @ k^T, dim=-1).mean(dim=1)                       [B, N, T]

but keeps only the selected key columns `token_index` [B, S]:

    maps[b, s, p] = A[b, p, token_index[b, s]]                             [B, S, N]
    sums[b, s]    = (sum_p maps, sum_p x_p * maps, sum_p y_p * maps)       [B, S, 3]

with pixel-centre coordinates x_p = (j + 0.5) / W, y_p = (i + 0.5) / H (mass, x-moment, y-moment:
the centroid is moment / mass). Outputs are float32 (float64 for float64 inputs) whatever the input
dtype.

The fused Triton path reads Q and K once, does the whole softmax row in one tile (T is small: 77 for
CLIP) and never writes anything of size heads * N * T: the forward keeps only the selected columns,
the backward recomputes the softmax. Gradients flow to `q` only: `k` comes from the text encoder and
carries no gradient to the latents, so the op returns None for it (use the reference if a gradient
for `k` is needed).

Backward (per head h, position p; dA the upstream gradient of A, nonzero on selected columns only):

    g[b, s, p]    = grad_maps[b, s, p] + grad_sums[b, s, 0] + x_p grad_sums[b, s, 1] + y_p grad_sums[b, s, 2]
    dP[b, h, p, t] = sum_{s: token_index[b, s] == t} g[b, s, p] / heads
    dlogit        = P * (dP - sum_t P * dP)
    dq            = scale * dlogit @ k

Public entry: `attention_stats(...)`. The Triton path is registered as the torch custom op
`sgfast::attention_stats` (with `sgfast::attention_stats_backward`), so torch.compile traces it
without a graph break.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton is Linux-only; the torch reference still works everywhere.
    HAS_TRITON = False

# `triton.jit` picks the interpreter when the kernels are defined, so read the switch once, here.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tests set this to fill every output buffer with NaN before a launch, so that any element a
# kernel fails to write shows up instead of reading as stale memory.
DEBUG_POISON_OUTPUTS = False


# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the ground truth, and the CPU implementation.
# ---------------------------------------------------------------------------------------------------


def pixel_centres(height, width, dtype, device):
    """x_p, y_p for positions p = i * width + j: ((j + 0.5) / width, (i + 0.5) / height), each [N]."""
    x = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    y = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    return x.repeat(height), y.repeat_interleave(width)


def attention_stats_reference(q, k, token_index, height, width, scale, return_maps=True):
    """Plain PyTorch version of `attention_stats` (differentiable in `q` and `k` by autograd).

    Computes in the input dtype promoted to at least float32 (float64 stays float64) and returns
    `(sums [B, S, 3], maps [B, S, N] or None)` in that dtype.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    batch, _, n, _ = q.shape
    probs = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)).mul(scale).softmax(dim=-1)
    # Head mean first, then gather: autograd then keeps an index of [B, N, S], not [B, heads, N, S].
    index = token_index[:, None, :].expand(batch, n, token_index.shape[1])
    maps = probs.mean(dim=1).gather(-1, index).transpose(1, 2)  # [B, S, N]
    # One matmul against the (1, x, y) columns: autograd keeps maps once, not once per moment.
    x, y = pixel_centres(height, width, dtype, q.device)
    sums = maps @ torch.stack([torch.ones_like(x), x, y], dim=-1)  # [B, S, 3]
    return sums, (maps if return_maps else None)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _row_probs(
        q_base, k_base, offs_n, offs_t, offs_d, n_mask, t_mask, D, scale,
        stride_qn, stride_qd, stride_kt, stride_kd,
        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """softmax(scale * q @ k^T) of one head for BLOCK_N positions: [BLOCK_N, BLOCK_T] in ACC,
        exactly zero on the padding keys t >= T. Loops over d in BLOCK_D chunks (masked tail)."""
        logits = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d_mask = (d0 + offs_d) < D
            q = tl.load(
                q_base + offs_n[:, None] * stride_qn + (d0 + offs_d)[None, :] * stride_qd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0,
            )
            k = tl.load(
                k_base + offs_t[:, None] * stride_kt + (d0 + offs_d)[None, :] * stride_kd,
                mask=t_mask[:, None] & d_mask[None, :], other=0.0,
            )
            # Dot in the accumulation dtype: exact fp32 (no TF32), and the interpreter's bf16 dot is
            # wrong. The op is memory-bound (T * d per position), so tensor cores would gain little.
            logits += tl.dot(q.to(ACC), tl.trans(k.to(ACC)), input_precision="ieee", out_dtype=ACC)
        logits = tl.where(t_mask[None, :], logits * scale, float("-inf"))
        # Rows past N loaded q = 0: their logits are 0, so the row stays finite (no NaN anywhere).
        row_max = tl.max(logits, axis=1)
        p = tl.exp(logits - row_max[:, None])
        return p / tl.sum(p, axis=1)[:, None]

    @triton.jit
    def _attention_stats_fwd_kernel(
        q_ptr, k_ptr, tok_ptr, maps_ptr, part_ptr,
        N, T, D, S, HEADS, HEIGHT, WIDTH, scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_tb, stride_ts,
        ACC: tl.constexpr, WRITE_MAPS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (block of BLOCK_N positions, batch item). Sums the softmax rows over
        heads, then writes the selected columns (maps, if asked) and this block's partial sums
        part[b, block, s, :] = (mass, x-moment, y-moment); the host sums the blocks."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < N
        t_mask = offs_t < T

        probs = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        for h in range(HEADS):
            probs += _row_probs(
                q_ptr + b * stride_qb + h * stride_qh, k_ptr + b * stride_kb + h * stride_kh,
                offs_n, offs_t, offs_d, n_mask, t_mask, D, scale,
                stride_qn, stride_qd, stride_kt, stride_kd, ACC, BLOCK_N, BLOCK_T, BLOCK_D,
            )
        probs = probs / HEADS

        x = ((offs_n % WIDTH).to(ACC) + 0.5) / WIDTH
        y = ((offs_n // WIDTH).to(ACC) + 0.5) / HEIGHT
        part = part_ptr + (b * tl.num_programs(0) + pid_n) * S * 3
        for s in range(S):
            token = tl.load(tok_ptr + b * stride_tb + s * stride_ts)
            # Column `token` of the tile. Comparing indices (not a pointer offset) means a bad index
            # can never read out of bounds; the host validates the range anyway.
            col = tl.sum(tl.where(offs_t[None, :] == token, probs, 0.0), axis=1)
            col = tl.where(n_mask, col, 0.0)
            if WRITE_MAPS:
                tl.store(maps_ptr + (b * S + s) * N + offs_n, col, mask=n_mask)
            tl.store(part + s * 3 + 0, tl.sum(col, axis=0))
            tl.store(part + s * 3 + 1, tl.sum(col * x, axis=0))
            tl.store(part + s * 3 + 2, tl.sum(col * y, axis=0))

    @triton.jit
    def _attention_stats_bwd_kernel(
        q_ptr, k_ptr, tok_ptr, gsums_ptr, gmaps_ptr, dq_ptr,
        N, T, D, S, HEADS, HEIGHT, WIDTH, scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_tb, stride_ts,
        stride_db, stride_dh, stride_dn, stride_dd,
        ACC: tl.constexpr, HAS_GRAD_SUMS: tl.constexpr, HAS_GRAD_MAPS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (block of positions, head, batch item): recompute the softmax rows, build
        dP on the selected columns only, dq = scale * (P * (dP - rowsum(P * dP))) @ K."""
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        n_mask = offs_n < N
        t_mask = offs_t < T
        k_base = k_ptr + b * stride_kb + h * stride_kh

        probs = _row_probs(
            q_ptr + b * stride_qb + h * stride_qh, k_base,
            offs_n, offs_t, offs_d, n_mask, t_mask, D, scale,
            stride_qn, stride_qd, stride_kt, stride_kd, ACC, BLOCK_N, BLOCK_T, BLOCK_D,
        )

        x = ((offs_n % WIDTH).to(ACC) + 0.5) / WIDTH
        y = ((offs_n // WIDTH).to(ACC) + 0.5) / HEIGHT
        dprobs = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        for s in range(S):
            token = tl.load(tok_ptr + b * stride_tb + s * stride_ts)
            g = tl.zeros([BLOCK_N], dtype=ACC)
            if HAS_GRAD_MAPS:
                g += tl.load(gmaps_ptr + (b * S + s) * N + offs_n, mask=n_mask, other=0.0)
            if HAS_GRAD_SUMS:
                g0 = tl.load(gsums_ptr + (b * S + s) * 3 + 0)
                g1 = tl.load(gsums_ptr + (b * S + s) * 3 + 1)
                g2 = tl.load(gsums_ptr + (b * S + s) * 3 + 2)
                g += g0 + x * g1 + y * g2
            # += so that a column selected twice gets the sum of both gradients.
            dprobs += tl.where(offs_t[None, :] == token, g[:, None], 0.0)
        dprobs = dprobs / HEADS

        row_dot = tl.sum(probs * dprobs, axis=1)
        dlogits = probs * (dprobs - row_dot[:, None])  # zero on the padding keys (probs == 0 there)

        dq_base = dq_ptr + b * stride_db + h * stride_dh
        for d0 in range(0, D, BLOCK_D):
            d_mask = (d0 + offs_d) < D
            k = tl.load(
                k_base + offs_t[:, None] * stride_kt + (d0 + offs_d)[None, :] * stride_kd,
                mask=t_mask[:, None] & d_mask[None, :], other=0.0,
            )
            dq = tl.dot(dlogits, k.to(ACC), input_precision="ieee", out_dtype=ACC) * scale
            tl.store(
                dq_base + offs_n[:, None] * stride_dn + (d0 + offs_d)[None, :] * stride_dd,
                dq.to(dq_ptr.dtype.element_ty),
                mask=n_mask[:, None] & d_mask[None, :],
            )


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_output(shape, dtype, device):
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _config(T, D):
    """Launch configuration (fixed; no autotune, which the interpreter does not support).

    The whole key row lives in one tile (BLOCK_T >= T); d is walked in chunks of at most 64 so the
    K tile stays small for head dims up to 160. tl.dot needs every tile dim >= 16 on the GPU.
    The GPU numbers are a reasoned default, not tuned on hardware.
    """
    block_t = max(16, triton.next_power_of_2(T))
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    block_n = 16 if INTERPRET else 32
    num_warps = 4 if block_n * block_t <= 4096 else 8
    return {"BLOCK_N": block_n, "BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": num_warps}


def _check_triton_device(q):
    if not HAS_TRITON:
        raise RuntimeError("attention_stats: the Triton path needs the `triton` package")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(
            "attention_stats: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sgfast.kernels is imported (to run the kernels on the CPU through the interpreter)"
        )


def _triton_forward(q, k, token_index, height, width, scale, return_maps):
    _check_triton_device(q)
    batch, heads, n, d = q.shape
    t, s = k.shape[2], token_index.shape[1]
    acc = _acc_dtype(q.dtype)
    cfg = _config(t, d)
    n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    # Per-block partial sums, reduced here in a fixed order: deterministic, and no atomics
    # (fp16/bf16 atomics do not exist in the interpreter).
    partial = _new_output((batch, n_blocks, s, 3), acc, q.device)
    maps = _new_output((batch, s, n if return_maps else 0), acc, q.device)
    _attention_stats_fwd_kernel[(n_blocks, batch)](
        q, k, token_index, maps if return_maps else partial, partial,
        n, t, d, s, heads, height, width, float(scale),
        *q.stride(), *k.stride(), *token_index.stride(),
        ACC=tl.float64 if acc == torch.float64 else tl.float32, WRITE_MAPS=return_maps,
        **cfg,
    )
    return partial.sum(dim=1), maps


def _triton_backward(q, k, token_index, grad_sums, grad_maps, height, width, scale):
    _check_triton_device(q)
    batch, heads, n, d = q.shape
    t, s = k.shape[2], token_index.shape[1]
    acc = _acc_dtype(q.dtype)
    cfg = _config(t, d)
    dq = _new_output(q.shape, q.dtype, q.device)  # contiguous, whatever q's strides
    has_sums = grad_sums is not None
    has_maps = grad_maps is not None and grad_maps.numel() > 0
    if not has_sums and not has_maps:
        return dq.zero_()
    grad_sums = grad_sums.to(acc).contiguous() if has_sums else dq  # dq: a placeholder, never read
    grad_maps = grad_maps.to(acc).contiguous() if has_maps else dq
    _attention_stats_bwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), heads, batch)](
        q, k, token_index, grad_sums, grad_maps, dq,
        n, t, d, s, heads, height, width, float(scale),
        *q.stride(), *k.stride(), *token_index.stride(), *dq.stride(),
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        HAS_GRAD_SUMS=has_sums, HAS_GRAD_MAPS=has_maps,
        **cfg,
    )
    return dq


# ---------------------------------------------------------------------------------------------------
# Autograd and torch custom op
# ---------------------------------------------------------------------------------------------------


class AttentionStatsFunction(torch.autograd.Function):
    """Triton forward/backward as an autograd.Function (eager use).

    `apply(q, k, token_index, height, width, scale, return_maps)` -> `(sums, maps)`, maps being an
    empty [B, S, 0] tensor when not asked for. The custom op `sgfast::attention_stats` reuses this
    class's `setup_context` and `backward`, so both entry points share one gradient formula.
    """

    @staticmethod
    def forward(q, k, token_index, height, width, scale, return_maps):
        return _triton_forward(q, k, token_index, height, width, scale, return_maps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, token_index, height, width, scale, _ = inputs
        ctx.save_for_backward(q, k, token_index)  # not the probabilities: the backward recomputes
        ctx.height, ctx.width, ctx.scale = height, width, scale

    @staticmethod
    def backward(ctx, grad_sums, grad_maps):
        q, k, token_index = ctx.saved_tensors
        dq = None
        if ctx.needs_input_grad[0]:
            if grad_maps is not None and grad_maps.numel() == 0:
                grad_maps = None  # maps were not requested
            dq = torch.ops.sgfast.attention_stats_backward(
                q, k, token_index, grad_sums, grad_maps, ctx.height, ctx.width, ctx.scale
            )
        # No gradient for k (text keys carry none to the latents), nor the non-tensor arguments.
        return dq, None, None, None, None, None, None


@torch.library.custom_op("sgfast::attention_stats", mutates_args=())
def _attention_stats_op(
    q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor,
    height: int, width: int, scale: float, return_maps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton op. Returns (sums [B, S, 3], maps [B, S, N], or [B, S, 0] if not return_maps)."""
    return _triton_forward(q, k, token_index, height, width, scale, return_maps)


@_attention_stats_op.register_fake
def _(q, k, token_index, height, width, scale, return_maps):
    batch, s = token_index.shape
    acc = _acc_dtype(q.dtype)
    n = q.shape[2] if return_maps else 0
    return q.new_empty((batch, s, 3), dtype=acc), q.new_empty((batch, s, n), dtype=acc)


@torch.library.custom_op("sgfast::attention_stats_backward", mutates_args=())
def _attention_stats_backward_op(
    q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor,
    grad_sums: torch.Tensor | None, grad_maps: torch.Tensor | None,
    height: int, width: int, scale: float,
) -> torch.Tensor:
    """dq of `sgfast::attention_stats` (first-order only: no double backward)."""
    return _triton_backward(q, k, token_index, grad_sums, grad_maps, height, width, scale)


@_attention_stats_backward_op.register_fake
def _(q, k, token_index, grad_sums, grad_maps, height, width, scale):
    return q.new_empty(q.shape)  # contiguous, like the real output


_attention_stats_op.register_autograd(
    AttentionStatsFunction.backward, setup_context=AttentionStatsFunction.setup_context
)


# ---------------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------------


def _check_inputs(q, k, token_index, height, width, impl):
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"attention_stats: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    for name, tensor, rank in (("q", q, 4), ("k", k, 4), ("token_index", token_index, 2)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"attention_stats: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise ValueError(f"attention_stats: {name} must have {rank} dims, got shape {tuple(tensor.shape)}")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(f"attention_stats: q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if token_index.dtype.is_floating_point or token_index.dtype.is_complex or token_index.dtype == torch.bool:
        raise ValueError(f"attention_stats: token_index must be an integer tensor, got {token_index.dtype}")
    if not (q.device == k.device == token_index.device):
        raise ValueError(
            f"attention_stats: q, k and token_index must be on one device, got {q.device}, {k.device}, "
            f"{token_index.device}"
        )
    (batch, heads, n, d), (kb, kh, t, kd) = q.shape, k.shape
    if (kb, kh, kd) != (batch, heads, d):
        raise ValueError(
            f"attention_stats: k [B, heads, T, d] does not match q [B, heads, N, d]: {tuple(k.shape)} vs "
            f"{tuple(q.shape)}"
        )
    if token_index.shape[0] != batch:
        raise ValueError(f"attention_stats: token_index has batch {token_index.shape[0]}, q has {batch}")
    if height * width != n:
        raise ValueError(f"attention_stats: height * width = {height} * {width} != N = {n}")
    # A data-dependent check (a device sync on CUDA); left out while torch.compile traces and on the
    # meta device (no values; FLOP counting). The kernels select columns by comparing indices, so a
    # bad index cannot read out of bounds.
    has_values = token_index.device.type != "meta"
    if has_values and not torch.compiler.is_compiling() and token_index.numel() > 0:
        low, high = int(token_index.min()), int(token_index.max())
        if low < 0 or high >= t:
            raise ValueError(f"attention_stats: token_index must lie in [0, {t}), got values in [{low}, {high}]")


def attention_stats(q, k, token_index, height, width, scale=None, return_maps=True, impl="auto"):
    """Selected-token cross-attention maps and their (mass, x-moment, y-moment) sums.

    q [B, heads, N, d] (N = height * width, row-major), k [B, heads, T, d] (same dtype),
    token_index [B, S] integer key columns in [0, T), scale defaults to d ** -0.5.
    impl: "torch" (reference), "triton" (fused kernels: CUDA, or CPU with TRITON_INTERPRET=1), or
    "auto" (Triton on CUDA, the reference elsewhere).
    Returns `(sums [B, S, 3], maps [B, S, N] or None)`, float32 (float64 for float64 inputs).
    Differentiable in q (and in k on the reference path only).
    """
    _check_inputs(q, k, token_index, height, width, impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "triton" if (HAS_TRITON and q.is_cuda) else "torch"
    if impl == "torch":
        return attention_stats_reference(q, k, token_index, height, width, scale, return_maps)
    sums, maps = torch.ops.sgfast.attention_stats(q, k, token_index, height, width, float(scale), return_maps)
    return sums, (maps if return_maps else None)
