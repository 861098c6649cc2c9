"""Finding, loading and calling plugins, so that one broken plugin never takes the bot down.

Plugins come from three places, all registered the same way:
built-ins (the core commands, the skills in `chatforge.plugins`, the adapters),
the `chatforge` entry-point group of installed distributions, and
`plugins.<name>.module` in the config (an import path or a `.py` file).
A plugin that fails to import, to validate its config, or inside a hook is
logged by name, recorded for `chatforge plugins`, and skipped. With
`strict=True` the same failure raises `PluginError` instead. A `module:` that
can never be a plugin (not a Python file, or a module already loaded as
another plugin) is a config issue of `plugins.<name>.module` instead.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pluggy
from pydantic import BaseModel

from . import hookspecs, redaction
from .commands import Command, CommandRegistry
from .generation import GeneratorBackend
from .memory import MemoryBackend
from .skill import SkillError
from .config import DEFAULT_MEMORY_BACKEND, ConfigIssue, PluginSection, Settings, locate, validate_section

log = logging.getLogger("chatforge.plugins")

ENTRY_POINT_GROUP = "chatforge"

# name -> module. Skills and adapters are listed here only because they ship
# with chatforge; they use exactly the hooks a third-party plugin uses.
BUILTIN_PLUGINS: dict[str, str] = {
    "core": "chatforge.builtin_commands",
    "transformers": "chatforge.local.transformers_backend",
    "openai": "chatforge.openai_backend",
    "sqlite": "chatforge.sqlite_memory",
    "memory": "chatforge.memory",
    "postgres": "chatforge.postgres_memory",
    "sentiment": "chatforge.plugins.sentiment",
    "summarize": "chatforge.plugins.summarize",
    "translate": "chatforge.plugins.translate",
    "dialogues": "chatforge.plugins.dialogues",
    "console": "chatforge.adapters.console",
    "discord": "chatforge.adapters.discord",
    "telegram": "chatforge.adapters.telegram",
    "http": "chatforge.adapters.http",
}


class PluginError(Exception):
    """A plugin failure in strict mode."""


class UnusableModule(Exception):
    """`plugins.<name>.module` names something that can never be a plugin: the config is wrong, not a plugin."""


FAILED = object()
"""What a plugin's call gives when it raised or timed out (it has been reported)."""


def is_plugin_fault(exc: BaseException) -> bool:
    """Whether `exc`, raised while plugin code ran, is the plugin's failure.

    Everything is, `SystemExit` included (argparse exits on bad arguments),
    except the process's own Ctrl-C and the cancellation of the task that
    called the plugin: those must go on to stop what they were meant to stop.
    """
    if isinstance(exc, KeyboardInterrupt):
        return False
    if isinstance(exc, asyncio.CancelledError):
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: the plugin raised it itself
            return True
        return task is None or not task.cancelling()
    return True


class PluginExited(Exception):
    """A plugin's SystemExit, carried as an ordinary exception.

    asyncio stops the whole event loop when a task raises SystemExit (also a
    task that waits for a thread), so plugin code runs through `contained` or
    `call_contained`, which turn it into this.
    """

    def __init__(self, exit: SystemExit) -> None:
        super().__init__(str(exit))
        self.exit = exit


async def contained(awaitable: Any) -> Any:
    """Await a plugin's awaitable; its SystemExit becomes PluginExited (see there)."""
    try:
        return await awaitable
    except SystemExit as exc:
        raise PluginExited(exc) from exc


def call_contained(function: Callable[..., Any], *args: Any) -> Any:
    """Call a plugin's function (in a worker thread); its SystemExit becomes PluginExited."""
    try:
        return function(*args)
    except SystemExit as exc:
        raise PluginExited(exc) from exc


@dataclass
class PluginInfo:
    """What `chatforge plugins` shows about one plugin."""

    name: str
    source: str
    """"builtin", "entry point" or "config"."""
    location: str
    """Module path or file the plugin was loaded from."""
    distribution: str | None = None
    version: str | None = None
    enabled: bool = True
    errors: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    generators: list[str] = field(default_factory=list)
    memory_backends: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.enabled and not self.errors


@dataclass
class PerPlugin:
    """A hook argument whose value depends on the plugin being called (its config, its `register`)."""

    value_for: Callable[[str], Any]


