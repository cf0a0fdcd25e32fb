"""Arguments shared by the subcommands that load a model (`generate`, `chat`, `serve`): the model
and how it runs, the sampling options, and turning them into `qwen_jax.load` / `qwen_jax.generate`
arguments."""

from __future__ import annotations

import argparse
from typing import Any

from qwen_jax.config import ATTENTION_BACKENDS
from qwen_jax.errors import UsageError
from qwen_jax.generation.speculative import METHODS, SpeculativeOptions
from qwen_jax.load import load
from qwen_jax.model.causal_lm import Qwen2ForCausalLM
from qwen_jax.sharding import make_mesh, parse_mesh_spec
from qwen_jax.tokenizer import Tokenizer

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --mesh, --scan-layers, --quantize, --attention, --rope-scaling."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"checkpoint: HF/GPTQ/AWQ directory, GGUF file, directory converted by qwen-jax "
        f"convert, or Hub id, downloaded to the Hub cache (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)",
    )
    parser.add_argument("--mesh", help="device mesh, e.g. 'tensor=4' or 'data=1,fsdp=1,tensor=8' (default: one device)")
    parser.add_argument(
        "--scan-layers",
        action="store_true",
        help="run the layers with a scan: faster compile, slower decode (default: unrolled)",
    )
    parser.add_argument(
        "--quantize",
        metavar="{int8,int4}",
        help="weight-only quantization of the decoder projections while loading (int8: per output "
        "channel; int4: groups of 128 inputs); quantized checkpoints load as they are",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="auto",
        help="attention backend (default auto: chunked flash attention on CPU for long sequences, "
        "cuDNN on GPU, splash on TPU)",
    )
    parser.add_argument(
        "--rope-scaling",
        metavar="TYPE:FACTOR",
        help="override the checkpoint's rope scaling, e.g. 'yarn:4' for 4x the context "
        "(Qwen2.5: 32K -> 128K), or 'none'",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling options: unset ones come from the checkpoint's generation_config.json."""
    parser.add_argument("--system", help="system message (implies --chat)")
    parser.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default: 256 or the checkpoint's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (1: off)")
    parser.add_argument("--min-p", type=float, help="drop tokens below min-p times the top probability (0: off)")
    parser.add_argument("--repetition-penalty", type=float, help="HF repetition penalty (1: off)")
    parser.add_argument("--seed", type=int, help="sampling seed (default 0)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="TOKENS",
        help="prompt tokens per prefill call: bounds prefill memory (default: 2048 on CPU, the "
        "whole prompt on a GPU/TPU)",
    )


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `qwen_jax.generate` / `stream` from the sampling options (None: the default)."""
    temperature = 0.0 if args.greedy else args.temperature
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        prefill_chunk=args.prefill_chunk,
    )


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    """--speculative, --num-speculative-tokens, --ngram-min/--ngram-max, --draft-model (`generate`, `chat`, `serve`)."""
    defaults = SpeculativeOptions()
    parser.add_argument(
        "--speculative",
        choices=METHODS,
        help="speculative decoding: 'ngram' proposes the tokens that followed the latest earlier match of the "
        "last tokens (prompt lookup: helps when the output copies the input), 'draft' a smaller model "
        "(--draft-model); greedy output is unchanged, sampled output keeps its distribution",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        metavar="K",
        default=defaults.num_speculative_tokens,
        help=f"tokens proposed per step (default {defaults.num_speculative_tokens})",
    )
    parser.add_argument(
        "--ngram-min",
        type=int,
        default=defaults.ngram_min,
        help=f"shortest n-gram looked up (default {defaults.ngram_min})",
    )
    parser.add_argument(
        "--ngram-max",
        type=int,
        default=defaults.ngram_max,
        help=f"longest n-gram looked up (default {defaults.ngram_max})",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH|HUB_ID",
        help="draft model for --speculative draft: a smaller Qwen2.5 with the same tokenizer (e.g. 0.5B-Instruct "
        "for a 7B), loaded like --model on its mesh (serve: with its own KV cache of slots x max-len tokens)",
    )


def speculative_for_cli(args: argparse.Namespace, model: Qwen2ForCausalLM) -> SpeculativeOptions | None:
    """The `speculative=` argument from the speculative options (loading the draft model on the target's mesh)."""
    if args.speculative is None:
        if args.draft_model is not None:
            raise UsageError("--draft-model needs --speculative draft")
        return None
    draft = None
    if args.speculative == "draft":
        if args.draft_model is None:
            raise UsageError("--speculative draft needs --draft-model PATH|HUB_ID")
        draft, _ = load(
            args.draft_model,
            dtype=args.dtype,
            mesh=model.mesh,
            scan_layers=args.scan_layers,
            quantize=args.quantize,
            attention=args.attention,
        )
    elif args.draft_model is not None:
        raise UsageError("--draft-model is only used with --speculative draft")
    return SpeculativeOptions(
        method=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
        ngram_min=args.ngram_min,
        ngram_max=args.ngram_max,
        draft_model=draft,
    )


def load_for_cli(args: argparse.Namespace) -> tuple[Qwen2ForCausalLM, Tokenizer]:
    """(model, tokenizer) as the model arguments say (errors as `qwen_jax.load` and `make_mesh` raise them)."""
    mesh = make_mesh(**parse_mesh_spec(args.mesh)) if args.mesh else None
    return load(
        args.model,
        dtype=args.dtype,
        mesh=mesh,
        scan_layers=args.scan_layers,
        quantize=args.quantize,
        attention=args.attention,
        rope_scaling=args.rope_scaling,
    )
