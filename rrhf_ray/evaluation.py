"""Evaluation of one round's policy on held-out queries (never trained on).

- reward of greedy replies (mean / std), the paper's protocol; on small models greedy decoding
  saturates early (docs/algorithm.md), so the reward of sampled replies is reported beside it;
- perplexity of the policy on the data set's reference responses, where the data set has them;
- win rate against round 0: per query, greedy reward above round 0's (ties count one half).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from rrhf_ray.actors.sampler import SamplerPool, get_samples
from rrhf_ray.actors.scorer import RewardPool
from rrhf_ray.config import EvalConfig, SamplingConfig
from rrhf_ray.types import Candidate, CandidateGroup


@dataclass
class EvalResult:
    """Rewards per held-out query (greedy: one each; sampled: `num_samples` each) and perplexity."""

    greedy: list[float]
    sampled: list[list[float]]
    greedy_replies: list[str]
    perplexity: float | None

    def metrics(self, round0_greedy: Sequence[float] | None) -> dict[str, float | None]:
        flat = [r for rs in self.sampled for r in rs]
        return {
            "eval_reward_mean": _mean(self.greedy),
            "eval_reward_std": _std(self.greedy),
            "sampled_reward_mean": _mean(flat),
            "sampled_reward_std": _std(flat),
            "perplexity": self.perplexity,
            "win_rate_vs_round0": win_rate(self.greedy, round0_greedy) if round0_greedy else 0.5,
        }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if not xs:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def win_rate(rewards: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of queries where `rewards` beats `baseline`; a tie counts one half."""
    if len(rewards) != len(baseline):
        raise ValueError(f"{len(rewards)} rewards against {len(baseline)} baseline rewards")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline))
    return wins / len(rewards)


@ray.remote(num_cpus=1)
def perplexity_task(model_path: str, pairs: list[tuple[str, str]], max_length: int) -> float:
    """exp(mean NLL per response token) of the model at `model_path` on (query, response) pairs."""
    from rrhf_ray.train.sft import heldout_nll

    return math.exp(heldout_nll(model_path, pairs, max_length))


def evaluate(
    sampler: SamplerPool,
    rewards: RewardPool,
    queries: list[str],
    references: list[tuple[str, str]],
    model_path: str,
    sampling: SamplingConfig,
    cfg: EvalConfig,
    max_length: int,
) -> EvalResult:
    """Greedy and sampled replies of the sampler's current policy, scored; perplexity in parallel."""
    # On a GPU cluster the policy's forward goes to a GPU (free while no trainer runs), not the head.
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ppl_ref = (perplexity_task.options(num_gpus=gpus).remote(model_path, references, max_length)
               if references else None)
    greedy_cfg = sampling.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                             "max_new_tokens": cfg.max_new_tokens})
    sampled_cfg = sampling.model_copy(update={"n": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens,
                                              "seed": sampling.seed + 10_000})
    greedy = get_samples(sampler, queries, greedy_cfg, progress=False)
    sampled = get_samples(sampler, queries, sampled_cfg, progress=False)
    scored = ray.get(rewards.score(
        [_group(q, c) for q, c in zip(queries, greedy)] + [_group(q, c) for q, c in zip(queries, sampled)],
        progress=False,
    ))
    n = len(queries)
    return EvalResult(
        greedy=[g.scores[0] for g in scored[:n]],
        sampled=[list(g.scores) for g in scored[n:]],
        greedy_replies=[c[0].text for c in greedy],
        perplexity=ray.get(ppl_ref) if ppl_ref is not None else None,
    )


def _group(query: str, candidates: Sequence[Candidate]) -> CandidateGroup:
    # No duplicate merging here: every sample counts in the mean, as drawn.
    return CandidateGroup(query, tuple(candidates))
