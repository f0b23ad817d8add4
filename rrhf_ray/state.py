"""The run state of one output directory: which stages finished, with which config.

`state.json` records each finished stage (its seconds and what it produced); the driver skips a
finished stage whose outputs exist, so a killed run resumes where it stopped. The config's
fingerprint (everything but the round count and the Ray connection) must not change within one
output directory.

While a stage runs, `state.json` also names it under `running` (stage, wall-clock start, the
driver's pid, host and process start time), so that `rrhf-ray status` can tell a live run from a
killed one (`driver_alive`); a stage of the same driver still running when another starts (the
online policy's one-step overlap) is listed under the new record's `beside`. A stage that raised
leaves `failed` (stage, seconds, the error) instead, until the next stage starts (with
`interrupted: true` for a stage a stop signal ended).

One driver per output directory: `DriverLock` holds `driver.lock` (an exclusive `flock`, which
the kernel drops when its process dies, plus the driver's pid, host and start) for the whole run;
a second driver is refused naming the first, and the lock of a driver that is gone is taken over.
`state.json` is written to a temporary name, flushed to disk and renamed (`write_json_atomic`),
so a full disk or a crash leaves the previous version whole; a full disk is reported with the
path that could not be written (`no_space`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rrhf_ray.config import ConfigError, RunConfig, TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "driver.lock"


# Config keys added after runs were written, with the value that means "as before": at that
# value a key is left out of the fingerprint, so that adding a setting does not make every
# earlier run's state.json a "different config". A run that sets the key to anything else is one.
ADDED_LATER: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("data", "max_response_tokens"), None),
    (("train", "skip_nonfinite"), False),
    (("sft", "train", "skip_nonfinite"), False),
    (("reward_model", "train", "skip_nonfinite"), False),
    (("data", "chat_template"), "auto"),  # auto: a raw-text query stays as it was
    (("reward", "chat_template"), "auto"),
    (("online",), None),  # the online policy's section: absent outside sampling.preset OP
    (("data", "chat_template_path"), None),
    (("reward", "chat_template_path"), None),
    (("online", "max_staleness"), 0),
)


def _drop_added_later(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a config's dump) without the `ADDED_LATER` keys that hold their "as before" value."""
    for path, before in ADDED_LATER:
        *parents, key = path
        section: Any = data
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section and section[key] == before:
            del section[key]
    return data


# Where each role runs (the sections' Ray custom `resources`) changes no result, and may change
# when a run resumes on another cluster: like the Ray connection, it is not fingerprinted. Nor is
# how SFT lays out its rows (`packing`), nor which kernel computes the packed rows' attention
# (`prefix_attention`: auto picks by the device), both the same loss and gradients up to float
# rounding, nor how long a hung worker, trainer, refresh or evaluation task is waited for
# (`chunk_timeout_s`, `round_timeout_s`, `refresh_timeout_s`, `task_timeout_s`): a run that failed
# past a limit resumes with a higher one; nor whether a refresh moves the weights through disk or
# the object store (`sampling.refresh_transport`: the same tensors either way).
_PLACEMENT = frozenset({"resources", "chunk_timeout_s", "refresh_timeout_s", "task_timeout_s"})
_SAMPLING_LAYOUT = _PLACEMENT | {"refresh_transport"}
_FIT_LAYOUT = frozenset({"resources", "packing", "prefix_attention", "round_timeout_s"})


def _fingerprint_data(config: RunConfig, *, as_typed: bool = False) -> dict[str, Any]:
    data = _drop_added_later(config.model_dump(mode="json", exclude={
        "rounds": True, "ray": True, "tracking": True, "sampling": _SAMPLING_LAYOUT, "reward": _PLACEMENT,
        "train": _FIT_LAYOUT, "eval": _PLACEMENT, "sft": {"train": _FIT_LAYOUT},
        "reward_model": {"train": _FIT_LAYOUT}}))
    out = data["output"]["dir"]
    if not as_typed and "://" not in out:
        # By meaning, not spelling: `outputs/demo`, `$PWD/outputs/demo` and `outputs/demo/` are one run.
        data["output"]["dir"] = str(Path(out).resolve())
    return data


def _hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def config_fingerprint(config: RunConfig) -> str:
    """What must not change within one output directory: everything but the round count,
    the Ray connection and progress display; a local `output.dir` counts as its resolved
    absolute path, however it is spelled."""
    return _hash(_fingerprint_data(config))


