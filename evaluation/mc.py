"""Multiple choice by log-likelihood (C-Eval, CMMLU, ARC, MMLU shapes) from local files.

Each question is rendered as

    {question}
    A. {choice}
    B. {choice}
    Answer:

and the model's pick is the letter whose continuation (" A", " B", ...) is most likely, as in MMLU's and C-Eval's
own evaluation. With `shots` K, the first K questions of each subject are shown answered before each of the
others (and are not scored themselves).

Rows: JSONL `{"question", "choices": [...], "answer": "A" | 0}` (optional "subject"; ARC's
`{"choices": {"text", "label"}, "answerKey"}` too) or CSV with columns question, A, B, C, D, ..., answer
(C-Eval; CMMLU's capitalised names too). The subject is a row's "subject" or the file name without a
_dev/_val/_test suffix.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.backends import EvalError, EvalModel

LETTERS = "ABCDEFGHIJ"


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    where: str  # FILE:LINE, for messages


def format_prompt(q: Question) -> str:
    lines = [q.question.strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def format_example(q: Question) -> str:
    return f"{format_prompt(q)} {LETTERS[q.answer]}\n\n"


def read_questions(paths: list[Path]) -> list[Question]:
    """All questions of the given files (a directory stands for its .jsonl/.csv files)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".csv"))
        elif path.is_file():
            files.append(path)
        else:
            raise EvalError(f"{path}: no such data file or directory")
    questions: list[Question] = []
    for path in files:
        subject = re.sub(r"_(dev|val|test)$", "", path.stem)
        questions += _read_csv(path, subject) if path.suffix == ".csv" else _read_jsonl(path, subject)
    if not questions:
        raise EvalError(f"{', '.join(map(str, paths))}: no questions found (.jsonl or .csv files)")
    return questions


def _answer_index(value: Any, choices: list[Any], labels: list[str] | None = None) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        text = str(value).strip()
        if labels and text in labels:
            index = labels.index(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
        else:
            raise ValueError(f"answer {value!r} is not a letter A-{LETTERS[len(choices) - 1]} or an index")
    if not 0 <= index < len(choices):
        raise ValueError(f"answer {value!r} is outside the {len(choices)} choices")
    return index


def _read_jsonl(path: Path, subject: str) -> list[Question]:
    out = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                choices, labels = row["choices"], None
                if isinstance(choices, dict):  # ARC: {"text": [...], "label": [...]}
                    choices, labels = choices["text"], [str(x) for x in choices["label"]]
                if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                    raise ValueError(f'"choices" must be a list of 2 to {len(LETTERS)} options')
                answer = row["answer"] if "answer" in row else row["answerKey"]
                question = row["question"]
                if isinstance(question, dict):  # ARC-style nesting
                    question = question["stem"]
                out.append(
                    Question(
                        str(row.get("subject") or subject),
                        str(question),
                        [str(c) for c in choices],
                        _answer_index(answer, choices, labels),
                        where,
                    )
                )
            except (ValueError, KeyError, TypeError) as err:
                reason = f"invalid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else str(err)
                if isinstance(err, KeyError):
                    reason = f"missing field {err}"
                raise EvalError(
                    f'{where}: {reason}; expected {{"question": ..., "choices": [...], "answer": "A"}}'
                ) from None
    return out


def _read_csv(path: Path, subject: str) -> list[Question]:
    out = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        letters = [c for c in LETTERS if c.lower() in columns]
        if "question" not in columns or "answer" not in columns or len(letters) < 2:
            raise EvalError(f"{path}: a CSV needs columns question, A, B, ... and answer (C-Eval's layout)")
        for lineno, row in enumerate(reader, start=2):
            choices = [row[columns[c.lower()]] for c in letters]
            try:
                answer = _answer_index(row[columns["answer"]], choices)
            except ValueError as err:
                raise EvalError(f"{path}:{lineno}: {err}") from None
            out.append(Question(subject, row[columns["question"]], choices, answer, f"{path}:{lineno}"))
    return out


def evaluate_mc(model: EvalModel, questions: list[Question], shots: int = 0) -> dict[str, Any]:
    """Accuracy per subject and overall (micro average over questions), plus each question's pick."""
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    subjects, picks = {}, []
    correct_total = count_total = 0
    for subject, items in by_subject.items():
        examples, scored = items[:shots], items[shots:]
        prefix = "".join(format_example(q) for q in examples)
        correct = 0
        for q in scored:
            context = prefix + format_prompt(q)
            scores = model.loglikelihood([(context, f" {LETTERS[i]}") for i in range(len(q.choices))])
            pick = max(range(len(scores)), key=scores.__getitem__)
            correct += pick == q.answer
            picks.append({"where": q.where, "subject": subject, "pick": LETTERS[pick], "answer": LETTERS[q.answer]})
        subjects[subject] = {"accuracy": correct / len(scored) if scored else None, "questions": len(scored)}
        correct_total += correct
        count_total += len(scored)
    if not count_total:
        raise EvalError(f"no question left to score after {shots} shots per subject; lower --shots")
    return {
        "model": model.name,
        "shots": shots,
        "accuracy": correct_total / count_total,
        "questions": count_total,
        "subjects": subjects,
        "picks": picks,
    }
