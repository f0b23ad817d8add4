"""A quiet console and per-run log files (`<output.dir>/logs/`).

By default (`rrhf-ray` without `--verbose`) a run's console shows one line per finished stage
with its key numbers (`stage_line`), the progress bars, warnings of this package and the round
table. Everything else goes to `<output.dir>/logs/`:

- `driver.log`: the driver's whole log (this package at DEBUG, libraries at INFO, Python warnings);
- `<component>-<pid>.log`: stdout + stderr of each sampler, reward scorer and Ray Train worker
  (vLLM, transformers and torch output included), redirected at the file-descriptor level by
  `redirect_process_output` when the process starts;
- `ray-workers.log`: what the other Ray processes print (Ray Train's controller, the coordinator
  tasks, Ray's own actors), routed here by the driver instead of the console (`route_worker_output`).

`--verbose` shows everything on the console, nothing filtered (the files are written too).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

PACKAGE = "rrhf_ray"
WORKER_LOG = "ray-workers.log"
DRIVER_LOG = "driver.log"
RAYLET_NOISE = "worker processes have been started"  # Ray's start-up concurrency notice
# Loggers of libraries that install their own console handler (propagate off): in quiet mode
# their records go to driver.log through the root logger instead.
_LIBRARY_LOGGERS = ("ray", "vllm", "transformers", "datasets", "torch", "tensorboardX", "mlflow", "wandb")

_lock = threading.Lock()
_state: dict[str, Any] = {"verbose": False, "log_dir": None, "file": None, "console": None}


# --------------------------------------------------------------------------- console lines


def _fmt(value: Any, spec: str = ".3f") -> str | None:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else None


# Per stage kind: where its numbers sit in the stage's info, and (key, label, format, unit) each.
STAGE_NUMBERS: dict[str, tuple[str | None, tuple[tuple[str, str, str, str], ...]]] = {
    "score": ("pool", (("reward_mean", "pool reward mean", "+.3f", ""),)),
    "train": ("train", (("loss", "loss", ".3f", ""), ("rank_accuracy", "rank acc", ".3f", ""))),
    "refresh": (None, (("logprob_gap", "log-prob gap", ".4f", " nats/token"),)),
    "eval": ("eval", (("sampled_reward_mean", "sampled reward", "+.3f", ""),
                      ("eval_reward_mean", "greedy reward", "+.3f", ""))),
}


def stage_line(stage: str, seconds: float, info: dict[str, Any] | None) -> str:
    """The one console line of a finished stage: its name, wall time and the numbers that matter
    (sample → groups / candidates, score → pool reward mean, train → loss / rank accuracy,
    refresh → log-prob gap, eval → sampled and greedy reward); other stages just their time."""
    info = info or {}
    kind = stage.rsplit("/", 1)[-1]
    parts: list[str] = []
    if kind == "sample" and "groups" in info:
        parts.append(f"{info['groups']} groups, {info.get('candidates', 0)} candidates")
    elif kind in STAGE_NUMBERS:
        section, fields = STAGE_NUMBERS[kind]
        values = (info.get(section) or {}) if section else info
        for key, label, spec, unit in fields:
            value = _fmt(values.get(key), spec)
            if value is not None:
                parts.append(f"{label} {value}{unit}")
    numbers = f": {', '.join(parts)}" if parts else ""
    return f"{stage} done in {seconds:.1f} s{numbers}"


# --------------------------------------------------------------------------- driver logging


class _ConsoleFilter(logging.Filter):
    """Quiet console: this package's records marked `console` (stage lines), this package's
    warnings, and errors from anywhere. Off (everything passes) while no driver.log is attached."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or _state["file"] is None:
            return True
        if record.levelno >= logging.ERROR or getattr(record, "console", False):
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] == PACKAGE


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record arrives (not the one at start)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console(verbose: bool) -> None:
    """The console handler of a `rrhf-ray` command (replaces `logging.basicConfig`, and like it
    adds none when the root logger has handlers already, e.g. under pytest)."""
    root = logging.getLogger()
    with _lock:
        _state["verbose"] = verbose
        if _state["console"] is None and not root.handlers:
            handler = _Stderr()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.addFilter(_ConsoleFilter())
            root.addHandler(handler)
            _state["console"] = handler
        if _state["console"] is not None:
            _state["console"].setLevel(logging.DEBUG if verbose else logging.INFO)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger(PACKAGE).setLevel(logging.DEBUG)


