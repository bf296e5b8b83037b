"""Bad input that fails before Ray starts: exit 2, one `error:` line, nothing lost
(the cases are in tests/bad_input_cases.py), and a damaged dataset cache rebuilt."""

from __future__ import annotations

import pytest
from bad_input_cases import check_case, params

from raygpt.data import manifest, prepare
from raygpt.errors import UserError


@pytest.mark.parametrize("name", params(on_ray=False))
def test_bad_input(name, runner, world):
    check_case(name, runner, world)


def test_damaged_dataset_cache_is_named_and_rebuilt(world, tmp_path):
    """A broken prepared dataset is named by load_meta, and prepare() repairs it.

    The CLIs never report it: `prepare.prepare` finds the cache unreadable, moves it
    aside and rebuilds it from the text (a valid recovery, not an error).
    """
    prepared = prepare.prepare(None, data_file=world.text, data_dir=tmp_path)
    meta_path, train_bin = prepared / "manifest.json", prepared / "train_000000.bin"

    meta_path.write_text('{"format": ')  # cut short mid-write
    with pytest.raises(UserError, match=f"{meta_path}.*not valid JSON"):
        manifest.load_meta(prepared)
    assert prepare.prepare(None, data_file=world.text, data_dir=tmp_path) == prepared
    assert manifest.load_meta(prepared)["vocab_size"] == world.vocab

    with train_bin.open("r+b") as fh:
        fh.truncate(train_bin.stat().st_size // 2)
    with pytest.raises(UserError, match=f"{train_bin}.*truncated or corrupt"):
        manifest.load_meta(prepared)
    assert prepare.prepare(None, data_file=world.text, data_dir=tmp_path) == prepared
    assert manifest.load_meta(prepared)["vocab_size"] == world.vocab
