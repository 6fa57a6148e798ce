"""~0.5B omni model: Qwen2.5-0.5B LLM with SigLIP-so400m and Whisper-large-v3 towers.
`get_config(flavor)`: flavor picks the adapters of one system (see omni_jax/configs/common.py)."""

from ml_collections import ConfigDict

from omni_jax.configs import common

WIDTH = 896
LLM = dict(vocab_size=151936, hidden_size=WIDTH, intermediate_size=4864, num_layers=24,
           num_heads=14, num_kv_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
           max_position_embeddings=32768, tie_word_embeddings=True, scan_layers=True,
           remat_policy="dots", dtype="bfloat16", param_dtype="float32")
# SigLIP-so400m/14 @ 384 (Ola swaps patch 16, see common.towers).
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
              image_size=384, patch_size=14, dtype="bfloat16")
WHISPER = dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
               encoder_ffn_dim=5120, max_source_positions=1500, dtype="bfloat16")
# BEATs_iter3 (Ola's second audio encoder, concatenated with Whisper on channels).
BEATS = dict(embed_dim=512, encoder_embed_dim=768, encoder_layers=12, encoder_attention_heads=12,
             encoder_ffn_embed_dim=3072, conv_pos=128, conv_pos_groups=16, dtype="bfloat16")
# CLIP ViT-L/14-336-sized tower for OpenOmni (our SigLIP block, CLIP's sizes).
CLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
              image_size=336, patch_size=14)
# Ola's two views: low-res 384 x 384 (Ola: area ~384^2); high-res canvas 768 x 768 (Ola caps
# native images at 1536^2: the static canvas bounds compute, 24 x 24 pooled rows; images up to
# 768 px stay native, larger ones shrink to fit); video frames 384 x 384 (Ola: area in [288^2,
# 480^2], sides multiples of 64). Tokens per image: 3 + 12 * 13 + 24 * 25 = 759.
SIZES = dict(image_size=384, ola_image_size=768, ola_lowres_size=384, ola_video_size=384,
             capybara_image_size=448, openomni_vit=CLIP_L, video_frames=16, audio_frames=3000,
             audio_chunks=1, speech_hidden=2048, ovis_vocab=65536, highway_dim=1024)


def get_config(flavor: str | None = None) -> ConfigDict:
    return ConfigDict({"llm": LLM, **common.towers(flavor or "mlp", WIDTH, siglip=SIGLIP,
                                                   whisper=WHISPER, sizes=SIZES,
                                                   beats=BEATS)})
