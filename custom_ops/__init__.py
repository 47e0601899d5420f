"""Fused GroupNorm + Proxy Norm + activation: the CPU op (PyTorch C++) and the IPU op (PopART/Poplar)."""
