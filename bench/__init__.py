"""bench: an honest benchmark for Bayesian deep learning methods."""

__version__ = "0.1.0"
