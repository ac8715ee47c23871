"""Calls `llmq serve` the way a new user would: with OpenAI's and Anthropic's own Python SDKs,
nothing changed but the base URL and the key. Prints one JSON object of what the SDKs saw.

    serve_check.py CASE        (LLMQ_SERVE_URL, LLMQ_SERVE_KEY in the environment)

Cases: openai_chat, openai_stream, openai_tools, anthropic_message, anthropic_stream,
errors, idempotent.
"""

import json
import os
import sys

import anthropic
import openai

URL = os.environ["LLMQ_SERVE_URL"]
KEY = os.environ["LLMQ_SERVE_KEY"]


def oa(key=KEY):
    # No retries of the SDK's own: a retry would hide a status the test must see.
    return openai.OpenAI(base_url=URL + "/v1", api_key=key, max_retries=0, timeout=60)


def an(key=KEY):
    return anthropic.Anthropic(base_url=URL, api_key=key, max_retries=0, timeout=60)


def openai_chat():
    raw = oa().chat.completions.with_raw_response.create(
        model="mock-fast",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "say hello to the queue"}],
        max_completion_tokens=50,
        temperature=0,
    )
    c = raw.parse()
    short = oa().chat.completions.create(
        model="mock-fast", messages=[{"role": "user", "content": "a long answer, cut short"}],
        max_completion_tokens=3)
    return {"text": c.choices[0].message.content, "model": c.model,
            "finish_reason": c.choices[0].finish_reason,
            "short_finish_reason": short.choices[0].finish_reason,
            "total_tokens": c.usage.total_tokens, "task_id": raw.headers.get("llmq-task-id"),
            "cost": raw.headers.get("llmq-cost-usd"), "provider": raw.headers.get("llmq-provider"),
            "models": sorted(m.id for m in oa().models.list())}


def openai_stream():
    stream = oa().chat.completions.create(
        model="mock-fast",
        messages=[{"role": "user", "content": "stream this [[mock:stream-slow]]"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.total_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return {"text": "".join(texts), "pieces": len(texts), "finish_reason": finish,
            "usage": usage, "chunks": chunks}


def openai_tools():
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    first = oa().chat.completions.create(
        model="mock-fast",
        messages=[{"role": "user", "content": "weather in Paris? [[mock:tool-caller]]"}],
        tools=tools,
    )
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    streamed = oa().chat.completions.create(
        model="mock-fast",
        messages=[{"role": "user", "content": "weather in Rome? [[mock:tool-caller]]"}],
        tools=tools,
        stream=True,
    )
    streamed_calls, streamed_finish = [], None
    for chunk in streamed:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                streamed_calls.append(tc.function.name)
            if choice.finish_reason:
                streamed_finish = choice.finish_reason
    return {"name": call.function.name, "args": args,
            "finish_reason": first.choices[0].finish_reason,
            "streamed_calls": streamed_calls, "streamed_finish": streamed_finish}


def anthropic_message():
    m = an().messages.create(
        model="mock-fast", max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "say hello, Anthropic style"}],
    )
    short = an().messages.create(
        model="mock-fast", max_tokens=3,
        messages=[{"role": "user", "content": "a long answer, cut short"}])
    return {"text": "".join(b.text for b in m.content if b.type == "text"), "model": m.model,
            "stop_reason": m.stop_reason, "output_tokens": m.usage.output_tokens,
            "short_stop_reason": short.stop_reason}


def anthropic_stream():
    kinds = []
    with an().messages.stream(
        model="mock-fast", max_tokens=100,
        messages=[{"role": "user", "content": "stream it [[mock:stream-slow]]"}],
    ) as s:
        for e in s:
            kinds.append(e.type)
        final = s.get_final_message()
    return {"kinds": kinds, "text": "".join(b.text for b in final.content if b.type == "text"),
            "stop_reason": final.stop_reason}


def errors():
    out = {}
    try:
        oa(key="llmq-wrong").chat.completions.create(
            model="mock-fast", messages=[{"role": "user", "content": "hi"}])
    except openai.AuthenticationError as e:
        out["openai_401"] = [e.status_code, e.code]
    try:
        an(key="llmq-wrong").messages.create(
            model="mock-fast", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    except anthropic.AuthenticationError as e:
        out["anthropic_401"] = [e.status_code, e.body["error"]["type"]]
    try:
        oa().chat.completions.create(model="no-such-model",
                                     messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError as e:
        out["openai_404"] = [e.status_code, e.code]
    try:
        oa().chat.completions.create(model="mock-fast",
                                     messages=[{"role": "user", "content": "hi"}], n=2)
    except openai.BadRequestError as e:
        out["openai_n"] = [e.status_code, e.param]
    try:
        an().messages.create(model="mock-fast", messages=[{"role": "user", "content": "hi"}],
                             extra_body={}, max_tokens=None)
    except (anthropic.BadRequestError, TypeError) as e:
        out["anthropic_max_tokens"] = type(e).__name__
    try:
        oa().chat.completions.create(
            model="mock-fast", messages=[{"role": "user", "content": "boom [[mock:fail-400]]"}])
    except openai.BadRequestError as e:
        out["openai_failed_task"] = [e.status_code, e.response.headers.get("x-should-retry")]
    return out


def idempotent():
    answers = []
    for _ in range(2):
        raw = oa().chat.completions.with_raw_response.create(
            model="mock-fast", messages=[{"role": "user", "content": "once only please"}],
            extra_headers={"Idempotency-Key": "serve-check-once", "llmq-priority": "4",
                           "llmq-task-type": "code_review"},
        )
        c = raw.parse()
        answers.append({"text": c.choices[0].message.content,
                        "task_id": raw.headers.get("llmq-task-id"),
                        "cost": raw.headers.get("llmq-cost-usd")})
    return {"answers": answers}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))
