"""``DetailPlusPlusControlNetPipeline``: Detail++ on SDXL with one or several ControlNets.

A thin subclass over the shared engine: SDXL's conditioning of the branches (:class:`SDXLBranchesMixin`), the
Detail++ call (:class:`DetailPipelineMixin`) and diffusers' ``StableDiffusionXLControlNetPipeline`` for loading, the
control image's preparation and the plain fall-back. The ControlNet's residuals of each UNet call come from
:class:`detailpp.pipelines.control.ControlResiduals` (computed once per call on its first branch, repeated to every
branch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import replace_example_docstring

from detailpp.backbones.unet import UNetBackbone
from detailpp.config import DetailConfig
from detailpp.inputs import DetailInputError
from detailpp.method.engine import BranchLayout
from detailpp.parsing.planner import Planner
from detailpp.pipelines.base import DetailPipelineMixin
from detailpp.pipelines.control import ControlResiduals, align_guidance, as_list
from detailpp.pipelines.output import DetailPlusPlusPipelineOutput
from detailpp.pipelines.sdxl import SDXLBranchesMixin
from detailpp.plan import DecompositionPlan

logger = logging.getLogger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import ControlNetModel
        >>> from diffusers.utils import load_image
        >>> from detailpp.pipelines.sdxl_controlnet import DetailPlusPlusControlNetPipeline

        >>> controlnet = ControlNetModel.from_pretrained(
        ...     "diffusers/controlnet-canny-sdxl-1.0", torch_dtype=torch.float16
        ... )
        >>> pipe = DetailPlusPlusControlNetPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", controlnet=controlnet, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> canny = load_image("canny.png")  # 1024x1024: the image's size
        >>> out = pipe("a red dog and a blue cat", image=canny, controlnet_conditioning_scale=0.5)
        >>> out.images[0].save("dog_cat.png")
        ```
"""


def image_size(image: Any) -> tuple[int, int] | None:
    """A control image's (height, width): a PIL image, an array ``(H, W, C)``/``(B, H, W, C)``, a tensor
    ``(C, H, W)``/``(B, C, H, W)`` or a list of them (the first one's); ``None`` for anything else."""
    if isinstance(image, (list, tuple)):
        return image_size(image[0]) if image else None
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim in (3, 4):
        return int(image.shape[-3]), int(image.shape[-2])
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4):
        return int(image.shape[-2]), int(image.shape[-1])
    return None


