"""The CUDA kernels (csrc/cuda), checked as far as each machine allows.

1. Build checks, wherever nvcc is: every .cu file compiles for sm_80 and sm_90 with no warning,
   no register spill and no local memory; the torch binding compiles against this torch's
   headers (the CPU build of torch ships the c10/cuda headers, just not the libraries).
2. The gae kernel's warp program (csrc/cuda/gae_warp.cuh) built with g++ and run on the CPU,
   one lane after another (tests/gae_cuda_emulator.cpp), against gae_reference: every index,
   bound and carry of the kernel, and a __syncwarp() between every two phases, without a GPU.
3. On a GPU with the extension built: ops.gae(backend="cuda") against gae_reference, and
   bit for bit against the emulation of level 2 (which equals the C++ CPU kernel bit for bit).
"""

from __future__ import annotations

import ctypes
import math
import sys
import sysconfig
from pathlib import Path

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

from rlhf_fast import _native, ops
from rlhf_fast.ops import gae_reference

# Both sides widen the inputs to fp32 exactly, so whatever the input dtype only the order of
# fp32 roundings differs (fused multiply-adds here, separate ones in the reference): the
# tolerances are the same for each dtype, sized for rows of ~1000 steps with gamma = lam = 1.
TOLERANCES = {dtype: {"atol": 1e-4, "rtol": 1e-5} for dtype in DTYPE_INDEX}


# ---------------------------------------------------------------- 1. build checks


@needs_nvcc
@pytest.mark.parametrize("arch,std", [("sm_80", "c++17"), ("sm_90", "c++20")])
def test_cuda_sources_compile_cleanly(arch, std, tmp_path):
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    assert sources, "no .cu files in csrc/cuda"
    for source in sources:
        result = run(
            [NVCC, f"-arch={arch}", f"-std={std}", "-O3", "-I", str(CSRC), "-c", str(source),
             "-o", str(tmp_path / f"{source.stem}.o"), "-Werror", "all-warnings",
             "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-warn-spills,-warn-lmem-usage",
             *TORCH_NVCC_DEFINES]
        )  # fmt: skip
        assert "warning" not in (result.stdout + result.stderr).lower()


@needs_nvcc
def test_torch_binding_compiles_against_torch_headers(tmp_path):
    from torch.utils.cpp_extension import include_paths

    headers = [Path(p) for p in include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").exists() for p in headers):
        pytest.skip("this torch ships no c10/cuda headers")
    system_includes = [arg for p in [*headers, sysconfig.get_paths()["include"]]
                       for arg in ("-isystem", str(p))]  # fmt: skip
    obj = tmp_path / "registration.o"
    run(
        # nvcc hands a .cpp to the host compiler with CUDA's include directory added.
        [NVCC, "-std=c++20", "-c", str(CSRC / "cuda" / "registration.cpp"), "-o", str(obj),
         "-I", str(CSRC), *system_includes, "-DTORCH_EXTENSION_NAME=_cuda",
         # The generated header is missing from CPU builds of torch; it only sets export macros.
         "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xcompiler", "-Wall,-Wextra,-Werror,-fPIC"]
    )  # fmt: skip
    symbols = run(["nm", "-C", str(obj)]).stdout
    assert "PyInit__cuda" in symbols
    for launcher in ("launch_gae", "launch_quant_gemv_int4", "launch_quant_gemv_int8"):
        assert f"rlhf_fast::{launcher}" in symbols


# ---------------------------------------------------------------- test cases

# Tiles are 48 steps and warps 32 rows: shapes straddle both, and are odd where they can be.
SHAPES = [(1, 1), (1, 1000), (5, 47), (7, 48), (3, 49), (33, 97), (513, 50), (64, 300)]
MASKS = ["none", "gaps", "right_padded", "left_padded", "all_false"]


def make_mask(kind: str, batch: int, steps: int, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "gaps":  # holes anywhere, and every third row with no valid step at all
        mask = torch.rand(batch, steps, generator=generator) > 0.35
        mask[::3] = False
        return mask
    if kind in ("right_padded", "left_padded"):
        lengths = torch.randint(0, steps + 1, (batch, 1), generator=generator)
        positions = torch.arange(steps)[None, :]
        return positions < lengths if kind == "right_padded" else positions >= lengths
    if kind == "all_false":
        return torch.zeros(batch, steps, dtype=torch.bool)
    raise ValueError(kind)


def make_case(shape, dtype, mask_kind, seed, device="cpu", strided=False):
    """rewards and values of `dtype`, mask (bool or None). Invalid steps' inputs are NaN: they
    must never reach an output. strided: rewards have row stride T + 5, values time stride B
    (a transpose), the mask time stride 2 (views are taken after any copy, which would not
    keep their strides)."""
    batch, steps = shape
    generator = torch.Generator().manual_seed(seed)
    wide_rewards = torch.randn(batch, steps + 5, generator=generator).to(device, dtype)
    tall_values = (2 * torch.randn(steps, batch, generator=generator)).to(device, dtype)
    mask = make_mask(mask_kind, batch, steps, generator)
    if strided:
        rewards, values = wide_rewards[:, 3 : 3 + steps], tall_values.t()
        if mask is not None:
            mask = torch.stack([mask, ~mask], dim=-1).to(device)[..., 0]
    else:
        rewards, values = wide_rewards[:, :steps].contiguous(), tall_values.t().contiguous()
        mask = None if mask is None else mask.to(device)
    if mask is not None:
        rewards.masked_fill_(~mask, math.nan)
        values.masked_fill_(~mask, math.nan)
    return rewards, values, mask


def assert_matches_reference(rewards, values, mask, gamma, lam, advantages, returns):
    expected_advantages, expected_returns = gae_reference(
        rewards.cpu(), values.cpu(), None if mask is None else mask.cpu(), gamma=gamma, lam=lam
    )
    assert advantages.dtype == returns.dtype == torch.float32
    assert advantages.shape == returns.shape == rewards.shape
    assert advantages.is_contiguous() and returns.is_contiguous()
    tolerance = TOLERANCES[rewards.dtype]
    torch.testing.assert_close(advantages.cpu(), expected_advantages, **tolerance)
    torch.testing.assert_close(returns.cpu(), expected_returns, **tolerance)


DISCOUNTS = [(0.99, 0.95), (1.0, 1.0), (0.0, 0.7), (0.5, 0.0)]

# ---------------------------------------------------------------- 2. CPU emulation


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = build_emulator(tmp_path_factory.mktemp("gae_emulator"), "gae_cuda_emulator.cpp")
    lib.gae_emulated.restype = ctypes.c_int
    lib.gae_emulated.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_float] * 2
        + [ctypes.c_void_p] * 2
    )  # fmt: skip
    return lib


