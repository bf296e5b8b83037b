"""Every node of the Ray cluster sees the same storage, or one line names the node.

A node-local path on a multi-node cluster would otherwise fail much later, on
whichever node rank 0 happens to land. `preflight` runs before any Ray Train or
Tune work starts; `storage.resolve` has already proved that this machine can
write there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from raygpt.errors import UserError
from raygpt.storage import Storage, explain_os_error

PREFLIGHT_DIR = ".raygpt-preflight"


def preflight(storage: Storage, timeout_s: float = 60.0) -> None:
    """Prove that every alive Ray node reads and writes the same `storage`.

    The driver writes a marker holding a random token; one tiny task pinned to each
    node reads it back and writes its own; the driver then reads every node's
    marker. Anything else (a node that cannot see the driver's marker, a marker the
    driver cannot see, an error, a task still running after `timeout_s`) is one
    UserError naming the node. The markers are removed either way.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    folder = storage.path(PREFLIGHT_DIR, token)
    marker = f"{folder}/driver"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return
    # A cluster of one node, this process's own, sees exactly what this process sees.
    if [n["NodeID"] for n in nodes] == [ray.get_runtime_context().get_node_id()]:
        return
    check = ray.remote(num_cpus=0, max_retries=0)(_node_check)
    try:
        storage.write_bytes(marker, token.encode())
        pending = {
            check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(storage, marker, f"{folder}/{token}-{node['NodeID']}", token): node
            for node in nodes
        }
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref in late:
            with contextlib.suppress(Exception):  # best effort: the task may be stuck in I/O
                ray.cancel(ref, force=True)
        if late:
            raise UserError(
                f"node {_node_name(pending[late[0]])} did not finish checking "
                f"{storage.display()} within {timeout_s:g} s (a hung mount or an overloaded "
                "node); check that node's storage, or raise the preflight timeout"
            )
        for ref in done:
            node = pending[ref]
            try:
                problem = ray.get(ref)
            except Exception as err:  # the node died, or its worker could not start
                problem = f"failed its storage check ({str(err).splitlines()[0]})"
            if problem:
                raise UserError(f"node {_node_name(node)} {problem}")
            own = f"{folder}/{token}-{node['NodeID']}"
            if not _holds(storage, own, token):
                raise UserError(
                    f"node {_node_name(node)} wrote {storage.display(own)} but the driver "
                    f"cannot see it: {_not_shared(storage)}"
                )
    except OSError as err:  # the driver's own reads and writes; resolve() passed moments ago
        raise UserError(f"the driver {_node_error(storage, err)}") from None
    finally:
        _remove_preflight(storage, folder)


def _node_check(storage: Storage, marker: str, own: str, token: str) -> str:
    """On one node: read the driver's marker, write this node's. "" or what went wrong."""
    try:
        if not _holds(storage, marker, token):
            return f"cannot see {storage.display()} that the driver wrote: {_not_shared(storage)}"
        storage.write_bytes(own, token.encode())
    except OSError as err:
        return _node_error(storage, err)
    return ""


def _node_error(storage: Storage, err: OSError) -> str:
    """What an OSError on one machine means, to follow "node X " or "the driver "."""
    if storage.is_local:
        return (
            f"cannot use {storage.display()} ({str(err).splitlines()[0]}); check that "
            "folder's mount and permissions there"
        )
    endpoint = dict(parse_qsl(urlsplit(storage.uri).query)).get("endpoint_override", "")
    return explain_os_error(storage, err, endpoint or "the default endpoint")


def _holds(storage: Storage, fs_path: str, token: str) -> bool:
    try:
        return storage.read_bytes(fs_path) == token.encode()
    except FileNotFoundError:
        return False


def _not_shared(storage: Storage) -> str:
    if storage.is_local:
        return (
            "it is not shared storage; mount the same NFS/EFS path on every node "
            "or use --storage-path s3://BUCKET/PATH"
        )
    return (
        "the nodes reach different storage; give an endpoint_override that every node "
        "reaches as the same server (not 127.0.0.1 or localhost)"
    )


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def _remove_preflight(storage: Storage, folder: str) -> None:
    """Delete this preflight's folder, and the shared parent once no preflight uses it."""
    with contextlib.suppress(OSError):
        storage.delete_dir(folder)
        parent = storage.path(PREFLIGHT_DIR)
        if storage.is_local:
            os.rmdir(parent)  # refuses while another run's preflight is in there
        elif not storage.list_dir(parent):
            storage.delete_dir(parent)
