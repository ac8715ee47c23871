#!/usr/bin/env python3
"""Enqueue one llmq task from Python and wait for its result, with redis-py only.

    python3 examples/python/enqueue.py "prompt text" [--queue default] [--model M]
        [--schema '{"type": "object", ...}'] [--stream] [--deadline 24h] [--timeout-wait 60]

--schema asks for JSON that fits the schema (the result carries it parsed as "json");
--stream has the provider stream the answer, printed to stderr as it is written;
--deadline says the task can wait that long, so it may go through a provider's batch API
at the batch price (then give --timeout-wait enough time).

Reads REDIS_URL (default redis://127.0.0.1:6379). Prints the result record as one JSON
line on stdout. Exit codes: 0 succeeded, 1 failed or dead, 2 bad usage or Redis
unreachable, 3 no final status within --timeout-wait seconds.

The wire format is documented in docs/wire-format.md.
"""

import argparse
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone

import redis

FINAL = {"succeeded", "failed", "dead"}


def main() -> int:
    parser = argparse.ArgumentParser(description="Enqueue one llmq task and wait for its result.")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--queue", default="default", help="queue name (default: default)")
    parser.add_argument("--model", default=None, help="model hint, e.g. mock-fast")
    parser.add_argument("--schema", default=None, help="a JSON Schema the answer must fit")
    parser.add_argument(
        "--stream", action="store_true", help="print the answer to stderr as it is written"
    )
    parser.add_argument(
        "--deadline", default=None, help="the task can wait this long (at least 24h), e.g. 24h"
    )
    parser.add_argument(
        "--timeout-wait",
        type=float,
        default=60.0,
        help="seconds to wait for a final status (default: 60)",
    )
    args = parser.parse_args()
    if not args.prompt.strip():
        parser.error("the prompt is empty")

    # The worker stores the result under the canonical lower-case, hyphenated form of the id.
    task_id = str(uuid.uuid4())
    envelope = {
        "v": 1,
        "id": task_id,
        "prompt": args.prompt,
        "type": "data_analysis",
        "enqueued_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    if args.model:
        envelope["model"] = args.model
    if args.schema:
        try:
            schema = json.loads(args.schema)
        except json.JSONDecodeError as e:
            parser.error(f"--schema is not JSON: {e}")
        envelope["response_format"] = {"type": "json_schema", "schema": schema}
    if args.stream:
        envelope["stream"] = True
    if args.deadline:
        envelope["deadline"] = args.deadline

    stream = f"llmq:{{{args.queue}}}:stream"
    result_key = f"llmq:{{{args.queue}}}:result:{task_id}"

    client = connect(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    try:
        # The whole enqueue: one XADD with the envelope in the `task` field.
        client.xadd(stream, {"task": json.dumps(envelope, separators=(",", ":"))})

        deadline = time.monotonic() + args.timeout_wait
        if args.stream:
            follow(client, f"llmq:{{{args.queue}}}:out:{task_id}", result_key, deadline)
        while True:
            raw = client.get(result_key)
            if raw is not None:
                record = json.loads(raw)
                # `delayed` means a retry or a rate-limit wait is pending: keep waiting.
                if record.get("status") in FINAL:
                    print(json.dumps(record, separators=(",", ":")), flush=True)
                    return 0 if record["status"] == "succeeded" else 1
            if time.monotonic() >= deadline:
                print(
                    f"enqueue.py: task {task_id} did not reach a final status within "
                    f"{args.timeout_wait:g}s; it is still in queue `{args.queue}`",
                    file=sys.stderr,
                )
                return 3
            time.sleep(0.1)
    except redis.RedisError as e:
        print(f"enqueue.py: Redis error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()


def connect(url: str):
    """One Redis, or a Redis Cluster (REDIS_URL=redis+cluster://host:port,host:port, as llmq
    reads it): every key of a queue shares its hash tag, so each command goes to one node."""
    if url.startswith("redis+cluster://"):
        seeds = url[len("redis+cluster://") :].split("/")[0].split(",")
        nodes = [redis.cluster.ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in seeds]
        return redis.RedisCluster(startup_nodes=nodes)
    return redis.Redis.from_url(url)


def follow(client, out_key: str, result_key: str, deadline: float) -> None:
    """Prints a live answer to stderr as it is written, until it is done, the task has a
    final status (it failed) or the deadline passes."""
    after = "0"
    while time.monotonic() < deadline:
        for _, entries in client.xread({out_key: after}, block=1000) or []:
            for entry_id, fields in entries:
                after = entry_id
                if b"text" in fields:
                    sys.stderr.write(fields[b"text"].decode())
                    sys.stderr.flush()
                elif fields.get(b"event") == b"restart":
                    # The call failed halfway; the retry's whole answer follows.
                    sys.stderr.write("\n[retrying]\n")
                elif fields.get(b"event") == b"done":
                    sys.stderr.write("\n")
                    return
        raw = client.get(result_key)
        if raw is not None and json.loads(raw).get("status") in FINAL:
            return


if __name__ == "__main__":
    sys.exit(main())
