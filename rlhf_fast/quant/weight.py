"""Weight-only quantized formats: int8 per output channel and int4 group-wise.

Layouts (chosen so the CPU kernels unpack them with one AND and one shift per 32 weights):

int8  (bits=8, group_size=-1: one group per output channel, symmetric)
    data    int8    [N, K]      q in [-127, 127]
    scales  float32 [N]         w ~= q * scales[n]

int4  (bits=4, group_size g in {32, 64, 128, ...}: a multiple of 32; asymmetric)
    K is padded to Kp = ceil(K / g) * g; the pad is never read by the kernels (they stop at K)
    and dequantize() drops it, so no in_features is ever refused.
    data    uint8   [N, Kp / 2] for each block of 32 weights k = 32b .. 32b + 31 of a row,
                                byte 16b + j holds q[32b + j] in its low nibble and
                                q[32b + 16 + j] in its high nibble (j = 0..15)
    scales  float16 [N, Kp / g] w ~= q * scales[n, k // g] + offsets[n, k // g],  q in [0, 15]
    offsets float16 [N, Kp / g]

In safetensors a weight is stored under a prefix as `<prefix>.qdata`, `<prefix>.scales`,
(`<prefix>.offsets` for int4) and `<prefix>.qshape` (int64 [N, K]); bits and group size follow
from the dtypes and shapes, so a file describes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_BLOCK = 32  # weights per packed block (16 bytes)
_CLIP_GRID = torch.linspace(1.0, 0.7, 13).tolist()  # fractions of the range tried by clip search


@dataclass(frozen=True)
class QuantizedWeight:
    """A frozen [out_features, in_features] weight in one of the formats above."""

    bits: int
    group_size: int
    shape: tuple[int, int]
    data: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        tensors = [self.data, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(
            self.bits, self.group_size, self.shape, move(self.data), move(self.scales),
            move(self.offsets),
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this format represents, [out_features, in_features], in `dtype`."""
        if self.bits == 8:
            return (self.data.float() * self.scales.float()[:, None]).to(dtype)
        q = unpack_int4(self.data)
        groups = q.shape[1] // self.group_size
        q = q.view(self.out_features, groups, self.group_size).float()
        w = q * self.scales.float()[..., None] + self.offsets.float()[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features].to(dtype)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {
            f"{prefix}.qdata": self.data,
            f"{prefix}.scales": self.scales,
            f"{prefix}.qshape": torch.tensor(self.shape, dtype=torch.int64),
        }
        if self.offsets is not None:
            tensors[f"{prefix}.offsets"] = self.offsets
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
        """Rebuilds a weight saved by state_dict(); ValueError names what is inconsistent."""
        try:
            data, scales = tensors[f"{prefix}.qdata"], tensors[f"{prefix}.scales"]
            qshape = tensors[f"{prefix}.qshape"]
        except KeyError as missing:
            raise ValueError(f"quantized weight {prefix!r}: missing tensor {missing}") from None
        if qshape.shape != (2,):
            raise ValueError(
                f"quantized weight {prefix!r}: qshape must hold 2 values [out_features, "
                f"in_features], got shape {tuple(qshape.shape)}"
            )
        out_features, in_features = (int(v) for v in qshape.tolist())
        if data.dtype == torch.int8:
            weight = cls(8, -1, (out_features, in_features), data, scales)
        elif data.dtype == torch.uint8:
            offsets = tensors.get(f"{prefix}.offsets")
            if offsets is None or scales.dim() != 2 or scales.shape[1] == 0 or data.dim() != 2:
                raise ValueError(f"quantized weight {prefix!r}: int4 needs 2-D scales and offsets")
            codes, groups = data.shape[1] * 2, scales.shape[1]
            if codes % groups:
                raise ValueError(
                    f"quantized weight {prefix!r}: qdata must have shape [N, groups * group_size "
                    f"/ 2]; its {codes} codes per row do not split into the {groups} groups of "
                    "scales"
                )
            group_size = codes // groups
            weight = cls(4, group_size, (out_features, in_features), data, scales, offsets)
        else:
            raise ValueError(f"quantized weight {prefix!r}: qdata has unknown dtype {data.dtype}")
        weight.validate(prefix)
        return weight

    def validate(self, name: str = "qweight") -> None:
        """Checks that the tensors agree with each other and have the format's dtypes (a
        corrupt file fails here, not in the first product)."""
        n, k = self.shape
        if n < 0 or k < 0:
            raise ValueError(f"{name}: shape must be non-negative, got {self.shape}")
        if self.bits == 4 and (self.group_size <= 0 or self.group_size % INT4_BLOCK):
            raise ValueError(
                f"{name}: group size {self.group_size} (from qdata and scales' shapes) is not a "
                f"positive multiple of {INT4_BLOCK}"
            )
        dtypes = {"qdata": torch.int8, "scales": torch.float32}
        if self.bits == 4:
            dtypes = {"qdata": torch.uint8, "scales": torch.float16, "offsets": torch.float16}
        actual = {"qdata": self.data, "scales": self.scales, "offsets": self.offsets}
        for key, dtype in dtypes.items():
            if actual[key] is not None and actual[key].dtype != dtype:
                raise ValueError(
                    f"{name}: {key} must be {str(dtype).removeprefix('torch.')} for "
                    f"int{self.bits}, got {str(actual[key].dtype).removeprefix('torch.')}"
                )
        if self.bits == 8:
            expected = {"qdata": (n, k), "scales": (n,)}
        else:
            padded = -(-k // self.group_size) * self.group_size
            groups = padded // self.group_size
            expected = {"qdata": (n, padded // 2), "scales": (n, groups), "offsets": (n, groups)}
        for key, shape in expected.items():
            if actual[key] is None or tuple(actual[key].shape) != shape:
                got = None if actual[key] is None else tuple(actual[key].shape)
                raise ValueError(
                    f"{name}: {key} must have shape {shape} for a {self.shape} weight, got {got}"
                )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, Kp] values in 0..15 (Kp a multiple of 32) -> [N, Kp / 2] uint8 (layout above)."""
    n, kp = q.shape
    blocks = q.to(torch.uint8).view(n, kp // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [N, Kp / 2] uint8 -> [N, Kp] uint8 values in 0..15."""
    n, half = packed.shape
    blocks = packed.view(n, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(n, half * 2)


def _int4_groups(weight: torch.Tensor, group_size: int, clip_search: bool):
    """Per-group fp16 scales and offsets, and the 0..15 codes, of a padded [N, G, g] weight."""
    real = ~torch.isnan(weight)
    low = torch.where(real, weight, torch.inf).amin(-1)
    high = torch.where(real, weight, -torch.inf).amax(-1)
    # checked on the groups' ranges (no pass over the weight of its own)
    largest = torch.finfo(torch.float16).max
    if max(float(-low.amin()), float(high.amax())) > largest:
        raise ValueError(
            f"weight has values beyond +-{largest:g}, which int4's float16 scales and offsets "
            "cannot hold (use bits=8)"
        )
    filled = torch.where(real, weight, 0.0)

    def fit(fraction: float):
        lo = torch.where(low < 0, low * fraction, low)
        hi = torch.where(high > 0, high * fraction, high)
        scale = ((hi - lo) / 15).clamp(min=1e-8).half()
        offset = lo.half()
        q = ((filled - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
        error = (q * scale.float()[..., None] + offset.float()[..., None] - filled) ** 2
        return scale, offset, q, torch.where(real, error, 0.0).sum(-1)

    best = fit(1.0)
    for fraction in _CLIP_GRID[1:] if clip_search else ():
        candidate = fit(fraction)
        better = candidate[3] < best[3]
        best = tuple(
            torch.where(better[..., None] if c.dim() == 3 else better, c, b)
            for c, b in zip(candidate, best, strict=True)
        )
    return best[:3]


def quantize_weight(
    weight: torch.Tensor, bits: int = 4, group_size: int = 32, *, clip_search: bool = False
) -> QuantizedWeight:
    """Round-to-nearest quantization of a [out_features, in_features] float weight.

    clip_search=True also tries narrower ranges per group (int4) or per row (int8) and keeps
    the one with the lowest squared error, which trades rare outliers for finer steps.
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise TypeError(
            "weight must be a floating-point tensor, got "
            f"{getattr(weight, 'dtype', type(weight).__name__)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf")
    # Contiguous: elementwise ops keep a transposed input's strides (GPT-2's Conv1D stores
    # [in, out]), and the kernels read the codes row-major.
    w = weight.detach().float().contiguous()
    n, k = w.shape
    if bits == 8:
        amax = w.abs().amax(1)
        best_scale = (amax / 127).clamp(min=1e-12)
        if clip_search:
            best_error = torch.full_like(amax, torch.inf)
            for fraction in _CLIP_GRID:
                scale = (amax * fraction / 127).clamp(min=1e-12)
                q = (w / scale[:, None]).round().clamp(-127, 127)
                error = ((q * scale[:, None] - w) ** 2).sum(1)
                best_scale = torch.where(error < best_error, scale, best_scale)
                best_error = torch.minimum(error, best_error)
        q = (w / best_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(8, -1, (n, k), q, best_scale)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size <= 0 or group_size % INT4_BLOCK:
        raise ValueError(
            f"group_size must be a multiple of {INT4_BLOCK} (32, 64, 128, ...), got {group_size}"
        )
    padded = -(-k // group_size) * group_size
    # NaN marks the pad so it neither widens a group's range nor counts in its error.
    w = torch.nn.functional.pad(w, (0, padded - k), value=float("nan"))
    scales, offsets, q = _int4_groups(w.view(n, -1, group_size), group_size, clip_search)
    data = pack_int4(q.view(n, padded))
    return QuantizedWeight(4, group_size, (n, k), data, scales, offsets)
