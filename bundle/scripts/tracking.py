"""MLflow tracking: a parent run per pipeline run, a child run per stage, evaluation logged into the run it evaluates.

The stage runs are MONAI's ``MLFlowHandler`` (:class:`StageRun`); the parent run is opened by ``scripts/train.py``
around the stages (:class:`PipelineRun`); an evaluation finds the run that trained its model from the model file's
sha256, which that run carries as a tag (:func:`log_evaluation`).

The store is an embedded sqlite database under the bundle (``<bundle_root>/mlruns/mlflow.db``, artifacts beside it,
found there again when the repository is moved or copied: :func:`repoint_moved_store`) unless
``MLFLOW_TRACKING_URI`` or ``--tracking_uri`` names another (a team's ``http://`` tracking server, or a database URI).
Tracking never costs the training: a store that fails mid-run is reported and logging stops, while
training, checkpoints and evaluation carry on. A tracking server that cannot be reached when a run starts stops it
at once, before any data is loaded, unless the run is started with ``--mlflow_tracking false``.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from .errors import UsageError
from .files import file_sha256
from .flags import as_bool

try:
    import fcntl
except ImportError:  # POSIX only: on Windows the first use of a new store is not serialised
    fcntl = None

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from monai.bundle import ConfigParser

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
MODEL_TAG = "model_sha256"  # the sha256 of the model a run produced: evaluation finds the run by it
SQLITE_PREFIX = "sqlite:///"  # a local store: sqlite:////absolute/path/mlflow.db
MAX_PARAM_LENGTH = 500  # MLflow accepts more on recent servers, 500 on older ones (MONAI issue 7601)


class TrackingUnavailableError(UsageError):
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


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock while a local sqlite store is opened: the first opener creates its tables, and a moved
    store is re-pointed at its artifacts (:func:`repoint_moved_store`) before anyone uses it.

    MLflow creates a new sqlite database's tables when the first client opens it. Two processes doing that at once
    (``scripts/demo.sh`` trains the baselines beside the multi-task pipeline) both run the migrations and one fails
    ("duplicate column name"). A lock on a file beside the database lets the first create them while the others
    wait, then find them there.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / f"{database.name}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        repoint_moved_store(tracking_uri)
        yield


# Where MLflow 3's sqlite schema records artifact locations (mlflow/store/{tracking,model_registry}/dbmodels).
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"), ("model_versions", "source"),
)  # fmt: skip


def repoint_moved_store(tracking_uri: str) -> None:
    """Point a local sqlite store that was moved or copied at the ``artifacts/`` folder beside it now.

    MLflow records absolute artifact URIs in the experiment, every run and every logged model, so a moved or copied
    repository would read its old runs' artifacts from, and write new ones into, the old place. The locations under
    the store's own ``artifacts/`` folder at its old place (:func:`_old_store_artifacts`) are rewritten to this
    store's, in every table that records one; any other (a server's, another folder) is left alone. Called under
    :func:`store_lock`, so that concurrent openers do not race.
    """
    database = sqlite_database(tracking_uri)
    if database is None or not database.is_file():
        return
    here = (database.parent / "artifacts").resolve()
    try:
        with closing(sqlite3.connect(database, timeout=60)) as connection, connection:  # one transaction
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables:  # a new database, its tables not made yet
                return
            old_roots = {
                location.rstrip("/") for (location,) in connection.execute("SELECT artifact_location FROM experiments")
                if _old_store_artifacts(connection, (location or "").rstrip("/"), here)
            }  # fmt: skip
            places = [(table, column) for table, column in ARTIFACT_COLUMNS if table in tables]
            for old, (table, column) in itertools.product(old_roots, places):
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} = ? "
                    f"OR substr({column}, 1, ?) = ?",
                    (here.as_uri(), len(old) + 1, old, len(old) + 1, old + "/"),
                )
    except sqlite3.Error as error:  # tracking never costs the training: MLflow reports a store it cannot use
        logger.warning("Could not check the artifact locations of MLflow store %s: %s", database, error)
        return
    if old_roots:
        logger.info("MLflow store %s was moved or copied: artifact locations %s now point to %s", database,
                    sorted(old_roots), here.as_uri())  # fmt: skip


def _old_store_artifacts(connection: sqlite3.Connection, location: str, here: Path) -> bool:
    """Whether an experiment's artifact location is this store's ``artifacts/`` folder at its old place: a local
    folder of that name, not this one, that is gone (the store was moved) or whose runs' folders are beside the
    database now (copied). A folder still there whose runs' artifacts are not here is someone else's."""
    if not location.startswith("file:") or not location.endswith("/artifacts") or location == here.as_uri():
        return False
    if not Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path)).exists():
        return True
    runs = connection.execute(
        "SELECT run_uuid FROM runs WHERE substr(artifact_uri, 1, ?) = ?", (len(location) + 1, location + "/")
    )
    return any((here / run_id).is_dir() for (run_id,) in runs)


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """These environment variables set for the duration of the block, then as they were."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client of the store, opened under :func:`store_lock`."""
    from mlflow.tracking import MlflowClient

    with store_lock(tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri)


