"""Judging a model: classification metrics with bootstrap CIs and calibration, evaluating an
artifact on labelled images, and the HTML report."""
