"""`rrhf_ray.waits.Wait.get` on real Ray tasks, as the evaluation waits on its perplexity and
ranking tasks: answers in order within the limit; past it the task that did not return is
cancelled and the stage fails naming it (and only it) with the limit."""

from __future__ import annotations

import json
import time

import pytest
import ray

from rrhf_ray.config import load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState, StageTimer
from rrhf_ray.waits import StageTimeout, Wait

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
def answer(x: float) -> tuple[float, float]:
    return x, 0.0


@ray.remote(num_cpus=0)
def never_returns() -> None:
    time.sleep(3600)


def test_a_task_past_the_limit_is_cancelled_and_named(ray_cluster, tmp_path) -> None:
    config = load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'run'}", "eval.task_timeout_s=3"])
    state = RunState(tmp_path / "run", config)
    names = ["the reference perplexity task", "the judge perplexity task"]
    with StageTimer(state, "round1/eval"):  # a limit no starting worker process comes near
        wait = Wait(state, "the evaluation's tasks", 300.0, "eval.task_timeout_s")
        assert wait.get([answer.remote(12.5), answer.remote(30.0)], names, cancel=True) == [(12.5, 0.0),
                                                                                             (30.0, 0.0)]
    done, blocked = answer.remote(1.0), never_returns.remote()
    ray.get(done)  # one task has answered, the other never will
    with pytest.raises(StageTimeout) as caught, StageTimer(state, "round2/eval"):
        wait = Wait(state, "the evaluation's tasks", config.eval.task_timeout_s, "eval.task_timeout_s")
        wait.get([done, blocked], names, cancel=True)
    assert str(caught.value).startswith("round2/eval: the judge perplexity task did not finish within its "
                                        "limit of 3 s (eval.task_timeout_s; ")
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(blocked, timeout=60)
    failed = json.loads(state.path.read_text())["failed"]
    assert failed["stage"] == "round2/eval" and "the judge perplexity task" in failed["error"]
