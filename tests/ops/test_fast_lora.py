"""The fused LoRA linear (ops/fast_lora.py): gradcheck in float64 against its maths, equal to the torch reference with
a plain weight standing in for the NF4 dequantise (a reused buffer, overwritten before backward), bf16 autocast
under the tolerance rule."""

import torch

from so8t_hf.ops.fast_lora import DequantBuffer, lora_linear, lora_linear_reference


def _inputs(n=7, fan_in=12, fan_out=10, r=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, fan_in, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(fan_out, fan_in, generator=g, dtype=dtype)
    a = torch.randn(r, fan_in, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(fan_out, r, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(fan_out, generator=g, dtype=dtype)
    return x, w, a, b, bias


def test_gradcheck_float64():
    x, w, a, b, bias = _inputs()
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, lambda: w, a, b, 0.7, bias), (x, a, b))


def test_equals_reference_and_grads_with_a_buffer_backed_weight():
    x, w, a, b, bias = _inputs(dtype=torch.float32)
    buffers = DequantBuffer()
    big = buffers.get((40, 40), torch.float32, "cpu")  # grow it first: the weight is a view of its first elements
    big.fill_(float("nan"))

    def dequantize():  # stands in for bitsandbytes' dequantize_4bit(out=buffer)
        out = buffers.get(w.shape, w.dtype, "cpu")
        out.copy_(w)
        return out

    out = lora_linear(x, dequantize, a, b, 2.0)
    buffers.get((40, 40), torch.float32, "cpu").fill_(float("nan"))  # another layer overwrites it before backward
    out.square().sum().backward()
    got = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
    for t in (x, a, b):
        t.grad = None
    ref = lora_linear_reference(x, w, a, b, 2.0)
    ref.square().sum().backward()
    for g_, e in zip(got, (ref.detach(), x.grad, a.grad, b.grad)):
        torch.testing.assert_close(g_, e, atol=1e-5, rtol=1e-5)
    assert buffers.get(w.shape, w.dtype, "cpu").data_ptr() == big.data_ptr()  # one buffer, reused


def test_bf16_autocast_meets_the_tolerance_rule_and_keeps_fp32_adapter_grads():
    x, w, a, b, _ = _inputs(n=64, fan_in=64, fan_out=48, r=8, dtype=torch.float32, seed=1)
    w16 = w.bfloat16()
    ref = lora_linear_reference(x.detach().double(), w16.double(), a.detach().double(), b.detach().double(), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = lora_linear(x, lambda: w16, a, b, 0.5)
        plain = torch.nn.functional.linear(x, w16) + 0.5 * torch.nn.functional.linear(
            torch.nn.functional.linear(x, a), b)
    assert fused.dtype == torch.bfloat16
    err_fused = (fused.double() - ref).abs().max().item()
    err_plain = (plain.double() - ref).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-6, (err_fused, err_plain)
    fused.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_backward_launches_no_scale_or_recast_kernels():
    """The scale rides on the matmuls (alpha) and backward reuses forward's bf16 adapter casts: the only elementwise
    ops left in backward are the upcasts of the fp32 gradients (dA, dB and dx)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w, a, b, _ = _inputs(n=16, fan_in=32, fan_out=24, r=4, dtype=torch.float32, seed=2)
    w16 = w.bfloat16()  # the frozen bf16 base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, lambda: w16, a, b, 0.5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    with Ops() as ops:
        out.backward(grad)
    assert not [n for n in ops.names if n.startswith("mul")], ops.names
    assert ops.names.count("_to_copy") == 3, ops.names
    assert a.grad.dtype == b.grad.dtype == x.grad.dtype == torch.float32
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    lora_linear_reference(xd, w16.double(), ad, bd, 0.5).backward(grad.double())
    for got, want in ((x.grad, xd.grad), (a.grad, ad.grad), (b.grad, bd.grad)):
        assert (got.double() - want).norm() <= 0.01 * want.norm()  # bf16 matmuls against a float64 reference
