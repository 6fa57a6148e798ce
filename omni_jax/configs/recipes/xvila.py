"""X-VILA (arXiv 2405.19335, paper only): the input-side alignment phases.

x_text_align: modality projectors on X-text pairs (LLM, encoders frozen); interleaved:
interleaved multimodal pretraining, LLM + projectors; instruct: X-to-text instruction tuning,
LLM + projectors. The output side (diffusion decoders, the visual embedding highway's
decoder alignment) comes with the decoders: the `highway` stays frozen here.
LRs are not in the abstract: 1e-3 alignment, 2e-5 LLM tuning (our choices).
"""

from omni_jax.configs import common

ORDER = ("x_text_align", "interleaved", "instruct")
PROJECTORS = ["^image_adapter/", "^video_adapter/", "^audio_adapter/"]


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b"})
    pairs = common.mixture(image_caption=1.0, video_qa=0.5, speech_asr=1.0)
    stages = {
        "x_text_align": common.stage(
            description="encoder-LLM alignment on X-text pairs: projectors only",
            trainable=PROJECTORS, sources=pairs, lr=1e-3, epochs=1.0, batch_size=256),
        "interleaved": common.stage(
            description="interleaved multimodal pretraining: LLM + projectors",
            trainable=["^llm/", *PROJECTORS],
            sources=pairs | common.mixture(text_chat=1.0), lr=2e-5, epochs=1.0, batch_size=128),
        "instruct": common.stage(
            description="X-to-text instruction tuning: LLM + projectors",
            trainable=["^llm/", *PROJECTORS],
            sources=common.mixture(image_qa=2.0, video_qa=1.0, speech_asr=1.0, text_chat=1.0),
            lr=2e-5, epochs=1.0, batch_size=128),
    }
    return common.recipe("xvila", a["model"], "xvila", ORDER, stages)
