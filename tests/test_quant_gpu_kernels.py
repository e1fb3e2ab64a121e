"""The GPU kernels of quant_matmul, checked as far as each machine allows.

1. The Triton kernels (kernels/quant_matmul.py) on CPU tensors under the Triton interpreter,
   against a float64 product with the weight dequantized in float64 from its codes: M in
   {1, 3, 17}, ragged K (padded int4 groups, K < 32), N off the block size, int4 g32 / g64 and
   int8, x fp32 / fp16 / bf16, with and without bias, strided x. Outputs are poisoned.
2. The CUDA GEMV (csrc/cuda/quant_gemv.cu): it compiles for sm_80 and sm_90 without warnings,
   spills or local memory; the torch binding compiles against this torch's headers; and its
   lane program (quant_gemv_lane.cuh) runs on the CPU in emulation against the same oracle,
   with the launcher's choice of 16-byte loads and a check of their alignment.
3. On a GPU: the CUDA ops torch.ops.rlhf_fast.quant_matmul_int{4,8} against the oracle, and the
   Triton kernels compiled for real (in a subprocess, since this module interprets Triton).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import sys

import pytest
import torch
from native_build import (
    CSRC,
    DTYPE_INDEX,
    GXX,
    NVCC,
    ROOT,
    TORCH_NVCC_DEFINES,
    build_emulator,
    needs_gpu,
    needs_nvcc,
    run,
)  # fmt: skip

from rlhf_fast.quant.weight import QuantizedWeight, pack_int4, quantize_weight, unpack_int4

_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    try:
        import rlhf_fast.kernels.quant_matmul as quant_kernels
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):
            quant_kernels = None  # triton was imported earlier without the interpreter
        elif not isinstance(quant_kernels._int4_kernel, InterpretedFunction):
            quant_kernels = importlib.reload(quant_kernels)
    except ImportError:
        quant_kernels = None
finally:
    if _saved_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.ops.quant_matmul import (  # noqa: E402
    quant_matmul_reference,
    registered_quant_matmul,
)

# Results are rounded once from an fp32 accumulator: fp32 differs from the float64 oracle by
# accumulation order only; fp16 / bf16 by about one unit in the last place of the output.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1.5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
}
FORMATS = {"int4-g32": (4, 32), "int4-g64": (4, 64), "int8": (8, None)}

needs_interpreter = pytest.mark.skipif(
    quant_kernels is None,
    reason="triton missing, or imported before TRITON_INTERPRET=1 was set (set it in the "
    "environment, or run this module alone)",
)
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not on PATH")


# ---------------------------------------------------------------- cases and the oracle


def make_weight(fmt: str, n: int, k: int, seed: int) -> QuantizedWeight:
    bits, group_size = FORMATS[fmt]
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_weight(weight, bits, group_size or 32)


def make_x(m: int, k: int, dtype: torch.dtype, layout: str, seed: int, device="cpu"):
    """x [m, k] of `dtype`: contiguous, with column stride 2, or a transposed view."""
    generator = torch.Generator().manual_seed(seed + 1000)
    if layout == "strided":
        return torch.randn(m, 2 * k, generator=generator).to(device, dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(k, m, generator=generator).to(device, dtype).t()
    return torch.randn(m, k, generator=generator).to(device, dtype)


def dequantize_f64(qweight: QuantizedWeight) -> torch.Tensor:
    """The weight the codes represent, computed in float64 (no fp32 rounding of q*s + o)."""
    data, scales = qweight.data.cpu(), qweight.scales.cpu().double()
    if qweight.bits == 8:
        return data.double() * scales[:, None]
    n, k, g = qweight.out_features, qweight.in_features, qweight.group_size
    codes = unpack_int4(data).double().view(n, -1, g)
    w = codes * scales[..., None] + qweight.offsets.cpu().double()[..., None]
    return w.view(n, -1)[:, :k]


def oracle(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None):
    y = x.cpu().double() @ dequantize_f64(qweight).T
    return y if bias is None else y + bias.cpu().double()


def assert_close_to_oracle(y, x, qweight, bias, dtype=None):
    dtype = dtype or x.dtype
    expected = oracle(x, qweight, bias)
    assert y.shape == expected.shape
    torch.testing.assert_close(y.cpu().double(), expected, **TOLERANCES[dtype])


class _PoisonedTorch:
    """Stands in for the launcher module's `torch`: fresh outputs start as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        return out.fill_(math.nan) if out.dtype.is_floating_point else out


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(quant_kernels, "torch", _PoisonedTorch())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the launcher picks its blocks from it


