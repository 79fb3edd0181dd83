"""Evaluation across stages: base vs SFT vs DPO (vs RLOO), reading each stage's saved run."""
