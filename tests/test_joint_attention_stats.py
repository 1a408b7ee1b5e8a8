"""joint_attention_stats: the Triton kernels (compiled on CUDA where there is a GPU, through the
interpreter on the CPU elsewhere; see conftest.py) against a float64 torch reference, the reference
against a naive loop, gradients for q and both kinds of keys (through FLUX's rotary embeddings and
SD3.5's RMS norm too), the row logsumexp taken from SDPA, the custom ops, the launch plan, and input
checks. Interpreter sizes are tiny (each program instance costs milliseconds there)."""

import importlib
import math

import pytest
import torch

from sgfast.kernels import joint_attention_stats, joint_attention_stats_reference, sdpa_with_logsumexp

ops = importlib.import_module("sgfast.kernels.joint_attention_stats")

needs_triton = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (Linux)")
DEVICE = "cpu" if ops.INTERPRET else "cuda"

# Gradients are written in the input dtype: their error is that dtype's rounding (relative to the largest entry).
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write cannot pass."""
    monkeypatch.setattr(ops, "DEBUG_POISON_OUTPUTS", True)


def make_inputs(seed, batch, heads, height, width, text, selected, head_dim, dtype, layout="separate", spread=1.0,
                image_keys=None):
    """Random q [B, heads, N, d], k_img [B, heads, M, d], k_txt [B, heads, T, d], token_index [B, S].
    layout "sd3" / "flux": the keys are slices of one joint [B, L, heads, d] tensor transposed, in SD3's
    [image, text] or FLUX's [text, image] order, and q the image rows of the joint queries (the
    strided views attention processors hold). Row 0 selects key 0, key T-1 and (S >= 3) one key twice."""
    g = torch.Generator().manual_seed(seed)
    n = height * width
    m = n if image_keys is None else image_keys
    if layout == "separate":
        q = torch.randn(batch, heads, n, head_dim, generator=g)
        k_img = torch.randn(batch, heads, m, head_dim, generator=g)
        k_txt = torch.randn(batch, heads, text, head_dim, generator=g)
    else:
        assert m == n
        joint_q = torch.randn(batch, n + text, heads, head_dim, generator=g).transpose(1, 2)
        joint_k = torch.randn(batch, n + text, heads, head_dim, generator=g).transpose(1, 2)
        image, words = (slice(0, n), slice(n, None)) if layout == "sd3" else (slice(text, None), slice(0, text))
        q, k_img, k_txt = joint_q[:, :, image], joint_k[:, :, image], joint_k[:, :, words]
    token_index = torch.randint(0, text, (batch, selected), generator=g)
    token_index[0, 0] = 0
    if selected >= 2:
        token_index[0, 1] = text - 1
    if selected >= 3:
        token_index[0, 2] = token_index[0, 1]
    return (q * spread).to(dtype), k_img.to(dtype), k_txt.to(dtype), token_index


def exact_lse(q, k_img, k_txt, scale):
    logits = torch.cat([q.double() @ k_img.double().transpose(-1, -2), q.double() @ k_txt.double().transpose(-1, -2)],
                       dim=-1)
    return torch.logsumexp(logits * scale, dim=-1)


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def naive_stats(q, k_img, k_txt, token_index, height, width, scale):
    """Loops over batch, selected tokens, heads and positions, the softmax over every joint key."""
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
                        image = [scale * float(q[b, h, p] @ key) for key in k_img[b, h]]
                        text = [scale * float(q[b, h, p] @ key) for key in k_txt[b, h]]
                        top = max(image + text)
                        total = sum(math.exp(x - top) for x in image + text)
                        value += math.exp(text[t] - top) / total / heads
                    maps[b, s, p] = value
                    sums[b, s] += torch.tensor([1.0, (j + 0.5) / width, (i + 0.5) / height], dtype=torch.float64) * value
    return sums, maps


# ---------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_keys", [None, 0, 3])  # self-attention (M = N), no image keys, fewer
def test_reference_matches_naive_loop(image_keys):
    q, k_img, k_txt, token_index = make_inputs(0, 2, 2, 3, 4, 5, 3, 3, torch.float64, spread=2.0, image_keys=image_keys)
    sums, maps = joint_attention_stats_reference(q, k_img, k_txt, token_index, 3, 4, scale=0.7)
    want_sums, want_maps = naive_stats(q, k_img, k_txt, token_index, 3, 4, scale=0.7)
    torch.testing.assert_close(sums, want_sums, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(maps, want_maps, rtol=1e-12, atol=1e-14)


def test_image_keys_take_mass_from_the_text_columns():
    # The row normaliser includes the image keys: with no image keys the op is the cross-attention
    # op; with them every text column's probability is smaller.
    from sgfast.kernels import attention_stats_reference

    q, k_img, k_txt, token_index = make_inputs(1, 1, 2, 3, 3, 7, 3, 8, torch.float64)
    no_image = joint_attention_stats_reference(q, k_img[:, :, :0], k_txt, token_index, 3, 3, 0.4)
    cross = attention_stats_reference(q, k_txt, token_index, 3, 3, 0.4)
    torch.testing.assert_close(no_image[1], cross[1], rtol=1e-12, atol=1e-15)
    _, joint_maps = joint_attention_stats_reference(q, k_img, k_txt, token_index, 3, 3, 0.4)
    assert (joint_maps < cross[1]).all()


@pytest.mark.parametrize("dtype, out", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_reference_output_dtype(dtype, out):
    q, k_img, k_txt, token_index = make_inputs(1, 1, 2, 2, 3, 7, 2, 8, dtype)
    sums, maps = joint_attention_stats(q, k_img, k_txt, token_index, 2, 3, impl="torch")
    assert sums.dtype == maps.dtype == out
    assert sums.shape == (1, 2, 3) and maps.shape == (1, 2, 6)


@pytest.mark.parametrize("with_lse", [False, True])
def test_reference_gradcheck(with_lse):
    # The lse is a forward hint that must match the inputs: computed (detached) from the perturbed ones.
    q, k_img, k_txt, token_index = make_inputs(2, 1, 2, 2, 2, 5, 3, 3, torch.float64)
    lse = (lambda q, ki, kt: exact_lse(q, ki, kt, 0.5).detach()) if with_lse else (lambda q, ki, kt: None)
    inputs = [t.requires_grad_(True) for t in (q, k_img, k_txt)]
    assert torch.autograd.gradcheck(
        lambda q, ki, kt: joint_attention_stats_reference(q, ki, kt, token_index, 2, 2, 0.5, lse=lse(q, ki, kt)),
        inputs,
    )


def test_a_given_lse_sets_the_value_never_the_gradient():
    """The normaliser given sets the forward value (an lse off by c scales the maps by exp(-c)); the
    gradient stays the exact one, and none flows into the lse itself."""
    q, k_img, k_txt, token_index = make_inputs(3, 2, 2, 3, 3, 7, 2, 8, torch.float64)
    lse = exact_lse(q, k_img, k_txt, 8 ** -0.5).requires_grad_(True)
    _, maps = joint_attention_stats(q, k_img, k_txt, token_index, 3, 3, impl="torch")
    _, shifted = joint_attention_stats(q, k_img, k_txt, token_index, 3, 3, lse=lse + 0.25, impl="torch")
    torch.testing.assert_close(shifted, maps * math.exp(-0.25), rtol=1e-12, atol=0)
    inputs = [t.clone().requires_grad_(True) for t in (q, k_img, k_txt)]
    _, with_lse = joint_attention_stats(*inputs, token_index, 3, 3, lse=lse, impl="torch")
    got = torch.autograd.grad(with_lse.square().sum(), inputs + [lse], allow_unused=True)
    _, without = joint_attention_stats(*inputs, token_index, 3, 3, impl="torch")
    want = torch.autograd.grad(without.square().sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert got[3] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_with_logsumexp_on_the_cpu(dtype):
    """SDPA's own output and the row logsumexp of the same call, for the op's `lse`."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=dtype) for n in (11, 13, 13))
    q.requires_grad_(True)
    out, lse = sdpa_with_logsumexp(q, k, v, scale=0.3)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
    torch.testing.assert_close(lse.to(dtype), torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, dim=-1))
    assert out.requires_grad and not lse.requires_grad and lse.shape == (2, 3, 11)
    # Its output's gradient is SDPA's.
    (got,) = torch.autograd.grad(out.square().sum(), q)
    (want,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).square().sum(), q)
    torch.testing.assert_close(got, want)
    assert sdpa_with_logsumexp(q, k, v)[1].shape == (2, 3, 11)  # default scale d ** -0.5
    torch.testing.assert_close(sdpa_with_logsumexp(q, k, v)[1].to(dtype),
                               torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1))


