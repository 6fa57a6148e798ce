"""Convert checkpoints between Hugging Face directories and omni_jax's native format.

  python -m omni_jax.cli.convert import-hf SRC_HF_DIR OUT_NATIVE_DIR [--scan-layers]
  python -m omni_jax.cli.convert export-hf SRC_NATIVE_DIR OUT_HF_DIR [--dtype bfloat16]
      [--max_shard_size 5GB]   (LLMs keep the source checkpoint's dtype unless --dtype)
  python -m omni_jax.cli.convert import-openomni SRC_FILE_OR_DIR OUT_NATIVE_DIR [--prefix P]
  python -m omni_jax.cli.convert export-openomni SRC_NATIVE_DIR OUT.safetensors|OUT.bin
  python -m omni_jax.cli.convert import-beats BEATS_PT OUT_NATIVE_DIR [--dtype D]
  python -m omni_jax.cli.convert import-whisper-pt LARGE_V3_PT OUT_NATIVE_DIR  (OpenAI format)
  python -m omni_jax.cli.convert import-ola OLA_DIR --whisper large-v3.pt --beats BEATs.pt
      OUT_NATIVE_DIR [--image-size H W] [--audio-chunks N] [--video-frames F]
"""

from __future__ import annotations

import argparse
import sys

from omni_jax.convert.registry import export_hf, import_hf, load_native, save_native


def _add_openomni(sub: argparse._SubParsersAction) -> None:
    imo = sub.add_parser("import-openomni", help="OpenOmni speech generator state dict "
                         "(.bin/.pt/.safetensors file or dir) -> omni_jax native dir")
    imo.add_argument("src")
    imo.add_argument("out")
    imo.add_argument("--prefix", default=None, help="key prefix (default: detected)")
    imo.add_argument("--llm-config", default=None,
                     help="the generator decoder's Qwen2 config.json (default: from shapes)")
    imo.add_argument("--fusion-heads", type=int, default=16, help="fusion attention heads")
    imo.add_argument("--decoder-head-dim", type=int, default=64,
                     help="decoder head dim when --llm-config is not given")
    imo.add_argument("--scan-layers", action="store_true")
    exo = sub.add_parser("export-openomni", help="native dir -> OpenOmni state dict file")
    exo.add_argument("src")
    exo.add_argument("out", help="*.safetensors, or *.bin / *.pt (needs torch)")
    exo.add_argument("--prefix", default="speech_generator.")


def _run_openomni(args: argparse.Namespace) -> None:
    import json
    import os

    from omni_jax.convert import openomni as oo

    if args.cmd == "export-openomni":
        config, params = oo.load_native_openomni(args.src)
        oo.export_openomni(config, params, args.out, prefix=args.prefix)
        print(f"exported OpenOmni speech generator from {args.src} -> {args.out} "
              f"(prefix {args.prefix!r})")
        return
    tensors, prefix, left = oo.select_generator(oo.read_state_dict(args.src), args.prefix)
    llm = None
    if args.llm_config:
        if not os.path.isfile(args.llm_config):
            raise ValueError(f"--llm-config {args.llm_config!r} does not exist")
        with open(args.llm_config) as f:
            llm = json.load(f)
    config = oo.config_from_openomni(tensors, llm, args.fusion_heads, args.decoder_head_dim)
    if args.scan_layers:
        config = config.replace(decoder=config.decoder.replace(scan_layers=True))
    params = oo.params_from_openomni(config, tensors, prefix="")
    save_native(args.out, oo.NATIVE_KIND, config, params)
    print(f"imported OpenOmni speech generator from {args.src} (prefix {prefix!r}, "
          f"{len(tensors)} tensors, {left} other keys left out) -> {args.out}")


def _add_beats(sub: argparse._SubParsersAction) -> None:
    imb = sub.add_parser("import-beats", help="unilm BEATs checkpoint (.pt with cfg + model, "
                         "e.g. BEATs_iter3_plus_AS2M.pt) -> omni_jax native dir")
    imb.add_argument("src")
    imb.add_argument("out")
    imb.add_argument("--dtype", default="float32", help="compute and param dtype")


def _run_beats(args: argparse.Namespace) -> None:
    from omni_jax.convert import beats

    config, params = beats.import_beats(args.src, dtype=args.dtype, param_dtype=args.dtype)
    save_native(args.out, beats.NATIVE_KIND, config, params)
    print(f"imported BEATs from {args.src} ({config.encoder_layers} layers, width "
          f"{config.encoder_embed_dim}) -> {args.out}")


