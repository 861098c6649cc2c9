"""The tree's two halves: the framework never loads torch, and the local model keeps its old import paths."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import chatforge
import chatforge.adapters
import chatforge.local
import chatforge.plugins

MOVED = ["generator", "batching", "kv_cache", "prompt", "model_loading", "numerics", "onnx_runtime",
         "transformers_backend"]
"""The local model's modules, once `chatforge.<name>`, now `chatforge.local.<name>`."""


def framework_modules() -> list[str]:
    """Every module of the framework half: `chatforge.*` but the local model and its compatibility aliases."""
    names = [f"chatforge.{info.name}" for info in pkgutil.iter_modules(chatforge.__path__)
             if info.name not in MOVED and info.name != "local"]
    for package in (chatforge.adapters, chatforge.plugins):
        names += [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    return ["chatforge", *names]


def heavy_modules_after(code: str) -> list[str]:
    """Which of torch and transformers a fresh interpreter has loaded after running `code`."""
    probe = textwrap.dedent(code) + textwrap.dedent("""
        import sys
        print(",".join(name for name in ("torch", "transformers") if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_the_framework_and_a_default_plugin_host_never_import_torch():
    assert heavy_modules_after("""
        import chatforge.app, chatforge.engine, chatforge.cli, chatforge.adapters.console, chatforge.testing
        from chatforge.config import Settings
        from chatforge.plugin_manager import PluginHost

        host = PluginHost(Settings())
        assert host.load() == []
        assert host.generator_backend is not None and host.generator_backend.name == "transformers"
    """) == []


def test_no_framework_module_imports_torch():
    modules = framework_modules()
    assert "chatforge.engine" in modules and "chatforge.generator" not in modules
    assert heavy_modules_after("import importlib\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in modules)) == []


def test_the_local_package_and_its_backend_import_cheaply():
    assert heavy_modules_after("import chatforge.local.transformers_backend, chatforge.local.prompt, "
                               "chatforge.local.model_loading") == []


@pytest.mark.parametrize("name", MOVED)
def test_old_import_paths_are_the_moved_modules(name):
    new = importlib.import_module(f"chatforge.local.{name}")
    old = importlib.import_module(f"chatforge.{name}")
    assert old is new
    assert sys.modules[f"chatforge.{name}"] is new
    assert getattr(chatforge, name) is new  # `from chatforge import generator` as well


def test_patching_an_old_path_patches_the_module_the_code_uses(monkeypatch):
    from chatforge.local import model_loading

    monkeypatch.setattr("chatforge.model_loading.embedded_gguf_file", lambda: "patched")
    assert model_loading.embedded_gguf_file() == "patched"
    from chatforge.prompt import PromptBuilder, window_start  # noqa: F401 - names still importable

    from chatforge.memory import window_start as recall_start

    assert window_start is recall_start


def test_the_transformers_plugin_is_the_moved_module():
    from chatforge.plugin_manager import BUILTIN_PLUGINS

    assert BUILTIN_PLUGINS["transformers"] == "chatforge.local.transformers_backend"
