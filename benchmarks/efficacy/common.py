"""What the efficacy scripts share besides the methods: their command line and the
writing of their results and figures.

``parser(doc, "digits", seeds=10, plot="...")`` gives the options every script has:
``--seeds``, ``--out`` (default: ``<name>.md`` next to the scripts) and, where asked
for, ``--steps``, ``--lr`` and ``--plot`` (default: ``<name>.png`` next to the scripts;
``--plot ''`` for no figure, which leaves ``args.plot`` None). ``write(path, text)``
writes a results page, ``image_link`` links a figure from it, and ``figure(path, ...)``
opens a matplotlib figure on the Agg backend and, when its block ends, saves it at
exactly ``path``; both create the folder they write in.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def optional_path(text: str) -> Path | None:
    """``--plot``'s type: '' means none (``Path('')`` would be ``'.'``)."""
    return Path(text) if text else None


def parser(doc: str, name: str, seeds: int, *, steps: int | None = None,
           lr: float | None = None, plot: str | None = None) -> argparse.ArgumentParser:
    """The shared options of the script ``name`` (its doc string's first line the
    description): ``--seeds`` and ``--out``; ``--steps`` and ``--lr`` when given a
    default; ``--plot`` when given its help text."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, default=seeds)
    if steps is not None:
        p.add_argument("--steps", type=int, default=steps)
    if lr is not None:
        p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--out", type=Path, default=HERE / f"{name}.md")
    if plot is not None:
        p.add_argument("--plot", type=optional_path, default=HERE / f"{name}.png",
                       help=f"{plot} ('' for none)")
    return p


def write(path: Path, text: str) -> None:
    """Write a results page at ``path`` (its folder created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def image_link(alt: str, path: Path, page: Path) -> str:
    """Markdown for the image at ``path``, linked from the page written at ``page``."""
    return f"![{alt}]({Path(os.path.relpath(path, page.parent)).as_posix()})"


@contextmanager
def figure(path: Path, *args, dpi: int = 110, **kwargs):
    """``plt.subplots(*args, dpi=dpi, **kwargs)`` on the Agg backend, yielding
    ``(fig, axes)``; when the block ends, the figure is laid out tightly and saved at
    exactly ``path`` (in the format its suffix names, else PNG), then closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, dpi=dpi, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = path.suffix[1:].lower()
        # An explicit format: savefig would otherwise append one to a bare name.
        fig.savefig(path, format=fmt if fmt in fig.canvas.get_supported_filetypes()
                    else "png")
    finally:
        plt.close(fig)
