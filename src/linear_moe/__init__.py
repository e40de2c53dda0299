"""Linear-MoE: Mixture-of-Experts language models with linear sequence modeling token mixers."""

__version__ = "0.1.0"
