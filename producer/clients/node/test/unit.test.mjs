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
  chainKeyId,
  CHAINS_KEPT,
  checkQueueName,
  connect,
  DEAD_SCAN,
  deriveId,
  LlmqError,
  parseDuration,
  parseRedisUrl,
  Queue,
  replayedTask,
  RESERVED_FIELDS,
  STEP_DEFAULT_FIELDS,
  STEP_FIELDS,
  TASK_FIELDS,
} from '../dist/index.js';
import { chainEntriesOf } from '../dist/client.js';
import { canonicalUuid } from '../dist/uuid.js';
import { chainStepOf, taskIdOf } from '../dist/replay.js';

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

/** Rejects with an LlmqError of `code` whose message is one sentence matching `says`. */
async function rejects(p, code, says) {
  await assert.rejects(p, (e) => {
    assert.ok(e instanceof LlmqError, `expected an LlmqError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, /^[A-Z`"].*[.]$/s, `not a sentence: ${e.message}`);
    assert.match(e.message, says);
    return true;
  });
}

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
  idempotency_window: '1h',
  batch_id: 'batch-2030-01-02:acme',
  max_tokens: 800,
  temperature: 0.2,
  metadata: { ticket: 'OPS-42', tags: ['a'] },
  priority: 9,
  tenant: 'acme',
  tags: { team: 'search', feature: 'billing' },
  concurrency_key: 'acme-llm',
  concurrency_limit: 4,
  fallback: false,
  traceparent: '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',
  enqueued_at: '2030-01-01T00:00:00Z',
  min_tier: 'standard',
  prompt_cache: false,
  cache: { ttl: '1h', sampled: true },
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
    idempotency_key: 'release-42-key',
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
    [{ prompt: '' }, /has no prompt; set "prompt" to a non-empty string, or give "messages"/],
    [{ prompt: '   \n' }, /has no prompt/],
    [{}, /has no prompt/],
    [{ prompt: 'x', type: 'poetry' }, /Unknown task type `poetry`; use one of: code_generation/],
    [{ prompt: 'x', timeout: 0 }, /`timeout` is wrong: must be between 1 second and 2592000 seconds \(30 days\), not 0/],
    [{ prompt: 'x', timeout: 3.5 }, /`timeout` is wrong: must be a whole number/],
    [{ prompt: 'x', max_attempts: 0 }, /`max_attempts` is wrong/],
    [{ prompt: 'x', max_tokens: -1 }, /`max_tokens` is wrong/],
    [{ prompt: 'x', temperature: Number.NaN }, /`temperature` is wrong/],
    [{ prompt: 'x', risk: 'extreme' }, /`risk` is wrong: "extreme" is not one of low, medium, high/],
    [{ prompt: 'x', id: '0B6F4C2E-8A57-4A43-9C3E-2F5D8E7A1B90' }, /`id` is wrong: .* not a UUID in canonical form/],
    [{ prompt: 'x', deadline: '1h' }, /`deadline` is wrong: 1h is shorter than the 24h/],
    [{ prompt: 'x', deadline: '31d' }, /longer than 30 days/],
    [{ prompt: 'x', deadline: 'soon' }, /`deadline` is wrong: `soon` is not a duration \(expected number at 0\)/],
    [{ prompt: 'x', deadline: '1 d 2' }, /`deadline` is wrong: `1 d 2` is not a duration \(time unit needed, for example 2sec or 2ms\)/],
    [{ prompt: 'x', deadline: '2592000.000000001s' }, /longer than 30 days/],
    [{ prompt: 'x', temperature: 3.5e38 }, /`temperature` is wrong: 3.5e\+38 is too large for the worker's 32-bit float/],
    [{ prompt: 'x', prompt_cache: 'no' }, /`prompt_cache` is wrong: must be true or false, not "no"/],
    [{ prompt: 'x', run_at: '2030-02-30T00:00:00Z' }, /`run_at` is wrong: "2030-02-30T00:00:00Z" is not a time that exists/],
    [{ prompt: 'x', run_at: '2100-02-29T00:00:00Z' }, /`run_at` is wrong: .* is not a time that exists/],
    [{ prompt: 'x', run_at: '2030-01-02T24:00:00Z' }, /`run_at` is wrong: .* is not a time that exists/],
    [{ prompt: 'x', run_at: '2030-01-02T03:04:05+24:00' }, /`run_at` is wrong: .* is not a time that exists/],
    [{ prompt: 'x', enqueued_at: '2030-01-02 03:04:05Z' }, /`enqueued_at` is wrong: .* is not an RFC 3339 time/],
    [{ prompt: 'x', run_at: new Date(8.64e15) }, /`run_at` is wrong: is an invalid Date, or one beyond the years a worker reads/],
    [{ prompt: 'x', deadline: '24h', stream: true }, /`deadline` is wrong: cannot be used with stream/],
    [{ prompt: 'x', stream: true, tools: [{ name: 't' }] }, /`stream` is wrong: cannot be used with tools/],
    [{ prompt: 'x', concurrency_key: 'k' }, /`concurrency_key` is wrong: needs a concurrency_limit/],
    [{ prompt: 'x', concurrency_limit: 2 }, /`concurrency_limit` is wrong: needs a concurrency_key/],
    [{ prompt: 'x', concurrency_key: ' ', concurrency_limit: 2 }, /non-empty string/],
    [{ prompt: 'x\u0000y' }, /`prompt` is wrong: contains a NUL character/],
    [{ prompt: 'x', model: 'a\u0000' }, /`model` is wrong: contains a NUL/],
    [{ prompt: 'x\ud800' }, /lone UTF-16 surrogate/],
    [{ prompt: 'x', metadata: { note: 'y\udc00' } }, /`metadata.note` is wrong: holds a lone UTF-16 surrogate/],
    [{ prompt: 'x', tools: [{ name: 't', parameters: { type: 'object', description: '\ud800' } }] }, /`tools\[0\].parameters.description` is wrong: holds a lone UTF-16 surrogate/],
    [{ prompt: 'x', run_at: 'tomorrow' }, /`run_at` is wrong: "tomorrow" is not an RFC 3339 time/],
    [{ prompt: 'x', modle: 'mock-fast' }, /`modle` is not a task field; use one of id, prompt/],
    [{ prompt: 'x', attempts: 2 }, /sets `attempts`, which llmq sets itself/],
    [{ prompt: 'x', step: 'plan' }, /sets `step`, which llmq sets itself/],
    [{ prompt: 'x', v: 2 }, /sets `v`; leave it out/],
    [{ prompt: 'x', tool_choice: 'required' }, /`tool_choice` is wrong: asks for a tool call, but the task defines no tools/],
    [{ prompt: 'x', tools: [{ name: 't' }], tool_choice: { name: 'u' } }, /`tool_choice` is wrong: names `u`/],
    [{ prompt: 'x', tools: [{ name: '1t' }] }, /`tools\[0\].name` is wrong: `1t` is not a name providers accept/],
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
    [{ prompt: 'x', tags: ['team'] }, /`tags` is wrong: must be an object/],
    [{ prompt: 'x', tags: Object.fromEntries([...Array(9).keys()].map((i) => [`t${i}`, 'v'])) }, /at most 8/],
    [{ prompt: 'x', tags: { 'team name': 'x' } }, /`tags` is wrong: has a tag named/],
    [{ prompt: 'x', tags: { team: '' } }, /`tags.team` is wrong: is empty/],
    [{ prompt: 'x', tags: { team: 7 } }, /`tags.team` is wrong: must be a string/],
    [{ prompt: 'x', tags: { team: 'a\nb' } }, /`tags.team` is wrong: contains a control character/],
    [{ prompt: 'x', tags: { team: 'x'.repeat(129) } }, /`tags.team` is wrong: is 129 bytes long/],
  ];
  for (const [task, says] of cases) refuses(() => buildEnvelope(task), 'invalid', says);
  refuses(() => buildEnvelope('hi'), 'invalid', /A task must be an object/);
  refuses(() => buildEnvelope({ prompt: 'x'.repeat(100) }, 50), 'invalid', /over the 50-byte limit/);
});

