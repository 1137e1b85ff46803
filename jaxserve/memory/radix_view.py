"""The radix tree as rows, for printing, plotting and `Engine.radix_tree()`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxserve.memory.radix_cache import RadixCache, RadixNode

_TOKEN_BYTES = 4  # keys are int32 token ids


@dataclass(frozen=True)
class NodeInfo:
    """One node of the tree."""

    id: int
    parent_id: int | None  # None for the root
    start_token: int  # tokens from the root to the start of this edge
    num_tokens: int
    num_pages: int
    lock_ref: int
    last_access: int
    head_tokens: tuple[int, ...]  # the first few tokens of the edge
    hits: int  # match_prefix calls that matched into this node (the root: every call)
    host_pages: int = 0  # hierarchical cache: pages of its KV in host memory (0: none)


def export_tree(cache: RadixCache, head: int = 8) -> list[NodeInfo]:
    """All nodes, the root first, in depth-first order (children by id), with the first
    `head` tokens of each edge."""
    rows: list[NodeInfo] = []
    stack: list[tuple[RadixNode, int]] = [(cache.root, 0)]
    while stack:
        node, start = stack.pop()
        num_tokens = len(node.key) // _TOKEN_BYTES
        rows.append(NodeInfo(
            id=node.id,
            parent_id=node.parent.id if node.parent is not None else None,
            start_token=start,
            num_tokens=num_tokens,
            num_pages=0 if node.pages is None else len(node.pages),  # None: only on the host
            lock_ref=node.lock_ref,
            last_access=node.last_access,
            head_tokens=tuple(np.frombuffer(node.key[: head * _TOKEN_BYTES], np.int32).tolist()),
            hits=node.hits,
            host_pages=0 if node.host is None else len(node.host),
        ))
        children = sorted(node.children.values(), key=lambda c: c.id, reverse=True)
        stack.extend((c, start + num_tokens) for c in children)
    return rows


def pretty_tree(cache: RadixCache, max_nodes: int = 200) -> str:
    """Text rendering of the tree, one node per line, at most `max_nodes` nodes."""
    rows = export_tree(cache)
    depth = {rows[0].id: 0}
    lines = [
        f"root: {cache.free_pages} free + {cache.evictable_pages} evictable + "
        f"{cache.locked_pages} locked of {cache.total_pages} pages (page_size {cache.page_size})"
    ]
    for row in rows[1 : max_nodes + 1]:
        d = depth[row.id] = depth[row.parent_id] + 1  # type: ignore[index]
        head = ", ".join(map(str, row.head_tokens))
        more = ", ..." if row.num_tokens > len(row.head_tokens) else ""
        lock = f" locked x{row.lock_ref}" if row.lock_ref else ""
        lock += f" host {row.host_pages} pg" if row.host_pages else ""
        lines.append(f"{'  ' * d}#{row.id} [{head}{more}] {row.num_tokens} tok, "
                     f"{row.num_pages} pg, {row.hits} hits, t={row.last_access}{lock}")
    if len(rows) - 1 > max_nodes:
        lines.append(f"... {len(rows) - 1 - max_nodes} more nodes")
    return "\n".join(lines)
