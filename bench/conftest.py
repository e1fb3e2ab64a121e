"""pytest-benchmark plumbing shared by bench/test_bench_*.py.

Each benchmark records which op, device, size and provider it measured (in `extra_info`, so
saved runs keep it too) and belongs to the group "<op> <device> <size>", so pytest-benchmark's
own tables put every provider of one size side by side. At the end of the session one more
table gives each group's medians and the ratios that matter: how many times slower the
reference, the peer and the vectorized PyTorch versions are than the fast backend, and how
close the fast backend comes to a memcpy of the same bytes.

Quick mode (`--bench-quick` or RLHF_FAST_BENCH_QUICK=1) drops the sizes marked `bench_full`
(every size but the smallest of each op) and times a few rounds, for CI.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

QUICK_ENV = "RLHF_FAST_BENCH_QUICK"
# A call slower than this is timed with a fixed, small number of rounds (the Python loops of
# the peers at T=4096 or B=1024 take tenths of a second to seconds per call).
SLOW_CALL_S = 0.05
# RLHF_FAST_BENCH_SLOW_ROUNDS=N: more rounds for them, where run-to-run spread matters (PPO).
SLOW_ROUNDS = int(os.environ.get("RLHF_FAST_BENCH_SLOW_ROUNDS", "3"))
FEW_ROUNDS = 3  # a median of this many rounds or fewer is marked "~" (approximate)
QUICK_ROUNDS = 5
QUICK_ROUND_S = 0.002  # quick mode: iterations per round chosen to fill about this long
# Above this share of the CPUs taken by other processes, the summary warns that its medians are
# unreliable: on a 2-core machine, torch's 2 intra-op threads then wait on the scheduler.
BUSY_WARNING_SHARE = 0.10
_CPU_AT_START = pytest.StashKey[tuple]()

FAST_PROVIDERS = ("cpp", "cuda", "triton")
# Column order of the summary; the ratios are other / fast, except memcpy / fast. The "peer"
# column is the fastest provider named "peer" or "peer-<variant>".
OTHER_PROVIDERS = ("reference", "peer", "vectorized", "memcpy")
# The group whose bytes_moved / median is the machine's read bandwidth (see test_bench_quant).
READ_BANDWIDTH_OP = "read_bandwidth"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help=f"benchmarks: only the smallest size of each, few rounds (or {QUICK_ENV}=1)",
    )


def quick_mode(config: pytest.Config) -> bool:
    from_env = os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(config.getoption("--bench-quick")) or from_env


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bench_full: a benchmark size that quick mode (--bench-quick) leaves out"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Quick mode: deselect the sizes marked bench_full (all but the smallest of each op)."""
    if not quick_mode(config):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("bench_full") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _machine_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait; the rest (steal included) was someone's work
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CPU_AT_START] = (
        time.perf_counter(),
        _machine_cpu_seconds(),
        time.process_time(),
    )


def _other_processes_share(config: pytest.Config) -> float | None:
    """The share of the machine's CPUs that other processes used during this session."""
    wall_start, machine_start, own_start = config.stash.get(_CPU_AT_START, (None,) * 3)
    machine_now = _machine_cpu_seconds()
    if machine_start is None or machine_now is None:
        return None
    wall = time.perf_counter() - wall_start
    others = (machine_now - machine_start) - (time.process_time() - own_start)
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def _synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device != "cuda":
        return fn

    def run() -> object:
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def _seconds_per_call(fn: Callable[[], object]) -> float:
    """A rough time per call that picks how to time `fn`; the first call doubles as warm-up,
    and a slow first call is timed again, so one-time costs cannot make it look slow."""
    seconds = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
        if seconds <= SLOW_CALL_S:
            break
    return seconds


