"""Everything specific to reward models, outside any stage: how a (prompt, response) is encoded with the reward
model's own tokenizer (text.py), preference pairs as training rows (pairs.py), held-out evaluation,
calibration and normalisation statistics (evaluation.py), and scoring any text, normalised (scoring.py).
The Bradley-Terry loss itself is TRL's RewardTrainer (pipeline/stages/reward.py trains with it)."""
