"""Triton kernels (SageSLA attention, quantised linears) with PyTorch reference paths."""
