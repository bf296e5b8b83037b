"""s3:// and gs:// storage URIs: the options their query strings may hold, and the
pyarrow filesystem they build.

The options stay in the URI (Storage.uri), so Ray workers and later commands rebuild
the same endpoint from it. A credential never belongs there: logs and run records
would keep it, so one in the query string, the user part or an endpoint is refused,
and the error says where credentials go instead.
"""

from __future__ import annotations

import datetime
import re
from typing import Any
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

from raygpt.errors import UserError
from raygpt.redact import redact

# Timeouts of the filesystem a run uses. request_timeout is, on Linux, how long a
# transfer may make no progress at all (curl's low-speed limit), not a cap on a
# whole upload, so a large checkpoint is safe under it.
_CONNECT_S = 5.0
_REQUEST_S = 30.0
# The check in `resolve` uses a stricter copy: a wrong endpoint must fail in
# seconds, not after the SDK's retries with back-off at the run's timeouts.
# Worst case for an endpoint that accepts connections and never answers:
# _CHECK_ATTEMPTS x _CHECK_REQUEST_S.
_CHECK_CONNECT_S = 3.0
_CHECK_REQUEST_S = 5.0
_CHECK_ATTEMPTS = 2
_CHECK_GCS_RETRY_S = 5

# URI query options, by type, passed on to the pyarrow filesystem. A typo is an
# error rather than silently ignored.
_S3_STR = ("endpoint_override", "scheme", "region", "role_arn", "session_name", "external_id")
_S3_STR += ("tls_ca_file_path", "proxy_options")
_S3_BOOL = ("anonymous", "force_virtual_addressing", "allow_bucket_creation")
_S3_BOOL += ("allow_bucket_deletion", "check_directory_existence_before_creation")
_S3_BOOL += ("background_writes", "allow_delayed_open")
_S3_FLOAT = ("connect_timeout", "request_timeout", "load_frequency")
_GCS_STR = ("endpoint_override", "scheme", "project_id", "target_service_account")
_GCS_STR += ("default_bucket_location",)
_GCS_BOOL = ("anonymous",)
_GCS_FLOAT = ("retry_limit_seconds",)
_SECRETS = ("access_key", "secret_key", "session_token", "access_token")

CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
    "or give the nodes an instance profile",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`, "
    "or give the nodes a service account",
}
MAKE_BUCKET = {"s3": "aws s3 mb s3://{}", "gs": "gcloud storage buckets create gs://{}"}


def parse_options(raw: str, scheme: str, query: str) -> dict[str, Any]:
    kinds = {
        "s3": (_S3_STR, _S3_BOOL, _S3_FLOAT),
        "gs": (_GCS_STR, _GCS_BOOL, _GCS_FLOAT),
    }[scheme]
    accepted = sorted(k for group in kinds for k in group)
    options: dict[str, Any] = {}
    pairs = parse_qsl(query, keep_blank_values=True)
    # Every message shows the URI masked: a bad option can sit beside a credential.
    shown = redact(raw)
    # A secret first, whatever else is wrong: the fix is to take it out of the path.
    secret = next((k for k, _ in pairs if k.lower() in _SECRETS), None)
    if secret is not None:
        raise UserError(
            f"--storage-path {shown.split('?', 1)[0]}?...: {secret} does not belong in the path, "
            f"where logs and run records would keep it; {CREDENTIALS_HINT[scheme]}"
        )
    for key, value in pairs:
        if key in options:
            raise UserError(f"--storage-path {shown} gives {key} twice; keep one")
        if key in kinds[1]:
            if value.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--storage-path {shown}: {key}={value} must be true or false")
            options[key] = value.lower() in ("true", "1")
        elif key in kinds[2]:
            try:
                options[key] = float(value)
            except ValueError:
                raise UserError(
                    f"--storage-path {shown}: {key}={value} must be a number of seconds"
                ) from None
        elif key in kinds[0]:
            options[key] = value
        else:
            raise UserError(
                f"--storage-path {shown}: unknown option {key!r}; "
                f"{scheme}:// accepts {', '.join(accepted)}"
            )
    # "http://host:port" is the form Ray's docs and boto3 use; pyarrow wants host:port
    # and the scheme apart.
    # The options stay in Storage.uri, which workers and later commands rebuild from and
    # Tune pickles into a sweep's folder: a user:password@ has no place there either.
    for key in ("endpoint_override", "proxy_options"):
        if "@" in str(options.get(key, "")):
            raise UserError(
                f"--storage-path {shown}: {key} holds credentials ('...@'); they do not "
                "belong in the path, where logs and run records would keep them; "
                + CREDENTIALS_HINT[scheme]
            )
    endpoint = options.get("endpoint_override", "")
    match = re.match(r"(https?)://(.*)$", endpoint)
    if match:
        if options.get("scheme", match[1]) != match[1]:
            raise UserError(
                f"--storage-path {shown}: endpoint_override says {match[1]} but scheme says "
                f"{options['scheme']}; keep one"
            )
        options["scheme"], options["endpoint_override"] = match[1], match[2].rstrip("/")
    if options.get("scheme", "https") not in ("http", "https"):
        raise UserError(f"--storage-path {shown}: scheme={options['scheme']} must be http or https")
    return options


def query_pairs(options: dict[str, Any]) -> list[tuple[str, str]]:
    """The options in a stable order (the endpoint first), as URI query text."""
    first = [k for k in ("endpoint_override", "scheme", "region") if k in options]
    keys = first + sorted(k for k in options if k not in first)
    return [
        (k, str(options[k]).lower() if isinstance(options[k], bool) else _num(options[k]))
        for k in keys
    ]


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bucket_region(bucket: str) -> str | None:
    """The AWS region of `bucket`, as pyarrow's own URI parsing finds it; None if unknown.

    A client in the wrong region gets redirects pyarrow does not follow. None leaves
    the choice to the SDK (AWS_DEFAULT_REGION, the profile), and the check that follows
    says what is wrong if the bucket is unusable.
    """
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def filesystem(scheme: str, options: dict[str, Any], quick: bool = False) -> pafs.FileSystem:
    if scheme == "gs":
        kwargs = {k: v for k, v in options.items() if k != "retry_limit_seconds"}
        limit = options.get("retry_limit_seconds", _CHECK_GCS_RETRY_S if quick else None)
        if limit is not None:
            kwargs["retry_time_limit"] = datetime.timedelta(seconds=limit)
        return pafs.GcsFileSystem(**kwargs)
    kwargs = dict(options)
    # One PutObject for a small file instead of pyarrow's default three-request
    # multipart upload; errors then surface on write/close rather than on open.
    kwargs.setdefault("allow_delayed_open", True)
    kwargs.setdefault("connect_timeout", _CHECK_CONNECT_S if quick else _CONNECT_S)
    kwargs.setdefault("request_timeout", _CHECK_REQUEST_S if quick else _REQUEST_S)
    if "load_frequency" in kwargs:
        kwargs["load_frequency"] = int(kwargs["load_frequency"])
    if quick:
        # Not kept by pickling: an unpickled S3FileSystem has the SDK's default
        # (standard, 3 attempts), which is also what the run's filesystem uses.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_CHECK_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)
