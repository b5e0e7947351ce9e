"""Keeping an update near its rollouts and the policy near the reference, pure arithmetic.

[SB3]   Stable-Baselines3 PPO `target_kl`: stop the update's epochs once a minibatch's
        approx-KL to the rollout's policy passes it (SB3 stops at 1.5 x target_kl; here the
        setting is the threshold itself), https://github.com/DLR-RM/stable-baselines3
[lm-hp] Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", 2.2: the
        adaptive KL coefficient, `AdaptiveKLController` in openai/lm-human-preferences.
"""

from __future__ import annotations


def stops_update(approxkl: float, target_kl: float) -> bool:
    """Whether a minibatch whose approx-KL (measured before its step) is `approxkl` ends the
    update without its step [SB3]: it passed `target_kl`; 0 turns the early stop off."""
    return target_kl > 0 and approxkl > target_kl


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, rollouts: int) -> float:
    """The next step's KL coefficient [lm-hp]: coef * (1 + e * rollouts / horizon), with the
    proportional error e = clip(kl / target - 1, -0.2, 0.2); `kl` the step's KL (objective/kl),
    `rollouts` the responses the step sampled."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * rollouts / horizon)
