// What `llmq dlq replay` enqueues for a dead letter (`replayed_task` in
// shared/src/queue/dead_letter.rs), byte for byte: the payload read as the worker's `Envelope`
// type reads it (serde), its counters reset and written back as that type writes itself; a
// payload the type does not read goes back exactly as it came. Also the task id and the chain
// step a payload names, as the worker finds them (`task_id_of`, `chain_step_of`).

import { canonicalUuid, deriveId } from './uuid.js';
import {
  byCodePoint,
  formatChrono,
  formatF32,
  jsonString,
  member,
  parseChrono,
  toF32,
  tryParseJson,
  valueJson,
  type Json,
} from './wire.js';

/** A payload the worker's types would not read. */
class Refused extends Error {}
const refuse = (): never => {
  throw new Refused();
};

/**
 * Where a value is read: straight from the JSON text, or from serde's buffer of it (inside an
 * untagged enum), where an internally tagged enum's tag may also be a variant's index.
 */
interface Ctx {
  buffered: boolean;
}
const DIRECT: Ctx = { buffered: false };
const BUFFERED: Ctx = { buffered: true };

/** Decodes a value and returns it re-encoded as JSON text (`undefined`: left out when written). */
type Dec = (j: Json, ctx: Ctx) => string | undefined;

const U32_MAX = 4294967295n;
const I64_MAX = 9223372036854775807n;

const str: Dec = (j) => (j.k === 'str' ? jsonString(j.v) : refuse());
const bool: Dec = (j) => (j.k === 'bool' ? String(j.v) : refuse());
const u64: Dec = (j) => (j.k === 'num' && j.kind === 'u64' ? j.int.toString() : refuse());
const u32: Dec = (j) => (j.k === 'num' && j.kind === 'u64' && j.int <= U32_MAX ? j.int.toString() : refuse());
const i64: Dec = (j) =>
  j.k === 'num' && (j.kind === 'i64' || (j.kind === 'u64' && j.int <= I64_MAX)) ? j.int.toString() : refuse();
const f32: Dec = (j) => {
  if (j.k !== 'num') return refuse();
  const f = toF32(j);
  return f === null ? refuse() : formatF32(f);
};
const value: Dec = (j) => valueJson(j);
const uuid: Dec = (j) => (j.k === 'str' ? jsonString(canonicalUuid(j.v) ?? refuse()) : refuse());
const time: Dec = (j) => (j.k === 'str' ? jsonString(formatChrono(parseChrono(j.v) ?? refuse())) : refuse());

/** `Option<T>`: null is `None`, left out when written. */
const opt =
  (d: Dec): Dec =>
  (j, ctx) =>
    j.k === 'null' ? undefined : d(j, ctx);

/** `Vec<T>`. */
const list =
  (d: Dec): Dec =>
  (j, ctx) =>
    j.k === 'arr' ? `[${j.v.map((x) => d(x, ctx) ?? 'null').join(',')}]` : refuse();

/**
 * A unit-only enum (externally tagged): its variant's name, or `{"name": null}` as serde_json
 * also reads one.
 */
const unitEnum =
  (names: readonly string[]): Dec =>
  (j) => {
    if (j.k === 'str' && names.includes(j.v)) return jsonString(j.v);
    if (j.k === 'obj' && j.v.length === 1 && names.includes(j.v[0]![0]) && j.v[0]![1].k === 'null') {
      return jsonString(j.v[0]![0]);
    }
    return refuse();
  };

interface Field {
  name: string;
  dec: Dec;
  /** The value when the field is missing; none: required. */
  missing?: () => string | undefined;
  /** Leave the field out when written if this holds of the value written. */
  skip?: (written: string | undefined) => boolean;
}

const skipNone = (w: string | undefined) => w === undefined;
const none = () => undefined;

/**
 * A struct as serde derives it: from a map (no field twice; unknown fields refused when
 * `denyUnknown`, else ignored) or from a sequence of its fields in order. Returns each field
 * re-encoded, in declaration order.
 */
