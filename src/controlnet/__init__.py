"""ControlNet for Stable Diffusion (Zhang, Rao, Agrawala 2023, arXiv 2302.05543)."""

__version__ = "0.1.0"
