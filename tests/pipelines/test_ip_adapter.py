"""IP-Adapter with Detail++: every branch gets the image prompt; the masks come from the text tokens only.

A tiny IP-Adapter (image projection + per-layer ``to_k_ip``/``to_v_ip``) and a tiny CLIP image encoder are built here
and saved in the files ``pipe.load_ip_adapter`` reads, so both ``ip_adapter_image=`` and ``ip_adapter_image_embeds=``
run through diffusers' own loading and encoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from detailpp import DetailConfig
from detailpp.backbones.unet import find_mask_layers
from detailpp.backbones.unet_attention import DetailAttnProcessor, IPAdapterDetailProcessor
from detailpp.inputs import DetailInputError
from detailpp.method.attention import AttentionState, CaptureSpec, HookError
from detailpp.models.full_size import random_ip_adapter_state
from detailpp.models.tiny import build_tiny_pipeline

PLAN = {  # one detail branch: p0, p1 and p2 (the same image prompt in each)
    "prompt": "a red dog and a cat",
    "base": "a dog and a cat",
    "branches": [{"prompt": "a red dog and a cat", "subject": "dog"}],
}
NO_BRANCH = {"prompt": "a red dog and a blue cat", "base": "a red dog and a blue cat", "branches": []}
CALL = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
NO_NURSING = DetailConfig(nursing=False)
IMAGE_EMBED_DIM = 16  # the tiny image encoder's projection size
WEIGHT_NAME = "ip-adapter_tiny.safetensors"


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    """A folder with the tiny IP-Adapter's safetensors and its ``image_encoder/`` (save_pretrained)."""
    folder = tmp_path_factory.mktemp("ip_adapter")
    save_file(random_ip_adapter_state(build_tiny_pipeline(0).unet, IMAGE_EMBED_DIM), str(folder / WEIGHT_NAME))
    torch.manual_seed(4)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    encoder.eval().save_pretrained(folder / "image_encoder")
    return folder


def with_adapter(folder, pipeline_class=None):
    pipe = build_tiny_pipeline(0, pipeline_class=pipeline_class)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHT_NAME)
    return pipe


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def embeds(seed: int) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for one adapter with CFG: [negative, positive], one image each."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.zeros(1, 1, IMAGE_EMBED_DIM), torch.randn(1, 1, IMAGE_EMBED_DIM, generator=g)])]


def detail(pipe, plan=PLAN, config=NO_NURSING, **kwargs):
    return pipe(plan=plan, generator=torch.Generator().manual_seed(0), detail_config=config, **CALL, **kwargs).images


def test_no_branch_plan_with_ip_adapter_is_plain_sdxl_bit_for_bit(adapter_folder):
    pipe = with_adapter(adapter_folder)
    plain = with_adapter(adapter_folder, StableDiffusionXLPipeline)
    for prompt_image in ({"ip_adapter_image": image(0)}, {"ip_adapter_image_embeds": embeds(0)}):
        ours = detail(pipe, NO_BRANCH, **prompt_image)
        theirs = plain(NO_BRANCH["prompt"], generator=torch.Generator().manual_seed(0), **CALL, **prompt_image)
        assert torch.equal(ours, theirs.images)
    assert not torch.equal(detail(pipe, NO_BRANCH, ip_adapter_image_embeds=embeds(1)), ours)  # the image counts


def test_image_prompt_changes_the_detail_output_and_nursing_runs_through_it(adapter_folder):
    pipe = with_adapter(adapter_folder)
    assert not torch.equal(
        detail(pipe, ip_adapter_image_embeds=embeds(0)), detail(pipe, ip_adapter_image_embeds=embeds(1))
    )
    weights = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert torch.isfinite(detail(pipe, config=DetailConfig(), ip_adapter_image=image(0))).all()
    assert [p for p in pipe.unet.parameters() if p.requires_grad] == weights  # nursing froze and restored them


def cross_layer(unet):
    """The first mask cross-attention layer: its name, module and IP-Adapter processor."""
    name = find_mask_layers(unet).cross_attention[0]
    attn = dict(unet.named_modules())[name]
    return name, attn, attn.processor


def layer_inputs(attn, ip, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 4, attn.to_q.in_features, generator=g)
    text = torch.randn(batch, 77, attn.to_k.in_features, generator=g)
    image_tokens = [torch.randn(batch, 1, n, attn.to_k.in_features, generator=g) for n in ip.num_tokens]
    return hidden, text, image_tokens


