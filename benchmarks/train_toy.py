"""Train the toy SDXL-architecture model on synthetic scenes (see docs/toy-model.md).

Example (one GPU, about 9 minutes):
    python benchmarks/train_toy.py --output outputs/toy-train --max-minutes 7 --compile default --eval-prompts 64

All options: ``python benchmarks/train_toy.py --help`` (fields of :class:`detailpp.toy.train.TrainConfig`).
"""

from __future__ import annotations

import json
import sys

from detailpp.toy.train import main

if __name__ == "__main__":
    summary = main(sys.argv[1:])
    print(json.dumps({k: v for k, v in summary.items() if k not in ("model_config",)}, indent=1))
