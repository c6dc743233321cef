"""`import gradwatch` stays light; the wheel ships every module and data file; the CLI runs."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> where its files land in the wheel (pyproject's package-dir remap).
PACKAGE_DIRS = {"gradwatch": "gradwatch", "integrations": "gradwatch/integrations"}

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
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    for name, cls in (("lightning", "GradWatchCallback"),
                      ("huggingface", "GradWatchTrainerCallback"),
                      ("accelerate", "GradWatchAccelerate")):
        module = importlib.import_module(f"gradwatch.integrations.{name}")
        assert getattr(module, cls).__module__ == f"gradwatch.integrations.{name}"


# ---------------------------------------------------------------------- the wheel
def _shipped_files() -> list[str]:
    """Every file under the package folders of the checkout, as its path in the wheel."""
    files = []
    for src, dest in PACKAGE_DIRS.items():
        root = REPO / src
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if (path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo")
                    or any(part.startswith(".") for part in rel.parts)):
                continue
            files.append(f"{dest}/{rel.as_posix()}")
    return sorted(files)


def _module_name(wheel_path: str) -> str:
    """``gradwatch/integrations/lightning.py`` -> ``gradwatch.integrations.lightning``."""
    parts = wheel_path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _build_wheel(out: Path) -> Path:
    """Build the wheel of the checkout as it is on disk, committed or not.

    From a copy: setuptools builds through ``build/lib`` and never empties it, so an
    in-tree build could ship a module deleted since the last build (and would leave
    ``build/`` and ``*.egg-info`` in the checkout).
    """
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "wandb", "gradwatch_runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("gradwatch-*.whl")
    return wheel


def _fresh_venv(where: Path, wheel: Path) -> Path:
    """A virtualenv with the wheel installed and the running environment's packages visible.

    Nothing is downloaded: torch, pandas, ... are found through a ``.pth`` file that lists
    this environment's site-packages. Python appends those folders to ``sys.path`` without
    reading the ``.pth`` files inside them, so an editable install of gradwatch there
    stays inert (the venv script checks). The ``.pth`` is written after the install, so
    pip does not see that gradwatch either.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, env=_clean_env())
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    venv_site = subprocess.run([str(python), "-c", purelib], check=True, capture_output=True,
                               text=True, env=_clean_env())
    outer = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        outer.append(site.getusersitepackages())
    outer = [p for p in outer if os.path.isdir(p)]
    Path(venv_site.stdout.strip(), "outer_environment.pth").write_text("\n".join(outer) + "\n")
    return python


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH & co., which would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}


