"""Offload policy: size parsing, the streamer simulation against hand-computed schedules, and
the search (budget respected, explicit settings honoured, best of the grid, too-small budget).
"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_fast.offload.policy import (
    Calibration,
    ModelShape,
    choose_policy,
    evaluate,
    layer_time,
    model_shapes,
    parse_max_memory,
    parse_size,
    simulate_step,
)
from rlhf_fast.offload.session import parse_offload

CALIBRATION = Calibration(
    disk_bandwidth=1e9,
    layer_fixed={"none": 0.010, "int8": 0.004, "int4": 0.004},
    layer_per_row={"none": 0.001, "int8": 0.002, "int4": 0.002},
    head_fixed=0.001,
    head_per_row=0.0001,
)
SHAPES = {
    None: ModelShape(8, 100_000_000, 50_000_000, 1000, 1024, 4096, 32000),
    8: ModelShape(8, 26_000_000, 50_000_000, 1000, 1024, 4096, 32000),
    4: ModelShape(8, 15_000_000, 50_000_000, 1000, 1024, 4096, 32000),
}


def test_parse_sizes():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size("300KB") == 300_000
    assert parse_max_memory("cpu=2GiB, device=1MiB") == {"cpu": 2 << 30, "device": 1 << 20}
    for bad in ("2 parsecs", "", "-1GB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="cpu=SIZE"):
        parse_max_memory("gpu=3GB")


def test_parse_offload_spec():
    assert parse_offload("auto", 32) == {}
    assert parse_offload("compress=int4,resident=25%,prefetch=2,micro-batch=4", 32) == {
        "compress": 4, "resident_layers": 8, "prefetch": 2, "micro_batch": 4,
    }  # fmt: skip
    assert parse_offload("compress=none,resident=3", 32) == {"compress": None, "resident_layers": 3}
    assert parse_offload("auto,act=fp32", 32) == {"bf16_rows": None}
    assert parse_offload("act=bf16", 32) == {"bf16_rows": 32}
    bad_values = ("resident=40", "prefetch=-1", "micro-batch=0", "speed=fast", "compress=int3")
    for bad in (*bad_values, "act=fp16"):
        with pytest.raises(ValueError, match="--offload"):
            parse_offload(bad, 32)


def test_simulation_matches_hand_schedules():
    # no prefetch: every read waits for its layer, nothing overlaps
    assert simulate_step([1.0] * 4, [2.0] * 4, prefetch=0) == pytest.approx(12.0)
    # prefetch, I/O bound: the reader never idles in steady state
    assert simulate_step([1.0] * 4, [2.0] * 4, prefetch=1) == pytest.approx(8.0)
    # prefetch, compute bound: reads hide behind compute
    assert simulate_step([2.0] * 4, [1.0] * 4, prefetch=1) == pytest.approx(8.0)
    # resident layers only compute
    assert simulate_step([1.0] * 3, [None] * 3, prefetch=1) == pytest.approx(3.0)
    # reads of streamed layers overlap the resident layers' compute too (deep prefetch)
    overlapped = simulate_step([1.0] * 4, [None, 1.5, None, 1.5], prefetch=2)
    assert overlapped == pytest.approx(4.0)


def test_search_respects_budget_and_prefers_more_resident_layers():
    budget = 600_000_000
    policy = choose_policy({None: SHAPES[None]}, CALIBRATION, cpu_budget=budget, batch=4)
    assert policy.memory_bytes <= budget
    assert 0 < policy.resident_layers < 8
    grid = [
        evaluate(SHAPES[None], CALIBRATION, compress=None, resident_layers=r, prefetch=p,
                 micro_batch=m, batch=4, context=512)
        for r in range(9) for p in (0, 1, 2, 4) for m in (1, 2, 4)
    ]  # fmt: skip
    feasible = [g for g in grid if g.memory_bytes <= budget]
    best = max(g.predicted_tokens_per_s for g in feasible)
    assert policy.predicted_tokens_per_s == pytest.approx(best)


def test_compression_is_chosen_when_it_is_faster_and_flags_override():
    # 50 MB + 8 int4 layers of 15 MB + a 512-token prefill's 38 MB of activations
    policy = choose_policy(SHAPES, CALIBRATION, cpu_budget=220_000_000, batch=1)
    assert policy.compress == 4 and policy.resident_layers == 8
    pinned = choose_policy(
        SHAPES, CALIBRATION, cpu_budget=300_000_000, batch=8, context=16,
        fixed={"compress": None, "prefetch": 0, "micro_batch": 2},
    )  # fmt: skip
    assert (pinned.compress, pinned.prefetch, pinned.micro_batch) == (None, 0, 2)
    with pytest.raises(ValueError, match="too small"):
        choose_policy(SHAPES, CALIBRATION, cpu_budget=10_000_000, batch=1)


def test_model_shapes_count_layer_bytes():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    shapes = model_shapes(config, torch.float32)
    linear = 256 * 256 * 2 + 256 * 128 * 2 + 256 * 512 * 3
    assert shapes[None].layer_bytes == (linear + 2 * 256) * 4
    assert shapes[None].other_bytes == (2 * 1000 * 256 + 256) * 4
    assert shapes[4].layer_bytes < shapes[8].layer_bytes < shapes[None].layer_bytes / 3
    assert shapes[None].kv_bytes_per_token == 2 * 3 * 2 * 64 * 4


def test_layer_time_interpolates_measured_points():
    points = {"int4": [[1.0, 0.010], [8.0, 0.017], [32.0, 0.065], [64.0, 0.097]]}
    calibration = Calibration(1e9, {"int4": 1.0}, {"int4": 1.0}, 0.0, 0.0, points, 1)
    assert layer_time(calibration, 4, 1) == pytest.approx(0.010)
    assert layer_time(calibration, 4, 32) == pytest.approx(0.065)
    assert layer_time(calibration, 4, 20) == pytest.approx(0.017 + 0.048 * 12 / 24)
    assert layer_time(calibration, 4, 128) == pytest.approx(0.097 + 0.032 * 2)  # last slope
    # bf16 activations (opt-in): their own points from bf16_rows rows up, int4's below
    both = dict(points, **{"int4-bf16": [[1.0, 0.010], [32.0, 0.030], [64.0, 0.040]]})
    mixed = Calibration(1e9, {"int4": 1.0}, {"int4": 1.0}, 0.0, 0.0, both, 1)
    assert layer_time(mixed, 4, 64, bf16_rows=32) == pytest.approx(0.040)
    assert layer_time(mixed, 4, 16, bf16_rows=32) == pytest.approx(0.017 + 0.048 * 8 / 24)
    assert layer_time(mixed, 4, 64) == pytest.approx(0.097)
    assert layer_time(calibration, 4, 64, bf16_rows=32) == pytest.approx(0.097)  # not calibrated
    # without points (an older cached calibration): the straight line
    assert layer_time(CALIBRATION, 4, 3) == pytest.approx(0.004 + 0.002 * 3)


def test_lm_head_is_charged_once_per_step_not_per_micro_batch():
    common = dict(compress=4, resident_layers=8, prefetch=0, batch=8, context=16)
    one = evaluate(SHAPES[4], CALIBRATION, micro_batch=8, **common)
    eight = evaluate(SHAPES[4], CALIBRATION, micro_batch=1, **common)
    layers = 8 * (0.004 + 0.002 * 8)
    assert 8 / one.predicted_tokens_per_s == pytest.approx(layers + 0.001 + 0.0001 * 8)
    layers_mb1 = 8 * 8 * (0.004 + 0.002)
    assert 8 / eight.predicted_tokens_per_s == pytest.approx(layers_mb1 + 0.001 + 0.0001 * 8)


def test_cold_reads_count_every_byte_direct_or_buffered(tmp_path):
    from rlhf_fast.offload.policy import _read_cold, measure_disk_bandwidth
    from rlhf_fast.offload.shards import aligned_buffer

    path = tmp_path / "odd.bin"
    data = torch.randint(0, 256, (300_001,), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    aligned = aligned_buffer(64 << 10)  # O_DIRECT: chunks, then a short read at the end
    assert _read_cold(str(path), aligned) == 300_001
    assert torch.equal(aligned[: 300_001 - 4 * (64 << 10)], data[4 * (64 << 10) :])
    unaligned = torch.empty((64 << 10) + 1, dtype=torch.uint8)[1:]  # refused: buffered
    assert _read_cold(str(path), unaligned) == 300_001
    assert measure_disk_bandwidth(tmp_path, [str(path)]) > 0


def test_calibration_times_int4_with_and_without_bf16_activations():
    from transformers import LlamaConfig

    from rlhf_fast.offload.policy import calibrate_compute

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    before = torch.get_num_threads()
    fields = calibrate_compute(
        config, torch.float32, compressions=(None, 4), rows=(1, 32, 64), context=4, repeats=1
    )
    fixed, points, head_points = (
        fields["layer_fixed"],
        fields["layer_points"],
        fields["head_points"],
    )
    head_fixed = fields["head_fixed"]
    assert fields["attention_per_position"] >= 0 and fields["context"] == 4
    Calibration(1e9, threads=1, **fields)  # the fields of a Calibration
    assert set(points) == {"none", "int4", "int4-bf16"} and set(fixed) == set(points)
    rows = {key: [r for r, _ in p] for key, p in points.items()}
    # the bf16 timing only where the rule applies (from 32 rows)
    assert rows == {"none": [1.0, 32.0, 64.0], "int4": [1.0, 32.0, 64.0], "int4-bf16": [32.0, 64.0]}
    assert all(min(t for _, t in p) > 0 for p in points.values())
    assert [r for r, _ in head_points] == [1.0, 32.0, 64.0] and min(t for _, t in head_points) > 0
    # the head as int4 models run it under the rule: bf16 from the threshold
    assert [r for r, _ in fields["head_points_bf16"]] == [32.0, 64.0]
    assert head_fixed > 0 and torch.get_num_threads() == before


def test_head_time_interpolates_its_points():
    from rlhf_fast.offload.policy import head_time

    calibration = Calibration(
        1e9, {"int4": 1.0}, {"int4": 1.0}, 1.0, 1.0, {}, 1, [[1.0, 0.002], [64.0, 0.050]]
    )
    assert head_time(calibration, 1) == pytest.approx(0.002)
    assert head_time(calibration, 128) == pytest.approx(0.002 + 0.048 * 127 / 63)
    assert head_time(CALIBRATION, 8) == pytest.approx(0.001 + 0.0001 * 8)  # no points: the line


def test_the_head_under_the_rule_has_its_own_time_and_copy():
    from dataclasses import replace

    from rlhf_fast.offload.policy import head_time

    points = [[1.0, 0.002], [128.0, 0.100]]
    calibration = replace(_bf16_calibration(), head_points=points,
                          head_points_bf16=[[32.0, 0.005], [128.0, 0.020]])  # fmt: skip
    assert head_time(calibration, 64) == pytest.approx(0.002 + 0.098 * 63 / 127)
    assert head_time(calibration, 64, 32) == pytest.approx(0.005 + 0.015 * 32 / 96)
    assert head_time(calibration, 8, 32) == pytest.approx(0.002 + 0.098 * 7 / 127)  # below it
    settings = dict(resident_layers=8, prefetch=1, micro_batch=64, batch=64, context=16)
    ruled = evaluate(SHAPES[4], calibration, compress=4, bf16_rows=32, **settings)
    fp32 = evaluate(SHAPES[4], calibration, compress=4, bf16_rows=None, **settings)
    layers = 64 / fp32.predicted_tokens_per_s - head_time(calibration, 64)  # the fp32 layers
    layers += layer_time(calibration, 4, 64, 32) * 8 - layer_time(calibration, 4, 64) * 8
    expected = layers + head_time(calibration, 64, 32)
    assert 64 / ruled.predicted_tokens_per_s == pytest.approx(expected, rel=1e-6)
    # its bf16 weight copy is charged to the budget
    assert ruled.memory_bytes - fp32.memory_bytes == 32000 * 1024 * 2


def _bf16_calibration() -> Calibration:
    """int4 at 5 ms + 1 ms/row with fp32 activations, 6 ms + 0.1 ms/row under the rule."""
    points = {
        "int4": [[1.0, 0.006], [128.0, 0.133]],
        "int4-bf16": [[32.0, 0.0092], [128.0, 0.0188]],
    }
    return Calibration(1e9, {"int4": 0.005}, {"int4": 0.001}, 0.001, 0.0, points, 1)


def test_int4_under_the_rule_is_a_normal_candidate_and_its_micro_batches_stay_exact():
    calibration, shapes = _bf16_calibration(), {4: SHAPES[4]}
    policy = choose_policy(shapes, calibration, cpu_budget=10**9, batch=64, context=16)
    assert policy.bf16_rows == 32 and "act=bf16" in policy.describe()
    # 16-row micro-batches would run fp32 where the whole batch runs bf16: never proposed,
    # whatever their predicted speed
    assert policy.micro_batch in (32, 64)
    assert policy.predicted_tokens_per_s == pytest.approx(
        evaluate(SHAPES[4], calibration, compress=4, resident_layers=8, prefetch=policy.prefetch,
                 micro_batch=policy.micro_batch, batch=64, context=16,
                 bf16_rows=32).predicted_tokens_per_s
    )  # fmt: skip
    # opted out (act=fp32, training): fp32 timing, any micro-batch
    off = choose_policy(
        shapes, calibration, cpu_budget=10**9, batch=64, context=16, fixed={"bf16_rows": None}
    )
    assert off.bf16_rows is None and off.predicted_tokens_per_s < policy.predicted_tokens_per_s
    # below the threshold the rule changes nothing: one micro-batch (splitting it could cross)
    small = choose_policy(shapes, calibration, cpu_budget=10**9, batch=8, context=16)
    assert small.micro_batch == 8
    # other compressions never carry the rule
    dense = choose_policy({None: SHAPES[None]}, CALIBRATION, cpu_budget=10**9, batch=64, context=16)
    assert dense.bf16_rows is None


def test_calibration_points_never_fall_with_more_rows():
    from rlhf_fast.offload.policy import _monotone

    # a count slowed by another process is capped by the next count's time
    assert _monotone([0.015, 0.045, 0.036, 0.051]) == [0.015, 0.036, 0.036, 0.051]
    assert _monotone([0.3, 0.2, 0.1]) == [0.1, 0.1, 0.1]
    assert _monotone([0.1]) == [0.1] and _monotone([]) == []


def test_attention_cost_follows_the_context():
    calibration = Calibration(
        1e9, {"int4": 0.004}, {"int4": 0.002}, 0.0, 0.0, attention_per_position=1e-6, context=64
    )
    common = dict(compress=4, resident_layers=8, prefetch=0, micro_batch=4, batch=8)
    short = evaluate(SHAPES[4], calibration, context=64, **common)
    long = evaluate(SHAPES[4], calibration, context=1088, **common)
    # 8 layers x 2 micro-batches x 4 rows x 1024 more positions x 1 us
    assert 8 / long.predicted_tokens_per_s - 8 / short.predicted_tokens_per_s == pytest.approx(
        8 * 2 * 4 * 1024 * 1e-6
    )


def test_a_cached_calibration_of_older_code_is_measured_again(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict, replace

    from rlhf_fast.offload import session
    from rlhf_fast.offload.policy import CALIBRATION_VERSION

    fresh = replace(CALIBRATION, version=CALIBRATION_VERSION, disk_bandwidth=2e9)
    calls = []
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: calls.append(1) or fresh)
    cache = tmp_path / "calibration.json"
    cache.write_text(json.dumps(asdict(replace(CALIBRATION, version=CALIBRATION_VERSION - 1))))
    assert session._calibration(tmp_path, None, torch.float32, (None,)) == fresh and calls
    assert json.loads(cache.read_text())["version"] == CALIBRATION_VERSION  # rewritten
    calls.clear()  # now current: read back, not measured
    assert session._calibration(tmp_path, None, torch.float32, (None,)) == fresh and not calls


def _timed_with(threads: int, layer_scale: float, cores: int = 2, read_cpu: float = 0.0):
    from dataclasses import replace

    return replace(
        CALIBRATION,
        threads=threads,
        cores=cores,
        read_cpu_per_byte=read_cpu,
        layer_fixed={k: v * layer_scale for k, v in CALIBRATION.layer_fixed.items()},
        layer_per_row={k: v * layer_scale for k, v in CALIBRATION.layer_per_row.items()},
    )


def test_the_thread_count_is_one_more_dimension_of_the_search():
    from dataclasses import replace

    one, two = _timed_with(1, 1.0), _timed_with(2, 0.5)
    both = replace(one, with_threads=[two])
    assert both.per_thread_count() == [both, two]
    resident = {None: SHAPES[None]}  # everything fits: compute alone decides
    faster = choose_policy(resident, both, cpu_budget=10**10, batch=8)
    assert faster.threads == 2 and "threads=2" in faster.describe()
    assert faster.predicted_tokens_per_s == pytest.approx(
        evaluate(SHAPES[None], two, compress=None, resident_layers=8, prefetch=0,
                 micro_batch=faster.micro_batch, batch=8, context=512).predicted_tokens_per_s
    )  # fmt: skip
    pinned = choose_policy(resident, both, cpu_budget=10**10, batch=8, fixed={"threads": 1})
    assert pinned.threads == 1 and pinned.predicted_tokens_per_s < faster.predicted_tokens_per_s
    with pytest.raises(ValueError, match="threads=3: calibrated for 1, 2"):
        choose_policy(resident, both, cpu_budget=10**10, batch=8, fixed={"threads": 3})
    assert parse_offload("auto,threads=2", 32) == {"threads": 2}
    with pytest.raises(ValueError, match="--offload"):
        parse_offload("threads=0", 32)


def test_compute_on_every_core_is_charged_the_readers_cpu():
    """With as many compute threads as cores, each streamed layer's read stalls the compute by
    the reader's CPU time; one thread fewer leaves the reader its core and is not charged."""
    shape, kwargs = SHAPES[None], dict(compress=None, prefetch=1, micro_batch=1, batch=1)
    stall = 0.05 / SHAPES[None].layer_bytes  # 50 ms of CPU per layer read
    spare = evaluate(shape, _timed_with(1, 1.0, read_cpu=stall), resident_layers=0,
                     context=16, **kwargs)  # fmt: skip
    assert spare.predicted_tokens_per_s == pytest.approx(
        evaluate(shape, _timed_with(1, 1.0), resident_layers=0, context=16, **kwargs)
        .predicted_tokens_per_s
    )  # fmt: skip
    every = _timed_with(2, 1.0, read_cpu=stall)
    streamed = evaluate(shape, every, resident_layers=0, context=16, **kwargs)
    # compute bound or not, the step = max(compute + stall, read) per layer in steady state
    per_layer = max(0.010 + 0.001 + 0.05, SHAPES[None].layer_bytes / 1e9)
    assert 1 / streamed.predicted_tokens_per_s == pytest.approx(8 * per_layer + 0.0011, rel=1e-3)
    resident = evaluate(shape, every, resident_layers=8, context=16, **kwargs)
    assert 1 / resident.predicted_tokens_per_s == pytest.approx(8 * 0.011 + 0.0011, rel=1e-3)


