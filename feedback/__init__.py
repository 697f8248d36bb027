"""Preference data and where it comes from: the canonical schema, readers for human files,
validation, and (later) AI judges. Importing `feedback` does not import torch."""
