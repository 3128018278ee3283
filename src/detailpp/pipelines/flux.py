"""``DetailPlusPlusFluxPipeline``: Progressive Detail Injection on FLUX.1 (dev, schnell), as a diffusers pipeline.

The same engine as the UNet pipelines behind the backbone seam (:class:`~detailpp.backbones.mmdit.FluxBackbone`):
p0, p1 and one sub-prompt per subject denoised as branches of one transformer batch from one initial noise. FLUX.1-dev
is guidance-distilled: no classifier-free guidance, so the batch is n + 1 rows, each with the guidance embedding;
``true_cfg_scale > 1`` with a ``negative_prompt`` adds the unconditional rows (2 (n + 1)). The subjects' tokens are
T5's (``tokenizer_2``), inside the call's ``max_sequence_length`` (512 for dev, 256 for schnell). Experimental: the
mechanics are verified (docs/method.md, "Detail++ on MMDiT"), binding quality is not (no trained weights reached the
machines this was built on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import replace_example_docstring

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # diffusers < 0.40: no offload-aware helper

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module.device


from detailpp.backbones.mmdit import FLUX_DEFAULT_BLOCKS, FluxBackbone, RowConditioning, choose_blocks, joint_layers
from detailpp.config import DetailConfig
from detailpp.inputs import DetailInputError
from detailpp.method.engine import BranchLayout
from detailpp.parsing.planner import Planner
from detailpp.pipelines.base import UNSUPPORTED, DetailPipelineMixin
from detailpp.pipelines.output import DetailPlusPlusPipelineOutput
from detailpp.plan import DecompositionPlan, check_token_window

logger = logging.getLogger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from detailpp import DetailPlusPlusFluxPipeline

        >>> pipe = DetailPlusPlusFluxPipeline.from_pretrained(
        ...     "black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16
        ... ).to("cuda")
        >>> out = pipe(
        ...     "a red dog with sunglasses and a blue cat with a necklace",
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ...     return_branch_images=True,
        ... )
        >>> out.images[0].save("dog_cat.png")
        ```
"""

#: Arguments of ``FluxPipeline.__call__`` that Detail++ does not take, with the reason.
FLUX_UNSUPPORTED = {
    **UNSUPPORTED,
    "ip_adapter_image": "FLUX's IP-Adapter is not wired into the branch batch",
    "ip_adapter_image_embeds": "FLUX's IP-Adapter is not wired into the branch batch",
    "negative_ip_adapter_image": "FLUX's IP-Adapter is not wired into the branch batch",
    "negative_ip_adapter_image_embeds": "FLUX's IP-Adapter is not wired into the branch batch",
}


