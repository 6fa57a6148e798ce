"""omni_digits record generators: image / video / speech tasks over scikit-learn's digits.

Images: the 1,797 bundled 8x8 digits (`sklearn.datasets.load_digits`, no download), stored as
uint8 ink intensity [8, 8] (0 = paper, 255 = ink). `split_images` puts each image in exactly
one split (80 / 10 / 10 per digit class, deterministic), ordered round-robin over the classes
so any prefix of a split covers all ten digits.

Every record is one flat example (FIELDS; unused fields are empty) with a `task`:
  image_caption    image -> "This is a seven."
  image_qa         image + question ("What digit is this?", "Is this digit even?", ...)
  speech_asr       3-5 spoken digits in a split voice -> transcript "three one four"
  spoken_image_qa  image + the image_qa question as speech -> short answer
  video_qa         3-5 digit frames + question on order / count / sum / first / last
  video_spoken_qa  video + the question as speech
  text_chat        text-only digit arithmetic
  speech_response  image + question -> sentence (or short) answer + its neutral rendering
                   and units
  speech_dpo       the same (sentence or short answer); chosen = an expressive rendering,
                   rejected = the neutral one
  text_to_image    "Draw a seven." -> an image out (target: a split image of that digit)
  image_to_image   image + "Reproduce this image." -> the same image out
  video_next_frame 3 frames of consecutive digits (d, d+1, d+2 mod 10) -> a d+3 image out
Image-out tasks (X-VILA) put their target in `target_image` (+ `target_index`) and leave
`answer` empty: the assistant's turn is the image.
`prompt` is the user's text (for spoken tasks: the transcript of the spoken question).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from omni_jax.data.fixtures import DIGIT_WORDS
from omni_jax.data.omni_digits import voices as V

# task -> user content parts, in order ("audio" in a QA task = the question is spoken)
TASKS = {
    "image_caption": ("image", "text"),
    "image_qa": ("image", "text"),
    "speech_asr": ("audio", "text"),
    "spoken_image_qa": ("image", "audio"),
    "video_qa": ("video", "text"),
    "video_spoken_qa": ("video", "audio"),
    "text_chat": ("text",),
    "speech_response": ("image", "text"),
    "speech_dpo": ("image", "text"),
    "text_to_image": ("text",),
    "image_to_image": ("image", "text"),
    "video_next_frame": ("video", "text"),
}
IMAGE_OUT = ("text_to_image", "image_to_image", "video_next_frame")
SPEECH_OUT = ("speech_response", "speech_dpo")  # answers spoken by speech_fn
# records per task = ceil(ratio * images in the split) (capped by the config's max_per_task)
RATIOS = {"image_caption": 1.0, "image_qa": 2.0, "speech_asr": 1.0, "spoken_image_qa": 1.0,
          "video_qa": 2.0, "video_spoken_qa": 0.5, "text_chat": 0.5, "speech_response": 1.0,
          "speech_dpo": 0.5, "text_to_image": 1.0, "image_to_image": 1.0,
          "video_next_frame": 0.5}
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
# share of speech_response answers that are the short answer ("three", "yes") instead of the
# sentence ("It is a three."): the LLM answers image questions as image_qa taught it
SHORT_SPOKEN = 0.5
IMAGE_SHAPE = (8, 8)
TEXT_FIELDS = ("id", "task", "prompt", "answer", "voice", "style", "style_rejected")
# array fields: (dtype, shape)
ARRAY_FIELDS = {
    "image": (np.uint8, (None, *IMAGE_SHAPE)),  # 0 or 1 image
    "video": (np.uint8, (None, *IMAGE_SHAPE)),  # 0 or 3-5 frames
    "image_index": (np.int32, (None,)),  # sklearn indices of the image / the frames
    "digits": (np.int32, (None,)),  # labels of the image / frames, or the spoken digits
    "audio": (np.int16, (None,)),  # user speech, 16 kHz
    "speech": (np.int16, (None,)),  # spoken answer (DPO: chosen), 16 kHz
    "speech_units": (np.int32, (None,)),
    "speech_rejected": (np.int16, (None,)),
    "speech_units_rejected": (np.int32, (None,)),
    "target_image": (np.uint8, (None, *IMAGE_SHAPE)),  # image-out tasks: 1 image out
    "target_index": (np.int32, (None,)),  # its sklearn index
}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Caption this image.")
CAPTIONS = ("This is {a} {w}.", "The image shows the digit {w}.", "A handwritten {w}.")
WHAT = ("What digit is this?", "Which digit is shown?", "What number is in the picture?")
DRAW_PROMPTS = ("Draw a {w}.", "Show me the digit {w}.", "Generate an image of {w}.")
COPY_PROMPT = "Reproduce this image."
NEXT_PROMPT = "Draw the next frame."
ASR_PROMPTS = ("Transcribe the audio.", "What is said in this clip?",
               "Write down the spoken digits.")
VIDEO_QUESTIONS = {"order": "Which digits appear, in order?",
                   "count": "How many digits are shown?",
                   "sum": "What is the sum of the digits?",
                   "first": "What is the first digit?", "last": "What is the last digit?"}
# answer text, style -> (int16 waveform, units int32)
SpeechFn = Callable[[str, V.Style], tuple[np.ndarray, np.ndarray]]

_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
          "seventeen", "eighteen", "nineteen")


def number_words(n: int) -> str:
    """0..99 -> English words ("twenty three")."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words: expected 0..99, got {n}")
    if n < 10:
        return DIGIT_WORDS[n]
    if n < 20:
        return _TEENS[n - 10]
    return _TENS[n // 10] + ("" if n % 10 == 0 else " " + DIGIT_WORDS[n % 10])


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" and word != "one" else "a"


@functools.lru_cache(maxsize=1)
def load_images() -> tuple[np.ndarray, np.ndarray]:
    """-> (pixels uint8 [1797, 8, 8] ink 0..255, labels int32 [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    pixels.setflags(write=False)
    return pixels, d.target.astype(np.int32)


def split_images(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified, deterministic split of image indices (each in exactly one split), each
    split ordered round-robin over the digit classes."""
    labels = np.asarray(labels)
    per_class: dict[str, list[np.ndarray]] = {s: [] for s in V.SPLITS}
    for c in range(10):
        idx = np.random.default_rng([seed, c]).permutation(np.flatnonzero(labels == c))
        n_val = round(FRACTIONS["validation"] * idx.size)
        n_test = round(FRACTIONS["test"] * idx.size)
        per_class["test"].append(idx[:n_test])
        per_class["validation"].append(idx[n_test:n_test + n_val])
        per_class["train"].append(idx[n_test + n_val:])
    out = {}
    for s, lists in per_class.items():
        order = [x for rank in range(max(map(len, lists))) for x in
                 (li[rank] for li in lists if rank < len(li))]
        out[s] = np.asarray(order, np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """What one split holds: its images (sklearn indices), voices and records per task."""

    split: str
    images: tuple[int, ...]
    voices: tuple[str, ...]
    counts: Mapping[str, int]
    seed: int


def make_plans(max_images: Mapping[str, int] | None = None, max_per_task: int = 0,
               seed: int = 0, uncapped: Sequence[str] = ()) -> dict[str, SplitPlan]:
    """Plans of train / validation / test. max_images: per-split image caps (a prefix of the
    split's images; absent or 0 = all); max_per_task: records per task cap (0 = none), except
    for the tasks named in `uncapped`."""
    if max_per_task < 0:
        raise ValueError(f"make_plans: max_per_task must be >= 0, got {max_per_task}")
    if set(uncapped) - set(RATIOS):
        raise ValueError(f"make_plans: uncapped must name tasks of {sorted(RATIOS)}, got "
                         f"{list(uncapped)}")
    caps = dict(max_images or {})
    unknown = sorted(set(caps) - set(V.SPLITS))
    if unknown or any(int(v) < 0 for v in caps.values()):
        raise ValueError(f"make_plans: max_images must map splits {list(V.SPLITS)} to counts "
                         f">= 0, got {caps}")
    _, labels = load_images()
    plans = {}
    for s, idx in split_images(labels, seed).items():
        if caps.get(s):
            idx = idx[:caps[s]]
        counts = {t: math.ceil(r * idx.size) for t, r in RATIOS.items()}
        if max_per_task:
            counts = {t: c if t in uncapped else min(c, max_per_task)
                      for t, c in counts.items()}
        plans[s] = SplitPlan(s, tuple(int(i) for i in idx), V.voices(s), counts, seed)
    return plans


def _example(**fields: Any) -> dict[str, Any]:
    """A full FIELDS dict: given fields, empty text / arrays for the rest."""
    unknown = set(fields) - set(TEXT_FIELDS) - set(ARRAY_FIELDS)
    if unknown:
        raise ValueError(f"_example: unknown fields {sorted(unknown)}")
    out: dict[str, Any] = {k: str(fields.get(k, "")) for k in TEXT_FIELDS}
    for k, (dtype, shape) in ARRAY_FIELDS.items():
        empty = np.zeros((0, *shape[1:]), dtype)
        out[k] = np.asarray(fields[k], dtype) if k in fields else empty
    return out


def _image_question(rng: np.random.Generator, d: int) -> tuple[str, str, str]:
    """A question about digit d -> (question, short answer, sentence answer)."""
    w = DIGIT_WORDS[d]
    kind = rng.choice(["what", "even", "greater"], p=[0.5, 0.25, 0.25])
    if kind == "what":
        return WHAT[rng.integers(len(WHAT))], w, f"It is {_a(w)} {w}."
    if kind == "even":
        even = d % 2 == 0
        return ("Is this digit even?", "yes" if even else "no",
                f"Yes, {w} is even." if even else f"No, {w} is odd.")
    t = int(rng.choice([x for x in range(9) if x != d]))
    tw, big = DIGIT_WORDS[t], d > t
    return (f"Is this digit greater than {tw}?", "yes" if big else "no",
            f"Yes, {w} is greater than {tw}." if big else f"No, {w} is not greater than {tw}.")


def _video_question(rng: np.random.Generator, ds: list[int]) -> tuple[str, str]:
    kind = list(VIDEO_QUESTIONS)[rng.integers(len(VIDEO_QUESTIONS))]
    answer = {"order": " ".join(DIGIT_WORDS[d] for d in ds), "count": number_words(len(ds)),
              "sum": number_words(sum(ds)), "first": DIGIT_WORDS[ds[0]],
              "last": DIGIT_WORDS[ds[-1]]}[kind]
    return VIDEO_QUESTIONS[kind], answer


def generate(plan: SplitPlan, task: str, speech_fn: SpeechFn | None = None,
             render: Callable[[str, str, V.Style], np.ndarray] = V.render
             ) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of one task in one split: (key, FIELDS dict), deterministic for the plan.
    speech_fn renders and unit-encodes answers (required by speech_response / speech_dpo);
    render(text, voice, style) speaks the user's side (prefetch_speech records its calls)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if task in SPEECH_OUT and speech_fn is None:
        raise ValueError(f"generate: task {task!r} needs a speech_fn (answer -> wave, units)")
    if not plan.images:
        raise ValueError(f"generate: split {plan.split!r} has no images")
    pixels, labels = load_images()
    rng = np.random.default_rng([plan.seed, V.SPLITS.index(plan.split), list(TASKS).index(task)])
    imgs = plan.images

    # user prosody from its own stream: the rest of a split's records do not depend on it
    prosody = np.random.default_rng([plan.seed, V.SPLITS.index(plan.split),
                                     list(TASKS).index(task), 1])
    spoken = np.random.default_rng([plan.seed, V.SPLITS.index(plan.split),
                                    list(TASKS).index(task), 2])

    def voice() -> str:
        return plan.voices[int(rng.integers(len(plan.voices)))]

    def say(text: str, v: str) -> np.ndarray:
        return render(text, v, V.user_style(plan.split, prosody))

    for i in range(plan.counts[task]):
        key = f"{plan.split}-{task}-{i:05d}"
        idx = imgs[i % len(imgs)]
        d = int(labels[idx])
        image = dict(image=pixels[idx][None], image_index=[idx], digits=[d])
        if task == "image_caption":
            w = DIGIT_WORDS[d]
            cap = CAPTIONS[rng.integers(len(CAPTIONS))].format(a=_a(w), w=w)
            ex = _example(**image, prompt=CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))],
                          answer=cap[0].upper() + cap[1:])
        elif task in ("image_qa", "spoken_image_qa"):
            q, short, _ = _image_question(rng, d)
            ex = _example(**image, prompt=q, answer=short)
            if task == "spoken_image_qa":
                v = voice()
                ex.update(voice=v, audio=say(q, v))
        elif task == "speech_asr":
            ds = [int(x) for x in rng.integers(10, size=int(rng.integers(3, 6)))]
            text, v = " ".join(DIGIT_WORDS[x] for x in ds), voice()
            ex = _example(prompt=ASR_PROMPTS[rng.integers(len(ASR_PROMPTS))], answer=text,
                          voice=v, audio=say(text, v), digits=ds)
        elif task in ("video_qa", "video_spoken_qa"):
            n = int(rng.integers(3, 6))
            frames = [int(x) for x in rng.choice(imgs, size=min(n, len(imgs)), replace=False)]
            ds = [int(labels[f]) for f in frames]
            q, answer = _video_question(rng, ds)
            ex = _example(video=pixels[frames], image_index=frames, digits=ds, prompt=q,
                          answer=answer)
            if task == "video_spoken_qa":
                v = voice()
                ex.update(voice=v, audio=say(q, v))
        elif task == "text_chat":
            x, y = (int(t) for t in rng.integers(10, size=2))
            plus = bool(rng.integers(2)) or x < y
            op, r = ("plus", x + y) if plus else ("minus", x - y)
            xw, yw = DIGIT_WORDS[x], DIGIT_WORDS[y]
            ex = _example(prompt=f"What is {xw} {op} {yw}?", digits=[x, y],
                          answer=f"{xw.capitalize()} {op} {yw} is {number_words(r)}.")
        elif task in IMAGE_OUT:
            ex = _image_out(task, rng, plan, i, pixels, labels)
        else:  # speech_response / speech_dpo
            q, short, sentence = _image_question(rng, d)
            assert speech_fn is not None
            # the generator must speak whatever the LLM says: a sentence, or the short answer
            # image_qa teaches (own stream: the rest of the record is as in 1.2.0); DPO pairs
            # too (1.4.0): trained on sentences alone, DPO made short answers unintelligible
            said = short if spoken.random() < SHORT_SPOKEN else sentence
            if task == "speech_response":
                wave, units = speech_fn(said, V.NEUTRAL)
                ex = _example(**image, prompt=q, answer=said, voice=V.ASSISTANT_VOICE,
                              style=V.NEUTRAL.name, speech=wave, speech_units=units)
            else:
                style = V.EXPRESSIVE[int(rng.integers(len(V.EXPRESSIVE)))]
                wave, units = speech_fn(said, style)
                rej, rej_units = speech_fn(said, V.NEUTRAL)
                ex = _example(**image, prompt=q, answer=said, voice=V.ASSISTANT_VOICE,
                              style=style.name, speech=wave, speech_units=units,
                              style_rejected=V.NEUTRAL.name, speech_rejected=rej,
                              speech_units_rejected=rej_units)
        ex["id"], ex["task"] = key, task
        yield key, ex


