"""``python -m raygpt.data list | prepare | verify``.

``prepare`` makes a small dataset in this process (a registered one, or
``--data-file``), or tokenizes a large corpus across the Ray cluster (``--input``
files, or the named corpora ``fineweb_edu`` and ``openwebtext``, downloaded first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raygpt.data.cache import DATA_DIR_ENV, DEFAULT_DATA_DIR, data_root
from raygpt.data.common import DEFAULT_DATASET, DEFAULT_VAL_FRACTION, TOKENIZERS, one_line
from raygpt.data.corpus import DEFAULT_UNIT_MB, prepare_corpus
from raygpt.data.hub_corpora import CORPORA
from raygpt.data.inputs import FORMATS
from raygpt.data.manifest import load_meta
from raygpt.data.prepare import prepare
from raygpt.data.sources import DATASETS
from raygpt.errors import UserError, exit_on_user_error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{one_line(message)} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m raygpt.data", description="Prepare and list raygpt datasets.")
    sub = p.add_subparsers(dest="command", metavar="{prepare,list,verify}", parser_class=_Parser)
    sub.required = True
    pp = sub.add_parser("prepare", help="prepare a dataset (cached) and print its directory")
    pp.add_argument(
        "--dataset", default=None, help=f"registered dataset (default {DEFAULT_DATASET})"
    )
    pp.add_argument(
        "--data-file",
        default=None,
        metavar="PATH",
        help='a local UTF-8 text file, or JSONL (.jsonl[.gz]) of {"text": ...} lines',
    )
    pp.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default=None,
        help="for --data-file (default char); bpe trains a byte-level BPE on the text",
    )
    pp.add_argument(
        "--vocab-size", type=int, default=None, help="with --tokenizer bpe: its size (>= 257)"
    )
    pp.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help=f"cache root (default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
    )
    pp.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"validation share: of the tokens' tail for small datasets (default "
        f"{DEFAULT_VAL_FRACTION}), of the documents by content hash for corpora",
    )
    big = pp.add_argument_group("large corpora (tokenized across the Ray cluster)")
    big.add_argument(
        "--input",
        action="append",
        default=None,
        metavar="PATH",
        help="a local or s3://, gs:// file, folder or glob of Parquet, JSONL (.gz/.zst) or "
        "text (one document per line); repeatable",
    )
    big.add_argument(
        "--out", default=None, metavar="DIR", help="output folder or URI (default: the cache)"
    )
    big.add_argument("--name", default=None, help="dataset name (default: the output folder's)")
    big.add_argument("--text-column", default="text", help="Parquet column / JSON field")
    big.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    big.add_argument(
        "--workers",
        type=int,
        default=None,
        help="units tokenized at once, one CPU each (default: every CPU)",
    )
    big.add_argument(
        "--unit-mb", type=float, default=DEFAULT_UNIT_MB, help="input text per work unit"
    )
    big.add_argument(
        "--address", default=None, help="Ray cluster, as raygpt.train's (default: the running one)"
    )
    big.add_argument(
        "--overwrite", action="store_true", help="replace a finished dataset of other inputs"
    )
    sub.add_parser("list", help="list the registered datasets")
    pv = sub.add_parser("verify", help="check every shard of a dataset against its sha256")
    pv.add_argument("dataset_dir", metavar="DIR", help="a dataset folder or URI")
    return p


def _summary(path: str) -> str:
    meta = load_meta(path, verify=False)
    return (
        f"{meta['dataset']}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab_size {meta['vocab_size']} ({meta['tokenizer']}, {meta['dtype']})"
    )


def _prepare_corpus(args: argparse.Namespace) -> str:
    if args.data_file is not None:
        raise UserError("give either --input or --data-file, not both")
    if args.tokenizer in ("char", "bpe"):
        raise UserError(
            f"--input corpora are GPT-2 BPE (gpt2) only: a {args.tokenizer} vocabulary is "
            "made from the whole text at once; use --data-file for it"
        )
    common = dict(
        text_column=args.text_column,
        input_format=args.format,
        workers=args.workers,
        unit_mb=args.unit_mb,
        address=args.address,
        overwrite=args.overwrite,
    )
    if args.input:
        if args.dataset is not None:
            raise UserError("give either --input or --dataset, not both")
        val = args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION
        return prepare_corpus(
            args.input, args.out, name=args.name, val_fraction=val, data_dir=args.data_dir, **common
        )
    spec = CORPORA[args.dataset]
    root = data_root(args.data_dir)
    files = spec.fetch(root)
    return prepare_corpus(
        files,
        args.out or str(root / spec.name),
        name=spec.name,
        val_fraction=args.val_fraction if args.val_fraction is not None else spec.val_fraction,
        description=spec.description,
        **common,
    )


def _run(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "list":
        for spec in DATASETS.values():
            default = " (default)" if spec.name == DEFAULT_DATASET else ""
            print(f"{spec.name:<18} {spec.tokenizer:<5} {spec.description}{default}")
        for corpus in CORPORA.values():
            print(f"{corpus.name:<18} {'gpt2':<5} {corpus.description}")
        print(
            f"{'--data-file PATH':<18} {'char|gpt2|bpe':<5} any local UTF-8 text or JSONL "
            "(--tokenizer, --vocab-size)"
        )
        print(f"{'--input PATH...':<18} {'gpt2':<5} Parquet, JSONL or text files, local or s3://")
        return 0
    if args.command == "verify":
        load_meta(args.dataset_dir, verify=True)
        print(f"{args.dataset_dir}: every shard matches its sha256")
        print(_summary(args.dataset_dir))
        return 0
    if args.input or args.dataset in CORPORA:
        path = _prepare_corpus(args)
        print(path)
        print(_summary(path))
        return 0
    if args.data_file is not None and args.dataset is not None:
        raise UserError("give either --dataset or --data-file, not both")
    if args.data_file is None and args.tokenizer is not None:
        spec = DATASETS.get(args.dataset or DEFAULT_DATASET)
        if spec is not None and args.tokenizer not in (spec.tokenizer, "bpe"):
            raise UserError(
                f"--tokenizer {args.tokenizer} does not apply to dataset {spec.name} "
                f"({spec.tokenizer}); --tokenizer is for --data-file"
            )
    path = prepare(
        args.dataset,
        data_file=args.data_file,
        tokenizer=args.tokenizer or "char",
        data_dir=args.data_dir,
        val_fraction=args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION,
        vocab_size=args.vocab_size,
    )
    print(path)
    print(_summary(str(path)))
    return 0


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: a UserError becomes `error: ...` on stderr and exit status 2."""
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
