"""How far to trust one prediction: the checks a row gets (calibration, OOD, QC ranges) and its
review decision, as stored in the model card; NumPy and SciPy only (the scoring driver imports it)."""
