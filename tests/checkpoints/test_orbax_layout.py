"""The qwen-jax Orbax layout is pinned: its tree keys do not follow the model's state paths.

A quantized kernel is one value in the model (`.../q_proj/kernel/{values,scale,zero}`), but
checkpoints keep the keys written before it was (`.../q_proj/kernel`, `.../kernel_scale`,
`.../kernel_zero`), so checkpoints of every qwen-jax version stay readable byte for byte.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from qwen_jax.checkpoints.orbax import PARAMS_DIR, read_manifest, save_model
from qwen_jax.checkpoints.params import param_specs
from qwen_jax.config import Qwen2Config
from qwen_jax.load import load_model
from qwen_jax.model.causal_lm import create_model, unstack_layers
from qwen_jax.model.quantize import with_quantized_structure
from qwen_jax.ops.quant import QuantScheme

CONFIG = Qwen2Config(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
PROJECTIONS = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
]
LAYER_FLOATS = {
    ("input_layernorm", "weight"),
    ("post_attention_layernorm", "weight"),
    ("self_attn", "q_proj", "bias"),
    ("self_attn", "k_proj", "bias"),
    ("self_attn", "v_proj", "bias"),
}
# scheme -> the keys every projection has in a layer group, exactly as qwen-jax has always written them
STORED = {
    None: [("kernel",)],
    QuantScheme(8): [("kernel",), ("kernel_scale",)],
    QuantScheme(4, 32, zero_point=True): [("kernel",), ("kernel_scale",), ("kernel_zero",)],
}


def _model(scheme):
    model = create_model(CONFIG, dtype=jnp.float32, seed=1)
    if scheme is None:
        return model
    # Random parts of the scheme's shapes (zero points come only from imported checkpoints).
    model = with_quantized_structure(model, scheme)
    rng = np.random.default_rng(0)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "values":
            variable.set_value(jnp.asarray(rng.integers(scheme.qmin, scheme.qmax + 1, variable.shape), jnp.int8))
        elif path[-1] in ("scale", "zero"):
            variable.set_value(jnp.asarray(rng.uniform(0.001, 0.01, variable.shape), jnp.float32))
    return model


@pytest.mark.parametrize("scheme", list(STORED), ids=["float", "int8", "int4-g32-asym"])
def test_stored_keys_are_pinned_and_round_trip(tmp_path, scheme):
    model = _model(scheme)
    out = tmp_path / "orbax"
    manifest = save_model(model, out, source="test")
    assert manifest["format_version"] == (1 if scheme is None else 2)
    assert read_manifest(out).get("quantization") == (None if scheme is None else scheme.to_json())
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    layer_dir = os.path.join(os.path.abspath(out), PARAMS_DIR, "model.layers.1")
    stored = checkpointer.metadata(layer_dir).item_metadata.tree
    keys = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
    expected = LAYER_FLOATS | {(*projection, *part) for projection in PROJECTIONS for part in STORED[scheme]}
    assert keys == expected
    if scheme is not None:
        values = checkpointer.restore(layer_dir)["mlp"]["down_proj"]["kernel"]
        assert values.dtype == np.int8 and values.shape == (128, *scheme.stored_shape(256))
    # The specs say where each stored key lives in the model; the model has exactly those paths.
    state_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {spec.path for spec in param_specs(CONFIG, scheme)} == state_paths
    # Unrolled layers (float kernels out-major on CPU) write the same checkpoint.
    unrolled = unstack_layers(_model(scheme))
    assert unrolled.quantization == scheme
    save_model(unrolled, tmp_path / "unrolled", source="test")
    for group in os.listdir(out / PARAMS_DIR):
        a, b = (checkpointer.restore(os.path.abspath(d / PARAMS_DIR / group)) for d in (out, tmp_path / "unrolled"))
        jax.tree.map(np.testing.assert_array_equal, a, b)
    restored = load_model(out, dtype=jnp.float32, progress=False)
    assert restored.quantization == scheme
    for (path_a, a), (path_b, b) in zip(
        nnx.to_flat_state(nnx.state(restored, nnx.Param)), nnx.to_flat_state(nnx.state(model, nnx.Param))
    ):
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_quantized_spec_paths_differ_from_stored_paths_only_for_quantized_parts():
    specs = param_specs(CONFIG, QuantScheme(4, 32, zero_point=True))
    moved = {spec.path: spec.stored_path for spec in specs if spec.path != spec.stored_path}
    prefix = ("model", "layers", "mlp", "down_proj")
    assert moved[(*prefix, "kernel", "values")] == (*prefix, "kernel")
    assert moved[(*prefix, "kernel", "scale")] == (*prefix, "kernel_scale")
    assert moved[(*prefix, "kernel", "zero")] == (*prefix, "kernel_zero")
    assert len(moved) == 3 * len(PROJECTIONS)
    assert all(spec.path == spec.stored_path for spec in param_specs(CONFIG))
