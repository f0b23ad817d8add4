"""`rrhf-ray submit`: a run as a Ray job on a cluster, from a shell that only reaches the job server.

What is checked here, before anything reaches the cluster: the config's keys and types and the
same preflight as `rrhf-ray validate` (`rrhf_ray.preflight.check_run`: models, data files, the
reward; `--skip-local-checks` leaves those to the job, for a config naming files that exist only
on the cluster), and that `output.dir` (and `output.storage_path`) are absolute: the job runs in
a temporary copy of what is uploaded, which Ray deletes, so a relative directory would vanish with
it. A bad config exits 2 with one `error:` line and submits nothing.

**What runs, and with which Python.** The job's entry point is the shell command
``python -m rrhf_ray run run.yaml``. The job server runs it on the head, so ``python`` is the
one the head's PATH finds: the Python Ray, torch and vLLM are installed in there (start the head
from an activated virtualenv, or use the images of docker/). The submitting machine's own
interpreter (`sys.executable`) would be wrong: its path means nothing on a remote head.

**What is uploaded** (the job's ``runtime_env.working_dir``, a temporary directory built here):
only the sources of the `rrhf_ray` package this command imports (no `__pycache__`), a
``rrhf_ray-<version>.dist-info`` with the package's entry points (so that ``builtin:`` names
resolve on a head that does not have the package installed), and ``run.yaml``: the config as
validated, overrides applied, local input paths absolute, `ray.address` cleared (a submitted job
joins the cluster it runs on). Never the virtualenv, outputs, checkpoints or git history. The
cluster therefore runs the version of the package you have here, whether or not it has one of its
own (Ray puts the working directory first on the path of the job and of its workers); only the
dependencies must be installed there. A reward rule or data loader of your own, in a module
outside `rrhf_ray`, must be installed on the cluster too (or use ``ray job submit --working-dir
.``, docs/cluster.md). Input files (models, data) are not uploaded: name paths every node can read.

**Token authentication** (Ray 2.60). A head started with ``RAY_AUTH_MODE=token``, or started while
``~/.ray/auth_token`` exists (`ray start` then turns it on by itself), refuses a client without
its token. The token is looked up as Ray does: ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. It is sent when ``RAY_AUTH_MODE=token``
(missing, it is an error), and with ``RAY_AUTH_MODE`` unset only to a job server on this machine
(127.0.0.1, localhost: a local head, or an SSH tunnel / port-forward to one), never to a remote
address you did not opt in for; ``RAY_AUTH_MODE=disabled`` sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import rrhf_ray
from rrhf_ray.config import RunConfig, dump_config, with_absolute_paths

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUN_FILE = "run.yaml"
ENTRYPOINT = f"python -m rrhf_ray run {RUN_FILE}"
DIST_NAME = "rrhf-ray"
ENV_VARS = {"TOKENIZERS_PARALLELISM": "false"}  # as cluster/runtime_env.yaml
TOKEN_FILE = Path("~/.ray/auth_token")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(Exception):
    """The job cannot be submitted (an unusable output path, no token, the job server refusing or
    unreachable); the message is one line for the user."""


# --------------------------------------------------------------------------- address and token


def job_address(address: str | None) -> str:
    """The job server's URL: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (as
    `ray job submit` reads them), else the local default."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS).rstrip("/")


def is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_token() -> tuple[str, str] | None:
    """(token, where it came from), looked up in Ray's order; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else TOKEN_FILE.expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if named and not token:
        raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named}: the file cannot be read or is empty")
    return (token, str(path)) if token else None


def auth_token(address: str) -> tuple[str, str] | None:
    """The token to send to `address` (module docstring: when, and from where)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    found = find_token()
    if mode == "token" and found is None:
        raise SubmitError(
            f"RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a "
            f"file holding it, or write it to {TOKEN_FILE} (`ray get-auth-token` prints the head's, "
            "`ray get-auth-token --generate` makes one before `ray start`)")
    if mode != "token" and not is_loopback(address):
        return None
    return found


