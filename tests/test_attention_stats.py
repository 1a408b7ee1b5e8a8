"""attention_stats: the Triton kernels (compiled on CUDA where there is a GPU, through the interpreter
on the CPU elsewhere; see conftest.py) against a float64 torch reference, the reference against a
naive loop, gradients, the custom op, the launch plan, and input checks."""

import importlib
import math

import pytest
import torch

from sgfast.kernels import attention_stats, attention_stats_reference

# The package attribute `sgfast.kernels.attention_stats` is the function; this is the module.
ops = importlib.import_module("sgfast.kernels.attention_stats")

needs_triton = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (Linux)")
# The kernels run compiled on CUDA, or through the interpreter on the CPU (conftest.py chooses).
DEVICE = "cpu" if ops.INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write cannot pass."""
    monkeypatch.setattr(ops, "DEBUG_POISON_OUTPUTS", True)


def make_inputs(seed, batch, heads, height, width, keys, selected, head_dim, dtype, strided=False, spread=1.0):
    """Random q [B, heads, N, d], k [B, heads, T, d] and token_index [B, S]. `strided` builds q and k
    as the transposed views attention processors pass (x.view(B, N, heads, d).transpose(1, 2)).
    Row 0 always selects key 0 and key T-1 (the padding edge) and, with S >= 3, one key twice."""
    g = torch.Generator().manual_seed(seed)
    n = height * width
    if strided:
        q = torch.randn(batch, n, heads, head_dim, generator=g).transpose(1, 2)
        k = torch.randn(batch, keys, heads, head_dim, generator=g).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, n, head_dim, generator=g)
        k = torch.randn(batch, heads, keys, head_dim, generator=g)
    token_index = torch.randint(0, keys, (batch, selected), generator=g)
    token_index[0, 0] = 0
    if selected >= 2:
        token_index[0, 1] = keys - 1
    if selected >= 3:
        token_index[0, 2] = token_index[0, 1]
    return (q * spread).to(dtype), k.to(dtype), token_index


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def naive_stats(q, k, token_index, height, width, scale):
    """Loops over batch, selected tokens, heads and positions with explicit moment formulas."""
    batch, heads, _, _ = q.shape
    selected = token_index.shape[1]
    sums = torch.zeros(batch, selected, 3, dtype=torch.float64)
    maps = torch.zeros(batch, selected, height * width, dtype=torch.float64)
    for b in range(batch):
        for s in range(selected):
            t = int(token_index[b, s])
            for i in range(height):
                for j in range(width):
                    p = i * width + j
                    value = 0.0
                    for h in range(heads):
                        logits = [scale * float(q[b, h, p] @ k[b, h, u]) for u in range(k.shape[2])]
                        top = max(logits)
                        weights = [math.exp(x - top) for x in logits]
                        value += weights[t] / sum(weights) / heads
                    maps[b, s, p] = value
                    sums[b, s, 0] += value
                    sums[b, s, 1] += (j + 0.5) / width * value
                    sums[b, s, 2] += (i + 0.5) / height * value
    return sums, maps


# ---------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(3, 4), (5, 7)])  # 5 x 7: centres not exact in float32
def test_reference_matches_naive_loop(height, width):
    q, k, token_index = make_inputs(0, batch=2, heads=2, height=height, width=width, keys=5, selected=3,
                                    head_dim=3, dtype=torch.float64, spread=2.0)
    sums, maps = attention_stats_reference(q, k, token_index, height, width, scale=0.7)
    want_sums, want_maps = naive_stats(q, k, token_index, height, width, scale=0.7)
    torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(maps, want_maps, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, out", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_reference_output_dtype(dtype, out):
    q, k, token_index = make_inputs(1, 1, 2, 2, 3, 7, 2, 8, dtype)
    sums, maps = attention_stats(q, k, token_index, 2, 3, impl="torch")
    assert sums.dtype == maps.dtype == out
    assert sums.shape == (1, 2, 3) and maps.shape == (1, 2, 6)


def test_reference_gradcheck():
    q, k, token_index = make_inputs(2, 1, 2, 2, 2, 5, 3, 3, torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: attention_stats_reference(q, k, token_index, 2, 2, 0.5), (q, k)
    )


def test_auto_uses_reference_on_cpu():
    q, k, token_index = make_inputs(3, 2, 2, 3, 3, 13, 2, 16, torch.float32)
    got = attention_stats(q, k, token_index, 3, 3, impl="auto")
    want = attention_stats_reference(q, k, token_index, 3, 3, scale=16**-0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the dispatch reads of one, on a machine without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("has_triton", [True, False])
def test_auto_takes_triton_for_cuda_tensors_when_it_can(monkeypatch, has_triton):
    """impl="auto": the fused kernels for CUDA tensors when Triton is installed, else the reference,
    with the scale and return_maps passed on (d ** -0.5 by default)."""
    q, k, token_index = make_inputs(4, 2, 3, 3, 5, 13, 2, 16, torch.float32)
    fused = []
    monkeypatch.setattr(ops, "fused_attention_stats", lambda *args: fused.append(args) or ("fused", args))
    monkeypatch.setattr(ops, "HAS_TRITON", has_triton)
    for scale, return_maps in ((None, True), (0.3, False)):
        got = attention_stats(q.as_subclass(OnCuda), k.as_subclass(OnCuda), token_index, 3, 5, scale=scale,
                              return_maps=return_maps, impl="auto")
        want_scale = 16 ** -0.5 if scale is None else scale
        if has_triton:
            assert got[0] == "fused" and got[1][3:] == (3, 5, want_scale, return_maps, True)
            assert got[1][0] is not None and torch.equal(got[1][0], q)
        else:
            want = attention_stats_reference(q, k, token_index, 3, 5, want_scale, return_maps)
            assert torch.equal(got[0], want[0]) and (got[1] is None) == (not return_maps)
    assert len(fused) == (2 if has_triton else 0)
    attention_stats(q, k, token_index, 3, 5, impl="auto")  # CPU tensors: the reference
    assert len(fused) == (2 if has_triton else 0)


def test_maps_alone_without_the_sums():
    # return_sums=False (what the capture asks for): the same maps, no sums.
    q, k, token_index = make_inputs(4, 2, 3, 3, 5, 13, 2, 16, torch.float32)
    sums, maps = attention_stats(q, k, token_index, 3, 5, impl="torch", return_sums=False)
    assert sums is None and torch.equal(maps, attention_stats(q, k, token_index, 3, 5, impl="torch")[1])


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter) against the float64 reference
# ---------------------------------------------------------------------------------------------------

# dtype, heads, head_dim, T, S, (H, W), strided inputs. N is never a multiple of the interpreter's
# BLOCK_N (16); head dims cover one, two and three d-chunks with masked tails.
CASES = [
    (torch.float32, 1, 40, 77, 1, (5, 7), False),
    (torch.float32, 3, 64, 13, 3, (7, 9), True),
    (torch.float32, 8, 80, 77, 3, (5, 7), False),
    (torch.float32, 3, 160, 13, 1, (1, 35), True),
    (torch.float16, 3, 40, 13, 3, (7, 5), True),
    (torch.float16, 1, 64, 77, 3, (5, 7), False),
    (torch.float16, 3, 80, 13, 1, (7, 9), False),
    (torch.float16, 8, 160, 77, 3, (5, 7), True),
    (torch.bfloat16, 8, 40, 77, 3, (5, 7), False),
    (torch.bfloat16, 3, 64, 77, 1, (7, 5), True),
    (torch.bfloat16, 1, 80, 13, 3, (7, 9), True),
    (torch.bfloat16, 3, 160, 13, 3, (5, 7), False),
]

# dq is written in the input dtype: its error is that dtype's rounding (relative to the largest entry).
DQ_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def case_id(case):
    dtype, heads, head_dim, keys, selected, (h, w), strided = case
    return f"{str(dtype)[6:]}-h{heads}-d{head_dim}-T{keys}-S{selected}-{h}x{w}" + ("-strided" if strided else "")


def check_against_reference(q, k, token_index, height, width, seed, maps_tol=(1e-5, 1e-7)):
    """The fused op on DEVICE against the float64 reference on the same (rounded) inputs, forward
    and backward through both outputs; q may be any strided view."""
    dtype, head_dim = q.dtype, q.shape[-1]
    qd, kd, td = on_device(q, k, token_index)
    qd.requires_grad_(True)
    sums, maps = attention_stats(qd, kd, td, height, width, impl="triton")
    assert sums.dtype == maps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(sums).all() and torch.isfinite(maps).all()  # every element written (poisoned)

    q64 = q.detach().double().requires_grad_(True)
    want_sums, want_maps = attention_stats_reference(q64, k.double(), token_index, height, width, head_dim**-0.5)
    rtol, atol = maps_tol
    torch.testing.assert_close(sums.double().cpu(), want_sums, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(maps.double().cpu(), want_maps, rtol=rtol, atol=atol)

    g = torch.Generator().manual_seed(100 + seed)
    grad_sums = torch.randn(sums.shape, generator=g, dtype=sums.dtype)
    grad_maps = torch.randn(maps.shape, generator=g, dtype=maps.dtype)
    (dq,) = torch.autograd.grad((sums * grad_sums.to(DEVICE)).sum() + (maps * grad_maps.to(DEVICE)).sum(), qd)
    (want_dq,) = torch.autograd.grad(
        (want_sums * grad_sums.double()).sum() + (want_maps * grad_maps.double()).sum(), q64
    )
    assert dq.dtype == dtype and dq.shape == q.shape
    tol = DQ_TOLERANCE[dtype]
    torch.testing.assert_close(dq.double().cpu(), want_dq, rtol=tol, atol=tol * want_dq.abs().max().item())


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case):
    dtype, heads, head_dim, keys, selected, (height, width), strided = case
    seed = CASES.index(case)
    q, k, token_index = make_inputs(seed, 2, heads, height, width, keys, selected, head_dim, dtype,
                                    strided=strided, spread=1.0 + seed % 3)  # spread: sharper softmax rows
    check_against_reference(q, k, token_index, height, width, seed)


@needs_triton
@pytest.mark.parametrize("sms", [1, 10_000], ids=["one-group", "heads-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_every_launch_plan(monkeypatch, sms, dtype):
    # A GPU with few SMs gets all heads in one program; one with many, a program per head (partial
    # maps summed afterwards) and the smallest position blocks.
    monkeypatch.setattr(ops, "SM_COUNT_OVERRIDE", sms)
    cfg = ops.launch_config("forward", 3, 5, 7 * 5, 48, 77, 4, dtype, sms)
    assert cfg["groups"] == (1 if sms == 1 else 5)
    q, k, token_index = make_inputs(40 + sms % 7, 3, 5, 7, 5, 77, 4, 48, dtype, strided=True, spread=2.0)
    check_against_reference(q, k, token_index, 7, 5, seed=41)


@needs_triton
def test_triton_many_tokens_and_cfg_half():
    # A trace records every prompt word: 70 selected tokens (two one-hot chunks of 64), several
    # repeated; q and k the conditional half of a CFG batch of the processors' strided views.
    g = torch.Generator().manual_seed(50)
    heads, n, d, keys = 2, 3 * 7, 40, 77
    q = torch.randn(4, n, heads, d, generator=g).transpose(1, 2)[2:]
    k = torch.randn(4, keys, heads, d, generator=g).transpose(1, 2)[2:]
    token_index = torch.randint(0, keys, (2, 70), generator=g)
    token_index[:, 60:] = token_index[:, :10]
    assert not q.is_contiguous() and q.storage_offset() > 0
    check_against_reference(q, k, token_index, 3, 7, seed=50)


@needs_triton
def test_triton_large_logits_stay_finite():
    # Logits in the hundreds: the row max must be subtracted before exp.
    q, k, token_index = make_inputs(20, 1, 2, 3, 5, 13, 3, 16, torch.float32, spread=60.0)
    sums, maps = attention_stats(*on_device(q, k, token_index), 3, 5, impl="triton")
    want_sums, want_maps = attention_stats_reference(q.double(), k.double(), token_index, 3, 5, 0.25)
    torch.testing.assert_close(maps.double().cpu(), want_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double().cpu(), want_sums, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_return_maps_false(impl):
    q, k, token_index = make_inputs(21, 2, 3, 5, 7, 77, 3, 40, torch.float32)
    if impl == "triton":
        q, k, token_index = on_device(q, k, token_index)
    q.requires_grad_(True)
    sums, maps = attention_stats(q, k, token_index, 5, 7, impl=impl, return_maps=False)
    assert maps is None
    full_sums, _ = attention_stats(q, k, token_index, 5, 7, impl=impl, return_maps=True)
    assert torch.equal(sums, full_sums)

    # Gradient through the sums alone: the same with and without maps (unused maps get no gradient).
    grad_sums = torch.randn(sums.shape, generator=torch.Generator().manual_seed(5)).to(sums.device)
    (dq,) = torch.autograd.grad((sums * grad_sums).sum(), q)
    (dq_full,) = torch.autograd.grad((full_sums * grad_sums).sum(), q)
    torch.testing.assert_close(dq, dq_full, rtol=1e-6, atol=1e-9)


@needs_triton
def test_triton_gradient_through_maps_only():
    q, k, token_index = on_device(*make_inputs(22, 2, 2, 3, 7, 13, 2, 24, torch.float32))
    q.requires_grad_(True)
    _, maps = attention_stats(q, k, token_index, 3, 7, impl="triton")
    (dq,) = torch.autograd.grad(maps.square().sum(), q)
    _, want_maps = attention_stats_reference(q, k, token_index, 3, 7, 24**-0.5)
    (want_dq,) = torch.autograd.grad(want_maps.square().sum(), q)
    torch.testing.assert_close(dq, want_dq, rtol=1e-5, atol=1e-7)


@needs_triton
def test_triton_gradcheck_float64():
    # Two position blocks (N = 20), a token selected twice, head dim below the 16-wide tile.
    q, k, token_index = on_device(*make_inputs(23, 2, 2, 4, 5, 13, 3, 8, torch.float64))
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q: attention_stats(q, k, token_index, 4, 5, impl="triton"), (q,), fast_mode=True
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_triton_gradient_for_k(dtype):
    # k requiring a gradient (a UNet whose weights are not frozen): the fused backward gives it,
    # summed over position blocks, equal to the float64 reference's.
    q, k, token_index = make_inputs(27, 2, 3, 5, 7, 77, 3, 40, dtype, strided=True, spread=2.0)
    qd, kd, td = on_device(q, k, token_index)
    qd.requires_grad_(True)
    kd.requires_grad_(True)
    sums, maps = attention_stats(qd, kd, td, 5, 7, impl="triton")
    g = torch.Generator().manual_seed(28)
    grad_sums, grad_maps = torch.randn(sums.shape, generator=g), torch.randn(maps.shape, generator=g)
    dq, dk = torch.autograd.grad((sums * grad_sums.to(DEVICE)).sum() + (maps * grad_maps.to(DEVICE)).sum(), (qd, kd))
    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    want_sums, want_maps = attention_stats_reference(q64, k64, token_index, 5, 7, 40**-0.5)
    want_dq, want_dk = torch.autograd.grad(
        (want_sums * grad_sums.double()).sum() + (want_maps * grad_maps.double()).sum(), (q64, k64)
    )
    assert dk.dtype == dtype and dk.shape == k.shape
    tol = DQ_TOLERANCE[dtype]
    torch.testing.assert_close(dk.double().cpu(), want_dk, rtol=tol, atol=tol * want_dk.abs().max().item())
    torch.testing.assert_close(dq.double().cpu(), want_dq, rtol=tol, atol=tol * want_dq.abs().max().item())


@needs_triton
def test_triton_gradcheck_k_float64():
    q, k, token_index = on_device(*make_inputs(29, 1, 2, 4, 5, 13, 3, 8, torch.float64))
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: attention_stats(q, k, token_index, 4, 5, impl="triton"), (q, k), fast_mode=True
    )


@needs_triton
def test_opcheck():
    q, k, token_index = on_device(*make_inputs(24, 1, 2, 2, 3, 13, 2, 8, torch.float64))
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.sgfast.attention_maps.default, (q, k, token_index, 0.3))


@needs_triton
def test_opcheck_backward():
    q, k, token_index = on_device(*make_inputs(25, 1, 2, 2, 3, 13, 2, 8, torch.float32))
    grad_maps = torch.randn(1, 2, 6, device=DEVICE)
    for with_dk in (False, True):
        torch.library.opcheck(torch.ops.sgfast.attention_maps_backward.default,
                              (q, k, token_index, grad_maps, 0.3, with_dk))


@needs_triton
def test_compile_fullgraph_no_graph_break():
    # The op is a triton_op: dynamo traces through it (fullgraph: a graph break is an error) and the
    # compiled gradient equals the eager one. aot_eager: the CPU has no inductor Triton backend.
    q, k, token_index = on_device(*make_inputs(26, 2, 2, 5, 7, 13, 2, 40, torch.float32))
    q.requires_grad_(True)

    def energy(q):
        sums, maps = attention_stats(q, k, token_index, 5, 7, impl="triton")
        centroid = sums[..., 1:] / sums[..., :1]
        return centroid.abs().sum() + maps.square().sum()

    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(energy, backend=backend, fullgraph=True)
    (got,) = torch.autograd.grad(compiled(q), q)
    (want,) = torch.autograd.grad(energy(q), q)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------
# The launch plan (pure arithmetic: the same on any machine)
# ---------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_launch_plan_fills_the_gpu_at_batch_one(sms, kernel):
    from benchmarks.kernel_cases import default_cases

    for case in default_cases(batches=(1,)):
        cfg = ops.launch_config(kernel, 1, case.heads, case.n, case.head_dim, case.keys, case.selected,
                                torch.float16, sms, interpret=False)
        blocks, groups, batch = cfg["grid"]
        assert blocks * groups * batch >= 0.9 * sms, (case, cfg["grid"])
        assert blocks * cfg["meta"]["BLOCK_N"] >= case.n  # every position covered
        if kernel == "forward":
            assert groups * cfg["heads_per_program"] >= case.heads


def planned(kernel, batch, heads, n, head_dim, keys, selected, dtype, sms, interpret, programs_per_sm=0.9):
    """The launch plan written out from its rules by brute force (the docstrings' reading)."""
    target = math.ceil(programs_per_sm * sms)
    block_n = 32 if -(-n // 32) * heads * batch >= target else 16
    blocks = -(-n // block_n)
    block_t = max([16] + [2 ** i for i in range(16) if 2 ** i <= keys])
    rest = keys - block_t
    block_t2 = min(2 ** i for i in range(4, 16) if 2 ** i >= rest) if rest > 0 else 0
    block_d = next((b for b in (64, 32, 16) if head_dim % b == 0), 16)
    even_d = head_dim % 16 == 0
    if dtype == torch.float64 or interpret:
        qk, sel, dq = "ieee", "ieee", "ieee"
    elif dtype == torch.float32:
        qk, sel, dq = "tf32x3", "tf32x3", "tf32x3"
    else:
        qk, sel, dq = "tf32", "tf32x3", "tf32"
    if kernel == "forward":
        stages = 3 if block_d in (16, 32) else 2
    else:
        stages = 3 if block_d == 64 else 1
    meta = dict(UPCAST_QK=interpret or dtype in (torch.float32, torch.float64), QK_PRECISION=qk, SEL_PRECISION=sel,
                HAS_TAIL=rest > 0, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_T2=max(block_t2, 16), BLOCK_D=block_d,
                BLOCK_S=min(64, max(16, min(2 ** i for i in range(12) if 2 ** i >= selected))), EVEN_D=even_d,
                num_warps=4, num_stages=stages)
    if kernel == "backward":
        meta["DQ_PRECISION"] = dq
        return {"grid": (blocks, heads, batch), "groups": heads, "heads_per_program": 1, "meta": meta}
    per_program = max([1] + [p for p in range(1, heads + 1) if -(-heads // p) * blocks * batch >= target])
    groups = -(-heads // per_program)
    return {"grid": (blocks, groups, batch), "groups": groups, "heads_per_program": per_program, "meta": meta}


PLAN_SHAPES = [  # (batch, heads, n, head_dim, keys, selected): odd sizes, the SD layers' and the edges
    (1, 8, 4096, 40, 77, 4), (1, 8, 1024, 80, 77, 3), (2, 8, 256, 160, 77, 1), (1, 5, 64, 64, 77, 64),
    (1, 20, 4096, 64, 77, 2), (3, 1, 35, 48, 13, 65), (1, 1, 1, 8, 1, 1), (1, 3, 63, 24, 16, 16),
    (1, 2, 33, 32, 17, 17), (4, 10, 1024, 96, 64, 5), (1, 8, 9216, 40, 154, 33), (2, 6, 17, 72, 100, 7),
    (1, 7, 544, 64, 77, 4),  # 17 blocks of 32 x 7 heads = 119 programs: exactly the target on 132 SMs
]


@needs_triton
@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("interpret", [False, True])
def test_launch_plan_follows_its_rules_on_every_shape(kernel, dtype, interpret):
    for shape in PLAN_SHAPES:
        for sms in (8, 108, 132):
            got = ops.launch_config(kernel, *shape, dtype, sms, interpret=interpret)
            assert got == planned(kernel, *shape, dtype, sms, interpret), (shape, sms)
            fewer = ops.launch_config(kernel, *shape, dtype, sms, interpret=interpret, programs_per_sm=3.7)
            assert fewer == planned(kernel, *shape, dtype, sms, interpret, programs_per_sm=3.7), (shape, sms)


@needs_triton
def test_launch_plan_overrides_and_bad_kernel():
    cfg = ops.launch_config("forward", 1, 8, 1024, 40, 77, 4, torch.float16, 132, interpret=False,
                            block_n=16, num_warps=8, num_stages=5)
    # 64 blocks of 16 positions: 2 head groups (7 heads, then 1) give 128 programs, the fewest for 119.
    assert cfg["grid"] == (64, 2, 1) and cfg["heads_per_program"] == 7
    assert (cfg["meta"]["BLOCK_N"], cfg["meta"]["num_warps"], cfg["meta"]["num_stages"]) == (16, 8, 5)
    assert ops.launch_config("forward", 1, 8, 1024, 40, 77, 4, torch.float16, 132, interpret=False,
                             block_n=32)["grid"] == (32, 4, 1)
    with pytest.raises(ValueError) as raised:
        ops.launch_config("both", 1, 8, 1024, 40, 77, 4, torch.float16, 132)
    assert str(raised.value) == "kernel must be 'forward' or 'backward', got 'both'"


@needs_triton
def test_a_launch_is_planned_for_the_inputs_shapes_dtype_and_device(monkeypatch):
    q, k, token_index = make_inputs(3, 2, 3, 5, 7, 13, 4, 24, torch.float32)
    for kernel in ("forward", "backward"):
        assert ops._config_for(kernel, q, k, token_index) == ops.launch_config(
            kernel, 2, 3, 35, 24, 13, 4, torch.float32, ops.device_sm_count(q.device))
    monkeypatch.setattr(ops, "SM_COUNT_OVERRIDE", 132)
    assert ops._config_for("forward", q, k, token_index) == ops.launch_config(
        "forward", 2, 3, 35, 24, 13, 4, torch.float32, 132)
    # The interpreter plans every dtype alike; on a GPU the dtype picks the dots' precision.
    planned_for = []
    monkeypatch.setattr(ops, "launch_config", lambda *args: planned_for.append(args))
    ops._config_for("backward", q.half(), k.half(), token_index)
    assert planned_for == [("backward", 2, 3, 35, 24, 13, 4, torch.float16, 132)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_backward_launch_returns_dq_and_dk_in_the_inputs_dtypes(dtype):
    q, k, token_index = on_device(*make_inputs(5, 1, 2, 3, 5, 13, 2, 16, dtype, strided=True))
    grad = torch.randn(1, 2, 15, device=q.device)
    cfg = ops._config_for("backward", q, k, token_index)
    dq, dk = ops.launch_backward(q, k, token_index, grad, 0.25, cfg, with_dk=True)
    assert dq.dtype == dk.dtype == dtype and dq.is_contiguous() and dk.is_contiguous()
    assert dq.shape == q.shape and dk.shape == k.shape
    dq_only, no_dk = ops.launch_backward(q, k, token_index, grad, 0.25, cfg)
    assert torch.equal(dq_only, dq) and no_dk.numel() == 0 and no_dk.dtype == dtype


def test_sm_count_of_each_device(monkeypatch):
    """The CPU (the interpreter) plans for 8 SMs; CUDA asks the device given, else the current one."""
    asked = []
    monkeypatch.setattr(ops, "_cuda_sm_count", lambda index: asked.append(index) or 100 + index)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert ops.device_sm_count(torch.device("cpu")) == 8
    assert ops.device_sm_count(torch.device("cuda", 3)) == 103
    assert ops.device_sm_count(torch.device("cuda")) == 102
    assert asked == [3, 2]
    monkeypatch.setattr(ops, "SM_COUNT_OVERRIDE", 7)
    assert ops.device_sm_count(torch.device("cpu")) == 7 and ops.device_sm_count(torch.device("cuda", 1)) == 7


def test_new_outputs_are_poisoned_only_when_asked(monkeypatch):
    for poison in (True, False):
        monkeypatch.setattr(ops, "DEBUG_POISON_OUTPUTS", poison)
        out = ops._new_output((2, 3, 5), torch.float64, torch.device("cpu"))
        assert out.shape == (2, 3, 5) and out.dtype == torch.float64 and out.device.type == "cpu"
        if poison:
            assert out.isnan().all()
    meta = ops._new_output((4,), torch.float16, torch.device("meta"))
    assert meta.shape == (4,) and meta.dtype == torch.float16 and meta.device.type == "meta"


@needs_triton
@pytest.mark.parametrize("head_dim, block_d, even", [(40, 16, False), (64, 64, True), (80, 16, True), (160, 32, True)])
def test_launch_plan_tiles(head_dim, block_d, even):
    meta = ops.launch_config("forward", 1, 8, 1024, head_dim, 77, 4, torch.float16, 132, interpret=False)["meta"]
    assert (meta["BLOCK_D"], meta["EVEN_D"]) == (block_d, even)
    assert meta["BLOCK_T"] + meta["BLOCK_T2"] == 80 and meta["HAS_TAIL"]  # 77 keys: 64 + 16
    # fp16 tiles go to the tensor cores as they are; only the interpreter upcasts them.
    assert not meta["UPCAST_QK"]
    assert ops.launch_config("forward", 1, 8, 1024, head_dim, 77, 4, torch.float16, 132,
                             interpret=True)["meta"]["UPCAST_QK"]


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _valid():
    """Valid inputs: q [2, 2, 12, 8], k [2, 2, 13, 8], token_index [2, 2]; 3 x 4 queries."""
    q, k, token_index = make_inputs(30, 2, 2, 3, 4, 13, 2, 8, torch.float32)
    return {"q": q, "k": k, "token_index": token_index, "height": 3, "width": 4}


_q, _k, _tokens = list(_valid().values())[:3]
FULL_MESSAGES = [
    (dict(impl="cuda"), ValueError, "attention_stats: impl must be 'auto', 'triton' or 'torch', got 'cuda'"),
    (dict(q=_q.tolist()), TypeError, "attention_stats: q must be a tensor, got list"),
    (dict(k=_k.numpy()), TypeError, "attention_stats: k must be a tensor, got ndarray"),
    (dict(token_index=(1, 2)), TypeError, "attention_stats: token_index must be a tensor, got tuple"),
    (dict(q=_q[0]), ValueError, "attention_stats: q must have 4 dims, got shape (2, 12, 8)"),
    (dict(k=_k[None]), ValueError, "attention_stats: k must have 4 dims, got shape (1, 2, 2, 13, 8)"),
    (dict(token_index=_tokens[0]), ValueError, "attention_stats: token_index must have 2 dims, got shape (2,)"),
    (dict(k=_k.double()), ValueError,
     "attention_stats: q and k must share one floating dtype, got torch.float32 and torch.float64"),
    (dict(q=_q.long(), k=_k.long()), ValueError,
     "attention_stats: q and k must share one floating dtype, got torch.int64 and torch.int64"),
    (dict(token_index=_tokens.float()), ValueError,
     "attention_stats: token_index must be an integer tensor, got torch.float32"),
    (dict(token_index=_tokens.to(torch.complex64)), ValueError,
     "attention_stats: token_index must be an integer tensor, got torch.complex64"),
    (dict(token_index=_tokens > 0), ValueError, "attention_stats: token_index must be an integer tensor, got torch.bool"),
    (dict(k=_k.to("meta")), ValueError, "attention_stats: q, k and token_index must be on one device, got cpu, meta, cpu"),
    (dict(token_index=_tokens.to("meta")), ValueError,
     "attention_stats: q, k and token_index must be on one device, got cpu, cpu, meta"),
    (dict(k=_k[:1]), ValueError,
     "attention_stats: k [B, heads, T, d] does not match q [B, heads, N, d]: (1, 2, 13, 8) vs (2, 2, 12, 8)"),
    (dict(k=_k[:, :1]), ValueError,
     "attention_stats: k [B, heads, T, d] does not match q [B, heads, N, d]: (2, 1, 13, 8) vs (2, 2, 12, 8)"),
    (dict(k=_k[..., :5]), ValueError,
     "attention_stats: k [B, heads, T, d] does not match q [B, heads, N, d]: (2, 2, 13, 5) vs (2, 2, 12, 8)"),
    (dict(token_index=_tokens[:1]), ValueError, "attention_stats: token_index has batch 1, q has 2"),
    (dict(width=5), ValueError, "attention_stats: height * width = 3 * 5 != N = 12"),
    (dict(height=4, width=3 + 1), ValueError, "attention_stats: height * width = 4 * 4 != N = 12"),
    (dict(token_index=torch.tensor([[0, 13], [2, 3]])), ValueError,
     "attention_stats: token_index must lie in [0, 13), got values in [0, 13]"),
    (dict(token_index=torch.tensor([[0, 12], [-1, 3]])), ValueError,
     "attention_stats: token_index must lie in [0, 13), got values in [-1, 12]"),
]


@pytest.mark.parametrize("changes, error, message", FULL_MESSAGES, ids=[m[2][17:60] for m in FULL_MESSAGES])
@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])
def test_each_bad_input_is_named_in_full(changes, error, message, impl):
    """Each wrong argument gets its own message, whole: what was wrong and what is allowed."""
    args = {**_valid(), "impl": impl, **changes}
    with pytest.raises(error) as raised:
        attention_stats(**args)
    assert type(raised.value) is error and str(raised.value) == message


def test_token_indices_at_both_ends_of_the_range_are_taken():
    q, k, token_index = _q, _k, torch.tensor([[0, 12], [12, 0]])
    sums, maps = attention_stats(q, k, token_index, 3, 4, impl="torch")
    want_sums, want_maps = attention_stats_reference(q, k, token_index, 3, 4, 8 ** -0.5)
    assert torch.equal(sums, want_sums) and torch.equal(maps, want_maps)


CUDA_RANGE_SCRIPT = """
import sys
import torch
from sgfast.kernels import attention_stats
q = torch.randn(1, 2, 12, 8, device="cuda")
k = torch.randn(1, 2, 13, 8, device="cuda")
tokens = torch.tensor([[int(t) for t in sys.argv[1:]]], device="cuda")
# No host read: the check also runs inside CUDA-graph capture.
graph = torch.cuda.CUDAGraph()
static = attention_stats(q, k, tokens, 3, 4, impl="torch")  # warm-up outside the capture
with torch.cuda.graph(graph):
    static = attention_stats(q, k, tokens, 3, 4, impl="torch")
graph.replay()
torch.cuda.synchronize()
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA device assert needs a GPU")
@pytest.mark.parametrize("tokens, ok", [((0, 12), True), ((12, 0), True), ((0, 13), False), ((-1, 3), False)])
def test_cuda_token_range_is_a_device_assert_that_graphs_can_capture(tokens, ok):
    """On CUDA the range check is an asynchronous device assert: indices 0 and T - 1 pass it, even
    inside CUDA-graph capture (a host read would fail there), and -1 or T fail it. A failed device
    assert leaves the CUDA context unusable, so each case runs in its own process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CUDA_RANGE_SCRIPT, *map(str, tokens)], capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    else:
        assert done.returncode != 0 and "ok" not in done.stdout, done.stdout


def test_the_triton_path_says_what_it_needs(monkeypatch):
    """impl="triton" without Triton, or with CPU tensors outside the interpreter: a clear error."""
    q, k, token_index = make_inputs(0, 1, 2, 2, 3, 5, 2, 16, torch.float32)
    monkeypatch.setattr(ops, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"^attention_stats: the Triton path needs the `triton` package$"):
        attention_stats(q, k, token_index, 2, 3, impl="triton")
    monkeypatch.setattr(ops, "HAS_TRITON", True)
    monkeypatch.setattr(ops, "INTERPRET", False)
    with pytest.raises(RuntimeError) as error:
        attention_stats(q, k, token_index, 2, 3, impl="triton")
    assert str(error.value) == (
        "attention_stats: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before sgfast.kernels is "
        "imported (to run the kernels on the CPU through the interpreter)"
    )


@needs_triton
def test_fused_path_returns_the_maps_unless_told_not_to():
    """The Triton path called directly, as attention_stats calls it: maps by default."""
    q, k, token_index = on_device(*make_inputs(1, 1, 2, 2, 3, 5, 2, 16, torch.float32))
    sums, maps = ops.fused_attention_stats(q, k, token_index, 2, 3, 0.25)
    want_sums, want_maps = attention_stats_reference(q.double(), k.double(), token_index, 2, 3, 0.25)
    torch.testing.assert_close(maps.double(), want_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-5, atol=1e-6)
    assert ops.fused_attention_stats(q, k, token_index, 2, 3, 0.25, return_maps=False)[1] is None


def test_token_range_edges():
    """One token out of range is refused; an empty selection, and meta tensors (shapes only), are
    not range-checked and give outputs of the right shapes."""
    q, k, token_index = make_inputs(2, 1, 2, 2, 3, 5, 1, 16, torch.float32)
    with pytest.raises(ValueError, match=r"token_index must lie in \[0, 5\), got values in \[5, 5\]"):
        attention_stats(q, k, torch.full((1, 1), 5), 2, 3, impl="torch")
    sums, maps = attention_stats(q, k, token_index[:, :0], 2, 3, impl="torch")
    assert sums.shape == (1, 0, 3) and maps.shape == (1, 0, 6)
    sums, maps = attention_stats(q.to("meta"), k.to("meta"), token_index.to("meta"), 2, 3, impl="torch")
    assert sums.shape == (1, 1, 3) and maps.shape == (1, 1, 6) and maps.device.type == "meta"
