"""eval.metrics on hand-made cases: normalisation, exact match, word edit distance (against a
brute-force recursion), corpus WER, and the pitch and speaking-rate rules on synthetic tones."""

import functools
import math

import librosa
import numpy as np
import pytest

from omni_jax.eval import metrics as M

SR = 16000


def test_normalize_answer_drops_case_punctuation_articles():
    assert M.normalize_answer("It is a Seven.") == "it is seven"
    assert M.normalize_answer("  The digit,   7! ") == "digit 7"
    assert M.normalize_answer("An apple; the END") == "apple end"
    # articles are whole words only
    assert M.normalize_answer("Another theater anew") == "another theater anew"
    assert M.normalize_words("Hello, World!  two-three") == ["hello", "world", "two", "three"]
    with pytest.raises(ValueError, match="normalize_answer: expected a string, got int"):
        M.normalize_answer(7)


def test_exact_match_and_accuracy():
    assert M.exact_match("Seven.", "seven")
    assert M.exact_match("the seven", "Seven!")
    assert not M.exact_match("It is a seven.", "seven")
    preds = ["It is a one.", "five", "The digits are 1 2 3.", ""]
    refs = ["it is one", "It is a five.", "The digits are 1 2 3", "zero"]
    got = M.accuracy(preds, refs)
    assert got == {"accuracy": 0.5, "correct": 2, "count": 4}  # 1st and 3rd match
    assert M.accuracy([], []) == {"accuracy": 0.0, "correct": 0, "count": 0}
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        M.accuracy(["a"], ["a", "b"])


