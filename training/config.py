"""TrainConfig: every training option in one dataclass, loaded from YAML and overridden from the command line.

One flat dataclass (instead of nested ones per concern) so that every field maps 1:1 to a `--key value` flag and
to a line of the YAML presets under configs/. The resolved config is written next to the checkpoints
(`config.yaml`) so a run can always be repeated or resumed with exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.dtypes import DTYPE_ALIASES, DTYPE_HELP
from training.errors import TrainingError

STAGES = ("pretrain", "sft", "lora", "dpo", "distill", "reason", "grpo", "ppo", "agent", "vlm-pretrain", "vlm-sft")


def minimind_home() -> Path:
    """Cache and default outputs live here (MINIMIND_HOME, default ~/.cache/minimind)."""
    return Path(os.environ.get("MINIMIND_HOME", Path.home() / ".cache" / "minimind")).expanduser()


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    stage: str = _f(
        "pretrain",
        "training stage: pretrain (packed LM loss), sft (assistant-only loss), lora (SFT loss on adapters), dpo "
        "(preference pairs), distill (SFT with a teacher's logits), reason (SFT with weighted think tags), grpo (RL from rewards on sampled "
        "completions), ppo (RL with a critic and GAE), agent (grpo with multi-turn tool-calling rollouts), vlm-pretrain (MiniMind-V: the image projector only), "
        "vlm-sft (MiniMind-V: projector + LLM)",
    )
    preset: str = _f("minimind2-small", "model shape from models/presets.py, used when init_from is empty")
    model_config: dict = _f({}, "overrides of the preset's config fields, e.g. {hidden_size: 256} (YAML/JSON mapping)")
    init_from: str = _f(
        "", "start from these weights: a Hugging Face directory (e.g. a pretrain run's final/) or upstream .pth"
    )
    tokenizer: str = _f(
        "", "tokenizer directory (tokenizer.json + tokenizer_config.json with the chat template); default: init_from"
    )
    # data
    data_path: str = _f(
        "", 'JSONL file(s), comma-separated: pretrain lines {"text": ...}, sft/lora lines {"conversations": [...]}'
    )
    max_seq_len: int = _f(340, "tokens per training sequence (pretrain packs documents to exactly this length)")
    skip_bad_lines: bool = _f(
        False, "skip malformed JSONL lines (counted in the log) instead of stopping at the first one"
    )
    cache_dir: str = _f("", "where tokenized data is cached; default MINIMIND_HOME/cache/data")
    image_dir: str = _f("", "vlm-*: folder of the images JSONL lines name; default: the JSONL file's folder")
    vision_encoder: str = _f(
        "", "vlm-*: a transformers SigLIP/CLIP vision model directory that turns the init_from LLM into a MiniMind-V"
    )
    vision_config: dict = _f(
        {},
        "vlm-*: instead of vision_encoder, a fresh encoder of this transformers config, e.g. {model_type: "
        "siglip_vision_model, image_size: 32, patch_size: 8, hidden_size: 64, num_hidden_layers: 2, "
        "num_attention_heads: 2, intermediate_size: 128}; it starts from random weights (needs train_vision_encoder)",
    )
    train_vision_encoder: bool = _f(
        False, "vlm-*: train the vision encoder too (default false: frozen, as upstream trains a pretrained SigLIP)"
    )
    # optimisation
    epochs: float = _f(1.0, "passes over the data (fractions allowed); ignored when max_steps > 0")
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from epochs")
    batch_size: int = _f(32, "sequences per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)")
    lr: float = _f(5e-4, "peak learning rate (reached after warmup)")
    min_lr_ratio: float = _f(0.1, "the cosine schedule ends at lr x min_lr_ratio")
    warmup_steps: int = _f(0, "linear warmup steps; 0 = warmup_ratio x total steps")
    warmup_ratio: float = _f(0.01, "fraction of total steps used for warmup when warmup_steps is 0")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to norms, biases and embeddings)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    dropout: float = _f(0.0, "dropout probability inside the model (0 for the usual pretraining)")
    seed: int = _f(42, "seed for weights, data order and dropout")
    # hardware
    device: str = _f("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    dtype: str = _f(
        "auto",
        "auto (bf16 autocast on GPUs that have it, fp16+GradScaler otherwise, fp32 on CPU), bf16/bfloat16, "
        "fp16/float16/half or fp32/float32/float",
    )
    compile: bool = _f(False, "torch.compile the model (faster steps after a warm-up compile)")
    compile_scope: str = _f(
        "model",
        "with compile: model (the whole decoder as one graph: fewest launches) or layers (each decoder layer: "
        "quicker warm-up compile)",
    )
    compile_mode: str = _f(
        "default",
        "with compile: torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune, "
        "max-autotune-no-cudagraphs)",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    distributed: str = _f("ddp", "under torchrun: ddp (replicate the model) or fsdp (shard it with torch fully_shard)")
    # outputs
    output_dir: str = _f("", "run directory (checkpoints, final model, logs); default MINIMIND_HOME/runs/<stage>")
    save_every: int = _f(
        1000, "save a resumable checkpoint every N optimizer steps (and always at the end); 0 = only at the end"
    )
    keep_last: int = _f(3, "how many step checkpoints to keep (older ones are deleted)")
    save_format: str = _f("hf", "final weights: hf (Hugging Face directory), pth (upstream MiniMind .pth) or both")
    resume: str = _f(
        "auto", "auto (continue from the newest checkpoint in output_dir if any), never, or a checkpoint path"
    )
    log_every: int = _f(10, "log loss/lr/throughput every N optimizer steps")
    report_to: str = _f("tensorboard", "tensorboard, wandb, swanlab or none (comma-separate several)")
    run_name: str = _f("", "name shown in wandb/swanlab; default: the output directory's name")
    # LoRA
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get LoRA adapters (comma-separated on the command line)",
    )

    # DPO
    beta: float = _f(0.1, "dpo: strength of the pull towards the reference model (rewards are beta x log-ratios)")
    dpo_loss: str = _f("sigmoid", "dpo: sigmoid (DPO; with label_smoothing > 0: cDPO) or ipo")
    label_smoothing: float = _f(0.0, "dpo: assumed fraction of flipped preference labels (cDPO), in [0, 0.5)")
    ref_model: str = _f(
        "", "dpo: the frozen reference model (any checkpoint the loader reads); default: a copy of the start weights"
    )
    precompute_ref_logps: bool = _f(
        False, "dpo: run the reference once over the data before training (only one model on the GPU while training)"
    )
    use_lora: bool = _f(
        False,
        "dpo/distill/reason/vlm-sft: train LoRA adapters (lora_* fields) instead of all weights; dpo's reference "
        "is then the base with adapters off (no second copy); vlm-sft puts them on the LLM only, trains the "
        "projector in full and saves the merged model in final/ and the adapter in final-lora/",
    )
    # distillation and reasoning
    teacher: str = _f("", "distill: the teacher (HF directory or .pth); same vocabulary as the student")
    teacher_preset: str = _f("", "distill: model shape of a .pth teacher without a config.json beside it")
    distill_alpha: float = _f(0.5, "distill: loss = alpha x CE + (1 - alpha) x T^2 x KL")
    temperature: float = _f(1.5, "distill: softmax temperature T of teacher and student")
    kl_direction: str = _f(
        "forward", "distill: forward = KL(teacher || student) (mass-covering), reverse = KL(student || teacher)"
    )
    think_tag_weight: float = _f(
        10.0, "reason: loss weight of the <think>, </think> (and <answer>, </answer>) tokens; others weigh 1"
    )

    # reinforcement learning (grpo)
    num_generations: int = _f(4, "grpo: completions sampled per prompt (the group whose rewards are normalised)")
    rl_loss: str = _f(
        "cispo", "grpo: cispo (capped, stop-gradient importance weights; upstream's default) or grpo (clipped ratio)"
    )
    epsilon: float = _f(0.2, "grpo: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (rl_loss grpo)")
    epsilon_high: float = _f(
        0.0, "grpo: upper clip 1 + epsilon_high (0 = epsilon) for rl_loss grpo; the weight cap (0 = 5.0) for cispo"
    )
    loss_norm: str = _f(
        "sequence",
        "grpo: sequence (each completion's mean token loss, averaged) or token (every token weighs the same)",
    )
    rewards: dict = _f(
        {"exact_match": 1.0},
        "grpo: weighted rewards, e.g. {exact_match: 1.0, format: 0.2}; names: exact_match, numeric_match, format, "
        "length, repetition, reward_model (the model in reward_model:), or a Python function module:function",
    )
    reward_model: str = _f(
        "",
        "grpo/ppo: a local AutoModelForSequenceClassification directory (one label) scoring each completion, used "
        "by rewards: {reward_model: WEIGHT}; never downloaded",
    )
    max_completion_len: int = _f(
        64, "grpo: tokens sampled per completion; prompts get max_seq_len - max_completion_len tokens"
    )
    rollout_temperature: float = _f(1.0, "grpo: sampling temperature of the rollouts (the loss uses the same)")
    rollout_top_p: float = _f(1.0, "grpo: nucleus sampling of the rollouts (1 = off)")
    rollout_stop: list = _f([], "grpo: stop strings that end a completion (comma-separated on the command line)")
    rollout_kv_cache_mb: int = _f(1024, "grpo: memory of the rollout engine's KV cache, in MiB (bounds its batch)")

    # ppo (also uses the grpo options above: rollouts, rewards, epsilon, loss_norm; beta is the KL penalty)
    gamma: float = _f(1.0, "ppo: discount of later token rewards in GAE")
    lam: float = _f(0.95, "ppo: GAE lambda (1 = Monte Carlo returns, 0 = one-step TD)")
    value_clip: float = _f(0.2, "ppo: the critic's values move at most this far from the rollout's per update")
    vf_coef: float = _f(0.1, "ppo: weight of the value loss beside the policy loss (actor and critic share the model)")

    # tool-use RL (agent; also uses the grpo options above)
    tools: list = _f(["calculator"], "agent: the sandboxed tools the model may call: calculator, lookup")
    tool_lookup_file: str = _f("", "agent: JSON object file the lookup tool reads ({key: value, ...})")
    tool_timeout_s: float = _f(1.0, "agent: wall-clock limit of one tool call, in seconds")
    max_turns: int = _f(3, "agent: model turns per rollout (a tool turn follows each call but the last)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values by field name, before anything expensive happens."""
        checks = [
            (self.stage in STAGES, "stage", f"must be one of {', '.join(STAGES)}"),
            (self.max_seq_len >= 2, "max_seq_len", "must be at least 2"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.grad_accum >= 1, "grad_accum", "must be at least 1"),
            (self.lr > 0, "lr", "must be positive"),
            (self.save_format in ("hf", "pth", "both"), "save_format", "must be hf, pth or both"),
            (self.distributed in ("ddp", "fsdp"), "distributed", "must be ddp or fsdp"),
            (self.compile_scope in ("model", "layers"), "compile_scope", "must be model or layers"),
            (
                self.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                "compile_mode",
                "must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs",
            ),
            (str(self.dtype).lower() in DTYPE_ALIASES, "dtype", f"must be one of {DTYPE_HELP}"),
            (self.lora_rank >= 1, "lora_rank", "must be at least 1"),
            (self.keep_last >= 1, "keep_last", "must be at least 1"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (self.stage != "lora" or bool(self.init_from), "init_from", "must name the model LoRA adapts (lora stage)"),
            (
                self.beta > 0 or (self.stage in ("grpo", "ppo", "agent") and self.beta == 0),
                "beta",
                "must be positive (grpo, ppo, agent: or 0)",
            ),
            (self.dpo_loss in ("sigmoid", "ipo"), "dpo_loss", "must be sigmoid or ipo"),
            (0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
            (self.stage != "distill" or bool(self.teacher), "teacher", "must name the teacher model (distill stage)"),
            (0 <= self.distill_alpha <= 1, "distill_alpha", "must be in [0, 1]"),
            (self.temperature > 0, "temperature", "must be positive"),
            (self.kl_direction in ("forward", "reverse"), "kl_direction", "must be forward or reverse"),
            (self.think_tag_weight >= 0, "think_tag_weight", "must not be negative"),
            (
                self.num_generations >= (1 if self.stage == "ppo" else 2),
                "num_generations",
                "must be at least 2 (advantages compare a group; ppo: at least 1)",
            ),
            (0 <= self.gamma <= 1, "gamma", "must be in [0, 1]"),
            (0 <= self.lam <= 1, "lam", "must be in [0, 1]"),
            (self.value_clip > 0, "value_clip", "must be positive"),
            (self.vf_coef >= 0, "vf_coef", "must not be negative"),
            (self.rl_loss in ("grpo", "cispo"), "rl_loss", "must be grpo or cispo"),
            (0 <= self.epsilon < 1, "epsilon", "must be in [0, 1)"),
            (self.epsilon_high >= 0, "epsilon_high", "must not be negative"),
            (self.loss_norm in ("sequence", "token"), "loss_norm", "must be sequence or token"),
            (
                self.stage not in ("grpo", "ppo", "agent") or 1 <= self.max_completion_len < self.max_seq_len,
                "max_completion_len",
                "must be at least 1 and below max_seq_len (the prompt needs room)",
            ),
            (self.rollout_temperature > 0, "rollout_temperature", "must be positive"),
            (0 < self.rollout_top_p <= 1, "rollout_top_p", "must be in (0, 1]"),
            (self.rollout_kv_cache_mb >= 1, "rollout_kv_cache_mb", "must be at least 1"),
            (self.max_turns >= 1, "max_turns", "must be at least 1"),
            (self.tool_timeout_s > 0, "tool_timeout_s", "must be positive"),
            (
                not (self.vision_config and self.vision_encoder),
                "vision_config",
                "and vision_encoder are both set; give one: a fresh encoder's config or a pretrained encoder's directory",
            ),
            (
                not self.vision_config or self.train_vision_encoder,
                "vision_config",
                "makes an encoder of random weights, which must be trained: set train_vision_encoder: true",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise TrainingError(f"config field {name}={getattr(self, name)!r} {why}")

    @property
    def data_files(self) -> list[Path]:
        return [Path(p.strip()).expanduser() for p in self.data_path.split(",") if p.strip()]

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else minimind_home() / "runs" / self.stage

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def convert_value(name: str, raw: Any) -> Any:
    """Turn a YAML or command-line value into the field's type; errors name the field and the expected type."""
    kind = type(FIELDS[name].default) if FIELDS[name].default is not dataclasses.MISSING else None
    if kind is None:
        kind = type(FIELDS[name].default_factory())
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is list:
            if isinstance(raw, str):
                return [part.strip() for part in raw.split(",") if part.strip()]
            return list(raw)
        if kind is dict:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
            if not isinstance(value, dict):
                raise ValueError(raw)
            return value
        if kind is int:
            number = float(raw)  # accepts "1e3" and 1000.0 as well as "1000"
            if not number.is_integer() or isinstance(raw, bool):
                raise ValueError(raw)
            return int(number)
        if kind is str:
            return "" if raw is None else str(raw)
        return kind(raw)
    except (TypeError, ValueError, yaml.YAMLError):
        raise TrainingError(f"config field {name}: cannot read {raw!r} as {kind.__name__}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of field: value (not yet checked against the fields)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(
            f"config file {path} not found; presets live under configs/ (e.g. configs/pretrain-minimind2-small.yaml)"
        )
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TrainingError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise TrainingError(f"{path}: expected a mapping of field: value at the top level")
    return loaded


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, stage: str | None = None
) -> TrainConfig:
    """YAML file (optional) + overrides (already keyed by field name) -> a validated TrainConfig."""
    values: dict[str, Any] = dict(load_yaml(path)) if path else {}
    values.update(overrides or {})
    if stage is not None:
        values["stage"] = stage
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TrainingError(
            f"unknown config field(s) {', '.join(unknown)}"
            + (f" in {path}" if path else "")
            + f"; known: {', '.join(FIELDS)}"
        )
    return TrainConfig(**{name: convert_value(name, value) for name, value in values.items()})
