"""``DetailPlusPlusPipeline``: Progressive Detail Injection on SDXL (paper, section 3), as a diffusers pipeline.

One call denoises p0 (the full prompt), p1 (the base prompt) and p2..pn (one sub-prompt per subject) as branches of
one UNet batch from the same initial noise:

1. classifier-free guidance per branch (batch ``[uncond x B, cond x B]``);
2. for the first S steps, shared self-attention in the lowest-resolution layers (:mod:`detailpp.attention`);
3. subject cross-attention captured in the same layers and turned into masks (:mod:`detailpp.masks`, eq. 3);
4. attention nursing of branch 0's latent at the first steps (:mod:`detailpp.nursing`, eqs. 6-9);
5. Accumulative Latent Modification after each scheduler step within S (:mod:`detailpp.latent_modification`);
6. after S steps only the last branch feeds the final image, so the others are no longer computed unless their
   images were asked for.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # diffusers < 0.40: no offload-aware helper

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module.device


from detailpp.attention import HookError
from detailpp.config import DETAIL_DEFAULTS_FILE, ConfigError, DetailConfig, check_detail_fields, read_detail_defaults
from detailpp.engine import BranchLayout, Conditioning, DetailEngine, StopUNet, frozen_parameters, stop_after
from detailpp.inputs import DetailInputError, check_image_side
from detailpp.pipeline_output import DetailPlusPlusPipelineOutput
from detailpp.plan import BranchTokens, DecompositionPlan, check_prompt_text, load_plan, validate_plan

logger = logging.getLogger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from detailpp import DetailPlusPlusPipeline, DetailConfig

        >>> pipe = DetailPlusPlusPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16
        ... ).to("cuda")
        >>> out = pipe(
        ...     "a red dog with sunglasses and a blue cat with a necklace",
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ...     detail_config=DetailConfig(mask_threshold=0.5),
        ...     return_branch_images=True,
        ... )
        >>> out.images[0].save("dog_cat.png")
        >>> print(out.plan.to_json(indent=2))
        ```
"""

#: Arguments of StableDiffusionXLPipeline.__call__ that Detail++ does not support (yet), with the reason.
UNSUPPORTED = {
    "prompt_2": "Detail++ encodes each branch's prompt with both text encoders",
    "negative_prompt_2": "Detail++ encodes each branch's prompt with both text encoders",
    "prompt_embeds": "branches are made from prompt text; pass `plan=` to choose the sub-prompts",
    "negative_prompt_embeds": "pass `negative_prompt` instead",
    "pooled_prompt_embeds": "branches are made from prompt text",
    "negative_pooled_prompt_embeds": "pass `negative_prompt` instead",
    "ip_adapter_image": "IP-Adapter is not wired into the branch batch yet",
    "ip_adapter_image_embeds": "IP-Adapter is not wired into the branch batch yet",
    "denoising_end": "the last branch must be denoised to the end",
}


