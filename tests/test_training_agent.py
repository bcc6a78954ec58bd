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
AGENT_MODEL = {**TINY_MODEL, "max_position_embeddings": 512}


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
                 max_seq_len=256, max_steps=80, lr=1e-2, min_lr_ratio=1.0, batch_size=4) / "final"  # fmt: skip
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
    assert (run / "final" / "model.safetensors").is_file()
