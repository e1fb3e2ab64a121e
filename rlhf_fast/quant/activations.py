"""The activation rule of int4 inference products: one definition for every model that uses it.

Rule: an int4 QuantLinear product of at least `rows` rows (BF16_ROWS = 32 by default) runs on
bf16 activations when no gradient is being recorded; smaller products, products under autograd
and int8 / dense layers keep fp32 activations. 32 is where the C++ int4 kernel switches bf16
activations to its many-row path (bf16 weight tiles, torch's bf16 GEMM, fp32 sums; 3x the
fp32-activation kernel at 128 rows on the dev machine), and where the lean chat decoder
(models/fast_decoder.py) uses bf16 for int4 prefill: that decoder calls `runs_on_bf16` itself.

A model with int4 layers follows the rule in its dense lm_head too (quantize_model leaves the
head dense): at 32+ rows that is the largest product of a step (32000 x 2048 fp32: 143 ms at
128 rows on 2 threads of the dev VM, ~4x a bf16 one on its AMX tiles), so it multiplies a bf16
copy of its weight (made once, remade after the weight changes; half the fp32 head's bytes) by
bf16 activations: fp32 sums, the logits rounded to bf16 as every int4 product's output is under
the rule (returned as fp32); below the threshold it is nn.Linear's fp32.

The rule is a property of the modules (`QuantLinear.bf16_rows`, None: off), set here:
  * `set_int4_activations(model, rows)` / `int4_activations(model, rows)` (a context that puts
    the old values back). The streamed model (offload/model.py, on by default for generation
    and chat) and any resident model it is compared with (chat --int4 on the HF forward, the
    tests' oracles) set the same rule, so the two compute the same products.
  * Off (fp32) for anything whose outputs must equal a training forward: PPO rollouts store the
    sampling log-probs as PPO's old log-probs, and the training forward runs fp32 under
    autograd (offload/rollout.py turns the rule off while it samples).

What bf16 changes: each activation keeps 8 bits of mantissa, and the many-row kernel rounds the
dequantized weight to bf16 too; next to int4's own rounding of the weights (4 bits) this moves
the logits little (tests/test_offload_bf16_rule.py bounds it). A row's outputs depend on the
rows it is multiplied with only through the threshold, so a batch split into micro-batches gives
the whole batch's outputs when every micro-batch is on the same side of it (`same_side`).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

BF16_ROWS = 32
_HEAD_ROWS = "rlhf_fast_bf16_rows"  # the rule's threshold on a dense lm_head (instance dict)
_HEAD_COPY = "_rlhf_fast_bf16_weight"  # (key, its bf16 weight copy)


def runs_on_bf16(x: torch.Tensor, bits: int, rows: int | None) -> bool:
    """Whether an int`bits` product on `x` ([..., in_features]) runs on bf16 under the rule
    with threshold `rows` (None: the rule is off)."""
    return (
        rows is not None
        and bits == 4
        and x.dtype == torch.float32
        and x.dim() > 0
        and x.numel() >= rows * max(x.shape[-1], 1)
        and not torch.is_grad_enabled()
    )


def _int4_modules(model: nn.Module) -> list[nn.Module]:
    from rlhf_fast.quant.linear import QuantLinear

    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.bits == 4]


def _check_rows(rows: int | None) -> None:
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"rows must be None (fp32 activations) or an int >= 1, got {rows!r}")


def _rule_head(model: nn.Module, int4: list[nn.Module]) -> nn.Linear | None:
    """The dense lm_head of a model with int4 layers, which the rule covers too: at 32+ rows
    (a prefill, a batch of 32+ sequences) it is the largest single product of a step, 65M
    weights for a 32k vocabulary at hidden 2048, and quantize_model leaves it dense."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if int4 and callable(get) else None
    return head if type(head) is nn.Linear else None


def _bf16_weight(head: nn.Linear) -> torch.Tensor:
    """A bf16 copy of the head's weight, made once and again only after the weight changes."""
    weight = head.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = head.__dict__.get(_HEAD_COPY)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(torch.bfloat16))
        head.__dict__[_HEAD_COPY] = cached
    return cached[1]


def _head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward under the rule: the int4 products' condition, then bf16 operands
    (fp32 sums, bf16-rounded outputs, returned as fp32)."""
    if runs_on_bf16(x, 4, self.__dict__.get(_HEAD_ROWS)):
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), _bf16_weight(self), bias).float()
    return F.linear(x, self.weight, self.bias)


def set_head_rule(head: nn.Linear | None, rows: int | None) -> None:
    """Applies the rule with threshold `rows` to a dense head (None: nn.Linear's own forward)."""
    if head is None:
        return
    if rows is None:  # the class's own forward back, and the copy's memory freed
        for name in ("forward", _HEAD_ROWS, _HEAD_COPY):
            head.__dict__.pop(name, None)
    else:
        head.__dict__[_HEAD_ROWS] = rows
        head.forward = types.MethodType(_head_forward, head)


def set_int4_activations(model: nn.Module, rows: int | None = BF16_ROWS) -> int:
    """Applies the rule with threshold `rows` to every int4 QuantLinear of `model` and to its
    dense lm_head (None: fp32 activations, the opt-out). Returns how many int4 modules it set."""
    _check_rows(rows)
    modules = _int4_modules(model)
    for module in modules:
        module.bf16_rows = rows
    set_head_rule(_rule_head(model, modules), rows)
    return len(modules)


@contextlib.contextmanager
def int4_activations(model: nn.Module, rows: int | None = BF16_ROWS):
    """`set_int4_activations` for the duration of a `with` block; each module's previous
    threshold comes back afterwards, even on an exception."""
    _check_rows(rows)
    modules = _int4_modules(model)
    before = [module.bf16_rows for module in modules]
    head = _rule_head(model, modules)
    head_before = None if head is None else head.__dict__.get(_HEAD_ROWS)
    try:
        for module in modules:
            module.bf16_rows = rows
        set_head_rule(head, rows)
        yield
    finally:
        for module, old in zip(modules, before, strict=True):
            module.bf16_rows = old
        set_head_rule(head, head_before)


def same_side(micro_batch: int, batch: int, rows: int | None) -> bool:
    """Whether cutting `batch` rows into micro-batches of `micro_batch` keeps every product on
    the threshold's side that the whole batch's product is on (decode: one row per sequence;
    prefill: each sequence's prompt positions, the same factor on both sides). True when the
    rule is off, when there is one micro-batch, or when every micro-batch (the last one, the
    remainder, included) has at least `rows` rows."""
    if rows is None or micro_batch >= batch:
        return True
    remainder = batch % micro_batch
    return micro_batch >= rows and (remainder == 0 or remainder >= rows)