class DetailPlusPlusPipeline(StableDiffusionXLPipeline):
    """SDXL with Detail++ (training-free progressive detail injection).

    Load it like SDXL (``from_pretrained``, ``from_pipe``, ``from_single_file``) and call it like SDXL, plus
    ``detail_config=`` (:class:`detailpp.DetailConfig`) and ``plan=`` (:class:`detailpp.DecompositionPlan`, a dict or
    a JSON file; parsed from the prompt with spaCy when absent). A plan with no branch runs plain SDXL.

    A model folder or Hub repo may recommend Detail++ settings for itself in ``detail_config.json`` (DetailConfig
    fields; the embedded toy model's nursing step size): ``from_pretrained`` reads it into :attr:`detail_defaults`
    (a Hub id's file is fetched with the ``revision``, ``cache_dir``, ``token`` and ``local_files_only`` it was given;
    a repo without it recommends nothing), ``from_pipe`` keeps them, ``save_pretrained`` writes them into the folder
    before diffusers saves (and, with ``push_to_hub=True``, uploads) it, and a call without ``detail_config=`` (or
    :meth:`make_detail_config`) uses them, every other field keeping DetailConfig's default.
    """

    #: The file of a model folder that holds the Detail++ settings the model recommends.
    DETAIL_DEFAULTS_FILE = DETAIL_DEFAULTS_FILE
    #: DetailConfig fields recommended by the loaded model (empty: the paper's defaults).
    detail_defaults: Mapping[str, Any] = MappingProxyType({})

    #: What ``callback_on_step_end`` may ask for: SDXL's tensors, and ``masks`` (the step's binary subject masks,
    #: detail branches x H x W, ``None`` in steps without latent modification).
    _callback_tensor_inputs = [*StableDiffusionXLPipeline._callback_tensor_inputs, "masks"]

    #: The ``from_pretrained`` arguments that also say where a Hub id's ``detail_config.json`` is fetched from.
    HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")

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
        (``"detailpp"``: ours; ``"authors"``: :meth:`DetailConfig.reference_preset`)."""
        return DetailConfig.preset(preset, **{**self.detail_defaults, **fields})

    def plain_sdxl(self) -> StableDiffusionXLPipeline:
        """Plain SDXL on this pipeline's components (no weight is copied): ``StableDiffusionXLPipeline.from_pipe``,
        with this pipeline's dtype and progress-bar settings.

        ``from_pipe`` casts every module to one dtype (float32 unless told): it is given this pipeline's, which every
        pipeline :func:`detailpp.loading.load_pipeline` makes holds throughout. (For a pipeline whose modules hold
        different dtypes, build ``StableDiffusionXLPipeline(**pipe.components)`` instead.)
        """
        from detailpp.loading import dtype_kwarg

        plain = StableDiffusionXLPipeline.from_pipe(self, **dtype_kwarg(self.dtype))
        plain.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return plain

    def decompose(self, prompt: str, granularity: str = "subject") -> DecompositionPlan:
        """The plan for ``prompt``, from the spaCy parser (:func:`detailpp.decompose.decompose`)."""
        from detailpp.decompose import decompose

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
        variants of plain SDXL and Detail++ (a few graphs per plan shape) all stay compiled
        (:func:`detailpp.compile.compile_detail`). The first call compiles; later calls with the same plan shape and
        configuration reuse the graphs. Outputs equal eager ones up to the backend's numerics. Measured on one H200
        with full-size SDXL (BENCHMARKS.md): ~9 s of compilation in the first call, then 1.10x faster (2 subjects,
        nursing off); not worth it on the CPU.

        Args:
            recompile_limit: lowest ``torch._dynamo.config.recompile_limit`` to set (process-wide); ``None``: keep.
            compile_kwargs: passed to ``torch.compile`` (``mode=``, ``backend=``, ``fullgraph=``, ...).

        Returns:
            The names of the compiled modules.
        """
        from detailpp.compile import compile_detail

        if self.device.type == "cpu":
            logger.warning("compile_detail() is meant for GPUs; on the CPU it adds compilation time.")
        return compile_detail(self.unet, recompile_limit=recompile_limit, **compile_kwargs)

    # ------------------------------------------------------------------ helpers used by __call__

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as SDXL does it (fp16 VAEs that ask for it are upcast), with a clear error on NaNs."""
        if torch.isnan(latents).any():
            raise FloatingPointError(
                "The latents contain NaN after denoising; run the UNet in float32 or bfloat16 (--dtype float32)."
            )
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        elif latents.dtype != self.vae.dtype:
            latents = latents.to(self.vae.dtype)
        mean = getattr(self.vae.config, "latents_mean", None)
        std = getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        latents = latents.to(get_module_execution_device(self.vae))
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if torch.isnan(image).any():
            raise FloatingPointError(
                "The decoded image contains NaN: the fp16 VAE overflowed. Load the VAE in float32, or use the "
                "fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix): "
                "pipe.vae = AutoencoderKL.from_pretrained('madebyollin/sdxl-vae-fp16-fix', torch_dtype=torch.float16)."
            )
        return image

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        images = [self._decode(latents[i : i + 1]) for i in range(latents.shape[0])]
        image = torch.cat(images)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    def _stop_after(self, block_name: str):
        """End UNet forwards after ``block_name`` (:func:`detailpp.engine.stop_after`)."""
        return stop_after(self.unet, block_name)

    # ------------------------------------------------------------------ the call's stages

    def check_detail_inputs(
        self,
        plan: DecompositionPlan | dict | str | None,
        detail_config: DetailConfig | None,
        kwargs: dict[str, Any],
        *,
        prompt: str | None,
        height: int,
        width: int,
        num_inference_steps: int,
        negative_prompt: str | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> tuple[DetailConfig, DecompositionPlan]:
        """Every check of the call, before anything is encoded: fail early, with the fix in the message.

        ``kwargs`` are the call's arguments beyond its signature. Returns the call's DetailConfig (the model's
        :attr:`detail_defaults` when none is given) and its validated plan.
        """
        for name, value in kwargs.items():
            if value is None:
                continue
            if name in UNSUPPORTED:
                raise DetailInputError(f"`{name}` is not supported by DetailPlusPlusPipeline: {UNSUPPORTED[name]}.")
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
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise DetailInputError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        plan = self.prepare_plan(prompt, plan, config)
        if plan.branches:  # (plain SDXL checks its own)
            self.check_inputs(
                plan.prompt,
                None,
                height,
                width,
                None,
                negative_prompt=negative_prompt,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        return config, plan

    def _plain_sdxl(self, plan: DecompositionPlan, sdxl_kwargs: dict[str, Any], return_branch_images: bool) -> Any:
        """A plan without detail branch: SDXL's own ``__call__`` with the call's SDXL arguments."""
        logger.info("The plan has no detail branch: running plain SDXL on %r.", plan.prompt)
        names = [n for n in sdxl_kwargs["callback_on_step_end_tensor_inputs"] if n != "masks"]
        sdxl_kwargs = {**sdxl_kwargs, "prompt": plan.prompt, "callback_on_step_end_tensor_inputs": names}
        out = StableDiffusionXLPipeline.__call__(self, **{**sdxl_kwargs, "return_dict": True})
        if not sdxl_kwargs["return_dict"]:
            return (out.images,)
        branch_images = out.images if return_branch_images else None
        return DetailPlusPlusPipelineOutput(
            images=out.images, plan=plan, branch_images=branch_images, masks=None, nursing=[]
        )

    def branch_prompts(self, plan: DecompositionPlan, config: DetailConfig) -> list[str]:
        """The prompts the branches are encoded with: p0, p1, p2..pn (normalised in the authors' preset)."""
        if config.reference.normalize_prompts:  # the authors' preprocess_prompts
            return [p.lower().strip().strip(".").strip() for p in plan.prompts]
        return plan.prompts

    def encode_branches(
        self,
        prompts: list[str],
        device: torch.device,
        height: int,
        width: int,
        negative_prompt: str | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
    ) -> Conditioning:
        """SDXL's conditioning of the branch batch: every branch's prompt through both text encoders (one negative
        prompt for all), the pooled embeddings and the size and crop ids, rows ``[uncond x B, cond x B]`` with CFG."""
        n, cfg = len(prompts), self.do_classifier_free_guidance
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=[negative_prompt] * n if negative_prompt is not None else None,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=clip_skip,
        )
        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            original_size or (height, width),
            crops_coords_top_left,
            target_size or (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
        time_ids = time_ids.repeat(n, 1)
        if cfg:
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([negative_time_ids.repeat(n, 1), time_ids])
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)}
        return Conditioning(embeds.to(device), added)

    def guidance_embedding(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The guidance-scale embedding of guidance-distilled UNets (``time_cond_proj_dim``), else ``None``."""
        if self.unet.config.time_cond_proj_dim is None:
            return None
        scale = torch.tensor(self.guidance_scale - 1).repeat(1)
        embedding = self.get_guidance_scale_embedding(scale, embedding_dim=self.unet.config.time_cond_proj_dim)
        return embedding.to(device=device, dtype=dtype)

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
        tensors |= {
            "add_text_embeds": conditioning.added["text_embeds"],
            "add_time_ids": conditioning.added["time_ids"],
        }
        outputs = callback(self, i, t, {k: tensors[k] for k in names if k in tensors})
        return outputs.pop("latents", latents)

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        detail_config: DetailConfig | None = None,
        plan: DecompositionPlan | dict | str | None = None,
        return_branch_images: bool = False,
        return_masks: bool = False,
        **kwargs: Any,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        r"""Generate one image with Detail++.

        Args:
            prompt: the full prompt p0. May be omitted when ``plan`` is given.
            negative_prompt: shared by every branch.
            height, width: image size in pixels, multiples of 8 (default: the UNet's sample size).
            num_inference_steps, timesteps, sigmas, guidance_scale, guidance_rescale, eta, generator, latents,
            cross_attention_kwargs, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, clip_skip: as in ``StableDiffusionXLPipeline``;
                ``latents`` is one initial latent, shared by every branch.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: called after each step with ``latents`` holding one row per branch (rows of
                branches that were pruned after the first S steps hold no meaningful values).
            detail_config: every Detail++ setting (:class:`detailpp.DetailConfig`).
            plan: the decomposition plan; parsed from ``prompt`` when absent.
            return_branch_images: also decode every branch (p0, p1, p2..pn). Keeps every branch computed to the
                end; the final image is the same either way.
            return_masks: also return each detail branch's normalised subject map.

        Returns:
            :class:`DetailPlusPlusPipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        sdxl_kwargs = {name: value for name, value in locals().items() if name in SDXL_ARGUMENTS}

        # 1. Check every input, once; the plan (parsed from the prompt when absent).
        checked = _arguments_of(self.check_detail_inputs, sdxl_kwargs)
        config, plan = self.check_detail_inputs(plan, detail_config, kwargs, **checked)
        if not plan.branches:
            return self._plain_sdxl(plan, sdxl_kwargs, return_branch_images)
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = clip_skip, cross_attention_kwargs
        self._denoising_end, self._interrupt = None, False
        device = self._execution_device
        prompts = self.branch_prompts(plan, config)
        layout = BranchLayout(len(prompts), self.do_classifier_free_guidance)

        # 2. Every branch's conditioning.
        conditioning = self.encode_branches(prompts, device, **_arguments_of(self.encode_branches, sdxl_kwargs))
        previous = DetailEngine.needs_previous_tokens(config, len(plan.branches), return_masks)
        tokens = BranchTokens.of(plan, self.tokenizer, prompts, previous=previous)

        # 3. Timesteps.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 4. One initial noise, repeated for every branch.
        dtype = conditioning.encoder_hidden_states.dtype
        latents = self.prepare_latents(
            1, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )
        latents = latents.repeat(layout.n_branches, 1, 1, 1)
        conditioning.timestep_cond = self.guidance_embedding(latents.dtype, device)

        # 5. The Detail++ engine of this call.
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
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            cross_attention_kwargs=cross_attention_kwargs,
            extra_step_kwargs=self.prepare_extra_step_kwargs(generator, eta),
            keep_all=return_branch_images,
            return_masks=return_masks,
        )

        # 6. The denoising loop.
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        with engine.attention(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents, masks = engine.step(i, t, latents)
                if callback_on_step_end is not None:
                    latents = self._step_end(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, masks, conditioning
                    )
                progress_bar.update()

        # 7. Decode the last branch (and the others when asked).
        decoded = self._postprocess(latents if return_branch_images else latents[layout.last :], output_type)
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


#: The arguments of :meth:`DetailPlusPlusPipeline.__call__` that plain SDXL takes too (a plan without branches
#: passes them on).
SDXL_ARGUMENTS = (
    frozenset(inspect.signature(DetailPlusPlusPipeline.__call__).parameters)
    & frozenset(inspect.signature(StableDiffusionXLPipeline.__call__).parameters)
) - {"self", "kwargs"}


def _arguments_of(function: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The items of ``kwargs`` that ``function`` takes."""
    names = inspect.signature(function).parameters
    return {k: v for k, v in kwargs.items() if k in names}


#: The former private names (benchmarks/gpu_benchmark.py uses them).
_StopUNet = StopUNet

__all__ = ["DetailPlusPlusPipeline", "DetailInputError", "HookError", "frozen_parameters"]
