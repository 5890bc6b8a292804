"""Python side of the CUDA extension mome._C: loading, status, and the ops it implements."""
