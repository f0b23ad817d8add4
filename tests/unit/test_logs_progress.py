"""Progress bars on a console that is not a terminal (a file, `ray job logs`, CI): one plain line
per update that moved the count, integer counts, a rate in the bar's unit per second."""

from __future__ import annotations

import json

from rrhf_ray import logs
from rrhf_ray.logs import PlainProgress

MAGIC = "__ray_tqdm_magic_token__"


def state(x: int, *, desc: str = "sampling", closed: bool = False, total: int = 72, uuid: str = "u1") -> str:
    """One update as `ray.experimental.tqdm_ray` prints it from a worker."""
    return json.dumps({"__magic_token__": MAGIC, "x": x, "pos": 0, "desc": desc, "total": total,
                       "unit": "query", "ip": "127.0.0.1", "pid": 7, "uuid": uuid, "closed": closed})


def test_one_plain_line_per_update_with_integer_counts_and_a_measured_rate():
    now = [100.0]
    bars = PlainProgress(clock=lambda: now[0])
    assert bars.line_for(state(8)) == "sampling: 8/72 query (11 %)"
    now[0] = 100.5
    assert bars.line_for(state(8, desc="sampling 300 tok/s")) is None  # the count did not move
    now[0] = 102.0
    assert bars.line_for(state(40)) == "sampling: 40/72 query (55 %), 16.0 query/s"
    now[0] = 104.0
    assert bars.line_for(state(72, closed=True)) == "sampling: 72/72 query (100 %), 16.0 query/s, done"
    assert bars.line_for(state(5, uuid="u2", total=0)) == "sampling: 5 query"
    assert bars.line_for("not a state") is None


def test_redirected_bars_print_once_per_update_through_the_driver(tmp_path, capsys, monkeypatch):
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    monkeypatch.setitem(logs._state, "ray_printer", None)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    logs.start_run_logs(tmp_path / "logs")
    try:
        logs.route_worker_output()  # capsys: stderr is not a terminal
        for update in (state(24), state(24), state(72, closed=True)):
            dispatcher.emit({"lines": [update], "pid": 7, "is_err": False, "ip": "127.0.0.1",
                             "task_name": "t", "actor_name": "", "job": "01000000"})
    finally:
        dispatcher.remove_handler("ray_print_logs")
        logs.stop_run_logs()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sampling")]
    assert err == ["sampling: 24/72 query (33 %)", "sampling: 72/72 query (100 %), done"]


def test_no_bar_is_printed_after_a_stopped_runs_last_line(tmp_path, capsys, monkeypatch):
    """A stopped or failed run's error is its console's last line: a trainer still reporting its
    steps while it is shut down prints nothing below it; the next command's bars show again."""
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    monkeypatch.setitem(logs._state, "ray_printer", None)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher

    def emit(update: str) -> None:
        dispatcher.emit({"lines": [update], "pid": 7, "is_err": False, "ip": "127.0.0.1",
                         "task_name": "t", "actor_name": "", "job": "01000000"})

    logs.start_run_logs(tmp_path / "logs")
    try:
        logs.route_worker_output()
        emit(state(24))
        logs.stop_worker_progress()
        emit(state(48))  # the trainer's next step, as it is stopped
        logs.resume_worker_progress()
        emit(state(72, closed=True, uuid="u2"))
    finally:
        dispatcher.remove_handler("ray_print_logs")
        logs.stop_run_logs()
        logs.resume_worker_progress()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sampling")]
    assert err == ["sampling: 24/72 query (33 %)", "sampling: 72/72 query (100 %), done"]
