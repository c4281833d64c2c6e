"""Data: the synthetic VQA set and loaders for user images."""