def test_calibrate_times_each_thread_count_and_the_cache_keeps_them(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict

    from transformers import LlamaConfig

    from rlhf_fast.offload import policy as policy_module
    from rlhf_fast.offload import session

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    seen, timed_for_real = [], policy_module.calibrate_compute

    def compute(config, dtype, *, compressions, threads):
        seen.append(threads)
        return timed_for_real(
            config, dtype, compressions=compressions, threads=threads, rows=(1, 8), repeats=1
        )

    monkeypatch.setattr(policy_module, "calibrate_compute", compute)
    data = tmp_path / "layer.bin"
    data.write_bytes(b"x" * 8192)
    timed = policy_module.calibrate(
        config, torch.float32, tmp_path, compressions=(None,), files=[str(data)], threads=(1, 2)
    )
    assert seen == [1, 2] and [c.threads for c in timed.per_thread_count()] == [1, 2]
    other = timed.with_threads[0]
    assert other.disk_bandwidth == timed.disk_bandwidth and timed.read_cpu_per_byte >= 0
    assert timed.cores == torch.get_num_threads() and other.with_threads == []
    assert [r for r, _ in other.layer_points["none"]] == [1.0, 8.0]
    with pytest.raises(ValueError, match="thread counts"):
        policy_module.calibrate(config, torch.float32, tmp_path, files=[str(data)], threads=0)
    # calibration.json round-trips the nested timings
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: timed)
    assert session._calibration(tmp_path, config, torch.float32, (None,)) == timed
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: pytest.fail("measured again"))
    assert session._calibration(tmp_path, config, torch.float32, (None,)) == timed
    assert json.loads((tmp_path / "calibration.json").read_text())["with_threads"] == [
        asdict(other)
    ]


