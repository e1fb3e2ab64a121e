"""Training checkpoints: written atomically, read back exactly, never pickled.

A checkpoint is a directory `RUN_DIR/checkpoints/step-NNNNNNNN/`:

    trainable.safetensors   the trainable parameters by name (LoRA adapter, value head)
    optimizer.safetensors   every tensor of the optimizer state, as "state.<param>.<name>"
    rng.safetensors         torch's CPU RNG state ("torch.cpu") and each CUDA device's
                            ("torch.cuda.<i>")
    state.json              step, data position, the optimizer's param groups and non-tensor
                            state, the scheduler's state, Python's and NumPy's RNG states, and
                            the byte size of every file above (a truncated file is detected)

It is written into a temporary directory beside its final place (same file system), every file
and the directory are fsynced, and only then is it renamed into place: a crash leaves either
the whole checkpoint or a `.tmp-*` directory that loading ignores. Checkpoint writing is meant
for one process (rank 0) only; the caller decides who writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = "rlhf_fast.checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read (one line naming it)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    position: dict  # the data position: {"epoch": int, "index": int}
    trainable: dict[str, torch.Tensor]
    optimizer: dict  # an optimizer state_dict
    scheduler: dict  # a scheduler state_dict
    rng: dict  # see capture_rng
    extra: dict  # whatever the stage stored (JSON)


# ------------------------------------------------------------------------------------- RNG


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the Python, NumPy, torch CPU and CUDA RNG states."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{index}"] = state
    json_part = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return json_part, tensors


def restore_rng(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, python_state, gauss = json_part["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch.cuda."))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in sorted(cuda, key=lambda k: int(k.rsplit(".", 1)[1]))]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------- optimizer


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, the rest as JSON-able data)."""
    tensors, other = {}, {}
    for index, param_state in state_dict["state"].items():
        entry = {}
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                entry[name] = value
        other[str(index)] = entry
    return tensors, {"state": other, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(index): dict(entry) for index, entry in meta["state"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------- write


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(directory: Path, tensor_files: dict, state: dict) -> None:
    """Write each safetensors file and state.json into `directory`, fsyncing each."""
    sizes = {}
    for name, tensors in tensor_files.items():
        save_file(tensors, directory / name)
        _fsync_path(directory / name)
        sizes[name] = (directory / name).stat().st_size
    state = {**state, "files": sizes}
    with open(directory / STATE_FILE, "w") as handle:
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    position: dict,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict | None = None,
    keep: int = 0,
) -> Path:
    """Write RUN_DIR/checkpoints/step-<step>/ atomically; keep the newest `keep` (0: all)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer.state_dict())
    rng_json, rng_tensors = capture_rng()
    params = {name: t.detach().cpu().contiguous() for name, t in trainable.items()}
    state = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "position": position,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_json,
        "extra": extra or {},
    }
    files = {TRAINABLE_FILE: params, OPTIMIZER_FILE: optimizer_tensors, RNG_FILE: rng_tensors}
    replaced = None
    try:
        _write_files(temporary, files, state)
        _fsync_path(temporary)
        if final.exists():  # the same step written again (a resumed run): replace it
            # Moved aside (one rename), not deleted in place: a kill in the middle of a
            # deletion would leave a step directory that still has its state.json, which
            # loading would take for the newest checkpoint and then reject as incomplete.
            replaced = root / f".tmp-replaced-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, replaced)
        try:
            os.rename(temporary, final)
        except BaseException:
            if replaced is not None:  # put the old one back
                os.rename(replaced, final)
                replaced = None
            raise
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _prune(root, keep)
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """Whether RUN_DIR/checkpoints holds a complete checkpoint (a `.tmp-*` leftover of a
    killed write is none: there is nothing to resume from it)."""
    return bool(_complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR))


def _prune(root: Path, keep: int) -> None:
    for path in root.iterdir():  # leftovers of writes that were killed
        if path.name.startswith(".tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for _, path in _complete_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


ABANDONED_DIR = "abandoned"  # under checkpoints/: steps of a timeline a resume left behind


def set_aside_later(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Moves RUN_DIR's checkpoints past `step` (the one a run resumes from, 0: a fresh start)
    to checkpoints/abandoned/: they belong to the timeline this run leaves, whose metrics rows
    are dropped too, and `--resume RUN` would otherwise take the newest of them. Moved, not
    deleted (they are a user's); returns where they went."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    later = [path for number, path in _complete_checkpoints(root) if number > step]
    moved = []
    if later:
        aside = root / ABANDONED_DIR
        aside.mkdir(exist_ok=True)
        for path in later:
            target, copy = aside / path.name, 1
            while target.exists():  # abandoned twice at the same step
                copy += 1
                target = aside / f"{path.name}-{copy}"
            os.rename(path, target)
            moved.append(target)
        _fsync_path(root)
        names = ", ".join(path.name for path in later)
        print(f"[resume: {names} past step {step} moved to {aside}]", file=sys.stderr, flush=True)
    return moved


# ------------------------------------------------------------------------------------ read


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest complete one of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = _complete_checkpoints(path / CHECKPOINTS_DIR)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint in {path / CHECKPOINTS_DIR}")
    return found[-1][1]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint (or a run directory's newest); CheckpointError if it is corrupt."""
    directory = find_checkpoint(path)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{directory / STATE_FILE}: unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{directory / STATE_FILE}: not an rlhf_fast checkpoint")
    tensors = {}
    for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE):
        file = directory / name
        expected = state.get("files", {}).get(name)
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (incomplete checkpoint)")
        if expected != file.stat().st_size:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes, state.json says {expected} (truncated?)"
            )
        try:
            tensors[name] = load_file(file)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{file}: unreadable ({reason})") from None
    try:
        return Checkpoint(
            path=directory,
            step=int(state["step"]),
            position=dict(state["position"]),
            trainable=tensors[TRAINABLE_FILE],
            optimizer=unflatten_optimizer(tensors[OPTIMIZER_FILE], state["optimizer"]),
            scheduler=state["scheduler"],
            rng={"json": state["rng"], "tensors": tensors[RNG_FILE]},
            extra=state.get("extra", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory / STATE_FILE}: missing or bad entry {error}") from None