@pytest.fixture
def measure(benchmark, request: pytest.FixtureRequest):
    """measure(fn, op=, device=, size=, provider=, bytes_moved=None, weight_bytes=None,
    tokens=None): time `fn()` (inputs already built) in the group "<op> <device> <size>";
    bytes_moved gives a GB/s column; weight_bytes (the provider's weight bytes read per call)
    puts the group in the weight-streaming table, with GB/s and the share of the measured read
    bandwidth; tokens (tokens processed per call) puts it in the throughput table (tokens/s)."""
    quick = quick_mode(request.config)

    def run(
        fn: Callable[[], object],
        *,
        op: str,
        device: str,
        size: str,
        provider: str,
        bytes_moved: int | None = None,
        weight_bytes: int | None = None,
        tokens: int | None = None,
    ) -> object:
        benchmark.group = f"{op} {device} {size}"
        benchmark.extra_info.update(op=op, device=device, size=size, provider=provider)
        if bytes_moved is not None:
            benchmark.extra_info["bytes_moved"] = bytes_moved
        if weight_bytes is not None:  # a weight-streaming op: goes to the second table
            benchmark.extra_info["weight_bytes"] = weight_bytes
        if tokens is not None:  # a throughput benchmark: goes to the tokens/s table
            benchmark.extra_info["tokens"] = tokens
        timed = _synchronized(fn, device)
        seconds = _seconds_per_call(timed)
        if seconds > SLOW_CALL_S:
            return benchmark.pedantic(timed, rounds=SLOW_ROUNDS, iterations=1)
        if quick:
            iterations = max(1, int(QUICK_ROUND_S / max(seconds, 1e-7)))
            return benchmark.pedantic(
                timed, rounds=QUICK_ROUNDS, iterations=iterations, warmup_rounds=1
            )
        return benchmark(timed)

    return run


# --------------------------------------------------------------------------------------------
# The summary table
# --------------------------------------------------------------------------------------------


def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    ratio = numerator / denominator
    return f"{ratio:.3g}x" if ratio < 1000 else f"{ratio:.0f}x"


@dataclass
class _Group:
    """One (op, device, size): each provider's (median seconds, rounds), the op's bytes."""

    medians: dict[str, tuple[float, int]] = field(default_factory=dict)
    bytes_moved: float | None = None
    weight_bytes: dict[str, float] = field(default_factory=dict)  # per provider
    tokens: dict[str, float] = field(default_factory=dict)  # per provider, per call


def _collect(benchmarks) -> dict[tuple[str, str, str], _Group]:
    """(op, device, size) -> its _Group, in the order the benchmarks ran."""
    groups: dict[tuple[str, str, str], _Group] = {}
    for bench in benchmarks:
        info = getattr(bench, "extra_info", None) or {}
        if "provider" not in info or not bench or bench.has_error:
            continue
        group = groups.setdefault((info["op"], info["device"], info["size"]), _Group())
        group.medians[info["provider"]] = (bench.stats.median, bench.stats.rounds)
        if "bytes_moved" in info:
            group.bytes_moved = float(info["bytes_moved"])
        if "weight_bytes" in info:
            group.weight_bytes[info["provider"]] = float(info["weight_bytes"])
        if "tokens" in info:
            group.tokens[info["provider"]] = float(info["tokens"])
    return groups


def _median_cell(group: _Group, provider: str | None) -> str:
    if provider not in group.medians:
        return "-"
    median, rounds = group.medians[provider]
    # "~": few rounds (a slow provider); read that median as approximate.
    return _format_time(median) + (" ~" if rounds <= FEW_ROUNDS else "")


def _summary_rows(groups: dict[tuple[str, str, str], _Group]) -> list[list[str]]:
    rows = []
    for (op, device, size), group in groups.items():
        if group.weight_bytes or group.tokens or op == READ_BANDWIDTH_OP:
            continue  # in the weight-streaming or the throughput table
        medians = {provider: median for provider, (median, _) in group.medians.items()}
        fast_name = min(
            (p for p in FAST_PROVIDERS if p in medians), key=medians.__getitem__, default=None
        )
        fast = medians.get(fast_name)
        bandwidth = group.bytes_moved / fast / 1e9 if group.bytes_moved and fast else None
        # "peer" stands for the strongest of the op's peers ("peer", "peer-<variant>"), named
        # when it is a variant: the headline ratio is never the one against a weaker peer.
        peer_name = min(
            (p for p in medians if p == "peer" or p.startswith("peer-")),
            key=medians.__getitem__,
            default="peer",
        )
        shown = {provider: provider for provider in OTHER_PROVIDERS} | {"peer": peer_name}
        peer_cell = _median_cell(group, peer_name)
        if peer_name != "peer":
            peer_cell += f" {peer_name}"
        rows.append(
            [
                op,
                device,
                size,
                f"{_median_cell(group, fast_name)} {fast_name}" if fast_name else "-",
                *(
                    peer_cell if provider == "peer" else _median_cell(group, provider)
                    for provider in OTHER_PROVIDERS
                ),
                *(_format_ratio(medians.get(shown[p]), fast) for p in OTHER_PROVIDERS),
                "-" if bandwidth is None else f"{bandwidth:.1f}",
            ]
        )
    return rows


