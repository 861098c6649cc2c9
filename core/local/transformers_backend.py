"""The default generator backend: a local causal language model through transformers.

Registered through `chatforge_register_generators` like any third party's
backend. Its keys are `GeneratorConfig`'s (`generator.model`, `quantize`,
`runtime`...); torch and transformers are imported only in `create`, so a bot
on another backend never loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, ConfigIssue, GeneratorConfig, Settings, locate
from ..generation import GeneratorBackend, TextGenerator
from ..hookspecs import hookimpl
from ..memory import trim_step


class TransformersBackend(GeneratorBackend):
    name = "transformers"
    Config = GeneratorConfig

    @classmethod
    def create(cls, config: GeneratorConfig, settings: Settings) -> TextGenerator:
        """Load the model, put it on its device in its precision, and wrap it in a generator.

        The device and the adapter's folder are checked before the model is loaded, so a missing GPU or
        adapter is a config error at once rather than after a long load. The adapter is merged in before the
        model is prepared, so batching, cache reuse, int8 and ONNX Runtime see a plain model.
        """
        from . import numerics  # imports torch: only when a model is wanted
        from .generator import TransformersGenerator
        from .model_loading import load_model

        try:
            numerics.resolve_device(config.device, config.dtype)
        except numerics.DeviceUnavailable as exc:
            issue = ConfigIssue("generator.device", str(exc))
            raise ConfigError(locate([issue], settings.lines), settings.filename) from None
        if config.runtime == "onnxruntime":
            from . import onnx_runtime

            try:
                onnx_runtime.require()
            except onnx_runtime.OnnxUnavailable as exc:
                issue = ConfigIssue("generator.runtime", f"onnxruntime {exc}")
                raise ConfigError(locate([issue], settings.lines), settings.filename) from None
        adapter = None
        if config.adapter is not None:
            from . import lora

            try:
                adapter = lora.read_adapter(settings.resolve_path(config.adapter))  # before the slow load
            except lora.AdapterError as exc:
                raise _adapter_error(exc, settings) from None
        cache_dir = settings.resolve_path(config.cache_dir)
        loaded = load_model(config.model, cache_dir, fallback=config.fallback)
        if adapter is not None:
            try:
                lora.apply(loaded, adapter)  # into the float32 weights, before the device, dtype, int8 or ONNX
            except lora.AdapterError as exc:
                raise _adapter_error(exc, settings) from None
        loaded.model = prepare_model(loaded.model, config, cache_dir)
        return TransformersGenerator(loaded, config, history_tokens=settings.memory.max_tokens,
                                     trim_turns=trim_step(settings.memory.max_turns), adapter=adapter)


def _adapter_error(exc: Exception, settings: Settings) -> ConfigError:
    return ConfigError(locate([ConfigIssue("generator.adapter", str(exc))], settings.lines), settings.filename)


def prepare_model(model: Any, config: GeneratorConfig, cache_dir: Path) -> Any:
    """The model as the generator will run it: on its device and in its precision, or under ONNX Runtime."""
    if config.runtime == "onnxruntime":
        from . import onnx_runtime

        return onnx_runtime.load(model, cache_dir, config.quantize, config.threads)
    from . import numerics

    return numerics.prepare_model(model, config.device, config.dtype, config.quantize)


@hookimpl
def chatforge_register_generators(register) -> None:
    register(TransformersBackend)
