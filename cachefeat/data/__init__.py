"""Input data: a detector simulation (`simulate`, `presets`) and ragged HDF5 event files read
as padded batches (`events`)."""
