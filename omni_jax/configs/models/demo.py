"""The omni_digits demo model (omni_jax/configs/recipes/demo.py): a 4-layer, 128-wide
Qwen2-style LLM with small SigLIP / Whisper towers sized for 8x8 digits and 1-3 s espeak
phrases, trainable from scratch on 2 CPU cores in minutes.

Images: the digits' PNGs resized to 16x16, patch 4 -> 16 tokens per image (one patch = 2x2
original pixels); videos: 5 frames of the same tower (3-4 frame clips repeat frames, see
data.features.video.sample_indices) -> 80 tokens (the demo recipe pads short clips and pools
each frame to 2 x 2 tokens: 20); audio: 3 s clips (300 mel frames, Whisper
halves them) stacked 5 to 1 -> 30 tokens. `get_config(flavor)` as every model config (the
demo uses "mlp").
"""

from ml_collections import ConfigDict

from omni_jax.configs import common

WIDTH = 128
LLM = dict(vocab_size=512, hidden_size=WIDTH, intermediate_size=384, num_layers=4, num_heads=4,
           num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
SIGLIP = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=16,
              patch_size=4)
WHISPER = dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2,
               encoder_ffn_dim=128, max_source_positions=150)
BEATS = dict(embed_dim=16, encoder_embed_dim=16, encoder_layers=1, encoder_attention_heads=2,
             encoder_ffn_embed_dim=32, conv_pos=4, conv_pos_groups=2)
SIZES = dict(image_size=16, ola_image_size=16, capybara_image_size=32,
             openomni_vit=dict(image_size=16, patch_size=4), video_frames=5,
             audio_frames=300,  # 3 s of 10 ms mel frames (espeak phrases are ~1-2.5 s)
             audio_chunks=1, speech_hidden=128, ovis_vocab=64, highway_dim=8)


def get_config(flavor: str | None = None) -> ConfigDict:
    return ConfigDict({"llm": LLM, **common.towers(flavor or "mlp", WIDTH, siglip=SIGLIP,
                                                   whisper=WHISPER, sizes=SIZES,
                                                   beats=BEATS)})
