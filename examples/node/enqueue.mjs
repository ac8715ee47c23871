#!/usr/bin/env node
// Enqueue one llmq task from Node.js and wait for its result, with the `redis` package only.
//
//   node examples/node/enqueue.mjs "prompt text" [--queue default] [--model M]
//       [--schema '{"type": "object", ...}'] [--stream] [--deadline 24h] [--timeout-wait 60]
//
// --schema asks for JSON that fits the schema (the result carries it parsed as "json");
// --stream has the provider stream the answer, printed to stderr as it is written;
// --deadline says the task can wait that long, so it may go through a provider's batch API
// at the batch price.
//
// Reads REDIS_URL (default redis://127.0.0.1:6379). Prints the result record as one JSON
// line on stdout. Exit codes: 0 succeeded, 1 failed or dead, 2 bad usage or Redis
// unreachable, 3 no final status within --timeout-wait seconds.
//
// The wire format is documented in docs/wire-format.md.

import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient, createCluster } from 'redis';

const FINAL = new Set(['succeeded', 'failed', 'dead']);
const USAGE =
  'usage: enqueue.mjs "prompt text" [--queue default] [--model M] [--schema JSON] [--stream] [--deadline 24h] [--timeout-wait 60]';

function usage(message) {
  console.error(`enqueue.mjs: ${message}\n${USAGE}`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      queue: { type: 'string', default: 'default' },
      model: { type: 'string' },
      schema: { type: 'string' },
      stream: { type: 'boolean' },
      deadline: { type: 'string' },
      'timeout-wait': { type: 'string', default: '60' },
      help: { type: 'boolean', short: 'h' },
    },
  });
} catch (e) {
  usage(e.message);
}
const { values: opts, positionals } = parsed;
if (opts.help) {
  console.log(USAGE);
  process.exit(0);
}
if (positionals.length !== 1) usage('give exactly one prompt');
const prompt = positionals[0];
if (prompt.trim() === '') usage('the prompt is empty');
const timeoutWait = Number(opts['timeout-wait']);
if (!Number.isFinite(timeoutWait) || timeoutWait < 0) {
  usage(`--timeout-wait must be a number of seconds, not \`${opts['timeout-wait']}\``);
}

// randomUUID gives the canonical lower-case, hyphenated form the worker stores results under.
const taskId = randomUUID();
const envelope = {
  v: 1,
  id: taskId,
  prompt,
  type: 'data_analysis',
  enqueued_at: new Date().toISOString(),
};
if (opts.model) envelope.model = opts.model;
if (opts.schema) {
  let schema;
  try {
    schema = JSON.parse(opts.schema);
  } catch (e) {
    usage(`--schema is not JSON: ${e.message}`);
  }
  envelope.response_format = { type: 'json_schema', schema };
}
if (opts.stream) envelope.stream = true;
if (opts.deadline) envelope.deadline = opts.deadline;

const stream = `llmq:{${opts.queue}}:stream`;
const resultKey = `llmq:{${opts.queue}}:result:${taskId}`;

const url = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
// Give up after a few failed reconnects instead of retrying forever.
const socket = {
  reconnectStrategy: (retries, cause) =>
    retries >= 5 ? (cause ?? new Error('cannot reach Redis')) : Math.min(100 * 2 ** retries, 1000),
};
// A Redis Cluster (REDIS_URL=redis+cluster://host:port,host:port, as llmq reads it): the
// seeds; every key of a queue shares its hash tag, so each command goes to one node.
const client = url.startsWith('redis+cluster://')
  ? createCluster({
      rootNodes: url
        .slice('redis+cluster://'.length)
        .split('/')[0]
        .split(',')
        .map((host) => ({ url: `redis://${host}`, socket })),
    })
  : createClient({ url, socket });
let lastError;
client.on('error', (e) => {
  lastError = e;
});

async function run() {
  await client.connect();
  // The whole enqueue: one XADD with the envelope in the `task` field.
  await client.xAdd(stream, '*', { task: JSON.stringify(envelope) });

  const deadline = Date.now() + timeoutWait * 1000;
  if (opts.stream) await follow(`llmq:{${opts.queue}}:out:${taskId}`, deadline);
  for (;;) {
    const raw = await client.get(resultKey);
    if (raw !== null) {
      const record = JSON.parse(raw);
      // `delayed` means a retry or a rate-limit wait is pending: keep waiting.
      if (FINAL.has(record.status)) {
        process.stdout.write(`${JSON.stringify(record)}\n`);
        return record.status === 'succeeded' ? 0 : 1;
      }
    }
    if (Date.now() >= deadline) {
      console.error(
        `enqueue.mjs: task ${taskId} did not reach a final status within ${timeoutWait}s; ` +
          `it is still in queue \`${opts.queue}\``,
      );
      return 3;
    }
    await sleep(100);
  }
}

// Prints a live answer to stderr as it is written, until it is done, the task has a final
// status (it failed) or the deadline passes. A blocking read takes a connection of its own.
async function follow(outKey, deadline) {
  const reader = client.duplicate();
  await reader.connect();
  try {
    let after = '0';
    while (Date.now() < deadline) {
      const reply = await reader.xRead({ key: outKey, id: after }, { BLOCK: 1000 });
      for (const { messages } of reply ?? []) {
        for (const { id, message } of messages) {
          after = id;
          if (message.text !== undefined) process.stderr.write(message.text);
          // A call that failed halfway: the retry's whole answer follows.
          else if (message.event === 'restart') process.stderr.write('\n[retrying]\n');
          else if (message.event === 'done') {
            process.stderr.write('\n');
            return;
          }
        }
      }
      const raw = await client.get(resultKey);
      if (raw !== null && FINAL.has(JSON.parse(raw).status)) return;
    }
  } finally {
    if (reader.isOpen) await (typeof reader.close === 'function' ? reader.close() : reader.quit());
  }
}

let code;
try {
  code = await run();
} catch (e) {
  console.error(`enqueue.mjs: Redis error: ${e?.message || lastError?.message || e}`);
  code = 2;
}
try {
  // node-redis v5 has close(); v4 has quit().
  if (client.isOpen) await (typeof client.close === 'function' ? client.close() : client.quit());
} catch {
  // Closing a broken connection may fail; nothing to do.
}
process.exitCode = code;
