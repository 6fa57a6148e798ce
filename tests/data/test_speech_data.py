"""Speech-out targets: assistant-turn rows, answer text tokens, units, static batching."""

import json

import numpy as np
import pytest

from omni_jax.data import packing
from omni_jax.data.pipeline import DataConfig, make_dataset
from omni_jax.data.speech import SpeechTargets, collate_speech, turn_rows
from omni_jax.data.template import ChatTemplate
from omni_jax.data.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece

MESSAGES = [{"role": "user", "content": "What digit is this?"},
            {"role": "assistant", "content": "It is a three."}]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    texts = [json.dumps(MESSAGES), "It is a four. It is a nine. What digit is this?"] * 20
    model = train_sentencepiece(texts * 4, 300, str(tmp / "sp"))
    return ChatTemplate(load_tokenizer(TokenizerConfig(path=str(model))))


def test_turn_rows_extend_answers_by_header_and_newline():
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    rows = turn_rows(mask, header_len=3)
    want = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows, want)


def test_targets_hold_answer_tokens_turn_rows_and_units(template):
    tok = template.tokenizer
    ex = template.encode(MESSAGES).to_dict()
    out = SpeechTargets(template, unit_vocab=50)(ex, {"speech_units": [3, 3, 7, 1]})
    answer = tok.encode("It is a three.")
    np.testing.assert_array_equal(out["speech_text_ids"], answer)
    np.testing.assert_array_equal(out["speech_units"], [3, 3, 7, 1])
    rows = np.nonzero(out["speech_rows"])[0]
    header = tok.encode(f"{tok.config.im_start_token}assistant\n")
    # the rows: header, answer, <|im_end|>, "\n" — the assistant turn with its template tokens
    want = [*header, *answer, tok.im_end_id]
    np.testing.assert_array_equal(ex["input_ids"][rows[:len(want)]], want)
    assert rows[-1] == len(ex["input_ids"]) - 1 and rows.size == len(want) + 1


@pytest.mark.parametrize("record, match", [
    ({"speech_units": [1, 99]}, "unit 99 outside"),
    ({"speech_units": []}, "non-empty"),
    ({"speech_units": [1], "speech_audio": "x.wav"}, "both"),
    ({"speech_audio": "x.wav"}, "no unit tokenizer"),
    ({}, "no speech_units"),
])
def test_bad_speech_records_raise(template, record, match):
    ex = template.encode(MESSAGES).to_dict()
    with pytest.raises(ValueError, match=match):
        SpeechTargets(template, unit_vocab=50)(ex, record)


def test_empty_answer_raises(template):
    msgs = [MESSAGES[0], {"role": "assistant", "content": ""}]
    ex = template.encode(msgs).to_dict()
    with pytest.raises(ValueError, match="empty assistant answer"):
        SpeechTargets(template, unit_vocab=50)(ex, {"speech_units": [1, 2]})


def test_collate_pads_to_static_lengths_with_masks():
    exs = [{"speech_text_ids": np.array([5, 6]), "speech_units": np.array([1, 2, 3])},
           {"speech_text_ids": np.array([7]), "speech_units": np.array([4])}]
    out = collate_speech(exs, 3, {"text_len": 4, "units_len": 5})
    np.testing.assert_array_equal(out["speech_text_ids"], [[5, 6, 0, 0], [7, 0, 0, 0],
                                                           [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["speech_text_mask"].sum(1), [2, 1, 0])
    np.testing.assert_array_equal(out["speech_unit_mask"].sum(1), [3, 1, 0])
    with pytest.raises(ValueError, match="exceeds DataConfig.speech.units_len=2"):
        collate_speech(exs, 3, {"text_len": 4, "units_len": 2})
    with pytest.raises(ValueError, match="DataConfig.speech is not set"):
        collate_speech(exs, 3, {})


def test_pipeline_batches_speech_and_drops_too_long(template, tmp_path):
    recs = [{"messages": MESSAGES, "speech_units": list(range(1, 2 + i)),
             "speech_units_rejected": [2] * (i + 1)} for i in range(6)]
    path = tmp_path / "speech.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    targets = SpeechTargets(template, unit_vocab=50)

    def encode(record):
        return targets(template.encode(record["messages"]).to_dict(), record)

    cfg = DataConfig.from_dict({"sources": {"s": {"path": str(path)}}, "batch_size": 2,
                                "seq_buckets": (128,), "speech": {"text_len": 8, "units_len": 4},
                                "num_epochs": 1})
    it = iter(make_dataset(cfg, encode, process_index=0, process_count=1))
    batches = list(it)
    units = np.concatenate([b["speech_unit_mask"].sum(1) for b in batches])
    assert sorted(units[units > 0].tolist()) == [1, 2, 3, 4]  # 5 and 6 units: dropped
    assert it.metrics()["data/dropped_too_long"] == 2
    b = batches[0]
    assert b["speech_rows"].shape == b["input_ids"].shape
    assert b["speech_units_rejected"].shape == (2, 4) and "speech_unit_mask_rejected" in b
    with pytest.raises(ValueError, match="packing=False"):
        DataConfig.from_dict({"packing": True, "speech": {"text_len": 8, "units_len": 4}})
    with pytest.raises(ValueError, match="cannot be packed"):
        packing.FirstFitPacker(2, 128).add(packing.shift_example(encode(recs[0])))
