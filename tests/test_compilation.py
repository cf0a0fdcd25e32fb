"""The one in-process cache of compiled executables: LRU bound, one build per key under threads, accounting."""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.compilation import EXECUTABLES, ExecutableCache, argument_signature, compile_counts


def test_least_recently_used_entries_are_evicted_past_the_bound():
    cache = ExecutableCache(max_entries=2)
    built = []

    def build(value):
        def make():
            built.append(value)
            return value

        return make

    assert cache.get("a", 1, build("one")) == ("one", pytest.approx(0.0, abs=1.0))
    assert cache.get("a", 2, build("two"))[0] == "two"
    assert cache.get("a", 1, build("again")) == ("one", 0.0)  # cached: 1 is now the most recent
    cache.get("b", 3, build("three"))  # evicts 2, the least recently used
    assert 2 not in cache and 1 in cache and 3 in cache and len(cache) == 2
    assert cache.get("a", 2, build("rebuilt"))[0] == "rebuilt"  # evicted: built again
    assert built == ["one", "two", "three", "rebuilt"]
    assert cache.compile_counts() == {"a": 3, "b": 1}
    assert cache.executables("a") == ["rebuilt"] and cache.executables("b") == ["three"]  # 1 evicted by 2
    cache.max_entries = 1  # lowering the bound evicts at once
    assert len(cache) == 1 and cache.executables("a") == ["rebuilt"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries must be a positive integer"):
            cache.max_entries = bad
    cache.clear()
    assert len(cache) == 0 and cache.compile_counts() == {"a": 3, "b": 1}  # counters outlive entries


def test_one_build_per_key_when_threads_ask_at_once():
    cache = ExecutableCache()
    builds, running, overlap = [], [0], []
    lock = threading.Lock()

    def build(key):
        def make():
            with lock:
                builds.append(key)
                running[0] += 1
                overlap.append(running[0])
            time.sleep(0.2)  # long enough for every thread to arrive while it builds
            with lock:
                running[0] -= 1
            return f"executable {key}"

        return make

    start = threading.Barrier(12)
    results = []

    def ask(key):
        start.wait()
        results.append((key, *cache.get("kind", key, build(key))))

    threads = [threading.Thread(target=ask, args=(i % 3,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(builds) == [0, 1, 2]  # each key built once
    assert max(overlap) > 1  # different keys built at the same time
    assert {(key, value) for key, value, _ in results} == {(k, f"executable {k}") for k in range(3)}
    assert sum(seconds > 0 for _, _, seconds in results) == 3  # only the builder reports compile time
    assert cache.compile_counts() == {"kind": 3}
    assert cache.compile_seconds()["kind"] >= 3 * 0.2


def test_a_failed_build_is_not_cached_and_waiters_retry():
    cache = ExecutableCache()
    attempts = []

    def failing():
        attempts.append(1)
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError, match="compile failed"):
        cache.get("kind", "k", failing)
    assert "k" not in cache and cache.compile_counts() == {}
    assert cache.get("kind", "k", lambda: "ok")[0] == "ok"


def test_argument_signature_sees_shape_dtype_and_sharding():
    a = jnp.zeros((2, 3), jnp.float32)
    assert argument_signature((a, None)) == argument_signature((jnp.ones((2, 3), jnp.float32), None))
    assert argument_signature((a,)) != argument_signature((jnp.zeros((2, 4), jnp.float32),))
    assert argument_signature((a,)) != argument_signature((jnp.zeros((2, 3), jnp.int32),))
    assert argument_signature((a,)) != argument_signature(([a],))


def test_the_models_auto_jit_compiles_once_per_shape(hf_checkpoint):
    from qwen_jax.load import load_model

    _, path = hf_checkpoint(seed=3)
    model = load_model(path, dtype="float32")
    ids = np.asarray([[1, 2, 3, 4]], np.int32)
    first = np.asarray(model(ids))
    before = compile_counts()
    np.testing.assert_array_equal(np.asarray(model(ids + 1)), np.asarray(model(ids + 1)))
    assert compile_counts() == before  # the same shapes: no new compilation
    assert np.asarray(model(ids[:, :3])).shape == (1, 3, model.config.vocab_size)
    assert compile_counts()["model.forward"] == before["model.forward"] + 1
    assert EXECUTABLES.executables("model.forward")  # in the shared cache
    np.testing.assert_array_equal(np.asarray(model(ids)), first)
