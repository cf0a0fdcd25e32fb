"""Checkpoints: the parameter layout every format shares (`params`), assembly into shards
(`assemble`), the qwen-jax Orbax format (`orbax`), and the readers of HF safetensors (`hf`,
`safetensors`), GPTQ/AWQ (`gptq_awq`), GGUF (`gguf`) and the Hugging Face Hub (`hub`);
`outdir` writes output directories atomically."""
