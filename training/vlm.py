"""Vision-language stages: `vlm-pretrain` (projector only; LLM and encoder frozen) and `vlm-sft` (projector and
LLM; encoder frozen), upstream minimind-v's two stages, on the shared Trainer loop.

Data, as upstream ships it or as files:
- JSONL lines `{"conversations": [...], "image": "a.png"}` (or a list of names), images read from `image_dir`
  (default: the JSONL file's folder);
- upstream's parquet (`conversations` as JSON or a list, `image_bytes` as bytes or a list of bytes; needs pyarrow).
Each `<image>` in a turn becomes one run of the model's image placeholders; a conversation whose images have no
`<image>` marker gets them at the start of the first user turn. A conversation cut by max_seq_len keeps only
the images whose placeholder runs are complete.

The model: init_from a MiniMind-V directory, or an LLM plus `vision_encoder: DIR` (a transformers SigLIP/CLIP
directory), which then gets a fresh projector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.vision.config import IMAGE_MARKER, IMAGE_TOKEN
from models.vision.image import ImagePreprocessor, open_image
from training.chat_masks import normalise_messages, tokenize_conversation
from training.config import TrainConfig
from training.data import IGNORE, pad_collate
from training.errors import TrainingError
from training.stages import SFTStage, StageLoss, require_chat_template


def vision_config_for(cfg: TrainConfig) -> tuple[Any, Path | None]:
    """(the encoder's transformers config, a directory that may hold preprocessor_config.json)."""
    from transformers import AutoConfig

    import models.vision  # noqa: F401 - registers minimind_vlm with AutoConfig

    if cfg.vision_config:
        from models.vision.config import vision_config_from

        try:
            return vision_config_from(dict(cfg.vision_config)), None
        except (ValueError, TypeError) as err:
            raise TrainingError(f"vision_config: {err}") from None
    if cfg.vision_encoder:
        folder = Path(cfg.vision_encoder).expanduser()
        return AutoConfig.from_pretrained(folder), folder
    source = Path(cfg.init_from).expanduser() if cfg.init_from else None
    if source is not None and source.is_dir() and (source / "config.json").is_file():
        config = AutoConfig.from_pretrained(source)
        if getattr(config, "vision_config", None) is not None:
            return config.vision_config, source
    raise TrainingError(
        f"stage {cfg.stage} needs a vision encoder: set init_from to a MiniMind-V directory, or vision_encoder to "
        "a transformers SigLIP/CLIP vision model directory (with init_from the LLM to extend), or vision_config to "
        "a fresh encoder's config (trained from scratch with train_vision_encoder: true)"
    )


class VLMDataset:
    """Conversations with images; items are tokenized on construction (images are decoded when read)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, image_token_len: int, preprocess: ImagePreprocessor) -> None:
        self.tokenizer, self.preprocess, self.seq_len = tokenizer, preprocess, cfg.max_seq_len
        self.placeholder = IMAGE_TOKEN * image_token_len
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_token_len = image_token_len
        self.items: list[tuple[list[int], list[bool], list[Any]]] = []
        self.bad_lines = 0
        for path in cfg.data_files:
            image_dir = Path(cfg.image_dir).expanduser() if cfg.image_dir else path.parent
            for where, conversations, images in read_rows(path, image_dir):
                try:
                    self.items.append(self.encode(conversations, images))
                except (TrainingError, ValueError) as err:
                    if not cfg.skip_bad_lines:
                        raise TrainingError(f"{where}: {err} (skip_bad_lines: true skips such lines)") from None
                    self.bad_lines += 1
        if not self.items:
            raise TrainingError(f"{cfg.data_path}: no usable conversations")

    def encode(self, conversations: Any, images: list[Any]) -> tuple[list[int], list[bool], list[Any]]:
        messages, tools = normalise_messages(conversations)
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        if markers == 0 and images:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = IMAGE_MARKER * len(images) + "\n" + first_user["content"]
        elif markers != len(images):
            raise TrainingError(f"{markers} {IMAGE_MARKER} markers but {len(images)} images")
        for message in messages:
            message["content"] = message["content"].replace(IMAGE_MARKER, self.placeholder)
        ids, trained = tokenize_conversation(self.tokenizer, messages, tools)
        ids, trained = ids[: self.seq_len + 1], trained[: self.seq_len + 1]
        # the model reads ids[:-1] (each position predicts the next token): count the runs it sees
        slots = [i for i, t in enumerate(ids[:-1]) if t == self.image_token_id]
        complete = len(slots) // self.image_token_len
        if len(slots) % self.image_token_len:  # a run cut in the middle: cut before it
            cut = slots[complete * self.image_token_len]
            ids, trained = ids[:cut], trained[:cut]
        return ids, trained, images[:complete]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, trained, images = self.items[index]
        tokens = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(trained), tokens, IGNORE)
        input_ids, targets = tokens[:-1], labels[1:]  # shifted here, as SFTDataset does: the loss takes them as is
        size = self.preprocess.size
        pixels = [self.preprocess(open_image(load_bytes(image))) for image in images]
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size)
        return {"input_ids": input_ids, "targets": targets, "pixel_values": pixel_values}


def load_bytes(image: Any) -> bytes:
    return image.read_bytes() if isinstance(image, Path) else image


def read_rows(path: Path, image_dir: Path) -> Any:
    """(where, conversations, images as Paths or bytes) of every row of a JSONL or parquet file."""
    if not path.is_file():
        raise TrainingError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TrainingError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=["conversations", "image_bytes"]).to_pylist()
        for n, row in enumerate(table):
            conversations = row["conversations"]
            conversations = json.loads(conversations) if isinstance(conversations, str) else conversations
            images = row["image_bytes"] if isinstance(row["image_bytes"], list) else [row["image_bytes"]]
            yield f"{path} row {n}", conversations, [bytes(i) for i in images if i]
        return
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrainingError(f"{where}: not valid JSON ({err})") from None
            names = row.get("image") or row.get("images") or []
            names = [s.strip() for s in names.split(",")] if isinstance(names, str) else list(names)
            images = [image_dir / name for name in names]
            missing = [str(p) for p in images if not p.is_file()]
            if missing:
                raise TrainingError(f"{where}: image file not found: {missing[0]} (set image_dir: to their folder)")
            yield where, row.get("conversations"), images


def attach_encoder(model: nn.Module, cfg: TrainConfig, image_token_id: int) -> nn.Module:
    """An LLM becomes a VLM with a fresh projector (seeded) and the encoder of `cfg.vision_encoder`, or a fresh
    encoder of `cfg.vision_config`."""
    from models.errors import CheckpointError
    from models.vision import MiniMindVLMForCausalLM
    from models.vision.checkpoint import encoder_state, vlm_config_from

    if isinstance(model, MiniMindVLMForCausalLM):
        return model
    fresh = bool(cfg.vision_config)
    encoder = dict(cfg.vision_config) if fresh else Path(cfg.vision_encoder).expanduser()
    try:
        config = vlm_config_from(model.config, encoder, {"image_ids": [image_token_id]})
    except CheckpointError as err:
        raise TrainingError(str(err)) from None
    torch.manual_seed(cfg.seed)
    vlm = MiniMindVLMForCausalLM(config)
    state = model.state_dict() if fresh else {**model.state_dict(), **encoder_state(encoder)}
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    new_parts = ("vision_proj.", "vision_encoder.") if fresh else ("vision_proj.",)
    if unexpected or any(not key.startswith(new_parts) for key in missing):
        raise TrainingError(f"{encoder}: the encoder does not fit ({(unexpected or missing)[:3]})")
    return vlm.train()


class VLMPretrainStage(SFTStage):
    """Projector only: the image features learn to land where the frozen LLM understands them."""

    name = "vlm-pretrain"
    save_name = "pretrain_vlm"
    trained_prefixes: tuple[str, ...] = ("vision_proj.",)

    def build_dataset(self, cfg: TrainConfig, tokenizer: Any) -> Any:
        require_chat_template(tokenizer, self.name)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise TrainingError(f"the tokenizer has no {IMAGE_TOKEN} token; use the minimind-3 tokenizer")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        vision_config, folder = vision_config_for(cfg)
        from models.vision.config import vision_config_from

        vision_config = vision_config_from(vision_config.to_dict())
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        tokens = patches + (1 if vision_config.model_type == "clip_vision_model" else 0)
        return VLMDataset(cfg, tokenizer, tokens, ImagePreprocessor.for_encoder(vision_config, folder))

    def collate(self, items: list[dict[str, torch.Tensor]], tokenizer: Any) -> dict[str, torch.Tensor]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {**pad_collate(items, pad), "pixel_values": torch.cat([item["pixel_values"] for item in items])}

    def prepare_model(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        model = attach_encoder(model, cfg, self.image_token_id)
        trained = self.trained_prefixes + (("vision_encoder.",) if cfg.train_vision_encoder else ())
        if cfg.use_lora and self.name == "vlm-sft":  # adapters on the LLM's layers; the projector trains in full
            from training.lora import apply_lora

            apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, within="model.")
            trained = tuple(p for p in trained if p not in ("model.", "lm_head.")) + ("lora_",)
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(trained) or ".lora_" in name
        if not cfg.train_vision_encoder:
            model.vision_encoder.eval()
        return model

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StageLoss:
        pixels = batch["pixel_values"]
        out = model(input_ids=batch["input_ids"], pixel_values=pixels if len(pixels) else None, use_cache=False)
        aux = out.aux_loss if out.aux_loss is not None else out.logits.new_zeros((), dtype=torch.float32)
        return StageLoss(self.cross_entropy(out.logits, batch["targets"]), aux)

    def save_final(self, model: nn.Module, tokenizer: Any, cfg: TrainConfig, out_dir: Path) -> None:
        from models.vision.export import write_vlm_dir

        if cfg.save_format != "hf":
            raise TrainingError(f"stage {self.name} saves Hugging Face directories only (save_format: hf)")
        if cfg.use_lora and self.name == "vlm-sft":  # the adapter beside, the merged VLM (projector too) in final/
            from training.lora import merge_and_unwrap, save_adapter

            lora = out_dir.with_name(out_dir.name + "-lora")
            save_adapter(model, lora, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.init_from)
            model = merge_and_unwrap(model)
        write_vlm_dir(out_dir, model, tokenizer, force=True)


class VLMSFTStage(VLMPretrainStage):
    """Projector and LLM: instruction following about images (the encoder stays frozen)."""

    name = "vlm-sft"
    save_name = "sft_vlm"
    trained_prefixes = ("vision_proj.", "model.", "lm_head.")
