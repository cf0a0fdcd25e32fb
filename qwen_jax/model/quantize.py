"""Weight-only quantization of a model's decoder projections, in memory: int8 per output channel, int4 in groups.

`quantize_model(model, "int8" | "int4" | QuantScheme)` replaces the float kernel of every decoder
projection by a `qwen_jax.model.linear.QuantizedKernel`; `dequantize_model` turns them back into
float kernels. The embedding, the norms and the output head stay in the model's dtype. Loading
quantizes tensor by tensor on the host instead (`qwen_jax.load_model(..., quantize=...)`), which
gives the same arrays without ever placing a float copy; `with_quantized_structure` gives loaders
the abstract quantized model to fill. The arithmetic (schemes, packing, the quantized product) is
`qwen_jax.ops.quant`.
"""

from __future__ import annotations

from qwen_jax.model.causal_lm import Qwen2ForCausalLM, decoder_linears
from qwen_jax.model.linear import QuantizedKernel
from qwen_jax.ops.quant import QuantScheme


def quantize_model(model: Qwen2ForCausalLM, quantize: str | QuantScheme) -> Qwen2ForCausalLM:
    """Quantize every decoder projection of `model` in place and return it.

    The embedding, the norms and the output head stay in the model's dtype. On a mesh, each
    quantized array is placed by its logical axes.
    """
    scheme = QuantScheme.parse(quantize)
    for _, linear in decoder_linears(model):
        linear.quantize(scheme, mesh=model.mesh, rules=model.rules)
    return model


def dequantize_model(model: Qwen2ForCausalLM, dtype=None) -> Qwen2ForCausalLM:
    """Turn every quantized decoder projection of `model` back into a float kernel (in place) and return it.

    dtype: of the float kernels (default: the model's parameter dtype).
    """
    for _, linear in decoder_linears(model):
        linear.dequantize(dtype or model.param_dtype, mesh=model.mesh, rules=model.rules)
    return model


def with_quantized_structure(model: Qwen2ForCausalLM, scheme: QuantScheme | None) -> Qwen2ForCausalLM:
    """`model` with every decoder kernel replaced by a zero-filled quantized one of `scheme` (in place).

    For building abstract models (`nnx.eval_shape`) whose parameters a loader then fills.
    """
    if scheme is None:
        return model
    for path, linear in decoder_linears(model):
        layout = linear.layout
        scheme.groups(layout.in_features, ".".join(map(str, path)))
        linear.kernel = QuantizedKernel.zeros(layout, scheme)
    return model


def model_quantization(model: Qwen2ForCausalLM) -> QuantScheme | None:
    """The quantization of a model's decoder projections (None: float); `Qwen2ForCausalLM.quantization`."""
    return model.quantization
