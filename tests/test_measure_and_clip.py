"""Per-layer norms and fixed clipping modes agree with torch.nn.utils references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GradStream, TinyNet, mlp
from torch import nn

import gradwatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPINGS = [
    {},
    {"granularity": "parameter"},
    {"group_depth": 2},
    {"group_prefixes": ("blocks.0", "blocks.1")},
    {"group_pattern": r"(blocks\.\d+)"},
]


def _model(dtype: torch.dtype) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().to(dtype)


def _reference_layers(model: nn.Module, monitor) -> dict[str, float]:
    """Layer -> norm, computed independently in float64 from the parameter table."""
    out = {}
    for rec in monitor.layers.describe():
        grads = [dict(model.named_parameters())[n].grad for n in rec["params"]]
        grads = [g for g in grads if g is not None]
        if grads:
            out[rec["layer"]] = torch.linalg.vector_norm(
                torch.cat([g.double().flatten() for g in grads])
            ).item()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: ",".join(g) or "module")
def test_layer_and_global_norms_match_reference(dtype, grouping):
    model = _model(dtype)
    monitor = gradwatch.attach(model, clip="none", **grouping)
    stream = GradStream(model)
    expected = []
    for _ in range(3):
        stream.write()
        grads = [p.grad for p in model.parameters()]
        total = torch.nn.utils.get_total_norm([g.double() for g in grads]).item()
        expected.append((total, _reference_layers(model, monitor)))
        monitor.step()
    steps, hist = monitor.steps(), monitor.history()
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    for step, (total, layers) in enumerate(expected):
        assert steps.global_norm[step] == pytest.approx(total, rel=rtol)
        rows = hist[hist.step == step].set_index("layer")
        assert set(rows.index) == set(layers)
        for name, norm in layers.items():
            assert rows.loc[name, "grad_norm"] == pytest.approx(norm, rel=rtol), name


def test_fp16_norm_above_fp16_range_is_finite():
    model = nn.Linear(100, 100).half()
    monitor = gradwatch.attach(model, clip="none")
    model.weight.grad = torch.full_like(model.weight, 1000.0)  # norm 1e5 > 65504
    model.bias.grad = torch.zeros_like(model.bias)
    result = monitor.step()
    # torch's own per-tensor norm in fp16 overflows; ours is accumulated in fp32.
    assert math.isinf(torch.linalg.vector_norm(model.weight.grad).item())
    assert result.global_norm == pytest.approx(1e5, rel=1e-3)
    assert not result.nonfinite


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.01, 1e3])
def test_clip_norm_matches_clip_grad_norm(dtype, max_norm):
    model = _model(dtype)
    twin = _model(dtype)
    monitor = gradwatch.attach(model, clip="norm", max_norm=max_norm)
    stream = GradStream(model)
    stream.write()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    ref_total = torch.nn.utils.get_total_norm([q.grad.float() for q in twin.parameters()])
    torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
    result = monitor.step()
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), **tol)
    assert result.global_norm == pytest.approx(ref_total.item(), rel=1e-3)
    assert result.action == ("clip_norm" if max_norm < 1 else "none")
    assert result.clipped_norm == pytest.approx(min(max_norm, ref_total.item()), rel=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_value_matches_clip_grad_value(dtype):
    model = _model(dtype)
    twin = _model(dtype)
    monitor = gradwatch.attach(model, clip="value", clip_value=0.01)
    GradStream(model).write()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    torch.nn.utils.clip_grad_value_(twin.parameters(), 0.01)
    result = monitor.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    ref_norm = torch.nn.utils.get_total_norm([q.grad.double() for q in twin.parameters()])
    assert result.action == "clip_value"
    assert result.threshold == pytest.approx(0.01)
    assert result.clipped_norm == pytest.approx(ref_norm.item(), rel=1e-3)


def _agc_reference(params, clip_factor, eps):
    """timm's adaptive_clip_grad, written out."""
    for p in params:
        if p.ndim <= 1:
            w = p.detach().norm().clamp_min(eps)
            g = p.grad.norm()
        else:
            dims = tuple(range(1, p.ndim))
            w = p.detach().norm(dim=dims, keepdim=True).clamp_min(eps)
            g = p.grad.norm(dim=dims, keepdim=True)
        max_norm = w * clip_factor
        p.grad.mul_(torch.where(g > max_norm, max_norm / g.clamp_min(1e-6), 1.0))


