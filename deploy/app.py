"""MONAI Deploy application: whole-tumour mask and tumour probabilities for brain MRI volumes (and 2D images).

Run locally, without containers, in the application's own environment (``deploy/setup_venv.sh``)::

    .venv-deploy/bin/python deploy/app.py -i INPUT -o OUTPUT -m bundle/models/model.ts

INPUT is a NIfTI volume, a 2D image or a folder of them (BraTS / MSD case folders too); OUTPUT receives, per
volume, ``<name>_pred_wt.nii.gz`` (uint8 0/1 with the input's shape, affine and header) and ``<name>_pred.json``
(tumour probability and class per slice and for the volume, tumour volume in ml), per image ``<name>_pred_wt.png``
and ``<name>_pred.json``; OUTPUT must lie outside INPUT's tree. The environment variables HOLOSCAN_INPUT_PATH,
HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH replace the options, as in a packaged MAP. Every input is checked
before the first prediction, and outputs appear all together or not at all.

The preprocessing and post-processing are the bundle's own (``bundle/scripts/inference`` and
``bundle/scripts/data``), imported from the bundle rather than copied, so that this application's masks equal
those of ``python -m monai.bundle run --config_file bundle/configs/inference.yaml``. The bundle root is found at,
in order: $BRAIN_TUMOUR_BUNDLE, ``<this folder>/bundle`` (the copy ``deploy/package.sh`` puts into the MAP), and
``<this folder>/../bundle`` (the repository). Only that package is needed, not the training code: the network
comes from ``model.ts``, with its preprocessing settings embedded at export.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
_PACKAGE_MARKER = Path("scripts") / "inference" / "predict.py"


def find_bundle_root() -> Path:
    """The folder that holds the bundle's ``scripts`` package (see the module docstring for the search order)."""
    configured = os.environ.get("BRAIN_TUMOUR_BUNDLE")
    candidates = [Path(configured)] if configured else [APP_DIR / "bundle", APP_DIR.parent / "bundle"]
    for candidate in candidates:
        if (candidate / _PACKAGE_MARKER).is_file():
            return candidate.resolve()
    searched = ", ".join(str(c) for c in candidates)
    raise SystemExit(f"the bundle's scripts package was not found (looked in {searched}); set BRAIN_TUMOUR_BUNDLE")


sys.path.insert(0, str(find_bundle_root()))
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from holoscan.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402
from operators import InputLoaderOperator, MultiTaskInferenceOperator, PredictionWriterOperator  # noqa: E402

from scripts.inference.inputs import find_inputs  # noqa: E402
from scripts.inference.model import resolve_model_file, settings_from_model  # noqa: E402


class BrainTumourApp(Application):
    """Load (nibabel, affine kept) -> multi-task inference (mask and probabilities) -> write (NIfTI / PNG + JSON)."""

    name = "brain-tumour-multitask"
    description = "Whole-tumour segmentation and tumour / no-tumour classification of brain MRI"
    version = "0.6.2"

    def __init__(self, *args, **kwargs) -> None:
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        self.writer: PredictionWriterOperator | None = None
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        model_file = resolve_model_file(context.model_path)
        settings = settings_from_model(model_file)
        # Every input is checked before the graph starts: a bad one stops the run before anything is written.
        inputs = find_inputs(context.input_path, settings, context.output_path)
        self.logger.info(f"{len(inputs)} input(s) from {context.input_path}; model {model_file}")
        loader = InputLoaderOperator(
            self, CountCondition(self, len(inputs)), inputs=inputs, settings=settings, name="loader"
        )
        inference = MultiTaskInferenceOperator(self, model_file=model_file, settings=settings, name="inference")
        self.writer = PredictionWriterOperator(
            self, output_dir=Path(context.output_path), expected=len(inputs), name="writer"
        )
        self.add_flow(loader, inference, {("prepared", "prepared")})
        self.add_flow(inference, self.writer, {("prediction", "prediction")})


def main() -> int:
    """Run the application; a failure leaves no outputs and exits with status 1."""
    app = BrainTumourApp()
    try:
        app.run()
    except Exception as error:
        if app.writer is not None:
            app.writer.abort()
        logging.getLogger(__name__).error(f"the application failed, nothing was written: {error}")
        return 1
    if app.writer is None or app.writer.received != app.writer.expected:
        # Holoscan may log an operator's exception and stop the graph without raising it here.
        if app.writer is not None:
            app.writer.abort()
        logging.getLogger(__name__).error("the application stopped before every input was written; nothing was written")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
