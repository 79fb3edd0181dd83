"""Supervised fine-tuning: config, prompt template, dataset, training and evaluation."""
