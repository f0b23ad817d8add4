"""The refresh check: do the samplers serve the weights the trainer just saved?

After each round's in-place weight load, every sampler replica computes the log-probabilities
of a few probe replies (vLLM prompt log-probs, in the sampler's own token ids) and the driver
compares them with what the trainer computed under the weights it saved. A replica that serves
old or half-loaded weights differs by far more than the gap between a bf16 engine and an fp32
trainer; over `sampling.refresh_tolerance` (nats per token) the round fails naming the replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rrhf_ray.actors.sampler import SamplerPool

PROBE_QUERIES = 4  # query groups in the probe


class StaleWeightsError(RuntimeError):
    """A sampler replica does not serve the weights the trainer just saved."""


def probe_sequences(pool: Path, tokenizer: Any, n: int = PROBE_QUERIES) -> list[tuple[list[int], list[int]]]:
    """The probe of a round: the best reply of the first `n` query groups of its pool, as
    (prompt ids, reply ids): the sampler's own ids when the pool kept them, else tokenized."""
    from rrhf_ray.types import read_groups

    probe = []
    for g in read_groups(pool)[:n]:
        best = max(range(len(g.responses)), key=lambda i: g.scores[i])
        prompt = list(g.prompt_ids) if g.prompt_ids else tokenizer(g.query)["input_ids"]
        reply = (list(g.token_ids[best]) if g.token_ids and g.token_ids[best]
                 else tokenizer(g.responses[best], add_special_tokens=False)["input_ids"])
        if reply:
            probe.append((prompt, reply))
    return probe


def verify_refresh(pool: SamplerPool, probe: list, expected: list[float], tolerance: float, r: int) -> float:
    """Compare every replica's log-probabilities of the probe with the trainer's (`expected`):
    the largest gap in mean log-prob per token over probes and replicas (NaN for an empty probe).
    Over `tolerance` the round fails naming the replica: it serves old or half-loaded weights."""
    import ray

    if not probe:
        return float("nan")
    worst = 0.0
    for i, ref in enumerate(pool.reply_logprobs_refs(probe)):
        got = ray.get(ref)
        gap = max(abs(a - b) / len(reply) for a, b, (_, reply) in zip(got, expected, probe))
        if gap > tolerance:
            raise StaleWeightsError(
                f"sampler replica {i} does not serve round {r}'s weights: its log-probs of the "
                f"refresh probe differ from the trainer's by {gap:.3f} nats/token "
                f"(sampling.refresh_tolerance {tolerance})")
        worst = max(worst, gap)
    return worst
