"""The driver's side of a run on object storage: the local mirror of `output.dir` and its sync.

With `output.dir` = ``s3://bucket/prefix`` or ``gs://bucket/prefix`` the driver never writes to
the bucket directly. It works in a local *mirror* of the run (`mirror_dir`:
``$RRHF_RAY_CACHE/runs/<sha of the URI>``, default ``~/.cache/rrhf_ray``), which `RunStore.pull`
fills from the bucket when the run starts (that is how a run resumes on a fresh machine), and
which `RunStore.sync` pushes to the bucket every few seconds while the run lives and once more
when it ends (or fails):

1. take a snapshot of ``state.json``'s bytes;
2. upload every file that is new or changed since it was last uploaded or pulled (size, mtime,
   inode), skipping the temporary names of `rrhf_ray.types.atomic_path`, Ray Train's scratch
   directory ``ray_train/`` and the local driver's lock ``driver.lock``;
3. upload the snapshot of ``state.json`` last.

Every local output is written under a temporary name and renamed when whole, and a stage is
recorded in ``state.json`` only after its outputs are in place; so the bucket's ``state.json``
only ever names stages whose outputs are already in the bucket, and each object is whole (an
upload becomes visible only when it completes). A driver killed at any moment leaves a bucket a
resume can trust: the resume pulls it into a (possibly fresh) mirror and continues at the first
stage the bucket's ``state.json`` does not name.

The bucket's ``state.json`` names the run as the user gave it: paths inside the mirror are
written as URIs under `output.dir`, and the config fingerprint is that of the config with the
remote `output.dir`; `pull` translates both back for the mirror it fills.

Other processes never see the mirror: the driver hands them URIs (`hand_off(path, store)`: the
mirror's path as the bucket's URI, after a sync so that the bucket holds it) and the storage
variables of its own environment in their Ray runtime env (`actor_options(store)`); they read
through `rrhf_ray.remote`. Every function here takes the run's `RunStore` (None for a local
`output.dir`, where paths stay paths and nothing is copied) as an argument: there is no
process-wide "current store".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rrhf_ray.config import ConfigError
from rrhf_ray.remote import (
    Transfer,
    cache_key,
    cache_root,
    check_uri,
    copy_in,
    copy_out,
    fetch_file,
    file_lock,
    filesystem,
    is_remote,
    parallel,
    remote_files,
    storage_env,
)
from rrhf_ray.types import atomic_write

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"  # rrhf_ray.state.STATE_FILE (not imported: state imports nothing of this)
SKIP_DIRS = ("ray_train",)  # Ray Train's scratch (output.storage_path's default), never synced
SKIP_FILES = ("driver.lock",)  # rrhf_ray.state.LOCK_FILE: the lock of this machine's driver, never synced
SYNC_SECONDS = 5.0  # default interval of the background sync (env RRHF_RAY_SYNC_SECONDS)
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-\d+$")  # atomic_path / install_dir's temporary siblings


def mirror_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local mirror of the run at `uri`: ``<cache>/runs/<sha of the URI>``."""
    return cache_root(cache_dir) / "runs" / cache_key(check_uri(uri))


# --------------------------------------------------------------------------- handing paths to other processes


