"""`python -m raygpt.eval hellaswag|perplexity`: score a checkpoint or pretrained GPT-2.

    python -m raygpt.eval hellaswag --init-from gpt2             # all 10,042 val examples
    python -m raygpt.eval hellaswag --checkpoint my-run --limit 1000
    python -m raygpt.eval perplexity --checkpoint my-run        # its own dataset, val split
    python -m raygpt.eval perplexity --init-from gpt2 --dataset shakespeare --split val

The model is a raygpt checkpoint (`--checkpoint`: a folder, a run folder or a run name)
or Hugging Face GPT-2 weights (`--init-from`: gpt2 ... gpt2-xl, or a directory, such
as one `python -m raygpt.export` wrote, which brings its own tokenizer).

Everything bad input can break is done before Ray starts: the model and tokenizer load,
the data is downloaded (HellaSwag, checked by sha256) or prepared, and every example is
tokenized. Then the token spans are scored on Ray workers (raygpt.evals.workers), one
summary line goes to stdout and the whole result to a JSON file (--output).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from raygpt import results, runtime, storage
from raygpt.cluster import connect
from raygpt.config.choices import DTYPES
from raygpt.config.io import OneLineArgumentParser
from raygpt.data import cache, hub_corpora, manifest, prepare, sampler, sources
from raygpt.data import common as data_common
from raygpt.errors import UserError, exit_on_user_error
from raygpt.eval import hellaswag, perplexity, scoring, workers
from raygpt.model import loading

# Chunks of work per worker, at least: enough that a slow worker takes fewer of them.
CHUNKS_PER_WORKER = 4
MAX_EXAMPLES_PER_CHUNK = 16  # HellaSwag: 8 spans an example
MAX_WINDOWS_PER_CHUNK = 64  # perplexity


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.eval",
        description="Evaluate a raygpt checkpoint or GPT-2 weights on HellaSwag or perplexity.",
    )
    tasks = parser.add_subparsers(
        dest="task", metavar="{hellaswag,perplexity}", parser_class=OneLineArgumentParser
    )
    tasks.required = True
    common = OneLineArgumentParser(add_help=False)
    loading.add_source_arguments(common.add_argument_group("model (give one)"))
    common.add_argument(
        "--data-dir",
        help="the data cache (default $RAYGPT_DATA_DIR, else ~/.cache/raygpt)",
    )
    common.add_argument(
        "--output", metavar="PATH", help="the JSON result (default eval_TASK_SPLIT.json)"
    )
    ray_flags = common.add_argument_group("Ray")
    ray_flags.add_argument(
        "--address",
        help="the Ray cluster to join (default: RAY_ADDRESS, else a running one, "
        "else a private one); 'local' always starts a private one",
    )
    ray_flags.add_argument(
        "--num-workers",
        type=int,
        help="Ray workers, each holding the model (default: one per GPU, else one per node)",
    )
    ray_flags.add_argument(
        "--cpus-per-worker", type=float, help="default: the node's cores shared by its workers"
    )
    ray_flags.add_argument(
        "--use-gpu", default="auto", choices=("auto", "true", "false"), help="default auto"
    )
    ray_flags.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="precision on the workers (default float32, as the reference numbers use; auto: "
        "bfloat16 on GPUs that have it)",
    )

    hs = tasks.add_parser(
        "hellaswag",
        parents=[common],
        help="HellaSwag acc and acc_norm, by tokens (build-nanogpt, llm.c) and by characters "
        "(lm-evaluation-harness)",
    )
    hs.add_argument("--split", default="val", choices=hellaswag.SPLITS, help="default val")
    hs.add_argument(
        "--data-file",
        metavar="JSONL",
        help="a local file in HellaSwag's JSONL format instead of the downloaded split "
        "(not checked by sha256)",
    )
    hs.add_argument("--limit", type=int, help="only the first N examples")

    ppl = tasks.add_parser(
        "perplexity",
        parents=[common],
        help="perplexity of a prepared dataset split: a contiguous sweep, every token once",
    )
    ppl.add_argument("--split", default="val", choices=data_common.SPLITS, help="default val")
    ppl.add_argument(
        "--dataset",
        help="a registered dataset or a prepared one in the data cache (default: the "
        "checkpoint's own)",
    )
    ppl.add_argument(
        "--dataset-dir",
        metavar="DIR",
        help="a prepared dataset folder (manifest.json, llm.c shards or nanoGPT's "
        "train.bin/val.bin), local or s3://, gs://",
    )
    ppl.add_argument("--data-file", metavar="PATH", help="a local UTF-8 text file instead")
    ppl.add_argument(
        "--tokenizer",
        choices=data_common.TOKENIZERS,
        help="with --data-file: default the model's own tokenizer",
    )
    ppl.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts (default block_size: windows end to end); smaller "
        "gives every token at least block_size - stride tokens of context",
    )
    ppl.add_argument("--max-tokens", type=int, help="only the first N tokens of the split")
    parser.set_defaults(task_parsers={"hellaswag": hs, "perplexity": ppl})
    return parser


def parse_args(argv: list[str] | None) -> Any:
    """The flags; a misspelt one is reported by its task's parser, which knows the flags
    it could have meant (the top-level parser only knows the task names)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.task_parsers[args.task].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


