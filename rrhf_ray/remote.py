"""Objects in a bucket as the processes of a run read them: URIs, file systems, transfers, and
the per-node cache.

A run with `output.dir` on object storage (``s3://bucket/prefix``, ``gs://bucket/prefix``) hands
its samplers, trainers and evaluation and reference tasks URIs (the driver's side of that is
`rrhf_ray.mirror`). They read through `fetch` (a checkpoint or model directory) and `fetch_file`
(a pool): a URI is downloaded once per node into ``$RRHF_RAY_CACHE/checkpoints/`` or
``…/files/`` (default ``~/.cache/rrhf_ray``), a local path is used as it is, with nothing moved.

Credentials come from the environment, never from the run config: for S3 the AWS chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an
instance profile or IRSA) and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, moto, R2); for GCS ``GOOGLE_APPLICATION_CREDENTIALS`` or the
node's service account. The client is pyarrow's file systems (what Ray Train uses too).

Transfers are counted (`Transfer`: bytes, seconds, files).
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
from rrhf_ray.types import atomic_path

logger = logging.getLogger(__name__)

SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS"}
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


NODE_ID_FIELD = "{node_id}"  # in RRHF_RAY_CACHE: this process's Ray node id


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where mirrors and materialized checkpoints live: `cache_dir`, else ``$RRHF_RAY_CACHE``,
    else ``~/.cache/rrhf_ray``. A ``{node_id}`` in it is the Ray node id of this process ("local"
    before it joins Ray): one cache per node where nodes share a disk and an environment, such
    as the many nodes on one machine of cluster/local-autoscale.yaml (docs/cluster.md)."""
    root = str(cache_dir or os.environ.get("RRHF_RAY_CACHE") or Path.home() / ".cache" / "rrhf_ray")
    if NODE_ID_FIELD in root:
        root = root.replace(NODE_ID_FIELD, _ray_node_id())
    return Path(root).expanduser().resolve()


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def cache_key(uri: str) -> str:
    """A short, stable name for `uri` (a cache entry's or a mirror's directory)."""
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


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


def copy_out(fs: Any, local: Path, path: str) -> os.stat_result:
    """Upload one file; returns the stat of exactly the bytes sent (the file may be replaced
    meanwhile: the open descriptor keeps the old one)."""
    with open(local, "rb") as src:
        st = os.fstat(src.fileno())
        with fs.open_output_stream(path) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    return st


def copy_in(fs: Any, path: str, local: Path) -> int:
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


def remote_files(fs: Any, root: str) -> dict[str, tuple[int, int | None]]:
    """{relative posix path: (size, mtime_ns)} of every object under `root`."""
    import pyarrow.fs as pafs

    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            out[info.path[len(root):].lstrip("/")] = (info.size, info.mtime_ns)
    return out


def parallel(fn: Callable[[T], Any], items: list[T]) -> list[Any]:
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
    sizes = parallel(lambda p: copy_out(fs, p, f"{root}/{p.relative_to(local).as_posix()}").st_size, files)
    return Transfer(sum(sizes), time.perf_counter() - start, len(files))


def download_dir(uri: str, local: str | os.PathLike) -> Transfer:
    """Download every object under `uri` into the directory `local`; a URI with nothing under it
    is a FileNotFoundError."""
    fs, root = filesystem(uri)
    start = time.perf_counter()
    files = sorted(remote_files(fs, root))
    if not files:
        raise FileNotFoundError(f"{uri}: no objects under it")
    return _download(fs, root, files, Path(local), start)


def _download(fs: Any, root: str, files: list[str], local: Path, start: float) -> Transfer:
    sizes = parallel(lambda rel: copy_in(fs, f"{root}/{rel}", local / rel), files)
    return Transfer(sum(sizes), time.perf_counter() - start, len(files))


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool, what: str) -> Iterator[None]:
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
    listing = remote_files(fs, root)
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
        n = copy_in(fs, path, tmp)
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
    dest = cache_root(cache_dir) / kind / f"{cache_key(uri + chr(10) + signature)}-{uri.rsplit('/', 1)[-1]}"
    moved = Transfer()
    if not dest.exists():
        with file_lock(dest.with_name(dest.name + ".lock"), wait=True, what=""):
            if not dest.exists():  # else another process downloaded it while this one waited
                with atomic_path(dest) as tmp:
                    moved = download(tmp)
    line = (f"{uri}: {moved.describe('downloaded')} into {dest}" if moved.files
            else f"{uri}: in this node's cache ({dest})")
    logger.info("%s", line)
    print(f"rrhf_ray.remote: {line}", flush=True)
    return str(dest), moved


def storage_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `STORAGE_ENV_VARS` set (non-empty) in `environ` (default: this process's
    environment): what another process needs to reach the bucket as this one does."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in STORAGE_ENV_VARS if environ.get(k)}
