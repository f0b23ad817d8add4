"""Experiment tracking (`rrhf_ray.tracking`): a run logged to MLflow, TensorBoard and W&B
(offline), resumed, and read back through each backend's own reader; the rules that pick what
is logged; the default install without the tracking extra."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from rrhf_ray.config import ConfigError, RunConfig, TrackingConfig, load_config
from rrhf_ray.tracking import (
    INSTALL_HINT,
    Tracker,
    check_tracking,
    flatten_params,
    open_tracking,
    round_metrics,
)
from tests.helpers import tensorboard_scalars

TRAIN_KEYS = ("loss", "rank_loss", "sft_loss", "rank_accuracy", "lr", "grad_norm", "tokens_per_s")


def run_config(tmp_path: Path, **extra) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name_or_path": "tiny"}, "data": {"source": "queries.jsonl"},
        "reward": {"kind": "rule", "rule": "pkg.mod:fn"}, "output": {"dir": str(tmp_path / "out")},
        **extra})


def metrics_row(r: int) -> dict:
    """A round row as report.write_metrics writes it (NaN already null, nested dicts, lists)."""
    row = {
        "round": r,
        "eval_reward_mean": 0.5 + 0.125 * r,
        "eval_reward_std": 0.25,
        "sampled_reward_mean": -0.25 + 0.25 * r,
        "sampled_reward_mean_ci95": [-0.375 + 0.25 * r, -0.125 + 0.25 * r],
        "win_rate_vs_round0": 0.5 if r == 0 else 0.75 + 0.0625 * r,
        "win_rate_vs_round0_ci95": None if r == 0 else [0.5, 1.0],
        "sampled_reward_delta_vs_round0": None if r == 0 else 0.25 * r,
        "reference_perplexity": 1.5 - 0.0625 * r,
        "heldout_rank_accuracy": 0.625 + 0.0625 * r,
        "train_loss": None if r == 0 else 2.0 / r,
        "train_fit_rank_accuracy": None if r == 0 else 0.875,
        "pool_groups_without_pair": 3 - r,
        "pool_k_histogram": {"4": 10 - r, "3": r},
        "pool_stats": {"all": {"mean": 0.1 * r}},
        "seconds_train": 12.5 * r,
    }
    return row


def train_rows(r: int, steps_per_round: int = 4) -> list[dict]:
    """One row per optimizer step of round r (rounds 1…), `global_step` going on across rounds,
    as rrhf_ray.train.core.train_epochs' history holds them (floats)."""
    rows = []
    for i in range(steps_per_round):
        g = (r - 1) * steps_per_round + i + 1
        rows.append({"global_step": float(g), "loss": 3.0 - 0.125 * g, "rank_loss": 1.0 - 0.0625 * g,
                     "sft_loss": 2.0 - 0.0625 * g, "rank_accuracy": 0.5 + 0.03125 * g,
                     "lr": 1e-4 * (1 - g / 16), "grad_norm": float("nan") if g == 2 else 0.5 * g,
                     "tokens_per_s": 1000.0 + g})
    return rows


def expected_round_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in round_metrics(row).items():
            series.setdefault(key, []).append((row["round"], value))
    return series