def test_agc_matches_reference():
    torch.manual_seed(0)
    model, twin = mlp(), mlp()
    twin.load_state_dict(model.state_dict())
    monitor = gradwatch.attach(model, clip="agc", clip_factor=0.01)
    stream = GradStream(model, sigma=0.0)
    stream.write(diffuse={"0": 50.0})  # first layer's gradients too large for its weights
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    _agc_reference(list(twin.parameters()), 0.01, 1e-3)
    result = monitor.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert result.action == "clip_norm"
    ref_norm = torch.nn.utils.get_total_norm([q.grad for q in twin.parameters()])
    assert result.clipped_norm == pytest.approx(ref_norm.item(), rel=1e-5)


def test_percentile_threshold_is_quantile_of_recent_norms():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, clip="percentile", percentile=80.0, window=50, warmup_steps=10)
    stream = GradStream(model, sigma=0.05)
    norms = []
    for _ in range(60):
        stream.write()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        result = monitor.step()
    # The threshold at the last step is the 80th percentile of the 50 norms before it.
    expected = torch.tensor(norms[-51:-1]).log().quantile(0.8).exp().item()
    assert result.threshold == pytest.approx(expected, rel=1e-4)
    assert result.clipped_norm == pytest.approx(min(norms[-1], expected), rel=1e-4)
    steps = monitor.steps()
    clipped = steps[steps.step >= 10]
    assert (clipped.clipped_norm <= clipped.threshold * (1 + 1e-5)).all()
    assert ((clipped.action == "clip_norm") == (clipped.global_norm > clipped.threshold)).all()


def test_zscore_mode_clips_to_adaptive_threshold_after_warmup():
    torch.manual_seed(0)
    model = mlp()
    monitor = gradwatch.attach(model, clip="zscore", warmup_steps=20)
    stream = GradStream(model, sigma=0.1)
    for _ in range(40):
        stream.write()
        monitor.step()
    stream.write(diffuse={"0": 30.0, "2": 30.0, "4": 30.0})
    before = [p.grad.clone() for p in model.parameters()]
    result = monitor.step()
    assert result.explosion and result.action == "clip_norm"
    assert result.clipped_norm == pytest.approx(result.threshold, rel=1e-4)
    coef = result.clipped_norm / result.global_norm
    for b, p in zip(before, model.parameters()):  # one coefficient: direction preserved
        torch.testing.assert_close(p.grad, b * coef, rtol=1e-4, atol=1e-9)


def test_max_norm_is_a_ceiling_during_warmup_in_adaptive_modes():
    model = mlp()
    monitor = gradwatch.attach(model, max_norm=1e-3)
    GradStream(model).write()
    result = monitor.step()  # step 0: far from warm, but the ceiling holds
    assert result.action == "clip_norm"
    assert result.clipped_norm == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_norms_and_max_abs_of_mixed_sizes_and_shapes(dtype):
    # Large tensors (read one by one) and small ones of repeated and unique shapes
    # (stacked per shape) in one list, with a NaN in a small one and an inf in a large
    # one: every value lands at its own position.
    from gradwatch.functional import CPU_SMALL, group_by_device_and_dtype, tensor_norms

    g = torch.Generator().manual_seed(0)
    shapes = [(300, 300), (64,), (8, 8), (64,), (CPU_SMALL,), (8, 8), (3, 5, 7), (64,), (1,)]
    tensors = [torch.randn(s, generator=g).to(dtype) * (i + 1) for i, s in enumerate(shapes)]
    tensors[3][10] = float("nan")
    tensors[4][7] = float("inf")
    norms, max_abs = tensor_norms(tensors, group_by_device_and_dtype(tensors, torch.device("cpu")),
                                  torch.device("cpu"))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want_norms = torch.stack([torch.linalg.vector_norm(t.to(acc)) for t in tensors]).float()
    want_max = torch.stack([t.to(acc).abs().max() for t in tensors]).float()
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(max_abs, want_max, rtol=0, atol=0, equal_nan=True)
    assert norms[3].isnan() and norms[4].isinf() and max_abs[3].isnan()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "grad-scaler"])
