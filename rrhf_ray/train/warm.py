"""The warm round trainer: one Ray Train worker group that lives across the driver's rounds.

A `TorchTrainer` rebuilt every round would pay a controller, a worker group, a process group and
a model load from storage before each round's first step. Here one `TorchTrainer.fit()` runs in a
background thread of the driver for the whole run:

- each worker reads commands from its own channel (no collective wait while the samplers work,
  however long that takes); rank 0 answers on one result channel; the channels are held by one
  actor on the driver's node (`rrhf_ray.mailbox.Mailbox`), so a lost worker node leaves them;
- a `train` command carries round r's pool paths (the bucket's URIs with output.dir on object
  storage: the workers read them from their node's cache, and load the start model likewise);
  every rank trains `train.epochs` on it with a fresh AdamW and schedule (the online policy,
  whose rounds are segments: one AdamW and schedule over the whole run, `WarmJob.online_steps`,
  saved with each segment's checkpoint and loaded again by a resumed run) and the seeds of a fresh
  fit, `train.seed` mixed with the round (`rrhf_ray.train.loop.round_train_seed`: each round
  its own batch order; round 1 the one-off trainer's), so round r computes what a trainer built
  for round r alone with that seed would; then one
  `ray.train.report(metrics, checkpoint)` per round (`checkpoint_dir_name` `round_<r>`), which
  the driver copies to `rounds/<r>/checkpoint`;
- rank 0 also returns the per-token log-probabilities of a few probe replies under the weights
  the round started from and under those it just saved: the driver compares what the refreshed
  samplers compute with both (`rrhf_ray.refresh.verify_refresh`);
- a round whose loss or gradient turns non-finite (`rrhf_ray.train.loop.NonFiniteTraining`, with
  `train.skip_nonfinite` off) or whose weights end non-finite is not reported: rank 0 answers
  `failed` naming the step, the fit ends, and the driver raises the same error;
- a worker that dies (or whose node is lost) is restarted by Ray Train (`FailureConfig`) from the
  last round's checkpoint, on a node with room for it;
  rank 0 then says `ready` and the driver sends the unfinished round again (a command for a round a
  worker already holds is skipped, so a repeated command is harmless);
- the model stays in the workers' memory between rounds; with LoRA the adapters are merged at each
  round's end and new ones start, as a fit from the saved (merged) checkpoint would.

A killed driver takes the worker group with it (the controller and the mailbox are its actors);
started again, it starts a new group from the last finished round's checkpoint.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from rrhf_ray.config import TrainConfig
from rrhf_ray.logs import redirect_process_output
from rrhf_ray.mailbox import Mailbox
from rrhf_ray.train.checkpoints import (
    read_optimizer_state,
    read_train_state,
    resume_checkpoint,
    write_checkpoint,
)
from rrhf_ray.train.jobs import FitJob
from rrhf_ray.train.launch import WorkerNodes, torch_trainer
from rrhf_ray.train.loop import (
    NonFiniteTraining,
    Optimizer,
    round_train_seed,
    steps_per_epoch,
    train_epochs,
)
from rrhf_ray.train.rrhf import check_pools, rrhf_recipe
from rrhf_ray.train.worker import Worker, load_policy, rank_world

if TYPE_CHECKING:
    from rrhf_ray.mirror import RunStore
    from rrhf_ray.waits import Wait

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
CLOSE_SECONDS = 120.0  # how long `WarmTrainer.close` waits for the fit to end
HUNG_CLOSE_SECONDS = 5.0  # … after a round ran past its time limit


class WarmJob(FitJob):
    """The warm trainer's job: the policy to start from and the RRHF settings of every round
    (each round's pools come with its `train` command). `online_steps`: the online policy's run
    (OP-k, whose rounds are segments): one AdamW and LR schedule over that many steps, kept across
    the segments and saved with each segment's checkpoint (`online_state`, in its optimizer
    file); None: a fresh one each round (IP). `kl_loss_coef`: β of the online policy's KL term in
    the loss (`online.kl_in: loss`; 0 = none)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    online_steps: int | None = Field(None, ge=1)
    kl_loss_coef: float = Field(0.0, ge=0.0)


