"""What every Detail++ pipeline class shares, whatever diffusers pipeline it extends.

:class:`DetailPipelineMixin` goes in a pipeline's bases after its family's mixin (which overrides its hooks) and
before the diffusers pipeline it extends (``StableDiffusionXLPipeline``, ``StableDiffusionPipeline``,
``StableDiffusionXLControlNetPipeline``). It holds the model's recommended settings (``detail_config.json``), the
plan (parsed or loaded, validated once), the Detail++ part of every call's checks, and the stages each pipeline's
``__call__`` runs in numbered steps, with explicit arguments, as diffusers' own ``__call__`` does: the fall-back to
the base pipeline for a plan without detail branch, the branch prompts, the image prompt's embeddings, one initial
noise for every branch, the engine (:class:`~detailpp.method.engine.DetailEngine`) over a backbone, the denoising loop
and the output. A family adds what its base model needs: ``check_base_inputs`` (its base pipeline's own checks),
``encode_branches`` (the conditioning of the branch batch), ``decode_latents_to_images``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from detailpp.backbones.unet import Conditioning
from detailpp.config import DETAIL_DEFAULTS_FILE, ConfigError, DetailConfig, check_detail_fields
from detailpp.hub import read_detail_defaults
from detailpp.inputs import (
    DetailInputError,
    check_finite,
    check_image_side,
    check_negative_prompt,
    check_prompt_window,
    check_scheduler_steps,
    check_steps,
)
from detailpp.method.backbone import Backbone
from detailpp.method.engine import BranchLayout, DetailEngine
from detailpp.parsing.planner import Planner
from detailpp.pipelines.output import DetailPlusPlusPipelineOutput
from detailpp.plan import BranchTokens, DecompositionPlan, check_prompt_text, load_plan, validate_plan

logger = logging.getLogger(__name__)

#: Arguments of the base pipelines' ``__call__`` that Detail++ does not support, with the reason.
UNSUPPORTED = {
    "prompt_2": "Detail++ encodes each branch's prompt with both text encoders",
    "negative_prompt_2": "Detail++ encodes each branch's prompt with both text encoders",
    "prompt_embeds": "branches are made from prompt text; pass `plan=` to choose the sub-prompts",
    "negative_prompt_embeds": "pass `negative_prompt` instead",
    "pooled_prompt_embeds": "branches are made from prompt text",
    "negative_pooled_prompt_embeds": "pass `negative_prompt` instead",
    "denoising_end": "the last branch must be denoised to the end",
    "guess_mode": "every branch is guided; ControlNet's guess mode is not wired into the branch batch",
}


def dtype_kwarg(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers takes it (newer releases deprecate ``torch_dtype``), else ``torch_dtype=``."""
    try:
        from diffusers.pipelines.pipeline_utils import _resolve_dtype  # noqa: F401 (exists where dtype= does)
    except ImportError:
        return {"torch_dtype": torch_dtype}
    return {"dtype": torch_dtype}


def call_default(cls: type, name: str) -> Any:
    """The default of argument ``name`` of ``cls.__call__`` (a diffusers pipeline's steps, guidance scale...)."""
    import inspect

    return inspect.signature(cls.__call__).parameters[name].default