const SAMPLED =
  'The task\'s field `cache` is wrong: would give every identical request one sampled answer (temperature is unset or above 0); set "temperature": 0, or "sampled": true in cache to keep one sample.';

test('a cache the worker refuses is refused in its words (CacheAsk::check), in its order', () => {
  /** The whole sentence, as a pattern. */
  const exactly = (text) => new RegExp('^' + text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '$');
  const field = (name, message) => exactly(`The task's field \`${name}\` is wrong: ${message}.`);
  const cases = [
    [{ cache: true }, field('cache', 'true needs a time to keep the answer; write {"ttl": "24h"}')],
    [{ cache: true, stream: true, temperature: 0.7 }, /`cache` is wrong: true needs a time to keep the answer/],
    [{ cache: { ttl: 'soon' }, temperature: 0 }, field('cache.ttl', '`soon` is not a duration (expected number at 0); write it as e.g. "10m" or "24h"')],
    [{ cache: { ttl: '1 d 2' } }, field('cache.ttl', '`1 d 2` is not a duration (time unit needed, for example 2sec or 2ms); write it as e.g. "10m" or "24h"')],
    [{ cache: { ttl: `${'1'.repeat(50)}x` } }, new RegExp(`\`cache.ttl\` is wrong: \`${'1'.repeat(40)}…\` is not a duration \\(`)],
    [{ cache: { ttl: '0.5s' }, temperature: 0 }, field('cache.ttl', '0.5s is not between 1s and 30d; give e.g. "24h"')],
    [{ cache: { ttl: '0' }, temperature: 0 }, field('cache.ttl', '0 is not between 1s and 30d; give e.g. "24h"')],
    [{ cache: { ttl: '31d' }, temperature: 0 }, field('cache.ttl', '31d is not between 1s and 30d; give e.g. "24h"')],
    [{ cache: { ttl: '2592000.000000001s' } }, field('cache.ttl', '2592000.000000001s is not between 1s and 30d; give e.g. "24h"')],
    [{ cache: { ttl: '24h' }, temperature: 0, stream: true }, field('cache', 'cannot be used with stream: a cached answer is not streamed; drop one of them')],
    [{ cache: { ttl: '24h' }, stream: true }, /`cache` is wrong: cannot be used with stream/],
    [{ cache: { ttl: '24h' } }, exactly(SAMPLED)],
    [{ cache: { ttl: '24h' }, temperature: 0.7 }, exactly(SAMPLED)],
    [{ cache: { ttl: '24h' }, temperature: 1e-45 }, exactly(SAMPLED)],
    [{ cache: { ttl: '24h', sampled: false }, temperature: 1 }, exactly(SAMPLED)],
    // Envelope::check's order: stream with tools, and deadline, come before cache.
    [{ cache: true, stream: true, tools: [{ name: 't' }] }, /`stream` is wrong: cannot be used with tools/],
    [{ cache: true, deadline: '2h' }, /`deadline` is wrong: 2h is shorter than the 24h/],
    // Its shape, which the worker's deserializer refuses before any check.
    [{ cache: { ttl: '24h', keep: '1h' }, temperature: 0 }, /`cache.keep` is wrong: is not a field here; use only ttl, sampled/],
    [{ cache: {} }, /`cache.ttl` is wrong: is missing/],
    [{ cache: { ttl: null } }, /`cache.ttl` is wrong: must be a duration as text, such as "24h", not null/],
    [{ cache: { ttl: 86400 } }, /`cache.ttl` is wrong: must be a duration as text/],
    [{ cache: { ttl: '24h', sampled: null }, temperature: 0 }, /`cache.sampled` is wrong: must be true or false, not null/],
    [{ cache: { ttl: '24h', sampled: 'yes' }, temperature: 0 }, /`cache.sampled` is wrong: must be true or false/],
    [{ cache: '24h' }, /`cache` is wrong: must be false or \{"ttl": "24h"\}/],
    [{ cache: 0 }, /`cache` is wrong: must be false or/],
    [{ cache: [] }, /`cache` is wrong: must be false or/],
    [{ cache: { ttl: '24h\ud800' } }, /`cache.ttl` is wrong: holds a lone UTF-16 surrogate/],
  ];
  for (const [task, says] of cases) refuses(() => buildEnvelope({ prompt: 'x', ...task }), 'invalid', says);
});

