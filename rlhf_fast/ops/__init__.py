"""rlhf_fast.ops: one public function per op.

Every op takes `backend=None` ("reference" | "cpp" | "cuda" | "triton"); None picks the fastest
backend available for the inputs' device, and the environment variable RLHF_FAST_BACKEND
overrides that pick. The "reference" backend is plain PyTorch and defines each op.
"""

from rlhf_fast.ops import _library  # noqa: F401  (fake implementations for torch.compile)
from rlhf_fast.ops._dispatch import BACKENDS, BackendUnavailableError, backends
from rlhf_fast.ops.gae import gae, gae_reference
from rlhf_fast.ops.lora_linear import (
    LoraRows,
    lora_linear,
    lora_linear_by_rows,
    lora_linear_by_rows_reference,
    lora_linear_reference,
)
from rlhf_fast.ops.quant_matmul import quant_matmul, quant_matmul_reference
from rlhf_fast.ops.rank_loss import rank_loss, rank_loss_reference
from rlhf_fast.ops.rms_norm import rms_norm, rms_norm_reference
from rlhf_fast.ops.rotary import rotary_embedding, rotary_embedding_reference
from rlhf_fast.ops.sample_logits import sample_logits, sample_logits_reference
from rlhf_fast.ops.short_attention import short_attention, short_attention_reference
from rlhf_fast.ops.silu_mul import silu_mul, silu_mul_reference
from rlhf_fast.ops.token_logprobs import token_logprobs, token_logprobs_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backends",
    "gae",
    "gae_reference",
    "LoraRows",
    "lora_linear",
    "lora_linear_by_rows",
    "lora_linear_by_rows_reference",
    "lora_linear_reference",
    "quant_matmul",
    "quant_matmul_reference",
    "rank_loss",
    "rank_loss_reference",
    "rms_norm",
    "rms_norm_reference",
    "rotary_embedding",
    "rotary_embedding_reference",
    "sample_logits",
    "sample_logits_reference",
    "short_attention",
    "short_attention_reference",
    "silu_mul",
    "silu_mul_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
