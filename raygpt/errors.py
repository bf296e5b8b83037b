"""The one exception type that reaches a user as a single line.

Anything raised as `UserError` is bad input or an impossible request: the CLIs
print its message (what was wrong, what to do) and exit with status 2, with no
traceback. Every other exception is a bug and keeps its traceback.
"""

import contextlib
import re

# Terminal colour codes, which Ray's and the autoscaler's log lines carry.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class UserError(Exception):
    """Bad input or an impossible request, explained in one line."""


def first_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message, for a one-line report of it.

    The exception's type name stands in for an empty message; `with_type` prefixes it
    anyway, where the message alone ("'lr'") would not say what went wrong.
    """
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(err).__name__
    return f"{type(err).__name__}: {text}" if with_type else text


def exit_on_user_error(main):
    """Wrap a CLI `main(argv) -> int`: a UserError becomes `error: ...` on stderr, exit 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            from raygpt.redact import redact

            # The last stop before a person sees it: no password or token in a value the
            # message quotes (a URI's user:password@, a ?token=), whichever code raised it.
            print(f"error: {redact(str(err))}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper


def find_user_error(exc: BaseException | None, _seen: set[int] | None = None) -> UserError | None:
    """The UserError behind a Ray failure (worker errors arrive wrapped), if any."""
    seen = _seen if _seen is not None else set()
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, UserError):
        return exc
    nested = [exc.__cause__, exc.__context__]
    nested += list(getattr(exc, "worker_failures", {}).values())
    nested.append(getattr(exc, "controller_failure", None))
    if hasattr(exc, "as_instanceof_cause"):
        with contextlib.suppress(Exception):  # best-effort unwrapping only
            nested.append(exc.as_instanceof_cause())
    nested.append(getattr(exc, "cause", None))
    for inner in nested:
        if (found := find_user_error(inner, seen)) is not None:
            return found
    # A worker's UserError can arrive only as text in a traceback string.
    text = str(exc)
    marker = "raygpt.errors.UserError: "
    if marker in text:
        return UserError(text.split(marker, 1)[1].splitlines()[0])
    return None
