"""Which runs share kept sampler engines (`rrhf_ray.actors.pools.EngineCache`): those whose model
and engine settings are equal, whatever their requests ask for."""

from __future__ import annotations

import pytest

from rrhf_ray.actors.pools import ENGINE_FIELDS, engine_settings
from rrhf_ray.config import SamplingConfig, load_config
from rrhf_ray.demo import DEMO_CONFIG


def test_every_engine_field_is_a_sampling_setting():
    assert ENGINE_FIELDS <= set(SamplingConfig.model_fields)


@pytest.mark.parametrize("overrides", [
    ["sampling.temperature=0.7", "sampling.n=8", "sampling.max_new_tokens=12"],
    ["sampling.preset=OP", "train.epochs=1"],  # IP and OP variants of one compare share them
    ["sampling.chunk_prompts=3", "sampling.chunk_timeout_s=60", "sampling.refresh_transport=memory"],
])
def test_runs_that_differ_in_their_requests_share_engines(overrides):
    base = load_config(DEMO_CONFIG)
    assert engine_settings(load_config(DEMO_CONFIG, overrides), "policy") == engine_settings(base, "policy")


@pytest.mark.parametrize("overrides", [
    ["sampling.dtype=float32"], ["sampling.max_model_len=512"], ["sampling.num_replicas=2"],
    ["sampling.seed=3"], ["model.trust_remote_code=true"],
])
def test_runs_that_differ_in_how_the_engine_is_built_do_not(overrides):
    base = load_config(DEMO_CONFIG)
    assert engine_settings(load_config(DEMO_CONFIG, overrides), "policy") != engine_settings(base, "policy")
    assert engine_settings(base, "policy") != engine_settings(base, "initial")
