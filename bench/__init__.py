"""Benchmarks: stylekit side by side with a textbook reference loop (`make bench`)."""
