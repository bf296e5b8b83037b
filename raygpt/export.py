"""`python -m raygpt.export --checkpoint RUN_OR_PATH --hf DIR`: a Hugging Face GPT-2.

    python -m raygpt.export --checkpoint my-run --hf exported/my-run
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               AutoModelForCausalLM.from_pretrained('exported/my-run')"

DIR gets what `GPT2LMHeadModel` and `AutoTokenizer` load, and what lm-evaluation-harness
(`--model hf --model_args pretrained=DIR`) and `hf.from_pretrained(DIR)` read:

- config.json: the GPT-2 config of the model's shape (tied embeddings, gelu_new);
- model.safetensors: float32 weights under Hugging Face's names, a mup or completep
  model's multipliers folded into them (model/hf.py: sp_state_dict), so that plain
  GPT-2 code computes the same logits. The vocabulary is cut
  back from its padded size (50304) to the tokenizer's (50257); the four Conv1D weights
  are stored transposed, as HF keeps them (in, out); a model trained without biases gets
  zero biases, which compute the same; lm_head is left out, as HF ties it to wte;
- tokenizer.json + tokenizer_config.json: GPT-2 BPE converted from the tiktoken encoding
  (transformers' TikTokenConverter), a character vocabulary as a `tokenizers`
  WordLevel model, or the byte-level BPE trained on the dataset (`--tokenizer bpe`), as
  it is. Each is checked to encode a probe text to raygpt's own ids;
- raygpt.json: the checkpoint it came from and its data facts, so that raygpt (eval,
  `--init-from DIR`) rebuilds the exact tokenizer rather than assume GPT-2's.

The directory appears whole (written under a temporary name, then renamed), and an
existing non-empty DIR is replaced only with --overwrite, and only when it is an
export (holds raygpt.json).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from raygpt import __version__
from raygpt.config.io import OneLineArgumentParser
from raygpt.config.train import default_storage_path
from raygpt.data import common
from raygpt.errors import UserError, exit_on_user_error
from raygpt.model import hf, loading
from raygpt.model.gpt import GPT
from raygpt.model.hf import CONV1D_SUFFIXES  # the names the adapter transposes
from raygpt.run_folder import check_name

HF_EXTRA_HINT = "install the hf extra: pip install 'raygpt[hf]'"
# Text every GPT-2 BPE conversion must encode exactly as tiktoken does: contractions,
# runs of spaces and newlines, digits, accents, CJK, emoji and the end-of-text token.
BPE_PROBE = (
    "Hello world! It's 2024: they'll say \"ok\".\n\n  indented\ttab  \r\n"
    "naïve café 東京 🙂 x=1+2; <|endoftext|>The end   "
)


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m raygpt.export",
        description="Write a raygpt checkpoint as a Hugging Face GPT2LMHeadModel directory.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH_OR_RUN",
        help="a checkpoint folder, its state.pt, a run folder (its latest checkpoint) or a run "
        "name under --storage-path",
    )
    p.add_argument("--hf", required=True, metavar="DIR", help="the directory to write")
    p.add_argument(
        "--storage-path",
        default=default_storage_path(),
        help="where run names are looked up (default $RAYGPT_STORAGE_PATH, else ~/ray_results)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it is an earlier export (holds raygpt.json)",
    )
    return p


# --------------------------------------------------------------------------- weights


def hf_config(model: GPT, eos_token: int | None, dropout: float = 0.0) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel with `model`'s shape."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # the name transformers < 4 read
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # tanh-approximated GELU, as model.MLP
        # nanoGPT's one dropout applies where GPT-2's three do (embeddings, attention, residual).
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "resid_pdrop": dropout,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # None for a character vocabulary: HF's GPT-2 default (50256) is not a token there.
        "bos_token_id": eos_token,
        "eos_token_id": eos_token,
        "use_cache": True,
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights under GPT2LMHeadModel's names and layouts, as float32 tensors."""
    # The keys and shapes a model with biases has, without allocating one.
    with torch.device("meta"):
        reference = GPT(replace(model.config, bias=True)).state_dict()
    own = hf.sp_state_dict(model)  # mup's multipliers folded in (sp: as is)
    out = {}
    for key, like in reference.items():
        if key == "lm_head.weight":
            continue  # tied: HF rebuilds it from transformer.wte.weight
        value = own.get(key)
        if value is None:
            value = torch.zeros(like.shape)  # bias=False: a zero bias computes the same
        if key.endswith(CONV1D_SUFFIXES):
            value = value.t()  # nn.Linear stores (out, in); HF's Conv1D (in, out)
        # safetensors wants each tensor contiguous and owning its storage.
        out[key] = value.detach().to(torch.float32).contiguous().clone()
    return out


# --------------------------------------------------------------------------- tokenizer


