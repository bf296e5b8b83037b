"""The README and docs/ name only commands, flags, files and modules that exist.

Every command in a code block or an inline code span of README.md and docs/*.md is
checked against the code, without running it and without starting Ray:

- `python -m raygpt.X ...`: X is a raygpt module or package that runs as a command,
  its subcommand (if it has subcommands) is one of its parser's, and every flag given
  is one of that (sub)command's argparse options;
- an inline span that starts with a flag (`--lr-schedule wsd`): the flag belongs to
  some raygpt command (or is listed below as another tool's);
- `python benchmarks/X.py ...`: the script exists and defines every flag given;
- `make X`: X is a Makefile target;
- a path under experiments/, cluster/, benchmarks/, tests/ or raygpt/ exists;
- a relative link names an existing file, and its #anchor one of that file's headings.

The table under `## raygpt/` in docs/layout.md names every top-level module, package and
folder under raygpt/ and nothing that is not there, so a module added without a row
fails. The last tests feed the checkers broken text, to show that each one can fail.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LAYOUT = REPO / "docs" / "layout.md"
PACKAGE = REPO / "raygpt"

# Flags of other tools that the docs quote in prose, with the tool they belong to.
FOREIGN_FLAGS = {
    "--working-dir": "ray job submit",
    "--runtime-env-json": "ray job submit",
}
README_MAX_BYTES = 12_000  # a front door: the rest lives in docs/

RAYGPT_COMMAND = re.compile(r"(?<![\w.])python3? -m (raygpt[\w.]*)")
BENCHMARK_COMMAND = re.compile(r"(?<![\w.])python3? (benchmarks/\S+)")
MAKE_COMMAND = re.compile(r"(?:^|[\s;&(])make ([A-Za-z][\w-]*)")
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:experiments|cluster|benchmarks|tests|raygpt)/[\w./-]*\w\.(?:toml|yaml|py))"
)
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
COMMAND_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}


# --------------------------------------------------------------------------- reading markdown


def code_chunks(text: str) -> list[str]:
    """Logical lines of fenced blocks (backslash continuations joined) and inline spans."""
    chunks: list[str] = []
    prose: list[str] = []
    fenced = False
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if pending:
                chunks.append(pending)
                pending = ""
            continue
        if not fenced:
            prose.append(line)
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        chunks.append(pending + line)
        pending = ""
    # An inline span may wrap onto the next line of its paragraph.
    chunks += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]
    return chunks


def split_words(rest: str) -> list[str]:
    """The words of one command, up to a comment, a pipe or the next command."""
    try:
        words = shlex.split(rest, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words are enough
        words = rest.split()
    for i, word in enumerate(words):
        if word in COMMAND_ENDS or word.startswith("#"):
            return words[:i]
    return words


def flags_of(words: list[str]) -> list[str]:
    """The flags among words (`--name`, `-v`), stopping at a bare `--`."""
    flags = []
    for word in words:
        if word == "--":
            break
        word = word.lstrip("[(")
        match = FLAG.match(word)
        if match:
            flags.append(match.group(0))
    return flags


# --------------------------------------------------------------------------- the code's own CLIs


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _capture_parser(main) -> argparse.ArgumentParser | None:
    """The parser a `main(argv)` builds, caught as it starts to parse (nothing runs)."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    return None


@cache
def cli_parser(module: str) -> argparse.ArgumentParser | str:
    """The argparse parser of `python -m module`, or why there is none."""
    if module != "raygpt" and not module.startswith("raygpt."):
        return f"{module} is not a raygpt module"
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        return f"no module {module} ({err})"
    source = Path(mod.__file__ or "")
    if source.name == "__init__.py":  # a package runs its __main__.py, which runs a main()
        entry = source.parent / "__main__.py"
        if not entry.exists():
            return f"{module} is a package without __main__.py: not a command"
        found = re.search(r"^from (raygpt[\w.]*) import main$", entry.read_text(), re.MULTILINE)
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(found.group(1) if found else f"{module}.cli")
    elif 'if __name__ == "__main__"' not in source.read_text():
        return f"{module} is a library module, not a command"
    for name in ("build_parser", "_build_parser"):
        if callable(getattr(mod, name, None)):
            return getattr(mod, name)()
    parser = _capture_parser(mod.main) if callable(getattr(mod, "main", None)) else None
    return parser if parser is not None else f"{module} has no argparse parser to check"


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def subcommands(parser: argparse.ArgumentParser) -> tuple[dict, bool]:
    """(name -> subparser, required) of a parser's subcommands; ({}, False) if none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices), bool(action.required)
    return {}, False


def first_positional(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """The first word that is no flag and no flag's value: where a subcommand goes."""
    switches = {s for a in parser._actions if a.nargs == 0 for s in a.option_strings}
    previous = None
    for word in words:
        if not word.startswith("-") and (previous is None or previous in switches):
            return word
        previous = word if word.startswith("-") and "=" not in word else None
    return None


