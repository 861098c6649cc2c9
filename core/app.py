"""Assembling a bot from a config: plugins, memory, generator, engine, adapters."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Iterable

from .config import ConfigError, ConfigIssue, Settings
from .engine import Engine
from .generator import TextGenerator, TransformersGenerator
from .memory import InMemoryMemory, MemoryStore, SQLiteMemory
from .plugin_manager import PluginHost

log = logging.getLogger("chatforge")


def load_plugins(settings: Settings, strict: bool = False) -> PluginHost:
    """Load and configure every plugin; raise ConfigError when a plugin's section is wrong."""
    host = PluginHost(settings, strict=strict)
    issues = host.load()
    if issues:
        raise ConfigError(issues, settings.filename)
    return host


def create_memory(settings: Settings) -> MemoryStore:
    if settings.memory.backend == "memory":
        return InMemoryMemory()
    return SQLiteMemory(settings.resolve_path(settings.memory.path))


def create_generator(settings: Settings) -> TextGenerator:
    return TransformersGenerator.from_config(
        settings.generator, settings.memory, settings.resolve_path(settings.generator.cache_dir)
    )


def create_engine(
    settings: Settings,
    host: PluginHost,
    generator: TextGenerator | None = None,
    memory: MemoryStore | None = None,
) -> Engine:
    """An engine with its generator and memory; plugins' startup hooks have run."""
    engine = Engine(
        settings,
        host,
        generator if generator is not None else create_generator(settings),
        memory if memory is not None else create_memory(settings),
    )
    host.call("chatforge_startup", bot=engine)
    return engine


def choose_adapters(settings: Settings, host: PluginHost, names: Iterable[str] | None) -> list[str]:
    """The adapters to start: those named, or else every one enabled in config."""
    chosen = list(names or [name for name, section in settings.adapters.items() if section.enabled])
    unknown = [name for name in chosen if name not in host.adapters]
    if unknown:
        known = ", ".join(sorted(host.adapters)) or "none"
        raise ConfigError([ConfigIssue(f"adapters.{name}", f'no adapter named "{name}" (available: {known})')
                           for name in unknown], settings.filename)
    if not chosen:
        raise ConfigError([ConfigIssue("adapters", "no adapter is enabled; set adapters.<name>.enabled: true "
                                       "or pass --adapter NAME")], settings.filename)
    return chosen


async def serve(engine: Engine, adapter_names: list[str]) -> None:
    """Run the adapters side by side around one engine until they end or a signal stops them."""
    host = engine.host
    adapters = [host.adapters[name](engine, host.adapter_configs.get(name)) for name in adapter_names]
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(adapter.run(), name=f"adapter:{adapter.name}") for adapter in adapters]

    def request_stop() -> None:
        for adapter in adapters:
            asyncio.create_task(adapter.stop())

    for signum in (signal.SIGTERM,):
        try:
            loop.add_signal_handler(signum, request_stop)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except Exception:  # noqa: BLE001 - one platform failing leaves the others serving
                log.exception("an adapter stopped with an error")
    finally:
        for task in tasks:
            task.cancel()
        await engine.close()