def tiny_controlnet(unet: torch.nn.Module, seed: int = 0) -> ControlNetModel:
    """A tiny random ControlNet for a tiny UNet (``ControlNetModel.from_unet``), its zero convolutions randomised
    so that the control image changes the image (a fresh ControlNet's residuals are all zero). Tests and
    ``--controlnet tiny-random`` only."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    scaled = [(m, 0.1) for m in zero_convs] + [(controlnet.controlnet_cond_embedding.conv_out, 1.0)]
    with torch.no_grad():
        for module, std in scaled:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    if unet.dtype != controlnet.dtype:
        controlnet = controlnet.to(dtype=unet.dtype)
    return controlnet.to(unet.device).eval()


def load_controlnet(source: str, unet: torch.nn.Module, seed: int = 0) -> ControlNetModel:
    """A ControlNet from a Hub id or folder, in the UNet's dtype and on its device; ``"tiny-random"``:
    :func:`tiny_controlnet` (seeded with ``seed``)."""
    if source == "tiny-random":
        return tiny_controlnet(unet, seed)
    from detailpp.pipelines.base import dtype_kwarg

    return ControlNetModel.from_pretrained(source, **dtype_kwarg(unet.dtype)).to(unet.device)


def with_controlnets(pipe, sources: list[str]) -> DetailPlusPlusControlNetPipeline:
    """``pipe`` (an SDXL Detail++ pipeline) as a ControlNet one on the same components, its dtype, settings and
    recommended Detail++ settings kept (``from_pipe``): one ControlNet, or a ``MultiControlNetModel`` of several
    (:func:`load_controlnet` each; ``tiny-random`` ones get distinct seeds)."""
    from detailpp.pipelines.base import dtype_kwarg

    nets = [load_controlnet(source, pipe.unet, seed=i) for i, source in enumerate(sources)]
    controlnet = nets[0] if len(nets) == 1 else nets
    out = DetailPlusPlusControlNetPipeline.from_pipe(pipe, controlnet=controlnet, **dtype_kwarg(pipe.dtype))
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


class DetailPlusPlusControlNetPipeline(SDXLBranchesMixin, DetailPipelineMixin, StableDiffusionXLControlNetPipeline):
    """SDXL + ControlNet with Detail++: load it like ``StableDiffusionXLControlNetPipeline`` (``from_pretrained(...,
    controlnet=cn)``, ``from_pipe(sdxl_pipe, controlnet=cn)``; a list of ControlNets makes a ``MultiControlNetModel``)
    and call it like that pipeline, plus ``detail_config=``, ``plan=``, ``return_branch_images=`` and
    ``return_masks=``. Every branch gets the control image; a plan without detail branch runs the ControlNet pipeline
    unchanged. The control image's size is the image's: height and width, when given, must equal it."""

    base_pipeline_class = StableDiffusionXLControlNetPipeline

    @property
    def default_sample_size(self) -> int:
        """The UNet's native latent size, as SDXL's pipeline has it (the demo and the CLI read it)."""
        return int(self.unet.config.sample_size)

    @property
    def guidance_rescale(self) -> float:
        """Always 0 (the ControlNet pipeline has no guidance rescale; the engine reads it)."""
        return 0.0

    @property
    def controlnets(self) -> list[torch.nn.Module]:
        """The loaded ControlNets (one, or a ``MultiControlNetModel``'s nets)."""
        net = getattr(self.controlnet, "_orig_mod", self.controlnet)
        return list(net.nets) if isinstance(net, MultiControlNetModel) else [net]

    def check_control_inputs(
        self, image: Any, height: int | None, width: int | None, scale: Any
    ) -> tuple[int, int, float | list[float]]:
        """One control image per ControlNet, the call's size equal to the image's (taken from it when not given),
        one scale per ControlNet; returns the call's height, width and scale (an int as a float: diffusers takes
        floats only)."""
        n = len(self.controlnets)
        if image is None:
            raise DetailInputError("A ControlNet pipeline needs a control image: pass `image=` (one per ControlNet).")
        images = image if n > 1 and isinstance(image, (list, tuple)) else [image]
        if n == 1 and isinstance(image, (list, tuple)) and len(image) != 1:
            images = list(image)
        if len(images) != n:
            raise DetailInputError(
                f"Got {len(images)} control images for {n} ControlNet(s): give one image per ControlNet "
                "(`image=[...]` in the order of `controlnet=[...]`)."
            )
        if isinstance(scale, (list, tuple)) and len(scale) != n:
            raise DetailInputError(
                f"Got {len(scale)} values of `controlnet_conditioning_scale` for {n} ControlNet(s): give one per "
                "ControlNet, or one float for all."
            )
        for i, im in enumerate(images):
            batch = len(im) if isinstance(im, (list, tuple)) else im.shape[0] if getattr(im, "ndim", 0) == 4 else 1
            if batch != 1:
                raise DetailInputError(
                    f"Control image {i} is a batch of {batch}: Detail++ makes one image per call, so give one control "
                    "image per ControlNet."
                )
        sizes = [image_size(im) for im in images]
        if any(s is None for s in sizes):
            raise DetailInputError("Control images must be PIL images, arrays (H, W, C) or tensors (C, H, W).")
        for i, (h, w) in enumerate(sizes):
            if h % 8 or w % 8:
                raise DetailInputError(
                    f"Control image {i} is {w}x{h} pixels; its sides must be multiples of 8: resize or crop it."
                )
        height, width = height or sizes[0][0], width or sizes[0][1]
        for i, (h, w) in enumerate(sizes):
            if (h, w) != (height, width):
                raise DetailInputError(
                    f"Control image {i} is {w}x{h} pixels but the call's size is {width}x{height}: resize the control "
                    f"image to {width}x{height}, or pass width={w}, height={h} (or leave them out: the control "
                    "image's size is used)."
                )
        return height, width, float(scale) if isinstance(scale, int) else scale

    def check_base_inputs(
        self,
        prompt: str,
        height: int,
        width: int,
        image: Any = None,
        negative_prompt: str | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        ip_adapter_image: Any | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """The ControlNet pipeline's own ``check_inputs`` (image, scales, guidance windows; IP-Adapter's are
        :meth:`check_ip_adapter_inputs`, run by ``__call__`` for every plan)."""
        start, end = align_guidance(control_guidance_start, control_guidance_end, len(self.controlnets))
        self.check_inputs(
            prompt,
            None,
            image,
            None,
            negative_prompt,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=start,
            control_guidance_end=end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    def control_residuals(
        self,
        layout: BranchLayout,
        conditioning: Any,
        image: Any,
        height: int,
        width: int,
        controlnet_conditioning_scale: float | list[float],
        control_guidance_start: float | list[float],
        control_guidance_end: float | list[float],
        num_timesteps: int,
    ) -> ControlResiduals:
        """The call's :class:`ControlResiduals` (the engine's extra UNet inputs, once the timesteps exist): each
        control image prepared once (``prepare_image``, batch 1, CFG-doubled), one scale and guidance window per
        ControlNet."""
        n = len(self.controlnets)
        images = image if n > 1 else [image]
        prepared = [
            self.prepare_image(
                image=im,
                width=width,
                height=height,
                batch_size=1,
                num_images_per_prompt=1,
                device=self._execution_device,
                dtype=self.controlnet.dtype,
                do_classifier_free_guidance=layout.cfg,
            )
            for im in images
        ]
        start, end = align_guidance(control_guidance_start, control_guidance_end, n)
        scales = [float(s) for s in as_list(controlnet_conditioning_scale, n)]
        return ControlResiduals(self.controlnet, prepared, scales, start, end, layout, conditioning, num_timesteps)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | None = None,
        image: Any = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
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
        r"""Generate one image with Detail++ under ControlNet guidance.

        Args:
            image: the control image (PIL, array or tensor), or a list of one per ControlNet; its size is the
                image's (``height``/``width`` default to it and, when given, must equal it).
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end: as in
                ``StableDiffusionXLControlNetPipeline`` (one value, or a list of one per ControlNet).
            every other argument: as in :meth:`detailpp.DetailPlusPlusPipeline.__call__` (no ``guidance_rescale``:
                the ControlNet pipeline has none); ``guess_mode`` is not supported. Returns the same output.

        Examples:
        """
        # 0. The size is the control image's
        scale = controlnet_conditioning_scale
        height, width, controlnet_conditioning_scale = self.check_control_inputs(image, height, width, scale)

        # 1. Check every input, once; the plan (parsed from the prompt when not given)
        guidance = {"guidance_scale": guidance_scale}
        config, plan = self.check_detail_inputs(
            prompt, plan, detail_config, height, width, num_inference_steps, kwargs, planner, guidance, negative_prompt
        )
        self.check_ip_adapter_inputs(
            ip_adapter_image, ip_adapter_image_embeds, cross_attention_kwargs if plan.branches else None
        )
        if not plan.branches:  # 2. A plan without detail branch: the plain ControlNet pipeline
            return self.plain_call(
                plan,
                return_branch_images,
                image=image,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                eta=eta,
                generator=generator,
                latents=latents,
                output_type=output_type,
                return_dict=return_dict,
                cross_attention_kwargs=cross_attention_kwargs,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
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
        self.check_base_inputs(
            plan.prompt,
            height,
            width,
            image,
            negative_prompt,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )

        # 3. The branches: p0, p1, p2..pn, one batch ([uncond x n, cond x n] with guidance)
        self.begin_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
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

        # 5. Timesteps, one initial noise for every branch, and the ControlNet's residuals for every UNet call
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        dtype = conditioning.encoder_hidden_states.dtype
        latents = self.prepare_branch_latents(layout, height, width, dtype, device, generator, latents)
        residuals = self.control_residuals(
            layout,
            conditioning,
            image,
            height,
            width,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            len(timesteps),
        )

        # 6. The engine, on the UNet with the residuals
        backbone = UNetBackbone(
            self.unet,
            self.scheduler,
            conditioning,
            tuple(latents.shape[-2:]),
            share_layers=config.share_layers if config.share_attention else "lowest",
            cross_attention_kwargs=cross_attention_kwargs,
            extras=residuals,
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


__all__ = ["DetailPlusPlusControlNetPipeline", "image_size", "load_controlnet", "tiny_controlnet", "with_controlnets"]
