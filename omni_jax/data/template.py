"""ChatML (Qwen2) chat template: conversation -> token ids, loss mask and media placeholders.

Rendered text is exactly Qwen2-Instruct's chat template:
  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{...}<|im_end|>\\n
  <|im_start|>assistant\\n{...}<|im_end|>\\n   [+ "<|im_start|>assistant\\n" for generation]
with a default system turn inserted when the conversation does not start with one.

Loss-mask rule (aligned to *inputs*): loss_mask[i] == 1 iff token input_ids[i] is part of an
assistant answer: the answer's content tokens and its closing <|im_end|>. The
"<|im_start|>assistant\\n" header, the "\\n" after <|im_end|>, system/user turns and every
media placeholder are 0. The whole rendered string is tokenized at once (so ids equal
`apply_chat_template`), and a token belongs to an answer iff its first character does.
For next-token prediction use `shift_targets`: targets[i] = input_ids[i + 1], weighted by
loss_mask[i + 1].

Image output (X-VILA): a {"type": "gen_image"} part renders as TemplateConfig.gen_image_tokens
copies of TokenizerConfig.gen_image_token: ordinary text positions (modality 0; supervised in
an assistant turn, so the LLM learns to emit them) whose hidden states drive the image decoder.

Media: each {"type": "image"|"video"|"audio"} part renders as that modality's placeholder
token; literal placeholder strings inside text (e.g. "<image>") count the same way (as do
literal special tokens in any text, exactly as with `apply_chat_template`). The k-th
placeholder of a modality is then repeated media_token_counts[modality][k] times (the
adapters' `num_tokens(...)`), and `modality` / `item_index` map every position to its
media item so the model can scatter encoder outputs with static shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.config_base import StrictConfig
from omni_jax.data.tokenizer import MODALITIES, Tokenizer

ROLES = ("system", "user", "assistant")
GEN_IMAGE = "gen_image"  # X-VILA output part: K generation tokens (TemplateConfig)
PART_TYPES = ("text", *MODALITIES, GEN_IMAGE)
MODALITY_IDS = {"text": 0, "image": 1, "video": 2, "audio": 3}
_PLURAL = {"image": "images", "video": "videos", "audio": "audio clips"}

Conversation = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class TemplateConfig(StrictConfig):
    """Chat template options."""

    # Qwen2-Instruct's default system turn; None inserts no system turn.
    default_system_prompt: str | None = "You are a helpful assistant."
    max_len: int | None = None  # longer sequences (after media expansion) are a ValueError
    # a {"type": "gen_image"} part renders as this many TokenizerConfig.gen_image_token
    # tokens: X-VILA's image-generation positions (the output head reads their hidden states)
    gen_image_tokens: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.gen_image_tokens, bool) or not isinstance(self.gen_image_tokens,
                                                                     int) \
                or self.gen_image_tokens <= 0:
            raise ValueError(f"TemplateConfig.gen_image_tokens must be a positive int, got "
                             f"{self.gen_image_tokens!r}")
        if self.default_system_prompt is not None and not isinstance(
                self.default_system_prompt, str):
            raise ValueError(f"TemplateConfig.default_system_prompt must be a str or None, got "
                             f"{self.default_system_prompt!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len <= 0):
            raise ValueError(f"TemplateConfig.max_len must be a positive int or None, got "
                             f"{self.max_len!r}")


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """One tokenized conversation; every array is [seq] int32."""

    input_ids: np.ndarray  # [seq] token ids, placeholders expanded
    loss_mask: np.ndarray  # [seq] 1 on assistant answer tokens (aligned to input_ids)
    modality: np.ndarray  # [seq] 0 text, 1 image, 2 video, 3 audio
    item_index: np.ndarray  # [seq] media item index within its modality, -1 for text
    text: str  # rendered chat string (one placeholder per media item)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def media_positions(self, modality: str) -> np.ndarray:
        """Positions of a modality's placeholder tokens, in item order: [num_tokens] int32."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return np.nonzero(self.modality == MODALITY_IDS[modality])[0].astype(np.int32)

    def targets(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(targets, target_mask) for next-token prediction; see `shift_targets`."""
        return shift_targets(self.input_ids, self.loss_mask, pad_id)

    def pad(self, length: int, pad_id: int) -> ChatExample:
        """Right-pad to `length` (pad id, mask 0, modality 0, item -1)."""
        n = len(self)
        if length < n:
            raise ValueError(f"cannot pad a sequence of length {n} to shorter length {length}")
        w = (0, length - n)
        return ChatExample(
            input_ids=np.pad(self.input_ids, w, constant_values=pad_id),
            loss_mask=np.pad(self.loss_mask, w), modality=np.pad(self.modality, w),
            item_index=np.pad(self.item_index, w, constant_values=-1), text=self.text)

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask,
                "modality": self.modality, "item_index": self.item_index}


def shift_targets(input_ids: np.ndarray, loss_mask: np.ndarray,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs-aligned ids/mask -> next-token (targets, target_mask) along the last axis.

    targets[..., i] = input_ids[..., i + 1] and target_mask[..., i] = loss_mask[..., i + 1];
    the last position gets pad_id with mask 0. The logits at position i are scored against
    targets[..., i].
    """
    input_ids, loss_mask = np.asarray(input_ids), np.asarray(loss_mask)
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and loss_mask {loss_mask.shape} must "
                         f"have the same shape")
    targets = np.full_like(input_ids, pad_id)
    mask = np.zeros_like(loss_mask)
    targets[..., :-1] = input_ids[..., 1:]
    mask[..., :-1] = loss_mask[..., 1:]
    return targets, mask


