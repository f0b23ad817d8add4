"""Evaluation of one round's policy on held-out queries (never trained on); docs/metrics.md
says what each number is, how it is computed and what it cannot tell.

- reward of greedy replies (mean / std), the paper's protocol; on small models greedy decoding
  saturates early (docs/algorithm.md), so the reward of sampled replies is reported beside it;
- win rates and the sampled reward's change against round 0, per query (paired);
- 95 % intervals from a seeded bootstrap over the held-out queries (`bootstrap_ci`,
  `paired_bootstrap_ci`): the queries are the sample, the k replies of a query stay together;
- `reference_perplexity`: the policy's perplexity of the data set's reference responses;
- `judge_perplexity`: a fixed judge model's perplexity of the policy's greedy replies (the
  paper's perplexity, with gpt2-medium as its judge; here `eval.judge_model`, default ρ);
- `heldout_rank_accuracy`: how often the policy's length-normalised log-probabilities order two
  of its own sampled replies to a held-out query as their rewards do.

Seeds: the sampled replies use one fixed seed in every round (`eval_sampling`), unlike training
(`rrhf_ray.workflow.round_sampling`), so rounds are compared on the same draws, query by query.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import ray

from rrhf_ray.actors.sampler import SamplerPool, get_samples, get_samples_many
from rrhf_ray.actors.scorer import RewardPool
from rrhf_ray.config import EvalConfig, SamplingConfig
from rrhf_ray.types import Candidate, CandidateGroup, QueryGroup

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore
    from rrhf_ray.waits import Wait

EVAL_SEED_OFFSET = 10_000  # evaluation samples with sampling.seed + this, in every round


@dataclass
class EvalResult:
    """Rewards per held-out query (greedy: one each; sampled: `num_samples` each), the replies,
    and the model-based numbers (None where not computed)."""

    greedy: list[float]
    sampled: list[list[float]]
    greedy_replies: list[str]
    reference_perplexity: float | None
    sampled_replies: list[list[str]] = field(default_factory=list)
    judge_perplexity: float | None = None
    heldout_rank_accuracy: float | None = None
    greedy_lengths: list[int] = field(default_factory=list)  # response tokens of each greedy reply
    sampled_lengths: list[list[int]] = field(default_factory=list)  # … of each sampled reply
    seconds_perplexity: float = 0.0  # the longest perplexity task (they run beside the sampling)
    seconds_ranking: float = 0.0  # the ranking task (after the scoring)
    also: list[list[list[Candidate]]] = field(default_factory=list)  # `evaluate(also=…)`'s candidates

    def metrics(self, round0_greedy: Sequence[float] | None,
                round0_sampled: Sequence[Sequence[float]] | None = None, *,
                resamples: int = 1000, seed: int = 0) -> dict[str, object]:
        """The round's evaluation metrics (keys: docs/metrics.md). Comparisons with round 0 are
        per query and need round 0's rewards of the same queries; without them (round 0 itself)
        the win rates are 0.5 and the change 0, without intervals. Intervals: 95 %, a bootstrap
        over the queries with `resamples` resamples seeded with `seed`."""
        flat = [r for rs in self.sampled for r in rs]
        ci = {"resamples": resamples, "seed": seed}
        sums = [[sum(rs), len(rs)] for rs in self.sampled]
        out: dict[str, object] = {
            "eval_reward_mean": _mean(self.greedy),
            "eval_reward_std": _std(self.greedy),
            "eval_reward_mean_ci95": bootstrap_ci(self.greedy, **ci),
            "sampled_reward_mean": _mean(flat),
            "sampled_reward_std": _std(flat),
            "sampled_reward_mean_ci95": bootstrap_ci(sums, _ratio_of_sums, **ci),
            "win_rate_vs_round0": 0.5,
            "win_rate_vs_round0_ci95": None,
            "sampled_win_rate_vs_round0": 0.5,
            "sampled_win_rate_vs_round0_ci95": None,
            "sampled_reward_delta_vs_round0": 0.0,
            "sampled_reward_delta_vs_round0_ci95": None,
            "reference_perplexity": self.reference_perplexity,
            "judge_perplexity": self.judge_perplexity,
            "heldout_rank_accuracy": self.heldout_rank_accuracy,
            # Mean response tokens of the replies (None where not known): a loss that favours
            # short replies (length normalisation, a shuffled reward) shows here first.
            "eval_reply_length_mean": _mean(self.greedy_lengths) if self.greedy_lengths else None,
            "sampled_reply_length_mean": _mean(lengths) if (lengths := [n for ns in self.sampled_lengths
                                                                         for n in ns]) else None,
        }
        if round0_greedy:
            out["win_rate_vs_round0"] = win_rate(self.greedy, round0_greedy)
            out["win_rate_vs_round0_ci95"] = paired_bootstrap_ci(self.greedy, round0_greedy, win_rate, **ci)
        if round0_sampled:
            now, then = _query_means(self.sampled), _query_means(round0_sampled)
            if len(now) != len(then):
                raise ValueError(f"{len(now)} sampled rewards against {len(then)} baseline rewards")
            keep = [i for i in range(len(now)) if not (math.isnan(now[i]) or math.isnan(then[i]))]
            now, then = [now[i] for i in keep], [then[i] for i in keep]
            out["sampled_win_rate_vs_round0"] = win_rate(now, then)
            out["sampled_win_rate_vs_round0_ci95"] = paired_bootstrap_ci(now, then, win_rate, **ci)
            out["sampled_reward_delta_vs_round0"] = _mean_difference(now, then)
            out["sampled_reward_delta_vs_round0_ci95"] = paired_bootstrap_ci(now, then, _mean_difference, **ci)
        return out


def _query_means(sampled: Sequence[Sequence[float]]) -> list[float]:
    return [_mean(rs) for rs in sampled]


def _mean_difference(a: Sequence[float], b: Sequence[float]) -> float:
    return _mean([x - y for x, y in zip(a, b)])


def _ratio_of_sums(rows: np.ndarray) -> float:
    """Σ first column / Σ second column: the mean of all samples of the resampled queries."""
    n = rows[:, 1].sum()
    return float(rows[:, 0].sum() / n) if n else float("nan")


def bootstrap_ci(values: Sequence, statistic: Callable[[np.ndarray], float] | None = None, *,
                 resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> list[float] | None:
    """The percentile bootstrap interval [lo, hi] of `statistic` (default: the mean) over
    `values`, one entry per unit of resampling (a held-out query; an entry may be a row of
    numbers, e.g. the sum and count of a query's sampled rewards). `resamples` resamples of
    len(values) entries drawn with replacement by a generator seeded with `seed`, so the same
    values give the same interval. None for no values (or no finite resampled statistic)."""
    data = np.asarray(values, dtype=float)
    n = len(data)
    if n == 0:
        return None
    stat = statistic or (lambda x: float(np.mean(x)))
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = np.array([stat(data[i]) for i in idx], dtype=float)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return [float(lo), float(hi)]


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float],
                        statistic: Callable[[Sequence[float], Sequence[float]], float], *,
                        resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> list[float] | None:
    """`bootstrap_ci` of `statistic(a', b')` where a' and b' are resampled *together*: query i
    of a stays paired with query i of b (e.g. a round's rewards against round 0's on the same
    queries), so the interval reflects the per-query differences, not the spread of each side."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)} paired values")
    return bootstrap_ci(list(zip(a, b)), lambda rows: statistic(list(rows[:, 0]), list(rows[:, 1])),
                        resamples=resamples, confidence=confidence, seed=seed)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of queries where `rewards` beats `baseline`; a tie counts one half. NaN for no
    queries."""
    if len(rewards) != len(baseline):
        raise ValueError(f"{len(rewards)} rewards against {len(baseline)} baseline rewards")
    if not rewards:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline))
    return wins / len(rewards)


def eval_sampling(sampling: SamplingConfig, cfg: EvalConfig) -> tuple[SamplingConfig, SamplingConfig]:
    """(greedy, sampled) settings of the evaluation. The sampled replies use the seed
    `sampling.seed + EVAL_SEED_OFFSET` in every round (query i: `query_seed(that, i)`): the same
    draws, so two rounds' replies to a query differ only by the policy (a paired comparison).
    Training pools mix the round into their seed instead (`rrhf_ray.workflow.round_sampling`)."""
    greedy = sampling.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                         "max_new_tokens": cfg.max_new_tokens, "use_beam_search": False})
    sampled = sampling.model_copy(update={"n": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens,
                                          "seed": sampling.seed + EVAL_SEED_OFFSET,
                                          "use_beam_search": False})
    return greedy, sampled


@ray.remote(num_cpus=1)
def _warm_up_task(rule: str | None) -> None:
    import rrhf_ray.actors.sampler
    import rrhf_ray.train.rrhf
    import rrhf_ray.train.sft  # noqa: F401 - the imports are the point
    from rrhf_ray.actors.scorer import load_rule

    if rule:
        load_rule(rule)


def warm_up_workers(n: int = 4, rule: str | None = None, store: RunStore | None = None,
                    resources: dict[str, float] | None = None) -> list[ray.ObjectRef]:
    """Start `n` Ray worker processes with the imports of the evaluation's tasks (torch,
    transformers, the samplers' and scorers' dispatch, the reward rule) done, so that round 0's
    tasks do not each pay a Python start-up: Ray hands a task an idle worker process. Fire and
    forget; the driver calls it while the SFT stage runs. Ray keeps idle workers per runtime env:
    these take the evaluation tasks' options (`rrhf_ray.mirror.actor_options`, the bucket's
    credentials with output.dir on object storage), or round 0 would start new processes anyway;
    `resources` (`eval.resources`) puts them on the evaluation's nodes."""
    from rrhf_ray.mirror import actor_options

    task = _warm_up_task.options(resources=dict(resources or {}), **actor_options(store))
    return [task.remote(rule) for _ in range(n)]