function struct(fields: readonly Field[], denyUnknown: boolean, j: Json, ctx: Ctx): Map<string, string | undefined> {
  const got = new Map<string, string | undefined>();
  if (j.k === 'obj') {
    for (const [k, v] of j.v) {
      const f = fields.find((x) => x.name === k);
      if (f === undefined) {
        if (denyUnknown) refuse();
        continue;
      }
      if (got.has(k)) refuse();
      got.set(k, f.dec(v, ctx));
    }
  } else if (j.k === 'arr') {
    if (j.v.length > fields.length) refuse();
    j.v.forEach((v, i) => got.set(fields[i]!.name, fields[i]!.dec(v, ctx)));
  } else {
    refuse();
  }
  for (const f of fields) {
    if (!got.has(f.name)) got.set(f.name, f.missing === undefined ? refuse() : f.missing());
  }
  return got;
}

/** Fields as serde writes a struct: `{"a":...,"b":...}` without the skipped ones. */
function write(fields: readonly Field[], got: Map<string, string | undefined>, prefix: [string, string][] = []): string {
  const parts = prefix.map(([k, v]) => `${jsonString(k)}:${v}`);
  for (const f of fields) {
    const w = got.get(f.name);
    if (f.skip?.(w) ?? false) continue;
    parts.push(`${jsonString(f.name)}:${w ?? 'null'}`);
  }
  return `{${parts.join(',')}}`;
}

/**
 * An internally tagged enum (`#[serde(tag = "type", deny_unknown_fields)]`): a map with the tag
 * once (read as a string; from serde's buffer also as the variant's index), or a sequence of
 * the tag then the variant's fields. A unit variant ignores a map's other entries.
 */
function tagged(variants: readonly { name: string; fields: readonly Field[] | null }[]): Dec {
  return (j, ctx) => {
    const variantOf = (t: Json) => {
      if (t.k === 'str') return variants.find((v) => v.name === t.v) ?? refuse();
      if (ctx.buffered && t.k === 'num' && t.kind === 'u64' && t.int < BigInt(variants.length)) return variants[Number(t.int)]!;
      return refuse();
    };
    let variant;
    let rest: Json;
    if (j.k === 'obj') {
      const tags = j.v.filter(([k]) => k === 'type');
      if (tags.length !== 1) refuse();
      variant = variantOf(tags[0]![1]);
      rest = { k: 'obj', v: j.v.filter(([k]) => k !== 'type') };
    } else if (j.k === 'arr') {
      if (j.v.length === 0) refuse();
      variant = variantOf(j.v[0]!);
      rest = { k: 'arr', v: j.v.slice(1) };
    } else {
      return refuse();
    }
    const tag: [string, string] = ['type', jsonString(variant.name)];
    if (variant.fields === null) {
      if (rest.k === 'arr' && rest.v.length > 0) refuse();
      return write([], new Map(), [tag]);
    }
    return write(variant.fields, struct(variant.fields, true, rest, ctx), [tag]);
  };
}

// shared/src/conversation.rs

const part = tagged([
  { name: 'text', fields: [{ name: 'text', dec: str }] },
  {
    name: 'image',
    fields: [
      { name: 'url', dec: opt(str), missing: none, skip: skipNone },
      { name: 'data', dec: opt(str), missing: none, skip: skipNone },
      { name: 'media_type', dec: opt(str), missing: none, skip: skipNone },
    ],
  },
]);

/** `Content`, untagged: text, or a list of parts (read from serde's buffer). */
const content: Dec = (j) => {
  if (j.k === 'str') return jsonString(j.v);
  if (j.k === 'arr') return list(part)(j, BUFFERED);
  return refuse();
};

const TOOL_CALL: Field[] = [
  { name: 'id', dec: str },
  { name: 'name', dec: str },
  { name: 'arguments', dec: value, missing: () => 'null' },
  { name: 'signature', dec: opt(str), missing: none, skip: skipNone },
];
const toolCall: Dec = (j, ctx) => write(TOOL_CALL, struct(TOOL_CALL, true, j, ctx));

