"""Every trainer's launch on Ray Train: `torch_trainer` builds the one kind of `TorchTrainer` this
package runs (used by `fit_job` and by the warm round trainer, `rrhf_ray.train.warm`); `fit_job`
runs a loop to its end and installs the final checkpoint; `train_once` is a workflow stage that
trains once and is skipped when its model is already there."""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rrhf_ray.mailbox import Mailbox
from rrhf_ray.train.checkpoints import install_checkpoint, is_finished_model
from rrhf_ray.train.jobs import FitJob, PairJob

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)

# Ray Train's controller polls its workers every 2 s by default: a fit then ends up to 2 s after
# its workers return (the warm trainer's close, every SFT / reward-model stage) and a dead worker
# is seen up to 2 s late. Polled every 0.5 s here (the variable set in the environment wins); the
# driver passes it to the controller and workers (Ray Train's ENV_VARS_TO_PROPAGATE).
HEALTH_CHECK_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def poll_workers_often() -> None:
    """Set Ray Train's health-check interval (`HEALTH_CHECK_INTERVAL`) unless the user did."""
    os.environ.setdefault(*HEALTH_CHECK_INTERVAL)


class WorkerNodes:
    """Where a fit's Ray Train workers run: each worker, as it starts (a restarted group's too),
    puts {"rank", "node_id", "ip"} on a channel of `mailbox` (a mailbox of its own when none is
    given) that `seen` reads in the driver; the latest start of each rank wins."""

    def __init__(self, mailbox: Mailbox | None = None) -> None:
        self._own = mailbox is None
        self.mailbox = mailbox or Mailbox()
        self.channel = self.mailbox.channel("nodes")
        self._seen: dict[int, dict[str, Any]] = {}

    def seen(self) -> dict[int, dict[str, Any]]:
        """{rank: {"node_id", "ip"}} of every worker started so far."""
        while True:
            try:
                where = self.channel.get_nowait()
            except queue.Empty:
                return dict(sorted(self._seen.items()))
            self._seen[where.pop("rank")] = where

    def shutdown(self) -> None:
        if self._own:
            self.mailbox.shutdown()


def _recording_node(loop: Callable[[dict[str, Any]], Any], channel: Any) -> Callable[[dict[str, Any]], Any]:
    """`loop` preceded by the worker's node on `channel` (`WorkerNodes`) and in its log."""

    def train_loop_per_worker(config: dict[str, Any]) -> Any:
        import ray
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        where = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
        logger.info("Ray Train worker %d on node %s (%s)", rank, where["node_id"], where["ip"])
        channel.put({"rank": rank, **where})
        return loop(config)

    return train_loop_per_worker


def torch_trainer(loop: Callable[[dict[str, Any]], Any], job: FitJob, *, name: str, storage_path: str,
                  max_failures: int, store: RunStore | None, nodes: WorkerNodes | None = None,
                  **loop_config: Any) -> Any:
    """A `TorchTrainer` running `loop` on `job.train.num_workers` workers (a GPU each with
    `train.use_gpu`; `train.resources`, the custom resources of the node type they run on),
    `loop`'s config {"job": job as a dict, **loop_config}; the workers log to
    `job.log_dir` (None: Ray's logs), Ray Train keeps the last reported
    checkpoint under `storage_path/name` and restarts a failed group up to `max_failures` times.
    `nodes`: where each worker records its node (`WorkerNodes`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rrhf_ray.mirror import actor_options

    cfg = job.train
    poll_workers_often()
    return TorchTrainer(
        _recording_node(loop, nodes.channel) if nodes is not None else loop,
        train_loop_config={"job": job.model_dump(mode="json"), **loop_config},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}),
                                  **cfg.resources},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
            # The bucket's credentials when the job's model (or the warm trainer's pools) are URIs
            # (rrhf_ray.mirror.actor_options).
            worker_runtime_env=actor_options(store).get("runtime_env"),
        ),
    )


def fit_job(
    loop: Callable[[dict[str, Any]], dict[str, float]],
    job: FitJob,
    *,
    name: str,
    storage_path: str | None = None,
    max_failures: int = 0,
    store: RunStore | None = None,
) -> dict[str, float]:
    """Run `loop` (a `*_loop_per_worker`) on `job` under `TorchTrainer` on the connected Ray
    cluster; install the final checkpoint (an HF directory) at `job.output_dir`; return the final
    metrics. Validate the job's data before calling this: a bad row costs nothing to report here."""
    storage = storage_path or str(Path(job.output_dir).resolve().parent / "ray_train")
    trainer = torch_trainer(loop, job, name=name, storage_path=storage, max_failures=max_failures,
                            store=store, ray=True)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    install_checkpoint(result.checkpoint, Path(job.output_dir), result.metrics)
    return dict(result.metrics)


def fit_pairs(loop: Callable[[dict[str, Any]], dict[str, float]], job: PairJob,
              read_pairs: Callable[..., list[Any]], *, what: str, name: str, storage_path: str | None = None,
              max_failures: int = 0, store: RunStore | None = None) -> dict[str, float]:
    """`fit_job` for a fit on pairs: every row of `job`'s pairs is read (`read_pairs`) and
    validated here first, where a malformed row costs nothing to report."""
    train_pairs, held = job.split_pairs(read_pairs)
    logger.info("%s on %d pairs (%d held out) from %s", what, len(train_pairs), len(held), job.data_path)
    return fit_job(loop, job, name=name, storage_path=storage_path, max_failures=max_failures, store=store)


def train_once(job: FitJob, loop: Callable[[dict[str, Any]], dict[str, float]],
               fit: Callable[..., dict[str, float]], *, what: str, name: str,
               storage_path: str | None, store: RunStore | None = None) -> Path:
    """A workflow stage that trains `job` into `job.output_dir` unless a finished model is there
    already (a resumed run never redoes it): under Ray Train (`fit`) when Ray is connected, else
    `loop` in this process. Returns the model directory."""
    import ray

    out = Path(job.output_dir)
    if is_finished_model(out):
        logger.info("%s stage: using the finished model at %s", what, out)
        return out
    if ray.is_initialized():
        fit(job, name=name, storage_path=storage_path, store=store)
    else:
        loop({"job": job.model_dump(mode="json")})
    return out
