"""Preference alignment (DPO) after SFT: pairs, training on TRL's DPOTrainer, preference metrics."""
