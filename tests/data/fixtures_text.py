"""Shared test helpers: a deterministic text corpus and a locally trained tokenizer.json."""

from __future__ import annotations

import random
from pathlib import Path

from omni_jax.data.tokenizer import DEFAULT_SPECIAL_TOKENS

# Qwen2-Instruct's chat template (tokenizer_config.json "chat_template").
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split pattern (tokenizer.json).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_WORDS = ("the a an model token image audio video frame speech text answer question user "
          "assistant system encoder decoder layer attention vector matrix batch sequence "
          "train loss gradient step learning rate weight bias embed project pool sample "
          "what is how many does show describe listen watch tell me about this that please "
          "yes no color red blue green cat dog bird sound music voice house tree river").split()
_UNICODE = ("café", "naïve", "straße", "über", "日本語", "中文", "привет", "γειά", "😀")


def corpus(n_lines: int = 120, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences (~8 KB) with punctuation, digits and a little unicode."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_UNICODE))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 2025)))
        s = " ".join(words)
        lines.append(s[0].upper() + s[1:] + rng.choice(".?!"))
    return lines


def build_hf_tokenizer_json(out_dir: Path, specials: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS,
                            vocab_size: int = 400) -> Path:
    """Train a small Qwen2-style byte-level BPE with `specials`; write out_dir/tokenizer.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFBackend

    tok = HFBackend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path
