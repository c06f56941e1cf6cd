"""The MONAI pieces of ``configs/inference.yaml``: dataset items, preprocessing, slice-batch inferer, writer.

The evaluator runs one input per iteration: its "batch" is the stack of the input's slices (one image for a 2D
input), which :class:`SliceBatchInferer` sends through the network a few slices at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from monai.transforms import Transform

from .inputs import find_inputs
from .outputs import OutputStaging, write_prediction
from .predict import finish, prepare, run_network
from .settings import InferenceSettings

__all__ = ["PredictionWriter", "PrepareInputd", "SliceBatchInferer", "first_item", "input_datalist"]

logger = logging.getLogger(__name__)


def input_datalist(root: str, settings: InferenceSettings, output_dir: str | None = None) -> list[dict[str, Any]]:
    """The dataset items of a run, ``{"input": InferenceInput}``, all checked (see :func:`find_inputs`)."""
    return [{"input": item} for item in find_inputs(root, settings, output_dir)]


class PrepareInputd(Transform):
    """Read one input and preprocess it as training did: ``{"image": (K, C, S, S) tensor, "prepared": ...}``, plus
    the input's ``domain`` and ``fast``, which the evaluator passes on to :class:`SliceBatchInferer`.

    Args:
        settings: The run's settings.
    """

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        prepared = prepare(data["input"], self.settings)
        return {
            "image": torch.from_numpy(prepared.image),
            "prepared": prepared,
            "domain": prepared.domain,
            "fast": prepared.fast,
            "int8": prepared.int8,
        }


def first_item(items: list[Any]) -> Any:
    """Collate for one input per iteration: inputs differ in slice count and keep non-tensor metadata."""
    return items[0]


class SliceBatchInferer(Inferer):
    """Run the multi-task network over a stack of slices, ``batch_size`` slices per call.

    MONAI's SliceInferer stitches spatial outputs only; the classification logits of each slice are not spatial.

    Args:
        batch_size: Slices per network call.
    """

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = int(batch_size)

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any,
        *args: Any,
        domain: int = 0,
        fast: bool = False,
        int8: bool = False,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        return run_network(network, inputs, self.batch_size, domain, fast, int8)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception: MONAI wraps errors raised in transforms in "applying transform" RuntimeErrors."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class PredictionWriter:
    """Write each input's mask and JSON, and publish them only when every input succeeded.

    Args:
        output_dir: The output folder.
        settings: The run's settings.
    """

    def __init__(self, output_dir: str, settings: InferenceSettings) -> None:
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.staging: OutputStaging | None = None
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.commit)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.abort)

    def start(self, engine: Engine) -> None:
        self.staging = OutputStaging(self.output_dir)

    def write(self, engine: Engine) -> None:
        prepared = engine.state.batch["prepared"]
        prediction = finish(prepared, engine.state.output["pred"], self.settings)
        names = write_prediction(prediction, self.staging)
        volume = prediction.report.get("volume", prediction.report)
        logger.info(
            f"{prepared.item.name}: {volume['predicted_label']} (probability "
            f"{volume.get('max_tumour_probability', volume.get('tumour_probability')):.3f}); staged {', '.join(names)}"
        )

    def commit(self, engine: Engine) -> None:
        self.written = self.staging.commit()
        logger.info(f"wrote {len(self.written)} files to {self.output_dir}")

    def abort(self, engine: Engine, error: Exception) -> None:
        if self.staging is not None:
            self.staging.abort()
        logger.error(f"inference stopped, nothing written to {self.output_dir}: {_root_cause(error)}")
        # Ignite re-raises only when no handler is registered for EXCEPTION_RAISED.
        raise error
