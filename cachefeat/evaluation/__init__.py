"""Evaluation: resolutions of the head's predictions, the classical helix-fit baseline, plots."""
