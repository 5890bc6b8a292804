"""mome: fused kernels and drop-in modules for Mixture-of-Modality-Experts vision-language transformers."""

from mome import ops

__version__ = "0.1.0"

__all__ = ["__version__", "ops"]
