"""Tokenizer backends: SentencePiece training/round trip, HF tokenizer.json loading, specials."""

import json

import pytest
from fixtures_text import build_hf_tokenizer_json, corpus

from omni_jax.data.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerConfig,
    load_tokenizer,
    train_sentencepiece,
)

ROUND_TRIP = [
    "Hello world, this is a plain ASCII sentence with digits 12345 and symbols #@!~.",
    "  leading and trailing spaces, double  spaces,\ttabs\nand\n\nnewlines  ",
    "Unicode: café naïve straße 日本語 中文 привет γειά 😀👍🏽 — “quotes” ∑∫ é (e+\u0301)",
    "Unseen script: ქართული ᠮᠣᠩᠭᠣᠯ and control \x07 char",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "tok"
    return train_sentencepiece(corpus(), vocab_size=600, out_prefix=out)


@pytest.fixture(scope="module")
def sp_tok(sp_model):
    return load_tokenizer({"path": str(sp_model), "kind": "sentencepiece"})


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    build_hf_tokenizer_json(d)
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(TokenizerConfig(path=str(hf_dir), kind="hf"))


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_tok, hf_tok):
    return sp_tok if request.param == "sp" else hf_tok


def test_backend_types(sp_tok, hf_tok, sp_model):
    assert isinstance(sp_tok, SentencePieceTokenizer) and isinstance(hf_tok, HFTokenizer)
    # vocab_size is the trained size (soft limit may stop below it, never above).
    assert 400 < sp_tok.vocab_size <= 600
    assert sp_model.is_file() and sp_model.with_suffix(".vocab").is_file()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_sp_compresses_in_domain_text(sp_tok):
    # The trained merges are used: in-domain text needs far fewer ids than bytes.
    text = " ".join(corpus(5, seed=7))
    assert len(sp_tok.encode(text)) < 0.5 * len(text.encode())


def test_special_tokens_are_single_ids(tok):
    names = ("im_start", "im_end", "endoftext", "image", "video", "audio")
    ids = {n: tok.special_id(n) for n in names}
    assert len(set(ids.values())) == len(names)
    strings = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>", "<audio>")
    for n, tok_str in zip(names, strings):
        assert tok.encode(tok_str) == [ids[n]]
        assert tok.id_of(tok_str) == ids[n]
        assert tok.decode([ids[n]]) == tok_str
    assert tok.pad_id == ids["endoftext"] and tok.eos_id == ids["im_end"] and tok.bos_id is None
    assert tok.placeholder_id("video") == ids["video"]
    # Embedded in text: matched as one id, surrounded by ordinary pieces.
    mixed = tok.encode("look<image>here<|im_end|>\n")
    assert mixed.count(ids["image"]) == 1 and mixed.count(ids["im_end"]) == 1


def test_normal_text_never_yields_special_ids(tok):
    specials = set(tok.special_ids.values())
    text = "\n".join(corpus(60, seed=3)) + " <imag e> <|im_sta rt|> < image > <|endoftext| >"
    assert not specials & set(tok.encode(text))


def test_offsets_point_at_token_starts(tok):
    text = "Hi café 😀<audio> ok"
    ids, starts = tok.encode_with_offsets(text)
    assert len(ids) == len(starts) and starts == sorted(starts) and starts[0] == 0
    k = ids.index(tok.special_id("audio"))
    assert starts[k] == text.index("<audio>")
    assert tok.decode(ids[k + 1:]) == text[starts[k + 1]:]


def test_hf_load_from_file_and_dir_agree(hf_dir, hf_tok):
    by_file = load_tokenizer(TokenizerConfig(path=str(hf_dir / "tokenizer.json"), kind="hf"))
    text = ROUND_TRIP[2]
    assert by_file.encode(text) == hf_tok.encode(text)
    assert by_file.special_ids == hf_tok.special_ids
    # Same ids as the raw `tokenizers` library (no special handling of our own).
    from tokenizers import Tokenizer as HFBackend
    raw = HFBackend.from_file(str(hf_dir / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == hf_tok.encode(text)
    assert hf_tok.id_of("<|im_start|>") == raw.token_to_id("<|im_start|>")


def test_hf_configurable_placeholders(tmp_path):
    # A Qwen2-VL-like vocabulary: image/video placeholders have other names, no audio.
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>")
    build_hf_tokenizer_json(tmp_path, specials=specials, vocab_size=350)
    with pytest.raises(ValueError, match=r"lacks required special tokens.*image='<image>'"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path), kind="hf"))
    cfg = TokenizerConfig(path=str(tmp_path), kind="hf", image_token="<|image_pad|>",
                          video_token="<|video_pad|>", audio_token=None)
    t = load_tokenizer(cfg)
    assert t.placeholder_id("image") == t.id_of("<|image_pad|>")
    assert t.encode("a<|video_pad|>")[-1] == t.placeholder_id("video")
    with pytest.raises(ValueError, match="no audio placeholder"):
        t.placeholder_id("audio")
    with pytest.raises(ValueError, match="'audio' is not set"):
        t.special_id("audio")


