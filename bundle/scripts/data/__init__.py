"""Data preparation: BraTS volumes and slices, Kaggle images, duplicates and splits.

Why not MONAI's readers alone: the MONAI Deploy app runs this package without MONAI core
(``deploy/requirements.txt``), so preparation, inference and Deploy share one preprocessing path.
"""

# What scripts/prepare_data.py was asked for (slice size, modalities, ...), in every prepared folder.
OPTIONS_FILE = "prepare_options.json"
# The top-level presets and the slice size each builds its network for (prepare_data.py --size).
PRESET_SIZES = {64: "configs/demo.yaml", 256: "configs/full.yaml"}
