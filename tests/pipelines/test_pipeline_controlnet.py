"""Detail++ with SDXL ControlNet on the tiny random SDXL and tiny random ControlNets (CPU, fp32, 64 px, 3 steps)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline

from detailpp import Branch, DecompositionPlan, DetailConfig
from detailpp.inputs import DetailInputError
from detailpp.models.tiny import tiny_components
from detailpp.pipelines.control import controlnet_keep
from detailpp.pipelines.sdxl import DetailPlusPlusPipeline
from detailpp.pipelines.sdxl_controlnet import DetailPlusPlusControlNetPipeline, image_size, tiny_controlnet

PLAN = DecompositionPlan(
    prompt="a red dog and a blue cat",
    base="a dog and a cat",
    branches=(Branch("a red dog and a cat", "dog", ("red",)),),
)
FAST = DetailConfig(nursing=False)
SIZE = 64


def control_image(seed: int = 0, size: int = SIZE) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def components():
    parts = tiny_components(seed=0)
    return {**parts, "controlnet": tiny_controlnet(parts["unet"], seed=1)}


@pytest.fixture(scope="module")
def pipe(components):
    p = DetailPlusPlusControlNetPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("plan", PLAN)
    kwargs.setdefault("image", control_image())
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("detail_config", FAST)
    return pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_zero_branch_plan_is_the_controlnet_pipeline_bit_for_bit(pipe, components):
    plan = DecompositionPlan(prompt="a dog", base="a dog", branches=())
    out = run(pipe, plan=plan, controlnet_conditioning_scale=0.7, control_guidance_end=0.7)
    plain = StableDiffusionXLControlNetPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    ref = plain(
        "a dog",
        image=control_image(),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        controlnet_conditioning_scale=0.7,
        control_guidance_end=0.7,
    )
    assert out.plan == plan and out.images.shape == (1, SIZE, SIZE, 3)
    assert (out.images == ref.images).all()


def test_control_image_changes_the_image(pipe):
    a, b = run(pipe, output_type="latent").images, run(pipe, output_type="latent", image=control_image(5)).images
    assert a.shape == (1, 4, SIZE // 8, SIZE // 8) and (a - b).abs().max() > 1e-3


def test_scale_zero_is_detailpp_without_controlnet_bit_for_bit(pipe, components):
    out = run(pipe, controlnet_conditioning_scale=0)
    sdxl = DetailPlusPlusPipeline(**{k: v for k, v in components.items() if k != "controlnet"})
    sdxl.set_progress_bar_config(disable=True)
    ref = sdxl(
        plan=PLAN, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
        height=SIZE, width=SIZE, detail_config=FAST,
    )  # fmt: skip
    assert (out.images == ref.images).all()


def test_every_branch_gets_the_first_branchs_residuals(pipe):
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["down_block_additional_residuals"]))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run(pipe, detail_config=DetailConfig(nursing=False, share_steps=0.5))
    finally:
        handle.remove()
    n = len(PLAN.prompts)
    # 3 steps, 2 in the window (every branch: 2n rows), then the last branch alone (2 rows)
    assert [rows for rows, _ in calls] == [2 * n, 2 * n, 2]
    for rows, residuals in calls:
        assert all(r.shape[0] == rows for r in residuals)
        for r in residuals:
            uncond, cond = r.chunk(2)
            assert (uncond == uncond[:1]).all() and (cond == cond[:1]).all()
        uncond, cond = residuals[-1].chunk(2)
        assert not torch.equal(uncond[0], cond[0])  # the halves get their own residuals (their own prompts)
        assert residuals[0].abs().max() > 0


def test_residuals_are_the_controlnet_on_the_first_branch_of_each_call(pipe):
    """Window: p0's rows (the first of the call); after it: the last branch's own, as diffusers computes them."""
    image = pipe.prepare_image(control_image(), SIZE, SIZE, 1, 1, torch.device("cpu"), torch.float32, True)
    checked = []

    def check(module, args, kwargs):
        sample, t, rows = args[0], args[1], args[0].shape[0]
        first = [0, rows // 2]
        added = {k: v[first] for k, v in kwargs["added_cond_kwargs"].items()}
        down, mid = pipe.controlnet(
            sample[first], t, encoder_hidden_states=kwargs["encoder_hidden_states"][first], controlnet_cond=image,
            conditioning_scale=0.6, added_cond_kwargs=added, return_dict=False,
        )  # fmt: skip
        index = [0] * (rows // 2) + [1] * (rows // 2)
        got = kwargs["down_block_additional_residuals"]
        assert all(torch.equal(g, d[index]) for g, d in zip(got, down, strict=True))
        assert torch.equal(kwargs["mid_block_additional_residual"], mid[index])
        checked.append(rows)

    handle = pipe.unet.register_forward_pre_hook(check, with_kwargs=True)
    try:
        run(pipe, controlnet_conditioning_scale=0.6, detail_config=DetailConfig(nursing=False, share_steps=0.34))
    finally:
        handle.remove()
    assert checked == [6, 2, 2]


def test_nursing_gets_a_conditional_residual_with_gradients_and_frozen_controlnet_weights(pipe):
    frozen, residuals = [], []

    def controlnet_call(module, args):
        if torch.is_grad_enabled():
            frozen.append(args[0].requires_grad and not any(p.requires_grad for p in module.parameters()))

    def unet_call(module, args, kwargs):
        if torch.is_grad_enabled():
            residuals.append(kwargs["mid_block_additional_residual"])

    handles = [
        pipe.controlnet.register_forward_pre_hook(controlnet_call),
        pipe.unet.register_forward_pre_hook(unet_call, with_kwargs=True),
    ]
    config = DetailConfig(nursing_steps=1, nursing_max_iterations_early=1, nursing_max_iterations_late=1)
    try:
        out = run(pipe, detail_config=config)
    finally:
        for h in handles:
            h.remove()
    assert len(out.nursing) == 1 and frozen and all(frozen) and len(residuals) == len(frozen)
    assert all(r.shape[0] == 1 and r.requires_grad for r in residuals)  # branch 0's cond row, in the graph
    assert all(p.grad is None and p.requires_grad for p in pipe.controlnet.parameters())  # flags back after


def test_multi_controlnet_with_scales_s_and_0_equals_one_controlnet_with_s_bit_for_bit(pipe, components):
    second = tiny_controlnet(components["unet"], seed=2)
    multi = DetailPlusPlusControlNetPipeline(**{**components, "controlnet": [components["controlnet"], second]})
    multi.set_progress_bar_config(disable=True)
    images = [control_image(0), control_image(3)]
    out = run(multi, image=images, controlnet_conditioning_scale=[0.8, 0.0])
    one = run(pipe, controlnet_conditioning_scale=0.8)
    assert (out.images == one.images).all()
    # the invariant is not vacuous: the second ControlNet's residuals are not zero at another scale
    prepared = [multi.prepare_image(im, SIZE, SIZE, 1, 1, torch.device("cpu"), torch.float32) for im in images]
    sample, hidden = torch.randn(1, 4, SIZE // 8, SIZE // 8), torch.randn(1, 77, 64)
    added = {
        "text_embeds": torch.randn(1, 32),
        "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32),
    }
    mids = [
        multi.controlnet(sample, 500, hidden, prepared, s, added_cond_kwargs=added, return_dict=False)[1]
        for s in ([0.8, 0.0], [0.8, 0.5])
    ]
    assert (mids[0] - mids[1]).abs().max() > 1e-3


def test_guidance_window_follows_diffusers_keep(pipe):
    assert controlnet_keep(4, [0.0, 0.5], [0.5, 1.0]) == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: seen.append(bool(k["mid_block_additional_residual"].abs().max() > 0)), with_kwargs=True
    )
    try:
        run(pipe, control_guidance_start=0.3, control_guidance_end=0.67)
    finally:
        handle.remove()
    assert seen == [False, True, False]  # i / 3 < 0.3 at step 0, (i + 1) / 3 > 0.67 at step 2


def test_processors_restored_after_success_and_after_an_exception(pipe):
    before = dict(pipe.unet.attn_processors)
    run(pipe)
    assert dict(pipe.unet.attn_processors) == before

    def boom(p, i, t, kwargs):
        raise RuntimeError("mid-call")

    with pytest.raises(RuntimeError, match="mid-call"):
        run(pipe, callback_on_step_end=boom)
    assert dict(pipe.unet.attn_processors) == before


def fails_before_denoising(pipe, match, **kwargs):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(DetailInputError, match=match):
            run(pipe, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_wrong_size_and_count_fail_before_denoising(pipe, components):
    fails_before_denoising(
        pipe, r"Control image 0 is 64x64 pixels but the call's size is 128x64: resize the control image", width=128
    )
    fails_before_denoising(pipe, r"Got 2 control images for 1 ControlNet\(s\)", image=[control_image()] * 2)
    fails_before_denoising(pipe, "multiples of 8", image=control_image(size=60))
    fails_before_denoising(pipe, "is a batch of 2", image=torch.zeros(2, 3, SIZE, SIZE))
    fails_before_denoising(pipe, "needs a control image", image=None)
    fails_before_denoising(pipe, "guess_mode", guess_mode=True)
    multi = DetailPlusPlusControlNetPipeline(**{**components, "controlnet": [components["controlnet"]] * 2})
    fails_before_denoising(multi, r"Got 1 control images for 2 ControlNet\(s\)", image=[control_image()])
    fails_before_denoising(
        multi, "2 ControlNet", image=[control_image()] * 2, controlnet_conditioning_scale=[1.0, 1.0, 1.0]
    )


def test_size_is_taken_from_the_control_image():
    assert image_size(control_image(size=48)) == (48, 48)
    assert image_size(torch.zeros(1, 3, 40, 24)) == (40, 24) and image_size(np.zeros((16, 32, 3))) == (16, 32)


def test_from_pipe_and_from_pretrained_take_a_controlnet(components, tmp_path):
    sdxl = DetailPlusPlusPipeline(**{k: v for k, v in components.items() if k != "controlnet"})
    sdxl.set_detail_defaults({"mask_threshold": 0.4})
    cn = DetailPlusPlusControlNetPipeline.from_pipe(sdxl, controlnet=components["controlnet"])
    assert cn.controlnet is components["controlnet"] and cn.unet is sdxl.unet
    assert dict(cn.detail_defaults) == {"mask_threshold": 0.4}
    sdxl.save_pretrained(tmp_path)
    loaded = DetailPlusPlusControlNetPipeline.from_pretrained(tmp_path, controlnet=components["controlnet"])
    assert isinstance(loaded, DetailPlusPlusControlNetPipeline) and loaded.controlnet is components["controlnet"]
    assert dict(loaded.detail_defaults) == {"mask_threshold": 0.4}
