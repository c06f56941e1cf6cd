"""Read one input per call with nibabel (volumes keep their affine and header) and preprocess it as in training."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from monai.deploy.core import Fragment, Operator, OperatorSpec

from scripts.inference.inputs import InferenceInput
from scripts.inference.predict import prepare
from scripts.inference.settings import InferenceSettings


class InputLoaderOperator(Operator):
    """Emit the prepared network input of the next input on each call.

    The stock ``NiftiDataLoader`` drops the affine; this one reads volumes with the bundle's nibabel-based loader
    (:func:`scripts.data.volumes.load_case`), which keeps the file's affine and orientation, so that the mask goes
    back onto the input's grid. Give it a ``CountCondition`` of ``len(inputs)``.

    Named output:
        prepared: a ``PreparedVolume`` or ``PreparedImage`` (see ``scripts.inference.predict``).

    Args:
        fragment: The application.
        inputs: The checked inputs (``scripts.inference.inputs.find_inputs``).
        settings: The preprocessing settings embedded in the model.
    """

    def __init__(
        self, fragment: Fragment, *args, inputs: Sequence[InferenceInput], settings: InferenceSettings, **kwargs
    ) -> None:
        self.inputs = list(inputs)
        self.settings = settings
        self.next_index = 0
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        # The SDK's operators call the base constructor last: it calls setup().
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("prepared")

    def compute(self, op_input, op_output, context) -> None:
        item = self.inputs[self.next_index]
        self.next_index += 1
        self.logger.info(f"reading {item.kind} {item.source}")
        op_output.emit(prepare(item, self.settings), "prepared")