def unit_stride_rows(t: torch.Tensor) -> torch.Tensor:  # as the C++ binding does
    return t if t.size(1) <= 1 or t.stride(1) == 1 else t.contiguous()


def gae_emulated(lib, rewards, values, mask, gamma, lam):
    """The kernel's warp program on the CPU, called with the binding's arguments. The outputs
    start as NaN, so an element it never writes fails the comparison."""
    rewards, values = unit_stride_rows(rewards), unit_stride_rows(values)
    mask = None if mask is None else unit_stride_rows(mask)
    advantages = torch.full(rewards.shape, math.nan)
    returns = torch.full(rewards.shape, math.nan)
    status = lib.gae_emulated(
        rewards.data_ptr(), values.data_ptr(), None if mask is None else mask.data_ptr(),
        DTYPE_INDEX[rewards.dtype], rewards.size(0), rewards.size(1), rewards.stride(0),
        values.stride(0), 0 if mask is None else mask.stride(0), gamma, lam,
        advantages.data_ptr(), returns.data_ptr(),
    )  # fmt: skip
    assert status == 0
    return advantages, returns


def test_emulated_kernel_stays_in_bounds_under_address_sanitizer(tmp_path):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    program = tmp_path / "gae_emulator_asan"
    run(
        [GXX, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         "-DGAE_EMULATOR_SELF_TEST", "-I", str(CSRC), "-o", str(program),
         str(ROOT / "tests" / "gae_cuda_emulator.cpp")]
    )  # fmt: skip
    assert run([str(program)]).stdout.strip() == "ok"


SYNC = "    warp.sync();"


