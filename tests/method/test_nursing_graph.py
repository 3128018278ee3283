"""The nursing pass as one function of the denoiser input (what is replayed as a CUDA graph on a GPU, by default): on
the CPU it runs eagerly and must compute the nursing loss and gradient bit for bit (tiny random SDXL). The capture
itself needs CUDA (``benchmarks/nursing_graph_default.py`` checks it on the GPU, with offload, LoRA and IP-Adapter).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from detailpp import DetailConfig
from detailpp.config import ConfigError
from detailpp.method.engine import DetailEngine
from detailpp.method.nursing import (
    Nursing,
    NursingRecord,
    loss_and_gradient,
    moves_weights_in_forward,
    nurse_latent,
    subject_distributions,
    token_columns,
    use_nursing_graphs,
)
from detailpp.models.tiny import build_tiny_pipeline
from tests.plans import TEDDY_PLAN

PLAN = TEDDY_PLAN
#: two nursing steps of three passes each, every pass updating (threshold 0), both loss terms
CONFIG = DetailConfig(
    nursing_steps=2,
    nursing_thresholds=(0.0, 0.0),
    nursing_max_iterations_early=3,
    nursing_max_iterations_late=3,
    entropy_loss=True,
    centroid_alignment=True,
)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def run(pipe, config=CONFIG, steps: int = 3):
    return pipe(
        plan=PLAN,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        detail_config=config,
    )


def test_token_columns_give_the_same_subject_distributions():
    probs = torch.rand(64, 77, generator=torch.Generator().manual_seed(0))
    tokens = [[2, 3], [5]]
    expected = subject_distributions(probs, tokens, 9, 0.5)
    got = subject_distributions(probs, tokens, 9, 0.5, columns=token_columns(tokens, "cpu"))
    assert torch.equal(got, expected)
    assert [c.tolist() for c in token_columns(tokens, "cpu")] == [[1, 2], [4]]


def test_nursing_gradient_equals_the_eager_loss_and_autograd_bit_for_bit(pipe, monkeypatch):
    """The pass from its own leaf (the denoiser input), then back through the input scaling, gives the loss and the
    gradient that one autograd pass from the latent gives."""
    seen: list[tuple] = []
    nurse = DetailEngine.nurse

    def check(engine, i, t, latents):
        if i == 0:
            z0 = latents[0:1].detach() + 0.1 * torch.randn_like(latents[0:1])
            a = z0.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = engine.nursing.loss(engine.backbone.model_input(a, t), t, engine)
                (grad,) = torch.autograd.grad(loss, a)
            b = z0.clone().requires_grad_(True)
            loss_b, grad_b = engine.nursing.gradient(b, t, engine, engine.backbone.model_input)
            seen.append((loss.detach(), grad, loss_b.detach(), grad_b))
        return nurse(engine, i, t, latents)

    monkeypatch.setattr(DetailEngine, "nurse", check)
    run(pipe)
    ((loss, grad, loss_b, grad_b),) = seen
    assert torch.equal(loss_b, loss) and torch.equal(grad_b, grad)
    assert grad.abs().sum() > 0  # the gradient reaches the latent through the scheduler's scaling


def test_nurse_latent_with_gradient_of_follows_loss_of_exactly():
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def loss_of(z):
        return (z @ w).tanh().pow(2).sum()

    start = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    kwargs = dict(iterations=4, threshold=0.5, alpha=0.1)
    r1, r2 = NursingRecord(step=0), NursingRecord(step=0)
    a = nurse_latent(start, loss_of, record=r1, **kwargs)
    b = nurse_latent(start, None, record=r2, gradient_of=lambda z: loss_and_gradient(loss_of, z), **kwargs)
    assert torch.equal(a, b) and r1.losses == r2.losses and r1.updates == r2.updates == 4
    with pytest.raises(ValueError, match="exactly one of loss_of and gradient_of"):
        nurse_latent(start, loss_of, record=r1, gradient_of=lambda z: loss_and_gradient(loss_of, z), **kwargs)


def graphs_of_each_call(monkeypatch) -> list[bool]:
    """Records, for every call from now on, whether its nursing replays CUDA graphs."""
    decided: list[bool] = []
    init = Nursing.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        decided.append(self.graphs)

    monkeypatch.setattr(Nursing, "__init__", recording)
    return decided


def test_the_switch_runs_the_graph_path_and_changes_nothing(pipe, monkeypatch):
    eager = run(pipe)
    decided = graphs_of_each_call(monkeypatch)
    graphed = run(pipe, CONFIG.replace(nursing_graphs=True))
    # the authors' preset's maps over every pass are history, not a function of the latent: eager
    preset = DetailConfig.authors_preset(nursing=True, nursing_steps=1, nursing_max_iterations_early=1)
    run(pipe, preset.replace(nursing_graphs=True))
    assert decided == [True, False]
    assert torch.equal(graphed.images, eager.images)
    assert [r.losses for r in graphed.nursing] == [r.losses for r in eager.nursing]
    assert [r.updates for r in graphed.nursing] == [3, 3]


def test_the_switch_is_a_documented_config_field():
    assert DetailConfig().nursing_graphs is None and DetailConfig().to_dict()["nursing_graphs"] is None
    assert DetailConfig.from_dict({"nursing_graphs": False}).nursing_graphs is False
    with pytest.raises(ConfigError, match="nursing_graphs must be True, False or None, got 'yes'"):
        DetailConfig(nursing_graphs="yes")


def switch_of(setting: bool | None, device: str) -> bool:
    """What a call on ``device`` decides from the switch."""
    return use_nursing_graphs(DetailConfig(nursing_graphs=setting), torch.device(device), pure=True)


def test_graphs_are_the_default_on_cuda_only_and_the_switch_overrides_it():
    assert switch_of(None, "cuda") and not switch_of(None, "cpu")
    assert not switch_of(False, "cuda") and not switch_of(False, "cpu")
    assert switch_of(True, "cuda") and switch_of(True, "cpu")
    impure = use_nursing_graphs(DetailConfig(nursing_graphs=True), torch.device("cuda"), pure=False)
    assert not impure  # ControlNet's inputs read the step index: eager


def test_hooks_that_move_weights_are_found_and_model_offload_is_not():
    from accelerate import cpu_offload, cpu_offload_with_hook
    from diffusers.hooks import apply_group_offloading

    assert moves_weights_in_forward(build_tiny_pipeline(seed=0).unet) == ()
    unet = build_tiny_pipeline(seed=0).unet
    cpu_offload_with_hook(unet, "cpu")  # enable_model_cpu_offload's hook: the whole model moves once
    assert moves_weights_in_forward(unet) == ()
    unet = build_tiny_pipeline(seed=0).unet
    cpu_offload(unet, execution_device="cpu")  # enable_sequential_cpu_offload's
    assert moves_weights_in_forward(unet) == (
        "accelerate's sequential CPU offload",
        "parameters on the meta device",
    )
    unet = build_tiny_pipeline(seed=0).unet
    apply_group_offloading(unet, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)
    assert "diffusers' group_offloading hook" in moves_weights_in_forward(unet)


def test_nursing_stays_eager_where_weights_move_even_when_graphs_are_asked_for(monkeypatch):
    from accelerate import cpu_offload

    pipe = build_tiny_pipeline(seed=0)
    expected = run(pipe)
    cpu_offload(pipe.unet, execution_device="cpu")
    decided = graphs_of_each_call(monkeypatch)
    got = run(pipe, CONFIG.replace(nursing_graphs=True))
    assert decided == [False]  # the eager path, not the graphed one
    assert torch.equal(got.images, expected.images)


@pytest.mark.parametrize(("nursing_steps", "steps", "released_at"), [(2, 3, 1), (6, 3, 2)])
def test_the_graph_is_released_at_the_last_nursing_step_of_the_call(
    pipe, monkeypatch, nursing_steps, steps, released_at
):
    """The graph's memory pool is freed after the last nursing step, also when the call has fewer steps than
    nursing steps (then at its last step, before the decode). A stand-in graph records the step of its release."""
    released: list[int] = []
    nurse = DetailEngine.nurse

    def with_graph(engine, i, t, latents):
        if i == 0:
            engine.nursing.graph = SimpleNamespace(release=lambda: released.append(engine.current_step))
        return nurse(engine, i, t, latents)

    monkeypatch.setattr(DetailEngine, "nurse", with_graph)
    config = DetailConfig(
        **{**CONFIG.to_dict(), "nursing_steps": nursing_steps, "nursing_thresholds": (0.0,) * nursing_steps}
    )
    out = run(pipe, config, steps)
    assert released == [released_at]
    assert len(out.nursing) == min(nursing_steps, steps)
