"""rrhf-ray: RRHF alignment of language models, orchestrated on Ray.

The Python API (`rrhf_ray.api`): `run(config, **overrides)` runs the round-based workflow and
returns its metrics rows; `train_ranked(data, model, output, **train_options)` trains on a ranked
file in this process, without Ray. The command line is `rrhf-ray` (`rrhf_ray.cli`)."""

from rrhf_ray.api import run, train_ranked

__version__ = "0.1.0"
__all__ = ["__version__", "run", "train_ranked"]
