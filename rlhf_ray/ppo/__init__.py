"""Phase 3, PPO, Ray-free: the arithmetic, the messages between roles, and each role's work."""
