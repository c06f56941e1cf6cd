"""Operators of the brain-tumour MONAI Deploy application: load, infer (both outputs), write."""

from .input_loader import InputLoaderOperator
from .multitask_inference import MultiTaskInferenceOperator
from .prediction_writer import PredictionWriterOperator

__all__ = ["InputLoaderOperator", "MultiTaskInferenceOperator", "PredictionWriterOperator"]