class DetailPipelineMixin:
    """The Detail++ part of a pipeline class, independent of its base model (see the module's documentation)."""

    #: The file of a model folder that holds the Detail++ settings the model recommends.
    DETAIL_DEFAULTS_FILE = DETAIL_DEFAULTS_FILE
    #: DetailConfig fields recommended by the loaded model (empty: the paper's defaults).
    detail_defaults: Mapping[str, Any] = MappingProxyType({})
    #: The ``from_pretrained`` arguments that also say where a Hub id's ``detail_config.json`` is fetched from.
    HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
    #: The diffusers pipeline whose ``__call__`` runs a plan without detail branch (set by each subclass).
    base_pipeline_class: ClassVar[type]
    #: The base pipeline's arguments a Detail++ call refuses, with the reason.
    unsupported_arguments: ClassVar[Mapping[str, str]] = UNSUPPORTED
    #: What an image side must be a multiple of (the VAE's factor, times a transformer's patch size).
    SIDE_MULTIPLE: ClassVar[int] = 8

    @property
    def default_num_inference_steps(self) -> int:
        """The steps a call takes by default: its diffusers base's (SDXL and SD 50, FLUX.1 and SD3 28)."""
        return int(call_default(self.base_pipeline_class, "num_inference_steps"))

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale of its diffusers base's call (SDXL 5.0, SD 7.5, FLUX.1 3.5, SD3 7.0)."""
        return float(call_default(self.base_pipeline_class, "guidance_scale"))

    @property
    def plan_tokenizer(self):
        """The tokenizer whose tokens the capture layers attend to: the subjects' token positions are counted in it
        (CLIP's for the UNet families)."""
        return self.tokenizer

    # ------------------------------------------------------------------ loading and the model's recommendations

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):  # noqa: D102 - diffusers'
        hub_kwargs = {name: kwargs[name] for name in cls.HUB_KWARGS if name in kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        try:  # a local folder's file, or a Hub id's (fetched; {} when the repo has none)
            fields = read_detail_defaults(pretrained_model_name_or_path, **hub_kwargs)
        except ConfigError as e:
            raise DetailInputError(str(e)) from e
        if fields:
            pipe.set_detail_defaults(fields)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):  # noqa: D102 - diffusers' documentation
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe.detail_defaults = getattr(pipeline, "detail_defaults", cls.detail_defaults)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:  # noqa: D102 - diffusers'
        # Written before diffusers saves the folder: with push_to_hub=True it uploads the whole folder at its end.
        folder = Path(save_directory)
        if not folder.is_file():  # (a file: diffusers says it must be a folder)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.DETAIL_DEFAULTS_FILE
            if self.detail_defaults:
                path.write_text(json.dumps(dict(self.detail_defaults), indent=1) + "\n", encoding="utf-8")
            else:
                path.unlink(missing_ok=True)  # no stale recommendation from an earlier save (not pushed: a
                # file already in the Hub repo stays, since diffusers' upload adds files and deletes none)
        super().save_pretrained(save_directory, **kwargs)

    def set_detail_defaults(self, fields: Mapping[str, Any], source: str = "detail_defaults") -> None:
        """Recommend DetailConfig ``fields`` for this model (checked now: a wrong field fails here, not mid-call)."""
        try:
            check_detail_fields(dict(fields) if isinstance(fields, Mapping) else fields, source)
        except ConfigError as e:
            raise DetailInputError(str(e)) from e
        self.detail_defaults = MappingProxyType(dict(fields))

    def make_detail_config(self, preset: str = "detailpp", **fields: Any) -> DetailConfig:
        """A DetailConfig of ``fields`` over the model's :attr:`detail_defaults` over the ``preset``'s defaults
        (``"detailpp"``: ours; ``"authors"``: :meth:`DetailConfig.authors_preset`)."""
        return DetailConfig.from_fields(fields, defaults=self.detail_defaults, preset=preset)

    def plain_pipeline(self):
        """The base pipeline on this pipeline's components (no weight is copied): ``base_pipeline_class.from_pipe``,
        with this pipeline's dtype and progress-bar settings.

        ``from_pipe`` casts every module to one dtype (float32 unless told): it is given this pipeline's, which every
        pipeline :func:`detailpp.models.loading.load_pipeline` makes holds throughout.
        """
        plain = self.base_pipeline_class.from_pipe(self, **dtype_kwarg(self.dtype))
        plain.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return plain

    def decompose(
        self, prompt: str, granularity: str = "subject", planner: Planner | str | None = None
    ) -> DecompositionPlan:
        """The plan for ``prompt`` by ``planner`` (default: the spaCy parser), with this pipeline's tokenizer
        (:func:`detailpp.parsing.planner.plan_prompt`)."""
        from detailpp.parsing.planner import plan_prompt

        return plan_prompt(prompt, planner, granularity, self.plan_tokenizer)

    def prepare_plan(
        self,
        prompt: str | None,
        plan: DecompositionPlan | dict | str | None,
        config: DetailConfig,
        planner: Planner | str | None = None,
    ) -> DecompositionPlan:
        """Parse (with ``planner``, default spaCy) or load the plan and validate it against the prompt and this
        pipeline's tokenizer."""
        if plan is None:
            if prompt is None or not isinstance(prompt, str):
                raise DetailInputError("Give `prompt` as one string (Detail++ runs one prompt per call), or a `plan`.")
            check_prompt_text(prompt)
            plan = self.decompose(prompt, config.granularity, planner)
        else:
            plan = load_plan(plan)
        return validate_plan(plan, self.plan_tokenizer, prompt)

    def compile_detail(self, recompile_limit: int | None = 32, **compile_kwargs: Any) -> list[str]:
        """Regional ``torch.compile`` of the denoiser's repeated blocks, Detail++'s processors included.

        Like diffusers' ``unet.compile_repeated_blocks()``, and it also raises dynamo's recompile limit so that the
        variants of the plain pipeline and Detail++ (a few graphs per plan shape) all stay compiled
        (:func:`detailpp.method.compile.compile_detail`). The first call compiles; later calls with the same plan shape
        and configuration reuse the graphs. Outputs equal eager ones up to the backend's numerics; BENCHMARKS.md has
        the measured compilation time and speed-up. Not worth it on the CPU.

        Args:
            recompile_limit: lowest ``torch._dynamo.config.recompile_limit`` to set (process-wide); ``None``: keep.
            compile_kwargs: passed to ``torch.compile`` (``mode=``, ``backend=``, ``fullgraph=``, ...).

        Returns:
            The names of the compiled modules.
        """
        from detailpp.method.compile import compile_detail

        if self.device.type == "cpu":
            logger.warning("compile_detail() is meant for GPUs; on the CPU it adds compilation time.")
        return compile_detail(self.denoiser, recompile_limit=recompile_limit, **compile_kwargs)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's denoiser: its UNet, or its transformer (FLUX, SD3)."""
        unet = getattr(self, "unet", None)
        return unet if unet is not None else self.transformer

    # ------------------------------------------------------------------ the call's checks

    def check_detail_inputs(
        self,
        prompt: str | None,
        plan: DecompositionPlan | dict | str | None,
        detail_config: DetailConfig | None,
        height: int,
        width: int,
        num_inference_steps: int,
        kwargs: dict[str, Any],
        planner: Planner | str | None = None,
        guidance: dict[str, Any] | None = None,
        negative_prompt: Any = None,
    ) -> tuple[DetailConfig, DecompositionPlan]:
        """The Detail++ part of a call's checks, before anything is encoded: fail early, with the fix in the message.

        ``kwargs`` are the call's arguments beyond its signature; ``guidance`` names the call's guidance scales
        (``guidance_scale``, ``guidance_rescale``, FLUX's ``true_cfg_scale``...) by their argument names. Returns the
        call's DetailConfig (the model's :attr:`detail_defaults` when none is given) and its validated plan (parsed
        from ``prompt`` by ``planner`` when not given). The prompts are checked against the window of
        :attr:`plan_tokenizer`.
        """
        for name, value in kwargs.items():
            if value is None or (name == "guess_mode" and value is False):
                continue
            if name in self.unsupported_arguments:
                reason = self.unsupported_arguments[name]
                raise DetailInputError(f"`{name}` is not supported by {type(self).__name__}: {reason}.")
            if name == "num_images_per_prompt" and value != 1:
                raise DetailInputError(
                    "Detail++ makes one image per call; call it once per seed (each with its own generator)."
                )
            if name not in ("num_images_per_prompt", "callback", "callback_steps"):
                raise DetailInputError(f"Unknown argument `{name}`.")
        config = detail_config if detail_config is not None else self.make_detail_config()
        if not isinstance(config, DetailConfig):
            raise DetailInputError(f"`detail_config` must be a DetailConfig, got {type(config).__name__}.")
        hint = f" (the {type(self).__name__}'s latents are patched)" if self.SIDE_MULTIPLE != 8 else ""
        check_image_side("`height`", height, hint, self.SIDE_MULTIPLE)
        check_image_side("`width`", width, hint, self.SIDE_MULTIPLE)
        check_steps("`num_inference_steps`", num_inference_steps)
        check_scheduler_steps(self.scheduler, num_inference_steps, "`num_inference_steps`")
        for name, value in (guidance or {}).items():  # finite and >= 0 (a NaN scale would turn guidance off)
            check_finite(f"`{name}`", value, minimum=0)
        negative_prompt = check_negative_prompt("`negative_prompt`", negative_prompt)
        plan = self.prepare_plan(prompt, plan, config, planner)
        for text, what in plan.texts_to_encode(negative_prompt):  # the window rule, as the CLI and the demo
            check_prompt_window(text, what, self.plan_tokenizer)
        return config, plan

    def check_base_inputs(self, prompt: str, height: int, width: int, *args: Any, **kwargs: Any) -> None:
        """The base pipeline's own ``check_inputs`` for a Detail++ run (each family calls its base's)."""
        raise NotImplementedError

    def check_ip_adapter_inputs(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: Any,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """IP-Adapter arguments need a loaded adapter (``pipe.load_ip_adapter(...)``), and one of the two only; a
        Detail++ run (give its ``cross_attention_kwargs``) takes no ``ip_adapter_masks``."""
        if cross_attention_kwargs and cross_attention_kwargs.get("ip_adapter_masks") is not None:
            raise DetailInputError(
                "`ip_adapter_masks` (in `cross_attention_kwargs`) are not supported by Detail++: every branch gets "
                "the whole image prompt; give `ip_adapter_image` without masks."
            )
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise DetailInputError("Give `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if getattr(self.unet, "encoder_hid_proj", None) is None or not hasattr(
            self.unet.encoder_hid_proj, "image_projection_layers"
        ):
            raise DetailInputError(
                "`ip_adapter_image`/`ip_adapter_image_embeds` need an IP-Adapter: call "
                "pipe.load_ip_adapter(repo_or_folder, subfolder=..., weight_name=...) first."
            )
        if ip_adapter_image is not None and getattr(self, "image_encoder", None) is None:
            raise DetailInputError(
                "`ip_adapter_image` needs the IP-Adapter's image encoder, and none is loaded (load_ip_adapter(..., "
                "image_encoder_folder=None) skips it): load one, or pass `ip_adapter_image_embeds`."
            )

    # ------------------------------------------------------------------ the call's stages

    def plain_call(self, plan: DecompositionPlan, return_branch_images: bool, **base_kwargs: Any) -> Any:
        """A plan without detail branch: the base pipeline's own ``__call__`` on the plan's prompt with
        ``base_kwargs`` (every other argument of the call, by name)."""
        logger.info(
            "The plan has no detail branch: running plain %s on %r.", self.base_pipeline_class.__name__, plan.prompt
        )
        names = [n for n in base_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"]) if n != "masks"]
        return_dict = base_kwargs.pop("return_dict", True)
        base_kwargs |= {"prompt": plan.prompt, "callback_on_step_end_tensor_inputs": names, "return_dict": True}
        out = self.base_pipeline_class.__call__(self, **base_kwargs)
        if not return_dict:
            return (out.images,)
        branch_images = out.images if return_branch_images else None
        return DetailPlusPlusPipelineOutput(
            images=out.images, plan=plan, branch_images=branch_images, masks=None, nursing=[]
        )

    def branch_prompts(self, plan: DecompositionPlan, config: DetailConfig) -> list[str]:
        """The prompts the branches are encoded with: p0, p1, p2..pn (normalised in the authors' preset)."""
        if config.authors.normalize_prompts:  # the authors' preprocess_prompts
            return [p.lower().strip().strip(".").strip() for p in plan.prompts]
        return plan.prompts

    def begin_call(
        self,
        guidance_scale: float,
        guidance_rescale: float,
        clip_skip: int | None,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> None:
        """The call-wide values diffusers' properties read (``do_classifier_free_guidance``, ``interrupt``...)."""
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = clip_skip, cross_attention_kwargs
        self._denoising_end, self._interrupt = None, False

    def branch_image_embeds(
        self,
        layout: BranchLayout,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device,
    ) -> list[torch.Tensor] | None:
        """IP-Adapter's image embeddings, one row per batch row: the same image prompt for every branch (its
        negative in the unconditional rows), as the base pipeline prepares them for one image."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return None
        embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device, 1, layout.cfg)
        n = layout.n_branches
        out = []
        for e in embeds:  # one per adapter: [negative, positive] with CFG, else [positive]
            halves = e.chunk(2) if layout.cfg else (e,)
            out.append(torch.cat([h.repeat(n, *([1] * (h.dim() - 1))) for h in halves]))
        return out

    def guidance_embedding(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The guidance-scale embedding of guidance-distilled UNets (``time_cond_proj_dim``), else ``None``."""
        if self.unet.config.time_cond_proj_dim is None:
            return None
        scale = torch.tensor(self.guidance_scale - 1).repeat(1)
        embedding = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim)
        return embedding.to(device=device, dtype=dtype)

    def prepare_branch_latents(
        self,
        layout: BranchLayout,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """One initial noise (or the given ``latents``), repeated for every branch (FLUX packs its own)."""
        channels = self.denoiser.config.in_channels
        latents = self.prepare_latents(1, channels, height, width, dtype, device, generator, latents)
        return latents.repeat(layout.n_branches, 1, 1, 1)

    def detail_engine(
        self,
        config: DetailConfig,
        plan: DecompositionPlan,
        prompts: list[str],
        layout: BranchLayout,
        backbone: Backbone,
        num_inference_steps: int,
        extra_step_kwargs: dict[str, Any],
        return_branch_images: bool,
        return_masks: bool,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
    ) -> DetailEngine:
        """The call's :class:`~detailpp.method.engine.DetailEngine`, with the plan's token positions
        (``guidance_scale``: the classifier-free guidance the engine applies per branch)."""
        previous = DetailEngine.needs_previous_tokens(config, len(plan.branches), return_masks)
        tokens = BranchTokens.of(plan, self.plan_tokenizer, prompts, previous=previous)
        return DetailEngine(
            backbone,
            self.scheduler,
            config,
            layout,
            tokens,
            num_inference_steps=num_inference_steps,
            device=self._execution_device,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            extra_step_kwargs=extra_step_kwargs,
            keep_all=return_branch_images,
            return_masks=return_masks,
        )

    def denoise_branches(
        self,
        engine: DetailEngine,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        callback_on_step_end: Callable[..., dict] | None,
        callback_on_step_end_tensor_inputs: list[str],
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """The denoising loop: the engine's step per timestep, Detail++'s processors installed for the loop."""
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        with engine.attention(), self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents, masks = engine.step(i, t, latents)
                if callback_on_step_end is not None:
                    tensors = self.step_end_tensors(latents, masks, conditioning)
                    names = callback_on_step_end_tensor_inputs
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in names if k in tensors})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        return latents

    def step_end_tensors(
        self, latents: torch.Tensor, masks: torch.Tensor | None, conditioning: Conditioning
    ) -> dict[str, torch.Tensor | None]:
        """The tensors ``callback_on_step_end`` may ask for (``latents`` one row per branch, the step's ``masks``)."""
        tensors = {"latents": latents, "prompt_embeds": conditioning.encoder_hidden_states, "masks": masks}
        added = conditioning.added
        if "text_embeds" in added:
            tensors |= {"add_text_embeds": added["text_embeds"], "add_time_ids": added["time_ids"]}
        return tensors

    def detail_output(
        self,
        engine: DetailEngine,
        plan: DecompositionPlan,
        latents: torch.Tensor,
        output_type: str,
        return_dict: bool,
        return_branch_images: bool,
        return_masks: bool,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        """Decode the last branch (every branch when asked) and return the call's output."""
        last = engine.layout.last
        decoded = self.postprocess_latents(latents if return_branch_images else latents[last:], output_type)
        masks = engine.masks() if return_masks else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded[-1:],)
        return DetailPlusPlusPipelineOutput(
            images=decoded[-1:],
            plan=plan,
            branch_images=decoded if return_branch_images else None,
            masks=masks,
            nursing=engine.nursing_records,
        )

    # ------------------------------------------------------------------ decoding

    def postprocess_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """The branches' latents as images of ``output_type``, one branch at a time through the VAE."""
        if output_type == "latent":
            return latents
        if torch.isnan(latents).any():
            raise FloatingPointError(
                "The latents contain NaN after denoising; run the UNet in float32 or bfloat16 (--dtype float32)."
            )
        image = torch.cat([self.decode_latents_to_images(latents[i : i + 1]) for i in range(latents.shape[0])])
        if torch.isnan(image).any():
            raise FloatingPointError(
                "The decoded image contains NaN: the fp16 VAE overflowed. Load the VAE in float32"
                + self.VAE_FIX_HINT
                + "."
            )
        return self.finish_images(image, output_type)

    #: How to avoid an fp16 VAE overflow with this model family (appended to the error message).
    VAE_FIX_HINT: ClassVar[str] = ""

    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """One latent through the VAE, as the base pipeline decodes it (each subclass)."""
        raise NotImplementedError

    def finish_images(self, image: torch.Tensor, output_type: str) -> Any:
        """Decoded images (-1..1) to ``output_type`` (a subclass adds its watermark or safety checker)."""
        return self.image_processor.postprocess(image, output_type=output_type)


__all__ = ["DetailPipelineMixin", "UNSUPPORTED", "dtype_kwarg"]
