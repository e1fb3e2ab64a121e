"""Training metrics: `metrics.jsonl` in the run directory and a live progress bar.

metrics.jsonl holds one JSON object per logged step (`{"step": 3, "loss": ..., ...}`), each
line flushed as it is written, so a killed run keeps what it logged. A resumed run first drops
the lines past the step it resumes from, so the file reads as one uninterrupted run.

Only the main process writes or draws (rank 0 under torch.distributed; the only process
otherwise): other ranks get objects that do nothing, so stage code calls them unconditionally.
The bar is tqdm's on a terminal; without one (a log file, CI) a plain line is printed every
tenth of the run instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace the file at `path` by `lines` whole: written beside it, then renamed over it, so
    that a kill in between leaves the old file (rewriting in place would leave it cut short)."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """The mean of (value, weight) pairs as a gradient weights its micro-batches (by tokens,
    pairs or rows); a plain mean when every weight is 0."""
    total = sum(weight for _, weight in pairs)
    if total > 0:
        return sum(value * weight for value, weight in pairs) / total
    return sum(value for value, _ in pairs) / len(pairs)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: keep them readable
    return value


class MetricsLog:
    """Appends one JSON object per call to RUN_DIR/metrics.jsonl (main process only)."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = is_main_process()
        self._file = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        rewrite_lines(self.path, kept)

    def log(self, record: dict) -> None:
        if self._file is None:
            return
        clean = {key: _json_value(value) for key, value in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _format(values: dict) -> dict[str, str]:
    shown = {}
    for key, value in values.items():
        if isinstance(value, float):
            shown[key] = f"{value:.4g}" if key != "tok/s" else f"{value:.0f}"
        else:
            shown[key] = str(value)
    return shown


class Progress:
    """A progress bar over optimizer steps with live values (loss, acc, tok/s, ...)."""

    def __init__(self, total: int, *, initial: int = 0, description: str = "train") -> None:
        self.total = total
        self.enabled = is_main_process()
        self.interactive = self.enabled and sys.stderr.isatty()
        self.description = description
        self._print_every = max(1, total // 10)
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True)

    def update(self, step: int, values: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_format(values), refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.enabled and (step % self._print_every == 0 or step == self.total):
            shown = " ".join(f"{k}={v}" for k, v in _format(values).items())
            print(f"{self.description} step {step}/{self.total} {shown}", file=sys.stderr)

    def write(self, text: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
