"""`rlhf-fast doctor`: the op table's columns line up, and a bad RLHF_FAST_BACKEND is named as
the problem (not as an override) with a non-zero exit."""

from __future__ import annotations

from rlhf_fast import doctor
from rlhf_fast.cli import main
from rlhf_fast.ops import _dispatch


def _op_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line.split(" ", 1)[0] in _dispatch.IMPLEMENTED]


def test_op_table_columns_line_up(monkeypatch):
    """Op names longer than the column (quant_matmul, rotary_embedding) pushed their rows'
    device and backend columns out of line with the header's."""
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    lines = doctor.report()
    header = next(line for line in lines if line.startswith("op "))
    rows = _op_rows(lines)
    assert len(rows) == 2 * len(_dispatch.IMPLEMENTED)
    device_column, uses_column = header.index("device"), header.index("uses")
    for row in rows:
        assert row[device_column - 1] == " " and row[device_column:].split()[0] in ("cpu", "cuda")
        assert row[uses_column - 1] == " " and row[uses_column:].split()[0] in _dispatch.BACKENDS


def test_a_bad_backend_variable_is_the_reported_problem(monkeypatch, capsys):
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "RLHF_FAST_BACKEND=bogus overrides" not in out
    assert (
        "RLHF_FAST_BACKEND=bogus is not a backend (reference, cpp, cuda, triton): every op "
        "call raises ValueError" in out
    )


def test_good_backend_variable_is_an_override(monkeypatch, capsys):
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "RLHF_FAST_BACKEND=reference overrides the automatic choice" in out
    assert all(row.split()[2] == "reference" for row in _op_rows(out.splitlines()))


def test_a_forced_simd_level_says_who_forced_it(monkeypatch):
    """With RLHF_FAST_CPU_ISA=avx2 on an AVX-512 CPU, doctor said 'using avx2' and not why."""
    from rlhf_fast import _native

    if _native.cpp is None:
        return
    monkeypatch.setenv(_native.ISA_ENV, _native.cpp.cpu_isa())
    line = next(line for line in doctor.report() if line.startswith("C++ kernels"))
    assert f"({_native.ISA_ENV}={_native.cpp.cpu_isa()})" in line
    monkeypatch.delenv(_native.ISA_ENV)
    line = next(line for line in doctor.report() if line.startswith("C++ kernels"))
    assert _native.ISA_ENV not in line


def test_every_op_row_names_its_other_backends_or_none(monkeypatch):
    """rms_norm, silu_mul and rotary_embedding have only the reference on CUDA: their rows
    ended after 'reference', as if the report had been cut off."""
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    lines = doctor.report()
    header = next(line for line in lines if line.startswith("op "))
    others_column = header.index("other backends")
    for row in _op_rows(lines):
        assert row[others_column:].strip(), row
    rows = {tuple(row.split()[:2]): row for row in _op_rows(lines)}
    assert rows[("rms_norm", "cuda")].split()[2:] == ["reference", "none"]
