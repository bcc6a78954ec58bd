"""`minimind convert SRC OUT --to TARGET`: any checkpoint kind into a Hugging Face directory, a GGUF file or
an upstream MiniMind .pth file."""

from __future__ import annotations

import argparse

from models.dtypes import DTYPE_CHOICES, DTYPE_HELP

EPILOG = """\
SRC kinds: an upstream MiniMind .pth (with --preset and/or --config), a Hugging Face directory of
model_type minimind, llama, qwen2, qwen3, qwen2_moe or qwen3_moe, or a .gguf file.

examples:
  minimind convert out/full_sft_512.pth ./minimind2-small-llama --preset minimind2-small --tokenizer ./tok --to llama
  minimind convert ./my-checkpoint ./my-checkpoint-qwen3 --to auto --dtype bf16
  minimind convert ./my-checkpoint ./my-model.gguf --to gguf --quant q8_0   # llama.cpp, Ollama
  minimind convert ./my-checkpoint ./my-model-q4_k_m.gguf --to gguf --quant q4_k_m
  minimind convert ./my-checkpoint ./full_sft_512.pth --to pth              # upstream MiniMind's scripts
  minimind convert out/sft_vlm_768.pth ./minimind-v --config config.json --vision-encoder ./siglip  # MiniMind-V
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from models.export import TARGETS
    from models.gguf_export import QUANTS
    from models.presets import PRESETS

    parser.epilog = EPILOG
    parser.add_argument(
        "src", metavar="SRC", help="checkpoint to read: a .pth file, a Hugging Face directory or a .gguf file"
    )
    parser.add_argument(
        "out", metavar="OUT", help="directory to write, or file for --to gguf/pth (must not exist unless --force)"
    )
    parser.add_argument(
        "--to",
        default="auto",
        choices=[*TARGETS, "auto", "gguf", "pth"],
        help="output model type; plain-transformers types load without this project; 'minimind' needs it "
        "installed; 'auto' (default) picks the most compatible plain-transformers type that represents the model; "
        "'gguf' writes a llama.cpp file (dense: llama/qwen2/qwen3; MoE: qwen3moe, llama, ernie4_5-moe or "
        "deepseek, where one computes it exactly); 'pth' writes upstream MiniMind's state_dict (fp16 unless --dtype)",
    )
    parser.add_argument(
        "--quant",
        default="f16",
        choices=QUANTS,
        help="--to gguf: weight type of the matrices (default f16; norms stay f32); q4_k_m is llama.cpp's "
        "Q4_K_M mix, the same bytes llama-quantize makes of the f16 file",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model shape of a .pth file (a .pth holds weights only); --config fields override it",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="config.json describing a .pth file's shape (upstream or ours)"
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="directory with tokenizer.json/tokenizer_config.json (default: beside SRC)"
    )
    parser.add_argument(
        "--dtype",
        type=str.lower,
        choices=[name for name in DTYPE_CHOICES if name != "auto"],
        metavar="DTYPE",
        help=f"weight precision of OUT: {DTYPE_HELP.replace(' or auto', '')} (default: the same as SRC)",
    )
    parser.add_argument(
        "--vision-encoder",
        metavar="DIR",
        help="upstream minimind-v .pth: the transformers SigLIP/CLIP vision encoder directory (default: "
        "vision_encoder/ beside SRC); OUT then holds encoder, projector and LLM in one directory",
    )
    parser.add_argument("--merge-lora", metavar="ADAPTER", help="PEFT LoRA adapter directory to merge into the weights")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (the old one is removed only after the new one is complete)",
    )


def run(args: argparse.Namespace) -> int:
    from models.convert import convert

    out, target = convert(
        args.src,
        args.out,
        args.to,
        preset=args.preset,
        config=args.config,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        merge_lora=args.merge_lora,
        force=args.force,
        quant=args.quant,
        vision_encoder=args.vision_encoder,
    )
    if args.to == "gguf":
        print(f"wrote {out} (GGUF {args.quant}, architecture {target})")
    elif args.to == "pth":
        print(f"wrote {out} (upstream MiniMind state_dict)")
    else:
        print(f"wrote {out} (model_type {target})")
    return 0
