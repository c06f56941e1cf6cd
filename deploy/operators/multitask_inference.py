"""Run the exported multi-task model and keep both of its outputs: the mask and the tumour probabilities."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec

from scripts.inference.model import embedded_metadata, load_torchscript
from scripts.inference.predict import Prediction, PreparedImage, PreparedVolume, finish, run_network
from scripts.inference.settings import InferenceSettings


class MultiTaskInferenceOperator(Operator):
    """Segment and classify one prepared input with ``model.ts``.

    The SDK's ``MonaiBundleInferenceOperator`` post-processes only the first output of a network (a dict output
    breaks it); this operator runs the slices in batches, thresholds the segmentation logits (sigmoid > 0.5) back
    on the input's grid and turns the classification logits into per-slice and per-volume tumour probabilities,
    with the same code as the bundle's inference config, fast path included (``fast_inference`` of the configs
    embedded in ``model.ts``; on when they do not set it).

    It has the SDK's ``InferenceOperator`` methods (``pre_process``, ``predict``, ``post_process``) but derives from
    ``Operator``: importing ``monai.deploy.operators`` imports every stock operator, and with them pydicom and
    highdicom, which this application does not otherwise need.

    Named input:
        prepared: a ``PreparedVolume`` or ``PreparedImage``.

    Named output:
        prediction: a ``Prediction`` (mask on the input's grid and the JSON report).

    Args:
        fragment: The application.
        model_file: The TorchScript file exported by ``monai.bundle ckpt_export``.
        settings: The settings embedded in it (``scripts.inference.model.settings_from_model``).
    """

    def __init__(self, fragment: Fragment, *args, model_file: Path, settings: InferenceSettings, **kwargs) -> None:
        self.model_file = Path(model_file)
        self.settings = settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network: torch.jit.ScriptModule | None = None
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("prepared")
        spec.output("prediction")

    def start(self) -> None:
        self.network = load_torchscript(self.model_file, self.device, self.settings)
        metadata = embedded_metadata(self.model_file) or {}
        self.logger.info(
            f"loaded {self.model_file} ({metadata.get('name', 'no metadata')} {metadata.get('version', '')}) on "
            f"{self.device}; slices of {self.settings.image_size} px, channels {list(self.settings.modalities)}, "
            f"fast inference {'on' if self.settings.fast_inference else 'off'}, "
            f"int8 {'on' if self.settings.fast_inference and self.settings.int8_inference else 'off'}"
        )

    def compute(self, op_input, op_output, context) -> None:
        prepared = op_input.receive("prepared")
        image = self.pre_process(prepared)
        outputs = self.predict(image, domain=prepared.domain, fast=prepared.fast, int8=prepared.int8)
        op_output.emit(self.post_process(outputs, prepared), "prediction")

    def pre_process(self, data: PreparedVolume | PreparedImage, *args, **kwargs) -> torch.Tensor:
        """The ``(K, C, S, S)`` slice stack of a prepared input."""
        return torch.from_numpy(data.image)

    def predict(
        self, data: torch.Tensor, *args, domain: int = 0, fast: bool = False, int8: bool = False, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Both outputs of the network, ``slice_batch_size`` slices per call, for the input's image domain, the
        segmentation decoded on the brain box only (and in int8 on a CPU) where the input asks for it
        (``PreparedVolume.fast`` and ``int8``)."""
        return run_network(self.network, data, self.settings.slice_batch_size, domain, fast, int8)

    def post_process(
        self, data: dict[str, torch.Tensor], prepared: PreparedVolume | PreparedImage, *args, **kwargs
    ) -> Prediction:
        """Mask on the input's grid and the probabilities report."""
        prediction = finish(prepared, data, self.settings)
        summary = prediction.report.get("volume", prediction.report)
        self.logger.info(f"{prepared.item.name}: {summary['predicted_label']}")
        return prediction
