"""Radix-tree inspection: per-node hits, `Engine.radix_tree()`, `GET /radix_tree`, the
`/concate_and_append_request` check, the frontend fields of `/get_model_info`, and the
drawings of `jaxserve.viz`.

Expectations are brute force: the set of page-aligned prefixes the finished requests
cached (each request caches the whole pages of the tokens it computed), and for hits, the
requests whose matched prefix (`meta_info.cached_tokens`) starts with a node's path."""

from __future__ import annotations

import json
import random
import time

import httpx
import numpy as np
import pytest

import jaxserve
from jaxserve.memory import PageAllocator, RadixCache, export_tree, pretty_tree
from tests.server_harness import ENGINE_ARGS, compilation_cache_dir, running_server, tiny_model_dir

API_KEY = "inspect-key"
PAGE = ENGINE_ARGS.get("page_size", 16)
SMALL = dict(max_running_requests=4, max_prefill_tokens=64, chunked_prefill_size=64)  # fewer programs to compile


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, api_key=API_KEY, **SMALL) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def nodes_with_paths(tree: dict) -> list[tuple[dict, tuple[int, ...]]]:
    """Every non-root node with the tokens from the root to its end (needs full edges)."""
    out, stack = [], [(tree["root"], ())]
    while stack:
        node, path = stack.pop()
        for child in node["children"]:
            assert len(child["head_tokens"]) == child["num_tokens"], "ask for whole edges"
            child_path = path + tuple(child["head_tokens"])
            out.append((child, child_path))
            stack.append((child, child_path))
    return out


def generate_ids(http, ids: list[int], **params) -> dict:
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0,
                                                                           **params}})
    assert r.status_code == 200, r.text
    return r.json()


