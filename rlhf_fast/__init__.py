"""rlhf-fast: fast kernels and a thin trainer for the InstructGPT recipe.

The public surface of this first layer is `rlhf_fast.ops` (one function per op, each with a
pure-PyTorch reference and faster backends) and `rlhf_fast.backends()`, which says which
backends this installation can use and why the others are missing.
"""

__version__ = "0.1.0"

from rlhf_fast.ops import BackendUnavailableError, backends  # noqa: E402

__all__ = ["BackendUnavailableError", "__version__", "backends"]
