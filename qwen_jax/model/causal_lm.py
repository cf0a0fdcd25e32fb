"""`Qwen2ForCausalLM`: Qwen2.5 in Flax NNX, mirroring HF transformers' model of that name.

Layout (einsum letters): B batch, T query length, S key length, D embed, N query heads,
K kv heads, G query heads per kv head, H head_dim, F mlp, V vocab, L layers.

Decoder layers are stored stacked on a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth; `unstack_layers` gives the same model with one module per
layer, which memory-bound decode reads faster. Every parameter carries `logical_axes` metadata
that `qwen_jax.sharding` maps onto a mesh. `create_model` builds a random model straight into its
shards. The layers are in `qwen_jax.model.modules`, the projections in `qwen_jax.model.linear`.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.compilation import EXECUTABLES, argument_signature
from qwen_jax.config import GenerationConfig, Qwen2Config
from qwen_jax.errors import QuantizationError
from qwen_jax.model.kv_cache import KVCache
from qwen_jax.model.linear import Linear
from qwen_jax.model.modules import AttentionContext, LMHead, Qwen2Model
from qwen_jax.model.rope import rope_tables
from qwen_jax.ops import cpu
from qwen_jax.ops.attention.mask import AttentionMask
from qwen_jax.ops.attention.selection import check_backend, select_backend
from qwen_jax.ops.quant import QuantScheme
from qwen_jax.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    constrain,
    named_sharding,
    platform_of,
    state_shardings,
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_dtype() -> jnp.dtype:
    """float32 on CPU (XLA's CPU bf16 matmuls are emulated and slow), bfloat16 on GPU/TPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2.5 causal LM.

    `model(input_ids)` with `int32[B, T]` returns float32 logits `[B, T, vocab_size]`.
    Outside a trace the call runs through a cached `jax.jit` with explicit shardings; inside a
    traced function (a train step, a generation loop) it is inlined.

    Besides its layers the model holds: `config`, `dtype` (compute), `param_dtype`, `mesh` and
    `rules` (where its parameters live), `remat` (the training remat policy), `attention` (the
    backend), `cpu_kernels` (whether the XLA:CPU specialisations of `qwen_jax.ops.cpu` apply,
    decided from the mesh's platform when the model is built) and `generation_config` (the
    checkpoint's sampling defaults, set by `qwen_jax.load`; None: greedy, the config's eos ids).
    `quantization` is computed from its kernels.
    """

    def __init__(
        self,
        config: Qwen2Config,
        *,
        dtype=None,
        param_dtype=None,
        rngs: nnx.Rngs | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules = DEFAULT_RULES,
        remat: str = "none",
        scan_layers: bool = True,
        attention: str = "auto",
        cpu_kernels: bool | None = None,
    ):
        """cpu_kernels: whether the XLA:CPU specialisations apply; None (default):
        `qwen_jax.ops.cpu.applies(mesh)` (CPU devices, not turned off by `QWEN_JAX_CPU_KERNELS=0`)."""
        dtype = jnp.dtype(dtype or default_dtype())
        param_dtype = jnp.dtype(param_dtype or dtype)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose from {list(REMAT_POLICIES)}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.mesh = mesh
        self.rules = rules
        self.remat = remat
        self.attention = attention
        self.cpu_kernels = cpu.applies(mesh) if cpu_kernels is None else bool(cpu_kernels)
        self.generation_config: GenerationConfig | None = None
        self.model = Qwen2Model(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_layers=scan_layers,
            cpu_kernels=self.cpu_kernels,
            rngs=rngs,
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else LMHead(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        )

    # ------------------------------------------------------------------ API
    @property
    def attention(self) -> str:
        """Attention backend: 'auto' (default), 'xla', 'chunked', 'cudnn' or 'splash' (see
        `qwen_jax.ops.attention`). Setting one that cannot run here raises `AttentionBackendError`."""
        return self._attention

    @attention.setter
    def attention(self, name: str) -> None:
        check_backend(name, dtype=self.dtype, head_dim=self.config.head_dim, platform=platform_of(self.mesh))
        self._attention = name

    def __call__(
        self, input_ids, positions=None, attention_mask=None, *, segment_ids=None, cache=None, logits_to_keep: int = 0
    ):
        """Logits `[B, T, V]` (float32); with `cache`, returns `(logits, new_cache)`.

        logits_to_keep: compute logits for the last n positions only (`[B, n, V]`; 0: all), as in
          HF. Full logits of a long prompt are large (4K tokens x 151,936 x 4 bytes = 2.5 GB).

        attention_mask: `[B, T]`, 1 for real tokens and 0 for padding. Without a cache, padding
          may sit anywhere (left padding for batched prompts); with a cache, real tokens come
          first in each row (right padding) and each row's cache length grows by its count of
          real tokens (see `KVCache`). Default: every token is real.
        positions: `[B, T]`; default: without a cache, the count of real tokens before each one
          (works for left padding); with a cache, each token's slot `cache.lengths[b] + t`.
        segment_ids: `[B, T]` for packed sequences: attention never crosses segments.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32) if not _traced(input_ids) else input_ids
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be int32[batch, seq], got shape {input_ids.shape}")
        positions, attention_mask = self._defaults(input_ids, positions, attention_mask, cache)
        logits_to_keep = int(logits_to_keep)
        if not 0 <= logits_to_keep <= input_ids.shape[1]:
            raise ValueError(f"logits_to_keep must be in [0, {input_ids.shape[1]}], got {logits_to_keep}")
        if _traced(input_ids) or _traced(self.model.embed_tokens.embedding.get_value()):
            return self.forward(
                input_ids,
                positions,
                attention_mask,
                segment_ids=segment_ids,
                cache=cache,
                logits_to_keep=logits_to_keep,
            )
        state = nnx.state(self)
        fn = _jitted_forward(self, state, input_ids, cache is not None, segment_ids is not None, logits_to_keep)
        return fn(state, input_ids, positions, attention_mask, segment_ids, cache)

    @property
    def quantization(self) -> QuantScheme | None:
        """The quantization of the decoder projections (None: float kernels); the embedding, norms
        and lm_head are always float. `qwen_jax.model.quantize` converts a model either way."""
        schemes = {linear.quantization for _, linear in decoder_linears(self)}
        if len(schemes) > 1:
            names = sorted("float" if s is None else s.name for s in schemes)
            raise QuantizationError(f"the decoder projections mix kernels ({', '.join(names)})")
        return schemes.pop()

    def _defaults(self, input_ids, positions, attention_mask, cache):
        B, T = input_ids.shape
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}")
        if cache is not None and cache.batch != B:
            raise ValueError(f"cache has {cache.batch} rows, input_ids {B}")
        if positions is None:
            if cache is not None:
                positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
            elif attention_mask is not None:
                positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        positions = jnp.asarray(positions).astype(jnp.int32)
        if positions.shape != (B, T):
            raise ValueError(f"positions shape {positions.shape} != input_ids shape {(B, T)}")
        return positions, attention_mask

    def hidden_states(
        self,
        input_ids,
        positions,
        attention_mask=None,
        *,
        segment_ids=None,
        cache=None,
        rope_length=None,
        empty_cache: bool = False,
    ):
        """Final-norm hidden states `[B, T, D]` (and the new cache, or None).

        rope_length: the sequence length dynamic-NTK rope scales from (see `rope.rope_tables`).
        empty_cache: the caller guarantees every row of `cache` has length 0 (a first prefill):
          keys are still written to the cache, but attention is plain causal self-attention over
          this call's keys (the fused kernels' fast causal path, no cache read, no slot mask).
          Same result as the cached path; wrong if a row already holds tokens.
        """
        cfg, mesh, rules = self.config, self.mesh, self.rules
        x = self.model.embed_tokens(input_ids)
        x = constrain(x, ("batch", "seq", "act_embed"), mesh, rules)
        cos, sin = rope_tables(cfg, positions, self.dtype, rope_length)
        context = self._attention_context(input_ids.shape, attention_mask, segment_ids, cache, empty_cache)
        x, kv = self.run_layers(x, cos, sin, context, None if cache is None else (cache.k, cache.v))
        new_cache = None
        if cache is not None:
            added = input_ids.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
            new_cache = KVCache(kv[0], kv[1], cache.lengths + added)
        return x, new_cache

    def run_layers(self, x, cos, sin, context, kv):
        """Every decoder layer, then the final norm; returns (hidden states, cache arrays or None)."""
        cfg, mesh, rules = self.config, self.mesh, self.rules

        def run_layer(layer_graph, layer_state, h, kv, layer_idx, use_window):
            layer = nnx.merge(layer_graph, layer_state)
            h, kv = layer(h, cos, sin, context, kv, layer_idx, use_window)
            return constrain(h, ("batch", "seq", "act_embed"), mesh, rules), kv

        if self.remat != "none":
            run_layer = jax.checkpoint(
                run_layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False, static_argnums=(0,)
            )
        uses_window = tuple(w > 0 for w in cfg.layer_windows)
        if isinstance(self.model.layers, nnx.List):
            # Unrolled: each layer reads its own weight arrays (no per-step slice of a stacked array).
            for i, layer in enumerate(self.model.layers):
                x, kv = run_layer(*nnx.split(layer), x, kv, i, uses_window[i])
        else:
            layers_graph, layers_state = nnx.split(self.model.layers)
            same_window = len(set(uses_window)) == 1  # then the flag stays static inside the scan

            def body(carry, xs):
                use_window = uses_window[0] if same_window else xs[2]
                return run_layer(layers_graph, xs[0], *carry, xs[1], use_window), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, kv), _ = jax.lax.scan(body, (x, kv), (layers_state, layer_ids, jnp.asarray(uses_window)))
        return self.model.norm(x), kv

    def _window(self) -> int:
        windows = {w for w in self.config.layer_windows if w}
        if len(windows) > 1:
            raise ValueError(f"layers use different sliding windows {sorted(windows)}; qwen-jax supports one")
        return windows.pop() if windows else 0

    def cached_context(self, starts, q_len: int, max_len: int) -> AttentionContext:
        """The context of `q_len` new tokens per row read against a cache whose rows start at `starts`."""
        backend = select_backend(
            self.attention,
            q_len=q_len,
            kv_len=max_len,
            cached=True,
            dtype=self.dtype,
            head_dim=self.config.head_dim,
            platform=platform_of(self.mesh),
        )
        return AttentionContext(
            backend, AttentionMask.cached(starts), self._window(), starts, True, self.mesh, self.rules, self.cpu_kernels
        )

    def _attention_context(self, shape, attention_mask, segment_ids, cache, empty_cache=False) -> AttentionContext:
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training batches, not cached decoding")
            if not empty_cache:
                return self.cached_context(cache.lengths, shape[1], cache.max_len)
            # Empty cache: real tokens come first in each row and sit at slots 0..T-1, so the plain
            # causal mask is the cache's mask (padding after a row's tokens is never seen by them).
            mask = AttentionMask.causal()
        else:
            if attention_mask is not None:  # padding gets its own segment: real tokens never see it
                segment_ids = attention_mask if segment_ids is None else jnp.where(attention_mask > 0, segment_ids, -1)
            mask = AttentionMask.causal(segment_ids)
        backend = select_backend(
            self.attention,
            q_len=shape[1],
            kv_len=shape[1],
            cached=False,
            dtype=self.dtype,
            head_dim=self.config.head_dim,
            platform=platform_of(self.mesh),
        )
        starts = None if cache is None else cache.lengths
        return AttentionContext(backend, mask, self._window(), starts, False, self.mesh, self.rules, self.cpu_kernels)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary float32 logits from final hidden states."""
        head = self.model.embed_tokens.embedding if self.lm_head is None else self.lm_head.weight
        head = head[...].astype(self.dtype)
        if self.cpu_kernels:  # the head is stored [vocab, embed]: an out-major kernel
            rows = hidden.shape[:-1]
            flat = cpu.rows_times_out_major(hidden.reshape(-1, hidden.shape[-1]), head, jnp.float32)
            logits = flat.reshape(*rows, head.shape[0])
        else:
            logits = jnp.einsum("BTD,VD->BTV", hidden, head, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"), self.mesh, self.rules)

    def forward(
        self,
        input_ids,
        positions,
        attention_mask,
        *,
        segment_ids=None,
        cache=None,
        logits_to_keep: int = 0,
        empty_cache: bool = False,
    ):
        """The traced computation behind `__call__` (explicit positions and mask); `empty_cache` as in
        `hidden_states`."""
        hidden, new_cache = self.hidden_states(
            input_ids, positions, attention_mask, segment_ids=segment_ids, cache=cache, empty_cache=empty_cache
        )
        logits = self.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return logits if cache is None else (logits, new_cache)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _jitted_forward(
    model: Qwen2ForCausalLM, state, input_ids, with_cache: bool, with_segments: bool, logits_to_keep: int
):
    """The compiled forward for this model structure, these arguments' shapes and these shardings
    (explicit on a mesh), from the shared executable cache (`qwen_jax.compilation.EXECUTABLES`)."""
    graphdef = nnx.graphdef(model)
    mesh, rules = model.mesh, model.rules
    static = (graphdef, with_cache, with_segments, logits_to_keep)
    shardings = None
    if mesh is not None:
        leaves, treedef = jax.tree.flatten(state)
        state_sh = tuple(leaf.sharding for leaf in leaves)
        tokens = named_sharding(("batch", "seq"), input_ids.shape, mesh, rules)
        kept = logits_to_keep or input_ids.shape[1]
        logits_shape = (input_ids.shape[0], kept, model.config.vocab_size)
        logits = named_sharding(("batch", "seq", "vocab"), logits_shape, mesh, rules)
        shardings = (treedef, state_sh, tokens, logits)

    def compiled(*args):
        key = ("model.forward", static, shardings, argument_signature(args))
        executable, _ = EXECUTABLES.get(
            "model.forward", key, lambda: _compile(*static, shardings).lower(*args).compile()
        )
        return executable(*args)

    return compiled


def _compile(graphdef, with_cache: bool, with_segments: bool, logits_to_keep: int, shardings):
    """The jitted forward that `_jitted_forward` lowers and compiles ahead of time."""

    def fn(state, input_ids, positions, attention_mask, segment_ids, cache):
        model = nnx.merge(graphdef, state)
        return model.forward(
            input_ids, positions, attention_mask, segment_ids=segment_ids, cache=cache, logits_to_keep=logits_to_keep
        )

    donate = ("cache",) if with_cache else ()
    if shardings is None:
        return jax.jit(fn, donate_argnames=donate)
    treedef, state_sh, tokens, logits = shardings
    state_tree = jax.tree.unflatten(treedef, state_sh)
    # The cache keeps whatever sharding the caller gave it (generation places it by logical axes).
    in_shardings = (state_tree, tokens, tokens, None, tokens if with_segments else None, None)
    out_shardings = (logits, None) if with_cache else logits
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnames=donate)


def create_model(
    config: Qwen2Config,
    *,
    dtype=None,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    seed: int = 0,
    remat: str = "none",
    attention: str = "auto",
) -> Qwen2ForCausalLM:
    """A randomly initialised model; on a mesh every parameter is created directly in its shards."""

    def build():
        return Qwen2ForCausalLM(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(seed),
            mesh=mesh,
            rules=rules,
            remat=remat,
            attention=attention,
        )

    if mesh is None:
        return build()
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=state_shardings(abstract_state, mesh, rules))()
    return nnx.merge(graphdef, state)


def decoder_linears(model: Qwen2ForCausalLM) -> Iterator[tuple[tuple, Linear]]:
    """(path below `model.model.layers`, Linear) for every projection of the decoder layers.

    Stacked layers give one Linear per projection (`('self_attn', 'q_proj')`), unrolled ones one per
    layer and projection (`(0, 'self_attn', 'q_proj')`).
    """
    for path, module in nnx.iter_modules(model.model.layers):
        if isinstance(module, Linear):
            yield path, module


def default_out_major(model: Qwen2ForCausalLM) -> bool:
    """Whether `unstack_layers` stores the float decoder kernels out-major by default: when the
    model's XLA:CPU specialisations apply (`qwen_jax.ops.cpu`) and its kernels are float."""
    return model.cpu_kernels and model.quantization is None


