"""The stage-1 model: hepattn-style MaskFormer (`maskformer`), its building blocks (`layers`),
tasks (`tasks`), Hungarian matcher (`matcher`), tracking metrics (`metrics`) and checkpoints
(`checkpoint`)."""
