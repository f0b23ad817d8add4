"""`dispatch_chunks` on a real local Ray cluster, with tiny worker actors defined here (no vLLM):
results in chunk order, a chunk whose worker died re-run on another worker, any other error
raised at once, a clear error when every worker is dead, and the board that names the worker the
driver waits on.

`dispatch_chunks` calls `ray.get`, so it runs inside a Ray task, as in the sampler and reward pools.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import ray

from rrhf_ray.actors.dispatch import ChunkTimeout, chunk_timeout, dispatch_chunks, read_board
from tests.helpers import wait_until

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0, max_restarts=0)
class Worker:
    """Squares a chunk of numbers. A chunk is (numbers, seconds to take, action): action
    "die@<w>" kills the process of worker w half-way through the chunk, "die" kills any worker,
    "raise" raises a ValueError, "hang@<w>" makes worker w take 300 s."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.ran: list[int] = []  # first number of each chunk started here

    def run(self, chunk: tuple[list[int], float, str]) -> dict:
        numbers, seconds, action = chunk
        self.ran.append(numbers[0])
        time.sleep(seconds / 2)
        if action in ("die", f"die@{self.index}"):
            os._exit(1)  # mid-chunk: half the work done, no result
        if action == "raise":
            raise ValueError(f"bad chunk starting at {numbers[0]}")
        if action == f"hang@{self.index}":
            time.sleep(300)
        time.sleep(seconds / 2)
        return {"squares": [n * n for n in numbers], "worker": self.index, "finished": time.time()}

    def started(self) -> list[int]:
        return list(self.ran)


@ray.remote(num_cpus=0, max_retries=0)
def dispatch(workers: list, chunks: list, desc: str | None = None, timeout: float | None = None) -> list:
    return dispatch_chunks(len(workers), lambda w, c: workers[w].run.remote(c), chunks,
                           [len(c[0]) for c in chunks], desc,
                           (lambda r: len(r["squares"])) if desc else None,
                           timeout=timeout, kill=lambda w: ray.kill(workers[w]), what="replica")


@pytest.fixture
def workers(ray_cluster):
    made: list = []

    def make(n: int) -> list:
        group = [Worker.remote(i) for i in range(n)]
        ray_cluster.get([w.started.remote() for w in group])  # all started before timing anything
        made.extend(group)
        return group

    yield make
    for w in made:
        ray_cluster.kill(w)


def chunk(i: int, seconds: float = 0.05, action: str = "") -> tuple[list[int], float, str]:
    return ([3 * i, 3 * i + 1, 3 * i + 2], seconds, action)


def squares(i: int) -> list[int]:
    return [n * n for n in (3 * i, 3 * i + 1, 3 * i + 2)]


def is_dead(ray_cluster, worker) -> bool:
    try:
        ray_cluster.get(worker.started.remote(), timeout=30)
    except ray_cluster.exceptions.RayActorError:
        return True
    return False


def test_results_come_back_in_chunk_order_from_several_workers(ray_cluster, workers) -> None:
    group = workers(3)
    # Uneven durations: early chunks are slow, so chunks finish out of order.
    chunks = [chunk(i, seconds=0.6 if i % 4 == 0 else 0.05) for i in range(10)]
    out = ray_cluster.get(dispatch.remote(group, chunks, desc="squaring"))
    assert [r["squares"] for r in out] == [squares(i) for i in range(10)]
    assert {r["worker"] for r in out} == {0, 1, 2}  # every worker took a share
    finished = [r["finished"] for r in out]
    assert finished != sorted(finished), "chunks finished in order: the test proves nothing"
    # Each chunk ran exactly once.
    started = sorted(n for w in group for n in ray_cluster.get(w.started.remote()))
    assert started == [3 * i for i in range(10)]


def test_no_chunks_and_one_worker(ray_cluster, workers) -> None:
    [only] = workers(1)
    assert ray_cluster.get(dispatch.remote([only], [])) == []
    out = ray_cluster.get(dispatch.remote([only], [chunk(i) for i in range(4)]))
    assert [r["squares"] for r in out] == [squares(i) for i in range(4)]
    assert ray_cluster.get(only.started.remote()) == [0, 3, 6, 9]  # submitted in chunk order


def test_a_worker_dying_mid_chunk_has_its_chunk_rerun_on_another(ray_cluster, workers) -> None:
    group = workers(2)
    # Chunk 3 kills worker 1 half-way if it lands there (chunks go 0→w0, 1→w1, 2→w0, 3→w1).
    chunks = [chunk(i, seconds=0.4, action="die@1" if i == 3 else "") for i in range(6)]
    out = ray_cluster.get(dispatch.remote(group, chunks))

    assert [r["squares"] for r in out] == [squares(i) for i in range(6)]
    assert is_dead(ray_cluster, group[1]), "worker 1 never ran chunk 3"
    assert out[3]["worker"] == 0  # chunk 3 was re-run on the survivor
    assert 9 in ray_cluster.get(group[0].started.remote())
    assert out[1]["worker"] == 1  # worker 1's result from before it died was kept, not redone
    assert [r["worker"] for r in out[4:]] == [0, 0]  # after the death only the survivor works


