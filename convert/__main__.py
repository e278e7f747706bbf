"""python -m convert SRC DST: an HF folder -> a Flax folder, or a Flax folder -> an HF folder."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=(
            "Convert a Mask2Former checkpoint folder. SRC with flax_model.msgpack is written to DST "
            "as an HF folder (config.json + model.safetensors, loadable by transformers); SRC with "
            "model.safetensors or pytorch_model.bin is written as a Flax folder (config.json + "
            "flax_model.msgpack)."
        ),
    )
    parser.add_argument("src", help="local folder with config.json and weights")
    parser.add_argument("dst", help="output folder (created; files it has are kept unless --overwrite)")
    parser.add_argument("--to", choices=("auto", "flax", "hf"), default="auto", help="force a direction")
    parser.add_argument("--overwrite", action="store_true", help="replace files DST already has")
    args = parser.parse_args(argv)

    from convert.folders import flax_folder_to_hf, has_config, hf_folder_to_flax, is_flax_folder

    try:
        if not has_config(args.src):
            raise FileNotFoundError(f"{args.src} has no config.json: not a Mask2Former checkpoint folder.")
        to = args.to
        if to == "auto":
            to = "hf" if is_flax_folder(args.src) else "flax"
        if to == "hf":
            flax_folder_to_hf(args.src, args.dst, args.overwrite)
        else:
            hf_folder_to_flax(args.src, args.dst, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {'HF' if to == 'hf' else 'Flax'} checkpoint to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
