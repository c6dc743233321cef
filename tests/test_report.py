"""The run report: self-contained HTML, advice rules, table export, and the CLI.

Every run here is a real (tiny) training run recorded with ``gradwatch.attach``; the
patterns the advice rules look for are produced the way they arise in practice
(unscaled inputs, outlier samples, a learning-rate ramp, exploding recurrent
gradients, NaN batches, fp16-style overflows).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.advice import advise
from gradwatch.report import export_report, layer_summary, load_run, read_run
from gradwatch.run_record import RunData, RunDirError

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

EVIL = '<script>alert("x")</script>'


# ---------------------------------------------------------------------- training
def classification(n: int = 2048, d: int = 16, k: int = 4, seed: int = 0):
    """Standardized features and labels from a noisy linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g) + 0.5 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


def sequences(n: int = 1024, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 4, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long()


def mlp(d: int = 16, k: int = 4, h: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))


class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 24, batch_first=True)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class SeqMLP(nn.Module):
    """The same task as RNNNet without a recurrence (a control for the RNN rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(48, 24)
        self.head = nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x.flatten(1))))


def train(run_dir, model, *, steps=300, lr=0.05, adam=False, scale=1.0, lr_at=None,
          corrupt=None, spike=None, data=None, seed=0, **overrides) -> RunData:
    """Train ``model`` with the monitor attached; return the run read back from disk.

    ``corrupt(t, batch)`` may edit the input batch, ``spike(t, model)`` the gradients
    after backward (before the monitor sees them).
    """
    torch.manual_seed(seed)
    x, y = data if data is not None else classification(seed=seed)
    x = x * scale
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if adam
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    mon = gradwatch.attach(model, opt, run_dir=run_dir, log_every=25, flush_every=100,
                           **overrides)
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        idx = torch.randint(0, len(x), (32,), generator=g)
        xb = x[idx] if corrupt is None else corrupt(t, x[idx].clone())
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        if spike is not None:
            spike(t, model)
        mon.step()
        opt.step()
    mon.detach()
    return load_run(run_dir)


def train_amp(run_dir, overflow_steps, steps=300) -> RunData:
    """bf16 autocast with a GradScaler; Inf written into a gradient at some steps, as a
    forward overflow would leave it."""
    torch.manual_seed(0)
    x, y = classification()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    mon = gradwatch.attach(model, opt, scaler=scaler, run_dir=run_dir, log_every=25)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        if t in overflow_steps:
            model[2].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        mon.step()
        scaler.step(opt)
        scaler.update()
    mon.detach()
    return load_run(run_dir)


def spike_every(modules: tuple[str, ...], steps: set[int], factor: float):
    """Multiply the gradients of ``modules`` by ``factor`` at ``steps`` (diffuse growth)."""
    def spike(t, model):
        if t in steps:
            for name, p in model.named_parameters():
                if name.split(".")[0] in modules:
                    p.grad.mul_(factor)
    return spike


def nan_batches(steps: set[int]):
    def corrupt(t, xb):
        if t in steps:
            xb[0, 0] = float("nan")
        return xb
    return corrupt


def outlier_samples(t, xb):
    """Every 10th batch holds one sample with a wildly unscaled feature."""
    if t % 10 == 5:
        xb[0, 3] = 300.0
    return xb


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories, built once for the module, by name."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        path = root / name
        if name == "healthy":
            train(path, mlp())
        elif name == "healthy_slow":  # its norm grows ~2x as the model grows confident
            train(path, mlp(), lr=0.01)
        elif name == "evil":  # a hostile layer name, explosions and NaN batches
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
            model.add_module(EVIL, nn.Linear(32, 32))
            model.add_module("act", nn.ReLU())
            model.add_module("out", nn.Linear(32, 4))
            train(path, model, spike=spike_every((EVIL,), {120, 200, 260}, 40.0),
                  corrupt=nan_batches({150, 151}))
        elif name == "unscaled":
            train(path, mlp(), scale=1000.0, adam=True, lr=1e-3, granularity="parameter")
        elif name == "scaled":
            train(path, mlp(), adam=True, lr=1e-3, granularity="parameter")
        elif name == "outliers":
            train(path, mlp(), corrupt=outlier_samples)
        elif name == "ramp":
            train(path, mlp(), lr_at=lambda t: 0.001 * 1.025**t)  # up to 1.6
        elif name == "rnn":  # lr 0.01: the explosions are the injected ones, not the
            # network's own instability (at 0.05 its norm rises 6x and the head's does too)
            train(path, RNNNet(), data=sequences(), lr=0.01,
                  spike=spike_every(("rnn",), set(range(60, 300, 25)), 300.0))
        elif name == "seq_mlp":
            train(path, SeqMLP(), data=sequences(), lr=0.01,
                  spike=spike_every(("body",), set(range(60, 300, 25)), 300.0))
        elif name == "nan":
            train(path, mlp(), corrupt=nan_batches({100, 101, 150, 200}))
        elif name == "amp":
            train_amp(path, set(range(150, 156)))
        else:  # pragma: no cover
            raise KeyError(name)
        made[name] = path
        return path

    return get


def html_of(run_dir: Path, tmp_path: Path) -> str:
    out = export_report(run_dir, tmp_path / "report.html")
    return out.read_text(encoding="utf-8")


def advice_of(run_dir: Path) -> dict:
    run = load_run(run_dir)
    return {a.rule: a for a in advise(run.meta, run.steps, run.layers, run.events)}


# ---------------------------------------------------------------------- HTML
def test_html_is_self_contained_with_every_section(runs, tmp_path):
    text = html_of(runs("evil"), tmp_path)
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text
    for tag in ("<script", "<link", "<iframe", "@import", "url("):
        assert tag not in text.lower()
    srcs = re.findall(r'src="([^"]*)"', text)
    # global norm, update ratio, heatmap (absolute and relative), clipping timeline,
    # distributions
    assert len(srcs) == 6
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    for section in ("advice", "global-norm", "update-ratio", "heatmap", "clipping", "layers",
                    "distributions", "events"):
        assert f'id="{section}"' in text, section


def test_html_escapes_layer_names(runs, tmp_path):
    run = load_run(runs("evil"))
    assert EVIL in run.meta["layers"][1]["layer"]
    text = html_of(runs("evil"), tmp_path)
    assert EVIL not in text
    assert "<script" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


def test_html_shows_the_events(runs, tmp_path):
    run = load_run(runs("evil"))
    kinds = set(run.events["kind"])
    assert {"explosion", "nonfinite"} <= kinds
    text = html_of(runs("evil"), tmp_path)
    assert f"Events ({len(run.events)})" in text
    table = text[text.index('id="events"'):]
    rows = re.findall(r'<tr><td class="n">(\d+)</td><td><span class="kind kind-(\w+)">', table)
    assert [(int(s), k) for s, k in rows] == list(zip(run.events["step"], run.events["kind"]))


def test_healthy_run_gets_no_advice(runs, tmp_path):
    assert advice_of(runs("healthy")) == {}
    assert advice_of(runs("healthy_slow")) == {}
    text = html_of(runs("healthy"), tmp_path)
    assert "No recurring problem found" in text
    # Its norm rises about 4x over the first 60 steps as the model grows confident,
    # which the drift test may flag (at 5-10 % a step, like a learning rate too high);
    # nothing else happens in it.
    events = load_run(runs("healthy")).events
    assert set(events.kind) <= {"drift"} and len(events) <= 1
    if events.empty:
        assert "No events" in text and "single event" not in text
    else:
        assert "Events (1)" in text and "rising x" in text


def test_layer_table_ranks_the_spiked_layer_first(runs):
    table = layer_summary(load_run(runs("evil")))
    assert table.iloc[0]["layer"] == EVIL
    assert table.iloc[0]["flagged"] >= 2 and table.iloc[0]["norm_clips"] >= 2
    assert list(table.columns[:3]) == ["layer", "max_z", "max_z_step"]


def test_heatmap_caps_layers_and_bins_steps(tmp_path):
    torch.manual_seed(0)
    # 64 layers (one tensor each, so the run stays fast), 410 steps, one spike.
    blocks = [nn.Linear(4, 4, bias=False) for _ in range(62)]
    model = nn.Sequential(nn.Linear(16, 4), *blocks, nn.Linear(4, 4))
    run = train(tmp_path / "deep", model, steps=410, lr=0.02,
                spike=spike_every(("6",), {300}, 1000.0))
    assert len(run.meta["layers"]) == 64
    text = html_of(tmp_path / "deep", tmp_path)
    assert "Showing 60 of 64 layers: the most anomalous by max z" in text
    assert "410 steps binned into 400 columns" in text
    assert layer_summary(run).iloc[0]["layer"] == "6"  # the spiked layer is kept


def test_report_of_a_run_still_being_recorded(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gradwatch.attach(model, opt, run_dir=tmp_path / "live", log_every=10, flush_every=10)
    x, y = classification()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        mon.step()
        opt.step()
    text = html_of(tmp_path / "live", tmp_path)  # before detach: status is "running"
    assert "Status <b>running</b>" in text
    mon.detach()
    empty = tmp_path / "empty"
    gradwatch.attach(mlp(), run_dir=empty).detach()
    assert "No steps recorded yet" in html_of(empty, tmp_path)


LONG = "encoder_stack_with_a_long_descriptive_name.block_11.self_attention_output_projection_layer"


class LongNames(nn.Module):
    """A layer whose name is 90 characters long (nested modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder_stack_with_a_long_descriptive_name = nn.ModuleDict({"block_11": nn.ModuleDict(
            {"self_attention_output_projection_layer": nn.Linear(32, 32)})})
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.encoder_stack_with_a_long_descriptive_name["block_11"]
        inner = block["self_attention_output_projection_layer"]
        return self.out(torch.relu(inner(torch.relu(self.embed(x)))))


def test_long_layer_names_are_cut_in_the_middle():
    from gradwatch.report.plots import MAX_LABEL_CHARS, layer_labels
    from gradwatch.report.summary import _middle_ellipsis

    assert MAX_LABEL_CHARS == 30
    # At dots where that keeps nearly as much: whole module names at both ends.
    assert (_middle_ellipsis("encoder.layers.11.self_attention.out_proj", 30)
            == "encoder.layers.11\u2026out_proj")
    assert _middle_ellipsis("x" * 90, 30) == "x" * 15 + "\u2026" + "x" * 14
    assert _middle_ellipsis("encoder.layers.11.mlp", 30) == "encoder.layers.11.mlp"
    assert _middle_ellipsis(LONG, 30) == "encoder_stack_w\u2026ojection_layer"
    # Wide room: the character limit; narrow room: cut further, still both ends.
    assert layer_labels([LONG, "out"], 8, room=1000) == [_middle_ellipsis(LONG, 30), "out"]
    narrow = layer_labels(["W" * 90], 8, room=100)[0]
    assert narrow.startswith("WWW") and narrow.endswith("WWW") and "\u2026" in narrow
    assert len(narrow) < 15


def test_heatmap_labels_fit_and_keep_both_ends_of_a_long_name(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradwatch.report.plots import MAX_LABEL_CHARS, heatmap_figure

    run = train(tmp_path / "long", LongNames(), steps=60)
    names = [rec["layer"] for rec in run.meta["layers"]]
    assert names == ["embed", LONG, "out"] and len(LONG) == 90
    for relative in (False, True):
        fig = heatmap_figure(run, names, relative=relative)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        ax = fig.axes[0]
        labels = ax.get_yticklabels()
        texts = [t.get_text() for t in labels]
        assert texts[0] == "embed" and texts[2] == "out"
        label = texts[1]
        assert len(label) <= MAX_LABEL_CHARS and "\u2026" in label
        assert label.startswith("encoder_stack_") and label.endswith("_layer")
        # Every label lies inside the figure (not cut at its left edge).
        renderer = canvas.get_renderer()
        assert min(t.get_window_extent(renderer).x0 for t in labels) >= 0
    text = html_of(tmp_path / "long", tmp_path)
    assert LONG in text  # the tables name it in full
    assert '<img src="data:image/png;base64,' in text
    assert 'alt="heatmap of log10 gradient norm per layer"' in text


def test_events_table_bounds_the_layers_cell(runs):
    from gradwatch.report import render_html

    run = load_run(runs("evil"))
    text = render_html(run, source="evil")
    assert "are counted, not named" not in text  # nothing to shorten in this run
    many = [f"blocks.{i}.mlp" for i in range(200)]
    run.events.loc[0, "layers"] = ",".join(many)
    run.events.loc[1, "layers"] = "a,b,c,d,e"
    text = render_html(run, source="evil")
    table = text[text.index('id="events"'):]
    assert ('<td class="name">blocks.0.mlp, blocks.1.mlp, blocks.2.mlp, blocks.3.mlp, '
            "blocks.4.mlp and 195 more</td>") in table
    assert "blocks.5.mlp" not in text
    assert '<td class="name">a, b, c, d, e</td>' in table  # five: all named
    assert ("<p class=\"note\">An event&#x27;s layers beyond the first 5 are counted, not "
            "named; all of them: <code>gradwatch report RUN_DIR --format csv</code>.</p>"
            ) in text


def test_report_is_named_after_the_run_directory(runs, tmp_path, monkeypatch):
    from gradwatch.report.page import run_name

    run_dir = tmp_path / "my-experiment-7"
    shutil.copytree(runs("healthy"), run_dir)
    for source in (run_dir, str(run_dir) + "/", "."):
        monkeypatch.chdir(run_dir if source == "." else tmp_path)
        text = export_report(source, tmp_path / "r.html").read_text(encoding="utf-8")
        assert "<title>gradwatch report: my-experiment-7</title>" in text, source
        assert "<h1>gradwatch report: my-experiment-7</h1>" in text, source
    monkeypatch.chdir(run_dir / "steps")
    assert run_name("..") == "my-experiment-7"
    assert run_name("") == "run"  # rendered from a RunData alone, no directory


WARMUP_NOTE = ("Shaded: the warm-up, steps 0..{last} (warmup_steps = {n}), while the monitor "
               "gathers the statistics a layer needs before the adaptive modes may flag or "
               "clip it.")


def test_warmup_is_shaded_and_explained(runs, tmp_path):
    from gradwatch.report import render_html
    from gradwatch.report.plots import plot_global_norm, plot_loss, warmup_span

    run = train(tmp_path / "warm", mlp(), steps=80, warmup_steps=25)
    assert warmup_span(run) == (0, 25)
    text = html_of(tmp_path / "warm", tmp_path)
    assert WARMUP_NOTE.format(last=24, n=25) in text
    assert "Shaded: the warm-up, as above." not in text  # no loss recorded: no loss plot

    # The span follows the configuration and the steps on record.
    run = load_run(runs("healthy"))
    run.meta["config"]["warmup_steps"] = 40
    assert warmup_span(run) == (0, 40)
    run.steps["loss"] = np.linspace(2.0, 0.5, len(run.steps))
    text = render_html(run, source="healthy")
    assert WARMUP_NOTE.format(last=39, n=40) in text
    assert "Shaded: the warm-up, as above." in text  # under the loss plot
    shaded = (plot_global_norm(run), plot_loss(run))
    run.meta["config"]["warmup_steps"] = 1000  # longer than the run: all of it
    assert warmup_span(run) == (0, 300)
    run.meta["config"]["warmup_steps"] = 40
    later = RunData(run.meta, run.steps[run.steps["step"] >= 30], run.layers, run.events)
    assert warmup_span(later) == (30, 40)  # a record that starts within the warm-up
    later = RunData(run.meta, run.steps[run.steps["step"] >= 40], run.layers, run.events)
    assert warmup_span(later) is None  # or after it (a restored monitor, a new directory)
    del run.meta["config"]["warmup_steps"]  # a record without it: nothing shaded
    assert warmup_span(run) is None
    text = render_html(run, source="healthy")
    assert "Shaded: the warm-up" not in text
    # The shading is drawn: without it the plots differ.
    assert plot_global_norm(run) != shaded[0] and plot_loss(run) != shaded[1]


# ---------------------------------------------------------------------- advice
def test_first_layer_rule_fires_on_unscaled_inputs(runs):
    found = advice_of(runs("unscaled"))
    assert set(found) == {"first_layer"}
    ev = found["first_layer"].evidence
    assert ev["layer"] == "0.weight"
    assert ev["median_ratio"] >= 100 and ev["sign_test_p"] < 0.01
    assert f"{ev['median_ratio']:.3g}x" in found["first_layer"].detail
    assert "first_layer" not in advice_of(runs("scaled"))


def test_value_clipping_rule_fires_on_outlier_samples(runs):
    found = advice_of(runs("outliers"))
    assert "value_clipping" in found
    ev = found["value_clipping"].evidence
    assert ev["frequent_layers"][0] == "0"  # the layer that sees the outlier feature
    assert ev["rate"] >= 0.01 and ev["value_clips"] >= 5
    assert "inspect the data" in found["value_clipping"].title
    assert all(s % 10 == 5 for s in ev["first_steps"])  # exactly the outlier batches


def test_trend_rule_fires_on_a_learning_rate_ramp(runs):
    found = advice_of(runs("ramp"))
    # A learning rate ramp is a rise the drift rule may also name (its norm grows about
    # 2.4x over the 40 steps after the drift test's alarm, near the rule's 3x).
    assert "trend" in found and set(found) <= {"trend", "drift"}
    ev = found["trend"].evidence
    assert ev["p_value"] < 0.01 and ev["growth"] > 2 and ev["kendall_tau"] > 0
    assert "learning rate" in found["trend"].title


def test_recurrent_rule_fires_on_exploding_rnn_only(runs):
    found = advice_of(runs("rnn"))
    assert "recurrent" in found
    ev = found["recurrent"].evidence
    assert ev["in_recurrent_layers"] >= 5 and ev["share"] >= 0.75
    assert ev["diffuse"] >= ev["in_recurrent_layers"] / 2
    assert "clip by norm" in found["recurrent"].title
    control = load_run(runs("seq_mlp"))  # same spikes, no recurrence
    assert (control.events["kind"] == "explosion").sum() >= 5
    assert "recurrent" not in advice_of(runs("seq_mlp"))


def test_nonfinite_rule_names_the_source(runs):
    found = advice_of(runs("nan"))
    assert set(found) == {"nonfinite"}
    a = found["nonfinite"]
    assert a.evidence["nonfinite_steps"] == 4 and a.evidence["longest_streak"] == 2
    assert a.evidence["all_layers_at_once"] == 4
    assert "forward pass or the loss" in a.detail and "torch.isfinite" in a.detail


def test_amp_rule_fires_on_overflow_streaks(runs):
    found = advice_of(runs("amp"))
    assert set(found) == {"amp_overflow"}
    ev = found["amp_overflow"].evidence
    assert ev["overflows"] == 6 and ev["longest_streak"] == 6 and ev["layers"] == ["2"]
    assert "bfloat16" in found["amp_overflow"].detail


def test_rules_leave_a_healthy_record_alone(runs):
    from gradwatch import advice

    run = load_run(runs("healthy"))
    assert advice.first_layer_dominance(run.meta, run.layers) is None
    assert advice.value_clipping(run.steps, run.layers, run.meta) is None
    assert advice.norm_trend(run.steps) is None
    assert advice.recurrent_explosions(run.meta, run.layers, run.events) is None
    assert advice.nonfinite_steps(run.steps, run.events, run.meta) is None
    assert advice.amp_overflows(run.steps, run.events) is None


def test_amp_calibration_streak_is_not_advice(tmp_path):
    # A GradScaler's first steps overflow until its scale fits: that is expected.
    run = train_amp(tmp_path / "amp", set(range(0, 5)) | {200}, steps=250)
    assert (run.events["kind"] == "amp_overflow").sum() == 6
    assert advice_of(tmp_path / "amp") == {}


def test_recurrent_layers_are_recognised():
    from gradwatch.advice import is_recurrent

    assert is_recurrent({"layer": "enc", "params": ["enc.weight_hh_l0", "enc.bias_ih_l0"]})
    assert is_recurrent({"layer": "decoder.lstm", "params": ["decoder.lstm.w"]})
    assert is_recurrent({"layer": "rnn.weight_hh_l1_reverse",
                         "params": ["rnn.weight_hh_l1_reverse"]})
    assert not is_recurrent({"layer": "0", "params": ["0.weight", "0.bias"]})


# ---------------------------------------------------------------------- export
def _as_plain(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].astype(str)
    return out.reset_index(drop=True)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables_round_trip(runs, tmp_path, fmt):
    run = load_run(runs("evil"))
    out = export_report(runs("evil"), tmp_path / "tables", format=fmt)
    assert sorted(p.name for p in out.iterdir()) == [f"{t}.{fmt}" for t in
                                                     ("events", "layers", "steps")]
    for table in ("steps", "layers", "events"):
        path = out / f"{table}.{fmt}"
        expected = _as_plain(getattr(run, table))
        if fmt == "csv":
            text = [c for c in ("layer", "layers", "reason", "kind", "action")
                    if c in expected.columns]
            back = pd.read_csv(path, dtype=dict.fromkeys(text, str))
            # CSV has no missing string: an empty one (a model-level event's layer)
            # reads back as NaN.
            back[text] = back[text].fillna("")
        else:
            back = pd.read_parquet(path)
        back = _as_plain(back)
        assert list(back.columns) == list(expected.columns)
        pd.testing.assert_frame_equal(back, expected, check_dtype=False, rtol=1e-6)
        if table == "layers":
            assert EVIL in set(back["layer"])


def test_export_rejects_an_unknown_format(runs, tmp_path):
    with pytest.raises(ValueError, match="format='pdf' is not one of 'html', 'csv'"):
        export_report(runs("healthy"), tmp_path / "x", format="pdf")


def test_report_module_load_run_reads_what_run_record_reads(runs):
    import pandas as pd

    from gradwatch import report, run_record

    shown, plain = report.load_run(runs("evil")), run_record.load_run(runs("evil"))
    assert isinstance(shown, run_record.RunData) and shown.meta == plain.meta
    for table in ("steps", "layers", "events"):
        pd.testing.assert_frame_equal(getattr(shown, table), getattr(plain, table))
    assert "<table>" in shown._repr_html_()  # and a notebook displays it


def test_importing_report_modules_stays_light():
    code = (
        "import sys, gradwatch, gradwatch.report, gradwatch.advice, gradwatch.cli\n"
        "print(','.join(n for n in ('pandas', 'scipy', 'matplotlib') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------- CLI
def gw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwatch", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_report_and_summary(runs, tmp_path):
    out = gw("report", runs("evil"), "-o", tmp_path / "r.html")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"wrote {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")

    out = gw("summary", runs("evil"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    run = load_run(runs("evil"))
    for needle in ("status       finished", "steps        300", "clip rate",
                   f"explosion {(run.events['kind'] == 'explosion').sum()}",
                   "nonfinite 2", "amp_overflow 0", "worst layers by max z"):
        assert needle in text, needle
    worst = text.splitlines()[text.splitlines().index(
        next(l for l in text.splitlines() if l.startswith("-----"))) + 1]
    assert worst.startswith(EVIL)


def test_cli_report_default_outputs(runs, tmp_path, capsys):
    from gradwatch.cli import main

    # The autouse fixture runs each test in tmp_path: defaults land there.
    assert main(["report", str(runs("healthy"))]) == 0
    assert (tmp_path / "report.html").is_file()
    assert main(["report", str(runs("healthy")), "--format", "csv"]) == 0
    assert (tmp_path / "report-csv" / "steps.csv").is_file()
    assert main(["report", str(runs("healthy")), "--format", "parquet", "-o", "t"]) == 0
    assert (tmp_path / "t" / "events.parquet").is_file()


def test_cli_config_still_works():
    out = gw("config", "--set", "clip=norm", "--set", "max_norm=1.0")
    assert out.returncode == 0 and '"max_norm": 1.0' in out.stdout


def _broken(kind: str, runs, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "no_meta":
        (tmp_path / "plain").mkdir()
        return tmp_path / "plain"
    if kind == "foreign_meta":
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "meta.json").write_text('{"name": "some other tool"}')
        return tmp_path / "foreign"
    copy = tmp_path / "copy"
    shutil.copytree(runs("healthy"), copy)
    part = sorted((copy / "steps").glob("part-*.parquet"))[1]
    if kind == "truncated_part":
        with open(part, "r+b") as f:
            f.truncate(10)
    elif kind == "foreign_part":
        for p in (copy / "steps").glob("part-*.parquet"):
            pd.DataFrame({"a": [1, 2]}).to_parquet(p)
    elif kind == "truncated_meta":
        (copy / "meta.json").write_text('{"format": "gradwatch-run", "lay')
    return copy


BROKEN = ["missing", "no_meta", "foreign_meta", "truncated_part", "foreign_part",
          "truncated_meta"]


@pytest.mark.parametrize("kind", BROKEN)
def test_cli_errors_are_one_line(runs, tmp_path, kind):
    run_dir = _broken(kind, runs, tmp_path)
    out = gw("report", run_dir, "-o", tmp_path / "r.html")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradwatch report: error: "), out.stderr
    assert not (tmp_path / "r.html").exists()
    if kind == "truncated_part":  # the summary goes through the same path; once for real
        out = gw("summary", run_dir)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert out.stderr.count("\n") == 1 and "gradwatch summary: error: " in out.stderr


@pytest.mark.parametrize("kind", BROKEN)
def test_summary_errors_are_one_line(runs, tmp_path, kind, capsys):
    from gradwatch.cli import main

    assert main(["summary", str(_broken(kind, runs, tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradwatch summary: error: ")


def test_read_run_raises_run_dir_error(runs, tmp_path):
    with pytest.raises(RunDirError, match="truncated or not a Parquet file"):
        read_run(_broken("truncated_part", runs, tmp_path))


# ---------------------------------------------------------------------- browser
def test_renders_in_a_headless_browser(runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    from PIL import Image

    page = export_report(runs("evil"), tmp_path / "r.html")
    shot = tmp_path / "r.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1400,3000",
                    page.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.is_file()
    rgb = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(np.int32)
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    # The embedded plots decoded and drew: thousands of distinct colours (heatmap,
    # violins), not a blank or text-only page.
    assert len(colours) > 2000


def test_cli_never_shows_a_traceback_on_malformed_meta(runs, tmp_path):
    import json
    import shutil as _shutil

    from gradwatch.cli import main

    bad = tmp_path / "bad"
    _shutil.copytree(runs("healthy"), bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["config"] = None
    (bad / "meta.json").write_text(json.dumps(meta))
    for command in ("summary", "report"):
        proc = subprocess.run([sys.executable, "-m", "gradwatch", command, str(bad)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1
    (bad / "meta.json").write_text("[" * 100_000)
    assert main(["summary", str(bad)]) == 2
