"""Text tokenizers (SentencePiece or Hugging Face tokenizer.json) with ChatML special tokens.

Both backends expose the same `Tokenizer` API: encode/decode, vocab_size, and the ids of
the special tokens the chat template and the model need (ChatML markers, <|endoftext|>,
pad/eos/bos, and one placeholder token per media modality). Special tokens are always
single ids and are matched before any sub-word splitting, so normal text never yields them.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omni_jax.config_base import StrictConfig
from omni_jax.utils import fs

TOKENIZER_KINDS = ("sentencepiece", "hf")
MODALITIES = ("image", "video", "audio")  # modality ids 1, 2, 3 (0 is text)
# Tokens that appear inside rendered chat text: each must encode to exactly its own id.
TEXT_SPECIALS = ("im_start", "im_end", "endoftext", *MODALITIES, "gen_image")
# Tokens only used by id (may be control symbols that never appear in text).
ID_SPECIALS = ("pad", "eos", "bos")
SPECIAL_NAMES = TEXT_SPECIALS + ID_SPECIALS
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                          "<image>", "<video>", "<audio>")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(StrictConfig):
    """Which tokenizer file to load and which token strings play each special role.

    Defaults follow Qwen2-Instruct (pad=<|endoftext|>, eos=<|im_end|>, no bos). Placeholder
    strings are configurable (e.g. Qwen2-VL's "<|image_pad|>"); None disables a modality.
    """

    path: str
    kind: str = "sentencepiece"  # "sentencepiece" (.model file) | "hf" (tokenizer.json)
    im_start_token: str = "<|im_start|>"
    im_end_token: str = "<|im_end|>"
    endoftext_token: str = "<|endoftext|>"
    pad_token: str = "<|endoftext|>"
    eos_token: str = "<|im_end|>"
    bos_token: str | None = None
    image_token: str | None = "<image>"
    video_token: str | None = "<video>"
    audio_token: str | None = "<audio>"
    # X-VILA: the token the LLM emits (K times, data.template) where an image is to be
    # generated; None (default) = no image output, existing vocabularies unchanged
    gen_image_token: str | None = None
    add_missing_tokens: bool = False  # hf only: append missing specials to the vocabulary

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(f"TokenizerConfig: unknown kind {self.kind!r}; "
                             f"expected one of {TOKENIZER_KINDS}")
        if not isinstance(self.path, str | os.PathLike) or not str(self.path):
            raise ValueError(f"TokenizerConfig: path must be a non-empty path, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        if self.add_missing_tokens and self.kind != "hf":
            raise ValueError("TokenizerConfig: add_missing_tokens is only supported for kind='hf' "
                             "(retrain the SentencePiece model with the tokens instead)")
        for name in SPECIAL_NAMES:
            tok = getattr(self, f"{name}_token")
            required = name not in (*MODALITIES, "bos", "gen_image")
            if tok is None and not required:
                continue
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"TokenizerConfig: {name}_token must be a non-empty string, "
                                 f"got {tok!r}")
        toks = self.special_tokens()
        text_toks = [toks[n] for n in TEXT_SPECIALS if n in toks]
        if len(set(text_toks)) != len(text_toks):
            raise ValueError(f"TokenizerConfig: ChatML/endoftext/placeholder tokens must be "
                             f"distinct, got {text_toks}")

    def special_tokens(self) -> dict[str, str]:
        """Role name -> token string, for every role that is set."""
        out = {n: getattr(self, f"{n}_token") for n in SPECIAL_NAMES}
        return {n: t for n, t in out.items() if t is not None}


class Tokenizer(abc.ABC):
    """Backend-independent tokenizer API; subclasses implement the four abstract methods."""

    def __init__(self, config: TokenizerConfig) -> None:
        self.config = config
        self._special_ids = self._resolve_specials()

    # -- backend hooks ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the LLM's embedding table may be larger)."""

    @abc.abstractmethod
    def _token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None when the exact string is not one."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start) where start[i] is the character offset in `text` where token i begins."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens rendered literally (decode(encode(x)) == x)."""

    # -- shared API ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids; special-token strings in `text` become their single ids."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.encode_with_offsets(text)[0]

    def id_of(self, token: str) -> int:
        """Id of one vocabulary entry (e.g. "<|im_start|>"); ValueError if it is not one."""
        i = self._token_to_id(token) if isinstance(token, str) else None
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary "
                             f"(size {self.vocab_size})")
        return i

    def special_id(self, name: str) -> int:
        """Id of a special role: one of SPECIAL_NAMES ("pad", "im_start", "image", ...)."""
        if name not in SPECIAL_NAMES:
            raise ValueError(f"unknown special token {name!r}; expected one of {SPECIAL_NAMES}")
        if name not in self._special_ids:
            raise ValueError(f"special token {name!r} is not set in the TokenizerConfig "
                             f"({name}_token=None)")
        return self._special_ids[name]

    @property
    def special_ids(self) -> dict[str, int]:
        """Role name -> id for every configured role."""
        return dict(self._special_ids)

    @property
    def pad_id(self) -> int:
        return self._special_ids["pad"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["eos"]

    @property
    def bos_id(self) -> int | None:
        return self._special_ids.get("bos")

    @property
    def im_start_id(self) -> int:
        return self._special_ids["im_start"]

    @property
    def im_end_id(self) -> int:
        return self._special_ids["im_end"]

    @property
    def endoftext_id(self) -> int:
        return self._special_ids["endoftext"]

    @property
    def gen_image_id(self) -> int:
        """Id of the image-generation token; ValueError when gen_image_token is None."""
        return self.special_id("gen_image")

    def placeholder_token(self, modality: str) -> str:
        """Placeholder string of a modality ("image" | "video" | "audio")."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        tok = getattr(self.config, f"{modality}_token")
        if tok is None:
            raise ValueError(f"the tokenizer has no {modality} placeholder "
                             f"(TokenizerConfig.{modality}_token=None)")
        return tok

    def placeholder_id(self, modality: str) -> int:
        self.placeholder_token(modality)  # validates
        return self._special_ids[modality]

    def _resolve_specials(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        missing, split = [], []
        for name, tok in self.config.special_tokens().items():
            i = self._token_to_id(tok)
            if i is None:
                missing.append(f"{name}={tok!r}")
                continue
            if name in TEXT_SPECIALS and self.encode_with_offsets(tok)[0] != [i]:
                split.append(f"{name}={tok!r}")
            ids[name] = i
        if missing:
            raise ValueError(
                f"{self.config.kind} tokenizer {self.config.path!r} lacks required special "
                f"tokens {missing}; add them to the vocabulary (SentencePiece: "
                f"user_defined_symbols; HF: add_missing_tokens=True) or set the *_token fields")
        if split:
            raise ValueError(
                f"special tokens {split} are in the vocabulary but are not matched as single "
                f"ids when encoding text; register them as special/user-defined tokens")
        return ids


# ---------------------------------------------------------------------------------------
# SentencePiece backend
# ---------------------------------------------------------------------------------------
def train_sentencepiece(
    texts: str | os.PathLike | Iterable[str],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = False,
    num_threads: int = 1,
    **extra: Any,
) -> Path:
    """Train a SentencePiece model that round-trips any text; returns `<out_prefix>.model`.

    `texts` is a text file (one sentence per line) or an iterable of strings. Special tokens
    are user_defined_symbols (single ids, matched before splitting), byte_fallback makes any
    unicode encodable, and identity normalization without a dummy prefix keeps
    decode(encode(x)) == x. <unk> is id 0; SentencePiece's own <s>/</s> are disabled
    (ChatML's <|im_end|> is the end-of-turn token). `extra` goes to the trainer as-is.
    """
    import sentencepiece as spm

    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s
                                                       for s in specials):
        raise ValueError(f"special_tokens must be distinct non-empty strings, got {specials}")
    min_vocab = 1 + len(specials) + 256 + 1  # unk + specials + byte pieces + >=1 piece
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be an int >= {min_vocab} (unk + {len(specials)} "
                         f"special tokens + 256 byte-fallback pieces + merges), got {vocab_size}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    kwargs: dict[str, Any] = dict(
        model_prefix=str(out_prefix), vocab_size=vocab_size, model_type=model_type,
        user_defined_symbols=specials, byte_fallback=True, character_coverage=character_coverage,
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_digits=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        hard_vocab_limit=hard_vocab_limit, num_threads=num_threads, minloglevel=2)
    kwargs.update(extra)
    if isinstance(texts, str | os.PathLike):
        if not Path(texts).is_file():
            raise ValueError(f"train_sentencepiece: text file {str(texts)!r} does not exist "
                             f"(pass an iterable of strings to train from memory)")
        kwargs["input"] = str(texts)
    else:
        kwargs["sentence_iterator"] = iter(t for t in texts if t)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from e
    return Path(f"{out_prefix}.model")


class SentencePieceTokenizer(Tokenizer):
    """Tokenizer over a SentencePiece .model file."""

    def __init__(self, config: TokenizerConfig) -> None:
        import sentencepiece as spm

        if not fs.isfile(config.path):
            raise ValueError(f"SentencePiece model file {config.path!r} does not exist")
        self._sp = spm.SentencePieceProcessor(model_proto=fs.read_bytes(config.path))
        super().__init__(config)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        proto = self._sp.encode(text, out_type="proto")
        # SentencePiece offsets are UTF-8 byte offsets: map them to character offsets.
        byte_to_char = [0] * (len(text.encode("utf-8")) + 1)
        b = 0
        for ci, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            byte_to_char[b:b + n] = [ci] * n
            b += n
        byte_to_char[b] = len(text)
        ids = [p.id for p in proto.pieces]
        starts = [byte_to_char[p.begin] for p in proto.pieces]
        return ids, starts

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# ---------------------------------------------------------------------------------------
# Hugging Face tokenizer.json backend
# ---------------------------------------------------------------------------------------
def _tokenizer_json_path(path: str) -> str:
    p = fs.join(path, "tokenizer.json") if fs.isdir(path) else path
    if not fs.isfile(p):
        raise ValueError(f"no Hugging Face tokenizer.json at {path!r} (expected the file or a "
                         f"directory containing it)")
    return p


class HFTokenizer(Tokenizer):
    """Tokenizer over a Hugging Face `tokenizer.json` (e.g. a Qwen2 checkpoint directory)."""

    def __init__(self, config: TokenizerConfig) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFBackend

        self._tok = HFBackend.from_str(fs.read_text(_tokenizer_json_path(config.path)))
        if config.add_missing_tokens:
            missing = [t for t in dict.fromkeys(config.special_tokens().values())
                       if self._tok.token_to_id(t) is None]
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in missing])
        super().__init__(config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [o[0] for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the (possibly extended) tokenizer.json."""
        self._tok.save(str(path))


def load_tokenizer(config: TokenizerConfig | Mapping[str, Any]) -> Tokenizer:
    """TokenizerConfig (or dict) -> the matching backend, special tokens verified."""
    if not isinstance(config, TokenizerConfig):
        config = TokenizerConfig.from_dict(config)
    if config.kind == "sentencepiece":
        return SentencePieceTokenizer(config)
    return HFTokenizer(config)


__all__ = ["DEFAULT_SPECIAL_TOKENS", "HFTokenizer", "MODALITIES", "SPECIAL_NAMES",
           "SentencePieceTokenizer", "Tokenizer", "TokenizerConfig", "load_tokenizer",
           "train_sentencepiece"]
