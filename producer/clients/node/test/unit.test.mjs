// What needs no Redis: URLs, the checks a worker makes, the schema check (issue 35 item 5),
// the replayed envelope and derived ids. Runs on the compiled dist/.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

import {
  buildChain,
  buildEnvelope,
  CHAIN_FIELDS,
  checkQueueName,
  connect,
  deriveId,
  LlmqError,
  parseDuration,
  parseRedisUrl,
  replayedTask,
  RESERVED_FIELDS,
  STEP_DEFAULT_FIELDS,
  STEP_FIELDS,
  TASK_FIELDS,
} from '../dist/index.js';

const schemaDir = new URL('../../../../schema/', import.meta.url);
const envelopeSchema = JSON.parse(readFileSync(new URL('envelope.schema.json', schemaDir), 'utf8'));
const chainSchema = JSON.parse(readFileSync(new URL('chain.schema.json', schemaDir), 'utf8'));

/** An error the user caused: an LlmqError of `code` whose message is one sentence matching `says`. */
function refuses(f, code, says) {
  let caught;
  try {
    f();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof LlmqError, `expected an LlmqError, got ${caught}`);
  assert.equal(caught.code, code, caught.message);
  assert.match(caught.message, /^[A-Z`"].*[.]$/s, `not a sentence: ${caught.message}`);
  assert.match(caught.message, says);
}

const sorted = (xs) => [...xs].sort();

test('the client knows every envelope field the schema has, and no other', () => {
  assert.deepEqual(sorted([...TASK_FIELDS, ...RESERVED_FIELDS]), sorted(Object.keys(envelopeSchema.properties)));
});

test("the client knows every chain field the schema has: the spec's, defaults' and a step's", () => {
  assert.deepEqual(sorted(['v', ...CHAIN_FIELDS]), sorted(Object.keys(chainSchema.properties)));
  assert.deepEqual(sorted(STEP_DEFAULT_FIELDS), sorted(Object.keys(chainSchema.properties.defaults.properties)));
  assert.deepEqual(sorted(STEP_DEFAULT_FIELDS), sorted(Object.keys(chainSchema.$defs.fields.properties)));
  assert.deepEqual(sorted(STEP_FIELDS), sorted(Object.keys(chainSchema.properties.steps.items.properties)));
});

function ajv() {
  const a = new Ajv2020({ strict: false, allErrors: true });
  addFormats(a);
  a.addSchema(envelopeSchema);
  return a;
}

/** A task with every field a producer may set. */
const FULL = {
  id: '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90',
  prompt: 'Should I take an umbrella?',
  system: 'You answer tersely.',
  messages: [
    { role: 'user', content: [{ type: 'text', text: 'What is the weather in Paris?' }, { type: 'image', url: 'https://example.com/sky.png' }] },
    { role: 'assistant', content: '', tool_calls: [{ id: 'call_1', name: 'get_weather', arguments: { city: 'Paris' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: 'sunny, 21 degrees' },
  ],
  tools: [
    {
      name: 'get_weather',
      description: 'The weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  ],
  tool_choice: { name: 'get_weather' },
  response_format: { type: 'json_schema', name: 'advice', strict: true, schema: { type: 'object' } },
  deadline: '3d',
  stream: false,
  type: 'research',
  provider: 'mock',
  model: 'mock-fast',
  chain_id: 'nightly',
  risk: 'medium',
  area: 'billing',
  timeout: 120,
  max_attempts: 5,
  run_at: new Date('2030-01-02T03:04:05Z'),
  idempotency_key: 'order-42',
  max_tokens: 800,
  temperature: 0.2,
  metadata: { ticket: 'OPS-42', tags: ['a'] },
  priority: 9,
  tenant: 'acme',
  concurrency_key: 'acme-llm',
  concurrency_limit: 4,
  fallback: false,
  traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
  enqueued_at: '2030-01-01T00:00:00Z',
  min_tier: 'standard',
};

test('a fully populated envelope the client writes fits schema/envelope.schema.json', () => {
  assert.deepEqual(sorted(Object.keys(FULL)), sorted(TASK_FIELDS), 'the test task sets every field');
  const { id, json } = buildEnvelope(FULL);
  assert.equal(id, FULL.id);
  const envelope = JSON.parse(json);
  assert.equal(envelope.v, 1);
  assert.equal(envelope.run_at, '2030-01-02T03:04:05.000Z');
  const validate = ajv().getSchema('urn:llmq:schema:envelope:1');
  assert.ok(validate(envelope), JSON.stringify(validate.errors));
  // And the schema does judge: an envelope it refuses is refused.
  assert.equal(validate({ ...envelope, priority: 10 }), false);
});

test('a minimal envelope gets a fresh canonical id and enqueued_at', () => {
  const { id, json } = buildEnvelope({ prompt: 'hi', metadata: null, model: undefined });
  const envelope = JSON.parse(json);
  assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.deepEqual(Object.keys(envelope), ['v', 'id', 'prompt', 'enqueued_at']);
  assert.ok(ajv().getSchema('urn:llmq:schema:envelope:1')(envelope));
});

test('a fully populated chain the client writes fits schema/chain.schema.json', () => {
  const chain = {
    chain_id: 'release-42',
    on_failure: 'fail_chain',
    vars: { input: 'the billing service' },
    max_parallel: 2,
    priority: 3,
    tenant: 'acme',
    defaults: Object.fromEntries(
      STEP_DEFAULT_FIELDS.map((f) => [f, { ...FULL, type: 'planning', timeout: '5m', tool_choice: 'auto' }[f]]),
    ),
    steps: [
      { name: 'plan', prompt: 'Plan: {{input}}', escalate: true },
      { name: 'review', kind: 'review', after: ['plan'], reviews: 'plan', distinct: 'model', on_reject: { rerun: 'plan', max_rounds: 2 } },
      { name: 'check', kind: 'check', after: ['plan'], command: 'lint' },
      { name: 'pick', kind: 'judge', after: ['review', 'check'], min_success: 1 },
      { name: 'ok', kind: 'approval', after: ['pick'], on_timeout: 'approve', timeout: 3600 },
    ],
  };
  assert.deepEqual(sorted(Object.keys(chain)), sorted(CHAIN_FIELDS));
  const { chainId, json } = buildChain(chain);
  assert.equal(chainId, 'release-42');
  const a = new Ajv2020({ strict: false, allErrors: true });
  addFormats(a);
  a.addSchema(envelopeSchema);
  const validate = a.compile(chainSchema);
  const spec = JSON.parse(json);
  assert.ok(validate(spec), JSON.stringify(validate.errors));
  assert.equal(validate({ ...spec, steps: [] }), false);
});

test('bad task fields are refused with a sentence naming the field and the fix', () => {
  const cases = [
    [{ prompt: 'x', priority: 12 }, /`priority` is wrong: 12 is out of range; use 0 \(the default, most urgent\) to 9/],
    [{ prompt: 'x', priority: 1.5 }, /`priority` is wrong: must be a whole number/],
    [{ prompt: 'x', priority: '1' }, /`priority` is wrong/],
    [{ prompt: 'x', tenant: 'ac\nme' }, /`tenant` is wrong: contains a control character/],
    [{ prompt: 'x', tenant: 'ac\u0085me' }, /`tenant` is wrong: contains a control character/],
    [{ prompt: 'x', tenant: '' }, /`tenant` is wrong: is empty/],
    [{ prompt: 'x', tenant: 'é'.repeat(65) }, /`tenant` is wrong: is 130 bytes long; use at most 128/],
    [{ prompt: '' }, /has no prompt; set `prompt`/],
    [{ prompt: '   \n' }, /has no prompt/],
    [{}, /has no prompt/],
    [{ prompt: 'x', type: 'poetry' }, /Unknown task type "poetry"; use one of: code_generation/],
    [{ prompt: 'x', timeout: 0 }, /`timeout` is wrong: 0 is out of range/],
    [{ prompt: 'x', timeout: 3.5 }, /`timeout` is wrong: must be a whole number/],
    [{ prompt: 'x', max_attempts: 0 }, /`max_attempts` is wrong/],
    [{ prompt: 'x', max_tokens: -1 }, /`max_tokens` is wrong/],
    [{ prompt: 'x', temperature: Number.NaN }, /`temperature` is wrong/],
    [{ prompt: 'x', risk: 'extreme' }, /`risk` is wrong: "extreme" is not one of low, medium, high/],
    [{ prompt: 'x', id: '0B6F4C2E-8A57-4A43-9C3E-2F5D8E7A1B90' }, /`id` is wrong: .* not a UUID in canonical form/],
    [{ prompt: 'x', deadline: '1h' }, /`deadline` is wrong: 1h is shorter than the 24h/],
    [{ prompt: 'x', deadline: '31d' }, /longer than 30 days/],
    [{ prompt: 'x', deadline: 'soon' }, /`deadline` is wrong: "soon" is not a duration/],
    [{ prompt: 'x', deadline: '24h', stream: true }, /`deadline` is wrong: cannot be used with stream/],
    [{ prompt: 'x', stream: true, tools: [{ name: 't' }] }, /`stream` is wrong: cannot be used with tools/],
    [{ prompt: 'x', concurrency_key: 'k' }, /`concurrency_key` is wrong: needs a concurrency_limit/],
    [{ prompt: 'x', concurrency_limit: 2 }, /`concurrency_limit` is wrong: needs a concurrency_key/],
    [{ prompt: 'x', concurrency_key: ' ', concurrency_limit: 2 }, /non-empty string/],
    [{ prompt: 'x\u0000y' }, /`prompt` is wrong: contains a NUL character/],
    [{ prompt: 'x', model: 'a\u0000' }, /`model` is wrong: contains a NUL/],
    [{ prompt: 'x\ud800' }, /lone UTF-16 surrogate/],
    [{ prompt: 'x', metadata: { note: 'y\udc00' } }, /`metadata.note` is wrong: holds a lone UTF-16 surrogate/],
    [{ prompt: 'x', run_at: 'tomorrow' }, /`run_at` is wrong: "tomorrow" is not an RFC 3339 time/],
    [{ prompt: 'x', modle: 'mock-fast' }, /`modle` is not a task field; use one of id, prompt/],
    [{ prompt: 'x', attempts: 2 }, /sets `attempts`, which llmq sets itself/],
    [{ prompt: 'x', step: 'plan' }, /sets `step`, which llmq sets itself/],
    [{ prompt: 'x', v: 2 }, /sets `v`; leave it out/],
    [{ prompt: 'x', tool_choice: 'required' }, /`tool_choice` is wrong: asks for a tool call, but the task defines no tools/],
    [{ prompt: 'x', tools: [{ name: 't' }], tool_choice: { name: 'u' } }, /`tool_choice` is wrong: names "u"/],
    [{ prompt: 'x', tools: [{ name: '1t' }] }, /`tools\[0\].name` is wrong: "1t" is not a name providers accept/],
    [{ prompt: 'x', tools: [{ name: 't', parameters: { type: 'string' } }] }, /`tools\[0\].parameters` is wrong/],
    [{ prompt: 'x', tools: [{ name: 't' }, { name: 't' }] }, /is defined twice/],
    [{ prompt: 'x', response_format: { type: 'xml' } }, /`response_format.type` is wrong/],
    [{ prompt: 'x', response_format: { type: 'json_schema', schema: [] } }, /`response_format.schema` is wrong/],
    [{ prompt: 'x', response_format: { type: 'json_object', schema: {} } }, /`response_format.schema` is wrong: is not a field here/],
    [{ messages: [{ role: 'system', content: 'be brief' }] }, /`messages` is wrong: has only system turns/],
    [{ prompt: 'x', messages: [{ role: 'robot', content: 'hi' }] }, /`messages\[0\].role` is wrong/],
    [{ prompt: 'x', messages: [{ role: 'user', content: ' ' }] }, /`messages\[0\].content` is wrong: is empty/],
    [{ prompt: 'x', messages: [{ role: 'user', content: 'hi', tool_call_id: 'c' }] }, /belongs only to a tool turn/],
    [{ prompt: 'x', messages: [{ role: 'tool', content: 'r', tool_call_id: 'c' }] }, /names no unanswered call/],
    [
      { prompt: 'x', messages: [{ role: 'assistant', content: '', tool_calls: [{ id: 'c', name: 'f' }] }] },
      /`messages` is wrong: ends with the call\(s\) c unanswered/,
    ],
    [{ prompt: 'x', messages: [{ role: 'user', contents: 'hi' }] }, /`messages\[0\].contents` is wrong: is not a field here/],
    [
      { prompt: 'x', messages: [{ role: 'assistant', content: [{ type: 'image', url: 'https://x/y.png' }] }] },
      /only a user turn may carry images/,
    ],
    [{ prompt: 'x'.repeat(1024 * 1024) }, /bytes, over the 1048576-byte limit/],
  ];
  for (const [task, says] of cases) refuses(() => buildEnvelope(task), 'invalid', says);
  refuses(() => buildEnvelope('hi'), 'invalid', /A task must be an object/);
  refuses(() => buildEnvelope({ prompt: 'x'.repeat(100) }, 50), 'invalid', /over the 50-byte limit/);
});

test('what a worker accepts the client accepts too', () => {
  for (const task of [
    { prompt: 'x', priority: 0, tenant: 'é'.repeat(64) },
    { prompt: 'x', deadline: '1day 12h' },
    { prompt: 'x', deadline: '30d' },
    { messages: [{ role: 'user', content: 'hi' }] },
    { prompt: 'x', messages: [{ role: 'user', content: [{ type: 'image', data: 'aGk=', media_type: 'image/png' }] }] },
    { prompt: 'x', run_at: '2030-01-02T03:04:05.5+02:00', enqueued_at: new Date() },
    { prompt: 'x', tools: [{ name: '_t-1' }], tool_choice: 'required' },
    { prompt: 'x', type: null, model: null },
  ]) {
    buildEnvelope(task);
  }
});

test('chains the client can tell are wrong are refused with a sentence', () => {
  const cases = [
    [{ steps: [] }, /The chain is invalid: the chain has no steps/],
    [{ steps: [{ name: 'a b', prompt: 'x' }] }, /step name "a b" must be letters, digits/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'a', prompt: 'y' }] }, /two steps are named `a`/],
    [{ steps: [{ name: 'a', prompt: 'x', after: ['b'] }] }, /step `a` is after "b", which is not a step/],
    [{ steps: [{ name: 'a', prompt: 'x', after: ['a'] }] }, /step `a` is after itself/],
    [{ steps: [{ name: 'a' }] }, /step `a`: the step has no prompt/],
    [{ steps: [{ name: 'a', prompt: 'x', kind: 'poll' }] }, /unknown kind `poll`/],
    [{ steps: [{ name: 'a', prompt: 'x', modle: 'm' }] }, /step `a` has a field `modle` that chains do not have/],
    [{ steps: [{ name: 'a', prompt: 'x' }], vars: { v: '{{a.output}}' } }, /variable `v` contains a `\{\{...\}\}` reference/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: 'a\tb' }, /`chain_id` must be at most 512 characters, none of them control/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: ' ' }, /`chain_id` is empty/],
    [{ steps: [{ name: 'a', prompt: 'x' }], max_parallel: 0 }, /`max_parallel` must be a whole number of at least 1/],
    [{ steps: [{ name: 'a', prompt: 'x' }], tenant: 'a\u0007' }, /The chain's field `tenant` is wrong: contains a control character/],
    [{ steps: [{ name: 'a', prompt: 'x' }], priority: -1 }, /The chain's field `priority` is wrong/],
    [{ steps: [{ name: 'a', prompt: 'x' }], v: 1 }, /the spec has a field `v` that chains do not have/],
  ];
  for (const [chain, says] of cases) refuses(() => buildChain(chain), 'invalid', says);
});

test('Redis URLs are read as the llmq binaries read them', () => {
  assert.deepEqual(parseRedisUrl('redis://:p%40ss@10.0.0.1:6380/2'), { kind: 'single', url: 'redis://:p%40ss@10.0.0.1:6380/2' });
  assert.equal(parseRedisUrl('rediss://h').kind, 'single');
  assert.deepEqual(parseRedisUrl('redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001'), {
    kind: 'cluster',
    seeds: [
      { host: '10.0.0.1', port: 7000 },
      { host: '10.0.0.2', port: 7001 },
    ],
    tls: false,
    username: 'u',
    password: 'p',
  });
  assert.deepEqual(parseRedisUrl('rediss+cluster://h:1/0?x=y'), { kind: 'cluster', seeds: [{ host: 'h', port: 1 }], tls: true });
  assert.deepEqual(parseRedisUrl('redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/2'), {
    kind: 'sentinel',
    sentinels: [
      { host: '10.0.0.1', port: 26379 },
      { host: '10.0.0.2', port: 26379 },
    ],
    master: 'mymaster',
    db: 2,
    tls: false,
    password: 'pw',
  });
  assert.deepEqual(parseRedisUrl('rediss+sentinel://[::1]:26379/m'), {
    kind: 'sentinel',
    sentinels: [{ host: '::1', port: 26379 }],
    master: 'm',
    db: 0,
    tls: true,
  });
  refuses(() => parseRedisUrl('http://127.0.0.1:6379'), 'url', /llmq reads only these forms: redis:\/\/host:port/);
  refuses(() => parseRedisUrl(''), 'url', /The Redis URL is empty; give one such as redis:\/\/127.0.0.1:6379/);
  refuses(() => parseRedisUrl('redis+cluster://'), 'url', /a cluster URL needs at least one seed node/);
  refuses(() => parseRedisUrl('redis+cluster://h:notaport'), 'url', /`h:notaport` is not host:port/);
  refuses(() => parseRedisUrl('redis+sentinel://h:1'), 'url', /needs the sentinels and the master's name/);
  refuses(() => parseRedisUrl('redis+sentinel:///m'), 'url', /needs the sentinels and the master's name/);
  refuses(() => parseRedisUrl('redis+sentinel://h:1/m/x'), 'url', /`x` is not a database number/);
  refuses(() => parseRedisUrl('redis://h:1/x'), 'url', /`x` is not a database number/);
  // The password is not shown.
  refuses(() => parseRedisUrl('redis://:secret@h:1/x'), 'url', /`redis:\/\/\*\*\*@h:1\/x`/);
});

test('queue names that could escape their hash tag are refused before anything is sent', async () => {
  for (const bad of ['', ' ', 'a}b', '{a}', 'a\nb', 'x'.repeat(201), 42]) {
    refuses(() => checkQueueName(bad), 'invalid', /cannot be used: use 1 to 200 bytes without braces or control characters/);
  }
  checkQueueName('billing.eu-1_a');
  await assert.rejects(connect({ url: 'redis://127.0.0.1:1', queue: 'a}b' }), (e) => e.code === 'invalid');
  await assert.rejects(connect({ url: 'redis://127.0.0.1:1', maxPayloadBytes: 0 }), (e) => e.code === 'invalid');
  await assert.rejects(connect({ url: 'http://x' }), (e) => e.code === 'url');
});

test('derived ids are those llmq derives (UUIDv5 in the OID namespace)', () => {
  // uuid.uuid5(uuid.NAMESPACE_OID, "llmq:default:1-0") in Python.
  assert.equal(deriveId('default', '1-0'), '62d3662e-7f1c-5c93-91ef-78aa8e0f9f43');
  assert.equal(deriveId('q', '1700000000000-0'), 'eb874ad9-fbaa-5c8b-8436-d8a507a2b4ac');
});

test('durations are read as llmq reads them', () => {
  assert.equal(parseDuration('24h'), 86400);
  assert.equal(parseDuration('1day 12h'), 129600);
  assert.equal(parseDuration('3d'), 259200);
  assert.equal(parseDuration('2weeks'), 1209600);
  assert.equal(parseDuration('1.5h'), null);
  assert.equal(parseDuration('12'), null);
  assert.equal(parseDuration(''), null);
});

test('a replayed envelope has its counters reset, one more replay and an id, as llmq dlq replay writes it', () => {
  const dead = JSON.stringify({
    v: 1,
    prompt: 'hi',
    model: 'mock-fast',
    system: null,
    attempts: 3,
    snoozes: 2,
    replays: 1,
    last_error: 'boom',
    waiting_since: '2030-01-01T00:00:00Z',
    custom: { kept: true },
    metadata: null,
  });
  const taskId = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  assert.deepEqual(JSON.parse(replayedTask(dead, taskId)), {
    v: 1,
    id: taskId,
    prompt: 'hi',
    model: 'mock-fast',
    replays: 2,
    custom: { kept: true },
  });
  assert.equal(JSON.parse(replayedTask(dead, taskId, 'other')).provider, 'other');
  // An id in another spelling is written canonical; a payload that is not an envelope, as it came.
  assert.equal(JSON.parse(replayedTask('{"v":1,"prompt":"x","id":"0B6F4C2E8A574A439C3E2F5D8E7A1B90"}', 'x')).id, taskId);
  for (const raw of ['not json', '[1]', '{"prompt":"x"}', '{"v":1,"id":"nope","prompt":"x"}', '{"v":1,"prompt":"x","attempts":null}']) {
    assert.equal(replayedTask(raw, taskId), raw);
  }
});