def _image_out(task: str, rng: np.random.Generator, plan: SplitPlan, i: int,
               pixels: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """An image-out record: its input (prompt, image or frames) and target image, all from
    the split's own images."""
    imgs = np.asarray(plan.images)
    by_digit = {d: imgs[labels[imgs] == d] for d in range(10)}

    def pick(d: int) -> int:
        pool = by_digit[d] if by_digit[d].size else imgs
        return int(pool[rng.integers(pool.size)])

    if task == "text_to_image":
        t = int(imgs[i % imgs.size])
        w = DIGIT_WORDS[int(labels[t])]
        return _example(prompt=DRAW_PROMPTS[rng.integers(len(DRAW_PROMPTS))].format(w=w),
                        digits=[int(labels[t])], target_image=pixels[t][None],
                        target_index=[t])
    if task == "image_to_image":
        t = int(imgs[i % imgs.size])
        return _example(image=pixels[t][None], image_index=[t], digits=[int(labels[t])],
                        prompt=COPY_PROMPT, target_image=pixels[t][None], target_index=[t])
    d0 = int(rng.integers(10))
    frames = [pick((d0 + k) % 10) for k in range(3)]
    t = pick((d0 + 3) % 10)
    return _example(video=pixels[frames], image_index=frames,
                    digits=[int(labels[f]) for f in frames] + [int(labels[t])],
                    prompt=NEXT_PROMPT, target_image=pixels[t][None], target_index=[t])


SPOKEN = ("speech_asr", "spoken_image_qa", "video_spoken_qa", *SPEECH_OUT)


def speech_wanted(plan: SplitPlan, task: str) -> list[tuple[str, str, V.Style]]:
    """Every (text, voice, style) rendering `generate(plan, task, ...)` asks for, in order, found
    by generating the task once without speaking (the records do not depend on the audio)."""
    wanted: list[tuple[str, str, V.Style]] = []
    silent = np.zeros(1, np.int16)

    def user(text: str, voice: str, style: V.Style) -> np.ndarray:
        wanted.append((text, voice, style))
        return silent

    def assistant(text: str, style: V.Style) -> tuple[np.ndarray, np.ndarray]:
        wanted.append((text, V.ASSISTANT_VOICE, style))
        return silent, np.zeros(1, np.int32)

    for _ in generate(plan, task, assistant, render=user):
        pass
    return wanted


def prefetch_speech(plan: SplitPlan, task: str, workers: int | None = None) -> int:
    """Render a task's speech ahead, several espeak-ng processes at a time (V.render_many), so
    that generating it then finds every waveform cached -> distinct renderings. At most the
    first V.RENDER_CACHE of them (a larger task renders the rest as it goes)."""
    if task not in SPOKEN:
        return 0
    return V.render_many(list(dict.fromkeys(speech_wanted(plan, task)))[:V.RENDER_CACHE], workers)


def generate_split(plan: SplitPlan, speech_fn: SpeechFn | None = None
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """All tasks' records of a split, task by task (each task's speech rendered ahead in
    parallel, prefetch_speech)."""
    for task in TASKS:
        if speech_fn is not None or task not in SPEECH_OUT:
            prefetch_speech(plan, task)  # (without speech_fn, generate refuses those two)
        yield from generate(plan, task, speech_fn)