def test_fused_optimizer_applies_the_norm_coefficient_as_clip_grad_norm_would(
        optimizer, with_scaler):
    # With a fused optimizer the coefficient rides in its grad_scale instead of a pass
    # of our own: the parameters (and the gradients after the step) must be exactly
    # what clip_grad_norm_ followed by the same optimizer gives, from its first step
    # (no optimizer state yet) on, with and without a GradScaler around it.
    def make():
        torch.manual_seed(0)
        model = mlp()
        if optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if with_scaler else None
        return model, opt, scaler

    model, opt, scaler = make()
    twin, twin_opt, twin_scaler = make()
    monitor = gradwatch.attach(model, opt, scaler=scaler, clip="norm", max_norm=0.05,
                               run_dir=False)
    assert monitor._gate is not None and monitor._gate.fused
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    for step in range(6):
        for m, o, s in ((model, opt, scaler), (twin, twin_opt, twin_scaler)):
            loss = m(x * (step + 1)).square().mean()
            o.zero_grad()
            (s.scale(loss) if s is not None else loss).backward()
            if s is not None:
                s.unscale_(o)
            if m is model:
                result = monitor.step()
            else:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            if s is not None:
                s.step(o)
                s.update()
            else:
                o.step()
        assert result.action == "clip_norm"
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_fused_optimizer_with_parameters_outside_the_monitor_keeps_them_unclipped():
    # grad_scale applies to everything the optimizer steps: when it also steps
    # parameters the monitor does not watch (or a second monitor shares it), the
    # coefficient must not reach them, so the monitor scales its own gradients instead.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    monitor = gradwatch.attach(model[0], opt, clip="norm", max_norm=1e-3, run_dir=False)
    model(torch.randn(4, 8)).square().sum().backward()
    decoder_grad = model[1].weight.grad.clone()
    encoder_grad = model[0].weight.grad.clone()
    before = model[1].weight.detach().clone()
    monitor.step()
    opt.step()
    torch.testing.assert_close(model[1].weight, before - 0.1 * decoder_grad)
    clipped = torch.cat([p.grad.flatten() for p in model[0].parameters()])
    assert clipped.norm() == pytest.approx(1e-3, rel=1e-4)
    assert encoder_grad.norm() > 1e-2
    assert not hasattr(opt, "grad_scale")


