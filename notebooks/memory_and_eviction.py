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
# # KV memory and eviction
#
# The KV cache lives in one pool of pages (16 tokens each by default), allocated once.
# Every usable page is in exactly one place:
#
# - **free** in the allocator;
# - **locked** in the radix tree: a cached prefix that a running request (or a session) is using;
# - **evictable** in the radix tree: a cached prefix nobody uses now, kept for later hits
#   and evicted, least recently used first, when pages are needed;
# - **private** to a running request: the pages of its own new tokens, which enter the tree
#   when it finishes.
#
# Here a deliberately small pool serves six multi-turn conversations at once, each turn
# resending the whole conversation so far (so every turn after the first can hit the
# cache). A thread samples `engine.get_server_info()` to watch the pool over time.

# %%
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib.pyplot as plt

import jaxserve
from jaxserve.memory import size_kv_pool
from jaxserve.viz import plot_pool, save_figure

PAGE = 16
KNOBS = dict(max_running_requests=4, max_total_tokens=512, context_length=256, max_prefill_tokens=16,
             page_size=PAGE)
PARAMS = {"temperature": 0, "max_new_tokens": 16}
SYSTEM = "You are a concise assistant. Answer in one sentence."
CONVERSATIONS = [
    ["What is a comet?", "Where do comets come from?", "Can we see one without a telescope?"],
    ["How do bees make honey?", "Why do they need so much of it?", "Does honey ever go bad?"],
    ["What is a prime number?", "Is one a prime number?", "What is the largest known prime?"],
    ["Why is the sky blue?", "Why are sunsets red?", "Is the sky blue on Mars too?"],
    ["How does a bicycle stay upright?", "Why is it harder to ride slowly?", "Who invented the bicycle?"],
    ["What is bread made of?", "Why does dough rise?", "What makes sourdough different?"],
]

start = time.perf_counter()
engine = jaxserve.Engine(**KNOBS)
info = engine.get_server_info()
print(f"engine ready in {time.perf_counter() - start:.1f} s: {info['total_pages']} pages of {PAGE} tokens "
      f"= {info['max_total_num_tokens']} tokens, at most {info['max_running_requests']} running requests")


# %% [markdown]
# Each conversation runs in its own thread, one turn at a time. For every turn we also
# work out, from token ids alone, how much of its prompt the previous turn left in the
# cache (the whole pages of the tokens it computed that the new prompt starts with): if
# the response reports fewer `cached_tokens`, the difference was evicted in between and
# is computed again.

# %%
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def converse(questions: list[str]) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    turns, computed = [], []  # computed: the tokens whose KV the previous turn wrote
    for question in questions:
        messages.append({"role": "user", "content": question})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt)
        left = min(common_prefix(computed, ids), len(ids) - 1) // PAGE * PAGE
        out = engine.generate(prompt, PARAMS)
        turns.append({"prompt_tokens": len(ids), "left_cached": left, "cached": out["meta_info"]["cached_tokens"]})
        computed = ids + out["output_ids"][:-1]  # the last token is never fed back
        messages.append({"role": "assistant", "content": out["text"]})
    return turns


samples: list[dict] = []
done = threading.Event()


def sample(t0: float) -> None:
    while not done.is_set():
        info = engine.get_server_info()
        samples.append({"t": time.perf_counter() - t0, **{k: info[k] for k in (
            "free_pages", "evictable_pages", "locked_pages", "total_pages", "num_running_reqs",
            "num_waiting_reqs", "num_retractions")}})
        done.wait(0.05)


t0 = time.perf_counter()
sampler = threading.Thread(target=sample, args=(t0,))
sampler.start()
with ThreadPoolExecutor(len(CONVERSATIONS)) as pool:
    results = list(pool.map(converse, CONVERSATIONS))
done.set()
sampler.join()
print(f"{len(CONVERSATIONS)} conversations of {len(CONVERSATIONS[0])} turns in {time.perf_counter() - t0:.1f} s, "
      f"{len(samples)} samples")

