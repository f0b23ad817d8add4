"""Sampler replicas: N vLLM engines as Ray actors that draw k candidates per query.

The pool is a thin actor group: it owns the actors and slices the work; the caller decides when
to wait. Its naming rule: a method whose name ends in `_refs` returns Ray ObjectRefs (one per
replica, or one for the whole call) and does not wait; every other method blocks and returns
values (`busy_seconds`, `downloads`, `shutdown`, the `engine_seconds` context manager, and the
module functions `get_samples` / `get_samples_many`). Work is cut into chunks of queries before
anything is shipped; one coordinator task (0 CPUs) hands chunks to whichever replica is free,
retries a chunk whose replica died on another replica, reports progress, and returns candidates
in query order.

Determinism across replica counts: query i is seeded with `query_seed(seed, i)` from its *global*
index, and vLLM seeds each request on its own, so 2 replicas return exactly the candidates 1
replica returns. The driver passes a different `seed` per training round (`round_seed`) and one
fixed seed for evaluation (`rrhf_ray.evaluation.eval_sampling`).

Versions: version 0 is ρ (the model the pool was built from); `load_weights_refs` with version r
puts round r's checkpoint (ρ* for round r+1) on every replica, `load_state_dict_refs` the same
weights from a state dict in Ray's object store. A model path may be a URI
(output.dir on object storage): each replica then loads it from its node's cache
(`rrhf_ray.remote.fetch`), downloading it there first when no process on that node has. A sample
call refuses to run while the replicas serve different versions: mixing ρ*'s of two rounds in one
pool would silently train on the wrong policy's candidates.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rrhf_ray.actors.dispatch import count_tokens, dispatch_chunks, on_callers_node
from rrhf_ray.actors.engine import VLLMEngine
from rrhf_ray.config import SamplingConfig
from rrhf_ray.logs import redirect_process_output
from rrhf_ray.types import Candidate

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore
    from rrhf_ray.waits import Wait

logger = logging.getLogger(__name__)


class MixedVersionsError(RuntimeError):
    """The replicas of one pool serve different policy versions."""


class EngineSeconds:
    """What `SamplerPool.engine_seconds` measured: `seconds`, the engine seconds of the busiest
    replica spent inside the block, readable once the block has ended."""

    def __init__(self) -> None:
        self._seconds: float | None = None

    def stop(self, seconds: float) -> None:
        self._seconds = seconds

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            raise RuntimeError("engine seconds are known only after the `with pool.engine_seconds()` block")
        return self._seconds


def query_seed(base_seed: int, index: int) -> int:
    """The seed of the query with global index `index`: a hash, so neighbouring queries'
    seeds (vLLM gives candidate j the seed + j) never overlap in practice."""
    digest = hashlib.blake2b(f"{base_seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x3FFFFFFF


def round_seed(base_seed: int, round_index: int) -> int:
    """The base seed of training round `round_index`'s sampling: `sampling.seed` mixed with the
    round, so each round draws a new pool (query i of round r is seeded with
    `query_seed(round_seed(seed, r), i)`: still per query, so replica counts do not matter).
    Evaluation does not use it: it samples with one fixed seed in every round (paired rounds)."""
    digest = hashlib.blake2b(f"{base_seed}:round:{round_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x3FFFFFFF


class Sampler:
    """One vLLM replica; runs as a Ray actor (`SamplerPool` starts it).

    `replica` is its index in the pool. It keeps the seeds of the last `SERVED_LOG` chunks it
    generated (`served_chunks`): since query i's seed is `query_seed(seed, i)`, they say which
    queries this replica answered, e.g. that a chunk was re-run here after another replica died.
    """

    SERVED_LOG = 4096

    def __init__(self, model_path: str, config: SamplingConfig, tag: str = "policy",
                 tokenizer: str | None = None, trust_remote_code: bool = False,
                 version: int = 0, replica: int = 0, log_dir: str | None = None) -> None:
        redirect_process_output(log_dir, f"sampler-{tag}{replica}")  # vLLM's output: logs/, not the console
        self._download: dict[str, float] | None = None
        from rrhf_ray.remote import materialize

        self.engine = VLLMEngine(self._local(model_path), config, tokenizer=materialize(tokenizer) if tokenizer else None,
                                 trust_remote_code=trust_remote_code)
        self.tag = tag
        self.version = version
        self.replica = replica
        self._served: deque[tuple[int, ...]] = deque(maxlen=self.SERVED_LOG)
        self._busy = 0.0

    def _local(self, path_or_uri: str) -> str:
        """The weights at `path_or_uri` on this node: a URI (output.dir on object storage) is
        downloaded into the node's cache unless another process there has it already
        (`rrhf_ray.remote.fetch`); what moved is kept for `last_download`."""
        from rrhf_ray.remote import fetch, is_remote

        local, moved = fetch(path_or_uri)
        self._download = ({"bytes": moved.bytes, "seconds": moved.seconds, "files": moved.files}
                          if is_remote(path_or_uri) else None)
        return local

    def last_download(self) -> dict[str, float] | None:
        """What the last weights this replica loaded took to download: {"bytes", "seconds",
        "files"} (zeros when the node's cache had them; files 0 for a state dict fetched from the
        object store), None when they were a local path."""
        return self._download

    def served_version(self) -> int:
        return self.version

    def redirect_logs(self, log_dir: str | None) -> None:
        """Write this replica's output to `log_dir` from now on (a kept engine serving another run)."""
        redirect_process_output(log_dir, f"sampler-{self.tag}{self.replica}")

    def busy_seconds(self) -> float:
        """Seconds this replica spent in its engine (generation, probes, weight loads) since it
        started: the compute a stage's `seconds_overhead` subtracts."""
        return self._busy

    def served_chunks(self) -> list[tuple[int, ...]]:
        """The seeds of each chunk this replica generated, oldest first (the last SERVED_LOG;
        a restarted replica starts a new log)."""
        return list(self._served)

    def load_weights(self, checkpoint_dir: str, version: int) -> int:
        """Reload weights in place from an HF checkpoint directory or its URI (downloaded first,
        outside the busy seconds: a transfer, not compute); returns the new version."""
        local = self._local(checkpoint_dir)
        start = time.perf_counter()
        self.engine.reload_weights(local)
        self._busy += time.perf_counter() - start
        self.version = version
        return version

    def load_state_dict(self, state: list[ray.ObjectRef], version: int) -> int:
        """Reload weights in place from a packed state dict in the object store
        (`rrhf_ray.actors.weights`; `state`: [its ref], wrapped so that the fetch is timed here,
        outside the busy seconds like a download); what moved is kept for `last_download`.
        Returns the new version."""
        from rrhf_ray.actors.weights import packed_bytes, unpack_state_dict

        start = time.perf_counter()
        packed = ray.get(state[0])
        fetched = time.perf_counter()
        self.engine.load_state_dict(unpack_state_dict(packed))
        self._busy += time.perf_counter() - fetched
        self._download = {"bytes": packed_bytes(packed), "seconds": fetched - start, "files": 0}
        self.version = version
        return version

    def reply_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """The log-prob of each reply token of each (prompt ids, reply ids) under the served weights."""
        start = time.perf_counter()
        try:
            return self.engine.reply_logprobs(sequences)
        finally:
            self._busy += time.perf_counter() - start

    def generate(self, prompts: list[str], seeds: list[int], expected_version: int | None,
                 config: SamplingConfig | None = None,
                 configs: list[SamplingConfig] | None = None) -> list[list[Candidate]]:
        """`config` for every prompt, or `configs` one per prompt (one engine pass, no beams)."""
        if expected_version is not None and self.version != expected_version:
            raise MixedVersionsError(
                f"a {self.tag} replica serves policy version {self.version} but the pool expects "
                f"{expected_version}; call SamplerPool.load_weights_refs(...) so all replicas serve one version"
            )
        config = config or self.engine.config
        kind = f"{self.tag}-beam" if configs is None and config.use_beam_search else self.tag
        source = f"{kind}@{self.version}"
        start = time.perf_counter()
        generated = self.engine.generate(prompts, seeds, config, configs)
        self._busy += time.perf_counter() - start
        groups = [
            [Candidate(**vars(c), source=source, version=self.version, tokenizer=self.engine.fingerprint)
             for c in group]
            for group in generated
        ]
        if seeds:
            self._served.append(tuple(seeds))
        return groups