const MESSAGE: Field[] = [
  { name: 'role', dec: unitEnum(['system', 'user', 'assistant', 'tool']) },
  { name: 'content', dec: content, missing: () => '""' },
  { name: 'tool_calls', dec: list(toolCall), missing: () => '[]', skip: (w) => w === '[]' },
  { name: 'tool_call_id', dec: opt(str), missing: none, skip: skipNone },
];
const message: Dec = (j, ctx) => write(MESSAGE, struct(MESSAGE, true, j, ctx));

const TOOL: Field[] = [
  { name: 'name', dec: str },
  { name: 'description', dec: opt(str), missing: none, skip: skipNone },
  { name: 'parameters', dec: value, missing: () => '{"properties":{},"type":"object"}' },
];
const tool: Dec = (j, ctx) => write(TOOL, struct(TOOL, true, j, ctx));

const NAMED_TOOL: Field[] = [{ name: 'name', dec: str }];
/** `ToolChoice`, untagged: a mode, or `{"name": ...}` (read from serde's buffer). */
const toolChoice: Dec = (j) => {
  try {
    return unitEnum(['auto', 'none', 'required'])(j, BUFFERED);
  } catch (e) {
    if (!(e instanceof Refused)) throw e;
  }
  return write(NAMED_TOOL, struct(NAMED_TOOL, true, j, BUFFERED));
};

const responseFormat = tagged([
  { name: 'json_object', fields: null },
  {
    name: 'json_schema',
    fields: [
      { name: 'schema', dec: value },
      { name: 'name', dec: opt(str), missing: none, skip: skipNone },
      { name: 'strict', dec: opt(bool), missing: none, skip: skipNone },
    ],
  },
]);

// shared/src/envelope.rs

const CACHE_KEEP: Field[] = [
  { name: 'ttl', dec: str },
  { name: 'sampled', dec: bool, missing: () => 'false', skip: (w) => w === 'false' },
];
/**
 * `CacheAsk`, untagged: a boolean, or `CacheKeep` (`deny_unknown_fields`; `sampled` defaults
 * to false, written only when true), read from serde's buffer.
 */
const cacheAsk: Dec = (j) => (j.k === 'bool' ? String(j.v) : write(CACHE_KEEP, struct(CACHE_KEEP, true, j, BUFFERED)));

// `Envelope`, its fields in declaration order (the order written).

const zero = () => '0';
const skipZero = (w: string | undefined) => w === '0';
const optional = (name: string, dec: Dec): Field => ({ name, dec: opt(dec), missing: none, skip: skipNone });

const ENVELOPE: Field[] = [
  { name: 'v', dec: u64 },
  optional('id', uuid),
  { name: 'prompt', dec: str, missing: () => '""' },
  optional('system', str),
  { name: 'messages', dec: list(message), missing: () => '[]', skip: (w) => w === '[]' },
  { name: 'tools', dec: list(tool), missing: () => '[]', skip: (w) => w === '[]' },
  optional('tool_choice', toolChoice),
  optional('response_format', responseFormat),
  optional('stream', bool),
  optional('prompt_cache', bool),
  optional('cache', cacheAsk),
  optional('deadline', str),
  optional('type', str),
  optional('provider', str),
  optional('model', str),
  optional('chain_id', str),
  optional('step', str),
  optional('min_tier', unitEnum(['fast', 'standard', 'advanced'])),
  optional('risk', unitEnum(['low', 'medium', 'high'])),
  optional('area', str),
  optional('timeout', u64),
  optional('max_attempts', u32),
  optional('run_at', time),
  optional('idempotency_key', str),
  optional('idempotency_window', str),
  optional('batch_id', str),
  optional('priority', i64),
  optional('tenant', str),
  optional('max_tokens', u32),
  optional('temperature', f32),
  optional('metadata', value),
  optional('enqueued_at', time),
  optional('concurrency_key', str),
  optional('concurrency_limit', u32),
  optional('fallback', bool),
  optional('traceparent', str),
  { name: 'attempts', dec: u32, missing: zero, skip: skipZero },
  { name: 'snoozes', dec: u32, missing: zero, skip: skipZero },
  optional('waiting_since', time),
  { name: 'replays', dec: u32, missing: zero, skip: skipZero },
  optional('last_error', str),
];

