"""Tokenizers: characters, GPT-2 BPE through tiktoken (which fails fast offline), and a
byte-level BPE trained on the dataset itself with Hugging Face `tokenizers`.

A prepared dataset records its tokenizer: a character dataset its whole vocabulary
(``itos``), a GPT-2 BPE dataset the encoding's name and a sha256 of its ranks, pattern
and special tokens, a trained BPE its tokenizer.json (stored beside the shards, and
carried by checkpoints as ``tokenizer_json``), so that data and tokenizer are never
paired by name alone.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from raygpt.config.choices import check_bpe_vocab_size
from raygpt.data.common import EOT, one_line
from raygpt.data.shards import choose_dtype
from raygpt.errors import UserError

GPT2_VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_LOAD_TIMEOUT_S = 120.0  # whole vocabulary download, once connectivity is confirmed
GPT2_PROBE_TIMEOUT_S = 5.0  # connectivity check before handing over to tiktoken

_GPT2_ENCODING: Any = None


# --------------------------------------------------------------------------- tiktoken


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloaded files (mirrors tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    import tempfile

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _gpt2_files_cached() -> bool:
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return False
    return all(
        os.path.isfile(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url in (GPT2_VOCAB_URL, GPT2_ENCODER_URL)
    )


def _run_with_timeout(
    fn: Callable[[], Any], timeout: float
) -> tuple[bool, Any, BaseException | None]:
    """Run fn in a daemon thread: (finished, result, exception or None)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name="raygpt-tiktoken-load", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