# Runs in the fresh venv: imports every module, then records a run and renders its report.
VENV_SCRIPT = textwrap.dedent("""
    import importlib, json, sys, traceback
    from pathlib import Path

    args = json.loads(sys.argv[1])
    venv = Path(sys.prefix).resolve()
    result = {"prefix": str(venv), "failed": {}, "optional": {}, "outside": [], "report": None}

    import gradwatch

    result["gradwatch_file"] = gradwatch.__file__
    result["editable_finder"] = sorted(m for m in sys.modules if m.startswith("__editable__"))
    for name in args["modules"]:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            # A missing optional package: the project's error names the pip command.
            kind = "optional" if "pip install" in str(e) else "failed"
            result[kind][name] = f"{type(e).__name__}: {e}"
            continue
        except Exception:
            result["failed"][name] = traceback.format_exc(limit=-3)
            continue
        if not Path(module.__file__).resolve().is_relative_to(venv):
            result["outside"].append(f"{name}: {module.__file__}")

    import torch
    import gradwatch.report

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = gradwatch.attach(model, opt, run_dir=args["run_dir"])
    x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
    for step in range(60):
        i = torch.randint(0, 256, (32,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        monitor.step()
        opt.step()
    monitor.detach()
    try:
        out = gradwatch.report.export_report(args["run_dir"], args["report"])
        result["report"] = str(out)
    except ImportError as e:
        if "pip install" not in str(e):
            raise
        result["optional"]["gradwatch.report.export_report"] = f"ImportError: {e}"
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_wheel_ships_every_module_and_data_file_and_renders_a_report(tmp_path):
    wheel = _build_wheel(tmp_path / "wheelhouse")
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = sorted(n for n in zf.namelist() if n.split("/")[0] == "gradwatch")
    shipped = _shipped_files()
    assert shipped, f"no package files found under {REPO}"
    missing = sorted(set(shipped) - set(in_wheel))
    modules = [_module_name(p) for p in missing if p.endswith(".py")]
    data = [p for p in missing if not p.endswith(".py")]
    assert not missing, (f"the wheel lacks modules {modules} and data files {data}: "
                         "check [tool.setuptools] packages / package-data in pyproject.toml")
    extra = sorted(set(in_wheel) - set(shipped))
    assert not extra, f"the wheel ships files the checkout does not have: {extra}"

    python = _fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # __main__ runs the command line when imported: it is run below instead.
    names = [_module_name(p) for p in shipped
             if p.endswith(".py") and not p.endswith("/__main__.py")]
    args = {"modules": names, "run_dir": str(tmp_path / "run"),
            "report": str(tmp_path / "report.html")}
    env = {**_clean_env(), "WANDB_MODE": "offline"}
    proc = subprocess.run([str(python), "-c", VENV_SCRIPT, json.dumps(args)], cwd=elsewhere,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    venv = Path(result["prefix"])
    assert Path(result["gradwatch_file"]).resolve().is_relative_to(venv), result["gradwatch_file"]
    assert result["editable_finder"] == [], "the outer environment's editable finder was activated"
    assert result["failed"] == {}, "\n".join(f"{k}: {v}" for k, v in result["failed"].items())
    assert result["outside"] == [], f"modules imported from outside the venv: {result['outside']}"

    for entry in ([str(python), "-m", "gradwatch", "--version"],
                  [str(venv / ("Scripts/gradwatch.exe" if os.name == "nt" else "bin/gradwatch")),
                   "--version"]):
        out = subprocess.run(entry, cwd=elsewhere, capture_output=True, text=True, env=env)
        assert out.returncode == 0 and "gradwatch" in out.stdout, (entry, out.stdout, out.stderr)

    if result["report"] is not None:
        html = Path(result["report"]).read_text(encoding="utf-8")
        assert "<h1>gradwatch report" in html
    if result["optional"]:
        # Everything else was checked; say which checks this environment could not run.
        pytest.skip("optional packages missing: " + "; ".join(
            f"{k}: {v}" for k, v in result["optional"].items()))


def test_cli_version_and_help_answer_without_importing_torch():
    code = (
        "import sys\n"
        "from gradwatch.cli import main\n"
        "for argv in (['--version'], ['--help'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_bare_cli_prints_its_usage_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "gradwatch"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: gradwatch")
    assert "a command is needed (gradwatch --help lists them)" in out.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_debug_shows_the_traceback(tmp_path, where):
    args = ["summary", str(tmp_path / "nope")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    out = subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True,
                         text=True)
    assert out.returncode != 0
    assert "Traceback (most recent call last)" in out.stderr
    assert "RunDirError" in out.stderr and "no such run directory" in out.stderr
    plain = subprocess.run([sys.executable, "-m", "gradwatch", "summary", str(tmp_path / "nope")],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().endswith("(--debug shows the traceback)")


def test_lazy_package_names_and_submodules():
    import gradwatch

    assert gradwatch.MonitorConfig().clip == "auto"
    assert callable(gradwatch.attach) and gradwatch.distributed.local is not None
    assert set(gradwatch.__all__) <= set(dir(gradwatch))
    with pytest.raises(AttributeError, match="module 'gradwatch' has no attribute 'nope'"):
        gradwatch.nope  # noqa: B018


def test_an_output_that_cannot_be_written_is_named_as_given(tmp_path):
    import torch

    import gradwatch

    model = torch.nn.Linear(2, 2)
    monitor = gradwatch.attach(model, run_dir=tmp_path / "run")
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        monitor.step()
    monitor.detach()
    (tmp_path / "a_file").write_text("not a folder")
    target = tmp_path / "a_file" / "r.html"  # its parent is a file: nothing can be written
    out = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(tmp_path / "run"),
                          "-o", str(target)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"cannot write {target}:" in out.stderr and ".tmp" not in out.stderr