# ------------------------------------------------- mutation-testing additions (hand-computed)


def test_binary_units_and_a_tier_without_a_size():
    assert parse_size("3KiB") == 3 * 1024 and parse_size("1TiB") == 1 << 40
    assert parse_size("2M") == 2_000_000 and parse_size("1mib") == 1 << 20
    with pytest.raises(ValueError, match="is not cpu=SIZE"):
        parse_max_memory("cpu")


def test_the_activation_rule_starts_at_exactly_its_threshold():
    from dataclasses import replace

    from rlhf_fast.offload.policy import head_time

    points = {
        "int4": [[1.0, 0.010], [8.0, 0.017], [32.0, 0.065], [64.0, 0.097]],
        "int4-bf16": [[1.0, 0.010], [32.0, 0.030], [64.0, 0.040]],
    }
    mixed = Calibration(1e9, {"int4": 1.0}, {"int4": 1.0}, 0.0, 0.0, points, 1)
    assert layer_time(mixed, 4, 32, bf16_rows=32) == pytest.approx(0.030)
    assert layer_time(mixed, 4, 31, bf16_rows=32) == pytest.approx(0.017 + 0.048 * 23 / 24)
    heads = replace(mixed, head_points=[[1.0, 0.002], [128.0, 0.100]],
                    head_points_bf16=[[32.0, 0.005], [128.0, 0.020]])  # fmt: skip
    assert head_time(heads, 32, 32) == pytest.approx(0.005)
    # the head's bf16 copy is charged from a batch of exactly the threshold
    settings = dict(resident_layers=8, prefetch=1, micro_batch=32, batch=32, context=16)
    ruled = evaluate(SHAPES[4], heads, compress=4, bf16_rows=32, **settings)
    fp32 = evaluate(SHAPES[4], heads, compress=4, bf16_rows=None, **settings)
    assert ruled.memory_bytes - fp32.memory_bytes == 32000 * 1024 * 2


