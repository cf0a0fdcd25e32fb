"""Training data, from where users keep it to the packed batches a train step takes.

sources.py      JSONL / Parquet / `datasets` directories / Hub ids -> records; column mapping
examples.py     records -> token ids with a loss mask (chat, prompt-completion, text)
token_cache.py  a source tokenized once into memory-mapped files under OUT/data_cache
packing.py      examples -> fixed-length rows with segment ids (`PackedBatch`)
loader.py       seeded, resumable batches of packed rows (`DataLoader`, `open_loader`)
preference.py   DPO: preference pairs (TRL's three formats) -> token cache -> batches of pairs
prompts.py      GRPO: prompts and the columns the rewards read -> token cache -> batches of prompts
"""
