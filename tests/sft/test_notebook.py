"""The quickstart notebook runs top to bottom (format -> tiny train -> chat)."""


import nbformat
from nbclient import NotebookClient
from paths import REPO


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SO8T_REPO", str(REPO))
    monkeypatch.setenv("SO8T_NOTEBOOK_OUT", str(tmp_path / "quickstart"))
    monkeypatch.setenv("SO8T_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(REPO / "notebooks/quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "user sees: 2 + 2 = 4." in outputs
    assert "final answer shown to the user:" in outputs
    assert (tmp_path / "quickstart/final/config.json").is_file()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
