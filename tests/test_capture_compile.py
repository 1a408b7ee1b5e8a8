"""A captured cross-attention layer compiles whole: the fused op (a triton_op on CUDA, a custom op
under the interpreter) traces without a graph break, and the compiled layer records the same maps,
output and query gradient as the eager one."""

import importlib

import pytest
import torch

from sgfast.capture import Capture, default_layers

ops = importlib.import_module("sgfast.kernels.attention_stats")
DEVICE = "cpu" if ops.INTERPRET else "cuda"


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (Linux)")
def test_captured_layer_compiles_fullgraph(tiny_pipe):
    unet = tiny_pipe.unet.to(DEVICE)
    name = default_layers(unet)[0]
    capture = Capture(unet, [name], None, impl="triton")
    attn = capture.modules[name]
    g = torch.Generator().manual_seed(0)
    height, width = 3, 5
    hidden = torch.randn(1, height * width, attn.to_q.in_features, generator=g).to(DEVICE).requires_grad_(True)
    text = torch.randn(1, 77, attn.to_k.in_features, generator=g).to(DEVICE)
    tokens, weights = torch.tensor([[2, 5, 5]], device=DEVICE), torch.tensor([[[1.0, 0, 0], [0, 0.5, 0.5]]], device=DEVICE)

    def run(layer):
        with capture, capture.record(tokens, weights, (height, width), features=False):
            out = layer(hidden, encoder_hidden_states=text)
            maps = capture.maps[name]
            (grad,) = torch.autograd.grad((maps.square().sum() + out.square().mean()), hidden)
        return out.detach(), maps.detach(), grad

    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(attn, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
    got, want = run(compiled), run(attn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert got[1].shape == (1, 2, height, width)
