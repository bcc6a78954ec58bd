"""lm-evaluation-harness's `local-completions` against a live `minimind serve`, offline, with no tokenizer argument.

lm-eval finds /tokenizer_info and /tokenize on the server and tokenizes through it (its "remote" tokenizer),
so `model=` and `base_url=` are all it needs. The same multiple-choice task is then run with the tokenizer
given explicitly (a local Hugging Face directory): both runs must score every choice the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_server_support import main_server, needs_own_server, tiny_model_dir

pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

TASK = "minimind_offline_mc"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "red", "black"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Fahrenheit", "Rankine"], 0),
    ("The opposite of hot is", ["warm", "cold", "big", "loud"], 1),
    ("Two plus two equals", ["three", "five", "four", "one"], 2),
    ("A cat says", ["moo", "woof", "quack", "meow"], 3),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
]


def write_task(folder: Path) -> Path:
    """A multiple-choice task read from a local JSON-lines file (nothing comes from the Hub)."""
    folder.mkdir()
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


# Both evaluations in one process through lm-eval's Python API, with only this task indexed (the CLI indexes
# lm-eval's thousands of built-in tasks first, 15 s on two cores); the model_args strings are the CLI's.
SCRIPT = """
import json, logging, sys
import lm_eval
from lm_eval.tasks import TaskManager

logging.basicConfig(level=logging.INFO)  # lm-eval logs which tokenizer it chose
tasks, task, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
manager = TaskManager(include_path=tasks, include_defaults=False)
out = []
for model_args in runs:
    result = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[task], task_manager=manager, log_samples=True
    )
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    scores = [[float(logprob) for logprob, _ in s["filtered_resps"]] for s in samples]
    out.append({"metrics": result["results"][task], "scores": scores})
print("RESULTS " + json.dumps(out, default=str))
"""


def run_lm_eval(runs: list[str], tasks: Path, api_key: str, task: str = TASK) -> tuple[list[dict], str]:
    """local-completions with each model_args string; returns ([{metrics, scores per choice}], log)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OPENAI_API_KEY=api_key)
    env.update(HF_DATASETS_CACHE=str(tasks / "datasets-cache"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", SCRIPT, str(tasks), task, json.dumps(runs)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS ")), log


def test_local_completions_needs_no_tokenizer_argument(tmp_path):
    needs_own_server("compares with the tiny model's own tokenizer")
    server = main_server()
    tasks = write_task(tmp_path / "tasks")
    base = f"base_url={server.base_url}/completions"

    plain = f"model={server.model},{base}"  # what a user passes: no tokenizer
    explicit = f"{plain},tokenizer={tiny_model_dir()},tokenizer_backend=huggingface"
    (remote, local), log = run_lm_eval([plain, explicit], tasks, server.api_key)
    assert "Auto-detected remote tokenizer support" in log  # lm-eval chose the server's tokenizer by itself
    assert len(remote["scores"]) == len(QUESTIONS)
    for metric in ("acc,none", "acc_norm,none"):
        assert remote["metrics"][metric] == local["metrics"][metric]
    # the same score for every choice of every question: the same tokens reached the model
    for a, b in zip(remote["scores"], local["scores"]):
        assert a == pytest.approx(b, abs=1e-4)


# The same questions as an MMLU-style lettered task, in the layout `minimind eval mc` renders: the question,
# "A. choice" lines, "Answer:", and the letters " A", " B", ... as the scored continuations.
LETTERED_TASK = "minimind_offline_lettered"
LETTERED_YAML = (
    f"task: {LETTERED_TASK}\n"
    "dataset_path: json\n"
    "dataset_kwargs:\n  data_files:\n    test: {data}\n"
    "test_split: test\n"
    "output_type: multiple_choice\n"
    "doc_to_text: \"{{{{question.strip()}}}}\\n{{% for c in choices %}}{{{{ 'ABCD'[loop.index0] }}}}. {{{{c}}}}\\n"
    '{{% endfor %}}Answer:"\n'
    'doc_to_choice: ["A", "B", "C", "D"]\n'
    'doc_to_target: "{{{{answer}}}}"\n'
    "metric_list:\n  - metric: acc\n"
)


def test_lm_eval_and_minimind_eval_mc_agree(tmp_path):
    """lm-eval's local-completions and `minimind eval mc` score the same items the same way, against one server."""
    server = main_server()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / f"{LETTERED_TASK}.yaml").write_text(LETTERED_YAML.format(data=data))
    plain = f"model={server.model},base_url={server.base_url}/completions"
    (harness,), _ = run_lm_eval([plain], tasks, server.api_key, LETTERED_TASK)
    harness_picks = ["ABCD"[max(range(4), key=scores.__getitem__)] for scores in harness["scores"]]

    result_file = tmp_path / "minimind-eval.json"
    cmd = [sys.executable, "-m", "minimind", "eval", "mc", "--api-base", server.base_url, "--data", str(data)]
    env = dict(os.environ, OPENAI_API_KEY=server.api_key)
    done = subprocess.run([*cmd, "--json", str(result_file)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(result_file.read_text())

    assert [p["pick"] for p in ours["picks"]] == harness_picks
    assert ours["accuracy"] == pytest.approx(harness["metrics"]["acc,none"])
    assert ours["questions"] == len(QUESTIONS)
