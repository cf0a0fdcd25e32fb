"""Fine-tuning (full and LoRA; SFT, DPO and GRPO): `qwen-jax train`, or `qwen_jax.train.loop.Trainer`
(`grpo_trainer.GRPOTrainer` for GRPO) from Python.

    config.py     TrainConfig: every setting, a YAML key and a flag
    data/         records -> token ids with loss masks -> packed, resumable batches
    step.py       loss, optimizer and schedule, the train state, the jitted train and eval steps
    dpo.py        the DPO loss, its metrics and reference log-probabilities (`--method dpo`)
    loop.py       Trainer: setup, the run, train checkpoints, exact resume, SIGTERM / SIGINT
    grpo.py       GRPO: group advantages, the clipped surrogate loss (TRL's), rollout rows
    rewards.py    GRPO reward functions: TRL's signature, built-ins, loading by name
    rollout.py    GRPO rollouts on the engine over the trainer's arrays
    grpo_trainer.py  GRPOTrainer: `--method grpo` on the loop
    outputs.py    metrics.jsonl, TensorBoard, loss curve, the final model and its HF export
    multihost.py  running as one of several processes
    cli.py        `qwen-jax train`

Nothing is imported here: `qwen-jax --help` imports `cli.py` alone, and the modules that need the
`train` extra (`pip install 'qwen-jax[train]'`) are reached only from `cli.run()` or by name.
"""
