"""Tiny omni model for tests and the demo: a 2-layer Qwen2-style LLM (width 32) with tiny
SigLIP / Whisper towers. `get_config(flavor)`: flavor picks the adapters of one system
(mlp | ola | capybara | openomni | ovis | xvila), see omni_jax/configs/common.py `towers`."""

from ml_collections import ConfigDict

from omni_jax.configs import common

WIDTH = 32
LLM = dict(vocab_size=512, hidden_size=WIDTH, intermediate_size=64, num_layers=2, num_heads=4,
           num_kv_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=32,
              patch_size=8)
WHISPER = dict(num_mel_bins=80, d_model=16, encoder_layers=2, encoder_attention_heads=2,
               encoder_ffn_dim=32, max_source_positions=50)
BEATS = dict(embed_dim=16, encoder_embed_dim=16, encoder_layers=1, encoder_attention_heads=2,
             encoder_ffn_embed_dim=32, conv_pos=4, conv_pos_groups=2)
# Ola: high-res canvas 64 x 64 (4 x 4 patches of 16), low-res and video 32 x 32 (2 x 2 patches):
# 3 + 1 * (1 + 1) + 2 * (2 + 1) = 11 tokens per image
SIZES = dict(image_size=32, ola_image_size=64, ola_lowres_size=32, ola_video_size=32,
             capybara_image_size=32,
             openomni_vit=dict(image_size=32, patch_size=8), video_frames=2,
             audio_frames=100,  # 1 s of 10 ms mel frames; Whisper halves it to 50 positions
             ola_pos_grid=4,  # Ola's position table (128 x 128 in the release)
             audio_chunks=3,  # Ola: up to 3 s clips (espeak phrases are ~1-2 s)
             speech_hidden=32, ovis_vocab=64, highway_dim=8)


def get_config(flavor: str | None = None) -> ConfigDict:
    return ConfigDict({"llm": LLM, **common.towers(flavor or "mlp", WIDTH, siglip=SIGLIP,
                                                   whisper=WHISPER, sizes=SIZES,
                                                   beats=BEATS)})
