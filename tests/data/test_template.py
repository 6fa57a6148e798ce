"""ChatML template: parity with Qwen2's jinja template, loss mask, media expansion, errors."""

import os

import numpy as np
import pytest
from fixtures_text import QWEN2_CHAT_TEMPLATE, build_hf_tokenizer_json, corpus

from omni_jax.data.template import (
    MODALITY_IDS,
    ChatTemplate,
    TemplateConfig,
    shift_targets,
)
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the color of the river?"},
               {"role": "assistant", "content": "The river is blue."}],
    "system_multi": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me about this <image> please."},
        {"role": "assistant", "content": "A cat and a dog.\nBoth are red!"},
        {"role": "user", "content": "  and the sound <audio>?\n\n"},
        {"role": "assistant", "content": " Music 123, café 😀 "}],
    "prompt_only": [{"role": "user", "content": "Describe <video> and <image>"}],
}


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    return build_hf_tokenizer_json(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_tok(hf_json):
    return load_tokenizer(TokenizerConfig(path=str(hf_json), kind="hf"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "tok"
    return load_tokenizer(TokenizerConfig(path=str(train_sentencepiece(corpus(), 600, out))))


@pytest.fixture(scope="module")
def hf_reference(hf_json):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(hf_json), chat_template=QWEN2_CHAT_TEMPLATE,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _ones(conv):
    """One token per inline placeholder, so ids match the un-expanded reference."""
    text = "".join(m["content"] for m in conv)
    return {m: [1] * text.count(f"<{m}>") for m in ("image", "video", "audio")}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_matches_qwen2_chat_template(hf_tok, hf_reference, name, gen):
    conv = CONVERSATIONS[name]
    tmpl = ChatTemplate(hf_tok)
    ref_text = hf_reference.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert tmpl.render(conv, add_generation_prompt=gen) == ref_text
    ref = hf_reference.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    ref_ids = ref["input_ids"] if hasattr(ref, "keys") else ref
    ex = tmpl.encode(conv, _ones(conv), add_generation_prompt=gen)
    assert ex.input_ids.dtype == np.int32 and ex.input_ids.tolist() == list(ref_ids)
    assert ex.text == ref_text


def test_no_default_system_prompt(hf_tok):
    conv = CONVERSATIONS["single"]
    text = ChatTemplate(hf_tok, TemplateConfig(default_system_prompt=None)).render(conv)
    assert text == ("<|im_start|>user\nWhat is the color of the river?<|im_end|>\n"
                    "<|im_start|>assistant\nThe river is blue.<|im_end|>\n")
    custom = ChatTemplate(hf_tok, TemplateConfig(default_system_prompt="Be nice.")).render(conv)
    assert custom.startswith("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("backend", ["hf", "sp"])
def test_loss_mask_exactly_on_assistant_answers(hf_tok, sp_tok, backend):
    tok = hf_tok if backend == "hf" else sp_tok
    conv = CONVERSATIONS["system_multi"]
    ex = ChatTemplate(tok).encode(conv, {"image": [1], "audio": [1]})
    assert tok.decode(ex.input_ids) == ex.text
    m = ex.loss_mask
    assert set(np.unique(m).tolist()) == {0, 1}
    # Contiguous supervised runs, one per assistant turn.
    edges = np.diff(np.concatenate([[0], m, [0]]))
    runs = list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))
    answers = [c["content"] for c in conv if c["role"] == "assistant"]
    assert len(runs) == len(answers)
    for (a, b), answer in zip(runs, answers):
        assert tok.decode(ex.input_ids[a:b]) == answer + "<|im_end|>"
        assert ex.input_ids[b - 1] == tok.im_end_id
        assert tok.decode(ex.input_ids[:a]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ex.input_ids[b:b + 1]) == "\n"  # newline after <|im_end|> not trained
    gen = ChatTemplate(tok).encode(CONVERSATIONS["single"], add_generation_prompt=True)
    tail = tok.encode("<|im_start|>assistant\n")
    assert gen.input_ids[-len(tail):].tolist() == tail and gen.loss_mask[-len(tail):].sum() == 0


def test_media_expansion_structured_parts(hf_tok):
    conv = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "and"},
                                     {"type": "audio"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure: "},
                                          {"type": "video"}, {"type": "text", "text": " ok"}]},
    ]
    counts = {"image": [3, 5], "audio": [2], "video": [4]}
    tmpl = ChatTemplate(hf_tok)
    assert "<image>and<audio><image><|im_end|>" in tmpl.render(conv)
    base = tmpl.encode(conv, {"image": [1, 1], "audio": [1], "video": [1]})
    ex = tmpl.encode(conv, counts)
    assert len(ex) == len(base) + (3 + 5 + 2 + 4) - 4
    for arr in (ex.input_ids, ex.loss_mask, ex.modality, ex.item_index):
        assert arr.dtype == np.int32 and arr.shape == (len(ex),)
    for m, c in counts.items():
        pos = ex.media_positions(m)
        assert len(pos) == sum(c)
        assert (ex.input_ids[pos] == hf_tok.placeholder_id(m)).all()
        assert ex.item_index[pos].tolist() == sum(([k] * n for k, n in enumerate(c)), [])
        assert (ex.modality[pos] == MODALITY_IDS[m]).all()
    text = ex.modality == 0
    assert (ex.item_index[text] == -1).all()
    assert not np.isin(ex.input_ids[text], [hf_tok.placeholder_id(m) for m in counts]).any()
    # Expansion order: image item 0 (3 tokens) precedes the audio item, then image item 1.
    order = ex.modality[ex.modality > 0].tolist()
    assert order == [1] * 3 + [3] * 2 + [1] * 5 + [2] * 4
    # Placeholders are never supervised, even inside an assistant answer; the text around is.
    assert ex.loss_mask[ex.modality > 0].sum() == 0
    sup = hf_tok.decode(ex.input_ids[ex.loss_mask == 1])
    assert sup == "Sure:  ok<|im_end|>"
    # Text tokens are the un-expanded stream with placeholders dropped.
    keep = base.modality == 0
    assert ex.input_ids[text].tolist() == base.input_ids[keep].tolist()


