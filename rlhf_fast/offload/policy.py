"""Offload policy: choose resident layers, compression, prefetch depth and micro-batching.

The cost model of one decode step (one new token for each of B sequences):
  * compute: per layer and micro-batch, t_layer(mb): one real decoder layer of the model's shape
    timed at 1, 8, 16, 32, 64 and 128 decode rows (per compression; int4 also under the int4
    activation rule, quant/activations.py, from its threshold up), interpolated piecewise
    between them, plus the attention's cost per row and cached position beyond the timed
    context (64), times the number of micro-batches; plus the lm_head once over the batch
    (timed at the same row counts; for int4 models under the rule, whose dense head follows
    it too, timed that way from the threshold up); plus, once per micro-batch, the forward's
    work outside the layers (embedding, mask, rotary, final norm: `forward_fixed`);
  * I/O: each streamed layer is read once per step (the block schedule), bytes / disk bandwidth;
  * threads: the compute is timed at one fewer intra-op thread than torch has (the reader keeps
    a core) and at all of them, where each streamed layer's compute is also charged the CPU
    time the reader spends on its read (Calibration.with_threads; the search tries both);
  * overlap: an event simulation of the streamer (one reader thread; a read starts once a slot
    is free and the compute is within `prefetch` streamed layers of it; a layer's compute
    waits for its read), run for a few steps; the last step's duration is the prediction.
Memory that must fit the CPU budget: non-layer weights, resident layers, prefetch + 1 slot
buffers, the KV cache of the whole batch, the larger of a decode step's and the prefill's
activations (`decode_activations`, `prefill_activations`: prompts of up to `prompt` tokens,
default `context`), and under the rule the head's bf16 weight copy once the batch reaches the
threshold.
The page cache is not counted (the streamer evicts what it reads in the true-disk regime).
`choose_policy` searches a coarse grid exhaustively and returns the best predicted policy.

int4 candidates follow the int4 activation rule (products of >= BF16_ROWS rows on bf16
activations) unless it is pinned off (`fixed["bf16_rows"] = None`: `--offload act=fp32`, and
training); their micro-batches then keep every product on the whole batch's side of the
threshold (activations.same_side), so that the streamed outputs equal the resident model's.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from rlhf_fast.offload.shards import drop_page_cache
from rlhf_fast.quant.activations import BF16_ROWS, same_side

COMPRESSIONS = (None, 8, 4)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20}
_UNITS.update({"g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40})


def format_size(size: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 2GiB, 1500MB, 4G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_max_memory(text: str) -> dict[str, int]:
    """'cpu=2GiB,device=10GiB' -> {'cpu': 2147483648, 'device': 10737418240}."""
    budgets = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tier, sep, size = item.partition("=")
        tier = tier.strip()
        if not sep or tier not in ("cpu", "device"):
            raise ValueError(f"--max-memory: {item!r} is not cpu=SIZE or device=SIZE")
        if tier in budgets:
            raise ValueError(f"--max-memory: {tier} is given twice in {text!r}")
        try:
            budgets[tier] = parse_size(size)
        except ValueError as error:
            raise ValueError(f"--max-memory: {tier}={error}") from None
    if not budgets:
        raise ValueError("--max-memory: give at least cpu=SIZE")
    return budgets


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model, for one compression."""

    num_layers: int
    layer_bytes: int  # one decoder layer's weights as streamed
    other_bytes: int  # embeddings, final norm, lm_head (always resident)
    kv_bytes_per_token: int  # all layers, keys and values, one sequence position
    hidden: int
    intermediate: int
    vocab: int
    kv_element_size: int = 4  # bytes of one cached key or value number, uncompressed


