"""Write the Style Composition Benchmark's 300 prompts into the package (``src/detailpp/data/scb_prompts.json``).

The sample is a pure function of the seed recorded in :data:`detailpp.bench.suites.SCB_SEED`, so running this script
again reproduces the file byte for byte; ``--check`` verifies that instead of writing.

    python scripts/make_scb_prompts.py           # (re)write the data file
    python scripts/make_scb_prompts.py --check   # exit 1 if the packaged file differs
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from detailpp.bench.suites import SCB_NUM_PROMPTS, SCB_SEED, render_scb_json

TARGET = Path(__file__).resolve().parents[1] / "src" / "detailpp" / "data" / "scb_prompts.json"
logger = logging.getLogger("make_scb_prompts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the file instead of writing it")
    parser.add_argument("--out", type=Path, default=TARGET, help="where to write (default: the package's data file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render_scb_json(SCB_SEED, SCB_NUM_PROMPTS)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            logger.error("%s differs from what seed %d gives; run this script without --check.", args.out, SCB_SEED)
            return 1
        logger.info("%s is up to date (seed %d, %d prompts).", args.out, SCB_SEED, SCB_NUM_PROMPTS)
        return 0
    args.out.write_text(text, encoding="utf-8")
    logger.info("wrote %d SCB prompts (seed %d) to %s", SCB_NUM_PROMPTS, SCB_SEED, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
