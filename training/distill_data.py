"""Black-box distillation data: a teacher answers a list of prompts and each answer becomes one SFT
conversation (`{"conversations": [..., {"role": "assistant", "content", "reasoning_content"?}]}`, the shape
training/data.py reads), appended to OUT.

The teacher is any checkpoint the native engine loads (run in this process) or any OpenAI-compatible server
(a URL). OUT is appended batch by batch, so an interrupted run is resumed by running the same command again:
prompts whose conversation is already in OUT are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.reasoning import reasoning_opened_by_prompt, split_reasoning
from training.errors import TrainingError

Messages = list[dict[str, Any]]


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024
    thinking: bool | None = None  # None: the chat template's default
    seed: int | None = None  # each request's own sampling seed: the same seed gives the same answers

    def template_kwargs(self) -> dict[str, Any] | None:
        if self.thinking is None:
            return None
        return {"enable_thinking": self.thinking, "open_thinking": self.thinking}


class Teacher(Protocol):
    def answer(self, conversations: list[Messages], sampling: Sampling) -> list[tuple[str | None, str]]:
        """(reasoning or None, content) for each conversation, in order."""


def read_prompts(path: Path) -> Iterator[tuple[int, Messages]]:
    """(line number, messages ending with a user turn) per prompt. A `.jsonl` file holds {"prompt": str} or
    {"messages": [...]} objects; any other file is plain text, one prompt per non-empty line."""
    if not path.is_file():
        raise TrainingError(f"prompt file {path} not found")
    as_jsonl = path.suffix in (".jsonl", ".json")
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise TrainingError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line:
                continue
            if not as_jsonl:
                yield lineno, [{"role": "user", "content": line}]
                continue
            try:
                yield lineno, _messages_of(json.loads(line))
            except (ValueError, TypeError) as err:
                reason = f"invalid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
                raise TrainingError(
                    f'{path}:{lineno}: {reason}; each line must be {{"prompt": "..."}} or '
                    f'{{"messages": [{{"role": "user", "content": "..."}}]}}'
                ) from None


def _messages_of(record: Any) -> Messages:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('no non-empty "prompt" string or "messages" list')
    for n, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{n}] must be an object with role system, user or assistant")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"messages[{n}].content must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be a user turn (the teacher answers it)")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def prompt_key(messages: Messages) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def done_prompts(out: Path) -> set[str]:
    """Keys of the prompts already answered in OUT. A last line cut off mid-write (no newline) is removed."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    done = set()
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            turns = json.loads(raw)["conversations"]
            done.add(prompt_key([t for t in turns[:-1]]))
        except (ValueError, KeyError, TypeError, IndexError):
            raise TrainingError(
                f"{out}:{lineno}: not a conversation written by this command; choose another --out file"
            ) from None
    return done


def conversation_record(messages: Messages, reasoning: str | None, content: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        answer["reasoning_content"] = reasoning
    return {"conversations": [*messages, answer]}


class LocalTeacher:
    """A checkpoint on the native engine in this process; a batch is one continuously batched `LLM.chat`."""

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None, tokenizer: Any = None):
        from engine.llm import LLM

        self.llm = LLM(model, device=device, dtype=dtype, tokenizer=tokenizer)

    def answer(self, conversations: list[Messages], sampling: Sampling) -> list[tuple[str | None, str]]:
        from engine.sampling_params import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=sampling.seed
        )
        outputs = self.llm.chat(conversations, params, chat_template_kwargs=sampling.template_kwargs())
        return [
            split_reasoning(out.outputs[0].text, opened=reasoning_opened_by_prompt(out.prompt or "")) for out in outputs
        ]


