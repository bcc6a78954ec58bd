"""Tokenizer training: fixed special ids, exact round trips, the chat template's renders, and bad data."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from minimind.cli import main
from models.tokenizer import TAG_TOKENS, TokenizerDataError, iter_texts, save_tokenizer, train_tokenizer

ZH = "天地玄黄宇宙洪荒日月盈昃辰宿列张我们今天学习语言模型的训练方法你好世界"
EN = "the quick brown fox jumps over lazy dog language model training data tokenizer".split()
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)\n", "import torch\n"]


def write_data(path, lines: int = 1500) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            text = rng.choice(
                [
                    "".join(rng.choice(ZH) for _ in range(rng.randint(5, 40))),
                    " ".join(rng.choice(EN) for _ in range(rng.randint(3, 20))),
                    rng.choice(CODE),
                ]
            )
            if i % 4 == 0:
                turns = [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": "ok", "reasoning_content": "想"},
                ]
                f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
            else:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_data(folder / "data.jsonl")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(folder / "data.jsonl"),
                "--vocab-size",
                "1000",
                "--out",
                str(folder / "out"),
            ]
        )
        == 0
    )
    return folder / "out"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_special_token_ids_and_files(tok, tokenizer_dir):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(TAG_TOKENS) == list(range(21, 27))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 12  # minimind-3's, so a MiniMind-V can use it
    assert len(tok) == 1000
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (tokenizer_dir / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气很好。",
        "The quick brown fox jumps over the lazy dog.",
        "def f(x):\n    return {'a': [1, 2]}\t# tab\n",
        "emoji 😀🚀 👩‍👩‍👧 and ☃︎ ÿ",
        "mixed 中文 English 123 <|im_start|>user\n<think>\nhm\n</think>\n\n<tool_call>{}</tool_call><|im_end|>",
    ],
)
def test_exact_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tags_are_single_tokens_that_survive_skip_special(tok):
    ids = tok.encode("<think>\nx\n</think>\n\nanswer<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<think>") and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>\n\nanswer"


def test_no_bos_added_to_plain_text(tok):
    assert tok("hello").input_ids == tok.encode("hello", add_special_tokens=False)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add"},
    {"role": "user", "content": "and 3+3?"},
]


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_multi_turn_with_reasoning(tok):
    assert render(tok, CONVERSATION, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_chat_template_thinking_switch(tok):
    messages = [{"role": "user", "content": "hi"}]
    assert render(tok, messages, add_generation_prompt=True, enable_thinking=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert render(tok, messages, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render(tok, messages) == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_reasoning_inside_content_is_split(tok):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]
    assert render(tok, messages).endswith("<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>\n")


def test_chat_template_tools_calls_and_results(tok):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 20}'},
    ]
    text = render(tok, messages, tools=tools, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_iter_texts_reads_both_line_kinds(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "a"}\n\n{"conversations": [{"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c", "reasoning_content": "r"}]}\n'
    )
    assert list(iter_texts(path)) == ["a", "b", "r", "c"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"d.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}\n', r"d.jsonl:1: expected"),
        ('{"conversations": [{"role": "user", "content": 5}]}\n', r"d.jsonl:1: each conversation turn"),
        ("", "no training text"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(TokenizerDataError, match=message):
        train_tokenizer(tmp_path / "d.jsonl", vocab_size=400)


def test_cli_errors(tmp_path, tokenizer_dir, capsys):
    assert main(["tokenizer", "train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", "x.jsonl", "--out", str(tokenizer_dir)]) == 1
    assert "already holds a tokenizer" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises(TokenizerDataError, match="too small"):
        save_tokenizer(train_tokenizer(tmp_path / "d.jsonl", vocab_size=100), tmp_path / "o")
