"""Training: stage-1 pretraining (and the joint baseline), phase-2 head training, Accelerate plumbing."""
