"""Adapters: vision features -> LLM embeddings (MLP projector with optional 2x2 bilinear
reduction, Ola's LGAP projector and layout vectors, Ovis' visual tokenizer + VTE), X-VILA's
visual embedding highway, and the speech projector; `registry.build_adapter` builds them by name."""
