"""Query groups as token ids for the RRHF trainer (`Encoder` → `EncodedGroup`: the prompt once,
then each candidate's response), and a batch of groups as the [B, K] tensors the losses of
`rrhf_ray.loss` read (`group_tensors`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrhf_ray.train.prefix import tokens_computed
from rrhf_ray.train.tokens import (
    closing_id,
    prompt_ids,
    special_split,
    tokenizer_fingerprint,
    turn_end_id,
)
from rrhf_ray.types import QueryGroup


def fit_prompt(prompt: list[int], longest: int, max_length: int, n_prefix: int, n_suffix: int) -> list[int]:
    """The prompt one group's candidates share: at most `max(max_length − longest, max_length // 2)`
    tokens, so a long response is cut before the prompt is (`Encoder`). The cut is from the left,
    the special prefix (`n_prefix` tokens, e.g. BOS) and suffix (`n_suffix`) kept, and at least one
    token stays, to predict the first response token."""
    keep = max(max_length - longest, max_length // 2)
    if len(prompt) <= keep:
        return prompt
    end = len(prompt) - n_suffix
    head, body, tail = prompt[:n_prefix], prompt[n_prefix:end], prompt[end:]
    room = keep - len(head) - len(tail)
    body = body[len(body) - room :] if room > 0 else []
    return (head + body + tail) or prompt[-1:]


def end_token_ids(model: Any) -> frozenset[int]:
    """The ids that end a turn by the model's generation config (`eos_token_id`, an int or a
    list): vLLM stops sampling on each of them and keeps it as the reply's last token."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)


@dataclass
class EncodedGroup:
    """One query group as token ids: the prompt once, then each candidate's response (the EOS
    that closes it included when it stopped). Candidate i is `prompt + responses[i]`."""

    prompt: list[int]
    responses: list[list[int]]
    rewards: list[float]
    kept: list[int] | None = None  # the group's candidate index of each response (None: all, in order)
    refs: list[float] | None = None  # DPO: Σ log π_ref of each response (QueryGroup.ref_logprobs)

    @property
    def ids(self) -> list[list[int]]:
        """Each candidate as one row, prompt included (the padded layout)."""
        return [self.prompt + r for r in self.responses]

    @property
    def starts(self) -> list[int]:
        return [len(self.prompt)] * len(self.responses)

    def tokens(self, shared: bool) -> int:
        """Tokens one forward computes for this group (`rrhf_ray.train.prefix.tokens_computed`)."""
        return tokens_computed(len(self.prompt), [len(r) for r in self.responses], shared)


