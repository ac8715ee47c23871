"""Calls `llmq serve` the way a new user would: with OpenAI's and Anthropic's own Python SDKs,
nothing changed but the base URL and the key. Prints one JSON object of what the SDKs saw.

    serve_check.py CASE        (LLMQ_SERVE_URL, LLMQ_SERVE_KEY in the environment)

Cases: openai_chat, openai_stream, openai_tools, anthropic_message, anthropic_stream,
errors, idempotent, openai_batch, openai_batch_bad, anthropic_batch,
openai_batch_start N (creates a batch of N lines and prints its id), openai_batch_wait ID.
"""

import io
import json
import os
import sys
import time

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


def batch_lines(n, prefix="line"):
    # As OpenAI's Batch guide writes them.
    return "".join(json.dumps({
        "custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "mock-fast", "max_tokens": 50, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"{prefix} {i}: hello world"}]},
    }) + "\n" for i in range(n))


def upload(text):
    return oa().files.create(file=("batchinput.jsonl", io.BytesIO(text.encode())),
                             purpose="batch")


def wait_batch(batch_id, within=90):
    client = oa()
    deadline = time.time() + within
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        if time.time() > deadline:
            raise SystemExit(f"batch {batch_id} still {b.status} after {within} s")
        time.sleep(0.2)


def openai_batch():
    client = oa()
    f = upload(batch_lines(3))
    got = client.files.retrieve(f.id)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "nightly"})
    created = b.status
    b = wait_batch(b.id)
    out = client.files.content(b.output_file_id).text
    results = [json.loads(line) for line in out.splitlines()]
    listed = [x.id for x in client.batches.list(limit=10)]
    files = [x.id for x in client.files.list()]
    deleted = client.files.delete(f.id).deleted
    try:
        client.files.retrieve(f.id)
        gone = False
    except openai.NotFoundError:
        gone = True
    return {"file": f.id, "bytes": got.bytes, "purpose": got.purpose, "created": created,
            "status": b.status, "counts": b.request_counts.model_dump(),
            "metadata": b.metadata, "error_file": b.error_file_id, "listed": b.id in listed,
            "file_listed": f.id in files, "deleted": deleted, "gone": gone,
            "results": [{"custom_id": r["custom_id"], "status": r["response"]["status_code"],
                         "text": r["response"]["body"]["choices"][0]["message"]["content"],
                         "model": r["response"]["body"]["model"]} for r in results]}


def openai_batch_bad():
    client = oa()
    bad = batch_lines(2) + json.dumps({"custom_id": "odd", "method": "POST",
                                       "url": "/v1/embeddings", "body": {}}) + "\n"
    b = client.batches.create(input_file_id=upload(bad).id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = wait_batch(b.id)
    errors = [e.model_dump() for e in b.errors.data] if b.errors else []
    try:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
        missing = None
    except openai.BadRequestError as e:
        missing = e.body
    try:
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
        purpose = None
    except openai.BadRequestError as e:
        purpose = e.body
    return {"status": b.status, "errors": errors, "output_file": b.output_file_id,
            "missing": missing, "purpose": purpose}


def openai_batch_start(n):
    f = upload(batch_lines(int(n), "kill"))
    b = oa().batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                            completion_window="24h")
    # The batch has not ended: its input file cannot go from under it.
    try:
        oa().files.delete(f.id)
        refused = None
    except openai.APIStatusError as e:
        refused = {"status": e.status_code, "message": str(e)}
    return {"id": b.id, "delete_refused": refused}


def openai_batch_wait(batch_id):
    b = wait_batch(batch_id)
    out = oa().files.content(b.output_file_id).text if b.output_file_id else ""
    return {"status": b.status, "counts": b.request_counts.model_dump(),
            "custom_ids": [json.loads(line)["custom_id"] for line in out.splitlines()]}


def anthropic_batch():
    client = an()
    b = client.messages.batches.create(requests=[
        {"custom_id": f"first-{i}", "params": {
            "model": "mock-fast", "max_tokens": 64,
            "messages": [{"role": "user", "content": f"anthropic batch {i}"}]}}
        for i in range(2)])
    created = b.processing_status
    deadline = time.time() + 90
    while b.processing_status != "ended":
        if time.time() > deadline:
            raise SystemExit(f"message batch {b.id} still {b.processing_status}")
        time.sleep(0.2)
        b = client.messages.batches.retrieve(b.id)
    results = [{"custom_id": r.custom_id, "type": r.result.type,
                "text": r.result.message.content[0].text if r.result.type == "succeeded" else None}
               for r in client.messages.batches.results(b.id)]
    listed = [x.id for x in client.messages.batches.list(limit=10)]
    try:
        client.messages.batches.create(requests=[{"custom_id": "x", "params": {
            "model": "mock-fast", "messages": [{"role": "user", "content": "no max_tokens"}]}}])
        bad = None
    except anthropic.BadRequestError as e:
        bad = e.body
    return {"id": b.id, "created": created, "status": b.processing_status,
            "counts": b.request_counts.model_dump(), "results": results,
            "listed": b.id in listed, "bad": bad}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]](*sys.argv[2:])))
