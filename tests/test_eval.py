"""`minimind eval`: a tiny model trained here to memorise answers scores 100% on multiple choice, a random one
about chance; perplexity is lower on the training text than on random text; the same numbers come back through
a live server (`--api-base`, /v1/completions echo + logprobs); `eval chat` prints canned answers."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from evaluation.backends import LocalModel
from evaluation.mc import Question, format_example, read_questions
from minimind.cli import main
from tests.conftest import tiny_model
from tests.test_server_support import start_server

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "violin", "desert", "copper", "maple", "harbor", "quartz"]


def make_questions() -> list[Question]:
    """24 questions in two subjects, answers spread evenly over A-D (a model that always says A gets 25%)."""
    out = []
    for i in range(24):
        subject = "animals" if i < 12 else "colours"
        choices = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
        out.append(Question(subject, f"Question {i}: which word belongs to code {100 + 37 * i}?", choices, i % 4, ""))
    return out


def write_data(folder) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    questions = make_questions()
    with (folder / "animals.jsonl").open("w") as handle:
        for q in questions[:12]:
            row = {"question": q.question, "choices": q.choices, "answer": "ABCD"[q.answer]}
            handle.write(json.dumps(row) + "\n")
    with (folder / "colours_val.csv").open("w", newline="") as handle:  # C-Eval's layout and file naming
        writer = csv.writer(handle)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for n, q in enumerate(questions[12:]):
            writer.writerow([n, q.question, *q.choices, "ABCD"[q.answer]])
    return [folder / "animals.jsonl", folder / "colours_val.csv"]


def train_to_memorise(texts: list[str], tokenizer, steps: int = 150) -> torch.nn.Module:
    model = tiny_model(seed=1).train()
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row)
        targets[n, : len(row) - 1] = torch.tensor(row[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, f"the tiny model did not memorise its data (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, upstream_fixtures):
    root = tmp_path_factory.mktemp("eval")
    files = write_data(root / "mc")
    tokenizer = AutoTokenizer.from_pretrained(str(upstream_fixtures / "minimind2-dense"))
    texts = [format_example(q) for q in read_questions(files)]
    trained = train_to_memorise(texts, tokenizer)
    paths = {}
    for name, model in (("trained", trained), ("random", tiny_model(seed=0))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    with (root / "train.jsonl").open("w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    rng = random.Random(0)
    noise = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)) for _ in range(300))
    (root / "random.txt").write_text(noise)
    return root, files, paths


def run_json(capsys, tmp_path, *argv) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *argv, "--json", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_memorised_model_scores_100_percent(setup, tmp_path, capsys):
    root, files, paths = setup
    result = run_json(capsys, tmp_path, "mc", "--model", str(paths["trained"]), "--data", str(root / "mc"))
    assert result["accuracy"] == 1.0 and result["questions"] == 24
    assert result["subjects"] == {
        "animals": {"accuracy": 1.0, "questions": 12},
        "colours": {"accuracy": 1.0, "questions": 12},
    }


def test_random_model_scores_about_chance(setup, tmp_path, capsys):
    root, files, paths = setup
    argv = ["mc", "--model", str(paths["random"]), "--data", str(files[0]), "--data", str(files[1])]
    result = run_json(capsys, tmp_path, *argv)
    assert result["questions"] == 24 and 0.0 <= result["accuracy"] <= 0.6


def test_few_shot_leaves_the_examples_out(setup, tmp_path, capsys):
    root, files, paths = setup
    result = run_json(
        capsys, tmp_path, "mc", "--model", str(paths["trained"]), "--data", str(root / "mc"), "--shots", "2"
    )
    assert result["questions"] == 20 and result["shots"] == 2
    assert all(entry["questions"] == 10 for entry in result["subjects"].values())


def test_ppl_is_lower_on_training_text(setup, tmp_path, capsys):
    root, files, paths = setup
    model = str(paths["trained"])
    seen = run_json(capsys, tmp_path, "ppl", "--model", model, "--data", str(root / "train.jsonl"))
    unseen = run_json(
        capsys,
        tmp_path,
        "ppl",
        "--model",
        model,
        "--data",
        str(root / "random.txt"),
        "--window",
        "64",
        "--stride",
        "32",
    )
    assert seen["perplexity"] < 2.0 < 50 < unseen["perplexity"]
    assert unseen["tokens"] > 64  # several windows


def test_sliding_window_scores_every_token_once(setup):
    _, _, paths = setup
    model = LocalModel(str(paths["random"]))
    text = (setup[0] / "random.txt").read_text()[:600]
    n = len(model._encode(text))
    full = model.token_logprobs(text, window=n, stride=n)
    windowed = model.token_logprobs(text, window=48, stride=16)
    assert len(full) == len(windowed) == n - 1
    assert windowed[:47] == pytest.approx(full[:47], abs=1e-4)  # the first window has the same context


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": "C"}\n', "bad.jsonl:1: answer 'C' is outside"),
        ('{"question": "q", "answer": "A"}\n', "bad.jsonl:1: missing field 'choices'"),
    ],
)
def test_bad_mc_row_names_file_and_line(tmp_path, setup, capsys, content, message):
    _, _, paths = setup
    (tmp_path / "bad.jsonl").write_text(content)
    assert main(["eval", "mc", "--model", str(paths["random"]), "--data", str(tmp_path / "bad.jsonl")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_server_gives_the_same_scores(setup, tmp_path, capsys, monkeypatch):
    root, files, paths = setup
    server = start_server("--api-key", "eval-key", model=paths["trained"])
    monkeypatch.setenv("OPENAI_API_KEY", "eval-key")
    local = run_json(capsys, tmp_path, "mc", "--model", str(paths["trained"]), "--data", str(root / "mc"))
    remote = run_json(capsys, tmp_path, "mc", "--api-base", server.url, "--data", str(root / "mc"))
    assert remote["accuracy"] == 1.0 and [p["pick"] for p in remote["picks"]] == [p["pick"] for p in local["picks"]]
    local_ppl = run_json(capsys, tmp_path, "ppl", "--model", str(paths["trained"]), "--data", str(root / "train.jsonl"))
    remote_ppl = run_json(capsys, tmp_path, "ppl", "--api-base", server.base_url, "--data", str(root / "train.jsonl"))
    assert remote_ppl["tokens"] == local_ppl["tokens"]
    assert remote_ppl["perplexity"] == pytest.approx(local_ppl["perplexity"], rel=1e-3)
    assert main(["eval", "chat", "--api-base", server.url, "--stage", "pretrain", "--max-tokens", "6"]) == 0
    remote_chat = capsys.readouterr().out
    assert main(["eval", "chat", "--model", str(paths["trained"]), "--stage", "pretrain", "--max-tokens", "6"]) == 0
    local_chat = capsys.readouterr().out
    assert "[pretrain] The capital of France is" in local_chat and remote_chat == local_chat


def test_chat_smoke_prints_every_stage(setup, capsys):
    _, _, paths = setup
    assert main(["eval", "chat", "--model", str(paths["random"]), "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("[pretrain] ") == 4 and out.count("[sft] ") == 4


def test_model_or_api_base_is_required(capsys):
    assert main(["eval", "ppl", "--data", "x.txt"]) == 1
    assert "give exactly one of --model" in capsys.readouterr().err


def test_ppl_of_a_quantized_model_is_near_the_float_one(setup, tmp_path, capsys):
    """`eval ppl --quantization` scores the engine's int8/int4 layers: close to float on the memorised text, not
    equal (the weights really are rounded); a server is quantized at its own start, not from here."""
    root, files, paths = setup
    argv = ["ppl", "--model", str(paths["trained"]), "--data", str(root / "train.jsonl")]
    base = run_json(capsys, tmp_path, *argv)
    int8 = run_json(capsys, tmp_path, *argv, "--quantization", "int8")
    int4 = run_json(capsys, tmp_path, *argv, "--quantization", "int4")
    assert int8["model"].endswith("(int8)") and int8["tokens"] == base["tokens"]
    assert int8["perplexity"] != base["perplexity"]
    assert abs(int8["nll_per_token"] - base["nll_per_token"]) < 0.05
    assert int4["perplexity"] < 2 * base["perplexity"]
    assert main(["eval", "ppl", "--api-base", "http://127.0.0.1:9", "--data", "x", "--quantization", "int8"]) == 1
    assert "--quantization applies to --model" in capsys.readouterr().err