def test_any_other_error_is_raised_at_once(ray_cluster, workers) -> None:
    group = workers(2)
    # Chunk 0 fails fast on worker 0 while worker 1 is busy for 30 s with chunk 1.
    chunks = [chunk(0, seconds=0.1, action="raise"), chunk(1, seconds=30.0), chunk(2), chunk(3)]
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad chunk starting at 0") as info:
        ray_cluster.get(dispatch.remote(group, chunks))
    assert time.monotonic() - start < 20, "the error waited for the other chunks"
    assert isinstance(info.value, ray_cluster.exceptions.RayTaskError)
    assert not isinstance(info.value, ray_cluster.exceptions.RayActorError)
    # Not retried: the bad chunk ran once, on worker 0 (alive: a task error kills no actor);
    # worker 1 is still inside chunk 1, so the call did not wait for it.
    assert ray_cluster.get(group[0].started.remote()) == [0, 6]
    assert not is_dead(ray_cluster, group[0])


def test_every_worker_dead_is_a_runtime_error(ray_cluster, workers) -> None:
    group = workers(2)
    # Chunks 0 and 1 succeed; 2, 3 and 4 kill whichever worker runs them.
    chunks = [chunk(i, seconds=0.2, action="die" if i >= 2 else "") for i in range(5)]
    with pytest.raises(RuntimeError, match=r"every worker died; 3 of 5 chunks not done"):
        ray_cluster.get(dispatch.remote(group, chunks))
    assert is_dead(ray_cluster, group[0]) and is_dead(ray_cluster, group[1])


def test_no_workers_is_a_runtime_error(ray_cluster) -> None:
    with pytest.raises(RuntimeError, match=r"every worker died; 2 of 2 chunks not done"):
        ray_cluster.get(dispatch.remote([], [chunk(0), chunk(1)]))


def test_a_hung_worker_is_named_while_the_driver_waits_then_killed_and_its_chunks_rerun(ray_cluster, workers,
                                                                                        tmp_path) -> None:
    """Chunk 1 hangs on worker 1 (300 s). While it hangs, the dispatch task's board (Ray's
    key-value store, under the task's id) names each busy worker with its chunk and since when;
    the driver's `Wait.get` on that task records them in state.json, and `rrhf-ray status` prints
    them. With a 5 s limit per chunk, worker 1 is then killed and its chunks (the hung one and the
    one queued behind it) run on worker 0: every result, long before the hang would have ended
    (the clock of a queued chunk starts when its worker starts it). The board is gone once the
    task has returned."""
    from rrhf_ray.config import load_config
    from rrhf_ray.demo import DEMO_CONFIG
    from rrhf_ray.report import format_status
    from rrhf_ray.state import RunState, StageTimer
    from rrhf_ray.waits import Wait

    state = RunState(tmp_path / "run", load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'run'}"]))
    group = workers(2)
    chunks = [chunk(i, seconds=0.2, action="hang@1" if i == 1 else "") for i in range(4)]
    started = time.time()
    ref = dispatch.remote(group, chunks, timeout=5.0)
    on_disk = lambda: json.loads(state.path.read_text())
    out: list = []
    with StageTimer(state, "round1/sample"), \
            Wait(state, "the sampler replicas", None, "sampling.chunk_timeout_s") as wait:
        driver = threading.Thread(target=lambda: out.extend(wait.get([ref], ["the sampler replicas"])[0]))
        driver.start()
        wait_until(lambda: any(w["worker"] == "replica 1" for w in
                               on_disk()["running"].get("waiting", {}).get("workers", ())), 60,
                   "state.json naming replica 1")
        recorded = on_disk()["running"]["waiting"]
        status = format_status(on_disk(), "outs/run", now=time.time())
        driver.join(timeout=120)
    assert time.time() - started < 60
    assert [r["squares"] for r in out] == [squares(i) for i in range(4)]
    assert out[1]["worker"] == 0 and is_dead(ray_cluster, group[1])
    assert {r["worker"] for r in out} == {0}  # worker 1 finished nothing: it hung on its first chunk
    hung = next(w for w in recorded["workers"] if w["worker"] == "replica 1")
    assert (hung["chunk"], hung["chunks"], hung["queries"]) == (1, 4, 3)
    assert started <= hung["since"] <= time.time()
    assert recorded["on"] == "the sampler replicas"
    assert "\n  replica 1: chunk 2 of 4 (3 queries) for " in status
    assert read_board(ref) is None  # the task returned: its board went with it


def test_every_worker_hung_names_them(ray_cluster, workers) -> None:
    [only] = workers(1)
    with pytest.raises(ChunkTimeout, match=r"every replica died or hung \(replica 0 ran chunk 0 \(3 queries\) "
                                           r"for \d+ s, past its limit of 2 s\); 2 of 2 chunks not done"):
        ray_cluster.get(dispatch.remote([only], [chunk(0, action="hang@0"), chunk(1)], timeout=2.0))


def test_chunk_timeout_is_derived_from_the_pace_of_the_call() -> None:
    assert chunk_timeout(32, []) == 1800.0  # nothing finished yet: an engine's first call may be slow
    assert chunk_timeout(32, [0.5, 2.0]) == 10 * 2.0 * 32  # 10× the slowest pace
    assert chunk_timeout(4, [0.5]) == 300.0  # never under 5 minutes
    assert chunk_timeout(4, [0.5], configured=12.0) == 12.0
