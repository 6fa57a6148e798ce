"""Speech out: OpenOmni-style speech-unit generator, unit tokenizer, vocoder."""
