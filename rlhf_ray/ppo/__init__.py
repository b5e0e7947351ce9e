"""Phase 3, PPO, Ray-free: masked statistics, rewards, estimators and losses, the targets of an
iteration, the messages between roles, and each role's work."""
