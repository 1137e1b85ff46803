# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Prefix sharing with the radix cache
#
# Many requests that start with the same long system prompt only need its KV computed once:
# the radix cache maps token prefixes to KV pages, and a request whose prompt starts with a
# cached prefix locks those pages and computes only the rest (RadixAttention).
#
# Here one system prompt of three growing lengths is followed by six questions: one
# question first (it computes and caches the system prompt), then the other five at once.
# The same workload runs on two engines, the radix cache on and off
# (`disable_radix_cache=True`), and we compare the cache hit rate, the time to first token
# (TTFT) of the five concurrent questions, and their throughput. The model is the bundled
# SmolLM2-135M-Instruct, on whatever JAX finds (CPU here).
#
# Figures are saved as PNG files into `$JAXSERVE_NOTEBOOK_FIGURES` (default
# `notebooks/figures/`).

# %%
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt

import jaxserve
from jaxserve.viz import draw_radix_tree, save_figure

# Small knobs keep the warm-up (one compiled program per token bucket) short. Both engines
# share a compilation cache, so the second one compiles nothing.
KNOBS = dict(max_running_requests=8, context_length=256, max_prefill_tokens=32, max_total_tokens=4096,
             compilation_cache_dir=tempfile.mkdtemp(prefix="jaxserve-notebook-"))
PARAMS = {"temperature": 0, "max_new_tokens": 4}

RULES = [
    "You are the help desk assistant of the Riverside public library.",
    "Answer in one short sentence, politely, and never invent facts about the library.",
    "The library opens at nine in the morning and closes at eight in the evening on weekdays.",
    "On Saturdays it opens at ten and closes at four; on Sundays and public holidays it is closed.",
    "Members may borrow up to twelve items at a time: books, magazines, films and music.",
    "Books are lent for three weeks and may be renewed twice, online or at the desk, unless reserved.",
    "Films and music are lent for one week and cannot be renewed.",
    "Wireless internet is free; the network name is Riverside-Library and needs no password.",
]
QUESTIONS = ["When do you open on Saturday?", "How long can I keep a film?", "Is the wifi free?",
             "How many books can I borrow?", "Can I renew a book online?", "Are you open on Sunday?"]
LENGTHS = [2, 4, 8]  # sentences of the system prompt

# %% [markdown]
# A batch: the first question alone, then the other five concurrently from threads,
# streaming, so each one's first chunk gives its TTFT. `cached_tokens` in each response's
# `meta_info` says how many prompt tokens came from the cache.

# %%
def chat(engine, system: str, question: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": question}], add_generation_prompt=True)


def timed(engine, prompt: str) -> dict:
    start = time.perf_counter()
    ttft = None
    for chunk in engine.generate(prompt, PARAMS, stream=True):
        ttft = ttft if ttft is not None else time.perf_counter() - start
    return {"ttft": ttft, **chunk["meta_info"]}


def run_batch(engine, system: str) -> dict:
    prompts = [chat(engine, system, q) for q in QUESTIONS]
    first = timed(engine, prompts[0])
    tree_before = engine.radix_tree()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts) - 1) as pool:
        rest = list(pool.map(lambda p: timed(engine, p), prompts[1:]))
    wall = time.perf_counter() - start
    everything = [first, *rest]
    return {
        "system_tokens": len(engine.tokenizer.encode(system)),
        "hit_rate": sum(r["cached_tokens"] for r in everything) / sum(r["prompt_tokens"] for r in everything),
        "ttft": sum(r["ttft"] for r in rest) / len(rest),
        "throughput": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rest) / wall,
        "trees": (tree_before, engine.radix_tree()),
    }


def measure(engine) -> list[dict]:
    results = []
    for n in LENGTHS:
        engine.flush_cache()  # each length starts from an empty cache
        results.append(run_batch(engine, " ".join(RULES[:n])))
    return results


# %% [markdown]
# ## Radix cache on
#
# The trees of the longest system prompt's batch. After its first question the tree holds
# one path: the system prompt and that question. The prompt was prefilled in chunks of
# `max_prefill_tokens` (32) tokens, and each chunk's whole pages entered the tree as soon
# as they were computed (so that requests arriving meanwhile can share them), hence a chain
# of 32-token nodes. After the other five questions every node of the system prompt has
# been hit five times, and each question hangs off it as its own branch. Only whole pages
# of 16 tokens are cached, so a branch starts at the last page boundary before the prompts
# differ.

# %%
start = time.perf_counter()
engine = jaxserve.Engine(**KNOBS)
print(f"engine ready in {time.perf_counter() - start:.1f} s")
on = measure(engine)
engine.shutdown()
before, after = on[-1]["trees"]

fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1, 3]})
draw_radix_tree(before, ax=axes[0])
axes[0].set_title("after the first question", fontsize=10)
draw_radix_tree(after, ax=axes[1])
axes[1].set_title("after all six questions", fontsize=10)
save_figure(fig, "prefix_sharing_tree")
plt.show()

# %% [markdown]
# ## Radix cache off
#
# The same workload on an engine with `disable_radix_cache=True`: every request computes its
# whole prompt.

# %%
start = time.perf_counter()
engine = jaxserve.Engine(disable_radix_cache=True, **KNOBS)
print(f"engine ready in {time.perf_counter() - start:.1f} s")
off = measure(engine)
engine.shutdown()
assert off[-1]["trees"][1]["root"]["children"] == []  # nothing is ever cached

# %%
print(f"{'system tokens':>13} {'cache':>5} {'hit rate':>8} {'TTFT (s)':>8} {'tokens/s':>8}")
for name, rows in (("on", on), ("off", off)):
    for row in rows:
        print(f"{row['system_tokens']:>13} {name:>5} {row['hit_rate']:>8.2f} {row['ttft']:>8.3f} "
              f"{row['throughput']:>8.0f}")

# %% [markdown]
# ## Hit rate, TTFT and throughput
#
# With the cache on, the hit rate grows with the system prompt's share of each prompt, and
# the five concurrent questions only prefill their own few tokens: their TTFT stays nearly
# flat as the system prompt grows, while with the cache off it grows with the prompt.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
x = range(len(LENGTHS))
labels = [str(r["system_tokens"]) for r in on]
for ax, key, title in zip(axes, ("hit_rate", "ttft", "throughput"),
                          ("cache hit rate", "mean TTFT of 5 concurrent (s)", "tokens/s (prompt + output)")):
    ax.bar([i - 0.2 for i in x], [r[key] for r in on], width=0.4, label="radix cache on")
    ax.bar([i + 0.2 for i in x], [r[key] for r in off], width=0.4, label="radix cache off")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("system prompt tokens")
    ax.set_title(title, fontsize=10)
axes[0].legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "prefix_sharing_metrics")
plt.show()