test('an idempotency key and window the worker refuses are refused in its words (check_idempotency), in its order', () => {
  /** The whole sentence, as a pattern. */
  const exactly = (text) => new RegExp('^' + text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '$');
  const field = (name, message) => exactly(`The task's field \`${name}\` is wrong: ${message}.`);
  const empty = field('idempotency_key', 'is empty; give each task that must run once a key of its own, or leave it out');
  const keyless = field('idempotency_window', 'needs idempotency_key: it is how long a key is remembered; add the key or drop the window');
  const cases = [
    [{ idempotency_key: '' }, empty],
    [{ idempotency_key: '', idempotency_window: 'soon' }, empty],
    [{ idempotency_window: '1h' }, keyless],
    [{ idempotency_window: 'soon' }, keyless],
    [{ idempotency_key: null, idempotency_window: '1h' }, keyless],
    [{ idempotency_key: undefined, idempotency_window: '1h' }, keyless],
    [{ idempotency_key: 'k', idempotency_window: 'soon' }, field('idempotency_window', '`soon` is not a duration (expected number at 0); write it as e.g. "10m" or "24h"')],
    [{ idempotency_key: 'k', idempotency_window: '1 d 2' }, field('idempotency_window', '`1 d 2` is not a duration (time unit needed, for example 2sec or 2ms); write it as e.g. "10m" or "24h"')],
    [{ idempotency_key: 'k', idempotency_window: `${'1'.repeat(50)}x` }, new RegExp(`\`idempotency_window\` is wrong: \`${'1'.repeat(40)}…\` is not a duration \\(`)],
    [{ idempotency_key: 'k', idempotency_window: '0.5s' }, field('idempotency_window', '0.5s is not between 1s and 30d; give e.g. "24h"')],
    [{ idempotency_key: 'k', idempotency_window: '0' }, field('idempotency_window', '0 is not between 1s and 30d; give e.g. "24h"')],
    [{ idempotency_key: 'k', idempotency_window: '31d' }, field('idempotency_window', '31d is not between 1s and 30d; give e.g. "24h"')],
    [{ idempotency_key: 'k', idempotency_window: ' 31d ' }, field('idempotency_window', '31d is not between 1s and 30d; give e.g. "24h"')],
    [{ idempotency_key: 'k', idempotency_window: '2592000.000000001s' }, field('idempotency_window', '2592000.000000001s is not between 1s and 30d; give e.g. "24h"')],
    [{ idempotency_key: 'k', idempotency_window: '1h\u0000' }, /`idempotency_window` is wrong: `1h\u0000` is not a duration/],
    // Envelope::check's order: deadline and cache before it, the key's NUL after it.
    [{ idempotency_key: '', deadline: '2h' }, /`deadline` is wrong: 2h is shorter than the 24h/],
    [{ idempotency_window: '1h', cache: true }, /`cache` is wrong: true needs a time to keep the answer/],
    [{ idempotency_key: 'a\u0000b', idempotency_window: 'soon' }, /`idempotency_window` is wrong: `soon` is not a duration/],
    [{ idempotency_key: 'a\u0000b' }, field('idempotency_key', 'contains a NUL character (\\u0000), which cannot be stored or passed on; remove it')],
    // Its type, which the worker's deserializer refuses before any check.
    [{ idempotency_key: 'k', idempotency_window: 3600 }, field('idempotency_window', 'must be a string, not 3600')],
    [{ idempotency_key: 42 }, field('idempotency_key', 'must be a string, not 42')],
    [{ idempotency_key: 'k\ud800' }, /`idempotency_key` is wrong: holds a lone UTF-16 surrogate/],
    [{ idempotency_key: 'k', idempotency_window: '1h\udc00' }, /`idempotency_window` is wrong: holds a lone UTF-16 surrogate/],
  ];
  for (const [task, says] of cases) refuses(() => buildEnvelope({ prompt: 'x', ...task }), 'invalid', says);
});

test('a keyed task is written with its key and window, as the worker writes them', () => {
  const id = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const written = (task) => buildEnvelope({ id, prompt: 'x', enqueued_at: '2030-01-02T03:04:05Z', ...task }).json;
  const head = `{"v":1,"id":"${id}","prompt":"x"`;
  const tail = ',"enqueued_at":"2030-01-02T03:04:05Z"}';
  assert.equal(written({ idempotency_key: 'order-42' }), `${head},"idempotency_key":"order-42"${tail}`);
  assert.equal(
    written({ idempotency_window: '1h', idempotency_key: 'order-42' }),
    `${head},"idempotency_key":"order-42","idempotency_window":"1h"${tail}`,
  );
  assert.equal(written({ idempotency_key: 'k', idempotency_window: null }), `${head},"idempotency_key":"k"${tail}`);
  assert.ok(ajv().getSchema('urn:llmq:schema:envelope:1')(JSON.parse(written({ idempotency_key: 'k', idempotency_window: '7d' }))));
  // Taken as the worker takes them: the ends of the range, any humantime spelling; a key of
  // spaces is a key (only an empty one is refused).
  for (const w of ['1s', '1000ms', '30d', '720h', '2592000s', '1h 30m', '1.5d', ' 2h']) written({ idempotency_key: 'k', idempotency_window: w });
  written({ idempotency_key: ' ' });
  // A dead letter is replayed with both, where Envelope declares them; a window that is not
  // text is refused by serde, and the letter goes back as it came.
  const H = id;
  assert.equal(
    replayedTask('{"v":1,"prompt":"x","idempotency_window":"1h","tenant":"acme","idempotency_key":"k","attempts":2}', H),
    `{"v":1,"id":"${H}","prompt":"x","idempotency_key":"k","idempotency_window":"1h","tenant":"acme","replays":1}`,
  );
  assert.equal(replayedTask('{"v":1,"prompt":"x","idempotency_key":"k","idempotency_window":null}', H), `{"v":1,"id":"${H}","prompt":"x","idempotency_key":"k","replays":1}`);
  const odd = '{"v":1,"prompt":"x","idempotency_key":"k","idempotency_window":3600}';
  assert.equal(replayedTask(odd, H), odd);
});

test('a batch id is written as given, and one the worker refuses is refused in its words (check_batch_id), in its order', () => {
  const id = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const written = (task) => buildEnvelope({ id, prompt: 'x', enqueued_at: '2030-01-02T03:04:05Z', ...task }).json;
  const head = `{"v":1,"id":"${id}","prompt":"x"`;
  const tail = ',"enqueued_at":"2030-01-02T03:04:05Z"}';
  // Where Envelope declares it: after idempotency_window, before max_tokens and priority.
  assert.equal(written({ batch_id: 'batch_2030-01-02.a:1' }), `${head},"batch_id":"batch_2030-01-02.a:1"${tail}`);
  assert.equal(
    written({ priority: 1, batch_id: 'b', idempotency_key: 'k' }),
    `${head},"idempotency_key":"k","batch_id":"b","priority":1${tail}`,
  );
  assert.equal(written({ batch_id: null }), `${head}${tail}`);
  assert.equal(written({ batch_id: undefined }), `${head}${tail}`);
  // Taken as the worker takes them: one character, 128, each character it allows.
  for (const b of ['b', 'x'.repeat(128), 'AZaz09-_.:', '-', ':', '.']) {
    assert.equal(JSON.parse(written({ batch_id: b })).batch_id, b);
    assert.ok(ajv().getSchema('urn:llmq:schema:envelope:1')(JSON.parse(written({ batch_id: b }))));
  }

  /** The whole sentence, as a pattern. */
  const exactly = (text) => new RegExp('^' + text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '$');
  const rule = exactly("The task's field `batch_id` is wrong: must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`.");
  const cases = [
    [{ batch_id: '' }, rule],
    [{ batch_id: 'x'.repeat(129) }, rule],
    [{ batch_id: 'a b' }, rule],
    [{ batch_id: 'a/b' }, rule],
    [{ batch_id: ' ' }, rule],
    [{ batch_id: 'b\n' }, rule],
    [{ batch_id: 'b\u0000' }, rule],
    [{ batch_id: 'caf\u00e9' }, rule], // a letter, but not ASCII
    [{ batch_id: '\uff11' }, rule], // a digit, but not ASCII
    [{ batch_id: 'a+b' }, rule],
    // Envelope::check's order: the idempotency checks before it.
    [{ batch_id: '', idempotency_key: '' }, /`idempotency_key` is wrong: is empty/],
    // Its type, which the worker's deserializer refuses before any check.
    [{ batch_id: 42 }, exactly("The task's field `batch_id` is wrong: must be a string, not 42.")],
    [{ batch_id: 'b\ud800' }, /`batch_id` is wrong: holds a lone UTF-16 surrogate/],
  ];
  for (const [task, says] of cases) refuses(() => buildEnvelope({ prompt: 'x', ...task }), 'invalid', says);
  // The schema refuses what the client refuses.
  const validate = ajv().getSchema('urn:llmq:schema:envelope:1');
  for (const b of ['', 'x'.repeat(129), 'a b', 'a/b']) assert.equal(validate({ v: 1, prompt: 'x', batch_id: b }), false, b);

  // A dead letter is replayed with it, where Envelope declares it; replays do not check, but
  // a batch id that is not text is refused by serde, and the letter goes back as it came.
  assert.equal(
    replayedTask('{"v":1,"prompt":"x","priority":2,"batch_id":"b-1","idempotency_key":"k"}', id),
    `{"v":1,"id":"${id}","prompt":"x","idempotency_key":"k","batch_id":"b-1","priority":2,"replays":1}`,
  );
  assert.equal(replayedTask('{"v":1,"prompt":"x","batch_id":null}', id), `{"v":1,"id":"${id}","prompt":"x","replays":1}`);
  assert.equal(replayedTask('{"v":1,"prompt":"x","batch_id":"a b"}', id), `{"v":1,"id":"${id}","prompt":"x","batch_id":"a b","replays":1}`);
  const odd = '{"v":1,"prompt":"x","batch_id":7}';
  assert.equal(replayedTask(odd, id), odd);
});

