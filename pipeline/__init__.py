"""rlhf pipeline: orchestration of the stages (SFT, preferences, reward, policy optimisation).

Importing this package is cheap: torch, transformers and TRL are imported only by the
modules that train or load models.
"""

__version__ = "0.1.0"