def test_interpolation_and_a_short_context_never_predict_a_negative_time():
    falling = Calibration(1e9, {"none": 1.0}, {"none": 1.0}, 0.0, 0.0,
                          {"none": [[1.0, 0.010], [8.0, 0.003]]}, 1)  # fmt: skip
    assert layer_time(falling, None, 64) == pytest.approx(1e-6)
    # one measured point is no curve: the straight line
    single = Calibration(1e9, {"none": 0.5}, {"none": 0.25}, 0.0, 0.0, {"none": [[8.0, 9.0]]}, 1)
    assert layer_time(single, None, 2) == pytest.approx(0.5 + 0.25 * 2)
    # the attention correction below the timed context may not make a layer cost < 0
    steep = Calibration(1e9, {"none": 0.001}, {"none": 0.0}, 0.0, 0.0,
                        attention_per_position=1.0, context=64)  # fmt: skip
    policy = evaluate(SHAPES[None], steep, compress=None, resident_layers=8, prefetch=0,
                      micro_batch=1, batch=1, context=16)  # fmt: skip
    assert 0 < policy.predicted_tokens_per_s < float("inf")


def test_evaluate_memory_and_io_bound_by_hand():
    from rlhf_fast.offload.policy import decode_activations, prefill_activations

    shape = SHAPES[None]
    policy = evaluate(shape, CALIBRATION, compress=None, resident_layers=3, prefetch=2,
                      micro_batch=2, batch=4, context=512, prompt=16)  # fmt: skip
    activations = max(decode_activations(shape, 2, 4), prefill_activations(shape, 2, 4, 16))
    assert activations < prefill_activations(shape, 2, 4, 512)  # the prompt bound matters
    expected = 50_000_000 + (3 + 3) * 100_000_000 + 4 * 512 * 1000 + activations
    assert policy.memory_bytes == expected
    # 5 streamed layers of 100 MB at 1 GB/s: 0.5 s of reads per step for 4 tokens
    assert policy.io_bound_tokens_per_s == pytest.approx(4 / 0.5)