def test_prior_baseline_is_the_best_media_blind_answer_per_question():
    qs = ["What digit is this?"] * 4 + ["Is this digit even?"] * 3 + ["What digit is this"]
    refs = ["one", "seven", "seven", "two", "yes", "no", "yes", "Seven."]
    # "what digit is this" (5 records, punctuation normalised): "seven" x3; even?: "yes" x2
    assert M.prior_baseline(qs, refs) == {"accuracy": 5 / 8, "correct": 5, "count": 8}
    rng = np.random.default_rng(0)  # brute force: the best constant answer per question
    qs = [f"q{i}" for i in rng.integers(0, 3, 200)]
    refs = [f"a{i}" for i in rng.integers(0, 4, 200)]
    best = sum(max(sum(q == qq and r == a for q, r in zip(qs, refs)) for a in set(refs))
               for qq in set(qs))
    assert M.prior_baseline(qs, refs)["correct"] == best
    assert M.prior_baseline([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 questions for 1 references"):
        M.prior_baseline(["a", "b"], ["a"])


def test_a_text_only_qa_set_has_no_chance_level():
    """A text problem's question is its whole input: the media-blind answerer would know every
    answer, so a set without media reports chance None (a media set keeps prior_baseline)."""
    from omni_jax.eval.tasks import Item, Prepared, _accuracy

    def prep(i, q, a, **media):
        rec = {"messages": [{"role": "user", "content": q},
                            {"role": "assistant", "content": a}], **media}
        return Prepared(Item("m.jsonl", i, str(i), "qa", rec), a, {})

    text = [prep(0, "What is one plus two?", "Three."), prep(1, "What is two plus two?", "Four.")]
    out = _accuracy("text_chat", text, ["Three.", "Five."])
    assert out["chance"] is None and out["accuracy"] == 0.5
    seen = [prep(0, "What digit is this?", "one", images=["a.png"]),
            prep(1, "What digit is this?", "two", images=["b.png"])]
    assert _accuracy("image_qa", seen, ["one", "one"])["chance"] == 0.5


def _brute_edits(a: tuple, b: tuple) -> int:
    """Edit distance by the plain recursion (an independent implementation)."""
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_word_edits_hand_cases_and_brute_force():
    ref = "the cat sat on the mat".split()
    assert M.word_edits(ref, "the cat sit on mat".split()) == 2  # 1 sub + 1 del
    assert M.word_edits(ref, []) == 6 and M.word_edits([], ["x", "y"]) == 2
    assert M.word_edits(ref, ref) == 0
    assert M.word_edits("a b c".split(), "b c a".split()) == 2  # del a, ins a
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = tuple(rng.choice(list("abc"), size=rng.integers(0, 7)))
        b = tuple(rng.choice(list("abc"), size=rng.integers(0, 7)))
        assert M.word_edits(a, b) == _brute_edits(a, b), (a, b)


def test_corpus_wer_is_total_edits_over_reference_words():
    refs = ["a b c", "d e"]
    hyps = ["a x c", "d e f"]
    got = M.word_error_rate(refs, hyps)
    assert got == {"wer": 2 / 5, "edits": 2, "ref_words": 5, "count": 2}
    per_item_mean = (1 / 3 + 1 / 2) / 2  # not what corpus WER is
    assert not math.isclose(got["wer"], per_item_mean)
    assert M.word_error_rate(["Hello, World!"], ["hello world"])["wer"] == 0.0
    assert M.word_error_rate(["a"], ["b c"])["wer"] == 2.0  # insertions count: WER can pass 1
    assert M.word_error_rate([""], [""])["wer"] == 0.0
    assert M.word_error_rate([""], ["x"])["wer"] == float("inf")
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        M.word_error_rate(["a"], ["a", "b"])


def tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * librosa.tone(hz, sr=SR, duration=seconds)).astype(np.float32)


def test_mean_f0_of_tones():
    for hz in (120.0, 220.0):
        assert M.mean_f0(tone(hz), SR) == pytest.approx(hz, rel=0.03)
    assert math.isnan(M.mean_f0(np.zeros(SR, np.float32), SR))  # silence: no pitch
    assert math.isnan(M.mean_f0(np.zeros(0, np.float32), SR))
    with pytest.raises(ValueError, match="mono waveform"):
        M.mean_f0(np.zeros((2, SR)), SR)


def test_pitch_rule_separates_low_and_high_tones():
    neutral = [M.mean_f0(tone(hz), SR) for hz in (110.0, 120.0, 130.0)]
    expressive = [M.mean_f0(tone(hz), SR) for hz in (210.0, 220.0, 230.0)]
    rule = M.calibrate_style("pitch", neutral, expressive)
    assert rule.threshold == pytest.approx((np.mean(neutral) + np.mean(expressive)) / 2)
    assert rule.threshold == pytest.approx(170.0, rel=0.03)
    assert (rule.neutral_count, rule.expressive_count) == (3, 3)
    assert rule.is_expressive(M.mean_f0(tone(220.0), SR))
    assert rule.is_expressive(M.mean_f0(tone(190.0), SR))
    assert not rule.is_expressive(M.mean_f0(tone(120.0), SR))
    assert not rule.is_expressive(M.mean_f0(tone(150.0), SR))
    assert not rule.is_expressive(float("nan"))
    assert rule.expressive_limit == max(expressive)
    assert not rule.is_expressive(M.mean_f0(tone(300.0), SR))  # past every expressive one
    # an unvoiced neutral reference counts as 0 Hz in its class mean
    half = M.calibrate_style("pitch", [120.0, float("nan")], [220.0])
    assert half.threshold == pytest.approx((60.0 + 220.0) / 2)
    with pytest.raises(ValueError, match="are not higher than neutral ones"):
        M.calibrate_style("pitch", expressive, neutral)
    with pytest.raises(ValueError, match="none of the 1 expressive references is measurable"):
        M.calibrate_style("pitch", [120.0], [float("nan")])
    with pytest.raises(ValueError, match="need neutral and expressive references"):
        M.calibrate_style("pitch", [], [220.0])
    with pytest.raises(ValueError, match="unknown cue 'loudness'"):
        M.calibrate_style("loudness", [1.0], [2.0])


def speech_like(seconds: float, lead: float = 0.3, tail: float = 0.5) -> np.ndarray:
    """A tone of `seconds` between stretches of near-silence (noise 60 dB down)."""
    rng = np.random.default_rng(0)
    quiet = lambda s: 5e-4 * rng.standard_normal(int(s * SR)).astype(np.float32)  # noqa: E731
    return np.concatenate([quiet(lead), tone(150.0, seconds), quiet(tail)])


def test_rate_rule_times_speech_without_its_silences():
    text = "It is a three."  # 10 letters
    assert M.seconds_per_letter(speech_like(1.0), SR, text) == pytest.approx(0.1, abs=0.003)
    assert M.seconds_per_letter(speech_like(1.0, 0.0, 1.5), SR, text) == pytest.approx(
        0.1, abs=0.003)  # trailing silence is not speech
    assert math.isnan(M.seconds_per_letter(np.zeros(SR, np.float32), SR, text))
    assert math.isnan(M.seconds_per_letter(speech_like(1.0), SR, " ... "))  # no letters
    neutral = [M.seconds_per_letter(w, SR, text)
               for w in (speech_like(1.0), speech_like(1.1), np.zeros(SR, np.float32))]
    expressive = [M.seconds_per_letter(speech_like(s), SR, text) for s in (0.7, 0.8)]
    rule = M.calibrate_style("rate", neutral, expressive)
    assert (rule.neutral_count, rule.expressive_count) == (2, 2)  # the silent one left out
    assert rule.threshold == pytest.approx((0.105 + 0.075) / 2, abs=0.003)
    assert rule.is_expressive(M.seconds_per_letter(speech_like(0.75), SR, text))
    assert not rule.is_expressive(M.seconds_per_letter(speech_like(1.05), SR, text))
    assert not rule.is_expressive(float("nan"))
    # near-empty speech is faster than any expressive reference: not expressive
    assert not rule.is_expressive(M.seconds_per_letter(speech_like(0.2), SR, text))
    with pytest.raises(ValueError, match="are not lower than neutral ones"):
        M.calibrate_style("rate", expressive, neutral)
