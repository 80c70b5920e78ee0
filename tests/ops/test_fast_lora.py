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
