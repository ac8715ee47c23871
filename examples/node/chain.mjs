#!/usr/bin/env node
// Submit an llmq chain from Node.js and wait for it, with the `redis` package only.
//
//   node examples/node/chain.mjs CHAIN.json [--queue default] [--var NAME=VALUE]... [--timeout-wait 60]
//
// Reads REDIS_URL (default redis://127.0.0.1:6379). Prints one JSON line on stdout:
// {"chain_id", "state", "steps": {name: {"status", "model", "output"}}}. Exit codes: 0
// succeeded, 1 failed or cancelled, 2 bad usage or Redis unreachable, 3 still running after
// --timeout-wait seconds.
//
// The wire format is documented in docs/wire-format.md ("Chains").

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { createClient } from 'redis';

function usage(message) {
  console.error(`chain.mjs: ${message}`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      queue: { type: 'string', default: 'default' },
      var: { type: 'string', multiple: true, default: [] },
      'timeout-wait': { type: 'string', default: '60' },
    },
  });
} catch (e) {
  usage(e.message);
}
const { values: opts, positionals } = parsed;
if (positionals.length !== 1) usage('give exactly one chain file');
const chain = JSON.parse(readFileSync(positionals[0], 'utf8'));
for (const v of opts.var) {
  const at = v.indexOf('=');
  if (at < 0) usage(`--var \`${v}\` is not NAME=VALUE`);
  chain.vars = chain.vars ?? {};
  chain.vars[v.slice(0, at)] = v.slice(at + 1);
}
chain.chain_id = chain.chain_id ?? randomUUID();
const prefix = `llmq:{${opts.queue}}`;
const timeoutWait = Number(opts['timeout-wait']);

const client = createClient({ url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' });
client.on('error', () => {});
try {
  await client.connect();
} catch (e) {
  console.error(`chain.mjs: cannot reach Redis: ${e.message}`);
  process.exit(2);
}
// The whole submission: one XADD with the chain in the `chain` field.
await client.xAdd(`${prefix}:stream`, '*', { chain: JSON.stringify(chain) });
const deadline = Date.now() + timeoutWait * 1000;
let state = null;
while (Date.now() < deadline) {
  state = await client.hGet(`${prefix}:chain:${chain.chain_id}`, 'state');
  if (state && state !== 'running') break;
  await sleep(100);
}
const steps = {};
for (const [name, raw] of Object.entries(await client.hGetAll(`${prefix}:chain:${chain.chain_id}:steps`))) {
  const step = JSON.parse(raw);
  const record = await client.get(`${prefix}:result:${step.task_id ?? ''}`);
  steps[name] = {
    status: step.status,
    model: step.model ?? null,
    output: record ? JSON.parse(record).output ?? null : null,
  };
}
await client.quit();
console.log(JSON.stringify({ chain_id: chain.chain_id, state, steps }));
process.exit(!state || state === 'running' ? 3 : state === 'succeeded' ? 0 : 1);
