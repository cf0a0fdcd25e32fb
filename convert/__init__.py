"""HF safetensors <-> Orbax conversion (`qwen-jax convert`, `qwen-jax export-hf`)."""
