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

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
    retrieve_timesteps,
)

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # diffusers < 0.40: no offload-aware helper

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module.device


from detailpp.attention import AttentionState, CaptureSpec, HookError, detail_processors, find_mask_layers
from detailpp.config import (
    DETAIL_DEFAULTS_FILE,
    ConfigError,
    DetailConfig,
    check_detail_fields,
    read_detail_defaults,
)
from detailpp.latent_modification import FIRST_DETAIL_BRANCH, accumulate_latents
from detailpp.masks import MaskAccumulator, binary_masks, normalized_maps
from detailpp.nursing import NursingRecord, max_iterations, nurse_latent, nursing_loss, step_size
from detailpp.pipeline_output import DetailPlusPlusPipelineOutput
from detailpp.plan import (
    CLIP_MAX_TOKENS,
    DecompositionPlan,
    PlanError,
    load_plan,
    subject_occurrence,
    subject_token_indices,
    validate_plan,
)

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


class DetailInputError(ValueError):
    """A call argument Detail++ cannot use; raised before any denoising starts."""


class _StopUNet(Exception):
    """Raised by a forward hook to end a nursing pass once every mask layer has run."""


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Parameters of ``module`` stop requiring gradients for the block, then get their flags back.

    Nursing needs the gradient of the latent only. Weights that require gradients (the default for a loaded model)
    make autograd keep every linear and convolution's input alive for weight gradients that are never computed; frozen,
    the pass keeps only what the latent's gradient needs. The gradient itself is the same.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


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
            if not prompt.strip():
                raise DetailInputError("The prompt is empty; write what the image should show.")
            plan = self.decompose(prompt, config.granularity)
        else:
            plan = load_plan(plan)
        return validate_plan(plan, self.tokenizer, prompt)

    def check_detail_inputs(self, height: int, width: int, num_inference_steps: int, kwargs: dict[str, Any]) -> None:
        """Fail early, with the fix in the message, on arguments Detail++ cannot run with."""
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
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise DetailInputError(f"`{name}` must be a positive multiple of 8, got {value!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise DetailInputError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")

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

    @contextmanager
    def _stop_after(self, block_name: str) -> Iterator[None]:
        """End UNet forwards after ``block_name`` (nursing needs nothing computed later)."""

        def hook(module, args, output):
            raise _StopUNet

        handle = self.unet.get_submodule(block_name).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

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
        config = detail_config if detail_config is not None else self.make_detail_config()
        if not isinstance(config, DetailConfig):
            raise DetailInputError(f"`detail_config` must be a DetailConfig, got {type(config).__name__}.")
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        self.check_detail_inputs(height, width, num_inference_steps, kwargs)
        plan = self.prepare_plan(prompt, plan, config)

        if not plan.branches:
            logger.info("The plan has no detail branch: running plain SDXL on %r.", plan.prompt)
            out = StableDiffusionXLPipeline.__call__(
                self,
                prompt=plan.prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                eta=eta,
                generator=generator,
                latents=latents,
                output_type=output_type,
                cross_attention_kwargs=cross_attention_kwargs,
                original_size=original_size,
                crops_coords_top_left=crops_coords_top_left,
                target_size=target_size,
                negative_original_size=negative_original_size,
                negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=[n for n in callback_on_step_end_tensor_inputs if n != "masks"],
            )
            if not return_dict:
                return (out.images,)
            return DetailPlusPlusPipelineOutput(
                images=out.images,
                plan=plan,
                branch_images=out.images if return_branch_images else None,
                masks=None,
                nursing=[],
            )

        self.check_inputs(
            plan.prompt,
            None,
            height,
            width,
            None,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
        self._interrupt = False
        device = self._execution_device
        cfg = self.do_classifier_free_guidance
        prompts = plan.prompts
        if config.reference.normalize_prompts:  # the authors' preprocess_prompts
            prompts = [p.lower().strip().strip(".").strip() for p in prompts]
        n_branches = len(prompts)

        # 1. Every branch's prompt through both text encoders; one negative prompt for all.
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=[negative_prompt] * n_branches if negative_prompt is not None else None,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 2. One initial noise, repeated for every branch.
        latents = self.prepare_latents(
            1, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        latents = latents.repeat(n_branches, 1, 1, 1)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        add_time_ids = self._get_add_time_ids(
            original_size or (height, width),
            crops_coords_top_left,
            target_size or (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
        cond = {
            "encoder_hidden_states": prompt_embeds,
            "text_embeds": pooled,
            "time_ids": add_time_ids.repeat(n_branches, 1),
        }
        if cfg:
            cond = {
                "encoder_hidden_states": torch.cat([negative_prompt_embeds, prompt_embeds]),
                "text_embeds": torch.cat([negative_pooled, pooled]),
                "time_ids": torch.cat([negative_add_time_ids.repeat(n_branches, 1), cond["time_ids"]]),
            }
        cond = {k: v.to(device) for k, v in cond.items()}
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(1)
            timestep_cond = self.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        def rows_of(branches: list[int]) -> list[int]:
            """Batch rows of these branches: their unconditional rows, then their conditional rows."""
            return branches + [n_branches + b for b in branches] if cfg else list(branches)

        conditioning_cache: dict[tuple[int, ...], dict[str, Any]] = {}

        def conditioning(rows: list[int]) -> dict[str, Any]:
            """The UNet's conditioning arguments for these batch rows, gathered once per row set (not per step)."""
            key = tuple(rows)
            if key not in conditioning_cache:
                picked = {k: v[list(key)] for k, v in cond.items()}
                conditioning_cache[key] = {
                    "encoder_hidden_states": picked["encoder_hidden_states"],
                    "timestep_cond": None if timestep_cond is None else timestep_cond.expand(len(key), -1),
                    "added_cond_kwargs": {"text_embeds": picked["text_embeds"], "time_ids": picked["time_ids"]},
                }
            return conditioning_cache[key]

        def predict(branches: list[int], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """Guided noise prediction of ``branches`` (latents ``x``, one row per branch)."""
            model_input = torch.cat([x, x]) if cfg else x
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(
                model_input,
                t,
                cross_attention_kwargs=cross_attention_kwargs,
                return_dict=False,
                **conditioning(rows_of(branches)),
            )[0]
            if cfg:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                if guidance_rescale > 0.0:
                    eps = rescale_noise_cfg(eps, eps_text, guidance_rescale=guidance_rescale)
            return eps

        # 3. What each step does.
        layers = find_mask_layers(self.unet, share=config.share_layers if config.share_attention else "lowest")
        latent_hw = (latents.shape[-2], latents.shape[-1])
        state = AttentionState(layers, layers.token_grid(*latent_hw), layers.expected_tokens(*latent_hw))
        num_keys = cond["encoder_hidden_states"].shape[1]
        share_steps = config.num_share_steps(num_inference_steps)
        n_detail = n_branches - FIRST_DETAIL_BRANCH
        detail_branches = list(range(FIRST_DETAIL_BRANCH, n_branches))
        want_masks = n_detail > 0 and (config.latent_modification or return_masks)
        capture = None
        if want_masks:
            if config.resolved_mask_source == "full":
                cap_rows = [rows_of([0])[-1]] * n_detail
                cap_tokens = [list(b.subject_token_indices) for b in plan.branches]
            else:
                cap_rows = [rows_of([i - 1])[-1] for i in detail_branches]
                cap_tokens = [
                    self._tokens_in(prompts[i - 1], b, plan)
                    for i, b in zip(detail_branches, plan.branches, strict=True)
                ]
            capture = CaptureSpec(rows=cap_rows, tokens=cap_tokens)
        share = []
        if config.share_attention:
            share = [(n_branches, 2 * n_branches)] if cfg else [(0, n_branches)]
            if cfg and config.share_halves == "both":
                share.insert(0, (0, n_branches))
        nursing_steps = config.nursing_steps if (config.nursing and n_detail > 0) else 0
        if nursing_steps and not (config.entropy_loss or config.centroid_alignment):
            nursing_steps = 0
        prompt_length = min(len(self.tokenizer(prompts[0], truncation=False).input_ids) - 2, CLIP_MAX_TOKENS - 2)
        nursing_tokens = [list(b.subject_token_indices) for b in plan.branches]
        uses_processors = bool(share) or capture is not None or nursing_steps > 0 or config.reference_attention
        reference = config.reference
        accumulator = MaskAccumulator(
            config.mask_average, aliased=reference.aliased_mask_sum and config.resolved_mask_source == "previous"
        )
        modify_steps = config.num_modify_steps(num_inference_steps)
        nursing_history: dict[str, Any] = {"sum": None, "passes": 0}  # reference.nursing_maps_all_passes
        last_maps: torch.Tensor | None = None
        nursing_records: list[NursingRecord] = []
        keep_all = return_branch_images or not config.prune_branches
        last = n_branches - 1

        nursing_capture = CaptureSpec(rows=[0], tokens=[], full=True)

        def nursing_loss_of(t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            rows = rows_of([0])[-1:]

            def loss_of(z0: torch.Tensor) -> torch.Tensor:
                state.begin(capture=nursing_capture, device=device, num_keys=num_keys)
                try:
                    with self._stop_after(layers.last_block):
                        self.unet(
                            z0 if reference.unscaled_nursing_input else self.scheduler.scale_model_input(z0, t),
                            t,
                            cross_attention_kwargs=cross_attention_kwargs,
                            return_dict=False,
                            **conditioning(rows),
                        )
                except _StopUNet:
                    pass
                state.end(expect_self=False)
                probs = state.mean_full_probs()
                if reference.nursing_maps_all_passes:  # one store for every pass; the gradient flows through this one
                    total = probs if nursing_history["sum"] is None else nursing_history["sum"] + probs
                    nursing_history["sum"], nursing_history["passes"] = total.detach(), nursing_history["passes"] + 1
                    probs = total / nursing_history["passes"]
                return nursing_loss(probs, nursing_tokens, prompt_length, state.grid, config)

            return loss_of

        # 4. The denoising loop.
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        processors = detail_processors(self.unet, state, config.reference_attention) if uses_processors else None
        with processors or nullcontext(), self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                in_window = i < share_steps
                if i < nursing_steps:
                    record = NursingRecord(step=i)
                    started = time.perf_counter()
                    with frozen_parameters(self.unet):
                        latents[0:1] = nurse_latent(
                            latents[0:1],
                            nursing_loss_of(t),
                            iterations=max_iterations(config, float(t), self.scheduler.config.num_train_timesteps),
                            threshold=config.threshold_at(i, n_detail, state.num_tokens),
                            alpha=step_size(config, i, num_inference_steps, self.scheduler.config.num_train_timesteps),
                            record=record,
                            update_then_test=reference.update_then_test,
                        )
                    logger.debug("nursing at step %d took %.3f s", i, time.perf_counter() - started)
                    nursing_records.append(record)

                if in_window:
                    state.begin(share=share, capture=capture, device=device, num_keys=num_keys)
                    eps = predict(list(range(n_branches)), latents, t)
                    state.end()
                    if capture is not None:
                        last_maps = accumulator.update(state.mean_maps())
                elif keep_all and reference.one_batch_after_window:
                    eps = predict(list(range(n_branches)), latents, t)  # the authors' code: one batch to the end
                else:
                    # After the window only the last branch feeds the final image. It always runs on its own, so
                    # that neither pruning nor asking for the other branches' images can change it.
                    eps = predict([last], latents[last:], t)
                    if keep_all:
                        eps = torch.cat([predict(list(range(last)), latents[:last], t), eps])
                    else:
                        eps = eps.expand_as(latents).clone()

                dtype = latents.dtype
                latents = self.scheduler.step(eps, t, latents, **extra_step_kwargs, return_dict=False)[0]
                masks = None
                if i < modify_steps and config.latent_modification and last_maps is not None:
                    normalized = normalized_maps(last_maps, state.grid, latent_hw)
                    masks = binary_masks(normalized, config.mask_threshold, relative=reference.relative_mask_threshold)
                    latents = accumulate_latents(latents, masks, blend=reference.blend_latents)
                latents = latents.to(dtype)

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": cond["encoder_hidden_states"], "masks": masks}
                    tensors |= {"add_text_embeds": cond["text_embeds"], "add_time_ids": cond["time_ids"]}
                    outputs = callback_on_step_end(
                        self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs if k in tensors}
                    )
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        # 5. Decode the last branch (and the others when asked).
        decoded = self._postprocess(latents if return_branch_images else latents[last:], output_type)
        image = decoded[-1:]
        branch_images = decoded if return_branch_images else None
        masks_out = None
        if return_masks and last_maps is not None:
            masks_out = normalized_maps(last_maps, state.grid, latent_hw).cpu()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return DetailPlusPlusPipelineOutput(
            images=image, plan=plan, branch_images=branch_images, masks=masks_out, nursing=nursing_records
        )

    def _tokens_in(self, prompt: str, branch: Any, plan: DecompositionPlan) -> list[int]:
        """Token positions of ``branch``'s subject in another branch's ``prompt`` (same occurrence as in p0)."""
        occurrence = subject_occurrence(plan.prompt, branch.subject, branch.subject_token_indices, self.tokenizer)
        try:
            return list(subject_token_indices(prompt, branch.subject, self.tokenizer, occurrence))
        except PlanError:
            return list(subject_token_indices(prompt, branch.subject, self.tokenizer, 0))


__all__ = ["DetailPlusPlusPipeline", "DetailInputError", "HookError"]