def _probe_vocab_url(timeout: float = GPT2_PROBE_TIMEOUT_S) -> str | None:
    """None if the vocabulary URL answers an HTTP HEAD within `timeout`, else why not.

    urllib honours the same proxy variables as `requests`. DNS lookups ignore socket
    timeouts, so the whole probe also runs under a thread timeout.
    """

    def head() -> None:
        req = urllib.request.Request(GPT2_VOCAB_URL, method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered: reachable; tiktoken reports any real problem

    done, _, err = _run_with_timeout(head, timeout + 1.0)
    if not done:
        return f"no answer within {timeout:g} s"
    if err is not None:
        return one_line(getattr(err, "reason", None) or err)
    return None


def _gpt2_error(reason: str) -> UserError:
    return UserError(
        f"cannot load the GPT-2 BPE vocabulary: tiktoken downloads it from {GPT2_VOCAB_URL} "
        f"(and encoder.json) on first use and that failed ({one_line(reason)}); run once "
        "with network access, or set TIKTOKEN_CACHE_DIR to a directory that holds the "
        "cached files, or use --tokenizer char"
    )


def load_gpt2_encoding(
    timeout: float = GPT2_LOAD_TIMEOUT_S,
    *,
    get_encoding: Callable[[str], Any] | None = None,
    probe: Callable[[], str | None] | None = None,
) -> Any:
    """tiktoken's "gpt2" Encoding, failing fast with a UserError when offline.

    tiktoken fetches its vocabulary with `requests` and no timeout, which can hang for
    minutes where packets are dropped. So unless the files are in tiktoken's cache, first
    check that the URL answers an HTTP HEAD within a few seconds, then run the load
    itself under `timeout` (in a daemon thread, abandoned if it overruns).
    `get_encoding` and `probe` are for tests; the real encoding is memoized.
    """
    global _GPT2_ENCODING
    real = get_encoding is None
    if real and _GPT2_ENCODING is not None:
        return _GPT2_ENCODING
    if get_encoding is None:
        try:
            import tiktoken
        except ImportError as exc:
            raise UserError(
                "the gpt2 tokenizer needs tiktoken: pip install tiktoken, or use --tokenizer char"
            ) from exc
        get_encoding = tiktoken.get_encoding
        cached = _gpt2_files_cached()
    else:
        cached = False
    if not cached:
        why = (probe or _probe_vocab_url)()
        if why is not None:
            raise _gpt2_error(why)
    done, enc, err = _run_with_timeout(lambda: get_encoding("gpt2"), timeout)
    if not done:
        raise _gpt2_error(f"no vocabulary after {timeout:g} s")
    if err is not None:
        raise _gpt2_error(f"{type(err).__name__}: {err}") from err
    if real:
        _GPT2_ENCODING = enc
    return enc


def encoding_vocab_size(enc: Any) -> int:
    return int(enc.max_token_value) + 1


def encoding_eot(enc: Any) -> int | None:
    return enc.encode_single_token(EOT) if EOT in enc.special_tokens_set else None


def encoding_spec(enc: Any) -> dict[str, Any]:
    """What rebuilds `enc` anywhere: tiktoken's own pickle state, made explicit.

    tiktoken pickles a registered encoding ("gpt2") by name, so every Ray node would
    download the vocabulary again; this ships the ranks themselves.
    """
    return {
        "name": enc.name,
        "pat_str": enc._pat_str,
        "mergeable_ranks": enc._mergeable_ranks,
        "special_tokens": enc._special_tokens,
    }


def build_encoding(spec: dict[str, Any]) -> Any:
    import tiktoken

    return tiktoken.Encoding(**spec)


def encoding_to_json(enc: Any) -> dict[str, Any]:
    """`encoding_spec` as JSON data (tokens in base64, tiktoken's own file encoding)."""
    spec = encoding_spec(enc)
    ranks = sorted(spec["mergeable_ranks"].items(), key=lambda kv: kv[1])
    return {
        **spec,
        "mergeable_ranks": [[base64.b64encode(token).decode(), rank] for token, rank in ranks],
    }


def encoding_from_json(data: dict[str, Any]) -> Any:
    ranks = {base64.b64decode(token): rank for token, rank in data["mergeable_ranks"]}
    return build_encoding({**data, "mergeable_ranks": ranks})


def encoding_sha256(enc: Any) -> str:
    """Identity of a BPE encoding: its pattern, ranks and special tokens, not its name."""
    spec = encoding_spec(enc)
    h = hashlib.sha256(spec["pat_str"].encode())
    for token, rank in sorted(spec["mergeable_ranks"].items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(8, "little") + len(token).to_bytes(4, "little") + token)
    for text, rank in sorted(spec["special_tokens"].items()):
        h.update(rank.to_bytes(8, "little") + text.encode())
    return h.hexdigest()


def bpe_meta(enc: Any) -> dict[str, Any]:
    """The tokenizer fields a BPE dataset records."""
    vocab_size = encoding_vocab_size(enc)
    return {
        "tokenizer": "gpt2",
        "encoding": getattr(enc, "name", None),
        "encoding_sha256": encoding_sha256(enc),
        "vocab_size": vocab_size,
        "dtype": choose_dtype(vocab_size),
        "eos_token": encoding_eot(enc),
    }


# --------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """Character-level tokenizer from a dataset's ``itos``."""

    kind = "char"

    def __init__(self, itos: Sequence[str]):
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eos_token = None

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as exc:
            raise UserError(
                f"character {exc.args[0]!r} is not in this dataset's vocabulary of "
                f"{self.vocab_size} characters; use only characters from the training text"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        itos = self.itos
        try:
            return "".join(itos[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < self.vocab_size)
            raise ValueError(
                f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})"
            ) from None


class GPT2Tokenizer:
    """GPT-2 BPE through a tiktoken Encoding."""

    kind = "gpt2"

    def __init__(self, encoding: Any):
        self.encoding = encoding
        self.vocab_size = encoding_vocab_size(encoding)
        self.eos_token = encoding_eot(encoding)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={EOT} & self.encoding.special_tokens_set)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