@contextlib.contextmanager
def _api_server_address(address: str) -> Iterator[None]:
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given:
    pin it to the one chosen here while the client is built."""
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def connect(address: str):
    """(a JobSubmissionClient for `address` with the token, if any, as its Authorization header,
    where that token came from or None)."""
    token = auth_token(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token[0]}"} if token else None
    try:
        with _api_server_address(address):
            return JobSubmissionClient(address, headers=headers), token and token[1]
    except AuthenticationError as err:
        raise SubmitError(_auth_message(address, token, str(err))) from None
    except ConnectionError:
        raise SubmitError(f"no Ray job server at {address}: start a head (`ray start --head`), open the "
                          "tunnel to it (`ray dashboard cluster/aws.yaml`), or give --address") from None
    except (RuntimeError, OSError) as err:  # an HTTP error (requests' errors are OSErrors), an old Ray
        raise SubmitError(f"{address} is not a usable Ray job server: {str(err).splitlines()[0]}") from None


def _auth_message(address: str, token: tuple[str, str] | None, detail: str) -> str:
    if token is None:
        return (f"the Ray job server at {address} requires token authentication: export "
                f"RAY_AUTH_MODE=token, with the head's token in RAY_AUTH_TOKEN, a file named by "
                f"RAY_AUTH_TOKEN_PATH or {TOKEN_FILE} (`ray get-auth-token` on the head prints it)")
    if "403" in detail or "invalid" in detail.lower() or "Forbidden" in detail:
        return (f"the Ray job server at {address} refused the token from {token[1]}: it is not the "
                "head's (`ray get-auth-token` on the head prints the right one)")
    return f"the Ray job server at {address} refused the request: {detail.splitlines()[0]}"


# --------------------------------------------------------------------------- what is shipped


def check_output_paths(config: RunConfig) -> None:
    """`output.dir` and a local `output.storage_path` must be absolute paths (module docstring)."""
    for key, value in (("output.dir", config.output.dir), ("output.storage_path", config.output.storage_path)):
        if value is None or "://" in value or Path(value).is_absolute():
            continue
        raise SubmitError(
            f"{key} {value} is relative, but a submitted job runs in a temporary copy of its sources "
            f"that Ray deletes: give an absolute path on the cluster (for a head on this machine, "
            f"{key}={Path(value).resolve()})")


def resolve(config: RunConfig, *, local_checks: bool = True) -> RunConfig:
    """The config the job runs: checked here (`rrhf-ray validate`'s preflight unless
    `local_checks` is off), local input paths absolute, `ray.address` cleared."""
    check_output_paths(config)
    if local_checks:
        from rrhf_ray.preflight import check_run

        config = check_run(config).config
    else:
        config = with_absolute_paths(config)
    return config.model_copy(update={"ray": config.ray.model_copy(update={"address": None})})


def _entry_points_text() -> str:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return distribution(DIST_NAME).read_text("entry_points.txt") or ""
    except PackageNotFoundError:  # sources without an install: the group is declared in pyproject.toml
        return "[rrhf_ray.builtins]\ndemo = rrhf_ray.demo\n"


def stage(config: RunConfig, dest: Path) -> Path:
    """Write what the job uploads into `dest` (module docstring); returns `dest`."""
    package = Path(rrhf_ray.__file__).resolve().parent
    shutil.copytree(package, dest / "rrhf_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    version = getattr(rrhf_ray, "__version__", None) or _version()
    info = dest / f"rrhf_ray-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(_entry_points_text())
    (dest / RUN_FILE).write_text(dump_config(config))
    return dest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- submit and follow


def submit(config: RunConfig, source: str, *, address: str | None = None, wait: bool = False,
           local_checks: bool = True, echo: Callable[[str], None] = print) -> int:
    """Check `config`, submit it as a Ray job, print the job id and how to follow it; with `wait`,
    stream the job's log and return 0 when it SUCCEEDED, 1 otherwise. Raises SubmitError (and the
    config's own errors) before anything is submitted."""
    config = resolve(config, local_checks=local_checks)
    url = job_address(address)
    client, token_from = connect(url)
    with tempfile.TemporaryDirectory(prefix="rrhf-submit-") as tmp:
        staged = stage(config, Path(tmp))
        try:
            job_id = client.submit_job(
                entrypoint=ENTRYPOINT,
                runtime_env={"working_dir": str(staged), "env_vars": dict(ENV_VARS)},
                metadata={"rrhf_ray.config": source, "rrhf_ray.output_dir": config.output.dir},
            )
        except RuntimeError as err:
            raise SubmitError(f"the Ray job server at {url} refused the job: {str(err).splitlines()[0]}") from None
    addr = f" --address {url}"
    echo(f"submitted job {job_id} to {url}: {ENTRYPOINT} (config {source}); outputs in {config.output.dir}")
    if not wait:
        echo(f"follow it:  ray job logs -f{addr} {job_id}")
        echo(f"its state:  ray job status{addr} {job_id}    stop it (resumable): ray job stop{addr} {job_id}")
        if token_from and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            echo(f"            (sent the token from {token_from}: the `ray job` commands send it only "
                 "with RAY_AUTH_MODE=token in their shell)")
        echo("or submit with --wait to follow the log here")
        return 0
    return follow(client, job_id, echo=echo, stop_hint=f"ray job stop{addr} {job_id}")


def follow(client, job_id: str, *, echo: Callable[[str], None] = print, stop_hint: str = "") -> int:
    """Stream the job's log to stdout until it ends; 0 if it SUCCEEDED, else 1."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError as err:  # the log stream closed early: the status below still tells
            echo(f"(the log stream ended early: {err}; waiting for the job's status)")
        status = str(client.get_job_status(job_id).value)
        while status not in TERMINAL:
            time.sleep(2)
            status = str(client.get_job_status(job_id).value)
    except KeyboardInterrupt:
        echo(f"\nstopped following; job {job_id} keeps running ({stop_hint} stops it)")
        return 130
    info = client.get_job_info(job_id)
    if status == "SUCCEEDED":
        echo(f"job {job_id} SUCCEEDED")
        return 0
    # Ray's message is "Job entrypoint command failed with exit code N, last available logs …"
    # and the log's tail: the run's own one-line `error:`, when there is one, says why.
    lines = [line.strip() for line in (info.message or "").splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    why = f": {lines[0]}" if lines else ""
    print(f"error: job {job_id} {status}{why}" + (f" {cause}" if cause else ""), file=sys.stderr)
    return 1