@ray.remote(num_cpus=0, max_retries=0)
def _sample_task(replicas: list[Any], prompts: list[str], seeds: list[int], expected_version: int,
                 config: SamplingConfig | None, chunk: int, desc: str | None,
                 configs: list[SamplingConfig] | None = None) -> list[list[Candidate]]:
    versions = {}
    for i, r in enumerate(replicas):
        try:
            versions[i] = ray.get(r.served_version.remote())
        except ray.exceptions.RayActorError:
            continue
    if len(set(versions.values())) > 1 or (versions and expected_version not in versions.values()):
        raise MixedVersionsError(
            f"refusing to sample: replicas serve policy versions {versions} (replica: version), "
            f"the pool expects {expected_version}; call SamplerPool.load_weights_refs(...) again"
        )
    live = [replicas[i] for i in versions]
    starts = range(0, len(prompts), chunk)
    chunks = [(prompts[s:s + chunk], seeds[s:s + chunk], expected_version, config,
               configs[s:s + chunk] if configs is not None else None) for s in starts]
    limit = (config or (configs[0] if configs else None))
    out = dispatch_chunks(len(live), lambda w, c: live[w].generate.remote(*c), chunks,
                          [len(c[0]) for c in chunks], desc, count_tokens,
                          timeout=limit.chunk_timeout_s if limit is not None else None,
                          kill=lambda w: ray.kill(live[w], no_restart=False), what="sampler replica")
    return [group for part in out for group in part]


