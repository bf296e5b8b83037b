"""raygpt.object_store: parsing s3:// and gs:// query options, refusing credentials in
them with one-line errors that never echo the secret, and the filesystems they build."""

from __future__ import annotations

import datetime
import pickle
from urllib.parse import urlencode

import pyarrow.fs as pafs
import pytest
from conftest import one_line

from raygpt import object_store, storage
from raygpt.errors import UserError

SECRET = "hunter2-S3CR3T"


def _parse(raw: str, scheme: str = "s3") -> dict:
    return object_store.parse_options(raw, scheme, raw.split("?", 1)[1] if "?" in raw else "")


def _fs_kwargs(fs: pafs.FileSystem) -> dict:
    # pyarrow pickles a filesystem as its constructor's keyword arguments: what Ray's
    # workers rebuild, so these are the options that really travel.
    return fs.__reduce__()[1][0]


def test_options_are_typed_and_the_endpoint_scheme_split_off():
    options = _parse(
        "s3://b/p?endpoint_override=http://127.0.0.1:9000/&anonymous=TRUE"
        "&request_timeout=7&region=eu-west-1&force_virtual_addressing=0"
    )
    assert options == {
        "endpoint_override": "127.0.0.1:9000",  # trailing slash dropped
        "scheme": "http",  # taken from the endpoint
        "anonymous": True,
        "request_timeout": 7.0,
        "region": "eu-west-1",
        "force_virtual_addressing": False,
    }
    assert _parse("gs://b/p?retry_limit_seconds=2.5&project_id=x", "gs") == {
        "retry_limit_seconds": 2.5,
        "project_id": "x",
    }
    assert _parse("s3://b/p") == {}


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("s3://b/p?anonymous=maybe", "anonymous=maybe must be true or false"),
        ("s3://b/p?request_timeout=soon", "request_timeout=soon must be a number of seconds"),
        ("s3://b/p?region=a&region=b", "gives region twice"),
        ("s3://b/p?endpont_override=x", "unknown option 'endpont_override'"),
        ("s3://b/p?scheme=ftp", "scheme=ftp must be http or https"),
        ("s3://b/p?endpoint_override=https://h:1&scheme=http", "endpoint_override says https"),
        ("gs://b/p?region=x", "unknown option 'region'"),  # an s3-only key
    ],
)
def test_bad_options_are_one_line_naming_the_value(raw, says):
    scheme = raw.split("://", 1)[0]
    with pytest.raises(UserError) as err:
        _parse(raw, scheme)
    text = one_line(err)
    assert says in text
    assert text.startswith("--storage-path ")


def test_an_unknown_option_lists_what_the_scheme_accepts():
    with pytest.raises(UserError) as err:
        _parse("gs://b/p?bogus=1", "gs")
    text = one_line(err)
    accepted = text.split("accepts ", 1)[1].split(", ")
    assert accepted == sorted(accepted)
    assert {"endpoint_override", "anonymous", "retry_limit_seconds", "project_id"} <= set(accepted)
    assert "role_arn" not in accepted  # s3's, not gs's


@pytest.mark.parametrize("key", ["access_key", "secret_key", "session_token", "access_token"])
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_secret_in_the_query_is_refused_without_echoing_it(key, scheme):
    # Put before a bad option too: the secret is reported first, whatever else is wrong.
    raw = f"{scheme}://bucket/prefix?anonymous=maybe&{key}={SECRET}"
    with pytest.raises(UserError) as err:
        _parse(raw, scheme)
    text = one_line(err)
    assert SECRET not in text
    assert f"{key} does not belong in the path" in text
    assert f"{scheme}://bucket/prefix?..." in text
    assert object_store.CREDENTIALS_HINT[scheme] in text


@pytest.mark.parametrize("key", ["endpoint_override", "proxy_options"])
def test_credentials_in_an_endpoint_are_refused(key):
    raw = f"s3://b/p?{key}=http://user:{SECRET}@host:3128"
    with pytest.raises(UserError) as err:
        _parse(raw)
    assert f"{key} holds credentials" in one_line(err)
    # storage.resolve, the one caller, masks the password in the line it raises.
    with pytest.raises(UserError) as err:
        storage.resolve(raw, check=False)
    text = one_line(err)
    assert SECRET not in text and "holds credentials" in text


@pytest.mark.parametrize(
    "query",
    [
        "endpoint_override=http://u:hunter2@h&anonymous=maybe",  # another option fails first
        "Secret_Key=hunter2",  # a secret's name in any case
    ],
)
def test_no_error_of_parse_options_echoes_a_credential(query):
    with pytest.raises(UserError) as err:
        object_store.parse_options(f"s3://b/p?{query}", "s3", query)
    assert "hunter2" not in one_line(err)


def test_query_pairs_order_and_round_trip():
    options = {
        "request_timeout": 7.0,
        "anonymous": True,
        "region": "r1",
        "load_frequency": 900.0,
        "endpoint_override": "h:1",
        "scheme": "http",
    }
    pairs = object_store.query_pairs(options)
    assert pairs == [
        ("endpoint_override", "h:1"),
        ("scheme", "http"),
        ("region", "r1"),
        ("anonymous", "true"),  # bools lower-case, as parse_options accepts them
        ("load_frequency", "900"),  # floats without a trailing .0
        ("request_timeout", "7"),
    ]
    # What a worker parses back from Storage.uri is what the driver had.
    assert _parse("s3://b/p?" + urlencode(pairs, safe=":/")) == options


def test_s3_filesystem_has_run_timeouts_and_quick_check_timeouts():
    options = {"endpoint_override": "127.0.0.1:9", "scheme": "http", "anonymous": True}
    options["region"] = "us-east-1"
    run = object_store.filesystem("s3", dict(options))
    assert isinstance(run, pafs.S3FileSystem)
    kwargs = _fs_kwargs(run)
    assert (kwargs["connect_timeout"], kwargs["request_timeout"]) == (5.0, 30.0)
    assert kwargs["allow_delayed_open"] is True  # one PUT per small file
    assert kwargs["endpoint_override"] == "127.0.0.1:9" and kwargs["scheme"] == "http"
    quick = _fs_kwargs(object_store.filesystem("s3", dict(options), quick=True))
    assert (quick["connect_timeout"], quick["request_timeout"]) == (3.0, 5.0)
    # A user's own timeout wins over the defaults, in the quick check too. (load_frequency
    # is not checked here: pyarrow keeps it only with a role_arn, whose provider then asks
    # STS for credentials over the network.)
    mine = object_store.filesystem("s3", {**options, "request_timeout": 60.0}, quick=True)
    assert _fs_kwargs(mine)["request_timeout"] == 60.0
    assert _fs_kwargs(mine)["connect_timeout"] == 3.0
    # Ray ships it pickled: the endpoint survives.
    assert _fs_kwargs(pickle.loads(pickle.dumps(run)))["endpoint_override"] == "127.0.0.1:9"


def test_gcs_filesystem_retry_limit():
    options = {"anonymous": True, "endpoint_override": "127.0.0.1:9", "scheme": "http"}
    quick = object_store.filesystem("gs", options, quick=True)
    assert isinstance(quick, pafs.GcsFileSystem)
    assert _fs_kwargs(quick)["retry_time_limit"] == datetime.timedelta(seconds=5)
    given = object_store.filesystem("gs", {**options, "retry_limit_seconds": 2.0})
    assert _fs_kwargs(given)["retry_time_limit"] == datetime.timedelta(seconds=2)
    assert _fs_kwargs(object_store.filesystem("gs", options))["retry_time_limit"] is None
