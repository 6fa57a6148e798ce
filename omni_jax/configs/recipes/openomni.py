"""OpenOmni (arXiv 2501.04561): understanding stages I-III, then speech out IV-V.

I speech -> text: speech projector only (LLM, Whisper frozen), lr 1e-3; II image pretraining:
image projector only (LLM frozen), lr 1e-3; III image instruction: LLM + projector + ViT at
5e-5, the ViT at a lower LR (lr group `vit`, scale 0.2 as LLaVA-style recipes; our choice).
IV speech generation: only the speech generator trains (LLM frozen: it reads the LLM's
detached hidden states), CTC over speech units, lr 5e-4, 3 epochs; V emotional-speech DPO:
only the generator, against a frozen copy of it taken at DPO start, lr 5e-4, beta 0.1.
`speech=ar`: the autoregressive generator variant (plain MLP expansion, next-unit CE; DPO on
its length-normalised unit log-likelihoods). AdamW; warmup ratio 0.03 (code) or
`warmup=paper` for the paper's 0.3.

  python -m omni_jax.cli.train --config openomni:model=tiny,speech=ctc --workdir runs/oo
"""

from omni_jax.configs import common

ORDER = ("speech_text", "image_pretrain", "image_instruct", "speech_gen", "speech_dpo")
WARMUP = {"code": 0.03, "paper": 0.3}
SPEECH_LOSS = {"ctc": "ctc", "ar": "unit_ce"}
# static padded lengths of an answer's text tokens and of its speech units (12 per token: the
# CTC generator's upsampling; longer answers are dropped and counted)
SPEECH_LENGTHS = {"text_len": 128, "units_len": 1536}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, {"model": "qwen7b", "warmup": "code", "speech": "ctc"})
    mode = common.choose("speech", a["speech"], tuple(SPEECH_LOSS))
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
        "speech_gen": common.stage(
            description=f"IV speech generation ({mode}): the speech generator (LLM frozen)",
            trainable=["^speech/"], sources=common.mixture(speech_response=1.0),
            losses={SPEECH_LOSS[mode]: 1.0}, lr=5e-4, batch_size=32, packing=False,
            speech=SPEECH_LENGTHS, **{**base, "epochs": 3.0}),
        "speech_dpo": common.stage(
            description="V emotional speech DPO: the generator vs its frozen copy (LLM frozen)",
            trainable=["^speech/"], sources=common.mixture(speech_dpo=1.0),
            losses={"dpo": {"weight": 1.0, "beta": 0.1}}, lr=5e-4, batch_size=32,
            packing=False, speech=SPEECH_LENGTHS, **base),
    }
    c = common.recipe("openomni", a["model"], "openomni", ORDER, stages)
    c.model.speech = common.speech_generator(a["model"], c.model.llm, mode)
    return c