# %% [markdown]
# ## The pool over time
#
# Private pages (orange) grow while requests run; when they finish their pages join the
# tree as evictable (green), and a turn that hits its conversation's prefix locks it (red)
# while it runs. Once the free pages (grey) run out, every new page is taken by evicting
# the least recently used cached prefix. Below: the running requests never exceed
# `max_running_requests`; the rest wait.

# %%
fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
plot_pool(samples, ax=top).set_xlabel("")
top.set_title(f"KV pool: {samples[0]['total_pages']} pages of {PAGE} tokens (max_total_tokens="
              f"{KNOBS['max_total_tokens']})", fontsize=10)
t = [s["t"] for s in samples]
bottom.step(t, [s["num_running_reqs"] for s in samples], where="post", label="running")
bottom.step(t, [s["num_waiting_reqs"] for s in samples], where="post", label="waiting")
bottom.axhline(KNOBS["max_running_requests"], color="black", lw=0.8, ls="--", label="max_running_requests")
bottom.set_ylabel("requests")
bottom.set_xlabel("time (s)")
bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
save_figure(fig, "memory_pool")
plt.show()

# %%
turns = [turn for conversation in results for turn in conversation]
later = [turn for conversation in results for turn in conversation[1:]]
left = sum(turn["left_cached"] for turn in later)
kept = sum(min(turn["cached"], turn["left_cached"]) for turn in later)
print(f"prompt tokens: {sum(t['prompt_tokens'] for t in turns)}, from the cache: {sum(t['cached'] for t in turns)}")
print(f"turns after the first: the previous turn left {left} of their tokens cached; "
      f"{kept} were still there, {left - kept} had been evicted and were computed again")
print(f"most running at once: {max(s['num_running_reqs'] for s in samples)}, "
      f"most waiting: {max(s['num_waiting_reqs'] for s in samples)}, "
      f"retractions: {samples[-1]['num_retractions']}")
engine.shutdown()

# %% [markdown]
# ## The three memory knobs
#
# **`--max-total-tokens`** sets the pool directly: `max_total_tokens // page_size` usable
# pages (plus page 0, the dummy page padded tokens write to). It must hold one request of
# `--context-length` tokens. The pool above is small on purpose: with a larger one the
# conversations' earlier turns would stay cached and nothing would be computed twice.
#
# **`--mem-fraction-static`** (default 0.85) is used when `--max-total-tokens` is not given
# and the device reports its memory (GPU, TPU): the weights, the KV pool and a 256 MiB
# workspace together take that fraction of the device's `bytes_limit`; the rest is left
# for activations, logits and the compiler. On CPU there are no memory statistics, so it
# changes nothing there: the pool is a fixed 1 GiB of KV, at most 65,536 tokens.
#
# **`--max-running-requests`** is how many requests decode together (the largest decode
# batch, and a compiled step shape). It does not size the pool; requests beyond it wait,
# as the plot shows. When running requests together need more pages than the pool can
# free, the scheduler retracts one (it goes back to waiting, its computed prefix cached).
#
# The pool sizes below come from `jaxserve.memory.size_kv_pool`, the function the engine
# sizes its pool with, fed this model's measured weight and per-token KV bytes.

# %%
weights, per_token = engine.pool.weights_bytes, engine.pool.kv_bytes_per_token
print(f"this model: weights {weights / 2**20:.0f} MiB, KV {per_token} bytes per token (all layers, K and V)\n")
print("--max-total-tokens      pages   KV MiB")
for tokens in (512, 4096, 32768):
    size = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=per_token, page_size=PAGE,
                        max_total_tokens=tokens, memory_stats=None)
    print(f"{tokens:>18}   {size.num_pages - 1:>7}   {size.kv_bytes / 2**20:>6.0f}")

device = {"bytes_limit": 16 << 30}  # a 16 GiB accelerator
print("\n--mem-fraction-static   KV tokens on a 16 GiB device")
for fraction in (0.5, 0.7, 0.85, 0.95):
    size = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=per_token, page_size=PAGE,
                        mem_fraction_static=fraction, memory_stats=device)
    print(f"{fraction:>21}   {size.max_total_tokens:>10}")
cpu = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=per_token, page_size=PAGE, memory_stats=None)
print(f"\non CPU (no memory stats), any fraction: {cpu.max_total_tokens} tokens ({cpu.source})")