@ray.remote(num_cpus=1)
def perplexity_task(model_path: str, pairs: list[tuple[str, str] | tuple[str, str, bool]], max_length: int,
                    dtype: str = "auto", tokenizer_path: str | None = None) -> tuple[float, float]:
    """(perplexity, seconds): exp(mean NLL per response token, the closing EOS included where the
    response ended: (query, response, False) is one cut off, scored without) of the model at `model_path`
    on (query, response) pairs: the policy on reference responses (`reference_perplexity`), or
    the judge on the policy's greedy replies (`judge_perplexity`). `dtype`: `model.dtype`.
    `tokenizer_path`: the policy's tokenizer when it is not the model's (`model.tokenizer`)."""
    from rrhf_ray.remote import materialize
    from rrhf_ray.train.sft import heldout_nll

    local = materialize(model_path)  # a transfer, not compute: outside the seconds
    tokenizer = materialize(tokenizer_path) if tokenizer_path else None
    start = time.perf_counter()
    return (math.exp(heldout_nll(local, pairs, max_length, dtype=dtype, tokenizer_path=tokenizer)),
            time.perf_counter() - start)


@ray.remote(num_cpus=1)
def ranking_task(model_path: str, groups: list[QueryGroup], max_length: int,
                 dtype: str = "auto", tokenizer_path: str | None = None) -> tuple[float, float]:
    """(accuracy, seconds): pairwise ranking accuracy of the model's p_i (eq. 1) against the rewards of `groups`
    (`rrhf_ray.train.ranking.ranking_metrics`); NaN when no group has a strict pair. `dtype`:
    `model.dtype`. `tokenizer_path`: the policy's tokenizer when it is not the model's."""
    from rrhf_ray.remote import materialize
    from rrhf_ray.train.ranking import ranking_metrics

    local = materialize(model_path)  # a transfer, not compute: outside the seconds
    tokenizer = materialize(tokenizer_path) if tokenizer_path else None
    start = time.perf_counter()
    return (ranking_metrics(local, groups, max_length, dtype=dtype, tokenizer_path=tokenizer)["rank_accuracy"],
            time.perf_counter() - start)


