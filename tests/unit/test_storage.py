"""rrhf_ray.remote and rrhf_ray.mirror against a real S3-compatible server (moto_server on localhost): the sync
uploads state.json last, skips temporary names and Ray Train's scratch, an interrupted sync
leaves the bucket's previous state; a pull fills a fresh mirror; materialize / fetch_file download
once per version; hand_off translates the mirror's paths; the storage variables forwarded."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.mirror import RunStore, actor_options, driver_file, hand_off, mirror_dir, mirrored
from rrhf_ray.remote import (
    STORAGE_ENV_VARS,
    Transfer,
    check_uri,
    fetch,
    fetch_file,
    filesystem,
    is_remote,
    materialize,
    storage_env,
    upload_dir,
)
from rrhf_ray.remote import (
    read_object as read_bucket_object,
)
from rrhf_ray.state import RunState, config_fingerprint, timed_stage
from rrhf_ray.types import atomic_path, atomic_write
from tests.object_store import bucket_files, create_bucket, moto_s3, read_object


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        yield env


@pytest.fixture
def bucket(s3_env, monkeypatch, tmp_path) -> str:
    """A fresh bucket; the environment points the client at the server; caches under tmp_path."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RRHF_RAY_CACHE", str(tmp_path / "cache"))
    return create_bucket(s3_env)


def make_outputs(mirror: Path) -> None:
    """A mirror as a run leaves it: outputs, temporary siblings, Ray Train's scratch, state.json."""
    atomic_write(mirror / "rounds/1/pool.parquet", b"p" * 1000)
    atomic_write(mirror / "rounds/1/checkpoint/model.safetensors", b"w" * 5000)
    atomic_write(mirror / "rounds/1/checkpoint/config.json", "{}")
    (mirror / "rounds/1/.eval.jsonl.tmp-4242").write_text("half a file")
    (mirror / "rounds/2/.checkpoint.tmp-4242").mkdir(parents=True)
    (mirror / "rounds/2/.checkpoint.tmp-4242/model.safetensors").write_bytes(b"half")
    (mirror / "ray_train/round1").mkdir(parents=True)
    (mirror / "ray_train/round1/checkpoint_000000.bin").write_bytes(b"scratch")
    atomic_write(mirror / "state.json", json.dumps({
        "fingerprint": "local-fp", "stages": {"base": {"path": str(mirror / "base"), "seconds": 1.0},
                                              "round1/train": {"seconds": 2.0}}}, indent=2))
    atomic_write(mirror / "base/config.json", "{}")


def recorder(store: RunStore) -> list[str]:
    """Record the order in which `store` uploads (the real uploads still happen)."""
    order: list[str] = []
    upload, put_bytes = store._upload, store._put_bytes

    def record_upload(path, rel):
        order.append(rel)
        return upload(path, rel)

    def record_put(data, rel):
        order.append(rel)
        return put_bytes(data, rel)

    store._upload, store._put_bytes = record_upload, record_put
    return order