@dataclass(frozen=True)
class Calibration:
    """Measured speeds: t_layer(mb) = layer_fixed + layer_per_row * mb seconds, per compression
    (keys "none", "int8", "int4"); the same for lm_head; disk read bandwidth in bytes/s.

    `layer_points` (when a compression has them): [rows, seconds] measured at several row
    counts, interpolated piecewise-linearly instead of the straight line (the kernels change
    method with the row count: register-dequantizing GEMV-like up to 63 rows, dequantized
    tiles and a GEMM from 64). `threads`: torch's intra-op threads the compute was timed with
    (generate_batch's while layers stream: one fewer than the machine's). `head_points`: the
    lm_head's [rows, seconds], interpolated the same way (else its straight line);
    `head_points_bf16` the same under the int4 activation rule (its rows from the threshold).
    `attention_per_position`: the seconds a decoder layer's attention adds per row and cached
    position beyond `context` (the KV length the layer was timed at; HF's GQA attention
    expands the cache to every query head, so long contexts cost memory traffic too).
    A cached calibration of another `version` is measured again (offload/session.py)."""

    disk_bandwidth: float
    layer_fixed: dict[str, float]
    layer_per_row: dict[str, float]
    head_fixed: float
    head_per_row: float
    layer_points: dict[str, list[list[float]]] = field(default_factory=dict)
    threads: int = 0
    head_points: list[list[float]] = field(default_factory=list)
    attention_per_position: float = 0.0
    context: int = 64
    head_points_bf16: list[list[float]] = field(default_factory=list)
    version: int = 0  # CALIBRATION_VERSION of the code that measured it (0: older than that)
    cores: int = 0  # torch's intra-op threads before the calibration capped them
    read_cpu_per_byte: float = 0.0  # CPU seconds the reading thread spent per byte read
    # the forward's work outside its decoder layers (embedding, mask, rotary, final norm), which
    # the block schedule does once per micro-batch and step, not once per layer
    forward_fixed: float = 0.0
    # the same model's compute timed with other thread counts (same disk figures): one more
    # dimension of the policy search, choose_policy tries each
    with_threads: list[Calibration] = field(default_factory=list)

    def per_thread_count(self) -> list[Calibration]:
        return [self, *self.with_threads]

    @classmethod
    def from_dict(cls, fields: dict) -> Calibration:
        """The inverse of dataclasses.asdict (a cached calibration.json)."""
        nested = [cls.from_dict(other) for other in fields.get("with_threads", ())]
        return cls(**{**fields, "with_threads": nested})

    def shares_a_core_with_the_reader(self) -> bool:
        """Compute on every core: the reading thread's CPU time then preempts a compute
        thread, and torch's parallel regions wait for their slowest thread."""
        return self.cores > 0 and self.threads >= self.cores


def compression_name(bits: int | None) -> str:
    return "none" if bits is None else f"int{bits}"


