"""`cut_at_stop`: how beam-search replies are cut at stop strings (vLLM does not do it for beams);
`served_dtype`: the dtype `sampling.dtype: auto` resolves to, read from the model's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from rrhf_ray.actors.engine import cut_at_stop, served_dtype
from rrhf_ray.config import ConfigError


@pytest.mark.parametrize("stop", [[], ["\n\nHuman:"], ("zzz", "###")])
def test_no_stop_string_in_the_text_keeps_it_whole(stop) -> None:
    assert cut_at_stop(" Sure, loosen the nuts.", stop) == (" Sure, loosen the nuts.", False)


def test_the_text_is_cut_before_the_stop_string() -> None:
    assert cut_at_stop(" Sure.\n\nHuman: thanks", ["\n\nHuman:"]) == (" Sure.", True)


def test_the_earliest_stop_in_the_text_wins_not_the_first_in_the_list() -> None:
    text = " one. two! three?"
    assert cut_at_stop(text, ["?", "!", "."]) == (" one", True)
    assert cut_at_stop(text, ["?", "!"]) == (" one. two", True)
    assert cut_at_stop(text, ["?", "nope"]) == (" one. two! three", True)


def test_an_empty_stop_string_is_ignored() -> None:
    # "".find("") would be 0 and cut everything.
    assert cut_at_stop(" abc", [""]) == (" abc", False)
    assert cut_at_stop(" abc. def", ["", "."]) == (" abc", True)


def test_a_stop_at_position_zero_leaves_an_empty_reply() -> None:
    assert cut_at_stop("\n\nHuman: hi", ["\n\nHuman:"]) == ("", True)
    assert cut_at_stop("!!", ["!"]) == ("", True)


def test_only_the_first_occurrence_counts() -> None:
    assert cut_at_stop("a.b.c", ["."]) == ("a", True)


# --------------------------------------------------------------------------- served_dtype


def write_config(directory: Path, dtype: str | None) -> Path:
    """A tiny Llama config in `directory` whose stored dtype is `dtype` (None: none stored)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                vocab_size=32, dtype=dtype).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("stored", "served"), [("float32", "bfloat16"), (None, "bfloat16"),
                                                ("bfloat16", "bfloat16"), ("float16", "float16")])
def test_auto_serves_the_dtype_of_a_local_model_float32_as_bfloat16(tmp_path, stored, served) -> None:
    assert served_dtype("auto", str(write_config(tmp_path, stored))) == served


def test_auto_reads_the_config_of_a_hub_id_in_the_local_cache(tmp_path, monkeypatch) -> None:
    """A hub id resolves through the hub cache (offline here): its config's dtype, not a guess."""
    import huggingface_hub.constants

    repo = tmp_path / "models--acme--tiny"
    revision = "0" * 40
    write_config(repo / "snapshots" / revision, "float16")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert served_dtype("auto", "acme/tiny") == "float16"


def test_an_explicit_dtype_is_served_as_it_is_without_reading_the_model(tmp_path) -> None:
    assert served_dtype("float16", str(tmp_path / "no-such-model")) == "float16"
    assert served_dtype("float32", str(write_config(tmp_path, "bfloat16"))) == "float32"


@pytest.mark.parametrize("model", ["acme/not-in-the-cache", "/no/such/model/dir"])
def test_auto_refuses_a_model_whose_config_cannot_be_read(tmp_path, monkeypatch, model) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=rf"config of the model '{model}' cannot be read.*"
                                          r"set sampling\.dtype explicitly") as err:
        served_dtype("auto", model)
    assert "float32, bfloat16 or float16" in str(err.value)
