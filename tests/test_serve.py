"""`linear-moe serve` over real HTTP on CPU: completions and chat completions equal `generate()`, two concurrent
streaming clients decode in one batch and each gets its own greedy text, a client that disconnects mid-stream is
dropped from the batch while the server goes on, bad requests are 400s."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from linear_moe.data import chat_prompt
from linear_moe.generate import GenerationConfig, generate, load_model
from tiny_checkpoint import make_checkpoint

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from linear_moe.serve.app import build_app  # noqa: E402
from linear_moe.serve.engine import BatchEngine  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, engine, loaded model) of a server on a free port, running on its own event loop thread."""
    loaded = load_model(make_checkpoint(tmp_path_factory.mktemp("run"), mixer="gla", layer_pattern="LN"))
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch=8, max_seq_len=512)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(engine, "tiny"))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", engine, loaded
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    engine.close()


def greedy(loaded, ids: list[int], n: int) -> str:
    (gen,), _ = generate(loaded.model, [ids], GenerationConfig(max_new_tokens=n, stop_at_eos=False), loaded.tokenizer)
    return gen.text


async def post(session, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, json=body) as r:
        return r.status, await r.json()


async def stream(session, url: str, body: dict, stop_after: int | None = None) -> tuple[list[dict], bool]:
    """The SSE chunks of a streaming request (stopping after `stop_after` chunks); whether [DONE] came."""
    chunks = []
    async with session.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks, True
            chunks.append(json.loads(line[6:]))
            if stop_after is not None and len(chunks) >= stop_after:
                return chunks, False
    return chunks, False


def test_completion_and_chat_equal_generate(server):
    url, _, loaded = server
    tok = loaded.tokenizer

    async def run():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "The quick", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            status, res = await post(s, f"{url}/v1/completions", body)
            assert status == 200 and res["object"] == "text_completion"
            assert res["choices"][0]["text"] == greedy(loaded, tok.encode("The quick"), 8)
            assert res["choices"][0]["finish_reason"] == "length" and res["usage"]["completion_tokens"] == 8
            messages = [{"role": "user", "content": "What routes tokens?"}]
            chat = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            chunks, done = await stream(s, f"{url}/v1/chat/completions", chat)
            assert done and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text == greedy(loaded, chat_prompt(tok, messages), 6)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            async with s.get(f"{url}/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == "tiny"

    asyncio.run(run())


def test_two_concurrent_streams_share_decode_steps(server):
    url, engine, loaded = server
    tok = loaded.tokenizer
    prompts = ["The quick brown fox", "Experts route"]

    async def run():
        async with aiohttp.ClientSession() as s:
            body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
            long = {**body, "prompt": prompts[0], "max_tokens": 120}  # still running when the second one arrives
            first = asyncio.create_task(stream(s, f"{url}/v1/completions", long))
            while engine.active == 0:  # the second request joins a running batch
                await asyncio.sleep(0.01)
            second = await stream(s, f"{url}/v1/completions", {**body, "prompt": prompts[1]})
            return await first, second

    engine.stats["max_batch"] = 0
    results = asyncio.run(run())
    assert engine.stats["max_batch"] == 2
    for prompt, n, (chunks, done) in zip(prompts, (120, 24), results, strict=True):
        assert done and "".join(c["choices"][0]["text"] for c in chunks) == greedy(loaded, tok.encode(prompt), n)


def test_client_disconnecting_mid_stream_leaves_the_batch(server):
    url, engine, loaded = server
    cancelled = engine.stats["cancelled"]

    async def run():
        async with aiohttp.ClientSession() as s:  # reads two chunks, then closes its connection
            body = {"prompt": "The quick", "max_tokens": 480, "temperature": 0.8, "ignore_eos": True}
            chunks, done = await stream(s, f"{url}/v1/completions", body, stop_after=2)
            assert len(chunks) == 2 and not done
        deadline = time.monotonic() + 60
        while (engine.active or engine.stats["cancelled"] == cancelled) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s:  # the server still answers
            status, res = await post(s, f"{url}/v1/completions", {"prompt": "A", "max_tokens": 3, "temperature": 0})
        while engine.active and time.monotonic() < deadline:  # the engine thread drops the finished row
            await asyncio.sleep(0.05)
        return status, res

    status, res = asyncio.run(run())
    assert engine.stats["cancelled"] == cancelled + 1 and engine.active == 0
    assert status == 200 and res["choices"][0]["finish_reason"] in ("length", "stop")


def test_bad_requests_are_400s(server):
    url, _, _ = server

    async def run():
        async with aiohttp.ClientSession() as s:
            out = []
            for body in (
                {"prompt": "The quick " * 200, "max_tokens": 200},  # longer than the 512-slot KV cache
                {"max_tokens": 5},
                {"prompt": "x", "top_p": 0},
            ):
                out.append(await post(s, f"{url}/v1/completions", body))
            out.append(await post(s, f"{url}/v1/chat/completions", {"messages": "hi"}))
            return out

    results = asyncio.run(run())
    assert [status for status, _ in results] == [400] * 4
    messages = [res["error"]["message"] for _, res in results]
    assert "does not fit" in messages[0] and "prompt" in messages[1] and "top_p" in messages[2]
    assert "messages" in messages[3]
