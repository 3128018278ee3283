"""The binding benchmark on the toy model: plain sampling, Detail++ and the paper's ablation, judged by the toy judge.

For every held-out 2-/3-object prompt of the run's split (:func:`split_prompts`: ``"test"``, the prompts the results
report, or ``"validation"``, disjoint from them, on which the toy's hyperparameters are chosen) and every seed, each
method makes one image from the same initial noise (one CPU generator per image, seeded with :func:`image_seed`):

- ``sdxl``: plain ``StableDiffusionXLPipeline.__call__`` on the same components;
- ``pdi``: Progressive Detail Injection alone (``DetailConfig(nursing=False)``);
- ``pdi_entropy``: PDI + attention nursing with the entropy loss only (``centroid_alignment=False``);
- ``detailpp``: the full method (nursing with entropy and centroid alignment; the defaults).

``BindingSettings.detail_config`` (``--detail-config``) holds DetailConfig fields laid under every Detail++ method and
diagnostic setting: a method runs ``DetailConfig(**{**overlay, **its own fields})``, so its own fields win (``pdi``
keeps ``nursing=False``); plain ``sdxl`` ignores it.

The judge reads every image (:func:`~research.toy.judge.judge`): object-level accuracy (each prompted object found
with its shape, colour and texture, one-to-one) and image-level accuracy (all found and nothing else in the image,
so no attribute sits on a wrong or extra object), overall and for 2- and 3-object prompts, and what kind of mistake
each failed image makes (:func:`~research.toy.judge.classify_errors`, summed by :func:`error_summary`: wrong object
count, a prompted shape missing, a colour or texture leaked from another prompted object or from nowhere, and the
images whose only mistakes are leaks, the ones Detail++ could fix). For the Detail++ methods,
each subject mask (``out.masks > tau`` at latent size, nearest-upsampled to the image) is compared with the judge's
region of the prompted object it belongs to (IoU; the region of the judged object of the same shape that best agrees
in colour and texture).

Diagnostic items (seed 0 of the first ``diagnostic_prompts`` prompts) also run extra settings (shared self-attention
in both CFG halves, sharing for all steps) and keep every branch's image, to see whether the base branch p1 follows
branch 0's layout (foreground IoU between the branches' judged objects) and what nursing alone does to branch 0.

Items are independent, so they can run in several worker processes on one GPU (the toy UNet is too small to keep a
GPU busy from one process); records are appended to JSON Lines files as they are made, and the summary is rewritten
periodically, so a run cut short still reports the items it finished. Only items finished by every main method count.


The code, by concern: :mod:`.methods`, :mod:`.prompts`, :mod:`.scoring`, :mod:`.summary`, :mod:`.report`, :mod:`.run`.
"""

from __future__ import annotations

from research.toy.binding.methods import (
    DIAGNOSTICS,
    FORCED_FIELDS,
    FORCED_RE,
    METHODS,
    BindingSettings,
    check_detail_config,
    force_layout,
    forced_settings,
    forced_steps,
    method_fields,
)
from research.toy.binding.prompts import (
    SPLITS,
    TEST_POOL,
    TEST_SEED,
    VALIDATION_SEED,
    branch_objects,
    image_seed,
    make_plans,
    scene_plan,
    split_prompts,
    validation_prompts,
)
from research.toy.binding.prompts import _object_phrases as _object_phrases
from research.toy.binding.prompts import _split_description as _split_description
from research.toy.binding.report import LABELS, MASK_COLOURS, failure_table, markdown_table, save_binding_grid
from research.toy.binding.report import _label as _label
from research.toy.binding.report import _pct as _pct
from research.toy.binding.run import RECORDS_GLOB, build_items, read_records, run_benchmark, run_item, work
from research.toy.binding.run import _finish_item as _finish_item
from research.toy.binding.run import _judge_accuracy as _judge_accuracy
from research.toy.binding.run import _load_pipe as _load_pipe
from research.toy.binding.run import _spec as _spec
from research.toy.binding.run import _tokenizer as _tokenizer
from research.toy.binding.run import _worker_main as _worker_main
from research.toy.binding.run import _write_json as _write_json
from research.toy.binding.scoring import (
    IOU_TAUS,
    assign_regions,
    foreground,
    iou,
    mask_records,
    match_shapes,
    score_seen,
    upsample_masks,
)
from research.toy.binding.summary import (
    IMAGE_ERRORS,
    aggregate,
    binding_summary,
    error_summary,
    mask_summary,
    paired_delta,
)
from research.toy.binding.summary import _binding as _binding
from research.toy.binding.summary import _mask_stats as _mask_stats
from research.toy.binding.summary import _mean as _mean

__all__ = [
    "METHODS",
    "DIAGNOSTICS",
    "FORCED_RE",
    "FORCED_FIELDS",
    "forced_settings",
    "force_layout",
    "forced_steps",
    "BindingSettings",
    "method_fields",
    "check_detail_config",
    "SPLITS",
    "TEST_POOL",
    "TEST_SEED",
    "VALIDATION_SEED",
    "image_seed",
    "validation_prompts",
    "split_prompts",
    "scene_plan",
    "make_plans",
    "branch_objects",
    "IOU_TAUS",
    "score_seen",
    "assign_regions",
    "upsample_masks",
    "iou",
    "mask_records",
    "foreground",
    "match_shapes",
    "IMAGE_ERRORS",
    "error_summary",
    "binding_summary",
    "paired_delta",
    "mask_summary",
    "aggregate",
    "LABELS",
    "markdown_table",
    "failure_table",
    "MASK_COLOURS",
    "save_binding_grid",
    "RECORDS_GLOB",
    "build_items",
    "run_item",
    "work",
    "read_records",
    "run_benchmark",
]
