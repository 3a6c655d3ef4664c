"""Triton kernels and their launchers. Import `launch` for the backend entry points."""
