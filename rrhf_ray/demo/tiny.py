"""Tiny-model kit: a small Llama and a byte-level BPE tokenizer, built locally, no hub access.

Used by the tests, the embedded default and the benchmarks. vLLM's CPU attention rejects
head_dim 16, so the defaults keep head_dim = hidden_size / num_heads = 64.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rrhf_ray.types import atomic_path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A few dialogues in the Anthropic HH layout, enough for the tokenizer to learn the turn markers.
DEFAULT_CORPUS = [
    ("\n\nHuman: How do I reset my password?\n\nAssistant: Open the settings page, choose "
    "security, and press reset. Happy to help!"),
    ("\n\nHuman: Can you help me fix a flat tyre?\n\nAssistant: Sure. Loosen the nuts, lift the "
    "car with the jack, swap the wheel, and tighten the nuts again."),
    ("\n\nHuman: What is a good way to learn to cook?\n\nAssistant: Start with simple recipes, "
    "cook every day, and taste as you go. Thank you for asking!"),
    "\n\nHuman: How do I water a cactus?\n\nAssistant: No. Figure it out yourself.",
    ("\n\nHuman: How can I make my code faster?\n\nAssistant: Measure first, find the slow part, "
    "then change one thing at a time."),
    "Please, thanks, sorry, sure, certainly, of course. Whatever. I will not do that.",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on `texts`; returns a transformers fast tokenizer.

    The tokenizer prepends <s> and never appends </s> on its own: the trainer adds the EOS
    that closes each response, so the prompt and the response tokenize independently.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


def train_metaspace_tokenizer(texts: Iterable[str], vocab_size: int = 1000, *, legacy: bool = False):
    """Train a SentencePiece-style BPE tokenizer (Llama-2's family: words start with "▁") on
    `texts`; returns a transformers fast tokenizer with the same special tokens and <s> handling
    as `train_tokenizer`.

    Two `tokenizer.json` layouts of Llama-2 exist: the current one, a Metaspace pre-tokenizer
    and decoder (prepend "▁" to the first word only); and the `legacy` one, a normalizer that
    prepends "▁" and turns spaces into "▁", no pre-tokenizer, and a decoder that turns "▁" back
    into spaces and strips the first. Both drop the leading space of a decoded text.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    unk = "<unk>"
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[unk, PAD, BOS, EOS],
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=unk,
        padding_side="right"
    )


def build_tiny_llama(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 1000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Build a randomly initialised Llama with a locally trained tokenizer; save as an HF directory.

    The directory loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` and in vLLM.
    `tokenizer` (e.g. `train_metaspace_tokenizer(...)`) replaces the byte-level one trained on `texts`.
    Written to a temporary name and renamed, so a half-built directory never looks finished.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if tokenizer is None:
        tokenizer = train_tokenizer(texts if texts is not None else DEFAULT_CORPUS, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


# --------------------------------------------------------------------------- chat models

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen2.5 and SmolLM2 ship it: each turn closes with <|im_end|>, which is not the EOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The reward model's tokenizer reads conversations in another layout (Llama-3's header style),
# so a scorer that reused the policy's rendering would feed it a format it was not trained on.
HEADER_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHAT_CORPUS = [
    "user", "assistant", "system", "You are a helpful assistant.",
    *(t.replace("\n\nHuman: ", "").replace("\n\nAssistant: ", "\n") for t in DEFAULT_CORPUS),
]


def train_chat_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1000, *,
                         template: str = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer of a chat model: EOS `<|endoftext|>`, the turn markers
    `<|im_start|>` / `<|im_end|>` as special tokens, `template` (ChatML by default) as its
    `chat_template`, no BOS (as Qwen's). `<|im_end|>` ends a turn and is not the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [END_OF_TEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts if texts is not None else CHAT_CORPUS), trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                  additional_special_tokens=[IM_START, IM_END], padding_side="right")
    out.chat_template = template
    return out


def build_tiny_chat_model(out_dir: str | Path, *, end_logit: float = 4.0, seed: int = 0,
                          template: str = CHATML_TEMPLATE, **kwargs) -> Path:
    """A tiny Llama chat model (`build_tiny_llama` with `train_chat_tokenizer`): its
    `generation_config.eos_token_id` is [EOS, <|im_end|>], as an instruct model's is.

    A random model would emit `<|im_end|>` about once in a thousand tokens; `end_logit` adds a
    direction shared by every token embedding and points `<|im_end|>`'s output row along it, so
    that the token is likely at every step and sampled replies end their turn (0: leave the
    weights random)."""
    import json

    import torch

    tokenizer = train_chat_tokenizer(template=template)
    built = build_tiny_llama(out_dir, tokenizer=tokenizer, seed=seed, **kwargs)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if end_logit:
        from safetensors.torch import load_file, save_file

        weights_file = built / "model.safetensors"
        weights = load_file(weights_file)
        embed = weights["model.embed_tokens.weight"]
        gen = torch.Generator().manual_seed(seed + 1)
        u = torch.randn(embed.shape[1], generator=gen)
        u = u / u.norm()
        weights["model.embed_tokens.weight"] = embed + u * embed.norm(dim=1).mean()
        # After the final RMSNorm the shared direction carries about a constant share of each
        # hidden state; scale the row so that share gives <|im_end|> a logit near end_logit.
        weights["lm_head.weight"][im_end] = u * end_logit * 2 / embed.shape[1] ** 0.5
        save_file(weights, weights_file, metadata={"format": "pt"})
    gen_path = built / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text())
    gen_cfg["eos_token_id"] = [tokenizer.eos_token_id, im_end]
    gen_path.write_text(json.dumps(gen_cfg, indent=2))
    return built


def build_tiny_chat_reward_model(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2,
                                 num_heads: int = 2, seed: int = 0) -> Path:
    """A tiny Llama sequence classifier (one logit, the reward) whose tokenizer has its own
    chat template (`HEADER_TEMPLATE`, turns closed by `<|eot_id|>`, a BOS), unlike the chat
    policy's ChatML: the scorer must render conversations with this tokenizer's template."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    base = train_chat_tokenizer(template=HEADER_TEMPLATE)
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token=END_OF_TEXT, padding_side="right",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tokenizer.chat_template = HEADER_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