def test_auto_uses_reference_on_cpu():
    q, k_img, k_txt, token_index = make_inputs(3, 2, 2, 3, 3, 13, 2, 16, torch.float32)
    got = joint_attention_stats(q, k_img, k_txt, token_index, 3, 3, impl="auto")
    want = joint_attention_stats_reference(q, k_img, k_txt, token_index, 3, 3, scale=16 ** -0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what the dispatch reads of one, on a machine without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("has_triton", [True, False])
def test_auto_takes_triton_for_cuda_tensors_when_it_can(monkeypatch, has_triton):
    q, k_img, k_txt, token_index = make_inputs(4, 2, 3, 3, 5, 13, 2, 16, torch.float32)
    lse = exact_lse(q, k_img, k_txt, 0.3).float()
    fused = []
    monkeypatch.setattr(ops, "fused_joint_attention_stats", lambda *args: fused.append(args) or ("fused", args))
    monkeypatch.setattr(ops, "HAS_TRITON", has_triton)
    for scale, given, return_maps in ((None, None, True), (0.3, lse, False)):
        cuda = [t.as_subclass(OnCuda) for t in (q, k_img, k_txt)]
        got = joint_attention_stats(*cuda, token_index, 3, 5, scale=scale, lse=given, return_maps=return_maps,
                                    impl="auto")
        want_scale = 16 ** -0.5 if scale is None else scale
        if has_triton:
            assert got[0] == "fused" and got[1][4:6] == (3, 5) and got[1][6] == want_scale
            assert got[1][7] is given and got[1][8] == return_maps
        else:
            want = joint_attention_stats_reference(q, k_img, k_txt, token_index, 3, 5, want_scale, given, return_maps)
            assert torch.equal(got[0], want[0]) and (got[1] is None) == (not return_maps)
    assert len(fused) == (2 if has_triton else 0)


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter) against the float64 reference
# ---------------------------------------------------------------------------------------------------

