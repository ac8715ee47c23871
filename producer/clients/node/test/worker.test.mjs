// The client against a real llmq worker (started by tests/tests/e2e/client_node.rs) serving
// LLMQ_TEST_QUEUE with the mock provider; LLMQ_TEST_IDLE_QUEUE has no worker, so what the
// client writes there stays to be looked at.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { connect, deriveId, LlmqError, replayedTask } from '../dist/index.js';
import { eventually, need, raw } from './env.mjs';

const url = need('REDIS_URL');
const queueName = need('LLMQ_TEST_QUEUE');
const idleName = need('LLMQ_TEST_IDLE_QUEUE');
const preparedDeadId = need('LLMQ_TEST_DEAD_ID');
const answer = (prompt) => `mock answer from mock-fast: ${prompt}`;

let q;
let idle;
let redis;
before(async () => {
  q = await connect({ url, queue: queueName });
  idle = q.queue(idleName);
  redis = await raw(url);
});
after(async () => {
  await q.close();
  await redis.close();
});

test('a task is enqueued and its result waited for', async () => {
  const id = await q.enqueue({ prompt: 'Say hello', model: 'mock-fast', metadata: { from: 'node' } });
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'succeeded', JSON.stringify(r));
  assert.equal(r.task_id, id);
  assert.equal(r.queue, queueName);
  assert.equal(r.output, answer('Say hello'));
  assert.ok(r.cost_usd > 0);
});

test('a task the provider refuses ends dead, and its dead letter is listed', async () => {
  const id = await q.enqueue({ prompt: 'Refuse me', model: 'fail-400' });
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'dead');
  assert.equal(r.error_class, 'fatal');
  const dead = (await q.deadLetters()).find((d) => d.taskId === id);
  assert.ok(dead, 'the dead letter is listed');
  assert.equal(dead.class, 'fatal');
  assert.equal(dead.queue, queueName);
  assert.ok(dead.failedAt instanceof Date && !Number.isNaN(dead.failedAt.getTime()));
  assert.equal(JSON.parse(dead.task).prompt, 'Refuse me');
});

test('a batch is enqueued in one go and every result comes back', async () => {
  const prompts = Array.from({ length: 25 }, (_, i) => `Batch item ${i}`);
  const ids = await q.enqueueMany(prompts.map((prompt) => ({ prompt, model: 'mock-fast' })));
  assert.equal(new Set(ids).size, prompts.length);
  const records = await q.waitForResults(ids, { timeoutMs: 60_000 });
  records.forEach((r, i) => {
    assert.equal(r.task_id, ids[i]);
    assert.equal(r.status, 'succeeded');
    assert.equal(r.output, answer(prompts[i]));
  });
});

test('a batch with one bad task writes nothing and says which task', async () => {
  const before = await redis.xLen(`llmq:{${idleName}}:stream`);
  await assert.rejects(idle.enqueueMany([{ prompt: 'fine' }, { prompt: 'also fine', priority: 10 }]), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'invalid');
    assert.match(e.message, /^Task 1 of the batch: The task's field `priority` is wrong: 10 is out of range.* Nothing was enqueued\.$/);
    return true;
  });
  assert.equal(await redis.xLen(`llmq:{${idleName}}:stream`), before);
});

test('an answer that must fit a JSON schema comes back parsed', async () => {
  const id = await q.enqueue({
    prompt: 'Where?',
    model: 'mock-fast',
    response_format: {
      type: 'json_schema',
      schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  });
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'succeeded', JSON.stringify(r));
  assert.deepEqual(r.json, { city: 'x' });
});

test('a live answer is followed as it is written, to its end', async () => {
  const id = await q.enqueue({ prompt: 'Stream this answer', model: 'mock-fast', stream: true });
  const pieces = [];
  for await (const text of q.followAnswer(id, { timeoutMs: 30_000 })) pieces.push(text);
  assert.ok(pieces.length >= 1);
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'succeeded');
  assert.equal(pieces.join(''), r.output);
  assert.equal(r.output, answer('Stream this answer'));
  // The answer really was written to the live-answer stream, which the follow read.
  const entries = await redis.xRange(`llmq:{${queueName}}:out:${id}`, '-', '+');
  assert.equal(entries.at(-1).message.event, 'done');
});

test("following the answer of a task that fails ends when the task does", async () => {
  const id = await q.enqueue({ prompt: 'Fail streaming', model: 'fail-400', stream: true });
  const pieces = [];
  for await (const text of q.followAnswer(id, { timeoutMs: 30_000 })) pieces.push(text);
  assert.deepEqual(pieces, []);
  assert.equal((await q.waitForResult(id, { timeoutMs: 30_000 })).status, 'dead');
});

test('tasks with a priority and a tenant are run by the worker', async () => {
  const ids = await q.enqueueMany([
    { prompt: 'Urgent for acme', model: 'mock-fast', priority: 0, tenant: 'acme' },
    { prompt: 'Later for globex', model: 'mock-fast', priority: 7, tenant: 'globex' },
    { prompt: 'Later, no tenant', model: 'mock-fast', priority: 9 },
  ]);
  const records = await q.waitForResults(ids, { timeoutMs: 30_000 });
  assert.deepEqual(
    records.map((r) => [r.status, r.output]),
    [
      ['succeeded', answer('Urgent for acme')],
      ['succeeded', answer('Later for globex')],
      ['succeeded', answer('Later, no tenant')],
    ],
  );
});