def test_hf_add_missing_tokens(tmp_path):
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    build_hf_tokenizer_json(tmp_path, specials=specials, vocab_size=350)
    base = json.loads((tmp_path / "tokenizer.json").read_text())
    n = len(base["model"]["vocab"])
    t = load_tokenizer(TokenizerConfig(path=str(tmp_path), kind="hf", add_missing_tokens=True))
    assert [t.placeholder_id(m) for m in ("image", "video", "audio")] == [n, n + 1, n + 2]
    assert t.vocab_size == n + 3
    assert t.encode("x<video>y").count(n + 1) == 1
    t.save(tmp_path / "ext.json")
    again = load_tokenizer(TokenizerConfig(path=str(tmp_path / "ext.json"), kind="hf"))
    assert again.special_ids == t.special_ids


def test_sp_missing_special_token(tmp_path):
    model = train_sentencepiece(corpus(40), vocab_size=400, out_prefix=tmp_path / "m",
                                special_tokens=DEFAULT_SPECIAL_TOKENS[:5])  # no <audio>
    with pytest.raises(ValueError, match=r"lacks required special tokens \[\"audio='<audio>'\"\]"):
        load_tokenizer(TokenizerConfig(path=str(model)))
    t = load_tokenizer(TokenizerConfig(path=str(model), audio_token=None))
    assert t.decode(t.encode(ROUND_TRIP[2])) == ROUND_TRIP[2]


def test_train_from_text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(corpus(40)), encoding="utf-8")
    model = train_sentencepiece(f, vocab_size=400, out_prefix=tmp_path / "f")
    t = load_tokenizer(TokenizerConfig(path=str(model)))
    assert t.decode(t.encode(ROUND_TRIP[1])) == ROUND_TRIP[1]


def test_errors(sp_tok, tmp_path):
    with pytest.raises(ValueError, match="unknown special token 'cls'"):
        sp_tok.special_id("cls")
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        sp_tok.id_of("<nope>")
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        sp_tok.placeholder_id("smell")
    with pytest.raises(ValueError, match="encode expects a str"):
        sp_tok.encode([1, 2])
    with pytest.raises(ValueError, match="unknown kind 'bpe'"):
        TokenizerConfig(path="x", kind="bpe")
    with pytest.raises(ValueError, match="unknown keys \\['vocab'\\]"):
        TokenizerConfig.from_dict({"path": "x", "vocab": 3})
    with pytest.raises(ValueError, match="path must be a non-empty path"):
        TokenizerConfig(path="")
    with pytest.raises(ValueError, match="must be distinct"):
        TokenizerConfig(path="x", image_token="<video>")
    with pytest.raises(ValueError, match="im_end_token must be a non-empty string"):
        TokenizerConfig(path="x", im_end_token=None)
    with pytest.raises(ValueError, match="add_missing_tokens is only supported for kind='hf'"):
        TokenizerConfig(path="x", add_missing_tokens=True)
    with pytest.raises(ValueError, match="model file .* does not exist"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path / "none.model")))
    with pytest.raises(ValueError, match="no Hugging Face tokenizer.json"):
        load_tokenizer(TokenizerConfig(path=str(tmp_path), kind="hf"))
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 264"):
        train_sentencepiece(corpus(5), vocab_size=100, out_prefix=tmp_path / "small")
    with pytest.raises(ValueError, match="text file .* does not exist"):
        train_sentencepiece(str(tmp_path / "missing.txt"), 300, tmp_path / "m")
    with pytest.raises(ValueError, match="distinct non-empty strings"):
        train_sentencepiece(corpus(5), 300, tmp_path / "m", special_tokens=("<a>", "<a>"))
