"""Assembling a bot from a config: plugins, memory, generator, engine, adapters."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, Iterable

from .adapter import Adapter, AdapterError
from .config import ConfigError, ConfigIssue, Settings, UsageError, locate
from .engine import Engine
from .generation import TextGenerator
from .memory import MemoryStore, MemoryUnavailable
from .sqlite_memory import SQLiteBackend
from .plugin_manager import PluginError, PluginHost
from .local.transformers_backend import TransformersBackend, prepare_model  # noqa: F401 - prepare_model: as before

log = logging.getLogger("chatforge")


def load_plugins(settings: Settings, strict: bool = False) -> PluginHost:
    """Load and configure every plugin; raise ConfigError when a plugin's or an adapter's section is wrong.

    Loading registers every secret of their config with the log redactor (see PluginHost.load).
    """
    host = PluginHost(settings, strict=strict)
    issues = host.load()
    if issues:
        raise ConfigError(issues, settings.filename)
    return host


def create_memory(settings: Settings, host: PluginHost | None = None) -> MemoryStore:
    """The store `memory.backend` names, from its validated keys. A store that can never work as
    configured (a refused file) is a UsageError naming its key (exit status 2).

    Without a host (a program or test building a memory alone), the sqlite backend with its defaults.
    """
    if host is None or host.memory_backend is None:
        backend, config = SQLiteBackend, SQLiteBackend.Config(path=settings.memory.path)
    else:
        backend, config = host.memory_backend, host.memory_config
    try:
        store = backend.create(config, settings)
    except MemoryUnavailable as exc:
        raise UsageError(str(exc)) from None
    log.info("memory: %s", backend.describe(config, settings))
    return store


def create_generator(settings: Settings, host: PluginHost | None = None) -> TextGenerator:
    """The generator of the backend `generator.backend` names, built from its validated config.

    Without a host (a program or test building a generator alone), the default transformers backend.
    """
    if host is None or host.generator_backend is None:
        return TransformersBackend.create(settings.generator, settings)
    return host.generator_backend.create(host.generator_config, settings)


def create_engine(
    settings: Settings,
    host: PluginHost,
    generator: TextGenerator | None = None,
    memory: MemoryStore | None = None,
) -> Engine:
    """An engine with its generator and memory; plugins' startup hooks have run.

    The memory opens first: a bad memory file should cost a second, not a model load.
    """
    opened = memory is None
    memory = memory if memory is not None else create_memory(settings, host)
    try:
        engine = Engine(settings, host, generator if generator is not None else create_generator(settings, host),
                        memory)
    except BaseException:
        if opened:
            memory.close()
        raise
    host.call("chatforge_startup", bot=engine)
    return engine


def choose_adapters(settings: Settings, host: PluginHost, names: Iterable[str] | None) -> list[str]:
    """The adapters to start: those named on the command line, or else every one enabled in config.

    An unknown name is a UsageError: it can only come from the command line, since an unknown
    `adapters.<name>` section is already a config issue of PluginHost.load.
    """
    chosen = list(names or [name for name, section in settings.adapters.items() if section.enabled])
    unknown = [name for name in chosen if name not in host.adapters]
    if unknown:
        known = ", ".join(sorted(host.adapters)) or "none"
        raise UsageError("\n".join(f'--adapter {name}: no adapter named "{name}" (available: {known})'
                                   for name in unknown))
    if not chosen:
        raise ConfigError([ConfigIssue("adapters", "no adapter is enabled; set adapters.<name>.enabled: true "
                                       "or pass --adapter NAME")], settings.filename)
    return chosen


def check_tokens(settings: Settings, host: PluginHost, names: Iterable[str]) -> None:
    """Raise one ConfigError naming every adapter in `names` that needs a token (`token_env`) and has none.

    Called before the model loads: a missing token should cost a second, not a model load, and all of
    them are listed at once. The message names the variable the token was to come from, if any.
    """
    issues = []
    for name in names:
        adapter = host.adapters.get(name)
        if adapter is None or getattr(adapter, "token_env", None) is None:
            continue
        section = settings.adapters.get(name)
        token = (section.model_extra or {}).get("token") if section is not None else None
        if token is not None and (not isinstance(token, str) or token.strip()):
            continue  # present (a value of the wrong type is the section's own issue)
        path = f"adapters.{name}.token"
        variables = settings.env_references.get(path)
        if variables:
            which = f"variable {variables[0]} is" if len(variables) == 1 else f"variables {', '.join(variables)} are"
            issues.append(ConfigIssue(path, f"no token is set: the environment {which} empty or not set"))
        else:
            issues.append(ConfigIssue(path, f"no token is set; {adapter.token_hint()}"))
    if issues:
        raise ConfigError(locate(issues, settings.lines), settings.filename)


class AdapterStopped(Exception):
    """An adapter failed for good: chatforge exits with status 1, so that a supervisor restarts it."""


async def serve(engine: Engine, adapter_names: list[str]) -> None:
    """Run the adapters side by side around one engine until they end or SIGINT/SIGTERM stops them.

    On a signal every adapter is asked to stop and given `bot.shutdown_timeout`
    seconds to send the replies in flight; then the engine closes the memory.
    An adapter that ends on its own (the console at the end of its input)
    leaves the others serving. One that fails stops everything, and its
    failure is raised: an AdapterError (a missing or rejected token), a
    PluginError (a plugin failed under --strict, wherever it ran), or
    AdapterStopped (anything else).
    """
    host = engine.host
    adapters = [host.adapters[name](engine, host.adapter_configs.get(name)) for name in adapter_names]
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop_requested.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or not a Unix loop
    running = {asyncio.create_task(adapter.run(), name=f"adapter:{adapter.name}"): adapter for adapter in adapters}
    stopper = asyncio.create_task(stop_requested.wait())
    plugin_failure = asyncio.create_task(engine.stopped_by_plugin())
    fatal: Exception | None = None
    try:
        while running and fatal is None and not stop_requested.is_set():
            done, _ = await asyncio.wait([*running, stopper, plugin_failure], return_when=asyncio.FIRST_COMPLETED)
            if plugin_failure in done:
                fatal = plugin_failure.result()
            for task in done & running.keys():
                adapter = running.pop(task)
                error = None if task.cancelled() else task.exception()
                if error is None or fatal is not None:
                    continue
                if isinstance(error, (AdapterError, PluginError)):
                    fatal = error
                else:
                    fatal = AdapterStopped(f"the {adapter.name} adapter stopped: {type(error).__name__}: {error}")
                    log.debug("the %s adapter's traceback", adapter.name, exc_info=error)
    finally:
        stopper.cancel()
        plugin_failure.cancel()
        await _stop_adapters(running, engine.settings.bot.shutdown_timeout)
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        await engine.close()
    if fatal is not None:
        raise fatal


async def _stop_adapters(running: dict[asyncio.Task, Adapter], timeout: float) -> None:
    """Ask each running adapter to stop; cancel what has not finished after `timeout` seconds."""
    if not running:
        return
    stopping = [asyncio.create_task(adapter.stop()) for adapter in running.values()]
    done, pending = await asyncio.wait([*running, *stopping], timeout=timeout)
    for task in pending:
        log.warning("stopping: %s did not finish within %s s; cancelling it", task.get_name(), timeout)
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task in running and not task.cancelled() and task.exception() is not None:
            log.error("the %s adapter failed while stopping: %s", running[task].name, task.exception())
