"""`output.dir=s3://…` end to end on a real local Ray cluster against a real S3-compatible server
(moto_server on localhost): a driver SIGKILLed mid-round (its `running` record left behind, as a
crashed machine leaves it), resumed from the bucket alone on a fresh mirror through the Python API
(`rrhf_ray.run`, asking for one more round), finishes round 1 where it stopped and goes on with
round 2 without redoing a finished stage; the samplers, the warm trainer and the evaluation tasks
read what they need from the bucket (into the node's cache), with the credentials the driver
forwards (the cluster was started before they existed). This is the suite's kill-and-resume run:
a resume in the same local directory goes through the same state (tests/integration/test_faults.py
resumes one four times)."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

import rrhf_ray
from rrhf_ray.config import load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.mirror import mirror_dir
from tests.helpers import QUICK, kill_driver_when
from tests.object_store import bucket_files, create_bucket, moto_s3, read_object

pytestmark = pytest.mark.ray


def remote_stages(uri: str) -> dict:
    if "state.json" not in bucket_files(uri):
        return {}
    return json.loads(read_object(f"{uri}/state.json"))["stages"]


def test_killed_driver_resumes_from_the_bucket_on_a_fresh_mirror(ray_cluster, node_cache, tmp_path, monkeypatch,
                                                                 caplog):
    with moto_s3(tmp_path / "moto.log") as s3_env:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            monkeypatch.delenv(k, raising=False)
        for k, v in s3_env.items():
            monkeypatch.setenv(k, v)
        uri = f"s3://{create_bucket(s3_env)}/run"
        # Round 1 trains for a few seconds (30 epochs of 2 steps), so that the kill, which waits
        # for the bucket to name round1/score (synced every second), lands before it ends.
        overrides = QUICK + ["train.epochs=30", f"output.dir={uri}"]
        env = {**os.environ, **s3_env, "RRHF_RAY_CACHE": str(tmp_path / "machine1"), "RRHF_RAY_SYNC_SECONDS": "1",
               "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
        kill_driver_when(overrides, env, lambda: "round1/score" in remote_stages(uri),
                         "round1/score in the bucket", log=tmp_path / "driver.log")
        before = remote_stages(uri)
        assert "round1/train" not in before
        # Round 0's evaluation and round 1's sampling were one engine pass.
        assert before["round1/sample"]["batched_with"] == ["round0/eval"]
        files = bucket_files(uri)
        # What the bucket's state.json names is in the bucket; temporary names and Ray Train's
        # scratch never are.
        for rel in ("base/model.safetensors", "rounds/0/eval.jsonl", "rounds/1/candidates.jsonl",
                    "rounds/1/pool.parquet", "rounds/1/pool.jsonl"):
            assert files.get(rel, 0) > 0, rel
        assert before["base"]["path"] == f"{uri}/base"
        pool = read_object(f"{uri}/rounds/1/pool.parquet")
        # The killed driver's own log (in its mirror, machine 1) names what it uploaded.
        monkeypatch.setenv("RRHF_RAY_CACHE", str(tmp_path / "machine1"))
        assert "uploaded" in (mirror_dir(uri) / "logs" / "driver.log").read_text()

        # Another machine: a fresh cache, so the resume reads the bucket and nothing else.
        monkeypatch.setenv("RRHF_RAY_CACHE", str(tmp_path / "machine2"))
        caplog.set_level(logging.INFO, logger="rrhf_ray")
        # Asking for one more round than the killed run had (only `rounds` may change within an
        # output directory, and how the weights reach the samplers), through the Python API: a
        # RunConfig plus a keyword override.
        started = time.monotonic()
        rows = rrhf_ray.run(load_config(DEMO_CONFIG, overrides), rounds=2)
        resumed_s = time.monotonic() - started

        after = remote_stages(uri)
        for name in ("base", "round0/eval", "round1/sample", "round1/score"):
            assert after[name]["finished"] == before[name]["finished"], f"{name} was redone"
        assert {"round1/train", "round1/eval", "round2/train", "round2/eval"} <= set(after)
        assert after["round2/sample"]["batched_with"] == ["round1/eval"]  # one pass after the resume too
        assert read_object(f"{uri}/rounds/1/pool.parquet") == pool
        assert [r["round"] for r in rows] == [0, 1, 2]
        metrics = [json.loads(line) for line in read_object(f"{uri}/metrics.jsonl").decode().splitlines()]
        assert [m["round"] for m in metrics] == [0, 1, 2]
        for key in ("eval_reward_mean", "eval_reward_std", "reference_perplexity", "win_rate_vs_round0",
                    "train_loss", "seconds_train", "seconds_sample"):
            assert key in metrics[1] and key in metrics[2], key
        assert metrics[1]["train_loss"] > 0 and metrics[1]["seconds_train"] > 0
        for r in (1, 2):
            refresh = after[f"round{r}/refresh"]
            assert refresh["transport"] == "disk" and refresh["logprob_gap"] < refresh["logprob_separation"] / 2
        # Round 1's checkpoint went up once, whole: its bytes are the bucket's.
        checkpoint_bytes = sum(v for k, v in bucket_files(uri).items() if k.startswith("rounds/1/checkpoint/"))
        assert metrics[1]["checkpoint_upload_bytes"] == checkpoint_bytes > 0
        assert metrics[1]["checkpoint_upload_seconds"] >= 0
        # The samplers loaded round 1's checkpoint from the bucket, not from the driver's mirror:
        # one replica on this one node, so one download of exactly the bucket's bytes, which
        # the replica's own log (under the mirror's logs/) names.
        assert metrics[1]["checkpoint_download_bytes"] == checkpoint_bytes
        assert metrics[1]["checkpoint_download_seconds"] > 0
        assert "checkpoint_download_bytes" not in metrics[0]
        logs = mirror_dir(uri) / "logs"
        sampler_log = "".join(f.read_text() for f in logs.glob("sampler-policy0-*.log"))
        assert f"{uri}/rounds/1/checkpoint: downloaded" in sampler_log
        assert f"{uri}/base: " in sampler_log  # its engine started from the bucket's ρ too
        # The warm trainer read its start model and round 1's pool from the bucket, into the
        # node's cache (RRHF_RAY_CACHE of the cluster's workers, not the driver's).
        train_log = "".join(f.read_text() for f in logs.glob("train-*.log"))
        assert f"{uri}/base: " in train_log and f"{uri}/rounds/1/pool.parquet: " in train_log
        cached_pools = [p.read_bytes() for p in (node_cache / "files").glob("*-pool.parquet")]
        assert len(cached_pools) == 2 and pool in cached_pools  # rounds 1 and 2
        cached = {p.name.split("-", 1)[1] for p in (node_cache / "checkpoints").iterdir() if p.is_dir()}
        assert {"base", "checkpoint"} <= cached
        files = bucket_files(uri)
        assert files["rounds/1/checkpoint/model.safetensors"] > 0 and "summary.md" in files
        assert files["rounds/2/checkpoint/model.safetensors"] > 0 and metrics[2]["checkpoint_download_bytes"] > 0
        assert "| 2 |" in read_object(f"{uri}/summary.md").decode()
        assert not [f for f in files if f.startswith("ray_train/") or ".tmp-" in f or ".old-" in f]
        text = caplog.text
        assert "pulled s3://" in text and "uploaded" in text
        assert "base: done already" in text or "done already (" in text
        print(f"\nresumed run: {resumed_s:.1f} s; checkpoint {files['rounds/1/checkpoint/model.safetensors'] / 1e6:.1f} MB; "
              + "; ".join(line for line in text.splitlines() if "pulled" in line or "over the run" in line))
