"""OpenAI-compatible HTTP endpoints on aiohttp: `/v1/completions`, `/v1/chat/completions` (both with `stream`
as server-sent events), `/v1/models`, `/health`.

Request fields: `prompt` (completions) or `messages` (chat; rendered with the chat template of `linear-moe
finetune`), `max_tokens` (16), `temperature` (1.0), `top_p` (1.0), `stop` (a string or a list), `stream`; the
extensions `top_k`, `repetition_penalty` and `ignore_eos` (as vLLM names them). A client that disconnects
mid-stream is dropped from the batch at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from ..generate.sampling import SamplingParams
from .engine import BatchEngine, Request, asyncio_emitter, next_id

ENGINE = web.AppKey("engine", BatchEngine)
MODEL_NAME = web.AppKey("model_name", str)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class BadRequest(ValueError):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def build_request(body: dict[str, Any], prompt_ids: list[int], emit) -> Request:
    """A `Request` from the fields of an OpenAI request body (BadRequest for a bad field)."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        sampling = SamplingParams(
            temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
            top_k=int(body.get("top_k") or 0),
            top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
            repetition_penalty=float(body.get("repetition_penalty") or 1.0),
        )
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    return Request(prompt_ids, sampling, max_tokens, emit, stop, stop_at_eos=not body.get("ignore_eos", False))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _prompt_ids(engine: BatchEngine, body: dict[str, Any], chat: bool) -> list[int]:
    tok = engine.tokenizer
    if chat:
        from ..data import chat_prompt

        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise BadRequest("messages must be a list of {role, content} objects")
        return chat_prompt(tok, [{"role": m.get("role", "user"), "content": str(m["content"])} for m in messages])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (one prompt per request)")
    return tok.encode(prompt) or [tok.eos_id]


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await _body(request)
        ids = _prompt_ids(engine, body, chat)
        events: asyncio.Queue = asyncio.Queue()
        req = build_request(body, ids, asyncio_emitter(asyncio.get_running_loop(), events))
        engine.submit(req)
    except ValueError as e:
        return _error(400, str(e))
    kind = "chat.completion" if chat else "text_completion"
    meta = {
        "id": next_id("chatcmpl" if chat else "cmpl"),
        "created": int(time.time()),
        "model": request.app[MODEL_NAME],
    }
    if body.get("stream"):
        return await _stream(request, req, events, meta, kind, chat)
    text, reason = [], None
    while reason is None:
        what, value = await events.get()
        if what == "error":
            return _error(500, str(value))
        if what == "text":
            text.append(value)
        else:
            reason = FINISH[value]
    content = "".join(text)
    choice = {"index": 0, "finish_reason": reason}
    choice |= {"message": {"role": "assistant", "content": content}} if chat else {"text": content, "logprobs": None}
    usage = {"prompt_tokens": len(ids), "completion_tokens": req.new_tokens, "total_tokens": len(ids) + req.new_tokens}
    return web.json_response({**meta, "object": kind, "choices": [choice], "usage": usage})


async def _stream(request, req: Request, events: asyncio.Queue, meta, kind: str, chat: bool) -> web.StreamResponse:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason, then `[DONE]`."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    obj = f"{kind}.chunk" if chat else kind

    def chunk(text: str | None, reason: str | None = None, role: bool = False) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n".encode()

    try:
        if chat:
            await resp.write(chunk(None, role=True))
        while True:
            what, value = await events.get()
            if what == "text":
                await resp.write(chunk(value))
            elif what == "done":
                await resp.write(chunk(None, FINISH[value]))
                break
            else:
                await resp.write(f"data: {json.dumps({'error': {'message': str(value)}})}\n\n".encode())
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the client went away: its row leaves the batch at the next step
        req.cancel()
    except asyncio.CancelledError:
        req.cancel()
        raise
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def models(request: web.Request) -> web.Response:
    name = request.app[MODEL_NAME]
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "linear-moe"}]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"status": "ok", "active": engine.active, **engine.stats})


def build_app(engine: BatchEngine, model_name: str) -> web.Application:
    app = web.Application()
    app[ENGINE], app[MODEL_NAME] = engine, model_name
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app