def check_tracking(tracking_uri: str, enabled: Any = True, timeout: float = 5.0) -> None:
    """Fail fast, with what to do about it, when the tracking store cannot be used (nothing to check when tracking is
    off: ``enabled`` false, or "false" from the command line).

    Raises:
        TrackingUnavailableError: an ``http(s)`` server does not answer its ``/health`` endpoint, or a file-based
            URI that MLflow no longer supports.
    """
    if not as_bool(enabled, "mlflow_tracking"):
        return
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


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_settings(value, prefix=name + "."))
        else:
            flat[name] = value
    return flat


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested settings as MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, each value within the length limit."""
    return {name: _param_text(value) for name, value in flatten_settings(params).items()}


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


def bundle_parser(args: Sequence[str]) -> ConfigParser:
    """The configuration a ``python -m monai.bundle run <args>`` command executes: its config files merged, with the
    command line's overrides applied (parsed as MONAI's CLI parses them), not yet evaluated."""
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser

    options: dict[str, Any] = {}
    tokens = list(args)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.startswith("--"):
            key, equals, value = token[2:].partition("=")
            if not equals and index + 1 < len(tokens):
                value = tokens[index + 1]
                index += 1
            options[key] = DefaultParseValue(value)
        index += 1
    parser = ConfigParser()
    parser.read_config(options.pop("config_file", []))
    for name in ("run_id", "init_id", "final_id", "meta_file", "logging_file", "tracking", "args_file"):
        options.pop(name, None)
    parser.update(options)
    return parser


def executed_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The configuration this ``python -m monai.bundle run`` process executes (expressions as written)."""
    argv = list(sys.argv if argv is None else argv)
    return bundle_parser(argv[2:] if len(argv) > 1 and argv[1] == "run" else argv[1:]).get()


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

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)``, or None once tracking has failed."""
        if self.error is not None:
            return None
        try:
            return method(*args, **kwargs)
        except Exception as error:
            self.error = f"{type(error).__name__}: {str(error)[:300]}"
            logger.error("MLflow tracking failed and is off for the rest of this run: %s", self.error)
            return None

    def __getattr__(self, name: str) -> Any:
        """Any other method of MLflow's client, made as fault-tolerant as :meth:`call` (MONAI's MLFlowHandler calls
        ``log_batch``, ``set_terminated`` ... on the client it is given)."""
        if "client" not in self.__dict__:  # not set up yet (a copy being made)
            raise AttributeError(name)
        attribute = getattr(self.__dict__["client"], name)
        return functools.partial(self.call, attribute) if callable(attribute) else attribute

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
            items = [Param(key, value) for key, value in flatten_params(params).items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.call(self.client.log_batch, run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items() if is_finite_number(value)]
        self.log_metric_batch(run_id, items)

    def log_metric_batch(self, run_id: str | None, metrics: Sequence[Any]) -> None:
        if run_id and metrics:
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.call(self.client.log_batch, run_id, metrics=list(metrics[start : start + 1000]))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if run_id and path and Path(path).exists():
            method = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            self.call(method, run_id, str(path), artifact_path)

    def log_dict(self, run_id: str | None, data: Any, artifact_file: str) -> None:
        if run_id:
            self.call(self.client.log_dict, run_id, data, artifact_file)

    def set_tag(self, run_id: str | None, key: str, value: str) -> None:
        if run_id:
            self.call(self.client.set_tag, run_id, key, value)

    def log_model(self, run_id: str | None, network: torch.nn.Module, example: torch.Tensor) -> None:
        """The network as an MLflow PyTorch model (the UI's Models column; registrable), with a signature from an
        example input and the bundle's package beside it, so that ``mlflow.pytorch.load_model`` rebuilds it."""
        if run_id:
            self.call(_log_model, self.tracking_uri, run_id, network, example)

    def log_prepared_data(self, run_id: str | None, dataset_dir: str | os.PathLike, context: str = "training") -> None:
        """The prepared data as the run's input (the UI's Dataset column), named by its folder, with its digest."""
        if run_id:
            self.call(_log_prepared_data, self.client, run_id, dataset_dir, context)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self.call(self.client.set_terminated, run_id, status)

    def report(self, what: str) -> str:
        """One line for the end of a run: where its tracking went, or why it stopped."""
        if self.error is not None:
            return (
                f"MLflow tracking of {what} FAILED ({self.error}); training went on without it and the run at "
                f"{self.tracking_uri} is incomplete."
            )
        return f"{what} tracked in MLflow: {self.tracking_uri}, experiment {self.experiment_name!r}."


def _log_model(tracking_uri: str, run_id: str, network: torch.nn.Module, example: torch.Tensor) -> None:
    import mlflow
    from mlflow.models import infer_signature

    network = getattr(network, "module", network).eval()  # DistributedDataParallel wraps the model
    with torch.no_grad():
        outputs = network(example)
    signature = infer_signature(example.numpy(), {name: value.numpy() for name, value in outputs.items()})
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # pickle: the network's forward takes the task flags and the image domain, which a traced graph fixes.
        mlflow.pytorch.log_model(
            network, name="model", signature=signature, serialization_format="pickle",
            code_paths=[str(Path(__file__).parent)], pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )  # fmt: skip


def _log_prepared_data(client: MlflowClient, run_id: str, dataset_dir: str | os.PathLike, context: str) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from .datasets import data_digest

    folder = Path(dataset_dir).resolve()
    with warnings.catch_warnings():  # MLflow registers its local-folder source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(folder.as_uri())
    dataset = MetaDataset(source, name=folder.name, digest=data_digest(folder)[:16])
    tags = [InputTag(key="mlflow.data.context", value=context)]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


class StageRun(MLFlowHandler):
    """MONAI's :class:`~monai.handlers.MLFlowHandler` for one training stage, changed where a staged pipeline needs it.

    MONAI's: the run's state (``cur_run``, ``run_finish_status``), the per-epoch metric logging (``_log_metrics``)
    and the closing of the run (``close``: its status, and the sqlite store released). Changed, and why:

    - the client is this project's :class:`TrackingClient` on the configured store: MONAI's handler prefers
      ``MLFLOW_TRACKING_URI`` over the ``tracking_uri`` it is given, and raises on a store failure, which would stop
      the training; this one reports the failure once and the training goes on;
    - a new run every time, under the pipeline's parent run, opened at the first epoch trained (after a resumed
      state is loaded): MONAI's reuses an unfinished run of the same name, which merges a rerun into an interrupted
      one;
    - per-iteration loss terms and learning rates (by parameter group name) written in batches of ``flush_every``
      iterations (MONAI's writes every iteration: a store round trip per step), per-epoch means, and the
      validator's metrics at the trainer's epoch;
    - at the end the best checkpoint, as a file and as an MLflow model, the prepared data as the run's input, and
      the checkpoint's sha256 as a tag (how an evaluation finds the run of the model it scores).

    Args:
        tracking_uri: the MLflow store.
        experiment_name: the experiment.
        run_name: the stage run's name.
        parent_run_id: the pipeline's parent run ('' for a stage run on its own).
        tags: extra run tags (variant, stage, ...).
        params: the settings to log, nested dicts allowed.
        validator: the evaluator whose metrics are logged per epoch.
        dataset_dir: the prepared data, logged as the run's input.
        best_checkpoint: the stage's best weights, logged at the end.
        network: the trained network: the best weights are loaded into a copy of it for the MLflow model.
        example_shape: the shape of one input slice (channels, height, width), for the model's signature.
        code_dir: the repository whose git commit is logged.
        flush_every: iterations between writes of the per-iteration metrics (fewer store round trips).
        enabled: False (or "false" from the command line): the handler does nothing and opens no store.
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
        dataset_dir: str = "",
        best_checkpoint: str = "",
        network: torch.nn.Module | None = None,
        example_shape: Sequence[int] = (),
        code_dir: str = ".",
        flush_every: int = 20,
        enabled: Any = True,
    ) -> None:
        self.enabled = as_bool(enabled, "mlflow_tracking")
        if not self.enabled:
            return
        # MONAI's handler opens its client on MLFLOW_TRACKING_URI when that is set, whatever tracking_uri it is
        # given: pointed at the configured store while it does, so that it opens no other store.
        with store_lock(tracking_uri), _environment(MLFLOW_TRACKING_URI=tracking_uri):
            super().__init__(tracking_uri=tracking_uri, experiment_name=experiment_name, run_name=run_name)
        self.client = TrackingClient(tracking_uri, experiment_name)  # see the class docstring
        self.parent_run_id = parent_run_id or ""
        self.tags = {key: str(value) for key, value in (tags or {}).items()}
        self.params = dict(params or {})
        self.validator = validator
        self.dataset_dir, self.best_checkpoint = dataset_dir, best_checkpoint
        self.network, self.example_shape = network, tuple(example_shape)
        self.code_dir, self.flush_every = code_dir, flush_every
        self.best_score = -math.inf
        self._trainer: Engine | None = None
        self._pending: list[Any] = []
        self._sums: dict[str, float] = {}
        self._count = 0
        self._started = self._epoch_started = 0.0

    @property
    def run_id(self) -> str | None:
        return self.cur_run.info.run_id if self.cur_run is not None else None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self._trainer = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.validated)

    def start(self, engine: Engine) -> None:
        self._epoch_started = time.perf_counter()
        self._sums, self._count = {}, 0
        if self.cur_run is not None or self.client.error is not None:
            return
        self._started = self._epoch_started
        baseline = str(self.tags.get("variant", "multitask") != "multitask").lower()
        tags = {**self.tags, "kind": "stage", "baseline": baseline, "resumed_from_epoch": str(engine.state.epoch - 1)}
        run_id = self.client.start_run(self.run_name, tags, self.parent_run_id)
        self.cur_run = self.client.get_run(run_id) if run_id else None
        params = {**self.params, "code_version": code_version(self.code_dir), "max_epochs": engine.state.max_epochs}
        if self.dataset_dir:
            params["data_summary"] = data_summary_params(self.dataset_dir)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            params["lr_groups"] = {_group_name(i, g): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        if self.network is not None:
            params["parameters_trainable"] = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
            tasks = self.params.get("stage", {}).get("tasks", ())
            params["parameters_used"] = parameters_used(self.network, tasks)
        self.client.log_params(self.run_id, params)  # in batches of 100, MLflow's limit (MONAI's sends one)
        self.client.log_dict(self.run_id, executed_config(), "config/executed_config.json")
        if self.dataset_dir:
            self.client.log_prepared_data(self.run_id, self.dataset_dir)

    def iteration_completed(self, engine: Engine) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), engine.state.iteration
        # The batch's share of the step's loss, and its unweighted terms (scripts.losses.MultiTaskLoss keeps them).
        output = engine.state.output if isinstance(engine.state.output, Mapping) else {}
        values = {"loss": output.get("loss"), **getattr(getattr(engine, "loss_function", None), "terms", {})}
        for name, value in values.items():
            if value is None:
                continue
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
            self._pending.append(Metric(f"train_{name}", number, now, step))
            self._sums[name] = self._sums.get(name, 0.0) + number
        self._count += 1
        for index, group in enumerate(getattr(engine, "optimizer", None).param_groups):
            self._pending.append(Metric(f"lr_{_group_name(index, group)}", float(group["lr"]), now, step))
        if len(self._pending) >= self.flush_every * 8:
            self._flush()

    def epoch_completed(self, engine: Engine) -> None:
        self._flush()
        means = {f"train_{name}_epoch": total / max(self._count, 1) for name, total in self._sums.items()}
        # The trainer's own metrics: scripts.handlers.GradientConflict's gradient cosine in a joint stage.
        metrics = {**means, **engine.state.metrics, "epoch_time_s": time.perf_counter() - self._epoch_started}
        self._log_finite(metrics, engine.state.epoch)

    def validated(self, validator: Engine) -> None:
        epoch = self._trainer.state.epoch if self._trainer is not None else validator.state.epoch
        self._log_finite(validator.state.metrics, epoch)
        score = validator.state.metrics.get("val_score", math.nan)
        if is_finite_number(score):
            self.best_score = max(self.best_score, float(score))

    def completed(self, engine: Engine) -> None:
        if self.cur_run is None:
            return
        self._flush()
        self._log_finite({"stage_time_s": time.perf_counter() - self._started, "best_val_score": self.best_score})
        if self.dataset_dir:
            self.client.log_artifact(self.run_id, os.path.join(self.dataset_dir, "summary.json"), "data")
        if self.best_checkpoint and Path(self.best_checkpoint).is_file():
            self.client.log_artifact(self.run_id, self.best_checkpoint, "checkpoints")
            self.client.set_tag(self.run_id, MODEL_TAG, file_sha256(self.best_checkpoint))
            if self.network is not None and self.example_shape:
                best_network = copy.deepcopy(getattr(self.network, "module", self.network)).cpu()
                best_network.load_state_dict(torch.load(self.best_checkpoint, map_location="cpu", weights_only=True))
                self.client.log_model(self.run_id, best_network, torch.zeros(1, *self.example_shape))
        self.close()
        print(self.client.report(f"Stage run {self.run_name!r}"), flush=True)

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        # ignite treats a registered EXCEPTION_RAISED handler as handling the error: close the run, then re-raise.
        self._flush()
        self.run_finish_status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.close()
        raise error

    def _log_finite(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """MONAI's ``_log_metrics`` with what MLflow cannot store left out (an undefined AUC is None or NaN)."""
        if self.cur_run is not None:
            self._log_metrics({key: float(v) for key, v in metrics.items() if is_finite_number(v)}, step=step)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self.client.log_metric_batch(self.run_id, pending)


_TASK_COMPONENTS = {"seg": ("encoder", "decoder"), "cls": ("encoder", "cls_head")}


def parameters_used(network: torch.nn.Module, tasks: Sequence[str]) -> int:
    """Parameters of the components a model needs for these tasks (a seg-only model does not count the head)."""
    names = {name for task in tasks for name in _TASK_COMPONENTS[task]}
    module = getattr(network, "module", network)  # DistributedDataParallel wraps the model
    return sum(p.numel() for name in sorted(names) for p in getattr(module, name).parameters())


def _group_name(index: int, group: Mapping[str, Any]) -> str:
    return str(group.get("name", f"group_{index}"))


class PipelineRun:
    """The parent run of a pipeline (``scripts/train.py``); each stage logs into a child run under it.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: the experiment.
        variant: ``multitask``, ``baseline_seg`` or ``baseline_cls``: baselines are tagged as such.
        params: settings shared by the stages (network, data, losses, seed...), nested dicts allowed.
        dataset_dir: the prepared data, logged as the run's input.
        artifacts: files logged when the pipeline starts (the prepared data's summary, ...).
        code_dir: the repository whose git commit is logged as the code version.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        variant: str,
        params: Mapping[str, Any],
        dataset_dir: str = "",
        artifacts: Sequence[str] = (),
        code_dir: str = ".",
    ) -> None:
        self.variant, self.params, self.dataset_dir = variant, params, dataset_dir
        self.artifacts, self.code_dir = artifacts, code_dir
        self.client = TrackingClient(tracking_uri, experiment_name)
        self.run_id: str | None = None

    def start(self, stages: Sequence[int], config: Mapping[str, Any]) -> str:
        """Open the parent run; returns its id ('' when the store failed), which each stage gets as parent_run_id."""
        run_name = f"{self.variant} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {"variant": self.variant, "baseline": str(self.variant != "multitask").lower(), "kind": "pipeline"}
        if self.params.get("fold") is not None:  # a cross-validation fold (train.yaml's fold)
            tags["fold"] = str(self.params["fold"])
        self.run_id = self.client.start_run(run_name, tags)
        if self.run_id is None:
            return ""
        self.client.log_params(
            self.run_id, {**self.params, "pipeline": list(stages), "code_version": code_version(self.code_dir)}
        )
        self.client.log_dict(self.run_id, dict(config), "config/executed_config.json")
        for path in self.artifacts:
            self.client.log_artifact(self.run_id, path, "data")
        if self.dataset_dir:
            self.client.log_prepared_data(self.run_id, self.dataset_dir)
        print(f"MLflow run {run_name!r} ({self.run_id}) at {self.client.tracking_uri}", flush=True)
        return self.run_id

    def finish(
        self,
        durations: Sequence[float],
        status: str = "FINISHED",
        model_path: str = "",
        network: torch.nn.Module | None = None,
        example_shape: Sequence[int] = (),
    ) -> None:
        """Close the parent run with the pipeline's training time and its model (file, MLflow model, sha256 tag)."""
        if self.run_id is None:
            return
        self.client.log_metrics(self.run_id, {"training_time_s": float(sum(durations))})
        if model_path and Path(model_path).is_file():
            self.client.log_artifact(self.run_id, model_path, "model")
            self.client.set_tag(self.run_id, MODEL_TAG, file_sha256(model_path))
            if network is not None and example_shape:
                network.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
                self.client.log_model(self.run_id, network, torch.zeros(1, *example_shape))
        self.client.end_run(self.run_id, status)
        print(self.client.report(f"Pipeline run {self.run_id}"), flush=True)


def find_model_run(tracking_uri: str, experiment_name: str, model_path: str | os.PathLike) -> str | None:
    """The newest pipeline run (or, failing that, stage run) that produced this model file, from its sha256."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or not Path(model_path).is_file():
        return None
    found = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{MODEL_TAG} = '{file_sha256(model_path)}'",
        order_by=["attributes.start_time DESC"], max_results=20,
    )  # fmt: skip
    found.sort(key=lambda run: run.data.tags.get("kind") != "pipeline")  # stable: newest pipeline run first
    return found[0].info.run_id if found else None


def evaluation_folder(split: str) -> str:
    """Where a run keeps the evaluation files of ``split``: ``evaluation/`` for the test split, ``evaluation_<split>/``
    for another, so that a test evaluation never replaces a fold's validation per_patient.csv, which
    scripts/compare_runs.py pools across folds."""
    return "evaluation" if split == "test" else f"evaluation_{split}"


def log_evaluation(
    tracking_uri: str, experiment_name: str, model_path: str, eval_dir: str, model_files: Sequence[str] = (),
    prefix: str = "test_",
) -> str:  # fmt: skip
    """Log an evaluation into the run that trained the model (found from the model file itself): its numeric
    metrics (``<split>_*``), report, plots, per-patient and per-image tables (under ``evaluation/`` for the test
    split, ``evaluation_<split>/`` for another: :func:`evaluation_folder`), and the model files that exist
    (checkpoint, and the TorchScript export).

    Returns:
        A line for the log: where the evaluation went, or why it was not tracked.
    """
    run_id = find_model_run(tracking_uri, experiment_name, model_path)
    if run_id is None:
        return (
            f"Evaluation not tracked: no run in {tracking_uri} (experiment {experiment_name!r}) produced {model_path} "
            "(it was trained without tracking, into another store, or changed since)."
        )
    client = TrackingClient(tracking_uri, experiment_name)
    metrics_file = Path(eval_dir) / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        client.log_metrics(run_id, {prefix + key: value for key, value in metrics.items()})
    folder = evaluation_folder(prefix.rstrip("_"))
    for path in sorted(Path(eval_dir).iterdir()) if Path(eval_dir).is_dir() else []:
        if path.is_file():
            client.log_artifact(run_id, path, folder)
    for path in model_files:
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
