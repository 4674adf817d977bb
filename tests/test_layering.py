"""Imports point down: `language/*` imports nothing of the package outside `language/`, and
`hparams`, `distributed`, `kl` and `ppo` (pure math over `kl`) import nothing above them.
Read from the source with `ast`, so an import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lm_human_preferences"
PACKAGES = ("lm_human_preferences", "lm_human_preferences.language")


def package_imports(path: Path) -> set[str]:
    """The `lm_human_preferences.*` modules `path` imports (`from lm_human_preferences import x`
    counts as `lm_human_preferences.x`, and so in `language`), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lm_human_preferences"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module.startswith("lm_human_preferences."):
                found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(f"(relative import in {path.name})")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("language/*.py")), ids=lambda p: p.name)
def test_language_imports_only_language(path):
    upward = {m for m in package_imports(path) if not m.startswith("lm_human_preferences.language.")}
    assert not upward, f"{path.name} imports {sorted(upward)} from above language/"


# distributed may read device names through language/devices.py: language/ is the bottom layer.
@pytest.mark.parametrize("module, allowed", [("hparams", set()), ("distributed", {"lm_human_preferences.language.devices"}),
                                             ("kl", set()),
                                             ("ppo", {"lm_human_preferences.kl"})])
def test_bottom_modules_import_nothing_above_them(module, allowed):
    imports = package_imports(PACKAGE / f"{module}.py")
    assert imports <= allowed, f"{module}.py imports {sorted(imports - allowed)}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from lm_human_preferences.lm_tasks import load_pretrained\n"
                      "    from lm_human_preferences import hparams\n    import lm_human_preferences.ppo\n"
                      "from lm_human_preferences.language import gpt\n")
    assert package_imports(source) == {"lm_human_preferences.lm_tasks", "lm_human_preferences.hparams",
                                       "lm_human_preferences.ppo", "lm_human_preferences.language.gpt"}
