"""RLHF: a reward model from preference pairs (Bradley-Terry) and online RL against it (RLOO)."""
