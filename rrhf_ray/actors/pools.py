"""The sampler pools a run uses, and the engines kept between the runs of one process.

A sampling preset names the pool it draws from: "current" (ρ*, the policy the last round
trained) for IP, "initial" (the frozen ρ) for BP / DP / D, none for P. Evaluation samples from
ρ* whatever the preset, so a run always has a "current" pool.

`EngineCache` holds the engines that runs one after another in one process (`rrhf-ray
compare`) share: a run that ends leaves its pools there, and the next run whose model and
engine settings (`ENGINE_FIELDS`) are the same loads its own weights into them
(`SamplerPool.load_weights_refs`, prefix cache reset) instead of starting engines, which mostly
means importing vLLM again (on a GPU, also compiling and capturing graphs). What a request asks
for (k, temperature, lengths, the preset, the timeouts) may differ between the runs: the pool
takes the new run's sampling settings and sends them with every request. Every request is
seeded, so a kept engine samples what a new one would. The cache is an object the caller owns
and passes in; nothing is kept in module state.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Self

from rrhf_ray.config import RunConfig

if TYPE_CHECKING:
    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.data.candidates import Preset
    from rrhf_ray.mirror import RunStore

logger = logging.getLogger(__name__)


# The sampling settings a pool's engines and placement are built from; the others are per request
# or the driver's (`SamplerPool.sample_refs` sends them with each call).
ENGINE_FIELDS = frozenset({"num_replicas", "seed", "enforce_eager", "dtype", "kv_cache_gib", "tensor_parallel_size",
                           "max_model_len", "cpus_per_replica", "use_gpu", "max_restarts", "resources"})


def engine_settings(config: RunConfig, tag: str) -> str:
    """What an engine is built from: the pool's tag, the model and the sampling settings of
    `ENGINE_FIELDS`; a kept pool serves a run only when these are equal."""
    return json.dumps([tag, config.model.model_dump(mode="json"),
                       config.sampling.model_dump(mode="json", include=set(ENGINE_FIELDS))], sort_keys=True)


class EngineCache:
    """Sampler pools left by finished runs, by tag, for the next run of this process; a context
    manager that shuts down whatever is still kept when it ends."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[str, SamplerPool]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def take(self, tag: str, settings: str) -> SamplerPool | None:
        """The kept pool of `tag` if it was built with `settings` (removed from the cache); a kept
        pool with other settings is shut down."""
        kept = self._kept.pop(tag, None)
        if kept is None:
            return None
        if kept[0] == settings:
            return kept[1]
        kept[1].shutdown()
        return None

    def keep(self, pool: SamplerPool, settings: str) -> bool:
        """Keep `pool` for the next run; False (nothing kept) when one of its tag is kept already."""
        if pool.tag in self._kept:
            return False
        self._kept[pool.tag] = (settings, pool)
        return True

    def close(self) -> None:
        kept, self._kept = self._kept, {}
        for _, pool in kept.values():
            pool.shutdown()


def start_pool(config: RunConfig, tag: str, weights: str, version: int, *, store: RunStore | None = None,
               engines: EngineCache | None = None, log_dir: str | None = None) -> SamplerPool:
    """A pool serving `weights` (labelled `version`) and writing to `log_dir`: a kept one of the
    same settings from `engines` with the weights loaded in place, else new engines."""
    import ray

    from rrhf_ray.actors.sampler import SamplerPool

    kept = engines.take(tag, engine_settings(config, tag)) if engines is not None else None
    if kept is not None:
        logger.info("sampler engines (%s) kept from the previous run: loading %s in place", tag, weights)
        kept.config = config.sampling  # this run's requests (the engine settings are equal)
        ray.get(kept.redirect_logs_refs(log_dir) + kept.load_weights_refs(weights, version))
        return kept
    from rrhf_ray.mirror import hand_off

    model = config.model
    # The run's tokenizer (`with_run_tokenizer`) lies in output.dir: from the bucket on a run there.
    tokenizer = hand_off(model.tokenizer, store) if model.tokenizer else None
    return SamplerPool(weights, config.sampling, tag=tag, version=version, tokenizer=tokenizer,
                       trust_remote_code=model.trust_remote_code, store=store, log_dir=log_dir)


def build_pools(config: RunConfig, preset: Preset, rho: str, current: str, version: int, *,
                store: RunStore | None = None, engines: EngineCache | None = None,
                log_dir: str | None = None, with_current: bool = False) -> dict[str, SamplerPool]:
    """The pools `preset` samples from: "current" (the weights at `current`, labelled `version`)
    or "initial" (ρ at `rho`); none for P. `with_current`: a "current" pool in any case (the
    driver's evaluation samples from ρ*). The paths are what the engines read (the bucket's URIs
    for a run on object storage: the caller hands them off). Used by both the driver and
    `rrhf-ray sample`, so the two build the same engines."""
    pools = {}
    if preset.policy == "initial":
        pools["initial"] = start_pool(config, "initial", rho, 0, store=store, engines=engines, log_dir=log_dir)
    if preset.policy == "current" or with_current:
        pools["current"] = start_pool(config, "policy", current, version, store=store, engines=engines,
                                      log_dir=log_dir)
    return pools


def release_pools(config: RunConfig, pools: dict[str, SamplerPool], engines: EngineCache | None, *,
                  keep: bool) -> None:
    """The end of a run: with `engines`, a run that finished (`keep`) leaves its pools there for
    the next run; otherwise (or after a failure, when an engine may be broken) they shut down."""
    for pool in pools.values():
        if not (keep and engines is not None and engines.keep(pool, engine_settings(config, pool.tag))):
            pool.shutdown()


def fits_beside_sft(config: RunConfig) -> bool:
    """Whether the cluster has room for the sampler engines and the SFT stage's workers at once
    (then the engines start during SFT, from the base model; else after it)."""
    import ray

    s, t = config.sampling, config.sft.train
    need_cpu = s.num_replicas * s.cpus_per_replica + t.num_workers * t.cpus_per_worker
    free = ray.available_resources()
    if free.get("GPU", 0) > 0 or t.use_gpu:
        need_gpu = s.num_replicas * s.tensor_parallel_size + (t.num_workers if t.use_gpu else 0)
        return free.get("GPU", 0) >= need_gpu and free.get("CPU", 0) >= need_cpu
    return free.get("CPU", 0) >= need_cpu


def this_node(_actor: object = None) -> dict[str, str]:
    """The node this process runs on: {"node_id", "ip"}."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def actor_nodes(actors: dict[str, object]) -> dict[str, dict[str, str]]:
    """The node each actor (by name) runs on: {"node_id", "ip"}, asked of the actor itself
    (Ray's built-in `__ray_call__`, so any actor class answers), after whatever it was already
    asked to do (a sampler: building its engine). An actor that died is left out."""
    import ray

    refs = {name: actor.__ray_call__.remote(this_node) for name, actor in actors.items()}  # type: ignore[attr-defined]
    out = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref)
        except ray.exceptions.RayActorError:
            continue
    return out


def role_actors(pools: dict[str, SamplerPool], rewards: object | None) -> dict[str, object]:
    """The run's long-lived actors by name: `sampler-<tag><i>` per replica, `reward<i>` per reward
    model worker (a rule reward has none: its tasks come and go)."""
    actors: dict[str, object] = {}
    for pool in pools.values():
        actors.update({f"sampler-{pool.tag}{i}": r for i, r in enumerate(pool.replicas)})
    actors.update({f"reward{i}": w for i, w in enumerate(getattr(rewards, "workers", None) or [])})
    return actors
