"""MoME transformers (VLMo, BEiT-3) and their configs."""