def hf_tokenizer(tokenizer: Any) -> Any:
    """A `tokenizers.Tokenizer` that encodes text to the same ids as raygpt's `tokenizer`."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise UserError(f"export needs the tokenizers package; {HF_EXTRA_HINT}") from None
    if tokenizer.kind == "char":
        built, probe = _char_tokenizer(tokenizer.itos), "".join(tokenizer.itos)
    elif tokenizer.kind == "bpe":  # already a `tokenizers` BPE: written as it is
        from tokenizers import Tokenizer

        built, probe = Tokenizer.from_str(tokenizer.tokenizer_json), BPE_PROBE
    else:
        built, probe = _bpe_tokenizer(tokenizer.encoding), BPE_PROBE
    got, want = built.encode(probe).ids, tokenizer.encode(probe)
    if got != want:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
            min(len(got), len(want)),
        )
        raise UserError(
            f"the converted {tokenizer.kind} tokenizer encodes a probe text differently from "
            f"raygpt's (first difference at token {at}); nothing was exported"
        )
    return built


def _char_tokenizer(itos: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # Every character is a word of a WordLevel vocabulary; decoding concatenates them
    # (WordLevel's default would join with spaces). A character outside the vocabulary
    # fails to encode, as raygpt's CharTokenizer does: it has no unknown token.
    built = Tokenizer(models.WordLevel({c: i for i, c in enumerate(itos)}, unk_token="<unk>"))
    built.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    built.decoder = decoders.Fuse()
    return built


def _bpe_tokenizer(encoding: Any) -> Any:
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise UserError(
            f"export of a GPT-2 BPE tokenizer needs transformers; {HF_EXTRA_HINT}"
        ) from None
    # TikTokenConverter reads tiktoken's rank file format; tiktoken's own writer needs
    # blobfile, and the format is one "base64(token) rank" line per token.
    ranks = encoding._mergeable_ranks
    with tempfile.TemporaryDirectory(prefix="raygpt-bpe-") as tmp:
        path = Path(tmp) / "ranks.tiktoken"
        path.write_bytes(
            b"".join(
                base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                for token, rank in sorted(ranks.items(), key=lambda item: item[1])
            )
        )
        built = TikTokenConverter(
            vocab_file=str(path),
            pattern=encoding._pat_str,
            extra_special_tokens=encoding._special_tokens,
        ).converted()
    for token, token_id in encoding._special_tokens.items():
        if built.token_to_id(token) != token_id:  # specials are appended after the ranks
            raise UserError(
                f"special token {token!r} is id {token_id} in the encoding but "
                f"{built.token_to_id(token)} after conversion; nothing was exported"
            )
    return built


def tokenizer_config(tokenizer: Any, block_size: int) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json. Written by
    hand, not by save_pretrained, so that transformers 4 and 5 both load it."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # decode gives back the text as it was
    }
    if tokenizer.eos_token is not None:
        eot = common.EOT
        config.update(bos_token=eot, eos_token=eot, unk_token=eot)  # as HF's gpt2 does
    return config


# --------------------------------------------------------------------------- directory


def export(model_and_tokenizer: loading.Trained, directory: str | Path, overwrite: bool) -> Path:
    """Write the Hugging Face directory (see the module docstring); return its path."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(f"export needs the safetensors package; {HF_EXTRA_HINT}") from None
    directory = Path(directory).expanduser()
    check_target(directory, overwrite)
    t = model_and_tokenizer
    tokenizer = hf_tokenizer(t.tokenizer)  # first: a refused conversion writes nothing
    files: dict[str, Any] = {
        "config.json": hf_config(t.model, t.tokenizer.eos_token, t.dropout),
        "tokenizer_config.json": tokenizer_config(t.tokenizer, t.model.config.block_size),
        loading.EXPORT_META_FILE: {
            "format": loading.EXPORT_META_FORMAT,
            "source": t.description,
            "step": t.step,
            # A trained BPE's JSON is the tokenizer.json beside it, not a second copy here.
            "data": {k: v for k, v in t.data.items() if k != "tokenizer_json"},
            # What the source was trained under; the weights are sp (multipliers folded in).
            "parametrization": t.model.config.parametrization,
            "raygpt_version": __version__,
        },
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, value in files.items():
            (tmp / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        weights = tmp / "model.safetensors"
        save_file(hf_state_dict(t.model), str(weights), metadata={"format": "pt"})
        # safetensors creates its file owner-only; give it the umask's permissions, as the
        # others have, so a shared export is readable by whoever may read the directory.
        shutil.copymode(tmp / "config.json", weights)
        _put_in_place(tmp, directory, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def check_target(directory: Path, overwrite: bool) -> None:
    """Refuse, before any work: a folder name that is not plain (`--hf ..` would replace
    the parent), a file, a non-empty directory without --overwrite, and with it one
    that raygpt did not export (raygpt deletes only what it wrote)."""
    check_name(directory.name or str(directory), f"--hf {directory}: folder name")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--hf {directory} is a file; give a directory to write")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not overwrite:
        raise UserError(
            f"--hf {directory} exists and is not empty; pass --overwrite to replace it "
            "or choose another directory"
        )
    if not is_export(directory):
        raise UserError(
            f"--hf {directory} holds files raygpt did not export (no "
            f"{loading.EXPORT_META_FILE} record); --overwrite replaces only an export: choose another "
            "directory, or move that one away yourself"
        )


def is_export(directory: Path) -> bool:
    """Whether `directory` holds the record every export writes (raygpt.json)."""
    try:
        loading.read_export_meta(directory / loading.EXPORT_META_FILE)
    except UserError:
        return False
    return True


def _put_in_place(tmp: Path, directory: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `directory`; an old one is removed only afterwards."""
    old = None
    if directory.is_dir():
        if any(directory.iterdir()):
            check_target(directory, overwrite)  # it may have filled up meanwhile
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
        else:
            directory.rmdir()
    tmp.rename(directory)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_target(Path(args.hf).expanduser(), args.overwrite)  # before loading anything
    t = loading.from_checkpoint(args.checkpoint, args.storage_path)
    directory = export(t, args.hf, args.overwrite)
    c = t.model.config
    print(
        f"[raygpt] exported {t.description} to {directory}: GPT2LMHeadModel, "
        f"{t.model.n_params(non_embedding=False):,} parameters, {c.n_layer} layers, "
        f"vocabulary {c.vocab_size} ({t.tokenizer.kind}), context {c.block_size}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
