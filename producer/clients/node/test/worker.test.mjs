// The client against a real llmq worker (started by tests/tests/e2e/client_node.rs) serving
// LLMQ_TEST_QUEUE with the mock provider; LLMQ_TEST_IDLE_QUEUE has no worker, so what the
// client writes there stays to be looked at.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';

import { buildEnvelope, chainKeyId, connect, deriveId, LlmqError, replayedTask } from '../dist/index.js';
import { eventually, need, raw } from './env.mjs';

const url = need('REDIS_URL');
const queueName = need('LLMQ_TEST_QUEUE');
const idleName = need('LLMQ_TEST_IDLE_QUEUE');
const preparedDeadIds = JSON.parse(need('LLMQ_TEST_DEAD_IDS'));
const answer = (prompt) => `mock answer from mock-fast: ${prompt}`;
const sorted = (xs) => [...xs].sort();
/** The text of a followed answer: the pieces after its last restart. */
const textOf = (events) => {
  const from = events.findLastIndex((e) => e.type === 'restart') + 1;
  return events.slice(from).map((e) => e.text).join('');
};

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
  const events = [];
  for await (const e of q.followAnswer(id, { timeoutMs: 30_000 })) events.push(e);
  assert.ok(events.length >= 1);
  assert.ok(events.every((e) => e.type === 'text' && typeof e.text === 'string'), JSON.stringify(events));
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'succeeded');
  assert.equal(textOf(events), r.output);
  assert.equal(r.output, answer('Stream this answer'));
  // The answer really was written to the live-answer stream, which the follow read.
  const entries = await redis.xRange(`llmq:{${queueName}}:out:${id}`, '-', '+');
  assert.equal(entries.at(-1).message.event, 'done');
});

test('a live answer cut halfway says so, and the retry streams the answer whole', async () => {
  // llmq-mock ends the first stream of this conversation halfway; the worker retries.
  const prompt = 'A tale told twice [[mock:stream-break-once]]';
  const id = await q.enqueue({ prompt, model: 'mock-fast', stream: true });
  const events = [];
  for await (const e of q.followAnswer(id, { timeoutMs: 30_000 })) events.push(e);
  const restart = events.findIndex((e) => e.type === 'restart');
  assert.ok(restart > 0, `part of the answer came, then a restart: ${JSON.stringify(events)}`);
  assert.equal(typeof events[restart].error, 'string');
  const before = events.slice(0, restart).map((e) => e.text).join('');
  const r = await q.waitForResult(id, { timeoutMs: 30_000 });
  assert.equal(r.status, 'succeeded');
  assert.equal(r.output, answer(prompt));
  // What came before the restart is void: the answer is what came after it, whole.
  assert.ok(before.length > 0 && r.output.startsWith(before), before);
  assert.equal(textOf(events), r.output);
  assert.notEqual(events.filter((e) => e.type === 'text').map((e) => e.text).join(''), r.output, 'all the text read as one is garbled');
});

