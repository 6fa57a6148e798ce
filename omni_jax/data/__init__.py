"""Data: tokenizer, chat template, media features, sources and the grain pipeline."""
