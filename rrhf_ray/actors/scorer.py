"""Rewards r_i = R(x, y_i): an HF reward model in M actors, or a rule function as Ray tasks.

Reward model: `AutoModelForSequenceClassification` with one logit, in eval mode, batched.
When query + response exceed `max_length`, the query is cut from the LEFT: the response is what
is being judged, and the end of the dialogue (the turn it answers) matters more than its start.
Query and response are tokenized apart and concatenated; with byte-level BPE a split at the
response's leading space is also where the pre-tokenizer splits, so this equals tokenizing the
joint text in practice, and it lets the cut fall on the query alone.

Rule: any `package.module:function(queries, responses) -> list[float]`, importable on every node,
or a registered ``builtin:<name>`` (`rrhf_ray.registry`).

A NaN or infinite reward stops scoring with `RewardError`, which names the query and carries the
groups scored before it (`err.scored`), so nothing finished is lost. A rule that raises, returns
another number of rewards or something that is not a number stops it with a `DataError` naming
the rule, the fault and the query (`rule_scores`): refused, never dropped (docs/faults.md).

`RewardPool` follows the rule of `rrhf_ray.actors.sampler.SamplerPool`: a method whose name ends
in `_refs` returns Ray ObjectRefs and does not wait (`score_refs`); every other method blocks
(`shutdown`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from rrhf_ray import registry
from rrhf_ray.actors.dispatch import dispatch_chunks, on_callers_node
from rrhf_ray.config import RewardConfig
from rrhf_ray.logs import redirect_process_output
from rrhf_ray.train.tokens import chat_template_of, collate, encode
from rrhf_ray.types import CandidateGroup, DataError, Query, QueryGroup, query_text

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore


class RewardError(DataError):
    """A non-finite reward; `scored` holds the groups (in order) scored before the bad one."""

    def __init__(self, message: str, scored: list[QueryGroup]) -> None:
        super().__init__(message)
        self.scored = scored

    def __reduce__(self) -> tuple:  # keeps `scored` when Ray ships the error to the caller
        return (type(self), (str(self), self.scored))


@dataclass(frozen=True)
class ScoredChunk:
    """Rewards of a flat list of (query, response) pairs, and the tokens the model read."""

    scores: list[float]
    tokens: int = 0


def load_rule(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import `package.module:function` (or look up ``builtin:<name>``); the error names the part
    that is wrong."""
    if registry.is_builtin(spec):
        try:
            return registry.lookup("reward", spec)
        except registry.UnknownBuiltinError as err:
            raise DataError(f"reward.rule: {err}") from None
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"reward.rule {spec!r} is not of the form package.module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        module = _module_from_file(spec, module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise DataError(f"reward.rule {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"reward.rule {spec!r}: {module_name} has no function {attr!r}")
    return fn


def _module_from_file(spec: str, path: str) -> Any:
    """The Python file at `path` (absolute once the config is loaded: `RunConfig`'s paths) as a
    module, loaded once per process under a name of its own."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"reward.rule {spec!r}: file not found: {file}")
    name = f"rrhf_ray_rule_{file.stem}_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except BaseException:  # the preflight names what importing it raised
        del sys.modules[name]
        raise
    return module


def rule_scores(rule: Callable[[list[str], list[str]], Any], spec: str, queries: list[str],
                responses: list[str]) -> list[float]:
    """The rule's rewards of (query, response) pairs, or a `DataError` that names the fault and
    the query: the rule raised (the first pair it raises on alone is named), returned another
    number of rewards, or something that is not a number (a string, None). A NaN or infinite
    reward passes here and is refused with its query by the scoring task (`RewardError`)."""
    def _pair(i: int) -> str:
        return f"response {responses[i][:80]!r} of query {queries[i][-120:]!r}"

    try:
        raw = list(rule(queries, responses))
    except Exception as err:  # noqa: BLE001 - the user's rule: named, with the query, in one line
        for i in range(len(queries)):
            try:
                rule(queries[i:i + 1], responses[i:i + 1])
            except Exception as one:  # noqa: BLE001
                raise DataError(f"reward.rule {spec} raised {type(one).__name__}: {one} on {_pair(i)}") from None
        raise DataError(f"reward.rule {spec} raised {type(err).__name__}: {err} on a chunk of "
                        f"{len(queries)} responses (on none of them alone), the first {_pair(0)}") from None
    if len(raw) != len(responses):
        raise DataError(f"reward.rule {spec} returned {len(raw)} rewards for {len(responses)} responses "
                        f"(a chunk whose first is {_pair(0)})")
    scores = []
    for i, value in enumerate(raw):
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise DataError(f"reward.rule {spec} returned {value!r} for {_pair(i)}: not a number")
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise DataError(f"reward.rule {spec} returned {value!r} ({type(value).__name__}) for {_pair(i)}: "
                            "not a number") from None
    return scores


@ray.remote(max_retries=2)
def _rule_task(spec: str, queries: list[Query], responses: list[str]) -> ScoredChunk:
    # A rule reads text: a conversation in the paper's raw-text layout (`query_text`).
    return ScoredChunk(rule_scores(load_rule(spec), spec, [query_text(q) for q in queries], responses))


class RewardScorer:
    """An HF reward model (one logit) scoring (query, response) pairs; runs as a Ray actor."""

    def __init__(self, model_path: str, config: RewardConfig, log_dir: str | None = None,
                 chat_template: str | None = None) -> None:
        """`chat_template`: the Jinja text of `reward.chat_template_path`, read by the driver (the
        file need not exist on this node), in place of the tokenizer's own template."""
        redirect_process_output(log_dir, "scorer")  # transformers' output: logs/, not the console
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rrhf_ray.remote import materialize

        model_path = materialize(model_path)  # a URI (a trained reward model in the bucket): this node's copy
        self.config = config
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=getattr(torch, config.dtype), use_safetensors=True).to(self.device).eval()
        if config.chat_template == "on" and not chat_template_of(self.tokenizer):
            raise DataError(f"reward.chat_template is on but the reward model {model_path}'s tokenizer "
                            "has no chat_template")
        if self.model.config.num_labels != 1:
            raise DataError(f"reward model {model_path} has {self.model.config.num_labels} labels; "
                            "a reward model needs exactly one logit")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            # The model finds each row's last real token through pad_token_id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = self.model.config.pad_token_id

    def encode(self, query: Query, response: str) -> list[int]:
        """Token ids of query + response within max_length, the query cut from the left; a
        conversation with the reply as its last turn, rendered by this model's own chat template
        (`reward.chat_template`; `rrhf_ray.train.tokens.reward_ids`) and cut at a turn."""
        if self.config.chat_template == "off":
            query = query_text(query)
        return encode(self.tokenizer, query, response, self.config.max_length, policy=False)[0]

    def score(self, queries: list[Query], responses: list[str]) -> ScoredChunk:
        import torch

        ids = [self.encode(q, r) for q, r in zip(queries, responses)]
        scores: list[float] = []
        bs = self.config.batch_size
        with torch.inference_mode():
            for s in range(0, len(ids), bs):
                batch = collate(ids[s:s + bs], self.pad_id).to(self.device)
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return ScoredChunk(scores, tokens=sum(len(x) for x in ids))