def _check_message(i: int, msg: Any) -> None:
    if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
        raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {msg!r}")
    if msg["role"] not in ROLES:
        raise ValueError(f"message {i}: unknown role {msg['role']!r}; expected one of {ROLES}")
    content = msg["content"]
    if isinstance(content, str):
        return
    if not isinstance(content, Sequence):
        raise ValueError(f"message {i}: content must be a str or a list of parts, got "
                         f"{type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in PART_TYPES:
            raise ValueError(f"message {i} part {j}: expected a mapping with 'type' in "
                             f"{PART_TYPES}, got {part!r}")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j}: a text part needs a str 'text', got "
                             f"{part!r}")


class ChatTemplate:
    """Qwen2 ChatML template bound to a tokenizer (for placeholder and special-token ids)."""

    def __init__(self, tokenizer: Tokenizer, config: TemplateConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or TemplateConfig()

    def _part_text(self, part: Mapping[str, Any]) -> str:
        if part["type"] == "text":
            return part["text"]
        if part["type"] == GEN_IMAGE:
            tok = self.tokenizer.config.gen_image_token
            if tok is None:
                raise ValueError("a {'type': 'gen_image'} part needs a tokenizer with a "
                                 "generation token (TokenizerConfig.gen_image_token), got None")
            return tok * self.config.gen_image_tokens
        return self.tokenizer.placeholder_token(part["type"])

    def _content_text(self, content: str | Sequence[Mapping[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        return "".join(self._part_text(p) for p in content)

    def render_with_spans(self, conversation: Conversation, add_generation_prompt: bool = False
                          ) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, [start, end) character spans of assistant answers + <|im_end|>)."""
        if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence) \
                or not conversation:
            raise ValueError("conversation must be a non-empty list of messages")
        for i, msg in enumerate(conversation):
            _check_message(i, msg)
        cfg = self.tokenizer.config
        start, end = cfg.im_start_token, cfg.im_end_token
        messages = list(conversation)
        if messages[0]["role"] != "system" and self.config.default_system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.default_system_prompt})
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for msg in messages:
            header = f"{start}{msg['role']}\n"
            body = self._content_text(msg["content"]) + end
            if msg["role"] == "assistant":
                spans.append((pos + len(header), pos + len(header) + len(body)))
            chunk = header + body + "\n"
            chunks.append(chunk)
            pos += len(chunk)
        if add_generation_prompt:
            chunks.append(f"{start}assistant\n")
        return "".join(chunks), spans

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        """The chat string (identical to Qwen2's jinja chat template output)."""
        return self.render_with_spans(conversation, add_generation_prompt)[0]

    def _check_counts(self, counts: Mapping[str, Sequence[int]] | None
                      ) -> dict[str, list[int]]:
        counts = dict(counts or {})
        unknown = sorted(set(counts) - set(MODALITIES))
        if unknown:
            raise ValueError(f"media_token_counts: unknown modalities {unknown}; expected keys "
                             f"in {MODALITIES}")
        out = {}
        for m, c in counts.items():
            if isinstance(c, int | str | bytes) or not isinstance(c, Sequence | np.ndarray):
                raise ValueError(f"media_token_counts[{m!r}] must be a sequence of ints (one per "
                                 f"item), got {c!r}")
            c = [int(n) for n in c]
            if any(n <= 0 for n in c):
                raise ValueError(f"media_token_counts[{m!r}] must be positive token counts, "
                                 f"got {c}")
            out[m] = c
        return out

    def encode(self, conversation: Conversation,
               media_token_counts: Mapping[str, Sequence[int]] | None = None,
               add_generation_prompt: bool = False) -> ChatExample:
        """Render, tokenize, check placeholder counts, expand media and build the loss mask.

        media_token_counts: {"image": [256, 300], "audio": [75]}, one entry per placeholder
        of that modality in conversation order. Raises ValueError on count mismatches and
        when the expanded length exceeds `max_len` (media are never truncated).
        """
        counts = self._check_counts(media_token_counts)
        text, spans = self.render_with_spans(conversation, add_generation_prompt)
        ids_list, starts = self.tokenizer.encode_with_offsets(text)
        ids = np.asarray(ids_list, np.int32)  # [tokens]
        starts_arr = np.asarray(starts, np.int64)
        supervised = np.zeros(len(ids), bool)
        for a, b in spans:
            supervised |= (starts_arr >= a) & (starts_arr < b)

        modality = np.zeros(len(ids), np.int32)
        item = np.full(len(ids), -1, np.int32)
        reps = np.ones(len(ids), np.int64)
        for m in MODALITIES:
            tok = self.tokenizer.config.special_tokens().get(m)
            pos = np.nonzero(ids == self.tokenizer.placeholder_id(m))[0] if tok else []
            given = counts.get(m, [])
            if len(pos) != len(given):
                name = tok if tok else f"<{m}>"
                raise ValueError(f"{len(pos)} {name} placeholders but {len(given)} "
                                 f"{_PLURAL[m]} in media_token_counts")
            modality[pos] = MODALITY_IDS[m]
            item[pos] = np.arange(len(pos), dtype=np.int32)
            reps[pos] = given
        total = int(reps.sum())
        if self.config.max_len is not None and total > self.config.max_len:
            raise ValueError(f"sequence length {total} (after media expansion, {len(ids)} before) "
                             f"exceeds max_len {self.config.max_len}; media are never truncated")
        loss = (supervised & (modality == 0)).astype(np.int32)
        return ChatExample(input_ids=np.repeat(ids, reps), loss_mask=np.repeat(loss, reps),
                           modality=np.repeat(modality, reps), item_index=np.repeat(item, reps),
                           text=text)

    __call__ = encode


__all__ = ["GEN_IMAGE", "MODALITY_IDS", "ROLES", "ChatExample", "ChatTemplate", "TemplateConfig",
           "shift_targets"]