class PluginHost:
    """Owns the pluggy PluginManager and calls hooks one plugin at a time, catching failures."""

    def __init__(self, settings: Settings, strict: bool = False) -> None:
        self.settings = settings
        self.strict = strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.configs: dict[str, Any] = {}
        self.commands = CommandRegistry()
        self.adapters: dict[str, type] = {}
        self.adapter_configs: dict[str, Any] = {}
        self.generators: dict[str, type[GeneratorBackend]] = {}
        self.generator_config: Any = None
        """The `generator:` section as the chosen backend's `Config` validated it (None when it is wrong)."""
        self.memory_backends: dict[str, type[MemoryBackend]] = {}
        self.memory_config: Any = None
        """The chosen memory backend's own keys of `memory:`, as its `Config` validated them."""
        self.module_issues: dict[str, ConfigIssue] = {}
        """plugin name -> why its `plugins.<name>.module` can never be a plugin (a config error, not a fault)."""

    # ------------------------------------------------------------ loading

    def load(self, extra_plugins: dict[str, Any] | None = None) -> list[ConfigIssue]:
        """Load every plugin, validate plugin and adapter config; return the config issues found.

        Every secret of the validated sections (SecretStr values) is registered with the log redactor at
        once, before anything can log it. `extra_plugins` (name -> module or object) are registered too:
        the test kit uses it.
        """
        sections = self.settings.plugins
        for name, module in BUILTIN_PLUGINS.items():
            self._load(name, "builtin", module, lambda module=module: importlib.import_module(module))
        for name, plugin in (extra_plugins or {}).items():
            self._load(name, "given", getattr(plugin, "__name__", repr(plugin)), lambda plugin=plugin: plugin)
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            self._load(
                entry_point.name, "entry point", entry_point.value, entry_point.load,
                distribution=dist.name if dist else None, version=dist.version if dist else None,
            )
        for name, section in sections.items():
            if section.module and name not in self.infos:
                self._load(name, "config", section.module, lambda m=section.module, n=name: self._import_configured(n, m))
        issues = locate(list(self.module_issues.values()), self.settings.lines) + self._validate_plugin_configs()
        self._collect("chatforge_register_adapters", "adapter", self.adapters, "adapters", needs_config=False)
        issues += self._validate_adapter_configs()
        self._collect("chatforge_register_generators", "generator backend", self.generators, "generators",
                      needs_config=True)
        issues += self._validate_generator_config()
        self._collect("chatforge_register_memory_backends", "memory backend", self.memory_backends,
                      "memory_backends", needs_config=True)
        issues += self._validate_memory_config()
        redaction.REDACTOR.add(redaction.secrets_in(self.adapter_configs) + redaction.secrets_in(self.configs)
                               + redaction.secrets_in(self.generator_config)
                               + redaction.secrets_in(self.memory_config))
        self._register_commands()
        return issues

    def _load(self, name: str, source: str, location: str, importer: Callable[[], Any], **meta: Any) -> None:
        if name in self.infos:
            self._fail(PluginInfo(name, source, location, **meta), "load",
                       f"a plugin named {name!r} is already loaded from {self.infos[name].location}")
            return
        info = self.infos[name] = PluginInfo(name, source, location, **meta)
        section = self.settings.plugins.get(name)
        if section is not None and not section.enabled:
            info.enabled = False
            return
        missing = _missing_requirements(meta.get("distribution"))
        if missing:
            self._fail(info, "import", f"needs {', '.join(missing)}, not installed or at another version: "
                                       f"pip install {' '.join(repr(r) for r in missing)}")
            return
        try:
            plugin = importer()
        except UnusableModule as exc:
            self._refuse_module(name, str(exc))
            return
        except ModuleNotFoundError as exc:
            self._fail(info, "import", f"needs the module {exc.name!r}, which is not installed "
                                       f"(pip install the package that provides it, often: pip install {exc.name})", exc)
            return
        except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
            self._fail(info, "import", _describe(exc), exc)
            return
        other = self.pm.get_name(plugin)
        if other is not None:  # pluggy would raise a ValueError listing every plugin
            problem = f'{location} is already loaded as plugin "{other}"'
            if source == "config":
                self._refuse_module(name, f"{problem} (set its options under plugins.{other})")
            else:
                self._fail(info, "registration", problem)
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info, "registration", _unknown_hooks(plugin) or str(exc))
            return
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])

    def _refuse_module(self, name: str, problem: str) -> None:
        """Report `plugins.<name>.module` as a config issue, and forget the plugin (it was never one)."""
        del self.infos[name]
        self.module_issues[name] = ConfigIssue(f"plugins.{name}.module", problem)

    def _import_configured(self, name: str, module: str) -> Any:
        """Import `pkg.mod`, or a `.py` file (relative to the config file's folder)."""
        if not module.endswith(".py") and "/" not in module:
            return importlib.import_module(module)
        path = self.settings.resolve_path(module)
        if not path.is_file():
            raise FileNotFoundError(f"no such plugin file: {path}")
        module_name = f"chatforge_config_plugin_{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UnusableModule(f"{module} is not a Python file (.py) nor an import path (package.module)")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return loaded

    def _validate_plugin_configs(self) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        for name, section in self.settings.plugins.items():
            info = self.infos.get(name)
            if info is None and name not in self.module_issues:
                known = ", ".join(sorted(self.infos)) or "none"
                issues.append(ConfigIssue(
                    f"plugins.{name}",
                    f'no plugin named "{name}" is installed (installed: {known}); '
                    f"to load one from a file or module, add `module:`",
                ))
        for name, info in self.infos.items():
            if not info.loaded:
                continue
            options = dict((self.settings.plugins.get(name) or PluginSection()).model_extra or {})
            model = self.call_one(name, "chatforge_config_model")
            if model is None:
                for key in options:
                    issues.append(ConfigIssue(f"plugins.{name}.{key}", f"unknown key (plugin {name!r} takes no options)"))
                continue
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                self._fail(info, "chatforge_config_model", f"returned {model!r}, not a pydantic model class")
                continue
            config, found = validate_section(model, options, f"plugins.{name}", self.settings)
            issues += found
            self.configs[name] = config
        return issues

    def _collect(self, hook_name: str, kind: str, registry: dict[str, type], info_field: str,
                 needs_config: bool) -> None:
        """Call a registration hook: each plugin's `register(Class)` adds a class by its `name`.

        Adapters, generator backends and memory backends are all registered this way; a backend must also
        have a pydantic `Config`, which validates its config section.
        """
        def register_for(plugin: str) -> Callable[[type], None]:
            def register(cls: type) -> None:
                name = getattr(cls, "name", None)
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{kind} {cls!r} has no `name`")
                if needs_config and not (isinstance(getattr(cls, "Config", None), type)
                                         and issubclass(cls.Config, BaseModel)):
                    raise ValueError(f"{kind} {name!r} has no pydantic `Config` model")
                if name in registry:
                    raise ValueError(f"{kind} {name!r} is already registered")
                registry[name] = cls
                getattr(self.infos[plugin], info_field).append(name)
            return register

        self.call(hook_name, register=PerPlugin(register_for))

    def _validate_adapter_configs(self) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        for name, section in self.settings.adapters.items():
            adapter = self.adapters.get(name)
            if adapter is None:
                known = ", ".join(sorted(self.adapters)) or "none"
                issues.append(ConfigIssue(f"adapters.{name}", f'no adapter named "{name}" (available: {known})'))
                continue
        for name, adapter in self.adapters.items():
            section = self.settings.adapters.get(name)
            options = dict(section.model_extra or {}) if section else {}
            model = getattr(adapter, "Config", None)
            if model is None:
                issues += [ConfigIssue(f"adapters.{name}.{key}", "unknown key") for key in options]
                self.adapter_configs[name] = None
                continue
            config, found = validate_section(model, options, f"adapters.{name}", self.settings)
            issues += found
            self.adapter_configs[name] = config
        return issues

    @property
    def generator_backend(self) -> type[GeneratorBackend] | None:
        """The backend `generator.backend` names, if one is registered under that name."""
        return self.generators.get(self.settings.generator.backend)

    def _validate_generator_config(self) -> list[ConfigIssue]:
        """Validate the `generator:` section with the chosen backend's own `Config`.

        The default backend's keys were validated with the rest of the file (`GeneratorConfig`); another
        backend's are validated here, from the section as written, with errors by YAML path as everywhere.
        """
        name = self.settings.generator.backend
        backend = self.generator_backend
        if backend is None:
            return self._unknown_backend("generator", name, self.generators)
        if isinstance(self.settings.generator, backend.Config):
            self.generator_config = self.settings.generator
            return []
        options = self.settings.raw.get("generator")
        config, issues = validate_section(backend.Config, dict(options) if isinstance(options, dict) else {},
                                          "generator", self.settings)
        self.generator_config = config
        return issues

    def _unknown_backend(self, section: str, name: str, registered: dict[str, type]) -> list[ConfigIssue]:
        """`<section>.backend` names nothing registered: one issue listing what is, with the closest name."""
        known = sorted(registered)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        issue = ConfigIssue(f"{section}.backend", f'no {section} backend named "{name}" '
                            f'(available: {", ".join(known) or "none"}){hint}')
        return locate([issue], self.settings.lines)

    @property
    def memory_backend(self) -> type[MemoryBackend] | None:
        """The backend `memory.backend` names, if one is registered under that name."""
        return self.memory_backends.get(self.settings.memory.backend)

    def _validate_memory_config(self) -> list[ConfigIssue]:
        """Validate the backend's keys of `memory:` (all but the engine's own) with its `Config`."""
        name = self.settings.memory.backend
        backend = self.memory_backend
        if backend is None:
            return self._unknown_backend("memory", name, self.memory_backends)
        section = self.settings.raw.get("memory")
        written = dict(section) if isinstance(section, dict) else {}
        if name == DEFAULT_MEMORY_BACKEND:  # the whole section was validated with the file (MemoryConfig)
            options = {key: value for key, value in written.items() if key in backend.Config.model_fields}
            config, issues = validate_section(backend.Config, options, "memory", self.settings)
            self.memory_config = config
            return issues
        engine_keys = set(type(self.settings.memory).model_fields) - {"path"}
        theirs = set(backend.Config.model_fields)
        options = {key: value for key, value in written.items() if key not in engine_keys}
        if "path" in options and "path" not in theirs:  # the sqlite file of a config switched to another store
            log.info("memory.path is the sqlite store's; memory.backend %s does not use it", name)
            del options["path"]
        issues = []
        for key in [key for key in options if key not in theirs]:  # a typo may be of an engine key too
            close = difflib.get_close_matches(key, sorted(theirs | engine_keys), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else f" (known keys: {', '.join(sorted(theirs | engine_keys))})"
            issues.append(ConfigIssue(f"memory.{key}", "unknown key" + hint))
            del options[key]
        config, found = validate_section(backend.Config, options, "memory", self.settings)
        self.memory_config = config if not issues else None
        return locate(issues, self.settings.lines) + found

    def _register_commands(self) -> None:
        def register_for(plugin: str) -> Callable[..., None]:
            def register(name: str, handler: Callable[..., Any], help: str, usage: str = "",
                         admin: bool = False) -> None:
                owner = self.commands.get(name)
                if owner is not None:  # the plugin keeps its other commands
                    self._fail(self.infos[plugin], "chatforge_register_commands",
                               f"command /{name} is already registered by plugin {owner.plugin!r}")
                    return
                self.commands.add(Command(name=name, handler=handler, help=help.strip(), plugin=plugin, usage=usage,
                                          admin=admin))
                self.infos[plugin].commands.append(name)
            return register

        # In load order, so built-in commands keep their names whatever a later plugin registers.
        kwargs = {"register": PerPlugin(register_for)}
        for impl in reversed(self.implementations("chatforge_register_commands")):
            self._invoke(impl, "chatforge_register_commands", kwargs)

    # ------------------------------------------------------------ calling

    def implementations(self, hook_name: str) -> list[pluggy.HookImpl]:
        """The hook's implementations in pluggy's call order (tryfirst first, then newest first)."""
        caller = getattr(self.pm.hook, hook_name)
        return [impl for impl in reversed(caller.get_hookimpls()) if not (impl.hookwrapper or impl.wrapper)]

    def call(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every plugin's implementation; returns (plugin, result) for each that did not fail."""
        results = []
        for impl in self.implementations(hook_name):
            ok, result = self._invoke(impl, hook_name, kwargs)
            if ok and result is not None:
                results.append((impl.plugin_name, result))
        return results

    def call_one(self, plugin: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook (None when it has none or it failed)."""
        for impl in self.implementations(hook_name):
            if impl.plugin_name == plugin:
                return self._invoke(impl, hook_name, kwargs)[1]
        return None

    def _arguments(self, impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> list[Any]:
        """The positional arguments pluggy would pass: only those the implementation names."""
        args = []
        for arg in impl.argnames:
            value = kwargs.get(arg, PerPlugin(self.configs.get) if arg == "config" else None)
            args.append(value.value_for(impl.plugin_name) if isinstance(value, PerPlugin) else value)
        return args

    # Message-time hooks run off the event loop with a time limit, so a plugin that
    # blocks or hangs costs one worker thread, never the whole bot.

    async def run_plugin_code(self, plugin: str, where: str, function: Callable[..., Any], args: list[Any],
                              timeout: float) -> tuple[bool, Any]:
        """Call a plugin's function in a worker thread; (False, None) if it raised or timed out."""
        try:
            return True, await asyncio.wait_for(asyncio.to_thread(call_contained, function, *args), timeout)
        except (SkillError, PluginError):
            raise
        except PluginExited as exc:
            self.report(plugin, where, exc.exit)
        except asyncio.TimeoutError:
            self.report(plugin, where, TimeoutError(f"no answer within {timeout:g} s (limits.hook_timeout)"))
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: see is_plugin_fault
            if not is_plugin_fault(exc):
                raise
            self.report(plugin, where, exc)
        return False, None

    async def aiter_call(self, hook_name: str, kwargs: dict[str, Any], timeout: float) -> AsyncIterator[tuple[str, Any]]:
        """Call implementations one at a time, each in a worker thread within `timeout`; the caller
        may change `kwargs` between them (a pipeline)."""
        for impl in self.implementations(hook_name):
            ok, result = await self.run_plugin_code(impl.plugin_name, hook_name, impl.function,
                                                    self._arguments(impl, kwargs), timeout)
            if ok and result is not None:
                yield impl.plugin_name, result

    async def acall_first(self, hook_name: str, timeout: float, **kwargs: Any) -> tuple[str | None, Any]:
        """Call implementations (as `aiter_call` does) until one returns something other than None.

        One that fails ends the search too, with `FAILED` as its result: the
        message was perhaps meant for it, so it is not passed on to the next.
        """
        for impl in self.implementations(hook_name):
            ok, result = await self.run_plugin_code(impl.plugin_name, hook_name, impl.function,
                                                    self._arguments(impl, kwargs), timeout)
            if not ok:
                return impl.plugin_name, FAILED
            if result is not None:
                return impl.plugin_name, result
        return None, None

    def _invoke(self, impl: pluggy.HookImpl, hook_name: str, kwargs: dict[str, Any]) -> tuple[bool, Any]:
        args = self._arguments(impl, kwargs)
        try:
            return True, impl.function(*args)
        except (SkillError, PluginError):
            raise  # a message for the user (handled by the engine), or strict mode's stop
        except BaseException as exc:  # noqa: BLE001 - isolating plugin faults is the point
            if not is_plugin_fault(exc):
                raise
            self.report(impl.plugin_name, hook_name, exc)
            return False, None

    def report(self, plugin: str, where: str, exc: BaseException) -> None:
        """Record and log a plugin's failure (or raise it in strict mode)."""
        info = self.infos.get(plugin) or PluginInfo(plugin, "unknown", "?")
        self._fail(info, where, _describe(exc), exc)

    def _fail(self, info: PluginInfo, where: str, message: str, exc: BaseException | None = None) -> None:
        info.errors.append(f"{where}: {message}")
        log.error("plugin %r failed in %s: %s", info.name, where, message)
        if exc is not None:
            log.debug("traceback of plugin %r:\n%s", info.name, "".join(traceback.format_exception(exc)))
        if self.strict:
            raise PluginError(f"plugin {info.name!r} failed in {where}: {message}") from exc

    @property
    def failures(self) -> list[PluginInfo]:
        return [info for info in self.infos.values() if info.errors]


def _unknown_hooks(plugin: Any) -> str:
    """'unknown hook chatforge_x (did you mean chatforge_y?)' for misspelt hook names, or ''."""
    known = [name for name in dir(hookspecs) if name.startswith("chatforge_")]
    problems = []
    for name in dir(plugin):
        if name.startswith("chatforge_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(f"unknown hook {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(problems)


def _missing_requirements(distribution: str | None) -> list[str]:
    """The requirements an installed plugin declares that are absent or at a wrong version."""
    if not distribution:
        return []
    from packaging.requirements import InvalidRequirement, Requirement

    missing = []
    for line in importlib.metadata.requires(distribution) or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # optional (an extra) or for another platform
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(str(requirement))
    return missing


def _describe(exc: BaseException) -> str:
    """`ValueError: bad thing (at plugin.py:12)` - short, with the plugin's own frame."""
    location = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        location = f" (at {Path(last.filename).name}:{last.lineno})"
    return f"{type(exc).__name__}: {exc}{location}"
