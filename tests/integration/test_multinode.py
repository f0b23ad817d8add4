"""A lost node costs a retry, not the stage: a sampler replica's node removed mid-sampling.

Several real raylets on this machine (`ray.cluster_utils.Cluster`): a head that only drives and
two nodes declaring `sampler_node`, one sampler replica each (`sampling.resources`, docs/cluster.md
"Placement"), serving round 1's weights. Mid-call, the node of replica 1 is removed (its raylet and
workers killed): its in-flight chunk is re-run on the survivor and the call returns exactly the
pool of an unfaulted call with the same seeds. A new node joins; Ray re-creates replica 1 there
(its placement group rescheduled) with ρ's weights, the pool reloads round 1's, and the next call
equals the unfaulted pool again.

The cluster runs in a subprocess inside private network, PID and mount namespaces (as
tests/integration/test_job_submit.py's head does): its ports, its /tmp/ray and its processes are
its own. `scenario` is that subprocess; the test reads what it wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import lose_node, perturbed_copy, run_scenario

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in
           ("reset my password", "fix a flat tyre", "learn to cook", "water a cactus", "make code faster",
            "tie a tie")]
# A dead node is seen within ~10 s (Ray's default ~15 s; a shorter one marks live nodes of a
# busy machine dead), so the placement group moves soon.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 10}


def _wait(what: str, done, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scenario(work: str) -> None:
    """Run in the sandbox: the cluster, the unfaulted call, the faulted call, the re-created
    replica; what happened goes to `work`/result.json."""
    import ray
    from ray.cluster_utils import Cluster

    import rrhf_ray.actors.sampler as sampler_module
    from rrhf_ray.actors.pools import actor_nodes, role_actors
    from rrhf_ray.actors.sampler import SamplerPool, get_samples, query_seed
    from rrhf_ray.config import SamplingConfig
    from rrhf_ray.demo.tiny import build_tiny_llama
    from tests.integration.actors.test_sampler import BOARD, Board, TracingSampler

    work_dir = Path(work)
    rho = build_tiny_llama(work_dir / "tiny-llama", seed=0)
    round1 = perturbed_copy(rho, work_dir / "round1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": SYSTEM_CONFIG})
    nodes = [cluster.add_node(num_cpus=1, resources={"sampler_node": 1}, env_vars={"RRHF_TEST_NODE": f"sampler{i}"})
             for i in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
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
    assert lose_node(cluster, victim_node, f"RRHF_TEST_NODE=sampler{nodes.index(victim_node)}") > 0
    faulted = ray.get(ref)
    faulted_s = time.monotonic() - started
    events = ray.get(board.events.remote())[seen:]
    victim_done = sorted({c for r, what, c in events if r == 1 and what == "done"})
    victim_lost = sorted({c for r, what, c in events if r == 1 and what == "start"} - set(victim_done))
    survivor_done = ray.get(survivor.served_chunks.remote())[served_before:]

    # A new node: Ray re-creates replica 1 there (max_restarts) with the weights it was built with.
    new_node = cluster.add_node(num_cpus=1, resources={"sampler_node": 1})
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
        "new_node": new_node.node_id, "head_node": cluster.head_node.node_id,
        "faulted_equal": faulted == unfaulted, "again_equal": again == unfaulted,
        "sources": sorted({c.source for g in faulted + again for c in g}),
        "versions": ray.get(pool.version_refs()), "in_flight": list(in_flight),
        "victim_done": [list(c) for c in victim_done],
        "victim_lost": [list(c) for c in victim_lost], "survivor_done": [list(c) for c in survivor_done],
        "all_chunks": [[query_seed(config.seed, i)] for i in range(len(PROMPTS))],
        "unfaulted_s": unfaulted_s, "faulted_s": faulted_s, "back_s": back_s,
    }
    (work_dir / "result.json").write_text(json.dumps(result))
    pool.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_a_sampler_node_lost_mid_sampling_costs_its_chunks_not_the_pool(tmp_path):
    r = run_scenario("tests.integration.test_multinode", tmp_path)

    # One replica per sampler node, none on the head.
    first = {r["placed"][f"sampler-policy{i}"]["node_id"] for i in (0, 1)}
    assert len(first) == 2 and r["head_node"] not in first and r["victim_node"] in first
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