# dtype, batch, heads, head_dim, T, S, (H, W), layout, lse given. N is never a multiple of the
# interpreter's 16-row tiles; head dims below, at and above 16 (odd ones masked); T of 7 and 77
# (SD's CLIP length, five 16-key tiles).
CASES = [
    (torch.float64, 2, 2, 8, 7, 3, (3, 5), "separate", False),
    (torch.float64, 1, 3, 13, 7, 2, (4, 5), "flux", True),
    (torch.float32, 2, 2, 24, 7, 3, (3, 7), "sd3", False),
    (torch.float32, 1, 1, 40, 77, 3, (3, 5), "flux", True),
    (torch.float32, 2, 3, 16, 7, 1, (1, 17), "separate", True),
    (torch.float16, 1, 3, 24, 7, 3, (3, 7), "sd3", True),
    (torch.float16, 2, 1, 32, 77, 3, (3, 5), "separate", False),
    (torch.bfloat16, 2, 2, 16, 7, 3, (5, 3), "flux", False),
    (torch.bfloat16, 1, 1, 40, 77, 3, (3, 5), "sd3", True),
]


def case_id(case):
    dtype, batch, heads, head_dim, text, selected, (h, w), layout, with_lse = case
    return (f"{str(dtype)[6:]}-b{batch}-h{heads}-d{head_dim}-T{text}-S{selected}-{h}x{w}-{layout}"
            + ("-lse" if with_lse else ""))


def check_against_reference(q, k_img, k_txt, token_index, height, width, seed, lse=None, maps_tol=(1e-5, 1e-7),
                            scale=None):
    """The fused op on DEVICE against the float64 reference on the same (rounded) inputs, forward
    and backward through both outputs, gradients for q, k_img and k_txt."""
    dtype, head_dim = q.dtype, q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    inputs = [t.to(DEVICE).requires_grad_(True) for t in (q, k_img, k_txt)]
    lse_d = None if lse is None else lse.to(DEVICE)
    sums, maps = joint_attention_stats(*inputs, token_index.to(DEVICE), height, width, scale=scale, lse=lse_d,
                                       impl="triton")
    assert sums.dtype == maps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(sums).all() and torch.isfinite(maps).all()  # every element written (poisoned)

    exact = [t.detach().double().requires_grad_(True) for t in (q, k_img, k_txt)]
    want_sums, want_maps = joint_attention_stats_reference(*exact, token_index, height, width, scale, lse=lse)
    rtol, atol = maps_tol
    torch.testing.assert_close(sums.double().cpu(), want_sums, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(maps.double().cpu(), want_maps, rtol=rtol, atol=atol)

    g = torch.Generator().manual_seed(100 + seed)
    grad_sums = torch.randn(sums.shape, generator=g, dtype=sums.dtype)
    grad_maps = torch.randn(maps.shape, generator=g, dtype=maps.dtype)
    got = torch.autograd.grad((sums * grad_sums.to(DEVICE)).sum() + (maps * grad_maps.to(DEVICE)).sum(), inputs)
    want = torch.autograd.grad((want_sums * grad_sums.double()).sum() + (want_maps * grad_maps.double()).sum(), exact)
    tol = GRAD_TOLERANCE[dtype]
    for name, a, b, x in zip(("dq", "dk_img", "dk_txt"), got, want, (q, k_img, k_txt)):
        assert a.dtype == dtype and a.shape == x.shape, name
        scale_of_b = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a.double().cpu(), b, rtol=tol, atol=tol * scale_of_b, msg=name)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case):
    dtype, batch, heads, head_dim, text, selected, (height, width), layout, with_lse = case
    seed = CASES.index(case)
    q, k_img, k_txt, token_index = make_inputs(seed, batch, heads, height, width, text, selected, head_dim, dtype,
                                               layout=layout, spread=1.0 + seed % 3)  # spread: sharper rows
    # The lse SDPA would give: computed from the same rounded inputs, returned in float32 (float64
    # for float64: a float32 lse sets the maps' value to float32's precision, and their gradient too).
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lse = exact_lse(q, k_img, k_txt, head_dim ** -0.5).to(lse_dtype) if with_lse else None
    check_against_reference(q, k_img, k_txt, token_index, height, width, seed, lse=lse)