class DetailPlusPlusFluxPipeline(DetailPipelineMixin, FluxPipeline):
    """FLUX.1 with Detail++ (experimental): load it like ``FluxPipeline`` and call it like that pipeline, plus
    ``detail_config=``, ``plan=``, ``return_branch_images=`` and ``return_masks=``. A plan with no branch runs plain
    FLUX. LoRA (``load_lora_weights``) works as on FLUX: every branch gets it."""

    base_pipeline_class = FluxPipeline
    unsupported_arguments = FLUX_UNSUPPORTED
    #: FLUX patches its latents 2x2: a side is a multiple of the VAE's factor times 2
    SIDE_MULTIPLE = 16
    _callback_tensor_inputs = [*FluxPipeline._callback_tensor_inputs, "masks"]

    @property
    def plan_tokenizer(self):
        """T5's tokenizer: the transformer's text keys are T5 tokens (CLIP gives only the pooled embedding)."""
        return self.tokenizer_2

    @property
    def default_num_inference_steps(self) -> int:
        """28 (FLUX.1-dev), 4 for FLUX.1-schnell (timestep-distilled; told by its transformer's missing guidance
        embedding)."""
        return 28 if self.transformer.config.guidance_embeds else 4

    def check_base_inputs(
        self,
        plan: DecompositionPlan,
        height: int,
        width: int,
        negative_prompt: str | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
        max_sequence_length: int,
    ) -> None:
        """FLUX's own ``check_inputs``, and every subject inside the call's T5 window."""
        self.check_inputs(
            plan.prompt,
            None,
            height,
            width,
            negative_prompt=negative_prompt,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise DetailInputError(f"`negative_prompt` must be one string, got {type(negative_prompt).__name__}.")
        for branch in plan.branches:
            check_token_window(branch.subject, branch.subject_token_indices, max_sequence_length, "T5")

    def encode_branches(
        self,
        prompts: list[str],
        layout: BranchLayout,
        device: torch.device,
        negative_prompt: str | None,
        max_sequence_length: int,
        joint_attention_kwargs: dict[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every branch's prompt through T5 (the text keys) and CLIP (the pooled embedding): (embeddings, pooled,
        text position ids), rows ``[negative x n, cond x n]`` with true CFG, else ``[cond x n]``."""
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompts, device=device, max_sequence_length=max_sequence_length, lora_scale=lora_scale
        )
        if layout.cfg:
            negative, negative_pooled, _ = self.encode_prompt(
                prompt=[negative_prompt] * len(prompts),
                device=device,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return embeds, pooled, text_ids

    def branch_conditioning(
        self,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        image_ids: torch.Tensor,
        guidance_scale: float,
        device: torch.device,
    ) -> RowConditioning:
        """The transformer's conditioning for every row: text and pooled embeddings, FLUX.1-dev's guidance per row,
        the position ids."""
        embeds, pooled, text_ids = text
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(embeds.shape[0])
        per_row = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "guidance": guidance}
        return RowConditioning(per_row, {"txt_ids": text_ids, "img_ids": image_ids})

    def prepare_branch_latents(
        self,
        layout: BranchLayout,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One initial noise (or the given packed ``latents``), repeated for every branch, and the image ids."""
        channels = self.transformer.config.in_channels // 4
        latents, image_ids = self.prepare_latents(1, channels, height, width, dtype, device, generator, latents)
        return latents.repeat(layout.n_branches, 1, 1), image_ids

    def flux_timesteps(
        self, num_inference_steps: int, sigmas: list[float] | None, image_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """FLUX's schedule: sigmas from 1 to 1/T shifted by the image's token count, as ``FluxPipeline`` sets it."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = self.scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def flux_backbone(
        self, config: DetailConfig, conditioning: RowConditioning, height: int, width: int, joint_attention_kwargs
    ) -> FluxBackbone:
        """The transformer behind the seam, its Detail++ blocks from the config (or FLUX's defaults)."""
        n_blocks = len(self.transformer.transformer_blocks)
        share, capture = choose_blocks(
            n_blocks, FLUX_DEFAULT_BLOCKS, config.mmdit_share_blocks, config.mmdit_capture_blocks
        )
        layers = joint_layers(n_blocks, share if config.share_attention else (), capture)
        grid = (height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2))
        return FluxBackbone(
            self.transformer,
            conditioning,
            grid,
            layers,
            softmax=config.mmdit_capture_softmax,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    def step_end_tensors(
        self, latents: torch.Tensor, masks: torch.Tensor | None, conditioning: RowConditioning
    ) -> dict[str, torch.Tensor | None]:
        return {"latents": latents, "prompt_embeds": conditioning.encoder_hidden_states, "masks": masks}

    def decode_latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """One branch's packed latent through the VAE, as ``FluxPipeline`` decodes it."""
        height, width = self._detail_size
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        latents = latents.to(get_module_execution_device(self.vae), self.vae.dtype)
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_sequence_length: int = 512,
        detail_config: DetailConfig | None = None,
        plan: DecompositionPlan | dict | str | None = None,
        planner: Planner | str | None = None,
        return_branch_images: bool = False,
        return_masks: bool = False,
        **kwargs: Any,
    ) -> DetailPlusPlusPipelineOutput | tuple:
        r"""Generate one image with Detail++ on FLUX.1.

        Args:
            prompt: the full prompt p0. May be omitted when ``plan`` is given.
            negative_prompt, true_cfg_scale: FLUX's true classifier-free guidance (off unless ``true_cfg_scale > 1``
                and a negative prompt is given); the negative prompt is every branch's.
            height, width: image size in pixels, multiples of 16 (default: 1024).
            num_inference_steps, sigmas, guidance_scale, generator, latents, output_type, joint_attention_kwargs,
            max_sequence_length: as in ``FluxPipeline`` (``guidance_scale`` is FLUX.1-dev's distilled guidance, one
                per row; ``latents`` one packed initial latent, shared by every branch).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in ``FluxPipeline`` (``latents`` holds one row
                per branch; ``"masks"`` is the step's binary subject masks).
            detail_config, plan, return_branch_images, return_masks: as in :class:`~detailpp.DetailPlusPlusPipeline`
                (the transformer's Detail++ blocks: ``DetailConfig.mmdit_share_blocks``/``mmdit_capture_blocks``).

        Examples:

        Returns:
            :class:`DetailPlusPlusPipelineOutput` (or ``(images,)`` with ``return_dict=False``).
        """
        # 0. Default height and width to FLUX's
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width

        # 1. Check every input, once; the plan (parsed from the prompt when not given)
        guidance = {"guidance_scale": guidance_scale, "true_cfg_scale": true_cfg_scale}
        config, plan = self.check_detail_inputs(
            prompt, plan, detail_config, height, width, num_inference_steps, kwargs, planner, guidance, negative_prompt
        )
        if not plan.branches:  # 2. A plan without detail branch: plain FLUX (which checks its own inputs)
            return self.plain_call(
                plan,
                return_branch_images,
                negative_prompt=negative_prompt,
                true_cfg_scale=true_cfg_scale,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                generator=generator,
                latents=latents,
                output_type=output_type,
                return_dict=return_dict,
                joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length,
            )
        self.check_base_inputs(
            plan, height, width, negative_prompt, callback_on_step_end_tensor_inputs, max_sequence_length
        )

        # 3. The branches: p0, p1, p2..pn, one batch (n + 1 rows; [negative x n, cond x n] with true CFG)
        self._guidance_scale, self._joint_attention_kwargs = guidance_scale, joint_attention_kwargs or {}
        self._current_timestep, self._interrupt, self._detail_size = None, False, (height, width)
        device = self._execution_device
        prompts = self.branch_prompts(plan, config)
        layout = BranchLayout(len(prompts), true_cfg_scale > 1 and negative_prompt is not None)

        # 4. Every branch's text; one initial noise for every branch; the rows' conditioning
        text = self.encode_branches(
            prompts, layout, device, negative_prompt, max_sequence_length, joint_attention_kwargs
        )
        latents, image_ids = self.prepare_branch_latents(
            layout, height, width, text[0].dtype, device, generator, latents
        )
        conditioning = self.branch_conditioning(text, image_ids, guidance_scale, device)

        # 5. Timesteps (shifted by the image's token count)
        timesteps, num_inference_steps = self.flux_timesteps(num_inference_steps, sigmas, latents.shape[1], device)

        # 6. The engine, on the transformer
        backbone = self.flux_backbone(config, conditioning, height, width, self._joint_attention_kwargs)
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
            true_cfg_scale,
        )

        # 7. Denoise every branch; 8. decode
        latents = self.denoise_branches(
            engine, timesteps, latents, callback_on_step_end, callback_on_step_end_tensor_inputs, conditioning
        )
        return self.detail_output(engine, plan, latents, output_type, return_dict, return_branch_images, return_masks)


__all__ = ["DetailPlusPlusFluxPipeline", "FLUX_UNSUPPORTED"]
