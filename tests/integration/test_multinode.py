"""A lost node costs a retry, not the stage: a sampler replica's node removed mid-sampling, a
reward scorer's node removed mid-scoring, then the warm trainer's node removed mid-round.

Several real raylets on this machine (`ray.cluster_utils.Cluster`), one cluster for the three
faults: a head that only drives, two nodes declaring `sampler_node` and `reward_node` (first one
sampler replica each, `sampling.resources`; later one reward-model scorer each,
`reward.resources`; docs/cluster.md "Placement") and one declaring `trainer_node` (the warm
trainer's worker, `train.resources`). The sampler replicas serve round 1's weights from local
paths; for the scorers and the trainer nothing is on a disk the nodes share: the reward model,
the start model and the pools are in a bucket on a real S3-compatible server (moto, inside the
sandbox), Ray Train's checkpoints go there too, and each node has its own `RRHF_RAY_CACHE` (its
raylet's environment), so what a node read is in its own cache.

1. Sampling: mid-call, the node of replica 1 is removed (its raylet and workers killed): its
   in-flight chunk is re-run on the survivor and the call returns exactly the pool of an
   unfaulted call with the same seeds. A new node joins; Ray re-creates replica 1 there (its
   placement group rescheduled) with ρ's weights, the pool reloads round 1's, and the next call
   equals the unfaulted pool again.
2. Scoring, on the surviving node and the new one: the node of scorer 1 is removed while it
   scores a chunk; that chunk is rescored on the survivor, and the call's rewards equal an
   unfaulted call's.
3. Training: round 1 trains on the trainer node; while round 2 trains that node is removed and a
   new one joins; Ray Train restarts the worker there from round 1's checkpoint (`FailureConfig`)
   and the driver sends round 2 again. Round 2's weights equal those of an unfaulted run with the
   same seeds (a fresh fit per round in one process, which tests/integration/train/test_warm.py
   shows the warm trainer equals), and only round 2 was trained again.

The cluster runs in a subprocess inside private network, PID and mount namespaces (as
tests/integration/test_job_submit.py's head does): its ports, its /tmp/ray and its processes are
its own. `scenario` is that subprocess; the tests read what it wrote.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import ray

from rrhf_ray.actors.scorer import RewardScorer
from rrhf_ray.types import query_text
from tests.helpers import lose_node, perturbed_copy, run_scenario

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
BOARD = "rrhf-test-scorer-board"
QUESTIONS = ["reset my password", "fix a flat tyre", "learn to cook", "water a cactus", "make code faster",
             "tie a tie"]
PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in QUESTIONS]
# A dead node is seen within ~10 s (Ray's default ~15 s; a shorter one marks live nodes of a
# busy machine dead), so the placement group moves soon.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 10}
# Each chunk takes this long on a scorer: long enough for its node to be removed mid-chunk.
CHUNK_SECONDS = 2.0
# Round 2's steps: enough that the round outlasts a few of the worker's progress-bar flushes (one
# a second, what `steps_done` reads) on a quiet machine; at 40 steps, with the fused AdamW, the
# whole round fitted between two flushes and the kill landed after its last step.
ROUND2_STEPS = 160


@ray.remote(num_cpus=0)
class Board:
    """(node id, "start" | "done", the chunk's first query) in the order the scorers report them."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, str]] = []

    def record(self, node: str, what: str, query: str) -> None:
        self._events.append((node, what, query))

    def events(self) -> list[tuple[str, str, str]]:
        return list(self._events)


class TracingScorer(RewardScorer):
    """A `RewardScorer` that reports each chunk it starts and finishes, and takes CHUNK_SECONDS."""

    def score(self, queries, responses):
        board = ray.get_actor(BOARD)
        node, first = ray.get_runtime_context().get_node_id(), query_text(queries[0])
        board.record.remote(node, "start", first)
        time.sleep(CHUNK_SECONDS)
        scored = super().score(queries, responses)
        ray.get(board.record.remote(node, "done", first))
        return scored


def _wait(what: str, done, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _cached(cache: Path) -> dict[str, list[str]]:
    """{"checkpoints" | "files": names} of what a node's cache holds (rrhf_ray.remote's layout)."""
    return {kind: sorted(p.name.split("-", 1)[1] for p in (cache / kind).glob("*-*") if not p.name.endswith(".lock"))
            for kind in ("checkpoints", "files")}


def _reward_model(policy: Path, out: Path) -> Path:
    """A LlamaForSequenceClassification (one logit) on the tiny policy's config and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(policy)
    config = AutoConfig.from_pretrained(policy, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def sample_lost_node(cluster, nodes: dict, work_dir: Path, caches: Path) -> tuple[dict, dict]:
    """Sampling with two replicas on `nodes` ({node: its cache's name}), one per node; replica 1's
    node removed mid-chunk, then a new node (a sampler and reward node, as the lost one) on which
    Ray re-creates it. Returns what happened and the nodes left for the scorers."""
    import rrhf_ray.actors.sampler as sampler_module
    from rrhf_ray.actors.pools import actor_nodes, role_actors
    from rrhf_ray.actors.sampler import SamplerPool, get_samples, query_seed
    from rrhf_ray.config import SamplingConfig
    from rrhf_ray.demo.tiny import build_tiny_llama
    from tests.integration.actors.test_sampler import BOARD, Board, TracingSampler

    rho = build_tiny_llama(work_dir / "tiny-llama", seed=0)
    round1 = perturbed_copy(rho, work_dir / "round1")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    board = Board.options(name=BOARD, scheduling_strategy=NodeAffinitySchedulingStrategy(
        cluster.head_node.node_id, soft=False)).remote()  # on the head, which stays
    # Chunks of one query and long replies: a chunk runs long enough to be caught mid-way, and a
    # single request per engine call computes the same whichever replica runs it.
    config = SamplingConfig(num_replicas=2, n=8, max_new_tokens=200, stop=[], dtype="float32", max_model_len=256,
                            chunk_prompts=1, seed=11, enforce_eager=True, resources={"sampler_node": 1})
    sampler_module.Sampler = TracingSampler  # the pool starts the actor class `Sampler` names
    pool = SamplerPool(str(rho), config, version=0)
    assert ray.get(pool.version_refs(), timeout=600) == [0, 0]
    ray.get(pool.load_weights_refs(str(round1), 1))  # the round's weights
    placed = actor_nodes(role_actors({"current": pool}, None))
    get_samples(pool, PROMPTS[:2], progress=False)  # warm both engines up: the timings compare calls
    started = time.monotonic()
    unfaulted = get_samples(pool, PROMPTS, progress=False)
    unfaulted_s = time.monotonic() - started

    survivor, victim = pool.replicas
    victim_node = next(n for n in nodes if n.node_id == placed["sampler-policy1"]["node_id"])
    seen = len(ray.get(board.events.remote()))
    served_before = len(ray.get(survivor.served_chunks.remote()))
    started = time.monotonic()
    ref = pool.sample_refs(PROMPTS, progress=False)
    running: list = []

    def victim_mid_chunk() -> bool:
        events = ray.get(board.events.remote())[seen:]
        running[:] = [c for r, what, c in events if r == 1 and what == "start" and (1, "done", c) not in events]
        return bool(running)

    _wait("replica 1 to start a chunk", victim_mid_chunk)
    in_flight = running[0]
    assert lose_node(cluster, victim_node, f"RRHF_RAY_CACHE={caches / nodes[victim_node]}") > 0
    faulted = ray.get(ref)
    faulted_s = time.monotonic() - started
    events = ray.get(board.events.remote())[seen:]
    victim_done = sorted({c for r, what, c in events if r == 1 and what == "done"})
    victim_lost = sorted({c for r, what, c in events if r == 1 and what == "start"} - set(victim_done))
    survivor_done = ray.get(survivor.served_chunks.remote())[served_before:]

    # A new node: Ray re-creates replica 1 there (max_restarts) with the weights it was built with.
    new_node = cluster.add_node(num_cpus=1, resources={"sampler_node": 1, "reward_node": 1},
                                env_vars={"RRHF_RAY_CACHE": str(caches / "role2")})
    started = time.monotonic()

    def victim_back() -> bool:
        try:
            return ray.get(victim.served_version.remote(), timeout=5) == 0
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(1)
            return False

    _wait("replica 1 to come back", victim_back, timeout=600)
    back_s = time.monotonic() - started
    replaced = actor_nodes(role_actors({"current": pool}, None))
    again = get_samples(pool, PROMPTS, progress=False)  # reloads round 1's weights on replica 1 first
    result = {
        "placed": placed, "replaced": replaced, "victim_node": victim_node.node_id,
        "new_node": new_node.node_id, "nodes": [n.node_id for n in nodes],
        "faulted_equal": faulted == unfaulted, "again_equal": again == unfaulted,
        "sources": sorted({c.source for g in faulted + again for c in g}),
        "versions": ray.get(pool.version_refs()), "in_flight": list(in_flight),
        "victim_done": [list(c) for c in victim_done],
        "victim_lost": [list(c) for c in victim_lost], "survivor_done": [list(c) for c in survivor_done],
        "all_chunks": [[query_seed(config.seed, i)] for i in range(len(PROMPTS))],
        "unfaulted_s": unfaulted_s, "faulted_s": faulted_s, "back_s": back_s,
    }
    pool.shutdown()
    ray.kill(board)
    survivors = {n: name for n, name in nodes.items() if n is not victim_node}
    return result, {**survivors, new_node: "role2"}


def score_lost_node(cluster, nodes: dict, model_uri: str, caches: Path) -> dict:
    """Scoring with two scorers on `nodes` ({node: its cache's name}); scorer 1's node removed
    mid-chunk in the second call."""
    from rrhf_ray.actors import scorer as scorer_module
    from rrhf_ray.actors.pools import actor_nodes
    from rrhf_ray.actors.scorer import RewardPool
    from rrhf_ray.config import RewardConfig
    from rrhf_ray.types import Candidate, CandidateGroup

    groups = [CandidateGroup(f"\n\nHuman: How do I {q}?\n\nAssistant:", tuple(
        Candidate(r, source="policy@0") for r in (f" Sure, to {q} go slowly.", " No.", f" {q}? Ask someone else.")))
        for q in QUESTIONS]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    board = Board.options(name=BOARD, scheduling_strategy=NodeAffinitySchedulingStrategy(
        cluster.head_node.node_id, soft=False)).remote()
    config = RewardConfig(kind="model", model=model_uri, num_workers=2, batch_size=2, chunk_queries=1,
                          resources={"reward_node": 1})
    scorer_module.RewardScorer = TracingScorer  # the pool starts the actor class `RewardScorer` names
    pool = RewardPool(config)
    placed = actor_nodes({f"reward{i}": w for i, w in enumerate(pool.workers)})
    started = time.monotonic()
    unfaulted = ray.get(pool.score_refs(groups, progress=False))
    unfaulted_s = time.monotonic() - started

    victim = next(n for n in nodes if n.node_id == placed["reward1"]["node_id"])
    seen = len(ray.get(board.events.remote()))
    started = time.monotonic()
    ref = pool.score_refs(groups, progress=False)
    running: list = []

    def victim_mid_chunk() -> bool:
        events = ray.get(board.events.remote())[seen:]
        done = {q for n, what, q in events if what == "done"}
        running[:] = [q for n, what, q in events if n == victim.node_id and what == "start" and q not in done]
        return bool(running)

    _wait("scorer 1 to start a chunk", victim_mid_chunk)
    in_flight = running[0]
    assert lose_node(cluster, victim, f"RRHF_RAY_CACHE={caches / nodes[victim]}") > 0
    faulted = ray.get(ref)
    faulted_s = time.monotonic() - started
    events = ray.get(board.events.remote())[seen:]

    def chunks(node: str, what: str) -> list[str]:
        return sorted({q for n, w, q in events if n == node and w == what})

    survivor = placed["reward0"]["node_id"]
    result = {
        "reward_placed": placed, "reward_victim": victim.node_id, "in_flight": in_flight,
        "reward_nodes": [n.node_id for n in nodes], "reward_caches": [nodes[n] for n in nodes],
        "victim_done": chunks(victim.node_id, "done"),
        "victim_lost": sorted(set(chunks(victim.node_id, "start")) - set(chunks(victim.node_id, "done"))),
        "survivor_done": [q for n, w, q in events if n == survivor and w == "done"],
        "all_chunks": sorted(g.query for g in groups),
        "rewards_unfaulted": [g.scores for g in unfaulted], "rewards_faulted": [g.scores for g in faulted],
        "responses_equal": [(g.query, g.responses, g.sources) for g in faulted]
        == [(g.query, g.responses, g.sources) for g in unfaulted],
        "score_unfaulted_s": unfaulted_s, "score_faulted_s": faulted_s,
    }
    pool.shutdown()
    ray.kill(board)
    return result


class _Restarts(logging.Handler):
    """The warm trainer's (held round, sent round) at each `ready` of a (re)started group."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[int, int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("warm trainer (re)started"):
            held, sent = record.args
            self.seen.append((int(held), int(sent), time.monotonic()))


def train_lost_node(cluster, node, work: Path, root: str, cfg, caches: Path) -> dict:
    """The warm trainer for rounds 1 and 2; its node removed while round 2 trains, a new one added."""
    from rrhf_ray.train.checkpoints import install_checkpoint
    from rrhf_ray.train.warm import WarmJob, WarmTrainer

    restarts = _Restarts()
    warm_log = logging.getLogger("rrhf_ray.train.warm")
    warm_log.addHandler(restarts)
    warm_log.setLevel(logging.INFO)
    job = WarmJob(model_path=f"{root}/tiny-llama", output_dir=str(work / "rounds"), train=cfg,
                  log_dir=str(work / "logs"))
    trainer = WarmTrainer(job, 0, storage_path=f"{root}/ray_train")

    def steps_done() -> int:
        """The most steps of round 2 (ROUND2_STEPS in all) any worker's progress bar has shown."""
        bars = [json.loads(line) for log in (work / "logs").glob("train-*.log")
                for line in log.read_text().splitlines() if line.startswith("{") and '"RRHF training"' in line]
        return max([b["x"] for b in bars if b["total"] == ROUND2_STEPS], default=0)

    try:
        first = trainer.train(1, [f"{root}/pool1.jsonl"])
        install_checkpoint(first["checkpoint"], work / "warm1", first["metrics"])
        before = trainer.nodes.seen()
        done: dict = {}
        sent = time.monotonic()
        thread = threading.Thread(target=lambda: done.update(trainer.train(2, [f"{root}/pool2.jsonl"])))
        thread.start()
        try:
            # Mid-round: the worker has trained a few of round 2's steps (its progress bar's updates
            # in its log).
            _wait("the worker training round 2", lambda: trainer.training_round == 2 and steps_done() >= 5, 300)
            steps_before = steps_done()
            assert thread.is_alive(), "round 2 ended before its node was removed"
            assert node.node_id == before[0]["node_id"]
            removed = time.monotonic()
            assert lose_node(cluster, node, f"RRHF_RAY_CACHE={caches / 'trainer'}") > 0
            new_node = cluster.add_node(num_cpus=1, resources={"trainer_node": 1},
                                        env_vars={"RRHF_RAY_CACHE": str(caches / "trainer-new")})
        finally:
            thread.join(timeout=600)
        assert not thread.is_alive(), "round 2 did not finish after the node was lost"
        ended = time.monotonic()
        install_checkpoint(done["checkpoint"], work / "warm2", done["metrics"])
        after = trainer.nodes.seen()
    finally:
        trainer.close()
        warm_log.removeHandler(restarts)
    ready = [t for _, _, t in restarts.seen]
    return {
        "train_nodes_before": before, "train_nodes_after": after, "train_victim": node.node_id,
        "train_new_node": new_node.node_id, "starts": trainer.starts,
        "restarts": [[held, sent_round] for held, sent_round, _ in restarts.seen],
        "history1": [h["global_step"] for h in first["history"]],
        "history2": [h["global_step"] for h in done["history"]],
        "round2_metrics_round": done["metrics"]["round"],
        # Round 2 from its command to the kill (work lost), to the restarted group's `ready`, to the
        # end (the re-run round).
        "steps_before_kill": steps_before, "round2_before_kill_s": removed - sent, "restart_s": ready[-1] - removed if len(ready) > 1 else None,
        "rerun_s": ended - ready[-1], "round2_total_s": ended - sent,
    }


def cold_round(cfg, start: Path, pool: Path, out: Path, round_index: int) -> Path:
    """One round as a fresh fit in this process (no Ray), with the round's seed: the unfaulted run."""
    from rrhf_ray.train.loop import round_train_seed
    from rrhf_ray.train.rrhf import TrainJob, train_loop_per_worker

    cfg = cfg.model_copy(update={"seed": round_train_seed(cfg.seed, round_index), "resources": {}})
    job = TrainJob(model_path=str(start), data_paths=[str(pool)], output_dir=str(out), train=cfg)
    train_loop_per_worker({"job": job.model_dump(mode="json")})
    return out


def _max_weight_difference(a_dir: Path, b_dir: Path) -> dict[str, float]:
    """{tensor: largest |a − b| relative to the tensor's largest |b|} of two safetensors checkpoints."""
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return {k: float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-12))
            for k in a}


def scenario(work: str) -> None:
    """Run in the sandbox: the bucket, the cluster, the two lost nodes, the unfaulted training;
    what happened goes to `work`/result.json."""
    from ray.cluster_utils import Cluster

    from rrhf_ray.config import TrainConfig
    from rrhf_ray.demo.tiny import build_tiny_llama
    from rrhf_ray.remote import filesystem, upload_dir
    from tests.helpers import write_ranked
    from tests.object_store import create_bucket, moto_s3

    work_dir = Path(work)
    caches = work_dir / "cache"
    local = work_dir / "local"  # what is uploaded; no node is handed a path in it
    policy = build_tiny_llama(local / "tiny-llama", seed=0)
    reward_model = _reward_model(policy, local / "reward-model")
    pools = [write_ranked(local / "pool1.jsonl", 12), write_ranked(local / "pool2.jsonl", 2 * ROUND2_STEPS, offset=12)]
    # 12 groups / 4 per step × 2 epochs = 6 steps in round 1; round 2 long enough to be caught.
    cfg = TrainConfig(epochs=2, lr=3e-4, queries_per_step=4, micro_batch_queries=2, seed=7,
                      resources={"trainer_node": 1})
    with moto_s3(work_dir / "moto.log") as s3_env:
        os.environ.update(s3_env)  # every raylet started below inherits the bucket's credentials
        os.environ["RRHF_RAY_CACHE"] = str(caches / "head")
        root = f"s3://{create_bucket(s3_env)}/run"
        for d in (policy, reward_model):
            upload_dir(d, f"{root}/{d.name}")
        fs, path = filesystem(root)
        for p in pools:
            with fs.open_output_stream(f"{path}/{p.name}") as f:
                f.write(p.read_bytes())

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": SYSTEM_CONFIG})
        role_nodes = {cluster.add_node(num_cpus=1, resources={"sampler_node": 1, "reward_node": 1},
                                       env_vars={"RRHF_RAY_CACHE": str(caches / f"role{i}")}): f"role{i}"
                      for i in (0, 1)}
        trainer_node = cluster.add_node(num_cpus=1, resources={"trainer_node": 1},
                                        env_vars={"RRHF_RAY_CACHE": str(caches / "trainer")})
        ray.init(address=cluster.address, log_to_driver=False)
        result = {"head_node": cluster.head_node.node_id}
        started = time.monotonic()
        result["sampler"], reward_nodes = sample_lost_node(cluster, role_nodes, work_dir, caches)
        result["sampler_part_s"] = time.monotonic() - started
        started = time.monotonic()
        result.update(score_lost_node(cluster, reward_nodes, f"{root}/reward-model", caches))
        result["reward_part_s"] = time.monotonic() - started
        started = time.monotonic()
        result.update(train_lost_node(cluster, trainer_node, work_dir, root, cfg, caches))
        result["train_part_s"] = time.monotonic() - started
        ray.shutdown()
        cluster.shutdown()
    result["caches"] = {p.name: _cached(p) for p in sorted(caches.iterdir())}
    import torch

    torch.set_num_threads(1)  # as the Ray workers of 1-CPU nodes (OMP_NUM_THREADS=1)
    # The unfaulted run: each round a fresh fit from the last round's weights, same seeds.
    cold1 = cold_round(cfg, policy, pools[0], work_dir / "cold1", 1)
    cold2 = cold_round(cfg, cold1, pools[1], work_dir / "cold2", 2)
    result["round1_difference"] = _max_weight_difference(work_dir / "warm1", cold1)
    result["round2_difference"] = _max_weight_difference(work_dir / "warm2", cold2)
    (work_dir / "result.json").write_text(json.dumps(result))


def run_sandboxed(tmp_path: Path) -> dict:
    """The scenario's result.json (one sandboxed cluster for the module's tests; read through
    `sandboxed_result`, tests/conftest.py)."""
    started = time.monotonic()
    result = run_scenario("tests.integration.test_multinode", tmp_path, drop=("RRHF_RAY_CACHE", "AWS_"))
    result["scenario_s"] = time.monotonic() - started
    return result


@pytest.fixture(scope="module")
def lost_nodes(sandboxed_result: dict) -> dict:
    r = sandboxed_result
    print(f"lost-node scenario: {r['scenario_s']:.0f} s in all (sampling part {r['sampler_part_s']:.0f} s, "
          f"scoring part {r['reward_part_s']:.0f} s, training part {r['train_part_s']:.0f} s)")
    return r


def test_a_sampler_node_lost_mid_sampling_costs_its_chunks_not_the_pool(lost_nodes):
    r = {**lost_nodes["sampler"], "head_node": lost_nodes["head_node"]}

    # One replica per sampler node, none on the head.
    first = {r["placed"][f"sampler-policy{i}"]["node_id"] for i in (0, 1)}
    assert first == set(r["nodes"]) and r["head_node"] not in first and r["victim_node"] in first
    # The in-flight chunk of the lost replica was re-run on the survivor; what the lost replica
    # had finished was kept, not redone; the pool is the unfaulted one, every candidate round 1's.
    assert r["in_flight"] not in r["victim_done"] and r["in_flight"] in r["victim_lost"]
    assert all(c in r["survivor_done"] for c in r["victim_lost"])
    assert not set(map(tuple, r["victim_done"])) & set(map(tuple, r["survivor_done"]))
    assert sorted(r["victim_done"] + r["survivor_done"]) == sorted(r["all_chunks"])
    assert r["faulted_equal"] is True
    assert r["sources"] == ["policy@1"]
    # Replica 1 was re-created on the new node, reloaded round 1's weights, and samples the same.
    assert r["replaced"]["sampler-policy1"]["node_id"] == r["new_node"]
    assert r["replaced"]["sampler-policy0"] == r["placed"]["sampler-policy0"]
    assert r["versions"] == [1, 1] and r["again_equal"] is True
    print(f"lost sampler node: unfaulted call {r['unfaulted_s']:.1f} s, faulted {r['faulted_s']:.1f} s, "
          f"replica back on a new node after {r['back_s']:.1f} s; {len(r['victim_lost'])} chunk(s) re-run on "
          f"the survivor, {len(r['victim_done'])} the lost replica finished kept")


def test_a_reward_node_lost_mid_scoring_costs_its_chunk_not_the_call(lost_nodes):
    r = lost_nodes
    # One scorer per reward node, none on the head.
    placed = {r["reward_placed"][f"reward{i}"]["node_id"] for i in (0, 1)}
    assert placed == set(r["reward_nodes"]) and r["head_node"] not in placed
    # The chunk in flight on the lost node was rescored on the survivor, once; what the lost
    # scorer had finished was kept, not rescored; every chunk was scored exactly once.
    assert r["victim_lost"] == [r["in_flight"]]
    assert r["survivor_done"].count(r["in_flight"]) == 1
    assert not set(r["victim_done"]) & set(r["survivor_done"])
    assert sorted(r["victim_done"] + r["survivor_done"]) == r["all_chunks"]
    # The rewards are the unfaulted call's (the same model on the same chunk: the same floats).
    assert r["responses_equal"] is True
    assert r["rewards_faulted"] == r["rewards_unfaulted"]
    assert len({s for g in r["rewards_unfaulted"] for s in g}) > 1
    # Each reward node read the model from the bucket into its own cache.
    for node in r["reward_caches"]:
        assert r["caches"][node]["checkpoints"] == ["reward-model"], r["caches"]
    print(f"lost reward node: unfaulted call {r['score_unfaulted_s']:.1f} s, faulted {r['score_faulted_s']:.1f} s; "
          f"chunk {r['in_flight'][-40:]!r} rescored, {len(r['victim_done'])} finished by the lost scorer kept")


def test_a_trainer_node_lost_mid_round_costs_the_round_not_the_run(lost_nodes):
    r = lost_nodes
    # Round 1 on the first trainer node, round 2 finished on the node that joined, never the head.
    assert r["train_nodes_before"]["0"]["node_id"] == r["train_victim"] != r["head_node"]
    assert r["train_nodes_after"]["0"]["node_id"] == r["train_new_node"]
    # Ray Train restarted the group once, from round 1's checkpoint: the driver sent round 2
    # again, and nothing else (round 1 was not trained again).
    assert r["starts"] == 2
    assert r["restarts"] == [[0, 1], [1, 2]]
    assert r["round2_metrics_round"] == 2.0
    assert r["history1"] == [1, 2, 3, 4, 5, 6]
    # Round 2's node was removed mid-training; the re-sent round ran all its steps once, counted
    # on from round 1's checkpoint.
    assert 5 <= r["steps_before_kill"] < ROUND2_STEPS
    assert r["history2"] == list(range(7, 7 + ROUND2_STEPS))
    # The weights equal an unfaulted run's with the same seeds (round 1 before the fault too).
    worst = {name: max(r[name].items(), key=lambda kv: kv[1]) for name in ("round1_difference", "round2_difference")}
    assert all(w[1] < 1e-5 for w in worst.values()), worst
    # No shared disk: the first trainer node read the start model and both pools from the bucket
    # into its own cache; the node that joined only round 2's pool (the weights came from Ray
    # Train's checkpoint in the bucket); the driver's node read the pools it checks, never a model.
    caches = r["caches"]
    assert caches["trainer"] == {"checkpoints": ["tiny-llama"], "files": ["pool1.jsonl", "pool2.jsonl"]}, caches
    assert caches["trainer-new"] == {"checkpoints": [], "files": ["pool2.jsonl"]}, caches
    assert caches["head"]["checkpoints"] == [], caches
    print(f"lost trainer node: round 2 ran {r['round2_before_kill_s']:.1f} s ({r['steps_before_kill']} of "
          f"{ROUND2_STEPS} steps) before its node was removed, the "
          f"group was back {r['restart_s']:.1f} s later, the re-sent round took {r['rerun_s']:.1f} s "
          f"({r['round2_total_s']:.1f} s in all); largest relative weight difference to the unfaulted run: "
          f"round 1 {worst['round1_difference'][1]:.1e}, round 2 {worst['round2_difference'][1]:.1e}")
