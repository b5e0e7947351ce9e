"""rlhf-ray: supervised fine-tuning, a reward model and PPO as a Ray actor system."""
