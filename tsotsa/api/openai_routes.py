"""`/v1/models`, `/v1/completions`, `/v1/chat/completions` with OpenAI's request and response shapes.

Every choice of a request (n × prompts) is one engine job, run concurrently; a streaming response sends
server-sent events (`data: {...}` chunks, then `data: [DONE]`), the usage chunk last when
`stream_options.include_usage` asks for it. An error after the stream started arrives as one `data:
{"error": ...}` event before `[DONE]` (the status line is already sent), as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from tsotsa.api.engine import Choice, Engine, Job, Sampling
from tsotsa.api.errors import ApiError, error_body
from tsotsa.api.schema import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, SamplingRequest
from tsotsa.client.logprobs import Logprobs, TokenLogprobs

logger = logging.getLogger(__name__)

# For checkpoints without a chat template (documented in docs/api.md): "Role: content" lines after BOS.
DEFAULT_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: "
                         "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def openai_router(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict:
        adapters = await run_in_threadpool(engine.adapters)
        entries = [_model_entry(engine.base_name, None)]
        entries += [_model_entry(f"{engine.base_name}:{run}", engine.base_name) for run in adapters]
        return {"object": "list", "data": entries}

    @router.post("/completions")
    async def completions(request: CompletionRequest):
        adapter = await run_in_threadpool(engine.adapter_of, request.model)
        prompts = _prompt_ids(engine, request.prompt)
        limits = [engine.check_ids(ids, request.max_tokens, "prompt") for ids in prompts]
        await run_in_threadpool(engine.check_route, adapter)
        stops = tuple(request.stop_sequences())
        jobs = [Job(ids, _sampling(request, limit, stops, index), adapter, _logprobs(request.logprobs, request.echo))
                for ids, limit in zip(prompts, limits) for index in range(request.n)]
        echo_texts = [_echo_text(engine, request.prompt, i // request.n) if request.echo else "" for i in
                      range(len(jobs))]
        reply = _Reply("cmpl", "text_completion", request.model)
        if request.stream:
            def piece(index: int, text: str, choice: Choice | None, logprobs: dict | None) -> dict:
                return {"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": choice.finish_reason if choice else None}

            first = {index: echo_texts[index] for index in range(len(jobs)) if echo_texts[index]}
            return reply.stream(engine, jobs, piece, request.include_usage, first=first,
                                token_logprobs=request.logprobs is not None)
        choices = await reply.run(engine, jobs)
        body = [{"index": index, "text": echo_texts[index] + choice.text, "finish_reason": choice.finish_reason,
                 "logprobs": _completion_logprobs(engine, choice, request.echo, len(echo_texts[index]))
                 if choice.logprobs is not None else None}
                for index, choice in enumerate(choices)]
        return reply.body(body, choices, prompts)

    @router.post("/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        adapter = await run_in_threadpool(engine.adapter_of, request.model)
        ids = _chat_ids(engine, request)
        limit = engine.check_ids(ids, request.token_limit, "messages")
        await run_in_threadpool(engine.check_route, adapter)
        stops = tuple(request.stop_sequences())
        top = request.top_logprobs or 0
        jobs = [Job(ids, _sampling(request, limit, stops, index), adapter,
                    Logprobs(top=top) if request.logprobs else None) for index in range(request.n)]
        reply = _Reply("chatcmpl", "chat.completion", request.model)
        if request.stream:
            def piece(index: int, text: str, choice: Choice | None, logprobs: list | None) -> dict:
                return {"index": index, "delta": {"content": text} if text else {},
                        "logprobs": {"content": logprobs} if logprobs is not None else None,
                        "finish_reason": choice.finish_reason if choice else None}

            first = {index: None for index in range(len(jobs))}  # the role chunk
            return reply.stream(engine, jobs, piece, request.include_usage, first=first, chat=True,
                                token_logprobs=request.logprobs)
        choices = await reply.run(engine, jobs)
        body = [{"index": index, "message": {"role": "assistant", "content": choice.text},
                 "logprobs": {"content": _chat_logprobs(engine, choice.token_ids, choice.logprobs.tokens)}
                 if choice.logprobs is not None else None,
                 "finish_reason": choice.finish_reason}
                for index, choice in enumerate(choices)]
        return reply.body(body, choices, [ids])

    return router


class _Reply:
    """One response's id, timestamps and shapes; runs its jobs."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.id, self.kind, self.model, self.created = f"{prefix}-{uuid.uuid4().hex}", kind, model, int(time.time())

    def envelope(self, choices: list, kind: str | None = None) -> dict:
        return {"id": self.id, "object": kind or self.kind, "created": self.created, "model": self.model,
                "choices": choices}

    def body(self, choices: list[dict], done: list[Choice], prompts: list[list[int]]) -> dict:
        return {**self.envelope(choices), "usage": _usage(done, prompts)}

    async def run(self, engine: Engine, jobs: list[Job]) -> list[Choice]:
        futures = [asyncio.wrap_future(engine.submit(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for job in jobs:
                job.cancelled.set()
            raise

    def stream(self, engine: Engine, jobs: list[Job], piece: Callable, include_usage: bool, *, first: dict,
               token_logprobs: bool, chat: bool = False) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        for index, job in enumerate(jobs):
            def on_piece(text: str, count: int, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, ("piece", index, text, count))
            job.on_piece = on_piece

        async def events() -> AsyncIterator[str]:
            sent = [0] * len(jobs)  # tokens whose logprobs went out, per choice
            futures = [asyncio.wrap_future(engine.submit(job)) for job in jobs]
            for index, future in enumerate(futures):
                future.add_done_callback(lambda f, i=index: queue.put_nowait(("done", i, f, 0)))
            try:
                for index, text in first.items():
                    if chat:
                        yield _sse(self.envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}], chunk_kind))
                    else:
                        yield _sse(self.envelope([piece(index, text, None, None)], chunk_kind))
                remaining, done = len(jobs), [None] * len(jobs)
                while remaining:
                    kind, index, value, count = await queue.get()
                    if kind == "piece":
                        logprobs = None
                        if token_logprobs:
                            logprobs = _piece_logprobs(engine, jobs[index], sent[index], count, chat)
                            sent[index] = count
                        if value or logprobs:
                            yield _sse(self.envelope([piece(index, value, None, logprobs)], chunk_kind))
                        continue
                    remaining -= 1
                    error = value.exception()
                    if error is not None:
                        raise error
                    done[index] = value.result()
                    yield _sse(self.envelope([piece(index, "", done[index], None)], chunk_kind))
                if include_usage:
                    yield _sse({**self.envelope([], chunk_kind), "usage": _usage(done, [j.prompt_ids for j in jobs])})
            except ApiError as error:
                yield _sse(error_body(error.status, error.message, error.param, error.code))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # after the status line went out: tell the client in the stream
                logger.exception("a streamed request failed")
                yield _sse(error_body(500, f"internal error: {type(error).__name__}"))
            finally:
                for job in jobs:  # a client gone mid-stream: generation ends at the next token
                    job.cancelled.set()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _model_entry(name: str, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tsotsa", "root": parent or name,
            "parent": parent}


