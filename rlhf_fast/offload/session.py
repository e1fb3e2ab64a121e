"""open_offloaded_model: from a model directory and budgets to a streaming model, in one call.

Used by `rlhf-fast chat MODEL_DIR --offload auto --max-memory cpu=2GiB` and by batched
generation for PPO rollouts. `offload` is "auto" or explicit settings that override the
policy's choice, comma-separated: `compress=none|int8|int4|auto`, `resident=N` (layers) or
`resident=P%`, `prefetch=N`, `micro-batch=N`, `threads=N` (torch's intra-op threads for the
streamed compute; the policy times one fewer than torch has and all), `kv=none|int4` (the KV
cache of batched generation, PPO rollouts and chat held 4-bit group-wise), `act=bf16|fp32`
(int4 only: bf16, the default, is the project's int4 activation rule, quant/activations.py,
under which the streamed model equals the resident int4 model of chat --int4; fp32 opts out:
fp32 activations, equal to the fp32-activation quantized model; training always runs fp32).
Offload directories are prepared once under `offload_root` (default
MODEL_DIR/.rlhf_fast_offload/<compression>) and reused while the model directory's weights are
unchanged; the calibration (disk bandwidth, per-layer compute time) is cached beside them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf_fast.offload.generate import candidate_threads
from rlhf_fast.offload.model import OffloadedLM, load_offloaded
from rlhf_fast.offload.policy import (
    CALIBRATION_VERSION,
    COMPRESSIONS,
    Calibration,
    Policy,
    calibrate,
    choose_policy,
    compression_name,
    model_shapes,
    parse_max_memory,
)
from rlhf_fast.offload.prepare import prepare_offload, source_files
from rlhf_fast.offload.shards import (
    MANIFEST,
    RESIDENT_FILE,
    ShardError,
    layer_file,
    read_layout,
    read_manifest,
)
from rlhf_fast.quant.activations import BF16_ROWS
from rlhf_fast.quant.model import BITS_BY_NAME

ROOT_NAME = ".rlhf_fast_offload"


def parse_offload(text: str, num_layers: int) -> dict:
    """'auto' -> {}; 'compress=int4,resident=25%,prefetch=2,micro-batch=4,kv=int4' -> fixed
    fields (kv=int4: the batched generation's KV cache held 4-bit, offload/kv_cache.py);
    'auto,kv=int4' -> {'kv_bits': 4}; 'act=fp32' -> {'bf16_rows': None} (see above)."""
    fixed: dict = {}
    if text.strip() == "auto":
        return fixed
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "auto":  # 'auto,kv=int4': the policy chooses all but what follows
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        try:
            if not sep:
                raise ValueError
            if key == "compress":
                if value != "auto":
                    fixed["compress"] = BITS_BY_NAME[value]
            elif key == "resident":
                if value.endswith("%"):
                    count = round(float(value[:-1]) / 100 * num_layers)
                else:
                    count = int(value)
                if not 0 <= count <= num_layers:
                    raise ValueError
                fixed["resident_layers"] = count
            elif key == "kv":
                fixed["kv_bits"] = {"none": None, "int4": 4}[value]
            elif key == "act":
                fixed["bf16_rows"] = {"bf16": BF16_ROWS, "fp32": None}[value]
            elif key in ("prefetch", "micro-batch", "threads"):
                number = int(value)
                if number < (0 if key == "prefetch" else 1):
                    raise ValueError
                fixed[key.replace("-", "_")] = number
            else:
                raise KeyError(key)
        except (KeyError, ValueError, OverflowError):  # OverflowError: resident=inf%
            raise ValueError(
                f"--offload: {item!r} is not auto or one of compress=none|int8|int4, "
                f"resident=N|P%, prefetch=N, micro-batch=N, threads=N, kv=none|int4, "
                f"act=bf16|fp32"
            ) from None
    return fixed


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _measured_for(config, dtype, compressions) -> str:
    """What a calibration timed: the model's config (but its depth: one layer is timed), dtype,
    compressions and thread counts. The offload root (--offload-dir) may be shared between
    models."""
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "num_hidden_layers"):
        fields.pop(volatile, None)
    names = sorted(compression_name(c) for c in compressions)
    threads = candidate_threads()  # RLHF_FAST_OFFLOAD_THREADS or torch's count changed: again
    text = json.dumps([fields, str(dtype), names, threads], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _calibration(root: Path, config, dtype, compressions) -> Calibration:
    cache = root / "calibration.json"
    measured_for = _measured_for(config, dtype, compressions)
    if cache.is_file():
        try:
            fields = json.loads(cache.read_text())
            same_model = fields.pop("measured_for", None) == measured_for
            cached = Calibration.from_dict(fields)
            # else measured by older code, or for another model: again
            if cached.version == CALIBRATION_VERSION and same_model:
                return cached
        except (TypeError, ValueError, AttributeError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    print("[offload: calibrating disk bandwidth and layer compute time]", file=sys.stderr)
    calibration = calibrate(config, dtype, root, compressions=compressions)
    cache.write_text(json.dumps({**asdict(calibration), "measured_for": measured_for}))
    return calibration


def _prepared(model_dir: Path, target: Path, compress: int | None) -> Path:
    """`target` prepared from `model_dir`, reused while the directory's weights are unchanged
    and every shard it lists is whole (one deleted or cut short: prepared again, since loading
    would only say to)."""
    try:
        manifest = read_manifest(target)
        same = manifest.get("source_files") == source_files(model_dir)
        if manifest.get("source") == str(model_dir.resolve()) and same:
            read_layout(target / RESIDENT_FILE)  # headers and sizes: no weight is read
            for index in range(manifest["num_layers"]):
                read_layout(target / layer_file(index))
            return target
    except ShardError:
        pass
    print(f"[offload: preparing {target} (once)]", file=sys.stderr)
    return prepare_offload(model_dir, target, compress=compress)


def open_offloaded_model(
    model_dir: str | os.PathLike,
    *,
    offload: str = "auto",
    max_memory: str | None = None,
    offload_root: str | os.PathLike | None = None,
    batch: int = 1,
    context: int = 512,
    drop_cache: bool = True,
    reserve: int = 0,
    bf16_activations: bool = True,
    prompt: int | None = None,
) -> tuple[OffloadedLM, Policy]:
    """Chooses a policy for `max_memory` (default: half the available RAM) less `reserve` bytes
    (training's activations), prepares the offload directory it needs and opens it. Prints
    nothing; returns (model, policy). `bf16_activations=False` (training) turns the int4
    activation rule off whatever `offload` says. `context`: the sequence length (prompt +
    answer) to plan the KV cache for; `prompt`: the longest prompt (default `context`)."""
    from transformers import AutoConfig

    from rlhf_fast.quant.io import read_quantization

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    budgets = parse_max_memory(max_memory) if max_memory else {"cpu": _available_memory() // 2}
    if "cpu" not in budgets:
        raise ValueError("--max-memory: give cpu=SIZE (this build runs on the CPU)")
    stored = read_quantization(model_dir)
    shapes = model_shapes(config, dtype)
    if stored is not None:  # already compressed: stream it as stored
        shapes = {stored["bits"]: shapes[stored["bits"]]}
    fixed = parse_offload(offload, config.num_hidden_layers)
    if stored is not None and "compress" in fixed and fixed["compress"] != stored["bits"]:
        raise ValueError(f"--offload: {model_dir} is stored int{stored['bits']}; it streams so")
    fixed.pop("compress", None) if stored is not None else None
    if not bf16_activations:
        fixed["bf16_rows"] = None
    root = Path(offload_root) if offload_root else model_dir / ROOT_NAME
    wanted = [c for c in COMPRESSIONS if c in shapes]
    calibration = _calibration(root, config, dtype, wanted)
    policy = choose_policy(
        shapes, calibration, cpu_budget=budgets["cpu"] - reserve, batch=batch, context=context,
        fixed=fixed, prompt=prompt,
    )  # fmt: skip
    target = root / compression_name(policy.compress)
    _prepared(model_dir, target, None if stored is not None else policy.compress)
    if not (target / MANIFEST).is_file():
        raise ShardError(f"{target / MANIFEST}: missing after prepare")
    lm = load_offloaded(
        target, resident_layers=policy.resident_layers, prefetch=policy.prefetch,
        drop_cache=drop_cache, bf16_rows=policy.bf16_rows,
    )  # fmt: skip
    lm.policy = policy
    lm.context = context  # the sequence length (prompt + answer) its memory was planned for
    return lm, policy


# The longest conversation prompt a chat under --offload plans its memory for; older turns of
# a longer history are left out (chat.fit_context).
CHAT_PROMPT_TOKENS = 512


def open_for_chat(model_dir: str | os.PathLike, args) -> torch.nn.Module:
    """The chat command's hook: opens the model under `--offload`, prints the chosen policy on
    stderr and returns the HF model (its streamer stays reachable as `model.rlhf_fast_offload`).
    `--int4` / `--int8` pin the compression; `kv=int4` holds the conversation's KV cache 4-bit.
    The policy is sized for prompts of CHAT_PROMPT_TOKENS plus --max-new-tokens answers."""
    spec = args.offload
    bits = 4 if getattr(args, "int4", False) else 8 if getattr(args, "int8", False) else None
    if bits is not None and "compress=" not in spec:
        spec = f"compress=int{bits}" if spec.strip() == "auto" else f"{spec},compress=int{bits}"
    answer_tokens = getattr(args, "max_new_tokens", 256)
    lm, policy = open_offloaded_model(
        model_dir, offload=spec, max_memory=args.max_memory, offload_root=args.offload_dir,
        context=CHAT_PROMPT_TOKENS + answer_tokens, prompt=CHAT_PROMPT_TOKENS,
    )  # fmt: skip
    print(f"[offload: {policy.describe()}]", file=sys.stderr, flush=True)
    lm.model.rlhf_fast_offload = lm  # chat runs it on the HF forward and closes it at the end
    if policy.kv_bits == 4:  # the conversation's KV cache held 4-bit (offload/kv_cache.py)
        from rlhf_fast.models.generate import CACHE_FACTORY
        from rlhf_fast.offload.kv_cache import compressed_cache

        setattr(lm.model, CACHE_FACTORY, functools.partial(compressed_cache, lm.model.config))
    return lm.model
