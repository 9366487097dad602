"""The regression head: its inputs (`inputs.HeadBatch`), its formula (`regression`), building it from a
config and its checkpoints (`checkpoint`), and the resolutions of its predictions (`metrics`)."""
