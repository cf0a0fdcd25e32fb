"""GRPO rollouts on `qwen_jax.Engine` over the trainer's current parameters (no copy, no recompilation).

`Rollouts` builds one engine over the policy (LoRA adapters unmerged, dropout off) and, before each
rollout, points it at the trainer's current arrays with `Engine.update_weights`: the engine's
programs take the model state as an input, so an optimizer update changes what it samples without
copying weights or compiling anything. A QLoRA run (int8/int4 base) therefore rolls out exactly the
policy it trains.

Sampling uses only the rollout settings given (temperature, top_p, top_k; every penalty off), not
the checkpoint's generation_config.json defaults, so the samples come from the distribution the
loss's log-probabilities describe. Each completion has its own seed, derived from the run's seed,
the step and its row, so a resumed run samples what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from qwen_jax.engine.core import Engine
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.tokenizer import Tokenizer
from qwen_jax.train.data.prompts import Prompt


def is_conversational(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


@dataclasses.dataclass
class Rollout:
    """Sampled completions, one entry per completion (prompt i's generations at rows i*G .. i*G+G-1)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # the engine's log-probability of each sampled token (raw logits)
    texts: list[str]
    truncated: np.ndarray  # bool: stopped by max_new_tokens, not by a stop token
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)


class Rollouts:
    """An engine over a policy; `sample` rolls prompts out with given parameters.

    model: the policy as the trainer builds it (same structure, shapes and shardings as every later
    `weights`), adapters unmerged and without dropout. slots: rows sampled at once; max_len: tokens
    per row (prompt + completion)."""

    def __init__(self, model: Qwen2ForCausalLM, tokenizer: Tokenizer, *, slots: int, max_len: int):
        # A rollout submits all its prompts at once: each is prefilled whole before the decoding
        # starts (prefill_chunk=0), which needs no mixed prefill-and-decode programs, and the
        # num_generations requests of a prompt share one prefill (`EngineStats.shared_prefill_tokens`).
        self.engine = Engine(model, tokenizer, slots=slots, max_len=max_len, prefill_chunk=0)

    def sample(
        self,
        weights: Qwen2ForCausalLM,
        prompt_ids: Sequence[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Sequence[int] | int = 0,
    ) -> Rollout:
        """`num_generations` completions of each prompt with `weights` (temperature 0: greedy).

        seed: one per completion, or one for all."""
        self.engine.update_weights(weights)
        rows = [list(ids) for ids in prompt_ids for _ in range(num_generations)]
        start = time.perf_counter()
        completions = self.engine.generate(
            rows,
            progress=False,
            logprobs=0,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=list(seed) if not isinstance(seed, int) else seed,
        )
        seconds = time.perf_counter() - start
        return Rollout(
            prompt_ids=rows,
            completion_ids=[list(c.token_ids) for c in completions],
            logprobs=[[t.logprob for t in c.logprobs or []] for c in completions],
            texts=[c.text for c in completions],
            truncated=np.array([c.finish_reason == "length" for c in completions]),
            seconds=seconds,
        )

    def close(self) -> None:
        self.engine.shutdown()
