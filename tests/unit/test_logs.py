"""The quiet console's pieces: the one line per stage, and redirecting a process's output."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from rrhf_ray import logs
from rrhf_ray.logs import stage_line


def test_stage_line_carries_each_stages_key_numbers():
    assert stage_line("round1/sample", 12.34, {"groups": 144, "candidates": 560, "seconds_compute": 9.0}) \
        == "round1/sample done in 12.3 s: 144 groups, 560 candidates"
    assert stage_line("round1/score", 3.0, {"pool": {"reward_mean": -0.1234}, "pool_stats": {}}) \
        == "round1/score done in 3.0 s: pool reward mean -0.123"
    assert stage_line("round2/train", 40.0, {"train": {"loss": 0.51234, "rank_accuracy": 0.9, "step": 9.0}}) \
        == "round2/train done in 40.0 s: loss 0.512, rank acc 0.900"
    assert stage_line("round1/refresh", 1.0, {"logprob_gap": 0.00123}) \
        == "round1/refresh done in 1.0 s: log-prob gap 0.0012 nats/token"
    assert stage_line("round0/eval", 20.0, {"eval": {"sampled_reward_mean": 0.2, "eval_reward_mean": 0.5}}) \
        == "round0/eval done in 20.0 s: sampled reward +0.200, greedy reward +0.500"


def test_stage_line_without_numbers_is_the_time_alone():
    assert stage_line("sft", 63.04, {"path": "/x/sft"}) == "sft done in 63.0 s"
    assert stage_line("base", 2.0, None) == "base done in 2.0 s"
    # a missing or NaN number is left out, never printed as "nan" or a crash
    assert stage_line("round1/refresh", 1.0, {"logprob_gap": float("nan")}) == "round1/refresh done in 1.0 s"
    assert stage_line("round1/score", 1.0, {"pool": {"reward_mean": None}}) == "round1/score done in 1.0 s"


def test_redirect_process_output_sends_both_streams_and_c_level_writes_to_the_file(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        from rrhf_ray.logs import redirect_process_output
        print("before the redirect")
        path = redirect_process_output({str(tmp_path / 'logs')!r}, "sampler")
        print("to stdout")
        print("to stderr", file=sys.stderr)
        os.write(1, b"raw fd 1\\n")
        os.write(2, b"raw fd 2\\n")
        print('{{"__magic_token__": "__ray_tqdm_magic_token__", "x": 1}}')
        sys.stdout.flush()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    files = list((tmp_path / "logs").glob("sampler-*.log"))
    assert len(files) == 1
    text = files[0].read_text()
    for line in ("to stdout", "to stderr", "raw fd 1", "raw fd 2"):
        assert line in text
    assert "before the redirect" not in text and "__ray_tqdm_magic_token__" not in text
    # the console keeps what came before and the progress-bar lines (the driver draws them)
    assert "before the redirect" in done.stdout and "__ray_tqdm_magic_token__" in done.stdout
    assert "to stdout" not in done.stdout and "to stderr" not in done.stderr


def test_a_second_redirect_moves_the_output_and_keeps_the_bars_on_the_console(tmp_path):
    """A kept sampler engine serving the next run (`Sampler.redirect_logs`): after a second
    redirect the output goes to the new run's log only, and the progress-bar lines still reach
    the process's original stdout, not the first run's log."""
    code = textwrap.dedent(f"""
        import os, sys
        from rrhf_ray.logs import redirect_process_output
        redirect_process_output({str(tmp_path / 'run1')!r}, "sampler")
        print("first run")
        redirect_process_output({str(tmp_path / 'run2')!r}, "sampler")
        print("second run")
        os.write(2, b"raw fd 2\\n")
        print('{{"__magic_token__": "__ray_tqdm_magic_token__", "x": 2}}')
        sys.stdout.flush()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    [first] = (tmp_path / "run1").glob("sampler-*.log")
    [second] = (tmp_path / "run2").glob("sampler-*.log")
    assert "first run" in first.read_text() and "second run" not in first.read_text()
    assert "second run" in second.read_text() and "raw fd 2" in second.read_text()
    assert "__ray_tqdm_magic_token__" not in first.read_text() + second.read_text()
    assert "__ray_tqdm_magic_token__" in done.stdout and "run" not in done.stdout


def test_redirect_process_output_without_a_directory_changes_nothing():
    assert logs.redirect_process_output(None, "scorer") is None


def test_quiet_console_shows_stage_lines_and_own_warnings_only(tmp_path):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logs.setup_console(verbose=False)
    keep = Keep()
    keep.addFilter(logs._ConsoleFilter())  # the console handler's filter (pytest owns the root's handlers)
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        logging.getLogger("rrhf_ray.x").info("before the run's logs: shown")
        logs.start_run_logs(tmp_path / "logs")
        logging.getLogger("rrhf_ray.x").info("detail")
        logging.getLogger("rrhf_ray.state").info("stage line", extra={"console": True})
        logging.getLogger("rrhf_ray.x").warning("our warning")
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller actor state")
        logging.getLogger("vllm.x").error("a library error")
    finally:
        root.removeHandler(keep)
        logs.stop_run_logs()
    assert records == ["before the run's logs: shown", "stage line", "our warning", "a library error"]
    text = (tmp_path / "logs" / "driver.log").read_text()
    for line in ("detail", "stage line", "our warning", "Failed to query", "a library error"):
        assert line in text  # the file keeps everything
    assert logs.current_log_dir() is None


def test_the_raylets_start_up_concurrency_notice_goes_to_the_log_file(tmp_path, capsys, monkeypatch):
    """The raylet's "N PYTHON worker processes have been started" (its error channel calls
    `print_to_stdstream` directly) lands in logs/ray-workers.log; its other notices, and the
    workers' progress bars, still reach the console."""
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    monkeypatch.setitem(logs._state, "ray_printer", None)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    logs.start_run_logs(tmp_path / "logs")
    try:
        logs.route_worker_output()
        logs.route_worker_output()  # twice: still one handler, one wrapper
        noise = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: "
                 "127.0.0.1. This could be a result of using a large number of actors")
        ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["Task was killed due to the node running low on memory"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
        dispatcher.emit({"lines": ["a worker's line"], "pid": 7, "is_err": False, "ip": "127.0.0.1",
                         "task_name": "t", "actor_name": "", "job": "01000000"})
    finally:
        dispatcher.remove_handler("ray_print_logs")
        logs.stop_run_logs()
    printed = capsys.readouterr()
    console = printed.out + printed.err
    # This test's own notice (node abc); the session's real raylet may print one of its own
    # between the routing's end and the capture's read, which is not what is tested here.
    assert "have been started on node: abc" not in console
    assert "running low on memory" in console
    assert "a worker's line" not in console
    text = (tmp_path / "logs" / "ray-workers.log").read_text()
    assert text.count("(raylet) WARNING: 8 PYTHON worker processes have been started") == 1
    assert "(t pid=7) a worker's line" in text