def online_state(w: Worker, opt: Optimizer) -> dict[str, Any]:
    """What a segment's checkpoint keeps for the next segment: the optimizer and schedule, and
    the float32 weights the trainer holds (the model files hold them in the samplers' dtype)."""
    return {**opt.state_dict(), "weights": {k: v.detach().cpu().clone() for k, v in w.model.state_dict().items()}}


def resume_online(w: Worker, opt: Optimizer, start_dir: str) -> bool:
    """Load `online_state` saved in the checkpoint at `start_dir` into the worker's model and `opt`;
    False when it has none (ρ, or a checkpoint written without it)."""
    saved = read_optimizer_state(start_dir)
    if saved is None or "weights" not in saved:
        return False
    w.model.load_state_dict(saved["weights"])
    opt.load_state_dict(saved)
    return True


@torch.no_grad()
def policy_reply_logprobs(model: torch.nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                          device: torch.device) -> list[list[float]]:
    """The refresh probe under the trainer's weights: log p(reply token | prefix) of every reply
    token of each (prompt ids, reply ids), one forward each (fp32 or the model's dtype; the probe
    is a handful of short sequences). Not `rrhf_ray.loss.sequence_logprobs`, which sums padded
    batches."""
    was_training = model.training
    model.eval()
    out = []
    for prompt, response in sequences:
        ids = torch.tensor([list(prompt) + list(response)], device=device)
        logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
        target = torch.tensor(list(response), device=device)
        out.append(logp.gather(1, target[:, None])[:, 0].tolist())
    if was_training:
        model.train()
    return out


