"""Keep the committed notebooks exactly as JupyterLab 4 saves them, so opening one does not mark it modified.

JupyterLab rewrites a notebook whose kernelspec display name differs from the kernel's ("Python 3" →
"Python 3 (ipykernel)") and its autosave then reformats the whole file (nbformat's layout: sorted keys, source as
lines). Checked with JupyterLab 4.6.6 + ipykernel 7.4: when the kernel starts, JupyterLab writes the kernel's
display name and its whole language_info, Python version included, and marks the notebook modified if either
differs. So the script writes both as the project's kernel reports them (run it with the project's .venv Python),
in nbformat's layout; such a notebook opens clean, and saving it changes nothing. Outputs and execution counts
are dropped (notebooks are committed bare).

    python -m helpers.notebook_meta notebooks/*.ipynb          # rewrite in place
    python -m helpers.notebook_meta --check notebooks/*.ipynb  # exit 1 and name each file that differs
"""
from __future__ import annotations

import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def language_info() -> dict:
    """What this Python's ipykernel reports, and JupyterLab writes into the notebook, as language_info."""
    from ipykernel.ipkernel import IPythonKernel

    return dict(sorted(IPythonKernel.language_info.items()))


def canonical(text: str) -> str:
    """The notebook `text` as JupyterLab would save it, with the committed metadata and no outputs."""
    import nbformat

    nb = nbformat.reads(text, as_version=4)
    nb.metadata["kernelspec"], nb.metadata["language_info"] = dict(KERNELSPEC), language_info()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nbformat.writes(nb) + "\n"  # jupyter-server ends the file with a newline


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    differ = []
    for path in (Path(a) for a in args if a != "--check"):
        text = path.read_text(encoding="utf-8")
        if canonical(text) != text:
            differ.append(path)
            if not check:
                path.write_text(canonical(text), encoding="utf-8")
    for path in differ:
        fix = "not as JupyterLab saves it; run python -m helpers.notebook_meta on it"
        print(f"{path}: {fix if check else 'rewritten'}")
    return 1 if check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