@ray.remote(num_cpus=0, max_retries=0)
def _score_task(workers: list[Any] | None, rule: str | None, num_workers: int,
                groups: list[CandidateGroup], chunk: int, desc: str | None,
                resources: dict[str, float] | None = None, timeout: float | None = None) -> list[QueryGroup]:
    chunks = []
    for s in range(0, len(groups), chunk):
        part = groups[s:s + chunk]
        chunks.append(([g.query for g in part for _ in g.candidates],
                       [r for g in part for r in g.responses]))
    if workers is not None:
        def submit(w: int, c: tuple) -> ray.ObjectRef:
            return workers[w].score.remote(*c)
    else:  # M "workers" = at most M rule tasks at a time
        def submit(w: int, c: tuple) -> ray.ObjectRef:
            return _rule_task.options(resources=resources or {}).remote(rule, *c)
    sizes = [min(chunk, len(groups) - s) for s in range(0, len(groups), chunk)]
    done = dispatch_chunks(num_workers, submit, chunks, sizes, desc,
                           (lambda r: r.tokens) if workers is not None else None, timeout=timeout,
                           kill=(lambda w: ray.kill(workers[w], no_restart=False)) if workers is not None else None,
                           what="reward scorer" if workers is not None else "reward rule task")
    flat = [s for part in done for s in part.scores]
    out: list[QueryGroup] = []
    for g in groups:
        scores, flat = flat[:len(g.candidates)], flat[len(g.candidates):]
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise RewardError(
                f"reward {scores[bad[0]]} (not finite) for response {bad[0]} "
                f"({g.candidates[bad[0]].source}) of query {len(out)}: {query_text(g.query)[-200:]!r}; "
                f"the {len(out)} groups before it were scored", out)
        out.append(g.to_group(scores))
    return out


class RewardPool:
    """M reward workers: `RewardScorer` actors (kind=model) or rule tasks (kind=rule)."""

    def __init__(self, config: RewardConfig, store: RunStore | None = None, log_dir: str | None = None) -> None:
        """`store`: the run's bucket mirror (its credentials go to the workers), None for a local
        run; `log_dir`: where reward-model workers write their output (None: Ray's logs)."""
        self.config = config
        self.workers: list[Any] | None = None
        if config.kind == "rule":
            load_rule(config.rule or "")  # fail here, not in a worker, if the rule is wrong
            return
        gpus = config.gpus_per_worker
        if gpus is None:
            gpus = 0.5 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        from rrhf_ray.mirror import actor_options

        actor_cls = ray.remote(RewardScorer).options(
            num_cpus=config.cpus_per_worker, num_gpus=gpus, resources=dict(config.resources), max_restarts=1,
            **actor_options(store))
        template = Path(config.chat_template_path).read_text() if config.chat_template_path else None
        self.workers = [actor_cls.remote(config.model, config, log_dir, template) for _ in range(config.num_workers)]

    def score_refs(self, groups: Sequence[CandidateGroup], *, progress: bool = True) -> ray.ObjectRef:
        """A ref to one scored QueryGroup per input group, in order (sources kept)."""
        n = self.config.num_workers
        chunk = max(1, min(self.config.chunk_queries, -(-len(groups) // n)))
        desc = "scoring" if progress else None
        return _score_task.options(**on_callers_node()).remote(self.workers, self.config.rule, n, list(groups), chunk, desc,
                                  dict(self.config.resources), self.config.chunk_timeout_s)

    def shutdown(self) -> None:
        for w in self.workers or []:
            ray.kill(w)