@dataclass(frozen=True)
class Policy:
    compress: int | None
    resident_layers: int
    prefetch: int
    micro_batch: int
    batch: int
    predicted_tokens_per_s: float = 0.0
    memory_bytes: int = 0
    io_bound_tokens_per_s: float = float("inf")
    details: dict = field(default_factory=dict, compare=False)
    kv_bits: int | None = None  # 4: KV cache held 4-bit group-wise (offload/kv_cache.py)
    bf16_rows: int | None = None  # int4 activation rule: products of >= this many rows on bf16
    threads: int = 0  # torch's intra-op threads for the compute (0: generate_batch's default)

    def describe(self) -> str:
        blocks = -(-self.batch // self.micro_batch)
        return (
            f"compress={compression_name(self.compress)} resident_layers={self.resident_layers} "
            f"prefetch={self.prefetch} micro_batch={self.micro_batch} x {blocks} per block "
            f"(batch {self.batch})"
            + (f" threads={self.threads}" if self.threads else "")
            + f"; memory {format_size(self.memory_bytes)}; predicted "
            f"{self.predicted_tokens_per_s:.2f} tokens/s "
            + (
                f"(I/O bound {self.io_bound_tokens_per_s:.2f})"
                if math.isfinite(self.io_bound_tokens_per_s)
                else "(no I/O: every layer resident)"
            )
            + (" kv=int4" if self.kv_bits == 4 else "")
            + (f" act=bf16 (int4 products of >= {self.bf16_rows} rows)" if self.bf16_rows else "")
        )

    def as_dict(self) -> dict:
        return asdict(self)


def simulate_step(
    compute: list[float], read: list[float | None], prefetch: int, steps: int = 3
) -> float:
    """Seconds of the last of `steps` decode steps (see the module docstring)."""
    streamed = [i for i, r in enumerate(read) if r is not None]
    now, reader_free = 0.0, 0.0
    acquire_at: dict[tuple[int, int], float] = {}
    release_at: dict[tuple[int, int], float] = {}
    ready: dict[tuple[int, int], float] = {}
    order = [(s, i) for s in range(steps) for i in streamed]
    position = {key: k for k, key in enumerate(order)}
    step_start = 0.0

    def issue(key: tuple[int, int]) -> None:
        nonlocal reader_free
        k = position[key]
        gates = [reader_free]
        if prefetch == 0:
            gates.append(acquire_at[key])
        else:
            if k - prefetch - 1 >= 0:
                gates.append(release_at[order[k - prefetch - 1]])
            if k - prefetch >= 0:
                gates.append(acquire_at[order[k - prefetch]])
        start = max(gates)
        reader_free = start + read[key[1]]
        ready[key] = reader_free

    issued = 0
    for step in range(steps):
        step_start = now
        for index, seconds in enumerate(compute):
            key = (step, index)
            if read[index] is not None:
                acquire_at[key] = now
                # issue every read whose gates are known by now, in order
                while issued < len(order):
                    k_key = order[issued]
                    needed = [order[issued - prefetch - 1]] if issued - prefetch - 1 >= 0 else []
                    gate_acquire = order[issued - prefetch] if issued - prefetch >= 0 else None
                    if prefetch == 0:
                        gate_acquire = k_key
                    if gate_acquire is not None and gate_acquire not in acquire_at:
                        break
                    if any(n not in release_at for n in needed):
                        break
                    issue(k_key)
                    issued += 1
                now = max(now, ready[key])
            now += seconds
            if read[index] is not None:
                release_at[key] = now
    return now - step_start


BF16 = "-bf16"  # the calibration key suffix of int4 layers timed with bf16 activations


def layer_time(
    calibration: Calibration, compress: int | None, micro_batch: int, bf16_rows: int | None = None
) -> float:
    """Seconds of one decoder layer on `micro_batch` decode rows (see Calibration); with
    `bf16_rows` (int4 only: the activation rule's threshold) the bf16-activation timing from
    that many rows up."""
    name = compression_name(compress)
    bf16 = name + BF16
    if (
        compress == 4
        and bf16_rows
        and micro_batch >= bf16_rows
        and bf16 in calibration.layer_points
    ):
        name = bf16
    points = sorted(calibration.layer_points.get(name) or [])
    if len(points) < 2:
        return calibration.layer_fixed[name] + calibration.layer_per_row[name] * micro_batch
    return _interpolate(points, micro_batch)


def head_time(calibration: Calibration, rows: int, bf16_rows: int | None = None) -> float:
    """Seconds of the lm_head on `rows` rows (see Calibration); with `bf16_rows` (an int4 model
    under the activation rule) its bf16 timing from that many rows up."""
    if bf16_rows and rows >= bf16_rows and len(calibration.head_points_bf16) >= 2:
        return _interpolate(sorted(calibration.head_points_bf16), rows)
    if len(calibration.head_points) < 2:
        return calibration.head_fixed + calibration.head_per_row * rows
    return _interpolate(sorted(calibration.head_points), rows)


def _interpolate(points: list[list[float]], rows: int) -> float:
    """Piecewise-linear through [rows, seconds] points (the first or last segment extended)."""
    index = 1
    while index < len(points) - 1 and points[index][0] < rows:
        index += 1
    (r0, t0), (r1, t1) = points[index - 1], points[index]
    return max(t0 + (t1 - t0) * (rows - r0) / max(r1 - r0, 1e-9), 1e-6)


def decode_activations(shape: ModelShape, micro_batch: int, batch: int) -> int:
    """Bytes a decode step allocates besides weights and KV: one micro-batch's layer
    intermediates for one row each, and the step's logits (all micro-batches at once)."""
    return micro_batch * 4 * (4 * shape.hidden + 2 * shape.intermediate) + batch * 4 * shape.vocab


def prefill_activations(shape: ModelShape, micro_batch: int, batch: int, prompt: int) -> int:
    """Bytes the prefill holds at once besides weights and KV, for prompts of up to `prompt`
    tokens: every micro-batch's hidden states between layers (and a layer's output beside its
    input) and [prompt, prompt] boolean attention mask, one micro-batch's q/k/v/o and MLP
    intermediates (gate, up, their product) for all its positions, and the last positions'
    logits. Like the page cache, glibc's retention of freed blocks is not counted: measured
    here, the peak RSS growth of a streamed prefill (KV excluded) was 0.5-0.7x this at the
    1.57B model's width (tensors that large are mapped and returned) and 1.2-2.2x at hidden
    256-1024, where freed blocks stay in the heap (tests/test_offload_budget.py bounds one)."""
    states = 2 * batch * prompt * shape.hidden
    layer_call = micro_batch * prompt * (4 * shape.hidden + 3 * shape.intermediate)
    return 4 * (states + layer_call + batch * shape.vocab) + batch * prompt * prompt


def evaluate(
    shape: ModelShape,
    calibration: Calibration,
    *,
    compress: int | None,
    resident_layers: int,
    prefetch: int,
    micro_batch: int,
    batch: int,
    context: int,
    kv_bits: int | None = None,
    bf16_rows: int | None = None,
    prompt: int | None = None,
) -> Policy:
    """The predicted throughput and memory of one policy (no budget check); `prompt`: the
    longest prompt the prefill feeds at once (default `context`, what sequences grow to)."""
    from rlhf_fast.offload.model import spread

    blocks = -(-batch // micro_batch)
    layer = layer_time(calibration, compress, micro_batch, bf16_rows)
    # attention over the cached positions beyond the calibration's: the coefficient is the
    # slope from 64 to 1088 positions, where the cache streams from memory; below 64 it sits in
    # cache and costs far less (llama-12l, batch 128, 14 positions: the slope took 17.5 ms off
    # a 43.6 ms layer that ran 40 ms, and the predictions came out 1.18x the measured)
    extra = max(context - calibration.context, 0)
    layer += calibration.attention_per_position * micro_batch * extra
    per_layer = max(layer, 1e-6) * blocks
    resident = spread(resident_layers, shape.num_layers)
    read_seconds = shape.layer_bytes / calibration.disk_bandwidth
    reads = [None if i in resident else read_seconds for i in range(shape.num_layers)]
    compute = [per_layer] * shape.num_layers
    if calibration.shares_a_core_with_the_reader():  # each read stalls the compute it overlaps
        stall = shape.layer_bytes * calibration.read_cpu_per_byte
        compute = [per_layer + (0.0 if r is None else stall) for r in reads]
    step = simulate_step(compute, reads, prefetch)
    rule = bf16_rows if compress == 4 else None
    step += head_time(calibration, batch, rule)  # once over the batch
    step += calibration.forward_fixed * blocks
    streamed = shape.num_layers - len(resident)
    slots = min(prefetch + 1, streamed)
    activations = max(
        decode_activations(shape, micro_batch, batch),
        prefill_activations(shape, micro_batch, batch, context if prompt is None else prompt),
    )
    kv_share = 1.0
    if kv_bits == 4:
        from rlhf_fast.offload.kv_cache import compressed_fraction

        kv_share = compressed_fraction(shape.kv_element_size)
    head_copy = shape.vocab * shape.hidden * 2 if rule and batch >= rule else 0
    memory = (
        shape.other_bytes
        + head_copy
        + (len(resident) + slots) * shape.layer_bytes
        + batch * context * shape.kv_bytes_per_token * kv_share
        + activations
    )
    io_seconds = streamed * read_seconds
    return Policy(
        compress, len(resident), prefetch, micro_batch, batch,
        predicted_tokens_per_s=batch / step, memory_bytes=int(memory),
        io_bound_tokens_per_s=batch / io_seconds if io_seconds else float("inf"),
        kv_bits=kv_bits, bf16_rows=rule, threads=calibration.threads,
    )  # fmt: skip


def candidate_micro_batches(batch: int) -> list[int]:
    sizes = {batch}
    size = 1
    while size < batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def choose_policy(
    shapes: dict[int | None, ModelShape],
    calibration: Calibration,
    *,
    cpu_budget: int,
    batch: int = 1,
    context: int = 512,
    prefetch_choices: tuple[int, ...] = (0, 1, 2, 4),
    fixed: dict | None = None,
    prompt: int | None = None,
) -> Policy:
    """The best predicted policy that fits `cpu_budget`, over the compressions of `shapes`
    and the thread counts `calibration` timed (Calibration.per_thread_count); `fixed` pins
    some fields (explicit flags: compress, resident_layers, prefetch, micro_batch, kv_bits,
    threads, bf16_rows: None turns the int4 activation rule off); `prompt` bounds the prefill
    (evaluate). ValueError when none fits."""
    fixed = fixed or {}
    timed = calibration.per_thread_count()
    if "threads" in fixed:
        timed = [c for c in timed if c.threads == fixed["threads"]]
        if not timed:
            counts = ", ".join(str(c.threads) for c in calibration.per_thread_count())
            raise ValueError(f"--offload threads={fixed['threads']}: calibrated for {counts}")
    best, smallest = None, None
    for (compress, shape), timing in itertools.product(shapes.items(), timed):
        if "compress" in fixed and fixed["compress"] != compress:
            continue
        bf16_rows = fixed.get("bf16_rows", BF16_ROWS) if compress == 4 else None
        micro_batches = [min(fixed["micro_batch"], batch)] if "micro_batch" in fixed else None
        if micro_batches is None:  # exact under the activation rule (see the module docstring)
            micro_batches = [
                m for m in candidate_micro_batches(batch) if same_side(m, batch, bf16_rows)
            ]
        for prefetch in (fixed["prefetch"],) if "prefetch" in fixed else prefetch_choices:
            for micro_batch in micro_batches:
                counts = (
                    (fixed["resident_layers"],)
                    if "resident_layers" in fixed
                    else range(shape.num_layers, -1, -1)
                )
                for resident in counts:
                    policy = evaluate(
                        shape, timing, compress=compress, resident_layers=resident,
                        prefetch=prefetch, micro_batch=micro_batch, batch=batch, context=context,
                        kv_bits=fixed.get("kv_bits"), bf16_rows=bf16_rows, prompt=prompt,
                    )  # fmt: skip
                    if smallest is None or policy.memory_bytes < smallest.memory_bytes:
                        smallest = policy
                    if policy.memory_bytes > cpu_budget:
                        continue
                    if best is None or policy.predicted_tokens_per_s > best.predicted_tokens_per_s:
                        best = policy
                    break  # fewer resident layers than the most that fit is never faster
    if best is None:
        need = "nothing" if smallest is None else format_size(smallest.memory_bytes)
        raise ValueError(
            f"--max-memory cpu={format_size(cpu_budget)} is too small: the smallest policy "
            f"needs {need}"
        )
    return best


# ----------------------------------------------------------------------------- model shapes


def quantized_bytes(rows: int, columns: int, bits: int | None, group_size: int, element: int):
    """Bytes of a [rows, columns] weight as stored dense (bits None: `element` bytes each) or
    quantized (quant/weight.py): int8 codes and an fp32 scale per row; int4 codes two to a
    byte over the columns padded to whole groups, an fp16 scale and offset per group; and
    the [2] int64 shape a quantized layer keeps."""
    if bits is None:
        return rows * columns * element
    if bits == 8:
        return rows * columns + rows * 4 + 16
    groups = -(-columns // group_size)
    return rows * groups * group_size // 2 + rows * groups * 4 + 16


def model_shapes(config, dtype: torch.dtype, group_size: int = 32) -> dict[int | None, ModelShape]:
    """Per compression, the streamed bytes of a layer of `config` (built on meta: no memory)."""
    from transformers import AutoModelForCausalLM

    from rlhf_fast.offload.prepare import decoder_layers
    from rlhf_fast.quant.linear import is_quantizable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    _, layers = decoder_layers(model)
    layer = layers[0]
    element = torch.empty((), dtype=dtype).element_size()
    per_bits = {None: 0, 8: 0, 4: 0}
    other = 0
    linear_ids = set()
    for module in layer.modules():
        if is_quantizable(module):
            linear_ids.add(id(module.weight))
            rows, columns = module.weight.shape  # [out, in] (the stored [in, out] of a Conv1D
            if not isinstance(module, torch.nn.Linear):  # quantized as its [out, in] transpose)
                rows, columns = columns, rows
            for bits in per_bits:
                per_bits[bits] += quantized_bytes(rows, columns, bits, group_size, element)
    for tensor in layer.parameters():
        if id(tensor) not in linear_ids:
            other += tensor.numel() * element
    layer_params = sum(p.numel() for p in layer.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    other_bytes = (total_params - layer_params * len(layers)) * element
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv = 2 * len(layers) * kv_heads * head_dim * element
    hidden, vocab = config.hidden_size, config.vocab_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return {
        bits: ModelShape(
            len(layers),
            int(size + other),
            int(other_bytes),
            kv,
            hidden,
            intermediate,
            vocab,
            element,
        )
        for bits, size in per_bits.items()
    }


# ------------------------------------------------------------------------------ calibration


def _read_cold(path: str, buffer: torch.Tensor) -> int:
    """Reads all of `path` as the streamer reads in the true-disk regime: O_DIRECT into an
    aligned buffer (shards.read_into), else buffered with the page cache dropped first."""
    view = memoryview(buffer.numpy()).cast("B")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = None
    if fd is not None:
        total = 0
        try:
            while got := os.preadv(fd, [view], total):
                total += got
                if got < len(view):  # the end of the file (O_DIRECT reads are short only there)
                    break
            return total
        except OSError:
            if total:
                raise
        finally:
            os.close(fd)
    drop_page_cache(path)
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while got := handle.readinto(view):
            total += got
    drop_page_cache(path)
    return total


def measure_disk_bandwidth(directory: str | os.PathLike, files: list[str] | None = None) -> float:
    """Bytes/s of cold reads, made as the streamer makes them (`_read_cold`): of `files` when
    given, else of a 256 MiB temporary file written in `directory` and deleted."""
    return measure_disk_read(directory, files)[0]


def measure_disk_read(
    directory: str | os.PathLike, files: list[str] | None = None
) -> tuple[float, float]:
    """(bytes/s, CPU seconds per byte) of measure_disk_bandwidth's reads: the CPU time of the
    reading thread (O_DIRECT: ~0 s, the device copies; buffered: a copy per byte)."""
    from rlhf_fast.offload.shards import DIRECT_ALIGN, aligned_buffer

    # each file in one request, as the streamer reads a layer's file (in 64 MiB requests a
    # 256 MiB file read 6-10% slower on the dev machine); the temporary file in 64 MiB ones
    largest = max((os.path.getsize(path) for path in files or ()), default=64 << 20)
    buffer = aligned_buffer(-(-largest // DIRECT_ALIGN) * DIRECT_ALIGN)
    created = None
    try:
        if not files:
            handle, created = tempfile.mkstemp(dir=directory, suffix=".bw")
            with os.fdopen(handle, "wb") as out:  # a failed write (disk full) removes it too
                for _ in range(4):
                    out.write(os.urandom(buffer.numel()))
                out.flush()
                os.fsync(out.fileno())
            files = [created]
        total, started, cpu_started = 0, time.perf_counter(), time.thread_time()
        for path in files:
            total += _read_cold(path, buffer)
        cpu = time.thread_time() - cpu_started
        return total / (time.perf_counter() - started), cpu / max(total, 1)
    finally:
        if created:
            os.remove(created)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# 2: 9 repeats, attention over 1024 extra positions; 3: the int4 many-row kernel got faster;
# 4: the lm_head of int4 models under the activation rule runs bf16 (head_points_bf16);
# 5: timed at several thread counts (with_threads), the reader's CPU per byte;
# 6: the layer's own time (hooks), the rest of the forward as forward_fixed
CALIBRATION_VERSION = 6
ATTENTION_EXTRA = 1024  # cached positions added to time the attention's cost per position
CALIBRATION_ROWS = (1, 8, 16, 32, 64, 128)  # decode rows timed (the kernels change method
# at 16, 32 and 64 rows; generate_batch's micro-batches are powers of two or the whole batch)


@torch.no_grad()
def calibrate_compute(
    config,
    dtype: torch.dtype,
    *,
    compressions=COMPRESSIONS,
    group_size: int = 32,
    rows=CALIBRATION_ROWS,
    context: int = 64,
    repeats: int = 9,
    threads: int | None = None,
    bf16_rows: int | None = BF16_ROWS,
) -> dict:
    """Times one decoder layer of `config` (random weights) per compression at `rows` decode
    rows with `context` cached positions, and the lm_head, with `threads` intra-op threads
    (default: one fewer than torch has, generate_batch's while streaming); then the dense
    layer at 16 rows with ATTENTION_EXTRA more cached positions, for the attention's cost per
    position. 9 repeats (not 3): the setup, not the repeats, takes most of the time, and at 3
    medians of int4 at 128 rows came out 40% high and the attention's coefficient (a
    difference of two timings) 4x high on the dev machine, predictions 0.4-0.7x the measured.
    Returns Calibration's fields but the disk bandwidth and threads: the straight-line
    coefficients (first and last rows), the measured points (layer per compression, lm_head),
    the attention's coefficient and the forward's work outside the layer (forward_fixed). The
    layer's points are its own forward's time (_layer_share_seconds). int4 is timed again under
    the activation rule with threshold `bf16_rows` at the rows from there up, under the key
    "int4-bf16"."""
    from rlhf_fast.offload.generate import streaming_threads

    before = torch.get_num_threads()
    torch.set_num_threads(threads or streaming_threads())
    try:
        return _calibrate_compute(
            config, dtype, compressions, group_size, rows, context, repeats, bf16_rows
        )
    finally:
        torch.set_num_threads(before)


def _filled_cache(config, count: int, context: int, dtype: torch.dtype):
    """A one-layer KV cache holding `context` random positions of `count` rows (a prefill of
    count x context rows would cost more than all the timed steps together)."""
    from transformers import DynamicCache

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache = DynamicCache(config=config)
    shape = (count, kv_heads, context, head_dim)
    cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), 0)
    return cache


def _layer_share_seconds(model, step, repeats: int) -> tuple[float, float]:
    """(seconds inside the model's only decoder layer, seconds of the rest) of `step`, medians
    over `repeats` runs after a warm-up, from forward hooks on the layer. Timing the whole
    1-layer forward charged every layer the forward's own work (embedding, mask, rotary, norm):
    ~0.5 ms, 14% of an int4 layer of the 1.57B model at one decode row on the dev machine, and
    the policy predicted 0.73x the measured throughput at batch 1 on 12 such layers."""
    from rlhf_fast.offload.prepare import decoder_layers

    layer = decoder_layers(model)[1][0]
    marks: list[float] = []
    hooks = [
        layer.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter())),
        layer.register_forward_hook(lambda *_: marks.append(time.perf_counter())),
    ]
    try:
        step()
        inside, outside = [], []
        for _ in range(repeats):
            marks.clear()
            started = time.perf_counter()
            step()
            total = time.perf_counter() - started
            inside.append(marks[1] - marks[0])
            outside.append(total - inside[-1])
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(inside), statistics.median(outside)


def _monotone(times: list[float]) -> list[float]:
    """Each time capped by the next one: more rows never take less time, so a smaller count
    timed slower than a larger one was slowed by another process (the dev machine is shared),
    and interpolating through it would bend every prediction near it."""
    capped = list(times)
    for index in range(len(capped) - 2, -1, -1):
        capped[index] = min(capped[index], capped[index + 1])
    return capped


def _calibrate_compute(config, dtype, compressions, group_size, rows, context, repeats, bf16_rows):
    import copy

    from transformers import AutoModelForCausalLM

    from rlhf_fast.quant import quantize_model
    from rlhf_fast.quant.activations import set_int4_activations

    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 1, 256
    small.tie_word_embeddings = False
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(small, dtype=dtype).eval()
    fixed, per_row, points, outside = {}, {}, {}, []
    variants = [(bits, None) for bits in compressions]
    variants += [(4, bf16_rows)] if 4 in compressions and bf16_rows else []
    for bits, rule in variants:
        model = base if bits is None else quantize_model(copy.deepcopy(base), bits, group_size)
        set_int4_activations(model, rule)
        key = compression_name(bits) + (BF16 if rule else "")
        counts = [r for r in rows if rule is None or r >= rule]
        times = []
        for count in counts:
            cache = _filled_cache(small, count, context, dtype)
            step_ids = torch.randint(0, 256, (count, 1))

            def step(model=model, ids=step_ids, cache=cache):  # cache grows a few positions
                model(input_ids=ids, cache=cache, use_cache=True)

            layer_seconds, rest_seconds = _layer_share_seconds(model, step, repeats)
            times.append(layer_seconds)
            outside.append(rest_seconds)
        times = _monotone(times)
        slope = (times[-1] - times[0]) / max(counts[-1] - counts[0], 1)
        fixed[key] = max(times[0] - slope * counts[0], 1e-6)
        per_row[key] = max(slope, 0.0)
        points[key] = [[float(r), t] for r, t in zip(counts, times, strict=True)]
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
    inputs = [torch.randn(count, config.hidden_size, dtype=dtype) for count in rows]
    head_times = _monotone([_median_seconds(lambda x=x: head(x), repeats) for x in inputs])
    head_slope = (head_times[-1] - head_times[0]) / max(rows[-1] - rows[0], 1)
    head_fixed = max(head_times[0] - head_slope * rows[0], 1e-6)
    head_points = [[float(r), t] for r, t in zip(rows, head_times, strict=True)]
    head_points_bf16 = []
    if 4 in compressions and bf16_rows:  # the head as an int4 model under the rule runs it
        from rlhf_fast.quant.activations import set_head_rule

        set_head_rule(head, bf16_rows)
        ruled = [x for x in inputs if x.shape[0] >= bf16_rows]
        with torch.no_grad():
            times = _monotone([_median_seconds(lambda x=x: head(x), repeats) for x in ruled])
        head_points_bf16 = [[float(x.shape[0]), t] for x, t in zip(ruled, times, strict=True)]
    attention = 0.0
    if None in compressions:  # attention runs fp32 whatever the layers' compression
        seconds = []
        for cached in (context, context + ATTENTION_EXTRA):
            cache = _filled_cache(small, 16, cached, dtype)
            ids = torch.randint(0, 256, (16, 1))

            def step(ids=ids, cache=cache):
                base(input_ids=ids, cache=cache, use_cache=True)

            seconds.append(_median_seconds(step, repeats))
        attention = max(seconds[1] - seconds[0], 0.0) / (16 * ATTENTION_EXTRA)
    return {
        "layer_fixed": fixed, "layer_per_row": per_row, "head_fixed": head_fixed,
        "head_per_row": max(head_slope, 0.0), "layer_points": points, "head_points": head_points,
        "attention_per_position": attention, "context": context,
        "head_points_bf16": head_points_bf16, "forward_fixed": statistics.median(outside),
    }  # fmt: skip


def calibrate(
    config, dtype, directory, *, compressions=COMPRESSIONS, files=None, threads=None
) -> Calibration:
    """The disk read (bandwidth, the reader's CPU) and the compute timed at each thread count
    of `threads` (an int or several; default generate.candidate_threads(): one fewer than torch
    has, and all of them), the first count's Calibration holding the others' (with_threads)."""
    from rlhf_fast.offload.generate import candidate_threads

    counts = candidate_threads() if threads is None else threads
    counts = [counts] if isinstance(counts, int) else list(dict.fromkeys(counts))
    if not counts or min(counts) < 1:
        raise ValueError(f"calibrate: thread counts must be >= 1, got {threads!r}")
    bandwidth, read_cpu = measure_disk_read(directory, files)
    cores = torch.get_num_threads()
    timed = [
        Calibration(
            bandwidth,
            threads=count,
            version=CALIBRATION_VERSION,
            cores=cores,
            read_cpu_per_byte=read_cpu,
            **calibrate_compute(config, dtype, compressions=compressions, threads=count),
        )  # fmt: skip
        for count in counts
    ]
    return replace(timed[0], with_threads=timed[1:])