def _add_whisper_pt(sub: argparse._SubParsersAction) -> None:
    imw = sub.add_parser("import-whisper-pt", help="OpenAI whisper .pt (dims + "
                         "model_state_dict) -> omni_jax native dir of its encoder")
    imw.add_argument("src")
    imw.add_argument("out")


def _run_whisper_pt(args: argparse.Namespace) -> None:
    from omni_jax.convert.whisper_openai import import_whisper_pt

    config, params = import_whisper_pt(args.src)
    save_native(args.out, "whisper_encoder", config, params)
    print(f"imported the Whisper encoder of {args.src} ({config.encoder_layers} layers, "
          f"d_model {config.d_model}) -> {args.out}")


def _add_ola(sub: argparse._SubParsersAction) -> None:
    imo = sub.add_parser("import-ola", help="Ola's checkpoint dir (ola_qwen) + its Whisper and "
                         "BEATs .pt files -> omni_jax native dir of the ola OmniModel")
    imo.add_argument("src")
    imo.add_argument("out")
    imo.add_argument("--whisper", required=True, help="OpenAI Whisper .pt (large-v3.pt)")
    imo.add_argument("--beats", required=True, help="unilm BEATs .pt")
    imo.add_argument("--image-size", type=int, nargs=2, default=(384, 384),
                     metavar=("H", "W"), help="the image tower's static size (multiples of 32)")
    imo.add_argument("--audio-chunks", type=int, default=1, help="30 s chunks per audio item")
    imo.add_argument("--video-frames", type=int, default=None, help="add a video tower")
    imo.add_argument("--video-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    imo.add_argument("--vision-heads", type=int, default=16, help="ViT heads (Oryx-ViT: 16)")
    imo.add_argument("--scan-layers", action="store_true")


def _run_ola(args: argparse.Namespace) -> None:
    from omni_jax.convert.ola import import_ola, save_ola

    config, params, hf = import_ola(
        args.src, args.whisper, args.beats, image_size=args.image_size,
        num_chunks=args.audio_chunks, video_frames=args.video_frames,
        video_size=args.video_size, vision_heads=args.vision_heads, scan_layers=args.scan_layers)
    save_ola(args.out, config, params, hf)
    print(f"imported Ola from {args.src} (+ {args.whisper}, {args.beats}) -> {args.out}")


def parse_size(text: str | None) -> int | None:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes (decimal units as save_pretrained's)."""
    if text is None:
        return None
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "b": 1}
    t = text.strip().lower()
    for unit, scale in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * scale)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max_shard_size {text!r}: expected a size like 5GB, 500MB or 2GiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omni_jax.cli.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import-hf", help="HF checkpoint dir -> omni_jax native dir")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("--scan-layers", action="store_true",
                     help="store decoder layers stacked for nn.scan (qwen2 only)")
    exp = sub.add_parser("export-hf", help="omni_jax native dir -> HF checkpoint dir")
    exp.add_argument("src")
    exp.add_argument("out")
    exp.add_argument("--dtype", default=None, help="tensor dtype (default: the source's)")
    exp.add_argument("--max_shard_size", default=None, help="e.g. 5GB, 500MB (default 5GB)")
    _add_openomni(sub)
    _add_beats(sub)
    _add_whisper_pt(sub)
    _add_ola(sub)
    args = ap.parse_args(argv)
    try:
        if args.cmd in ("import-openomni", "export-openomni"):
            _run_openomni(args)
        elif args.cmd == "import-beats":
            _run_beats(args)
        elif args.cmd == "import-whisper-pt":
            _run_whisper_pt(args)
        elif args.cmd == "import-ola":
            _run_ola(args)
        elif args.cmd == "import-hf":
            overrides = {"scan_layers": True} if args.scan_layers else {}
            kind, config, params, hf_config = import_hf(args.src, **overrides)
            save_native(args.out, kind, config, params, hf_config)
            print(f"imported {kind} from {args.src} -> {args.out}")
        else:
            kind, config, params, hf_config = load_native(args.src)
            export_hf(kind, config, params, args.out, hf_config, dtype=args.dtype,
                      max_shard_bytes=parse_size(args.max_shard_size))
            print(f"exported {kind} from {args.src} -> {args.out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
