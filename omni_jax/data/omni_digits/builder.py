"""TFDS builder of omni_digits: offline omni-modal records from sklearn digits + espeak-ng.

    builder = prepare("small", data_dir)            # download_and_prepare(array_record)
    source = builder.as_data_source(split="train")  # or tfds.data_source("omni_digits/small",
                                                    #   data_dir=data_dir, split="train")
No TensorFlow is needed, to write or to read: every feature is a `tfds.features.Tensor`
(numpy codec) or `Text`, the file format is array_record, and reading goes through
`as_data_source` (array_record + numpy decoding). `tfds.features.Audio` / `Image` are not used
because they need TensorFlow to encode; audio is int16 [samples] at 16 kHz (metadata
"sample_rate"), images uint8 [n, 8, 8]. Text fields come back as bytes.

The speech answers' target units come from the project's unit tokenizer
(omni_jax.speech.units), fitted on the train split's answer renderings only and saved with
its mel-table vocoder next to the records: <dataset dir>/units (see `units_dir`).
Configs: "small" (a few records per task, for tests) and "full" (all 1,797 images).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from omni_jax.data.omni_digits import tasks as T
from omni_jax.data.omni_digits import voices as V

UNITS_SUBDIR = "units"


@dataclasses.dataclass(eq=False)
class OmniDigitsConfig(tfds.core.BuilderConfig):
    """max_images: image caps per split (train, validation, test; 0 = all); max_per_task:
    records per task cap (0 = none) except for the `uncapped` tasks; unit tokenizer vocab /
    frame rate; seed."""

    max_images: tuple[int, int, int] = (0, 0, 0)
    max_per_task: int = 0
    uncapped: tuple[str, ...] = ()
    unit_vocab: int = 64
    unit_frame_rate: int = 25
    seed: int = 0

    def plans(self) -> dict[str, T.SplitPlan]:
        caps = dict(zip(V.SPLITS, self.max_images, strict=True))
        return T.make_plans(caps, self.max_per_task, self.seed, self.uncapped)


CONFIGS = (
    OmniDigitsConfig(name="small", description="A few records per task (tests).",
                     max_images=(20, 10, 10), max_per_task=4, unit_vocab=32),
    OmniDigitsConfig(name="ci", description="Every image task on 400 train images, a few "
                     "records of the others (the shortened-curriculum test).",
                     max_images=(400, 10, 80), max_per_task=4, unit_vocab=32,
                     uncapped=("image_caption", "image_qa")),
    OmniDigitsConfig(name="full", description="All 1,797 digit images."),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


def _features() -> tfds.features.FeaturesDict:
    feats: dict[str, Any] = {k: tfds.features.Text() for k in T.TEXT_FIELDS}
    for k, (dtype, shape) in T.ARRAY_FIELDS.items():
        feats[k] = tfds.features.Tensor(shape=shape, dtype=dtype)
    return tfds.features.FeaturesDict(feats)


class OmniDigits(tfds.core.GeneratorBasedBuilder):
    """Omni-modal digits: captions, QA, ASR, spoken QA, video QA, speech answers, DPO pairs."""

    VERSION = tfds.core.Version("1.5.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Image-out tasks (text_to_image, image_to_image, "
                              "video_next_frame) with target_image / target_index.",
                     "1.2.0": "32 train voices (was 8), train user speech at a random pitch "
                              "and speed per clip.",
                     "1.3.0": "speech_response: half the answers are the short answer "
                              "(as image_qa) instead of the sentence.",
                     "1.4.0": "speech_dpo: half the pairs say the short answer too.",
                     "1.5.0": "video_qa: 2 records per image (was 0.5); the first 1.4.0 ones "
                              "unchanged."}
    BUILDER_CONFIGS = list(CONFIGS)

    def _info(self) -> tfds.core.DatasetInfo:
        meta = tfds.core.MetadataDict(
            sample_rate=V.SAMPLE_RATE, voices={s: list(v) for s, v in V.VOICES.items()},
            assistant_voice=V.ASSISTANT_VOICE, units_dir=UNITS_SUBDIR,
            styles={s.name: s._asdict() for s in V.STYLES.values()})
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=_features(), metadata=meta,
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html")

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # offline: sklearn's bundled digits + the local espeak-ng
        t0 = time.time()
        cfg = self.builder_config
        plans = cfg.plans()
        tok = self._fit_units(plans["train"], os.fspath(self.data_path / UNITS_SUBDIR))
        self.info.metadata.update(espeak_version=V.espeak_version(),
                                  units_fit_seconds=round(time.time() - t0, 2),
                                  counts={s: dict(p.counts) for s, p in plans.items()})
        speech = _speech_fn(tok)
        return {s: self._generate_examples(plans[s], speech) for s in V.SPLITS}

    def _fit_units(self, train: T.SplitPlan, directory: str) -> Any:
        """Fit the unit tokenizer (+ vocoder) on the train split's answer renderings."""
        from omni_jax.speech.units import UnitConfig, UnitTokenizer
        from omni_jax.speech.vocoder import MelTableVocoder

        waves: dict[tuple[str, V.Style], np.ndarray] = {}

        def collect(text: str, style: V.Style) -> tuple[np.ndarray, np.ndarray]:
            wave = waves.setdefault((text, style), V.render(text, V.ASSISTANT_VOICE, style))
            return wave, np.zeros(1, np.int32)

        for task in T.SPEECH_OUT:
            T.prefetch_speech(train, task)
            for _ in T.generate(train, task, collect):
                pass
        cfg = self.builder_config
        config = UnitConfig(vocab_size=cfg.unit_vocab, frame_rate=cfg.unit_frame_rate,
                            seed=cfg.seed)
        data = [w.astype(np.float32) / 32768.0 for w in waves.values()]
        tok = UnitTokenizer.fit(data, config)
        tok.save(directory)
        MelTableVocoder.fit(tok, data).save(directory)
        return tok

    def _generate_examples(self, plan: T.SplitPlan, speech: T.SpeechFn) -> Any:
        yield from T.generate_split(plan, speech)


