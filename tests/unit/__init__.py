"""Unit tests, one folder per package (``schemas``, ``kernels``, ``streams.*``)."""
