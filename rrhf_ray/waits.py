"""The driver's waits on a stage's actors and tasks: a time limit for each, and a record in
state.json of what it waits on.

A round's training (the warm trainer's worker group), its refresh (the sampler replicas loading
the round's weights, then answering the probe) and its evaluation's Ray tasks (the perplexity and
ranking tasks) are each waited on under a limit (`stage_limit`: the config's key, else 10× the
longest earlier round of the same stage, at least 300 s; 2 hours when no round of it has finished
yet; the rule of `rrhf_ray.actors.dispatch.work_timeout`, which limits each sampling and scoring
request). Past it the stage fails with `StageTimeout`, one line naming the stage, what did not
answer and the limit; `state.json` records the stage as failed and the same command resumes there.

While the driver waits, `waiting` in the record of the wait's stage (`running`, or the stage's
entry under `running.beside` when another stage started after it: the online policy's one-step
overlap) names what it waits on, since when and under which limit (`rrhf-ray status` shows it):
written once a wait has lasted `RECORD_AFTER_S`, so short waits cost no write, rewritten at most
every `RECORD_EVERY_S` when what it waits on changes, and removed when it ends. A sampling or scoring stage waits on one
coordinating task; its `workers` (`rrhf_ray.actors.dispatch.read_board`) name the replicas or
scorers that task waits on, each with its chunk and since when.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from rrhf_ray.actors.dispatch import read_board, work_timeout

if TYPE_CHECKING:
    import ray

    from rrhf_ray.state import RunState

FIRST_LIMIT_S = 7200.0  # a stage's first round: nothing measured (model loads, compilation)
RECORD_AFTER_S = 2.0
RECORD_EVERY_S = 5.0
POLL_S = 0.5


class StageTimeout(RuntimeError):
    """A stage's actor or task did not answer within the stage's time limit."""


def stage_limit(stages: Mapping[str, Any], step: str, configured: float | None) -> float:
    """The time limit of round r's `step` ("train", "refresh", "eval"): `configured`, else
    derived from the seconds of the rounds whose `step` state.json records (`stages`) as
    `rrhf_ray.actors.dispatch.work_timeout` derives it, `FIRST_LIMIT_S` before any."""
    measured = [float(info["seconds"]) for name, info in list(stages.items())  # a copy: stages may grow meanwhile
                if name.startswith("round") and name.endswith(f"/{step}")
                and isinstance(info, dict) and isinstance(info.get("seconds"), (int, float))]
    return work_timeout(measured, configured, first=FIRST_LIMIT_S)


class Wait:
    """`with Wait(state, what, limit, key) as wait:` around the driver's wait on `what` (e.g. "the
    trainer worker group"): `wait.poll(on)` in the polling loop records what it waits on in
    state.json (`state` None: nowhere), `wait.expired()` says when `limit` seconds (None: none)
    have passed since the wait began, `wait.timeout(on)` is the error to raise then (`key` names
    the config key that sets the limit); `wait.get(refs, names)` does all of it for Ray refs.
    The clock starts when the driver starts waiting (the first of these calls), not when the
    object is made: an evaluation's tasks are timed from when the driver has nothing left to do
    but wait for them, a refresh's from its first load to its last probe answer."""

    def __init__(self, state: RunState | None, what: str, limit: float | None, key: str) -> None:
        self.state, self.what, self.limit, self.key = state, what, limit, key
        # The stage this wait belongs to: the one its thread runs (two may run at once under the
        # online policy's one-step overlap); its record in state.json holds the wait.
        self.stage = state.stage_of_this_thread() if state is not None else None
        self.since = 0.0  # wall clock, for `rrhf-ray status`
        self._start: float | None = None  # the clock starts at the first poll, get or check
        self._recorded: str | None = None  # what the record in state.json names
        self._written = 0.0  # monotonic time of the last write

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.end()

    def elapsed(self) -> float:
        """Seconds since the driver began this wait (its first `poll`, `get` or check)."""
        if self._start is None:
            self._start, self.since = time.monotonic(), time.time()
        return time.monotonic() - self._start

    def remaining(self) -> float | None:
        return None if self.limit is None else self.limit - self.elapsed()

    def expired(self) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit

    def poll(self, on: str | None = None,
             workers: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]] | None = None) -> None:
        """Record that the driver waits on `on` (default: `what`), and through it on `workers`
        (`rrhf_ray.actors.dispatch.read_board`'s entries, or a function that reads them, called
        only when a record may be written), once the wait has lasted `RECORD_AFTER_S`; again when
        either changed, at most every `RECORD_EVERY_S`."""
        on = on or self.what
        elapsed, now = self.elapsed(), time.monotonic()
        if self.state is None or elapsed < RECORD_AFTER_S:
            return
        if self._recorded is not None and now - self._written < RECORD_EVERY_S:
            return
        workers = workers() if callable(workers) else workers
        shown = repr((on, [(w.get("worker"), w.get("chunk")) for w in workers or ()]))
        if shown == self._recorded:
            return
        with self.state.lock:
            running = self.state.running_record(self.stage)
            if running is None:
                return
            waiting = {"on": on, "since": self.since, "limit_s": self.limit, "key": self.key}
            if workers:
                waiting["workers"] = [dict(w) for w in workers]
            running["waiting"] = waiting
            self.state.save()
        self._recorded, self._written = shown, now

    def end(self) -> None:
        """The wait is over: its record leaves state.json (written only when there was one)."""
        if self._recorded is None or self.state is None:
            return
        with self.state.lock:
            running = self.state.running_record(self.stage)
            if running is not None and running.pop("waiting", None) is not None:
                self.state.save()
        self._recorded = None

    def timeout(self, on: str | None = None) -> StageTimeout:
        """The error for a wait past its limit: the stage, what did not answer, the limit."""
        running = self.state.running_record(self.stage) if self.state is not None else None
        named = self.stage or (running.get("stage") if running is not None else None)
        stage = f"{named}: " if named else ""
        return StageTimeout(
            f"{stage}{on or self.what} did not finish within its limit of {self.limit:.0f} s ({self.key}; "
            f"by default 10× the stage's longest earlier round, at least 300 s); the stage is failed: "
            f"raise {self.key} if the work is that slow, and run the same command to resume there")

    def get(self, refs: Sequence[ray.ObjectRef], names: Sequence[str], *, cancel: bool = False) -> list[Any]:
        """`ray.get(refs)` under this wait: `names[i]` names what computes `refs[i]` (e.g. "sampler
        replica 1") in the record and the error. Past the limit raises `StageTimeout` naming those
        not done; `cancel`: tasks, which are cancelled first (an actor's call cannot be)."""
        import ray

        pending = dict(zip(refs, names))
        while pending:
            remaining = self.remaining()
            step = POLL_S if remaining is None else max(0.0, min(POLL_S, remaining))
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=step)
            for ref in ready:
                pending.pop(ref)
            if not pending:
                break
            late = ", ".join(pending.values())
            self.poll(late, lambda: [w for ref in pending for w in read_board(ref) or ()])
            if self.expired():
                if cancel:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                raise self.timeout(late)
        return ray.get(list(refs))
