"""`python -m raygpt.sample`: text from a trained checkpoint or from OpenAI's GPT-2.

    python -m raygpt.sample --checkpoint RUN_NAME            # latest checkpoint of a run
    python -m raygpt.sample --checkpoint path/to/checkpoint_0002000 --start "ROMEO:"
    python -m raygpt.sample --init-from gpt2 --start FILE:prompt.txt
    python -m raygpt.sample --checkpoint RUN_NAME --interactive   # a prompt per line

A checkpoint brings its own model shape (read from the saved weights) and its
tokenizer (the character vocabulary stored in the checkpoint, or GPT-2 BPE via
tiktoken). Samples go to stdout, each followed by a `---------------` line;
what was loaded goes to stderr. The same seed gives the same text.

--interactive loads the model once, then reads prompts from stdin, one a line, and
prints each one's continuation, until end of input, an empty line or `:q`. A prompt
the tokenizer cannot write is an `error:` line on stderr, and the next prompt is read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from raygpt.config.choices import DTYPES
from raygpt.config.io import OneLineArgumentParser
from raygpt.errors import UserError, exit_on_user_error
from raygpt.model import generate, loading
from raygpt.runtime import Runtime, resolve_device, resolve_dtype

SEPARATOR = "---------------"


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m raygpt.sample",
        description="Sample text from a raygpt checkpoint or from pretrained GPT-2 weights.",
    )
    loading.add_source_arguments(p)  # exactly one of the first two: loading.load checks
    p.add_argument(
        "--start",
        default="\n",
        help='the prompt (default "\\n"); FILE:path reads it from a file',
    )
    p.add_argument(
        "--num-samples",
        type=int,
        help="samples per prompt (default 3; 1 with --interactive)",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one a line, until end of input, an empty line or :q "
        "(--start is not used)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=300, help="tokens per sample (default 300)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="< 1 sharper, > 1 more random (default 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=200,
        help="sample only among the k most likely tokens; 0 for all (default 200)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto: bfloat16 on CUDA where supported, else float16; float32 on CPU",
    )
    return p


# --------------------------------------------------------------------------- devices


# --------------------------------------------------------------------------- loading


# --------------------------------------------------------------------------- prompting


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:") :]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file {path} ({type(err).__name__}: {err})") from None


def _check_args(args) -> None:
    if args.checkpoint is None and args.init_from is None:
        raise UserError("give --checkpoint PATH_OR_RUN or --init-from gpt2 (see --help)")
    if args.num_samples is None:
        args.num_samples = 1 if args.interactive else 3
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise UserError(
            f"--temperature must be > 0, got {args.temperature}; use --top-k 1 for greedy"
        )
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    runtime = Runtime(device, resolve_dtype(args.dtype, device), compile=False)
    prompt = None if args.interactive else read_prompt(args.start)

    loaded = loading.load(args.checkpoint, args.init_from, args.storage_path)
    model, tokenizer, description = loaded.model.to(device), loaded.tokenizer, loaded.description
    ids = None if prompt is None else generate.encode_prompt(tokenizer, prompt)
    print(f"[raygpt] sampling from {description} on {device}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def complete(ids: list[int]) -> list[list[int]]:
        return [
            generate.generate(
                model,
                ids,
                args.max_new_tokens,
                runtime=runtime,
                generator=generator,
                temperature=args.temperature,
                top_k=args.top_k or None,
            )
            for _ in range(args.num_samples)
        ]

    if ids is None:
        interact(tokenizer, complete)
        return 0
    for out in complete(ids):
        print(tokenizer.decode(out))
        print(SEPARATOR, flush=True)
    return 0


def interact(tokenizer: Any, complete: Any) -> None:
    """Prompts from stdin, one a line (its newline not part of it), each answered by its
    continuations, until end of input, an empty line or `:q`."""
    show_prompt = sys.stdin.isatty()
    while True:
        if show_prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        prompt = line.removesuffix("\n").removesuffix("\r")
        if not line or prompt in ("", ":q"):
            return
        try:
            ids = generate.encode_prompt(tokenizer, prompt, "prompt")
        except UserError as err:  # a typo should not end the session
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        for out in complete(ids):
            print(tokenizer.decode(out[len(ids) :]))
            print(SEPARATOR, flush=True)


if __name__ == "__main__":
    sys.exit(main())
