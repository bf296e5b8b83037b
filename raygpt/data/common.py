"""Names that every module of the data package shares: the splits, the end-of-text
token, the defaults, and how a message is kept to one line."""

from __future__ import annotations

SPLITS = ("train", "val")
TOKENIZERS = ("char", "gpt2", "bpe")  # what a run's config and a checkpoint name
EOT = "<|endoftext|>"
DEFAULT_DATASET = "pydocs_char"
DEFAULT_VAL_FRACTION = 0.1
DOC_SEPARATOR = "\n\n"  # joins the documents of a character-level dataset
# A trained byte-level BPE holds the 256 bytes, then its merges, then <|endoftext|>.
BPE_FILE = "tokenizer.json"  # a trained BPE, beside its dataset's manifest.json


def one_line(text: object) -> str:
    """Collapse whitespace (newlines included) so that a message stays on one line."""
    return " ".join(str(text).split())


# The vocabularies of the BPEs that pretokenized shards come in.
GPT2_VOCAB_SIZE = 50257
LLAMA3_VOCAB_SIZE = 128256  # llm.c's uint32 shards
