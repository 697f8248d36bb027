"""Our PPO: pure functions first (functional.py), then the loop (ppo.py)."""
