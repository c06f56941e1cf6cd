"""Inference on NIfTI volumes and 2D images with the trained (or exported) multi-task U-Net.

Modules, each with one job; only ``workflow`` imports MONAI, so the MONAI Deploy application (``deploy/``) reuses
the others in its own environment and its masks match the bundle's by construction:

- ``settings``: what preprocessing needs to know (image size, channels, slice selection, batch size).
- ``inputs``: find and check the inputs of a folder (BraTS / MSD case folders, plain NIfTI volumes, PNG / JPEG).
- ``predict``: the training preprocessing, the network run in slice batches, and the masks and probabilities.
- ``outputs``: mask NIfTI / PNG and JSON written through a staging folder (all outputs or none).
- ``model``: loading ``model.pt`` or ``model.ts`` and the settings embedded in ``model.ts``.
- ``workflow``: the MONAI pieces that ``configs/inference.yaml`` wires into an evaluator.
"""
