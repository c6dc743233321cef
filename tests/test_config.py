"""Every invalid option fails at construction with a message naming it, its value and the fix."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import gradwatch
from gradwatch import MonitorConfig
from gradwatch.run_record import load_run

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
    (dict(window=10**12), r"window=1000000000000 is too large: the window keeps that many "
                          r"float32 values per layer on the device; pass an integer in "
                          r"\[2, 100000\] \(128 by default\)"),
    (dict(window=100_001), r"window=100001 is too large"),
    (dict(log_every=10**12), r"log_every=1000000000000 is too large: the monitor buffers that "
                             r"many rows .* pass an integer in \[1, 10000\] \(50 by default\)"),
    (dict(warmup_steps=np.float64(10.0)), r"warmup_steps=np.float64\(10.0\) must be an integer"),
    (dict(log_every=np.True_), r"log_every=np.True_ must be an integer >= 1"),
    (dict(group_prefixes=5), r"group_prefixes=5 must be a non-empty sequence of non-empty "
                             r"module-name prefixes, for example \('encoder', 'decoder'\)"),
    (dict(group_prefixes={"enc": 1}), r"group_prefixes=\{'enc': 1\} must be a non-empty sequence"),
    (dict(clip="norm", max_norm=1.0, clip_value=1.0),
     r"clip_value=1.0 has no effect with clip='norm': only clip='value' clips by a fixed element "
     r"threshold .*; use clip='value', or leave clip_value=None"),
    (dict(clip_value=0.5), r"clip_value=0.5 has no effect with clip='auto'"),
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


@pytest.mark.parametrize(
    ("name", "value", "kind"),
    [
        ("max_norm", np.float32(1.0), float),
        ("warmup_steps", np.int64(10), int),
        ("z_threshold", np.float64(5.0), float),  # a float subclass: accepted, stored plain
        ("clip_z", np.int32(2), float),
        ("max_ratio", np.float16(3.0), float),
        ("window", np.int32(64), int),
        ("log_every", np.uint16(10), int),
        ("history_limit", np.int64(1000), int),
        ("group_depth", np.int8(2), int),
    ],
)
def test_numpy_scalars_are_accepted_and_stored_as_python_numbers(name, value, kind):
    cfg = MonitorConfig(**{name: value})
    stored = getattr(cfg, name)
    assert type(stored) is kind and stored == value
    assert type(cfg.to_dict()[name]) is kind


def test_attach_with_numpy_options_runs_a_step(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path, clip="norm",
                               max_norm=np.float32(1.0), warmup_steps=np.int64(10),
                               log_every=np.int64(2), flush_every=np.int64(4))
    for _ in range(4):
        model(torch.randn(4, 3)).square().sum().backward()
        monitor.step()
        opt.step()
        opt.zero_grad()
    monitor.detach()
    assert type(monitor.config.log_every) is int and type(monitor.config.max_norm) is float
    assert len(load_run(tmp_path).steps) == 4


def test_upper_bounds_are_inclusive():
    cfg = MonitorConfig(window=100_000, log_every=10_000)
    assert cfg.window == 100_000 and cfg.log_every == 10_000


def test_group_prefixes_from_a_set_are_sorted():
    assert MonitorConfig(group_prefixes={"dec", "enc"}).group_prefixes == ("dec", "enc")


UNUSED = [
    (dict(clip="norm", max_norm=1.0, percentile=75.0),
     r"gradwatch: percentile=75.0 has no effect with clip='norm': only clip='percentile' reads "
     r"it; pass clip='percentile', or leave percentile at its default \(90.0\)"),
    (dict(clip="zscore", clip_factor=0.1),
     r"clip_factor=0.1 has no effect with clip='zscore': only clip='agc' reads it"),
    (dict(clip="none", agc_eps=0.01), r"agc_eps=0.01 has no effect with clip='none'"),
    (dict(clip="percentile", concentration_z=5.0),
     r"concentration_z=5.0 has no effect with clip='percentile': only clip='auto' reads it"),
    (dict(clip="zscore", crossing_rate=None), r"crossing_rate=None has no effect with clip='zscore'"),
]


@pytest.mark.parametrize(("kwargs", "match"), UNUSED, ids=[str(c[0]) for c in UNUSED])
def test_option_of_another_clip_mode_warns(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        MonitorConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(clip="percentile", percentile=75.0),
        dict(clip="agc", clip_factor=0.05, agc_eps=0.1),
        dict(clip="auto", concentration_z=4.0, crossing_rate=None, max_norm=1.0),
        # max_norm stays a ceiling in the adaptive modes.
        dict(clip="zscore", max_norm=1.0),
        dict(clip="percentile", max_norm=1.0),
        dict(clip="value", clip_value=0.1),
        dict(clip="norm", max_norm=1.0),
    ],
    ids=str,
)
def test_options_of_the_chosen_mode_do_not_warn(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MonitorConfig(**kwargs)


def test_config_is_frozen_with_a_fix():
    cfg = MonitorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError,
                       match=r"log_every=0: a MonitorConfig is frozen \(it was validated when "
                             r"built\); build a changed copy with dataclasses.replace\(config, "
                             r"log_every=0\), or pass log_every=0 to gradwatch.attach"):
        cfg.log_every = 0
    with pytest.raises(dataclasses.FrozenInstanceError,
                       match=r"log_evry=5: MonitorConfig has no field 'log_evry' \(did you mean "
                             r"'log_every'\?\)"):
        cfg.log_evry = 5
    assert cfg.log_every == 50
    with pytest.raises(ValueError, match=r"log_every=0 must be an integer >= 1"):
        dataclasses.replace(cfg, log_every=0)


def test_config_forced_past_its_frozen_fields_fails_when_the_monitor_is_built():
    cfg = MonitorConfig()
    object.__setattr__(cfg, "log_every", 0)  # what a plain assignment did before
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"log_every=0 must be an integer >= 1"):
        gradwatch.attach(model, config=cfg, run_dir=False)
    with pytest.raises(ValueError, match=r"log_every=0 must be an integer >= 1"):
        gradwatch.GradMonitor(model, config=cfg)


def test_config_rejects_unknown_field_with_suggestion():
    with pytest.raises(ValueError, match=r"z_threshhold=3 is not a MonitorConfig field \(did you "
                                         r"mean 'z_threshold'\?\); valid fields are agc_eps"):
        MonitorConfig(z_threshhold=3)
    # Also a TypeError, as for any unexpected keyword argument.
    with pytest.raises(TypeError, match=r"windw=5 is not a MonitorConfig field \(did you mean "
                                        r"'window'\?\)"):
        MonitorConfig(windw=5)
    with pytest.raises(ValueError, match=r"unknown MonitorConfig field\(s\) \['bogus', 'windw'\] "
                                         r"\(did you mean 'window' for 'windw'\?\)"):
        MonitorConfig.from_dict({"windw": 5, "bogus": 1})
