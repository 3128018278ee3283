"""``DetailPlusPlusSD3Pipeline``: Progressive Detail Injection on Stable Diffusion 3 / 3.5, as a diffusers pipeline.

The same engine behind the backbone seam (:class:`~detailpp.backbones.mmdit.SD3Backbone`): p0, p1 and one
sub-prompt per subject denoised as branches of one transformer batch from one initial noise, with classifier-free
guidance per branch (2 (n + 1) rows). SD3's text keys are CLIP-L/G's 77 tokens (features side by side) followed by
T5's: the subjects' tokens are CLIP's (``tokenizer``), after its start token. SD3.5-medium's dual-attention blocks
(an image-only ``attn2`` beside the joint ``attn``) share branch 0's queries and keys in both. Experimental: the
mechanics are verified (docs/method.md, "Detail++ on MMDiT"), binding quality is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils import replace_example_docstring

from detailpp.backbones.mmdit import SD3_DEFAULT_BLOCKS, RowConditioning, SD3Backbone, choose_blocks, joint_layers
from detailpp.config import DetailConfig
from detailpp.inputs import DetailInputError
from detailpp.method.attention import MaskLayers
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
        >>> from detailpp import DetailPlusPlusSD3Pipeline

        >>> pipe = DetailPlusPlusSD3Pipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-3.5-large", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> out = pipe(
        ...     "a red dog with sunglasses and a blue cat with a necklace",
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... )
        >>> out.images[0].save("dog_cat.png")
        ```
"""

#: Arguments of ``StableDiffusion3Pipeline.__call__`` that Detail++ does not take, with the reason.
SD3_UNSUPPORTED = {
    **UNSUPPORTED,
    "prompt_3": "Detail++ encodes each branch's prompt with every text encoder",
    "negative_prompt_3": "pass `negative_prompt` instead",
    "ip_adapter_image": "SD3's IP-Adapter is not wired into the branch batch",
    "ip_adapter_image_embeds": "SD3's IP-Adapter is not wired into the branch batch",
    "skip_guidance_layers": "skip-layer guidance is not wired into the branch batch",
}


def sd3_layers(transformer: torch.nn.Module, share: tuple[int, ...], capture: tuple[int, ...]) -> MaskLayers:
    """The joint blocks' ``attn`` layers (:func:`~detailpp.backbones.mmdit.joint_layers`), and, in SD3.5-medium's
    dual-attention blocks, their image-only ``attn2`` among the sharing layers."""
    blocks = transformer.transformer_blocks
    layers = joint_layers(len(blocks), share, capture)
    dual = tuple(f"transformer_blocks.{b}.attn2" for b in sorted(set(share)) if getattr(blocks[b], "attn2", None))
    if not dual:
        return layers
    shared = layers.shared_self_attention + dual
    return MaskLayers(shared, layers.cross_attention, layers.level, layers.last_block, shared)


