"""Fine-tune a Qwen2.5 model (full or LoRA; supervised, DPO or GRPO).

  qwen-jax train --model PATH --data DATA --out runs/sft [--config train.yaml] [flags]

DATA is a JSONL or Parquet file, a directory of Parquet files or of HF `datasets` save_to_disk,
or a Hugging Face Hub dataset id (--data-split picks the split). Records are {"messages": [...]},
{"prompt": ..., "completion": ...} or {"text": ...}; other column names are mapped with
--data-format and --messages-column / --prompt-column / --completion-column / --text-column
(alpaca: --prompt-column instruction,input --completion-column output). Tokens are cached in
OUT/data_cache. Every setting is a flag below and a YAML key (the flag name with underscores);
flags override the YAML file. --lora-rank R > 0 trains LoRA adapters only. --resume continues
from the latest checkpoint in OUT/checkpoints.

--method picks the objective: sft (default), or dpo on preference pairs, TRL's formats:
{"prompt", "chosen", "rejected"} as strings or as messages, or {"chosen", "rejected"} full
conversations sharing their prompt. DPO flags: --beta (0.1), --loss-type sigmoid|ipo|hinge|robust,
--label-smoothing (robust), --precompute-ref-logprobs. The reference model is the base with the
LoRA adapters off, or (full fine-tuning) a frozen copy of the starting weights. Metrics use TRL's
names (rewards/chosen, rewards/accuracies, ...; eval_ on --eval-data).

--method grpo: reinforcement learning with reward functions (GRPO). DATA holds {"prompt": text or
messages, ...}; the other columns go to the reward functions by name. --reward NAME|file.py:fn|
module:fn (repeatable; built in: math_accuracy, boxed_format, think_format, overlong_penalty),
--batch-size prompts per step, each sampled --num-generations times on the engine. GRPO flags:
--beta (0.0: no reference), --loss-type grpo|dr_grpo|dapo|bnpo (dapo).

Several processes (TPU pod hosts, GPU nodes): run the same command on every host. JAX finds the
other processes on Cloud TPU, and under SLURM / Open MPI with more than one task; elsewhere give
--coordinator HOST:PORT --num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). OUT must be a directory every host sees.

Exit status: 0 finished, 143 after SIGTERM and 130 after SIGINT (a checkpoint was written
first; rerun with --resume), 2 for bad input. Training needs the train extra:
pip install 'qwen-jax[train]'.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax

from qwen_jax.checkpoints.outdir import quiet_orbax_logging
from qwen_jax.train import config as config_lib
from qwen_jax.train import multihost


def _device_ids(value: str) -> list[int]:
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `qwen-jax train`: one per `TrainConfig` setting, plus the multi-process launch."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    config_lib.add_arguments(parser)
    launch = parser.add_argument_group("multi-process launch (not saved with the run; also read from JAX_* variables)")
    launch.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    launch.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    launch.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    launch.add_argument(
        "--local-device-ids",
        type=_device_ids,
        metavar="IDS",
        help="local accelerators this process uses, e.g. 0 (one GPU per process) or 0,1,2,3",
    )


def run(args: argparse.Namespace) -> int:
    """Train as `args` say; the exit status (0, 143 / 130 after a signal). Errors: see the module docstring."""
    # The loop needs the train extra (optax, tensorboardX, ...); `qwen-jax --help` must not. Without
    # the extra this raises MissingExtraError, which the CLI prints as one line naming the pip command.
    from qwen_jax.train.grpo_trainer import GRPOTrainer
    from qwen_jax.train.loop import Trainer

    config = config_lib.from_args(args)
    trainer_class = GRPOTrainer if config.method == "grpo" else Trainer
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    multihost.initialize(args.coordinator, args.num_processes, args.process_id, args.local_device_ids, log=log)
    try:
        # A failed checkpoint write is reported once, as one line: not also by Orbax's writer threads.
        with quiet_orbax_logging():
            return trainer_class(config, log=log).run()
    except BaseException as e:
        if jax.process_count() == 1 or getattr(e, multihost.RAISED_ON_ALL, False):
            raise  # raised on every process: the normal exit (through JAX's shutdown barrier) does not wait
        # Only this process failed; the others may be inside a collective that will never complete.
        if isinstance(e, KeyboardInterrupt):
            multihost.exit_now(130)
        if isinstance(e, multihost.user_error_types()):
            print(multihost.process_tag(f"qwen-jax train: error: {e}"), file=sys.stderr)
            multihost.exit_now(2)
        traceback.print_exc()
        multihost.exit_now(1)
        raise
