"""Inference: KV-cache generation with greedy / temperature / top-k / top-p sampling."""
