"""The paper's benchmarks: T2I-CompBench (BLIP-VQA), ImageReward and the Style Composition Benchmark (SCB).

One module per concern:

- :mod:`detailpp.bench.suites` — the prompt suites and the benchmark's seed schedule;
- :mod:`detailpp.bench.manifest` — the JSON Lines manifests, atomic image writes, resuming and merging;
- :mod:`detailpp.bench.sharding` — which process does which item (``--shard-index/--num-shards`` or Accelerate);
- :mod:`detailpp.bench.runs` — a run's items and records; :mod:`detailpp.bench.generation` and
  :mod:`detailpp.bench.scoring` — the two loops (resumable, sharded);
- :mod:`detailpp.bench.blip_vqa`, :mod:`detailpp.bench.scb`, :mod:`detailpp.bench.image_reward` — the metrics;
- :mod:`detailpp.bench.report` — Table 1 (Markdown, CSV), a bar chart and a gallery of the worst prompts.

``docs/benchmarks.md`` describes the protocols as implemented and every choice the papers leave open.
"""

from __future__ import annotations

from detailpp.errors import DetailError


class BenchError(DetailError, ValueError):
    """A benchmark input that cannot be used (unknown suite, bad prompt file, model that cannot be loaded, ...).

    The message names the problem and the fix; the command line prints it as one line.
    """
