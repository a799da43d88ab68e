"""The settings module is the only reader of the environment, and the guide's table is rendered from it."""

import ast
from pathlib import Path

from llmrun import settings

PACKAGE = Path(settings.__file__).resolve().parent


def test_only_the_settings_module_reads_the_environment():
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert readers == [], f"read the environment through llmrun.settings instead: {readers}"


def test_every_variable_read_is_listed_and_documented():
    source = (PACKAGE / "settings.py").read_text()
    guide = settings.GUIDE.read_text()
    assert settings.guide_with_table(guide) == guide, "docs/guide.md is stale: run python -m llmrun.settings"
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    for setting in settings.SETTINGS:
        assert f"`{setting.name}`" in guide and setting.description
    defined = {node.targets[0].id for node in ast.parse(source).body
               if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
               and getattr(node.value.func, "id", "") == "Setting"}
    assert defined == set(names), "every Setting must be in SETTINGS"


def test_settings_are_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", " gemv , layer")
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "yes")  # llmrun's own switches take 1 only
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")  # huggingface_hub's take its words
    from llmrun.paths import llmrun_home

    assert llmrun_home() == tmp_path / "home"
    assert settings.LLMRUN_FAIL_CHECKS.words() == ("gemv", "layer")
    assert not settings.LLMRUN_NO_NATIVE.is_on() and settings.HF_HUB_OFFLINE.is_on()
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "1")
    assert settings.LLMRUN_NO_NATIVE.is_on()