def expected_train_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key in TRAIN_KEYS:
            if math.isfinite(row[key]):
                series.setdefault(f"train/{key}", []).append((int(row["global_step"]), row[key]))
    return series


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B with no network, no prompts and every file it writes inside tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(home),
                       "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
                       "WANDB_DATA_DIR": str(home / "data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_ANONYMOUS": "never"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


# --------------------------------------------------------------------------- reading back


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: W&B's 7-byte header, then LevelDB log records (32 KiB
    blocks, a 7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's zero-padded tail
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # pre-allocated zeros at the end of the file
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(records: list) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                which = item.WhichOneof("value")
                value = (json.loads(item.value_json) if which is None
                         else json.loads(item.json) if which == "json" else getattr(item, which))
                *parents, key = [item.key] if item.key else list(item.nested_key)
                node = row
                for parent in parents:  # a logged object (a table, an image) comes as nested keys
                    node = node.setdefault(parent, {})
                node[key] = value
            rows.append(row)
    return rows


def wandb_config(records: list) -> dict:
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        items = (record.config.update if kind == "config" else
                 record.run.config.update if kind == "run" else [])
        for item in items:
            config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config


def approx_series(series: dict[str, list[tuple[int, float]]]) -> dict:
    return {k: [(s, pytest.approx(v, rel=1e-6, abs=1e-9)) for s, v in pts] for k, pts in series.items()}


# --------------------------------------------------------------------------- the whole run


def test_a_run_logged_to_all_three_backends_resumes_and_reads_back(tmp_path, wandb_offline, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = run_config(tmp_path, rounds=3)
    out = Path(config.output.dir)
    out.mkdir(parents=True)
    tracking = TrackingConfig.model_validate(
        {"mlflow": {"enabled": True, "experiment": "test-exp"}, "wandb": {"enabled": True, "project": "p"}})
    # what the driver writes: metrics.jsonl, the report, sample replies
    rows = [metrics_row(r) for r in range(4)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (out / "summary.md").write_text("| round | reward |\n| ---: | ---: |\n| 0 | +0.500 |\n")
    plt.figure(figsize=(2, 1.5), dpi=50)
    plt.plot([0, 1, 2], [0.5, 0.6, 0.7])
    plt.savefig(out / "report.png")
    plt.close()
    samples = [{"round": 2, "query": "How do I reset it?", "reply": "Hold the button | then\nwait.",
                "reward": 0.75},
               {"round": 2, "query": "Where is it?", "reply": "Sorry.", "reward": -0.5}]
    train = [row for r in (1, 2, 3) for row in train_rows(r)]

    # ---- first session: rounds 0-2, the training steps of rounds 1-2
    tracker = open_tracking(tracking, out, None, strict=True)
    saved = json.loads(json.dumps(tracker.ids))  # as state.json keeps it
    assert set(saved) >= {"mlflow_run_id", "wandb_run_id", "tensorboard_log_dir"}
    tracker.log_params(config)
    assert tracker.log_round(rows[0])
    assert tracker.log_train_steps(train[:4]) == 4
    assert tracker.log_round(rows[1])
    assert tracker.log_train_steps(train[4:8]) == 4
    assert tracker.log_round(rows[2])
    tracker.log_artifact(out / "summary.md", step=2)
    tracker.log_artifact(out / "report.png", step=2)
    tracker.log_table("samples", samples, step=2)
    saved = json.loads(json.dumps(tracker.ids))
    assert saved["round"] == 2 and saved["steps"] == {"train": 8}
    tracker.close()

    # ---- resumed with one more round (rounds 3); the driver re-logs every row it has
    config4 = run_config(tmp_path, rounds=4)
    with open_tracking(tracking, out, saved, strict=True) as tracker:
        assert tracker.ids["mlflow_run_id"] == saved["mlflow_run_id"]
        assert tracker.ids["wandb_run_id"] == saved["wandb_run_id"]
        tracker.log_params(config4)
        assert tracker.log_train_steps(train) == 4  # rounds 1-2's steps were logged already
        assert tracker.log_rounds(rows) == 1  # only round 3
        assert tracker.ids["round"] == 3 and tracker.ids["steps"] == {"train": 12}
    assert tracker.closed

    want_rounds = expected_round_series(rows)
    want_train = expected_train_series(train)
    assert "sampled_reward_mean_ci95_lo" in want_rounds and "pool_k_histogram" not in want_rounds
    assert [s for s, _ in want_rounds["win_rate_vs_round0_ci95_hi"]] == [1, 2, 3]  # round 0: null
    assert [s for s, _ in want_train["train/grad_norm"]] == [1] + list(range(3, 13))  # NaN left out

    # ---- MLflow, through its client: one run, the params, every metric's history, the files
    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("test-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [saved["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "out"
    params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten_params(config).items()}
    assert run.data.params == params
    assert run.data.params["train.loss.name"] == "rrhf" and run.data.params["rounds"] == "3"
    assert run.data.tags["changed.rounds"] == "4"
    got = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
           for key in run.data.metrics}
    assert got == approx_series({**want_rounds, **want_train})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.md", "report.png", "tables"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "tables/samples.json", str(tmp_path)))
                       .read_text())
    assert table == {"columns": ["round", "query", "reply", "reward"],
                     "data": [list(s.values()) for s in samples]}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches the runs through it
    loaded = client.load_table(experiment.experiment_id, "tables/samples.json", [run.info.run_id])
    assert loaded.to_dict("records") == samples
    summary = client.download_artifacts(run.info.run_id, "summary.md", str(tmp_path / "dl"))
    assert Path(summary).read_text() == (out / "summary.md").read_text()

    # ---- TensorBoard, through EventAccumulator: the same series, steps going on after the resume
    acc, scalars = tensorboard_scalars(out / "tensorboard")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per session
    assert scalars == approx_series({**want_rounds, **want_train})
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in scalars["eval_reward_mean"]] == [0, 1, 2, 3]
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    assert texts["summary.md/text_summary"] == [(2, (out / "summary.md").read_text())]
    (step, table_md), = texts["samples/text_summary"]
    assert step == 2 and table_md.splitlines()[0] == "| round | query | reply | reward |"
    assert "Hold the button \\| then ⏎ wait." in table_md
    config_md = texts["config/text_summary"][0][1]
    assert "| train.loss.name | rrhf |" in config_md
    image = acc.Images("report.png")[0]
    assert (image.step, image.width, image.height) == (2, 100, 75)

    # ---- W&B offline files: two sessions of the same run id, their history and config
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    run_id = saved["wandb_run_id"]
    assert all(d.name.endswith(f"-{run_id}") and (d / f"run-{run_id}.wandb").is_file() for d in run_dirs)
    history = [row for d in run_dirs for row in wandb_history(wandb_records(d / f"run-{run_id}.wandb"))]
    got_rounds: dict[str, list] = {}
    got_train: dict[str, list] = {}
    for row in history:
        if "round" in row:
            for key, value in row.items():
                if not key.startswith("_") and key != "round":
                    got_rounds.setdefault(key, []).append((row["round"], value))
        elif "train/global_step" in row:
            for key, value in row.items():
                if key.startswith("train/") and key != "train/global_step":
                    got_train.setdefault(key, []).append((row["train/global_step"], value))
    assert got_rounds == approx_series(want_rounds)
    assert got_train == approx_series(want_train)
    assert [s for s, _ in got_train["train/loss"]] == list(range(1, 13))
    tables = [row["samples"] for row in history if "samples" in row]
    assert len(tables) == 1 and tables[0]["_type"] == "table-file" and tables[0]["nrows"] == 2
    assert {k: v for k, v in wandb_config(wandb_records(run_dirs[0] / f"run-{run_id}.wandb")).items()
            if not k.startswith("_")} == flatten_params(config)
    assert wandb_config(wandb_records(run_dirs[1] / f"run-{run_id}.wandb"))["rounds"] == 4
    assert (run_dirs[0] / "files" / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (run_dirs[0] / "files" / "report.png").is_file()
    table_files = list((run_dirs[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    assert [json.loads(f.read_text())["data"] for f in table_files] == [[list(s.values()) for s in samples]]


# --------------------------------------------------------------------------- the rules


def test_round_metrics_keep_numbers_and_split_intervals():
    row = {"round": 2, "a": 1, "b": 0.5, "b_ci95": [0.25, 0.75], "c": None, "d": float("nan"),
           "e": "text", "f": {"x": 1}, "g": True, "h": [1, 2, 3], "i_ci95": [None, 0.5],
           "j": float("inf")}
    assert round_metrics(row) == {"a": 1.0, "b": 0.5, "b_ci95_lo": 0.25, "b_ci95_hi": 0.75, "i_ci95_hi": 0.5}


def test_params_are_the_config_flattened_to_dotted_keys(tmp_path):
    config = run_config(tmp_path)
    params = flatten_params(config)
    assert params["train.loss.name"] == "rrhf"
    assert params["train.loss.rank_weight"] == 1.0
    assert params["sampling.stop"] == config.sampling.stop
    assert params["sft"] is None and params["tracking.mlflow.tags"] == {}
    assert not any(isinstance(v, dict) and v for v in params.values())


def test_rounds_and_steps_logged_already_are_skipped():
    class Recorder:
        name = "recorder"

        def __init__(self):
            self.ids, self.calls = {}, []

        def __getattr__(self, method):
            return lambda *args: self.calls.append((method, *args))

    rec = Recorder()
    tracker = Tracker([rec], saved={"round": 1, "steps": {"train": 4}, "mlflow_run_id": "abc"})
    assert not tracker.log_round({"round": 1, "x": 1.0})
    assert tracker.log_round({"round": 2, "x": 2.0})
    assert tracker.log_train_steps([{"global_step": g, "loss": g} for g in (3, 4, 5, 6)]) == 2
    assert tracker.log_train_steps([{"global_step": 1, "loss": 1.0}], prefix="sft") == 1
    assert rec.calls == [("log_round", 2, {"x": 2.0}),
                         ("log_train_steps", "train", [(5, {"loss": 5.0}), (6, {"loss": 6.0})]),
                         ("log_train_steps", "sft", [(1, {"loss": 1.0})])]
    assert tracker.ids == {"mlflow_run_id": "abc", "round": 2, "steps": {"train": 6, "sft": 1}}


def test_a_failing_backend_is_reported_once_and_the_others_go_on(caplog):
    class Broken:
        name = "broken"

        def __init__(self):
            self.ids = {}

        def log_round(self, step, metrics):
            raise OSError("disk full")

        def close(self, failed):
            pass

    class Good:
        name = "good"

        def __init__(self):
            self.ids, self.rounds, self.failed = {}, [], None

        def log_round(self, step, metrics):
            self.rounds.append(step)

        def close(self, failed):
            self.failed = failed

    good = Good()
    with (caplog.at_level(logging.WARNING, logger="rrhf_ray.tracking"), pytest.raises(KeyError),
          Tracker([Broken(), good]) as tracker):
        tracker.log_round({"round": 0, "x": 1.0})
        tracker.log_round({"round": 1, "x": 1.0})
        raise KeyError("the run failed")
    assert good.rounds == [0, 1] and good.failed is True
    assert [r.getMessage() for r in caplog.records].count("tracking: broken log_round failed; the run goes on without it") == 1
    with pytest.raises(OSError, match="disk full"):
        Tracker([Broken()], strict=True).log_round({"round": 0})


def test_tracking_off_is_a_no_op_that_imports_no_tracking_package(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rrhf_ray.config import TrackingConfig
        from rrhf_ray.tracking import open_tracking
        out = Path({str(tmp_path / 'out')!r})
        tracker = open_tracking(TrackingConfig(tensorboard={{"enabled": False}}), out, None)
        assert not tracker.enabled
        with tracker:
            tracker.log_params({{"a": {{"b": 1}}}})
            tracker.log_round({{"round": 0, "x": 1.0}})
            tracker.log_train_steps([{{"global_step": 1, "loss": 1.0}}])
            tracker.log_table("samples", [{{"q": "x"}}])
        assert tracker.ids == {{"round": 0, "steps": {{"train": 1}}}}, tracker.ids
        assert not out.exists()
        print(sorted(m for m in ("mlflow", "wandb", "tensorboardX", "tensorboard", "torch")
                     if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("backend, modules, package", [
    ("mlflow", ["mlflow"], "mlflow-skinny"),
    ("wandb", ["wandb"], "wandb"),
    ("tensorboard", ["tensorboardX", "torch.utils.tensorboard"], "tensorboardX"),
])
def test_a_backend_without_its_package_is_a_config_error(tmp_path, monkeypatch, backend, modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    cfg = TrackingConfig.model_validate({"tensorboard": {"enabled": False}, backend: {"enabled": True}})
    with pytest.raises(ConfigError) as err:
        open_tracking(cfg, tmp_path / "out", None)
    message = str(err.value)
    assert f"tracking.{backend}.enabled" in message and package in message and INSTALL_HINT in message
    assert not (tmp_path / "out").exists()


def test_the_default_mlflow_store_needs_sqlalchemy(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match="sqlalchemy.*rrhf-ray\\[tracking\\]"):
        check_tracking(TrackingConfig.model_validate({"mlflow": {"enabled": True}}), tmp_path)
    # a server needs no local database
    check_tracking(TrackingConfig.model_validate(
        {"mlflow": {"enabled": True, "tracking_uri": "http://127.0.0.1:5000"}}), tmp_path)


# --------------------------------------------------------------------------- the config


def test_the_default_is_tensorboard_only(tmp_path):
    cfg = run_config(tmp_path).tracking
    assert (cfg.tensorboard.enabled, cfg.mlflow.enabled, cfg.wandb.enabled) == (True, False, False)
    assert cfg.wandb.mode == "offline"


def test_the_docstring_example_and_overrides_parse(tmp_path):
    lines = TrackingConfig.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "tracking:")
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    example = textwrap.dedent("\n".join(lines[start:end]))
    tracking = TrackingConfig.model_validate(yaml.safe_load(example)["tracking"])
    assert tracking.mlflow.enabled and tracking.wandb.enabled and tracking.mlflow.experiment == "rrhf-demo"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"source": "d"},
                                    "reward": {"rule": "a:b"}}))
    cfg = load_config(path, ["tracking.wandb.enabled=true", "tracking.wandb.mode=online",
                             "tracking.mlflow.tracking_uri=http://host:5000"])
    assert cfg.tracking.wandb.mode == "online" and cfg.tracking.mlflow.tracking_uri == "http://host:5000"
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(path, ["tracking.wandb.mode=sometimes"])
    with pytest.raises(ConfigError, match="tracking.mlfow: unknown key"):
        load_config(path, ["tracking.mlfow.enabled=true"])


def test_tracking_is_not_part_of_the_run_fingerprint(tmp_path):
    from rrhf_ray.state import config_fingerprint

    base = run_config(tmp_path)
    tracked = run_config(tmp_path, tracking={"mlflow": {"enabled": True}, "wandb": {"enabled": True}})
    assert config_fingerprint(base) == config_fingerprint(tracked)
    assert config_fingerprint(base) != config_fingerprint(run_config(tmp_path, train={"lr": 1e-4}))