def _huge_grads(model: nn.Module, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", ["none", "auto", "value"])
def test_finite_gradients_near_1e30_are_measured_not_called_nonfinite(dtype, clip):
    # fp32 sums of squares overflow above norms of ~1.8e19 although every element is
    # finite; the step must be measured (float64 reference) and not skipped.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(dtype)
    extra = {"clip_value": 1e29} if clip == "value" else {}
    monitor = gradwatch.attach(
        model, torch.optim.SGD(model.parameters(), lr=0.0), clip=clip, run_dir=False, **extra
    )
    _huge_grads(model, 1e30)
    grads = [p.grad.double() for p in model.parameters()]
    total = torch.nn.utils.get_total_norm(grads).item()
    layers = [torch.nn.utils.get_total_norm(grads[i : i + 2]).item() for i in (0, 2)]
    m = monitor._reader.measure()
    assert not m.nonfinite and not m.overflow
    result = monitor.step()
    assert not result.nonfinite
    assert result.action != "skip"
    assert result.global_norm == pytest.approx(total, rel=1e-5)
    assert list(monitor.history().grad_norm) == pytest.approx(layers, rel=1e-5)
    if clip == "value":
        assert result.action == "clip_value"
        # (the recorded clipped_norm is squared again in the monitor: not checked here)
        assert all(p.grad.abs().max() <= 1e29 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_1e30_step_after_warm_up_is_scaled_back_not_zeroed(dtype):
    # Armed auto: the step is an explosion clipped to its threshold; a coefficient of
    # threshold / inf would zero every gradient instead.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(dtype)
    monitor = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               run_dir=False, warmup_steps=10)
    for t in range(30):
        _huge_grads(model, 1.0 + 0.01 * t)
        monitor.step()
    _huge_grads(model, 1e30)
    result = monitor.step()
    assert result.explosion and result.action == "clip_norm"
    after = torch.nn.utils.get_total_norm([p.grad.double() for p in model.parameters()])
    assert after.item() == pytest.approx(result.threshold, rel=1e-2)
    assert monitor.steps().clipped_norm.iloc[-1] == pytest.approx(result.threshold, rel=1e-2)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inf_or_nan_among_huge_gradients_is_still_nonfinite(bad, dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)).to(dtype)
    monitor = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               run_dir=False)
    _huge_grads(model, 1e30)
    model[1].bias.grad[3] = bad
    m = monitor._reader.measure()
    assert m.nonfinite and not m.overflow
    result = monitor.step()
    assert result.nonfinite and result.action == "skip"


def test_norm_beyond_fp32_range_is_an_overflow_not_nan():
    model = nn.Linear(8, 8)
    monitor = gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               run_dir=False)
    model.weight.grad = torch.full_like(model.weight, 3e38)  # finite; norm 2.4e39
    model.bias.grad = torch.ones_like(model.bias)
    m = monitor._reader.measure()
    assert m.nonfinite and m.overflow  # beyond fp32: skipped, but named an overflow
    assert torch.isinf(m.global_norm) and torch.isfinite(m.layer_max).all()
    result = monitor.step()
    assert result.nonfinite and result.action == "skip"
    (reason,) = monitor.events().reason
    assert reason.startswith("finite gradients whose norm overflows float32 (largest |g| "
                             "3e+38) in (root): optimizer step skipped")
    assert "NaN" not in reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_and_layer_norms_of_huge_gradients_match_float64(dtype):
    from gradwatch import functional as F

    g = torch.Generator().manual_seed(2)
    sizes = [(300, 300), (7,), (7,), (40, 5), (1,)]  # big and stacked small tensors
    tensors = [(torch.randn(s, generator=g) * 1e30).to(dtype) for s in sizes]
    groups = F.group_by_device_and_dtype(tensors, torch.device("cpu"))
    norms, max_abs = F.tensor_norms(tensors, groups, torch.device("cpu"), refine_overflow=True)
    ref = torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])
    torch.testing.assert_close(norms.double(), ref, rtol=1e-5, atol=0)
    index = torch.tensor([0, 0, 1, 1, 1])
    layer, total = F.layer_and_global_norms(norms, index, 2)
    ref_layer = torch.stack([ref[:2].square().sum().sqrt(), ref[2:].square().sum().sqrt()])
    torch.testing.assert_close(layer.double(), ref_layer, rtol=1e-5, atol=0)
    assert total.item() == pytest.approx(ref.square().sum().sqrt().item(), rel=1e-5)
    # normal magnitudes: exactly the plain fp32 sum of squares (the scale is 1.0)
    small = norms / 1e30
    layer_s, total_s = F.layer_and_global_norms(small, index, 2)
    plain = F.layer_sum_of_squares(small, index, 2)
    assert torch.equal(layer_s, plain.sqrt()) and torch.equal(total_s, plain.sum().sqrt())
