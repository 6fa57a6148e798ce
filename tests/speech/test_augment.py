"""speech.augment: perturbed unit copies (runs dropped / shortened / lengthened, never empty)
and their wavs cut from the exact vocoding, one hop per unit."""

import numpy as np
import pytest

from omni_jax.speech.augment import UnitPerturb, cut_wav, perturb_frames, unit_spans

UNITS = np.array([3, 39, 59, 16, 16, 16, 60, 60, 60])  # "two", as the demo's references say it
RUNS = 5


def _runs(seq):
    return [int(u) for k, u in enumerate(seq) if k == 0 or seq[k - 1] != u]


def test_no_perturbation_is_the_identity():
    rng = np.random.default_rng(0)
    frames = perturb_frames(UNITS, UnitPerturb(0.0, 0.0, 0.0), rng)
    np.testing.assert_array_equal(frames, np.arange(UNITS.size))


@pytest.mark.parametrize("seed", range(20))
def test_a_perturbed_copy_keeps_order_and_whole_runs(seed):
    rng = np.random.default_rng(seed)
    frames = perturb_frames(UNITS, UnitPerturb(0.3, 0.3, 0.1), rng)
    assert frames.size >= 1 and np.all(np.diff(frames) >= 0)  # in order, a repeat at most
    kept = _runs(UNITS[frames].tolist())
    full = _runs(UNITS.tolist())
    it = iter(full)
    assert all(u in it for u in kept)  # a subsequence of the runs: dropped, never reordered
    for u in kept:  # a kept run is its own length, one less (>= 1) or one more
        n, m = int(np.sum(UNITS == u)), int(np.sum(UNITS[frames] == u))
        assert m in (n - 1, n, n + 1) and m >= 1


def test_the_odds_are_the_configured_ones():
    rng = np.random.default_rng(1)
    p = UnitPerturb(0.3, 0.3, 0.1)
    kept = [len(_runs(UNITS[perturb_frames(UNITS, p, rng)].tolist())) for _ in range(4000)]
    # E[kept runs] = 5 * 0.7 (+ a run forced back when all 5 are drawn dropped: 0.3^5)
    assert abs(np.mean(kept) - (RUNS * 0.7 + 0.3 ** RUNS)) < 0.05
    long = [int(np.sum(UNITS[perturb_frames(UNITS, UnitPerturb(0.0, 0.3, 0.1), rng)] == 16))
            for _ in range(4000)]  # the 3-unit run of 16s: 2 at 0.3, 4 at 0.1
    assert abs(np.mean(np.array(long) == 2) - 0.3) < 0.03
    assert abs(np.mean(np.array(long) == 4) - 0.1) < 0.02


def test_never_empty():
    rng = np.random.default_rng(2)
    for _ in range(200):
        assert perturb_frames(np.array([7]), UnitPerturb(0.99, 0.0, 0.0), rng).size == 1


def test_unit_spans_centre_each_unit_on_its_frame():
    starts, ends = unit_spans(4, 8)
    np.testing.assert_array_equal(starts, [0, 4, 12, 20])
    np.testing.assert_array_equal(ends, [4, 12, 20, 32])


def test_cut_wav_takes_each_units_samples():
    hop = 8
    wav = np.arange(UNITS.size * hop, dtype=np.float32) + 1.0
    np.testing.assert_array_equal(cut_wav(wav, np.arange(UNITS.size), hop), wav)  # all kept
    frames = np.array([1, 2, 2, 5])
    out = cut_wav(wav, frames, hop, fade=2)
    ramp = np.array([0.25, 0.75], np.float32)
    # unit 1 = samples 4..11 (faded in: unit 0 dropped), unit 2 = 12..19 twice (a cut between
    # the copies and after the second), unit 5 = 36..43 (faded in, and out: unit 6 dropped)
    both = np.r_[ramp, 1, 1, 1, 1, ramp[::-1]]
    want = [wav[4:12] * np.r_[ramp, np.ones(6)], wav[12:20] * np.r_[np.ones(6), ramp[::-1]],
            wav[12:20] * both, wav[36:44] * both]
    np.testing.assert_allclose(out, np.concatenate(want), rtol=1e-6)
    assert np.all(out != 0)  # a ramp never zeroes a sample
    np.testing.assert_array_equal(cut_wav(wav, frames, hop, fade=0),
                                  np.concatenate([wav[4:12], wav[12:20], wav[12:20], wav[36:44]]))


@pytest.mark.parametrize("kwargs", [dict(drop_run=1.0), dict(shorten=-0.1), dict(lengthen=True),
                                    dict(shorten=0.6, lengthen=0.5), dict(lengthen="x")])
def test_bad_odds_raise(kwargs):
    with pytest.raises(ValueError, match="UnitPerturb"):
        UnitPerturb(**kwargs)


def test_odds_of_one_and_numpy_floats_are_accepted():
    rng = np.random.default_rng(0)
    frames = perturb_frames(UNITS, UnitPerturb(np.float32(0.0), 1.0, 0.0), rng)
    assert [int(np.sum(UNITS[frames] == u)) for u in (3, 39, 59, 16, 60)] == [1, 1, 1, 2, 2]


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        perturb_frames(np.array([], np.int32), UnitPerturb(), rng)
    with pytest.raises(ValueError, match="whole number"):
        cut_wav(np.zeros(10, np.float32), np.array([0]), 4)
    with pytest.raises(ValueError, match="indices in"):
        cut_wav(np.zeros(8, np.float32), np.array([2]), 4)
    with pytest.raises(ValueError, match="int array"):
        cut_wav(np.zeros(8, np.float32), np.array([0.5]), 4)
    with pytest.raises(ValueError, match="fade"):
        cut_wav(np.zeros(8, np.float32), np.array([0]), 4, fade=-1)
