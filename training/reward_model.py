"""The `reward_model` reward: a local transformers sequence-classification model scores each completion.

`rewards: {reward_model: 1.0}` with `reward_model: PATH` (a directory with config.json whose architecture is
`...ForSequenceClassification` and one output label, its weights and tokenizer). Nothing is downloaded: the
directory is read with `local_files_only`, so a missing file fails at start-up, before any model is built.

The text scored is the conversation with the completion as the last assistant turn, rendered with the reward
model's own chat template when its tokenizer has one (reward models are trained on their own format), else the
turns' contents joined by newlines. The score is the model's single logit for that text, unscaled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.errors import TrainingError

if TYPE_CHECKING:
    from training.rewards import Sample

BATCH = 16  # texts per forward: bounds the activation memory beside the policy


def scored_text(tokenizer: Any, sample: Sample) -> str:
    """What the reward model reads: the conversation plus the completion as the assistant's answer."""
    messages = [*sample.messages, {"role": "assistant", "content": sample.completion}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(str(m.get("content", "")) for m in messages)


def check_directory(path: Path) -> None:
    """Refuse, with the fix, anything that is not a local single-label sequence-classification model."""
    hint = (
        "reward_model: must name a local AutoModelForSequenceClassification directory (config.json, weights, tokenizer)"
    )
    if not path.is_dir():
        raise TrainingError(f"reward model {path}: no such directory; {hint}")
    if not (path / "config.json").is_file():
        raise TrainingError(f"reward model {path}: no config.json; {hint}")
    config = json.loads((path / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise TrainingError(
            f"reward model {path}: its architecture is {', '.join(architectures) or 'not given'}, not a "
            f"...ForSequenceClassification; {hint}"
        )
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if labels != 1:
        raise TrainingError(
            f"reward model {path}: it has {labels} output labels; a reward model gives one score (num_labels: 1)"
        )


class RewardModel:
    """Scores samples with a sequence-classification model, in batches, without gradients."""

    def __init__(self, path: str, max_length: int = 2048) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path:
            raise TrainingError(
                "rewards: lists reward_model but the reward_model: field is empty; set it to the model's directory"
            )
        directory = Path(path).expanduser()
        check_directory(directory)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as err:
            raise TrainingError(f"reward model {directory}: cannot load it ({err})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # finds each row's last token in a right-padded batch
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        self.model.eval().requires_grad_(False)
        self.max_length = max_length

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def score_batch(self, samples: list[Sample]) -> list[float]:
        texts = [scored_text(self.tokenizer, sample) for sample in samples]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), BATCH):
            inputs = self.tokenizer(
                texts[start : start + BATCH],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.templated,  # a chat template writes them itself
            ).to(device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores

    def __call__(self, sample: Sample) -> float:
        return self.score_batch([sample])[0]
