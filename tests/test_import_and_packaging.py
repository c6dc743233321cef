"""`import gradwatch` stays light; the installed package has every module; the CLI runs."""

from __future__ import annotations

import importlib
import subprocess
import sys

HEAVY = ("pandas", "wandb", "scipy", "matplotlib", "lightning", "pytorch_lightning",
         "transformers", "accelerate", "pyarrow", "sklearn")


def test_import_gradwatch_imports_only_torch():
    code = (
        "import sys, gradwatch, torch\n"
        "m = torch.nn.Linear(2, 2); mon = gradwatch.attach(m)\n"
        "m(torch.ones(1, 2)).sum().backward(); mon.step()\n"
        f"print(','.join(n for n in {HEAVY!r} if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pandas_is_imported_by_history():
    code = (
        "import sys, gradwatch, torch\n"
        "m = torch.nn.Linear(2, 2); mon = gradwatch.attach(m)\n"
        "m(torch.ones(1, 2)).sum().backward(); mon.step(); mon.history()\n"
        "print('pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_installed_package_has_all_modules():
    for name in ("gradwatch.config", "gradwatch.functional", "gradwatch.layers",
                 "gradwatch.stats", "gradwatch.skip", "gradwatch.records",
                 "gradwatch.monitor", "gradwatch.cli", "gradwatch.integrations"):
        importlib.import_module(name)


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "gradwatch", "--help"], capture_output=True,
                         text=True, check=True)
    assert "gradwatch" in out.stdout and "config" in out.stdout
    out = subprocess.run([sys.executable, "-m", "gradwatch", "--version"], capture_output=True,
                         text=True, check=True)
    import gradwatch

    assert gradwatch.__version__ in out.stdout


def test_cli_config_validates_options():
    ok = subprocess.run([sys.executable, "-m", "gradwatch", "config", "--set", "clip=norm",
                         "--set", "max_norm=1.0"], capture_output=True, text=True)
    assert ok.returncode == 0 and '"max_norm": 1.0' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gradwatch", "config", "--set", "clip=norm"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "max_norm=None: clip='norm' needs a fixed threshold" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_integrations_import_from_the_installed_package():
    import pytest

    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    for name, cls in (("lightning", "GradWatchCallback"),
                      ("huggingface", "GradWatchTrainerCallback"),
                      ("accelerate", "GradWatchAccelerate")):
        module = importlib.import_module(f"gradwatch.integrations.{name}")
        assert getattr(module, cls).__module__ == f"gradwatch.integrations.{name}"