def _sampling(request: SamplingRequest, max_tokens: int, stops: tuple[str, ...], index: int) -> Sampling:
    """Choice `index` of a seeded request samples with seed + index, so n choices differ yet repeat."""
    seed = None if request.seed is None else request.seed + index
    return Sampling(max_tokens, request.temperature, request.top_p, seed, stops, request.ignore_eos)


def _logprobs(top: int | None, echo: bool) -> Logprobs | None:
    return None if top is None else Logprobs(top=top, prompt=echo)


def _prompt_ids(engine: Engine, prompt) -> list[list[int]]:
    """A string, strings, token ids or lists of them (OpenAI's four prompt forms) → token id lists."""
    if isinstance(prompt, str):
        return [engine.encode(prompt)]
    if not prompt:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [engine.encode(text) for text in prompt]
    return [list(ids) for ids in prompt]


def _echo_text(engine: Engine, prompt, index: int) -> str:
    if isinstance(prompt, str):
        return prompt
    item = prompt if isinstance(prompt[0], int) else prompt[index]
    return item if isinstance(item, str) else engine.tokenizer.decode(item)


def _chat_ids(engine: Engine, request: ChatCompletionRequest) -> list[int]:
    """The tokenizer's chat template (Llama-2-chat's for a chat checkpoint) with the generation prompt, else
    DEFAULT_CHAT_TEMPLATE; a template that refuses the conversation (roles out of order) → 400."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]
    tokenizer = engine.tokenizer
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as error:
        raise ApiError(400, f"messages: the model's chat template refuses them: {error}", param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(ids) for ids in prompts)
    completion = sum(choice.generated for choice in choices if choice is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token])


def _top_dict(engine: Engine, position: TokenLogprobs, token: int) -> dict[str, float]:
    """The legacy `top_logprobs` entry: the best tokens and the chosen one (as vLLM includes it)."""
    top = {_token_text(engine, int(i)): float(v) for v, i in zip(position.top_values[0], position.top_ids[0])}
    top.setdefault(_token_text(engine, token), float(position.chosen[0]))
    return top


def _completion_logprobs(engine: Engine, choice: Choice, echo: bool, text_start: int,
                         begin: int = 0, end: int | None = None) -> dict:
    """OpenAI's legacy logprobs object for the generated tokens [begin, end) (and, with echo, the prompt's)."""
    tokens, values, tops = [], [], []
    if echo and begin == 0:
        ids = choice.prompt_ids
        tokens.append(_token_text(engine, ids[0]))
        values.append(None)
        tops.append(None)
        for token, position in zip(ids[1:], choice.logprobs.prompt_positions):
            tokens.append(_token_text(engine, token))
            values.append(float(position.chosen[0]))
            tops.append(_top_dict(engine, position, token))
    generated = choice.token_ids[begin:end]
    for token, position in zip(generated, choice.logprobs.tokens[begin:end]):
        tokens.append(_token_text(engine, token))
        values.append(float(position.chosen[0]))
        tops.append(_top_dict(engine, position, token))
    offsets, at = [], 0 if echo else text_start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(engine: Engine, token_ids: list[int], positions: list[TokenLogprobs]) -> list[dict]:
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for token, position in zip(token_ids, positions):
        top = [entry(_token_text(engine, int(i)), float(v)) for v, i in zip(position.top_values[0], position.top_ids[0])]
        content.append({**entry(_token_text(engine, token), float(position.chosen[0])), "top_logprobs": top})
    return content


def _piece_logprobs(engine: Engine, job: Job, begin: int, end: int, chat: bool):
    """The logprobs of the tokens [begin, end) of a streamed choice (recorded before the piece was sent)."""
    positions = job.logprobs.tokens[:end]
    ids = [int(position.token[0]) for position in positions]
    if chat:
        return _chat_logprobs(engine, ids[begin:], positions[begin:])
    partial = Choice(job.prompt_ids, ids, "", "", job.logprobs, 0)
    return _completion_logprobs(engine, partial, False, 0, begin, end)
