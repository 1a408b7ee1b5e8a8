"""Joint-attention statistics for self-guidance on MMDiT models (SD3, SD3.5, FLUX): one op, Triton
kernels + autograd + torch reference.

An MMDiT block attends over image and text tokens together. For the image queries `q` [B, heads, N, d]
over an H x W grid (position p = i * W + j), the image keys `k_img` [B, heads, M, d] and the text keys
`k_txt` [B, heads, T, d] -- all taken after the block's rotary embeddings and QK norm, as the
attention itself sees them -- the op computes, with the softmax over ALL joint keys (the row
normaliser includes the image keys),

    L[b, h, p] = logsumexp_j(scale * q[b, h, p] . k_j)      over j in image keys and text keys
    P[b, h, p, t] = exp(scale * q[b, h, p] . k_txt[b, h, t] - L[b, h, p])
    maps[b, s, p] = mean_h P[b, h, p, token_index[b, s]]                                   [B, S, N]
    sums[b, s]    = (sum_p maps, sum_p x_p * maps, sum_p y_p * maps)                      [B, S, 3]

with pixel-centre coordinates x_p = (j + 0.5) / W, y_p = (i + 0.5) / H (mass, x-moment, y-moment;
the centroid is moment / mass), as `sgfast.kernels.attention_stats` does for cross-attention.
Outputs are float32 (float64 for float64 inputs) whatever the input dtype.

The row logsumexp `lse` [B, heads, N] (natural log) may be passed in: SDPA's flash and efficient
kernels compute it anyway (`aten._scaled_dot_product_flash_attention` returns it; on the CPU
`aten._scaled_dot_product_flash_attention_for_cpu`; `sdpa_with_logsumexp` here). With it the forward
reads only the selected text keys; without it the op computes L itself, online over key tiles (one
Q K^T pass, as flash attention's forward). It is a hint for the forward value only: no gradient flows
into `lse`, and the gradients with respect to q and the keys are the exact ones of the formula above
(L's own dependence on q and every key included), whichever way L was obtained.

Backward. Write G[b, s, p] for the upstream gradient of the maps (the sums' folded in by autograd:
sums = maps @ [1, x, y]), l_j = scale * q_p . k_j the logits of one row (b, h, p), j over all M + T
joint keys. Then

    dmaps/dP:   dP[p, t] = sum_{s: token_index[s] == t} G[s, p] / heads        (zero on image keys)
    softmax:    dl_j = P_j (dP_j - r_p),  r_p = sum_t P_t dP_t = sum_s W[p, s],
                W[p, s] = P[p, token_index[s]] G[s, p] / heads
    dq_p  = scale * sum_j dl_j k_j = scale * (sum_s W[p, s] k_{t_s}  -  r_p sum_j P_j k_j)
    dk_j  = scale * sum_p dl_j q_p = scale * (sum_{s: t_s = j} sum_p W[p, s] q_p  -  sum_p P_j r_p q_p)

The r_p term is the derivative through L: dL/dq_p = scale * sum_j P_j k_j (an attention whose values
are the keys) and dL/dk_j = scale * P_j q_p. So the backward is two dense passes over the joint keys,
as flash attention's backward: per block of queries, O = P @ K (every joint key, for dq), and per
block of keys, dk_dense = -scale * P^T (r * q) (every image query); plus the cheap selected-column
terms (S columns), whose per-block dk shares are summed in a fixed order and put on their text
rows by a one-hot matmul (deterministic; no atomics).

Public entry: `joint_attention_stats(...)`; `joint_attention_stats_reference(...)` is the plain
PyTorch ground truth. `launch_config(...)` is the launch plan; `benchmarks.kernels` compiles exactly
that offline.
"""

import functools
import math
import os

import torch

from sgfast.kernels.attention_stats import moment_columns

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

# The SM count the launch plan aims to fill; None: the device's (8 under the interpreter). Tests override it.
SM_COUNT_OVERRIDE = None

LOG2E = math.log2(math.e)
NAME = "joint_attention_stats"

# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the ground truth, and the CPU implementation.
# ---------------------------------------------------------------------------------------------------


