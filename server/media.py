"""Images of a chat request: OpenAI `image_url` content parts -> pixel_values for a vision-language model.

Accepted URLs: `data:image/...;base64,...` always; `file://` paths only inside the directory the server was
started with (`--allowed-local-media-path`, vLLM's name). Remote http(s) URLs are refused: the server never
fetches from the network on a client's behalf. Every failure is a 400 that names the message and part.
The functions are blocking (decoding, resizing): routes run them in the worker pool.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from models.vision.image import ImageError, open_image
from server.errors import APIError
from server.protocol import ChatMessage
from server.settings import format_size


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(param path, url) of every image part, in reading order."""
    found = []
    for m, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            if part.type == "image_url":
                param = f"messages[{m}].content[{p}].image_url"
                if part.image_url is None or not part.image_url.url:
                    raise APIError(400, f"{param}: an image_url part needs image_url.url", param=param)
                found.append((param, part.image_url.url))
    return found


def load_images(
    messages: list[ChatMessage], vision: Any, *, allowed_local_path: str | None, max_image_bytes: int
) -> torch.Tensor | None:
    """pixel_values [images, 3, H, W] of the request's images, or None when it has none."""
    urls = image_urls(messages)
    if not urls:
        return None
    if vision is None:
        raise APIError(
            400,
            f"{urls[0][0]}: this model is text-only and cannot read images; send text only, or serve a "
            "vision-language (MiniMind-V) model",
            param=urls[0][0],
        )
    pixels = []
    for param, url in urls:
        data = _image_bytes(param, url, allowed_local_path, max_image_bytes)
        try:
            pixels.append(vision.preprocess(open_image(data)))
        except ImageError as err:
            raise APIError(400, f"{param}: {err}; send a PNG, JPEG, GIF, BMP or WebP image", param=param) from None
    return torch.stack(pixels)


def _image_bytes(param: str, url: str, allowed_local_path: str | None, max_image_bytes: int) -> bytes:
    scheme = urlparse(url).scheme.lower() if ":" in url[:16] else ""
    if scheme == "data":
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{param}: only base64 data URLs are accepted (data:image/png;base64,...)", param=param)
        if len(payload) * 3 // 4 > max_image_bytes:
            raise _too_large(param, len(payload) * 3 // 4, max_image_bytes)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URL is not valid base64", param=param) from None
    if scheme == "file":
        return _local_file(param, Path(unquote(urlparse(url).path)), allowed_local_path, max_image_bytes)
    if scheme in ("http", "https"):
        raise APIError(
            400,
            f"{param}: this server does not fetch remote images ({scheme} URL); send the image inline as a "
            "data URL (data:image/png;base64,...)",
            param=param,
        )
    raise APIError(
        400, f"{param}: unsupported image URL; use a data:image/...;base64 URL (or file:// when allowed)", param=param
    )


def _local_file(param: str, path: Path, allowed: str | None, max_image_bytes: int) -> bytes:
    if allowed is None:
        raise APIError(
            400,
            f"{param}: file:// URLs are disabled; start the server with --allowed-local-media-path DIR to allow "
            "files under DIR, or send a data URL",
            param=param,
        )
    root = Path(allowed).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise APIError(400, f"{param}: {path} is outside the allowed media directory {root}", param=param)
    if not resolved.is_file():
        raise APIError(400, f"{param}: {path}: no such file", param=param)
    size = resolved.stat().st_size
    if size > max_image_bytes:
        raise _too_large(param, size, max_image_bytes)
    return resolved.read_bytes()


def _too_large(param: str, size: int, limit: int) -> APIError:
    return APIError(
        400,
        f"{param}: the image is {format_size(size)}, more than the limit of {format_size(limit)} "
        "(--max-image-bytes); send a smaller image",
        param=param,
    )
