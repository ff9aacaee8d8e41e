"""Cost of an architecture: FLOPs, parameters, size and latency on real backends."""
