"""layerscan: find which layers of a diffusion model must stay in BF16 when the rest runs in FP8."""

__version__ = "0.1.0"