// uuid.uuid5(uuid.NAMESPACE_OID, "llmq-chain-key:<queue>:<tenant's bytes>:<tenant>:<key>")
// computed with Python's uuid module: [queue, tenant, key, id].
const CHAIN_KEY_IDS = [
  ['default', undefined, 'release-42', 'a32eb052-b09c-573b-9365-9ace304218df'],
  ['default', 'acme', 'release-42', 'aeacc8ba-0ab7-5ba6-9c32-e8cabcd52d3e'],
  ['default', '\u00e9', 'release-42', 'a9e91551-ec8d-5043-9bc8-df75e6a3727e'], // 2 bytes, 1 character
  ['q', undefined, 'release-42', '00f1064a-4fd0-519f-81ef-b5210ec088d9'],
];

test('a keyed chain without a chain_id is named as a worker names it (UUIDv5 of its queue, tenant and key)', () => {
  const steps = [{ name: 'a', prompt: 'x' }];
  for (const [queue, tenant, key, id] of CHAIN_KEY_IDS) {
    assert.equal(chainKeyId(queue, tenant, key), id);
    const chain = { idempotency_key: key, ...(tenant === undefined ? {} : { tenant }), steps };
    const { chainId, json } = buildChain(chain, undefined, queue);
    assert.equal(chainId, id);
    // The worker names it from the key: no chain_id is written, the key is.
    const spec = JSON.parse(json);
    assert.equal(spec.chain_id, undefined);
    assert.equal(spec.idempotency_key, key);
    assert.equal(buildChain(chain, undefined, queue).chainId, id, 'submitted twice: one chain');
    assert.equal(buildChain({ ...chain, chain_id: null }, undefined, queue).chainId, id, 'a null chain_id is none');
  }
  // The queue connect() serves by default.
  assert.equal(buildChain({ idempotency_key: 'release-42', steps }).chainId, CHAIN_KEY_IDS[0][3]);
  // A chain_id of its own names it; without a key, a fresh one.
  const named = buildChain({ chain_id: 'c1', idempotency_key: 'k', steps }, undefined, 'q');
  assert.equal(named.chainId, 'c1');
  assert.equal(JSON.parse(named.json).chain_id, 'c1');
  const fresh = buildChain({ steps }, undefined, 'q');
  assert.match(fresh.chainId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(JSON.parse(fresh.json).chain_id, fresh.chainId);
  assert.notEqual(buildChain({ steps }, undefined, 'q').chainId, fresh.chainId);
  assert.equal(buildChain({ idempotency_key: ' ', steps }, undefined, 'q').chainId, chainKeyId('q', undefined, ' '));
  // One key names one chain per queue and tenant, and nothing else changes it.
  const ids = [
    ['q', {}],
    ['r', {}],
    ['q', { tenant: 'acme' }],
    ['q', { tenant: 'acme', priority: 3 }],
  ].map(([queue, extra]) => buildChain({ idempotency_key: 'k', steps, ...extra }, undefined, queue).chainId);
  assert.equal(new Set(ids).size, 3);
  assert.equal(ids[2], ids[3]);
});

test('a cached task is written as the worker writes cache', () => {
  const id = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const head = `{"v":1,"id":"${id}","prompt":"x"`;
  const tail = ',"enqueued_at":"2030-01-02T03:04:05Z"}';
  const written = (task) => buildEnvelope({ id, prompt: 'x', enqueued_at: '2030-01-02T03:04:05Z', ...task }).json;
  assert.equal(written({ cache: { ttl: '24h' }, temperature: 0 }), `${head},"cache":{"ttl":"24h"},"temperature":0${tail}`);
  assert.equal(written({ cache: false }), `${head},"cache":false${tail}`);
  assert.equal(written({ cache: null }), `${head}${tail}`);
  assert.equal(written({ cache: undefined }), `${head}${tail}`);
  // As serde writes CacheKeep: ttl first, sampled only when true.
  assert.equal(written({ cache: { sampled: false, ttl: '24h' }, temperature: 0 }), `${head},"cache":{"ttl":"24h"},"temperature":0${tail}`);
  assert.equal(written({ cache: { sampled: true, ttl: '1h' } }), `${head},"cache":{"ttl":"1h","sampled":true}${tail}`);
  assert.equal(written({ cache: { ttl: '1h', sampled: undefined }, temperature: 0 }), `${head},"cache":{"ttl":"1h"},"temperature":0${tail}`);
  assert.ok(ajv().getSchema('urn:llmq:schema:envelope:1')(JSON.parse(written({ cache: { ttl: '1h', sampled: true } }))));
  assert.ok(ajv().getSchema('urn:llmq:schema:envelope:1')(JSON.parse(written({ cache: false }))));
  // Taken as the worker takes them: the ends of the range, any humantime spelling, a
  // temperature that is 0 (or below) as the worker's 32-bit float holds it.
  for (const ttl of ['1s', '1000ms', '30d', '720h', '2592000s', '1h 30m', '1.5d']) written({ cache: { ttl }, temperature: 0 });
  for (const temperature of [0, -0, -0.5, 1e-46]) written({ cache: { ttl: '10m' }, temperature });
  written({ cache: { ttl: '10m', sampled: true }, temperature: 1.5 });
  written({ cache: false, stream: true });
});

test('what a worker accepts the client accepts too', () => {
  for (const task of [
    { prompt: 'x', priority: 0, tenant: 'é'.repeat(64) },
    { prompt: 'x', deadline: '1day 12h' },
    { prompt: 'x', deadline: '30d' },
    // humantime reads these too: a fraction, and spaces even inside the number (24h).
    { prompt: 'x', deadline: '1.5d' },
    { prompt: 'x', deadline: '2 4h' },
    { prompt: 'x', deadline: '2592000s' },
    { prompt: 'x', prompt_cache: false },
    { prompt: 'x', temperature: 3.4028234e38 },
    { prompt: 'x', run_at: '2028-02-29T23:59:60Z' },
    { prompt: 'x', run_at: '2030-01-02t03:04:05.123456789123z' },
    { prompt: 'x', run_at: '2030-01-02T03:04:05-23:59' },
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
    [{ steps: [{ name: 'a b', prompt: 'x' }] }, /step name `a b` must be letters, digits/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'a', prompt: 'y' }] }, /two steps are named `a`/],
    [{ steps: [{ name: 'a', prompt: 'x', after: ['b'] }] }, /step `a` is after `b`, which is not a step/],
    [{ steps: [{ name: 'a', prompt: 'x', after: ['a'] }] }, /step `a` is after itself/],
    [{ steps: [{ name: 'a' }] }, /step `a`: the step has no prompt/],
    [{ steps: [{ name: 'a', prompt: 'x', kind: 'poll' }] }, /unknown kind `poll`/],
    [{ steps: [{ name: 'a', prompt: 'x', modle: 'm' }] }, /step `a` has a field `modle` that chains do not have/],
    [{ steps: [{ name: 'a', prompt: 'x' }], vars: { v: '{{a.output}}' } }, /variable `v` contains a `\{\{...\}\}` reference/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: 'a\tb' }, /`chain_id` must be at most 512 characters, none of them control/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: ' ' }, /`chain_id` is empty/],
    [{ steps: [{ name: 'a', prompt: 'x' }], idempotency_key: '' }, /^The chain is invalid: `idempotency_key` is empty or holds a NUL character; give the chain a key of its own, or leave it out\.$/],
    [{ steps: [{ name: 'a', prompt: 'x' }], idempotency_key: 'a\u0000b' }, /^The chain is invalid: `idempotency_key` is empty or holds a NUL character/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: 'c1', idempotency_key: '' }, /`idempotency_key` is empty or holds a NUL character/],
    [{ steps: [{ name: 'a', prompt: 'x' }], idempotency_key: 42 }, /^The chain is invalid: `idempotency_key` must be a string, not 42\.$/],
    [{ steps: [{ name: 'a', prompt: 'x' }], idempotency_key: 'k\ud800' }, /`idempotency_key` holds a lone UTF-16 surrogate/],
    // Chain::parse's order: the chain id before the key (and the key's type before both).
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: ' ', idempotency_key: '' }, /`chain_id` is empty/],
    [{ steps: [{ name: 'a', prompt: 'x' }], chain_id: ' ', idempotency_key: 42 }, /`idempotency_key` must be a string/],
        [{ steps: [{ name: 'a', prompt: 'x' }], tenant: 'a\u0007' }, /^The chain is invalid: field `tenant` is wrong: contains a control character/],
    [{ steps: [{ name: 'a', prompt: 'x' }], priority: -1 }, /^The chain is invalid: field `priority` is wrong: -1 is out of range/],
    [{ steps: [{ name: 'a', prompt: 'x' }], v: 1 }, /the spec has a field `v` that chains do not have/],
    // Its shape, as llmq chain submit and a worker check it.
    [
      { steps: [{ name: 'a', prompt: 'x', after: ['b'] }, { name: 'b', prompt: 'y', after: ['a'] }] },
      /^The chain is invalid: steps a -> b -> a form a cycle; a chain must not loop\.$/,
    ],
    [
      { steps: [{ name: 'a', prompt: 'x', after: ['c'] }, { name: 'b', prompt: 'y', after: ['a'] }, { name: 'c', prompt: 'z', after: ['b'] }] },
      /steps a -> c -> b -> a form a cycle/,
    ],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'j', kind: 'judge', after: ['a'] }] }, /step `j`: a judge step needs at least two steps in `after`/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'k', kind: 'check', after: ['a'] }] }, /step `k`: a check step needs `command`/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'k', kind: 'check', command: 'lint' }] }, /step `k`: a check step runs after exactly one step/],
    [{ steps: [{ name: 'a', prompt: 'x', command: 'lint' }] }, /step `a`: `command` is only for check steps/],
    [{ steps: [{ name: 'a', kind: 'approval', on_timeout: 'shrug' }] }, /step `a`: on_timeout `shrug` is neither `reject` nor `approve`/],
    [{ steps: [{ name: 'a', kind: 'approval', escalate: true }] }, /`escalate` is only for steps that call a model/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'b', prompt: 'y' }, { name: 'r', kind: 'review', after: ['a', 'b'] }] }, /step `r`: name the step it reviews in `reviews`/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'r', kind: 'review', after: ['a'], on_reject: { rerun: 'r' } }] }, /on_reject reruns `r`, which is not a step this one runs after/],
    [{ steps: [{ name: 'a', prompt: 'x' }, { name: 'r', kind: 'review', after: ['a'], on_reject: { rerun: 'a', max_rounds: 101 } }] }, /on_reject.max_rounds 101 must be between 1 and 100/],
    [{ steps: [{ name: 'a', prompt: 'x', distinct: 'model' }] }, /`distinct` is only for review and judge steps/],
    [{ steps: [{ name: 'a', prompt: 'x', min_success: 2 }] }, /min_success 2 must be between 1 and the number of parents \(0\)/],
    [{ steps: [{ name: 'a', prompt: 'Use {{nope}}' }] }, /step `a`: \{\{nope\}\} is not a variable of the chain/],
    [{ steps: [{ name: 'a', prompt: 'Use {{b.output}}' }, { name: 'b', prompt: 'y' }] }, /the prompt uses `b`, which is not a step this one runs after/],
    [{ steps: [{ name: 'a', prompt: 'x', timeout: 'soon' }] }, /step `a`: timeout `soon` is not a duration \(expected number at 0\)/],
    [{ steps: [{ name: 'a', prompt: 'x', max_attempts: 0 }] }, /step `a`: its task is not valid: field `max_attempts` is wrong: must be at least 1/],
    [{ steps: [{ name: 'a', prompt: 'x' }], max_parallel: 0 }, /`max_parallel` must be at least 1/],
    [{ steps: [{ name: 'a', prompt: 'x'.repeat(2000) }] }, /the chain is 2\d{3} bytes, over the 1000-byte limit/, 1000],
    [{ vars: { v: 'é'.repeat(300) }, steps: [{ name: 'a', prompt: '{{v}}{{v}}' }] }, /its prompt is 1200 bytes once its variables are filled in, over the 1000-byte limit/, 1000],
  ];
  for (const [chain, says, max] of cases) refuses(() => buildChain(chain, max), 'invalid', says);
  // What llmq accepts, the client accepts: a DAG with every kind of step.
  buildChain({
    vars: { v: 'text with . and } in it' },
    steps: [
      { name: 'a', prompt: 'x {{v}}', escalate: true, timeout: '5 min' },
      { name: 'b', prompt: '{{a.json.x.0}} {{a.json}} {{a.output}}', after: ['a'] },
      { name: 'r', kind: 'review', after: ['b'], distinct: 'provider', on_reject: { rerun: 'a', max_rounds: 2, escalate: true } },
      { name: 'k', kind: 'check', after: ['r'], command: 'lint', on_reject: { rerun: 'b' } },
      { name: 'j', kind: 'judge', after: ['a', 'b'], min_success: 2 },
      { name: 'ok', kind: 'approval', after: ['j', 'k'], timeout: 3600, on_timeout: 'approve' },
    ],
  });
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

