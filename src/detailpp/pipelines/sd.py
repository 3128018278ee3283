"""``DetailPlusPlusSDPipeline``: Progressive Detail Injection on Stable Diffusion 1.x / 2.x, as a diffusers pipeline.

The same engine and shared part as SDXL's :class:`~detailpp.DetailPlusPlusPipeline` (:mod:`detailpp.method.engine`,
:mod:`detailpp.pipelines.base`); this module adds SD's part (:class:`SDBranchesMixin`): one text encoder and no added
conditioning, SD's VAE decoding and its safety checker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import replace_example_docstring

from detailpp.backbones.unet import Conditioning, UNetBackbone
from detailpp.config import DetailConfig
from detailpp.method.engine import BranchLayout
from detailpp.parsing.planner import Planner
from detailpp.pipelines.base import DetailPipelineMixin
from detailpp.pipelines.output import DetailPlusPlusPipelineOutput
from detailpp.plan import DecompositionPlan

logger = logging.getLogger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from detailpp import DetailConfig
        >>> from detailpp.pipelines.sd import DetailPlusPlusSDPipeline

        >>> pipe = DetailPlusPlusSDPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16
        ... ).to("cuda")
        >>> out = pipe(
        ...     "a red dog with sunglasses and a blue cat with a necklace",
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ...     detail_config=DetailConfig(mask_threshold=0.5),
        ... )
        >>> out.images[0].save("dog_cat.png")
        ```
"""


class SDBranchesMixin:
    """Stable Diffusion 1.x/2.x's conditioning and decoding of the branch batch."""

    _callback_tensor_inputs = [*StableDiffusionPipeline._callback_tensor_inputs, "masks"]

    @property
    def default_sample_size(self) -> int:
        """The UNet's native latent side (SD 1.5: 64, SD 2.1: 96), as ``StableDiffusionXLPipeline`` names it."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def default_size(self) -> tuple[int, int]:
        """The image size a call without ``height``/``width`` gets: the UNet's sample size times the VAE's factor."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def check_base_inputs(
        self,
        prompt: str,
        height: int,
        width: int,
        negative_prompt: str | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """SD's own ``check_inputs`` on the call's prompt, size, negative prompt and callback tensors."""
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    def encode_branches(
        self,
        prompts: list[str],
        device: torch.device,
        negative_prompt: str | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        image_embeds: list[torch.Tensor] | None = None,
    ) -> Conditioning:
        """SD's conditioning of the branch batch: every branch's prompt through the text encoder (one negative prompt
        for all), rows ``[uncond x B, cond x B]`` with CFG; IP-Adapter's ``image_embeds`` and the guidance embedding
        when there are."""
        n, cfg = len(prompts), self.do_classifier_free_guidance
        embeds, negative_embeds = self.encode_prompt(
            prompts,
            device,
            1,
            cfg,
            negative_prompt=[negative_prompt] * n if negative_prompt is not None else None,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
            clip_skip=clip_skip,
        )
        if cfg:
            embeds = torch.cat([negative_embeds, embeds])
        added = {} if image_embeds is None else {"image_embeds": image_embeds}
        return Conditioning(embeds.to(device), added, self.guidance_embedding(embeds.dtype, device))

    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as SD does it: ``vae.decode(latents / scaling_factor)``."""
        latents = latents.to(self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    def finish_images(self, image: torch.Tensor, output_type: str) -> Any:
        """SD's safety checker (when the pipeline has one: flagged images come back black), then ``output_type``."""
        dtype = self.text_encoder.dtype if self.text_encoder is not None else image.dtype
        image, has_nsfw_concept = self.run_safety_checker(image, self._execution_device, dtype)
        do_denormalize = [True] * image.shape[0]
        if has_nsfw_concept is not None:
            do_denormalize = [not flagged for flagged in has_nsfw_concept]
            if any(has_nsfw_concept):
                logger.warning("The safety checker flagged %d of %d image(s).", sum(has_nsfw_concept), len(image))
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)


