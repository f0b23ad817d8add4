"""The run state's fingerprint across a schema change: an output directory started before the
SFT / reward-model stages got their own settings class, the pairwise losses got `pairs` and the
refresh tolerance its dtype default still resumes, and is refused as before when its config
really differs."""

from __future__ import annotations

import json

import pytest

from rrhf_ray.config import ConfigError, load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState, config_fingerprint, earlier_fingerprints

# Written by the schema before this change (config_fingerprint of the same configs there).
EARLIER = {(): "5cad2796a464faf8", ("train.loss.name=dpo",): "041968175aea82fa"}


@pytest.mark.parametrize("overrides", list(EARLIER), ids=["demo", "demo-dpo"])
def test_a_run_started_under_the_earlier_schema_resumes_and_is_rewritten(overrides, tmp_path):
    config = load_config(DEMO_CONFIG, ["output.dir=/tmp/fp-run", *overrides])
    assert config_fingerprint(config) != EARLIER[overrides]
    assert earlier_fingerprints(config) == {EARLIER[overrides]}
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"fingerprint": EARLIER[overrides], "stages": {"base": {}}}))

    state = RunState(out, config)

    assert state.data["stages"] == {"base": {}}
    assert json.loads((out / "state.json").read_text())["fingerprint"] == config_fingerprint(config)


def test_another_config_is_still_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"fingerprint": EARLIER[()], "stages": {}}))
    with pytest.raises(ConfigError, match="different config"):
        RunState(out, load_config(DEMO_CONFIG, ["output.dir=/tmp/fp-run", "train.lr=0.5"]))


def test_a_config_that_reads_the_same_in_both_schemas_has_no_earlier_fingerprint():
    # no stage settings, the rrhf loss, the tolerance set
    config = load_config(DEMO_CONFIG, ["sft=null", "sampling.refresh_tolerance=0.05", "output.dir=/tmp/fp-run"])
    assert earlier_fingerprints(config) == set()


def test_the_attention_kernel_is_not_part_of_the_fingerprint():
    """`prefix_attention` picks the kernel of the packed rows (the same loss and gradients up to
    float rounding; auto depends on the device): a run may resume with another one, or on
    another machine, in the same output directory. flex asks for a GPU (no CPU backward)."""
    gpu = ["output.dir=/tmp/fp-run", "train.use_gpu=true", "sft.train.use_gpu=true"]
    base = config_fingerprint(load_config(DEMO_CONFIG, gpu))
    for kernel in ("auto", "sdpa", "flex"):
        config = load_config(DEMO_CONFIG, [*gpu, f"train.prefix_attention={kernel}",
                                           f"sft.train.prefix_attention={kernel}"])
        assert (config.train.prefix_attention, config.sft.train.prefix_attention) == (kernel, kernel)
        assert config_fingerprint(config) == base
    assert config_fingerprint(load_config(DEMO_CONFIG, [*gpu, "train.lr=0.5"])) != base
    with pytest.raises(ConfigError, match="prefix_attention 'flex' needs train.use_gpu"):
        load_config(DEMO_CONFIG, ["train.prefix_attention=flex"])


def test_the_refresh_transport_is_not_part_of_the_fingerprint():
    """Disk or memory moves the same tensors to the samplers: a run resumes under either, with the
    fingerprint the code before the setting gave it (7ecb40f289f591c9, the demo at this output.dir)."""
    disk = load_config(DEMO_CONFIG, ["output.dir=/tmp/fp-run"])
    memory = load_config(DEMO_CONFIG, ["output.dir=/tmp/fp-run", "sampling.refresh_transport=memory"])
    assert (disk.sampling.refresh_transport, memory.sampling.refresh_transport) == ("disk", "memory")
    assert config_fingerprint(memory) == config_fingerprint(disk) == "7ecb40f289f591c9"
    with pytest.raises(ConfigError, match="refresh_transport"):
        load_config(DEMO_CONFIG, ["sampling.refresh_transport=network"])


