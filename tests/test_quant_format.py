"""QuantizedWeight: packing layout, round trips, error bounds, ragged shapes, corrupt tensors."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.quant import QuantizedWeight, pack_int4, quantize_weight, unpack_int4


def gaussian(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator)


def relative_error(qweight: QuantizedWeight, weight: torch.Tensor) -> float:
    return ((qweight.dequantize() - weight).norm() / weight.norm()).item()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------- packing


def test_pack_unpack_round_trip_and_documented_layout():
    generator = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 96), generator=generator, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), q)
    for block in range(96 // 32):
        for j in range(16):
            byte = packed[:, 16 * block + j]
            assert torch.equal(byte & 0xF, q[:, 32 * block + j])
            assert torch.equal(byte >> 4, q[:, 32 * block + 16 + j])


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "bits, group_size, in_features",
    [(8, -1, 256), (8, -1, 200), (4, 32, 256), (4, 128, 576), (4, 32, 200), (4, 64, 33)],
)
def test_state_dict_round_trip_is_bit_exact(bits, group_size, in_features):
    weight = gaussian(24, in_features, seed=in_features)
    qweight = quantize_weight(weight, bits, group_size)
    tensors = qweight.state_dict("layer")
    expected_keys = {"layer.qdata", "layer.scales", "layer.qshape"} | (
        {"layer.offsets"} if bits == 4 else set()
    )
    assert set(tensors) == expected_keys
    rebuilt = QuantizedWeight.from_state_dict(tensors, "layer")
    assert (rebuilt.bits, rebuilt.group_size) == (bits, group_size)
    assert rebuilt.shape == (24, in_features)
    assert_same_tensors(rebuilt.state_dict("layer"), tensors)
    assert torch.equal(rebuilt.dequantize(), qweight.dequantize())


def test_round_trip_through_a_safetensors_file(tmp_path):
    from safetensors.torch import load_file, save_file

    qweight = quantize_weight(gaussian(16, 200), 4, 32)
    save_file(qweight.state_dict("w"), tmp_path / "w.safetensors")
    rebuilt = QuantizedWeight.from_state_dict(load_file(tmp_path / "w.safetensors"), "w")
    assert_same_tensors(rebuilt.state_dict("w"), qweight.state_dict("w"))


# ------------------------------------------------------------------------------ error bounds


def test_int8_relative_error_below_two_percent():
    weight = gaussian(256, 512)
    assert relative_error(quantize_weight(weight, 8), weight) < 0.02


def test_int8_error_is_at_most_half_a_step_per_element():
    weight = gaussian(64, 300)
    qweight = quantize_weight(weight, 8)
    step = qweight.scales[:, None]
    assert ((qweight.dequantize() - weight).abs() <= step * 0.5 * (1 + 1e-5)).all()


def test_int4_g128_below_fifteen_percent_and_g32_finer():
    weight = gaussian(256, 512)
    error_g128 = relative_error(quantize_weight(weight, 4, 128), weight)
    error_g32 = relative_error(quantize_weight(weight, 4, 32), weight)
    assert error_g128 < 0.15
    assert error_g32 < error_g128


def test_int4_error_is_about_half_a_step_per_element():
    weight = gaussian(32, 200)  # ragged: the last g32 group holds 8 real weights
    qweight = quantize_weight(weight, 4, 32)
    step = qweight.scales.float().repeat_interleave(32, dim=1)[:, :200]
    error = (qweight.dequantize() - weight).abs()
    # fp16 scales and offsets add a rounding error well below a step
    assert (error <= 0.5 * step + 2e-3 * weight.abs().amax()).all()


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 32), (4, 128)])
def test_clip_search_never_worse_than_round_to_nearest(bits, group_size):
    weight = gaussian(64, 256, seed=3)
    weight[::7, ::13] *= 8  # outliers: where clipping pays
    plain = quantize_weight(weight, bits, group_size)
    searched = quantize_weight(weight, bits, group_size, clip_search=True)
    rows_plain = ((plain.dequantize() - weight) ** 2).sum(1)
    rows_searched = ((searched.dequantize() - weight) ** 2).sum(1)
    assert (rows_searched <= rows_plain * (1 + 1e-6) + 1e-9).all()
    if bits == 4:  # int4's coarse steps gain from clipping the outliers' groups
        assert rows_searched.sum() < rows_plain.sum()


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 128), (4, 32)])
@pytest.mark.parametrize("in_features", [576, 200, 33])
def test_ragged_in_features(bits, group_size, in_features):
    weight = gaussian(40, in_features, seed=in_features)
    qweight = quantize_weight(weight, bits, group_size)
    qweight.validate()
    assert qweight.shape == (40, in_features)
    assert qweight.dequantize().shape == (40, in_features)
    assert relative_error(qweight, weight) < (0.02 if bits == 8 else 0.15)


def test_constant_and_zero_rows_stay_finite():
    weight = torch.zeros(4, 64)
    weight[1] = 3.0
    for bits in (4, 8):
        dequantized = quantize_weight(weight, bits, 32).dequantize()
        assert torch.isfinite(dequantized).all()
        assert torch.allclose(dequantized, weight, atol=1e-2)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(torch.full((4, 32), float("nan")))
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.ones(4, 32), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.ones(4, 32), 4, group_size=48)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(4, 0), (0, 32), (0, 0)])
def test_empty_weight_is_a_one_line_error(bits, shape):
    # Was a reshape RuntimeError ("dimension size -1 ... is ambiguous") or an amax IndexError,
    # except int8 [0, K], which worked: every empty shape now gets the same answer.
    with pytest.raises(ValueError, match=r"weight must not be empty"):
        quantize_weight(torch.randn(*shape), bits, 32)


def test_int4_refuses_weights_beyond_float16_range():
    # int4 scales and offsets are float16: a weight past 65504 gave an inf offset, and so
    # inf / NaN in dequantize() and in every product, with no error.
    weight = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    weight[1, 3] = -7e4
    with pytest.raises(ValueError, match="float16"):
        quantize_weight(weight, 4, 32)
    assert torch.isfinite(quantize_weight(weight, 8).dequantize()).all()  # fp32 scales
    weight[1, 3] = -6e4  # within range: finite
    assert torch.isfinite(quantize_weight(weight, 4, 32).dequantize()).all()


# --------------------------------------------------------------------------- corrupt tensors


def _groups_of(group_size: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Consistent qdata / scales / offsets shapes for a 200-wide row in groups of group_size
    (0: more scales than codes)."""
    if group_size == 0:
        return {"w.scales": torch.zeros(8, 300).half(), "w.offsets": torch.zeros(8, 300).half()}
    groups = -(-200 // group_size)
    half = torch.zeros(8, groups).half()
    data = torch.zeros(8, groups * group_size // 2, dtype=torch.uint8)
    return {"w.qdata": data, "w.scales": half, "w.offsets": half.clone()}


def corrupted(bits: int, change) -> dict[str, torch.Tensor]:
    tensors = dict(quantize_weight(gaussian(8, 200), bits, 32).state_dict("w"))
    change(tensors)
    return tensors


@pytest.mark.parametrize(
    "bits, change, message",
    [
        (4, lambda t: t.pop("w.qdata"), "missing tensor"),
        (4, lambda t: t.pop("w.qshape"), "missing tensor"),
        (4, lambda t: t.pop("w.offsets"), "offsets"),
        (4, lambda t: t.update({"w.qdata": t["w.qdata"][:, :-16]}), "qdata must have shape"),
        (4, lambda t: t.update({"w.qdata": t["w.qdata"][:-1]}), "qdata must have shape"),
        (4, lambda t: t.update({"w.offsets": t["w.offsets"][:, :-1]}), "offsets must have shape"),
        (4, lambda t: t.update({"w.qshape": torch.tensor([8, 100])}), "must have shape"),
        (4, lambda t: t.update({"w.qdata": t["w.qdata"].float()}), "unknown dtype"),
        (8, lambda t: t.update({"w.scales": t["w.scales"][:-1]}), "scales must have shape"),
        (8, lambda t: t.update({"w.qshape": torch.tensor([8, 199])}), "qdata must have shape"),
        (8, lambda t: t.update({"w.qdata": t["w.qdata"].T.contiguous()}), "qdata must have shape"),
        # Dtypes are part of the format: the kernels read the bytes as these types.
        (4, lambda t: t.update({"w.scales": t["w.scales"].float()}), "scales must be float16"),
        (4, lambda t: t.update({"w.offsets": t["w.offsets"].float()}), "offsets must be float16"),
        (8, lambda t: t.update({"w.scales": t["w.scales"].half()}), "scales must be float32"),
        # Scales whose count gives a group size the kernels cannot walk (48, 0).
        (4, lambda t: t.update(_groups_of(48, t)), "group size 48"),
        (4, lambda t: t.update(_groups_of(0, t)), "group size 0|scales"),
        (4, lambda t: t.update({"w.qshape": torch.tensor([8, 200, 1])}), "qshape must hold 2"),
        (8, lambda t: t.update({"w.qshape": torch.tensor([8])}), "qshape must hold 2"),
    ],
)
def test_from_state_dict_rejects_corrupt_tensors(bits, change, message):
    with pytest.raises(ValueError, match=message):
        QuantizedWeight.from_state_dict(corrupted(bits, change), "w")


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 32), (4, 128)])
def test_transposed_weight_gives_contiguous_codes(bits, group_size):
    """GPT-2's Conv1D hands over its weight transposed; the codes must still be row-major."""
    weight = torch.randn(96, 40, generator=torch.Generator().manual_seed(bits)).t()
    assert not weight.is_contiguous()
    qweight = quantize_weight(weight, bits, 32 if bits == 8 else group_size)
    assert qweight.data.is_contiguous() and qweight.scales.is_contiguous()
    reference = quantize_weight(weight.contiguous(), bits, 32 if bits == 8 else group_size)
    assert torch.equal(qweight.data, reference.data)
