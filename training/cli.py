"""`minimind train {pretrain,sft,lora,dpo,distill,reason,grpo,ppo,agent} --config configs/NAME.yaml [--key value ...]`.

Every TrainConfig field is a flag (spelled --key-name or --key_name); flags override the YAML file. Under
`torchrun --nproc_per_node N` the same command trains on N GPUs (DDP, or FSDP with --distributed fsdp).
"""

from __future__ import annotations

import argparse
import dataclasses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.config import FIELDS, STAGES

    parser.description = (
        "Train a model. Options come from --config (a YAML file, see configs/) and are overridden by flags.\n"
        "Example: minimind train --config configs/pretrain-minimind2-small.yaml --data-path data.jsonl"
    )
    parser.add_argument(
        "stage",
        nargs="?",
        choices=STAGES,
        default=None,
        help="pretrain: packed next-token loss; sft: assistant-only loss; lora: sft on adapters; dpo: preference "
        "pairs; distill: sft with a teacher; reason: sft with weighted think tags; grpo: RL from rewards on sampled "
        "completions; ppo: RL with a critic (value head) and GAE; agent: grpo whose rollouts call tools over several turns "
        "(default: the config file's stage:)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of config fields (e.g. configs/sft-minimind2-small.yaml)"
    )
    for name, spec in FIELDS.items():
        if name == "stage":
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        extra = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
        parser.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{spec.metadata['help']} (default: {default!r})",
            **extra,
        )


def run(args: argparse.Namespace) -> int:
    import logging

    from training.config import FIELDS, STAGES, load_config, load_yaml
    from training.errors import TrainingError
    from training.stages import get_stage
    from training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.stage is None and "stage" not in (load_yaml(args.config) if args.config else {}):
        raise TrainingError(f"name the stage: minimind train {{{','.join(STAGES)}}} ..., or set stage: in --config")
    overrides = {name: getattr(args, name) for name in FIELDS if name != "stage" and hasattr(args, name)}
    cfg = load_config(args.config, overrides, stage=args.stage)
    final = Trainer(cfg, get_stage(cfg.stage)).run()
    print(f"final model: {final}")
    return 0
