"""Write each prediction's mask (NIfTI with the input's affine, or PNG) and JSON; publish them all at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from scripts.inference.outputs import OutputStaging, write_prediction


class PredictionWriterOperator(Operator):
    """Stage every prediction and move the files into the output folder once all ``expected`` have arrived.

    Named input:
        prediction: a ``Prediction`` from ``MultiTaskInferenceOperator``.

    Args:
        fragment: The application.
        output_dir: The output folder.
        expected: How many predictions the run makes.
    """

    def __init__(self, fragment: Fragment, *args, output_dir: Path, expected: int, **kwargs) -> None:
        self.output_dir = Path(output_dir)
        self.expected = expected
        self.received = 0
        self.staging: OutputStaging | None = None
        self.written: list[Path] = []
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("prediction")

    def compute(self, op_input, op_output, context) -> None:
        prediction = op_input.receive("prediction")
        if self.staging is None:
            self.staging = OutputStaging(self.output_dir)
        names = write_prediction(prediction, self.staging)
        self.received += 1
        self.logger.info(f"staged {', '.join(names)} ({self.received}/{self.expected})")
        if self.received == self.expected:
            self.written = self.staging.commit()
            self.staging = None
            self.logger.info(f"wrote {len(self.written)} files to {self.output_dir}")

    def abort(self) -> None:
        """Drop what was staged (the run failed)."""
        if self.staging is not None:
            self.staging.abort()
            self.staging = None
