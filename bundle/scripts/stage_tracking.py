"""The ignite handler that logs one training stage into its own MLflow run."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from .tracking import TrackingClient, code_version, executed_config, is_finite_number, write_run_file

_TASK_COMPONENTS = {"seg": ("encoder", "decoder"), "cls": ("encoder", "cls_head")}


def parameters_used(network: torch.nn.Module, tasks: Sequence[str]) -> int:
    """Parameters of the components a model needs for these tasks (a seg-only model does not count the head)."""
    names = {name for task in tasks for name in _TASK_COMPONENTS[task]}
    module = getattr(network, "module", network)  # DistributedDataParallel wraps the model
    return sum(p.numel() for name in sorted(names) for p in getattr(module, name).parameters())


class StageTracking:
    """Log a training stage to MLflow: params, per-iteration and per-epoch losses and learning rates, validation
    metrics per epoch, and at the end the configuration, data summary and best checkpoint.

    A new run every time (a rerun or a resumed stage never merges into an old one), under the pipeline's parent
    run when there is one. Store failures are reported, never raised: the training goes on.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: the experiment.
        run_name: the stage run's name.
        parent_run_id: the pipeline's parent run ('' for a stage run on its own).
        tags: extra run tags (variant, stage, ...).
        params: the settings to log, nested dicts allowed.
        validator: the evaluator whose metrics are logged per epoch.
        network: the trained network, for its parameter count.
        tasks: the stage's tasks (``seg``, ``cls``) for the count of parameters in use.
        artifacts: files logged at the end (e.g. the prepared data's summary), by artifact folder.
        best_checkpoint: the stage's best weights, logged at the end.
        run_dir: when set and the stage has no parent, the run's id is written there for evaluation.
        code_dir: the repository whose commit is logged.
        flush_every: iterations between writes of the per-iteration metrics (fewer store round trips).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        parent_run_id: str = "",
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        validator: Engine | None = None,
        network: torch.nn.Module | None = None,
        tasks: Sequence[str] = (),
        artifacts: Mapping[str, Sequence[str]] | None = None,
        best_checkpoint: str = "",
        run_dir: str = "",
        code_dir: str = ".",
        flush_every: int = 20,
    ) -> None:
        self.client = TrackingClient(tracking_uri, experiment_name)
        self.run_name = run_name
        self.parent_run_id = parent_run_id or ""
        self.tags = {key: str(value) for key, value in (tags or {}).items()}
        self.params = dict(params or {})
        self.validator = validator
        self.network = network
        self.tasks = list(tasks)
        self.artifacts = dict(artifacts or {})
        self.best_checkpoint = best_checkpoint
        self.run_dir = run_dir
        self.code_dir = code_dir
        self.flush_every = flush_every
        self.run_id: str | None = None
        self._trainer: Engine | None = None
        self._pending: list[Any] = []
        self._epoch_sums: dict[str, float] = {}
        self._epoch_count = 0
        self._started = 0.0
        self._epoch_started = 0.0

    def attach(self, trainer: Engine) -> None:
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self.completed)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.validated)

    def started(self, trainer: Engine) -> None:
        self._started = time.perf_counter()
        tags = {**self.tags, "kind": "stage", "resumed_from_epoch": str(trainer.state.epoch)}
        self.run_id = self.client.start_run(self.run_name, tags, self.parent_run_id)
        params = {**self.params, "code_version": code_version(self.code_dir)}
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is not None:
            params["lr_groups"] = {_group_name(i, g): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        if self.network is not None:
            params["parameters_used"] = parameters_used(self.network, self.tasks)
            params["parameters_trainable"] = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        self.client.log_params(self.run_id, params)
        self.client.log_dict(self.run_id, executed_config(), "config/executed_config.json")
        if self.run_dir and not self.parent_run_id and self.run_id:
            write_run_file(self.run_dir, self.client, self.run_id)

    def epoch_started(self, trainer: Engine) -> None:
        self._epoch_started = time.perf_counter()
        self._epoch_sums, self._epoch_count = {}, 0

    def iteration_completed(self, trainer: Engine) -> None:
        from mlflow.entities import Metric

        output = trainer.state.output
        if not isinstance(output, Mapping):
            return
        now, step = int(time.time() * 1000), trainer.state.iteration
        # The batch's share of the step's loss, and its unweighted terms (scripts.losses.MultiTaskLoss keeps them).
        values = {**output, **getattr(getattr(trainer, "loss_function", None), "terms", {})}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                number = float(value.item())
                self._pending.append(Metric(f"train_{name}", number, now, step))
                self._epoch_sums[name] = self._epoch_sums.get(name, 0.0) + number
        self._epoch_count += 1
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is not None:
            for index, group in enumerate(optimizer.param_groups):
                self._pending.append(Metric(f"lr_{_group_name(index, group)}", float(group["lr"]), now, step))
        if len(self._pending) >= self.flush_every * 8:
            self._flush()

    def epoch_completed(self, trainer: Engine) -> None:
        self._flush()
        means = {f"train_{name}_epoch": total / max(self._epoch_count, 1) for name, total in self._epoch_sums.items()}
        means["epoch_time_s"] = time.perf_counter() - self._epoch_started
        self.client.log_metrics(self.run_id, means, step=trainer.state.epoch)

    def validated(self, validator: Engine) -> None:
        epoch = self._trainer.state.epoch if self._trainer is not None else validator.state.epoch
        metrics = {name: float(value) for name, value in validator.state.metrics.items() if is_finite_number(value)}
        self.client.log_metrics(self.run_id, metrics, step=epoch)

    def completed(self, trainer: Engine) -> None:
        self._flush()
        self.client.log_metrics(self.run_id, {"stage_time_s": time.perf_counter() - self._started})
        if self.validator is not None and getattr(self.validator.state, "best_metric", None) is not None:
            self.client.log_metrics(self.run_id, {"best_val_score": float(self.validator.state.best_metric)})
        for folder, paths in self.artifacts.items():
            for path in paths:
                self.client.log_artifact(self.run_id, path, folder)
        if self.best_checkpoint:
            self.client.log_artifact(self.run_id, self.best_checkpoint, "checkpoints")
        self.client.end_run(self.run_id, "FINISHED")
        print(self.client.report(f"Stage run {self.run_name!r}"), flush=True)

    def exception_raised(self, trainer: Engine, error: BaseException) -> None:
        # ignite treats a registered EXCEPTION_RAISED handler as handling the error: close the run, then re-raise.
        self._flush()
        self.client.end_run(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise error

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self.client.log_metric_batch(self.run_id, pending)


def _group_name(index: int, group: Mapping[str, Any]) -> str:
    return str(group.get("name", f"group_{index}"))
