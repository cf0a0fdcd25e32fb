"""The KV cache of a model's last single-prompt call, kept so that the next call on a conversation
prefills only what is new (`prefix_cache=` of `qwen_jax.generate` / `stream` and the id-level calls).

A call of one prompt leaves its KV cache here when it ends, with the tokens the cache holds (the
prompt and the generated tokens but the last, whose keys no step computed). The next call on the
same model takes it out first thing: when its prompt starts with at least `MIN_REUSED_TOKENS` of
those tokens (their longest common prefix: a chat template that re-renders the previous answer
may tokenize its end differently), their keys and values are copied into the new call's cache and
only the rest of the prompt is prefilled; otherwise the kept cache is dropped before the new one
is allocated. So between calls at most one cache per model is kept (the size of that call's
cache: its prompt and `max_new_tokens`, bucketed), and it never sits beside an unrelated call's
cache.

The KV is only valid for the weights that computed it: an entry remembers the model's graph and
(weakly) its parameter arrays, and is not reused once any of them was replaced (a training step,
`nnx.update`, a LoRA merge). `clear` drops the entries explicitly. Dynamic-NTK rope scales every
key by the prompt's length, so on such a model nothing is reused.

The model is this module's key (a weak one: a dropped model drops its entry). A speculative call
reuses and keeps the target's cache and, under the draft model's own key, the draft's. A batch of
several prompts neither reuses nor keeps anything, but still drops the model's kept cache.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.model.kv_cache import KVCache

MIN_REUSED_TOKENS = 16  # a shorter common prefix is prefilled again: the copy's compilation would cost more


@dataclasses.dataclass
class _Kept:
    tokens: np.ndarray  # int32: the tokens whose keys and values fill the cache's first slots
    cache: KVCache  # batch 1
    graphdef: Any
    weights: list[weakref.ref]  # the model's parameter arrays that computed the cache

    def computed_by(self, graphdef: Any, state: Any) -> bool:
        leaves = jax.tree.leaves(state)
        return (
            graphdef == self.graphdef
            and len(leaves) == len(self.weights)
            and all(ref() is leaf for ref, leaf in zip(self.weights, leaves))
        )


_KEPT: weakref.WeakKeyDictionary[Qwen2ForCausalLM, _Kept] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def take(
    model: Qwen2ForCausalLM, graphdef: Any, state: Any, prompt: Sequence[int] | None
) -> tuple[KVCache | None, int]:
    """Remove `model`'s kept cache; return it with the number of `prompt`'s first tokens whose keys and
    values it holds (at most all but the prompt's last token, whose logits give the first new token),
    or (None, 0) when it cannot serve `prompt` (None: do not reuse, only free)."""
    with _LOCK:
        kept = _KEPT.pop(model, None)
    if kept is None or prompt is None or model.config.rope_scaling.rope_type == "dynamic":
        return None, 0
    if not kept.computed_by(graphdef, state):
        return None, 0
    limit = min(len(prompt) - 1, len(kept.tokens))
    ids = np.asarray(prompt[:limit], np.int32)
    differ = np.flatnonzero(ids != kept.tokens[:limit])
    common = int(differ[0]) if differ.size else limit
    if common < MIN_REUSED_TOKENS:
        return None, 0
    return kept.cache, common


def keep(model: Qwen2ForCausalLM, graphdef: Any, state: Any, tokens: Sequence[int], cache: KVCache) -> None:
    """Keep `cache` (batch 1, its first `len(tokens)` slots holding `tokens`) for `model`'s next call."""
    if cache.batch != 1 or cache.k.is_deleted() or len(tokens) < MIN_REUSED_TOKENS:
        return
    weights = [weakref.ref(leaf) for leaf in jax.tree.leaves(state)]
    kept = _Kept(np.asarray(tokens, np.int32), cache, graphdef, weights)
    with _LOCK:
        _KEPT[model] = kept


def kept_tokens(model: Qwen2ForCausalLM) -> int:
    """How many tokens' keys and values are kept for `model`'s next call (0: none)."""
    with _LOCK:
        kept = _KEPT.get(model)
    return 0 if kept is None else len(kept.tokens)


def clear(model: Qwen2ForCausalLM | None = None) -> None:
    """Drop the cache kept for `model` (None: for every model), freeing its memory."""
    with _LOCK:
        if model is None:
            _KEPT.clear()
        else:
            _KEPT.pop(model, None)
