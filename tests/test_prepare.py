"""The prep scripts' shared code: a missing HF `datasets` package, no network, and unreadable
sources are one paragraph and exit status 2, with nothing written (the scripts' happy paths are
in test_datasets.py)."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lm_human_preferences.language import prepare

ROOT = Path(__file__).resolve().parents[1]

# Imported at start-up through PYTHONPATH: HF `datasets` is looked for outside site-packages
# only, as on a machine without it, where the repository's own datasets/ folder is what remains.
HIDE_HF_DATASETS = '''
import importlib.machinery, sys

class HideHFDatasets:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "datasets":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if "-packages" not in p])
        if spec is None:
            raise ModuleNotFoundError("No module named 'datasets'", name=name)
        return spec

sys.meta_path.insert(0, HideHFDatasets)
'''

# No host name resolves, as on a machine without a network.
OFFLINE = '''
import socket

def getaddrinfo(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

socket.getaddrinfo = getaddrinfo
'''


def run_script(script, *args, tmp_path, site="", hub_offline=False):
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(site)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PYTHONPATH=str(tmp_path / "site"), HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "hf"))
    if hub_offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "datasets" / script), "--out-dir", str(tmp_path / "out"),
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_paragraph(proc, tmp_path, *says):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in says:
        assert text in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_hf_datasets_shadowed_by_the_repository_folder_is_a_clear_error(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "He said hello."}\n')
    proc = run_script("books.py", "--source", tmp_path / "rows.jsonl", tmp_path=tmp_path, site=HIDE_HF_DATASETS)
    assert_one_paragraph(proc, tmp_path, "the Hugging Face `datasets` package is not installed",
                         f"finds only the folder {ROOT / 'datasets'}", "pip install datasets")


@pytest.mark.parametrize("found", [None, types.ModuleType("datasets")])  # not installed; a namespace package
def test_hf_datasets_names_the_package_to_install(found, monkeypatch):
    if found is not None:
        found.__path__ = [str(ROOT / "datasets")]
    monkeypatch.setitem(sys.modules, "datasets", found)
    with pytest.raises(prepare.PrepError, match=r"`pip install datasets`"):
        prepare.hf_datasets()


@pytest.mark.parametrize("script, host", [("books.py", "huggingface.co"), ("cnndm.py", "huggingface.co"),
                                          ("tldr.py", "openaipublic.blob.core.windows.net")])
def test_offline_is_one_paragraph_at_once_naming_source_file(script, host, tmp_path):
    proc = run_script(script, tmp_path=tmp_path, site=OFFLINE)
    assert_one_paragraph(proc, tmp_path, f"cannot reach {host}", "no network?", "`--source FILE`")


def test_hub_offline_mode_is_one_paragraph_naming_source_file(tmp_path):
    proc = run_script("cnndm.py", tmp_path=tmp_path, hub_offline=True)
    assert_one_paragraph(proc, tmp_path, "could not read 'abisee/cnn_dailymail' (config '3.0.0', split 'train') "
                                         "from the Hugging Face hub", "`--source FILE`")


def test_unreadable_or_missing_source_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    proc = run_script("cnndm.py", "--source", tmp_path / "broken.parquet", tmp_path=tmp_path, hub_offline=True)
    assert_one_paragraph(proc, tmp_path, f"could not read {tmp_path / 'broken.parquet'}: ")
    proc = run_script("tldr.py", "--source", tmp_path / "nothing.json", tmp_path=tmp_path, hub_offline=True)
    assert_one_paragraph(proc, tmp_path, f"--source {tmp_path / 'nothing.json'}: no such file")


def test_a_failure_after_some_rows_leaves_no_output_or_folder(tmp_path, monkeypatch, capsys):
    def rows(**kwargs):
        yield {"text": "one."}
        raise OSError("connection reset by peer")

    monkeypatch.setattr(prepare, "load_rows", rows)
    with pytest.raises(SystemExit) as exit_:
        prepare.prepare_main("x", default_out_dir=tmp_path / "out", hub_id="a/b", text_field="text",
                             to_passages=lambda texts: texts, description="", argv=[])
    assert exit_.value.code == 2
    assert "error: x: could not read 'a/b' (config None, split 'train') from the Hugging Face hub: OSError: " \
           "connection reset by peer; download the data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
