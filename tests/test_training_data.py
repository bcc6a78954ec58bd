"""Training data: SFT label masks token by token, pretrain packing, bad lines, lazy reading, the token cache."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.test_training_support import (
    conversation,
    sentences,
    tokenizer_dir,
    train,
    write_jsonl,
)
from training.chat_masks import normalise_messages, tokenize_conversation
from training.data import IGNORE, PretrainDataset, SFTDataset
from training.errors import TrainingError

TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
# One MiniMind JSONL line: system prompt with tools (as a JSON string, as upstream's files have it), a reasoning
# turn, a tool call (arguments as a JSON string), a tool result and a final answer.
CONVERSATION = [
    {"role": "system", "content": "be brief", "tools": json.dumps(TOOLS)},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four", "reasoning_content": "add them"},
    {"role": "user", "content": "weather in paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": json.dumps(
            [{"type": "function", "function": {"name": "weather", "arguments": {"city": "paris"}}}]
        ),
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "it is sunny"},
]
TOOL_CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call><|im_end|>\n'


def trained_runs(tokenizer, ids: list[int], trained: list[bool]) -> list[str]:
    """The decoded text of each maximal run of consecutive trained tokens."""
    runs, current = [], []
    for token, flag in zip(ids, trained):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize(
    "which, first_answer",
    [
        # the project's template: the reasoning is trained, the prompt's "<think>\n" is not
        ("ours", "add them\n</think>\n\nfour<|im_end|>\n"),
        ("minimind3-dense", "add them\n</think>\n\nfour<|im_end|>\n"),
        ("minimind2-dense", "four<|im_end|>\n"),  # MiniMind2's template does not render reasoning_content
    ],
)
def test_sft_masks_train_exactly_the_assistant_turns(which, first_answer, upstream_fixtures):
    folder = tokenizer_dir() if which == "ours" else upstream_fixtures / which
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    messages, tools = normalise_messages(CONVERSATION)
    assert tools == TOOLS and messages[4]["tool_calls"][0]["function"]["name"] == "weather"
    ids, trained = tokenize_conversation(tokenizer, messages, tools)
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert trained_runs(tokenizer, ids, trained) == [first_answer, TOOL_CALL, "it is sunny<|im_end|>\n"]
    # token by token: a token is trained iff it lies inside one of the assistant answers as rendered
    spans, cursor = [], 0
    for answer in (first_answer, TOOL_CALL, "it is sunny<|im_end|>\n"):
        start = rendered.index(answer, cursor)
        spans.append((start, start + len(answer)))
        cursor = start + len(answer)
    offset = 0
    for token, flag in zip(ids, trained):
        inside = any(lo <= offset < hi for lo, hi in spans)
        assert flag == inside, (offset, tokenizer.decode([token]))
        offset += len(tokenizer.decode([token], skip_special_tokens=False))
    assert offset == len(rendered)


def test_sft_dataset_targets_are_shifted_masked_and_truncated(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONVERSATION}, conversation(1)])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    dataset = SFTDataset([data], tokenizer, seq_len=4096, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 2
    messages, tools = normalise_messages(CONVERSATION)
    ids, trained = tokenize_conversation(tokenizer, messages, tools)
    item = dataset[0]
    assert item["input_ids"].tolist() == ids[:-1]
    expected = [token if flag else IGNORE for token, flag in zip(ids, trained)][1:]
    assert item["targets"].tolist() == expected
    short = SFTDataset([data], tokenizer, seq_len=16, cache_dir=str(tmp_path / "cache"))[0]
    assert short["input_ids"].tolist() == ids[:16] and short["targets"].tolist() == expected[:16]


def test_sft_reads_several_files_in_order(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(n) for n in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(n) for n in range(3, 8)])
    both = SFTDataset([a, b], tokenizer, seq_len=512, cache_dir=str(tmp_path / "cache"))
    alone = SFTDataset([b], tokenizer, seq_len=512, cache_dir=str(tmp_path / "cache"))
    assert len(both) == 8
    for n in range(5):
        assert torch.equal(both[3 + n]["input_ids"], alone[n]["input_ids"])


def test_pretrain_packs_documents_with_eos_between_them(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    docs = sentences(30)
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in docs])
    dataset = PretrainDataset([data], tokenizer, seq_len=16, cache_dir=str(tmp_path / "cache"))
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert dataset.num_tokens == len(stream)
    assert len(dataset) == (len(stream) - 1) // 16
    for index in range(len(dataset)):  # full windows, no padding, each target the next token of the stream
        item = dataset[index]
        assert item["input_ids"].tolist() == stream[index * 16 : index * 16 + 16]
        assert item["targets"].tolist() == stream[index * 16 + 1 : index * 16 + 17]
    # windows span several files too
    two = PretrainDataset([data, data], tokenizer, seq_len=16, cache_dir=str(tmp_path / "cache"))
    assert two.num_tokens == 2 * len(stream)
    joined = stream + stream
    middle = len(stream) // 16
    assert two[middle]["input_ids"].tolist() == joined[middle * 16 : middle * 16 + 16]


BAD_LINES = [
    ("pretrain", '{"text": "fine"}\n{"text": "broken\n', 2, "invalid JSON"),
    ("pretrain", '{"text": "fine"}\n\n{"body": "x"}\n', 3, 'expected a JSON object with a "text" field'),
    ("pretrain", '{"text": 5}\n', 1, '"text" must be a non-empty string'),
    ("pretrain", "[1, 2]\n", 1, 'expected a JSON object with a "text" field'),
    ("pretrain", b'{"text": "\xff\xfe"}\n', 1, "utf-8"),
    ("sft", '{"conversations": []}\n', 1, '"conversations" must be a non-empty list'),
    ("sft", '{"conversations": [{"role": "bot", "content": "x"}]}\n', 1, "conversations[0].role is 'bot'"),
    ("sft", '{"conversations": [{"role": "user", "content": "x"}]}\n', 1, "no assistant turn"),
    ("sft", '{"conversations": [{"role": "user", "content": ["x"]}]}\n', 1, "content must be a string"),
    ("sft", '{"conversations": [{"role": "assistant", "content": "a", "tool_calls": "{oops"}]}\n', 1, "not valid JSON"),
    # valid JSON, but a lone UTF-16 surrogate is not text: no tokenizer can encode it
    (
        "pretrain",
        '{"text": "fine"}\n{"text": "a\\ud800b"}\n',
        2,
        'field "text" holds a lone UTF-16 surrogate (\\ud800)',
    ),
    (
        "sft",
        '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\\udc00"}]}\n',
        1,
        'field "conversations[1].content" holds a lone UTF-16 surrogate (\\udc00)',
    ),
]


@pytest.mark.parametrize("stage, content, lineno, reason", BAD_LINES)
def test_a_bad_line_names_file_line_and_reason(tmp_path, stage, content, lineno, reason):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TrainingError) as err:
        train(tmp_path, stage, data_path=str(path), max_steps=1)
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: ") and reason in message, message
    assert "--skip-bad-lines" in message


def test_skip_bad_lines_skips_and_counts(tmp_path, caplog):
    good = [{"text": t} for t in sentences(20)]
    rows = good[:5] + ['{"text": "no end', '{"other": 1}'] + good[5:] + ['{"text": ""}', '{"text": "a\\ud800b"}']
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("WARNING", logger="minimind.train"):
        run = train(tmp_path, data_path=str(data), max_steps=1, skip_bad_lines=True)
    assert "skipped 4 bad line(s)" in caplog.text
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["bad_lines"] == 4.0
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    clean = PretrainDataset([write_jsonl(tmp_path / "clean.jsonl", good)], tokenizer, 16, cache_dir=str(tmp_path / "c"))
    skipped = PretrainDataset([data], tokenizer, 16, skip_bad_lines=True, cache_dir=str(tmp_path / "c"))
    assert skipped.num_tokens == clean.num_tokens and skipped.bad_lines == 4
    surrogate = '{"conversations": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "a"}]}'
    sft = write_jsonl(tmp_path / "s.jsonl", [conversation(1), '{"conversations": []}', surrogate, conversation(2)])
    assert SFTDataset([sft], tokenizer, 64, skip_bad_lines=True, cache_dir=str(tmp_path / "c")).bad_lines == 2
    # a valid surrogate pair is one character (U+1F600), not a bad line
    pair = write_jsonl(tmp_path / "pair.jsonl", ['{"text": "smile \\ud83d\\ude00"}'] + good)
    assert PretrainDataset([pair], tokenizer, 16, cache_dir=str(tmp_path / "c")).bad_lines == 0


def test_tokenizing_never_holds_the_file_in_memory(tmp_path):
    """Python-side peak memory while tokenizing does not grow with the file (streamed, in bounded batches),
    and the dataset reads tokens through memory maps."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    line = json.dumps({"text": "abc " * 250}) + "\n"  # ~1 kB
    peaks, sizes = [], []
    for lines in (500, 2500):
        path = tmp_path / f"data-{lines}.jsonl"
        path.write_text(line * lines)
        tracemalloc.start()
        dataset = PretrainDataset([path], tokenizer, 64, cache_dir=str(tmp_path / "cache"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sizes.append(path.stat().st_size)
    assert peaks[1] < 1.25 * peaks[0] and peaks[1] < sizes[1] / 2, (sizes, peaks)
    assert all(isinstance(array, np.memmap) for array in dataset.arrays)
    assert dataset[len(dataset) - 1]["input_ids"].shape == (64,)


def test_the_token_cache_is_reused_and_follows_the_file(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    data = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in sentences(20)])
    cache = tmp_path / "cache"
    first = PretrainDataset([data], tokenizer, 16, cache_dir=str(cache))
    built = sorted(cache.iterdir())
    assert len(built) == 1 and (built[0] / "meta.json").is_file()
    again = PretrainDataset([data], tokenizer, 16, cache_dir=str(cache))
    assert sorted(cache.iterdir()) == built and again.num_tokens == first.num_tokens
    write_jsonl(data, [{"text": t} for t in sentences(40)])  # changed file: tokenized again
    changed = PretrainDataset([data], tokenizer, 16, cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2 and changed.num_tokens > first.num_tokens
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_sft_needs_a_chat_template(tmp_path):
    tok = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(tok))
    (tok / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "s.jsonl", [conversation(1)])
    with pytest.raises(TrainingError, match="no chat_template"):
        train(tmp_path, "sft", data_path=str(data), tokenizer=str(tok))