def earlier_fingerprints(config: RunConfig) -> set[str]:
    """The fingerprints the same config had under earlier code, so that a run started then
    still resumes: `output.dir` as typed (before it counted as its resolved path; the same
    spelling as then is needed to match), and under the earlier schema: the SFT and
    reward-model stages' `train` was the RRHF `TrainConfig` (its RRHF-only keys at their
    defaults), the pairwise losses had no `pairs` (today's default `all` is what they did),
    and `sampling.refresh_tolerance` defaulted to 0.05 (now None: set from the served dtype).
    Empty when the config reads the same every way."""
    data = _fingerprint_data(config, as_typed=True)
    found = {_hash(data)}
    for stage in ("sft", "reward_model"):
        if data.get(stage) is not None:
            data[stage]["train"] = TrainConfig.model_validate(data[stage]["train"]).model_dump(
                mode="json", exclude=_FIT_LAYOUT)
    if data["train"]["loss"].get("pairs") == "all":
        del data["train"]["loss"]["pairs"]
    if data["sampling"].get("refresh_tolerance") is None:
        data["sampling"]["refresh_tolerance"] = 0.05
    found.add(_hash(_drop_added_later(data)))
    return found - {config_fingerprint(config)}


@contextlib.contextmanager
def no_space(path: str | Path) -> Iterator[None]:
    """Around a write of `path`: a full disk (ENOSPC, EDQUOT) raises an OSError that says
    "no space left" and names `path` (a write into an open file names no file of its own)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or err.filename:
            raise
        raise OSError(err.errno, "no space left on device", str(path)) from err


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as JSON at `path`: written to a temporary sibling, flushed to disk, renamed. A
    failed write (a full disk) leaves the previous file whole and no temporary behind."""
    text = json.dumps(data, indent=2, default=str).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with no_space(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class RunState:
    """The finished stages of one output directory, and the config they were made with.

    Two stages may run at once (the online policy's one-step overlap trains one segment in a
    thread while the driver samples the next): every change of `data` and every write holds
    `lock`; `running` names the stage started last and lists the stages of this driver that still
    run under `beside` (a stage that ends leaves the record, and the earliest stage beside it
    takes its place)."""

    def __init__(self, out: Path, config: RunConfig) -> None:
        self.lock = threading.RLock()
        self._thread_stages: dict[int, str] = {}  # thread → the stage it started last
        self.path = out / STATE_FILE
        fingerprint = config_fingerprint(config)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["fingerprint"] in earlier_fingerprints(config):
                self.data["fingerprint"] = fingerprint  # the same config, in today's schema
            if self.data["fingerprint"] != fingerprint:
                raise ConfigError(
                    f"output directory {out} holds a run with a different config "
                    f"(see {self.path}); use another output.dir, or the same config "
                    f"(only `rounds` may grow)"
                )
        else:
            self.data = {"fingerprint": fingerprint, "config": config.model_dump(mode="json"), "stages": {}}
        self.data["rounds"] = config.rounds
        write_json_atomic(self.path, self.data)

    def save(self) -> None:
        with self.lock:
            write_json_atomic(self.path, self.data)

    def done(self, stage: str, *outputs: Path) -> bool:
        return stage in self.data["stages"] and all(p.exists() for p in outputs)

    def start(self, stage: str) -> None:
        """Record `stage` as running in this process (written before its work starts)."""
        with self.lock:
            self.data.pop("failed", None)
            self._thread_stages[threading.get_ident()] = stage
            record = {"stage": stage, "started": time.time(), "pid": os.getpid(),
                      "host": socket.gethostname(), "pid_started": process_start_ticks(os.getpid())}
            previous = self.data.get("running")
            if isinstance(previous, dict) and previous.get("pid") == os.getpid():
                # This driver's stages that still run (one-step overlap): listed beside the new one.
                again = previous.get("stage") == stage  # (a retry replaces its own record)
                own = {k: previous[k] for k in ("stage", "started", "waiting") if k in previous}
                beside = [*([] if again else [own]), *previous.get("beside", ())]
                if beside:
                    record["beside"] = beside
            self.data["running"] = record
            write_json_atomic(self.path, self.data)

    @staticmethod
    def _names(named: object, stage: str) -> bool:
        """Whether a record's stage name `named` is `stage`, alone or among stages run as one
        (`timed_stages`' joint name "a + b")."""
        return isinstance(named, str) and (stage == named or stage in named.split(" + "))

    def stage_of_this_thread(self) -> str | None:
        """The stage this thread started last (`start`): the one whose work calls from here."""
        return self._thread_stages.get(threading.get_ident())

    def running_record(self, stage: str | None) -> dict[str, Any] | None:
        """`stage`'s record in `running`: `running` itself, or its entry under `beside`; None when
        neither names it (`stage` None: `running`, whatever it names). Call holding `lock`."""
        running = self.data.get("running")
        if not isinstance(running, dict):
            return None
        for record in (running, *running.get("beside", ())):
            if isinstance(record, dict) and (stage is None or self._names(record.get("stage"), stage)):
                return record
        return None

    def _stop_running(self, stage: str) -> dict[str, Any]:
        """`stage` taken out of `running` (which names stages run as one by a joint name:
        `timed_stages`) and returned as a record with the driver's pid and host, or {} when it is
        not there. When `running` named it, the earliest stage beside it takes its place."""
        for thread, started in list(self._thread_stages.items()):  # its thread runs it no more
            if self._names(started, stage):
                del self._thread_stages[thread]
        running = self.data.get("running")
        if not isinstance(running, dict):
            return {}

        def names(record: dict[str, Any]) -> bool:  # (a record without a stage name: ended too)
            named = record.get("stage")
            return not isinstance(named, str) or self._names(named, stage)

        beside = [b for b in running.get("beside", ()) if isinstance(b, dict)]
        if not names(running):
            kept = [b for b in beside if not names(b)]
            if len(kept) == len(beside):
                return {}
            if kept:
                running["beside"] = kept
            else:
                running.pop("beside", None)
            return {"stage": stage, "pid": running.get("pid"), "host": running.get("host")}
        self.data.pop("running")
        running.pop("beside", None)
        if beside:
            first, *rest = beside
            driver = {k: running[k] for k in ("pid", "host", "pid_started") if k in running}
            self.data["running"] = {**first, **driver, **({"beside": rest} if rest else {})}
        return running

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        with self.lock:
            self._stop_running(stage)
            self.data["stages"][stage] = {"seconds": round(seconds, 2), "finished": time.time(), **info}
            write_json_atomic(self.path, self.data)

    def fail(self, stage: str, seconds: float, error: BaseException) -> None:
        """Record that `stage` raised `error` (the run stops; started again, it redoes the stage)."""
        with self.lock:
            self._fail(stage, seconds, error)

    def _fail(self, stage: str, seconds: float, error: BaseException) -> None:
        failed = self.data.get("failed")
        if isinstance(failed, dict) and failed.get("interrupted") and failed.get("pid") == os.getpid() \
                and not isinstance(error, KeyboardInterrupt):
            # A stage run beside the interrupted one, failing as the run shuts its actors down:
            # the stop is the cause, and stays the record.
            logger.info("%s ended with the stopped run: %s: %s", stage, type(error).__name__, error)
            self._stop_running(stage)
            return
        running = self._stop_running(stage)
        # A Ray task's error wraps the task's own (once per task on the way): record that one.
        while isinstance(cause := getattr(error, "cause", None), BaseException) and cause is not error:
            error = cause
        record = {"stage": stage, "seconds": round(seconds, 2), "finished": time.time(),
                  "error": f"{type(error).__name__}: {error}"[:500],
                  "pid": running.get("pid", os.getpid()), "host": running.get("host", socket.gethostname())}
        if isinstance(error, KeyboardInterrupt):  # SIGINT, or SIGTERM (`StopSignal`): not a fault
            record["interrupted"] = True
        self.data["failed"] = record
        write_json_atomic(self.path, self.data)

    def seconds(self, stage: str) -> float:
        return self.data["stages"].get(stage, {}).get("seconds", 0.0)


class StageTimer:
    """`with StageTimer(state, name) as timer:` around a stage's work: the stage is recorded as
    running while the block runs and as failed (with its error) when the block raises, also on
    KeyboardInterrupt; `timer.seconds` is the block's wall time once it ends. A SIGKILL leaves
    `running`, which `driver_alive` tells from a live run."""

    def __init__(self, state: RunState, name: str) -> None:
        self.state, self.name, self.seconds = state, name, 0.0

    def __enter__(self) -> Self:
        logger.debug("%s: starting", self.name)  # driver.log only; the console gets the finish line
        self.state.start(self.name)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._start
        if isinstance(error, KeyboardInterrupt) and not getattr(error, "stage", None):
            error.stage = self.name  # the console's last line names it (rrhf_ray.cli)
        if error is not None:
            try:
                self.state.fail(self.name, self.seconds, error)
            except Exception:  # never hide the stage's own error
                logger.warning("could not record the failure of %s in %s", self.name, self.state.path,
                               exc_info=True)


def timed_stage(state: RunState, stage: str, outputs: Sequence[Path], work: Callable[..., dict | None],
                *args: Any) -> bool:
    """Run `work(*args)` as `stage` unless the stage is finished with all its outputs, and record
    what it returns with its seconds; returns True if it ran."""
    if state.done(stage, *outputs):
        logger.info("%s: done already, skipped", stage)
        return False
    with StageTimer(state, stage) as timer:
        info = work(*args) or {}
    state.finish(stage, timer.seconds, **info)
    from rrhf_ray.logs import stage_line

    logger.info("%s", stage_line(stage, state.seconds(stage), info), extra={"console": True})
    return True


def timed_stages(state: RunState, stages: Sequence[str], work: Callable[..., dict[str, dict]], *args: Any) -> None:
    """Several stages done by one piece of work (round r's evaluation and round r+1's sampling in
    one engine pass): run `work(*args)` once, then record each stage with the info `work` returned
    for it. An info may carry its share of the wall time as `seconds` (e.g. the sampling's part of
    the pass); the stages without one split the rest. Each record names the others under
    `batched_with`. Killed or failed before the end, none is recorded: a resume redoes the pass.
    The caller passes only stages that are not done."""
    with StageTimer(state, " + ".join(stages)) as timer:
        infos = work(*args)
    given = sum(info.get("seconds", 0.0) for info in infos.values())
    rest = [s for s, info in infos.items() if "seconds" not in info]
    from rrhf_ray.logs import stage_line

    for stage in stages:  # in the caller's order
        info = dict(infos[stage])
        seconds = info.pop("seconds", None)
        if seconds is None:
            seconds = max(0.0, timer.seconds - given) / len(rest)
        info["batched_with"] = [s for s in stages if s != stage]
        state.finish(stage, seconds, **info)
        logger.info("%s (one pass with %s)", stage_line(stage, state.seconds(stage), info),
                    " and ".join(info["batched_with"]), extra={"console": True})


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux `/proc/<pid>/stat`), or None
    where unknown: with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, after "pid (comm) "
    except (OSError, ValueError, IndexError):
        return None


