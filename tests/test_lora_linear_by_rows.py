"""ops.lora_linear_by_rows (each block of rows with its own LoRA adapter, one base GEMM each
way: PPO's stacked policy and critic rows) against a float64 oracle built per block from the
analytic gradients, and against the per-block lora_linear calls it replaces."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import LoraRows
from rlhf_fast.quant.weight import quantize_weight

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _assert_close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: no gradient"
    scale = expected.abs().max().item() + 1e-12
    error = (actual.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g}"


def _inputs(dtype, lora_dtype, seed, spans, k=67, n=45, ranks=(4, 9)):
    """x [M, k], a base [n, k], a bias, one adapter (A, B, scaling) per span, dy [M, n]."""
    g = torch.Generator().manual_seed(seed)
    rows = max(stop for _, stop in spans) + 3  # 3 rows after the last block: base alone
    x = torch.randn(rows, k, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_()
    blocks = []
    for (start, stop), r, scaling in zip(spans, ranks, (0.75, 2.0), strict=False):
        a = (torch.randn(r, k, generator=g) / k**0.5).to(lora_dtype).requires_grad_()
        b = (torch.randn(n, r, generator=g) / r**0.5).to(lora_dtype).requires_grad_()
        blocks.append(LoraRows(start, stop, a, b, scaling))
    return x, weight, bias, blocks, torch.randn(rows, n, generator=g).to(dtype)


def _oracle(x, dense, bias, blocks, dy):
    """(y, dx, [dA, dB per block], dbias) in float64."""
    x64, w, dy64 = x.detach().double(), dense.double(), dy.double()
    y = x64 @ w.T + bias.detach().double()
    dx = dy64 @ w
    grads = []
    for block in blocks:
        rows = slice(block.start, block.stop)
        a, b, s = block.lora_A.detach().double(), block.lora_B.detach().double(), block.scaling
        y[rows] += s * (x64[rows] @ a.T) @ b.T
        dy_b = dy64[rows] @ b
        dx[rows] += s * dy_b @ a
        grads += [s * dy_b.T @ x64[rows], s * dy64[rows].T @ (x64[rows] @ a.T)]
    return y, dx, grads, dy64.sum(0)


def _run(backend, x, weight, bias, blocks, dy):
    y = ops.lora_linear_by_rows(x, weight, bias, blocks, backend=backend)
    y.backward(dy)
    grads = [t.grad for block in blocks for t in (block.lora_A, block.lora_B)]
    return y.detach(), x.grad, grads, bias.grad


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize(("dtype", "lora_dtype"), [(torch.float32, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("spans", [[(0, 13), (13, 30)], [(5, 17)], [(2, 9), (20, 21)]])
def test_matches_the_oracle(backend, dtype, lora_dtype, spans):
    x, w, bias, blocks, dy = _inputs(dtype, lora_dtype, len(spans) + spans[0][0], spans)
    y, dx, grads, dbias = _run(backend, x, w, bias, blocks, dy)
    ey, edx, egrads, edbias = _oracle(x, w, bias, blocks, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert all(g.dtype == lora_dtype for g in grads)
    _assert_close(y, ey, dtype, "y")
    _assert_close(dx, edx, dtype, "dx")
    for index, (actual, expected) in enumerate(zip(grads, egrads, strict=True)):
        _assert_close(actual, expected, dtype, f"adapter gradient {index}")
    _assert_close(dbias, edbias, dtype, "dbias")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base(bits):
    x, w, bias, blocks, dy = _inputs(torch.float32, torch.float32, bits, [(0, 11), (11, 24)])
    qweight = quantize_weight(w, bits, 32)
    y, dx, grads, dbias = _run("cpp", x, qweight, bias, blocks, dy)
    ey, edx, egrads, _ = _oracle(x, qweight.dequantize(), bias, blocks, dy)
    _assert_close(y, ey, torch.float32, "y")
    _assert_close(dx, edx, torch.float32, "dx")
    for actual, expected in zip(grads, egrads, strict=True):
        _assert_close(actual, expected, torch.float32, "adapter gradient")


def test_equals_one_lora_linear_call_per_block():
    """What it replaces in lora/row_groups.py: each block through ops.lora_linear, the rest
    through the base, concatenated (fp32: equal up to the GEMMs' summation order)."""
    x, w, bias, blocks, dy = _inputs(torch.float32, torch.float32, 7, [(0, 16), (16, 32)])
    ours, dx, grads, _ = _run("cpp", x, w, bias, blocks, dy)
    x2 = x.detach().clone().requires_grad_()
    parts = [ops.lora_linear(x2[b.start : b.stop], w, bias, b.lora_A, b.lora_B, b.scaling)
             for b in blocks] + [torch.nn.functional.linear(x2[32:], w, bias)]  # fmt: skip
    for b in blocks:
        b.lora_A.grad = b.lora_B.grad = None
    torch.cat(parts).backward(dy)
    torch.testing.assert_close(ours, torch.cat(parts).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, x2.grad, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(grads, [t.grad for b in blocks for t in (b.lora_A, b.lora_B)],
                            strict=True):  # fmt: skip
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_no_blocks_is_the_base_and_bad_blocks_are_refused():
    x, w, bias, blocks, _ = _inputs(torch.float32, torch.float32, 3, [(0, 4), (4, 8)])
    torch.testing.assert_close(ops.lora_linear_by_rows(x, w, bias, []),
                               torch.nn.functional.linear(x, w, bias))  # fmt: skip
    a, b = blocks[0].lora_A, blocks[0].lora_B
    for bad in ([LoraRows(0, 5, a, b, 1.0), LoraRows(4, 8, a, b, 1.0)],  # overlap
                [LoraRows(3, 3, a, b, 1.0)],  # empty
                [LoraRows(0, 99, a, b, 1.0)]):  # past the rows  # fmt: skip
        with pytest.raises(ValueError, match="blocks must be non-empty"):
            ops.lora_linear_by_rows(x, w, bias, bad)
    with pytest.raises(ValueError, match="lora_A"):
        ops.lora_linear_by_rows(x, w, bias, [LoraRows(0, 4, a[:, :5], b, 1.0)])
    with pytest.raises(ValueError, match="x2d must be"):
        ops.lora_linear_by_rows(x[None], w, bias, blocks)


def test_non_contiguous_x_and_adapters():
    """x2d a strided view (every other column of a wider tensor) and B a transposed view: the
    same values and gradients as on contiguous copies."""
    x, w, bias, blocks, dy = _inputs(torch.float32, torch.float32, 11, [(1, 9), (9, 20)])
    wide = torch.zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x.detach()
    strided = wide[:, ::2].requires_grad_()
    assert not strided.is_contiguous()
    for block in blocks:
        block.lora_B.data = block.lora_B.detach().t().contiguous().t()
    y, dx, grads, _ = _run("cpp", strided, w, bias, blocks, dy)
    ey, edx, egrads, _ = _oracle(x, w, bias, blocks, dy)
    _assert_close(y, ey, torch.float32, "y")
    _assert_close(dx, edx, torch.float32, "dx")
    for actual, expected in zip(grads, egrads, strict=True):
        _assert_close(actual, expected, torch.float32, "adapter gradient")
