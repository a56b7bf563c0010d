"""`specrun serve`'s HTTP side: OpenAI-compatible routes on Starlette.

`/v1/completions` and `/v1/chat/completions` (streamed as server-sent events, or
whole), `/v1/models`, and `/metrics` (JSON). Every request is checked before it
reaches the scheduler: the API key when one is set, the body's size, its JSON and
fields (errors as OpenAI's JSON error object with a 4xx status), and the number of
requests in flight (429 when full). A client that disconnects cancels its
sequence, which leaves the batch before the next pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from specrun.chat import ChatTemplate, messages_of
from specrun.engines.base import Vocab
from specrun.sampling import SamplingConfig
from specrun.server.scheduler import Event, Request, Scheduler


@dataclass(frozen=True)
class ServeConfig:
    model: str  # the name clients give as "model"
    api_key: str | None = None  # required as "Authorization: Bearer KEY" when set
    max_body: int = 1 << 20  # bytes
    max_tokens: int = 4096  # the most a request may ask for (and the default)
    max_requests: int = 16  # in flight (running or waiting); more are answered 429
    n_ctx: int = 4096  # tokens each request's cache holds: prompt and reply


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class Job:
    """One request's tokens and settings, checked."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: list[str]
    stream: bool
    chat: bool


def build_app(scheduler: Scheduler, vocab: Vocab, template: ChatTemplate | None, config: ServeConfig) -> Starlette:
    in_flight = [0]
    created = int(time.time())

    async def guarded(http: HttpRequest, chat: bool) -> Response:
        try:
            _authorize(http, config)
            body = await _body(http, config)
            job = _job(body, chat, vocab, template, config)
            if in_flight[0] >= config.max_requests:
                raise ApiError(429, f"{config.max_requests} requests are in flight; retry later",
                               "rate_limit_error", "too_many_requests")
        except ApiError as e:
            return e.response()
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        events = _events(scheduler, job)
        if job.stream:  # counted from its first chunk: a body never started never ends either
            return StreamingResponse(_sse(events, job, request_id, config, in_flight), media_type="text/event-stream")
        in_flight[0] += 1
        try:
            return await _whole(events, job, request_id, config)
        finally:
            in_flight[0] -= 1

    async def completions(http: HttpRequest) -> Response:
        return await guarded(http, chat=False)

    async def chat_completions(http: HttpRequest) -> Response:
        return await guarded(http, chat=True)

    async def models(http: HttpRequest) -> Response:
        try:
            _authorize(http, config)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": config.model, "object": "model", "created": created,
                                                         "owned_by": "specrun"}]})

    async def metrics(http: HttpRequest) -> Response:
        c = scheduler.counters
        latency = sorted(c.latency_s)
        return JSONResponse({"requests_done": c.requests, "tokens_generated": c.tokens, "in_flight": in_flight[0],
                             "active": c.active, "waiting": c.waiting, "passes": c.passes,
                             "nodes_per_pass": c.nodes / c.passes if c.passes else 0.0,
                             "latency_s_median": latency[len(latency) // 2] if latency else None})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/metrics", metrics, methods=["GET"])])


def _authorize(http: HttpRequest, config: ServeConfig) -> None:
    if config.api_key is None:
        return
    given = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), config.api_key.encode()):
        raise ApiError(401, "a missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                       "invalid_api_key")


async def _body(http: HttpRequest, config: ServeConfig) -> dict[str, Any]:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > config.max_body:
        raise ApiError(413, f"the body is over {config.max_body} bytes")
    data = b""
    async for chunk in http.stream():
        data += chunk
        if len(data) > config.max_body:
            raise ApiError(413, f"the body is over {config.max_body} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _job(body: dict[str, Any], chat: bool, vocab: Vocab, template: ChatTemplate | None, config: ServeConfig) -> Job:
    model = body.get("model")
    if model is not None and model != config.model:
        raise ApiError(404, f"the model '{model}' does not exist here; this server runs '{config.model}'",
                       code="model_not_found", param="model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (ask again for more samples)", param="n")
    max_tokens = _number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                         int, config.max_tokens, 1, config.max_tokens)
    temperature = _number(body, "temperature", float, 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ApiError(400, "seed must be a non-negative integer", param="seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    prompt = _chat_tokens(body, vocab, template) if chat else _prompt_tokens(body, vocab)
    if len(prompt) >= config.n_ctx:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; a request's context holds {config.n_ctx}",
                       code="context_length_exceeded", param="messages" if chat else "prompt")
    return Job(prompt, max_tokens, SamplingConfig(temperature=temperature, top_p=top_p, seed=seed), stop, stream,
               chat)


def _number(body: dict[str, Any], name: str, kind: type, default: float, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return kind(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}", param=name)
    return kind(value)


def _prompt_tokens(body: dict[str, Any], vocab: Vocab) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return vocab.tokenize(prompt, parse_special=False)


def _chat_tokens(body: dict[str, Any], vocab: Vocab, template: ChatTemplate | None) -> list[int]:
    messages = messages_of(body.get("messages"))
    if messages is None:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects, content a string or "
                       "a list of text parts", param="messages")
    if template is None:
        raise ApiError(400, "this model has no chat template; use /v1/completions")
    return template.tokens(messages, vocab)


async def _events(scheduler: Scheduler, job: Job) -> AsyncIterator[Event]:
    """The scheduler's events for this job, on this event loop; cancels the sequence if the
    consumer stops early (a client that went away)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    request = Request(job.prompt, job.max_tokens, job.sampling, lambda e: loop.call_soon_threadsafe(inbox.put_nowait, e))
    scheduler.submit(request)
    try:
        while True:
            event = await inbox.get()
            yield event
            if event.done or event.error:
                return
    finally:
        request.cancelled.set()


class _Stops:
    """Text with the stop strings cut: what may be sent now, holding back what could be the start
    of a stop string until the next text says whether it is."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self.held += text
        found = [at for at in (self.held.find(s) for s in self.stops) if at >= 0]
        if found:
            out, self.held, self.hit = self.held[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _finish_reason(event: Event, stops: _Stops) -> str:
    return "stop" if stops.hit or event.stop_reason == "eos" else "length"


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _choice(job: Job, text: str, finish: str | None, delta: bool, role: bool = False) -> dict[str, Any]:
    if not job.chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:  # a chat stream's first chunk names the role; later ones carry text
        return {"index": 0, "delta": {"role": "assistant"} if role else {"content": text} if text else {},
                "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


async def _whole(events: AsyncIterator[Event], job: Job, request_id: str, config: ServeConfig) -> Response:
    stops, text = _Stops(job.stop), []
    async for event in events:
        if event.error:
            return ApiError(500, event.error, "server_error").response()
        text.append(stops.feed(event.text))
        if stops.hit:
            break
        if event.done:
            text.append(stops.flush())
            return JSONResponse(_body_of(job, request_id, config, "".join(text), _finish_reason(event, stops),
                                         _usage(event)))
    await events.aclose()  # type: ignore[attr-defined]  # a stop string: the sequence leaves now
    return JSONResponse(_body_of(job, request_id, config, "".join(text), "stop", None))


def _body_of(job: Job, request_id: str, config: ServeConfig, text: str, finish: str,
             usage: dict[str, int] | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": config.model, "choices": [_choice(job, text, finish, delta=False)],
            "usage": usage}


async def _sse(events: AsyncIterator[Event], job: Job, request_id: str, config: ServeConfig,
               in_flight: list[int]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a chunk per piece of text, a last one with the
    finish reason, then [DONE]. Leaving early (a disconnect) cancels the sequence."""
    stops = _Stops(job.stop)
    kind = "chat.completion.chunk" if job.chat else "text_completion"

    def chunk(text: str, finish: str | None, usage: dict[str, int] | None = None, role: bool = False) -> str:
        body = {"id": request_id, "object": kind, "created": int(time.time()), "model": config.model,
                "choices": [_choice(job, text, finish, delta=True, role=role)]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    in_flight[0] += 1
    try:
        if job.chat:
            yield chunk("", None, role=True)
        async for event in events:
            if event.error:
                yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                return
            text = stops.feed(event.text)
            if text:
                yield chunk(text, None)
            if stops.hit or event.done:
                tail = stops.flush()
                if tail:
                    yield chunk(tail, None)
                yield chunk("", _finish_reason(event, stops), _usage(event) if event.done else None)
                yield "data: [DONE]\n\n"
                return
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        in_flight[0] -= 1


def server_for(app: Starlette, graceful_s: float = 30.0) -> uvicorn.Server:
    """A uvicorn server for `app`, run on a socket `bind` made (so a port in use is the caller's
    one-line error, and port 0 tells its number): `run(sockets=[sock])` serves until SIGTERM or
    SIGINT, then lets requests in flight finish (up to `graceful_s`)."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_s, lifespan="off")
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or OSError (in use, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # clients that come before the server starts wait in the backlog
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