/** The envelope fields the worker's `Envelope` type reads (the rest it keeps as they came). */
export const ENVELOPE_FIELDS: readonly string[] = ENVELOPE.map((f) => f.name);

/**
 * What `llmq dlq replay` enqueues for a plain task's dead letter: the envelope with `attempts`,
 * `snoozes`, `waiting_since` and `last_error` reset, `replays` one more, its `id` filled in
 * from `taskId` if missing, and optionally a new `provider`, written as the worker writes an
 * envelope (its fields in order, times in UTC, `temperature` as a 32-bit float, unknown fields
 * sorted); a payload the worker's `Envelope` type does not read goes back as it came.
 */
export function replayedTask(task: string, taskId: string, provider?: string): string {
  const j = tryParseJson(task);
  if (j === null || j.k !== 'obj') return task;
  let got: Map<string, string | undefined>;
  try {
    got = struct(ENVELOPE, false, j, DIRECT);
  } catch (e) {
    if (e instanceof Refused) return task;
    throw e;
  }
  got.set('attempts', '0');
  got.set('snoozes', '0');
  got.set('waiting_since', undefined);
  got.set('last_error', undefined);
  // A u32 that saturates: a letter forged with the largest count stays there.
  const replays = BigInt(got.get('replays') ?? '0') + 1n;
  got.set('replays', (replays > U32_MAX ? U32_MAX : replays).toString());
  if (got.get('id') === undefined) {
    const id = canonicalUuid(taskId);
    if (id !== null) got.set('id', jsonString(id));
  }
  if (provider !== undefined) got.set('provider', jsonString(provider));
  // Unknown fields (`#[serde(flatten)] extra`): a map, the last of duplicates, keys sorted.
  const extra = new Map<string, Json>();
  for (const [k, v] of j.v) if (!ENVELOPE_FIELDS.includes(k)) extra.set(k, v);
  const out = write(ENVELOPE, got);
  const rest = [...extra.keys()].sort(byCodePoint).map((k) => `${jsonString(k)}:${valueJson(extra.get(k)!)}`);
  return rest.length === 0 ? out : `${out.slice(0, -1)},${rest.join(',')}}`;
}

/**
 * The task id of a raw payload, even one that is not a valid envelope, as the worker finds it
 * (`task_id_of`): its `id` if that is a UUID the worker parses, else the id derived from where
 * the payload sat in the stream.
 */
export function taskIdOf(queue: string, entryId: string, task: string): string {
  const j = tryParseJson(task);
  const id = j === null ? undefined : member(j, 'id');
  return (id?.k === 'str' ? canonicalUuid(id.v) : null) ?? deriveId(queue, entryId);
}

/** The chain and step a payload names, when it names both (`chain_step_of`). */
export function chainStepOf(task: string): [string, string] | null {
  const j = tryParseJson(task);
  if (j === null) return null;
  const STEP: Field[] = [
    { name: 'chain_id', dec: opt(str), missing: none },
    { name: 'step', dec: opt(str), missing: none },
  ];
  try {
    // Its two fields as `Option<String>`s, from a map or a sequence of exactly two.
    if (j.k === 'arr' && j.v.length !== 2) return null;
    const got = struct(STEP, false, j, DIRECT);
    const chain = got.get('chain_id');
    const step = got.get('step');
    return chain === undefined || step === undefined ? null : [JSON.parse(chain) as string, JSON.parse(step) as string];
  } catch (e) {
    if (e instanceof Refused) return null;
    throw e;
  }
}
