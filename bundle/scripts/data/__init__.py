"""Data preparation: BraTS volumes and slices, Kaggle images, duplicates and splits."""
