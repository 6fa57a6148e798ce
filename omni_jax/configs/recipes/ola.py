"""Ola (arXiv 2502.04328): progressive modality alignment.

Default order = the released code's: image projector alignment -> image-text -> + video ->
speech projector alignment -> + speech (cross-modal video-audio). `order=paper` gives the
abstract's image/text -> speech -> video. Encoders stay frozen after alignment; the LLM and
the projectors train. LR 1e-5 cosine, warmup 0.05, no weight decay, 1 epoch per stage
(projector-only alignment: 1e-3, the usual LLaVA-style pretraining LR; our choice).

  python -m omni_jax.cli.train --config omni_jax/configs/recipes/ola.py:model=tiny --workdir DIR
"""

from omni_jax.configs import common

ORDERS = {"code": ("image_align", "image_text", "video", "speech_align", "speech"),
          "paper": ("image_align", "image_text", "speech_align", "speech", "video")}
PROJECTORS = ["^image_adapter/", "^video_adapter/", "^audio_adapter/"]


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b", "order": "code"})
    order = ORDERS[common.choose("order", a["order"], tuple(ORDERS))]
    main = dict(lr=1e-5, warmup_ratio=0.05, weight_decay=0.0, epochs=1.0, batch_size=256)
    align = dict(main, lr=1e-3)
    # After the video stage (code order) the video projector trains along; in paper order it
    # joins only in the last stage, and the audio projector only from its own stage on.
    video_done = order.index("video") < order.index("speech")
    stages = {
        "image_align": common.stage(
            description="image projector alignment on captions (LLM, ViT frozen)",
            trainable=["^image_adapter/"], sources=common.mixture(image_caption=1.0), **align),
        "image_text": common.stage(
            description="image-text: LLM + image projector (encoders frozen)",
            trainable=["^llm/", "^image_adapter/"],
            sources=common.mixture(image_qa=3.0, image_caption=1.0, text_chat=1.0), **main),
        "video": common.stage(
            description="+ video: LLM + visual projectors (+ speech projector once aligned)",
            trainable=["^llm/", "^image_adapter/", "^video_adapter/"]
            + ([] if video_done else ["^audio_adapter/"]),
            sources=common.mixture(video_qa=2.0, image_qa=1.0, text_chat=0.5)
            | ({} if video_done else common.mixture(speech_asr=1.0)), **main),
        "speech_align": common.stage(
            description="speech projector alignment on ASR (LLM, encoders frozen)",
            trainable=["^audio_adapter/"], sources=common.mixture(speech_asr=1.0), **align),
        "speech": common.stage(
            description="+ speech: LLM + all projectors on ASR, spoken QA, video-audio",
            trainable=["^llm/", "^image_adapter/", "^audio_adapter/"]
            + (["^video_adapter/"] if video_done else []),
            sources=common.mixture(speech_asr=2.0, image_qa=1.0, text_chat=0.5)
            | (common.mixture(video_qa=1.0) if video_done else {}), **main),
    }
    return common.recipe("ola", a["model"], "ola", order, {k: stages[k] for k in order})