class DetailPlusPlusSDPipeline(SDBranchesMixin, DetailPipelineMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with Detail++ (training-free progressive detail injection).

    Load it like SD (``from_pretrained``, ``from_pipe``, ``from_single_file``) and call it like
    ``StableDiffusionPipeline``, plus ``detail_config=`` and ``plan=`` as :class:`~detailpp.DetailPlusPlusPipeline`
    takes them. A plan with no branch runs plain SD. v-prediction models (SD 2.x 768) work unchanged: the engine
    guides and steps whatever the UNet predicts.

    Detail++ layers and defaults on SD. The mask and shared self-attention layers are the down and up paths' lowest
    attention level (``down_blocks.2``, ``up_blocks.1``: a 16x16 token grid at 512x512, 24x24 for SD 2.1 at 768x768;
    :func:`~detailpp.method.attention.find_mask_layers`), not the mid block (8x8). Nursing's early-stop thresholds were
    set for SDXL's 32x32 grid and scale with ``ln(grid tokens)`` (``DetailConfig.scale_thresholds``, on by default): at
    512x512 with two subjects they are ``ln 256 / ln 1024 = 0.8`` of the SDXL values. The other defaults
    (``mask_threshold`` 0.5, S = 0.8 T, six nursing steps, the step size 1750, the blur of 5 cells, sigma 1.1) are the
    SDXL ones; they are not tuned for SD (the blur covers twice the image fraction on a 16x16 grid).

    LoRA and IP-Adapter (``load_ip_adapter``, then ``ip_adapter_image=``) work as on SD: every branch gets them. A
    loaded safety checker runs on the final image (and the branch images) as in SD.
    """

    base_pipeline_class = StableDiffusionPipeline

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        ip_adapter_image: Any | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        detail_config: DetailConfig | None = None,
        plan: DecompositionPlan | dict | str | None = None,
        planner: Planner | str | None = None,
        return_branch_images: bool = False,
        return_masks: bool = False,
        **kwargs: Any,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        r"""Generate one image with Detail++.

        Args:
            prompt: the full prompt p0. May be omitted when ``plan`` is given.
            height, width: image size in pixels, multiples of 8 (default: the UNet's sample size times the VAE's
                factor, 512 for SD 1.5 and 768 for SD 2.1).
            num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt, eta, generator, latents,
            output_type, cross_attention_kwargs, guidance_rescale, clip_skip: as in ``StableDiffusionPipeline``;
                ``latents`` (one initial latent) and ``negative_prompt`` are shared by every branch.
            ip_adapter_image, ip_adapter_image_embeds: an image prompt for a loaded IP-Adapter (every branch's).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in :class:`~detailpp.DetailPlusPlusPipeline`
                (``latents`` holds one row per branch; ``"masks"`` is the step's binary subject masks).
            detail_config, plan, return_branch_images, return_masks: as in :class:`~detailpp.DetailPlusPlusPipeline`.

        Examples:

        Returns:
            :class:`DetailPlusPlusPipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        # 0. Default height and width to the UNet's
        height, width = (self.default_size()[i] if v is None else v for i, v in enumerate((height, width)))

        # 1. Check every input, once; the plan (parsed from the prompt when not given)
        guidance = {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}
        config, plan = self.check_detail_inputs(
            prompt, plan, detail_config, height, width, num_inference_steps, kwargs, planner, guidance, negative_prompt
        )
        self.check_ip_adapter_inputs(
            ip_adapter_image, ip_adapter_image_embeds, cross_attention_kwargs if plan.branches else None
        )
        if not plan.branches:  # 2. A plan without detail branch: plain SD (which checks its own inputs)
            return self.plain_call(
                plan,
                return_branch_images,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                guidance_rescale=guidance_rescale,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        self.check_base_inputs(plan.prompt, height, width, negative_prompt, callback_on_step_end_tensor_inputs)

        # 3. The branches: p0, p1, p2..pn, one batch ([uncond x n, cond x n] with guidance)
        self.begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device = self._execution_device
        prompts = self.branch_prompts(plan, config)
        layout = BranchLayout(len(prompts), self.do_classifier_free_guidance)

        # 4. Every branch's conditioning (the image prompt, the same for every branch)
        conditioning = self.encode_branches(
            prompts,
            device,
            negative_prompt=negative_prompt,
            cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip,
            image_embeds=self.branch_image_embeds(layout, ip_adapter_image, ip_adapter_image_embeds, device),
        )

        # 5. Timesteps, and one initial noise for every branch
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        dtype = conditioning.encoder_hidden_states.dtype
        latents = self.prepare_branch_latents(layout, height, width, dtype, device, generator, latents)

        # 6. The engine, on the UNet
        backbone = UNetBackbone(
            self.unet,
            self.scheduler,
            conditioning,
            tuple(latents.shape[-2:]),
            share_layers=config.share_layers if config.share_attention else "lowest",
            cross_attention_kwargs=cross_attention_kwargs,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        engine = self.detail_engine(
            config,
            plan,
            prompts,
            layout,
            backbone,
            num_inference_steps,
            extra_step_kwargs,
            return_branch_images,
            return_masks,
            self.guidance_scale,
            self.guidance_rescale,
        )

        # 7. Denoise every branch; 8. decode
        latents = self.denoise_branches(
            engine, timesteps, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, conditioning
        )
        return self.detail_output(engine, plan, latents, output_type, return_dict, return_branch_images, return_masks)


__all__ = ["DetailPlusPlusSDPipeline", "SDBranchesMixin"]
