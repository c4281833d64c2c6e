"""Training the learned pruner: schedules, losses, and the trainer."""
