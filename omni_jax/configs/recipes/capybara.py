"""Capybara-OMNI (arXiv 2504.12315, paper only): three phases with sub-stages (stage names
phase1a, phase1b, phase1c, phase2, phase3).

1a adapter only (LLM, ViT frozen); 1b / 1c all visual-path parameters + LLM (1c on high-res
tiles: raise the ImageConfig tile count / seq_len when the tiled data pipeline is used);
2 audio alignment: LLM and vision frozen, Whisper + audio adapter trained on ASR (+ speech
translation); 3 cross-modal instruction tuning: every parameter (spoken questions made by TTS).
The paper gives no LRs: 1e-3 for adapter-only phases, 2e-5 for full tuning, 1e-4 for the
audio phase (our choices).
"""

from omni_jax.configs import common

ORDER = ("phase1a", "phase1b", "phase1c", "phase2", "phase3")
VISUAL = ["^llm/", "^image_encoder/", "^image_adapter/", "^video_adapter/"]


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b"})
    full = dict(lr=2e-5, warmup_ratio=0.03, epochs=1.0, batch_size=128)
    stages = {
        "phase1a": common.stage(description="visual alignment: image adapter only",
                           trainable=["^image_adapter/"],
                           sources=common.mixture(image_caption=1.0),
                           **dict(full, lr=1e-3, batch_size=256)),
        "phase1b": common.stage(description="visual alignment: all visual parameters + LLM",
                           trainable=VISUAL,
                           sources=common.mixture(image_caption=1.0, image_qa=1.0, text_chat=0.5),
                           **full),
        "phase1c": common.stage(description="visual alignment on high-res tiles + video",
                           trainable=VISUAL,
                           sources=common.mixture(image_qa=2.0, video_qa=1.0, text_chat=0.5),
                           **dict(full, seq_len=4096)),
        "phase2": common.stage(description="audio alignment: LLM and vision frozen; Whisper + "
                          "audio adapter on ASR / speech translation",
                          trainable=["^audio_encoder/", "^audio_adapter/"],
                          sources=common.mixture(speech_asr=1.0), **dict(full, lr=1e-4)),
        "phase3": common.stage(description="cross-modal instruction tuning: all parameters",
                          trainable=[".*"],
                          sources=common.mixture(image_qa=1.0, video_qa=1.0, speech_asr=1.0,
                                                 text_chat=1.0), **full),
    }
    return common.recipe("capybara", a["model"], "capybara", ORDER, stages)