def test_is_remote_and_bad_uris():
    assert is_remote("s3://b/run") and is_remote("gs://b/x") and is_remote("az://b/x")
    assert not is_remote("/tmp/run") and not is_remote("outputs/demo") and not is_remote(None)
    assert check_uri("s3://b/run/") == "s3://b/run"
    with pytest.raises(ConfigError, match=r"output.dir: az://b/x: unsupported scheme az://"):
        check_uri("az://b/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        check_uri("s3:///run")
    with pytest.raises(ConfigError, match=r"'\.' or '\.\.'"):
        check_uri("s3://b/run/../other")


def test_sync_uploads_outputs_then_state_last_and_skips_temporary_names(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    mirror = tmp_path / "mirror"
    make_outputs(mirror)
    store = RunStore(uri, mirror, fingerprints=("remote-fp", "local-fp"))
    order = recorder(store)
    moved = store.sync()

    assert order[-1] == "state.json", order
    assert sorted(order[:-1]) == ["base/config.json", "rounds/1/checkpoint/config.json",
                                  "rounds/1/checkpoint/model.safetensors", "rounds/1/pool.parquet"]
    assert set(bucket_files(uri)) == {*order}  # no temporary name, nothing of ray_train/
    assert moved.files == 5 and moved.bytes > 6000 and moved.seconds > 0
    state = json.loads(read_object(f"{uri}/state.json"))
    assert state["fingerprint"] == "remote-fp"  # the config as the user gave it
    assert state["stages"]["base"]["path"] == f"{uri}/base"  # mirror paths written as URIs

    # Unchanged files are not sent again; a changed one is, and state.json only when it changed.
    order.clear()
    assert store.sync().files == 0 and order == []
    time.sleep(0.01)
    atomic_write(mirror / "rounds/1/pool.parquet", b"q" * 1200)
    assert store.sync().files == 1 and order == ["rounds/1/pool.parquet"]
    assert bucket_files(uri)["rounds/1/pool.parquet"] == 1200
    assert store.uploaded("rounds/1/checkpoint").bytes == 5002
    assert store.totals()["upload_bytes"] == store.pushed.bytes > 7000


def test_an_interrupted_sync_leaves_the_buckets_state_naming_only_uploaded_outputs(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    mirror = tmp_path / "mirror"
    make_outputs(mirror)
    store = RunStore(uri, mirror)
    store.sync()
    # Round 2 finishes locally: its checkpoint, then state.json naming it; the connection drops
    # while the checkpoint uploads.
    atomic_write(mirror / "rounds/2/checkpoint/model.safetensors", b"v" * 4000)
    state = json.loads((mirror / "state.json").read_text())
    state["stages"]["round2/train"] = {"seconds": 3.0}
    atomic_write(mirror / "state.json", json.dumps(state))
    upload = store._upload

    def drop(path, rel):
        if rel.startswith("rounds/2/"):
            raise OSError("connection reset")
        return upload(path, rel)

    store._upload = drop
    with pytest.raises(OSError, match="connection reset"):
        store.sync()
    remote_state = json.loads(read_object(f"{uri}/state.json"))
    assert "round2/train" not in remote_state["stages"]
    assert "rounds/2/checkpoint/model.safetensors" not in bucket_files(uri)

    store._upload = upload  # the next tick gets through
    store.sync()
    assert "round2/train" in json.loads(read_object(f"{uri}/state.json"))["stages"]
    assert bucket_files(uri)["rounds/2/checkpoint/model.safetensors"] == 4000


def test_pull_fills_a_fresh_mirror_and_refuses_another_config(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    first = tmp_path / "first"
    make_outputs(first)
    RunStore(uri, first, fingerprints=("remote-fp", "local-fp")).sync()

    fresh = tmp_path / "fresh"
    (fresh / "rounds/9").mkdir(parents=True)
    (fresh / "rounds/9/leftover.jsonl").write_text("not in the bucket")  # an unsynced leftover
    (fresh / "ray_train").mkdir()
    (fresh / "ray_train/keep.bin").write_bytes(b"Ray Train's own")
    store = RunStore(uri, fresh, fingerprints=("remote-fp", "fresh-fp"))
    moved = store.pull()

    for rel in ("base/config.json", "rounds/1/pool.parquet", "rounds/1/checkpoint/model.safetensors"):
        assert (fresh / rel).read_bytes() == (first / rel).read_bytes(), rel
    assert not (fresh / "rounds/9/leftover.jsonl").exists()
    assert (fresh / "ray_train/keep.bin").exists()
    assert not (fresh / "rounds/1/.eval.jsonl.tmp-4242").exists()
    state = json.loads((fresh / "state.json").read_text())
    assert state["fingerprint"] == "fresh-fp"
    assert state["stages"]["base"]["path"] == str(fresh.resolve() / "base")
    assert moved.files == 5 and moved.bytes > 6000
    assert store.pull().files == 1  # the same mirror again: only state.json comes down
    assert store.sync().files == 0  # and nothing pulled goes back up

    with pytest.raises(ConfigError, match=rf"output directory s3://{bucket}/run holds a run with a different config"):
        RunStore(uri, tmp_path / "other", fingerprints=("another-fp", "x")).pull()


def test_materialize_downloads_a_checkpoint_once_per_version(bucket, tmp_path):
    ckpt = tmp_path / "ckpt"
    atomic_write(ckpt / "model.safetensors", b"w" * 3000)
    atomic_write(ckpt / "tokenizer/tokenizer.json", "{}")
    uri = f"s3://{bucket}/run/rounds/1/checkpoint"
    sent = upload_dir(ckpt, uri)
    assert sent == Transfer(3002, sent.seconds, 2)

    local, moved = fetch(uri)
    assert (moved.bytes, moved.files) == (3002, 2) and moved.seconds > 0
    local = Path(local)
    assert local.name.endswith("-checkpoint") and local.is_relative_to(tmp_path / "cache" / "checkpoints")
    assert (local / "model.safetensors").read_bytes() == b"w" * 3000
    assert (local / "tokenizer/tokenizer.json").read_text() == "{}"
    assert not [p for p in local.parent.iterdir() if ".tmp-" in p.name]
    mtime = (local / "model.safetensors").stat().st_mtime_ns

    # Again (another replica on this node): the cache answers, nothing moves.
    assert fetch(uri) == (str(local), Transfer())
    assert materialize(uri) == str(local)
    assert (local / "model.safetensors").stat().st_mtime_ns == mtime
    assert materialize(str(ckpt)) == str(ckpt) and fetch(ckpt) == (str(ckpt), Transfer())  # a path as it is

    # The prefix written again (another run on a reused prefix): the new weights, not the cached ones.
    time.sleep(1.1)  # S3 times have second resolution
    atomic_write(ckpt / "model.safetensors", b"v" * 3000)
    upload_dir(ckpt, uri)
    newer, moved = fetch(uri)
    assert newer != str(local) and moved.bytes == 3002
    assert (Path(newer) / "model.safetensors").read_bytes() == b"v" * 3000

    fs, root = filesystem(uri)  # the objects are gone: no stale copy is served
    fs.delete_dir_contents(root)
    with pytest.raises(FileNotFoundError, match="no objects under it"):
        materialize(uri)
    with pytest.raises(FileNotFoundError, match="no objects under it"):
        materialize(f"s3://{bucket}/run/rounds/7/checkpoint")


def test_fetch_file_downloads_a_pool_once_and_driver_file_reads_the_drivers_mirror(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    mirror = tmp_path / "mirror"
    make_outputs(mirror)
    store = RunStore(uri, mirror)
    pool = mirror / "rounds/1/pool.parquet"
    assert hand_off(pool, store) == f"{uri}/rounds/1/pool.parquet"  # synced first: the bucket has it
    assert bucket_files(uri)["rounds/1/pool.parquet"] == 1000

    # Another process (no store of this run): downloaded into its node's cache, once.
    local, moved = fetch_file(f"{uri}/rounds/1/pool.parquet")
    assert Path(local).read_bytes() == b"p" * 1000 and (moved.bytes, moved.files) == (1000, 1)
    assert Path(local).is_relative_to(tmp_path / "cache" / "files")
    assert fetch_file(f"{uri}/rounds/1/pool.parquet") == (local, Transfer())
    assert driver_file(f"{uri}/rounds/1/pool.parquet", None) == local
    with pytest.raises(FileNotFoundError, match="no such object"):
        fetch_file(f"{uri}/rounds/9/pool.parquet")
    # The driver (its run's store): the mirror's file, nothing downloaded.
    assert driver_file(f"{uri}/rounds/1/pool.parquet", store) == str(pool)
    assert driver_file(str(pool), store) == str(pool)


def test_hand_off_translates_only_mirror_paths_and_only_for_a_remote_run(bucket, tmp_path):
    uri = f"s3://{bucket}/run"
    mirror = tmp_path / "mirror"
    make_outputs(mirror)
    store = RunStore(uri, mirror)
    ckpt = mirror / "rounds/1/checkpoint"
    assert hand_off(ckpt, store) == f"{uri}/rounds/1/checkpoint"
    assert {"rounds/1/checkpoint/model.safetensors", "rounds/1/checkpoint/config.json"} <= set(bucket_files(uri))
    assert hand_off(mirror, store) == uri
    # Outside the mirror (a hub id, the user's own path; a sibling with the mirror's name as a prefix): as given.
    for other in ("gpt2", "/data/models/llama", str(mirror) + "-other/x", f"{uri}/base"):
        assert hand_off(other, store) == other
    # A local run (no store): every path as it is, nothing synced.
    assert hand_off(ckpt, None) == str(ckpt)


def test_storage_env_forwards_credentials_but_not_the_cache(bucket, tmp_path):
    environ = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "",
               "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
               "RRHF_RAY_CACHE": "/mnt/cache", "HOME": "/root", "AWS_SOMETHING_ELSE": "x"}
    assert storage_env(environ) == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                                    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
                                    "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}
    assert set(STORAGE_ENV_VARS) >= {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"}
    assert "RRHF_RAY_CACHE" not in STORAGE_ENV_VARS  # each node keeps its own cache
    assert storage_env({}) == {}
    # The Ray options: the bucket fixture's environment (moto's keys and endpoint) while a remote
    # run has a store, nothing for a local run.
    store = RunStore(f"s3://{bucket}/run", tmp_path / "mirror")
    env = actor_options(store)["runtime_env"]["env_vars"]
    assert env["AWS_ACCESS_KEY_ID"] == "test" and env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert "RRHF_RAY_CACHE" not in env and "AWS_EC2_METADATA_DISABLED" not in env
    assert actor_options(None) == {}


def test_a_pyarrow_without_s3_is_one_clear_error(monkeypatch):
    import pyarrow.fs as pafs

    def missing(name):
        raise ImportError(f"The pyarrow installation is not built with support for '{name}'")

    monkeypatch.delattr(pafs, "S3FileSystem", raising=False)
    monkeypatch.setattr(pafs, "__getattr__", missing, raising=False)
    with pytest.raises(ConfigError, match=r"output.dir: s3://b/run needs pyarrow's S3 client .* "
                                          r"pip install --force-reinstall 'pyarrow>=15'"):
        check_uri("s3://b/run")


def test_a_missing_bucket_is_one_clear_error(bucket, tmp_path):
    config = load_config(DEMO_CONFIG, ["output.dir=s3://no-such-bucket-here/run"])
    with pytest.raises(ConfigError, match=r"output.dir s3://no-such-bucket-here/run: cannot read it"), \
            mirrored(config):
        pytest.fail("ran without a bucket")


def test_preflight_accepts_a_remote_output_dir(bucket):
    from rrhf_ray.preflight import check_run

    config = load_config(DEMO_CONFIG, ["sft=null", f"output.dir=s3://{bucket}/run/"])
    checked = check_run(config)
    assert checked.config.output.dir == f"s3://{bucket}/run/"  # not made into a local path
    assert any(line.startswith(f"ok: output.dir s3://{bucket}/run: object storage") for line in checked.lines)
    with pytest.raises(ConfigError, match="unsupported scheme"):
        check_run(load_config(DEMO_CONFIG, ["sft=null", "output.dir=ftp://host/run"]))


def test_mirrored_syncs_while_running_and_resumes_from_the_bucket(bucket, tmp_path):
    """The workflow's contract without Ray: RunState and timed_stage on the mirror, the bucket
    updated while the run lives, a resume on a fresh mirror skips the finished stage."""
    uri = f"s3://{bucket}/run"
    config = load_config(DEMO_CONFIG, ["sft=null", f"output.dir={uri}"])
    seen_during: list[set] = []

    def remote_stages() -> dict:
        files = bucket_files(uri)
        return json.loads(read_object(f"{uri}/state.json"))["stages"] if "state.json" in files else {}

    def workflow(cfg, fail=False):
        out = Path(cfg.output.dir)
        assert not is_remote(cfg.output.dir) and out.is_relative_to(tmp_path)
        state = RunState(out, cfg)
        timed_stage(state, "base", [out / "base/config.json"],
                    lambda: atomic_write(out / "base/config.json", "{}") and {"path": str(out / "base")})
        deadline = time.monotonic() + 10
        while "base" not in remote_stages():  # the background sync, not the final one
            assert time.monotonic() < deadline
            time.sleep(0.1)
        seen_during.append(set(bucket_files(uri)))
        if fail:
            with atomic_path(out / "rounds/1/pool.parquet") as tmp:
                tmp.write_bytes(b"x")
            raise RuntimeError("stage failed")
        return state.data["stages"]

    with mirrored(config, interval=0.1) as (local, store):
        assert store.uri == uri
        stages = workflow(local)
    assert {"base/config.json", "state.json"} <= seen_during[0]
    assert json.loads(read_object(f"{uri}/state.json"))["fingerprint"] == config_fingerprint(config)

    # A fresh machine (another cache): the bucket's run is accepted, its stage not redone.
    fresh = tmp_path / "fresh-cache"
    with pytest.raises(RuntimeError, match="stage failed"), \
            mirrored(config, cache_dir=fresh, interval=0.1) as (local, _):
        workflow(local, fail=True)
    again = json.loads(read_object(f"{uri}/state.json"))["stages"]
    assert again["base"]["finished"] == stages["base"]["finished"]
    assert "rounds/1/pool.parquet" in bucket_files(uri)  # the final sync ran on the error too
    assert mirror_dir(uri, fresh).is_relative_to(fresh)

    changed = load_config(DEMO_CONFIG, ["sft=null", f"output.dir={uri}", "train.lr=0.5"])
    with pytest.raises(ConfigError, match="different config"), \
            mirrored(changed, cache_dir=tmp_path / "third") as (local, _):
        workflow(local)


def test_the_object_storage_rayjob_is_rayjob_yaml_without_the_shared_volume():
    """cluster/kuberay/rayjob-s3.yaml: the same cluster as rayjob.yaml, no ReadWriteMany claim,
    output.dir and Ray Train's storage in a bucket, the mirror on an emptyDir."""
    import yaml

    kuberay = Path(__file__).resolve().parents[2] / "cluster" / "kuberay"
    plain = list(yaml.safe_load_all((kuberay / "rayjob.yaml").read_text()))
    s3 = list(yaml.safe_load_all((kuberay / "rayjob-s3.yaml").read_text()))
    assert [d["kind"] for d in plain] == [d["kind"] for d in s3]
    job, job_s3 = plain[0]["spec"], s3[0]["spec"]
    assert job_s3["entrypoint"].split() == [*job["entrypoint"].split(), "output.dir=s3://REPLACE_ME-bucket/rrhf/hh_llama7b",
                                            "output.storage_path=s3://REPLACE_ME-bucket/rrhf/ray_train"]
    for entry in job_s3["entrypoint"].split()[-2:]:
        check_uri(entry.split("=", 1)[1])
    groups = [job["rayClusterSpec"]["headGroupSpec"], *job["rayClusterSpec"]["workerGroupSpecs"]]
    groups_s3 = [job_s3["rayClusterSpec"]["headGroupSpec"], *job_s3["rayClusterSpec"]["workerGroupSpecs"]]
    for g, g3 in zip(groups, groups_s3, strict=True):
        spec, spec3 = g["template"]["spec"], g3["template"]["spec"]
        assert "persistentVolumeClaim" not in json.dumps(spec3)
        assert spec3["serviceAccountName"] == "rrhf-ray"
        (c,), (c3,) = spec["containers"], spec3["containers"]
        assert c3["env"] == [{"name": "RRHF_RAY_CACHE", "value": "/mnt/cache"}]
        assert {"name": "rrhf-cache", "mountPath": "/mnt/cache"} in c3["volumeMounts"]
        assert {k: v for k, v in c.items() if k != "volumeMounts"} == \
            {k: v for k, v in c3.items() if k not in ("volumeMounts", "env")}
        assert g["rayStartParams"] == g3["rayStartParams"]
    assert s3[1]["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"] == {
        "batch.kubernetes.io/job-name": s3[0]["metadata"]["name"]}


def test_status_of_a_run_in_a_bucket_reads_its_state_json(bucket, tmp_path, capsys):
    """`rrhf-ray status s3://…` from any machine: the bucket's state.json (what the driver synced),
    its paths the bucket's; a prefix without a run is one clear error."""
    from rrhf_ray.cli import main

    uri = f"s3://{bucket}/run"
    mirror = tmp_path / "mirror"
    make_outputs(mirror)
    RunStore(uri, mirror, fingerprints=("remote-fp", "local-fp")).sync()
    assert main(["status", uri + "/"]) == 0
    out = capsys.readouterr().out
    assert f"run in {uri}: 0 round(s) configured, 2 stage(s) finished" in out
    assert re.search(r"done  base\s+1\.0 s", out) and re.search(r"done  round1/train\s+2\.0 s", out)
    assert str(mirror) not in out

    assert main(["status", f"s3://{bucket}/elsewhere"]) == 2
    assert f"s3://{bucket}/elsewhere holds no run (state.json not found)" in capsys.readouterr().err
    assert read_bucket_object(f"s3://{bucket}/elsewhere/state.json") is None
    assert json.loads(read_bucket_object(f"{uri}/state.json"))["fingerprint"] == "remote-fp"
