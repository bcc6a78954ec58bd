"""Image -> pixel_values with PIL + numpy, as the encoder's transformers image processor would do it.

torchvision does not import beside the CPU torch build this project uses, and transformers' fast processors
need it, so the few steps (RGB, resize, optional centre crop, rescale, normalise) are written here. They read
the encoder's `preprocessor_config.json` when there is one; otherwise SigLIP's or CLIP's defaults apply.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


class ImageError(ValueError):
    """The bytes are not an image PIL can read (the message says why)."""


@dataclass
class ImagePreprocessor:
    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BILINEAR
    center_crop: bool = False

    @classmethod
    def for_encoder(cls, vision_config: Any, folder: str | Path | None = None) -> ImagePreprocessor:
        """From `folder/preprocessor_config.json` when present, else the encoder family's defaults."""
        clip = vision_config.model_type == "clip_vision_model"
        defaults = cls(
            size=vision_config.image_size,
            mean=CLIP_MEAN if clip else (0.5, 0.5, 0.5),
            std=CLIP_STD if clip else (0.5, 0.5, 0.5),
            resample=Image.Resampling.BICUBIC if clip else Image.Resampling.BILINEAR,
            center_crop=clip,
        )
        file = Path(folder) / PREPROCESSOR_FILE if folder is not None else None
        if file is None or not file.is_file():
            return defaults
        raw = json.loads(file.read_text())
        return cls(
            size=vision_config.image_size,
            mean=tuple(raw.get("image_mean", defaults.mean)),
            std=tuple(raw.get("image_std", defaults.std)),
            rescale_factor=raw.get("rescale_factor", defaults.rescale_factor),
            resample=raw.get("resample", defaults.resample),
            center_crop=raw.get("do_center_crop", defaults.center_crop),
        )

    def to_dict(self) -> dict[str, Any]:
        """A preprocessor_config.json that transformers' own image processors read the same way."""
        processor = "CLIPImageProcessor" if self.center_crop else "SiglipImageProcessor"
        size = {"shortest_edge": self.size} if self.center_crop else {"height": self.size, "width": self.size}
        return {
            "image_processor_type": processor,
            "do_resize": True,
            "size": size,
            "do_center_crop": self.center_crop,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": int(self.resample),
        }

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image -> float32 [3, size, size]."""
        image = image.convert("RGB")
        if self.center_crop:  # resize the shortest edge, then cut the centre square
            scale = self.size / min(image.size)
            width, height = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            image = image.resize((width, height), resample=self.resample)
            left, top = (width - self.size) // 2, (height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            image = image.resize((self.size, self.size), resample=self.resample)
        pixels = np.asarray(image, dtype=np.float32) * self.rescale_factor
        pixels = (pixels - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated file fails here, not later in the engine)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise ImageError(f"not a readable image ({type(err).__name__}: {err})") from None
    return image
