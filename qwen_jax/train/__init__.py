"""Fine-tuning (full and LoRA) from the command line: `qwen-jax train`."""
