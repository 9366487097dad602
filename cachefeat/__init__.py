"""cachefeat: run a frozen tracking backbone once, train its regression head over the cache.

Pipeline (one subpackage per stage), each importing only itself and the layers above it here
(`LAYERS`; tests/test_layering.py reads every import and holds the package to it):
    config, errors   YAML configs and the rules of every setting; the error a user can fix
    data        simulated detector events in ragged HDF5, a hepattn data module's split, padded batches
    model       the stage-1 MaskFormer (frozen in phases 1-2), matcher, tracking metrics, hepattn's model
    head        the regression head: its inputs (CSR), its formula (dense and sparse), its metrics
    cache       the Zarr v3 cache: schema, writer, reader, fingerprint, extraction, verification
    training    stage-1 pretraining (and joint baseline), phase-2 head training: one loop
    evaluation  predictions, resolutions, classical helix fit, plots
    cli         the `cachefeat` command
"""

__version__ = "0.1.0"

LAYERS = (("config", "errors"), ("data",), ("model",), ("head",), ("cache",), ("training",), ("evaluation",),
          ("cli",))