@dataclass
class Encoder:
    """Query groups → `EncodedGroup`s for one tokenizer (one per trainer).

    Token ids a sampler recorded are used as they are when the group's tokenizer fingerprint is
    this tokenizer's; other candidates (data set responses, files, another tokenizer) are
    tokenized from their text. EOS closes a response that stopped, unless its recorded ids already
    end with a token that ends a turn (`ends`: the model's `generation_config.eos_token_id`, which
    vLLM stops on too, e.g. Llama-3's `<|eot_id|>`; `end_token_ids`): that token is its
    terminator, and a second one would teach the model to emit two. A response cut off by a
    length limit gets none, so the fine-tuning term never teaches the model to stop
    mid-sentence: the sampler's (`finish_reason: length`) or this encoder's. A conversation's
    prompt is rendered by the chat template (`prompt_ids`) when the sampler's ids are not there,
    and its replies are closed by the template's turn end (`closing_id`) instead of the EOS.

    One prompt per group, so every candidate is scored against the same context. Long responses
    give way before the prompt (`fit_prompt`): the prompt keeps `min(P, max(max_length − R_max,
    max_length // 2))` of its P tokens, R_max the longest response with its EOS, cut from the left
    (its special prefix, e.g. BOS, kept); a response longer than the room the prompt leaves is cut
    from the right, without EOS. A run's prompts (at most `data.max_prompt_tokens`, which the
    preflight holds to at most half of `train.max_length` when data-set or external responses join
    the groups) are therefore never cut, nor is a sampled reply (`RunConfig` keeps
    `train.max_length ≥ data.max_prompt_tokens + sampling.max_new_tokens + 1`). With
    `truncated="drop"` a cut candidate, the sampler's or this encoder's, leaves the group (ranking
    and fine-tuning alike). `cut` counts the responses this encoder cut, `dropped` the candidates
    left out.
    """

    tokenizer: Any
    max_length: int
    truncated: str = "keep"
    dropped: int = 0  # candidates left out (truncated="drop")
    cut: int = 0  # responses cut from the right to fit max_length
    ends: Collection[int] = ()  # turn-ending ids besides the tokenizer's EOS

    def __post_init__(self) -> None:
        prefix, _, suffix = special_split(self.tokenizer, "x")
        self.n_prefix, self.n_suffix = len(prefix), len(suffix)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.eos = self.tokenizer.eos_token_id
        # A chat template's turn end closes a conversation's replies (`closing_id`).
        self.terminators = {self.eos, *self.ends} | ({turn_end_id(self.tokenizer)} - {None})

    def __call__(self, group: QueryGroup) -> EncodedGroup | None:
        own = group.tokenizer == self.fingerprint
        if own and group.prompt_ids:
            prompt = list(group.prompt_ids)
        else:
            prompt = prompt_ids(self.tokenizer, group.query)
        token_ids = group.token_ids if own and group.token_ids else [None] * group.k
        finish = group.finish_reasons or [None] * group.k
        close = self.eos if isinstance(group.query, str) else closing_id(self.tokenizer, group.query)
        replies = []  # (candidate index, token ids, stopped)
        for i, text in enumerate(group.responses):
            stopped = finish[i] != "length"
            if not stopped and self.truncated == "drop":
                self.dropped += 1
                continue
            ids = list(token_ids[i]) if token_ids[i] else self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if stopped and (not ids or ids[-1] not in self.terminators):
                ids.append(close)
            replies.append((i, ids, stopped))
        if not replies:
            return None
        prompt = fit_prompt(prompt, max(len(ids) for _, ids, _ in replies), self.max_length,
                            self.n_prefix, self.n_suffix)
        room = self.max_length - len(prompt)
        responses, rewards, kept = [], [], []
        for i, ids, stopped in replies:
            if len(ids) > room:
                del ids[room:]  # cut from the right: the EOS, if any, goes with the cut
                stopped = False
                self.cut += 1
            if not stopped and self.truncated == "drop":
                self.dropped += 1
                continue
            responses.append(ids)
            rewards.append(group.scores[i])
            kept.append(i)
        if not responses:
            return None
        refs = None
        if group.ref_logprobs is not None:
            refs = [group.ref_logprobs[i] for i in kept]
            if any(r is None for r in refs):
                raise ValueError(f"query {str(group.query)[:60]!r}: ref_logprobs is null for a candidate the "
                                 "trainer scores (computed with another train.truncated?)")
        return EncodedGroup(prompt, responses, rewards, kept, refs)


@dataclass
class GroupTensors:
    """A batch of B query groups as [B, K] tensors, K the most candidates of a group: each
    candidate's Σ log π over its response (`logp_sum`), its response length, its reward, and
    `valid` (False in the empty slots of a group with fewer than K candidates; the other tensors
    hold 0 there)."""

    logp_sum: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    valid: torch.Tensor


def per_group(groups: Sequence[EncodedGroup], values: Sequence[Sequence[float]],
              device: torch.device) -> torch.Tensor:
    """[B, K] float32 of one value per candidate of each group (0 in empty slots)."""
    out = torch.zeros((len(groups), max(len(g.responses) for g in groups)), dtype=torch.float32,
                      device=device)
    for bi, v in enumerate(values):
        out[bi, : len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def group_tensors(groups: Sequence[EncodedGroup], logp: torch.Tensor, lengths: torch.Tensor) -> GroupTensors:
    """The [B, K] tensors of `groups` from the flat, query-major [N] log-probabilities and response
    lengths of their candidates (`rrhf_ray.train.rrhf.candidate_logprobs`), on their device."""
    rewards = per_group(groups, [g.rewards for g in groups], logp.device)
    valid = torch.zeros(rewards.shape, dtype=torch.bool, device=logp.device)
    for bi, g in enumerate(groups):
        valid[bi, : len(g.rewards)] = True
    return GroupTensors(logp.new_zeros(valid.shape).masked_scatter(valid, logp),
                        lengths.new_zeros(valid.shape).masked_scatter(valid, lengths), rewards, valid)
