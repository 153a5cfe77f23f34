"""Method options checked where the methods are built directly (``build_method``, as plain-DDP and
Fabric users may), and their documented defaults."""

from __future__ import annotations

import pytest
import torch

from lightning_gmc import Simulator
from lightning_gmc.compressors import build_compressor
from lightning_gmc.methods import build_method

TOPK = build_compressor("topk", density=0.1)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0])
def test_dgc_clip_norm_must_be_positive(clip_norm: float) -> None:
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        build_method("dgc", TOPK, clip_norm=clip_norm)
    assert build_method("dgc", TOPK, clip_norm=0.5).clip_norm == 0.5  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["ef_server_momentum", "def_a"])
def test_negative_detach_is_refused_by_the_method_itself(method: str) -> None:
    with pytest.raises(ValueError, match="detach"):
        build_method(method, TOPK, detach=-0.5)


def test_cser_defaults_are_the_cser_imagenet_pattern() -> None:
    # H = 16 and rho2 = min(1, H * rho1), as the docstring promises.
    cser = build_method("cser", build_compressor("topk", density=1 / 64))
    assert cser.reset_interval == 16  # type: ignore[attr-defined]
    assert cser.reset_compressor.density == 16 / 64  # type: ignore[attr-defined]
    capped = build_method("cser", build_compressor("topk", density=0.1), reset_interval=20)
    assert capped.reset_compressor.density == 1.0  # type: ignore[attr-defined]


def test_cser_reset_message_draws_from_its_own_random_stream() -> None:
    # C1 = C2 = random-k at one density: on a reset step the two messages must not pick the same
    # coordinates (C2 would then resend what C1 just sent instead of a fresh sample of the residual).
    method = build_method("cser", build_compressor("randk", density=0.2), reset_density=0.2, reset_interval=1)
    sim = Simulator({"w": (50,)}, 2, method=method, momentum=0.9)
    sent: list[list[torch.Tensor]] = []
    start = sim.exchange.start

    def recording_start(messages, buckets, step, **kw):  # type: ignore[no-untyped-def]
        sent.append([m.payload.context["index"] for m in messages[0]])
        return start(messages, buckets, step, **kw)

    sim.exchange.start = recording_start  # type: ignore[method-assign]
    grads = [{"w": torch.randn(50, generator=torch.Generator().manual_seed(k))} for k in range(2)]
    sim.step(grads, sim.gradient_points({"w": torch.zeros(50)}, 0.1), 0.1)
    (first, second) = sent[0]
    assert not torch.equal(first.sort().values, second.sort().values)


def test_def_a_keeps_the_evaluation_it_was_given() -> None:
    assert build_method("def_a", TOPK, evaluation="x_t").evaluation == "x_t"  # type: ignore[attr-defined]
    assert build_method("def_a", TOPK).evaluation_point == "params_minus_mean_residual"
    assert build_method("def_a", TOPK, evaluation="x_t").evaluation_point == "params"


TOPK_LABEL = "topk, density=0.1"


@pytest.mark.parametrize(
    ("method", "compressor", "options", "label"),
    [
        ("gmc", "topk", {}, f"gmc with {TOPK_LABEL}, momentum_lr_convention=prev"),
        ("gmc", "topk", {"detach": 0.5}, f"gmc+ (detach=0.5) with {TOPK_LABEL}, momentum_lr_convention=prev"),
        (
            "dgc",
            "topk",
            {"clip_norm": 2.0, "sparsity_warmup": True, "momentum_masking": False},
            "dgc (momentum_masking=False, clip_norm=2, sparsity_warmup=0.25/0.1/0.1/0.1, "
            f"weight_decay_mode=compressed) with {TOPK_LABEL}",
        ),
        ("dgc", "topk", {}, f"dgc (momentum_masking=True, weight_decay_mode=compressed) with {TOPK_LABEL}"),
        ("def_a", "topk", {"evaluation": "x_t"}, f"def_a (detach=0.3, evaluation=x_t) with {TOPK_LABEL}"),
        ("cser", "topk", {}, f"cser (H=16) with C1={TOPK_LABEL}, C2=topk, density=1"),
        ("dmsgd", "none", {}, "dmsgd (dense)"),
    ],
)
def test_the_method_label_names_every_option_that_changes_the_algorithm(
    method: str, compressor: str, options: dict[str, object], label: str
) -> None:
    # The label is the run's summary line and what a checkpoint's resume compares.
    built = build_method(method, build_compressor(compressor, density=0.1), **options)
    assert built.describe() == label


@pytest.mark.parametrize(
    ("name", "options", "label"),
    [
        ("none", {}, "none"),
        ("none", {"wire_dtype": "bf16"}, "none, wire_dtype=bf16"),
        ("rbgs", {"density": 0.1, "wire_dtype": "fp16"}, "rbgs, density=0.1, wire_dtype=fp16"),
        ("topk", {"density": 0.1}, TOPK_LABEL),
        (
            "topk_approx",
            {"density": 0.1, "sample_ratio": 0.05},
            "topk_approx, density=0.1, sample_ratio=0.05",
        ),
    ],
)
def test_the_compressor_label_names_its_options_and_a_16_bit_wire(
    name: str, options: dict[str, object], label: str
) -> None:
    assert build_compressor(name, **options).describe() == label
