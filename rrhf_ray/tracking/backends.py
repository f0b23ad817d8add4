"""The tracking backends (MLflow, TensorBoard, Weights & Biases) behind one interface, `Backend`,
and the check that an enabled backend's package is installed.

Each backend is opened by its constructor (a new run, or the run of `saved` ids) and implements
the same six methods, which `rrhf_ray.tracking.tracker.Tracker` calls in turn. No optional
package is imported until a backend is opened or checked.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from rrhf_ray.config import ConfigError, TrackingConfig
from rrhf_ray.tracking.values import markdown_table, param_text

logger = logging.getLogger("rrhf_ray.tracking")  # one logger for every tracking module

INSTALL_HINT = "pip install 'rrhf-ray[tracking]'"

# backend -> [(module to import, package that provides it)]; the first importable module is used.
_REQUIREMENTS: dict[str, list[tuple[str, str]]] = {
    "mlflow": [("mlflow", "mlflow-skinny (or mlflow)")],
    "tensorboard": [("tensorboardX", "tensorboardX"), ("torch.utils.tensorboard", "tensorboard")],
    "wandb": [("wandb", "wandb")],
}
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class Backend(Protocol):
    """One open tracking run. `name` is the backend's (in warnings); `ids` what reopens the run
    on resume. Metrics arrive as {key: finite float}, parameters as {dotted.key: JSON value},
    tables as columns and rows (`rrhf_ray.tracking.values`)."""

    name: str

    @property
    def ids(self) -> dict[str, Any]: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_round(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_train_steps(self, prefix: str, steps: list[tuple[int, dict[str, float]]]) -> None: ...

    def log_artifact(self, path: Path, step: int | None, artifact_path: str | None) -> None: ...

    def log_table(self, name: str, columns: list[str], data: list[list[Any]], step: int | None) -> None: ...

    def close(self, failed: bool) -> None: ...


# --------------------------------------------------------------------------- packages


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
            key, text = self._key(key), param_text(value)[:6000]
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
        rows = [[key, param_text(value)] for key, value in params.items()]
        self.writer.add_text("config", markdown_table(["key", "value"], rows), 0)
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
        self.writer.add_text(name, markdown_table(columns, data), step or 0)
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


BACKENDS: dict[str, type[Backend]] = {"mlflow": _MLflow, "tensorboard": _TensorBoard, "wandb": _Wandb}
