"""Pixels: opening, listing and decoding image files (local or ``s3://``), a model's deterministic
preprocessing and its train/eval transforms, image QC, the white-cell finder, whole slides, drawing."""