# --------------------------------------------------------------------------- hellaswag


def run_hellaswag(args: Any, *, encoding: Any = None) -> dict[str, Any]:
    """Score the examples on Ray workers; the result is what --output holds. `encoding`
    stands in for the downloaded GPT-2 BPE (tests)."""
    started = time.perf_counter()
    model = _load(args, encoding)  # first: a mistyped --checkpoint downloads nothing
    if args.data_file is not None:
        path = Path(args.data_file).expanduser().resolve()
    else:
        path = hellaswag.download(args.split, args.data_dir)
    examples = hellaswag.read_examples(path, args.limit)
    rendered = [hellaswag.render(e, model.tokenizer) for e in examples]
    block_size = model.model.config.block_size
    spans = hellaswag.spans_of(rendered)
    cut = sum(scoring.truncated(s, block_size) for s in spans)

    plan = _connect(args)
    per_chunk = _chunk_size(len(rendered), plan["workers"], MAX_EXAMPLES_PER_CHUNK)
    chunks = [
        hellaswag.spans_of(rendered[i : i + per_chunk]) for i in range(0, len(rendered), per_chunk)
    ]
    scores = workers.score(model.model, chunks, dtype=args.dtype, label="hellaswag", **plan)
    accuracy = hellaswag.accuracy(rendered, [s for chunk in scores for s in chunk])
    return {
        "task": "hellaswag",
        "split": args.split,
        "model": model.description,
        "data_file": str(path),
        **accuracy,
        "conventions": {
            "tokens": "build-nanogpt/llm.c: ctx + ' ' + ending, acc_norm by mean log-prob "
            "per ending token",
            "chars": "lm-evaluation-harness: preprocessed 'label: ctx_a Ctx_b' + ' ' + ending, "
            "acc_norm by log-likelihood per ending character",
        },
        "spans_truncated": cut,
        "block_size": block_size,
        "dtype": args.dtype,
        **plan,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _hellaswag_line(r: dict[str, Any]) -> str:
    line = (
        f"hellaswag {r['split']}: {r['examples']} examples, acc_norm "
        f"{r['tokens']['acc_norm']:.4f} by tokens (build-nanogpt, llm.c), "
        f"{r['chars']['acc_norm']:.4f} by characters (lm-eval); acc "
        f"{r['tokens']['acc']:.4f}, {r['chars']['acc']:.4f}; {r['model']}"
    )
    if r["spans_truncated"]:
        line += f"; {r['spans_truncated']} spans cut to the last {r['block_size']} tokens"
    return line


# --------------------------------------------------------------------------- perplexity


def run_perplexity(args: Any, *, encoding: Any = None) -> dict[str, Any]:
    """Sweep the split on Ray workers (see evals/perplexity.py); the --output result."""
    started = time.perf_counter()
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    model = _load(args, encoding)
    dataset_dir = _dataset_dir(args, model, encoding)
    meta = manifest.load_meta(dataset_dir)
    _check_same_tokenizer(meta, model)
    tokens = sampler.TokenSplit(meta["location"], meta["shards"][args.split], meta["dtype"])
    n_tokens = tokens.n_tokens
    if args.max_tokens is not None:
        n_tokens = min(n_tokens, args.max_tokens)
    block_size = model.model.config.block_size
    stride = block_size if args.stride is None else args.stride
    windows = list(perplexity.windows(n_tokens, block_size, stride))
    if not windows:
        raise UserError(
            f"the {args.split} split of {dataset_dir} has {n_tokens} token(s); "
            "perplexity needs at least two"
        )

    plan = _connect(args)
    per_chunk = _chunk_size(len(windows), plan["workers"], MAX_WINDOWS_PER_CHUNK)
    chunks = [
        perplexity.SweepChunk(tokens, windows[i : i + per_chunk])
        for i in range(0, len(windows), per_chunk)
    ]
    scores = workers.score(model.model, chunks, dtype=args.dtype, label="perplexity", **plan)
    return {
        "task": "perplexity",
        "split": args.split,
        "dataset": meta["dataset"],
        "dataset_dir": str(dataset_dir),
        "model": model.description,
        **perplexity.summary([s for chunk in scores for s in chunk]),
        "tokens_in_split": int(meta[f"{args.split}_tokens"]),
        "block_size": block_size,
        "stride": stride,
        "windows": len(windows),
        "dtype": args.dtype,
        **plan,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _dataset_dir(args: Any, model: loading.Trained, encoding: Any) -> Path | str:
    """The prepared dataset to sweep: --dataset-dir, --data-file, --dataset, else the
    model's own (registered, or prepared in the cache under its name)."""
    kind = args.tokenizer or model.tokenizer.kind
    given = [f for f in ("dataset_dir", "data_file", "dataset") if getattr(args, f) is not None]
    if len(given) > 1:
        raise UserError(
            f"give one of --dataset-dir, --data-file or --dataset, not "
            f"{' and '.join('--' + f.replace('_', '-') for f in given)}"
        )
    if args.dataset_dir is not None:
        return args.dataset_dir
    if args.data_file is not None:
        if kind == "bpe":
            if model.tokenizer.kind != "bpe":
                raise UserError(
                    f"--tokenizer bpe scores with the model's own trained BPE, but "
                    f"{model.description} uses {model.tokenizer.kind}; leave out --tokenizer"
                )
            encoding = model.tokenizer  # the text tokenized with the model's BPE, not a new one
        return prepare.prepare(
            None,
            data_file=args.data_file,
            tokenizer=kind,
            data_dir=args.data_dir,
            encoding=encoding,
        )
    name = args.dataset or model.data.get("dataset")
    if name is None:
        raise UserError(
            f"{model.description} names no dataset; pass --dataset NAME or --data-file PATH"
        )
    if name in sources.DATASETS or name in hub_corpora.CORPORA:
        return prepare.prepare(name, data_dir=args.data_dir, encoding=encoding)
    prepared = cache.data_root(args.data_dir) / name
    if not prepared.is_dir():
        raise UserError(
            f"dataset {name!r} is not registered and not prepared in {prepared.parent}; "
            "pass --data-file PATH (the text it was made from), --dataset-dir or --data-dir"
        )
    return prepared  # load_meta says what is wrong with it, if anything


def _check_same_tokenizer(meta: dict[str, Any], model: loading.Trained) -> None:
    """Token ids only mean the same text when the vocabularies are the same."""
    tok = model.tokenizer
    if tok.kind == "char":
        same_vocabulary = meta.get("itos") == tok.itos
    elif tok.kind == "bpe":
        same_vocabulary = meta.get("tokenizer_sha256") == tok.sha256
    else:
        same_vocabulary = meta["vocab_size"] == tok.vocab_size
    same = meta["tokenizer"] == tok.kind and same_vocabulary
    if not same:
        raise UserError(
            f"dataset {meta['dataset']} was tokenized with a {meta['vocab_size']}-token "
            f"{meta['tokenizer']} vocabulary, not the model's {tok.vocab_size}-token {tok.kind} "
            "one; pass --data-file with --tokenizer matching the model"
        )


def _perplexity_line(r: dict[str, Any]) -> str:
    return (
        f"perplexity {r['dataset']} {r['split']}: {r['perplexity']:.4f} (loss {r['loss']:.4f} "
        f"nats/token) over {r['tokens_scored']} tokens, block {r['block_size']}, stride "
        f"{r['stride']}; {r['model']}"
    )


# --------------------------------------------------------------------------- shared


def _load(args: Any, encoding: Any) -> loading.Trained:
    for flag in ("num_workers", "limit"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.checkpoint is None and args.init_from is None:
        raise UserError("give --checkpoint PATH_OR_RUN or --init-from gpt2 (see --help)")
    return loading.load(args.checkpoint, args.init_from, args.storage_path, encoding=encoding)


def _connect(args: Any) -> dict[str, Any]:
    connect.connect(args.address)
    plan = workers.plan(args.num_workers, args.cpus_per_worker, args.use_gpu)
    if not plan["use_gpu"]:
        runtime.resolve_dtype(args.dtype, torch.device("cpu"))  # float16: refused here
    return plan


def _chunk_size(items: int, n_workers: int, most: int) -> int:
    return max(1, min(most, math.ceil(items / (CHUNKS_PER_WORKER * n_workers))))


def write_result(result: dict[str, Any], output: str) -> str:
    """The JSON result at `output`: a local path or an s3:// / gs:// URI."""
    folder, _, name = output.rstrip("/").rpartition("/")
    store = storage.resolve(folder or ".", check=False)
    results.write_json(store, f"{store.root.rstrip('/')}/{name}", result)
    return store.display(f"{store.root.rstrip('/')}/{name}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task == "hellaswag":
        result, line = run_hellaswag(args), _hellaswag_line
    else:
        result, line = run_perplexity(args), _perplexity_line
    where = write_result(result, args.output or f"eval_{args.task}_{args.split}.json")
    print(f"{line(result)} -> {where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