_HEADER = [
    "op",
    "device",
    "size",
    "fast",
    "reference",
    "peer",
    "vectorized",
    "memcpy",
    "ref/fast",
    "peer/fast",
    "vec/fast",
    "memcpy/fast",
    "fast GB/s",
]


def _read_bandwidth(groups: dict[tuple[str, str, str], _Group]) -> float | None:
    for (op, _, _), group in groups.items():
        if op == READ_BANDWIDTH_OP and group.bytes_moved and group.medians:
            return group.bytes_moved / min(m for m, _ in group.medians.values())
    return None


def _write_weight_table(write, groups: dict[tuple[str, str, str], _Group]) -> None:
    """One line per (size, provider) of weight-streaming ops: median, GB/s of weight bytes,
    share of the measured read bandwidth, and speed relative to the group's first provider."""
    read_bandwidth = _read_bandwidth(groups)
    header = ["op", "device", "size", "provider", "median", "weight GB/s", "% read bw", "speedup"]
    rows = []
    for (op, device, size), group in groups.items():
        if not group.weight_bytes:
            continue
        baseline = next(iter(group.medians.values()))[0]
        for provider, (median, _) in group.medians.items():
            weight = group.weight_bytes.get(provider)
            gbps = weight / median / 1e9 if weight else None
            share = weight / median / read_bandwidth if weight and read_bandwidth else None
            rows.append([
                op, device, size, provider, _median_cell(group, provider),
                "-" if gbps is None else f"{gbps:.1f}",
                "-" if share is None else f"{share:.0%}",
                _format_ratio(baseline, median),
            ])  # fmt: skip
    if not rows:
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    bandwidth = "not measured" if read_bandwidth is None else f"{read_bandwidth / 1e9:.1f} GB/s"
    write(f"Weight-streaming ops (read bandwidth measured in this run: {bandwidth}; speedup is")
    write("relative to the first provider of each size):")
    for row in [header, *rows]:
        write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _write_throughput_table(write, groups: dict[tuple[str, str, str], _Group]) -> None:
    """One line per (size, provider) of throughput benchmarks: median, tokens/s, and speed
    relative to the group's first provider."""
    header = ["op", "device", "size", "provider", "median", "tokens/s", "speedup"]
    rows = []
    for (op, device, size), group in groups.items():
        if not group.tokens:
            continue
        baseline = next(iter(group.medians.values()))[0]
        for provider, (median, _) in group.medians.items():
            tokens = group.tokens.get(provider)
            rows.append([
                op, device, size, provider, _median_cell(group, provider),
                "-" if tokens is None else f"{tokens / median:.0f}",
                _format_ratio(baseline, median),
            ])  # fmt: skip
    if not rows:
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    write("Throughput (speedup is relative to the first provider of each size):")
    for row in [header, *rows]:
        write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _write_elementwise_table(write, rows: list[list[str]]) -> None:
    write(
        "x/fast: how many times slower x is than the fastest fast backend (higher is better "
        "for us);"
    )
    write(
        "memcpy/fast: a copy of the op's bytes (read + written) over the fast time, 1.0 = "
        "at the copy's speed (the memory limit; the cache's where the op's tensors fit in it, "
        "as every GAE size does in a 300 MiB L3). '~': median of only a few rounds (slow "
        "provider)."
    )
    widths = [max(len(row[i]) for row in [_HEADER, *rows]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        write("  ".join(cells).rstrip())


def _write_summary(terminalreporter, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups = _collect(session.benchmarks)
    rows = _summary_rows(groups)
    if not rows and not any(g.weight_bytes or g.tokens for g in groups.values()):
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "rlhf_fast: median time per call, and ratios")
    write(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads.")
    if rows:
        _write_elementwise_table(write, rows)
    _write_weight_table(write, groups)
    _write_throughput_table(write, groups)
    share = _other_processes_share(config)
    if share is not None:
        write(f"Other processes used {share:.0%} of the {os.cpu_count()} CPUs during this session.")
        if share > BUSY_WARNING_SHARE:
            write(
                "WARNING: the machine was busy; multi-threaded providers stall waiting for a "
                "core, so these medians are unreliable. Rerun on a quiet machine."
            )


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # A wrapper, so the table comes after pytest-benchmark's own tables, and still appears
    # when its --benchmark-compare-fail check raises.
    try:
        return (yield)
    finally:
        _write_summary(terminalreporter, config)
