"""Detail++ for SDXL (and SD 1.x/2.x, SDXL ControlNet; experimental: FLUX.1, SD3/3.5): training-free progressive
detail injection, as diffusers pipelines.

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
    "DetailPlusPlusControlNetPipeline",
    "DetailPlusPlusFluxPipeline",
    "DetailPlusPlusPipeline",
    "DetailPlusPlusPipelineOutput",
    "DetailPlusPlusSD3Pipeline",
    "DetailPlusPlusSDPipeline",
    "LLMPlanner",
    "PlanError",
    "SpacyPlanner",
    "decompose",
]


def __getattr__(name: str):
    # The pipeline imports diffusers and torch: load it on first use so `detailpp decompose` stays light.
    if name == "DetailPlusPlusPipeline":
        from detailpp.pipelines.sdxl import DetailPlusPlusPipeline

        return DetailPlusPlusPipeline
    if name == "DetailPlusPlusSDPipeline":
        from detailpp.pipelines.sd import DetailPlusPlusSDPipeline

        return DetailPlusPlusSDPipeline
    if name == "DetailPlusPlusControlNetPipeline":
        from detailpp.pipelines.sdxl_controlnet import DetailPlusPlusControlNetPipeline

        return DetailPlusPlusControlNetPipeline
    if name == "DetailPlusPlusFluxPipeline":
        from detailpp.pipelines.flux import DetailPlusPlusFluxPipeline

        return DetailPlusPlusFluxPipeline
    if name == "DetailPlusPlusSD3Pipeline":
        from detailpp.pipelines.sd3 import DetailPlusPlusSD3Pipeline

        return DetailPlusPlusSD3Pipeline
    if name == "DetailPlusPlusPipelineOutput":
        from detailpp.pipelines.output import DetailPlusPlusPipelineOutput

        return DetailPlusPlusPipelineOutput
    if name == "decompose":
        from detailpp.parsing.planner import decompose

        return decompose
    if name in ("LLMPlanner", "SpacyPlanner"):
        from detailpp.parsing import llm, planner

        return getattr(llm if name == "LLMPlanner" else planner, name)
    raise AttributeError(f"module 'detailpp' has no attribute {name!r}")
