"""QuantLinear: a frozen linear layer whose weight is a QuantizedWeight.

The weight's tensors are registered as buffers named like the file format of
`QuantizedWeight.state_dict(prefix)` (`qdata`, `scales`, `offsets` for int4, `qshape`), so the
module's own state_dict is what a quantized safetensors file holds, and `.to(device)` moves it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from rlhf_fast import ops
from rlhf_fast.quant.activations import runs_on_bf16
from rlhf_fast.quant.weight import INT4_BLOCK, QuantizedWeight, quantize_weight


def _conv1d_class() -> type | None:
    """transformers' Conv1D (GPT-2's linear, weight stored [in, out]) if transformers is loaded:
    without it no Conv1D can exist, and importing it here would slow every import of ops."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(pytorch_utils, "Conv1D", None)


_FORMAT_TENSORS = ("scales", "offsets")  # float tensors whose dtype is part of the format


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or a transformers Conv1D."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_quantizable(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


class QuantLinear(nn.Module):
    """y = x @ W.T (+ bias) with W stored int8 per channel or int4 group-wise; no gradient to W.

    `bf16_rows`: the int4 activation rule (quant/activations.py; None, the default: fp32)."""

    bf16_rows: int | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 32,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ) -> None:
        """An empty shell of the right shapes (uninitialized); fill it with `set_weight` or
        `load_state_dict`. Build it under `torch.device("meta")` to allocate nothing."""
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and (group_size <= 0 or group_size % INT4_BLOCK):
            raise ValueError(f"group_size must be a multiple of {INT4_BLOCK}, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, (-1 if bits == 8 else group_size)
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qdata", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=device))
            self.offsets = None
        else:
            groups = -(-k // group_size)
            padded = groups * group_size
            half = {"dtype": torch.float16, "device": device}
            packed = torch.empty(n, padded // 2, dtype=torch.uint8, device=device)
            self.register_buffer("qdata", packed)
            self.register_buffer("scales", torch.empty(n, groups, **half))
            self.register_buffer("offsets", torch.empty(n, groups, **half))
        self.register_buffer("qshape", torch.tensor([n, k], dtype=torch.int64, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.empty(n, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        qweight.validate("qweight")
        module = cls(
            qweight.in_features, qweight.out_features, qweight.bits, qweight.group_size,
            bias=bias is not None, device="meta",
        )  # fmt: skip
        module.set_weight(qweight)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int = 4,
        group_size: int = 32,
        clip_search: bool = False,
    ) -> QuantLinear:
        """Quantizes an nn.Linear (or GPT-2's Conv1D, transposed) into a new QuantLinear."""
        weight = dense_weight(linear)
        qweight = quantize_weight(weight, bits, group_size, clip_search=clip_search)
        return cls.from_weight(qweight, linear.bias)

    def set_weight(self, qweight: QuantizedWeight) -> None:
        if (qweight.bits, qweight.out_features, qweight.in_features) != (
            self.bits, self.out_features, self.in_features
        ):  # fmt: skip
            raise ValueError(
                f"weight is int{qweight.bits} {qweight.shape}, this layer holds "
                f"int{self.bits} ({self.out_features}, {self.in_features})"
            )
        self.qdata, self.scales, self.offsets = qweight.data, qweight.scales, qweight.offsets
        self.qshape = torch.tensor(qweight.shape, dtype=torch.int64, device=qweight.device)
        self.group_size = qweight.group_size

    @property
    def qweight(self) -> QuantizedWeight:
        """A view of the buffers as a QuantizedWeight (built on each access: buffers may move)."""
        return QuantizedWeight(
            self.bits, self.group_size, (self.out_features, self.in_features),
            self.qdata, self.scales, self.offsets,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ops.quant_matmul passes gradients to x (and a trainable bias); never to the weight.
        if runs_on_bf16(x, self.bits, self.bf16_rows):
            return ops.quant_matmul(x.to(torch.bfloat16), self.qweight, self.bias).float()
        return ops.quant_matmul(x, self.qweight, self.bias)

    def _apply(self, fn, recurse: bool = True):
        # model.to(torch.bfloat16) casts every float buffer; the scales and offsets keep the
        # dtypes of the format (the kernels read them as stored), only their device follows.
        before = {name: getattr(self, name) for name in _FORMAT_TENSORS}
        super()._apply(fn, recurse)
        for name, original in before.items():
            after = getattr(self, name)
            if original is not None and after is not None and after.dtype != original.dtype:
                setattr(self, name, original.to(after.device))
        return self

    def extra_repr(self) -> str:
        group = "per-channel" if self.bits == 8 else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, {group}, bias={self.bias is not None}"
        )
