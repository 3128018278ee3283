"""The prompt suites of the paper's benchmarks and the benchmark's seed schedule.

- ``t2i-color``, ``t2i-texture``, ``t2i-shape``: T2I-CompBench's validation prompts (300 each), shipped in the package
  (:data:`detailpp.resources.T2I_COMPBENCH_DIR`), scored with BLIP-VQA (and ImageReward).
- ``scb``: the Style Composition Benchmark of the Detail++ paper: 300 prompts ``"A [style] style [subject] in a [style]
  style [background]"`` with the subject's style different from the background's, sampled from the 1050 valid
  combinations with the fixed, recorded seed :data:`SCB_SEED` (the authors' 300 are not published). The 300 are stored
  in the package (``data/scb_prompts.json``, written by ``scripts/make_scb_prompts.py``) so every run uses the same
  ones.

Seed schedule (T2I-CompBench's own generator, ``GORS_finetune/inference_eval.py``): image 0 of every prompt uses seed
42 and, after image ``n``, the generator is re-seeded with ``42 + n + 1``; image ``k`` of a prompt therefore uses seed
``42 + k``, the same for every prompt and every method.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from detailpp.bench import BenchError
from detailpp.resources import DATA_DIR, T2I_COMPBENCH_DIR, read_prompt_file

logger = logging.getLogger(__name__)

#: T2I-CompBench: 10 images per prompt, seed 42 for the first, then 42 + n + 1 after image n.
DEFAULT_IMAGES_PER_PROMPT = 10
BASE_SEED = 42

T2I_SUITES = {"t2i-color": "color_val.txt", "t2i-texture": "texture_val.txt", "t2i-shape": "shape_val.txt"}
SUITE_NAMES: tuple[str, ...] = (*T2I_SUITES, "scb")

# --- Style Composition Benchmark (Detail++ paper) --------------------------------------------------------------------
SCB_TEMPLATE = "A {subject_style} style {subject} in a {background_style} style {background}"
SCB_STYLES: tuple[str, ...] = ("Lego", "Oil-painting", "Cyberpunk", "Sketch", "Pixel-Art", "Watercolor", "Graffiti")
SCB_SUBJECTS: tuple[str, ...] = ("Dog", "Cat", "Robot", "Car", "Unicorn")
SCB_BACKGROUNDS: tuple[str, ...] = ("forest", "Space", "Desert", "City", "Ruins")
SCB_NUM_PROMPTS = 300
#: The recorded seed of the SCB sample; changing it changes the benchmark (regenerate the data file and say so).
SCB_SEED = 2507_17853
SCB_DATA_FILE = DATA_DIR / "scb_prompts.json"
#: Parses a prompt of the SCB template back into its four words.
SCB_PATTERN = re.compile(
    r"^A (?P<subject_style>\S+) style (?P<subject>\S+) in a (?P<background_style>\S+) style "
    r"(?P<background>\S+)$"
)


@dataclass(frozen=True)
class ScbPrompt:
    """One SCB prompt and its two components (the subject and the background, each with its style)."""

    prompt: str
    subject: str
    subject_style: str
    background: str
    background_style: str

    @property
    def components(self) -> tuple[tuple[str, str], ...]:
        """``((style, word), ...)`` for the subject and the background, in that order."""
        return ((self.subject_style, self.subject), (self.background_style, self.background))


def scb_prompt(subject_style: str, subject: str, background_style: str, background: str) -> ScbPrompt:
    """The SCB prompt of one combination; subject and background words are written in lower case."""
    subject, background = subject.lower(), background.lower()
    text = SCB_TEMPLATE.format(
        subject_style=subject_style, subject=subject, background_style=background_style, background=background
    )
    return ScbPrompt(text, subject, subject_style, background, background_style)


def scb_combinations() -> list[ScbPrompt]:
    """All 1050 valid combinations (7 subject styles x 6 other background styles x 5 subjects x 5 backgrounds)."""
    out = []
    for s_style, subject, b_style, background in itertools.product(
        SCB_STYLES, SCB_SUBJECTS, SCB_STYLES, SCB_BACKGROUNDS
    ):
        if s_style != b_style:
            out.append(scb_prompt(s_style, subject, b_style, background))
    return out


def make_scb_prompts(seed: int = SCB_SEED, n: int = SCB_NUM_PROMPTS) -> list[ScbPrompt]:
    """``n`` of the valid combinations, picked by ranking ``sha256(f"{seed}:{prompt}")``.

    A hash ranking (not :mod:`random`) keeps the sample identical on every Python version; the picked prompts are
    returned in the canonical order of :func:`scb_combinations`.
    """
    combos = scb_combinations()
    if not 0 < n <= len(combos):
        raise BenchError(f"The SCB sample size must be between 1 and {len(combos)}, got {n}.")
    rank = {c.prompt: hashlib.sha256(f"{seed}:{c.prompt}".encode()).hexdigest() for c in combos}
    chosen = set(sorted(rank, key=rank.__getitem__)[:n])
    return [c for c in combos if c.prompt in chosen]


def scb_data(seed: int = SCB_SEED, n: int = SCB_NUM_PROMPTS) -> dict:
    """The content of ``data/scb_prompts.json``."""
    return {
        "benchmark": "Style Composition Benchmark (Detail++, arXiv 2507.17853)",
        "template": SCB_TEMPLATE,
        "styles": list(SCB_STYLES),
        "subjects": list(SCB_SUBJECTS),
        "backgrounds": list(SCB_BACKGROUNDS),
        "rule": "subject_style != background_style; subject and background written in lower case",
        "valid_combinations": len(scb_combinations()),
        "seed": seed,
        "selection": "the n combinations with the smallest sha256(f'{seed}:{prompt}') hex digest, in canonical order "
        "(styles x subjects x styles x backgrounds, as listed)",
        "generator": "scripts/make_scb_prompts.py",
        "prompts": [vars(p) for p in make_scb_prompts(seed, n)],
    }


@lru_cache(maxsize=1)
def load_scb_prompts() -> tuple[ScbPrompt, ...]:
    """The 300 packaged SCB prompts."""
    try:
        data = json.loads(SCB_DATA_FILE.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(
            f"Cannot read the packaged SCB prompts {str(SCB_DATA_FILE)!r} ({e}); reinstall the package or run "
            "scripts/make_scb_prompts.py."
        ) from e
    return tuple(ScbPrompt(**p) for p in data["prompts"])


def parse_scb_prompt(prompt: str) -> ScbPrompt:
    """The components of a prompt written with the SCB template (any words, one each)."""
    m = SCB_PATTERN.match(prompt.strip())
    if m is None:
        raise BenchError(
            f"The prompt {prompt!r} does not follow the SCB template {SCB_TEMPLATE!r}; the SCB metric needs one word "
            "per slot to know what to detect."
        )
    return ScbPrompt(prompt=prompt.strip(), **m.groupdict())


# --- suites ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """A named list of prompts and the metrics the paper reports on it."""

    name: str
    prompts: tuple[str, ...]
    metrics: tuple[str, ...] = field(default=("blip-vqa", "image-reward"))
    source: str = ""

    @property
    def fingerprint(self) -> str:
        """sha256 of the prompt list (one prompt a line), recorded with every run."""
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()


def read_prompts_checked(path: str | Path) -> list[str]:
    """The prompts of a user's prompt file, one a line, with clear messages for what a prompt file gets wrong.

    CRLF line ends and surrounding spaces are stripped, blank lines are skipped (with a warning naming them), and
    duplicate prompts are an error (they would be generated twice with the same seeds and count twice in the mean).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BenchError(f"Cannot read the prompt file {str(p)!r}: {e.strerror or e}.") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BenchError(f"The prompt file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from e
    if "\r" in text:
        logger.info("%s: CRLF line ends; the '\\r' are stripped.", p)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    prompts: list[str] = []
    blank: list[int] = []
    first_seen: dict[str, int] = {}
    duplicates: list[str] = []
    for number, line in enumerate(lines, start=1):
        prompt = line.strip()
        if not prompt:
            blank.append(number)
            continue
        if prompt in first_seen:
            duplicates.append(f"line {number} repeats line {first_seen[prompt]} ({prompt!r})")
            continue
        first_seen[prompt] = number
        prompts.append(prompt)
    if blank:
        logger.warning("%s: blank line(s) %s skipped.", p, ", ".join(map(str, blank[:20])))
    if duplicates:
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise BenchError(
            f"The prompt file {str(p)!r} has duplicate prompts: {'; '.join(duplicates[:5])}{more}. A benchmark "
            "generates each prompt with the same seeds, so a duplicate counts twice; remove the repeats."
        )
    if not prompts:
        raise BenchError(f"The prompt file {str(p)!r} has no prompt; write one prompt a line.")
    return prompts


def load_suite(name: str | None = None, prompt_file: str | Path | None = None) -> Suite:
    """A packaged suite by name, or a custom suite read from ``prompt_file`` (named after the file)."""
    if prompt_file is not None:
        path = Path(prompt_file)
        prompts = read_prompts_checked(path)
        return Suite(name or f"file:{path.name}", tuple(prompts), source=str(path.resolve()))
    if name in T2I_SUITES:
        path = T2I_COMPBENCH_DIR / T2I_SUITES[name]
        return Suite(name, tuple(read_prompt_file(path)), source=f"T2I-CompBench {path.name}")
    if name == "scb":
        return Suite(
            name, tuple(p.prompt for p in load_scb_prompts()), ("scb", "image-reward"), source=f"SCB, seed {SCB_SEED}"
        )
    raise BenchError(f"Unknown suite {name!r}; use one of {', '.join(SUITE_NAMES)} (or --prompt-file FILE).")


def seed_for_image(image_index: int, base_seed: int = BASE_SEED) -> int:
    """The seed of image ``image_index`` of any prompt: ``base_seed + image_index`` (see the module's docstring)."""
    return base_seed + image_index


def render_scb_json(seed: int = SCB_SEED, n: int = SCB_NUM_PROMPTS) -> str:
    """``data/scb_prompts.json`` exactly as ``scripts/make_scb_prompts.py`` writes it."""
    return json.dumps(scb_data(seed, n), indent=1, ensure_ascii=False) + "\n"
