"""The refresh check: do the samplers serve the weights the trainer just saved?

After each round's in-place weight load, every sampler replica computes the log-probability of
each token of a few probe replies (vLLM prompt log-probs, in the sampler's own token ids), and
the driver compares them with what the trainer computed for the same tokens, twice: under the
weights it just saved (new) and under the weights the round started from (old).

- The probe holds the best *and* the worst reply of the first `PROBE_QUERIES` groups of the
  round's pool. The best replies alone were sampled by the old policy and already fit it: the
  round moves them little, so stale weights would look fresh. The worst replies are what the
  ranking loss pushes down.
- The statistic is the mean absolute difference of per-token log-probabilities over the whole
  probe (nats per token). Differences of opposite sign do not cancel, as they would in a
  difference of summed log-probs.
- A replica passes when its gap to the new weights is within the tolerance (by default set
  from the served dtype: `DTYPE_TOLERANCE`) and it is not clearly nearer the old weights than
  the new (its gap to the old weights below half its gap to the new). The second rule needs no
  threshold of its own: a replica on the new weights is about the round's change away from the
  old ones, one on the old weights about that far from the new; a tolerance set too loose to
  catch stale weights by itself still does not let them pass.
- When the probe barely separates old from new (a round that moved the policy by less than
  twice the tolerance on the probe), the check cannot tell them apart; it says so in a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rrhf_ray.actors.sampler import SamplerPool
    from rrhf_ray.waits import Wait

logger = logging.getLogger(__name__)

PROBE_QUERIES = 4  # query groups in the probe: their best and worst reply each
# The noise of serving fp32-trained weights in each dtype, mean |Δ log p| per token, with room:
# a bf16 engine rounds every weight to 8 bits of mantissa.
DTYPE_TOLERANCE = {"float32": 0.002, "bfloat16": 0.01, "float16": 0.005}

Probe = list[tuple[list[int], list[int]]]


class StaleWeightsError(RuntimeError):
    """A sampler replica does not serve the weights the trainer just saved."""


def probe_sequences(pool: Path, tokenizer: Any, n: int = PROBE_QUERIES) -> Probe:
    """The probe of a round: the best and the worst reply (by reward) of the first `n` query
    groups of its pool, as (prompt ids, reply ids): the sampler's own ids when the pool kept
    them, else tokenized. A group whose replies all score the same gives its first reply once."""
    from rrhf_ray.train.tokens import prompt_ids
    from rrhf_ray.types import read_groups

    probe = []
    for g in read_groups(pool)[:n]:
        best = max(range(len(g.responses)), key=lambda i: g.scores[i])
        worst = min(range(len(g.responses)), key=lambda i: g.scores[i])
        prompt = list(g.prompt_ids) if g.prompt_ids else prompt_ids(tokenizer, g.query)  # a conversation: its template
        for i in dict.fromkeys((best, worst)):
            reply = (list(g.token_ids[i]) if g.token_ids and g.token_ids[i]
                     else tokenizer(g.responses[i], add_special_tokens=False)["input_ids"])
            if reply:
                probe.append((prompt, reply))
    return probe


def mean_abs_gap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Mean |a − b| over every token of every probe reply (per-token log-probs), NaN for none."""
    diffs = [abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return sum(diffs) / len(diffs) if diffs else float("nan")


def tolerance_for(dtype: str, configured: float | None) -> float:
    """`sampling.refresh_tolerance` when set, else the served dtype's (`DTYPE_TOLERANCE`)."""
    return configured if configured is not None else DTYPE_TOLERANCE.get(dtype, DTYPE_TOLERANCE["bfloat16"])


def recorded_probe(trained: dict[str, Any], probe: Probe) -> tuple[list, list | None] | None:
    """The trainer's per-token log-probs of `probe` that a round's train stage recorded: (under
    the new weights, under the starting ones or None). None when the stage recorded another
    probe: a round trained by a run started before the per-token check kept one sum per best
    reply, which this check cannot compare."""
    new, old = trained.get("probe_logprobs", []), trained.get("probe_start_logprobs")
    matches = len(new) == len(probe) and all(
        isinstance(t, list) and len(t) == len(reply) for t, (_, reply) in zip(new, probe))
    return (new, old) if matches else None


def verify_refresh(pool: SamplerPool, probe: Probe, new: Sequence[Sequence[float]],
                   old: Sequence[Sequence[float]] | None, tolerance: float, r: int,
                   wait: Wait | None = None) -> dict[str, float]:
    """Check that every replica serves round r's weights: its per-token log-probs of `probe`
    against the trainer's under the new weights (`new`) and, when given, the old ones (`old`);
    see the module docstring for the rule. Returns {"logprob_gap": the largest gap of a replica
    to the new weights, "logprob_separation": the gap between old and new weights (NaN when not
    known)}; raises `StaleWeightsError` naming the first replica that fails. `wait`
    (`rrhf_ray.waits.Wait`): the refresh's time limit for the replicas' answers."""
    import ray

    if not probe:
        return {"logprob_gap": float("nan"), "logprob_separation": float("nan")}
    separation = mean_abs_gap(old, new) if old else float("nan")
    if math.isfinite(separation) and separation <= 2 * tolerance:
        logger.warning("round %d: the refresh probe barely separates the round's weights from the "
                       "previous round's (%.4f nats/token, tolerance %.4f): a replica serving stale "
                       "weights could pass", r, separation, tolerance)
    worst = 0.0
    refs = pool.reply_logprobs_refs(probe)
    names = [f"sampler replica {i} (the refresh probe)" for i in range(len(refs))]
    answers = wait.get(refs, names) if wait is not None else ray.get(refs)
    for i, served in enumerate(answers):
        gap = mean_abs_gap(served, new)
        nearer_old = bool(old) and mean_abs_gap(served, old) < gap / 2
        if gap > tolerance or nearer_old:
            raise StaleWeightsError(
                f"sampler replica {i} does not serve round {r}'s weights: its log-probs of the "
                f"refresh probe differ from the trainer's by {gap:.4f} nats/token (tolerance "
                f"{tolerance}; the round's own change on the probe: {separation:.4f})")
        worst = max(worst, gap)
    return {"logprob_gap": worst, "logprob_separation": separation}
