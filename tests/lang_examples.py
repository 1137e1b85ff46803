"""SGLang's frontend examples (few-shot QA, multi-turn chat, tip suggestion with fork,
choices, regex / JSON), written as SGLang programs are written. Only the import below says
which implementation runs them: `load_examples("sglang")` gives the same programs on top of
SGLang's own package."""

import jaxserve.lang as sgl

FEW_SHOT = """The following are questions with answers.
Q: What is the capital of France?
A: Paris
Q: What is the capital of Germany?
A: Berlin
Q: What is the capital of Italy?
A: Rome
"""


@sgl.function
def few_shot_qa(s, question):
    s += FEW_SHOT
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", temperature=0, max_tokens=8)


@sgl.function
def multi_turn_question(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=24, temperature=0))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=24, temperature=0))


@sgl.function
def tip_suggestion(s):
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a paragraph:\n"
        f += sgl.gen("detailed_tip", max_tokens=16, stop="\n\n", temperature=0)
    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary" + sgl.gen("summary", max_tokens=16, temperature=0)


@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + sgl.gen("expression", max_tokens=12, temperature=0)
    elif s["tool"] == "search engine":
        s += "The key word to search is" + sgl.gen("word", max_tokens=12, temperature=0)


@sgl.function
def regex_gen(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen(
        "answer",
        temperature=0,
        regex=r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)",
    )


CHARACTER_SCHEMA = """{
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "house": {"type": "string", "enum": ["Gryffindor", "Hufflepuff", "Ravenclaw", "Slytherin"]},
        "age": {"type": "integer"}
    },
    "required": ["name", "house", "age"],
    "additionalProperties": false
}"""


@sgl.function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=64, temperature=0, json_schema=CHARACTER_SCHEMA)


def load_examples(package: str):
    """This module's programs with `import jaxserve.lang as sgl` replaced by `import <package> as sgl`."""
    import types
    from pathlib import Path

    source = Path(__file__).read_text(encoding="utf-8").replace(
        "import jaxserve.lang as sgl", f"import {package} as sgl", 1)
    module = types.ModuleType(f"lang_examples_{package.replace('.', '_')}")
    exec(compile(source, __file__, "exec"), module.__dict__)
    return module
