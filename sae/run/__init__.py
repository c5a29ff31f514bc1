"""Run plumbing shared by the entry points (train.py, evaluate.py, python -m sae.cache)."""