def evaluate(
    sampler: SamplerPool,
    rewards: RewardPool,
    queries: list[str],
    references: list[tuple[str, str]],
    model_path: str,
    sampling: SamplingConfig,
    cfg: EvalConfig,
    max_length: int,
    judge: str | None = None,
    also: Sequence[tuple[Sequence[str], SamplingConfig]] = (),
    store: RunStore | None = None,
    model_dtype: str = "auto",
    wait: Wait | None = None,
    tokenizer_path: str | None = None,
) -> EvalResult:
    """Greedy and sampled replies of the sampler's current policy (at `model_path`), scored; the
    perplexities (the policy on `references`, `judge` on the greedy replies) and the held-out
    ranking accuracy run as Ray tasks beside the scoring. `judge` None: no judge perplexity.

    `also`: more (prompts, settings) requests to the same policy, generated in the same engine
    pass as the sampled evaluation replies (`SamplerPool.sample_many_refs`: seeded per query, so each part
    gets what a call of its own would give) and returned unscored in `EvalResult.also`: the
    driver puts round r+1's sampling here.

    `model_path` and `judge` may be URIs (output.dir on object storage): the tasks read them from
    their node's cache (`rrhf_ray.remote.materialize`) with the driver's storage variables
    (`store`: the run's bucket mirror, None for a local run). `model_dtype` (`model.dtype`): the
    weights dtype of the perplexity and ranking tasks' models (auto: float32 on a CPU, bfloat16 on
    a GPU). `tokenizer_path`: the policy's tokenizer (`model.tokenizer`) for the reference
    perplexity and the ranking, where it is not the model's own.

    `wait` (`rrhf_ray.waits.Wait`): the time limit of the tasks (counted once the replies are
    scored: what is left to wait for), and
    where the driver records that it waits on them; past it they are cancelled and
    `StageTimeout` names them."""
    from rrhf_ray.mirror import actor_options

    # The same options as warm_up_workers (its processes are reused), on eval.resources' nodes.
    remote = {**actor_options(store), "resources": dict(cfg.resources)}
    # On a GPU cluster the forwards go to a free GPU; when the warm trainer and the samplers hold
    # every GPU they run on a CPU rather than wait for a GPU that no one frees during the run.
    gpus = 1 if ray.available_resources().get("GPU", 0) >= 1 else 0
    ppl_ref = (perplexity_task.options(num_gpus=gpus, **remote).remote(model_path, references, max_length,
                                                                    model_dtype, tokenizer_path)
               if references else None)
    greedy_cfg, sampled_cfg = eval_sampling(sampling, cfg)
    # The greedy replies first (a short pass), so that the judge's task reads them while the
    # engine samples the rest: the sampled replies with the `also` requests, in one pass.
    greedy = get_samples(sampler, queries, greedy_cfg, progress=False)
    judge_ref = None
    if judge is not None and queries:
        # The judge reads prompt + reply in its own tokens: the engine's context bounds both. A
        # reply cut off at max_new_tokens is scored without the EOS its policy never emitted.
        judge_ref = perplexity_task.options(num_gpus=gpus, **remote).remote(
            judge, [(q, c[0].text, not c[0].truncated) for q, c in zip(queries, greedy)],
            sampling.max_model_len, model_dtype)
    sampled, *extra = get_samples_many(sampler, [(queries, sampled_cfg), *also], progress=bool(also))
    scored = ray.get(rewards.score_refs(
        [_group(q, c) for q, c in zip(queries, greedy)] + [_group(q, c) for q, c in zip(queries, sampled)],
        progress=False,
    ))
    n = len(queries)
    # ranking_metrics loads its model on the CPU: no GPU for this task.
    rank_ref = (ranking_task.options(**remote).remote(model_path, scored[n:], sampling.max_model_len, model_dtype,
                                                       tokenizer_path)
                if queries else None)
    refs = (ppl_ref, judge_ref, rank_ref)
    live = [(name, ref) for name, ref in zip(("the reference perplexity task", "the judge perplexity task",
                                              "the held-out ranking task"), refs) if ref is not None]
    got = iter(wait.get([ref for _, ref in live], [name for name, _ in live], cancel=True) if wait is not None
               else ray.get([ref for _, ref in live]))
    none = (None, 0.0)
    ppl, judged, ranked = (next(got) if ref is not None else none for ref in refs)
    return EvalResult(
        greedy=[g.scores[0] for g in scored[:n]],
        sampled=[list(g.scores) for g in scored[n:]],
        greedy_replies=[c[0].text for c in greedy],
        sampled_replies=[[x.text for x in c] for c in sampled],
        greedy_lengths=[len(c[0].token_ids) for c in greedy],
        sampled_lengths=[[len(x.token_ids) for x in c] for c in sampled],
        reference_perplexity=ppl[0],
        judge_perplexity=judged[0],
        heldout_rank_accuracy=ranked[0],
        seconds_perplexity=max(ppl[1], judged[1]),
        seconds_ranking=ranked[1],
        also=extra,
    )


def _group(query: str, candidates: Sequence[Candidate]) -> CandidateGroup:
    # No duplicate merging here: every sample counts in the mean, as drawn.
    return CandidateGroup(query, tuple(candidates))
