"""Every invalid option fails at construction with a message naming it, its value and the fix."""

from __future__ import annotations

import pytest
import torch

import gradwatch
from gradwatch import MonitorConfig

CASES = [
    (dict(clip="clip_norm"), r"clip='clip_norm' is not valid; choose one of auto, norm, value"),
    (dict(nonfinite="ignore"), r"nonfinite='ignore' is not valid; choose one of skip, zero"),
    (dict(granularity="tensor"), r"granularity='tensor' is not valid; choose one of module, parameter"),
    (dict(clip="norm"), r"max_norm=None: clip='norm' needs a fixed threshold; pass max_norm="),
    (dict(clip="value"), r"clip_value=None: clip='value' needs a fixed threshold; pass clip_value="),
    (dict(max_norm=0.0), r"max_norm=0.0 must be a finite number > 0"),
    (dict(max_norm=float("inf")), r"max_norm=inf must be a finite number > 0"),
    (dict(clip_value=-1.0), r"clip_value=-1.0 must be a finite number > 0"),
    (dict(clip_factor=0), r"clip_factor=0 must be a finite number > 0"),
    (dict(agc_eps=-1e-3), r"agc_eps=-0.001 must be a finite number > 0"),
    (dict(percentile=0.0), r"percentile=0.0 must be in \(0, 100\]"),
    (dict(percentile=101), r"percentile=101 must be in \(0, 100\]"),
    (dict(z_threshold=0), r"z_threshold=0 must be a finite number > 0"),
    (dict(z_threshold="4"), r"z_threshold='4' must be a finite number > 0"),
    (dict(clip_z=-2.5), r"clip_z=-2.5 must be a finite number > 0"),
    (dict(concentration_z=float("nan")), r"concentration_z=nan must be a finite number > 0"),
    (dict(skip_threshold=0.0), r"skip_threshold=0.0 must be a finite number > 0"),
    (dict(skip_threshold=3.0), r"skip_threshold=3.0 must be greater than z_threshold=4.0"),
    (dict(ema_decay=1.0), r"ema_decay=1.0 must be in \(0, 1\)"),
    (dict(ema_decay=0), r"ema_decay=0 must be in \(0, 1\)"),
    (dict(level_decay=1), r"level_decay=1 must be in \(0, 1\)"),
    (dict(calibrate="yes"), r"calibrate='yes' must be True or False"),
    (dict(drift_threshold=0.0), r"drift_threshold=0.0 must be a finite number > 0 \(in deviations; 5.0 by default\), or None to switch the drift test off"),
    (dict(drift_threshold=float("inf")), r"drift_threshold=inf must be a finite number > 0"),
    (dict(warmup_steps=0), r"warmup_steps=0 must be an integer >= 1"),
    (dict(warmup_steps=2.5), r"warmup_steps=2.5 must be an integer >= 1"),
    (dict(min_std=0), r"min_std=0 must be a finite number > 0"),
    (dict(window=1), r"window=1 must be an integer >= 2"),
    (dict(log_every=0), r"log_every=0 must be an integer >= 1"),
    (dict(log_every=True), r"log_every=True must be an integer >= 1"),
    (dict(history_limit=0), r"history_limit=0 must be an integer >= 1"),
    (dict(clip="percentile", window=10), r"window=10 is shorter than warmup_steps=25"),
    (dict(clip="value", clip_value=1.0, max_norm=1.0), r"max_norm=1.0 has no effect with clip='value'"),
    (dict(clip="agc", max_norm=1.0), r"max_norm=1.0 has no effect with clip='agc'"),
    (dict(group_depth=1, group_pattern="x"), r"group_depth and group_pattern are both set"),
    (dict(group_depth=0), r"group_depth=0 must be an integer >= 1"),
    (dict(granularity="parameter", group_depth=2), r"granularity='parameter' with group_depth"),
    (dict(group_prefixes=()), r"group_prefixes=\(\) must be a non-empty sequence"),
    (dict(group_prefixes=("enc", "")), r"group_prefixes=\('enc', ''\) must be a non-empty"),
    (dict(group_pattern="layers.(\\d+"), r"group_pattern='layers.\(\\\\d\+' is not a valid regular expression"),
]


@pytest.mark.parametrize(("kwargs", "match"), CASES, ids=[str(c[0]) for c in CASES])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), CASES[:6], ids=[str(c[0]) for c in CASES[:6]])
def test_attach_rejects_bad_values(kwargs, match):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        gradwatch.attach(model, **kwargs)


def test_attach_rejects_unknown_option_with_suggestion():
    with pytest.raises(ValueError, match=r"z_threshhold=3 is not a gradwatch option \(did you mean 'z_threshold'\?\)"):
        gradwatch.attach(torch.nn.Linear(2, 2), z_threshhold=3)


def test_attach_rejects_wrong_types():
    with pytest.raises(TypeError, match=r"model=list is not a torch.nn.Module"):
        gradwatch.attach([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=r"optimizer=str is not a torch.optim.Optimizer"):
        gradwatch.attach(torch.nn.Linear(2, 2), "adam")
    with pytest.raises(TypeError, match=r"config=dict is not a gradwatch.MonitorConfig"):
        gradwatch.attach(torch.nn.Linear(2, 2), config={"clip": "norm"})


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match=r"model=ReLU has no parameters"):
        gradwatch.attach(torch.nn.ReLU())


def test_overrides_apply_on_top_of_config_and_revalidate():
    base = MonitorConfig(clip="norm", max_norm=2.0)
    monitor = gradwatch.attach(torch.nn.Linear(2, 2), config=base, z_threshold=5.0)
    assert monitor.config.clip == "norm" and monitor.config.max_norm == 2.0
    assert monitor.config.z_threshold == 5.0
    with pytest.raises(ValueError, match=r"max_norm=None: clip='norm'"):
        gradwatch.attach(torch.nn.Linear(2, 2), config=base, max_norm=None)


def test_to_dict_round_trips():
    cfg = MonitorConfig(clip="percentile", percentile=75.0, group_prefixes=["a", "b"])
    assert cfg.group_prefixes == ("a", "b")
    d = cfg.to_dict()
    assert d["group_prefixes"] == ["a", "b"] and d["clip"] == "percentile"
    assert MonitorConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"unknown MonitorConfig field\(s\) \['bogus'\]"):
        MonitorConfig.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("value", [1.0, 0.5, float("inf"), "2"])
def test_max_ratio_must_be_a_multiple_above_one(value):
    with pytest.raises(ValueError, match=r"max_ratio=.* must be a finite number > 1"):
        gradwatch.MonitorConfig(max_ratio=value)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, float("nan"), "0.02"])
def test_crossing_rate_must_be_a_share_of_steps(value):
    with pytest.raises(ValueError, match=r"crossing_rate=.* must be in \(0, 1\), a share of "
                                         r"steps .* or None"):
        gradwatch.MonitorConfig(crossing_rate=value)
