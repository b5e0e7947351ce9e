"""Phases 1 and 2 on Ray Train: supervised fine-tuning and the reward model."""