def test_a_compute_bound_step_on_every_core_pays_the_readers_cpu():
    from dataclasses import replace

    stall = 0.05 / SHAPES[None].layer_bytes  # 50 ms of the reader's CPU per layer read
    every = replace(_timed_with(2, 1.0, read_cpu=stall), disk_bandwidth=1e10)  # reads 10 ms
    kwargs = dict(compress=None, prefetch=1, micro_batch=1, batch=1, context=16)
    streamed = evaluate(SHAPES[None], every, resident_layers=0, **kwargs)
    assert 1 / streamed.predicted_tokens_per_s == pytest.approx(
        8 * (0.011 + 0.05) + 0.0011, rel=1e-3
    )
    spare = evaluate(SHAPES[None], replace(every, threads=1), resident_layers=0, **kwargs)
    assert 1 / spare.predicted_tokens_per_s == pytest.approx(8 * 0.011 + 0.0011, rel=1e-3)


def test_search_edges_pinned_micro_batch_no_resident_layer_exact_budget_and_the_error():
    from rlhf_fast.offload.policy import format_size

    dense = {None: SHAPES[None]}
    pinned = choose_policy(dense, CALIBRATION, cpu_budget=10**10, batch=8, context=16,
                           fixed={"micro_batch": 16})  # fmt: skip
    assert pinned.micro_batch == 8  # never larger than the batch
    # 50 MB + one 100 MB slot fits 200 MB; a resident layer needs a second 100 MB
    none = choose_policy(dense, CALIBRATION, cpu_budget=200_000_000, batch=1, context=16)
    assert none.resident_layers == 0 and none.prefetch == 0
    fixed = {"compress": None, "resident_layers": 2, "prefetch": 1, "micro_batch": 1}
    exact = evaluate(SHAPES[None], CALIBRATION, compress=None, resident_layers=2, prefetch=1,
                     micro_batch=1, batch=1, context=16).memory_bytes  # fmt: skip
    assert choose_policy(dense, CALIBRATION, cpu_budget=exact, context=16, fixed=fixed)
    with pytest.raises(ValueError, match="too small"):
        choose_policy(dense, CALIBRATION, cpu_budget=exact - 1, context=16, fixed=fixed)
    smallest = min(
        evaluate(shape, CALIBRATION, compress=bits, resident_layers=0, prefetch=0, micro_batch=1,
                 batch=1, context=512).memory_bytes
        for bits, shape in SHAPES.items()
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"needs {format_size(smallest)}"):
        choose_policy(SHAPES, CALIBRATION, cpu_budget=10_000_000, batch=1)


