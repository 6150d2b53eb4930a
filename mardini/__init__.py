"""mardini: MarDini-style video generation (masked auto-regressive planning + diffusion)."""

__version__ = "0.1.0"
