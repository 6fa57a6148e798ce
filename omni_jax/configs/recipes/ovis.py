"""Ovis (arXiv 2405.20797): visual tokenizer (head + VTE) alignment in three stages.

S1: visual head + VTE (+ the last ViT layer) on captions, LLM frozen, lr 1e-4; S2: the whole
visual tokenizer (ViT + head) + VTE, LLM frozen; S3: everything, lr 2e-5. Cosine, clip 1.0.
`last_vit=no` drops the last ViT layer from S1.
"""

from omni_jax.configs import common

ORDER = ("s1", "s2", "s3")


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b", "last_vit": "yes"})
    common.choose("last_vit", a["last_vit"], ("yes", "no"))
    model = common.load_model(common.choose("model", a["model"], common.MODEL_NAMES), "ovis")
    last = model.image.encoder_config.num_layers - 1
    head = ["^image_adapter/head_", "^image_adapter/vte/"]
    if a["last_vit"] == "yes":
        head += [f"^image_encoder/layers_{last}/", "^image_encoder/post_norm/"]
    base = dict(warmup_ratio=0.03, epochs=1.0, clip_norm=1.0)
    stages = {
        "s1": common.stage(description="S1: visual head + VTE (+ last ViT layer), LLM frozen",
                           trainable=head, sources=common.mixture(image_caption=1.0),
                           lr=1e-4, batch_size=256, **base),
        "s2": common.stage(description="S2: whole visual tokenizer + VTE, LLM frozen",
                           trainable=["^image_encoder/", "^image_adapter/"],
                           sources=common.mixture(image_caption=1.0, image_qa=1.0),
                           lr=1e-4, batch_size=256, **base),
        "s3": common.stage(description="S3: all parameters on multimodal instructions",
                           trainable=[".*"],
                           sources=common.mixture(image_qa=2.0, image_caption=0.5, text_chat=1.0),
                           lr=2e-5, batch_size=128, **base),
    }
    return common.recipe("ovis", a["model"], "ovis", ORDER, stages)
