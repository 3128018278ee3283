"""Files shipped inside the package: SDXL's CLIP tokenizer and the T2I-CompBench prompt lists."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

DATA_DIR = Path(str(resources.files("detailpp") / "data"))
CLIP_TOKENIZER_DIR = DATA_DIR / "clip-tokenizer"
T2I_COMPBENCH_DIR = DATA_DIR / "t2i-compbench"


@lru_cache(maxsize=2)
def load_clip_tokenizer(second: bool = False):
    """SDXL's CLIP tokenizer (``second=True``: ``tokenizer_2``, which pads with ``"!"``), from the packaged files."""
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": "!"} if second else {}
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), model_max_length=77, **kwargs)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one a line (CRLF and blank lines tolerated)."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.replace("\r", "").split("\n") if line.strip()]
