// The client against llmq's own Rust code: test/vectors.json holds awkward inputs (UUID
// spellings, durations, times, dead letters, chains); the driver, tests/tests/e2e/client_node.rs,
// runs each through the Rust functions a worker and `llmq` use and hands their answers over in
// LLMQ_TEST_ORACLE. The client must give the same answer to every one.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { buildChain, LlmqError, replayedTask } from '../dist/index.js';
import { canonicalUuid } from '../dist/uuid.js';
import { formatChrono, humantime, parseChrono } from '../dist/wire.js';
import { need } from './env.mjs';

const oracle = JSON.parse(readFileSync(need('LLMQ_TEST_ORACLE'), 'utf8'));
const vectors = JSON.parse(readFileSync(new URL('vectors.json', import.meta.url), 'utf8'));

test('the driver ran every vector through Rust', () => {
  for (const kind of ['uuids', 'durations', 'times', 'letters', 'chains']) {
    assert.equal(oracle[kind].length, vectors[kind].length, kind);
  }
});

test('UUID spellings: accepted and refused as Uuid::parse_str does', () => {
  oracle.uuids.forEach(([text, rust]) => assert.equal(canonicalUuid(text), rust, JSON.stringify(text)));
});

test('durations: read, or refused in its words, as humantime::parse_duration does', () => {
  oracle.durations.forEach(([text, rust]) => {
    const mine = humantime(text);
    const said = typeof mine === 'string' ? { error: mine } : { secs: mine.secs.toString(), nanos: Number(mine.nanos) };
    assert.deepEqual(said, rust, JSON.stringify(text));
  });
});

test("times: read (and written back) as chrono's DateTime<Utc> reads and writes them", () => {
  oracle.times.forEach(([text, rust]) => {
    const t = parseChrono(text);
    assert.equal(t === null ? null : formatChrono(t), rust, JSON.stringify(text));
  });
});

test("dead letters: replayed byte for byte as llmq's replayed_task writes them", () => {
  oracle.letters.forEach(([task, taskId, provider, rust]) => {
    assert.equal(replayedTask(task, taskId, provider ?? undefined), rust, task.slice(0, 300));
  });
});

test('chains: refused, in the same words, where Chain::parse refuses them', () => {
  oracle.chains.forEach(([spec, rust]) => {
    let mine;
    try {
      buildChain(JSON.parse(spec), vectors.chain_max_bytes);
      mine = { ok: true };
    } catch (e) {
      assert.ok(e instanceof LlmqError, String(e));
      mine = { error: e.message };
    }
    assert.deepEqual(mine, 'error' in rust ? { error: `The chain is invalid: ${rust.error}.` } : { ok: true }, spec.slice(0, 300));
  });
});