@pytest.mark.parametrize("dropped", range(3), ids=lambda i: f"sync{i}")
def test_emulation_reports_a_dropped_warp_sync(tmp_path, dropped):
    # On a GPU the lanes of two phases with no __syncwarp() between them overlap (a race on the
    # shared tile), which the emulation, running each phase for all lanes in turn, would hide.
    # It counts such phases instead: the warp program with any one of its syncs removed must
    # make gae_emulated fail (status -2), not quietly compute the right answer.
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    source = (CSRC / "cuda" / "gae_warp.cuh").read_text()
    positions = [i for i in range(len(source)) if source.startswith(SYNC, i)]
    assert len(positions) == 3, "gae_warp.cuh's syncs moved: update this test"
    start = positions[dropped]
    (tmp_path / "cuda").mkdir()
    mutant = source[:start] + source[start + len(SYNC) :]
    (tmp_path / "cuda" / "gae_warp.cuh").write_text(mutant)
    library = tmp_path / "libgae_mutant.so"
    run(
        [GXX, "-std=c++17", "-O0", "-shared", "-fPIC", "-I", str(tmp_path), "-I", str(CSRC),
         "-o", str(library), str(ROOT / "tests" / "gae_cuda_emulator.cpp")]
    )  # fmt: skip
    lib = ctypes.CDLL(str(library))
    lib.gae_emulated.restype = ctypes.c_int
    rewards = torch.randn(3, 100)
    out = torch.empty(2, 3, 100)
    status = lib.gae_emulated(
        ctypes.c_void_p(rewards.data_ptr()), ctypes.c_void_p(rewards.data_ptr()), None,
        ctypes.c_int(0), ctypes.c_int64(3), ctypes.c_int64(100), ctypes.c_int64(100),
        ctypes.c_int64(100), ctypes.c_int64(0), ctypes.c_float(1.0), ctypes.c_float(0.9),
        ctypes.c_void_p(out[0].data_ptr()), ctypes.c_void_p(out[1].data_ptr()),
    )  # fmt: skip
    assert status == -2


@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_emulated_kernel_matches_reference(emulator, shape, mask_kind, dtype):
    for seed, (gamma, lam) in enumerate(DISCOUNTS[:2]):
        rewards, values, mask = make_case(shape, dtype, mask_kind, seed)
        advantages, returns = gae_emulated(emulator, rewards, values, mask, gamma, lam)
        assert_matches_reference(rewards, values, mask, gamma, lam, advantages, returns)


@pytest.mark.parametrize("gamma,lam", DISCOUNTS)
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
def test_emulated_kernel_strided_inputs(emulator, dtype, gamma, lam):
    for seed, shape in enumerate([(37, 101), (2, 1), (40, 48)]):
        rewards, values, mask = make_case(shape, dtype, "gaps", seed, strided=True)
        assert not rewards.is_contiguous() and not mask.is_contiguous()
        advantages, returns = gae_emulated(emulator, rewards, values, mask, gamma, lam)
        assert_matches_reference(rewards, values, mask, gamma, lam, advantages, returns)


@pytest.mark.skipif(_native.cpp is None, reason="C++ CPU kernels not built")
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
def test_emulated_kernel_equals_cpp_kernel_bit_for_bit(emulator, dtype):
    # Same fused multiply-adds in the same order: the CPU row-block kernels (scalar and AVX2;
    # the AVX-512 one sums each chunk as a log-depth scan instead) and the CUDA kernel (whose
    # emulation this is; see the GPU test below) must agree to the last bit.
    rewards, values, mask = make_case((70, 300), dtype, "gaps", 1)
    emulated = gae_emulated(emulator, rewards, values, mask, 0.99, 0.95)
    previous = _native.cpp.cpu_isa()
    try:
        for isa in ("scalar", "avx2"):
            if not _native.cpp.set_cpu_isa(isa):
                continue
            on_cpu = torch.ops.rlhf_fast.gae(rewards, values, mask, 0.99, 0.95)
            for cpp, emulation in zip(on_cpu, emulated, strict=True):
                assert torch.equal(cpp, emulation), isa
    finally:
        _native.cpp.set_cpu_isa(previous)


def test_emulated_kernel_broadcast_row(emulator):
    rewards = torch.randn(70, 65)
    values = torch.randn(1, 65).expand(70, 65)  # row stride 0
    advantages, returns = gae_emulated(emulator, rewards, values, None, 0.9, 0.8)
    assert_matches_reference(rewards, values, None, 0.9, 0.8, advantages, returns)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_conversion_of_every_16_bit_pattern(emulator, dtype):
    # One row per pattern, one step, values 0 and gamma 0: each advantage is the reward itself,
    # so this checks the kernel's widening of every bf16/fp16 value (subnormals, inf, NaN).
    rewards = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    rewards = rewards.reshape(-1, 1)
    advantages, _ = gae_emulated(emulator, rewards, torch.zeros_like(rewards), None, 0.0, 0.5)
    torch.testing.assert_close(advantages, rewards.float(), atol=0, rtol=0, equal_nan=True)


def test_emulated_kernel_empty_inputs(emulator):
    for shape in [(0, 5), (4, 0)]:
        rewards = torch.randn(shape)
        advantages, returns = gae_emulated(emulator, rewards, rewards, None, 1.0, 0.95)
        assert advantages.shape == shape


# ---------------------------------------------------------------- 3. GPU