def test_inline_and_structured_placeholders_count_together(hf_tok):
    conv = [{"role": "user", "content": [{"type": "text", "text": "left <image> right"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": "two"}]
    ex = ChatTemplate(hf_tok).encode(conv, {"image": [2, 7]})
    assert ex.item_index[ex.modality == 1].tolist() == [0, 0] + [1] * 7


def test_shift_targets_and_pad(hf_tok):
    ex = ChatTemplate(hf_tok).encode(CONVERSATIONS["single"])
    tgt, tmask = ex.targets(hf_tok.pad_id)
    assert tgt[:-1].tolist() == ex.input_ids[1:].tolist() and tgt[-1] == hf_tok.pad_id
    assert tmask[:-1].tolist() == ex.loss_mask[1:].tolist() and tmask[-1] == 0
    # Last supervised target is the final <|im_end|>; it is predicted from the token before it.
    last = np.nonzero(tmask)[0][-1]
    assert tgt[last] == hf_tok.im_end_id and ex.input_ids[last + 1] == hf_tok.im_end_id
    padded = ex.pad(len(ex) + 5, hf_tok.pad_id)
    assert len(padded) == len(ex) + 5
    assert padded.input_ids[-5:].tolist() == [hf_tok.pad_id] * 5
    assert padded.loss_mask[-5:].sum() == 0 and (padded.item_index[-5:] == -1).all()
    batch = np.stack([padded.input_ids, padded.input_ids])
    bt, bm = shift_targets(batch, np.stack([padded.loss_mask] * 2), pad_id=-7)
    assert bt.shape == batch.shape and (bt[:, -1] == -7).all()
    assert (bt[:, :-1] == batch[:, 1:]).all() and (bm[:, -1] == 0).all()
    with pytest.raises(ValueError, match="cannot pad a sequence of length"):
        ex.pad(len(ex) - 1, 0)
    with pytest.raises(ValueError, match="must have the same shape"):
        shift_targets(batch, padded.loss_mask, 0)


def test_placeholder_count_mismatch(hf_tok):
    tmpl = ChatTemplate(hf_tok)
    inline = [{"role": "user", "content": "<image> a <image> b <image>"}]
    with pytest.raises(ValueError, match="3 <image> placeholders but 2 images"):
        tmpl.encode(inline, {"image": [4, 4]})
    with pytest.raises(ValueError, match="3 <image> placeholders but 4 images"):
        tmpl.encode(inline, {"image": [4, 4, 4, 4]})
    parts = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "hm"}]}]
    with pytest.raises(ValueError, match="1 <audio> placeholders but 0 audio clips"):
        tmpl.encode(parts)
    with pytest.raises(ValueError, match="1 <audio> placeholders but 2 audio clips"):
        tmpl.encode(parts, {"audio": [3, 3]})
    with pytest.raises(ValueError, match="0 <video> placeholders but 1 videos"):
        tmpl.encode(parts, {"audio": [3], "video": [8]})


def test_max_len_names_both_lengths(hf_tok):
    conv = [{"role": "user", "content": [{"type": "image"}]}]
    base = len(ChatTemplate(hf_tok).encode(conv, {"image": [1]}))
    limit = base + 50
    ok = ChatTemplate(hf_tok, TemplateConfig(max_len=limit)).encode(conv, {"image": [51]})
    assert len(ok) == limit
    msg = rf"sequence length {limit + 1} .* exceeds max_len {limit}"
    with pytest.raises(ValueError, match=msg):
        ChatTemplate(hf_tok, TemplateConfig(max_len=limit)).encode(conv, {"image": [52]})


def test_bad_input_errors(hf_tok, tmp_path):
    tmpl = ChatTemplate(hf_tok)
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ([], None, "non-empty list of messages"),
        ("hello", None, "non-empty list of messages"),
        ([{"role": "robot", "content": "x"}], None, "unknown role 'robot'"),
        ([{"content": "x"}], None, "mapping with 'role' and 'content'"),
        ([{"role": "user", "content": 3}], None, "content must be a str or a list of parts"),
        ([{"role": "user", "content": [{"type": "smell"}]}], None, "part 0: expected a mapping"),
        ([{"role": "user", "content": [{"type": "text"}]}], None, "text part needs a str"),
        (user, {"lidar": [3]}, "unknown modalities \\['lidar'\\]"),
        (user, {"image": 3}, "must be a sequence of ints"),
        (user, {"image": [0]}, "must be positive token counts"),
    ]
    for conv, counts, msg in cases:
        with pytest.raises(ValueError, match=msg):
            tmpl.encode(conv, counts)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        TemplateConfig(max_len=0)
    with pytest.raises(ValueError, match="unknown keys \\['system'\\]"):
        TemplateConfig.from_dict({"system": "x"})
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        tmpl.encode(user).media_positions("text")
    # A media part whose modality the tokenizer has no placeholder for.
    build_hf_tokenizer_json(tmp_path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                "<image>"), vocab_size=300)
    no_av = load_tokenizer(TokenizerConfig(path=str(tmp_path), kind="hf", video_token=None,
                                           audio_token=None))
    with pytest.raises(ValueError, match="no audio placeholder"):
        ChatTemplate(no_av).encode([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="0 <audio> placeholders but 1 audio clips"):
        ChatTemplate(no_av).encode([{"role": "user", "content": "<audio>"}], {"audio": [2]})
