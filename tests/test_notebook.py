"""What a notebook displays for a monitor and for a run read back (``_repr_html_``):
the numbers of ``gradwatch summary``, escaped."""

from __future__ import annotations

import torch
from helpers import GradStream, mlp

import gradwatch
from gradwatch.report import load_run


def test_the_monitor_and_the_record_display_the_run_at_a_glance(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, opt, run_dir=tmp_path / "run", log_every=10)
    stream = GradStream(model)
    for t in range(40):
        stream.write(diffuse={"2": 50.0} if t == 30 else None)
        monitor.step()
        opt.step()
    live = monitor._repr_html_()  # mid-run: flushes, shows what the monitor holds
    assert f"recording to {tmp_path / 'run'}" in live
    assert "<td style='text-align:left'>running</td>" in live
    assert "40 (steps 0..39), 3 layer(s), clip=&#x27;auto&#x27;" in live
    assert "explosion 1" in live
    # The spiking layer heads the worst layers, flagged once at step 30.
    first_row = live.split("<th>max norm</th></tr>\n")[1].split("</tr>")[0]
    assert first_row.startswith("<tr><td>2</td>") and "<td>30</td><td>1</td>" in first_row
    monitor.detach()
    recorded = load_run(tmp_path / "run")._repr_html_()
    assert "<td style='text-align:left'>finished</td>" in recorded
    assert recorded.split("<table>", 1)[1].split("</table>")[0].count("<tr>") == 4


def test_names_from_the_record_are_escaped(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("<b>x</b>", torch.nn.Linear(2, 2))

        def forward(self, x):
            return getattr(self, "<b>x</b>")(x)

    model = Odd()
    monitor = gradwatch.attach(model, run_dir=False)
    model(torch.ones(1, 2)).sum().backward()
    monitor.step()
    shown = monitor._repr_html_()
    assert "&lt;b&gt;x&lt;/b&gt;" in shown and "<b>x</b>" not in shown
