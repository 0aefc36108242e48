"""Several machines (`--nnodes`): where they meet and the secret they share. Torch-free, so the
command line checks both before anything loads, and the engine reads them the same way."""

from __future__ import annotations

import os

from loopscope.shared.errors import UserError

NODE_KEY = "LOOPSCOPE_NODE_KEY"  # the secret every node of one `run --nnodes` shares


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) as (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def node_key() -> bytes:
    """The shared secret that authenticates other nodes' ranks to node 0's app (their commands
    and answers are pickled: nobody else may connect)."""
    key = os.environ.get(NODE_KEY, "")
    if not key:
        raise UserError(
            f"run --nnodes needs the same secret on every node: set {NODE_KEY} (any string) in each "
            "node's environment (node 0's app takes the other nodes' ranks only with it)"
        )
    return key.encode()
