"""`rrhf-ray status` and the running stage in state.json: `RunState.start` / `fail`,
`timed_stage`, `driver_alive`, `rrhf_ray.report.format_status` and the command itself."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrhf_ray.cli import main
from rrhf_ray.config import load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.report import format_console_table, format_status, rows_upto
from rrhf_ray.state import RunState, driver_alive, process_start_ticks, timed_stage, timed_stages
from tests.helpers import state_stages

HOST = socket.gethostname()


def _state(tmp_path: Path, rounds: int = 3) -> RunState:
    return RunState(tmp_path / "run", load_config(DEMO_CONFIG, [f"output.dir={tmp_path / 'run'}",
                                                                f"rounds={rounds}"]))


def _on_disk(state: RunState) -> dict:
    return json.loads(state.path.read_text())


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write(out: Path, running: dict | None = None, failed: dict | None = None, rounds: int = 3,
           stages: dict | None = None) -> Path:
    """A state.json in `out` as a driver leaves it: round 0 and 1 evaluated, round 2 sampled and
    scored (`tests.helpers.state_stages`), and optionally a running or failed stage."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"fingerprint": "f", "config": {}, "rounds": rounds,
            "stages": state_stages() if stages is None else stages}
    if running is not None:
        data["running"] = running
    if failed is not None:
        data["failed"] = failed
    (out / "state.json").write_text(json.dumps(data))
    return out


def _status(out: Path, capsys) -> tuple[int, str]:
    code = main(["status", str(out)])
    return code, capsys.readouterr().out


def _this_process(started: float) -> dict:
    return {"stage": "round2/train", "started": started, "pid": os.getpid(), "host": HOST,
            "pid_started": process_start_ticks(os.getpid())}


# --------------------------------------------------------------------------- state.json


def test_a_stage_is_recorded_as_running_while_its_work_runs_and_removed_when_it_finishes(tmp_path) -> None:
    state = _state(tmp_path)
    seen = {}

    def work() -> dict:
        seen.update(_on_disk(state))  # what `rrhf-ray status` reads while the stage runs
        return {"groups": 4}

    before = time.time()
    assert timed_stage(state, "round1/sample", [], work)
    running = seen["running"]
    assert running["stage"] == "round1/sample"
    assert before <= running["started"] <= time.time()
    assert (running["pid"], running["host"]) == (os.getpid(), HOST)
    assert running["pid_started"] == process_start_ticks(os.getpid()) and isinstance(running["pid_started"], int)
    assert "round1/sample" not in seen["stages"]
    after = _on_disk(state)
    assert "running" not in after and "failed" not in after
    assert after["stages"]["round1/sample"]["groups"] == 4
    assert not timed_stage(state, "round1/sample", [], work)  # finished: skipped, nothing recorded
    assert "running" not in _on_disk(state)


def test_a_stage_that_raises_is_recorded_as_failed_and_the_next_start_clears_it(tmp_path) -> None:
    state = _state(tmp_path)

    def boom() -> dict:
        raise RuntimeError("out of memory in the trainer")

    with pytest.raises(RuntimeError, match="out of memory"):
        timed_stage(state, "round1/train", [], boom)
    data = _on_disk(state)
    assert "running" not in data and "round1/train" not in data["stages"]
    assert data["failed"]["stage"] == "round1/train"
    assert data["failed"]["error"] == "RuntimeError: out of memory in the trainer"
    assert (data["failed"]["pid"], data["failed"]["host"]) == (os.getpid(), HOST)
    assert 0 <= data["failed"]["seconds"] < 5

    timed_stage(state, "round1/train", [], lambda: None)  # started again: the failure is history
    data = _on_disk(state)
    assert "failed" not in data and "running" not in data and "round1/train" in data["stages"]