test('durations are read as llmq reads them (humantime)', () => {
  assert.equal(parseDuration('24h'), 86400);
  assert.equal(parseDuration('1day 12h'), 129600);
  assert.equal(parseDuration('3d'), 259200);
  assert.equal(parseDuration('2weeks'), 1209600);
  assert.equal(parseDuration('2wks'), 1209600);
  assert.equal(parseDuration('1.5h'), 5400);
  assert.equal(parseDuration('90 min'), 5400);
  assert.equal(parseDuration('1\u00b5s'), 1e-6);
  // humantime skips whitespace between digits too: this is 24h to it, so to llmq.
  assert.equal(parseDuration('2 4h'), 86400);
  assert.equal(parseDuration('0'), 0);
  for (const refused of ['12', '', '00', '1.h', '1..5h', '+1h', '1H', '1e3s', '1 d 2', '1.0001h', '18446744073709551616s']) {
    assert.equal(parseDuration(refused), null, refused);
  }
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

test("task ids are read in exactly the spellings llmq's uuid crate parses", () => {
  const H = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const S = H.replaceAll('-', '');
  for (const accepted of [H, H.toUpperCase(), S, S.toUpperCase(), `{${H}}`, `{${H.toUpperCase()}}`, `urn:uuid:${H}`, `URN:UUID:${H}`, `uRn:UuId:${H.toUpperCase()}`]) {
    assert.equal(canonicalUuid(accepted), H, accepted);
  }
  for (const refused of [`{${S}}`, `urn:uuid:${S}`, `{urn:uuid:${H}}`, `urn:uuid:{${H}}`, `(${H})`, `[${H}]`, ` ${H}`, `${H} `, `${H}0`, H.slice(1), `${H.slice(0, 8)}${H.slice(9)}-`, H.replace('a', 'g'), H.replaceAll('-', '_'), `{${H}`, `uuid:${H}`, '', '{}']) {
    assert.equal(canonicalUuid(refused), null, refused);
  }
  // The reviewer's case: 32 digits in braces is no id to the worker, which derives one from
  // where the task sat; the client finds the same, so a replay touches the right records.
  const braced = JSON.stringify({ v: 1, prompt: 'x', id: `{${S}}` });
  assert.equal(taskIdOf('q', '1-0', braced), deriveId('q', '1-0'));
  assert.equal(replayedTask(braced, deriveId('q', '1-0')), braced, 'the worker would not read it: replayed as it came');
  assert.equal(taskIdOf('q', '1-0', JSON.stringify({ v: 1, prompt: 'x', id: `URN:UUID:${H}` })), H);
  // A duplicated key: the last one, as serde_json's Value keeps it.
  assert.equal(taskIdOf('q', '1-0', `{"id":"nope","id":"${H}"}`), H);
});

test('a replayed envelope is what llmq dlq replay writes, byte for byte', () => {
  const H = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const cases = [
    // What serde refuses goes back exactly as it came.
    ['{"v":1,"prompt":"x","timeout":"soon","attempts":3}', '{"v":1,"prompt":"x","timeout":"soon","attempts":3}'],
    ['{"v":1,"prompt":"x","timeout":120.0}', '{"v":1,"prompt":"x","timeout":120.0}'],
    ['{"v":1,"prompt":"x","messages":null}', '{"v":1,"prompt":"x","messages":null}'],
    ['{"v":1,"prompt":"x","prompt":"y"}', '{"v":1,"prompt":"x","prompt":"y"}'],
    ['{"v":1,"prompt":"x","run_at":"2030-02-30T00:00:00Z"}', '{"v":1,"prompt":"x","run_at":"2030-02-30T00:00:00Z"}'],
    ['{"v":1,"prompt":"x","temperature":3.5e38}', '{"v":1,"prompt":"x","temperature":3.5e38}'],
    ['{"v":1,"prompt":"x\\ud800"}', '{"v":1,"prompt":"x\\ud800"}'],
    // What it reads is written as Rust writes it: fields in order, times in UTC, an f32...
    [
      ' {"metadata":{"b":1,"a":[1.0,-0,1e2]},"zz":2,"Z":1,"run_at":"2030-01-02T03:04:05.5+02:00","prompt":"x","v":1,"temperature":0.30000000000000004,"last_error":"e","waiting_since":"2030-01-01T00:00:00Z","attempts":4,"snoozes":1,"replays":1,"system":null} ',
      `{"v":1,"id":"${H}","prompt":"x","run_at":"2030-01-02T01:04:05.500Z","temperature":0.3,"metadata":{"a":[1.0,-0.0,100.0],"b":1},"replays":2,"Z":1,"zz":2}`,
    ],
    // ... tools with their default parameters, a call's arguments, serde's other spellings.
    [
      '{"v":1,"tools":[["t"]],"tool_choice":{"auto":null},"messages":[["user","hi"],{"role":"assistant","content":"","tool_calls":[{"id":"c","name":"t"}]},{"role":"tool","tool_call_id":"c","content":"r"}],"risk":{"low":null},"response_format":["json_object"]}',
      `{"v":1,"id":"${H}","prompt":"","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"","tool_calls":[{"id":"c","name":"t","arguments":null}]},{"role":"tool","content":"r","tool_call_id":"c"}],"tools":[{"name":"t","parameters":{"properties":{},"type":"object"}}],"tool_choice":"auto","response_format":{"type":"json_object"},"risk":"low","replays":1}`,
    ],
    [`{"v":1,"prompt":"x","id":"urn:uuid:${H.toUpperCase()}","enqueued_at":"2030-01-02 03:04:05 UTC"}`, `{"v":1,"id":"${H}","prompt":"x","enqueued_at":"2030-01-02T03:04:05Z","replays":1}`],
  ];
  for (const [dead, replayed] of cases) assert.equal(replayedTask(dead, H), replayed, dead);
  // cache: where Envelope declares it, as serde writes CacheAsk; what it refuses, as it came.
  const withCache = (cache) => `{"v":1,"prompt":"x","stream":false,"deadline":"24h","cache":${cache}}`;
  const writtenCache = (cache) => `{"v":1,"id":"${H}","prompt":"x","stream":false,"cache":${cache},"deadline":"24h","replays":1}`;
  for (const [cache, written] of [
    ['{"sampled":false,"ttl":"24h"}', '{"ttl":"24h"}'],
    ['{"sampled":true,"ttl":"24h"}', '{"ttl":"24h","sampled":true}'],
    ['["24h"]', '{"ttl":"24h"}'],
    ['["24h",true]', '{"ttl":"24h","sampled":true}'],
    ['true', 'true'],
    ['false', 'false'],
  ]) {
    assert.equal(replayedTask(withCache(cache), H), writtenCache(written), cache);
  }
  assert.equal(replayedTask(withCache('null'), H), `{"v":1,"id":"${H}","prompt":"x","stream":false,"deadline":"24h","replays":1}`);
  for (const cache of ['{"ttl":"24h","keep":1}', '{"ttl":"24h","ttl":"1h"}', '{"ttl":"24h","sampled":null}', '{}', '{"ttl":5}', '[]', '["24h",true,1]', '0', '"24h"']) {
    assert.equal(replayedTask(withCache(cache), H), withCache(cache), cache);
  }
  assert.equal(replayedTask('{"v":1,"prompt":"x"}', H, 'other'), `{"v":1,"id":"${H}","prompt":"x","provider":"other","replays":1}`);
  for (const raw of ['not json', '[1]', '{"prompt":"x"}', '{"v":1,"id":"nope","prompt":"x"}', '{"v":1,"prompt":"x","attempts":null}']) {
    assert.equal(replayedTask(raw, H), raw);
  }
  // A chain step's letter names its chain and step; serde's Option fields, not more.
  assert.deepEqual(chainStepOf('{"chain_id":"c","step":"s","x":1}'), ['c', 's']);
  assert.deepEqual(chainStepOf('["c","s"]'), ['c', 's']);
  for (const raw of ['{"chain_id":"c"}', '{"chain_id":"c","step":1}', '{"chain_id":"c","chain_id":"c","step":"s"}', '["c"]', 'x']) {
    assert.equal(chainStepOf(raw), null, raw);
  }
});

test('JSON nested deeper than a worker reads (127 levels) is refused with a sentence', () => {
  const deep = (n) => JSON.parse('['.repeat(n) + ']'.repeat(n));
  buildEnvelope({ prompt: 'x', metadata: deep(126) });
  refuses(() => buildEnvelope({ prompt: 'x', metadata: deep(127) }), 'invalid', /`metadata` is wrong: nests more than 126 levels deep, the most a worker reads here/);
  buildEnvelope({ prompt: 'x', tools: [{ name: 't', parameters: { type: 'object', x: deep(123) } }] });
  refuses(
    () => buildEnvelope({ prompt: 'x', tools: [{ name: 't', parameters: { type: 'object', x: deep(124) } }] }),
    'invalid',
    /`tools\[0\].parameters` is wrong: nests more than 124 levels deep/,
  );
  refuses(
    () => buildEnvelope({ prompt: 'x', response_format: { type: 'json_schema', schema: { a: deep(126) } } }),
    'invalid',
    /`response_format.schema` is wrong: nests more than 125 levels deep/,
  );
  const loop = {};
  loop.self = loop;
  refuses(() => buildEnvelope({ prompt: 'x', metadata: loop }), 'invalid', /`metadata` is wrong: nests more than/);
  refuses(() => buildChain({ steps: [{ name: 'a', prompt: 'x', tools: [{ name: 't', parameters: { type: 'object', x: deep(125) } }] }] }), 'invalid', /nests deeper than the 127 levels/);
});

/** A connection that answers what `answers` says and records the commands sent. */
function fakeConnection(answers = {}) {
  const sent = [];
  const cmd = new Proxy(
    {},
    {
      get: (_, name) => async (...args) => {
        sent.push([name, ...args]);
        const f = answers[name];
        if (f === undefined) throw new Error(`unexpected ${String(name)}`);
        return f(...args);
      },
    },
  );
  let execs = 0;
  return {
    sent,
    conn: {
      where: 'redis://fake',
      cmd,
      multi: () => {
        const tx = { n: 0, xAdd: () => ((tx.n += 1), tx), exec: async () => answers.exec(++execs, tx.n) };
        return tx;
      },
      lease: async () => ({ cmd, release: async () => undefined }),
      close: async () => undefined,
    },
  };
}

test('a batch that fails partway says which tasks went in, and gives their ids', async () => {
  const { conn } = fakeConnection({
    exec: async (n) => {
      if (n === 1) return [];
      const e = new Error('OOM command not allowed when used memory > maxmemory');
      throw e;
    },
  });
  const q = new Queue(conn, 'q', 1 << 20);
  const tasks = Array.from({ length: 2500 }, (_, i) => ({ prompt: `t${i}` }));
  const err = await q.enqueueMany(tasks).catch((e) => e);
  assert.ok(err instanceof LlmqError, String(err));
  assert.equal(err.enqueued.length, 1000);
  assert.match(err.message, /The first 1000 task\(s\) of the batch were enqueued \(their ids are in the error's `enqueued`\)/);
  // The ids are those of the first 1000 tasks: built ids are the returned ones.
  const ids = err.enqueued;
  assert.equal(new Set(ids).size, 1000);
  const fixed = await new Queue(fakeConnection({ exec: async () => [] }).conn, 'q', 1 << 20).enqueueMany(
    ids.map((id) => ({ id, prompt: 'x' })),
  );
  assert.deepEqual(fixed, ids);
});

test('a long-lived producer keeps the entries of its newest chains only, and drops one once followed', async () => {
  let n = 0;
  const { conn } = fakeConnection({
    xAdd: async () => `${++n}-0`,
    hGet: async () => 'succeeded',
    hGetAll: async () => ({ a: JSON.stringify({ status: 'succeeded', task_id: 't', round: 0 }) }),
  });
  const q = new Queue(conn, 'q', 1 << 20);
  for (let i = 0; i < CHAINS_KEPT + 50; i++) await q.submitChain({ chain_id: `c${i}`, steps: [{ name: 'a', prompt: 'x' }] });
  const kept = chainEntriesOf(q);
  assert.equal(kept.size, CHAINS_KEPT);
  assert.ok(!kept.has('c0') && kept.has(`c${CHAINS_KEPT + 49}`), 'the oldest went first');
  const last = `c${CHAINS_KEPT + 49}`;
  const events = [];
  for await (const e of q.followChain(last)) events.push(e.type);
  assert.deepEqual(events, ['step', 'end']);
  assert.equal(kept.has(last), false, 'a chain followed to its end is forgotten');
});

test('waits run on a monotonic clock: a wall clock that jumps ends nothing early', async () => {
  const id = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  let looks = 0;
  const { conn } = fakeConnection({
    mGet: async () => [++looks < 4 ? null : JSON.stringify({ status: 'succeeded', task_id: id })],
  });
  const q = new Queue(conn, 'q', 1 << 20);
  const wall = Date.now;
  let t = wall();
  Date.now = () => (t += 3_600_000); // an hour later at every look
  try {
    const record = await q.waitForResult(id, { timeoutMs: 60_000, pollMs: 1 });
    assert.equal(record.status, 'succeeded');
    assert.equal(looks, 4);
  } finally {
    Date.now = wall;
  }
});

test('bad ids and limits are sentences before anything is sent', async () => {
  const { conn, sent } = fakeConnection({});
  const q = new Queue(conn, 'q', 1 << 20);
  await rejects(q.replay('nope'), 'invalid', /^"nope" is neither a dead-entry id \(such as 1763900000000-0\) nor a task id \(a UUID\)/);
  await rejects(q.replay('1-0-0'), 'invalid', /is neither a dead-entry id/);
  await rejects(q.replay('99999999999999999999-0'), 'invalid', /is neither a dead-entry id/);
  await rejects(q.deadLetters({ limit: 1001 }), 'invalid', /^The limit must be a whole number from 1 to 1000, not 1001/);
  await rejects(q.deadLetters({ limit: 0 }), 'invalid', /from 1 to 1000/);
  await rejects(
    q.followAnswer('0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90', { onRestart: () => undefined }).next(),
    'invalid',
    /^`followAnswer` takes no onRestart: it yields \{type: 'restart'\} events/,
  );
  assert.deepEqual(sent, []);
});

test('a replay by task id looks through the newest dead letters only, and says so', async () => {
  const H = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  let served = 0;
  const { conn, sent } = fakeConnection({
    xRevRange: async (_key, end, _start, { COUNT }) => {
      const from = end === '+' ? 1_000_000 : Number(end.slice(1).split('-')[0]) - 1;
      served += COUNT;
      return Array.from({ length: COUNT }, (_, i) => ({ id: `${from - i}-0`, message: { task: '{"v":1,"prompt":"x"}', entry_id: `${from - i}-0` } }));
    },
  });
  const q = new Queue(conn, 'q', 1 << 20);
  await rejects(q.replay(H), 'not_found', new RegExp(`^Task ${H} has no dead letter among the newest ${DEAD_SCAN} of queue \`q\`, and a replay by task id looks no further; give the letter's dead-entry id`));
  assert.equal(served, DEAD_SCAN);
  assert.ok(sent.every(([name]) => name === 'xRevRange'));
});

test('a cancel reads the tasks\' records in one MGET and sets every mark in one ZADD GT, skipping ended tasks', async () => {
  const U = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  const E = '7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6';
  const D = '00000000-0000-4000-8000-000000000001';
  const { conn, sent } = fakeConnection({
    mGet: async (keys) =>
      keys.map((k) =>
        k.endsWith(E) ? JSON.stringify({ task_id: E, queue: 'q', status: 'cancelled' }) : k.endsWith(D) ? '{"status":"delayed"}' : null,
      ),
    zAdd: async () => 4,
  });
  const q = new Queue(conn, 'q', 1 << 20);
  const wall = Date.now;
  Date.now = () => 1764400000123;
  let done;
  try {
    done = await q.cancel({ taskIds: [U, E, D, U], batch: 'nightly:2030-01-02', tenant: 'acme corp' });
  } finally {
    Date.now = wall;
  }
  assert.deepEqual(done, {
    [`task:${U}`]: 'cancelled',
    [`task:${E}`]: 'cancelled',
    [`task:${D}`]: 'cancelled',
    'batch:nightly:2030-01-02': 'cancelled',
    'tenant:acme corp': 'cancelled',
  });
  assert.deepEqual(sent, [
    ['mGet', [`llmq:{q}:result:${U}`, `llmq:{q}:result:${E}`, `llmq:{q}:result:${D}`]],
    [
      'zAdd',
      'llmq:{q}:cancels',
      [`task:${U}`, `task:${D}`, 'batch:nightly:2030-01-02', 'tenant:acme corp'].map((value) => ({ score: 1764400000123, value })),
      { comparison: 'GT' },
    ],
  ]);
  // Without task ids there is nothing to read; with only ended ones, nothing to write.
  sent.length = 0;
  assert.deepEqual(await q.cancel({ tenant: 't' }), { 'tenant:t': 'cancelled' });
  assert.deepEqual(sent.map(([name]) => name), ['zAdd']);
  sent.length = 0;
  assert.deepEqual(await q.cancel({ taskIds: [E] }), { [`task:${E}`]: 'cancelled' });
  assert.deepEqual(sent.map(([name]) => name), ['mGet']);
});

test('a cancel that names nothing, or what no task could carry, is a sentence before anything is sent', async () => {
  const { conn, sent } = fakeConnection({});
  const q = new Queue(conn, 'q', 1 << 20);
  const U = '0b6f4c2e-8a57-4a43-9c3e-2f5d8e7a1b90';
  for (const [options, says] of [
    [{}, /^`cancel` names nothing to cancel: give taskIds, batch or tenant\.$/],
    [{ taskIds: [] }, /names nothing to cancel/],
    [{ tenant: null }, /names nothing to cancel/],
    [undefined, /^`cancel` takes an object/],
    [[U], /^`cancel` takes an object/],
    [{ taskId: U }, /^`cancel` takes taskIds, batch and tenant, not `taskId`\.$/],
    [{ taskIds: U }, /^The taskIds option must be an array of task ids/],
    [{ taskIds: ['not-a-uuid'] }, /^"not-a-uuid" is not a task id; give the id enqueue\(\) returned/],
    [{ taskIds: [U, U.toUpperCase()] }, /is not a task id/],
    [{ batch: '' }, /^The batch option must be the batch_id its tasks were enqueued with: 1 to 128 letters/],
    [{ batch: 'a b' }, /The batch option must be/],
    [{ batch: 'x'.repeat(129) }, /The batch option must be/],
    [{ tenant: '' }, /^The tenant option is empty; give the tenant whose tasks to cancel, or leave it out\.$/],
    [{ tenant: 'a\tb' }, /^The tenant option contains a control character/],
    [{ tenant: 'é'.repeat(65) }, /^The tenant option is 130 bytes long, and no task's tenant is longer than 128/],
    [{ tenant: 'lone \ud800' }, /^The tenant option holds a lone UTF-16 surrogate/],
    [{ tenant: 7 }, /^The tenant option must be a string, not 7/],
    [{ taskIds: [U], batch: 'ok', tenant: '\n' }, /control character/],
  ]) {
    await rejects(q.cancel(options), 'invalid', says);
  }
  assert.deepEqual(sent, []);
});

test('the redis dependency is a caret range for a library, the lock pins it exactly', () => {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
  const lock = JSON.parse(readFileSync(new URL('../package-lock.json', import.meta.url), 'utf8'));
  const range = pkg.dependencies.redis;
  assert.match(range, /^\^5\.\d+\.\d+$/, 'a caret range in the major version the client is written for');
  assert.equal(lock.packages[''].dependencies.redis, range, 'the lock agrees with package.json (npm ci checks it)');
  assert.equal(`^${lock.packages['node_modules/redis'].version}`, range, 'the lock pins the version the range starts at');
});
