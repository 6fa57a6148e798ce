"""Modality encoders: SigLIP-style vision (encoders.vision) and Whisper-style audio."""
