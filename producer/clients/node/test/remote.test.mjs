// The client on a Redis Cluster or behind Redis Sentinel (LLMQ_TEST_URL, a redis+cluster:// or
// redis+sentinel:// URL), against a real worker on the same (started by
// tests/tests/e2e/client_node.rs) serving LLMQ_TEST_QUEUE.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import { connect } from '../dist/index.js';
import { eventually, need } from './env.mjs';

const url = need('LLMQ_TEST_URL');
const queueName = need('LLMQ_TEST_QUEUE');
const answer = (prompt) => `mock answer from mock-fast: ${prompt}`;

let q;
before(async () => {
  q = await connect({ url, queue: queueName });
});
after(async () => {
  await q.close();
});

test('a task, a batch and a live answer go through', async () => {
  const id = await q.enqueue({ prompt: 'Hello over there', model: 'mock-fast', priority: 1, tenant: 'acme' });
  assert.equal((await q.waitForResult(id, { timeoutMs: 30_000 })).output, answer('Hello over there'));

  const ids = await q.enqueueMany(['one', 'two', 'three'].map((prompt) => ({ prompt, model: 'mock-fast' })));
  assert.deepEqual(
    (await q.waitForResults(ids, { timeoutMs: 30_000 })).map((r) => r.output),
    ['one', 'two', 'three'].map(answer),
  );

  const streamed = await q.enqueue({ prompt: 'Stream it', model: 'mock-fast', stream: true });
  let text = '';
  for await (const e of q.followAnswer(streamed, { timeoutMs: 30_000 })) text = e.type === 'restart' ? '' : text + e.text;
  assert.equal(text, answer('Stream it'));
});

test('a chain is followed to its end', async () => {
  const chainId = await q.submitChain({
    defaults: { model: 'mock-fast' },
    steps: [
      { name: 'a', prompt: 'First' },
      { name: 'b', after: ['a'], prompt: 'Then {{a.output}}' },
    ],
  });
  let end;
  for await (const e of q.followChain(chainId, { timeoutMs: 60_000 })) if (e.type === 'end') end = e;
  assert.equal(end?.state, 'succeeded');
  assert.deepEqual(Object.keys(end.steps).sort(), ['a', 'b']);
});

test('a dead letter is listed and replayed with llmq\'s script', async () => {
  const id = await q.enqueue({ prompt: 'Refuse me', model: 'fail-400' });
  assert.equal((await q.waitForResult(id, { timeoutMs: 30_000 })).status, 'dead');
  // One MGET and one ZADD on this topology; a fresh id names no task, so nothing is cancelled.
  const fresh = randomUUID();
  assert.deepEqual(await q.cancel({ taskIds: [id, fresh] }), { [`task:${id}`]: 'dead', [`task:${fresh}`]: 'cancelled' });
  const dead = (await q.deadLetters()).find((d) => d.taskId === id);
  assert.equal(dead.class, 'fatal');
  assert.deepEqual(await q.replay(dead.id), { status: 'enqueued', taskId: id });
  const again = await eventually('the second dead letter', async () =>
    (await q.deadLetters()).find((d) => d.taskId === id && d.id !== dead.id),
  );
  assert.equal(JSON.parse(again.task).replays, 1);
});
