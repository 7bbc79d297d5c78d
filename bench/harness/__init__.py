"""Benchmark harness: drivers for raw ZeroMQ, kallichore-trio and Jupyter Server, and workloads."""
