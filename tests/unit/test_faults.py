"""The pure pieces of fault handling (docs/faults.md): the driver lock, the state writer on a
full disk, stop signals, checkpoint manifests, a reward rule's faults. The same faults injected
into a real run: tests/integration/test_faults.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rrhf_ray.actors.scorer import rule_scores
from rrhf_ray.cli import error_line
from rrhf_ray.state import DriverBusyError, DriverLock, no_space, write_json_atomic
from rrhf_ray.train.checkpoints import (
    CheckpointError,
    check_checkpoint,
    checkpoint_problem,
    write_manifest,
)
from rrhf_ray.types import DataError
from rrhf_ray.workflow import StopSignal, stop_signals

# --------------------------------------------------------------------------- one driver per directory


def test_a_live_driver_holding_the_lock_refuses_a_second_one_naming_it(tmp_path: Path) -> None:
    """Another process holds the lock (as a running driver does): refused with its pid and host.
    Once it is gone (killed, so it never released anything), the lock is taken over."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from rrhf_ray.state import DriverLock
        with DriverLock(Path({str(tmp_path)!r})):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(DriverBusyError) as info, DriverLock(tmp_path):
            pass
        assert f"is in use by a running driver (pid {holder.pid} on host {socket.gethostname()} since " in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / "driver.lock").read_text())["pid"] == holder.pid  # its record stays
    with DriverLock(tmp_path):  # the kernel dropped its flock: taken over
        assert json.loads((tmp_path / "driver.lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / "driver.lock").read_text() == ""  # released


def test_a_stale_record_without_a_lock_is_taken_over_and_a_live_one_refused(tmp_path: Path, caplog) -> None:
    """On a file system without working flock only the record tells: a dead pid's record is
    taken over (logged), a live process's is refused."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "driver.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0.0}))
    with caplog.at_level(logging.WARNING, logger="rrhf_ray.state"), DriverLock(tmp_path):
        pass
    assert f"taking over the lock of driver pid {dead.pid} on host {socket.gethostname()}" in caplog.text
    parent = os.getppid()  # alive, not this process
    lock.write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "started": 0.0}))
    with pytest.raises(DriverBusyError, match=f"pid {parent} on host"), DriverLock(tmp_path):
        pass


# --------------------------------------------------------------------------- a full disk


def test_state_json_stays_whole_when_the_disk_fills_during_its_write(tmp_path: Path, monkeypatch) -> None:
    import rrhf_ray.state

    path = tmp_path / "state.json"
    write_json_atomic(path, {"stages": {"a": 1}})
    real_open = open

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            self.f.write(data[:10])  # part of it lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(rrhf_ray.state, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as info:
        write_json_atomic(path, {"stages": {"a": 1, "b": 2}})
    assert info.value.errno == errno.ENOSPC
    assert error_line(info.value) == f"no space left on device: {path}"
    assert json.loads(path.read_text()) == {"stages": {"a": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left


def test_a_full_disk_names_the_path_being_written(tmp_path: Path) -> None:
    pool = tmp_path / "pool.parquet"
    with pytest.raises(OSError) as info, no_space(pool):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write into an open file: no name
    assert error_line(info.value) == f"no space left on device: {pool}"
    with pytest.raises(OSError) as info, no_space(pool):  # other errors pass unchanged
        raise OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert info.value.filename == "/elsewhere"


# --------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize(("sig", "kind"), [(signal.SIGTERM, StopSignal), (signal.SIGINT, KeyboardInterrupt)])
def test_stop_signals_raise_in_the_driver_and_are_restored(sig: signal.Signals, kind: type) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(kind) as info, stop_signals():
        os.kill(os.getpid(), sig)
        time.sleep(30)  # the handler raises here, at once
    assert str(info.value) == sig.name
    assert signal.getsignal(sig) is before


# --------------------------------------------------------------------------- checkpoint manifests


def test_a_manifest_tells_a_whole_checkpoint_from_a_cut_or_damaged_one(tmp_path: Path) -> None:
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"w" * 100)
    (d / "config.json").write_text("{}")
    assert checkpoint_problem(d) == f"{d / 'rrhf_manifest.json'} is missing (the checkpoint was not installed whole)"
    write_manifest(d)
    assert checkpoint_problem(d) is None
    check_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"w" * 50)
    assert checkpoint_problem(d) == f"{d / 'model.safetensors'} has 50 bytes, its manifest says 100"
    (d / "model.safetensors").write_bytes(b"x" * 100)  # same size, other bytes
    assert checkpoint_problem(d, checksums=False) is None
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        check_checkpoint(d)
    (d / "config.json").unlink()
    assert checkpoint_problem(d) == f"{d / 'config.json'} is missing"


# --------------------------------------------------------------------------- reward rules


def _raises_on_rude(queries: list[str], responses: list[str]) -> list[float]:
    if any("rude" in r for r in responses):
        raise KeyError("rude")
    return [1.0] * len(responses)


def test_a_rules_faults_are_named_with_the_query() -> None:
    queries, responses = ["q one", "q two", "q three"], ["fine", "rude reply", "fine"]
    with pytest.raises(DataError) as info:
        rule_scores(_raises_on_rude, "m:rude", queries, responses)
    assert str(info.value) == "reward.rule m:rude raised KeyError: 'rude' on response 'rude reply' of query 'q two'"
    with pytest.raises(DataError, match=r"returned 2 rewards for 3 responses \(a chunk whose first is "
                                        r"response 'fine' of query 'q one'\)"):
        rule_scores(lambda q, r: [1.0, 2.0], "m:short", queries, responses)
    with pytest.raises(DataError, match=r"returned '0.5' for response 'rude reply' of query 'q two': not a number"):
        rule_scores(lambda q, r: [1.0, "0.5", 2.0], "m:text", queries, responses)
    with pytest.raises(DataError, match=r"returned \[1\] \(list\) for response 'fine' of query 'q three'"):
        rule_scores(lambda q, r: [1.0, 2, [1]], "m:list", queries, responses)
    # NaN passes here: the scoring task refuses it naming the query (RewardError)
    scores = rule_scores(lambda q, r: [1, 2.5, float("nan")], "m:nan", queries, responses)
    assert scores[:2] == [1.0, 2.5] and scores[2] != scores[2]
