"""Convert checkpoints between Hugging Face directories and omni_jax's native format.

  python -m omni_jax.cli.convert import-hf SRC_HF_DIR OUT_NATIVE_DIR [--scan-layers]
  python -m omni_jax.cli.convert export-hf SRC_NATIVE_DIR OUT_HF_DIR
"""

from __future__ import annotations

import argparse
import sys

from omni_jax.convert.registry import export_hf, import_hf, load_native, save_native


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
    args = ap.parse_args(argv)
    try:
        if args.cmd == "import-hf":
            overrides = {"scan_layers": True} if args.scan_layers else {}
            kind, config, params, hf_config = import_hf(args.src, **overrides)
            save_native(args.out, kind, config, params, hf_config)
            print(f"imported {kind} from {args.src} -> {args.out}")
        else:
            kind, config, params, hf_config = load_native(args.src)
            export_hf(kind, config, params, args.out, hf_config)
            print(f"exported {kind} from {args.src} -> {args.out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