def joint_attention_stats_reference(q, k_img, k_txt, token_index, height, width, scale, lse=None, return_maps=True):
    """Plain PyTorch version of `joint_attention_stats` (differentiable in q, k_img and k_txt by autograd).

    Computes in the input dtype promoted to at least float32 (float64 stays float64) and returns
    `(sums [B, S, 3], maps [B, S, N] or None)` in that dtype. A given `lse` sets the forward value of
    the row normaliser; its gradient is the computed normaliser's (as the fused op). Materialises the
    [B, heads, N, M + T] logits: a reference, not the fast path.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k_img, k_txt = q.to(dtype), k_img.to(dtype), k_txt.to(dtype)
    logits_txt = torch.matmul(q, k_txt.transpose(-1, -2)) * scale  # [B, heads, N, T]
    logits_img = torch.matmul(q, k_img.transpose(-1, -2)) * scale  # [B, heads, N, M]
    row_lse = torch.logsumexp(torch.cat([logits_img, logits_txt], dim=-1), dim=-1)  # [B, heads, N]
    if lse is not None:
        row_lse = lse.detach().to(dtype) + (row_lse - row_lse.detach())  # the given value, the exact gradient
    batch, heads, n, _ = q.shape
    index = token_index[:, None, None, :].expand(batch, heads, n, token_index.shape[1])
    probs = (logits_txt.gather(-1, index) - row_lse[..., None]).exp()  # [B, heads, N, S]
    maps = probs.mean(dim=1).transpose(1, 2)  # [B, S, N]
    sums = maps @ moment_columns(height, width, dtype, q.device)  # [B, S, 3]
    return sums, (maps if return_maps else None)


def sdpa_with_logsumexp(q, k, v, scale=None):
    """(out, lse): scaled dot-product attention [B, heads, L, d] and its row logsumexp [B, heads, L]
    (float32, natural log) from the one kernel call: flash attention on CUDA (fp16/bf16), the
    memory-efficient kernel on CUDA otherwise, the CPU flash kernel on the CPU. `out` is
    differentiable as SDPA's; `lse` is for `joint_attention_stats(lse=...)` (no gradient)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # the efficient kernel pads its rows to a multiple of 32
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse.detach()


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_tile(base, rows, row_mask, stride_row, stride_d, D, BLOCK_D: tl.constexpr):
        """A [rows, BLOCK_D] tile of a [rows, D] matrix (columns past D are zero)."""
        cols = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        return tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_d, mask=mask, other=0.0)

    @triton.jit
    def _online_lse(q, k_base, K, stride_kt, stride_kd, D, qk_scale, m_i, l_i,
                    ACC: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Running row max m_i and sum l_i (log2 domain) of exp2 over K keys, in tiles of BLOCK_M."""
        for m0 in range(0, K, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < K
            k = _load_tile(k_base, offs_m, m_mask, stride_kt, stride_kd, D, BLOCK_D)
            if UPCAST_QK:
                k = k.to(ACC)
            s = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION, out_dtype=ACC) * qk_scale
            s = tl.where(m_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new
        return m_i, l_i

    @triton.jit
    def _selected_probs(q, kt_base, tok_ptrs, s_mask, T, stride_kt, stride_kd, D, qk_scale, lse2,
                        ACC: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        """([BLOCK_N, BLOCK_S] probabilities of the selected text keys, [BLOCK_S, BLOCK_D] those keys).
        An index outside [0, T) (never, after the op's check) loads nothing: a masked load."""
        tokens = tl.load(tok_ptrs, mask=s_mask, other=0)
        valid = s_mask & (tokens >= 0) & (tokens < T)
        k_sel = _load_tile(kt_base, tokens, valid, stride_kt, stride_kd, D, BLOCK_D)
        if UPCAST_QK:
            k_sel = k_sel.to(ACC)
        s = tl.dot(q, tl.trans(k_sel), input_precision=QK_PRECISION, out_dtype=ACC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        return tl.where(valid[None, :], p, 0.0), k_sel

    @triton.jit
    def _joint_fwd_kernel(
        q_ptr, ki_ptr, kt_ptr, tok_ptr, lse_ptr, lse_out_ptr, out_ptr,
        N, M, T, D, S, HEADS, HEADS_PER_PROGRAM, qk_scale, inv_heads,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kib, stride_kih, stride_kit, stride_kid,
        stride_ktb, stride_kth, stride_ktt, stride_ktd,
        stride_tb, stride_ts, stride_lb, stride_lh, stride_ln,
        HAS_LSE: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (block of positions, group of heads, batch item), S <= BLOCK_S tokens: per
        head the row normaliser (read from lse_ptr if HAS_LSE, else computed online over the image
        keys then the text keys and written to lse_out [B, heads, N], natural log), the selected
        probabilities, summed over the group's heads (scaled by 1 / heads) into out[b, group, s, p]."""
        ACC: tl.constexpr = out_ptr.dtype.element_ty  # fp32 (fp64 for fp64): a pointer's, not an argument
        pid_n = tl.program_id(0)
        group = tl.program_id(1)
        b = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_s = tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        tok_ptrs = tok_ptr + b * stride_tb + offs_s * stride_ts

        acc = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
        h_start = group * HEADS_PER_PROGRAM
        h_end = tl.minimum(h_start + HEADS_PER_PROGRAM, HEADS)
        for h in range(h_start, h_end):
            q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_n, n_mask, stride_qn, stride_qd, D, BLOCK_D)
            if UPCAST_QK:  # the interpreter's bf16 dot is wrong; fp32/fp64 inputs are upcast no-ops
                q = q.to(ACC)
            kt_base = kt_ptr + b * stride_ktb + h * stride_kth
            lse_offs = b * stride_lb + h * stride_lh + offs_n * stride_ln
            if HAS_LSE:
                lse2 = tl.load(lse_ptr + lse_offs, mask=n_mask, other=0.0).to(ACC) * 1.4426950408889634
            else:
                # Rows past N loaded q = 0: logits 0, the row stays finite.
                m_i = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
                l_i = tl.zeros([BLOCK_N], dtype=ACC)
                m_i, l_i = _online_lse(q, ki_ptr + b * stride_kib + h * stride_kih, M, stride_kit, stride_kid, D,
                                       qk_scale, m_i, l_i, ACC, UPCAST_QK, QK_PRECISION, BLOCK_M, BLOCK_D)
                m_i, l_i = _online_lse(q, kt_base, T, stride_ktt, stride_ktd, D,
                                       qk_scale, m_i, l_i, ACC, UPCAST_QK, QK_PRECISION, BLOCK_M, BLOCK_D)
                lse2 = m_i + tl.log2(l_i)
                tl.store(lse_out_ptr + (b * HEADS + h) * N + offs_n, lse2 * 0.6931471805599453, mask=n_mask)
            p, _ = _selected_probs(q, kt_base, tok_ptrs, s_mask, T, stride_ktt, stride_ktd, D, qk_scale, lse2,
                                   ACC, UPCAST_QK, QK_PRECISION, BLOCK_D)
            acc += p
        out_base = out_ptr + (b * tl.num_programs(1) + group) * S * N
        tl.store(out_base + offs_s[None, :] * N + offs_n[:, None], acc * inv_heads,
                 mask=n_mask[:, None] & s_mask[None, :])

    @triton.jit
    def _probs_times_keys(q, k_base, K, stride_kt, stride_kd, D, qk_scale, lse2, o,
                          ACC: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr,
                          PV_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """o + P @ K over K keys in tiles of BLOCK_M, P = exp2(logits2 - lse2)."""
        for m0 in range(0, K, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < K
            k = _load_tile(k_base, offs_m, m_mask, stride_kt, stride_kd, D, BLOCK_D)
            kq = k
            if UPCAST_QK:
                kq = k.to(ACC)
            s = tl.dot(q, tl.trans(kq), input_precision=QK_PRECISION, out_dtype=ACC) * qk_scale
            p = tl.where(m_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            # K in fp16/bf16 is exact in tf32: the dot's only rounding is P's, to tf32 (fp16's size).
            o += tl.dot(p, k.to(ACC), input_precision=PV_PRECISION, out_dtype=ACC)
        return o

    @triton.jit
    def _joint_bwd_dq_kernel(
        q_ptr, ki_ptr, kt_ptr, tok_ptr, lse_ptr, g_ptr, dq_ptr, r_ptr, dks_ptr,
        N, M, T, D, S, qk_scale, scale, inv_heads,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kib, stride_kih, stride_kit, stride_kid,
        stride_ktb, stride_kth, stride_ktt, stride_ktd,
        stride_tb, stride_ts, stride_lb, stride_lh, stride_ln,
        WRITE_DK: tl.constexpr, UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (block of positions, head, batch item):
        W = P_sel * G / heads over S tokens in chunks of BLOCK_S, r = rowsum W, then
        dq = scale * (W @ K_sel - r * (P @ K)) with P @ K over every joint key (image, then text).
        If WRITE_DK: r to r_ptr [B, heads, N] and this block's W^T @ Q to dks [B, heads, blocks, S, D]."""
        ACC: tl.constexpr = g_ptr.dtype.element_ty  # the maps' gradient comes in the accumulation dtype
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        HEADS = tl.num_programs(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q_raw = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_n, n_mask, stride_qn, stride_qd, D, BLOCK_D)
        q = q_raw
        if UPCAST_QK:
            q = q.to(ACC)
        lse2 = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_n * stride_ln, mask=n_mask,
                       other=0.0).to(ACC) * 1.4426950408889634
        kt_base = kt_ptr + b * stride_ktb + h * stride_kth
        ki_base = ki_ptr + b * stride_kib + h * stride_kih

        # The selected columns: W, r, W @ K_sel (and W^T @ Q for dk).
        r = tl.zeros([BLOCK_N], dtype=ACC)
        dq_sel = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < S
            p, k_sel = _selected_probs(q, kt_base, tok_ptr + b * stride_tb + offs_s * stride_ts, s_mask, T,
                                       stride_ktt, stride_ktd, D, qk_scale, lse2, ACC, UPCAST_QK, QK_PRECISION,
                                       BLOCK_D)
            g = tl.load(g_ptr + (b * S + offs_s[None, :]) * N + offs_n[:, None],
                        mask=n_mask[:, None] & s_mask[None, :], other=0.0)
            w = p * g * inv_heads  # zero on rows past N (g = 0) and on padding tokens (p = 0)
            r += tl.sum(w, axis=1)
            dq_sel += tl.dot(w, k_sel.to(ACC), input_precision=PV_PRECISION, out_dtype=ACC)
            if WRITE_DK:
                dks = tl.dot(tl.trans(w), q_raw.to(ACC), input_precision=PV_PRECISION, out_dtype=ACC)
                dks_base = dks_ptr + ((b * HEADS + h) * tl.num_programs(0) + pid_n) * S * D
                tl.store(dks_base + offs_s[:, None] * D + offs_d[None, :], dks * scale,
                         mask=s_mask[:, None] & d_mask[None, :])

        # The normaliser's term: O = P @ K over every joint key.
        o = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        o = _probs_times_keys(q, ki_base, M, stride_kit, stride_kid, D, qk_scale, lse2, o,
                              ACC, UPCAST_QK, QK_PRECISION, PV_PRECISION, BLOCK_M, BLOCK_D)
        o = _probs_times_keys(q, kt_base, T, stride_ktt, stride_ktd, D, qk_scale, lse2, o,
                              ACC, UPCAST_QK, QK_PRECISION, PV_PRECISION, BLOCK_M, BLOCK_D)
        dq = (dq_sel - r[:, None] * o) * scale
        tl.store(dq_ptr + ((b * HEADS + h) * N + offs_n[:, None]) * D + offs_d[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])
        if WRITE_DK:
            tl.store(r_ptr + (b * HEADS + h) * N + offs_n, r, mask=n_mask)

    @triton.jit
    def _joint_bwd_dk_kernel(
        q_ptr, k_ptr, lse_ptr, r_ptr, dk_ptr,
        N, K, D, qk_scale, neg_scale,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_lb, stride_lh, stride_ln,
        UPCAST_QK: tl.constexpr, QK_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (block of keys, head, batch item): the normaliser's share of dk,
        -scale * P^T @ (r * Q) over every image query, to dk [B, heads, K, D] (accumulation dtype)."""
        ACC: tl.constexpr = dk_ptr.dtype.element_ty
        pid_k = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        HEADS = tl.num_programs(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_tile(k_ptr + b * stride_kb + h * stride_kh, offs_k, k_mask, stride_kt, stride_kd, D, BLOCK_D)
        if UPCAST_QK:
            k = k.to(ACC)
        q_base = q_ptr + b * stride_qb + h * stride_qh
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            q = _load_tile(q_base, offs_n, n_mask, stride_qn, stride_qd, D, BLOCK_D)
            qk = q
            if UPCAST_QK:
                qk = q.to(ACC)
            lse2 = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_n * stride_ln, mask=n_mask,
                           other=0.0).to(ACC) * 1.4426950408889634
            r = tl.load(r_ptr + (b * HEADS + h) * N + offs_n, mask=n_mask, other=0.0)
            s = tl.dot(k, tl.trans(qk), input_precision=QK_PRECISION, out_dtype=ACC) * qk_scale  # [BLOCK_K, BLOCK_N]
            # r * P in fp32 (r can be far below fp16's range); Q is exact in tf32.
            pr = tl.where(n_mask[None, :], tl.exp2(s - lse2[None, :]) * r[None, :], 0.0)
            acc += tl.dot(pr, q.to(ACC), input_precision=PV_PRECISION, out_dtype=ACC)
        tl.store(dk_ptr + ((b * HEADS + h) * K + offs_k[:, None]) * D + offs_d[None, :], acc * neg_scale,
                 mask=k_mask[:, None] & (offs_d < D)[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch plan
# ---------------------------------------------------------------------------------------------------

# Program tiles of at most 32 rows (mma.sync; 64-row tiles become Hopper's wgmma, see
# attention_stats); 64-wide inner tiles. The interpreter takes 16 everywhere, so that tiny test
# shapes cross several tiles.
BLOCK_ROWS, BLOCK_INNER, BLOCK_INTERPRET = 32, 64, 16
# Selected tokens per launch (the forward accumulates all of them in registers; more are chunked).
MAX_BLOCK_S = 64
# Programs per SM the plan aims for: the forward with `lse` given is memory-bound (one wave is
# enough); computing the normaliser is a Q K^T pass, which wants several programs per SM.
PROGRAMS_PER_SM = {"lse given": 0.9, "lse computed": 4.0}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _next_power_of_2(x):
    return 1 << max(x - 1, 0).bit_length()


def _precisions(dtype, interpret):
    """input_precision of Q @ K^T (on the input tiles) and of P @ K / W @ K / P^T @ Q (fp32 P on the
    input dtype's K or Q, exact in tf32). fp16/bf16: native tensor-core tiles, then tf32; fp32:
    tf32x3 (fp32-level error on tensor cores); fp64 and the interpreter: ieee."""
    if dtype == torch.float64 or interpret:
        return "ieee", "ieee"
    if dtype == torch.float32:
        return "tf32x3", "tf32x3"
    return "tf32", "tf32"


def device_sm_count(device):
    if SM_COUNT_OVERRIDE is not None:
        return SM_COUNT_OVERRIDE
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(kernel, batch, heads, n, head_dim, image_keys, text_keys, selected, dtype, sms,
                  has_lse=False, interpret=INTERPRET, num_warps=None, num_stages=None):
    """The launch of `kernel` ("forward", "backward_dq" or "backward_dk_image" / "backward_dk_text")
    for these shapes: `grid`, `groups` and `heads_per_program` (forward: head groups, the partial
    maps' second dim) and `meta` (the kernels' constexprs, num_warps, num_stages). The forward takes
    at most MAX_BLOCK_S tokens (`selected` beyond that: one launch per chunk) and puts as many heads
    in one program as the programs-per-SM target allows."""
    kernels = ("forward", "backward_dq", "backward_dk_image", "backward_dk_text")
    if kernel not in kernels:
        raise ValueError(f"kernel must be one of {kernels}, got {kernel!r}")
    rows, inner = (BLOCK_INTERPRET, BLOCK_INTERPRET) if interpret else (BLOCK_ROWS, BLOCK_INNER)
    block_d = max(16, _next_power_of_2(head_dim))
    block_s = min(MAX_BLOCK_S, max(16, _next_power_of_2(selected)))
    qk, pv = _precisions(dtype, interpret)
    meta = dict(UPCAST_QK=interpret or dtype in (torch.float32, torch.float64), QK_PRECISION=qk, BLOCK_D=block_d,
                num_warps=num_warps or 4, num_stages=num_stages or 2)
    if kernel.startswith("backward_dk"):
        keys = image_keys if kernel == "backward_dk_image" else text_keys
        meta.update(PV_PRECISION=pv, BLOCK_K=rows, BLOCK_N=inner)
        return {"grid": (max(1, triton.cdiv(keys, rows)), heads, batch), "groups": heads, "heads_per_program": 1,
                "meta": meta}
    blocks = triton.cdiv(n, rows)
    meta.update(BLOCK_N=rows, BLOCK_M=inner, BLOCK_S=block_s)
    if kernel == "backward_dq":
        meta["PV_PRECISION"] = pv
        return {"grid": (blocks, heads, batch), "groups": heads, "heads_per_program": 1, "meta": meta}
    meta["HAS_LSE"] = has_lse
    target = math.ceil(PROGRAMS_PER_SM["lse given" if has_lse else "lse computed"] * sms)
    per_program = heads
    while per_program > 1 and triton.cdiv(heads, per_program) * blocks * batch < target:
        per_program -= 1
    groups = triton.cdiv(heads, per_program)
    return {"grid": (blocks, groups, batch), "groups": groups, "heads_per_program": per_program, "meta": meta}


def _config_for(kernel, q, k_img, k_txt, selected, has_lse=False):
    batch, heads, n, d = q.shape
    return launch_config(kernel, batch, heads, n, d, k_img.shape[2], k_txt.shape[2], selected, q.dtype,
                         device_sm_count(q.device), has_lse=has_lse)


def _new_output(shape, dtype, device):
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def launch_forward(q, k_img, k_txt, token_index, lse, scale, cfg, lse_out):
    """The forward kernel with launch `cfg` for at most MAX_BLOCK_S tokens: maps [B, S, N]. With
    `lse` None it computes the normaliser and writes it to `lse_out` [B, heads, N] (natural log)."""
    batch, heads, n, d = q.shape
    s = token_index.shape[1]
    groups = cfg["groups"]
    acc = _acc_dtype(q.dtype)
    out = _new_output((batch, s, n) if groups == 1 else (batch, groups, s, n), acc, q.device)
    lse_in = lse_out if lse is None else lse  # unread when not HAS_LSE; a real tensor for the strides
    _launcher(_joint_fwd_kernel)[cfg["grid"]](
        q, k_img, k_txt, token_index, lse_in, lse_out, out,
        n, k_img.shape[2], k_txt.shape[2], d, s, heads, cfg["heads_per_program"], float(scale) * LOG2E, 1.0 / heads,
        *q.stride(), *k_img.stride(), *k_txt.stride(), *token_index.stride(), *lse_in.stride(),
        **cfg["meta"],
    )
    # One group writes the maps themselves; several write partial maps, summed in a fixed order.
    return out if groups == 1 else out.sum(dim=1)


def launch_backward_dq(q, k_img, k_txt, token_index, lse, grad_maps, scale, cfg, with_dk):
    """dq (q's dtype, contiguous) and, if `with_dk`, r [B, heads, N] and the selected columns' dk
    shares [B, heads, blocks, S, d] (accumulation dtype); else empty tensors."""
    batch, heads, n, d = q.shape
    s = token_index.shape[1]
    acc = _acc_dtype(q.dtype)
    blocks = cfg["grid"][0]
    dq = _new_output(q.shape, q.dtype, q.device)
    r = _new_output((batch, heads, n) if with_dk else (1,), acc, q.device)  # (1,): unused
    dks = _new_output((batch, heads, blocks, s, d) if with_dk else (1,), acc, q.device)
    _launcher(_joint_bwd_dq_kernel)[cfg["grid"]](
        q, k_img, k_txt, token_index, lse, grad_maps, dq, r, dks,
        n, k_img.shape[2], k_txt.shape[2], d, s, float(scale) * LOG2E, float(scale), 1.0 / heads,
        *q.stride(), *k_img.stride(), *k_txt.stride(), *token_index.stride(), *lse.stride(),
        WRITE_DK=with_dk, **cfg["meta"],
    )
    return dq, r, dks


def launch_backward_dk(q, k, lse, r, scale, cfg):
    """The normaliser's share of dk for the keys `k` (image or text): [B, heads, K, d], accumulation dtype."""
    batch, heads, n, d = q.shape
    dk = _new_output(k.shape, _acc_dtype(q.dtype), q.device)
    if k.shape[2] == 0:
        return dk
    _launcher(_joint_bwd_dk_kernel)[cfg["grid"]](
        q, k, lse, r, dk,
        n, k.shape[2], d, float(scale) * LOG2E, -float(scale),
        *q.stride(), *k.stride(), *lse.stride(),
        **cfg["meta"],
    )
    return dk


def fused_forward(q, k_img, k_txt, token_index, lse, scale):
    """(maps [B, S, N], the normaliser used [B, heads, N]: `lse` itself, or the computed one)."""
    batch, heads, n, _ = q.shape
    acc = _acc_dtype(q.dtype)
    lse_out = _new_output((batch, heads, n), acc, q.device) if lse is None else lse
    chunks = []
    for s0 in range(0, max(token_index.shape[1], 1), MAX_BLOCK_S):
        tokens = token_index[:, s0:s0 + MAX_BLOCK_S]
        given = lse is not None or s0 > 0  # later chunks read the normaliser the first one wrote
        cfg = _config_for("forward", q, k_img, k_txt, tokens.shape[1], has_lse=given)
        chunks.append(launch_forward(q, k_img, k_txt, tokens, lse_out if given else None, scale, cfg, lse_out))
    return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0], lse_out


def fused_backward(q, k_img, k_txt, token_index, lse, grad_maps, scale, with_dk):
    """(dq, dk_img, dk_txt) in the inputs' dtypes; the dk's empty unless `with_dk`."""
    grad_maps = grad_maps.to(_acc_dtype(q.dtype)).contiguous()
    s = token_index.shape[1]
    dq, r, dks = launch_backward_dq(q, k_img, k_txt, token_index, lse, grad_maps, scale,
                                    _config_for("backward_dq", q, k_img, k_txt, s), with_dk)
    if not with_dk:
        return dq, k_img.new_empty((0,)), k_txt.new_empty((0,))
    dk_img = launch_backward_dk(q, k_img, lse, r, scale, _config_for("backward_dk_image", q, k_img, k_txt, s))
    dk_txt = launch_backward_dk(q, k_txt, lse, r, scale, _config_for("backward_dk_text", q, k_img, k_txt, s))
    # The selected columns' shares: summed over position blocks in a fixed order, then put on their
    # text rows by a one-hot matmul (a token selected twice gets both).
    one_hot = (token_index[:, :, None] == torch.arange(k_txt.shape[2], device=q.device)).to(dks.dtype)  # [B, S, T]
    dk_txt = dk_txt + torch.einsum("bst,bhsd->bhtd", one_hot, dks.sum(dim=2))
    return dq, dk_img.to(k_img.dtype), dk_txt.to(k_txt.dtype)


# ---------------------------------------------------------------------------------------------------
# The op: Triton launches registered with torch.library
# ---------------------------------------------------------------------------------------------------


def _check_triton_device(q):
    if not HAS_TRITON:
        raise RuntimeError(f"{NAME}: the Triton path needs the `triton` package")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"{NAME}: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "sgfast.kernels is imported (to run the kernels on the CPU through the interpreter)"
        )


if HAS_TRITON:
    from typing import Optional

    from torch.library import custom_op, triton_op, wrap_triton

    if INTERPRET:
        # Under the interpreter the ops are opaque custom ops with fake kernels (see attention_stats).
        _define_op, _launcher = custom_op, (lambda kernel: kernel)
    else:
        _define_op, _launcher = triton_op, wrap_triton

    @_define_op("sgfast::joint_attention_maps", mutates_args=())
    def _joint_attention_maps(
        q: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, token_index: torch.Tensor,
        lse: Optional[torch.Tensor], scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps [B, S, N], the computed normaliser [B, heads, N]; empty when `lse` is given)."""
        maps, lse_out = fused_forward(q, k_img, k_txt, token_index, lse, scale)
        return maps, (lse_out if lse is None else q.new_empty((0,), dtype=_acc_dtype(q.dtype)))

    @_define_op("sgfast::joint_attention_maps_backward", mutates_args=())
    def _joint_attention_maps_backward(
        q: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, token_index: torch.Tensor, lse: torch.Tensor,
        grad_maps: torch.Tensor, scale: float, with_dk: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk_img, dk_txt) of `sgfast::joint_attention_maps` (first order); the dk's empty unless `with_dk`."""
        return fused_backward(q, k_img, k_txt, token_index, lse, grad_maps, scale, with_dk)

    def _setup_context(ctx, inputs, output):
        q, k_img, k_txt, token_index, lse, scale = inputs
        _, lse_out = output
        # Not the probabilities: the backward recomputes them from the normaliser.
        ctx.save_for_backward(q, k_img, k_txt, token_index, lse_out if lse is None else lse)
        ctx.scale = scale

    def _backward(ctx, grad_maps, _grad_lse):
        q, k_img, k_txt, token_index, lse = ctx.saved_tensors
        need_dq, need_ki, need_kt = ctx.needs_input_grad[:3]
        if grad_maps is None or not (need_dq or need_ki or need_kt):
            return None, None, None, None, None, None
        dq, dk_img, dk_txt = _joint_attention_maps_backward(q, k_img, k_txt, token_index, lse, grad_maps,
                                                            ctx.scale, need_ki or need_kt)
        return (dq if need_dq else None), (dk_img if need_ki else None), (dk_txt if need_kt else None), None, None, None

    _joint_attention_maps.register_autograd(_backward, setup_context=_setup_context)

    if INTERPRET:
        @_joint_attention_maps.register_fake
        def _(q, k_img, k_txt, token_index, lse, scale):
            batch, heads, n, _ = q.shape
            acc = _acc_dtype(q.dtype)
            return (q.new_empty((batch, token_index.shape[1], n), dtype=acc),
                    q.new_empty((batch, heads, n) if lse is None else (0,), dtype=acc))

        @_joint_attention_maps_backward.register_fake
        def _(q, k_img, k_txt, token_index, lse, grad_maps, scale, with_dk):
            return (q.new_empty(q.shape), k_img.new_empty(k_img.shape if with_dk else (0,)),
                    k_txt.new_empty(k_txt.shape if with_dk else (0,)))


def fused_joint_attention_stats(q, k_img, k_txt, token_index, height, width, scale, lse=None, return_maps=True):
    """The Triton path (inputs unchecked: use `joint_attention_stats`)."""
    _check_triton_device(q)
    if lse is not None:
        lse = lse.detach()
    maps, _ = torch.ops.sgfast.joint_attention_maps(q, k_img, k_txt, token_index, lse, float(scale))
    sums = maps @ moment_columns(height, width, maps.dtype, maps.device)
    return sums, (maps if return_maps else None)


# ---------------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------------


def _check_inputs(q, k_img, k_txt, token_index, height, width, lse, impl):
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{NAME}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    named = [("q", q, 4), ("k_img", k_img, 4), ("k_txt", k_txt, 4), ("token_index", token_index, 2)]
    if lse is not None:
        named.append(("lse", lse, 3))
    for name, tensor, rank in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{NAME}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise ValueError(f"{NAME}: {name} must have {rank} dims, got shape {tuple(tensor.shape)}")
    if not q.is_floating_point() or not q.dtype == k_img.dtype == k_txt.dtype:
        raise ValueError(
            f"{NAME}: q, k_img and k_txt must share one floating dtype, got {q.dtype}, {k_img.dtype} and {k_txt.dtype}"
        )
    if token_index.dtype.is_floating_point or token_index.dtype.is_complex or token_index.dtype == torch.bool:
        raise ValueError(f"{NAME}: token_index must be an integer tensor, got {token_index.dtype}")
    devices = [t.device for _, t, _ in named]
    if len(set(devices)) != 1:
        raise ValueError(f"{NAME}: {', '.join(n for n, _, _ in named)} must be on one device, got "
                         f"{', '.join(str(d) for d in devices)}")
    batch, heads, n, d = q.shape
    for name, k in (("k_img", k_img), ("k_txt", k_txt)):
        if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, d):
            raise ValueError(f"{NAME}: {name} [B, heads, keys, d] does not match q [B, heads, N, d]: "
                             f"{tuple(k.shape)} vs {tuple(q.shape)}")
    if k_txt.shape[2] == 0:
        raise ValueError(f"{NAME}: k_txt must hold at least one text key, got shape {tuple(k_txt.shape)}")
    if token_index.shape[0] != batch:
        raise ValueError(f"{NAME}: token_index has batch {token_index.shape[0]}, q has {batch}")
    if lse is not None and (tuple(lse.shape) != (batch, heads, n) or not lse.is_floating_point()):
        raise ValueError(f"{NAME}: lse must be a floating [B, heads, N] = {(batch, heads, n)} tensor, got "
                         f"{lse.dtype} of shape {tuple(lse.shape)}")
    if height * width != n:
        raise ValueError(f"{NAME}: height * width = {height} * {width} != N = {n}")
    _check_token_range(token_index, k_txt.shape[2])


def _check_token_range(token_index, keys):
    """Token indices in [0, T): a plain check on the CPU, an asynchronous device assert on CUDA (no
    host sync; legal in CUDA-graph capture), none while torch.compile traces or on the meta device.
    The kernels mask every load by the range, so a bad index cannot read out of bounds even unchecked."""
    if token_index.numel() == 0 or token_index.device.type == "meta" or torch.compiler.is_compiling():
        return
    if token_index.device.type == "cuda":
        torch._assert_async(((token_index >= 0) & (token_index < keys)).all(),
                            f"{NAME}: token_index must lie in [0, {keys})")
        return
    low, high = int(token_index.min()), int(token_index.max())
    if low < 0 or high >= keys:
        raise ValueError(f"{NAME}: token_index must lie in [0, {keys}), got values in [{low}, {high}]")


def joint_attention_stats(q, k_img, k_txt, token_index, height, width, scale=None, lse=None, return_maps=True,
                          impl="auto"):
    """Selected text tokens' maps over the image and their (mass, x-moment, y-moment) sums, from joint
    (image + text) attention with the softmax over all joint keys.

    Signature (stable):
      q            [B, heads, N, d]  image queries, N = height * width (row-major), after rotary / QK norm
      k_img        [B, heads, M, d]  image keys (M = N in MMDiT self-attention), after rotary / QK norm
      k_txt        [B, heads, T, d]  text keys, after rotary / QK norm
      token_index  [B, S]            integer text-key columns in [0, T) (a column may repeat)
      scale        softmax scale (default d ** -0.5)
      lse          optional [B, heads, N] natural-log row logsumexp of scale * q @ [k_img; k_txt]^T, e.g.
                   from `sdpa_with_logsumexp` (image rows of the joint sequence); a forward hint only
      impl         "torch" (reference), "triton" (fused kernels: CUDA, or CPU with TRITON_INTERPRET=1),
                   or "auto" (Triton on CUDA, the reference elsewhere)
    q, k_img and k_txt share one dtype; slices of a joint tensor (k[:, :, :N] and k[:, :, N:] in SD3's
    [image, text] order, k[:, :, T:] and k[:, :, :T] in FLUX's [text, image]) are fine as they are.
    Returns `(sums [B, S, 3], maps [B, S, N] or None)`, float32 (float64 for float64 inputs).
    Differentiable in q, k_img and k_txt (exact gradients, through the normaliser too).
    """
    _check_inputs(q, k_img, k_txt, token_index, height, width, lse, impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "triton" if (HAS_TRITON and q.is_cuda) else "torch"
    if impl == "torch":
        return joint_attention_stats_reference(q, k_img, k_txt, token_index, height, width, scale, lse, return_maps)
    return fused_joint_attention_stats(q, k_img, k_txt, token_index, height, width, scale, lse, return_maps)
