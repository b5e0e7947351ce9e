"""The Ray actors of PPO, one role per file; each is a thin wrapper over rlhf_ray/."""