@needs_triton
@pytest.mark.parametrize("image_keys", [0, 5, 40])
def test_triton_any_number_of_image_keys(image_keys):
    q, k_img, k_txt, token_index = make_inputs(10 + image_keys, 1, 2, 3, 5, 7, 2, 16, torch.float32,
                                               image_keys=image_keys, spread=2.0)
    check_against_reference(q, k_img, k_txt, token_index, 3, 5, seed=11)


@needs_triton
@pytest.mark.parametrize("with_lse", [False, True])
def test_triton_through_rotary_embeddings_and_rms_norm(with_lse):
    """A FLUX-style joint attention input: hidden states projected to q and k, RMS-normed per head
    (SD3.5, FLUX) and rotated by FLUX's rotary embeddings on the [text, image] sequence, with the
    lse from SDPA's own kernel; the gradients reach the image and text hidden states through every
    transform, the kernel's equal to the float64 reference's."""
    from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(12)
    batch, heads, head_dim, height, width, text, channels = 1, 2, 16, 3, 5, 7, 24
    n = height * width
    project_q, project_k = (torch.randn(channels, heads * head_dim, generator=g) / channels ** 0.5 for _ in range(2))
    norm_q, norm_k = RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        norm_q.weight.copy_(1 + 0.3 * torch.randn(head_dim, generator=g))
        norm_k.weight.copy_(1 + 0.3 * torch.randn(head_dim, generator=g))
    image_ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(height), torch.arange(width), indexing="ij"),
                            -1).reshape(n, 3)
    ids = torch.cat([torch.zeros(text, 3), image_ids.float()])
    rotary = FluxPosEmbed(theta=10000, axes_dim=[4, 4, 8])(ids)
    hidden_txt = torch.randn(batch, text, channels, generator=g, dtype=torch.float64)
    hidden_img = torch.randn(batch, n, channels, generator=g, dtype=torch.float64)
    token_index = torch.tensor([[0, 3, text - 1]])

    def stats_and_grads(dtype, impl):
        txt, img = (h.to(dtype).requires_grad_(True) for h in (hidden_txt, hidden_img))
        joint = torch.cat([txt, img], dim=1)
        shaped = lambda x, w, norm: norm.to(dtype)((x @ w.to(dtype)).view(batch, text + n, heads, head_dim))  # noqa: E731
        q = apply_rotary_emb(shaped(joint, project_q, norm_q), tuple(r.to(dtype) for r in rotary), sequence_dim=1)
        k = apply_rotary_emb(shaped(joint, project_k, norm_k), tuple(r.to(dtype) for r in rotary), sequence_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, L, d]
        lse = sdpa_with_logsumexp(q, k, k)[1][:, :, text:] if with_lse else None
        device = [t.to(DEVICE) for t in (q[:, :, text:], k[:, :, text:], k[:, :, :text])]
        sums, maps = joint_attention_stats(*device, token_index.to(DEVICE), height, width,
                                           lse=None if lse is None else lse.to(DEVICE), impl=impl)
        energy = (sums[..., 1:] / sums[..., :1]).square().sum() + maps.square().sum()
        return (sums, maps) + torch.autograd.grad(energy, (txt, img))

    got = stats_and_grads(torch.float32, "triton")
    want = stats_and_grads(torch.float64, "torch")
    for name, a, b in zip(("sums", "maps", "d hidden_txt", "d hidden_img"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=2e-5, atol=2e-5 * b.abs().max().item(), msg=name)


@needs_triton
def test_triton_float32_gradients_equal_the_float32_reference():
    """What mode="fast" against mode="reference" in float32 rests on: the fused op's gradients and
    the float32 reference's agree to 1e-4 of their size."""
    q, k_img, k_txt, token_index = make_inputs(13, 2, 2, 3, 5, 7, 3, 24, torch.float32, layout="sd3", spread=3.0)
    results = []
    for impl in ("triton", "torch"):
        inputs = [t.to(DEVICE if impl == "triton" else "cpu").requires_grad_(True) for t in (q, k_img, k_txt)]
        sums, maps = joint_attention_stats(*inputs, token_index.to(inputs[0].device), 3, 5, impl=impl)
        energy = (sums[..., 1:] / sums[..., :1] - 0.3).square().sum() + (maps - 0.01).square().sum()
        results.append([x.cpu() for x in torch.autograd.grad(energy, inputs)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@needs_triton
def test_triton_many_tokens_are_chunked():
    # 70 selected tokens: two forward launches (64 + 6), the second reading the normaliser the
    # first computed; the backward loops over both chunks; repeated tokens.
    q, k_img, k_txt, token_index = make_inputs(14, 1, 1, 3, 5, 13, 70, 16, torch.float32)
    token_index[:, 60:] = token_index[:, :10]
    check_against_reference(q, k_img, k_txt, token_index, 3, 5, seed=14)


@needs_triton
def test_triton_large_logits_stay_finite():
    # Logits in the hundreds: the running max is subtracted before exp.
    q, k_img, k_txt, token_index = make_inputs(15, 1, 1, 3, 5, 7, 3, 16, torch.float32, spread=60.0)
    sums, maps = joint_attention_stats(*on_device(q, k_img, k_txt, token_index), 3, 5, impl="triton")
    want_sums, want_maps = joint_attention_stats_reference(q.double(), k_img.double(), k_txt.double(), token_index,
                                                           3, 5, 0.25)
    torch.testing.assert_close(maps.double().cpu(), want_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double().cpu(), want_sums, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("sms", [1, 10_000], ids=["one-group", "heads-split"])
def test_triton_every_forward_launch_plan(monkeypatch, sms):
    # One SM: heads grouped unevenly (2 + 1: 4 programs, the Q K^T pass's 4 per SM); many: a
    # program per head, partial maps summed afterwards.
    monkeypatch.setattr(ops, "SM_COUNT_OVERRIDE", sms)
    cfg = ops.launch_config("forward", 2, 3, 15, 16, 15, 7, 2, torch.float64, sms)
    assert (cfg["groups"], cfg["heads_per_program"]) == ((2, 2) if sms == 1 else (3, 1))
    q, k_img, k_txt, token_index = make_inputs(16, 2, 3, 3, 5, 7, 2, 16, torch.float64)
    check_against_reference(q, k_img, k_txt, token_index, 3, 5, seed=16)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_return_maps_false(impl):
    q, k_img, k_txt, token_index = make_inputs(17, 1, 2, 3, 5, 7, 2, 16, torch.float32)
    device = DEVICE if impl == "triton" else "cpu"
    inputs = [t.to(device).requires_grad_(True) for t in (q, k_img, k_txt)]
    token_index = token_index.to(device)
    sums, maps = joint_attention_stats(*inputs, token_index, 3, 5, impl=impl, return_maps=False)
    assert maps is None
    full_sums, _ = joint_attention_stats(*inputs, token_index, 3, 5, impl=impl)
    assert torch.equal(sums, full_sums)
    grad_sums = torch.randn(sums.shape, generator=torch.Generator().manual_seed(5)).to(device)
    got = torch.autograd.grad((sums * grad_sums).sum(), inputs)
    want = torch.autograd.grad((full_sums * grad_sums).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@needs_triton
@pytest.mark.parametrize("with_lse", [False, True])
def test_triton_gradcheck_float64(with_lse):
    # Two position blocks and two image-key blocks (N = M = 20), a token selected twice, odd head dim.
    q, k_img, k_txt, token_index = make_inputs(18, 1, 1, 4, 5, 7, 3, 3, torch.float64)
    lse = (lambda q, ki, kt: exact_lse(q, ki, kt, 0.4).detach()) if with_lse else (lambda q, ki, kt: None)
    inputs = [t.to(DEVICE).requires_grad_(True) for t in (q, k_img, k_txt)]
    token_index = token_index.to(DEVICE)
    assert torch.autograd.gradcheck(
        lambda q, ki, kt: joint_attention_stats(q, ki, kt, token_index, 4, 5, scale=0.4, lse=lse(q, ki, kt),
                                                impl="triton"),
        inputs, fast_mode=True,
    )


@needs_triton
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["q", "k_img", "k_txt"])
def test_triton_gradient_for_each_input_alone(needs):
    """Only the inputs that require a gradient get one, each equal to the full backward's."""
    q, k_img, k_txt, token_index = on_device(*make_inputs(19, 1, 2, 3, 5, 7, 2, 16, torch.float32))
    full = [t.clone().requires_grad_(True) for t in (q, k_img, k_txt)]
    _, maps = joint_attention_stats(*full, token_index, 3, 5, impl="triton")
    want = torch.autograd.grad(maps.square().sum(), full)
    some = [t.clone().requires_grad_(need) for t, need in zip((q, k_img, k_txt), needs)]
    _, maps = joint_attention_stats(*some, token_index, 3, 5, impl="triton")
    chosen = [t for t, need in zip(some, needs) if need]
    (got,) = torch.autograd.grad(maps.square().sum(), chosen)
    torch.testing.assert_close(got, want[needs.index(True)])


@needs_triton
@pytest.mark.parametrize("with_lse", [False, True])
def test_opcheck(with_lse):
    q, k_img, k_txt, token_index = on_device(*make_inputs(24, 1, 1, 2, 3, 7, 2, 8, torch.float64))
    lse = exact_lse(q, k_img, k_txt, 0.3).to(DEVICE) if with_lse else None
    q.requires_grad_(True)
    k_img.requires_grad_(True)
    torch.library.opcheck(torch.ops.sgfast.joint_attention_maps.default, (q, k_img, k_txt, token_index, lse, 0.3))


@needs_triton
def test_opcheck_backward():
    q, k_img, k_txt, token_index = on_device(*make_inputs(25, 1, 2, 2, 3, 7, 2, 8, torch.float32))
    lse = exact_lse(q, k_img, k_txt, 0.3).float().to(DEVICE)
    grad_maps = torch.randn(1, 2, 6, device=DEVICE)
    for with_dk in (False, True):
        torch.library.opcheck(torch.ops.sgfast.joint_attention_maps_backward.default,
                              (q, k_img, k_txt, token_index, lse, grad_maps, 0.3, with_dk))


@needs_triton
def test_compile_fullgraph_no_graph_break():
    q, k_img, k_txt, token_index = on_device(*make_inputs(26, 1, 2, 3, 5, 7, 2, 16, torch.float32, layout="flux"))
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k_img, k_txt)]

    def energy(q, k_img, k_txt):
        sums, maps = joint_attention_stats(q, k_img, k_txt, token_index, 3, 5, impl="triton")
        return (sums[..., 1:] / sums[..., :1]).abs().sum() + maps.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(energy, backend="inductor" if DEVICE == "cuda" else "aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(energy(*inputs), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_bigger_shapes(dtype):
    # Several tiles in every loop: 77 + 333-like text lengths, 4 heads, batch 2, an 11 x 9 grid.
    for text, seed in ((77, 30), (133, 31)):
        q, k_img, k_txt, token_index = make_inputs(seed, 2, 4, 11, 9, text, 5, 48, dtype, layout="sd3", spread=2.0)
        lse = exact_lse(q, k_img, k_txt, 48 ** -0.5).float() if text == 133 else None
        check_against_reference(q, k_img, k_txt, token_index, 11, 9, seed, lse=lse)


# ---------------------------------------------------------------------------------------------------
# The launch plan (pure arithmetic: the same on any machine)
# ---------------------------------------------------------------------------------------------------

# (batch, heads, n, head_dim, image keys, text keys): SD3-medium and FLUX at 1024px, and edges.
REAL_SHAPES = [(1, 24, 4096, 64, 4096, 333), (1, 24, 4096, 128, 4096, 512), (2, 24, 4096, 64, 4096, 333)]


@needs_triton
@pytest.mark.parametrize("sms", [108, 132])
def test_launch_plan_fills_the_gpu(sms):
    for batch, heads, n, d, m, t in REAL_SHAPES:
        for kernel in ("forward", "backward_dq", "backward_dk_image", "backward_dk_text"):
            for has_lse in (False, True):
                cfg = ops.launch_config(kernel, batch, heads, n, d, m, t, 4, torch.float16, sms, has_lse=has_lse,
                                        interpret=False)
                blocks, groups, b = cfg["grid"]
                assert blocks * groups * b >= 0.9 * sms, (kernel, cfg["grid"])
                rows = cfg["meta"].get("BLOCK_K", cfg["meta"].get("BLOCK_N"))
                covered = {"backward_dk_image": m, "backward_dk_text": t}.get(kernel, n)
                assert blocks * rows >= covered
                if kernel == "forward":
                    assert groups * cfg["heads_per_program"] >= heads
                    # Computing the normaliser is a Q K^T pass: at least 4 programs per SM.
                    assert has_lse or blocks * groups * b >= 4 * sms


@needs_triton
@pytest.mark.parametrize("dtype, precisions", [(torch.float16, ("tf32", "tf32")), (torch.bfloat16, ("tf32", "tf32")),
                                               (torch.float32, ("tf32x3", "tf32x3")),
                                               (torch.float64, ("ieee", "ieee"))], ids=str)
def test_launch_plan_tiles_and_precisions(dtype, precisions):
    for d, block_d in ((64, 64), (128, 128), (40, 64), (5, 16), (24, 32)):
        for kernel in ("forward", "backward_dq", "backward_dk_image"):
            meta = ops.launch_config(kernel, 1, 24, 4096, d, 4096, 333, 3, dtype, 132, interpret=False)["meta"]
            assert meta["BLOCK_D"] == block_d
            assert meta["QK_PRECISION"] == precisions[0] and meta.get("PV_PRECISION", precisions[1]) == precisions[1]
            # Tensor-core tiles: 32 program rows (mma.sync), 64-wide inner tiles; fp16/bf16 as they are.
            rows, inner = (meta["BLOCK_K"], meta["BLOCK_N"]) if kernel.startswith("backward_dk") else (
                meta["BLOCK_N"], meta["BLOCK_M"])
            assert (rows, inner) == (32, 64)
            assert meta["UPCAST_QK"] == (dtype in (torch.float32, torch.float64))
            # fp16/bf16: P rounded to the input dtype for P @ K (tf32's mantissa is fp16's).
            assert meta.get("PV_LOW", dtype in (torch.float16, torch.bfloat16)) == (
                dtype in (torch.float16, torch.bfloat16))
            want = (4, 2) if block_d < 128 else (4, 1) if kernel == "backward_dq" else (8, 2)
            assert (meta["num_warps"], meta["num_stages"]) == want
            interpreted = ops.launch_config(kernel, 1, 24, 4096, d, 4096, 333, 3, dtype, 132, interpret=True)["meta"]
            assert interpreted["UPCAST_QK"] and interpreted["QK_PRECISION"] == "ieee"
    for selected, block_s in ((1, 16), (17, 32), (64, 64), (200, 64)):
        assert ops.launch_config("forward", 1, 2, 64, 64, 64, 77, selected, dtype, 132)["meta"]["BLOCK_S"] == block_s


@needs_triton
def test_launch_plan_head_groups_and_bad_kernel():
    # 128 blocks of 32 positions at batch 1: lse given, one group of 24 heads already makes the
    # 0.9 x 132 programs; computing it, 5 heads per program (5 groups: 640 programs; 6 heads would
    # give 4 groups, 512 < 4 x 132).
    given = ops.launch_config("forward", 1, 24, 4096, 64, 4096, 333, 4, torch.float16, 132, has_lse=True,
                              interpret=False)
    assert given["grid"] == (128, 1, 1) and given["heads_per_program"] == 24
    computed = ops.launch_config("forward", 1, 24, 4096, 64, 4096, 333, 4, torch.float16, 132, interpret=False)
    assert computed["grid"] == (128, 5, 1) and computed["heads_per_program"] == 5
    with pytest.raises(ValueError) as raised:
        ops.launch_config("both", 1, 8, 1024, 40, 1024, 77, 4, torch.float16, 132)
    assert str(raised.value) == ("kernel must be one of ('forward', 'backward_dq', 'backward_dk_image', "
                                 "'backward_dk_text'), got 'both'")


def test_sm_count_of_each_device(monkeypatch):
    asked = []
    monkeypatch.setattr(ops, "_cuda_sm_count", lambda index: asked.append(index) or 100 + index)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert ops.device_sm_count(torch.device("cpu")) == 8
    assert ops.device_sm_count(torch.device("cuda", 3)) == 103
    assert ops.device_sm_count(torch.device("cuda")) == 102
    assert asked == [3, 2]
    monkeypatch.setattr(ops, "SM_COUNT_OVERRIDE", 7)
    assert ops.device_sm_count(torch.device("cpu")) == 7


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _valid():
    """q [2, 2, 12, 8], k_img [2, 2, 12, 8], k_txt [2, 2, 7, 8], token_index [2, 2]; 3 x 4 queries."""
    q, k_img, k_txt, token_index = make_inputs(30, 2, 2, 3, 4, 7, 2, 8, torch.float32)
    return {"q": q, "k_img": k_img, "k_txt": k_txt, "token_index": token_index, "height": 3, "width": 4}


_v = _valid()
_q, _ki, _kt, _tokens = _v["q"], _v["k_img"], _v["k_txt"], _v["token_index"]
_P = "joint_attention_stats: "
FULL_MESSAGES = [
    (dict(impl="cuda"), ValueError, _P + "impl must be 'auto', 'triton' or 'torch', got 'cuda'"),
    (dict(q=_q.tolist()), TypeError, _P + "q must be a tensor, got list"),
    (dict(k_img=_ki.numpy()), TypeError, _P + "k_img must be a tensor, got ndarray"),
    (dict(k_txt=None), TypeError, _P + "k_txt must be a tensor, got NoneType"),
    (dict(token_index=(1, 2)), TypeError, _P + "token_index must be a tensor, got tuple"),
    (dict(lse=[0.0]), TypeError, _P + "lse must be a tensor, got list"),
    (dict(q=_q[0]), ValueError, _P + "q must have 4 dims, got shape (2, 12, 8)"),
    (dict(k_txt=_kt[None]), ValueError, _P + "k_txt must have 4 dims, got shape (1, 2, 2, 7, 8)"),
    (dict(token_index=_tokens[0]), ValueError, _P + "token_index must have 2 dims, got shape (2,)"),
    (dict(lse=torch.zeros(2, 2, 12, 1)), ValueError, _P + "lse must have 3 dims, got shape (2, 2, 12, 1)"),
    (dict(k_img=_ki.double()), ValueError,
     _P + "q, k_img and k_txt must share one floating dtype, got torch.float32, torch.float64 and torch.float32"),
    (dict(q=_q.long(), k_img=_ki.long(), k_txt=_kt.long()), ValueError,
     _P + "q, k_img and k_txt must share one floating dtype, got torch.int64, torch.int64 and torch.int64"),
    (dict(token_index=_tokens.float()), ValueError, _P + "token_index must be an integer tensor, got torch.float32"),
    (dict(token_index=_tokens > 0), ValueError, _P + "token_index must be an integer tensor, got torch.bool"),
    (dict(k_txt=_kt.to("meta")), ValueError,
     _P + "q, k_img, k_txt, token_index must be on one device, got cpu, cpu, meta, cpu"),
    (dict(lse=torch.zeros(2, 2, 12, device="meta")), ValueError,
     _P + "q, k_img, k_txt, token_index, lse must be on one device, got cpu, cpu, cpu, cpu, meta"),
    (dict(k_img=_ki[:1]), ValueError,
     _P + "k_img [B, heads, keys, d] does not match q [B, heads, N, d]: (1, 2, 12, 8) vs (2, 2, 12, 8)"),
    (dict(k_txt=_kt[:, :1]), ValueError,
     _P + "k_txt [B, heads, keys, d] does not match q [B, heads, N, d]: (2, 1, 7, 8) vs (2, 2, 12, 8)"),
    (dict(k_img=_ki[..., :5]), ValueError,
     _P + "k_img [B, heads, keys, d] does not match q [B, heads, N, d]: (2, 2, 12, 5) vs (2, 2, 12, 8)"),
    (dict(k_txt=_kt[:, :, :0]), ValueError, _P + "k_txt must hold at least one text key, got shape (2, 2, 0, 8)"),
    (dict(token_index=_tokens[:1]), ValueError, _P + "token_index has batch 1, q has 2"),
    (dict(lse=torch.zeros(2, 2, 11)), ValueError,
     _P + "lse must be a floating [B, heads, N] = (2, 2, 12) tensor, got torch.float32 of shape (2, 2, 11)"),
    (dict(lse=torch.zeros(2, 2, 12, dtype=torch.long)), ValueError,
     _P + "lse must be a floating [B, heads, N] = (2, 2, 12) tensor, got torch.int64 of shape (2, 2, 12)"),
    (dict(width=5), ValueError, _P + "height * width = 3 * 5 != N = 12"),
    (dict(token_index=torch.tensor([[0, 7], [2, 3]])), ValueError,
     _P + "token_index must lie in [0, 7), got values in [0, 7]"),
    (dict(token_index=torch.tensor([[0, 6], [-1, 3]])), ValueError,
     _P + "token_index must lie in [0, 7), got values in [-1, 6]"),
]


@pytest.mark.parametrize("changes, error, message", FULL_MESSAGES, ids=[m[2][23:70] for m in FULL_MESSAGES])
@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])
def test_each_bad_input_is_named_in_full(changes, error, message, impl):
    args = {**_valid(), "impl": impl, **changes}
    with pytest.raises(error) as raised:
        joint_attention_stats(**args)
    assert type(raised.value) is error and str(raised.value) == message


def test_token_range_edges():
    """Both ends of the range are taken; an empty selection and meta tensors (shapes only) give
    outputs of the right shapes."""
    sums, maps = joint_attention_stats(_q, _ki, _kt, torch.tensor([[0, 6], [6, 0]]), 3, 4, impl="torch")
    assert maps.shape == (2, 2, 12) and torch.isfinite(sums).all()
    sums, maps = joint_attention_stats(_q, _ki, _kt, _tokens[:, :0], 3, 4, impl="torch")
    assert sums.shape == (2, 0, 3) and maps.shape == (2, 0, 12)
    meta = [t.to("meta") for t in (_q, _ki, _kt, _tokens)]
    sums, maps = joint_attention_stats(*meta, 3, 4, impl="torch")
    assert sums.shape == (2, 2, 3) and maps.shape == (2, 2, 12) and maps.device.type == "meta"


@needs_triton
def test_triton_empty_selection():
    """No token selected: empty outputs and zero gradients, every kernel launched on the empty shapes."""
    q, k_img, k_txt, token_index = make_inputs(31, 1, 2, 2, 3, 5, 1, 8, torch.float32)
    inputs = [t.to(DEVICE).requires_grad_(True) for t in (q, k_img, k_txt)]
    sums, maps = joint_attention_stats(*inputs, token_index[:, :0].to(DEVICE), 2, 3, impl="triton")
    assert sums.shape == (1, 0, 3) and maps.shape == (1, 0, 6)
    grads = torch.autograd.grad(sums.sum() + maps.sum(), inputs)
    assert all(g.shape == x.shape and torch.equal(g, torch.zeros_like(g)) for g, x in zip(grads, inputs))


def test_the_triton_path_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(ops, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"^joint_attention_stats: the Triton path needs the `triton` package$"):
        joint_attention_stats(_q, _ki, _kt, _tokens, 3, 4, impl="triton")
    monkeypatch.setattr(ops, "HAS_TRITON", True)
    monkeypatch.setattr(ops, "INTERPRET", False)
    with pytest.raises(RuntimeError) as error:
        joint_attention_stats(_q, _ki, _kt, _tokens, 3, 4, impl="triton")
    assert str(error.value) == (
        "joint_attention_stats: the Triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before sgfast.kernels "
        "is imported (to run the kernels on the CPU through the interpreter)"
    )


def test_the_docs_examples_run():
    """docs/kernels.md's joint-attention examples, run in order as one script (the reference on the CPU)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
    section = text[text.index("## Joint attention statistics"):]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    scope = {}
    exec(compile("\n".join(blocks), "docs/kernels.md", "exec"), scope)
    assert scope["maps"].shape == (1, 2, 64) and scope["dk_img"].shape == (1, 4, 64, 16)
    assert ((scope["centroid"] > 0) & (scope["centroid"] < 1)).all()