class SamplerPool:
    """N `Sampler` replicas, each in its own placement group (GPU: tp GPUs; CPU: cpus_per_replica)."""

    def __init__(self, model_path: str, config: SamplingConfig, *, tag: str = "policy",
                 tokenizer: str | None = None, trust_remote_code: bool = False,
                 version: int = 0, store: RunStore | None = None, log_dir: str | None = None) -> None:
        """`version` labels the weights at `model_path` (0 = ρ; r = round r's checkpoint); `store`:
        the run's bucket mirror (its credentials go to the replicas), None for a local run;
        `log_dir`: where the replicas write their output (the run's logs/; None: Ray's logs)."""
        self.config = config
        self.tag = tag
        self.version = version
        self.weights = str(model_path)  # what every replica should serve: reloaded by `get_samples`
        use_gpu = config.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        # The role's custom resources (sampling.resources) are in the bundle too, so the group is
        # placed only on a node that declares them.
        bundle = {"CPU": config.cpus_per_replica, **config.resources}
        if use_gpu:
            bundle["GPU"] = config.tensor_parallel_size
        self._groups = [placement_group([bundle]) for _ in range(config.num_replicas)]
        actor_cls = ray.remote(Sampler)
        from rrhf_ray.mirror import actor_options

        self.replicas = [
            actor_cls.options(
                **actor_options(store),  # the bucket's credentials when model_path is a URI
                num_cpus=config.cpus_per_replica,
                num_gpus=config.tensor_parallel_size if use_gpu else 0,
                resources=dict(config.resources),
                max_restarts=config.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
            ).remote(str(model_path), config, tag, tokenizer, trust_remote_code, version, i, log_dir)
            for i, pg in enumerate(self._groups)
        ]

    def redirect_logs_refs(self, log_dir: str | None) -> list[ray.ObjectRef]:
        """Every replica's output to `log_dir` from now on (`Sampler.redirect_logs`)."""
        return [r.redirect_logs.remote(log_dir) for r in self.replicas]

    def version_refs(self) -> list[ray.ObjectRef]:
        """The version each replica serves (refs; also a readiness barrier: engines built)."""
        return [r.served_version.remote() for r in self.replicas]

    def served_chunks_refs(self) -> list[ray.ObjectRef]:
        """Per replica, a ref to the seeds of each chunk it generated (`Sampler.served_chunks`)."""
        return [r.served_chunks.remote() for r in self.replicas]

    def _ask_live(self, method: str) -> list[Any]:
        """`method()` of every replica, dead replicas left out."""
        out = []
        for r in self.replicas:
            try:
                out.append(ray.get(getattr(r, method).remote()))
            except ray.exceptions.RayActorError:
                continue
        return out

    def busy_seconds(self) -> float:
        """The most engine seconds any replica has spent so far (replicas work in parallel: the
        busiest one bounds a stage's compute); dead replicas are left out."""
        return max(self._ask_live("busy_seconds"), default=0.0)

    @contextmanager
    def engine_seconds(self) -> Iterator[EngineSeconds]:
        """Measure the engine seconds of the calls made inside the block:

            with pool.engine_seconds() as busy:
                get_samples(pool, queries, config)
            busy.seconds

        `busy.seconds` is `busy_seconds()` after the block minus `busy_seconds()` before it.
        When the block raises, nothing is measured and the error goes on unchanged."""
        busy = EngineSeconds()
        before = self.busy_seconds()
        yield busy
        busy.stop(self.busy_seconds() - before)

    def load_weights_refs(self, checkpoint_dir: str, version: int) -> list[ray.ObjectRef]:
        """Refresh every replica in place to the checkpoint of round `version`."""
        self.version = version
        self.weights = str(checkpoint_dir)
        return [r.load_weights.remote(str(checkpoint_dir), version) for r in self.replicas]

    def load_state_dict_refs(self, state: Mapping[str, Any], checkpoint_dir: str, version: int) -> list[ray.ObjectRef]:
        """Refresh every replica in place to round `version`'s weights `state` ({checkpoint name:
        tensor}, in the served dtype), put in the object store once, here (packed:
        `rrhf_ray.actors.weights`); each replica's node fetches it from there. `checkpoint_dir`
        is the same weights on disk: what a replica Ray restarts reloads (`get_samples`)."""
        from rrhf_ray.actors.weights import pack_state_dict

        self.version = version
        self.weights = str(checkpoint_dir)
        ref = ray.put(pack_state_dict(state))
        return [r.load_state_dict.remote([ref], version) for r in self.replicas]

    def downloads(self) -> list[dict[str, float] | None]:
        """Per live replica, what its last weights load downloaded (`Sampler.last_download`)."""
        return self._ask_live("last_download")

    def reply_logprobs_refs(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ray.ObjectRef]:
        """Per replica, a ref to the log-prob of each reply token of each (prompt ids, reply ids)
        under its weights (`Sampler.reply_logprobs`)."""
        seqs = [(list(p), list(r)) for p, r in sequences]
        return [r.reply_logprobs.remote(seqs) for r in self.replicas]

    def sample_refs(self, prompts: Sequence[str], config: SamplingConfig | None = None, *,
               start_index: int = 0, progress: bool = True) -> ray.ObjectRef:
        """A ref to k candidates per prompt, in prompt order.

        `config` overrides the generation settings for this call only (e.g. greedy evaluation);
        engine settings in it are ignored. `start_index` is the global index of prompts[0], so
        a caller that feeds the data set in slices still gets the seeds of the whole-set call.
        """
        cfg = config or self.config  # always sent: a kept engine's own default is an earlier run's
        seeds = [query_seed(cfg.seed, start_index + i) for i in range(len(prompts))]
        return self._dispatch(list(prompts), seeds, cfg.chunk_prompts, progress, config=cfg)

    def sample_many_refs(self, parts: Sequence[tuple[Sequence[str], SamplingConfig]], *,
                    progress: bool = True) -> ray.ObjectRef:
        """A ref to the candidates of several requests at once, as one flat list in part order:
        each part is (prompts, settings), seeded as `sample_refs(prompts, settings)` alone would seed
        it (query i of a part: `query_seed(settings.seed, i)`), so the results are those of
        separate calls. The parts share chunks, hence engine passes: round r's evaluation and
        round r+1's sampling, which use the same weights, run as one batched pass."""
        prompts: list[str] = []
        seeds: list[int] = []
        configs: list[SamplingConfig] = []
        for texts, cfg in parts:
            if cfg.use_beam_search:
                raise ValueError("beam search cannot share an engine pass with other requests")
            prompts += list(texts)
            seeds += [query_seed(cfg.seed, i) for i in range(len(texts))]
            configs += [cfg] * len(texts)
        return self._dispatch(prompts, seeds, self.config.chunk_prompts, progress, configs=configs)

    def _dispatch(self, prompts: list[str], seeds: list[int], chunk_prompts: int, progress: bool, *,
                  config: SamplingConfig | None = None,
                  configs: list[SamplingConfig] | None = None) -> ray.ObjectRef:
        """The coordinator task over the replicas: chunks of at most `chunk_prompts` queries,
        no more than an equal share per replica."""
        chunk = max(1, min(chunk_prompts, -(-len(prompts) // len(self.replicas)) or 1))
        desc = f"sampling ({self.tag}@{self.version})" if progress else None
        return _sample_task.options(**on_callers_node()).remote(self.replicas, prompts, seeds, self.version, config,
                                                                chunk, desc, configs)

    def shutdown(self) -> None:
        for r in self.replicas:
            ray.kill(r)
        for pg in self._groups:
            remove_placement_group(pg)


def get_samples(pool: SamplerPool, prompts: Sequence[str], config: SamplingConfig | None = None, *,
                wait: Wait | None = None, **kwargs: Any) -> list[list[Candidate]]:
    """`ray.get(pool.sample_refs(...))` for the driver. A replica that Ray restarted after a crash comes
    back serving the weights it was built with, and the pool refuses to sample with mixed
    versions; here every replica reloads the pool's current weights once and the call is retried.
    `wait` (`rrhf_ray.waits.Wait`): where the driver records that it waits on the replicas."""
    try:
        ref = pool.sample_refs(prompts, config, **kwargs)
        return wait.get([ref], [wait.what])[0] if wait is not None else ray.get(ref)
    except MixedVersionsError as err:
        logger.warning("%s; reloading %s on every replica and retrying", err, pool.weights)
        ray.get(pool.load_weights_refs(pool.weights, pool.version))
        return ray.get(pool.sample_refs(prompts, config, **kwargs))


def get_samples_many(pool: SamplerPool, parts: Sequence[tuple[Sequence[str], SamplingConfig]],
                     **kwargs: Any) -> list[list[list[Candidate]]]:
    """`pool.sample_many_refs(parts)` for the driver, split back into one list per part (and retried
    once after reloading the pool's weights, as `get_samples`)."""
    try:
        flat = ray.get(pool.sample_many_refs(parts, **kwargs))
    except MixedVersionsError as err:
        logger.warning("%s; reloading %s on every replica and retrying", err, pool.weights)
        ray.get(pool.load_weights_refs(pool.weights, pool.version))
        flat = ray.get(pool.sample_many_refs(parts, **kwargs))
    out, start = [], 0
    for texts, _ in parts:
        out.append(flat[start:start + len(texts)])
        start += len(texts)
    return out
