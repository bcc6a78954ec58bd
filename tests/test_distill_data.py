"""`minimind data distill`: a teacher (in-process engine or a live OpenAI-compatible server) answers prompts into
SFT conversations that training/data.py reads; resumable; bad prompt files name FILE:LINE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from minimind.cli import main
from tests.conftest import tiny_model
from tests.test_server_support import start_server
from training.chat_masks import normalise_messages, tokenize_conversation

# Sampled with a seed: the tiny random model's greedy answer is only newlines, which would prove little.
SEEDED = ["--temperature", "1.0", "--top-p", "1.0", "--seed", "7", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, upstream_fixtures) -> str:
    """A tiny random MiniMind (a seed whose greedy answers are not just whitespace) + the minimind3 tokenizer."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    tiny_model(seed=3).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind3-dense")).save_pretrained(path)
    return str(path)


def write_prompts(path, lines: list) -> None:
    path.write_text("".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n" for x in lines))


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seeded_answers(model_dir: str, conversations: list[list[dict]], **template) -> list[str]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(model_dir, device="cpu")
    outs = llm.chat(
        conversations,
        SamplingParams(temperature=1.0, top_p=1.0, seed=7, max_tokens=8),
        chat_template_kwargs=template or None,
    )
    return [o.outputs[0].text for o in outs]


def test_local_teacher_writes_trainable_conversations(tmp_path, model_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    write_prompts(prompts, [{"prompt": "你好"}, {"messages": messages}, "", {"prompt": "Name a colour."}])
    out = tmp_path / "distill.jsonl"
    argv = ["data", "distill", "--teacher", model_dir, "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, *SEEDED, "--device", "cpu", "--batch-size", "2", "--no-thinking"]) == 0
    assert "wrote 3 conversations" in capsys.readouterr().out
    records = read_out(out)
    asked = [[{"role": "user", "content": "你好"}], messages, [{"role": "user", "content": "Name a colour."}]]
    assert [r["conversations"][:-1] for r in records] == asked
    expected = seeded_answers(model_dir, asked, enable_thinking=False, open_thinking=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for record, text in zip(records, expected):
        answer = record["conversations"][-1]
        assert answer["role"] == "assistant" and answer["content"] == text and "reasoning_content" not in answer
        ids, trained = tokenize_conversation(tokenizer, *normalise_messages(record["conversations"]))
        assert any(trained) and len(ids) == len(trained)


def test_thinking_teacher_fills_reasoning_content(tmp_path, model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\n")
    out = tmp_path / "distill.jsonl"
    argv = ["data", "distill", "--teacher", model_dir, "--prompts", str(prompts), "--out", str(out), "--thinking"]
    assert main([*argv, *SEEDED, "--device", "cpu"]) == 0
    (record,) = read_out(out)
    answer = record["conversations"][-1]
    # The template opens <think>, 8 tokens do not close it: all of it is reasoning (split_reasoning's rule).
    (text,) = seeded_answers(model_dir, [record["conversations"][:-1]], enable_thinking=True, open_thinking=True)
    assert answer["reasoning_content"] == text.strip("\n") and answer["content"] == ""


def test_resume_skips_answered_prompts(tmp_path, model_dir, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "distill.jsonl"
    prompts.write_text("one\ntwo\n")
    argv = ["data", "distill", "--teacher", model_dir, "--prompts", str(prompts), "--out", str(out), *SEEDED]
    assert main([*argv, "--device", "cpu"]) == 0
    first = out.read_text()
    with out.open("a") as handle:
        handle.write('{"conversations": [{"role": "user", "con')  # a run killed mid-write
    prompts.write_text("one\ntwo\nthree\none\n")
    capsys.readouterr()
    assert main([*argv, "--device", "cpu"]) == 0
    assert "wrote 1 conversations" in capsys.readouterr().out
    records = read_out(out)
    assert out.read_text().startswith(first)
    assert [r["conversations"][0]["content"] for r in records] == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ('{"text": "x"}', 'no non-empty "prompt"'),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "last message must be a user turn"),
    ],
)
def test_bad_prompt_line_names_file_and_line(tmp_path, capsys, line, reason):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    out = tmp_path / "distill.jsonl"
    code = main(["data", "distill", "--teacher", "no-such-model", "--prompts", str(prompts), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert f"{prompts}:3:" in err and reason in err
    assert not out.exists()


def test_server_teacher_matches_the_engine(tmp_path, model_dir, monkeypatch, capsys):
    server = start_server("--api-key", "distill-key", model=Path(model_dir))
    monkeypatch.setenv("OPENAI_API_KEY", "distill-key")
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [{"prompt": "hello"}, {"prompt": "What is 2+2?"}, {"prompt": "Name a colour."}])
    out = tmp_path / "distill.jsonl"
    argv = ["data", "distill", "--teacher", server.url, "--prompts", str(prompts), "--out", str(out)]
    assert main([*argv, *SEEDED, "--batch-size", "2", "--no-thinking"]) == 0
    records = read_out(out)
    assert [r["conversations"][0]["content"] for r in records] == ["hello", "What is 2+2?", "Name a colour."]
    asked = [r["conversations"][:-1] for r in records]
    expected = seeded_answers(model_dir, asked, enable_thinking=False, open_thinking=False)
    assert [r["conversations"][-1]["content"] for r in records] == expected
    capsys.readouterr()
    assert main([*argv, *SEEDED]) == 0  # everything is there: nothing is asked again
    assert "wrote 0 conversations" in capsys.readouterr().out and len(read_out(out)) == 3


def test_teacher_and_student_answers_become_dpo_pairs(tmp_path, model_dir, upstream_fixtures, capsys):
    """The offline DPO demo: two models answer the same prompts, `data pairs` joins them (teacher = chosen),
    and the dpo stage's dataset reads the result."""
    from training.data_preference import PreferenceDataset

    prompts = tmp_path / "prompts.txt"
    write_prompts(prompts, ["What is a cat?", "Name a colour.", "Say hello."])
    for name, seed in (("teacher", "7"), ("student", "8")):
        args = ["data", "distill", "--teacher", model_dir, "--prompts", str(prompts), "--out", str(tmp_path / name)]
        assert main([*args, *SEEDED[:-3], seed, "--max-tokens", "8"]) == 0
    teacher, student = read_out(tmp_path / "teacher"), read_out(tmp_path / "student")
    # One prompt answered alike by both, and one only the teacher answered: both are left out.
    student[1]["conversations"][-1]["content"] = teacher[1]["conversations"][-1]["content"]
    (tmp_path / "student").write_text("".join(json.dumps(row) + "\n" for row in student[:2]))
    out = tmp_path / "dpo.jsonl"
    assert main(["data", "pairs", "--chosen", str(tmp_path / "teacher"), "--rejected", str(tmp_path / "student"),
                 "--out", str(out)]) == 0  # fmt: skip
    assert "wrote 1 pairs" in capsys.readouterr().out
    pairs = read_out(out)
    assert pairs == [{"chosen": teacher[0]["conversations"], "rejected": student[0]["conversations"]}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = PreferenceDataset([out], tokenizer, 256, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 1


def test_pairs_name_a_bad_answer_file_and_line(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"conversations": [{"role": "user", "content": "q"}]}) + "\n")
    assert main(["data", "pairs", "--chosen", str(good), "--rejected", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert f"{bad}:2: not a conversation ending with an assistant turn" in capsys.readouterr().err
