"""cachefeat: run a frozen tracking backbone once, train its regression head over the cache.

Pipeline (one subpackage per stage):
    data        simulated detector events in ragged HDF5, padded batches
    model       the stage-1 MaskFormer (frozen in phases 1-2), matcher, tracking metrics
    head        the regression head: its inputs (CSR) and its formula (dense and sparse)
    cache       the Zarr v3 cache: schema, writer, reader, fingerprint, extraction
    training    stage-1 pretraining (and joint baseline), phase-2 head training
    evaluation  predictions, resolutions, classical helix fit, plots
    cli         the `cachefeat` command
"""

__version__ = "0.1.0"
