"""X-VILA (arXiv 2405.19335, paper only): input-side alignment, then (output=on) the output side.

Input side: x_text_align: modality projectors on X-text pairs (LLM, encoders frozen);
interleaved: interleaved multimodal pretraining, LLM + projectors; instruct: X-to-text
instruction tuning, LLM + projectors. The `highway` stays frozen there.

Output side (`xvila:output=on`; the train model is omni_jax.train.xvila_model.XVilaLM with
`xvila_output` as its head, losses from `loss_modules`): decoder_align: the output projection
(+ our fresh image decoder, X-VILA's is a pretrained diffusion model) on X-text pairs, LLM
frozen; x2x_textual: X-to-X instruction tuning, textual alignment: LLM + projectors + output
projection on CE and diffusion; x2x_visual: visual alignment with the VEH: highway, its
projection and the decoder on image -> image data, LLM frozen.
LRs are not in the abstract: 1e-3 alignment, 2e-5 LLM tuning, 1e-4 visual alignment (ours).
"""

from omni_jax.configs import common

ORDER = ("x_text_align", "interleaved", "instruct")
OUTPUT_ORDER = ("decoder_align", "x2x_textual", "x2x_visual")
PROJECTORS = ["^image_adapter/", "^video_adapter/", "^audio_adapter/"]
OUT_PROJ = ["^xvila_head/out_proj/", "^xvila_head/gen_rows$"]
VEH = ["^highway/", "^xvila_head/veh_"]
DECODER = ["^image_decoder/"]
# output data: jsonl manifests with {"type": "gen_image"} assistant parts and a target image
# (omni_digits exports them: omni_jax.data.omni_digits.export)
OUTPUT_SOURCES = {"text_to_image": (), "image_to_image": ("image",),
                  "video_next_frame": ("video",)}
GEN_IMAGE_TOKEN = "<gen_image>"
# image decoder per model size: tiny = omni_digits' 8 x 8 grey digits (init_std ~ 1/sqrt(hidden))
DECODERS = {
    "tiny": dict(image_size=8, channels=1, patch_size=2, hidden=64, layers=2, heads=4,
                 cond_dim=32, time_freq_dim=64, num_train_timesteps=200,
                 beta_schedule="cosine", init_std=0.125),
    "real": dict(image_size=64, channels=3, patch_size=4, hidden=512, layers=12, heads=8,
                 cond_dim=512, num_train_timesteps=1000, beta_schedule="scaled_linear",
                 beta_start=0.00085, beta_end=0.012, init_std=0.044),
}


def output_source(name: str, weight: float) -> dict:
    return {"kind": "jsonl", "path": f"{name}.jsonl", "weight": float(weight),
            "modalities": OUTPUT_SOURCES[name]}


def output_head(model_name: str, model) -> dict:
    """XVilaHeadConfig dict for the recipe's model: K = 4 generation tokens + the VEH rows of
    one image (its patch grid)."""
    side, patch = model.image.image_size[0], model.image.encoder_config.patch_size
    p, k, width = (side // patch) ** 2, 4, int(model.llm.hidden_size)
    dec = dict(DECODERS["tiny" if model_name == "tiny" else "real"], cond_len=k + p)
    # init_std ~ 1 / sqrt(LLM width): at 0.02 a width-32 head scales the conditioning down
    # ~100x (its digit signal sat at 0.6% of the row embeddings) and the DiT learns to ignore it
    return {"llm_hidden": width, "gen_tokens": k, "init_std": round(width ** -0.5, 4),
            "proj_hidden": 4 * int(dec["cond_dim"]), "veh": True,
            "highway_dim": int(model.highway.out_dim), "highway_tokens": p, "decoder": dec}


def output_stages() -> dict:
    t2i, i2i = output_source("text_to_image", 1.0), output_source("image_to_image", 1.0)
    v2i = output_source("video_next_frame", 0.5)
    return {
        "decoder_align": common.stage(
            description="decoder alignment on X-text pairs: output projection + image "
                        "decoder, LLM frozen",
            trainable=[*OUT_PROJ, *DECODER], sources={"text_to_image": t2i}, lr=1e-3,
            epochs=1.0, batch_size=128, losses={"diffusion": 1.0}, packing=False),
        "x2x_textual": common.stage(
            description="X-to-X instruction tuning, textual alignment: LLM + projectors + "
                        "output projection",
            trainable=["^llm/", *PROJECTORS, *OUT_PROJ],
            sources={"text_to_image": t2i, "image_to_image": i2i, "video_next_frame": v2i,
                     **common.mixture(image_qa=1.0)},
            lr=2e-5, epochs=1.0, batch_size=128, losses={"ce": 1.0, "diffusion": 1.0},
            packing=False),
        "x2x_visual": common.stage(
            description="X-to-X visual alignment with the visual embedding highway: highway "
                        "+ its projection + decoder, LLM frozen",
            trainable=[*VEH, *DECODER], sources={"image_to_image": i2i}, lr=1e-4,
            epochs=1.0, batch_size=128, losses={"diffusion": 1.0}, packing=False),
    }


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b", "output": "off"})
    output = common.choose("output", a["output"], ("off", "on")) == "on"
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
    order = ORDER + (OUTPUT_ORDER if output else ())
    if output:
        stages.update(output_stages())
    c = common.recipe("xvila", a["model"], "xvila", order, stages)
    if output:
        # gen_token_id: the generation token's id when no tokenizer is configured (plan
        # time); with tokenizer.path set the tokenizer's gen_image_token decides
        c.xvila_output = {**output_head(a["model"], c.model), "gen_token_id": None}
        c.tokenizer.gen_image_token = GEN_IMAGE_TOKEN
        c.loss_modules = ("omni_jax.train.xvila_model",)  # registers the `diffusion` loss
    return c
