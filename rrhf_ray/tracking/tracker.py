"""The tracker: one object that logs a run to every enabled backend (`open_tracking`), skips
rounds and steps logged before a resume, and keeps one failing backend from stopping the others
or the run."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rrhf_ray.config import TrackingConfig
from rrhf_ray.tracking.backends import BACKENDS, Backend, check_tracking
from rrhf_ray.tracking.values import columns_and_rows, flatten_params, round_metrics

logger = logging.getLogger("rrhf_ray.tracking")  # one logger for every tracking module


class Tracker:
    """The open tracking runs of one output directory; with no backend enabled, a no-op."""

    def __init__(self, backends: list[Backend], saved: Mapping[str, Any] | None = None, strict: bool = False) -> None:
        self.backends = backends
        self.strict = strict
        self.closed = False
        self._warned: set[tuple[str, str]] = set()
        saved = dict(saved or {})
        self.last_round: int | None = saved.get("round")
        self.last_step: dict[str, int] = dict(saved.get("steps") or {})
        self._ids = {k: v for k, v in saved.items() if k not in ("round", "steps")}

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    @property
    def ids(self) -> dict[str, Any]:
        """What to keep in the run state and pass back as `saved` on resume: the backends' run
        ids, the last round logged and the last global step logged per prefix (JSON-ready)."""
        ids = dict(self._ids)
        for backend in self.backends:
            ids.update(backend.ids)
        if self.last_round is not None:
            ids["round"] = self.last_round
        if self.last_step:
            ids["steps"] = dict(self.last_step)
        return ids

    def _each(self, method: str, *args: Any) -> None:
        if self.closed:
            raise RuntimeError("tracking: the tracker is closed")
        for backend in self.backends:
            try:
                getattr(backend, method)(*args)
            except Exception:
                if self.strict:
                    raise
                if (backend.name, method) not in self._warned:  # once: a broken backend is not log spam
                    self._warned.add((backend.name, method))
                    logger.warning("tracking: %s %s failed; the run goes on without it",
                                   backend.name, method, exc_info=True)

    def log_params(self, config: Any) -> None:
        """The config (a pydantic model or a nested mapping) as parameters with dotted keys."""
        if self.backends:
            self._each("log_params", flatten_params(config))

    def log_round(self, row: Mapping[str, Any], step: int | None = None) -> bool:
        """One round's metrics (a `metrics.jsonl` row; step = `row["round"]` unless given).
        Returns False (and logs nothing) for a round at or below the last one logged."""
        step = int(row["round"] if step is None else step)
        if self.last_round is not None and step <= self.last_round:
            logger.debug("tracking: round %d logged already, skipped", step)
            return False
        if self.backends:
            self._each("log_round", step, round_metrics(row))
        self.last_round = step
        return True

    def log_rounds(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """`log_round` for each row (all of metrics.jsonl, say): only the rounds not logged yet.
        Returns how many were logged."""
        return sum(self.log_round(row) for row in sorted(rows, key=lambda r: int(r["round"])))

    def log_train_steps(self, rows: list[Mapping[str, Any]], prefix: str = "train") -> int:
        """Per-step training scalars as `<prefix>/<key>` at step `row["global_step"]` (supplied by
        the caller, increasing across rounds); rows at or below the last step logged for this
        prefix are skipped. Returns how many rows were logged."""
        last = self.last_step.get(prefix)
        steps = []
        for row in sorted(rows, key=lambda r: float(r["global_step"])):
            step = int(row["global_step"])
            if last is not None and step <= last:
                continue
            steps.append((step, round_metrics(row, skip=("global_step",))))
            last = step
        if steps:
            if self.backends:
                self._each("log_train_steps", prefix, steps)
            self.last_step[prefix] = last
        return len(steps)

    def log_artifact(self, path: str | Path, step: int | None = None, artifact_path: str | None = None) -> None:
        """A file (summary.md, report.png, …): MLflow and W&B keep it, TensorBoard shows text
        and images (at `step`). `artifact_path` is a folder inside the run's artifacts."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tracking: no such file to log: {path}")
        if self.backends:
            self._each("log_artifact", path, step, artifact_path)

    def log_table(self, name: str, rows: list[Mapping[str, Any]], step: int | None = None) -> None:
        """A table (e.g. sample replies: one dict per row, the columns their keys in first-seen
        order). Logging the same name again replaces the MLflow file."""
        if not re.fullmatch(r"[\w\-.]+", name):
            raise ValueError(f"tracking: table name {name!r} must be letters, digits, _ - . only")
        if self.backends:
            columns, data = columns_and_rows(rows)
            self._each("log_table", name, columns, data, step)

    def close(self, failed: bool = False) -> None:
        """End the runs (MLflow FINISHED / FAILED, W&B exit code 0 / 1); idempotent."""
        if self.closed:
            return
        for backend in self.backends:
            try:
                backend.close(failed)
            except Exception:
                if self.strict:
                    raise
                logger.warning("tracking: closing %s failed", backend.name, exc_info=True)
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)


def open_tracking(cfg: TrackingConfig, out_dir: Path, saved: Mapping[str, Any] | None = None,
                  *, strict: bool = False) -> Tracker:
    """Open the enabled backends for the run in `out_dir` (new runs, or those of `saved`, a
    previous `Tracker.ids`). Raises ConfigError if an enabled backend's package is missing."""
    out_dir = Path(out_dir)
    saved = dict(saved or {})
    check_tracking(cfg, out_dir)
    run_name = out_dir.resolve().name
    backends = []
    try:
        for name, backend in BACKENDS.items():
            if getattr(cfg, name).enabled:
                backends.append(backend(cfg, out_dir, saved, run_name))
    except BaseException:
        for opened in backends:  # no run left dangling
            try:
                opened.close(failed=True)
            except Exception:
                logger.warning("tracking: closing %s failed", opened.name, exc_info=True)
        raise
    return Tracker(backends, saved, strict=strict)
