"""Fine-tune a Qwen2.5 model (full or LoRA) on JSONL data.

  qwen-jax train --model PATH --data train.jsonl --out runs/sft [--config train.yaml] [flags]

Data lines are {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}.
Every setting is a flag below and a YAML key (the flag name with underscores); flags override
the YAML file. --lora-rank R > 0 trains LoRA adapters only. --resume continues from the latest
checkpoint in OUT/checkpoints. Exit status: 0 finished, 143 after SIGTERM and 130 after SIGINT
(a checkpoint was written first; rerun with --resume), 2 for bad input.
"""

from __future__ import annotations

import argparse

from qwen_jax.train import config as config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    config_lib.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from qwen_jax.train.trainer import Trainer

    config = config_lib.from_args(args)
    return Trainer(config).run()
