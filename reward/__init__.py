"""Reward models: Bradley-Terry loss, scoring text with the reward model's own tokenizer, normalisation."""