def warm_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker of the warm trainer: load the policy (the last reported round's checkpoint
    after a restart, else `job.model_path` at `config["version"]`), then serve commands."""
    import ray.train

    from rrhf_ray.remote import fetch_file, materialize

    job = WarmJob.model_validate(config["job"])
    redirect_process_output(job.log_dir, "train")
    cfg = job.train
    rank, _ = rank_world()
    commands, results = config["commands"][rank], config["results"]
    version, global_step = int(config["version"]), int(config["global_step"])
    opt: Optimizer | None = None  # the online policy's, over every segment
    with resume_checkpoint(None, in_ray=True) as restart_dir:
        if restart_dir is not None:
            state = read_train_state(restart_dir)
            version, global_step = int(state["round"]), int(state.get("global_step", 0))
        w = Worker.load(restart_dir or job.model_path, cfg, True, job.trust_remote_code, load_policy,
                        tokenizer_path=job.tokenizer_path)
        if job.online_steps is not None:
            opt = Optimizer.build(w.ddp_model, cfg, job.online_steps)
            start_dir = restart_dir or materialize(job.model_path)
            if resume_online(w, opt, start_dir) and rank == 0:
                logger.info("online: optimizer, schedule (step %d) and float32 weights of policy version %d "
                            "loaded", opt.scheduler.last_epoch, version)
    if restart_dir is not None:
        logger.info("warm trainer restarted from round %d's checkpoint", version)
    if rank == 0:
        results.put({"kind": "ready", "version": version})
    while True:
        cmd = commands.get()
        if cmd["kind"] == "stop":
            return
        r = int(cmd["round"])
        if r <= version:  # sent again after a restart; this worker has it already
            continue
        if r != version + 1:
            raise RuntimeError(f"warm trainer holds round {version}'s policy, asked to train round {r}")
        start = time.perf_counter()
        probe = cmd.get("probe") or []
        probe_start = policy_reply_logprobs(w.model, probe, w.device) if rank == 0 else []
        seed = round_train_seed(cfg.seed, r)
        torch.manual_seed(seed)
        # URIs (output.dir on object storage): the pools from this node's cache, downloaded once.
        data_paths = [fetch_file(p)[0] for p in cmd["data_paths"]]
        recipe = rrhf_recipe(cfg, data_paths, w.tokenizer, w.device, w.model, kl_coef=job.kl_loss_coef)
        if job.online_steps is None:  # IP: a fresh AdamW and schedule each round
            opt = Optimizer.build(w.ddp_model, cfg, steps_per_epoch(recipe, cfg, w.world) * cfg.epochs)
        history: list[dict[str, float]] = []
        try:
            metrics = train_epochs(w, recipe, opt, global_step=global_step, history=history, seed=seed)
            bad = [name for name, p in w.model.named_parameters() if not torch.isfinite(p).all()]
            if bad:  # never saved, installed or served
                raise NonFiniteTraining(f"round {r}'s trained weights are not finite ({bad[0]} and "
                                        f"{len(bad) - 1} more tensors); lower train.lr")
        except NonFiniteTraining as err:
            # Every rank stops at the same step (`train_epochs` agrees on it); rank 0 tells the
            # driver, and the fit ends: the weights in memory are half a round's.
            if rank == 0:
                results.put({"kind": "failed", "round": r, "error": f"round {r}: {err}"})
            return
        global_step += int(metrics["step"])
        probe_new = policy_reply_logprobs(w.model, probe, w.device) if rank == 0 else []
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), w.ddp_model, w.tokenizer, cfg, epoch=cfg.epochs - 1, final=True,
                             dtype=job.save_dtype, round=r, global_step=global_step,
                             optimizer_state=online_state(w, opt) if job.online_steps is not None else None)
            compute = time.perf_counter() - start
            metrics = {**metrics, "round": float(r), "seconds_compute": compute}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                             checkpoint_dir_name=f"round_{r:04d}")
        w.fresh_adapters()
        version = r
        if rank == 0:  # report() returned after the (synchronous) upload: the directory is there
            results.put({"kind": "trained", "round": r, "metrics": metrics, "history": history,
                         "checkpoint_dir": f"round_{r:04d}", "probe": probe_new, "probe_start": probe_start})


class WarmTrainer:
    """The driver's handle on the warm worker group (see the module docstring).

    `job` gives the model to start from (`job.model_path`, the policy of round `version`) and the
    training settings; `job.output_dir` is unused (each round's checkpoint is reported).
    `global_step` continues the step count of earlier rounds (for per-step tracking)."""

    def __init__(self, job: WarmJob, version: int, *, storage_path: str, global_step: int = 0,
                 max_failures: int = 1, name: str | None = None, store: RunStore | None = None) -> None:
        cfg = self.cfg = job.train
        self.version = version
        self.store = store
        self.storage_path = storage_path
        self.name = name or f"rounds-from-{version}-{uuid.uuid4().hex[:6]}"
        # On the driver's node: a worker's node lost takes the worker, never the channels.
        self.mailbox = Mailbox()
        self.commands = [self.mailbox.channel(f"commands{rank}") for rank in range(cfg.num_workers)]
        self.results = self.mailbox.channel("results")
        self._pending: dict[str, Any] | None = None
        self.starts = 0  # worker group (re)starts seen (a `ready` each)
        self._error: BaseException | None = None
        self.hung = False  # a round ran past its time limit: `close` does not wait long for it
        self.nodes = WorkerNodes(self.mailbox)  # where each worker runs (the driver records it)
        trainer = torch_trainer(warm_loop_per_worker, job, name=self.name, storage_path=storage_path,
                                max_failures=max_failures, store=store, nodes=self.nodes, version=version,
                                global_step=global_step, commands=self.commands, results=self.results)
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name="warm-trainer", daemon=True)
        self._thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised in the driver's thread by `_get`
            self._error = err

    @property
    def training_round(self) -> int | None:
        """The round sent to every worker's channel and not yet trained (None between rounds)."""
        return None if self._pending is None else int(self._pending["round"])

    def _send(self, cmd: dict[str, Any]) -> None:
        for q in self.commands:
            q.put(cmd)

    def train(self, r: int, data_paths: Sequence[str], probe: Sequence[tuple[list[int], list[int]]] = (),
              wait: Wait | None = None) -> dict[str, Any]:
        """Train round `r` (the workers must hold round r−1's policy) on `data_paths` (paths, or
        the bucket's URIs with output.dir on object storage: each worker reads them from its
        node's cache, `rrhf_ray.remote.fetch_file`); returns
        {"metrics", "history", "checkpoint" (a ray.train.Checkpoint), "probe" and "probe_start"
        (the per-token log-probs of each probe reply under the new weights, and under the
        weights the round started from)}.

        `wait` (`rrhf_ray.waits.Wait`): the round's time limit, and where the driver records that
        it waits on the worker group; past the limit raises `StageTimeout` (the worker group is
        left as it is: `close` ends it with the driver)."""
        if r != self.version + 1:
            raise RuntimeError(f"the warm trainer holds round {self.version}'s policy, not round {r - 1}'s")
        from rrhf_ray.mirror import driver_file

        check_pools([driver_file(p, self.store) for p in data_paths], self.cfg)  # the driver's mirror: no download
        pending = {"kind": "train", "round": r, "data_paths": [str(p) for p in data_paths],
                   "probe": [(list(p), list(q)) for p, q in probe]}
        self._send(pending)
        self._pending = pending  # after the send: `training_round` names a round the channels hold
        while True:
            msg = self._get(wait, r)
            if msg["kind"] == "ready":  # a restarted group: send the unfinished round again
                self.starts += 1
                logger.info("warm trainer (re)started holding round %d; sending round %d", msg["version"], r)
                self._send(self._pending)
            elif msg["kind"] == "failed" and msg["round"] == r:  # the fit has ended
                self._pending = None
                raise NonFiniteTraining(msg["error"])
            elif msg["kind"] == "trained" and msg["round"] == r:
                from ray.train import Checkpoint

                self._pending = None
                self.version = r
                self.hung = False  # it answered after all (a resumed stage)
                # Where Ray Train persisted it (storage_path / run name / checkpoint_dir_name); not
                # through get_all_reported_checkpoints, which waits for the controller's next poll.
                msg["checkpoint"] = Checkpoint(path="/".join([self.storage_path.rstrip("/"), self.name,
                                                              msg.pop("checkpoint_dir")]))
                return msg

    def _get(self, wait: Wait | None = None, r: int = 0) -> dict[str, Any]:
        while True:
            try:
                return self.results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the training worker group stopped: {self._error!r}") from self._error
                if wait is not None:
                    n = self.cfg.num_workers
                    on = f"the trainer worker group (fit {self.name}, {n} worker{'s' * (n != 1)}, round {r})"
                    wait.poll(on)
                    if wait.expired():
                        self.hung = True
                        raise wait.timeout(on)

    def close(self, timeout_s: float = CLOSE_SECONDS) -> bool:
        """Stop the workers and end the fit: True when it ended within `timeout_s` (its mailbox is
        then shut down and its storage directory removed when local). A fit still running then is
        logged as an error and left as it is (False): its mailbox stays, so a later `close` can
        still end it; the driver's exit takes it down otherwise. A group whose round ran past its
        time limit (`hung`) gets at most `HUNG_CLOSE_SECONDS`: it is not expected to answer."""
        if self.hung:
            timeout_s = min(timeout_s, HUNG_CLOSE_SECONDS)
        if self._thread.is_alive():
            self._send({"kind": "stop"})
            self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            if self._pending is not None:  # a round the driver stopped waiting for (a stop signal)
                logger.warning("the warm trainer's fit %s was training round %s and did not stop within "
                               "%.0f s; it ends with the driver", self.name, self._pending["round"], timeout_s)
            else:
                logger.error("the warm trainer's fit %s did not stop within %.0f s of the stop command",
                             self.name, timeout_s)
            return False
        self.mailbox.shutdown()
        local = Path(self.storage_path) / self.name
        if "://" not in self.storage_path and local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        return True