class ApiTeacher:
    """An OpenAI-compatible chat completions endpoint; a batch is sent as that many concurrent requests."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None, batch_size: int = 8):
        import openai

        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)
        self.pool = ThreadPoolExecutor(max_workers=max(1, batch_size))
        try:
            self.model = model or self.client.models.list().data[0].id
        except (openai.OpenAIError, IndexError) as err:
            raise TrainingError(
                f"{base_url}: cannot list the served models ({err}); pass --teacher-model NAME"
            ) from err

    def _one(self, messages: Messages, sampling: Sampling) -> tuple[str | None, str]:
        import openai

        kwargs = sampling.template_kwargs()
        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                extra_body={"chat_template_kwargs": kwargs} if kwargs else None,
            )
        except openai.OpenAIError as err:
            raise TrainingError(f"teacher request failed: {err}") from err
        message = reply.choices[0].message
        reasoning = getattr(message, "reasoning_content", None) or (message.model_extra or {}).get("reasoning_content")
        content = message.content or ""
        if reasoning is None:  # a server that leaves <think> inline in the content
            reasoning, content = split_reasoning(content)
        return reasoning, content

    def answer(self, conversations: list[Messages], sampling: Sampling) -> list[tuple[str | None, str]]:
        return list(self.pool.map(lambda m: self._one(m, sampling), conversations))


def make_teacher(teacher: str, *, batch_size: int, teacher_model: str | None = None, **local: Any) -> Teacher:
    if teacher.startswith(("http://", "https://")):
        import os

        return ApiTeacher(teacher, model=teacher_model, api_key=os.environ.get("OPENAI_API_KEY"), batch_size=batch_size)
    return LocalTeacher(teacher, **local)


def distill(
    teacher: Teacher, prompts: Path, out: Path, *, sampling: Sampling, batch_size: int = 8, progress: bool = True
) -> tuple[int, int]:
    """Answer every prompt of PROMPTS not yet in OUT; returns (answered now, skipped as already done)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise TrainingError(f"--batch-size must be at least 1, got {batch_size}")
    all_prompts = list(read_prompts(prompts))  # read fully first: a bad line stops the run before any request
    done = done_prompts(out)
    todo, seen = [], set(done)
    for _, messages in all_prompts:
        key = prompt_key(messages)
        if key not in seen:
            seen.add(key)
            todo.append(messages)
    skipped = len(all_prompts) - len(todo)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink, tqdm(total=len(todo), disable=not progress, unit="prompt") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = teacher.answer(batch, sampling)
            lines = [
                json.dumps(conversation_record(m, r, c), ensure_ascii=False) + "\n" for m, (r, c) in zip(batch, answers)
            ]
            sink.write("".join(lines))
            sink.flush()
            bar.update(len(batch))
    return len(todo), skipped


def read_answers(path: Path) -> dict[str, Messages]:
    """{prompt key: whole conversation} of an SFT file written by `distill` (the last turn is the answer)."""
    if not path.is_file():
        raise TrainingError(f"{path} not found; write it with `minimind data distill --out {path}`")
    answers: dict[str, Messages] = {}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            turns = json.loads(raw)["conversations"]
            if turns[-1]["role"] != "assistant":
                raise ValueError
            answers[prompt_key([{"role": t["role"], "content": t["content"]} for t in turns[:-1]])] = turns
        except (ValueError, KeyError, TypeError, IndexError):
            raise TrainingError(
                f'{path}:{lineno}: not a conversation ending with an assistant turn ({{"conversations": [...]}})'
            ) from None
    return answers


def make_pairs(chosen: Path, rejected: Path, out: Path) -> tuple[int, int]:
    """DPO pairs (upstream's dpo.jsonl shape, {"chosen": [...], "rejected": [...]}) from two answer files of the
    same prompts: typically a stronger teacher's answers (chosen) and the model's own (rejected). Prompts in only
    one file, and answers that are the same in both, are left out. Returns (pairs written, prompts left out)."""
    better, worse = read_answers(chosen), read_answers(rejected)
    written = 0
    with out.open("w", encoding="utf-8") as sink:
        for key, good in better.items():
            bad = worse.get(key)
            if bad is None or bad[-1]["content"].strip() == good[-1]["content"].strip():
                continue
            sink.write(json.dumps({"chosen": good, "rejected": bad}, ensure_ascii=False) + "\n")
            written += 1
    return written, len(set(better) | set(worse)) - written
