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
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the frontend language
#
# `jaxserve.lang` is SGLang's frontend language: an LLM program is a Python function that
# appends text, `gen`s and `select`s to a state `s`. Programs written for SGLang run by
# changing only the import. The runtime makes them fast by sharing prefixes: it prefills a
# shared prefix once before `fork` and before `run_batch`, and every step's `meta_info`
# shows how many prompt tokens came from the radix cache (`cached_tokens`).
#
# This tour runs on the bundled SmolLM2-135M-Instruct, in process (`EngineBackend`);
# `sgl.RuntimeEndpoint(url)` runs the same programs against a server.

# %%
import json

import matplotlib.pyplot as plt

import jaxserve
import jaxserve.lang as sgl
from jaxserve.viz import draw_radix_tree, save_figure

engine = jaxserve.Engine(max_running_requests=16, max_prefill_tokens=128, chunked_prefill_size=128, context_length=1024,
                         max_total_tokens=16384)
sgl.set_default_backend(sgl.EngineBackend(engine))
steps = []  # (step, prompt tokens, cached tokens) for the plot at the end


def record(label, meta):
    steps.append((label, meta["prompt_tokens"], meta["cached_tokens"]))
    return f"{label}: {meta['prompt_tokens']} prompt tokens, {meta['cached_tokens']} from the cache"


# %% [markdown]
# ## Multi-turn chat
# Roles render through the model's own chat template, so the state's text is exactly what
# the template makes of `s.messages()`. The second turn finds the first in the cache.

# %%
@sgl.function
def multi_turn(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant. Answer in one sentence.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=24, temperature=0))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=24, temperature=0))


state = multi_turn.run(question_1="What is the capital of France?", question_2="And what river runs through it?")
for m in state.messages():
    print(f"{m['role']:>9}: {m['content']}")
print(record("chat turn 1", state.get_meta_info("answer_1")))
print(record("chat turn 2", state.get_meta_info("answer_2")))
assert state.text() == engine.tokenizer.apply_chat_template(state.messages(), add_generation_prompt=False)

# %% [markdown]
# ## `fork`: parallel branches
# The branches continue from the same text. `fork` prefills it once, so every branch's
# request finds the shared prefix in the radix cache.

# %%
@sgl.function
def tip_suggestion(s):
    s += "Here are three tips for staying healthy: 1. Balanced diet. 2. Regular exercise. 3. Enough sleep.\n\n"
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a short paragraph:\n"
        f += sgl.gen("tip", max_tokens=24, stop="\n\n", temperature=0)
    forks.join()
    s["tip_meta"] = [f.get_meta_info("tip") for f in forks]
    s += "Tips:\n" + "".join(f"{i + 1}. {t.strip()}\n" for i, t in enumerate(s["tip"]))


state = tip_suggestion.run()
print(state.text())
for i, meta in enumerate(state["tip_meta"]):
    print(record(f"fork branch {i + 1}", meta))

# %% [markdown]
# ## `select` and constrained `gen`
# `select` scores every choice from input logprobs in one batched prefill-only request;
# `regex`, `json_schema` and `dtype` constrain what `gen` may write.

# %%
@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.select("tool", choices=["calculator", "search engine", "dictionary"]) + ". "
    s += "Answer: " + sgl.gen("answer", dtype=int, max_tokens=6)


state = tool_use.run(question="What is 12 times 12", temperature=0)
print(state.text())
print("tool:", state["tool"], "| answer:", state["answer"], type(state["answer"]).__name__)
print("scores:", [round(x, 3) for x in state.get_meta_info("tool")["normalized_prompt_logprobs"]])

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 16}}}


@sgl.function
def profile(s):
    s += "A made-up person as JSON: " + sgl.gen("person", json_schema=json.dumps(PERSON), max_tokens=48)
    s += "\nTheir phone number: " + sgl.gen("phone", regex=r"\(\d{3}\) \d{3}-\d{4}")


state = profile.run(temperature=0)
print(json.loads(state["person"]), state["phone"])

# %% [markdown]
# ## `run_batch`
# A batch traces the program for the text every run starts with, prefills it once, then
# sends all programs at once so they share one continuous batch.

# %%
FEW_SHOT = "".join(f"Q: What is the capital of {c}?\nA: {a}\n" for c, a in [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Egypt", "Cairo")])


@sgl.function
def capital(s, country):
    s += FEW_SHOT + f"Q: What is the capital of {country}?\nA:"
    s += sgl.gen("answer", max_tokens=6, stop="\n", temperature=0)


countries = ["Spain", "Portugal", "Greece", "Poland", "Norway", "Sweden", "Kenya", "Peru",
             "Chile", "Canada", "India", "China", "Brazil", "Mexico", "Turkey", "Austria"]
states = capital.run_batch([{"country": c} for c in countries], progress_bar=True)
for c, st in zip(countries, states):
    print(f"{c:>9} -> {st['answer'].strip():<12} cached {st.get_meta_info('answer')['cached_tokens']}")
for c, st in list(zip(countries, states))[:4]:
    record(f"batch: {c}", st.get_meta_info("answer"))

# %% [markdown]
# ## Where the prompt tokens came from
# Prompt tokens of each step, and how many of them the radix cache already held.

# %%
labels, prompt, cached = zip(*steps)
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.barh(labels, prompt, color="#ddd", label="prompt tokens")
ax.barh(labels, cached, color="#2a7", label="from the radix cache")
ax.invert_yaxis()
ax.set_xlabel("tokens")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
save_figure(fig, "lang_tour_cached_tokens")
plt.show()

# %%
fig, ax = plt.subplots(figsize=(10, 5))
draw_radix_tree(engine.radix_tree(), ax=ax)
save_figure(fig, "lang_tour_radix_tree")
plt.show()

# %%
engine.shutdown()
