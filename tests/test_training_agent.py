"""Tool-use RL (the agent stage): the sandboxed tools, and multi-turn rollouts of a tiny model trained here to call
the calculator: the calls run, the results come back as tool turns the loss does not train, the engine's
log-probabilities equal the trainer's over every turn, and the final answers are rewarded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.test_training_support import TINY_MODEL, metrics, tokenizer_dir, train, write_jsonl
from training.data import IGNORE
from training.errors import TrainingError
from training.tools import Tool, ToolRegistry, evaluate
from training.tools import calculator as calculator_fn

SUMS = {"3+4": "7", "2*5": "10", "9-6": "3", "8+1": "9"}
AGENT_MODEL = {**TINY_MODEL, "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512}


def call(name: str, arguments: dict | str):
    from models.tool_calls import ParsedCall

    return ParsedCall(name, arguments if isinstance(arguments, str) else json.dumps(arguments))


def test_the_calculator_evaluates_arithmetic_and_refuses_everything_else():
    assert calculator_fn({"expression": "3 + 4 * (2 - 1)"}) == "7"
    assert calculator_fn({"expression": "7 / 2"}) == "3.5"
    assert calculator_fn({"expression": "2 ** 10 // 3 % 7"}) == str(2**10 // 3 % 7)
    assert calculator_fn({"expression": "-1.5e3"}) == "-1500"
    assert evaluate("1/3") == pytest.approx(1 / 3)
    registry = ToolRegistry(["calculator"])
    for expression, why in [
        ("__import__('os').system('true')", "not Call"),
        ("x + 1", "not Name"),
        ("[1, 2]", "not List"),
        ("9 ** 999999", "exponent above 64"),
        ("10.0 ** 60", "out of range"),
        ("1 / 0", "division by zero"),
        ("1 +" * 100, "longer than 200"),
        ("3 +", "not an arithmetic expression"),
    ]:
        result = registry.run(call("calculator", {"expression": expression}))
        assert not result.ok and why in result.output, (expression, result.output)
    assert registry.run(call("calculator", {"expr": "1"})).output.startswith('error: calculator takes {"expression"')
    assert registry.run(call("calculator", "{not json")).output == "error: arguments are not valid JSON"
    assert "unknown tool 'search'" in registry.run(call("search", {})).output
    good = registry.run(call("calculator", {"expression": "6*7"}))
    assert good.ok and good.output == "42"


def test_lookup_reads_one_local_json_file_and_tools_are_time_limited(tmp_path):
    table = tmp_path / "capitals.json"
    table.write_text(json.dumps({"France": "Paris", "numbers": [1, 2]}))
    registry = ToolRegistry(["calculator", "lookup"], str(table), timeout_s=0.2)
    assert [s["function"]["name"] for s in registry.schemas()] == ["calculator", "lookup"]
    assert registry.run(call("lookup", {"key": "France"})).output == "Paris"
    assert registry.run(call("lookup", {"key": "numbers"})).output == "[1, 2]"
    assert registry.run(call("lookup", {"key": "Spain"})).output == "error: no entry for 'Spain'"
    registry.tools["slow"] = Tool("slow", "sleeps", {"type": "object"}, lambda arguments: time.sleep(5) or "late")
    start = time.monotonic()
    result = registry.run(call("slow", {}))
    assert result.output == "error: timed out after 0.2 s" and time.monotonic() - start < 2
    with pytest.raises(TrainingError, match="tool_lookup_file: is empty"):
        ToolRegistry(["lookup"])
    with pytest.raises(TrainingError, match="cannot read it"):
        ToolRegistry(["lookup"], str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(TrainingError, match="expected a JSON object"):
        ToolRegistry(["lookup"], str(tmp_path / "list.json"))
    with pytest.raises(TrainingError, match="tools: web; choose from calculator, lookup"):
        ToolRegistry(["web"])


def test_the_tool_call_reward_checks_validity():
    from training.rewards import Sample, tool_call_validity
    from training.tools import ToolResult

    def sample(text, calls=()):
        return Sample([], None, text, tool_calls=list(calls))

    assert tool_call_validity(sample('<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>')) == 1
    assert tool_call_validity(sample("<tool_call>{broken</tool_call>")) == 0
    assert tool_call_validity(sample("no call")) == 0
    assert tool_call_validity(sample("7", [ToolResult("calculator", "{}", "7", True)])) == 1
    assert tool_call_validity(sample("7", [ToolResult("x", "{}", "error: unknown tool", False)])) == 0


# ---- multi-turn rollouts ----------------------------------------------------------------------------------------


def tool_conversation(expression: str, value: str) -> list[dict]:
    return [
        {"role": "user", "content": expression},
        {"role": "assistant", "content": "", "tool_calls": [
            {"name": "calculator", "arguments": {"expression": expression}}]},
        {"role": "tool", "content": value},
        {"role": "assistant", "content": value},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def caller(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny model trained to answer 'A+B' by calling the calculator and then repeating its result, with a
    tokenizer that knows the template's tool text (so the tools' system turn is ~170 tokens, not ~570)."""
    from models.loader import load_tokenizer
    from models.tokenizer import save_tokenizer, train_tokenizer
    from tests.test_training_support import sentences
    from training.tools import calculator_tool

    tmp = tmp_path_factory.mktemp("agent")
    tools = [calculator_tool().schema()]
    base_tokenizer = load_tokenizer(tokenizer_dir())
    texts = [base_tokenizer.apply_chat_template(tool_conversation(e, v), tools=tools, tokenize=False)
             for e, v in SUMS.items()]  # fmt: skip
    corpus = write_jsonl(tmp / "corpus.jsonl", [{"text": t} for t in texts * 20 + sentences(200)])
    tokenizer = save_tokenizer(train_tokenizer(corpus, vocab_size=600), tmp / "tokenizer")
    rows = [{"conversations": [{**turn, "tools": tools} if n == 0 else turn
                               for n, turn in enumerate(tool_conversation(e, v))]} for e, v in SUMS.items()]  # fmt: skip
    sft = write_jsonl(tmp / "sft.jsonl", rows)
    base = train(tmp, "sft", data_path=str(sft), tokenizer=str(tokenizer), model_config=AGENT_MODEL,
                 max_seq_len=256, max_steps=120, lr=1e-2, min_lr_ratio=1.0, batch_size=4) / "final"  # fmt: skip
    prompts = [{"messages": [{"role": "user", "content": e}], "answer": v} for e, v in SUMS.items()]
    return base, write_jsonl(tmp / "rl.jsonl", prompts), tokenizer