def test_one_pass_for_two_stages_records_both_with_their_share_of_the_time(tmp_path) -> None:
    """`timed_stages` (round r's evaluation + round r+1's sampling in one engine pass): one
    `running` record naming both, then each stage with its own info; the sampling keeps the
    seconds it was given, the evaluation gets the rest of the wall time."""
    state = _state(tmp_path)
    seen = {}

    def work() -> dict:
        seen.update(_on_disk(state))
        time.sleep(0.3)
        return {"round1/eval": {"eval": {"sampled_reward_mean": 0.5}, "seconds_compute": 0.1},
                "round2/sample": {"groups": 4, "candidates": 12, "seconds_compute": 0.05, "seconds": 0.05}}

    timed_stages(state, {"round1/eval": [], "round2/sample": []}, work)
    assert seen["running"]["stage"] == "round1/eval + round2/sample"
    data = _on_disk(state)
    assert "running" not in data
    sample, evaluation = data["stages"]["round2/sample"], data["stages"]["round1/eval"]
    assert (sample["seconds"], sample["groups"], sample["batched_with"]) == (0.05, 4, ["round1/eval"])
    assert evaluation["batched_with"] == ["round2/sample"] and 0.25 <= evaluation["seconds"] < 2
    assert evaluation["eval"]["sampled_reward_mean"] == 0.5 and evaluation["seconds_compute"] == 0.1

    def boom() -> dict:
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        timed_stages(state, {"round2/eval": [], "round3/sample": []}, boom)
    data = _on_disk(state)
    assert data["failed"]["stage"] == "round2/eval + round3/sample"
    assert "round2/eval" not in data["stages"] and "round3/sample" not in data["stages"]


def test_an_interrupted_stage_is_recorded_too(tmp_path) -> None:
    state = _state(tmp_path)

    def interrupted() -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        timed_stage(state, "round0/eval", [], interrupted)
    assert _on_disk(state)["failed"]["error"] == "KeyboardInterrupt: "


def test_finish_without_start_keeps_the_existing_behaviour(tmp_path) -> None:
    """`compare` records shared stages with `finish` alone: the same entry as before."""
    state = _state(tmp_path)
    state.finish("base", 0.0, path="/x")
    data = _on_disk(state)
    assert data["stages"]["base"]["path"] == "/x" and data["stages"]["base"]["seconds"] == 0.0
    assert "running" not in data


# --------------------------------------------------------------------------- driver_alive


def test_driver_alive_tells_a_live_a_dead_a_reused_and_a_remote_pid() -> None:
    me = _this_process(time.time())
    assert driver_alive(me) is True
    assert driver_alive({**me, "pid": _dead_pid()}) is False
    assert driver_alive({**me, "pid_started": me["pid_started"] + 1}) is False  # pid now another process
    assert driver_alive({**me, "pid_started": None}) is True  # start time unknown: the pid alone
    assert driver_alive({**me, "host": HOST + "-elsewhere"}) is None


def test_a_killed_driver_that_is_not_reaped_yet_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 20
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline, "the child never exited"
            time.sleep(0.02)
        assert driver_alive({"pid": child.pid, "host": HOST}) is False  # a zombie
    finally:
        child.wait()


# --------------------------------------------------------------------------- format_status


def test_status_of_a_running_stage_names_it_and_its_elapsed_time(tmp_path) -> None:
    state = _state(tmp_path)
    timed_stage(state, "round2/train", [], lambda: None)
    text: list[str] = []

    def work() -> None:  # `rrhf-ray status` while the stage runs, 41 s after it started
        data = _on_disk(state)
        text.append(format_status(data, "outs/demo", now=data["running"]["started"] + 41))

    timed_stage(state, "round2/eval", [], work)
    lines = text[0].splitlines()
    assert lines[0] == "run in outs/demo: 3 round(s) configured, 1 stage(s) finished"
    assert lines[1] == f"  done  round2/train     {_on_disk(state)['stages']['round2/train']['seconds']:8.1f} s"
    assert lines[2] == f"round2/eval: running for 41 s (driver pid {os.getpid()} on {HOST})"
    assert len(lines) == 3  # no "next:" while a stage runs; no round evaluated: no table


def test_status_of_two_stages_at_once_names_both(tmp_path) -> None:
    """One-step overlap: the stage started last, then the one still running beside it; a killed
    driver's record names both as stopped."""
    state = _state(tmp_path)
    state.start("round1/seg1/train")
    state.start("round1/seg2/sample")
    data = _on_disk(state)
    now = data["running"]["started"] + 30
    lines = format_status(data, "outs/demo", now=now).splitlines()
    trained = round(now - data["running"]["beside"][0]["started"])
    assert lines[1] == f"round1/seg2/sample: running for 30 s (driver pid {os.getpid()} on {HOST})"
    assert lines[2] == f"round1/seg1/train: running beside it for {trained} s"
    data["running"]["pid"] = 2**22 + 1  # no such process: the driver is gone
    data["running"]["pid_started"] = None
    assert format_status(data, "outs/demo", now=now).splitlines()[1].startswith(
        "round1/seg2/sample (and round1/seg1/train): stopped (driver pid")


