"""Training: the shared loop (`loop`: accelerator, setup, step, epochs, validation, logging, checkpoints),
the batch sources (`sources`), and the recipes over them: phase-2 head training (`train`), sweeps of K
heads in one pass (`sweep`) and stage-1 pretraining, with the joint baseline (`pretrain`)."""