@pytest.mark.parametrize("reference", [False, True])
def test_processor_equals_diffusers_ip_adapter_processor_and_captures_text_only(adapter_folder, reference):
    pipe = with_adapter(adapter_folder)
    _, attn, ip = cross_layer(pipe.unet)
    assert isinstance(ip, IPAdapterAttnProcessor2_0)
    theirs = ip
    if reference:  # the materialised-map arithmetic: diffusers' IPAdapterAttnProcessor, same weights
        theirs = IPAdapterAttnProcessor(ip.hidden_size, ip.cross_attention_dim, ip.num_tokens, ip.scale)
        theirs.load_state_dict(ip.state_dict())
    ip.scale = [0.7]
    theirs.scale = [0.7]
    hidden, text, image_tokens = layer_inputs(attn, ip)
    layers = find_mask_layers(pipe.unet)
    states = [AttentionState(layers, (2, 2)) for _ in range(2)]
    for state in states:
        state.begin(capture=CaptureSpec(rows=[0, 2], tokens=[[2, 3], [5]]))
    detail_proc = DetailAttnProcessor("layer", states[0], materialise=reference)
    ours = IPAdapterDetailProcessor(detail_proc, ip)(attn, hidden, (text, image_tokens))
    expected = theirs(attn, hidden, (text, image_tokens))
    assert torch.equal(ours, expected)  # the same operations in the same order: bit for bit (measured: 0.0)
    text_only = DetailAttnProcessor("layer", states[1], materialise=reference)(attn, hidden, text)
    assert not torch.allclose(ours, text_only, atol=1e-3)  # the image prompt contributed
    assert torch.equal(states[0].maps, states[1].maps)  # captured from the 77 text keys only
    with pytest.raises(HookError, match="replaced no IP-Adapter processor"):  # image tokens, no IP weights
        detail_proc(attn, hidden, (text, image_tokens))


def test_every_branch_row_gets_the_image_embeddings(adapter_folder):
    pipe = with_adapter(adapter_folder)
    negative, positive = embeds(0)[0]
    seen: list[torch.Tensor] = []
    hook = pipe.unet.encoder_hid_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].clone()))
    try:
        detail(pipe, ip_adapter_image_embeds=embeds(0), return_branch_images=True)
    finally:
        hook.remove()
    n = len(PLAN["branches"]) + 2  # p0, p1, p2..pn
    assert len(seen) == CALL["num_inference_steps"]
    for rows in seen:
        assert rows.shape[0] == 2 * n
        assert all(torch.equal(r, negative) for r in rows[:n]) and all(torch.equal(r, positive) for r in rows[n:])


def test_scale_zero_and_unloading_give_detail_without_image_prompt(adapter_folder):
    base = detail(build_tiny_pipeline(0))
    pipe = with_adapter(adapter_folder)
    with_image = detail(pipe, ip_adapter_image=image(0))
    assert not torch.equal(with_image, base)
    pipe.set_ip_adapter_scale(0.0)
    assert torch.equal(detail(pipe, ip_adapter_image=image(0)), base)  # bound: bit for bit (adapter skipped)
    pipe.unload_ip_adapter()
    assert torch.equal(detail(pipe), base)
    with pytest.raises(DetailInputError, match=r"pipe\.load_ip_adapter\("):
        detail(pipe, ip_adapter_image=image(0))


def test_ip_adapter_processors_are_installed_then_restored_after_success_and_exception(adapter_folder):
    pipe = with_adapter(adapter_folder)
    before = dict(pipe.unet.attn_processors)
    cross = set(find_mask_layers(pipe.unet).cross_attention)
    during: dict[str, object] = {}

    def spy(p, i, t, tensors):
        during.update(p.unet.attn_processors)
        return tensors

    detail(pipe, ip_adapter_image=image(0), callback_on_step_end=spy)
    replaced = {n.removesuffix(".processor") for n, p in during.items() if p is not before[n]}
    assert replaced == cross | set(find_mask_layers(pipe.unet).self_attention)
    assert all(isinstance(during[f"{n}.processor"], IPAdapterDetailProcessor) for n in cross)
    assert all(during[f"{n}.processor"].ip_adapter is before[f"{n}.processor"] for n in cross)
    after = pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())

    def fail(p, i, t, tensors):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        detail(pipe, ip_adapter_image=image(0), callback_on_step_end=fail)
    after = pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())
    assert {k for k, _ in pipe.unet.named_parameters()} >= {f"{n}.to_k_ip.0.weight" for n in before if "attn2" in n}


@pytest.mark.parametrize("plan", [PLAN, NO_BRANCH], ids=["detail", "no-branch"])
@pytest.mark.parametrize("argument", ["ip_adapter_image", "ip_adapter_image_embeds"])
def test_ip_adapter_arguments_without_an_adapter_fail_before_denoising(plan, argument):
    pipe = build_tiny_pipeline(0)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    value = image(0) if argument == "ip_adapter_image" else embeds(0)
    with pytest.raises(DetailInputError, match=r"need an IP-Adapter: call pipe\.load_ip_adapter\("):
        detail(pipe, plan, **{argument: value})
    hook.remove()
    assert calls == []


def test_ip_adapter_masks_and_two_image_inputs_are_refused(adapter_folder):
    pipe = with_adapter(adapter_folder)
    masks = {"ip_adapter_masks": [torch.ones(1, 1, 64, 64)]}
    with pytest.raises(DetailInputError, match="`ip_adapter_masks`.*not supported by Detail\\+\\+"):
        detail(pipe, ip_adapter_image=image(0), cross_attention_kwargs=masks)
    with pytest.raises(DetailInputError, match="not both"):
        detail(pipe, ip_adapter_image=image(0), ip_adapter_image_embeds=embeds(0))


def test_reference_attention_composes_with_ip_adapter_end_to_end(adapter_folder):
    pipe = with_adapter(adapter_folder)
    sdpa = detail(pipe, ip_adapter_image_embeds=embeds(0))
    ref = detail(pipe, config=NO_NURSING.replace(materialised_attention=True), ip_adapter_image_embeds=embeds(0))
    torch.testing.assert_close(ref, sdpa, rtol=0, atol=1e-4)
    assert all(type(p).__name__ != "DetailAttnProcessor" for p in pipe.unet.attn_processors.values())
