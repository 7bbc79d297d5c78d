"""Tests against a real daemon and real kernels."""