def test_two_stages_at_once_keep_the_running_record_of_the_one_started_last(tmp_path):
    """The online policy's one-step overlap trains a segment while the next one samples: a stage
    that ends removes `running` only when it names that stage; a stage that fails as an
    interrupted run shuts down does not replace the interruption's record."""
    import os

    state = RunState(tmp_path, load_config(DEMO_CONFIG))
    state.start("round1/seg1/train")
    state.start("round1/seg2/sample")
    state.finish("round1/seg1/train", 1.0)
    assert state.data["running"]["stage"] == "round1/seg2/sample"
    state.fail("round1/seg2/sample", 0.5, KeyboardInterrupt())
    on_disk = json.loads(state.path.read_text())
    assert "running" not in on_disk and on_disk["failed"]["interrupted"] is True
    assert on_disk["failed"]["pid"] == os.getpid()
    state.start("round1/seg2/train")  # (a start clears the failure: a new stage of a new try)
    state.fail("round1/seg2/sample", 0.5, KeyboardInterrupt())
    state.fail("round1/seg2/train", 2.0, RuntimeError("the trainer's actor died"))
    failed = json.loads(state.path.read_text())["failed"]
    assert failed["stage"] == "round1/seg2/sample" and failed["interrupted"] is True
    assert "running" not in state.data
    # Stages run as one (`timed_stages`): the joint name, or each of them, ends the record.
    state.start("round1/eval + round2/sample")
    state.fail("round1/eval + round2/sample", 1.0, KeyboardInterrupt())
    assert "running" not in state.data
    state.start("round1/eval + round2/sample")
    state.finish("round1/eval", 0.5)
    assert "running" not in state.data


def test_a_stage_started_while_another_runs_lists_it_beside_and_either_may_end_first(tmp_path):
    """One-step overlap: segment 1 trains while segment 2 samples. `running` names the stage started
    last and lists the other under `beside`; whichever ends first leaves, and the other is then
    the record (with the driver's pid and host); a beside stage that fails is recorded as failed."""
    import os

    state = RunState(tmp_path, load_config(DEMO_CONFIG))
    state.start("round1/seg1/train")
    started = state.data["running"]["started"]
    state.start("round1/seg2/sample")
    on_disk = json.loads(state.path.read_text())["running"]
    assert on_disk["stage"] == "round1/seg2/sample"
    assert on_disk["beside"] == [{"stage": "round1/seg1/train", "started": started}]
    # The later one ends first: the earlier one is the record again, whole.
    state.finish("round1/seg2/sample", 1.0)
    running = state.data["running"]
    assert running["stage"] == "round1/seg1/train" and running["started"] == started
    assert running["pid"] == os.getpid() and "beside" not in running
    # The earlier one ends first: it leaves `beside`, the later one stays the record.
    state.start("round1/seg2/score")
    state.finish("round1/seg1/train", 2.0)
    assert state.data["running"]["stage"] == "round1/seg2/score" and "beside" not in state.data["running"]
    assert {"round1/seg1/train", "round1/seg2/sample"} <= set(state.data["stages"])
    # A beside stage that fails is the failure on record; the later stage still runs.
    state.finish("round1/seg2/score", 0.1)
    state.start("round1/seg2/train")
    state.start("round1/seg3/sample")
    state.fail("round1/seg2/train", 3.0, RuntimeError("the trainer's actor died"))
    on_disk = json.loads(state.path.read_text())
    assert on_disk["failed"]["stage"] == "round1/seg2/train" and on_disk["failed"]["pid"] == os.getpid()
    assert on_disk["running"]["stage"] == "round1/seg3/sample" and "beside" not in on_disk["running"]
    # The same stage started again (a retry) is not listed beside itself.
    state.start("round1/seg3/sample")
    assert "beside" not in state.data["running"]