def driver_alive(running: dict[str, Any]) -> bool | None:
    """Whether the driver process of a `running` record of state.json is alive: None when it ran
    on another host (nothing to check from here); False when its pid is gone, a zombie, or now
    another process (a different start time)."""
    if running.get("host") != socket.gethostname() or not isinstance(running.get("pid"), int):
        return None
    pid = running["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return False
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # killed, not yet reaped by its parent
    except (OSError, IndexError):
        pass
    recorded, now = running.get("pid_started"), process_start_ticks(pid)
    return not (recorded is not None and now is not None and recorded != now)


class DriverBusyError(ConfigError):
    """Another driver, alive, holds the output directory."""


class DriverLock:
    """`with DriverLock(out):` around a driver's work on output directory `out`: at most one
    driver at a time. The lock is an exclusive `flock` on `out/driver.lock` (dropped by the
    kernel when the holding process dies, however it dies) and the file names the holder
    (pid, host, process start, wall-clock start). A live holder refuses the second driver with
    `DriverBusyError` naming it; the lock of a driver that is gone is taken over (logged)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise self._busy(self.holder()) from None
        before = self.holder()
        # A file system without working flock (some network mounts): the record still tells.
        if before.get("pid") not in (None, os.getpid()) and driver_alive(before):
            os.close(fd)
            raise self._busy(before)
        if before.get("pid") not in (None, os.getpid()):
            logger.warning("%s: taking over the lock of driver pid %s on host %s, which is gone",
                           self.path.parent, before.get("pid"), before.get("host"), extra={"console": True})
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "pid_started": process_start_ticks(os.getpid())}
        with no_space(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        self._fd = fd
        return self

    def _busy(self, holder: dict[str, Any]) -> DriverBusyError:
        since = holder.get("started")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else ""
        return DriverBusyError(
            f"output directory {self.path.parent} is in use by a running driver (pid {holder.get('pid', '?')} "
            f"on host {holder.get('host', '?')}{when}); wait for it to end, stop it, or use another output.dir")

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # an empty record: nobody holds it
            os.close(self._fd)  # drops the flock
            self._fd = None
