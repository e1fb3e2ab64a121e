"""`rlhf-fast quantize MODEL_DIR --bits 4|8 --output DIR`: quantize a dense HF directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rlhf_fast.quant.model import DEFAULT_SKIP
from rlhf_fast.quant.weight import INT4_BLOCK

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "quantize",
        help="quantize a model directory's linear layers to int4 or int8",
        description=(
            "Load a Hugging Face causal LM directory (safetensors), quantize its linear layers "
            "(weights only; embeddings and, by default, lm_head stay in float) and save an HF "
            "directory that `rlhf-fast chat` loads without flags."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="dense HF model directory")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4 or 8 (4)")
    parser.add_argument(
        "--group-size", type=int, default=32, help="int4 weights per scale: 32, 64, 128... (32)"
    )
    parser.add_argument(
        "--clip-search", action="store_true", help="search clipping ranges (slower, lower error)"
    )
    parser.add_argument(
        "--skip", nargs="+", action="extend", metavar="PATTERN", default=None,
        help="layer names or fnmatch patterns to keep in float (default: lm_head)",
    )  # fmt: skip
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")


def _megabytes(paths) -> float:
    return sum(path.stat().st_size for path in paths) / 2**20


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as error:  # a tokenizer we cannot load must not stop quantization
        print(f"warning: tokenizer not copied ({error})".splitlines()[0], file=sys.stderr)
        return None


def _sample_layers(model, skip) -> dict[str, torch.Tensor]:
    """Float copies of the first, middle and last weights that will be quantized."""
    from rlhf_fast.quant.linear import dense_weight
    from rlhf_fast.quant.model import quantizable_layers

    layers = list(dict(quantizable_layers(model, skip)).items())
    picked = [layers[i] for i in sorted({0, len(layers) // 2, len(layers) - 1})] if layers else []
    return {name: dense_weight(module).detach().float().clone() for name, module in picked}


def _quantize(args: argparse.Namespace) -> None:
    from rlhf_fast.quant.io import load_model, read_quantization, save_quantized
    from rlhf_fast.quant.model import quantize_model

    model_dir, output = Path(args.model_dir), Path(args.output)
    if read_quantization(model_dir) is not None:
        raise ValueError(f"{model_dir}: already quantized (config.json has a quantization entry)")
    if output.exists() and output.resolve() == model_dir.resolve():
        raise ValueError(f"{output}: --output must differ from MODEL_DIR")
    if args.bits == 4 and (args.group_size <= 0 or args.group_size % INT4_BLOCK):
        raise ValueError(f"--group-size must be a multiple of {INT4_BLOCK}, got {args.group_size}")
    skip = tuple(args.skip) if args.skip else DEFAULT_SKIP
    model = load_model(model_dir, dtype="auto")
    tokenizer = _load_tokenizer(model_dir)
    originals = _sample_layers(model, skip)
    quantize_model(model, args.bits, args.group_size, skip=skip, clip_search=args.clip_search)
    save_quantized(model, tokenizer, output)

    layout = "per channel" if args.bits == 8 else f"group size {args.group_size}"
    before = _megabytes(model_dir.glob("*.safetensors"))
    after = _megabytes(output.glob("*.safetensors"))
    print(f"quantized {model_dir} to int{args.bits} ({layout}) -> {output}")
    print(f"size: {before:.2f} MB -> {after:.2f} MB ({before / max(after, 1e-9):.2f}x smaller)")
    for name, weight in originals.items():
        error = (model.get_submodule(name).dequantize() - weight).norm() / weight.norm()
        print(f"relative error ||W_q - W|| / ||W|| of {name}: {error.item():.4f}")


def run(args: argparse.Namespace) -> int:
    try:
        _quantize(args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"rlhf-fast quantize: error: {message}", file=sys.stderr)
        return 2
    return 0
