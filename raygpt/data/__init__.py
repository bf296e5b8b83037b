"""Datasets: sources, tokenizers, token shards, preparation, and batches.

Where each concern lives:

* ``sources``   -- where text comes from: registered datasets, files, downloads, and
                   the large named corpora (fineweb_edu, openwebtext).
* ``tokenizers`` -- characters, GPT-2 BPE (tiktoken, offline-safe), and a byte-level
                   BPE trained on the dataset (Hugging Face tokenizers).
* ``shards``    -- llm.c's token shard format (header of 256 int32, then the tokens).
* ``manifest``  -- a dataset folder (raygpt's manifest.json, bare llm.c shards, or
                   nanoGPT's train.bin/val.bin) read into one description: `load_meta`.
* ``prepare``   -- small datasets, tokenized in this process into the local cache.
* ``inputs`` and ``corpus`` -- large corpora: input files and their work units, and
                   the Ray Data pipeline that tokenizes them across the cluster.
* ``sampler``   -- deterministic, rank-disjoint, resumable batches over the shards.
* ``cli``       -- ``python -m raygpt.data list | prepare | verify``.

The names callers use are re-exported here, so ``from raygpt import data`` then
``data.prepare_from_config(cfg)`` and ``data.BatchSampler(...)`` keep working. Tests
that replace a module-level value (a URL, a loader) patch the module that owns it,
e.g. ``raygpt.data.sources``.
"""

from raygpt.data.cache import DATA_DIR_ENV, DEFAULT_DATA_DIR, data_root
from raygpt.data.cli import main
from raygpt.data.common import (
    DEFAULT_DATASET,
    DEFAULT_VAL_FRACTION,
    DOC_SEPARATOR,
    EOT,
    SPLITS,
    TOKENIZERS,
)
from raygpt.data.corpus import DEFAULT_UNIT_MB, prepare_corpus
from raygpt.data.manifest import FORMAT, MANIFEST, load_meta
from raygpt.data.prepare import prepare, prepare_from_config
from raygpt.data.sampler import EVAL_EPOCH, BatchSampler, TokenSplit, read_tokens
from raygpt.data.shards import HEADER_BYTES, MAGIC, choose_dtype
from raygpt.data.sources import (
    CORPORA,
    DATASETS,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_SIZE,
    SHAKESPEARE_URL,
    CorpusSpec,
    DatasetSpec,
    Source,
    build_pydocs_corpus,
    download,
    pydocs_documents,
    pydocs_files,
    read_data_file,
    read_text_file,
)
from raygpt.data.tokenizers import (
    GPT2_VOCAB_SIZE,
    GPT2_VOCAB_URL,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    _tokenize,
    load_gpt2_encoding,
    tokenizer_from_meta,
)

__all__ = [
    "CORPORA",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATASET",
    "DEFAULT_DATA_DIR",
    "DEFAULT_UNIT_MB",
    "DEFAULT_VAL_FRACTION",
    "DOC_SEPARATOR",
    "EOT",
    "EVAL_EPOCH",
    "FORMAT",
    "GPT2_VOCAB_SIZE",
    "GPT2_VOCAB_URL",
    "HEADER_BYTES",
    "MAGIC",
    "MANIFEST",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_SIZE",
    "SHAKESPEARE_URL",
    "SPLITS",
    "TOKENIZERS",
    "BPETokenizer",
    "BatchSampler",
    "CharTokenizer",
    "CorpusSpec",
    "DatasetSpec",
    "GPT2Tokenizer",
    "Source",
    "TokenSplit",
    "_tokenize",
    "build_pydocs_corpus",
    "choose_dtype",
    "data_root",
    "download",
    "load_gpt2_encoding",
    "load_meta",
    "main",
    "prepare",
    "prepare_corpus",
    "prepare_from_config",
    "pydocs_documents",
    "pydocs_files",
    "read_data_file",
    "read_text_file",
    "read_tokens",
    "tokenizer_from_meta",
]
