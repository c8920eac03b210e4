"""Pure-PyTorch reference kernels: the oracle every backend is tested against."""
