"""Object storage for a run: `output.dir` = ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

The driver never writes to the bucket directly. It works in a local *mirror* of the run
(`mirror_dir`: ``$RRHF_RAY_CACHE/runs/<sha of the URI>``, default ``~/.cache/rrhf_ray``), which
`RunStore.pull` fills from the bucket when the run starts (that is how a run resumes on a fresh
machine), and which `RunStore.sync` pushes to the bucket every few seconds while the run lives
and once more when it ends (or fails):

1. take a snapshot of ``state.json``'s bytes;
2. upload every file that is new or changed since it was last uploaded or pulled (size, mtime,
   inode), skipping the temporary names of `rrhf_ray.types.atomic_path` and Ray Train's scratch
   directory ``ray_train/``;
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

Credentials come from the environment, never from the run config: for S3 the AWS chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an
instance profile or IRSA) and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, moto, R2); for GCS ``GOOGLE_APPLICATION_CREDENTIALS`` or the
node's service account. The client is pyarrow's file systems (what Ray Train uses too).

Other processes (the samplers, the trainers, the evaluation and reference tasks, maybe on other
nodes) never see the mirror: the driver hands them URIs (`hand_off`: the mirror's path as the
bucket's URI, after a sync so that the bucket holds it), and the storage variables of its own
environment in their Ray runtime env (`ray_options`). They read through `fetch` (a checkpoint or
model directory) and `fetch_file` (a pool): a URI downloaded once per node into
``$RRHF_RAY_CACHE/checkpoints/`` or ``…/files/``, a local path as it is. With a local
`output.dir` none of this happens: paths stay paths, nothing is copied.

Transfers are counted (`Transfer`: bytes, seconds, files): each sync that moved anything logs
"uploaded 12.3 MB (4 files) in 0.4 s", and `RunStore.totals()` / `RunStore.uploaded(prefix)`
give the sums for metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from rrhf_ray.config import ConfigError
from rrhf_ray.types import atomic_path, atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "STORAGE_ENV_VARS", "RunStore", "Transfer", "active_store", "cache_root", "check_uri", "download_dir",
    "fetch", "fetch_file", "hand_off", "is_remote", "local_path", "materialize", "mirror_dir", "ray_options",
    "read_object", "run_mirrored", "storage_env", "upload_dir",
]

SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS"}
STATE_FILE = "state.json"  # rrhf_ray.state.STATE_FILE (not imported: state imports nothing of this)
SKIP_DIRS = ("ray_train",)  # Ray Train's scratch (output.storage_path's default), never synced
SYNC_SECONDS = 5.0  # default interval of the background sync (env RRHF_RAY_SYNC_SECONDS)
INSTALL_HINT = "pip install --force-reinstall 'pyarrow>=15'"  # PyPI wheels: S3 and GCS included
CHUNK = 8 << 20
THREADS = 4
# What a process needs to reach the bucket, forwarded from the driver's environment to the actors
# and tasks that read it (`storage_env`). Not RRHF_RAY_CACHE: each node keeps its own cache.
STORAGE_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
)

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-\d+$")  # atomic_path / install_dir's temporary siblings

T = TypeVar("T")


# --------------------------------------------------------------------------- URIs


def is_remote(uri: str | os.PathLike | None) -> bool:
    """Whether `uri` is a URI (``scheme://…``) rather than a local path."""
    return uri is not None and bool(_URI.match(str(uri)))


def check_uri(uri: str, name: str = "output.dir") -> str:
    """`uri` normalised (no trailing slash) after checking its scheme, bucket and that the client
    for it imports; no network access. A bad URI is a ConfigError naming `name`."""
    m = _URI.match(uri)
    if not m:
        raise ConfigError(f"{name}: {uri!r} is not a URI (scheme://bucket/prefix)")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise ConfigError(f"{name}: {uri}: unsupported scheme {scheme}://; object storage is s3://BUCKET/PREFIX "
                          "or gs://BUCKET/PREFIX, anything else a local path")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{name}: {uri} names no bucket ({scheme}://BUCKET/PREFIX)")
    prefix = prefix.rstrip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"{name}: {uri}: empty, '.' or '..' path components are not allowed")
    _client(scheme, name, uri)
    return f"{scheme}://{bucket}/{prefix}".rstrip("/")


def _client(scheme: str, name: str, uri: str) -> Any:
    """pyarrow's file system class for `scheme`, or a ConfigError saying what to install."""
    cls = "S3FileSystem" if SCHEMES[scheme] == "S3" else "GcsFileSystem"
    try:
        import pyarrow.fs as pafs

        return getattr(pafs, cls)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"{name}: {uri} needs pyarrow's {SCHEMES[scheme]} client (pyarrow.fs.{cls}), which this "
            f"pyarrow was built without ({err}); install a full pyarrow: {INSTALL_HINT} (PyPI wheels "
            "include S3 and GCS; on conda: pyarrow, not pyarrow-core)") from None


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow file system, the URI's path in it: "bucket/prefix"). An S3 endpoint other than
    AWS's comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; credentials from the
    environment's usual chain."""
    uri = check_uri(uri, "URI")
    scheme, rest = uri.split("://", 1)
    cls = _client(scheme, "URI", uri)
    if SCHEMES[scheme] == "S3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            return cls(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme,
                       region=region), rest
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{uri}: cannot open ({err})") from None
    return fs, path.rstrip("/")


