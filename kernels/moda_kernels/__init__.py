"""moda_kernels: Triton kernels for MoDA and their PyTorch references (no Lightning, no models)."""
