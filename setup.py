"""Build of rlhf-fast's native kernels.

Two extensions:
  rlhf_fast._C     C++ CPU kernels (csrc/cpu), always built. Each SIMD level lives in its own
                   translation unit compiled for that ISA; the best one is chosen at run time,
                   so the binary never needs -march=native and runs on any x86-64.
  rlhf_fast._cuda  CUDA kernels (csrc/cuda), built only where torch itself has CUDA and a
                   CUDA toolkit is found. RLHF_FAST_BUILD_CUDA=0 skips it, =1 insists on it.

The Triton kernels in kernels/ are installed as the subpackage rlhf_fast.kernels.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# Python's own CFLAGS carry -g, which makes the .so ~10x larger; -g0 comes later and wins.
# -ffp-contract=off: GCC would otherwise fuse a product and a sum into an FMA (one rounding
# fewer) wherever the ISA has one, so results would differ between the scalar, AVX2 and AVX-512
# builds of a kernel; kernels that want an FMA ask for V::fma.
COMMON_CXX = ["-O3", "-std=c++20", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
              "-Wall"]  # fmt: skip


def shared_libstdcxx_args() -> list[str]:
    """Link flags naming the shared libstdc++ this Python process has loaded (torch loads it).

    Seen on a GPU machine: its compiler (a separate GCC toolchain) resolved a plain -lstdc++
    to a static archive, so each extension carried a private libstdc++, and the first error
    message a C++ check formatted (a TORCH_CHECK printing a shape) segfaulted inside that
    copy's std::ostream instead of raising. Naming the exact shared object, from the
    directory the running process loaded it from, makes every build use the process's one.
    """
    if not sys.platform.startswith("linux"):
        return []
    import torch  # noqa: F401  (maps libstdc++ into this process)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        paths = set()
    search = [f"-L{os.path.dirname(path)}" for path in sorted(paths)[:1]]
    return search + ["-Wl,-Bdynamic", "-l:libstdc++.so.6"]


SHARED_LIBSTDCXX = shared_libstdcxx_args()


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cpu_extension() -> CppExtension:
    return CppExtension(
        name="rlhf_fast._C",
        sources=rel("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": COMMON_CXX},
        extra_link_args=["-fopenmp", "-Wl,--strip-debug", *SHARED_LIBSTDCXX],
    )


def want_cuda() -> bool:
    import torch

    flag = os.environ.get("RLHF_FAST_BUILD_CUDA", "auto")
    if flag == "0":
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        raise RuntimeError(
            "RLHF_FAST_BUILD_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or no CUDA toolkit (CUDA_HOME={CUDA_HOME})"
        )
    return have


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        name="rlhf_fast._cuda",
        sources=rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std: torch adds the standard its own headers need (C++20 in recent versions).
        # No --use_fast_math: the kernels promise the reference's fp32 arithmetic.
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=SHARED_LIBSTDCXX,
    )


ext_modules = [cpu_extension()]
if want_cuda():
    ext_modules.append(cuda_extension())

setup(
    packages=find_packages(include=["rlhf_fast", "rlhf_fast.*"]) + ["rlhf_fast.kernels"],
    package_dir={"rlhf_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