def start_run_logs(log_dir: str | os.PathLike) -> Path:
    """Write the driver's log to `log_dir/driver.log` (the console becomes quiet unless verbose),
    and the raylet's and Ray's own workers' lines to `log_dir` (`route_worker_output`); returns
    the resolved directory, which the driver hands the actors it starts. A second call (another
    run in this process, `compare`) moves to the new directory."""
    path = Path(log_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with _lock:
        if _state["file"] is not None and _state["log_dir"] == path:
            return path
        if _state["file"] is not None:
            root.removeHandler(_state["file"])
            _state["file"].close()
        handler = logging.FileHandler(path / DRIVER_LOG, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        _state["file"], _state["log_dir"] = handler, path
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger(PACKAGE).setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    if not _state["verbose"]:
        quiet_library_loggers()
    return path


def stop_run_logs() -> None:
    """Close driver.log and forget the run's log directory (the end of a `rrhf-ray` command):
    the console shows everything again."""
    with _lock:
        handler, _state["file"], _state["log_dir"] = _state["file"], None, None
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def quiet_library_loggers() -> None:
    """Libraries that print through their own console handler (Ray, vLLM, transformers) log
    through the root logger instead: to driver.log, and to the console only what passes
    `_ConsoleFilter`. Called again after `ray.init`, which configures Ray's loggers anew."""
    if _state["verbose"] or _state["file"] is None:
        return
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lib.removeHandler(h)
        lib.propagate = True
    try:  # transformers keeps its handler behind its own switch
        import transformers.utils.logging as tlog

        tlog.disable_default_handler()
        tlog.enable_propagation()
        tlog.disable_progress_bar()  # "Writing model shards" bars of the driver's own saves
    except Exception:
        logging.getLogger(__name__).debug("transformers' logging not quieted", exc_info=True)


def current_log_dir() -> str | None:
    """The directory whose driver.log this process writes now (`start_run_logs`), else None."""
    return str(_state["log_dir"]) if _state["log_dir"] is not None else None


def quiet() -> bool:
    """Whether the console is quiet: a run's log directory is set and `--verbose` was not given."""
    return _state["log_dir"] is not None and not _state["verbose"]


# --------------------------------------------------------------------------- Ray processes


def redirect_process_output(log_dir: str | os.PathLike | None, component: str) -> Path | None:
    """Send this process's stdout and stderr (file descriptors 1 and 2: C and C++ output too) to
    `log_dir/<component>-<pid>.log`, appended. Progress-bar lines of `ray.experimental.tqdm_ray`
    still go to the original stdout, so that the driver draws the bar. Nothing happens when
    `log_dir` is None or cannot be written (e.g. a node that does not see the driver's disk)."""
    if log_dir is None:
        return None
    try:
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{component}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    if isinstance(sys.stdout, _ProgressPassthrough):  # redirected before (a kept engine's next run)
        console_stream = sys.stdout.console  # the original stdout, not the last log file
        sys.stdout = sys.stdout.file
    else:
        console_stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = _ProgressPassthrough(sys.stdout, console_stream)
    print(f"== {component} pid {os.getpid()} output from {time.strftime('%Y-%m-%d %H:%M:%S')} ==", flush=True)
    return path


class _ProgressPassthrough:
    """sys.stdout after `redirect_process_output`: everything to the log file (fd 1) except the
    JSON lines of `tqdm_ray`, which go to the process's original stdout (Ray's log stream)."""

    _MAGIC = "__ray_tqdm_magic_token__"

    def __init__(self, file: Any, console: Any) -> None:
        self.file, self.console = file, console

    def write(self, text: str) -> int:
        if self._MAGIC in text:
            return self.console.write(text)
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def stop_worker_progress() -> None:
    """No more progress bars of Ray workers on this console (`route_worker_output`): later updates
    are dropped and the bars drawn are cleared. For a stopped or failed run, whose last console line
    is its error: a trainer still reporting steps as it is shut down would print below that line."""
    _state["bars_stopped"] = True
    manager = getattr(sys.modules.get("ray.experimental.tqdm_ray"), "_manager", None)
    if manager is not None:
        manager.hide_bars()


def resume_worker_progress() -> None:
    """Ray workers' progress bars shown again after `stop_worker_progress` (the next command of
    this process, e.g. a test's or a notebook's)."""
    _state["bars_stopped"] = False


def worker_progress(total: int, desc: str, unit: str) -> Any:
    """A progress bar that the driver draws (`ray.experimental.tqdm_ray`) for work in a Ray
    worker process (rank 0 of a training run); None outside Ray workers, where log lines suffice."""
    try:
        import ray

        if not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
            return None
        from ray.experimental.tqdm_ray import tqdm
    except (ImportError, AttributeError):
        return None
    return tqdm(total=total, desc=desc, unit=unit)


def route_worker_output() -> None:
    """In the driver after `ray.init(log_to_driver=True)`: the lines Ray forwards from its
    workers go to `<log dir>/ray-workers.log` instead of the console, except progress-bar
    updates (`tqdm_ray`), which the driver still draws. Uses Ray's internal log dispatcher; where
    it is missing the caller starts Ray with `log_to_driver=False` instead (`ray_log_to_driver`)."""
    from ray._private import worker as ray_worker
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    original = _state.get("ray_printer") or ray_worker.print_to_stdstream  # Ray's own
    # Not a terminal (a file, `ray job logs`, CI): tqdm's redraws would land as lines of their
    # own, twice per update, with float counts and rates from the first flush; plain lines instead.
    plain = None if _isatty(sys.stderr) else PlainProgress()

    def handle(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        bars = [line for line in lines if RAY_TQDM_MAGIC in line and not _state.get("bars_stopped")]
        rest = [line for line in lines if RAY_TQDM_MAGIC not in line]
        if bars and plain is not None:
            for line in bars:
                text = plain.line_for(line)
                if text is not None:
                    print(text, file=sys.stderr, flush=True)
        elif bars:
            original({**data, "lines": bars}, ignore_prefix=False)
        if rest and _state["log_dir"] is not None:
            who = data.get("actor_name") or data.get("task_name") or "worker"
            prefix = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''}) "
            try:
                with open(Path(_state["log_dir"]) / WORKER_LOG, "a", encoding="utf-8") as f:
                    f.writelines(prefix + line + "\n" for line in rest)
            except OSError:
                pass

    dispatcher.remove_handler("ray_print_logs")  # by name: a second call replaces the first
    dispatcher.add_handler("ray_print_logs", handle)

    # The raylet's notices reach the driver by another path (its error channel calls
    # `print_to_stdstream` directly). One of them is noise on a small machine: "N PYTHON worker
    # processes have been started …", printed when a run's engines, trainer and warmed task
    # workers outnumber the CPUs (by design, `evaluation.warm_up_workers`). It goes to the log
    # file; every other raylet notice (out-of-memory kills, …) still reaches the console.
    printer = _state["ray_printer"] = original

    def print_raylet(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        lines = data.get("lines") or []
        noise = [line for line in lines if RAYLET_NOISE in line]
        if data.get("pid") == "raylet" and noise and _state["log_dir"] is not None:
            try:
                with open(Path(_state["log_dir"]) / WORKER_LOG, "a", encoding="utf-8") as f:
                    f.writelines(f"(raylet) {line}\n" for line in noise)
            except OSError:
                pass
            lines = [line for line in lines if RAYLET_NOISE not in line]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, ignore_prefix=ignore_prefix)

    ray_worker.print_to_stdstream = print_raylet


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class PlainProgress:
    """Progress-bar updates of `ray.experimental.tqdm_ray` (one JSON state per line) as plain
    lines for a console that is not a terminal: one line per update that moved the count or
    closed the bar, integer counts, and a rate in the bar's unit per second measured from the
    bar's first update seen here (none until a second has passed)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.bars: dict[str, dict[str, Any]] = {}  # uuid → first seen (time, count), last printed

    def line_for(self, raw: str) -> str | None:
        import json

        try:
            state = json.loads(raw[raw.index("{"):])
            x, total = int(state.get("x") or 0), state.get("total")
        except (ValueError, TypeError):
            return None
        now, closed = self.clock(), bool(state.get("closed"))
        bar = self.bars.setdefault(str(state.get("uuid")), {"t0": now, "x0": x, "printed": None})
        if bar["printed"] == (x, closed):
            return None
        bar["printed"] = (x, closed)
        if closed:
            self.bars.pop(str(state.get("uuid")), None)
        unit = state.get("unit") or "it"
        text = f"{state.get('desc') or 'progress'}: {x}"
        if isinstance(total, (int, float)) and total > 0:
            text += f"/{int(total)} {unit} ({100 * x // int(total)} %)"
        else:
            text += f" {unit}"
        elapsed = now - bar["t0"]
        if elapsed >= 1.0 and x > bar["x0"]:
            text += f", {(x - bar['x0']) / elapsed:.1f} {unit}/s"
        return text + (", done" if closed else "")


def ray_log_to_driver() -> bool:
    """`log_to_driver` for `ray.init`: True when verbose, or when the workers' lines can be
    routed to the log files (`route_worker_output`); else False (the console stays quiet, the
    bars of Ray tasks are not shown)."""
    if not quiet():
        return True
    try:
        from ray._private import worker as ray_worker

        return hasattr(ray_worker, "global_worker_stdstream_dispatcher") and hasattr(
            ray_worker, "print_to_stdstream")
    except ImportError:
        return False
