"""Generate text from a prompt, streaming it to stdout (speed summary on stderr), or as one JSON object."""

from __future__ import annotations

import json
import sys

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def add_model_arguments(parser) -> None:
    """--model, --dtype, --mesh, --scan-layers, --quantize, --attention, --rope-scaling: shared with
    `qwen-jax chat` and `qwen-jax serve`."""
    from qwen_jax.config import ATTENTION_BACKENDS

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


def add_sampling_arguments(parser) -> None:
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


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with the prompt text ('-' for stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"text", "token_ids", "prompt_tokens", ...} instead of streaming',
    )


def sampling_overrides(args) -> dict:
    """Keyword arguments for qwen_jax.generate from the parsed sampling options (None: default)."""
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


def load_for_cli(args):
    """(model, tokenizer) from the model arguments, user errors as UsageError."""
    from qwen_jax.errors import AttentionBackendError, UsageError
    from qwen_jax.load import load
    from qwen_jax.sharding import make_mesh, parse_mesh_spec

    mesh = None
    if args.mesh:
        try:
            mesh = make_mesh(**parse_mesh_spec(args.mesh))
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        return load(
            args.model,
            dtype=args.dtype,
            mesh=mesh,
            scan_layers=args.scan_layers,
            quantize=args.quantize,
            attention=args.attention,
            rope_scaling=args.rope_scaling,
        )
    except AttentionBackendError as e:
        raise UsageError(str(e)) from None


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


def run(args) -> int:
    from qwen_jax.errors import GenerationError, UsageError
    from qwen_jax.generation.api import generate, stream

    prompt = _read_prompt(args)
    if args.chat or args.system is not None:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompt = messages + [{"role": "user", "content": prompt}]
    model, tokenizer = load_for_cli(args)
    options = sampling_overrides(args)
    try:
        if args.json:
            result = generate(model, tokenizer, [prompt], **options)
            timing = result.timing
            print(
                json.dumps(
                    {
                        "text": result.texts[0],
                        "token_ids": result.token_ids[0],
                        "prompt_tokens": result.prompt_lengths[0],
                        "finish_reason": result.finish_reasons[0],
                        "prefill_tokens_per_s": timing.prefill_tokens_per_s,
                        "decode_tokens_per_s": timing.decode_tokens_per_s,
                    },
                    ensure_ascii=False,
                )
            )
            return 0
        pieces = stream(model, tokenizer, prompt, **options)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(pieces.result.timing.summary(), file=sys.stderr)
    except GenerationError as e:
        raise UsageError(str(e)) from None
    return 0
