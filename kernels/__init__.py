"""mome's Triton kernels and their launchers, installed as ``mome.kernels``.

One module per op family. Each module holds ``@triton.jit`` kernels, launchers that
follow their op family's backend contract (contiguous tensors in, tensors out),
and ``AOT_SPECS``: example signatures that ``mome.kernels.aot`` compiles ahead of
time for sm_80 and sm_90 without a GPU.
"""