def cached_prefix(ids: list[int], out: dict) -> tuple[int, ...]:
    """What a finished request leaves in the cache: the whole pages of the tokens it computed
    (the prompt and every output token but the last, which was never fed)."""
    computed = out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"] - 1
    tokens = list(ids) + out["output_ids"]
    return tuple(tokens[: computed // PAGE * PAGE])


# ---------------------------------------------------------------- the cache alone


def test_hits_count_the_matches_that_reach_each_node():
    rng = random.Random(3)
    cache = RadixCache(PageAllocator(400), page_size=2)
    matched: list[tuple[int, ...]] = []
    for _ in range(60):
        tokens = [rng.choice([1, 2]) for _ in range(rng.randrange(0, 5))] + [rng.randrange(5) for _ in range(3)]
        pages, _ = cache.match_prefix(tokens)
        matched.append(tuple(tokens[: len(pages) * 2]))
        if rng.random() < 0.7:
            own = cache.allocator.alloc(len(tokens) // 2)
            present = cache.insert(tokens, own)
            cache.allocator.free(own[: present // 2])  # duplicates of what was cached
    rows = export_tree(cache, head=1000)
    by_id = {r.id: r for r in rows}
    paths = {rows[0].id: ()}
    assert rows[0].hits == len(matched)  # the root counts every lookup
    for row in rows[1:]:
        paths[row.id] = path = paths[row.parent_id] + row.head_tokens
        assert row.hits == sum(m[: len(path)] == path for m in matched), (path, by_id[row.id])
    assert any(r.hits > 1 for r in rows[1:])
    assert "hits" in pretty_tree(cache)


# ---------------------------------------------------------------- engine and server


def test_tree_matches_the_cached_prefixes_and_counts_hits(server, http):
    engine = server.app.state.server.engine
    assert http.post("/flush_cache").status_code == 200
    rng = np.random.default_rng(5)
    shared = rng.integers(100, 40000, 40).tolist()  # 2.5 pages, shared by every prompt
    prompts = [shared + rng.integers(100, 40000, int(n)).tolist() for n in (5, 12, 30)]
    prompts.append(shared[:20] + rng.integers(100, 40000, 25).tolist())  # shares one page
    sent: list[tuple[list[int], dict]] = [(ids, generate_ids(http, ids)) for ids in prompts]
    sent.append((prompts[0], generate_ids(http, prompts[0])))  # a re-match of a whole prompt

    tree = engine.radix_tree(head=10_000)
    nodes = nodes_with_paths(tree)
    cached = {cached_prefix(ids, out) for ids, out in sent}
    page_prefixes = {c[:k] for c in cached for k in range(PAGE, len(c) + 1, PAGE)}
    # every node ends at a cached page boundary; leaves are exactly the longest cached prefixes,
    # so the tokens along each root-to-leaf path add up to a cached length
    assert all(len(path) % PAGE == 0 and path in page_prefixes for _, path in nodes)
    leaves = {path for node, path in nodes if not node["children"]}
    assert leaves == {c for c in cached if not any(o != c and o[: len(c)] == c for o in cached)}
    assert sum(node["num_pages"] for node, _ in nodes) == len(page_prefixes) == tree["evictable_pages"]
    assert tree["locked_pages"] == 0 and not any(node["locked"] for node, _ in nodes)
    assert all(node["evictable"] and node["num_pages"] * PAGE == node["num_tokens"] for node, _ in nodes)
    assert tree["free_pages"] + tree["evictable_pages"] == tree["total_pages"]

    # hits: the requests whose matched prefix (cached_tokens) reaches into the node
    matched = [tuple(ids[: out["meta_info"]["cached_tokens"]]) for ids, out in sent]
    assert sent[-1][1]["meta_info"]["cached_tokens"] == 32  # the re-match found both of its pages
    for node, path in nodes:
        assert node["hits"] == sum(m[: len(path)] == path for m in matched), path
    before = {node["id"]: node["hits"] for node, _ in nodes}
    root_before = tree["root"]["hits"]
    generate_ids(http, prompts[1])
    after = engine.radix_tree(head=10_000)
    assert after["root"]["hits"] == root_before + 1
    on_path = {node["id"] for node, path in nodes if tuple(prompts[1][: len(path)]) == path}
    assert on_path and all(node["hits"] == before[node["id"]] + (node["id"] in on_path)
                           for node, _ in nodes_with_paths(after) if node["id"] in before)

    # the route serves the same tree (heads cut to 16 tokens, with their text)
    routed = http.get("/radix_tree").json()
    assert set(routed) == {"page_size", "total_pages", "free_pages", "evictable_pages", "locked_pages", "root"}
    assert routed["page_size"] == PAGE and routed["evictable_pages"] == after["evictable_pages"]
    first = routed["root"]["children"][0]
    assert set(first) == {"id", "num_tokens", "num_pages", "host_pages", "hits", "last_access", "lock_ref", "locked",
                          "evictable", "head_tokens", "head_text", "children"}
    assert len(first["head_tokens"]) == min(16, first["num_tokens"])
    assert first["head_text"] == engine.tokenizer.decode(first["head_tokens"], skip_special_tokens=False)


def test_a_running_request_locks_its_path_and_frees_it_after(server, http):
    engine = server.app.state.server.engine
    ids = np.random.default_rng(9).integers(100, 40000, 50).tolist()
    generate_ids(http, ids[:40])  # caches ids[:32]: the running request below matches and locks it
    for _ in range(5):  # a fast engine may finish before the tree is read: then try again
        body = {"input_ids": ids, "stream": True,
                "sampling_params": {"max_new_tokens": ENGINE_ARGS["context_length"] - len(ids),
                                    "ignore_eos": True, "temperature": 0}}
        with http.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept open: a closed iterator closes the stream (an abort)
            first = next(lines)
            assert json.loads(first.removeprefix("data:"))["meta_info"]["completion_tokens"] >= 1
            tree = http.get("/radix_tree").json()
            full = engine.radix_tree(head=10_000)
            if http.get("/get_server_info").json()["num_running_reqs"] == 1:
                break  # so it was running when both trees were read
    locked = {node["id"] for node, path in nodes_with_paths(full) if node["locked"]}
    on_path = {node["id"] for node, path in nodes_with_paths(full) if tuple(ids[: len(path)]) == path}
    assert locked == on_path and full["locked_pages"] == 2  # ids[:32]; the rest is the request's own
    mid = [n for n, _ in _walk(tree)]
    assert {n["id"] for n in mid if n["locked"]} == locked
    assert all(n["lock_ref"] >= 1 and not n["evictable"] for n in mid if n["locked"])
    assert sum(n["num_pages"] for n in mid if n["locked"]) == tree["locked_pages"] == 2
    assert sum(n["num_pages"] for n in mid if n["evictable"]) == tree["evictable_pages"]
    # closing the stream aborted the request: its path stays cached, now evictable
    for _ in range(100):
        after = http.get("/radix_tree").json()
        if after["locked_pages"] == 0:
            break
        time.sleep(0.05)
    still = [n for n, _ in _walk(after) if n["id"] in locked]
    assert len(still) == len(locked) and all(n["evictable"] and n["lock_ref"] == 0 for n in still)
    assert after["locked_pages"] == 0 and after["free_pages"] + after["evictable_pages"] == after["total_pages"]


def _walk(tree: dict):
    stack = [(tree["root"], 0)]
    while stack:
        node, depth = stack.pop()
        for child in node["children"]:
            yield child, depth + 1
            stack.append((child, depth + 1))


def test_concate_and_append_request_checks_its_body(http):
    ok = http.post("/concate_and_append_request", json={"src_rids": ["a", "b"], "dst_rid": "c"})
    assert ok.status_code == 200 and ok.json() == {"success": True}
    bad = [({}, "src_rids"), ({"src_rids": [], "dst_rid": "c"}, "src_rids"),
           ({"src_rids": "a", "dst_rid": "c"}, "src_rids"), ({"src_rids": ["a", ""], "dst_rid": "c"}, "src_rids"),
           ({"src_rids": ["a", 3], "dst_rid": "c"}, "src_rids"), ({"src_rids": ["a"]}, "dst_rid"),
           ({"src_rids": ["a"], "dst_rid": ""}, "dst_rid"), ({"src_rids": ["a"], "dst_rid": 7}, "dst_rid"),
           ({"src_rids": ["a"], "dst_rid": "c", "mode": "x"}, "mode")]
    for body, field in bad:
        r = http.post("/concate_and_append_request", json=body)
        assert r.status_code == 400, body
        error = r.json()["error"]
        assert error["param"] == field and field in error["message"], (body, error)
    assert http.post("/concate_and_append_request", content=b"[1]").status_code == 400


def test_model_info_has_the_frontend_fields(server, http, tmp_path_factory):
    config = json.loads((tiny_model_dir(tmp_path_factory) / "tokenizer_config.json").read_text())
    for path in ("/get_model_info", "/model_info"):
        info = http.get(path).json()
        assert info["chat_template"] == config["chat_template"] and "<|im_start|>" in info["chat_template"]
        assert (info["bos_token"], info["eos_token"]) == (config["bos_token"], config["eos_token"])


def test_every_new_route_needs_the_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/radix_tree").status_code == 401
        assert anonymous.post("/concate_and_append_request",
                              json={"src_rids": ["a"], "dst_rid": "b"}).status_code == 401
        assert anonymous.get("/get_model_info").status_code == 401
        assert anonymous.get("/health").status_code == 200


def test_disabled_cache_has_an_empty_tree(tmp_path_factory):
    engine = jaxserve.Engine(str(tiny_model_dir(tmp_path_factory)),
                             **{**ENGINE_ARGS, "compilation_cache_dir": compilation_cache_dir(tmp_path_factory),
                                **SMALL, "disable_radix_cache": True})
    try:
        engine.generate(input_ids=list(range(100, 150)), sampling_params={"max_new_tokens": 2})
        tree = engine.radix_tree()
        assert tree["root"]["children"] == [] and tree["root"]["hits"] == 1
        assert tree["free_pages"] == tree["total_pages"] and tree["evictable_pages"] == tree["locked_pages"] == 0
        json.dumps(tree)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- drawings


def test_drawings_show_every_node_up_to_the_limit(server, http):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxserve.viz import NODE_GID, draw_radix_tree, plot_pool

    tree = http.get("/radix_tree").json()
    total = 1 + sum(1 for _ in _walk(tree))
    assert total >= 5
    for limit in (total + 10, 3):
        fig, ax = plt.subplots()
        assert draw_radix_tree(tree, ax=ax, max_nodes=limit) is ax
        drawn = [t for t in ax.texts if t.get_gid() == NODE_GID]
        assert len(drawn) == min(total, limit)
        assert drawn[0].get_text().startswith("root")
        plt.close(fig)
    samples = [{"t": 0.1 * i, "free_pages": 10 - i, "evictable_pages": i // 2, "locked_pages": i - i // 2}
               for i in range(10)]
    for extra, bands in (({}, 3), ({"total_pages": 12}, 4)):  # with the total: private pages too
        fig, ax = plt.subplots()
        plot_pool([{**s, **extra} for s in samples], ax=ax)
        assert len(ax.collections) == bands  # [private,] locked, evictable, free
        top = ax.collections[-1].get_paths()[0].vertices[:, 1].max()
        assert top == extra.get("total_pages", 10)  # the stacks add up to the pool
        plt.close(fig)
