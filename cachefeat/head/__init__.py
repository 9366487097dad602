"""The regression head: its inputs (`inputs.HeadBatch`) and its formula (`regression`)."""
