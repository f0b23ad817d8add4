"""Text to token ids and back into padded tensors: one encoder and one collator for the RRHF,
SFT and reward-model trainers and the reward scorer.

A query and a response are tokenized apart and concatenated (no BPE merge across the
boundary; with byte-level BPE the split at the response's leading space is where the
pre-tokenizer splits anyway). The tokenizer's special tokens are kept where it puts them: its
prefix (e.g. <s>, [CLS]) always opens the sequence, even when the query is cut.

- A *policy* sequence (RRHF, SFT) is `prefix + query + query-suffix + response + EOS`: the prompt
  exactly as vLLM tokenizes it, and the EOS that closes the response (its log-probability is
  part of the response's score, RRHF eq. 1).
- A *reward* sequence (reward model) is `prefix + query + response + suffix`: special tokens wrap
  the whole, as `AutoModelForSequenceClassification` expects.

When a sequence exceeds `max_length`, the query is cut from the left (the end of a dialogue,
the turn being answered, matters most); a response longer than the budget alone is cut from the
right (then a policy response has no EOS).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100  # label of a token that carries no loss (the query, the padding)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token ids: the vocabulary (added tokens included) and the
    special token ids. Two tokenizers with one fingerprint map text to the same ids, so token
    ids a sampler recorded can be trained on as they are."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def special_split(tokenizer: Any, query: str) -> tuple[list[int], list[int], list[int]]:
    """(special prefix, query tokens, special suffix) of the tokenizer's encoding of `query`."""
    body = tokenizer(query, add_special_tokens=False)["input_ids"]
    full = tokenizer(query)["input_ids"]
    start = next((i for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), 0)
    return full[:start], body, full[start + len(body) :]


def encode(tokenizer: Any, query: str, response: str, max_length: int, *, policy: bool = True,
           closed: bool = True) -> tuple[list[int], int]:
    """(token ids, index of the first response token) of query + response within `max_length`.

    `policy=True`: a policy sequence closed with the tokenizer's EOS; `policy=False`: a reward
    sequence (module docstring). `closed=False`: a policy response that did not end (a sampled
    reply cut off at `max_new_tokens`) gets no EOS, so a perplexity does not score a terminator
    its generator never emitted.
    """
    prefix, body, suffix = special_split(tokenizer, query)
    reply = tokenizer(response, add_special_tokens=False)["input_ids"]
    if policy:
        reply = reply + [tokenizer.eos_token_id] if closed else reply
        prompt_end, end = suffix, []
    else:
        prompt_end, end = [], suffix
    fixed = len(prefix) + len(prompt_end) + len(end)
    # At least one token precedes the response: something must predict its first token.
    reply = reply[: max(0, max_length - fixed - (1 if policy and not (prefix or prompt_end) else 0))]
    room = max_length - fixed - len(reply)
    body = body[len(body) - room :] if 0 < room < len(body) else body if room > 0 else []
    prompt = prefix + body + prompt_end
    return prompt + reply + end, len(prompt)


@dataclass
class Batch:
    """Right-padded rows: input_ids, attention_mask (1 on real tokens) and response_mask (True
    on the response tokens, EOS included), each [N, T]. Right padding keeps every real token at
    the position it has unpadded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def labels(self) -> torch.Tensor:
        """The input ids on response tokens, `IGNORE` elsewhere (causal-LM labels)."""
        return torch.where(self.response_mask, self.input_ids, torch.full_like(self.input_ids, IGNORE))


def collate(rows: Sequence[tuple[list[int], int]] | Sequence[list[int]], pad_id: int) -> Batch:
    """Right-pad `(ids, response_start)` rows (or plain id lists: no response) into a `Batch`."""
    pairs = [(r, len(r)) if not isinstance(r, tuple) else r for r in rows]
    width = max(len(ids) for ids, _ in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response = torch.zeros((n, width), dtype=torch.bool)
    for row, (ids, start) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        response[row, start : len(ids)] = True
    return Batch(input_ids, attention, response)
