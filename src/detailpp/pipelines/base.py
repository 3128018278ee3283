"""What every Detail++ pipeline class shares, whatever diffusers pipeline it extends.

:class:`DetailPipelineMixin` goes in a pipeline's bases after its model's mixin (which overrides its hooks) and
before the diffusers pipeline it extends (``StableDiffusionXLPipeline``, ``StableDiffusionPipeline``,
``StableDiffusionXLControlNetPipeline``). It holds the
model's recommended settings (``detail_config.json``), the plan (parsed or loaded, validated once), the checks every
call makes before anything is encoded, the run of :class:`~detailpp.method.engine.DetailEngine` over the timesteps, and
the fall-back to the base pipeline's own ``__call__`` for a plan without detail branch. A subclass adds what its base
model needs: :meth:`encode_branches` (the UNet's conditioning of the branch batch), :meth:`check_base_inputs` (its base
pipeline's own checks), :meth:`decode_latents_to_images` and, for models with extra UNet inputs (ControlNet's
residuals), an ``unet_extras`` callable given to the engine.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from detailpp.config import DETAIL_DEFAULTS_FILE, ConfigError, DetailConfig, check_detail_fields
from detailpp.hub import read_detail_defaults
from detailpp.inputs import (
    DetailInputError,
    check_finite,
    check_guidance,
    check_image_side,
    check_negative_prompt,
    check_prompt_window,
    check_scheduler_steps,
    check_steps,
)
from detailpp.method.engine import BranchLayout, Conditioning, DetailEngine, UNetExtras
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


def arguments_of(function: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``kwargs`` that ``function`` takes."""
    names = inspect.signature(function).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def dtype_kwarg(torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers takes it (newer releases deprecate ``torch_dtype``), else ``torch_dtype=``."""
    try:
        from diffusers.pipelines.pipeline_utils import _resolve_dtype  # noqa: F401 (exists where dtype= does)
    except ImportError:
        return {"torch_dtype": torch_dtype}
    return {"dtype": torch_dtype}


def shared_arguments(detail_class: type, base_class: type) -> frozenset[str]:
    """The ``__call__`` arguments of a Detail++ pipeline that its base pipeline takes too (a plan without branches
    passes them on)."""
    return (
        frozenset(inspect.signature(detail_class.__call__).parameters)
        & frozenset(inspect.signature(base_class.__call__).parameters)
    ) - {"self", "kwargs"}


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
    #: The arguments of ``__call__`` passed on to :attr:`base_pipeline_class` (set after each subclass).
    base_arguments: ClassVar[frozenset[str]] = frozenset()

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

    def decompose(self, prompt: str, granularity: str = "subject") -> DecompositionPlan:
        """The plan for ``prompt``, from the spaCy parser (:func:`detailpp.parsing.decompose.decompose`)."""
        from detailpp.parsing.decompose import decompose

        return decompose(prompt, granularity=granularity, tokenizer=self.tokenizer)

    def prepare_plan(
        self, prompt: str | None, plan: DecompositionPlan | dict | str | None, config: DetailConfig
    ) -> DecompositionPlan:
        """Parse or load the plan and validate it against the prompt and this pipeline's tokenizer."""
        if plan is None:
            if prompt is None or not isinstance(prompt, str):
                raise DetailInputError("Give `prompt` as one string (Detail++ runs one prompt per call), or a `plan`.")
            check_prompt_text(prompt)
            plan = self.decompose(prompt, config.granularity)
        else:
            plan = load_plan(plan)
        return validate_plan(plan, self.tokenizer, prompt)

    def compile_detail(self, recompile_limit: int | None = 32, **compile_kwargs: Any) -> list[str]:
        """Regional ``torch.compile`` of the UNet's transformer blocks, Detail++'s processors included.

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
        return compile_detail(self.unet, recompile_limit=recompile_limit, **compile_kwargs)

    # ------------------------------------------------------------------ the call's checks

    def check_detail_inputs(
        self,
        plan: DecompositionPlan | dict | str | None = None,
        detail_config: DetailConfig | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        prompt: str | None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        **base_inputs: Any,
    ) -> tuple[DetailConfig, DecompositionPlan]:
        """Every check of the call, before anything is encoded: fail early, with the fix in the message.

        ``kwargs`` are the call's arguments beyond its signature; ``base_inputs`` go to :meth:`check_base_inputs`
        when the plan has detail branches (a plain run checks its own). Returns the call's DetailConfig (the model's
        :attr:`detail_defaults` when none is given) and its validated plan.
        """
        for name, value in (kwargs or {}).items():
            if value is None or (name == "guess_mode" and value is False):
                continue
            if name in UNSUPPORTED:
                raise DetailInputError(f"`{name}` is not supported by {type(self).__name__}: {UNSUPPORTED[name]}.")
            if name == "num_images_per_prompt" and value != 1:
                raise DetailInputError(
                    "Detail++ makes one image per call; call it once per seed (each with its own generator)."
                )
            if name not in ("num_images_per_prompt", "callback", "callback_steps"):
                raise DetailInputError(f"Unknown argument `{name}`.")
        config = detail_config if detail_config is not None else self.make_detail_config()
        if not isinstance(config, DetailConfig):
            raise DetailInputError(f"`detail_config` must be a DetailConfig, got {type(config).__name__}.")
        check_image_side("`height`", height)
        check_image_side("`width`", width)
        check_steps("`num_inference_steps`", num_inference_steps)
        check_scheduler_steps(self.scheduler, num_inference_steps, "`num_inference_steps`")
        check_guidance("`guidance_scale`", guidance_scale)
        check_finite("`guidance_rescale`", guidance_rescale, minimum=0)
        negative_prompt = check_negative_prompt("`negative_prompt`", base_inputs.get("negative_prompt"))
        plan = self.prepare_plan(prompt, plan, config)
        for text, what in plan.texts_to_encode(negative_prompt):  # the 75-token rule, as the CLI and the demo
            check_prompt_window(text, what, self.tokenizer)
        if plan.branches:
            self.check_base_inputs(plan.prompt, height, width, **base_inputs)
        return config, plan

    def check_base_inputs(self, prompt: str, height: int, width: int, **base_inputs: Any) -> None:
        """The base pipeline's own ``check_inputs`` for a Detail++ run (each subclass calls its base's)."""
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

    def plain_call(self, plan: DecompositionPlan, base_kwargs: dict[str, Any], return_branch_images: bool) -> Any:
        """A plan without detail branch: the base pipeline's own ``__call__`` with the call's arguments."""
        logger.info(
            "The plan has no detail branch: running plain %s on %r.", self.base_pipeline_class.__name__, plan.prompt
        )
        names = [n for n in base_kwargs.get("callback_on_step_end_tensor_inputs", ["latents"]) if n != "masks"]
        base_kwargs = {**base_kwargs, "prompt": plan.prompt, "callback_on_step_end_tensor_inputs": names}
        out = self.base_pipeline_class.__call__(self, **{**base_kwargs, "return_dict": True})
        if not base_kwargs.get("return_dict", True):
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

    def detail_call(self, arguments: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        """The body of every Detail++ pipeline's ``__call__``, given the call's arguments (its ``locals()``, sizes
        already defaulted) and its extra ``kwargs``: check once, plain fall-back, encode the branches, run."""
        arguments = {k: v for k, v in arguments.items() if k not in ("self", "kwargs")}
        base_kwargs = {name: value for name, value in arguments.items() if name in self.base_arguments}

        # 1. Check every input, once; the plan (parsed from the prompt when absent).
        checked = arguments_of(self.check_detail_inputs, arguments) | arguments_of(self.check_base_inputs, arguments)
        config, plan = self.check_detail_inputs(kwargs=kwargs, **checked)
        self.check_ip_adapter_inputs(
            arguments.get("ip_adapter_image"),
            arguments.get("ip_adapter_image_embeds"),
            arguments.get("cross_attention_kwargs") if plan.branches else None,
        )
        if not plan.branches:
            return self.plain_call(plan, base_kwargs, arguments.get("return_branch_images", False))
        self.begin_call(
            arguments["guidance_scale"],
            arguments.get("guidance_rescale", 0.0),
            arguments.get("clip_skip"),
            arguments.get("cross_attention_kwargs"),
        )
        prompts = self.branch_prompts(plan, config)
        layout = BranchLayout(len(prompts), self.do_classifier_free_guidance)

        # 2. Every branch's conditioning; the image prompt (and a control image), the same for every branch.
        device = self._execution_device
        conditioning = self.encode_branches(prompts, device, **arguments_of(self.encode_branches, arguments))
        image_embeds = self.branch_image_embeds(
            layout, arguments.get("ip_adapter_image"), arguments.get("ip_adapter_image_embeds"), device
        )
        if image_embeds is not None:
            conditioning.added["image_embeds"] = image_embeds
        extras = self.unet_extras_for(layout, conditioning, arguments)

        # 3. Timesteps, one initial noise for every branch, the engine's steps, decoding.
        given = {"plan": plan, "config": config, "prompts": prompts, "layout": layout, "conditioning": conditioning}
        rest = {k: v for k, v in arguments_of(self.run_detail, arguments).items() if k not in given}
        return self.run_detail(**given, **rest, unet_extras=extras)

    def unet_extras_for(
        self, layout: BranchLayout, conditioning: Conditioning, arguments: dict[str, Any]
    ) -> UNetExtras | None:
        """Extra UNet inputs of this call for the engine (:class:`~detailpp.method.engine.UNetExtras`): none here; the
        ControlNet pipeline returns its residuals."""
        return None

    def run_detail(
        self,
        *,
        plan: DecompositionPlan,
        config: DetailConfig,
        prompts: list[str],
        layout: BranchLayout,
        conditioning: Conditioning,
        height: int,
        width: int,
        num_inference_steps: int,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        eta: float,
        output_type: str,
        return_dict: bool,
        return_branch_images: bool,
        return_masks: bool,
        callback_on_step_end: Callable[..., dict] | None,
        callback_on_step_end_tensor_inputs: list[str],
        unet_extras: UNetExtras | None = None,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        """The call from the encoded branches on: timesteps, one initial noise, the engine's steps, decoding."""
        device = self._execution_device
        previous = DetailEngine.needs_previous_tokens(config, len(plan.branches), return_masks)
        tokens = BranchTokens.of(plan, self.tokenizer, prompts, previous=previous)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        # One initial noise, repeated for every branch.
        dtype = conditioning.encoder_hidden_states.dtype
        latents = self.prepare_latents(
            1, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )
        latents = latents.repeat(layout.n_branches, 1, 1, 1)
        conditioning.timestep_cond = self.guidance_embedding(latents.dtype, device)
        engine = DetailEngine(
            self.unet,
            self.scheduler,
            config,
            layout,
            conditioning,
            tokens,
            num_inference_steps=num_inference_steps,
            latent_hw=(latents.shape[-2], latents.shape[-1]),
            device=device,
            guidance_scale=self.guidance_scale,
            guidance_rescale=self.guidance_rescale,
            cross_attention_kwargs=self.cross_attention_kwargs,
            extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            keep_all=return_branch_images,
            return_masks=return_masks,
            unet_extras=unet_extras,
        )
        latents = self.denoise_branches(
            engine, timesteps, latents, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        decoded = self.postprocess_latents(latents if return_branch_images else latents[layout.last :], output_type)
        masks_out = engine.masks() if return_masks else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded[-1:],)
        return DetailPlusPlusPipelineOutput(
            images=decoded[-1:],
            plan=plan,
            branch_images=decoded if return_branch_images else None,
            masks=masks_out,
            nursing=engine.nursing_records,
        )

    def denoise_branches(
        self,
        engine: DetailEngine,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        callback_on_step_end: Callable[..., dict] | None,
        callback_on_step_end_tensor_inputs: list[str],
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
                    latents = self._step_end(
                        callback_on_step_end,
                        callback_on_step_end_tensor_inputs,
                        i,
                        t,
                        latents,
                        masks,
                        engine.conditioning,
                    )
                progress_bar.update()
        return latents

    def _step_end(
        self,
        callback: Callable[..., dict],
        names: list[str],
        i: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        masks: torch.Tensor | None,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """``callback_on_step_end`` with the tensors it asked for; returns the latents it may have replaced."""
        tensors = {"latents": latents, "prompt_embeds": conditioning.encoder_hidden_states, "masks": masks}
        added = conditioning.added
        if "text_embeds" in added:
            tensors |= {"add_text_embeds": added["text_embeds"], "add_time_ids": added["time_ids"]}
        outputs = callback(self, i, t, {k: tensors[k] for k in names if k in tensors})
        return outputs.pop("latents", latents)

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


__all__ = ["DetailPipelineMixin", "UNSUPPORTED", "arguments_of", "shared_arguments"]
