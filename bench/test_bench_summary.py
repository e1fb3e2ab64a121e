"""The session summary of bench/conftest.py: its ratios, checked on made-up medians (no timing)."""

from __future__ import annotations

from conftest import _HEADER, _Group, _summary_rows


def _row(medians: dict[str, float]) -> dict[str, str]:
    group = _Group(medians={name: (seconds, 10) for name, seconds in medians.items()})
    (row,) = _summary_rows({("op", "cpu", "size"): group})
    return dict(zip(_HEADER, row, strict=True))


def test_ratios_are_other_over_fast():
    row = _row({"cpp": 1e-3, "reference": 5e-3, "peer": 2e-3, "memcpy": 5e-4})
    assert row["fast"] == "1 ms cpp"
    assert (row["ref/fast"], row["peer/fast"], row["memcpy/fast"]) == ("5x", "2x", "0.5x")


def test_peer_ratio_is_against_the_strongest_peer():
    # lora_linear_int4: "peer" (dequantize + peft) and "peer-fast-dequantize" (the stronger);
    # the headline ratio must not be the one against the weaker peer
    row = _row({"cpp": 1e-3, "peer": 50e-3, "peer-fast-dequantize": 4e-3})
    assert row["peer/fast"] == "4x"
    assert row["peer"] == "4 ms peer-fast-dequantize"
    row = _row({"cpp": 1e-3, "peer": 3e-3, "peer-fast-dequantize": 4e-3})
    assert (row["peer"], row["peer/fast"]) == ("3 ms", "3x")
