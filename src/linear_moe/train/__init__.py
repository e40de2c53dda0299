"""Training: trainer, optimizer and schedules, DCP checkpoints, metrics/logging, plots."""
