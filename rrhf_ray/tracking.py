"""Experiment tracking: MLflow, TensorBoard and Weights & Biases behind one small object.

    tracker = open_tracking(config.tracking, out_dir, saved=state.data.get("tracking"))
    state.data["tracking"] = tracker.ids                 # keep it: a resumed run continues these runs
    tracker.log_params(config)                           # the resolved config, dotted keys
    tracker.log_train_steps(history, prefix="train")     # rows with a caller-supplied "global_step"
    tracker.log_round(row)                               # a metrics.jsonl row; step = row["round"]
    tracker.log_artifact(out_dir / "summary.md", step=r)
    tracker.log_table("samples_round3", rows, step=3)
    tracker.close()                                      # or `with open_tracking(...) as tracker:`

What each backend gets:

- parameters: the config flattened to dotted keys (`train.loss.name`); MLflow params (immutable:
  on resume only new keys are added, a changed value is set as the tag `changed.<key>`), W&B
  config, a TensorBoard text table `config`.
- round metrics: every number of a round row under its own key (`eval_reward_mean`), a [lo, hi]
  pair as `<key>_lo` / `<key>_hi` (`sampled_reward_mean_ci95_lo`); strings, dicts, None, NaN
  and booleans are left out. Step = the round index (W&B: the metric `round` as the x axis).
- training steps: `<prefix>/<key>` (`train/loss`, `train/lr`, …) at step `global_step`, which
  the caller keeps increasing across rounds (W&B: `<prefix>/global_step` as the x axis).
- artifacts: MLflow stores the file; W&B saves it with the run's files (and logs an image as
  `wandb.Image`); TensorBoard shows markdown / text files as text and images as images, and has
  nowhere to keep other files.
- tables: MLflow `tables/<name>.json` in `mlflow.log_table`'s layout ({"columns", "data"}, readable
  with `mlflow.load_table`), TensorBoard a markdown table (text), W&B a `wandb.Table`. Logging the
  same name again replaces the MLflow file.

`Tracker.ids` holds the backends' run ids and how far the logging got (the last round and, per
prefix, the last global step). The caller stores it with its run state (whenever it writes that
state) and passes it back as `saved` when the run resumes: MLflow reopens the run by id, W&B
resumes the run id (`resume="allow"`; offline, a second offline-run folder with the same id that
`wandb sync` merges), TensorBoard appends to the same directory; rounds and steps that were
logged already are skipped, so re-logging every row after a resume is harmless.

A backend that fails while logging is reported once in the log and does not stop the run
(`strict=True` raises instead). Opening a backend whose package is missing raises ConfigError.
This module imports no optional package until a backend is opened.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rrhf_ray.config import ConfigError, TrackingConfig

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rrhf-ray[tracking]'"

# backend -> [(module to import, package that provides it)]; the first importable module is used.
_REQUIREMENTS: dict[str, list[tuple[str, str]]] = {
    "mlflow": [("mlflow", "mlflow-skinny (or mlflow)")],
    "tensorboard": [("tensorboardX", "tensorboardX"), ("torch.utils.tensorboard", "tensorboard")],
    "wandb": [("wandb", "wandb")],
}
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")

# --------------------------------------------------------------------------- what gets logged


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None for anything else (booleans included)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def round_metrics(row: Mapping[str, Any], skip: Iterable[str] = ("round",)) -> dict[str, float]:
    """The numbers of a metrics row: numbers as they are, a [lo, hi] pair as `<key>_lo` /
    `<key>_hi`; strings, dicts, other lists, None, NaN and booleans left out."""
    skip = set(skip)
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, (list, tuple)):
            if len(value) == 2:
                lo, hi = _number(value[0]), _number(value[1])
                if lo is not None:
                    out[f"{key}_lo"] = lo
                if hi is not None:
                    out[f"{key}_hi"] = hi
            continue
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def flatten_params(config: Any) -> dict[str, Any]:
    """A config (pydantic model or nested mapping) as {dotted.key: value}; values are JSON
    scalars or lists (an empty mapping stays as {})."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = node

    walk(config, "")
    return out


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _table(rows: list[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (in first-seen order) and data rows, a missing cell None."""
    columns: list[str] = []
    for row in rows:
        columns += [str(k) for k in row if str(k) not in columns]
    return columns, [[row.get(c) for c in columns] for row in rows]


def _markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def _import(backend: str) -> Any:
    """The backend's module, or a ConfigError naming the package and the extra."""
    errors = []
    for module, package in _REQUIREMENTS[backend]:
        try:
            return importlib.import_module(module)
        except ImportError as err:
            errors.append(f"{package} ({err})")
    raise ConfigError(
        f"tracking.{backend}.enabled is true but its package is not installed: "
        f"{' / '.join(errors)}. Install the tracking extra: {INSTALL_HINT} "
        f"(or set tracking.{backend}.enabled: false)")


def _mlflow_uri(cfg: TrackingConfig, out_dir: Path) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{(out_dir / 'mlruns' / 'mlflow.db').resolve()}"


def check_tracking(cfg: TrackingConfig, out_dir: Path | None = None) -> None:
    """Raise ConfigError if an enabled backend's package is missing (what `open_tracking` would
    find), without opening anything: for a preflight check."""
    for backend in ("mlflow", "tensorboard", "wandb"):
        if getattr(cfg, backend).enabled:
            _import(backend)
    if cfg.mlflow.enabled:
        uri = _mlflow_uri(cfg, out_dir or Path("."))
        if uri.split(":", 1)[0].split("+", 1)[0] in _SQL_SCHEMES:
            for module in ("sqlalchemy", "alembic"):
                try:
                    importlib.import_module(module)
                except ImportError as err:
                    raise ConfigError(
                        f"tracking.mlflow uses the database store {uri!r}, which needs the package "
                        f"{module!r} ({err}): {INSTALL_HINT}") from None


# --------------------------------------------------------------------------- backends
# Each backend is opened by its constructor and implements the same six methods; Tracker
# calls them in turn and keeps them apart (one failing backend does not stop the others).


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: TrackingConfig, out_dir: Path, saved: Mapping[str, Any], run_name: str) -> None:
        _import("mlflow")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        c = cfg.mlflow
        uri = _mlflow_uri(cfg, out_dir)
        artifact_location = c.artifact_location
        if c.tracking_uri is None:
            (out_dir / "mlruns").mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_location or str((out_dir / "mlruns" / "artifacts").resolve())
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        run = None
        run_id = saved.get("mlflow_run_id")
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException as err:  # the store was removed or is another one
                logger.warning("tracking: MLflow run %s not found in %s (%s): starting a new run",
                               run_id, uri, err)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            logger.info("tracking: MLflow run %s resumed (%s)", run.info.run_id, uri)
        else:
            experiment = self.client.get_experiment_by_name(c.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None else
                             self.client.create_experiment(c.experiment, artifact_location=artifact_location))
            run = self.client.create_run(experiment_id, run_name=c.run_name or run_name, tags=dict(c.tags))
            logger.info("tracking: MLflow run %s in experiment %r (%s)", run.info.run_id, c.experiment, uri)
        self.run_id = run.info.run_id

    @property
    def ids(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    @staticmethod
    def _key(key: str) -> str:
        return re.sub(r"[^\w\-./ ]", "_", key)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self._key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = []
        for key, value in params.items():
            key, text = self._key(key), _param_text(value)[:6000]
            if key not in have:
                new.append(Param(key, text))
            elif have[key] != text:  # params are immutable; a resumed run may change e.g. rounds
                self.client.set_tag(self.run_id, f"changed.{key}", text)
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics(metrics, step)

    def log_train_steps(self, prefix: str, steps: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self._key(f"{prefix}/{k}"), v, now, step) for step, values in steps
                   for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_artifact(self, path: Path, step: int | None, artifact_path: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, name: str, columns: list[str], data: list[list[Any]], step: int | None) -> None:
        # mlflow.log_table's file layout, but written whole: logging a name again replaces it
        # (log_table would append the rows to the existing file).
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        artifact_file = f"tables/{name}.json"
        text = json.dumps({"columns": columns, "data": data}, default=str)
        self.client.log_text(self.run_id, text, artifact_file)
        # the tag by which mlflow.load_table and the UI find the run's tables
        logged = json.loads(self.client.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        if {"path": artifact_file, "type": "table"} not in logged:
            logged.append({"path": artifact_file, "type": "table"})
            self.client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: TrackingConfig, out_dir: Path, saved: Mapping[str, Any], run_name: str) -> None:
        module = _import("tensorboard")
        self.log_dir = Path(cfg.tensorboard.log_dir) if cfg.tensorboard.log_dir else out_dir / "tensorboard"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends a new event file to the same directory; TensorBoard reads them
        # in order, and the steps go on where they stopped.
        self.writer = module.SummaryWriter(str(self.log_dir))
        logger.info("tracking: TensorBoard event files in %s", self.log_dir)

    @property
    def ids(self) -> dict[str, Any]:
        return {"tensorboard_log_dir": str(self.log_dir)}

    def log_params(self, params: dict[str, Any]) -> None:
        rows = [[key, _param_text(value)] for key, value in params.items()]
        self.writer.add_text("config", _markdown_table(["key", "value"], rows), 0)
        self.writer.flush()

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_train_steps(self, prefix: str, steps: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in steps:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def log_artifact(self, path: Path, step: int | None, artifact_path: str | None) -> None:
        tag = f"{artifact_path}/{path.name}" if artifact_path else path.name
        suffix = path.suffix.lower()
        if suffix in (".md", ".txt"):
            self.writer.add_text(tag, path.read_text(), step or 0)
        elif suffix in (".png", ".jpg", ".jpeg"):
            import matplotlib.image

            image = matplotlib.image.imread(str(path))  # H x W x C, or H x W for greyscale
            self.writer.add_image(tag, image, step or 0, dataformats="HWC" if image.ndim == 3 else "HW")
        else:
            logger.debug("tracking: TensorBoard keeps no %s files; %s not logged there", suffix, path)
            return
        self.writer.flush()

    def log_table(self, name: str, columns: list[str], data: list[list[Any]], step: int | None) -> None:
        self.writer.add_text(name, _markdown_table(columns, data), step or 0)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, out_dir: Path, saved: Mapping[str, Any], run_name: str) -> None:
        self.wandb = wandb = _import("wandb")
        c = cfg.wandb
        root = Path(c.dir) if c.dir else out_dir
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=c.project, entity=c.entity, name=c.name or run_name, group=c.group,
            tags=list(c.tags) or None, mode=c.mode, dir=str(root), id=saved.get("wandb_run_id"), resume="allow",
        )
        self.run_id = self.run.id
        self.defined: set[str] = set()
        logger.info("tracking: W&B run %s (%s, %s/wandb)%s", self.run_id, c.mode, root,
                    " resumed" if saved.get("wandb_run_id") else "")

    @property
    def ids(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def _define(self, key: str, step_metric: str) -> None:
        if step_metric not in self.defined:
            self.run.define_metric(step_metric, hidden=False)
            self.defined.add(step_metric)
        if key not in self.defined:
            self.run.define_metric(key, step_metric=step_metric)
            self.defined.add(key)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_round(self, step: int, metrics: dict[str, float]) -> None:
        for key in metrics:
            self._define(key, "round")
        self.run.log({"round": step, **metrics})

    def log_train_steps(self, prefix: str, steps: list[tuple[int, dict[str, float]]]) -> None:
        axis = f"{prefix}/global_step"
        self._define(f"{prefix}/*", axis)
        for step, values in steps:
            self.run.log({axis: step, **{f"{prefix}/{k}": v for k, v in values.items()}})

    def log_artifact(self, path: Path, step: int | None, artifact_path: str | None) -> None:
        self.run.save(str(path.resolve()), base_path=str(path.resolve().parent), policy="now")
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            key = f"{artifact_path}/{path.stem}" if artifact_path else path.stem
            self.run.log({key: self.wandb.Image(str(path))})

    def log_table(self, name: str, columns: list[str], data: list[list[Any]], step: int | None) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=data)})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_BACKENDS = {"mlflow": _MLflow, "tensorboard": _TensorBoard, "wandb": _Wandb}


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """The open tracking runs of one output directory; with no backend enabled, a no-op."""

    def __init__(self, backends: list[Any], saved: Mapping[str, Any] | None = None, strict: bool = False) -> None:
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
            columns, data = _table(rows)
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
        for name, backend in _BACKENDS.items():
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