def cli_modules() -> list[str]:
    names = [f"raygpt.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    names += [f"raygpt.{p.parent.name}" for p in PACKAGE.glob("*/__main__.py")]
    return sorted(m for m in names if not isinstance(cli_parser(m), str))


@cache
def every_raygpt_flag() -> frozenset[str]:
    flags: set[str] = set()
    for module in cli_modules():
        parser = cli_parser(module)
        flags |= options(parser)
        for sub in subcommands(parser)[0].values():
            flags |= options(sub)
    return frozenset(flags)


@cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.MULTILINE))


# --------------------------------------------------------------------------- the checks


def check_raygpt_command(module: str, words: list[str]) -> list[str]:
    module = module.rstrip(".")
    command = f"python -m {module} {' '.join(words)}".strip()
    parser = cli_parser(module)
    if isinstance(parser, str):
        return [f"`{command}`: {parser}"]
    allowed = options(parser)
    subs, required = subcommands(parser)
    flags = flags_of(words)
    if subs:
        first = first_positional(parser, words)
        choices = ", ".join(subs)
        if first in subs:
            allowed |= options(subs[first])
        elif first is not None:
            return [f"`{command}`: {module} has no subcommand {first}; it has {choices}"]
        elif required and set(flags) - {"-h", "--help"}:
            return [f"`{command}`: {module} needs a subcommand, one of {choices}"]
    return [f"`{command}`: {module} has no flag {f}" for f in flags if f not in allowed]


def check_benchmark_command(script: str, words: list[str]) -> list[str]:
    path = REPO / script
    if not path.is_file():
        return [f"`python {script}`: no such script"]
    source = path.read_text()
    return [
        f"`python {script}`: the script defines no flag {f}"
        for f in flags_of(words)
        if f not in ("-h", "--help") and f'"{f}"' not in source
    ]


def check_chunk(chunk: str) -> list[str]:
    problems: list[str] = []
    for match in RAYGPT_COMMAND.finditer(chunk):
        problems += check_raygpt_command(match.group(1), split_words(chunk[match.end() :]))
    scripts = set()
    for match in BENCHMARK_COMMAND.finditer(chunk):
        scripts.add(match.group(1))
        problems += check_benchmark_command(match.group(1), split_words(chunk[match.end() :]))
    for target in MAKE_COMMAND.findall(chunk):
        if target not in make_targets():
            problems.append(f"`make {target}`: no such Makefile target")
    for path in REPO_PATH.findall(chunk):
        if path not in scripts and not (REPO / path).exists():
            problems.append(f"`{path}`: no such file")
    words = split_words(chunk)
    if words and FLAG.match(words[0]) and not RAYGPT_COMMAND.search(chunk):
        for flag in flags_of(words):
            if flag not in every_raygpt_flag() and flag not in FOREIGN_FLAGS:
                problems.append(f"`{chunk}`: no raygpt command has a flag {flag}")
    return problems


