"""``DetailPlusPlusPipeline``: Progressive Detail Injection on SDXL (paper, section 3), as a diffusers pipeline.

One call denoises p0 (the full prompt), p1 (the base prompt) and p2..pn (one sub-prompt per subject) as branches of
one UNet batch from the same initial noise (:mod:`detailpp.method.engine` runs the steps;
:mod:`detailpp.pipelines.base` holds what every Detail++ pipeline shares). This module adds SDXL's part: both text
encoders and the pooled, size and crop conditioning of each branch (:class:`SDXLBranchesMixin`, shared with the SDXL
ControlNet pipeline), SDXL's VAE decoding and watermark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import replace_example_docstring

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # diffusers < 0.40: no offload-aware helper

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module.device


from detailpp.backbones.unet import Conditioning, UNetBackbone
from detailpp.config import DetailConfig
from detailpp.inputs import DetailInputError
from detailpp.method.attention import HookError
from detailpp.method.engine import BranchLayout
from detailpp.parsing.planner import Planner
from detailpp.pipelines.base import UNSUPPORTED, DetailPipelineMixin
from detailpp.pipelines.output import DetailPlusPlusPipelineOutput
from detailpp.plan import DecompositionPlan

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


class SDXLBranchesMixin:
    """SDXL's conditioning and decoding of the branch batch (for SDXL and SDXL ControlNet pipelines)."""

    _callback_tensor_inputs = [*StableDiffusionXLPipeline._callback_tensor_inputs, "masks"]
    VAE_FIX_HINT = (
        ", or use the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix): "
        "pipe.vae = AutoencoderKL.from_pretrained('madebyollin/sdxl-vae-fp16-fix', torch_dtype=torch.float16)"
    )

    def plain_sdxl(self) -> StableDiffusionXLPipeline:
        """Plain SDXL on this pipeline's components (no weight is copied; :meth:`plain_pipeline`)."""
        return self.plain_pipeline()

    def check_base_inputs(
        self,
        prompt: str,
        height: int,
        width: int,
        negative_prompt: str | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """SDXL's own ``check_inputs`` on the call's prompt, size, negative prompt and callback tensors."""
        self.check_inputs(
            prompt,
            None,
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
        image_embeds: list[torch.Tensor] | None = None,
    ) -> Conditioning:
        """SDXL's conditioning of the branch batch: every branch's prompt through both text encoders (one negative
        prompt for all), the pooled embeddings and the size and crop ids, rows ``[uncond x B, cond x B]`` with CFG;
        IP-Adapter's ``image_embeds`` (:meth:`branch_image_embeds`) and the guidance embedding when there are."""
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
        if image_embeds is not None:
            added["image_embeds"] = image_embeds
        return Conditioning(embeds.to(device), added, self.guidance_embedding(embeds.dtype, device))

    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as SDXL does it (fp16 VAEs that ask for it are upcast; ``latents_mean``/``std`` applied)."""
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
        return image

    def finish_images(self, image: torch.Tensor, output_type: str) -> Any:
        """SDXL's watermark (when installed), then ``output_type``."""
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)


class DetailPlusPlusPipeline(SDXLBranchesMixin, DetailPipelineMixin, StableDiffusionXLPipeline):
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

    LoRA (``load_lora_weights``, ``set_adapters``, ``fuse_lora``) and IP-Adapter (``load_ip_adapter``, then
    ``ip_adapter_image=``) work as on SDXL: every branch gets them.
    """

    base_pipeline_class = StableDiffusionXLPipeline

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        planner: Planner | str | None = None,
        return_branch_images: bool = False,
        return_masks: bool = False,
        ip_adapter_image: Any | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
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
            planner: what parses ``prompt`` when no ``plan`` is given: ``"spacy"`` (default) or a planner such as
                :class:`detailpp.LLMPlanner` (a language model behind an OpenAI-compatible server).
            return_branch_images: also decode every branch (p0, p1, p2..pn). Keeps every branch computed to the
                end; the final image is the same either way.
            return_masks: also return each detail branch's normalised subject map.
            ip_adapter_image, ip_adapter_image_embeds: an image prompt for a loaded IP-Adapter
                (``pipe.load_ip_adapter(...)``), as in ``StableDiffusionXLPipeline``; every branch gets it (the masks
                come from the text tokens only). ``ip_adapter_masks`` are not supported.

        Examples:

        Returns:
            :class:`DetailPlusPlusPipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        # 0. Default height and width to the UNet's
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width

        # 1. Check every input, once; the plan (parsed from the prompt when not given)
        guidance = {"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale}
        config, plan = self.check_detail_inputs(
            prompt, plan, detail_config, height, width, num_inference_steps, kwargs, planner, guidance, negative_prompt
        )
        self.check_ip_adapter_inputs(
            ip_adapter_image, ip_adapter_image_embeds, cross_attention_kwargs if plan.branches else None
        )
        if not plan.branches:  # 2. A plan without detail branch: plain SDXL (which checks its own inputs)
            return self.plain_call(
                plan,
                return_branch_images,
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
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                original_size=original_size,
                crops_coords_top_left=crops_coords_top_left,
                target_size=target_size,
                negative_original_size=negative_original_size,
                negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                ip_adapter_image=ip_adapter_image,
                ip_adapter_image_embeds=ip_adapter_image_embeds,
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
            height,
            width,
            negative_prompt=negative_prompt,
            cross_attention_kwargs=cross_attention_kwargs,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
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


__all__ = [
    "DetailInputError",
    "DetailPlusPlusPipeline",
    "HookError",
    "SDXLBranchesMixin",
    "UNSUPPORTED",
]
