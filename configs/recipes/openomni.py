"""OpenOmni (arXiv 2501.04561) understanding stages I-III (IV-V come with the speech generator).

I speech -> text: speech projector only (LLM, Whisper frozen), lr 1e-3; II image pretraining:
image projector only (LLM frozen), lr 1e-3; III image instruction: LLM + projector + ViT at
5e-5, the ViT at a lower LR (lr group `vit`, scale 0.2 as LLaVA-style recipes; our choice).
AdamW; warmup ratio 0.03 (code) or `warmup=paper` for the paper's 0.3.
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configs import common  # noqa: E402

ORDER = ("speech_text", "image_pretrain", "image_instruct")
WARMUP = {"code": 0.03, "paper": 0.3}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b", "warmup": "code"})
    base = dict(warmup_ratio=WARMUP[common.choose("warmup", a["warmup"], tuple(WARMUP))],
                epochs=1.0, weight_decay=0.0)
    stages = {
        "speech_text": common.stage(
            description="I speech->text alignment: speech projector (LLM frozen)",
            trainable=["^audio_adapter/"], sources=common.mixture(speech_asr=1.0),
            lr=1e-3, batch_size=256, **base),
        "image_pretrain": common.stage(
            description="II image pretraining: image projector (LLM frozen)",
            trainable=["^image_adapter/"], sources=common.mixture(image_caption=1.0),
            lr=1e-3, batch_size=256, **base),
        "image_instruct": common.stage(
            description="III image instruction: LLM + projector + ViT (lower ViT LR)",
            trainable=["^llm/", "^image_adapter/", "^image_encoder/"],
            lr_groups={"vit": common.lr_group("^image_encoder/", 0.2)},
            sources=common.mixture(image_qa=3.0, image_caption=1.0, text_chat=1.0),
            lr=5e-5, batch_size=128, **base),
    }
    return common.recipe("openomni", a["model"], "openomni", ORDER, stages)
