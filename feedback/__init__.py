"""Preference data and where it comes from: the canonical row (schema.py), what a file holds (files.py), the
row formats users have (readers.py), whole-file validation (validate.py) and statistics (stats.py); AI judges
(judges/: rule, local model, OpenAI-compatible HTTP, reward model) and RLAIF labelling (label.py,
agree.py). Importing `feedback` does not import torch."""
