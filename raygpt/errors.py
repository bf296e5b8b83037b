"""The one exception type that reaches a user as a single line.

Anything raised as `UserError` is bad input or an impossible request: the CLIs
print its message (what was wrong, what to do) and exit with status 2, with no
traceback. Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or an impossible request, explained in one line."""


def exit_on_user_error(main):
    """Wrap a CLI `main(argv) -> int`: a UserError becomes `error: ...` on stderr, exit 2."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper
