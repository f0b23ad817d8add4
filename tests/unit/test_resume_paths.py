"""Resume by meaning, not spelling: a local `output.dir` enters the config fingerprint as its
resolved absolute path, so `outputs/demo`, `$PWD/outputs/demo` and `outputs/demo/` are one run;
a run whose state.json the earlier code wrote (the path as typed) still resumes; the README's
continue-a-run examples are accepted in the directory they land in."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from rrhf_ray.config import load_config
from rrhf_ray.demo import DEMO_CONFIG
from rrhf_ray.state import RunState, config_fingerprint, earlier_fingerprints

README = Path(__file__).resolve().parents[2] / "README.md"
# config_fingerprint of the demo config, output.dir as typed, written by the code before this change.
AS_TYPED = {"outputs/demo": "a0059372081538a6"}


def test_three_spellings_of_one_output_dir_are_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spellings = ["outputs/demo", f"{tmp_path}/outputs/demo", "outputs/demo/", "./outputs/../outputs/demo"]
    prints = {config_fingerprint(load_config(DEMO_CONFIG, [f"output.dir={s}"])) for s in spellings}
    assert len(prints) == 1
    other = config_fingerprint(load_config(DEMO_CONFIG, ["output.dir=outputs/demo2"]))
    assert other not in prints


def test_a_run_the_earlier_code_wrote_resumes_under_the_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEMO_CONFIG, [])  # output.dir outputs/demo, relative
    assert AS_TYPED["outputs/demo"] in earlier_fingerprints(config)
    out = tmp_path / "outputs" / "demo"
    out.mkdir(parents=True)
    (out / "state.json").write_text(json.dumps({"fingerprint": AS_TYPED["outputs/demo"], "stages": {"base": {}}}))

    state = RunState(out, config)

    assert state.data["stages"] == {"base": {}}
    assert json.loads((out / "state.json").read_text())["fingerprint"] == config_fingerprint(config)


def _readme_run_examples() -> list[list[str]]:
    """The `rrhf-ray run k=v …` examples of the README's resume paragraph (overrides of the demo)."""
    text = README.read_text()
    start = text.index("A killed run, started again")
    paragraph = text[start:text.index("\n\n", start)]
    return [shlex.split(cmd)[2:] for cmd in re.findall(r"`(rrhf-ray run [^`]*)`", paragraph)]


def test_the_readme_run_examples_resume_or_start_fresh(tmp_path, monkeypatch):
    """Each example either lands in the finished demo's directory with the demo's fingerprint
    (more rounds: accepted) or names a directory of its own (a fresh run)."""
    monkeypatch.chdir(tmp_path)
    demo = load_config(DEMO_CONFIG, [])
    examples = _readme_run_examples()
    assert len(examples) >= 2
    landing = []
    for overrides in examples:
        config = load_config(DEMO_CONFIG, overrides)
        same_dir = Path(config.output.dir).resolve() == Path(demo.output.dir).resolve()
        landing.append(same_dir)
        if same_dir:
            assert config_fingerprint(config) == config_fingerprint(demo), overrides
    assert any(landing) and not all(landing)  # one continues the demo, one is a run of its own