test("following the answer of a task that fails ends when the task does, saying why", async () => {
  const id = await q.enqueue({ prompt: 'Fail streaming', model: 'fail-400', stream: true });
  const events = [];
  for await (const e of q.followAnswer(id, { timeoutMs: 30_000 })) events.push(e);
  // No text, and the call's failure as a restart: what came (nothing) is void.
  assert.ok(events.every((e) => e.type === 'restart' && /fail-400/.test(e.error)), JSON.stringify(events));
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

test("a copy of a keyed task is answered with the first one's answer, marked duplicate_of it", async () => {
  const key = `order-${randomUUID()}`;
  const first = await q.enqueue({ prompt: `Keyed ${key}`, model: 'mock-fast', idempotency_key: key, idempotency_window: '1h' });
  const r = await q.waitForResult(first, { timeoutMs: 30_000 });
  assert.deepEqual([r.status, r.output, r.duplicate_of], ['succeeded', answer(`Keyed ${key}`), undefined], JSON.stringify(r));
  // A copy within the window: the first one's answer, without a call.
  const copy = await q.waitForResult(await q.enqueue({ prompt: `Copy ${key}`, model: 'mock-fast', idempotency_key: key }), { timeoutMs: 30_000 });
  assert.deepEqual([copy.status, copy.output, copy.duplicate_of, copy.cost_usd], ['succeeded', r.output, first, 0], JSON.stringify(copy));
  // The same key for another tenant is another key: its task runs.
  const other = await q.waitForResult(
    await q.enqueue({ prompt: `Keyed ${key}`, model: 'mock-fast', idempotency_key: key, tenant: 'acme' }),
    { timeoutMs: 30_000 },
  );
  assert.deepEqual([other.status, other.duplicate_of], ['succeeded', undefined], JSON.stringify(other));
});

test('a chain submitted twice with one key is one chain, named from the key as the client names it', async () => {
  const key = `release-${randomUUID()}`;
  const spec = { idempotency_key: key, tenant: 'acme', steps: [{ name: 'a', prompt: `Once ${key}`, model: 'mock-fast' }] };
  const first = await q.submitChain(spec);
  const again = await q.submitChain(spec);
  assert.equal(first, again);
  assert.equal(first, chainKeyId(queueName, 'acme', key));
  // The worker names it so too: it is followed to its end under that id.
  let end;
  for await (const e of q.followChain(first, { timeoutMs: 60_000 })) if (e.type === 'end') end = e;
  assert.equal(end.state, 'succeeded', JSON.stringify(end));
  assert.equal((await q.waitForResult(end.steps.a.task_id)).chain_id, first);
});

test('a chain is submitted and followed step by step to its end', async () => {
  const chainId = await q.submitChain({
    vars: { input: 'caching' },
    defaults: { model: 'mock-fast' },
    priority: 2,
    tenant: 'acme',
    steps: [
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
  // Whatever the first look caught, the states come in the order they happen.
  const order = ['blocked', 'queued', 'succeeded'];
  const seen = statuses('impl').map((x) => order.indexOf(x));
  assert.ok(seen.every((x, i) => x >= 0 && (i === 0 || x > seen[i - 1])), JSON.stringify(events));
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

test("a step's live answer is followed while its chain runs, as the README shows", async () => {
  const live = await q.submitChain({
    vars: { input: 'caching' },
    steps: [
      { name: 'draft', prompt: 'Draft a note on {{input}}', stream: true },
      {
        name: 'facts', after: ['draft'], prompt: 'The facts of {{draft.output}}',
        response_format: { type: 'json_schema', schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } },
      },
    ],
  });
  let streamed = null;
  let end = null;
  for await (const e of q.followChain(live, { timeoutMs: 60_000 })) {
    if (e.type === 'step' && e.step === 'draft' && e.state.status !== 'blocked' && streamed === null) {
      const events = [];
      for await (const piece of q.followAnswer(e.state.task_id, { timeoutMs: 30_000 })) events.push(piece);
      streamed = textOf(events);
    } else if (e.type === 'end') {
      end = e;
    }
  }
  assert.equal(end?.state, 'succeeded', JSON.stringify(end));
  const draft = await q.waitForResult(end.steps.draft.task_id);
  assert.ok(streamed && streamed === draft.output, `${streamed} against ${draft.output}`);
  const facts = await q.waitForResult(end.steps.facts.task_id);
  assert.deepEqual(facts.json, { city: 'x' });
});

test('a step waiting for another is followed as blocked, whenever the follow looks', async () => {
  // The first step waits for a person (no scheduler runs here to time it out), so the second
  // is blocked at every look, not only at an early one.
  const chainId = await q.submitChain({
    steps: [
      { name: 'plan', kind: 'approval', timeout: 3600 },
      { name: 'impl', after: ['plan'], prompt: 'Do it', model: 'mock-fast' },
    ],
  });
  const seen = { plan: [], impl: [] };
  for await (const e of q.followChain(chainId, { timeoutMs: 30_000, pollMs: 20 })) {
    assert.equal(e.type, 'step', JSON.stringify(e));
    seen[e.step].push(e.state.status);
    if (seen.plan.at(-1) === 'awaiting_approval' && seen.impl.length > 0) break;
  }
  assert.deepEqual(seen.impl, ['blocked']);
  assert.equal(seen.plan.at(-1), 'awaiting_approval');
});

test('a chain that loops is refused by the client, as llmq chain submit refuses it', async () => {
  const stream = `llmq:{${idleName}}:stream`;
  const before = await redis.xLen(stream);
  await assert.rejects(
    idle.submitChain({ steps: [{ name: 'a', prompt: 'x', after: ['b'] }, { name: 'b', prompt: 'y', after: ['a'] }] }),
    (e) => e instanceof LlmqError && e.code === 'invalid' && /^The chain is invalid: steps a -> b -> a form a cycle; a chain must not loop\.$/.test(e.message),
  );
  assert.equal(await redis.xLen(stream), before);
});

test("a chain the worker refuses ends its follow with the worker's reason", async () => {
  // Only the worker knows its provider file's checks; this one has none named `lint`.
  const chainId = await q.submitChain({
    steps: [
      { name: 'a', prompt: 'x' },
      { name: 'k', kind: 'check', after: ['a'], command: 'lint' },
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
      assert.match(e.message, /^Chain .* was refused by the worker: the chain is invalid: step `k`: check `lint` is not configured.*; nothing of it ran\.$/);
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
  assert.ok(preparedDeadIds.length >= 4, 'the driver prepared awkward dead letters');
  for (const deadId of preparedDeadIds) {
    const [letter] = await redis.xRange(dead, deadId, deadId);
    assert.ok(letter, `the driver prepared dead letter ${deadId}`);
    const listed = (await idle.deadLetters()).find((d) => d.id === deadId);
    assert.ok(await redis.exists(`llmq:{${idleName}}:result:${listed.taskId}`));
    const before = await redis.xLen(`llmq:{${idleName}}:stream`);

    assert.deepEqual(await idle.replay(deadId), { status: 'enqueued', taskId: listed.taskId });
    assert.equal((await redis.xRange(dead, deadId, deadId)).length, 0);
    assert.equal(await redis.exists(`llmq:{${idleName}}:result:${listed.taskId}`), 0);
    const stream = await redis.xRange(`llmq:{${idleName}}:stream`, '-', '+');
    assert.equal(stream.length, before + 1);
    assert.equal(stream.at(-1).message.task, replayedTask(letter.message.task, listed.taskId));
  }
  // The driver compares each with what llmq's own replayed_task writes.
});

test('a task whose id is no UUID to the worker gets a derived id, and its replay touches only its own records', async () => {
  // 32 hex digits in braces: not a spelling the worker parses, so it refuses the task and
  // files it under the id derived from its stream entry, as the client must find it too.
  const other = randomUUID();
  const braced = `{${other.replaceAll('-', '')}}`;
  const otherKey = `llmq:{${queueName}}:result:${other}`;
  await redis.set(otherKey, JSON.stringify({ status: 'succeeded', task_id: other, output: 'another task' }));
  const payload = JSON.stringify({ v: 1, id: braced, prompt: 'Braced id', model: 'mock-fast' });
  const entry = await redis.xAdd(`llmq:{${queueName}}:stream`, '*', { task: payload });
  const taskId = deriveId(queueName, entry);
  const record = await q.waitForResult(taskId, { timeoutMs: 30_000 });
  assert.equal(record.status, 'dead');
  assert.match(record.error, /^field `id` is wrong/);
  const first = await eventually('the dead letter', async () => (await q.deadLetters()).find((d) => d.taskId === taskId));
  assert.equal(first.task, payload);
  await assert.rejects(q.replay(other), (e) => e.code === 'not_found', 'no letter is filed under the braced id');

  assert.deepEqual(await q.replay(taskId), { status: 'enqueued', taskId });
  // Replayed as it came, the worker refuses it again: a second letter, the payload unchanged.
  const second = await eventually('the second dead letter', async () =>
    (await q.deadLetters()).find((d) => d.task === payload && d.id !== first.id),
  );
  assert.notEqual(second.taskId, taskId);
  assert.equal((await redis.xRange(`llmq:{${queueName}}:dead`, first.id, first.id)).length, 0, 'the first letter is gone');
  assert.equal(await redis.get(otherKey), JSON.stringify({ status: 'succeeded', task_id: other, output: 'another task' }));
});

/** Tasks a worker refuses, each for a reason the client words as the worker does. */
const REFUSED = [
  { prompt: 'x', priority: 12 },
  { prompt: 'x', priority: -1 },
  { prompt: 'x', tenant: 'a\nb' },
  { prompt: 'x', tenant: '' },
  { prompt: 'x', tenant: 'é'.repeat(65) },
  { prompt: '   ' },
  { prompt: 'x', type: 'poetry' },
  { prompt: 'x', max_attempts: 0 },
  { prompt: 'x', timeout: 0 },
  { prompt: 'x', timeout: 2592001 },
  { prompt: 'x', concurrency_key: 'k' },
  { prompt: 'x', concurrency_limit: 2 },
  { prompt: 'x', concurrency_key: ' ', concurrency_limit: 1 },
  { prompt: 'x', stream: true, tools: [{ name: 't' }] },
  { prompt: 'x', deadline: '2h' },
  { prompt: 'x', deadline: '31d' },
  { prompt: 'x', deadline: 'soon' },
  { prompt: 'x', deadline: '1 d 2' },
  { prompt: 'x', deadline: '24h', stream: true },
  { prompt: 'x', model: 'mock\u0000fast' },
  { prompt: 'x', idempotency_key: '' },
  { prompt: 'x', idempotency_window: '1h' },
  { prompt: 'x', idempotency_key: 'refused-window', idempotency_window: 'soon' },
  { prompt: 'x', idempotency_key: 'refused-window', idempotency_window: '0.5s' },
  { prompt: 'x', idempotency_key: 'refused-window', idempotency_window: '31d' },
  { prompt: 'x', idempotency_key: 'refused\u0000key' },
  { prompt: 'x', idempotency_key: 'refused\u0000key', idempotency_window: 'soon' },
  { prompt: 'x', idempotency_key: '', cache: true },
  { prompt: 'x', batch_id: '' },
  { prompt: 'x', batch_id: 'x'.repeat(129) },
  { prompt: 'x', batch_id: 'batch 1' },
  { prompt: 'x', batch_id: 'batch/1' },
  { prompt: 'x', batch_id: 'batch\u0000' },
  { prompt: 'x', batch_id: '', idempotency_key: '' },
  { prompt: 'x', messages: [{ role: 'tool', tool_call_id: 'c1', content: 'r' }] },
  { prompt: 'x', messages: [{ role: 'user', content: ' ' }] },
  { prompt: '', messages: [{ role: 'system', content: 'be brief' }] },
  { prompt: 'x', messages: [{ role: 'assistant', content: '', tool_calls: [{ id: 'c 1', name: 't' }] }] },
  { prompt: 'x', messages: [{ role: 'assistant', content: '', tool_calls: [{ id: 'c', name: 't' }] }] },
  { prompt: 'x', messages: [{ role: 'user', content: [{ type: 'image', url: 'ftp://x/y.png' }] }] },
  { prompt: 'x', messages: [{ role: 'assistant', content: [{ type: 'image', data: 'AAAA', media_type: 'image/png' }] }] },
  { prompt: 'x', messages: [{ role: 'user', content: [{ type: 'image', data: 'AAAA', media_type: 'image/bmp' }] }] },
  { prompt: 'x', tools: [{ name: '1bad' }] },
  { prompt: 'x', tools: [{ name: 't' }, { name: 't' }] },
  { prompt: 'x', tools: [{ name: 't', parameters: { type: 'array' } }] },
  { prompt: 'x', tool_choice: 'required' },
  { prompt: 'x', tool_choice: { name: 'nope' }, tools: [{ name: 't' }] },
  { prompt: 'x', response_format: { type: 'json_schema', schema: [1] } },
  { prompt: 'x', response_format: { type: 'json_schema', schema: {}, name: 'has space' } },
];

/** A worker's dead-letter error as the client words it: the same, as a sentence. */
const inClientWords = (error) => (error.startsWith('field ') ? `The task's ${error}.` : `${error[0].toUpperCase()}${error.slice(1)}.`);

test('a task the client refuses, a worker refuses too, in the same words', async () => {
  const said = REFUSED.map((task) => {
    try {
      buildEnvelope(task);
    } catch (e) {
      assert.ok(e instanceof LlmqError && e.code === 'invalid', String(e));
      return e.message;
    }
    return assert.fail(`the client took ${JSON.stringify(task)}`);
  });
  // The same envelopes, written raw: each becomes a dead letter saying the same.
  const ids = REFUSED.map(() => randomUUID());
  for (const [i, task] of REFUSED.entries()) {
    await redis.xAdd(`llmq:{${queueName}}:stream`, '*', { task: JSON.stringify({ v: 1, id: ids[i], ...task }) });
  }
  const records = await q.waitForResults(ids, { timeoutMs: 30_000 });
  records.forEach((r, i) => {
    assert.deepEqual([r.status, r.error_class], ['dead', 'invalid'], JSON.stringify(REFUSED[i]));
    assert.equal(said[i], inClientWords(r.error), `${JSON.stringify(REFUSED[i])}: the client says ${said[i]}, the worker ${r.error}`);
  });
});

test('JSON nested deeper than a worker reads is refused by the client, and dead-lettered by a worker', async () => {
  const metadata = JSON.parse('['.repeat(127) + ']'.repeat(127));
  assert.throws(() => buildEnvelope({ prompt: 'x', metadata }), (e) => e.code === 'invalid' && /`metadata` is wrong: nests more than 126 levels deep/.test(e.message));
  const id = randomUUID();
  await redis.xAdd(`llmq:{${queueName}}:stream`, '*', { task: JSON.stringify({ v: 1, id, prompt: 'x', metadata }) });
  // Not JSON to the worker: the record is under the id it derives, so look in the letters.
  const letter = await eventually('the dead letter', async () => (await q.deadLetters()).find((d) => d.task.includes(id)));
  assert.match(letter.error, /^the task is not valid JSON: recursion limit exceeded/);
  // One level less is read, and runs.
  const ok = await q.enqueue({ prompt: 'Deep but readable', model: 'mock-fast', metadata: JSON.parse('['.repeat(126) + ']'.repeat(126)) });
  assert.equal((await q.waitForResult(ok, { timeoutMs: 30_000 })).status, 'succeeded');
});

test('what Redis answers with an error is said as such, not as a Redis that cannot be reached', async () => {
  const id = randomUUID();
  const key = `llmq:{${idleName}}:result:${id}`;
  await redis.lPush(key, 'not a string');
  await assert.rejects(idle.result(id), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'redis_reply', String(e));
    assert.match(e.message, /^Redis at redis:\/\/.* refused the command: WRONGTYPE .*; a key of the queue holds another kind of value than llmq writes there; .*\.$/);
    assert.doesNotMatch(e.message, /Cannot reach/);
    return true;
  });
  await redis.del(key);
});

test('a record that is not what llmq writes is a sentence, not a SyntaxError', async () => {
  const id = randomUUID();
  const key = `llmq:{${idleName}}:result:${id}`;
  for (const bad of ['not json', 'null', '[1]', '{"output":"no status"}']) {
    await redis.set(key, bad);
    for (const call of [() => idle.result(id), () => idle.waitForResult(id, { timeoutMs: 1000 })]) {
      await assert.rejects(call(), (e) => {
        assert.ok(e instanceof LlmqError && e.code === 'bad_record', String(e));
        assert.match(e.message, new RegExp(`^The result record of task ${id} \\(llmq:\\{${idleName}\\}:result:${id}\\) is not what llmq writes there \\(.*\\); something else wrote it, so look at it with \`llmq result ${id} --queue ${idleName}\` and delete the key if it is stray\\.$`));
        return true;
      });
    }
  }
  await redis.del(key);
  const chainId = `broken-${id}`;
  await redis.hSet(`llmq:{${idleName}}:chain:${chainId}`, 'state', 'running');
  await redis.hSet(`llmq:{${idleName}}:chain:${chainId}:steps`, 'plan', '{not json');
  await assert.rejects(idle.followChain(chainId).next(), (e) => {
    assert.ok(e instanceof LlmqError && e.code === 'bad_record', String(e));
    assert.match(e.message, /^The state of step `plan` of chain broken-.* is not what llmq writes there \(.*\); something else wrote it, so look at it with `llmq chain show broken-.*`\.$/);
    return true;
  });
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
  await assert.rejects(idle.replay('1700000000000-O'), (e) => e.code === 'invalid' && /is neither a dead-entry id .* nor a task id/.test(e.message));
  await assert.rejects(idle.deadLetters({ limit: 5000 }), (e) => e.code === 'invalid' && /from 1 to 1000/.test(e.message));
  await assert.rejects(q.followChain('a\nb').next(), (e) => e.code === 'invalid' && /is not a chain id/.test(e.message));
  assert.throws(() => q.queue('a}b'), (e) => e.code === 'invalid' && /^Queue name "a}b" cannot be used/.test(e.message));
});

test("a cancel marks what it names in the queue's cancels, and leaves a task that had ended alone", async () => {
  const cancels = `llmq:{${idleName}}:cancels`;
  const ended = randomUUID();
  const fresh = randomUUID();
  await redis.set(
    `llmq:{${idleName}}:result:${ended}`,
    JSON.stringify({ task_id: ended, queue: idleName, status: 'succeeded', output: 'done', attempts: 1, cost_usd: 0 }),
  );
  const from = Date.now();
  const done = await idle.cancel({ taskIds: [ended, fresh], batch: 'nightly-2030:01', tenant: 'acme corp' });
  const to = Date.now();
  assert.deepEqual(done, {
    [`task:${ended}`]: 'succeeded',
    [`task:${fresh}`]: 'cancelled',
    'batch:nightly-2030:01': 'cancelled',
    'tenant:acme corp': 'cancelled',
  });
  const marks = await redis.zRangeWithScores(cancels, 0, -1);
  assert.deepEqual(sorted(marks.map((m) => m.value)), sorted([`task:${fresh}`, 'batch:nightly-2030:01', 'tenant:acme corp']));
  assert.ok(marks.every((m) => m.score >= from && m.score <= to && m.score === marks[0].score), JSON.stringify(marks));
  // Set again, a mark moves later, never earlier (ZADD GT).
  await redis.zAdd(cancels, { score: 4102444800000, value: 'tenant:acme corp' });
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(await idle.cancel({ taskIds: [fresh], tenant: 'acme corp' }), { [`task:${fresh}`]: 'cancelled', 'tenant:acme corp': 'cancelled' });
  assert.equal(await redis.zScore(cancels, 'tenant:acme corp'), 4102444800000);
  assert.ok((await redis.zScore(cancels, `task:${fresh}`)) > marks[0].score);
  // Bad input is a sentence and writes nothing.
  await redis.del(cancels);
  for (const [options, says] of [
    [{ taskIds: ['not-a-uuid'] }, /is not a task id/],
    [{ tenant: '' }, /The tenant option is empty/],
    [{}, /names nothing to cancel/],
  ]) {
    await assert.rejects(idle.cancel(options), (e) => e instanceof LlmqError && e.code === 'invalid' && says.test(e.message) && e.message.endsWith('.'));
  }
  assert.equal(await redis.exists(cancels), 0);
  await redis.del(`llmq:{${idleName}}:result:${ended}`);
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