# ---------------------------------------------------------------- 1. Triton, interpreted

# (K, N): ragged K (80 pads to 96 / 128 for int4; 5 is less than one block), N off the blocks.
SHAPES = [(80, 40), (64, 70), (5, 17)]
LAYOUTS = ["contiguous", "bias", "strided-bias", "transposed"]


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_matches_float64_oracle(poisoned, fmt, m, dtype, layout):
    for seed, (k, n) in enumerate(SHAPES):
        qweight = make_weight(fmt, n, k, seed)
        x = make_x(m, k, dtype, layout.removesuffix("-bias").replace("bias", "contiguous"), seed)
        bias = torch.randn(n).to(dtype) if layout.endswith("bias") else None
        y = quant_kernels.quant_matmul_triton(x, qweight, bias)
        assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
        assert_close_to_oracle(y, x, qweight, bias)


@needs_interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_integer_case_is_exact(poisoned, fmt):
    # Small integers, scale 1 and integer offsets: every product and sum is exact in fp32, so
    # any misplaced nibble, group or edge shows up as an exact mismatch.
    generator = torch.Generator().manual_seed(7)
    n, k, m = 37, 96, 5
    bits, group_size = FORMATS[fmt]
    if bits == 8:
        codes = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
        qweight = QuantizedWeight(8, -1, (n, k), codes, torch.ones(n))
        weight = codes.double()
    else:
        padded = -(-k // group_size) * group_size
        codes = torch.randint(0, 16, (n, padded), generator=generator)
        offsets = torch.randint(-8, 8, (n, padded // group_size), generator=generator)
        qweight = QuantizedWeight(
            4, group_size, (n, k), pack_int4(codes), torch.ones(offsets.shape).half(),
            offsets.half(),
        )  # fmt: skip
        weight = (codes + offsets.repeat_interleave(group_size, 1)).double()[:, :k]
    for dtype in (torch.float32, torch.float16):
        x = torch.randint(-3, 4, (m, k), generator=generator).to(dtype)
        y = quant_kernels.quant_matmul_triton(x, qweight, None)
        # The fp32 accumulator is exact; the output is that rounded once to x's dtype.
        assert torch.equal(y, (x.double() @ weight.T).to(dtype)), dtype


@needs_interpreter
def test_triton_through_the_op_with_leading_dimensions(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qweight = make_weight("int4-g64", 33, 80, 0)
    x = torch.randn(2, 3, 80)
    bias = torch.randn(33)
    y = ops.quant_matmul(x, qweight, bias, backend="triton")
    assert y.shape == (2, 3, 33)
    torch.testing.assert_close(y, quant_matmul_reference(x, qweight, bias), atol=1e-4, rtol=1e-5)


@needs_interpreter
def test_triton_mixed_bias_dtype_and_empty_shapes(poisoned):
    qweight = make_weight("int8", 20, 48, 3)
    x = make_x(4, 48, torch.float16, "contiguous", 3)
    bias = torch.randn(20)  # fp32 bias with fp16 x
    assert_close_to_oracle(quant_kernels.quant_matmul_triton(x, qweight, bias), x, qweight, bias)
    assert quant_kernels.quant_matmul_triton(x[:0], qweight, None).shape == (0, 20)


_COMPILE_FOR_SM90 = """
import concurrent.futures, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rlhf_fast.kernels.quant_matmul as qk

INT4 = ["x_ptr", "data_ptr", "scales_ptr", "offsets_ptr", "bias_ptr", "y_ptr", "M", "N", "K",
        "group_size", "stride_xm", "stride_xk", "stride_data", "stride_scales",
        "stride_offsets", "stride_ym"]
INT8 = ["x_ptr", "data_ptr", "scales_ptr", "bias_ptr", "y_ptr", "M", "N", "K", "stride_xm",
        "stride_xk", "stride_data", "stride_ym"]

def compile_one(case):
    bits, dtype, (block_m, block_n, block_k, warps, stages) = case
    dot = getattr(tl, dtype)
    pointers = {"x_ptr": dtype, "bias_ptr": dtype, "y_ptr": dtype, "data_ptr": "u8" if bits == 4
                else "i8", "scales_ptr": "fp16" if bits == 4 else "fp32", "offsets_ptr": "fp16"}
    pointers = {k: "*" + {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(v, v)
                for k, v in pointers.items()}
    names = INT4 if bits == 4 else INT8
    signature = {name: pointers.get(name, "i32") for name in names}
    constants = dict(HAS_BIAS=True, DOT_DTYPE=dot, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=block_k, PRECISION="tf32x3" if dtype == "float32" else None)
    signature.update({name: "constexpr" for name in constants})
    # What the launcher's specialization sees for aligned tensors and 16-multiple sizes.
    aligned = [i for i, name in enumerate(names) if name not in ("M", "stride_xk")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    kernel = qk._int4_kernel if bits == 4 else qk._int8_kernel
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"], case
    return case

cases = []
for (wide, bits, m_class), shape in qk._GPU_SHAPES.items():
    if m_class == 1:  # the same mma.sync code as class 0, with another tile: saves ~8 s
        continue
    dtypes = ["float32"] if wide else ["bfloat16"] if bits == 4 else ["float16"]
    blocks = {shape[2], 32} if bits == 4 else {shape[2]}
    cases += [(bits, d, (*shape[:2], b, *shape[3:])) for d in dtypes for b in sorted(blocks)]
with concurrent.futures.ProcessPoolExecutor(2) as pool:
    done = list(pool.map(compile_one, cases))
print(len(done), "ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_launch_shapes_compile_for_sm90():
    # triton.compile needs no GPU: every launch shape of the GPU path (3xTF32 for fp32, wgmma
    # tiles for large M) must get through the real compiler, not just the interpreter.
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, timeout=600)
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- 2. CUDA build checks


@needs_nvcc
@pytest.mark.parametrize("arch,std", [("sm_80", "c++17"), ("sm_90", "c++20")])
def test_quant_gemv_compiles_cleanly(arch, std, tmp_path):
    result = run(
        [NVCC, f"-arch={arch}", f"-std={std}", "-O3", "-I", str(CSRC), "-c",
         str(CSRC / "cuda" / "quant_gemv.cu"), "-o", str(tmp_path / "quant_gemv.o"),
         "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
         "-Xptxas", "-warn-spills,-warn-lmem-usage", *TORCH_NVCC_DEFINES]
    )  # fmt: skip
    assert "warning" not in (result.stdout + result.stderr).lower()
    symbols = run(["nm", "-C", str(tmp_path / "quant_gemv.o")]).stdout
    assert "rlhf_fast::launch_quant_gemv_int4" in symbols
    assert "rlhf_fast::launch_quant_gemv_int8" in symbols


# ---------------------------------------------------------------- 2b. CUDA GEMV, emulated


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = build_emulator(
        tmp_path_factory.mktemp("quant_gemv_emulator"), "quant_gemv_cuda_emulator.cpp"
    )
    lib.quant_gemv_emulated.restype = ctypes.c_int
    lib.quant_gemv_emulated.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
        + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 3 + [ctypes.c_int] * 3
    )  # fmt: skip
    lib.quant_gemv_emulated_as_launched.restype = ctypes.c_int
    lib.quant_gemv_emulated_as_launched.argtypes = lib.quant_gemv_emulated.argtypes[:-2]
    return lib


# The emulator's status for a 16-byte load from an address the GPU cannot load from.
MISALIGNED_VECTOR_LOAD = -2


def gemv_emulated_status(lib, x, qweight, bias, *, data=None, paths=None):
    """The kernel's lane program on the CPU with the binding's arguments: (status, fp32 [M, N]
    that starts as NaN, so an element it never writes fails the comparison). paths: (vector_x,
    vector_w) as given, or None for the launcher's own choice (choose_load_paths). data: the
    codes as the kernel gets them (default: qweight's, contiguous)."""
    assert x.stride(1) == 1
    m, n, k = x.shape[0], qweight.out_features, qweight.in_features
    y = torch.full((m, n), math.nan)
    data = qweight.data.contiguous() if data is None else data
    scales = qweight.scales.contiguous()
    offsets = None if qweight.offsets is None else qweight.offsets.contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    args = [
        x.data_ptr(), x.stride(0), DTYPE_INDEX[x.dtype], data.data_ptr(), data.stride(0),
        scales.data_ptr(), None if offsets is None else offsets.data_ptr(),
        0 if offsets is None else offsets.stride(0), qweight.group_size,
        None if bias32 is None else bias32.data_ptr(), y.data_ptr(), m, n, k, qweight.bits,
    ]  # fmt: skip
    if paths is None:
        return lib.quant_gemv_emulated_as_launched(*args), y
    return lib.quant_gemv_emulated(*args, *(int(p) for p in paths)), y


def gemv_emulated(lib, x, qweight, bias, *, vector_x=True, vector_w=True):
    status, y = gemv_emulated_status(lib, x, qweight, bias, paths=(vector_x, vector_w))
    assert status == 0
    return y


def at_byte_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose data starts `offset` bytes past a 16-byte boundary."""
    size = t.numel() * t.element_size()
    buffer = torch.zeros(size + 16 + offset, dtype=torch.uint8)
    start = (-buffer.data_ptr()) % 16 + offset
    view = buffer[start : start + size].view(t.dtype).view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 == offset
    return view


@needs_gxx
def test_emulated_gemv_stays_in_bounds_under_address_sanitizer(tmp_path):
    # Buffers of exactly the format's sizes (x exactly M x K: a read past K is caught), ragged
    # K from 1 to 4200, groups of 32 / 64 / 96, every activation dtype, against a double sum.
    program = tmp_path / "quant_gemv_emulator_asan"
    run(
        [GXX, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         "-DQUANT_GEMV_EMULATOR_SELF_TEST", "-I", str(CSRC), "-o", str(program),
         str(ROOT / "tests" / "quant_gemv_cuda_emulator.cpp")]
    )  # fmt: skip
    assert run([str(program)]).stdout.strip() == "ok"


# K: ragged, under one block, one vector run of 16, and long enough that the unrolled loop
# runs several rounds (int4: > 128 blocks; int8: > 128 runs of 16; 4200 is not a multiple
# of 16, the int8 byte path).
GEMV_KS = [80, 5, 16, 4200, 4112]


@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_emulated_gemv_matches_float64_oracle(emulator, fmt, dtype):
    for seed, k in enumerate(GEMV_KS):
        qweight = make_weight(fmt, 5, k, seed)
        for m, with_bias in [(1, True), (2, False)]:
            x = make_x(m, k, dtype, "contiguous", seed)
            bias = torch.randn(5).to(dtype) if with_bias else None
            byte_path = fmt == "int8" and k % 16 != 0
            y = gemv_emulated(emulator, x, qweight, bias, vector_w=not byte_path)
            # Exact widening of x: fp32-level agreement whatever x's dtype.
            assert_close_to_oracle(y, x, qweight, bias, dtype=torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_emulated_gemv_scalar_paths_and_row_strides(emulator, fmt):
    qweight = make_weight(fmt, 7, 4112, 1)
    x = torch.randn(3, 4112 + 3)[:, :4112]  # rows not 16-byte aligned: no vector x loads
    bias = torch.randn(7)
    for vector_w in [True, False] if fmt == "int8" else [True]:
        y = gemv_emulated(emulator, x, qweight, bias, vector_x=False, vector_w=vector_w)
        assert_close_to_oracle(y, x, qweight, bias)


@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_emulated_launcher_picks_loads_the_layout_allows(emulator, fmt, dtype):
    # The launcher, not the test, decides which loads may be 16 bytes wide: x at an odd
    # offset, rows of x not 16-byte multiples apart, weight rows at an odd offset or with K not
    # a multiple of 16 (int8) must take the narrow loads, and the results must not change.
    # The emulation counts any 16-byte load from an address a GPU would fault on.
    for seed, (k, m, x_offset, x_pad, w_offset) in enumerate(
        [(4200, 1, 0, 0, 0), (4112, 1, 2 * (dtype != torch.float32) or 4, 0, 0),
         (4112, 3, 0, 3, 0), (4112, 2, 0, 0, 1), (80, 2, 0, 1, 0), (4096, 2, 0, 8, 0)]
    ):  # fmt: skip
        qweight = make_weight(fmt, 5, k, seed)
        x = make_x(m, k + x_pad, dtype, "contiguous", seed)[:, :k]
        if x_offset:
            x = at_byte_offset(x.contiguous(), x_offset)
        data = qweight.data.contiguous()
        if w_offset and qweight.bits == 8:  # the int4 binding copies such codes (aligned)
            data = at_byte_offset(data, w_offset)
        if k == 4200 and qweight.bits == 8:  # rows 16-byte aligned, K not a multiple of 16
            data = torch.zeros(5, k + 8, dtype=torch.int8)[:, :k].copy_(data)
        bias = torch.randn(5)
        status, y = gemv_emulated_status(emulator, x, qweight, bias, data=data)
        assert status == 0, (k, m, x_offset, x_pad, w_offset)
        assert_close_to_oracle(y, x, qweight, bias, dtype=torch.float32)


def test_emulation_reports_vector_loads_a_gpu_would_fault_on(emulator):
    # The check above can fail: forced vector loads of x at a 2-byte offset are reported.
    qweight = make_weight("int8", 3, 64, 0)
    x = at_byte_offset(torch.randn(1, 64).bfloat16(), 2)
    status, _ = gemv_emulated_status(emulator, x, qweight, None, paths=(True, True))
    assert status == MISALIGNED_VECTOR_LOAD
    codes = at_byte_offset(qweight.data.contiguous(), 1)
    status, _ = gemv_emulated_status(emulator, x, qweight, None, data=codes, paths=(False, True))
    assert status == MISALIGNED_VECTOR_LOAD


# ---------------------------------------------------------------- 3. GPU


def poison_allocator(shape, dtype):
    """NaN-filled blocks left in torch's caching allocator, which the outputs then likely reuse:
    an element the kernel forgets to write shows up as NaN rather than a stale right answer."""
    blocks = [torch.full(shape, math.nan, dtype=dtype, device="cuda") for _ in range(6)]
    del blocks


def cuda_op(x, qweight, bias):
    return registered_quant_matmul(x, qweight, bias)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_gemv_matches_float64_oracle(fmt, dtype):
    shapes = [(80, 40), (5, 17), (4200, 129), (4096, 1000), (4112, 3)]
    for seed, (k, n) in enumerate(shapes):
        qweight = make_weight(fmt, n, k, seed).to("cuda")
        for m, layout in [(1, "contiguous"), (1, "strided"), (3, "transposed"), (17, "contiguous")]:
            x = make_x(m, k, dtype, layout, seed, device="cuda")
            bias = torch.randn(n, device="cuda").to(dtype) if seed % 2 == 0 else None
            poison_allocator((m, n), dtype)
            y = cuda_op(x, qweight, bias)
            assert y.is_cuda and y.dtype == dtype
            assert_close_to_oracle(y, x, qweight, bias)


@needs_gpu
def test_cuda_gemv_unaligned_weight_view_and_empty_shapes():
    qweight = make_weight("int4-g32", 9, 64, 0)
    # The same codes at an odd byte offset inside a larger CUDA buffer: the binding must copy
    # them to an aligned place for its 16-byte loads.
    buffer = torch.empty(qweight.data.numel() + 1, dtype=torch.uint8, device="cuda")
    buffer[1:] = qweight.data.flatten().cuda()
    shifted = QuantizedWeight(
        4, 32, (9, 64), buffer[1:].view(9, 32), qweight.scales.cuda(), qweight.offsets.cuda()
    )
    assert shifted.data.data_ptr() % 16 != 0
    x = torch.randn(1, 64, device="cuda")
    assert_close_to_oracle(cuda_op(x, shifted, None), x, qweight, None)
    assert cuda_op(x[:0], shifted, None).shape == (0, 9)


def check_more_rows_than_the_grid_holds(device):
    # gridDim.y stops at 65535: the rows past it are the kernel's own loop (m += gridDim.y).
    for seed, fmt in enumerate(["int8", "int4-g32"]):
        qweight = make_weight(fmt, 5, 48, seed).to(device)
        x = torch.randn(65535 + 70, 48, generator=torch.Generator().manual_seed(seed))
        x = x.to(device)
        if device == "cuda":
            poison_allocator((x.shape[0], 5), x.dtype)
        assert_close_to_oracle(cuda_op(x, qweight, None), x, qweight, None)


@needs_gpu
def test_cuda_gemv_more_rows_than_the_grid_holds():
    check_more_rows_than_the_grid_holds("cuda")


@needs_gpu
def test_cuda_ops_reject_bad_arguments_naming_them():
    qweight = make_weight("int4-g32", 9, 64, 0).to("cuda")
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(ValueError, match="x"):
        cuda_op(x[:, :60], qweight, None)
    with pytest.raises(TypeError, match="x"):
        cuda_op(x.double(), qweight, None)
    with pytest.raises(ValueError, match="bias"):
        cuda_op(x, qweight, torch.randn(8, device="cuda"))
    with pytest.raises(ValueError, match="scales"):
        torch.ops.rlhf_fast.quant_matmul_int4(
            x, qweight.data, qweight.scales.cpu(), qweight.offsets, 32, 64, None
        )


@needs_gpu
def test_cuda_ops_pass_opcheck():
    for fmt in ("int8", "int4-g64"):
        qweight = make_weight(fmt, 33, 80, 0).to("cuda")
        x = torch.randn(1, 80, device="cuda")
        args = (x, qweight.data, qweight.scales, None)
        if qweight.bits == 8:
            torch.library.opcheck(torch.ops.rlhf_fast.quant_matmul_int8.default, args)
        else:
            args = (x, qweight.data, qweight.scales, qweight.offsets, 64, 80, None)
            torch.library.opcheck(torch.ops.rlhf_fast.quant_matmul_int4.default, args)


_TRITON_ON_GPU = """
import torch
from rlhf_fast.kernels.quant_matmul import quant_matmul_triton
from rlhf_fast.quant.weight import quantize_weight

TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1.5e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
}
for bits, group_size in [(4, 32), (4, 64), (4, 128), (8, 32)]:
    for seed, (k, n) in enumerate([(80, 40), (5, 17), (4096, 1000), (1000, 333)]):
        torch.manual_seed(seed)
        qweight = quantize_weight(torch.randn(n, k), bits, group_size).to("cuda")
        weight = qweight.dequantize().double()
        for m in (1, 3, 17, 64, 300):
            for dtype in TOLERANCES:
                x = torch.randn(m, 2 * k, device="cuda").to(dtype)[:, ::2]
                bias = torch.randn(n, device="cuda").to(dtype) if m % 2 else None
                y = quant_matmul_triton(x, qweight, bias)
                expected = x.double() @ weight.T + (0 if bias is None else bias.double())
                assert y.dtype == dtype and y.shape == (m, n)
                torch.testing.assert_close(y.double(), expected, **TOLERANCES[dtype])
print("ok")
"""


@needs_gpu
def test_triton_compiled_on_gpu_matches_float64_oracle():
    # This module interprets Triton, so the compiled kernels run in a fresh process.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = run([sys.executable, "-c", _TRITON_ON_GPU], env=env, timeout=600)
    assert result.stdout.strip().endswith("ok")
