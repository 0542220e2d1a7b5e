"""Kernels that XLA does not provide well enough on some backend: oneDNN convolutions for the CPU."""
