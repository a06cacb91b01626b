"""Committed notebooks carry the kernelspec JupyterLab 4 writes, so opening one does not mark it modified."""
import json

from helpers.config import PROJECT_ROOT
from helpers.notebook_meta import KERNELSPEC, canonical, language_info, main
from helpers.runs import NOTEBOOKS


def test_every_committed_notebook_has_jupyterlabs_kernel_metadata():
    for name in NOTEBOOKS:
        meta = json.loads((PROJECT_ROOT / "notebooks" / f"{name}.ipynb").read_text())["metadata"]
        # the Python version is the project's (.venv); JupyterLab on another Python marks notebooks modified
        without_version = {k: v for k, v in language_info().items() if k != "version"}
        assert meta["kernelspec"] == KERNELSPEC, name
        assert {k: v for k, v in meta["language_info"].items() if k != "version"} == without_version, name
        assert meta["language_info"]["version"].count(".") == 2, name


def test_the_script_rewrites_a_notebook_as_jupyterlab_saves_it(tmp_path, capsys):
    source = json.loads((PROJECT_ROOT / "notebooks" / "02_unet_arch.ipynb").read_text())
    source["metadata"]["kernelspec"]["display_name"] = "Python 3"
    source["cells"][1].update(outputs=[{"output_type": "stream", "name": "stdout", "text": "hi\n"}],
                              execution_count=3)
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(source))
    assert main(["--check", str(path)]) == 1 and "not as JupyterLab saves it" in capsys.readouterr().out
    assert main([str(path)]) == 0 and main(["--check", str(path)]) == 0
    fixed = json.loads(path.read_text())
    assert fixed["metadata"]["kernelspec"] == KERNELSPEC
    assert fixed["cells"][1]["outputs"] == [] and fixed["cells"][1]["execution_count"] is None
    assert canonical(path.read_text()) == path.read_text()  # a second pass changes nothing
