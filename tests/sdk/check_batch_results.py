"""Checks a results file `llmq batch --wait --output` wrote for a provider's batch file with
that provider's own Python SDK types, and prints what each line says as one JSON object.

    check_batch_results.py openai|anthropic RESULTS.jsonl

OpenAI's SDK has no type for a whole output line: its `response.body` must be a
`ChatCompletion` and its `error` a `BatchError`. Anthropic's line is a
`MessageBatchIndividualResponse`. Exits 1, naming the line, when a type refuses it.
"""

import json
import sys

from anthropic.types.messages import MessageBatchIndividualResponse
from openai.types import BatchError
from openai.types.chat import ChatCompletion


def openai_line(line):
    assert set(line) >= {"id", "custom_id", "response", "error"}, sorted(line)
    if line["response"] is not None:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(line["response"]["body"], strict=True)
        return {"custom_id": line["custom_id"], "ok": True, "model": body.model,
                "text": body.choices[0].message.content}
    error = BatchError.model_validate(line["error"], strict=True)
    return {"custom_id": line["custom_id"], "ok": False, "code": error.code}


def anthropic_line(line):
    r = MessageBatchIndividualResponse.model_validate(line, strict=True)
    out = {"custom_id": r.custom_id, "ok": r.result.type == "succeeded", "type": r.result.type}
    if r.result.type == "succeeded":
        out["model"] = r.result.message.model
        out["text"] = "".join(b.text for b in r.result.message.content if b.type == "text")
    return out


def main():
    check = {"openai": openai_line, "anthropic": anthropic_line}[sys.argv[1]]
    seen = []
    with open(sys.argv[2], encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            try:
                seen.append(check(json.loads(text)))
            except Exception as e:  # noqa: BLE001 - any refusal fails the check, named
                print(f"line {n} is refused: {e}", file=sys.stderr)
                sys.exit(1)
    print(json.dumps(seen))


main()