def poison_allocator(shape):
    """Leaves NaN-filled blocks of the outputs' size in torch's CUDA caching allocator, so the
    kernel's outputs (and any copies made on the way) most likely reuse them: an element the
    kernel forgets to write then shows up as NaN rather than as a stale right answer."""
    blocks = [torch.full(shape, math.nan, device="cuda") for _ in range(6)]
    del blocks


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", [*SHAPES, (2000, 777)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_gae_matches_reference(shape, mask_kind, dtype):
    for seed, (gamma, lam) in enumerate(DISCOUNTS[:2]):
        rewards, values, mask = make_case(shape, dtype, mask_kind, seed, device="cuda")
        poison_allocator(shape)
        advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="cuda")
        assert advantages.device == rewards.device
        assert_matches_reference(rewards, values, mask, gamma, lam, advantages, returns)


@needs_gpu
@pytest.mark.parametrize("gamma,lam", DISCOUNTS)
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
def test_cuda_gae_strided_inputs(dtype, gamma, lam):
    for seed, shape in enumerate([(37, 101), (2, 1), (40, 48), (300, 1000)]):
        rewards, values, mask = make_case(shape, dtype, "gaps", seed, device="cuda", strided=True)
        poison_allocator(shape)
        advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="cuda")
        assert_matches_reference(rewards, values, mask, gamma, lam, advantages, returns)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPE_INDEX, ids=str)
def test_cuda_gae_equals_cpu_emulation_bit_for_bit(emulator, dtype):
    for seed, shape in enumerate([(33, 97), (513, 50), (70, 1000)]):
        rewards, values, mask = make_case(shape, dtype, "gaps", seed, strided=seed == 1)
        gpu = torch.ops.rlhf_fast.gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95)
        cpu = gae_emulated(emulator, rewards, values, mask, 0.99, 0.95)
        for on_gpu, emulated in zip(gpu, cpu, strict=True):
            assert torch.equal(on_gpu.cpu(), emulated)


@needs_gpu
def test_cuda_gae_empty_and_broadcast_inputs():
    for shape in [(0, 5), (4, 0)]:
        rewards = torch.randn(shape, device="cuda")
        advantages, returns = ops.gae(rewards, rewards, backend="cuda")
        assert advantages.shape == returns.shape == shape and advantages.is_cuda
    rewards = torch.randn(70, 65, device="cuda")
    values = torch.randn(1, 65, device="cuda").expand(70, 65)
    advantages, returns = ops.gae(rewards, values, gamma=0.9, lam=0.8, backend="cuda")
    assert_matches_reference(rewards, values, None, 0.9, 0.8, advantages, returns)


@needs_gpu
def test_cuda_op_rejects_bad_arguments_naming_them():
    gae = torch.ops.rlhf_fast.gae
    rewards = torch.randn(4, 9, device="cuda")
    with pytest.raises(ValueError, match="values"):
        gae(rewards, rewards.cpu(), None, 1.0, 0.95)
    with pytest.raises(ValueError, match="values"):
        gae(rewards, rewards[:, :5], None, 1.0, 0.95)
    with pytest.raises(ValueError, match="rewards"):
        gae(rewards[0], rewards[0], None, 1.0, 0.95)
    with pytest.raises(TypeError, match="rewards"):
        gae(rewards.double(), rewards.double(), None, 1.0, 0.95)
    with pytest.raises(TypeError, match="values"):
        gae(rewards, rewards.half(), None, 1.0, 0.95)
    with pytest.raises(TypeError, match="mask"):
        gae(rewards, rewards, torch.ones(4, 9, dtype=torch.int64, device="cuda"), 1.0, 0.95)
    with pytest.raises(ValueError, match="mask"):
        gae(rewards, rewards, torch.ones(4, 8, dtype=torch.bool, device="cuda"), 1.0, 0.95)


@needs_gpu
def test_cuda_op_passes_opcheck():
    rewards, values, mask = make_case((33, 50), torch.float32, "gaps", 0, device="cuda")
    rewards, values = rewards.nan_to_num(), values.nan_to_num()
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (rewards, values, mask, 0.99, 0.95))
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, (rewards, values, None, 1.0, 1.0))


@needs_gpu
def test_cuda_op_launches_on_the_current_stream():
    # Inside a CUDA graph capture, a launch on any stream but the capturing one is an error.
    rewards, values, mask = make_case((65, 130), torch.bfloat16, "gaps", 3, device="cuda")
    ops.gae(rewards, values, mask, backend="cuda")  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        advantages, returns = ops.gae(rewards, values, mask, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(rewards, values, mask, 1.0, 0.95, advantages, returns)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