class BPETokenizer:
    """A byte-level BPE trained on a dataset, as a Hugging Face `tokenizers` JSON.

    Byte level: every byte string has ids (nothing is unknown), and decoding any ids
    gives text back (a cut multi-byte character becomes U+FFFD, as in GPT-2)."""

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # Canonical (compact) JSON: a pretty-printed copy, as in an export, is the same BPE.
        self.tokenizer_json = self.tokenizer.to_str()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eos_token = self.tokenizer.token_to_id(EOT)
        self.sha256 = hashlib.sha256(self.tokenizer_json.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many documents at once (tokenizers encodes them in parallel)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(documents: Sequence[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer pattern) trained on `documents`, with
    `vocab_size` tokens at most: the 256 bytes, the merges, and <|endoftext|> last (its
    id in GPT-2). A text with fewer distinct pairs than merges asked for gets fewer.

    Training is deterministic (same text and size, same tokenizer.json), so ranks or
    nodes that prepare the same dataset separately agree."""
    check_bpe_vocab_size(vocab_size)
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise UserError(
            "--tokenizer bpe needs the tokenizers package: pip install tokenizers"
        ) from exc
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <|endoftext|> is added after training, as the last id
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=False,
    )
    docs = [d for d in documents if d]
    tokenizer.train_from_iterator(docs, trainer, length=len(docs))
    tokenizer.add_special_tokens([EOT])
    return BPETokenizer(tokenizer.to_str())


def trained_bpe_meta(tok: BPETokenizer) -> dict[str, Any]:
    """The tokenizer fields a trained-BPE dataset records (the JSON itself goes to a file)."""
    return {
        "tokenizer": "bpe",
        "vocab_size": tok.vocab_size,
        "dtype": choose_dtype(tok.vocab_size),
        "eos_token": tok.eos_token,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_json": tok.tokenizer_json,
    }


def tokenizer_from_meta(
    meta: dict, *, encoding: Any = None
) -> CharTokenizer | GPT2Tokenizer | BPETokenizer:
    """The tokenizer a prepared dataset was made with (`encoding` injects a tiktoken one)."""
    if meta.get("tokenizer") == "char":
        return CharTokenizer(meta["itos"])
    if meta.get("tokenizer") == "bpe":
        if not isinstance(meta.get("tokenizer_json"), str):
            raise UserError(
                f"the dataset {meta.get('dataset')} uses a trained BPE but its tokenizer.json "
                "is missing; re-prepare the dataset"
            )
        bpe = BPETokenizer(meta["tokenizer_json"])
        if bpe.vocab_size != meta.get("vocab_size"):
            raise UserError(
                f"the trained BPE of {meta.get('dataset')} has {bpe.vocab_size} tokens but "
                f"{meta.get('vocab_size')} are recorded; re-prepare the dataset"
            )
        return bpe
    if meta.get("tokenizer") == "gpt2":
        tok = GPT2Tokenizer(encoding if encoding is not None else load_gpt2_encoding())
        if tok.vocab_size != meta.get("vocab_size"):
            raise UserError(
                f"the gpt2 encoding has {tok.vocab_size} tokens but the dataset "
                f"{meta.get('dataset')} was prepared with {meta.get('vocab_size')}; "
                "re-prepare the dataset with this tokenizer"
            )
        recorded = meta.get("encoding_sha256")
        if recorded and encoding_sha256(tok.encoding) != recorded:
            raise UserError(
                f"the dataset {meta.get('dataset')} was prepared with another BPE encoding "
                f"({meta.get('encoding')!r}, sha256 {recorded[:12]}...) than this one "
                f"({getattr(tok.encoding, 'name', None)!r}); re-prepare it with this tokenizer"
            )
        return tok
    raise UserError(
        f"unknown tokenizer {meta.get('tokenizer')!r} in meta; expected char, gpt2 or bpe"
    )


def _tokenize(source: Any, tokenizer: str, encoding: Any) -> tuple[np.ndarray, dict]:
    """Token ids of a small in-memory source, as one stream, and the tokenizer's fields.

    Character level: the documents joined by blank lines. BPE: <|endoftext|> between
    documents (a single file is one document, so it has none), as today's datasets
    always had; the large-corpus path in prepare_corpus follows *every* document with it.
    For "bpe", `encoding` is the trained BPETokenizer.
    """
    if tokenizer == "bpe":
        meta = trained_bpe_meta(encoding)
        docs = [d for d in source.documents if d]
        pieces = []
        for i, ids in enumerate(encoding.encode_batch(docs)):
            if i:
                pieces.append([meta["eos_token"]])
            pieces.append(ids)
        flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces] or [np.zeros(0, int)])
        return flat.astype(meta["dtype"]), meta
    if tokenizer == "char":
        text = source.text()
        if not text:
            raise UserError(f"dataset text is empty ({source.description})")
        itos = sorted(set(text))
        stoi = {c: i for i, c in enumerate(itos)}
        dtype = choose_dtype(len(itos))
        ids = np.fromiter((stoi[c] for c in text), dtype=dtype, count=len(text))
        return ids, {"tokenizer": "char", "vocab_size": len(itos), "itos": itos, "dtype": dtype}
    meta = bpe_meta(encoding)
    eot = meta["eos_token"]
    docs = [d for d in source.documents if d]
    pieces: list[list[int]] = []
    for i, doc in enumerate(docs):
        if i:
            if eot is None:
                raise UserError(f"the BPE encoding has no {EOT} token to separate documents")
            pieces.append([eot])
        pieces.append(encoding.encode_ordinary(doc))
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces] or [np.zeros(0, int)])
    if len(ids) and (ids.min() < 0 or ids.max() >= meta["vocab_size"]):
        raise ValueError("tokenizer produced ids outside its vocabulary")
    return ids.astype(meta["dtype"]), meta
