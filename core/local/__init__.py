"""The local model: chatforge's own generation stack, the half of the tree that uses torch.

chatforge is two halves. The framework (the rest of `chatforge`: config, engine,
memory, plugins, adapters, the CLI) turns messages into replies through any
`TextGenerator` and never imports torch. This package is the default generator
behind it, a causal language model run in-process through transformers:

    transformers_backend  the `transformers` GeneratorBackend (generator.backend: transformers)
    model_loading         finding and loading the model: hub, cache, embedded GGUF, fallback
    numerics              device, dtype and int8 quantization of the loaded model
    onnx_runtime          the same model exported to and run by ONNX Runtime (generator.runtime)
    prompt                conversation -> token ids (chat template or transcript), history trimming
    kv_cache              per-conversation attention caches kept between turns
    batching              continuous batching of concurrent conversations
    generator             TransformersGenerator, the TextGenerator tying them together

Importing this package, or `transformers_backend`, `model_loading` or `prompt`, is
cheap: torch and transformers load only when the backend builds a generator. The
old paths (`chatforge.generator`, `chatforge.prompt`, ...) still name these modules.
"""
