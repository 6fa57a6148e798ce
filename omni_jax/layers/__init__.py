"""Shared building blocks: norms, rotary embeddings, attention, MLPs."""
