#!/usr/bin/env python3
"""Submit an llmq chain from Python and wait for it, with redis-py only.

    python3 examples/python/chain.py CHAIN.json [--queue default] [--var NAME=VALUE]... [--timeout-wait 60]

Reads REDIS_URL (default redis://127.0.0.1:6379). Prints one JSON line on stdout:
{"chain_id", "state", "steps": {name: {"status", "model", "output"}}}. Exit codes: 0
succeeded, 1 failed or cancelled, 2 bad usage or Redis unreachable, 3 still running after
--timeout-wait seconds.

The wire format is documented in docs/wire-format.md ("Chains").
"""

import argparse
import json
import os
import sys
import time
import uuid

import redis


def main() -> int:
    parser = argparse.ArgumentParser(description="Submit an llmq chain and wait for it.")
    parser.add_argument("file", help="the chain, a JSON file")
    parser.add_argument("--queue", default="default", help="queue name (default: default)")
    parser.add_argument("--var", action="append", default=[], help="NAME=VALUE for {{NAME}}")
    parser.add_argument("--timeout-wait", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args()

    with open(args.file, encoding="utf-8") as f:
        chain = json.load(f)
    for var in args.var:
        name, sep, value = var.partition("=")
        if not sep:
            parser.error(f"--var {var!r} is not NAME=VALUE")
        chain.setdefault("vars", {})[name] = value
    chain.setdefault("chain_id", str(uuid.uuid4()))
    chain_id = chain["chain_id"]

    prefix = f"llmq:{{{args.queue}}}"
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    try:
        # The whole submission: one XADD with the chain in the `chain` field.
        client.xadd(f"{prefix}:stream", {"chain": json.dumps(chain, separators=(",", ":"))})
        deadline = time.monotonic() + args.timeout_wait
        state = None
        while time.monotonic() < deadline:
            raw = client.hget(f"{prefix}:chain:{chain_id}", "state")
            state = raw.decode() if raw else None
            if state not in (None, "running"):
                break
            time.sleep(0.1)
        steps = {}
        for name, raw in client.hgetall(f"{prefix}:chain:{chain_id}:steps").items():
            step = json.loads(raw)
            record = client.get(f"{prefix}:result:{step.get('task_id', '')}")
            output = json.loads(record).get("output") if record else None
            steps[name.decode()] = {
                "status": step["status"],
                "model": step.get("model"),
                "output": output,
            }
    except redis.exceptions.ConnectionError as e:
        print(f"chain.py: cannot reach Redis: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"chain_id": chain_id, "state": state, "steps": steps}))
    if state in (None, "running"):
        return 3
    return 0 if state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
