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

The fused Triton path (`sgfast::attention_maps`, a `torch.library.triton_op`, so that inductor emits
the launches and CUDA graphs can capture them) reads Q and K once, does the whole softmax row in
registers (77 keys: a 64-wide tile and a 16-wide tail) and never writes anything of size
heads * N * T. Q @ K^T runs on tensor cores on the native fp16/bf16 tiles with fp32 accumulation
(fp16 x fp16 products are exact in fp32); the selected columns come out of the probabilities by one
one-hot matmul, whatever the number of tokens. The grid is (position blocks, head groups, batch):
where one program per position block would leave SMs idle, heads are split across programs and
their partial maps summed afterwards in a fixed order (deterministic; no atomics). The sums are a
[N, 3] matmul on the maps.

Backward (per head h, position p; g the upstream gradient of the maps, the sums' folded in):

    dP[b, h, p, t] = sum_{s: token_index[b, s] == t} g[b, s, p] / heads      (one-hot matmul)
    dlogit        = P * (dP - sum_t P * dP)
    dq            = scale * dlogit @ k

The guided step needs gradients for `q` only (`k` comes from the text and the UNet's weights are
frozen); where `k` requires a gradient too, the same backward also writes per-block shares of
dk = scale * dlogit^T @ q, summed afterwards in a fixed order.

Public entry: `attention_stats(...)`. `launch_config(...)` is the launch plan (grid, block sizes,
warps, dot precisions) the op uses; `benchmarks.kernels` compiles exactly that offline.
"""

import functools
import math
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

# The SM count the launch plan aims to fill; None: the device's (8 under the interpreter, so that
# small test shapes take both the split-heads and the one-group paths). Tests override it.
SM_COUNT_OVERRIDE = None

# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the ground truth, and the CPU implementation.
# ---------------------------------------------------------------------------------------------------


def pixel_centres(height, width, dtype, device):
    """x_p, y_p for positions p = i * width + j: ((j + 0.5) / width, (i + 0.5) / height), each [N]."""
    x = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    y = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    return x.repeat(height), y.repeat_interleave(width)


def attention_stats_reference(q, k, token_index, height, width, scale, return_maps=True, return_sums=True):
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
    sums = maps @ moment_columns(height, width, dtype, q.device) if return_sums else None  # [B, S, 3]
    return sums, (maps if return_maps else None)


def moment_columns(height, width, dtype, device):
    """[N, 3] columns (1, x_p, y_p): maps @ moment_columns = sums."""
    x, y = pixel_centres(height, width, dtype, device)
    return torch.stack([torch.ones_like(x), x, y], dim=-1)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_rows(base, rows, row_mask, stride_row, d0, offs_d, D, stride_d, EVEN_D: tl.constexpr):
        """A [rows, BLOCK_D] tile of a row-major [rows, D] matrix, columns d0 + offs_d."""
        cols = d0 + offs_d
        mask = row_mask[:, None]
        if not EVEN_D:
            mask = mask & (cols < D)[None, :]
        return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_d, mask=mask, other=0.0)

    @triton.jit
    def _head_probs(
        q_base, k_base, offs_n, n_mask, offs_t, offs_t2, T, D, qk_scale,
        stride_qn, stride_qd, stride_kt, stride_kd,
        ACC: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr,
        HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_T2: tl.constexpr,
        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """Softmax rows of one head for BLOCK_N positions, as two key tiles: keys [0, BLOCK_T) and the
        tail [BLOCK_T, BLOCK_T + BLOCK_T2) (all zero when not HAS_TAIL). Exactly zero on keys >= T.
        `qk_scale` is scale * log2(e): exp2 then gives the softmax's exp."""
        t_mask = offs_t < T
        t2_mask = offs_t2 < T
        offs_d = tl.arange(0, BLOCK_D)
        logits = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        logits2 = tl.zeros([BLOCK_N, BLOCK_T2], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            q = _load_rows(q_base, offs_n, n_mask, stride_qn, d0, offs_d, D, stride_qd, EVEN_D)
            k = _load_rows(k_base, offs_t, t_mask, stride_kt, d0, offs_d, D, stride_kd, EVEN_D)
            if UPCAST_QK:  # the interpreter's bf16 dot is wrong; fp32/fp64 inputs are upcast no-ops
                q = q.to(ACC)
                k = k.to(ACC)
            logits += tl.dot(q, tl.trans(k), input_precision=QK_PRECISION, out_dtype=ACC)
            if HAS_TAIL:
                k2 = _load_rows(k_base, offs_t2, t2_mask, stride_kt, d0, offs_d, D, stride_kd, EVEN_D)
                if UPCAST_QK:
                    k2 = k2.to(ACC)
                logits2 += tl.dot(q, tl.trans(k2), input_precision=QK_PRECISION, out_dtype=ACC)
        # Rows past N loaded q = 0: their logits are 0, so the row stays finite (no NaN anywhere).
        logits = tl.where(t_mask[None, :], logits * qk_scale, float("-inf"))
        row_max = tl.max(logits, axis=1)
        if HAS_TAIL:
            logits2 = tl.where(t2_mask[None, :], logits2 * qk_scale, float("-inf"))
            row_max = tl.maximum(row_max, tl.max(logits2, axis=1))
        p = tl.exp2(logits - row_max[:, None])
        total = tl.sum(p, axis=1)
        p2 = logits2
        if HAS_TAIL:
            p2 = tl.exp2(logits2 - row_max[:, None])
            total += tl.sum(p2, axis=1)
        inv = 1.0 / total
        return p * inv[:, None], p2 * inv[:, None]

    @triton.jit
    def _one_hot(token_ptrs, s_mask, offs_t, ACC: tl.constexpr):
        """[BLOCK_T, BLOCK_S] one-hot of the selected tokens over the key tile `offs_t`. Indices are
        compared, never used as offsets: a bad index selects nothing and reads nothing."""
        tokens = tl.load(token_ptrs, mask=s_mask, other=-1)
        return (offs_t[:, None] == tokens[None, :]).to(ACC)

    @triton.jit
    def _maps_fwd_kernel(
        q_ptr, k_ptr, tok_ptr, out_ptr,
        N, T, D, S, HEADS, HEADS_PER_PROGRAM, qk_scale, inv_heads,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_tb, stride_ts,
        UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr, SEL_PRECISION: tl.constexpr,
        HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_T2: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """One program per (block of positions, group of heads, batch item): the head-summed
        probabilities of its heads (scaled by 1 / heads), then the selected columns by one one-hot
        matmul per BLOCK_S tokens, written to out[b, group, s, p] ([B, groups, S, N])."""
        # The accumulation dtype is the output's (fp32; fp64 for fp64): a pointer's dtype, not a
        # dtype argument, so that inductor's launch of the kernel carries no dtype constant.
        ACC: tl.constexpr = out_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        group = tl.program_id(1)
        b = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_t = tl.arange(0, BLOCK_T)
        offs_t2 = BLOCK_T + tl.arange(0, BLOCK_T2)

        probs = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        probs2 = tl.zeros([BLOCK_N, BLOCK_T2], dtype=ACC)
        h_start = group * HEADS_PER_PROGRAM
        h_end = tl.minimum(h_start + HEADS_PER_PROGRAM, HEADS)
        for h in range(h_start, h_end):
            p, p2 = _head_probs(
                q_ptr + b * stride_qb + h * stride_qh, k_ptr + b * stride_kb + h * stride_kh,
                offs_n, n_mask, offs_t, offs_t2, T, D, qk_scale,
                stride_qn, stride_qd, stride_kt, stride_kd,
                ACC, UPCAST_QK, QK_PRECISION, HAS_TAIL, BLOCK_N, BLOCK_T, BLOCK_T2, BLOCK_D, EVEN_D,
            )
            probs += p
            if HAS_TAIL:
                probs2 += p2
        probs = probs * inv_heads
        probs2 = probs2 * inv_heads

        out_base = out_ptr + (b * tl.num_programs(1) + group) * S * N
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < S
            tok = tok_ptr + b * stride_tb + offs_s * stride_ts
            selected = tl.dot(probs, _one_hot(tok, s_mask, offs_t, ACC),
                              input_precision=SEL_PRECISION, out_dtype=ACC)
            if HAS_TAIL:
                selected += tl.dot(probs2, _one_hot(tok, s_mask, offs_t2, ACC),
                                   input_precision=SEL_PRECISION, out_dtype=ACC)
            tl.store(out_base + offs_s[None, :] * N + offs_n[:, None], selected,
                     mask=n_mask[:, None] & s_mask[None, :])

    @triton.jit
    def _maps_bwd_kernel(
        q_ptr, k_ptr, tok_ptr, g_ptr, dq_ptr, dk_ptr,
        N, T, D, S, qk_scale, dq_scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_tb, stride_ts,
        stride_db, stride_dh, stride_dn, stride_dd,
        UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr, SEL_PRECISION: tl.constexpr,
        DQ_PRECISION: tl.constexpr, WRITE_DK: tl.constexpr,
        HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_T2: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_D: tl.constexpr,
    ):
        """One program per (block of positions, head, batch item): recompute the softmax rows, dP by
        one one-hot matmul per BLOCK_S tokens from g [B, S, N], then dq = dq_scale * dlogit @ K and,
        if WRITE_DK, this block's share of dk, dq_scale * dlogit^T @ Q, to
        dk_ptr [B, heads, blocks, BLOCK_T + BLOCK_T2, D] (fp32; summed over blocks afterwards)."""
        ACC: tl.constexpr = g_ptr.dtype.element_ty  # the maps' gradient comes in the accumulation dtype
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_t = tl.arange(0, BLOCK_T)
        offs_t2 = BLOCK_T + tl.arange(0, BLOCK_T2)
        k_base = k_ptr + b * stride_kb + h * stride_kh

        p, p2 = _head_probs(
            q_ptr + b * stride_qb + h * stride_qh, k_base,
            offs_n, n_mask, offs_t, offs_t2, T, D, qk_scale,
            stride_qn, stride_qd, stride_kt, stride_kd,
            ACC, UPCAST_QK, QK_PRECISION, HAS_TAIL, BLOCK_N, BLOCK_T, BLOCK_T2, BLOCK_D, EVEN_D,
        )

        dp = tl.zeros([BLOCK_N, BLOCK_T], dtype=ACC)
        dp2 = tl.zeros([BLOCK_N, BLOCK_T2], dtype=ACC)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < S
            tok = tok_ptr + b * stride_tb + offs_s * stride_ts
            g = tl.load(g_ptr + (b * S + offs_s[None, :]) * N + offs_n[:, None],
                        mask=n_mask[:, None] & s_mask[None, :], other=0.0)
            # A token selected twice gets the sum of both gradients (the one-hot has two ones).
            dp += tl.dot(g, tl.trans(_one_hot(tok, s_mask, offs_t, ACC)),
                         input_precision=SEL_PRECISION, out_dtype=ACC)
            if HAS_TAIL:
                dp2 += tl.dot(g, tl.trans(_one_hot(tok, s_mask, offs_t2, ACC)),
                              input_precision=SEL_PRECISION, out_dtype=ACC)
        row_dot = tl.sum(p * dp, axis=1)
        if HAS_TAIL:
            row_dot += tl.sum(p2 * dp2, axis=1)
        dlogits = p * (dp - row_dot[:, None])  # zero on the padding keys (p == 0 there)
        dlogits2 = p2 * (dp2 - row_dot[:, None])

        t_mask = offs_t < T
        t2_mask = offs_t2 < T
        offs_d = tl.arange(0, BLOCK_D)
        dq_base = dq_ptr + b * stride_db + h * stride_dh
        for d0 in range(0, D, BLOCK_D):
            # K in fp16/bf16 is exact in tf32: the dot's only rounding is dlogits' to tf32, the
            # size of dq's own fp16 rounding.
            k = _load_rows(k_base, offs_t, t_mask, stride_kt, d0, offs_d, D, stride_kd, EVEN_D).to(ACC)
            dq = tl.dot(dlogits, k, input_precision=DQ_PRECISION, out_dtype=ACC)
            if HAS_TAIL:
                k2 = _load_rows(k_base, offs_t2, t2_mask, stride_kt, d0, offs_d, D, stride_kd, EVEN_D).to(ACC)
                dq += tl.dot(dlogits2, k2, input_precision=DQ_PRECISION, out_dtype=ACC)
            cols = d0 + offs_d
            mask = n_mask[:, None]
            if not EVEN_D:
                mask = mask & (cols < D)[None, :]
            tl.store(dq_base + offs_n[:, None] * stride_dn + cols[None, :] * stride_dd,
                     (dq * dq_scale).to(dq_ptr.dtype.element_ty), mask=mask)
            if WRITE_DK:
                # Q in fp16/bf16 is exact in tf32, as K is for dq.
                q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_n, n_mask, stride_qn, d0, offs_d, D,
                               stride_qd, EVEN_D).to(ACC)
                rows = BLOCK_T + BLOCK_T2
                dk_base = dk_ptr + ((b * tl.num_programs(1) + h) * tl.num_programs(0) + pid_n) * rows * D
                d_mask = cols < D
                dk = tl.dot(tl.trans(dlogits), q, input_precision=DQ_PRECISION, out_dtype=ACC)
                tl.store(dk_base + offs_t[:, None] * D + cols[None, :], dk * dq_scale, mask=d_mask[None, :])
                if HAS_TAIL:
                    dk2 = tl.dot(tl.trans(dlogits2), q, input_precision=DQ_PRECISION, out_dtype=ACC)
                    tl.store(dk_base + offs_t2[:, None] * D + cols[None, :], dk2 * dq_scale, mask=d_mask[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------------

# Position blocks of at most 32 rows: Triton lowers those dots to mma.sync. 64-row blocks become
# Hopper's wgmma, where (Triton 3.6, H200) the forward read out of bounds and the fp32 dots lost
# their tf32x3 accuracy; the op is memory-bound, and smaller blocks give more programs to hide latency.
_BLOCK_N_CHOICES = (32, 16)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _next_power_of_2(x):
    return 1 << max(x - 1, 0).bit_length()


def _key_tiles(keys):
    """(BLOCK_T, BLOCK_T2): the largest power of two <= T (at least 16, tl.dot's smallest side) and a
    tail tile for the rest (0: none). 77 keys: 64 + 16 = 80, 4% padding instead of 128's 40%."""
    block_t = max(16, 1 << (keys.bit_length() - 1))
    rest = keys - block_t
    return block_t, (max(16, _next_power_of_2(rest)) if rest > 0 else 0)


def _block_d(head_dim):
    """The widest chunk in (64, 32, 16) dividing d, so the d-loop loads no padding (40: 16 with a
    masked tail, the tensor cores' K step being 16)."""
    for block in (64, 32, 16):
        if head_dim % block == 0:
            return block, True
    return 16, False


def _precisions(dtype, interpret):
    """input_precision of the three kinds of dot: Q @ K^T on the input tiles, the one-hot selections
    on fp32 probabilities, dlogit @ K. fp16/bf16 tiles go to the tensor cores as they are; fp32 ones
    use tf32x3 (fp32-level error on tensor cores); fp64 stays fp64. The interpreter computes every
    dot in fp32/fp64 ('ieee')."""
    if dtype == torch.float64 or interpret:
        return "ieee", "ieee", "ieee"
    if dtype == torch.float32:
        return "tf32x3", "tf32x3", "tf32x3"
    return "tf32", "tf32x3", "tf32"


def device_sm_count(device):
    if SM_COUNT_OVERRIDE is not None:
        return SM_COUNT_OVERRIDE
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


# Launch-plan defaults. A program per position block and head group until the grid has
# PROGRAMS_PER_SM programs per SM (0.9: at least 90% of the SMs busy at batch 1).
PROGRAMS_PER_SM = 0.9


def _stages(kernel, block_d):
    """Software-pipelining depth of the d-loop: 3 was the fastest on an H200 (benchmarks/RESULTS.md,
    kernel_variants), taken wherever it compiles without spills for sm_90 (benchmarks.kernels): the
    forward with d-chunks under 64, the backward with 64 (elsewhere its extra tiles spill)."""
    if kernel == "forward":
        return 3 if block_d < 64 else 2
    return 3 if block_d == 64 else 1


def launch_config(kernel, batch, heads, n, head_dim, keys, selected, dtype, sms, interpret=INTERPRET,
                  programs_per_sm=None, block_n=None, num_warps=None, num_stages=None):
    """The launch of `kernel` ("forward" or "backward") for these shapes: `grid`, `groups` (forward:
    head groups, the partial maps' second dim), `heads_per_program`, and `meta` (the kernels'
    constexprs, num_warps, num_stages). Block sizes: the largest position block whose grid still
    gives `programs_per_sm * sms` programs (16 at the least); the forward then puts as many heads
    in one program as that target allows (fewer partial maps to sum). `block_n`, `num_warps` and
    `num_stages` override the choice (for measuring alternatives)."""
    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel must be 'forward' or 'backward', got {kernel!r}")
    target = math.ceil((PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm) * sms)
    if block_n is None:
        block_n = next((b for b in _BLOCK_N_CHOICES if triton.cdiv(n, b) * heads * batch >= target),
                       _BLOCK_N_CHOICES[-1])
    blocks = triton.cdiv(n, block_n)
    block_t, block_t2 = _key_tiles(keys)
    block_d, even_d = _block_d(head_dim)
    qk, sel, dq = _precisions(dtype, interpret)
    meta = dict(
        UPCAST_QK=interpret or dtype in (torch.float32, torch.float64),
        QK_PRECISION=qk, SEL_PRECISION=sel,
        HAS_TAIL=block_t2 > 0, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_T2=max(block_t2, 16),
        BLOCK_D=block_d, BLOCK_S=min(64, max(16, _next_power_of_2(selected))), EVEN_D=even_d,
        num_warps=num_warps or 4, num_stages=num_stages or _stages(kernel, block_d),
    )
    if kernel == "backward":
        meta["DQ_PRECISION"] = dq
        return {"grid": (blocks, heads, batch), "groups": heads, "heads_per_program": 1, "meta": meta}
    per_program = heads
    while per_program > 1 and triton.cdiv(heads, per_program) * blocks * batch < target:
        per_program -= 1
    groups = triton.cdiv(heads, per_program)
    return {"grid": (blocks, groups, batch), "groups": groups, "heads_per_program": per_program, "meta": meta}


def _config_for(kernel, q, k, token_index):
    batch, heads, n, d = q.shape
    return launch_config(kernel, batch, heads, n, d, k.shape[2], token_index.shape[1], q.dtype,
                         device_sm_count(q.device))


def launch_forward(q, k, token_index, scale, cfg):
    """The forward kernel with launch `cfg`: maps [B, S, N] (inputs unchecked)."""
    batch, heads, n, d = q.shape
    t, s = k.shape[2], token_index.shape[1]
    groups = cfg["groups"]
    # One group writes the maps themselves; several write partial maps, summed in a fixed order.
    out = _new_output((batch, s, n) if groups == 1 else (batch, groups, s, n), _acc_dtype(q.dtype), q.device)
    _launcher(_maps_fwd_kernel)[cfg["grid"]](
        q, k, token_index, out,
        n, t, d, s, heads, cfg["heads_per_program"], float(scale) * math.log2(math.e), 1.0 / heads,
        *q.stride(), *k.stride(), *token_index.stride(),
        **cfg["meta"],
    )
    return out if groups == 1 else out.sum(dim=1)


def launch_backward(q, k, token_index, grad_maps, scale, cfg, with_dk=False):
    """The backward kernel with launch `cfg`: (dq, contiguous, in q's dtype; dk in k's dtype if
    `with_dk`, else an empty tensor). Inputs unchecked."""
    batch, heads, n, d = q.shape
    t, s = k.shape[2], token_index.shape[1]
    acc = _acc_dtype(q.dtype)
    grad_maps = grad_maps.to(acc).contiguous()
    dq = _new_output(q.shape, q.dtype, q.device)
    blocks, meta = cfg["grid"][0], cfg["meta"]
    rows = meta["BLOCK_T"] + meta["BLOCK_T2"]
    # dk is a sum over positions: per-block shares, summed here in a fixed order (no atomics).
    dk_blocks = _new_output((batch, heads, blocks, rows, d) if with_dk else (1,), acc, q.device)  # (1,): unused
    _launcher(_maps_bwd_kernel)[cfg["grid"]](
        q, k, token_index, grad_maps, dq, dk_blocks,
        n, t, d, s, float(scale) * math.log2(math.e), float(scale) / heads,
        *q.stride(), *k.stride(), *token_index.stride(), *dq.stride(),
        WRITE_DK=with_dk, **meta,
    )
    dk = dk_blocks.sum(dim=2)[:, :, :t].to(k.dtype).contiguous() if with_dk else k.new_empty((0,))
    return dq, dk


# ---------------------------------------------------------------------------------------------------
# The op: Triton launches registered with torch.library.triton_op
# ---------------------------------------------------------------------------------------------------


def _new_output(shape, dtype, device):
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_triton_device(q):
    if not HAS_TRITON:
        raise RuntimeError("attention_stats: the Triton path needs the `triton` package")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(
            "attention_stats: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sgfast.kernels is imported (to run the kernels on the CPU through the interpreter)"
        )


if HAS_TRITON:
    from torch.library import custom_op, triton_op, wrap_triton

    if INTERPRET:
        # Compiled, a triton_op's body is traced with fake and functional tensors down to its
        # launches, which the interpreter cannot run on: under it the ops are opaque custom ops
        # with fake kernels (same bodies, same autograd).
        _define_op, _launcher = custom_op, (lambda kernel: kernel)
    else:
        _define_op, _launcher = triton_op, wrap_triton

    @_define_op("sgfast::attention_maps", mutates_args=())
    def _attention_maps(q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor, scale: float) -> torch.Tensor:
        """Head-averaged probabilities of the selected keys: [B, S, N], fp32 (fp64 for fp64)."""
        return launch_forward(q, k, token_index, scale, _config_for("forward", q, k, token_index))

    @_define_op("sgfast::attention_maps_backward", mutates_args=())
    def _attention_maps_backward(
        q: torch.Tensor, k: torch.Tensor, token_index: torch.Tensor, grad_maps: torch.Tensor, scale: float,
        with_dk: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dq, dk) of `sgfast::attention_maps` (first-order only); dk empty unless `with_dk`."""
        cfg = _config_for("backward", q, k, token_index)
        return launch_backward(q, k, token_index, grad_maps, scale, cfg, with_dk)

    def _setup_context(ctx, inputs, output):
        q, k, token_index, scale = inputs
        ctx.save_for_backward(q, k, token_index)  # not the probabilities: the backward recomputes
        ctx.scale = scale

    def _backward(ctx, grad_maps):
        q, k, token_index = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dq or need_dk):
            return None, None, None, None
        # dk costs a [B, heads, blocks, T, d] buffer: only when k requires a gradient (the guided
        # step freezes the UNet, so its keys never do).
        dq, dk = _attention_maps_backward(q, k, token_index, grad_maps, ctx.scale, need_dk)
        return (dq if need_dq else None), (dk if need_dk else None), None, None

    _attention_maps.register_autograd(_backward, setup_context=_setup_context)

    if INTERPRET:
        @_attention_maps.register_fake
        def _(q, k, token_index, scale):
            return q.new_empty((q.shape[0], token_index.shape[1], q.shape[2]), dtype=_acc_dtype(q.dtype))

        @_attention_maps_backward.register_fake
        def _(q, k, token_index, grad_maps, scale, with_dk):
            return q.new_empty(q.shape), k.new_empty(k.shape if with_dk else (0,))


def fused_attention_stats(q, k, token_index, height, width, scale, return_maps=True, return_sums=True):
    """The Triton path (inputs unchecked: use `attention_stats`)."""
    _check_triton_device(q)
    maps = torch.ops.sgfast.attention_maps(q, k, token_index, float(scale))
    sums = maps @ moment_columns(height, width, maps.dtype, maps.device) if return_sums else None
    return sums, (maps if return_maps else None)


# ---------------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------------


def _check_inputs(q, k, token_index, height, width, impl, check_tokens=True):
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
    if check_tokens:
        _check_token_range(token_index, t)


def _check_token_range(token_index, keys):
    """Token indices in [0, T). On the CPU a plain check; on CUDA an asynchronous device assert (a
    host read would synchronise every captured layer and is illegal in CUDA-graph capture); none
    while torch.compile traces or on the meta device. The kernels compare indices and never use them
    as offsets, so a bad index cannot read out of bounds even unchecked."""
    if token_index.numel() == 0 or token_index.device.type == "meta" or torch.compiler.is_compiling():
        return
    if token_index.device.type == "cuda":
        torch._assert_async(((token_index >= 0) & (token_index < keys)).all(),
                            f"attention_stats: token_index must lie in [0, {keys})")
        return
    low, high = int(token_index.min()), int(token_index.max())
    if low < 0 or high >= keys:
        raise ValueError(f"attention_stats: token_index must lie in [0, {keys}), got values in [{low}, {high}]")


def attention_stats(q, k, token_index, height, width, scale=None, return_maps=True, impl="auto", check_tokens=True,
                    return_sums=True):
    """Selected-token cross-attention maps and their (mass, x-moment, y-moment) sums.

    q [B, heads, N, d] (N = height * width, row-major), k [B, heads, T, d] (same dtype),
    token_index [B, S] integer key columns in [0, T), scale defaults to d ** -0.5.
    impl: "torch" (reference), "triton" (fused kernels: CUDA, or CPU with TRITON_INTERPRET=1), or
    "auto" (Triton on CUDA, the reference elsewhere).
    Returns `(sums [B, S, 3] or None, maps [B, S, N] or None)`, float32 (float64 for float64 inputs).
    Differentiable in q and k. `check_tokens=False`: the caller has checked token_index's range
    once on the host (a per-call check instead of a device read per layer); `return_sums=False`:
    the maps alone.
    """
    _check_inputs(q, k, token_index, height, width, impl, check_tokens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "triton" if (HAS_TRITON and q.is_cuda) else "torch"
    if impl == "torch":
        return attention_stats_reference(q, k, token_index, height, width, scale, return_maps, return_sums)
    return fused_attention_stats(q, k, token_index, height, width, scale, return_maps, return_sums)