test('a chain is submitted and followed step by step to its end', async () => {
  const chainId = await q.submitChain({
    vars: { input: 'caching' },
    defaults: { model: 'mock-fast' },
    priority: 2,
    tenant: 'acme',
    steps: [
      // A slow first step: the follow sees the second one wait for it.
      { name: 'plan', prompt: 'Plan {{input}}', model: 'slow-1500' },
      { name: 'impl', after: ['plan'], prompt: 'Do {{plan.summary}}' },
    ],
  });
  const events = [];
  for await (const e of q.followChain(chainId, { timeoutMs: 60_000 })) events.push(e);
  const end = events.at(-1);
  assert.equal(end.type, 'end');
  assert.equal(end.state, 'succeeded', JSON.stringify(events));
  assert.equal(events.filter((e) => e.type === 'end').length, 1);
  const statuses = (step) => events.filter((e) => e.type === 'step' && e.step === step).map((e) => e.state.status);
  assert.equal(statuses('impl')[0], 'blocked', JSON.stringify(events));
  assert.equal(statuses('impl').at(-1), 'succeeded');
  assert.equal(statuses('plan').at(-1), 'succeeded');
  // One event per change: no state is reported twice in a row.
  for (const step of ['plan', 'impl']) {
    const s = statuses(step);
    assert.ok(s.every((x, i) => i === 0 || x !== s[i - 1]), JSON.stringify(s));
  }
  assert.equal(end.steps.plan.status, 'succeeded');
  const plan = await q.waitForResult(end.steps.plan.task_id);
  assert.equal(plan.output, 'mock answer from slow-1500: Plan caching');
  const impl = await q.waitForResult(end.steps.impl.task_id);
  assert.ok(impl.output.startsWith(answer('Do mock answer from slow-1500: Plan caching')), impl.output);
});

test("a chain the worker refuses ends its follow with the worker's reason", async () => {
  const chainId = await q.submitChain({
    steps: [
      { name: 'a', prompt: 'x', after: ['b'] },
      { name: 'b', prompt: 'y', after: ['a'] },
    ],
  });
  await assert.rejects(
    async () => {
      for await (const _ of q.followChain(chainId, { timeoutMs: 30_000 })) {
        // nothing of it runs
      }
    },
    (e) => {
      assert.ok(e instanceof LlmqError && e.code === 'refused', String(e));
      assert.match(e.message, /^Chain .* was refused by the worker: the chain is invalid: steps .* form a cycle.*; nothing of it ran\.$/);
      return true;
    },
  );
});

test("a task without an id gets the id a worker derives, under which its dead letter is listed", async () => {
  const entry = await redis.xAdd(`llmq:{${queueName}}:stream`, '*', {
    task: JSON.stringify({ v: 1, prompt: 'No id', model: 'fail-400' }),
  });
  const taskId = deriveId(queueName, entry);
  const record = await q.waitForResult(taskId, { timeoutMs: 30_000 });
  assert.equal(record.status, 'dead');
  const dead = await eventually('the dead letter', async () => (await q.deadLetters()).find((d) => d.taskId === taskId));
  assert.equal(JSON.parse(dead.task).prompt, 'No id');
});

test('a dead letter is replayed to the worker, which runs it again', async () => {
  const id = await q.enqueue({ prompt: 'Replay me', model: 'fail-400' });
  assert.equal((await q.waitForResult(id, { timeoutMs: 30_000 })).status, 'dead');
  const dead = (await q.deadLetters()).find((d) => d.taskId === id);
  assert.equal(JSON.parse(dead.task).replays, undefined);
  const replayed = await q.replay(id, { provider: 'mock' });
  assert.deepEqual(replayed, { status: 'enqueued', taskId: id });
  // It ran again (the model still refuses) and died again: a new letter, one replay more.
  const again = await eventually('the second dead letter', async () =>
    (await q.deadLetters()).find((d) => d.taskId === id && d.id !== dead.id),
  );
  const env = JSON.parse(again.task);
  assert.equal(env.replays, 1);
  assert.equal(env.provider, 'mock');
  assert.equal(env.id, id);
  assert.equal((await redis.xRange(`llmq:{${queueName}}:dead`, dead.id, dead.id)).length, 0, 'the first letter is gone');
  assert.equal((await q.waitForResult(id, { timeoutMs: 30_000 })).status, 'dead');
  await assert.rejects(q.replay(dead.id), (e) => e.code === 'not_found' && /^There is no dead letter .* in queue `.*`; list them/.test(e.message));
});