class DetailPlusPlusSD3Pipeline(DetailPipelineMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 with Detail++ (experimental): load it like ``StableDiffusion3Pipeline`` and call it like that
    pipeline, plus ``detail_config=``, ``plan=``, ``return_branch_images=`` and ``return_masks=``. A plan with no
    branch runs plain SD3. LoRA (``load_lora_weights``) works as on SD3: every branch gets it."""

    base_pipeline_class = StableDiffusion3Pipeline
    unsupported_arguments = SD3_UNSUPPORTED
    #: SD3 patches its latents 2x2: a side is a multiple of the VAE's factor times 2
    SIDE_MULTIPLE = 16
    _callback_tensor_inputs = [*StableDiffusion3Pipeline._callback_tensor_inputs, "masks"]

    def check_base_inputs(
        self,
        prompt: str,
        height: int,
        width: int,
        negative_prompt: str | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
        max_sequence_length: int,
    ) -> None:
        """SD3's own ``check_inputs`` on the call's prompt, size, negative prompt and callback tensors."""
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise DetailInputError(f"`negative_prompt` must be one string, got {type(negative_prompt).__name__}.")
        self.check_inputs(
            prompt,
            None,
            None,
            height,
            width,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )

    def encode_branches(
        self,
        prompts: list[str],
        layout: BranchLayout,
        device: torch.device,
        negative_prompt: str | None,
        clip_skip: int | None,
        max_sequence_length: int,
        joint_attention_kwargs: dict[str, Any] | None,
    ) -> RowConditioning:
        """Every branch's prompt through the three text encoders (one negative prompt for all): rows
        ``[uncond x n, cond x n]`` with guidance."""
        n = len(prompts)
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=[negative_prompt or ""] * n,
            do_classifier_free_guidance=layout.cfg,
            device=device,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            lora_scale=(joint_attention_kwargs or {}).get("scale"),
        )
        if layout.cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return RowConditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def sd3_timesteps(
        self, num_inference_steps: int, sigmas: list[float] | None, mu: float | None, latent_hw, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """SD3's schedule, shifted by the image's token count where the scheduler asks for it."""
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            config = self.scheduler.config
            mu = calculate_shift(
                (latent_hw[0] // patch) * (latent_hw[1] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs)

    def sd3_backbone(
        self, config: DetailConfig, conditioning: RowConditioning, latent_hw: tuple[int, int], joint_attention_kwargs
    ) -> SD3Backbone:
        """The transformer behind the seam, its Detail++ blocks from the config (or SD3's defaults)."""
        n_blocks = len(self.transformer.transformer_blocks)
        share, capture = choose_blocks(
            n_blocks, SD3_DEFAULT_BLOCKS, config.mmdit_share_blocks, config.mmdit_capture_blocks
        )
        layers = sd3_layers(self.transformer, share if config.share_attention else (), capture)
        patch = self.transformer.config.patch_size
        return SD3Backbone(
            self.transformer,
            conditioning,
            (latent_hw[0] // patch, latent_hw[1] // patch),
            layers,
            softmax=config.mmdit_capture_softmax,
            joint_attention_kwargs=joint_attention_kwargs,
            latent_hw=latent_hw,
        )

    def step_end_tensors(
        self, latents: torch.Tensor, masks: torch.Tensor | None, conditioning: RowConditioning
    ) -> dict[str, torch.Tensor | None]:
        return {
            "latents": latents,
            "prompt_embeds": conditioning.encoder_hidden_states,
            "pooled_prompt_embeds": conditioning.per_row["pooled_projections"],
            "masks": masks,
        }

    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """One branch's latent through the VAE, as ``StableDiffusion3Pipeline`` decodes it."""
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 256,
        mu: float | None = None,
        detail_config: DetailConfig | None = None,
        plan: DecompositionPlan | dict | str | None = None,
        planner: Planner | str | None = None,
        return_branch_images: bool = False,
        return_masks: bool = False,
        **kwargs: Any,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        r"""Generate one image with Detail++ on SD3 / SD3.5.

        Args:
            prompt: the full prompt p0. May be omitted when ``plan`` is given.
            height, width: image size in pixels, multiples of 16 (default: the transformer's sample size).
            num_inference_steps, sigmas, guidance_scale, negative_prompt, generator, latents, output_type,
            joint_attention_kwargs, clip_skip, max_sequence_length, mu: as in ``StableDiffusion3Pipeline``
                (``latents`` one initial latent and ``negative_prompt`` one string, shared by every branch).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in ``StableDiffusion3Pipeline``
                (``latents`` holds one row per branch; ``"masks"`` is the step's binary subject masks).
            detail_config, plan, return_branch_images, return_masks: as in :class:`~detailpp.DetailPlusPlusPipeline`
                (the transformer's Detail++ blocks: ``DetailConfig.mmdit_share_blocks``/``mmdit_capture_blocks``).

        Examples:

        Returns:
            :class:`DetailPlusPlusPipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        # 0. Default height and width to the transformer's
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width

        # 1. Check every input, once; the plan (parsed from the prompt when not given)
        guidance = {"guidance_scale": guidance_scale}
        config, plan = self.check_detail_inputs(
            prompt, plan, detail_config, height, width, num_inference_steps, kwargs, planner, guidance, negative_prompt
        )
        if not plan.branches:  # 2. A plan without detail branch: plain SD3 (which checks its own inputs)
            return self.plain_call(
                plan,
                return_branch_images,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                generator=generator,
                latents=latents,
                output_type=output_type,
                return_dict=return_dict,
                joint_attention_kwargs=joint_attention_kwargs,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length,
                mu=mu,
            )
        self.check_base_inputs(
            plan.prompt, height, width, negative_prompt, callback_on_step_end_tensor_inputs, max_sequence_length
        )

        # 3. The branches: p0, p1, p2..pn, one batch ([uncond x n, cond x n] with guidance)
        self._guidance_scale, self._clip_skip = guidance_scale, clip_skip
        self._joint_attention_kwargs, self._interrupt = joint_attention_kwargs, False
        self._skip_layer_guidance_scale = None
        device = self._execution_device
        prompts = self.branch_prompts(plan, config)
        layout = BranchLayout(len(prompts), self.do_classifier_free_guidance)

        # 4. Every branch's conditioning
        conditioning = self.encode_branches(
            prompts, layout, device, negative_prompt, clip_skip, max_sequence_length, joint_attention_kwargs
        )

        # 5. One initial noise for every branch; timesteps (shifted by the token count where the scheduler asks)
        dtype = conditioning.encoder_hidden_states.dtype
        latents = self.prepare_branch_latents(layout, height, width, dtype, device, generator, latents)
        latent_hw = tuple(latents.shape[-2:])
        timesteps, num_inference_steps = self.sd3_timesteps(num_inference_steps, sigmas, mu, latent_hw, device)

        # 6. The engine, on the transformer
        backbone = self.sd3_backbone(config, conditioning, latent_hw, joint_attention_kwargs)
        engine = self.detail_engine(
            config,
            plan,
            prompts,
            layout,
            backbone,
            num_inference_steps,
            {},
            return_branch_images,
            return_masks,
            guidance_scale,
        )

        # 7. Denoise every branch; 8. decode
        latents = self.denoise_branches(
            engine, timesteps, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, conditioning
        )
        return self.detail_output(engine, plan, latents, output_type, return_dict, return_branch_images, return_masks)


__all__ = ["DetailPlusPlusSD3Pipeline", "SD3_UNSUPPORTED"]