def check_markdown(text: str) -> list[str]:
    return [problem for chunk in code_chunks(text) for problem in check_chunk(chunk)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def check_links(text: str, where: Path) -> list[str]:
    """Every relative link names an existing file, and its #anchor one of its headings."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (where.parent / path).resolve() if path else where
        if not file.exists():
            problems.append(f"link {target}: no such file")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)
            if anchor not in {slug(h) for h in headings}:
                problems.append(f"link {target}: {file.name} has no heading #{anchor}")
    return problems


def layout_names(text: str) -> set[str]:
    """The names in the first column of the table under `## raygpt/`: `x.py` -> x,
    `data/` -> data (the rest of the file describes other folders)."""
    section = re.search(r"^## raygpt/\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    names = set()
    for line in (section.group(1) if section else "").splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            for name in re.findall(r"`([\w.]+/?)`", cells[1]):
                names.add(name.removesuffix("/").removesuffix(".py"))
    return names


def package_entries() -> set[str]:
    """Top-level modules, packages and folders under raygpt/. A folder holding nothing but
    __pycache__ (what a moved package leaves behind in a checkout) does not count."""
    entries = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    for p in PACKAGE.iterdir():
        if (
            p.is_dir()
            and p.name[0] not in "_."
            and any(child.name != "__pycache__" for child in p.iterdir())
        ):
            entries.add(p.name)
    return entries


def check_layout(text: str) -> list[str]:
    named, present = layout_names(text), package_entries()
    return [f"layout table does not name raygpt/{n}" for n in sorted(present - named)] + [
        f"layout table names raygpt/{n}, which does not exist" for n in sorted(named - present)
    ]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_names_a_real_module_flag_script_and_target(path):
    problems = check_markdown(path.read_text())
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_names_a_file_and_heading(path):
    problems = check_links(path.read_text(), path)
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


def test_layout_table_names_every_module_and_package():
    problems = check_layout(LAYOUT.read_text())
    assert not problems, "\n".join(problems)


def test_readme_opens_with_the_two_commands_and_links_every_doc():
    text = README.read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block, first_block
    assert DOCS, "docs/ holds no .md file"
    unlinked = [p.name for p in DOCS if f"(docs/{p.name})" not in text]
    assert not unlinked, f"README.md links no docs/{unlinked}"
    size = len(text.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_checking_starts_no_ray():
    """Building every CLI's parser starts no Ray: checked in a fresh process, since the
    suite's own cluster may already run in this one."""
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; import test_docs as t\n"
        "for m in t.cli_modules(): t.cli_parser(m)\n"
        "ray = sys.modules.get('ray')\n"
        "sys.exit(0 if ray is None or not ray.is_initialized() else 3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(REPO / "tests")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


# The checkers themselves: each kind of mistake the docs could hold is caught.


def test_a_misspelt_flag_is_caught():
    text = "```bash\npython -m raygpt.train --lerning-rate 1e-3   # lr\n```\n"
    assert check_markdown(text) == [
        "`python -m raygpt.train --lerning-rate 1e-3`: raygpt.train has no flag --lerning-rate"
    ]
    assert check_markdown("```\npython -m raygpt.train --learning-rate 1e-3\n```") == []


def test_a_flag_of_another_subcommand_is_caught():
    # --limit is hellaswag's, not perplexity's; both are raygpt.eval's subcommands.
    assert check_markdown("`python -m raygpt.eval hellaswag --limit 10`") == []
    assert check_markdown("`python -m raygpt.eval perplexity --limit 10`") == [
        "`python -m raygpt.eval perplexity --limit 10`: raygpt.eval has no flag --limit"
    ]
    assert "needs a subcommand" in check_markdown("`python -m raygpt.data --dataset x`")[0]
    assert check_markdown("`python -m raygpt.data prepar`") == [
        "`python -m raygpt.data prepar`: raygpt.data has no subcommand prepar; "
        "it has prepare, list, verify"
    ]


def test_a_missing_module_script_target_or_file_is_caught():
    text = (
        "Run `python -m raygpt.trian` or `python -m raygpt.results`,\n"
        "```\npython benchmarks/nope.py\nmake deploy\n"
        "python benchmarks/vs_nanogpt.py cpu --data-fil x\n```\n"
        "with `experiments/nope.toml`, and `--checkpoint-uplaod sync`."
    )
    problems = check_markdown(text)
    expected = [
        "`python benchmarks/nope.py`: no such script",
        "`make deploy`: no such Makefile target",
        "`python benchmarks/vs_nanogpt.py`: the script defines no flag --data-fil",
        "`python -m raygpt.trian`: no module raygpt.trian",
        "`python -m raygpt.results`: raygpt.results is a library module, not a command",
        "`experiments/nope.toml`: no such file",
        "`--checkpoint-uplaod sync`: no raygpt command has a flag --checkpoint-uplaod",
    ]
    assert [p.split(" (")[0] for p in problems] == expected


def test_a_broken_link_is_caught():
    text = "[a](docs/sweeps.md#seeds) [b](docs/sweeps.md#seed) [c](docs/nope.md) [d](https://x.y)"
    assert check_links(text, README) == [
        "link docs/sweeps.md#seed: sweeps.md has no heading #seed",
        "link docs/nope.md: no such file",
    ]
    assert slug("Grid vs Optuna + ASHA") == "grid-vs-optuna--asha"


def test_a_module_missing_from_the_layout_table_is_caught():
    table = "## raygpt/\n\n| module | holds |\n|---|---|\n" + "".join(
        f"| `{name}` | x |\n" for name in sorted(package_entries()) if name != "runtime"
    )
    assert check_layout(table) == ["layout table does not name raygpt/runtime"]
    assert check_layout(table + "| `runtime.py`, `gone.py` | y |\n") == [
        "layout table names raygpt/gone, which does not exist"
    ]
    # Another section's table (the repository's folders) does not count.
    assert check_layout(table + "\n## Other\n\n| `runtime.py` | y |\n") == [
        "layout table does not name raygpt/runtime"
    ]
