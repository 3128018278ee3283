"""Detail++ for SDXL: training-free progressive detail injection, as a diffusers pipeline.

>>> from detailpp import DetailPlusPlusPipeline, DetailConfig
"""

from detailpp.config import ConfigError, DetailConfig
from detailpp.plan import Branch, DecompositionPlan, PlanError

__version__ = "0.1.0"

__all__ = [
    "Branch",
    "ConfigError",
    "DecompositionPlan",
    "DetailConfig",
    "DetailPlusPlusPipeline",
    "DetailPlusPlusPipelineOutput",
    "PlanError",
    "decompose",
]


def __getattr__(name: str):
    # The pipeline imports diffusers and torch: load it on first use so `detailpp decompose` stays light.
    if name == "DetailPlusPlusPipeline":
        from detailpp.pipeline import DetailPlusPlusPipeline

        return DetailPlusPlusPipeline
    if name == "DetailPlusPlusPipelineOutput":
        from detailpp.pipeline_output import DetailPlusPlusPipelineOutput

        return DetailPlusPlusPipelineOutput
    if name == "decompose":
        from detailpp.decompose import decompose

        return decompose
    raise AttributeError(f"module 'detailpp' has no attribute {name!r}")
