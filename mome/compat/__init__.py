"""Converters from other codebases (torchscale BEiT-3, open_clip losses) to mome modules."""
