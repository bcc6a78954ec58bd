"""The `agent` stage: GRPO whose rollouts call tools over several turns (tool-use RL, upstream's train_agent).

The prompts list the enabled tools (training/tools.py) through the chat template's `tools`, so the model sees
the same system turn as when it is served with `tools`. Each rollout is a trajectory: the model answers; when
its turn holds `<tool_call>` blocks (the template's format, read by models/tool_calls.py), the sandboxed
registry runs them and their results are appended as a tool turn rendered by the chat template, and the model
answers again, up to `max_turns` model turns or `max_seq_len` tokens. The first turn samples the G completions
of each prompt as one request (the prompt is prefilled once); later turns continue each trajectory from its
exact tokens, so the engine's log-probabilities stay those of the tokens trained.

Everything else is the grpo stage's: the rewards score the final turn (its text is the `completion`; the calls
made are `Sample.tool_calls`), advantages are normalised per group, and the loss is the grpo/cispo loss over
the tokens the model sampled, in every turn. Tool turns are context only: no loss on them (their targets are
-100), as for a prompt.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from models.tool_calls import parse_tool_calls
from training.config import TrainConfig
from training.grpo import GRPOStage
from training.rollout import Trajectory
from training.stages import StageContext
from training.tools import ToolRegistry, ToolResult

MARK = "<<answer>>"


class AgentStage(GRPOStage):
    name = "agent"
    save_name = "agent"

    def tools(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        self.registry = ToolRegistry(cfg.tools, cfg.tool_lookup_file, cfg.tool_timeout_s)
        return self.registry.schemas()

    def setup(self, context: StageContext) -> None:
        super().setup(context)
        tokenizer = context.tokenizer
        turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": MARK}]
        self.turn_end = tokenizer.apply_chat_template(turn, tokenize=False).split(MARK, 1)[1]  # "<|im_end|>\n"

    def tool_turn(self, sampled: list[int], results: list[ToolResult], tokenizer: Any) -> list[int]:
        """The tokens after a model turn that called tools: the end of that turn (less the end-of-turn token the
        model sampled itself), the results as tool messages, and the next assistant turn opened."""
        end = self.turn_end
        last = tokenizer.convert_ids_to_tokens(sampled[-1]) if sampled else ""
        if last and end.startswith(last):
            end = end[len(last) :]
        messages = [{"role": "tool", "content": r.output} for r in results]
        text = end + tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def rollout(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        seed = int(torch.randint(0, 2**62, ()))  # from the checkpointed RNG: a resumed run samples the same
        start = time.perf_counter()
        completions = self.engine.generate([item["prompt_ids"] for item in items], self.sampling_params(seed))
        rollout_s = time.perf_counter() - start
        trajectories = [Trajectory.start(c.prompt_index, items[c.prompt_index]["prompt_ids"]) for c in completions]
        waiting = list(range(len(trajectories)))  # the trajectories `completions` continue, in order
        for turn in range(1, cfg.max_turns + 1):
            going_on = []
            for k, completion in zip(waiting, completions):
                trajectory = trajectories[k]
                trajectory.add_model_turn(completion)
                _, calls = parse_tool_calls(completion.text)
                if not calls or turn == cfg.max_turns or completion.finish_reason == "length":
                    continue  # a final answer (or no room or turns left for another)
                results = [self.registry.run(call) for call in calls]
                trajectory.calls += results
                context = self.tool_turn(completion.token_ids, results, tokenizer)
                if len(trajectory.ids) + len(context) < cfg.max_seq_len:
                    trajectory.add_context(context)
                    going_on.append(k)
            if not going_on:
                break
            params = [
                self.sampling_params(
                    seed + turn * len(trajectories) + k,  # each trajectory its own stream
                    n=1,
                    max_tokens=min(cfg.max_completion_len, cfg.max_seq_len - len(trajectories[k].ids)),
                )
                for k in going_on
            ]
            start = time.perf_counter()
            completions = self.engine.generate([trajectories[k].ids for k in going_on], params)
            rollout_s += time.perf_counter() - start  # tool time is not rollout time
            waiting = going_on
        batch = self.scored_batch(trajectories, items, tokenizer, rollout_s)
        batch["tool_calls"] = torch.tensor([len(t.calls) for t in trajectories], dtype=torch.float32)
        batch["turns"] = torch.tensor([t.turns for t in trajectories], dtype=torch.float32)
        return batch

    def metrics(self, batch: dict[str, torch.Tensor], *args: Any) -> dict[str, torch.Tensor]:
        """grpo's, plus the mean tool calls and model turns per rollout."""
        values = super().metrics(batch, *args)
        weight = float(self.count(batch))
        for key in ("tool_calls", "turns"):
            values[key] = batch[key].mean().detach().float() * weight
        return values
