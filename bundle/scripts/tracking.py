"""MLflow tracking: a parent run per pipeline run, a child run per stage, evaluation logged into the run it evaluates.

The store is an embedded sqlite database under the bundle (``<bundle_root>/mlruns/mlflow.db``, artifacts beside it)
unless ``MLFLOW_TRACKING_URI`` or ``--tracking_uri`` names another (a team's ``http://`` tracking server, or a
database URI). Tracking never costs the training: a store that fails mid-run is reported and logging stops, while
training, checkpoints and evaluation carry on. A tracking server that cannot be reached when a run starts stops it
at once, before any data is loaded, unless the run is started with ``--mlflow_tracking false``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:
    import fcntl
except ImportError:  # POSIX only: on Windows the first use of a new store is not serialised
    fcntl = None

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

# MLflow's own defaults retry an unreachable server 7 times with exponential backoff and a 120 s timeout each:
# minutes lost per call. Users can still set these themselves.
for _name, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_name, _value)

PARENT_TAG = "mlflow.parentRunId"
RUN_FILE = "mlflow_run.json"
SQLITE_PREFIX = "sqlite:///"  # a local store: sqlite:////absolute/path/mlflow.db
MAX_PARAM_LENGTH = 500  # MLflow accepts more on recent servers, 500 on older ones (MONAI issue 7601)


class TrackingUnavailableError(RuntimeError):
    """The tracking store cannot be reached when a run starts."""


def default_tracking_uri(bundle_root: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the bundle's embedded sqlite store ``<bundle_root>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return SQLITE_PREFIX + str(Path(bundle_root).resolve() / "mlruns" / "mlflow.db")


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a local sqlite store, or None for any other store."""
    return Path(tracking_uri[len(SQLITE_PREFIX) :]) if tracking_uri.startswith(SQLITE_PREFIX) else None


def artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store, artifacts go in ``artifacts/`` beside the database; a server decides its own."""
    database = sqlite_database(tracking_uri)
    return (database.parent / "artifacts").resolve().as_uri() if database is not None else None


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client; a new local sqlite store gets its tables from one process at a time.

    MLflow creates a new sqlite database's tables when the first client opens it. Two processes doing that at once
    (``scripts/demo.sh`` trains the baselines beside the multi-task pipeline) both run the migrations and one fails
    ("duplicate column name"). An exclusive lock on a file beside the database lets the first create them while the
    others wait, then find them there.
    """
    from mlflow.tracking import MlflowClient

    database = sqlite_database(tracking_uri)
    if database is None or fcntl is None:
        return MlflowClient(tracking_uri=tracking_uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / f"{database.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return MlflowClient(tracking_uri=tracking_uri)


def check_tracking(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do about it, when the tracking store cannot be used.

    Raises:
        TrackingUnavailableError: an ``http(s)`` server does not answer its ``/health`` endpoint, or a file-based
            URI that MLflow no longer supports.
    """
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status == 200:
                    return
                problem = f"it answered HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            problem = f"{getattr(error, 'reason', error)}"
        raise TrackingUnavailableError(
            f"The MLflow tracking server at {tracking_uri} cannot be reached ({problem}). Start it, point "
            "--tracking_uri (or MLFLOW_TRACKING_URI) at a running one, or train without tracking: "
            "--mlflow_tracking false."
        )
    database = sqlite_database(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise TrackingUnavailableError(
            f"Tracking URI {tracking_uri!r} is a file store, which MLflow 3 no longer supports: use "
            "sqlite:///path/to/mlflow.db or a tracking server's http:// address."
        )


def _param_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        value = float(f"{value:.6g}")
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, each value within the length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=name + "."))
        else:
            flat[name] = _param_text(value)
    return flat


def data_summary_params(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Per-split counts of the prepared data (``summary.json`` written by ``scripts/prepare_data.py``)."""
    path = Path(dataset_dir) / "summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    params: dict[str, Any] = {}
    brats, kaggle = summary.get("brats") or {}, summary.get("kaggle") or {}
    for split, counts in (brats.get("splits") or {}).items():
        params[f"brats.{split}"] = (
            f"{counts.get('patients')} patients, {counts.get('slices')} slices, {counts.get('tumour_slices')} tumour"
        )
    for split, counts in (kaggle.get("splits") or {}).items():
        classes = counts.get("cls") or {}
        params[f"kaggle.{split}"] = (
            f"{counts.get('images')} images, {classes.get('tumour')} tumour, {classes.get('no_tumour')} no tumour"
        )
    return params


def code_version(repository: str | os.PathLike) -> str:
    """The git commit of the code that trains (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=repository, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repository,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def executed_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The configuration this ``python -m monai.bundle run`` process executes: its config files merged, with the
    command line's overrides applied (expressions as written, not evaluated)."""
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    options: dict[str, Any] = {}
    tokens = argv[2:] if len(argv) > 1 and argv[1] == "run" else argv[1:]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            if not _ and index + 1 < len(tokens):
                value = tokens[index + 1]
                index += 1
            options[key] = DefaultParseValue(value)
        index += 1
    parser = ConfigParser()
    parser.read_config(options.pop("config_file", []))
    for name in ("run_id", "init_id", "final_id", "meta_file", "logging_file", "tracking", "args_file"):
        options.pop(name, None)
    parser.update(options)
    return parser.get()


class TrackingClient:
    """An MLflow client whose failures never reach the training: the first failed call is reported and ends logging.

    Args:
        tracking_uri: the store (sqlite URI, database URI or server address).
        experiment_name: the experiment, created on first use (with artifacts beside a local sqlite store).
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.client = mlflow_client(tracking_uri)
        self.error: str | None = None
        self._experiment_id: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``, or None once tracking has failed."""
        if self.failed:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as error:
            self.error = f"{type(error).__name__}: {str(error)[:300]}"
            logger.error("MLflow tracking failed and is off for the rest of this run: %s", self.error)
            return None

    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            self._experiment_id = self.call(self._get_or_create_experiment)
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(
                self.experiment_name, artifact_location=artifact_location(self.tracking_uri)
            )
        except MlflowException:  # another process created it meanwhile
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def start_run(self, run_name: str, tags: Mapping[str, str], parent_run_id: str = "") -> str | None:
        """A new run (never an existing one, so reruns do not merge); returns its id."""
        experiment_id = self.experiment_id()
        if experiment_id is None:
            return None
        tags = {**tags, PARENT_TAG: parent_run_id} if parent_run_id else dict(tags)
        run = self.call(self.client.create_run, experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id if run is not None else None

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        if run_id:
            flat = flatten_params(params)
            items = [Param(key, value) for key, value in flat.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.call(self.client.log_batch, run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        self.log_metric_batch(run_id, items)

    def log_metric_batch(self, run_id: str | None, metrics: Sequence[Any]) -> None:
        if run_id and metrics:
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.call(self.client.log_batch, run_id, metrics=list(metrics[start : start + 1000]))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if run_id and Path(path).exists():
            method = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self.call(method, run_id, str(path), artifact_path)

    def log_dict(self, run_id: str | None, data: Any, artifact_file: str) -> None:
        if run_id:
            self.call(self.client.log_dict, run_id, data, artifact_file)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.call(self.client.set_terminated, run_id, status)

    def report(self, what: str) -> str:
        """One line for the end of a run: where its tracking went, or why it stopped."""
        if self.failed:
            return (
                f"MLflow tracking of {what} FAILED ({self.error}); training went on without it and the run at "
                f"{self.tracking_uri} is incomplete."
            )
        return f"{what} tracked in MLflow: {self.tracking_uri}, experiment {self.experiment_name!r}."


def write_run_file(directory: str | os.PathLike, client: TrackingClient, run_id: str) -> Path:
    """Remember a pipeline run beside its checkpoints, so that evaluation and export log into the same run."""
    path = Path(directory) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"tracking_uri": client.tracking_uri, "experiment_name": client.experiment_name, "run_id": run_id}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(info, indent=1))
    os.replace(temporary, path)
    return path


def read_run_file(directory: str | os.PathLike) -> dict[str, str] | None:
    path = Path(directory) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class PipelineTracking:
    """The parent run of a pipeline run (stage 0); each stage process logs into a child run under it.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: the experiment.
        variant: ``multitask``, ``baseline_seg`` or ``baseline_cls``: baselines are tagged as such.
        run_dir: where the run's id is kept for evaluation and export (the variant's checkpoint folder).
        params: settings shared by the stages (network, data, losses, seed...), nested dicts allowed.
        artifacts: files logged when the pipeline starts (the prepared data's summary, ...).
        code_dir: the repository whose git commit is logged as the code version.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        variant: str,
        run_dir: str,
        params: Mapping[str, Any],
        artifacts: Sequence[str] = (),
        code_dir: str = ".",
    ) -> None:
        self.variant = variant
        self.run_dir = run_dir
        self.params = params
        self.artifacts = artifacts
        self.code_dir = code_dir
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.client: TrackingClient | None = None
        self.run_id: str | None = None

    def start(self, stages: Sequence[int]) -> list[str]:
        """Open the parent run; returns the command-line overrides that put each stage's run under it.

        The store was checked with :func:`check_tracking` by the config's first ``run`` step, before any data.
        """
        self.client = TrackingClient(self.tracking_uri, self.experiment_name)
        run_name = f"{self.variant} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {"variant": self.variant, "baseline": str(self.variant != "multitask").lower(), "kind": "pipeline"}
        self.run_id = self.client.start_run(run_name, tags)
        if self.run_id is None:
            return []
        params = {**self.params, "pipeline": list(stages), "code_version": code_version(self.code_dir)}
        self.client.log_params(self.run_id, params)
        self.client.log_dict(self.run_id, executed_config(), "config/executed_config.json")
        for path in self.artifacts:
            self.client.log_artifact(self.run_id, path, "data")
        write_run_file(self.run_dir, self.client, self.run_id)
        print(f"MLflow run {run_name!r} ({self.run_id}) at {self.tracking_uri}", flush=True)
        return ["--parent_run_id", self.run_id]

    def finish(self, durations: Sequence[float], status: str = "FINISHED", model_path: str = "") -> None:
        """Close the parent run with the pipeline's training time and final model."""
        if self.client is None or self.run_id is None:
            return
        self.client.log_metrics(self.run_id, {"training_time_s": float(sum(durations))})
        if model_path:
            self.client.log_artifact(self.run_id, model_path, "model")
        self.client.end_run(self.run_id, status)
        print(self.client.report(f"Pipeline run {self.run_id}"), flush=True)


def log_evaluation(run_dir: str, eval_dir: str, model_files: Sequence[str] = (), prefix: str = "test_") -> str:
    """Log an evaluation into the run that trained the model: its numeric metrics (``test_*``), report, plots and
    per-patient table, and the model files (checkpoint, and the TorchScript export once it exists).

    Args:
        run_dir: the variant's checkpoint folder, where training left ``mlflow_run.json``.
        eval_dir: the folder ``evaluate.yaml`` wrote (only its files are logged, not sub-folders of other models).
        model_files: model files to log under ``model/`` where they exist.
        prefix: prefix of the metric names, so test figures never mix with validation ones.

    Returns:
        A line for the log: where the evaluation went, or why it was not tracked.
    """
    info = read_run_file(run_dir)
    if info is None:
        return f"Evaluation not tracked: no {RUN_FILE} in {run_dir} (the model was trained without MLflow tracking)."
    client = TrackingClient(info["tracking_uri"], info["experiment_name"])
    run_id = info["run_id"]
    metrics_file = Path(eval_dir) / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        numbers = {prefix + key: value for key, value in metrics.items() if is_finite_number(value)}
        client.log_metrics(run_id, numbers)
    for path in sorted(Path(eval_dir).iterdir()) if Path(eval_dir).is_dir() else []:
        if path.is_file():
            client.log_artifact(run_id, path, "evaluation")
    for path in model_files:
        if path and Path(path).is_file():
            client.log_artifact(run_id, path, "model")
    return client.report(f"Evaluation of run {run_id}")


def is_finite_number(value: Any) -> bool:
    """A real number MLflow can plot: not a bool, NaN (an undefined metric) or infinite."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )
