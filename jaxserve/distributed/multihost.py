"""`--nnodes N --node-rank R --dist-init-addr HOST:PORT`: one model over N processes.

`initialize` joins JAX's multi-controller runtime before any other JAX call: node 0 runs
the coordination service, bound to the address given and no other; every node waits at
most `--dist-timeout` x 6 seconds for the others, and a peer whose heartbeats stop for
`--dist-timeout` seconds ends every process. On CPU the collectives run over gloo (TCP).
Then every node checks that it was started with node 0's flags. Node 0 goes on to serve
(its runner mirrors each call to the others, `mirror.py`); the other nodes build the same
model and KV pool and replay node 0's calls (`mirror.follow`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxserve.config import ServerArgs, ServerArgsError
from jaxserve.distributed.mirror import Channel

logger = logging.getLogger("jaxserve.multihost")

# Flags that may differ between nodes: node 0 alone serves HTTP.
_PER_NODE = {"node_rank", "host", "port", "api_key", "log_level", "compilation_cache_dir", "profile_dir",
             "served_model_name", "session_timeout", "max_queued_requests", "max_sessions", "max_request_body_bytes"}


def initialize(args: ServerArgs) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only (tests, CPU hosts)
    addr = args.dist_init_addr
    logger.info("multi-host: node %d of %d joining %s", args.node_rank, args.nnodes, addr)
    jax.distributed.initialize(coordinator_address=addr, num_processes=args.nnodes, process_id=args.node_rank,
                               initialization_timeout=6 * args.dist_timeout,
                               heartbeat_timeout_seconds=args.dist_timeout,
                               shutdown_timeout_seconds=args.dist_timeout,
                               coordinator_bind_address=addr if args.node_rank == 0 else None)
    check_same_flags(args)
    if args.tp_size != jax.device_count():
        raise ServerArgsError(f"--tp-size {args.tp_size} with --nnodes {args.nnodes}: the mesh spans every node's "
                              f"devices, so --tp-size must be all {jax.device_count()} of them")
    logger.info("multi-host: %d processes, %d devices (%d here)", jax.process_count(), jax.device_count(),
                jax.local_device_count())


def check_same_flags(args: ServerArgs, channel: Channel | None = None) -> None:
    """Every node must run node 0's configuration: the ones that differ say how, node 0
    says which nodes, and all of them stop."""
    from jax.experimental import multihost_utils

    channel = channel or Channel()
    mine = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in _PER_NODE}
    if args.node_rank == 0:
        channel.send(("flags", (mine,), {}))
        differ = []
    else:
        _, (theirs,), _ = channel.receive()
        differ = [f"--{k.replace('_', '-')} {mine[k]!r} here, {theirs.get(k)!r} on node 0"
                  for k in sorted(mine) if mine[k] != theirs.get(k)]
    bad = multihost_utils.process_allgather(np.array([len(differ)], np.int32))
    bad_nodes = [i for i, n in enumerate(np.asarray(bad).reshape(-1)) if n]
    if differ:
        raise ServerArgsError("this node's flags differ from node 0's: " + "; ".join(differ))
    if bad_nodes:
        raise ServerArgsError(f"node(s) {bad_nodes} were started with flags that differ from node 0's "
                              "(their logs say which); start every node with the same flags")


def agree_on_pages(num_pages: int) -> int:
    """The KV pool every node can hold: the smallest of the nodes' sizes."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([num_pages], np.int64))).reshape(-1)
    if len(set(sizes.tolist())) > 1:
        logger.info("multi-host: nodes sized %s KV pages; all use %d", sizes.tolist(), sizes.min())
    return int(sizes.min())
