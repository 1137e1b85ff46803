"""Pictures of the KV cache for notebooks: the radix tree of `Engine.radix_tree()` and the
page pool over time. matplotlib is not a dependency of the engine: it is imported inside
the functions (install the `notebooks` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["NODE_GID", "POOL_COLORS", "draw_radix_tree", "figure_dir", "plot_pool", "save_figure"]

NODE_GID = "radix-node"  # the gid of every node label `draw_radix_tree` draws
POOL_COLORS = {"private": "#ff7f0e", "locked": "#d62728", "evictable": "#2ca02c", "free": "#c7c7c7"}
_ROOT_COLOR = "#9ecae1"


def _limited(root: dict[str, Any], max_nodes: int) -> list[tuple[dict, dict | None, int]]:
    """(node, parent, depth) of the first `max_nodes` nodes in breadth-first order (the root
    counts), so that a cut keeps the top of the tree."""
    kept = [(root, None, 0)]
    i = 0
    while i < len(kept) and len(kept) < max_nodes:
        node, _, depth = kept[i]
        for child in node["children"]:
            if len(kept) == max_nodes:
                break
            kept.append((child, node, depth + 1))
        i += 1
    return kept


def _layout(kept: list[tuple[dict, dict | None, int]]) -> dict[int, float]:
    """x of each kept node: leaves side by side in depth-first order, a parent centred over
    its kept children."""
    children: dict[int, list[dict]] = {}
    for node, parent, _ in kept:
        children[node["id"]] = []
        if parent is not None:
            children[parent["id"]].append(node)
    xs: dict[int, float] = {}
    next_leaf = 0.0
    stack: list[tuple[dict, bool]] = [(kept[0][0], False)]
    while stack:  # iterative post-order: deep trees (long conversations) do not recurse
        node, done = stack.pop()
        below = children[node["id"]]
        if not below:
            xs[node["id"]] = next_leaf
            next_leaf += 1.0
        elif done:
            xs[node["id"]] = (xs[below[0]["id"]] + xs[below[-1]["id"]]) / 2
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(below))
    return xs


def _label(node: dict[str, Any], is_root: bool) -> str:
    if is_root:
        return f"root\n{node['hits']} lookups"
    head = node["head_text"].replace("\n", "\\n")
    head = head if len(head) <= 14 else head[:13] + "…"
    return f"{head!r}\n{node['num_tokens']} tok, {node['num_pages']} pg\n{node['hits']} hits"


def draw_radix_tree(tree: dict[str, Any], ax=None, max_nodes: int = 40):
    """Draw `Engine.radix_tree()` (or `GET /radix_tree`) top-down: one box per node with the
    start of its text, its tokens, pages and hits; red when locked (a running request or a
    session holds it), green when evictable. At most `max_nodes` nodes (the root included),
    breadth first. Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4))
    kept = _limited(tree["root"], max(1, max_nodes))
    xs = _layout(kept)
    font = 8 if len(kept) <= 12 else 6 if len(kept) <= 30 else 5
    for node, parent, depth in kept:
        x = xs[node["id"]]
        if parent is not None:
            ax.plot([xs[parent["id"]], x], [-(depth - 1), -depth], color="#888888", lw=0.8, zorder=1)
        color = _ROOT_COLOR if parent is None else POOL_COLORS["locked" if node["locked"] else "evictable"]
        ax.text(x, -depth, _label(node, parent is None), ha="center", va="center", fontsize=font, zorder=2,
                gid=NODE_GID, bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="#444444", alpha=0.9))
    width = max(xs.values())
    depth = max(d for _, _, d in kept)
    ax.set_xlim(-0.7, width + 0.7)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.axis("off")
    shown = f" (first {len(kept)} nodes)" if len(kept) < _count(tree["root"]) else ""
    ax.set_title(f"radix tree{shown}: {tree['locked_pages']} locked + {tree['evictable_pages']} evictable + "
                 f"{tree['free_pages']} free of {tree['total_pages']} pages of {tree['page_size']} tokens",
                 fontsize=9)
    ax.legend(handles=[Patch(color=POOL_COLORS["locked"], label="locked"),
                       Patch(color=POOL_COLORS["evictable"], label="evictable")], loc="upper right", fontsize=7)
    return ax


def _count(node: dict[str, Any]) -> int:
    total, stack = 0, [node]
    while stack:
        n = stack.pop()
        total += 1
        stack.extend(n["children"])
    return total


def plot_pool(samples: list[dict[str, Any]], ax=None):
    """Stacked locked / evictable / free KV pages over time from samples of
    `Engine.get_server_info()` (dicts with `t`, `free_pages`, `evictable_pages`,
    `locked_pages`). Samples that also have `total_pages` get a fourth band below the
    others: the pages private to running requests (not yet in the tree). Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    t = [s["t"] for s in samples]
    kinds = ("locked", "evictable", "free")
    bands = [[s[f"{k}_pages"] for s in samples] for k in kinds]
    if samples and all("total_pages" in s for s in samples):
        kinds = ("private", *kinds)
        bands.insert(0, [s["total_pages"] - sum(b[i] for b in bands) for i, s in enumerate(samples)])
    ax.stackplot(t, *bands, labels=kinds, colors=[POOL_COLORS[k] for k in kinds], step="post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV pages")
    ax.set_xlim(t[0] if t else 0, t[-1] if t else 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # the stacks fill the plot
    return ax


def figure_dir() -> Path:
    """Where notebooks save their figures: `$JAXSERVE_NOTEBOOK_FIGURES`, else
    `notebooks/figures` (`figures` when run from inside `notebooks/`). Created if missing."""
    default = "figures" if Path.cwd().name == "notebooks" else "notebooks/figures"
    path = Path(os.environ.get("JAXSERVE_NOTEBOOK_FIGURES") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Save `fig` as `<figure_dir()>/<name>.png`; returns the path."""
    path = figure_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
