"""What a run keeps and reports: phase folders, checkpoints, metrics, resources, evaluation."""