def test_model_shapes_count_the_quantized_layer():
    import copy

    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlhf_fast.quant import quantize_model

    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
    )  # fmt: skip
    shapes = model_shapes(config, torch.float32)
    assert (shapes[None].hidden, shapes[None].intermediate, shapes[None].vocab) == (256, 512, 1000)
    assert shapes[None].kv_bytes_per_token == 2 * 2 * 2 * 32 * 4  # head_dim from the config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for bits in (8, 4):
        layer = quantize_model(copy.deepcopy(model), bits, 32).model.layers[0]
        actual = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        assert shapes[bits].layer_bytes == actual, bits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_model_shapes_count_exactly_what_prepare_writes(tmp_path, family, group_size):
    """The policy's layer bytes are those of the prepared shards, to the byte: odd widths (the
    int4 codes padded to whole groups) and GPT-2's Conv1D ([in, out], quantized transposed)."""
    import json

    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from rlhf_fast.offload import prepare_offload

    if family == "llama":
        config = LlamaConfig(
            vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        )  # fmt: skip
    else:
        config = GPT2Config(vocab_size=300, n_embd=96, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    shapes = model_shapes(config, torch.float32, group_size=group_size)
    for bits in (None, 8, 4):
        out = prepare_offload(model, tmp_path / f"{bits}", compress=bits, group_size=group_size)
        written = json.loads((out / "offload.json").read_text())["layer_bytes"]
        assert written == [shapes[bits].layer_bytes] * 2, bits


def test_calibration_coefficients_follow_the_timed_points(monkeypatch):
    from transformers import LlamaConfig

    from rlhf_fast.offload import policy as policy_module

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    # the layer (inside, the rest of the forward) at 2 and 8 rows
    layer = iter([(0.004, 0.0005), (0.010, 0.0007)])
    monkeypatch.setattr(policy_module, "_layer_share_seconds", lambda *a: next(layer))
    # the head at 2 and 8 rows, the attention at 64 and 64 + 1024
    times = iter([0.0003, 0.0009, 0.020, 0.020 + 16 * 1024 * 1e-7])
    monkeypatch.setattr(policy_module, "_median_seconds", lambda fn, repeats: next(times))
    fields = policy_module.calibrate_compute(
        config, torch.float32, compressions=(None,), rows=(2, 8), context=64, threads=1
    )
    assert fields["layer_per_row"]["none"] == pytest.approx(0.001)
    assert fields["layer_fixed"]["none"] == pytest.approx(0.002)
    assert fields["head_per_row"] == pytest.approx(0.0001)
    assert fields["head_fixed"] == pytest.approx(0.0001)
    assert fields["attention_per_position"] == pytest.approx(1e-7)
    assert fields["forward_fixed"] == pytest.approx(0.0006)  # the median of the rests
    # a thread count given twice is timed once
    monkeypatch.setattr(policy_module, "calibrate_compute", lambda *a, **k: fields)
    monkeypatch.setattr(policy_module, "measure_disk_read", lambda *a: (1e9, 0.0))
    twice = policy_module.calibrate(config, torch.float32, ".", threads=(1, 1))
    assert [c.threads for c in twice.per_thread_count()] == [1]


def test_a_policy_with_every_layer_resident_says_it_reads_nothing():
    resident = evaluate(SHAPES[4], CALIBRATION, compress=4, resident_layers=8, prefetch=0,
                        micro_batch=1, batch=1, context=16)  # fmt: skip
    assert (
        "(no I/O: every layer resident)" in resident.describe() and "inf" not in resident.describe()
    )
    streamed = evaluate(SHAPES[4], CALIBRATION, compress=4, resident_layers=7, prefetch=1,
                        micro_batch=1, batch=1, context=16)  # fmt: skip
    assert f"(I/O bound {streamed.io_bound_tokens_per_s:.2f})" in streamed.describe()


def test_offload_spec_edges_all_resident_rounded_shares_and_compress_auto():
    assert parse_offload("resident=32", 32) == {"resident_layers": 32}
    assert parse_offload("resident=100%", 32) == {"resident_layers": 32}
    assert parse_offload("resident=66%", 3) == {"resident_layers": 2}  # 1.98: the nearest
    assert parse_offload("compress=auto,prefetch=1", 8) == {"prefetch": 1}


def test_the_calibration_cache_key_and_a_corrupt_cache(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from rlhf_fast.offload import session

    def config(**changes):
        fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        return LlamaConfig(**{**fields, **changes})

    key = session._measured_for(config(), torch.float32, (None,))
    # one layer is timed: the depth does not matter, the width does
    assert session._measured_for(config(num_hidden_layers=7), torch.float32, (None,)) == key
    assert session._measured_for(config(hidden_size=128), torch.float32, (None,)) != key
    monkeypatch.setattr(session, "candidate_threads", lambda: (1, 2, 3))
    assert session._measured_for(config(), torch.float32, (None,)) != key  # other thread counts
    # a cache that is not JSON is measured again, not an error
    (tmp_path / "calibration.json").write_text("{not json")
    monkeypatch.setattr(session, "calibrate", lambda *a, **k: CALIBRATION)
    assert session._calibration(tmp_path, config(), torch.float32, (None,)) == CALIBRATION


def test_the_layer_share_is_the_layers_own_time_not_the_forwards():
    import time as clock

    from rlhf_fast.offload.policy import _layer_share_seconds

    class Layer(torch.nn.Module):
        def forward(self, x):
            clock.sleep(0.05)
            return x

    class Model(torch.nn.Module):
        config = type("Config", (), {"num_hidden_layers": 1})()

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

        def forward(self, x):
            clock.sleep(0.05)  # the embedding, mask and head of a real forward
            return self.layers[0](x)

    model = Model()
    inside, outside = _layer_share_seconds(model, lambda: model(torch.ones(1)), repeats=2)
    # the whole forward takes >= 0.1 s: the layer's share must exclude the other 0.05 s
    assert 0.05 <= inside < 0.095 and outside >= 0.05
    assert not model.layers[0]._forward_hooks and not model.layers[0]._forward_pre_hooks


def test_the_forwards_own_work_is_charged_once_per_micro_batch():
    from dataclasses import replace

    kwargs = dict(compress=4, resident_layers=8, prefetch=0, batch=8, context=16)
    for micro_batch in (8, 2):
        plain = evaluate(SHAPES[4], CALIBRATION, micro_batch=micro_batch, **kwargs)
        charged = evaluate(
            SHAPES[4], replace(CALIBRATION, forward_fixed=0.003), micro_batch=micro_batch, **kwargs
        )
        blocks = 8 // micro_batch
        step = 8 / plain.predicted_tokens_per_s
        assert 8 / charged.predicted_tokens_per_s == pytest.approx(step + 0.003 * blocks)


def test_contexts_shorter_than_the_calibrated_one_cost_the_calibrated_time():
    from dataclasses import replace

    timed = replace(CALIBRATION, attention_per_position=1e-6, context=64)
    kwargs = dict(compress=4, resident_layers=8, prefetch=0, micro_batch=8, batch=8)
    at = {context: evaluate(SHAPES[4], timed, context=context, **kwargs).predicted_tokens_per_s
          for context in (8, 64, 1064)}  # fmt: skip
    assert at[8] == at[64]  # no credit below the timed context
    step_64, step_1064 = 8 / at[64], 8 / at[1064]
    assert step_1064 - step_64 == pytest.approx(8 * 8 * 1000 * 1e-6)  # layers x rows x positions


def test_the_disk_is_measured_one_request_per_file_as_the_streamer_reads(tmp_path, monkeypatch):
    from rlhf_fast.offload import policy as policy_module

    path = tmp_path / "layer.bin"
    path.write_bytes(os.urandom((65 << 20) + 100))  # over the temporary file's 64 MiB requests
    requests = []
    real = os.preadv

    def counted(fd, buffers, offset):
        requests.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(policy_module.os, "preadv", counted)
    bandwidth, _ = policy_module.measure_disk_read(tmp_path, [str(path)])
    assert bandwidth > 0
    if requests:  # O_DIRECT (else a buffered read, which this file system forced)
        assert requests == [0]