def test_status_command_of_a_running_run_shows_the_stage_the_finished_stages_and_the_table(tmp_path,
                                                                                          capsys) -> None:
    out = _write(tmp_path / "run", running=_this_process(time.time() - 41))
    code, text = _status(out, capsys)
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == f"run in {out}: 3 round(s) configured, 7 stage(s) finished"
    assert lines[1:8] == [
        "  done  round0/eval           3.0 s",
        "  done  round1/sample        10.4 s",
        "  done  round1/score          2.0 s",
        "  done  round1/train         30.6 s",
        "  done  round1/eval           4.0 s",
        "  done  round2/sample         9.0 s",
        "  done  round2/score          1.0 s",
    ]
    assert re.fullmatch(rf"round2/train: running for 4[12] s \(driver pid {os.getpid()} on {re.escape(HOST)}\)",
                        lines[8]), lines[8]
    assert "next:" not in text and "stopped" not in text
    # rounds 0 and 1 so far, in the run's 80-column table, then where every column is
    assert "\n".join(lines[9:-1]) == format_console_table(rows_upto(state_stages(), 3))
    assert [line.split("|")[1].strip() for line in lines[11:-1]] == ["0", "1"]
    assert lines[-1].startswith("every column: ") and lines[-1].endswith("/summary.md")
    assert max(len(line) for line in lines[9:-1]) <= 80


def test_status_of_a_long_running_stage_in_minutes_and_hours(tmp_path) -> None:
    running = _this_process(1000.0)
    data = json.loads(_write(tmp_path / "run", running=running).joinpath("state.json").read_text())
    assert "round2/train: running for 12 min 5 s (" in format_status(data, "d", now=1000.0 + 725)
    assert "round2/train: running for 2 h 3 min (" in format_status(data, "d", now=1000.0 + 7380)


def test_status_command_of_a_killed_run_says_stopped(tmp_path, capsys) -> None:
    pid = _dead_pid()
    out = _write(tmp_path / "run", running={**_this_process(time.time() - 300), "pid": pid})
    code, text = _status(out, capsys)
    assert code == 0
    assert f"round2/train: stopped (driver pid {pid} not alive), started 5 min 0 s ago; " \
           "run the same command again to resume\n" in text
    assert "running for" not in text
    assert "\nnext: round2/train\n" in text  # where a resumed run starts
    assert format_console_table(rows_upto(state_stages(), 3)) in text


def test_status_of_a_driver_on_another_host_is_not_checked(tmp_path, capsys) -> None:
    out = _write(tmp_path / "run", running={**_this_process(time.time() - 5), "host": "head-node-0",
                                            "pid": _dead_pid()})
    _, text = _status(out, capsys)
    assert re.search(r"\nround2/train: running for [56] s \(driver pid \d+ on head-node-0; another host: "
                     r"not checked from here\)\n", text), text


def test_status_of_a_failed_stage_shows_the_error(tmp_path, capsys) -> None:
    failed = {"stage": "round2/train", "seconds": 12.3, "finished": 1.0, "error": "RuntimeError: boom",
              "pid": 1, "host": HOST}
    _, text = _status(_write(tmp_path / "run", failed=failed), capsys)
    assert "\nround2/train: failed after 12 s: RuntimeError: boom; run the same command again to resume\n" in text
    assert "\nnext: round2/train\n" in text


def test_status_command_of_a_finished_run_is_the_stages_and_the_table(tmp_path, capsys) -> None:
    stages = {k: v for k, v in state_stages().items() if not k.startswith("round2")}
    out = _write(tmp_path / "run", rounds=1, stages=stages)
    code, text = _status(out, capsys)
    assert code == 0
    assert text == "\n".join([
        f"run in {out}: 1 round(s) configured, 5 stage(s) finished",
        "  done  round0/eval           3.0 s",
        "  done  round1/sample        10.4 s",
        "  done  round1/score          2.0 s",
        "  done  round1/train         30.6 s",
        "  done  round1/eval           4.0 s",
        "finished",
        format_console_table(rows_upto(stages, 1)),
        f"every column: {out}/summary.md",
    ]) + "\n"
    assert "+0.250 [+0.125, +0.375]" in text  # round 1's sampled reward


def test_status_of_a_run_between_stages_names_the_next(tmp_path, capsys) -> None:
    _, text = _status(_write(tmp_path / "run"), capsys)
    assert "\nnext: round2/train\n" in text and "running" not in text


def test_status_of_a_directory_without_a_run_is_an_error(tmp_path, capsys) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "holds no run (state.json not found)" in capsys.readouterr().err
