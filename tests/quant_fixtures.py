"""Test checkpoints in published quantized formats, written from the format descriptions.

The packers here are written independently of qwen_jax's unpacking code (explicit loops over the
values in each int32 word, the reference quantizer's formulas), so a test comparing the two would
catch a shared misreading only if both copies made it:

- GPTQ (AutoGPTQ v1 / GPTQModel v2): round-to-nearest per group with AutoGPTQ's `Quantizer`
  parameters (sym: zero = 2**(bits-1) and scale = 2*absmax/maxq; asym: scale = (max-min)/maxq,
  zero = round(-min/scale)), `qweight [in*bits/32, out]` with input row 32/bits*r + j in bits
  j*bits.., `qzeros [groups, out*bits/32]` likewise along the output, storing zero-1 in v1,
  `scales [groups, out]` fp16, `g_idx [in]`; act-order assigns groups in a random input order.
- AWQ GEMM: asymmetric per group (AutoAWQ's pseudo_quantize: scale = (max-min)/15,
  zero = -round(min/scale)), `qweight [in, out/8]` with column 8c + ORDER[j] in nibble j,
  ORDER = [0, 2, 4, 6, 1, 3, 5, 7].
- GGUF: `gguf.GGUFWriter` with the qwen2 metadata llama.cpp writes; float and Q8_0/Q4_0 tensors
  through `gguf.quants.quantize`, K-quant tensors as crafted raw blocks (the gguf package cannot
  quantize K types).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from qwen_jax.checkpoints.safetensors import write_safetensors

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(words: np.ndarray) -> np.ndarray:
    return (np.asarray(words, np.uint64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def gptq_quantize(
    w: np.ndarray, bits: int, group_size: int, sym: bool, act_order: bool, rng: np.random.Generator
) -> dict:
    """RTN GPTQ quantization of `w [out, in]`: codes, zeros, fp16 scales, g_idx and the dequantized weight."""
    out, inputs = w.shape
    group = inputs if group_size == -1 else group_size
    maxq = 2**bits - 1
    order = rng.permutation(inputs) if act_order else np.arange(inputs)
    g_idx = np.empty(inputs, np.int32)
    g_idx[order] = np.arange(inputs) // group
    groups = inputs // group
    scales = np.zeros((groups, out), np.float32)
    zeros = np.zeros((groups, out), np.int64)
    for g in range(groups):
        wg = w[:, g_idx == g]
        xmin, xmax = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        flat = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(flat, -1, xmin), np.where(flat, 1, xmax)
        scale = (xmax - xmin) / maxq
        zeros[g] = np.full(out, (maxq + 1) // 2) if sym else np.round(-xmin / scale)
        scales[g] = scale.astype(np.float16).astype(np.float32)  # stored fp16: quantize with what is stored
    q = np.zeros((inputs, out), np.int64)
    for i in range(inputs):
        g = g_idx[i]
        q[i] = np.clip(np.round(w[:, i] / scales[g]) + zeros[g], 0, maxq)
    dequantized = np.zeros_like(w, dtype=np.float32)
    for i in range(inputs):
        g = g_idx[i]
        dequantized[:, i] = scales[g] * (q[i] - zeros[g])
    return {"q": q, "zeros": zeros, "scales": scales, "g_idx": g_idx, "dequantized": dequantized}


def gptq_pack(quantized: dict, bits: int, v1: bool = True) -> dict[str, np.ndarray]:
    """AutoGPTQ tensors of one projection from `gptq_quantize`'s result."""
    q, zeros = quantized["q"], quantized["zeros"]
    per_word = 32 // bits
    mask = 2**bits - 1
    inputs, out = q.shape
    qweight = np.zeros((inputs // per_word, out), np.uint64)
    for row in range(inputs // per_word):
        for j in range(per_word):
            qweight[row] |= q[row * per_word + j].astype(np.uint64) << np.uint64(bits * j)
    stored_zeros = (zeros - 1 if v1 else zeros) & mask
    groups = zeros.shape[0]
    qzeros = np.zeros((groups, out // per_word), np.uint64)
    for col in range(out // per_word):
        for j in range(per_word):
            qzeros[:, col] |= stored_zeros[:, col * per_word + j].astype(np.uint64) << np.uint64(bits * j)
    return {
        "qweight": _to_int32(qweight),
        "qzeros": _to_int32(qzeros),
        "scales": quantized["scales"].astype(np.float16),
        "g_idx": quantized["g_idx"],
    }


def awq_quantize_pack(w: np.ndarray, group_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AutoAWQ GEMM tensors of one projection `w [out, in]` and its dequantized weight."""
    out, inputs = w.shape
    groups = inputs // group_size
    wg = w.reshape(out, groups, group_size)
    max_val, min_val = wg.max(axis=2), wg.min(axis=2)
    scales = np.maximum(max_val - min_val, 1e-5) / 15
    scales = scales.astype(np.float16).astype(np.float32)
    zeros = np.clip(-np.round(min_val / scales), 0, 15)
    q = np.clip(np.round(wg / scales[..., None]) + zeros[..., None], 0, 15).reshape(out, inputs).astype(np.int64)
    dequantized = ((q.reshape(out, groups, group_size) - zeros[..., None]) * scales[..., None]).reshape(out, inputs)
    qt = q.T  # [in, out]
    qweight = np.zeros((inputs, out // 8), np.uint64)
    for col in range(out // 8):
        for j, source in enumerate(AWQ_PACK_ORDER):
            qweight[:, col] |= qt[:, col * 8 + source].astype(np.uint64) << np.uint64(4 * j)
    zt = zeros.T.astype(np.int64)  # [groups, out]
    qzeros = np.zeros((groups, out // 8), np.uint64)
    for col in range(out // 8):
        for j, source in enumerate(AWQ_PACK_ORDER):
            qzeros[:, col] |= zt[:, col * 8 + source].astype(np.uint64) << np.uint64(4 * j)
    tensors = {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": scales.T.astype(np.float16)}
    return tensors, dequantized.astype(np.float32)


def write_quantized_checkpoint(
    model,
    directory,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    pad_intermediate_to: int | None = None,
    seed: int = 0,
) -> str:
    """Save HF `model` as a GPTQ/AWQ checkpoint in `directory`; `model`'s projection weights are
    replaced in place by their dequantized values, so it becomes the float oracle.

    pad_intermediate_to: pad the MLP to this intermediate size with zero weights (as Qwen's 72B
    quantized repos do), writing the padded size into config.json.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    state = {name: p.detach().float().numpy() for name, p in model.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    F = model.config.intermediate_size
    for layer in range(model.config.num_hidden_layers):
        for projection in PROJECTIONS:
            module = f"model.layers.{layer}.{projection}"
            w = state.pop(f"{module}.weight")
            padded = w
            if pad_intermediate_to and projection in ("mlp.gate_proj", "mlp.up_proj"):
                padded = np.concatenate([w, np.zeros((pad_intermediate_to - F, w.shape[1]), np.float32)])
            elif pad_intermediate_to and projection == "mlp.down_proj":
                padded = np.concatenate([w, np.zeros((w.shape[0], pad_intermediate_to - F), np.float32)], axis=1)
            if method == "awq":
                packed, dequantized = awq_quantize_pack(padded, group_size)
            else:
                quantized = gptq_quantize(padded, bits, group_size, sym, desc_act, rng)
                packed, dequantized = (
                    gptq_pack(quantized, bits, v1=checkpoint_format == "gptq"),
                    quantized["dequantized"],
                )
            tensors.update({f"{module}.{k}": v for k, v in packed.items()})
            with torch.no_grad():
                model.get_submodule(module).weight.copy_(torch.from_numpy(dequantized[: w.shape[0], : w.shape[1]]))
    tensors.update(
        {
            name: value
            for name, value in state.items()
            if not name.startswith("lm_head") or not model.config.tie_word_embeddings
        }
    )
    write_safetensors(os.path.join(directory, "model.safetensors"), sorted(tensors.items()))
    config = model.config.to_dict()
    config["torch_dtype"] = "float32"
    if pad_intermediate_to:
        config["intermediate_size"] = pad_intermediate_to
    if method == "awq":
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "version": "gemm",
            "zero_point": True,
        }
    else:
        config["quantization_config"] = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "checkpoint_format": checkpoint_format,
        }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


# --------------------------------------------------------------------------- GGUF
def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def small_bpe_vocabulary(corpus: str, merges_wanted: int = 40) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (256 bytes + merged tokens) and its merges, learned greedily on `corpus`."""
    alphabet = byte_level_alphabet()
    words = [[alphabet[b] for b in (" " + w if i else w).encode()] for i, w in enumerate(corpus.split(" "))]
    tokens, merges = list(alphabet), []
    for _ in range(merges_wanted):
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda pair: counts[pair])
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for k, word in enumerate(words):
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[k] = merged
    return tokens, merges


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED_TOKENS = ("<tool_call>",)


def k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random raw Q4_K / Q5_K / Q6_K blocks `[rows, bytes per row]` with small finite scales."""
    import gguf

    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_elements, block_bytes), dtype=np.uint8)
    name = qtype.name
    if name in ("Q4_K", "Q5_K"):  # d, dmin (fp16) lead the block
        blocks[..., 0:2] = np.full(blocks.shape[:2], 2e-4, np.float16)[..., None].view(np.uint8)
        blocks[..., 2:4] = np.full(blocks.shape[:2], 1e-4, np.float16)[..., None].view(np.uint8)
    elif name == "Q6_K":  # d (fp16) ends the block
        blocks[..., block_bytes - 2 :] = np.full(blocks.shape[:2], 3e-5, np.float16)[..., None].view(np.uint8)
    else:
        raise ValueError(name)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(
    path: str,
    *,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    seed: int = 0,
    types: dict[str, str] | None = None,
    corpus: str = "the quick brown fox jumps over the lazy dog and the cat sat on the mat",
) -> dict:
    """A qwen2 GGUF with random weights in several tensor types and a small byte-level BPE tokenizer.

    types: GGUF type per llama.cpp tensor kind (attn_q, ffn_down, token_embd, ...); F32 by default.
    Returns what was written (token list, tensor types).
    """
    import gguf

    rng = np.random.default_rng(seed)
    tokens, merges = small_bpe_vocabulary(corpus)
    token_types = [1] * len(tokens)
    tokens += list(SPECIAL_TOKENS) + list(USER_DEFINED_TOKENS)
    token_types += [3] * len(SPECIAL_TOKENS) + [4] * len(USER_DEFINED_TOKENS)
    vocab = (len(tokens) + 63) // 64 * 64  # embedding rows padded as llama.cpp pads Qwen's vocabulary
    pads = vocab - len(tokens)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(pads)]
    token_types += [5] * pads
    types = {
        "token_embd": "F16",
        "attn_q": "Q8_0",
        "attn_k": "Q4_0",
        "attn_v": "BF16",
        "attn_output": "Q4_K",
        "ffn_gate": "Q5_K",
        "ffn_up": "Q6_K",
        "ffn_down": "F16",
        "output": "Q8_0",
        **(types or {}),
    }
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, shape: tuple[int, ...], scale: float = 0.05, center: float = 0.0):
        kind = name.split(".")[-2]
        qtype = gguf.GGMLQuantizationType[types.get(kind, "F32") if len(shape) == 2 else "F32"]
        if qtype.name in ("Q4_K", "Q5_K", "Q6_K"):
            writer.add_tensor(name, k_quant_blocks(*shape, qtype, rng), raw_dtype=qtype)
            return
        data = (center + scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype.name == "F32":
            writer.add_tensor(name, data)
        elif qtype.name == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden), 0.5)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_q.bias", (heads * head_dim,), 0.1)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.bias", (kv_heads * head_dim,), 0.1)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.bias", (kv_heads * head_dim,), 0.1)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (hidden,), 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (intermediate, hidden))
        add(f"blk.{i}.ffn_up.weight", (intermediate, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, intermediate))
    add("output_norm.weight", (hidden,), 0.1, 1.0)
    if not tied:
        add("output.weight", (vocab, hidden), 0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tokens": tokens, "types": types, "vocab": vocab}