def _speech_fn(tok: Any) -> T.SpeechFn:
    """Answer text, style -> (assistant-voice int16 rendering, its units), cached."""
    cache: dict[tuple[str, V.Style], tuple[np.ndarray, np.ndarray]] = {}

    def fn(text: str, style: V.Style) -> tuple[np.ndarray, np.ndarray]:
        if (text, style) not in cache:
            wave = V.render(text, V.ASSISTANT_VOICE, style)
            cache[text, style] = wave, tok.encode(wave.astype(np.float32) / 32768.0,
                                                  V.SAMPLE_RATE)
        return cache[text, style]

    return fn


def _check_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    if data_dir is None:
        return None
    path = os.fspath(data_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"omni_digits: data_dir {path!r} exists and is not a directory; "
                         f"expected a (possibly new) directory")
    return path


def make_builder(config: str = "small", data_dir: str | os.PathLike | None = None
                 ) -> OmniDigits:
    """The OmniDigits builder of a config ("small" / "full") under data_dir."""
    if config not in CONFIG_NAMES:
        raise ValueError(f"omni_digits: unknown config {config!r}; expected one of "
                         f"{list(CONFIG_NAMES)}")
    return OmniDigits(config=config, data_dir=_check_data_dir(data_dir))


def prepare(config: str = "small", data_dir: str | os.PathLike | None = None) -> OmniDigits:
    """Build (once; later calls reuse it) the array_record dataset offline -> the builder."""
    builder = make_builder(config, data_dir)
    if not builder.is_prepared():
        V.espeak_exe()  # fail early, before tfds creates directories
        builder.download_and_prepare(file_format="array_record")
    return builder


def units_dir(builder: OmniDigits) -> str:
    """Directory of the saved unit tokenizer + vocoder of a prepared dataset."""
    path = os.fspath(builder.data_path / UNITS_SUBDIR)
    if not os.path.isfile(os.path.join(path, "units.json")):
        raise ValueError(f"omni_digits: no unit tokenizer at {path!r}; is the dataset "
                         f"prepared (prepare(config, data_dir))?")
    return path
