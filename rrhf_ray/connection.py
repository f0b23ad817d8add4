"""The driver's connection to Ray: join the configured cluster or start a local one, with the
run's logs routed to `<output.dir>/logs/` (`rrhf_ray.logs`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rrhf_ray.config import RunConfig

logger = logging.getLogger(__name__)

# A small local cluster runs more processes (engines, trainer, tasks) than it has CPUs, and Ray
# kills idle task workers beyond that count after 1 s: every round's scoring and evaluation tasks
# would then pay for a new Python process. Idle workers live 10 minutes here.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}


# Ray Train starts, for every worker group, an actor that polls the cluster for nodes about to be
# preempted (cloud spot instances): on a cluster of this machine alone there are none, and the
# actor is one more process per fit (~1.5 s of CPU). Off for the local clusters a run starts
# (the variable set in the environment wins); the driver passes it on to Ray Train's controller.
PREEMPTION_WATCHER = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def without_preemption_watcher() -> None:
    """Turn Ray Train's preemption watcher off (`PREEMPTION_WATCHER`) unless the user set it."""
    os.environ.setdefault(*PREEMPTION_WATCHER)


def connect_ray(config: RunConfig) -> str | None:
    """Join the configured cluster (`ray.address` or RAY_ADDRESS) or start a local one. The run's
    logs go to `<output.dir>/logs/` from here on (`rrhf_ray.logs`): the driver's log, and the
    output of the actors and Ray processes, kept off the console unless `--verbose`. Returns that
    log directory, which the actors and trainers this run starts are given (None: Ray's own logs,
    for an `output.dir` on object storage, whose local mirror the driver connects with)."""
    import ray

    from rrhf_ray import logs
    from rrhf_ray.remote import is_remote

    log_dir = None
    if not is_remote(config.output.dir):  # a bucket run connects with its local mirror's path
        log_dir = str(logs.start_run_logs(Path(config.output.dir) / "logs"))
    log_to_driver = logs.ray_log_to_driver()
    if not ray.is_initialized():  # else joined already (a notebook's or a test's ray.init)
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            logger.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            without_preemption_watcher()
            ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     _system_config=LOCAL_SYSTEM_CONFIG)
            logger.info("started a local Ray cluster: %s", ray.cluster_resources())
    if logs.quiet():
        logs.quiet_library_loggers()  # ray.init configured Ray's loggers anew
        if log_to_driver:
            logs.route_worker_output()
    return log_dir
