"""Experiments that reproduce results of the training methods (one module each)."""
