"""`Engine.update_weights`: the engine generates with new arrays at once, copying and compiling nothing;
LoRA adapters run unmerged and give the merged model's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from serving import byte_checkpoint, count_compiles

import qwen_jax
from qwen_jax.compilation import compile_counts
from qwen_jax.errors import EngineError
from qwen_jax.model.lora import LoRAConfig, LoRAParam, apply_lora, merge_lora, set_lora_deterministic

PROMPTS = ["The quick brown fox", "a", "Once upon a time"]


def _greedy(model, tokenizer):
    return [qwen_jax.generate(model, tokenizer, p, max_new_tokens=10, temperature=0).token_ids[0] for p in PROMPTS]


def _engine_greedy(engine):
    return [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10, temperature=0, progress=False)]


def test_update_weights_switches_the_weights_without_compiling(tmp_path):
    first, tokenizer = qwen_jax.load(byte_checkpoint(tmp_path / "a", seed=0, initializer_range=0.3))
    second, _ = qwen_jax.load(byte_checkpoint(tmp_path / "b", seed=1, initializer_range=0.3))
    engine = qwen_jax.Engine(first, tokenizer, slots=4, max_len=48, prefill_chunk=0)
    try:
        before = _engine_greedy(engine)  # compiles the programs these prompts need
        assert before == _greedy(first, tokenizer)
        programs = compile_counts()
        with count_compiles() as compiles:
            engine.update_weights(second)
            after = _engine_greedy(engine)
            engine.update_weights(nnx.state(first))  # a state works as well as a model
            back = _engine_greedy(engine)
        assert compiles == [] and compile_counts() == programs
        assert after == _greedy(second, tokenizer) and after != before
        assert back == before
        # The arrays are the caller's, not copies.
        engine_leaves = jax.tree.leaves(engine.programs.state)
        assert all(a is b for a, b in zip(engine_leaves, jax.tree.leaves(nnx.state(first))))

        wrong_dtype = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(second))
        with pytest.raises(EngineError, match="update_weights: .* is bfloat16"):
            engine.update_weights(wrong_dtype)
        apply_lora(second, LoRAConfig(2, 4.0, 0.0, ("q_proj",)))
        with pytest.raises(EngineError, match="structure"):
            engine.update_weights(second)
        handle = engine.submit(PROMPTS[0], max_new_tokens=25, temperature=0)
        with pytest.raises(EngineError, match="still running"):
            engine.update_weights(first)
        handle.result(60)
        assert _engine_greedy(engine) == before  # the refused updates changed nothing
    finally:
        engine.shutdown()


def test_lora_unmerged_in_the_engine_gives_the_merged_models_tokens(tmp_path):
    """(An int8 base with adapters, QLoRA, is covered by tests/train/test_grpo_train.py: the engine's
    log-probabilities of its samples equal the trainer's.)"""
    path = byte_checkpoint(tmp_path / "ckpt", seed=2, tie_word_embeddings=False, initializer_range=0.3)
    model, tokenizer = qwen_jax.load(path)
    apply_lora(model, LoRAConfig(4, 8.0, 0.1, ("q_proj", "v_proj", "up_proj", "down_proj")), seed=3)
    set_lora_deterministic(model, True)  # rollouts run without adapter dropout
    # Trained-looking adapters: B is zero at initialisation, which would leave the base model's tokens.
    for path_, variable in nnx.iter_graph(model):
        if isinstance(variable, LoRAParam):
            key = jax.random.key(hash(path_) % 2**31)
            variable.set_value(jax.random.normal(key, variable.shape, variable.dtype) * 0.3)
    engine = qwen_jax.Engine(model, tokenizer, slots=4, max_len=48, prefill_chunk=0)
    try:
        unmerged = _engine_greedy(engine)
    finally:
        engine.shutdown()
    base, _ = qwen_jax.load(path)
    assert unmerged != _greedy(base, tokenizer)  # the adapters change the tokens
    assert unmerged == _greedy(merge_lora(model), tokenizer)


def test_update_weights_empties_the_prefix_cache(tmp_path):
    """Cached KV was computed with the old weights: after an update a repeated prompt must not hit it."""
    first, tokenizer = qwen_jax.load(byte_checkpoint(tmp_path / "a", seed=0, initializer_range=0.3))
    second, _ = qwen_jax.load(byte_checkpoint(tmp_path / "b", seed=1, initializer_range=0.3))
    prompt = "a shared system prompt, " * 2  # 48 byte tokens: several 16-token blocks
    engine = qwen_jax.Engine(first, tokenizer, slots=2, max_len=128)  # chunked prefill: hits are used
    try:
        run = lambda: engine.generate([prompt], max_new_tokens=6, temperature=0, progress=False)[0]
        assert run().token_ids == run().token_ids  # the second run hits the cache
        hits = engine.stats().prefix_cache_hit_tokens
        assert hits > 0
        engine.update_weights(second)
        assert engine.stats().prefix_cache_blocks_used == 0
        after = run()
        assert engine.stats().prefix_cache_hit_tokens == hits  # nothing stale was reused
        expected = qwen_jax.generate(second, tokenizer, prompt, max_new_tokens=6, temperature=0).token_ids[0]
        assert after.token_ids == expected
    finally:
        engine.shutdown()


def test_requests_of_one_prompt_share_its_prefill(tmp_path):
    """Without chunked prefill (the rollout engine), requests of the same prompt admitted together are
    prefilled once; each still draws its own tokens, exactly those it draws alone."""
    model, tokenizer = qwen_jax.load(byte_checkpoint(tmp_path / "ckpt", seed=4, initializer_range=0.3))
    prompts = ["The quick brown fox"] * 3 + ["a b"] * 2 + ["The quick brown fox"]
    settings = dict(max_new_tokens=6, temperature=1.0, logprobs=0, progress=False)
    engine = qwen_jax.Engine(model, tokenizer, slots=8, max_len=48, prefill_chunk=0)
    try:
        alone = [engine.generate([p], seed=seed, **settings)[0] for seed, p in enumerate(prompts)]
        before = engine.stats()
        together = engine.generate(prompts, seed=list(range(len(prompts))), **settings)
        after = engine.stats()
    finally:
        engine.shutdown()
    assert before.shared_prefill_tokens == 0  # one request at a time: nothing to share
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    assert after.shared_prefill_tokens == 3 * lengths[0] + lengths[3]
    assert after.prompt_tokens - before.prompt_tokens == sum(lengths)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # The first token comes from the (shared) prefill's logits: exactly those of the prompt alone; the
    # later ones from decode steps 8 rows wide instead of 1 (float32 rounding of a wider batch, which
    # depends on the CPU's product kernels: a few ulp of log-probabilities near -3 after 5 steps).
    assert [c.logprobs[0].logprob for c in together] == [c.logprobs[0].logprob for c in alone]
    for shared, single in zip(together, alone):
        np.testing.assert_allclose(
            [t.logprob for t in shared.logprobs], [t.logprob for t in single.logprobs], rtol=1e-5, atol=1e-5
        )
    assert len({tuple(c.token_ids) for c in together[:3]}) > 1  # the seeds, not the shared prefill, decide
