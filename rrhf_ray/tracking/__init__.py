"""Experiment tracking: MLflow, TensorBoard and Weights & Biases behind one small object.

    tracker = open_tracking(config.tracking, out_dir, saved=state.data.get("tracking"))
    state.data["tracking"] = tracker.ids                 # keep it: a resumed run continues these runs
    tracker.log_params(config)                           # the resolved config, dotted keys
    tracker.log_train_steps(history, prefix="train")     # rows with a caller-supplied "global_step"
    tracker.log_round(row)                               # a metrics.jsonl row; step = row["round"]
    tracker.log_artifact(out_dir / "summary.md", step=r)
    tracker.log_table("samples_round3", rows, step=3)
    tracker.close()                                      # or `with open_tracking(...) as tracker:`

What each backend gets:

- parameters: the config flattened to dotted keys (`train.loss.name`); MLflow params (immutable:
  on resume only new keys are added, a changed value is set as the tag `changed.<key>`), W&B
  config, a TensorBoard text table `config`.
- round metrics: every number of a round row under its own key (`eval_reward_mean`), a [lo, hi]
  pair as `<key>_lo` / `<key>_hi` (`sampled_reward_mean_ci95_lo`); strings, dicts, None, NaN
  and booleans are left out. Step = the round index (W&B: the metric `round` as the x axis).
- training steps: `<prefix>/<key>` (`train/loss`, `train/lr`, …) at step `global_step`, which
  the caller keeps increasing across rounds (W&B: `<prefix>/global_step` as the x axis).
- artifacts: MLflow stores the file; W&B saves it with the run's files (and logs an image as
  `wandb.Image`); TensorBoard shows markdown / text files as text and images as images, and has
  nowhere to keep other files.
- tables: MLflow `tables/<name>.json` in `mlflow.log_table`'s layout ({"columns", "data"}, readable
  with `mlflow.load_table`), TensorBoard a markdown table (text), W&B a `wandb.Table`. Logging the
  same name again replaces the MLflow file.

`Tracker.ids` holds the backends' run ids and how far the logging got (the last round and, per
prefix, the last global step). The caller stores it with its run state (whenever it writes that
state) and passes it back as `saved` when the run resumes: MLflow reopens the run by id, W&B
resumes the run id (`resume="allow"`; offline, a second offline-run folder with the same id that
`wandb sync` merges), TensorBoard appends to the same directory; rounds and steps that were
logged already are skipped, so re-logging every row after a resume is harmless.

A backend that fails while logging is reported once in the log and does not stop the run
(`strict=True` raises instead). Opening a backend whose package is missing raises ConfigError.
This package imports no optional package until a backend is opened.

Modules: `tracker` (`Tracker`, `open_tracking`: one run fanned out to the backends, resume
bookkeeping), `backends` (the `Backend` interface, MLflow, TensorBoard, W&B, the package check),
`values` (a metrics row's numbers, a config's dotted parameters, tables).
"""

from rrhf_ray.tracking.backends import INSTALL_HINT, Backend, check_tracking
from rrhf_ray.tracking.tracker import Tracker, open_tracking
from rrhf_ray.tracking.values import flatten_params, round_metrics

__all__ = ["INSTALL_HINT", "Backend", "Tracker", "check_tracking", "flatten_params", "open_tracking",
           "round_metrics"]