test('replay writes what llmq dlq replay writes, with its own script: the letter and the record go', async () => {
  const dead = `llmq:{${idleName}}:dead`;
  const [letter] = await redis.xRange(dead, preparedDeadId, preparedDeadId);
  assert.ok(letter, 'the driver prepared a dead letter');
  const listed = (await idle.deadLetters()).find((d) => d.id === preparedDeadId);
  assert.equal(listed.taskId, deriveId(idleName, letter.message.entry_id), 'it has no id: the derived one');
  assert.ok(await redis.exists(`llmq:{${idleName}}:result:${listed.taskId}`));
  const before = await redis.xLen(`llmq:{${idleName}}:stream`);

  assert.deepEqual(await idle.replay(preparedDeadId), { status: 'enqueued', taskId: listed.taskId });
  assert.equal((await redis.xRange(dead, preparedDeadId, preparedDeadId)).length, 0);
  assert.equal(await redis.exists(`llmq:{${idleName}}:result:${listed.taskId}`), 0);
  const stream = await redis.xRange(`llmq:{${idleName}}:stream`, '-', '+');
  assert.equal(stream.length, before + 1);
  const task = stream.at(-1).message.task;
  assert.equal(task, replayedTask(letter.message.task, listed.taskId));
  const env = JSON.parse(task);
  assert.equal(env.id, listed.taskId);
  for (const reset of ['attempts', 'snoozes', 'last_error', 'waiting_since']) assert.equal(env[reset], undefined, reset);
  // The driver compares it with what llmq's own replayed_task writes.
});

test("a chain step's dead letter is refused with what to run instead", async () => {
  const dead = `llmq:{${idleName}}:dead`;
  const id = await redis.xAdd(dead, '*', {
    task: JSON.stringify({ v: 1, prompt: 'x', chain_id: 'release-7', step: 'plan' }),
    error: 'gave up',
    class: 'fatal',
    attempts: '1',
    failed_at: String(Date.now()),
    entry_id: '1-0',
  });
  await assert.rejects(idle.replay(id), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'refused');
    assert.match(e.message, /^Dead letter .* is step `plan` of chain release-7/);
    assert.match(e.message, /run `llmq dlq replay .* --queue .*` or `llmq chain retry release-7 --from plan --queue .*`\.$/);
    return true;
  });
  assert.equal((await redis.xRange(dead, id, id)).length, 1, 'the letter is left as it was');
});

test('bad input through the client is a sentence and writes nothing', async () => {
  const stream = `llmq:{${idleName}}:stream`;
  const before = await redis.xLen(stream);
  for (const [task, says] of [
    [{ prompt: 'x', priority: 12 }, /`priority` is wrong: 12 is out of range/],
    [{ prompt: 'x', tenant: 'a\tb' }, /`tenant` is wrong: contains a control character/],
    [{ prompt: '' }, /has no prompt/],
    [{ prompt: 'x', deadline: 'tomorrow' }, /`deadline` is wrong/],
  ]) {
    await assert.rejects(idle.enqueue(task), (e) => e instanceof LlmqError && e.code === 'invalid' && says.test(e.message) && e.message.endsWith('.'));
  }
  await assert.rejects(idle.submitChain({ steps: [{ name: 'a' }] }), (e) => e.code === 'invalid' && /has no prompt/.test(e.message));
  assert.equal(await redis.xLen(stream), before);
  await assert.rejects(q.waitForResult('0B6F4C2E-8A57-4A43-9C3E-2F5D8E7A1B90'), (e) => e.code === 'invalid' && /is not a task id; give the id enqueue\(\) returned/.test(e.message));
  await assert.rejects(q.followChain('a\nb').next(), (e) => e.code === 'invalid' && /is not a chain id/.test(e.message));
  assert.throws(() => q.queue('a}b'), (e) => e.code === 'invalid' && /^Queue name "a}b" cannot be used/.test(e.message));
});

test('a wait with no worker ends at its timeout with a sentence', async () => {
  const id = await idle.enqueue({ prompt: 'Nobody runs me' });
  await assert.rejects(idle.waitForResult(id, { timeoutMs: 300 }), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'timeout');
    assert.match(e.message, new RegExp(`^Task ${id} did not reach a final status within 0.3s; it is still in queue \`${idleName}\``));
    return true;
  });
  await assert.rejects(
    async () => {
      for await (const _ of idle.followAnswer(id, { timeoutMs: 300 }));
    },
    (e) => e.code === 'timeout' && /^The answer of task .* did not end within 0.3s/.test(e.message),
  );
  await assert.rejects(
    async () => {
      for await (const _ of idle.followChain('no-such-chain', { timeoutMs: 300 }));
    },
    (e) => e.code === 'timeout' && /^Chain no-such-chain did not appear in queue/.test(e.message),
  );
});

test('a Redis that cannot be reached is a sentence naming it', async () => {
  await assert.rejects(connect({ url: 'redis://127.0.0.1:1' }), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'redis');
    assert.match(e.message, /^Cannot reach Redis at redis:\/\/127\.0\.0\.1:1 \(.*ECONNREFUSED.*\); check the URL and that Redis is running and reachable\.$/);
    return true;
  });
  await assert.rejects(connect({ url: url.replace(/^redis:/, 'redis+cluster:') }), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'redis');
    assert.match(e.message, /names a Redis Cluster \(redis\+cluster:\/\/\), but .* is not in cluster mode; use redis:\/\/host:port/);
    return true;
  });
});