def actor_options(store: RunStore | None) -> dict[str, Any]:
    """Ray options (``.options(**…)``) for an actor or task that reads the run's bucket: for a
    run on object storage (`store`), a runtime env with the driver's `storage_env`; else nothing,
    so a local run starts exactly the processes it did.

    Why: Ray's worker processes inherit the environment of their node's raylet, not the driver's
    (a cluster is usually started before, and apart from, the shell that submits a run); the job's
    runtime env is fixed when the driver connects. Ray keeps idle worker processes per runtime
    env, so every task that should reuse a warm process must pass the same options
    (`rrhf_ray.evaluation.warm_up_workers` does)."""
    env = storage_env() if store is not None else {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def hand_off(path: str | os.PathLike, store: RunStore | None) -> str:
    """What to give another process for `path` (a checkpoint, model or pool the driver wrote):
    for a run on object storage (`store`), a path inside the mirror becomes the bucket's URI,
    after a sync, so the bucket holds it by the time the other process reads it (a sync that
    finds nothing new only walks the mirror); anything else, and every path of a local run
    (`store` None), is returned as it is."""
    if store is None:
        return str(path)
    uri = store.uri_of(path)
    if uri != str(path):
        store.sync()
    return uri


def driver_file(path_or_uri: str | os.PathLike, store: RunStore | None,
                cache_dir: str | os.PathLike | None = None) -> str:
    """A file the driver can read for `path_or_uri`: a path as it is; a URI of its own run
    (`store`) as the mirror's path (nothing to download); another URI through `fetch_file`."""
    if not is_remote(path_or_uri):
        return str(path_or_uri)
    if store is not None and (local := store.local_of(str(path_or_uri))) != str(path_or_uri):
        return local
    return fetch_file(path_or_uri, cache_dir)[0]


# --------------------------------------------------------------------------- the run's store


class RunStore:
    """The run at `uri` and its local mirror: `pull`, `sync`, a background syncer (`start` /
    `stop`), and the transfer totals.

    `fingerprints` (remote, local): the config fingerprint as the bucket's state.json holds it
    (the config with the remote `output.dir`) and as the mirror's does (with the mirror's path);
    `pull` refuses a bucket whose run has another config, and the sync writes the remote one.
    """

    def __init__(self, uri: str, mirror: str | os.PathLike | None = None,
                 fingerprints: tuple[str, str] | None = None, earlier: frozenset[str] = frozenset()) -> None:
        self.uri = check_uri(uri)
        self.mirror = Path(mirror).resolve() if mirror is not None else mirror_dir(self.uri)
        self.fingerprints = fingerprints
        self.earlier = earlier  # the remote config's fingerprints under the earlier schema (accepted)
        self.fs, self.root = filesystem(self.uri)
        self.pulled = Transfer()
        self.pushed = Transfer()
        self._manifest_path = self.mirror.with_name(self.mirror.name + ".sync.json")
        self._manifest: dict[str, dict[str, Any]] = self._read_manifest()
        self._uploads: dict[str, tuple[int, float, float]] = {}  # rel → (bytes, start, end)
        self._state_sent: bytes | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    # ---- paths

    def uri_of(self, local: str | os.PathLike) -> str:
        """The URI of a path inside the mirror (a path outside it is returned unchanged)."""
        return _translate(str(local), str(self.mirror), self.uri)

    def local_of(self, uri: str) -> str:
        """The mirror's path of a URI under this run (another URI is returned unchanged)."""
        return _translate(uri, self.uri, str(self.mirror))

    def _skipped(self, rel: str) -> bool:
        parts = rel.split("/")
        return parts[0] in SKIP_DIRS or rel in SKIP_FILES or any(_TEMP_NAME.match(p) for p in parts)

    # ---- the manifest: what was last uploaded or pulled, per file

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._manifest_path.read_text())
            return data if isinstance(data, dict) and self.mirror.is_dir() else {}
        except (OSError, ValueError):
            return {}

    def _write_manifest(self) -> None:
        atomic_write(self._manifest_path, json.dumps(self._manifest))

    @staticmethod
    def _sig(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _local_files(self) -> dict[str, Path]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.mirror):
            rel_dir = Path(dirpath).relative_to(self.mirror).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = [d for d in dirnames if not self._skipped(rel_dir + d)]
            for name in filenames:
                rel = rel_dir + name
                if rel != STATE_FILE and not self._skipped(rel):
                    out[rel] = Path(dirpath) / name
        return out

    # ---- state.json, translated between the bucket and the mirror

    def _state_to_remote(self, raw: bytes) -> bytes:
        data = _walk_strings(json.loads(raw), lambda s: self.uri_of(s))
        if self.fingerprints and data.get("fingerprint") == self.fingerprints[1]:
            data["fingerprint"] = self.fingerprints[0]
        return json.dumps(data, indent=2, default=str).encode()

    def _state_to_local(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.uri}/{STATE_FILE} is not a run's state ({err})") from None
        if self.fingerprints:
            if data.get("fingerprint") not in {self.fingerprints[0], *self.earlier}:
                raise ConfigError(
                    f"output directory {self.uri} holds a run with a different config (see "
                    f"{self.uri}/{STATE_FILE}); use another output.dir, or the same config "
                    "(only `rounds` may grow)")
            data["fingerprint"] = self.fingerprints[1]
        data = _walk_strings(data, lambda s: self.local_of(s))
        return json.dumps(data, indent=2, default=str).encode()

    # ---- pull and sync

    def pull(self) -> Transfer:
        """Make the mirror what the bucket holds: download what is missing or changed, remove
        local files the bucket does not have (but `ray_train/`), translate state.json."""
        with self._lock:
            start = time.perf_counter()
            import pyarrow.fs as pafs

            bucket = self.root.split("/", 1)[0]
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"bucket {bucket} not found")
            remote = remote_files(self.fs, self.root)
            raw = None
            if STATE_FILE in remote:  # first: a bucket holding another config's run is refused as it is
                with self.fs.open_input_stream(f"{self.root}/{STATE_FILE}") as f:
                    raw = f.read()
                local_state = self._state_to_local(raw)
            self.mirror.mkdir(parents=True, exist_ok=True)
            (self.mirror / STATE_FILE).unlink(missing_ok=True)  # an interrupted pull names nothing
            local = self._local_files()
            todo = []
            for rel, (size, mtime) in remote.items():
                if rel == STATE_FILE or self._skipped(rel):
                    continue
                seen, path = self._manifest.get(rel), local.get(rel)
                if seen and path is not None and seen["remote"][0] == size \
                        and seen["remote"][1] in (None, mtime) and seen["local"] == self._sig(path.stat()):
                    continue
                todo.append(rel)
            for rel in set(local) - set(remote):  # the bucket is the truth: unsynced leftovers go
                local[rel].unlink(missing_ok=True)
                self._manifest.pop(rel, None)

            def get(rel: str) -> int:
                n = copy_in(self.fs, f"{self.root}/{rel}", self.mirror / rel)
                self._manifest[rel] = {"local": self._sig((self.mirror / rel).stat()), "remote": list(remote[rel])}
                return n

            moved = sum(parallel(get, sorted(todo)))
            if raw is not None:  # last, as in the bucket: it names only outputs already pulled
                atomic_write(self.mirror / STATE_FILE, local_state)
                self._state_sent = raw
                moved += len(raw)
                todo.append(STATE_FILE)
            for rel in list(self._manifest):
                if rel not in remote:
                    self._manifest.pop(rel)
            self._write_manifest()
            done = Transfer(moved, time.perf_counter() - start, len(todo))
            self.pulled += done
            logger.info("pulled %s into %s: %s", self.uri, self.mirror, done.describe("downloaded"))
            return done

    def sync(self, *, final: bool = False) -> Transfer:
        """Push the mirror: a snapshot of state.json first, then every new or changed file, then
        the snapshot (so the bucket's state.json names only stages whose outputs are there). With
        `final`, objects of files that no longer exist in the mirror are deleted afterwards."""
        with self._lock:
            start = time.perf_counter()
            state = self.mirror / STATE_FILE
            try:
                snapshot = state.read_bytes()
            except FileNotFoundError:
                snapshot = None
            todo = []
            for rel, path in self._local_files().items():
                try:
                    sig = self._sig(path.stat())
                except FileNotFoundError:  # replaced or removed since the walk: the next sync
                    continue
                if self._manifest.get(rel, {}).get("local") != sig:
                    todo.append((rel, path))

            def put(item: tuple[str, Path]) -> int:
                rel, path = item
                t0 = time.perf_counter()
                try:
                    st = self._upload(path, rel)
                except FileNotFoundError:
                    return 0
                self._manifest[rel] = {"local": self._sig(st), "remote": [st.st_size, None]}
                self._uploads[rel] = (st.st_size, t0, time.perf_counter())
                return st.st_size

            try:
                moved = sum(parallel(put, sorted(todo, key=lambda t: t[0])))
            finally:
                self._write_manifest()
            files = len(todo)
            if snapshot is not None:
                remote_state = self._state_to_remote(snapshot)
                if remote_state != self._state_sent:
                    self._put_bytes(remote_state, STATE_FILE)
                    self._state_sent = remote_state
                    moved += len(remote_state)
                    files += 1
            if final:
                local = self._local_files()
                for rel in [r for r in self._manifest if r not in local]:
                    self.fs.delete_file(f"{self.root}/{rel}")
                    self._manifest.pop(rel)
                self._write_manifest()
            done = Transfer(moved, time.perf_counter() - start, files)
            self.pushed += done
            if files:
                logger.info("%s to %s", done.describe("uploaded"), self.uri)
            return done

    def _upload(self, path: Path, rel: str) -> os.stat_result:
        return copy_out(self.fs, path, f"{self.root}/{rel}")

    def _put_bytes(self, data: bytes, rel: str) -> None:
        with self.fs.open_output_stream(f"{self.root}/{rel}") as f:
            f.write(data)

    # ---- the background syncer

    def start(self, interval: float | None = None) -> None:
        """Sync every `interval` seconds (default ``$RRHF_RAY_SYNC_SECONDS`` or 5) in a daemon
        thread until `stop`; a failed sync is logged and retried at the next tick."""
        if interval is None:
            interval = float(os.environ.get("RRHF_RAY_SYNC_SECONDS", SYNC_SECONDS))
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sync()
                except Exception as err:  # noqa: BLE001 - network errors of any kind: retry
                    self.errors += 1
                    logger.warning("sync to %s failed (retried in %.0f s): %s", self.uri, interval, err)

        self._thread = threading.Thread(target=loop, name="rrhf-ray-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background syncer (a sync in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- accounting

    def uploaded(self, prefix: str = "") -> Transfer:
        """The last upload of every file under `prefix` (relative to the run, e.g.
        "rounds/2/checkpoint"): bytes, files, and seconds from the first start to the last end."""
        prefix = prefix.strip("/")
        hits = [v for rel, v in self._uploads.items()
                if not prefix or rel == prefix or rel.startswith(prefix + "/")]
        if not hits:
            return Transfer()
        return Transfer(sum(h[0] for h in hits), max(h[2] for h in hits) - min(h[1] for h in hits), len(hits))

    def totals(self) -> dict[str, float]:
        """Everything moved so far: upload_bytes / _seconds / _files, download_bytes / _seconds / _files."""
        return {"upload_bytes": self.pushed.bytes, "upload_seconds": round(self.pushed.seconds, 3),
                "upload_files": self.pushed.files, "download_bytes": self.pulled.bytes,
                "download_seconds": round(self.pulled.seconds, 3), "download_files": self.pulled.files}

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the mirror by one driver on this machine."""
        what = (f"output.dir {self.uri}: another driver on this machine is using its mirror {self.mirror} "
                "(wait for it to end, or stop it)")
        with file_lock(self.mirror.with_name(self.mirror.name + ".lock"), wait=False, what=what):
            yield


def _translate(value: str, old: str, new: str) -> str:
    if value == old or value.startswith(old + "/"):
        return new + value[len(old):]
    return value


def _walk_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _walk_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk_strings(v, fn) for v in obj]
    return obj


# --------------------------------------------------------------------------- the driver's side of a run


@contextlib.contextmanager
def mirrored(config: Any, *, cache_dir: str | os.PathLike | None = None,
             interval: float | None = None) -> Iterator[tuple[Any, RunStore]]:
    """A run on the local mirror of the remote `config.output.dir`: pull (a bucket holding another
    config's run is refused), yield (the config with `output.dir` set to the mirror, the store)
    while syncing in the background, then a final sync, also when the run fails. Held under the
    mirror's lock: one driver per mirror on a machine."""
    from rrhf_ray.state import config_fingerprint, earlier_fingerprints

    uri = check_uri(config.output.dir)
    mirror = mirror_dir(uri, cache_dir)
    local = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(mirror)})})
    store = RunStore(uri, mirror, (config_fingerprint(config), config_fingerprint(local)),
                     frozenset(earlier_fingerprints(config)))
    with store.lock():
        try:
            store.pull()
        except OSError as err:  # no such bucket, no credentials, no network: one line
            raise ConfigError(f"output.dir {uri}: cannot read it ({err}); credentials and endpoint come "
                              "from the environment (AWS_* / GOOGLE_APPLICATION_CREDENTIALS)") from None
        if config.output.storage_path is None:
            logger.info("Ray Train's storage (output.storage_path) is %s/ray_train on this machine, not "
                        "synced; on more than one node set output.storage_path=s3://… or gs://…", mirror)
        store.start(interval)
        try:
            yield local, store
        except BaseException:
            store.stop()
            try:
                store.sync(final=True)
            except Exception:
                logger.exception("the final sync to %s failed; the bucket holds the last synced stage", uri)
            raise
        store.stop()
        store.sync(final=True)
    t = store.totals()
    logger.info("%s: uploaded %.1f MB in %.1f s, downloaded %.1f MB in %.1f s over the run", uri,
                t["upload_bytes"] / 1e6, t["upload_seconds"], t["download_bytes"] / 1e6, t["download_seconds"])