def read_object(uri: str, name: str = "URI") -> bytes | None:
    """The bytes of the object at `uri`, None when there is none; a bucket that cannot be read
    (missing, no credentials, no network) is one ConfigError naming `name`."""
    import pyarrow.fs as pafs

    uri = check_uri(uri, name)
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"{name}: cannot read {uri} ({err}); credentials and endpoint come from the "
                          "environment (AWS_* / GOOGLE_APPLICATION_CREDENTIALS)") from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where mirrors and materialized checkpoints live: `cache_dir`, else ``$RRHF_RAY_CACHE``,
    else ``~/.cache/rrhf_ray``."""
    root = cache_dir or os.environ.get("RRHF_RAY_CACHE") or Path.home() / ".cache" / "rrhf_ray"
    return Path(root).expanduser().resolve()


def _key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def mirror_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local mirror of the run at `uri`: ``<cache>/runs/<sha of the URI>``."""
    return cache_root(cache_dir) / "runs" / _key(check_uri(uri))


# --------------------------------------------------------------------------- transfers


@dataclass
class Transfer:
    """Bytes and files moved, and the wall-clock seconds it took."""

    bytes: int = 0
    seconds: float = 0.0
    files: int = 0

    def __add__(self, other: Transfer) -> Transfer:
        return Transfer(self.bytes + other.bytes, self.seconds + other.seconds, self.files + other.files)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def describe(self, verb: str) -> str:
        return (f"{verb} {self.bytes / 1e6:.1f} MB ({self.files} file{'s' * (self.files != 1)}) in "
                f"{self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s)")


def _copy_out(fs: Any, local: Path, path: str) -> os.stat_result:
    """Upload one file; returns the stat of exactly the bytes sent (the file may be replaced
    meanwhile: the open descriptor keeps the old one)."""
    with open(local, "rb") as src:
        st = os.fstat(src.fileno())
        with fs.open_output_stream(path) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    return st


