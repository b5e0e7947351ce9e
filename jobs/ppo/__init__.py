"""Phase 3's driver: PPO with the four roles as Ray actors. The driver holds ObjectRefs and
scalar statistics only.

  run.py         run_ppo: the phase from its newest checkpoint to the exported policy,
                 rebuilding every role if the learner dies; SIGTERM stops after a checkpoint
  loop.py        PPOLoop: one iteration's five stages, step after step
  recorder.py    what is done with a finished step: metrics, trackers, dashboard, console
  checkpoint.py  the state to continue exactly, written and read back
  roles.py       the four roles as named actors, with their resources and restarts
  pending.py     a batch while it is sampled, shard by shard
  rollout_queue.py  the batches asked for and not yet trained on: asked for, waited for,
                 kept ahead of the learner with overlap, the one a step trains on chosen
  scaling.py     generators joining and leaving between batches (`rlhf-ray scale`, auto scaling)
  waiting.py     every wait on Ray: a deadline, a capacity watch, errors naming the role
  dashboard.py   the step's metrics as Ray dashboard gauges
"""