AGENT_FLAGS = dict(max_seq_len=320, max_completion_len=40, num_generations=4, batch_size=4, max_turns=3,
                   rollout_temperature=0.5, rewards={"numeric_match": 1.0, "tool_call": 0.2}, beta=0.0)  # fmt: skip


def test_rollouts_call_the_calculator_and_the_loss_skips_the_tool_turns(tmp_path, caller):
    from models.loader import load_model
    from training.agent import AgentStage
    from training.config import TrainConfig
    from training.grpo import completion_logps
    from training.stages import StageContext

    base, data, _ = caller
    cfg = TrainConfig(stage="agent", init_from=str(base), data_path=str(data), device="cpu", **AGENT_FLAGS)
    model, tokenizer = load_model(base)
    stage = AgentStage()
    dataset = stage.build_dataset(cfg, tokenizer)
    stage.setup(StageContext(model, cfg, tokenizer, torch.device("cpu"), None, dataset))
    torch.manual_seed(0)
    batch = stage.rollout([dataset[i] for i in range(4)], tokenizer)
    assert batch["tool_calls"].mean() >= 0.5 and batch["turns"].max() >= 2
    assert batch["reward/numeric_match"].mean() > 0  # some final answers are right
    called = int(batch["tool_calls"].argmax())
    trained = batch["targets"][called][batch["targets"][called] != IGNORE]
    text = tokenizer.decode(trained.tolist())
    assert "<tool_call>" in text
    everything = tokenizer.decode(batch["input_ids"][called].tolist())
    assert "<tool_response>" in everything and "<tool_response>" not in text  # read, not trained
    # the trained tokens are exactly the sampled ones: the engine's log-probabilities equal the trainer's over
    # every turn (the condition for the importance ratio to be right)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    logps = completion_logps(logits, batch["targets"], cfg.rollout_temperature)
    mask = batch["targets"] != IGNORE
    assert torch.allclose(logps[mask], batch["old_logps"][mask], atol=1e-4)


def test_the_agent_stage_trains_on_rewarded_tool_calls(tmp_path, caller):
    base, data, tokenizer = caller
    run = train(tmp_path, "agent", init_from=str(base), data_path=str(data), tokenizer=str(tokenizer), max_steps=3,
                lr=1e-3, model_config=AGENT_MODEL, **AGENT_FLAGS)  # fmt: skip
    rows = metrics(run)
    assert rows[1]["tool_calls"] > 0.5 and rows[1]["turns"] > 1.5
    assert rows[1]["reward/tool_call"] > 0.5 and rows[1]["reward/numeric_match"] > 0
    assert rows[1]["rollout_tokens_per_s"] > 0
    assert (run / "final" / "model.safetensors").is_file()