def _copy_in(fs: Any, path: str, local: Path) -> int:
    """Download one object to `local` (under a temporary name, renamed when whole)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    n = 0
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                n += len(chunk)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _remote_files(fs: Any, root: str) -> dict[str, tuple[int, int | None]]:
    """{relative posix path: (size, mtime_ns)} of every object under `root`."""
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            out[info.path[len(root):].lstrip("/")] = (info.size, info.mtime_ns)
    return out


def _parallel(fn: Callable[[T], Any], items: list[T]) -> list[Any]:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def upload_dir(local: str | os.PathLike, uri: str) -> Transfer:
    """Upload every file under the local directory `local` to `uri` (a trainer on a node
    without the driver's mirror, putting its checkpoint where `materialize` finds it)."""
    fs, root = filesystem(uri)
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    start = time.perf_counter()
    sizes = _parallel(lambda p: _copy_out(fs, p, f"{root}/{p.relative_to(local).as_posix()}").st_size, files)
    return Transfer(sum(sizes), time.perf_counter() - start, len(files))


def download_dir(uri: str, local: str | os.PathLike) -> Transfer:
    """Download every object under `uri` into the directory `local`; a URI with nothing under it
    is a FileNotFoundError."""
    fs, root = filesystem(uri)
    start = time.perf_counter()
    files = sorted(_remote_files(fs, root))
    if not files:
        raise FileNotFoundError(f"{uri}: no objects under it")
    return _download(fs, root, files, Path(local), start)


def _download(fs: Any, root: str, files: list[str], local: Path, start: float) -> Transfer:
    sizes = _parallel(lambda rel: _copy_in(fs, f"{root}/{rel}", local / rel), files)
    return Transfer(sum(sizes), time.perf_counter() - start, len(files))


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ConfigError(what) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def materialize(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory holding the checkpoint (or model) at `path_or_uri`: `fetch`'s path."""
    return fetch(path_or_uri, cache_dir)[0]


def fetch(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, Transfer]:
    """(a local directory holding the checkpoint or model at `path_or_uri`, what it took to get
    it): a local path as it is, with nothing moved; a URI downloaded into
    ``<cache>/checkpoints/<sha>-<name>`` unless that node's cache has it already (then nothing
    moved either). See `_cached` for why the key includes the objects' sizes and times."""
    if not is_remote(path_or_uri):
        return str(path_or_uri), Transfer()
    uri = check_uri(str(path_or_uri), "checkpoint")
    fs, root = filesystem(uri)
    start = time.perf_counter()
    listing = _remote_files(fs, root)
    if not listing:
        raise FileNotFoundError(f"{uri}: no objects under it")
    files = sorted(listing)
    return _cached(uri, listing, "checkpoints", cache_dir,
                   lambda tmp: _download(fs, root, files, tmp, start))


def fetch_file(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, Transfer]:
    """`fetch` for one object (a round's pool): a local path as it is; a URI downloaded into
    ``<cache>/files/<sha>-<name>`` unless cached. A URI naming no object is a FileNotFoundError."""
    if not is_remote(path_or_uri):
        return str(path_or_uri), Transfer()
    import pyarrow.fs as pafs

    uri = check_uri(str(path_or_uri), "file")
    fs, path = filesystem(uri)
    start = time.perf_counter()
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such object")

    def download(tmp: Path) -> Transfer:
        n = _copy_in(fs, path, tmp)
        return Transfer(n, time.perf_counter() - start, 1)

    return _cached(uri, {"": (info.size, info.mtime_ns)}, "files", cache_dir, download)


def _cached(uri: str, listing: dict[str, tuple[int, int | None]], kind: str, cache_dir: str | os.PathLike | None,
            download: Callable[[Path], Transfer]) -> tuple[str, Transfer]:
    """The node's cached copy of `uri` (``<cache>/<kind>/<sha>-<name>``), downloaded by
    `download(temporary path)` when missing: atomically (a copy there is whole), and once per
    node (concurrent callers, e.g. two replicas or two trainer ranks, wait for one download; the
    others report nothing moved). The key hashes the URI with every object's size and
    modification time: a prefix that another run wrote again (a bucket prefix deleted and reused)
    is downloaded anew instead of serving the old run's weights or pool. Logged, and printed to
    this process's output (an actor's log file under the run's ``logs/``), so the run's logs
    say which process downloaded what."""
    signature = json.dumps(sorted((rel, list(v)) for rel, v in listing.items()))
    dest = cache_root(cache_dir) / kind / f"{_key(uri + chr(10) + signature)}-{uri.rsplit('/', 1)[-1]}"
    moved = Transfer()
    if not dest.exists():
        with _flock(dest.with_name(dest.name + ".lock"), wait=True, what=""):
            if not dest.exists():  # else another process downloaded it while this one waited
                with atomic_path(dest) as tmp:
                    moved = download(tmp)
    line = (f"{uri}: {moved.describe('downloaded')} into {dest}" if moved.files
            else f"{uri}: in this node's cache ({dest})")
    logger.info("%s", line)
    print(f"rrhf_ray.storage: {line}", flush=True)
    return str(dest), moved


# --------------------------------------------------------------------------- handing paths to other processes


def storage_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `STORAGE_ENV_VARS` set (non-empty) in `environ` (default: this process's
    environment): what another process needs to reach the bucket as this one does."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in STORAGE_ENV_VARS if environ.get(k)}


def ray_options(store: RunStore | None = None) -> dict[str, Any]:
    """Ray options (``.options(**…)``) for an actor or task that reads the run's bucket: while a
    run on object storage is active (`store`, default `active_store()`), a runtime env with the
    driver's `storage_env`; else nothing, so a local run starts exactly the processes it did.

    Why: Ray's worker processes inherit the environment of their node's raylet, not the driver's
    (a cluster is usually started before, and apart from, the shell that submits a run); the job's
    runtime env is fixed when the driver connects. Ray keeps idle worker processes per runtime
    env, so every task that should reuse a warm process must pass the same options
    (`rrhf_ray.evaluation.warm_up_workers` does)."""
    store = active_store() if store is None else store
    env = storage_env() if store is not None else {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def hand_off(path: str | os.PathLike, store: RunStore | None = None) -> str:
    """What to give another process for `path` (a checkpoint, model or pool the driver wrote):
    with `output.dir` on object storage (`store`, default `active_store()`), a path inside the
    mirror becomes the bucket's URI, after a sync, so the bucket holds it by the time the other
    process reads it (a sync that finds nothing new only walks the mirror); anything else, and
    every path of a local run, is returned as it is."""
    store = active_store() if store is None else store
    if store is None:
        return str(path)
    uri = store.uri_of(path)
    if uri != str(path):
        store.sync()
    return uri


def local_path(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """A local file for `path_or_uri`: a path as it is; in the driver, a URI of its own run as the
    mirror's path (nothing to download); anywhere else a URI through `fetch_file`."""
    if not is_remote(path_or_uri):
        return str(path_or_uri)
    store = active_store()
    if store is not None and (local := store.local_of(str(path_or_uri))) != str(path_or_uri):
        return local
    return fetch_file(path_or_uri, cache_dir)[0]


# --------------------------------------------------------------------------- the run's store

_ACTIVE: RunStore | None = None


def active_store() -> RunStore | None:
    """The RunStore of the run this process drives now (inside `run_mirrored`), else None."""
    return _ACTIVE


class RunStore:
    """The run at `uri` and its local mirror: `pull`, `sync`, a background syncer (`start` /
    `stop`), and the transfer totals.

    `fingerprints` (remote, local): the config fingerprint as the bucket's state.json holds it
    (the config with the remote `output.dir`) and as the mirror's does (with the mirror's path);
    `pull` refuses a bucket whose run has another config, and the sync writes the remote one.
    """

    def __init__(self, uri: str, mirror: str | os.PathLike | None = None,
                 fingerprints: tuple[str, str] | None = None) -> None:
        self.uri = check_uri(uri)
        self.mirror = Path(mirror).resolve() if mirror is not None else mirror_dir(self.uri)
        self.fingerprints = fingerprints
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
        return parts[0] in SKIP_DIRS or any(_TEMP_NAME.match(p) for p in parts)

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
            if data.get("fingerprint") != self.fingerprints[0]:
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
            remote = _remote_files(self.fs, self.root)
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
                n = _copy_in(self.fs, f"{self.root}/{rel}", self.mirror / rel)
                self._manifest[rel] = {"local": self._sig((self.mirror / rel).stat()), "remote": list(remote[rel])}
                return n

            moved = sum(_parallel(get, sorted(todo)))
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
                moved = sum(_parallel(put, sorted(todo, key=lambda t: t[0])))
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
        return _copy_out(self.fs, path, f"{self.root}/{rel}")

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
        with _flock(self.mirror.with_name(self.mirror.name + ".lock"), wait=False, what=what):
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


# --------------------------------------------------------------------------- the driver's wrapper


def run_mirrored(config: Any, run_fn: Callable[[Any], T], *, cache_dir: str | os.PathLike | None = None,
                 interval: float | None = None) -> T:
    """Run `run_fn` (the workflow) on a local mirror of the remote `config.output.dir`: pull,
    run with `output.dir` set to the mirror, syncing in the background, a final sync (also when
    `run_fn` fails), and return `run_fn`'s result."""
    global _ACTIVE
    from rrhf_ray.state import config_fingerprint

    uri = check_uri(config.output.dir)
    mirror = mirror_dir(uri, cache_dir)
    local = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(mirror)})})
    store = RunStore(uri, mirror, (config_fingerprint(config), config_fingerprint(local)))
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
        _ACTIVE = store
        try:
            result = run_fn(local)
        except BaseException:
            store.stop()
            try:
                store.sync(final=True)
            except Exception:
                logger.exception("the final sync to %s failed; the bucket holds the last synced stage", uri)
            raise
        finally:
            _ACTIVE = None
        store.stop()
        store.sync(final=True)
    t = store.totals()
    logger.info("%s: uploaded %.1f MB in %.1f s, downloaded %.1f MB in %.1f s over the run", uri,
                t["upload_bytes"] / 1e6, t["upload_seconds"], t["download_bytes"] / 1e6, t["download_seconds"])
    return result
