"""eval.style.calibrate_cues: the style rules calibrated on vocoded reference pairs, voiced and
measured once per process for a vocoder with a fingerprint (the demo evaluates two stages on
the same references), every time without one."""

import numpy as np

from omni_jax.eval import style as S
from omni_jax.eval import tasks as T

RATE = 16000


class _Vocoder:
    """Units -> a tone: 220 Hz for units >= 10 (the 'expressive' references), 120 Hz else;
    0.1 s per unit. Counts its calls."""

    sample_rate = RATE

    def __init__(self, fingerprint=None):
        self.calls, self.fingerprint = 0, fingerprint

    def __call__(self, units):
        self.calls += 1
        f0 = 220.0 if min(units) >= 10 else 120.0
        t = np.arange(int(0.1 * RATE * len(units))) / RATE
        return (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


class _Ev:
    def __init__(self, vocoder):
        self.vocoder, self.sample_rate = vocoder, RATE

    def vocode_many(self, units):
        return [self.vocoder(np.asarray(u)) for u in units]


def _items(n, offset=0):
    return [T.Item("m.jsonl", i, f"r{i}", "speech_dpo", {
        "speech_units": [10 + (i + offset) % 5] * 6, "speech_units_rejected": [1] * 8,
        "messages": [{"role": "user", "content": "Say it."},
                     {"role": "assistant", "content": "It is a two."}]}) for i in range(n)]


def test_calibration_is_cached_per_vocoder_fingerprint_and_references():
    S._CALIBRATED.clear()
    voc = _Vocoder("abc")
    cues, rules = S.calibrate_cues(_Ev(voc), _items(4))
    assert voc.calls == 8  # 4 pairs, both sides
    pitch = cues["pitch"]
    assert pitch["reference_accuracy"] == 1.0 and rules["pitch"].is_expressive(220.0)
    assert not rules["pitch"].is_expressive(120.0)
    again = S.calibrate_cues(_Ev(voc), _items(4))
    assert voc.calls == 8 and again == (cues, rules)  # nothing voiced or measured again
    S.calibrate_cues(_Ev(voc), _items(4, offset=1))  # other references: calibrated anew
    assert voc.calls == 16
    S.calibrate_cues(_Ev(_Vocoder("other")), _items(4))  # another vocoder: anew
    plain = _Vocoder()  # no fingerprint: never cached
    for _ in range(2):
        assert S.calibrate_cues(_Ev(plain), _items(4))[0]["pitch"] == pitch
    assert plain.calls == 16
    assert len(S._CALIBRATED) == 3
    for i in range(S.CACHED_CALIBRATIONS + 2):  # bounded
        S.calibrate_cues(_Ev(_Vocoder(f"v{i}")), _items(1))
    assert len(S._CALIBRATED) == S.CACHED_CALIBRATIONS
    S._CALIBRATED.clear()