def set_decoder_out_major(model: Qwen2ForCausalLM, out_major: bool) -> None:
    """`Linear.set_out_major` on every decoder projection of an unrolled model, in place."""
    for _, linear in decoder_linears(model):
        linear.set_out_major(out_major)


def unstack_layers(model: Qwen2ForCausalLM, *, out_major: bool | None = None) -> Qwen2ForCausalLM:
    """The same model with one weight array per layer (`scan_layers=False`).

    A scanned step slices (copies) every layer's weights out of the stacked arrays before using
    them; unrolled layers read their own arrays, which matters for memory-bound batch-1 decode
    (see benchmarks/generate.py). Compile time then grows with depth. `model` is consumed: each
    stacked array is deleted once split, so peak memory is the model plus its largest parameter.
    Quantized kernels and LoRA adapters are unstacked with the rest (an adapted model stays an
    ordinary model for inference, adapters unmerged).

    out_major: store the float decoder kernels `[*out, *in]` (`Linear.set_out_major`), which
    XLA:CPU's decode products read faster (`qwen_jax.ops.cpu`; see benchmarks/generate.py).
    None (default): `default_out_major`. Writers (`save_model`, HF export) read the kernels back
    in the einsum layout, so checkpoints do not depend on it.
    """
    if isinstance(model.model.layers, nnx.List):
        return model
    out_major = default_out_major(model) if out_major is None else out_major
    stacked = dict(decoder_linears(model))

    def build():
        unrolled = Qwen2ForCausalLM(
            model.config,
            dtype=model.dtype,
            param_dtype=model.param_dtype,
            mesh=model.mesh,
            rules=model.rules,
            remat=model.remat,
            scan_layers=False,
            attention=model.attention,
            cpu_kernels=model.cpu_kernels,
        )
        for path, linear in decoder_linears(unrolled):
            linear.take_structure(stacked[path[1:]])
            linear.set_out_major(out_major)
        return unrolled

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    target = dict(nnx.to_flat_state(abstract_state))
    shardings = (
        None
        if model.mesh is None
        else dict(nnx.to_flat_state(state_shardings(abstract_state, model.mesh, model.rules)))
    )
    # Stacked kernel path (below `model.layers`) -> the permutation its layer slices take.
    perms = {
        (*path[1:], "kernel"): cpu.out_major_permutation(len(linear.kernel.shape), linear.contracted, True)
        for path, linear in decoder_linears(abstract)
        if linear.out_major and path[0] == 0
    }
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        if path[:2] != ("model", "layers"):
            target[path].set_value(value)
            continue
        for i in range(model.config.num_hidden_layers):
            layer_path = ("model", "layers", i, *path[2:])
            sharding = None if shardings is None else shardings[layer_path].get_value()
            target[layer_path].set_value(_take_layer(value, i, sharding, perms.get(path[2:])))
        value.delete()
    unrolled = nnx.merge(graphdef, nnx.from_flat_state(target))
    unrolled.generation_config = model.generation_config
    return unrolled


def _take_layer(stacked: jax.Array, i: int, sharding, perm=None) -> jax.Array:
    if sharding is None:
        return _take_layer_jit(stacked, i, perm)
    return jax.jit(_index_layer, static_argnums=2, out_shardings=sharding)(stacked, i, perm)


def _index_layer(stacked, i, perm=None):
    layer = jax.lax.dynamic_index_in_dim(stacked, i, 0, keepdims=False)
    return layer if perm is None else jnp.transpose(layer, perm)


_take_layer_jit = jax.jit(_index_layer, static_argnums=2)
