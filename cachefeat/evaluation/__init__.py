"""Evaluation: a trained head's predictions per query (`predict`), the classical helix-fit baseline
(`trackfit`), plots; the resolutions themselves are `cachefeat.head.metrics`."""