def test_sigkill_mid_agent_then_resume_equals_an_uninterrupted_run(tmp_path, caller):
    """Multi-turn rollouts, tool calls and the reference included: the resumed run samples, calls and trains
    exactly as the run never stopped."""
    from tests.test_training_align_resume import run_killed_and_resumed

    base, data, tokenizer = caller
    # no dropout: this model is so sure of its calls that dropping units makes log-ratios to the reference explode
    flags = dict(max_steps=12, save_every=5, keep_last=2, lr=1e-3, beta=0.04, grad_accum=2)
    run_killed_and_resumed(tmp_path, "agent", data, init_from=str(base), tokenizer=str(tokenizer),
                           model_config=AGENT_MODEL, **{**AGENT_FLAGS, **flags})  # fmt: skip


# ---- minimind eval toolcall ---------------------------------------------------------------------------------------


def toolcall_cases(path: Path) -> Path:
    from training.tools import calculator_tool

    tools = [calculator_tool().schema()]
    rows = [
        {"prompt": e, "tools": tools, "expected_call": {"name": "calculator", "arguments": {"expression": e}},
         "tool_result": v, "answer": v}
        for e, v in SUMS.items()
    ]  # fmt: skip
    rows.append({"prompt": "3+4", "tools": tools, "expected_call": {"name": "lookup"}})  # a wrong tool: not correct
    rows.append(
        {"prompt": "2*5", "tools": tools, "expected_call": {"name": "calculator"}, "tool_result": "11", "answer": "11"}
    )  # fmt: skip   (the answer follows the tool's result, not the model's memory)
    return write_jsonl(path, rows)


def test_eval_toolcall_in_process_and_against_a_live_server_agree(tmp_path, caller, capsys, monkeypatch):
    from minimind.cli import main
    from tests.test_server_support import start_server

    base, _, _ = caller
    cases = toolcall_cases(tmp_path / "cases.jsonl")
    local_file, remote_file = tmp_path / "local.json", tmp_path / "remote.json"
    assert main(["eval", "toolcall", "--model", str(base), "--data", str(cases), "--json", str(local_file)]) == 0
    printed = capsys.readouterr().out
    local = json.loads(local_file.read_text())
    assert local["cases"] == 6 and f"call_accuracy\t{local['call_accuracy']:.4f}" in printed
    for expression, row in zip(SUMS, local["results"]):  # the scorer: right tool, arguments equal as JSON
        assert row["call_correct"] == (row["calls"][:1] == [["calculator", json.dumps({"expression": expression})]])
    assert sum(row["call_correct"] for row in local["results"][:4]) >= 2  # the trained model mostly calls right
    assert local["results"][4]["call_correct"] is False and "answer_correct" not in local["results"][4]
    assert local["call_accuracy"] >= 3 / 6 and local["answer_accuracy"] >= 3 / 5
    server = start_server("--api-key", "tool-key", "--max-model-len", "512", model=base)
    monkeypatch.setenv("OPENAI_API_KEY", "tool-key")
    assert main(["eval", "toolcall", "--api-base", server.url, "--data", str(cases), "--json", str(remote_file)]) == 0
    remote = json.loads(remote_file.read_text())
    for mine, theirs in zip(local["results"], remote["results"]):
        assert (mine["calls"], mine["reply"]) == (theirs["calls"], theirs["reply"])
    assert remote["call_accuracy"] == local["call_accuracy"] and remote["answer_accuracy"] == local["answer_accuracy"]


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "cases.jsonl:1: invalid JSON"),
        ('{"prompt": "hi"}', 'nothing to check; give "expected_call", "answer" or both'),
        ('{"prompt": "hi", "expected_call": {"arguments": {}}}', '"expected_call" must be {"name"'),
        ('{"prompt": "hi", "tools": {"a": 1}, "answer": "1"}', '"tools" must be a list of OpenAI tool objects'),
    ],
)
def test_bad_toolcall_cases_name_the_line(tmp_path, capsys, line, message):
    from minimind.cli import main

    cases = write_jsonl(tmp_path / "cases.jsonl", [line])
    assert main(["eval", "toolcall", "--model", str(tmp_path), "--data", str(cases)]) == 1
    assert message in capsys.readouterr().err
