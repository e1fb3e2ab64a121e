"""ops.lora_linear on every backend against a float64 oracle written here from the analytic
gradients (dx = dy W + s ((dy B) A) * noise, dA = s (dy B)^T (x * noise), dB = s dy^T
((x * noise) A^T)), with the dropout noise drawn by torch.nn.Dropout from the same seed."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from rlhf_fast import ops
from rlhf_fast.ops._dispatch import BackendUnavailableError
from rlhf_fast.quant.weight import quantize_weight

# the module (rlhf_fast.ops.lora_linear the attribute is the function)
lora_module = importlib.import_module("rlhf_fast.ops.lora_linear")

BACKENDS = ["reference", "cpp", "triton"]  # triton: interpreted on CPU (tests/conftest.py)
# Relative to the largest magnitude of each compared tensor. 16-bit: the fused path rounds
# its [M, r] products and the output to x's dtype; the oracle rounds nothing.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
SCALING = 0.75


def dropout_noise_by_nn_dropout(shape, p, dtype, seed):
    """What torch.nn.Dropout multiplies by (seeded like the op's call): keep / (1 - p)."""
    torch.manual_seed(seed)
    if p == 0:
        return torch.ones(shape, dtype=torch.float64)
    return nn.Dropout(p).train()(torch.ones(shape, dtype=dtype)).double()


def oracle(x, dense_weight, bias, lora_A, lora_B, grad_y, noise):
    """(y, dx, dA, dB, dbias) in float64."""
    x2d = x.detach().double().reshape(-1, x.shape[-1])
    noise = noise.reshape(x2d.shape)
    w, a, b = dense_weight.double(), lora_A.detach().double(), lora_B.detach().double()
    dy = grad_y.double().reshape(x2d.shape[0], -1)
    dropped = x2d * noise
    y = x2d @ w.T + SCALING * (dropped @ a.T) @ b.T
    if bias is not None:
        y = y + bias.detach().double()
    dy_b = dy @ b
    dx = dy @ w + SCALING * (dy_b @ a) * noise
    da = SCALING * dy_b.T @ dropped
    db = SCALING * dy.T @ (dropped @ a.T)
    out_shape = (*x.shape[:-1], w.shape[0])
    return y.reshape(out_shape), dx.reshape(x.shape), da, db, dy.sum(0)


def assert_close(actual, expected, dtype, what):
    assert actual is not None, f"{what}: no gradient"
    scale = expected.abs().max().item() + 1e-12
    tolerance = TOLERANCE[dtype] * scale
    error = (actual.double() - expected).abs().max().item()
    assert error <= tolerance, f"{what}: max error {error:.3g} > {tolerance:.3g}"


def make_inputs(m, k, n, r, dtype, lora_dtype, seed, bias=True, leading=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, m, k, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(lora_dtype).requires_grad_()
    lora_B = (torch.randn(n, r, generator=g) / r**0.5).to(lora_dtype).requires_grad_()
    grad_y = torch.randn(*leading, m, n, generator=g).to(dtype)
    return x, weight, b, lora_A, lora_B, grad_y


def run(backend, x, weight, bias, lora_A, lora_B, grad_y, p, seed):
    torch.manual_seed(seed)
    y = ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout=p, backend=backend)
    # Backward must not depend on (nor disturb) the global RNG: draw something in between.
    torch.rand(17)
    y.backward(grad_y)
    grads = [t.grad for t in (x, lora_A, lora_B, bias) if t is not None]
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dense_matches_oracle(backend, dtype, rank, p):
    m, k, n = 37, 67, 45  # odd sizes
    seed = rank * 10 + int(p * 10)
    x, w, b, a, bb, dy = make_inputs(m, k, n, rank, dtype, dtype, seed)
    y, (dx, da, db, dbias) = run(backend, x, w, b, a, bb, dy, p, seed)
    noise = dropout_noise_by_nn_dropout(x.shape, p, a.dtype, seed)
    ey, edx, eda, edb, edbias = oracle(x, w, b, a, bb, dy, noise)
    assert y.dtype == dtype and y.shape == (m, n)
    assert dx.dtype == dtype and da.dtype == dtype and db.dtype == dtype
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, dtype, what)
    assert_close(dbias, edbias, dtype, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_adapters_on_bf16_base(backend):
    """peft keeps adapters in fp32 on a bf16 model: gradients come back in fp32."""
    x, w, b, a, bb, dy = make_inputs(20, 64, 48, 8, torch.bfloat16, torch.float32, 5)
    y, (dx, da, db, _) = run(backend, x, w, b, a, bb, dy, 0.2, 5)
    noise = dropout_noise_by_nn_dropout(x.shape, 0.2, torch.float32, 5)
    ey, edx, eda, edb, _ = oracle(x, w, b, a, bb, dy, noise)
    assert y.dtype == torch.bfloat16 and da.dtype == torch.float32 and db.dtype == torch.float32
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, torch.bfloat16, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_adapters_on_fp32_x_scale_dropout_in_the_adapters_dtype(backend):
    """nn.Dropout (peft's) holds 1 / (1 - p) in the adapters' dtype: 1 / 0.7 is 1.4297 in
    bf16, not 1.428571. With fp32 x the products are fp32, so the 8e-4 gap shows."""
    x, w, b, a, bb, dy = make_inputs(20, 64, 48, 8, torch.float32, torch.bfloat16, 6)
    y, (dx, da, db, _) = run(backend, x, w, b, a, bb, dy, 0.3, 6)
    noise = dropout_noise_by_nn_dropout(x.shape, 0.3, torch.bfloat16, 6)
    ey, edx, eda, edb, _ = oracle(x, w, b, a, bb, dy, noise)
    assert da.dtype == torch.bfloat16 and db.dtype == torch.bfloat16
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx")):
        assert_close(actual, expected, torch.float32, what)
    for actual, expected, what in ((da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, torch.bfloat16, what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    """A batch with no tokens (x [2, 0, K]) gives y [2, 0, N] and zero gradients."""
    x, w, b, a, bb, _ = make_inputs(0, 16, 12, 4, torch.float32, torch.float32, 7, leading=(2,))
    y = ops.lora_linear(x, w, b, a, bb, SCALING, dropout=0.1, backend=backend)
    assert y.shape == (2, 0, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for grad in (a.grad, bb.grad, b.grad):
        assert grad is not None and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_and_non_contiguous_x(backend):
    x, w, _, a, bb, dy = make_inputs(5, 40, 24, 4, torch.float32, torch.float32, 9, False, (3,))
    # a transposed view: x_t is [3, 5, 40] but not contiguous
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not x_t.is_contiguous()
    y, (dx, da, db) = run(backend, x_t, w, None, a, bb, dy, 0.1, 9)
    noise = dropout_noise_by_nn_dropout(x.shape, 0.1, torch.float32, 9)
    ey, edx, eda, edb, _ = oracle(x_t, w, None, a, bb, dy, noise)
    assert y.shape == (3, 5, 24) and dx.shape == (3, 5, 40)
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, torch.float32, what)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of t as every-other-element view of a buffer twice as long on the last axis."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_bias_and_adapters(backend):
    # A bias sliced with a step (a fused qkv bias split by stride, say) was read as if it were
    # contiguous by the Triton kernel: y was off by the neighbouring elements.
    x, w, b, a, bb, dy = make_inputs(7, 40, 24, 4, torch.float32, torch.float32, 11)
    views = [strided(t).requires_grad_(t.requires_grad) for t in (w, b, a, bb)]
    assert not any(t.is_contiguous() for t in views)
    y, (dx, da, db, dbias) = run(backend, x, *views, dy, 0.0, 11)
    noise = dropout_noise_by_nn_dropout(x.shape, 0.0, torch.float32, 11)
    ey, edx, eda, edb, edbias = oracle(x, w, b, a, bb, dy, noise)
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, torch.float32, what)
    assert_close(dbias, edbias, torch.float32, "dbias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 32), (4, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_base_matches_oracle_on_dequantized_weight(
    backend, bits, group_size, dtype, monkeypatch
):
    # Small row blocks, so the backward's block loop runs several blocks and a ragged last one.
    monkeypatch.setattr(lora_module, "DEQUANT_BLOCK_ELEMENTS", 64 * 200)
    m, k, n = 70, 200, 150  # K ragged for g = 128 and 32
    x, w, b, a, bb, dy = make_inputs(m, k, n, 8, dtype, torch.float32, bits + group_size)
    qweight = quantize_weight(w.float(), bits, 32 if bits == 8 else group_size)
    y, (dx, da, db, dbias) = run(backend, x, qweight, b, a, bb, dy, 0.2, 3)
    noise = dropout_noise_by_nn_dropout(x.shape, 0.2, torch.float32, 3)
    ey, edx, eda, edb, edbias = oracle(x, qweight.dequantize(), b, a, bb, dy, noise)
    for actual, expected, what in ((y, ey, "y"), (dx, edx, "dx"), (da, eda, "dA"), (db, edb, "dB")):
        assert_close(actual, expected, dtype if dtype != torch.float32 else torch.float32, what)
    assert_close(dbias, edbias, dtype, "dbias")


def test_no_gradient_to_weight_and_only_requested_gradients():
    x, w, _, a, bb, dy = make_inputs(6, 32, 16, 2, torch.float32, torch.float32, 1, False)
    w.requires_grad_()
    x.requires_grad_(False)
    bb.requires_grad_(False)
    y = ops.lora_linear(x, w, None, a, bb, 2.0, backend="cpp")
    y.backward(dy)
    assert w.grad is None and x.grad is None and bb.grad is None and a.grad is not None


def test_fused_saves_x_and_a_bit_mask_only():
    """With dropout, peft keeps the [M, K] float noise and the dropped x for backward; the
    fused op keeps x, the keep mask as bits, the [M, r] product and adapter-sized tensors."""
    x, w, _, a, bb, _ = make_inputs(64, 96, 80, 4, torch.float32, torch.float32, 2, False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.lora_linear(x, w, None, a, bb, 1.0, dropout=0.5, backend="cpp")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    bits = [t for t in saved if t.dtype == torch.uint8]
    assert len(bits) == 1 and bits[0].numel() == x.numel() // 8
    small = sum(t.numel() * t.element_size() for t in saved if t.numel() < x.numel())
    assert small <= (64 * 4 + 2 * 4 * (96 + 80)) * 4 + x.numel() // 8


@pytest.mark.parametrize("shape", [(1,), (7, 13), (8, 16), (3, 5, 41)])
def test_mask_packing_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.4
    packed = lora_module.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(lora_module.unpack_mask(packed, mask.shape), mask)


def test_backward_leaves_global_rng_alone():
    x, w, _, a, bb, dy = make_inputs(8, 16, 12, 2, torch.float32, torch.float32, 4, False)
    y = ops.lora_linear(x, w, None, a, bb, 1.0, dropout=0.5, backend="cpp")
    state = torch.get_rng_state()
    y.backward(dy)
    assert torch.equal(state, torch.get_rng_state())


def test_dispatch():
    x, w, _, a, bb, _ = make_inputs(2, 16, 12, 2, torch.float32, torch.float32, 4, False)
    with pytest.raises(BackendUnavailableError, match="lora_linear"):
        ops.lora_linear(x, w, None, a, bb, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ops.lora_linear(x, w, None, a, bb, 1.0, backend="fastest")


def _call(**changes):
    x, w, b, a, bb, _ = make_inputs(4, 16, 12, 2, torch.float32, torch.float32, 4)
    args = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb, "scaling": 1.0}
    dropout = changes.pop("dropout", 0.0)
    args.update(changes)
    return ops.lora_linear(**args, dropout=dropout, backend="cpp")


@pytest.mark.parametrize(
    "changes, error, name",
    [
        ({"x": [1.0]}, TypeError, "x"),
        ({"x": torch.zeros(4, 16, dtype=torch.int32)}, TypeError, "x"),
        ({"x": torch.zeros(4, 15)}, ValueError, "x"),
        ({"weight": torch.zeros(12, 16, dtype=torch.bfloat16)}, TypeError, "weight"),
        ({"weight": torch.zeros(12)}, ValueError, "weight"),
        ({"bias": torch.zeros(11)}, ValueError, "bias"),
        ({"bias": torch.zeros(12, dtype=torch.bfloat16)}, TypeError, "bias"),
        ({"lora_A": torch.zeros(2, 15)}, ValueError, "lora_A"),
        ({"lora_A": torch.zeros(0, 16)}, ValueError, "lora_A"),
        ({"lora_B": torch.zeros(12, 3)}, ValueError, "lora_B"),
        ({"lora_B": torch.zeros(12, 2, dtype=torch.float16)}, TypeError, "lora_B"),
        ({"scaling": float("nan")}, ValueError, "scaling"),
        ({"scaling": "2"}, TypeError, "scaling"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
    ],
)
def test_bad_input_names_the_argument(changes, error, name):
    with pytest.raises(error, match=rf"^{name} "):
        _call(**changes)


needs_dequantize_op = pytest.mark.skipif(
    lora_module._DEQUANTIZE_ROWS_OP is None, reason="C++ extension without lora_dequantize_rows"
)


@needs_dequantize_op
@pytest.mark.parametrize("bits, group_size, k", [(4, 128, 300), (4, 32, 64), (8, -1, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_rows_op_gives_the_bits_of_dequantize(bits, group_size, k, dtype):
    weight = torch.randn(50, k, generator=torch.Generator().manual_seed(k))
    qweight = quantize_weight(weight, bits, 32 if bits == 8 else group_size)
    rows = lora_module.dequantize_rows(qweight, 7, 43, dtype)
    assert torch.equal(rows, qweight.dequantize(dtype)[7:43])


@needs_dequantize_op
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_rows_opcheck(bits):
    qweight = quantize_weight(torch.randn(12, 70), bits, 32)
    args = (qweight.data, qweight.scales, qweight.offsets, qweight.group_size, 70, torch.bfloat16)
    torch.library.opcheck(torch.ops.rlhf_fast.lora_dequantize_rows.default, args)


@needs_dequantize_op
def test_dequantize_rows_op_rejects_inconsistent_tensors():
    qweight = quantize_weight(torch.randn(12, 64), 4, 32)
    op = torch.ops.rlhf_fast.lora_dequantize_rows
    with pytest.raises(ValueError, match="scales"):
        op(qweight.data, qweight.scales[:5], qweight.offsets, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="qdata"):
        op(qweight.data, qweight.scales, qweight.offsets, 32, 128, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        op(qweight.data, qweight.scales, qweight.offsets, 32, 64, torch.int32)


@pytest.mark.parametrize("native", [True, False], ids=["cpp", "torch-ops"])
@pytest.mark.parametrize("shape", [(9, 24), (3, 5, 41)])
def test_mask_packs_from_and_unpacks_to_any_dtype(native, shape, monkeypatch):
    if native and lora_module._PACK_KEEP_OP is None:
        pytest.skip("C++ extension without lora_pack_keep")
    if not native:
        monkeypatch.setattr(lora_module, "_PACK_KEEP_OP", None)
        monkeypatch.setattr(lora_module, "_UNPACK_KEEP_OP", None)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.5
    mask.view(-1, shape[-1])[:, 7] = True  # lane 7 of a byte: the int64 sign bit in torch-ops
    flat = torch.cat([mask.reshape(-1), mask.new_zeros(-mask.numel() % 8)])
    expected_bits = (flat.view(-1, 8).long() << torch.arange(8)).sum(1).to(torch.uint8)
    for source in (torch.bool, torch.uint8, torch.float32, torch.bfloat16):
        assert torch.equal(lora_module.pack_mask(mask.to(source)), expected_bits), source
    for dtype in (torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        ones = lora_module.unpack_mask(expected_bits, mask.shape, dtype)
        assert ones.dtype == dtype and torch.equal(ones, mask.to(dtype)), dtype


@pytest.mark.skipif(lora_module._PACK_KEEP_OP is None, reason="no lora_pack_keep")
def test_mask_ops_opcheck_and_errors():
    keep = (torch.rand(5, 19) > 0.3).float()
    torch.library.opcheck(torch.ops.rlhf_fast.lora_pack_keep.default, (keep,))
    bits = torch.ops.rlhf_fast.lora_pack_keep(keep)
    unpack = torch.ops.rlhf_fast.lora_unpack_keep
    torch.library.opcheck(unpack.default, (bits, 95, torch.bfloat16))
    with pytest.raises(ValueError, match="bits holds"):
        unpack(bits, 200, torch.float32)
    with pytest.raises(TypeError, match="keep"):
        torch.ops.rlhf_fast.lora_pack_keep(keep.double())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backward_refuses_create_graph(backend):
    # The fused backward uses detached copies of A and B: under create_graph=True a second
    # derivative such as d(dx)/dB came out wrong (the reference's is right). It must refuse.
    x, w, _, a, bb, _ = make_inputs(3, 8, 5, 2, torch.float32, torch.float32, 3, False)
    y = ops.lora_linear(x, w, None, a, bb, SCALING, backend=backend)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
