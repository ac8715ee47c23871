// The task envelope (schema/envelope.schema.json, shared/src/envelope.rs): its fields, typed,
// and the checks a worker makes, so that this client never writes an envelope a worker would
// refuse for its shape. Field names are the wire format's, snake_case.

import { randomUUID } from 'node:crypto';

import { invalid } from './errors.js';
import { CANONICAL_UUID } from './uuid.js';
import { excerpt, humantime, MAX_JSON_DEPTH, nesting, parseChrono, type Duration } from './wire.js';

export const TASK_TYPES = [
  'code_generation',
  'research',
  'data_analysis',
  'refactoring',
  'documentation',
  'code_review',
  'sql_db_work',
  'testing',
  'debugging',
  'planning',
] as const;
export type TaskType = (typeof TASK_TYPES)[number];
export type Risk = 'low' | 'medium' | 'high';
export type Tier = 'fast' | 'standard' | 'advanced';
export type ImageType = 'image/png' | 'image/jpeg' | 'image/gif' | 'image/webp';
export type Role = 'system' | 'user' | 'assistant' | 'tool';

/** Any JSON object (a JSON Schema, tool arguments). */
export type JsonObject = { [key: string]: unknown };

export type ContentPart =
  | { type: 'text'; text: string }
  | { type: 'image'; url: string; media_type?: ImageType }
  | { type: 'image'; data: string; media_type: ImageType };

/** A tool call the model made in an earlier answer (as the result record's `tool_calls`). */
export interface ToolCall {
  id: string;
  name: string;
  arguments?: JsonObject | string | null;
  signature?: string;
}

/** One earlier turn of a conversation. */
export interface Message {
  role: Role;
  content?: string | ContentPart[];
  tool_calls?: ToolCall[];
  tool_call_id?: string;
}

/** A function the model may call; llmq never runs it. */
export interface Tool {
  name: string;
  description?: string;
  /** A JSON Schema of an object (`"type": "object"`). */
  parameters?: JsonObject;
}

export type ToolChoice = 'auto' | 'none' | 'required' | { name: string };

export type ResponseFormat =
  | { type: 'json_object' }
  | { type: 'json_schema'; schema: JsonObject; name?: string; strict?: boolean };

/**
 * The answer cache, as an object (docs/wire-format.md, "Answer cache"): an identical request
 * within `ttl` (1s to 30d, humantime: `10m`, `24h`, `7d`) is answered from Redis without a call.
 */
export interface CacheAsk {
  ttl: string;
  /**
   * `true`: cache a sampled answer too (`temperature` unset or above 0), which every identical
   * request then gets. Without it, a cached task needs `temperature: 0`.
   */
  sampled?: boolean;
}

/**
 * A task: every envelope field a producer may set (docs/wire-format.md, "The envelope").
 * `prompt` is required unless `messages` is given. `null` means the same as leaving a field
 * out. Dates may be given as `Date`s or RFC 3339 strings.
 */
export interface Task {
  /** The task id, a canonical UUID; a fresh one when left out. */
  id?: string | null;
  /** The user message: the last user turn, after `messages`. */
  prompt?: string | null;
  system?: string | null;
  messages?: Message[] | null;
  tools?: Tool[] | null;
  tool_choice?: ToolChoice | null;
  response_format?: ResponseFormat | null;
  /**
   * How long the task can wait for its answer, `24h` to `30d` (humantime, as llmq reads it:
   * `36h`, `1day 12h`, `1.5d`): it may go through a provider's batch API.
   */
  deadline?: string | null;
  /** `true`: the answer is written to `llmq:{q}:out:<id>` as it arrives ({@link Queue.followAnswer}). */
  stream?: boolean | null;
  /**
   * `false`: llmq does not ask the provider to cache this task's prompt prefix. Left out: the
   * provider file's `prompt_cache`, on unless it says false.
   */
  prompt_cache?: boolean | null;
  /**
   * The answer cache: `{ttl: '24h'}` ({@link CacheAsk}); `false`: never answered from it, not
   * even by the queue's (`answer_cache.queues`). Not with `stream`.
   */
  cache?: false | CacheAsk | null;
  type?: TaskType | null;
  provider?: string | null;
  model?: string | null;
  chain_id?: string | null;
  risk?: Risk | null;
  area?: string | null;
  /** Per-attempt timeout in seconds, 1 to 2592000. */
  timeout?: number | null;
  max_attempts?: number | null;
  /** Not before this time: a `Date`, or an RFC 3339 string such as `2030-01-02T03:04:05Z`. */
  run_at?: Date | string | null;
  /**
   * Tasks with the same key, on one queue and for one tenant, run once: a copy read while the
   * first waits or runs waits for it to end; within {@link Task.idempotency_window} after it
   * succeeded, a copy is answered with its answer (its record's `duplicate_of`, `cost_usd` 0);
   * after it failed or went dead, the next copy runs. Not empty.
   */
  idempotency_key?: string | null;
  /**
   * How long after the first task with the key succeeded its copies get its answer: 1s to 30d
   * (humantime, as `cache.ttl`: `10m`, `24h`, `7d`). Needs `idempotency_key`. Left out: the
   * queue's (the provider file's `idempotency:`), else 24h.
   */
  idempotency_window?: string | null;
  /**
   * The batch the task came in (`llmq batch`'s id): the ledger keeps it with the task, so
   * `llmq costs --batch <id>` and the page report one batch. 1 to 128 letters, digits, `-`,
   * `_`, `.` or `:`.
   */
  batch_id?: string | null;
  max_tokens?: number | null;
  temperature?: number | null;
  metadata?: unknown;
  /** 0 (the default, most urgent) to 9 (least). */
  priority?: number | null;
  /** Whose work it is: 1 to 128 bytes, no control characters. */
  tenant?: string | null;
  /**
   * What it is for, as up to 8 `name: value` pairs (`{ team: 'search' }`): the ledger keeps them
   * with the task and its calls. Names: 1 to 64 letters, digits, `_`, `-` or `.`; values: 1 to
   * 128 bytes, no control characters.
   */
  tags?: Record<string, string> | null;
  concurrency_key?: string | null;
  concurrency_limit?: number | null;
  fallback?: boolean | null;
  traceparent?: string | null;
  /** When it was enqueued; now when left out. */
  enqueued_at?: Date | string | null;
  min_tier?: Tier | null;
}

/** Every envelope field a {@link Task} may carry, in the order they are written. */
export const TASK_FIELDS = [
  'id',
  'prompt',
  'system',
  'messages',
  'tools',
  'tool_choice',
  'response_format',
  'deadline',
  'stream',
  'prompt_cache',
  'cache',
  'type',
  'provider',
  'model',
  'chain_id',
  'risk',
  'area',
  'timeout',
  'max_attempts',
  'run_at',
  'idempotency_key',
  'idempotency_window',
  'batch_id',
  'max_tokens',
  'temperature',
  'metadata',
  'priority',
  'tenant',
  'tags',
  'concurrency_key',
  'concurrency_limit',
  'fallback',
  'traceparent',
  'enqueued_at',
  'min_tier',
] as const satisfies readonly (keyof Task)[];

/**
 * The envelope fields a task may not carry: `v`, which the client writes, and those llmq sets
 * itself (workers' counters, a chain expansion's `step`).
 */
export const RESERVED_FIELDS = ['v', 'attempts', 'snoozes', 'replays', 'last_error', 'waiting_since', 'step'] as const;

// Every field of Task is listed in TASK_FIELDS (and the list names only Task's fields, above).
type Unlisted = Exclude<keyof Task, (typeof TASK_FIELDS)[number]>;
const everyFieldListed: [Unlisted] extends [never] ? true : Unlisted = true;
void everyFieldListed;

/** The result record at `llmq:{q}:result:<id>` (schema/result.schema.json). */
export interface TaskRecord {
  task_id: string;
  queue: string;
  status: 'queued' | 'delayed' | 'running' | 'succeeded' | 'failed' | 'dead' | 'cancelled';
  provider: string | null;
  model: string | null;
  output: string | null;
  error: string | null;
  error_class:
    | 'retryable'
    | 'rate_limited'
    | 'fatal'
    | 'quota_exhausted'
    | 'invalid'
    | 'poison'
    | 'unavailable'
    | null;
  attempts: number;
  input_tokens: number;
  output_tokens: number;
  cached_tokens: number;
  reasoning_tokens: number;
  cost_usd: number;
  duration_ms: number;
  task_type: string | null;
  chain_id: string | null;
  finished_at: string | null;
  route?: string | null;
  provider_errors?: string[];
  /** The answer parsed, when the task had `response_format`. */
  json?: unknown;
  tool_calls?: { id: string; name: string; arguments: unknown; signature?: string }[];
  learned?: { strategy: string; propensity: number; explored: boolean; candidates: string[] };
  /** `true`: the output limit (`max_tokens`) cut the answer short. */
  truncated?: boolean;
  /** `true`: answered from the answer cache, without a call (`cost_usd` 0). */
  cached?: boolean;
  /** For a cached answer, the task whose call gave it. */
  cached_from?: string;
  /**
   * For a copy of a task with the same `idempotency_key`: that task, whose answer (output,
   * json, tool_calls, provider, model) this is, without a call (`cost_usd` 0).
   */
  duplicate_of?: string;
  [field: string]: unknown;
}

/** The fields given: `null` means the same as left out. */
type Given<T> = { [K in keyof T]?: Exclude<T[K], null> };

/** The default `--max-payload-bytes` of a worker: 1 MiB. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024;
const MAX_TIMEOUT_SECS = 30 * 24 * 3600;
const U32_MAX = 4294967295;
/** The longest tenant a task may carry, in UTF-8 bytes. */
export const MAX_TENANT_BYTES = 128;
const MAX_CONCURRENCY_KEY = 200;
const MAX_TOOLS = 128;
const IMAGE_TYPES: readonly string[] = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];

/** Rust's `char::is_control`: the C0 and C1 controls and DEL. */
export const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
/** A batch id as `check_batch_id` takes one: 1 to 128 letters, digits, `-`, `_`, `.` or `:`. */
export const BATCH_ID = /^[A-Za-z0-9_.:-]{1,128}$/;

const MAX_TAGS = 8;
const MAX_TAG_VALUE_BYTES = 128;
const TAG_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Checks a task's `tags` as a worker does. */
function checkTags(tags: unknown): void {
  if (tags === undefined || tags === null) return;
  if (typeof tags !== 'object' || Array.isArray(tags)) {
    throw wrong('tags', `must be an object of name: value pairs, not ${show(tags)}`);
  }
  const pairs = Object.entries(tags);
  if (pairs.length > MAX_TAGS) throw wrong('tags', `has ${pairs.length} tags; a task carries at most ${MAX_TAGS}`);
  for (const [name, value] of pairs) {
    if (!TAG_NAME.test(name)) {
      throw wrong('tags', `has a tag named ${show(name)}; name a tag with 1 to 64 letters, digits, \`_\`, \`-\` or \`.\``);
    }
    const at = `tags.${name}`;
    if (typeof value !== 'string') throw wrong(at, `must be a string, not ${show(value)}`);
    if (value === '') throw wrong(at, 'is empty; leave the tag out or give it a value');
    const bytes = Buffer.byteLength(value, 'utf8');
    if (bytes > MAX_TAG_VALUE_BYTES) throw wrong(at, `is ${bytes} bytes long; use at most ${MAX_TAG_VALUE_BYTES}`);
    if (CONTROL.test(value)) throw wrong(at, 'contains a control character (a newline, tab or NUL); remove it');
    if (!value.isWellFormed()) throw wrong(at, 'holds a lone UTF-16 surrogate; fix the string');
  }
}

/** A field that is wrong, in the words a worker's dead letter would use. */
function wrong(field: string, message: string): Error {
  return invalid(`The task's field \`${field}\` is wrong: ${message}.`);
}

function show(v: unknown): string {
  try {
    const s = typeof v === 'string' ? JSON.stringify(v) : String(JSON.stringify(v) ?? v);
    return s.length > 60 ? `${s.slice(0, 57)}...` : s;
  } catch {
    return String(v);
  }
}

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

const chars = (s: string) => [...s].length;
const blank = (s: string) => s.trim() === '';

const NUL = 'contains a NUL character (\\u0000), which cannot be stored or passed on; remove it';

/** A string, as the worker's deserializer takes one (well-formed: it must be UTF-8 there). */
function checkStringType(field: string, v: unknown): asserts v is string {
  if (typeof v !== 'string') throw wrong(field, `must be a string, not ${show(v)}`);
  if (!v.isWellFormed()) throw wrong(field, 'holds a lone UTF-16 surrogate, which is not valid JSON text; fix the string');
}

export function checkString(field: string, v: unknown): asserts v is string {
  checkStringType(field, v);
  if (v.includes('\0')) throw wrong(field, NUL);
}

export function checkInteger(field: string, v: unknown, min: number, max: number, hint: string): asserts v is number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw wrong(field, `must be a whole number, not ${show(v)}`);
  if (v < min || v > max) throw wrong(field, `${v} is out of range; ${hint}`);
}

function checkBoolean(field: string, v: unknown): asserts v is boolean {
  if (typeof v !== 'boolean') throw wrong(field, `must be true or false, not ${show(v)}`);
}

function checkEnum(field: string, v: unknown, values: readonly string[]): void {
  if (typeof v !== 'string' || !values.includes(v)) {
    throw wrong(field, `${show(v)} is not one of ${values.join(', ')}`);
  }
}

/** The keys of `obj` outside `known`, refused as a worker refuses them. */
function onlyKeys(field: string, obj: JsonObject, known: readonly string[]): void {
  const extra = Object.keys(obj).find((k) => !known.includes(k));
  if (extra !== undefined) {
    throw wrong(`${field}.${extra}`, `is not a field here; use only ${known.join(', ')}`);
  }
}

/** A name providers accept: a tool's, a schema's. */
function checkName(field: string, v: unknown): void {
  if (typeof v !== 'string' || !/^[A-Za-z_][A-Za-z0-9_-]{0,63}$/.test(v)) {
    const shown = typeof v === 'string' ? `\`${excerpt(v, 64)}\`` : show(v);
    throw wrong(
      field,
      `${shown} is not a name providers accept; use 1 to 64 letters, digits, \`_\` or \`-\`, starting with a letter or \`_\``,
    );
  }
}

/** Checks a priority and a tenant, wherever they are given (a task, a chain). */
export function checkClass(priority: unknown, tenant: unknown, what = "The task's"): void {
  const field = (f: string, m: string) => invalid(`${what} field \`${f}\` is wrong: ${m}.`);
  if (priority !== undefined && priority !== null) {
    if (typeof priority !== 'number' || !Number.isSafeInteger(priority)) {
      throw field('priority', `must be a whole number from 0 (the default, most urgent) to 9 (least urgent), not ${show(priority)}`);
    }
    if (priority < 0 || priority > 9) {
      throw field('priority', `${priority} is out of range; use 0 (the default, most urgent) to 9 (least urgent)`);
    }
  }
  if (tenant !== undefined && tenant !== null) {
    if (typeof tenant !== 'string') throw field('tenant', `must be a string, not ${show(tenant)}`);
    if (tenant === '') throw field('tenant', 'is empty; leave it out or name the tenant');
    const bytes = Buffer.byteLength(tenant, 'utf8');
    if (bytes > MAX_TENANT_BYTES) {
      throw field('tenant', `is ${bytes} bytes long; use at most ${MAX_TENANT_BYTES} (an id, not a description)`);
    }
    if (CONTROL.test(tenant)) throw field('tenant', 'contains a control character (a newline, tab or NUL); remove it');
    if (!tenant.isWellFormed()) throw field('tenant', 'holds a lone UTF-16 surrogate; fix the string');
  }
}

/**
 * Seconds of a duration as llmq reads one (humantime 2: `24h`, `3d`, `1day 12h`, `1.5h`,
 * `90 min`; whitespace between and even inside numbers is skipped, as humantime skips it);
 * `null` for what llmq refuses.
 */
export function parseDuration(text: string): number | null {
  const d = humantime(text);
  return typeof d === 'string' ? null : Number(d.secs) + Number(d.nanos) / 1e9;
}

const DAY = 86_400n;

/** `check_deadline` of the worker, in its words. */
function checkDeadline(text: string, streams: boolean): void {
  const d: Duration | string = humantime(text);
  if (typeof d === 'string') {
    throw wrong('deadline', `\`${excerpt(text, 40)}\` is not a duration (${d}); write it as e.g. "24h" or "3d"`);
  }
  if (d.secs < DAY) {
    throw wrong(
      'deadline',
      `${text} is shorter than the 24h a provider may take to run a batch; give at least 24h, or leave deadline out to call the model now`,
    );
  }
  if (d.secs > 30n * DAY || (d.secs === 30n * DAY && d.nanos > 0n)) {
    throw wrong('deadline', `${text} is longer than 30 days; give at most 30d`);
  }
  if (streams) throw wrong('deadline', 'cannot be used with stream: a batch answers all at once; drop one of them');
}

const MAX_CACHE_TTL_SECS = 30n * DAY;

/** `cache` as the worker's deserializer reads it: a boolean, or `{"ttl": text, "sampled": bool}`. */
function checkCacheShape(v: unknown): void {
  if (typeof v === 'boolean') return;
  if (!isObject(v)) throw wrong('cache', `must be false or {"ttl": "24h"} (an object with a ttl), not ${show(v)}`);
  onlyKeys('cache', v, ['ttl', 'sampled']);
  if (v.ttl === undefined) throw wrong('cache.ttl', 'is missing; give how long to keep the answer, e.g. "24h"');
  if (typeof v.ttl !== 'string') throw wrong('cache.ttl', `must be a duration as text, such as "24h", not ${show(v.ttl)}`);
  if (!v.ttl.isWellFormed()) throw wrong('cache.ttl', 'holds a lone UTF-16 surrogate, which is not valid JSON text; fix the string');
  if (v.sampled !== undefined) checkBoolean('cache.sampled', v.sampled);
}

/**
 * Whether a request samples its answer (`samples` of the worker): `temperature` unset, or
 * above 0 as the worker's 32-bit float holds it.
 */
function samples(temperature: number | undefined): boolean {
  return temperature === undefined || Math.fround(temperature) > 0;
}

/**
 * A duration of 1s to 30d, as the worker's `cache_ttl` reads a cache TTL (and an
 * `idempotency_window`), in its words, for `field`.
 */
function checkTtl(field: string, text: string): void {
  const d: Duration | string = humantime(text);
  if (typeof d === 'string') {
    throw wrong(field, `\`${excerpt(text, 40)}\` is not a duration (${d}); write it as e.g. "10m" or "24h"`);
  }
  if (d.secs < 1n || d.secs > MAX_CACHE_TTL_SECS || (d.secs === MAX_CACHE_TTL_SECS && d.nanos > 0n)) {
    throw wrong(field, `${excerpt(text, 40)} is not between 1s and 30d; give e.g. "24h"`);
  }
}

/** `CacheAsk::check` of the worker, in its words. */
function checkCache(ask: false | true | CacheAsk, streams: boolean, temperature: number | undefined): void {
  if (ask === false) return;
  if (ask === true) throw wrong('cache', 'true needs a time to keep the answer; write {"ttl": "24h"}');
  checkTtl('cache.ttl', ask.ttl);
  if (streams) throw wrong('cache', 'cannot be used with stream: a cached answer is not streamed; drop one of them');
  if (samples(temperature) && ask.sampled !== true) {
    throw wrong(
      'cache',
      'would give every identical request one sampled answer (temperature is unset or above 0); set "temperature": 0, or "sampled": true in cache to keep one sample',
    );
  }
}

/**
 * `Envelope::check_idempotency` of the worker, in its words: a key is not empty (every keyless
 * producer would share it), and a window comes with a key and is a TTL.
 */
function checkIdempotency(key: string | undefined, window: string | undefined): void {
  if (key === '') throw wrong('idempotency_key', 'is empty; give each task that must run once a key of its own, or leave it out');
  if (window === undefined) return;
  if (key === undefined) {
    throw wrong('idempotency_window', 'needs idempotency_key: it is how long a key is remembered; add the key or drop the window');
  }
  checkTtl('idempotency_window', window);
}

/** `check_batch_id` of the worker, in its words: a few safe ASCII characters, 1 to 128 of them. */
function checkBatchId(id: string): void {
  if (!BATCH_ID.test(id)) throw wrong('batch_id', 'must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`');
}

/** A valid `cache` as the worker writes it (serde): `ttl`, then `sampled` only when true. */
function cacheWritten(ask: boolean | CacheAsk): boolean | CacheAsk {
  return typeof ask === 'boolean' ? ask : ask.sampled === true ? { ttl: ask.ttl, sampled: true } : { ttl: ask.ttl };
}

/** RFC 3339 as docs/wire-format.md writes it: `2030-01-02T03:04:05Z`, `...05.5+02:00`. */
const RFC3339 = /^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$/;

/**
 * A time as the task carries it: a `Date`, or an RFC 3339 string naming a time that exists,
 * as the worker's time type (chrono) reads it: no 2030-02-30, no 24:00, offsets under a day.
 */
function timestamp(field: string, v: unknown): string {
  if (v instanceof Date) {
    const iso = Number.isNaN(v.getTime()) ? null : v.toISOString();
    if (iso === null || parseChrono(iso) === null) throw wrong(field, 'is an invalid Date, or one beyond the years a worker reads');
    return iso;
  }
  if (typeof v !== 'string' || !RFC3339.test(v)) {
    throw wrong(field, `${show(v)} is not an RFC 3339 time; give a Date or a string such as 2030-01-02T03:04:05Z`);
  }
  if (parseChrono(v) === null) {
    throw wrong(
      field,
      `${show(v)} is not a time that exists (a day past the month's end, an hour past 23, a minute past 59 or an offset of a day or more); give a Date or a string such as 2030-01-02T03:04:05Z`,
    );
  }
  return v;
}

function checkContent(at: string, role: string, content: unknown, callsOnly: boolean): void {
  let texts: string[];
  let images = false;
  if (content === undefined || typeof content === 'string') {
    texts = [content ?? ''];
  } else if (Array.isArray(content)) {
    texts = [];
    content.forEach((part, j) => {
      const f = `${at}.content[${j}]`;
      if (!isObject(part)) throw wrong(f, 'must be an object: {"type": "text", "text": "..."} or an image');
      if (part.type === 'text') {
        onlyKeys(f, part, ['type', 'text']);
        checkString(`${f}.text`, part.text);
        texts.push(part.text);
      } else if (part.type === 'image') {
        onlyKeys(f, part, ['type', 'url', 'data', 'media_type']);
        images = true;
        if (part.media_type !== undefined && (typeof part.media_type !== 'string' || !IMAGE_TYPES.includes(part.media_type))) {
          const shown = typeof part.media_type === 'string' ? `\`${excerpt(part.media_type, 40)}\`` : show(part.media_type);
          throw wrong(`${f}.media_type`, `${shown} is not an image type providers read; use one of ${IMAGE_TYPES.join(', ')}`);
        }
        if (part.url !== undefined && part.data === undefined) {
          const url = part.url;
          if (typeof url !== 'string' || !/^https?:\/\//i.test(url) || url.length > 2048 || /[\s\u0000-\u001f\u007f-\u009f]/.test(url)) {
            throw wrong(`${f}.url`, 'must be an http or https URL of at most 2048 characters; send other images as base64 "data"');
          }
        } else if (part.data !== undefined && part.url === undefined) {
          if (part.media_type === undefined) throw wrong(`${f}.media_type`, `is needed with "data": one of ${IMAGE_TYPES.join(', ')}`);
          if (typeof part.data !== 'string' || !/^[A-Za-z0-9+/=]+$/.test(part.data)) {
            throw wrong(`${f}.data`, "must be the image's bytes in standard base64, without a data: prefix");
          }
        } else {
          throw wrong(f, 'an image has either "url" or "data" (base64, with "media_type"), not both');
        }
      } else {
        throw wrong(`${f}.type`, `${show(part.type)} is neither "text" nor "image"`);
      }
    });
  } else {
    throw wrong(`${at}.content`, 'must be a string or a list of parts');
  }
  if (texts.some((t) => typeof t === 'string' && t.includes('\0'))) {
    throw wrong(`${at}.content`, 'contains a NUL character (\\u0000), which cannot be stored or passed on; remove it');
  }
  if (!images && texts.every(blank) && !callsOnly) {
    throw wrong(`${at}.content`, "is empty; give the turn's text (only an assistant turn with tool_calls may have none)");
  }
  if (images && role !== 'user') throw wrong(`${at}.content`, 'only a user turn may carry images');
}

/** The conversation, tools, tool choice and response format, as `conversation::check` does. */
function checkConversation(task: Given<Task>): void {
  const messages = task.messages ?? [];
  if (!Array.isArray(messages)) throw wrong('messages', 'must be a list of turns');
  const open: string[] = [];
  const ids = new Set<string>();
  messages.forEach((m: unknown, i) => {
    const at = `messages[${i}]`;
    if (!isObject(m)) throw wrong(at, 'must be an object with a role and content');
    onlyKeys(at, m, ['role', 'content', 'tool_calls', 'tool_call_id']);
    checkEnum(`${at}.role`, m.role, ['system', 'user', 'assistant', 'tool']);
    const calls = m.tool_calls ?? [];
    if (!Array.isArray(calls)) throw wrong(`${at}.tool_calls`, 'must be a list of calls');
    checkContent(at, m.role as string, m.content, m.role === 'assistant' && calls.length > 0);
    if (calls.length > 0 && m.role !== 'assistant') throw wrong(`${at}.tool_calls`, 'only an assistant turn has tool calls');
    if (m.role !== 'tool' && open.length > 0) {
      throw wrong(
        at,
        `comes before the call(s) ${open.join(', ')} of the assistant turn before it are answered; put a tool turn answering each call right after the turn that made it`,
      );
    }
    calls.forEach((call: unknown, j) => {
      const f = `${at}.tool_calls[${j}]`;
      if (!isObject(call)) throw wrong(f, 'must be an object with an id and a name');
      onlyKeys(f, call, ['id', 'name', 'arguments', 'signature']);
      checkName(`${f}.name`, call.name);
      if (typeof call.id !== 'string' || !/^[A-Za-z0-9_-]{1,256}$/.test(call.id)) {
        throw wrong(`${f}.id`, 'must be 1 to 256 letters, digits, `_` or `-`: the id the tool turn answering it names');
      }
      if (ids.has(call.id)) throw wrong(`${f}.id`, `\`${call.id}\` names another call too; give each call its own id`);
      const args = call.arguments;
      if (!(args === undefined || args === null || typeof args === 'string' || isObject(args))) {
        throw wrong(`${f}.arguments`, 'must be a JSON object (or the text the model wrote)');
      }
      if (call.signature !== undefined) checkString(`${f}.signature`, call.signature);
      ids.add(call.id);
      open.push(call.id);
    });
    if (m.role === 'tool') {
      if (m.tool_call_id === undefined) throw wrong(`${at}.tool_call_id`, 'is missing; a tool turn names the id of the call it answers');
      const k = open.indexOf(m.tool_call_id as string);
      if (k < 0) {
        throw wrong(
          `${at}.tool_call_id`,
          'names no unanswered call of the assistant turn right before; give the id of the call it answers',
        );
      }
      open.splice(k, 1);
    } else if (m.tool_call_id !== undefined) {
      throw wrong(`${at}.tool_call_id`, 'belongs only to a tool turn');
    }
  });
  if (open.length > 0) throw wrong('messages', `ends with the call(s) ${open.join(', ')} unanswered; add a tool turn answering each`);

  const tools = task.tools ?? [];
  if (!Array.isArray(tools)) throw wrong('tools', 'must be a list of tools');
  if (tools.length > MAX_TOOLS) throw wrong('tools', `has ${tools.length} tools; at most ${MAX_TOOLS} are accepted`);
  const names: string[] = [];
  tools.forEach((tool: unknown, i) => {
    const f = `tools[${i}]`;
    if (!isObject(tool)) throw wrong(f, 'must be an object with a name');
    onlyKeys(f, tool, ['name', 'description', 'parameters']);
    checkName(`${f}.name`, tool.name);
    if (names.includes(tool.name as string)) {
      throw wrong(`${f}.name`, `\`${tool.name as string}\` is defined twice; give each tool its own name`);
    }
    names.push(tool.name as string);
    if (tool.description !== undefined) checkString(`${f}.description`, tool.description);
    if (tool.parameters !== undefined && !(isObject(tool.parameters) && tool.parameters.type === 'object')) {
      throw wrong(`${f}.parameters`, 'must be a JSON Schema of an object ("type": "object")');
    }
  });

  const choice = task.tool_choice;
  if (choice !== undefined && choice !== null) {
    if (isObject(choice)) {
      onlyKeys('tool_choice', choice, ['name']);
      if (typeof choice.name !== 'string' || !names.includes(choice.name)) {
        const shown = typeof choice.name === 'string' ? `\`${excerpt(choice.name, 64)}\`` : show(choice.name);
        throw wrong('tool_choice', `names ${shown}, which is not among the task's tools`);
      }
    } else {
      checkEnum('tool_choice', choice, ['auto', 'none', 'required']);
      if (choice === 'required' && names.length === 0) {
        throw wrong('tool_choice', 'asks for a tool call, but the task defines no tools');
      }
    }
  }

  const format: unknown = task.response_format;
  if (format !== undefined && format !== null) {
    if (!isObject(format)) throw wrong('response_format', 'must be {"type": "json_object"} or {"type": "json_schema", "schema": {...}}');
    if (format.type === 'json_object') {
      onlyKeys('response_format', format, ['type']);
    } else if (format.type === 'json_schema') {
      onlyKeys('response_format', format, ['type', 'schema', 'name', 'strict']);
      if (!isObject(format.schema)) throw wrong('response_format.schema', 'must be a JSON Schema (an object)');
      if (format.name !== undefined) checkName('response_format.name', format.name);
      if (format.strict !== undefined) checkBoolean('response_format.strict', format.strict);
    } else {
      throw wrong('response_format.type', `${show(format.type)} is neither "json_object" nor "json_schema"`);
    }
  }
}

/** Every string in `v` (keys too) is well-formed UTF-16, which the worker's JSON parser needs. */
function checkText(path: string, v: unknown): void {
  if (typeof v === 'string') {
    if (!v.isWellFormed()) throw wrong(path, 'holds a lone UTF-16 surrogate, which is not valid JSON text; fix the string');
  } else if (Array.isArray(v)) {
    v.forEach((x, i) => checkText(`${path}[${i}]`, x));
  } else if (isObject(v)) {
    for (const [k, x] of Object.entries(v)) {
      checkText(`${path}.${k}`, k);
      checkText(`${path}.${k}`, x);
    }
  }
}

/**
 * The JSON a worker reads nests at most 127 levels (serde_json's limit), the envelope's own
 * level included; deeper, its dead letter says the task "is not valid JSON". Names the free-form
 * field (metadata, a tool's parameters, a schema, a call's arguments) that nests too deep.
 */
function checkNesting(envelope: JsonObject): void {
  if (nesting(envelope) <= MAX_JSON_DEPTH) return;
  const places: [string, unknown, number][] = [['metadata', envelope.metadata, 1]];
  (envelope.tools as Tool[] | undefined)?.forEach((tool, i) => places.push([`tools[${i}].parameters`, tool.parameters, 3]));
  if (isObject(envelope.response_format)) places.push(['response_format.schema', envelope.response_format.schema, 2]);
  (envelope.messages as Message[] | undefined)?.forEach((m, i) =>
    m.tool_calls?.forEach((c, j) => places.push([`messages[${i}].tool_calls[${j}].arguments`, c.arguments, 5])),
  );
  const [field, , above] = places.find(([, v, above]) => above + nesting(v) > MAX_JSON_DEPTH) ?? ['metadata', undefined, 1];
  throw wrong(
    field,
    `nests more than ${MAX_JSON_DEPTH - above} levels deep, the most a worker reads here (it reads JSON at most ${MAX_JSON_DEPTH} levels deep, the task's own ${above} around this field included); flatten it`,
  );
}

/**
 * Checks a task as a worker would and returns its envelope: `{"v": 1, "id": ..., ...}` with
 * a fresh id and `enqueued_at` when they were left out.
 *
 * @throws {LlmqError} code `invalid`: a sentence naming the field and the fix.
 */
export function buildEnvelope(task: Task, maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES): { id: string; json: string } {
  if (!isObject(task)) throw invalid(`A task must be an object such as {prompt: "..."}, not ${show(task)}.`);
  for (const key of Object.keys(task)) {
    if ((RESERVED_FIELDS as readonly string[]).includes(key)) {
      if ((task as JsonObject)[key] === undefined) continue;
      throw invalid(
        key === 'v'
          ? 'The task sets `v`; leave it out: the client writes "v": 1.'
          : `The task sets \`${key}\`, which llmq sets itself; leave it out.`,
      );
    }
    if (!(TASK_FIELDS as readonly string[]).includes(key)) {
      throw invalid(
        `\`${key}\` is not a task field; use one of ${TASK_FIELDS.join(', ')} (put data of your own in \`metadata\`).`,
      );
    }
  }
  const t = Object.fromEntries(Object.entries(task).filter(([, v]) => v !== undefined && v !== null)) as Given<Task>;

  const messages = t.messages ?? [];
  if (t.prompt !== undefined) checkString('prompt', t.prompt);
  const prompt = t.prompt ?? '';
  if (blank(prompt) && (!Array.isArray(messages) || messages.length === 0)) {
    throw invalid('The task has no prompt; set "prompt" to a non-empty string, or give "messages".');
  }
  for (const f of ['system', 'provider', 'model', 'chain_id', 'area', 'traceparent', 'deadline'] as const) {
    if (t[f] !== undefined) checkString(f, t[f]);
  }
  // The key's NUL is looked for after Envelope::check_idempotency, as the worker looks; a
  // window's is humantime's to refuse, a batch id's check_batch_id's.
  for (const f of ['idempotency_key', 'idempotency_window', 'batch_id'] as const) {
    if (t[f] !== undefined) checkStringType(f, t[f]);
  }
  if (t.traceparent !== undefined && chars(t.traceparent) > 256) {
    throw wrong('traceparent', 'is longer than 256 characters; give a W3C traceparent, 00-<trace id>-<span id>-<flags>');
  }
  if (t.id !== undefined && (typeof t.id !== 'string' || !CANONICAL_UUID.test(t.id))) {
    throw wrong('id', `${show(t.id)} is not a UUID in canonical form (lower-case, hyphenated); leave it out for a fresh one`);
  }
  if (t.type !== undefined && !(TASK_TYPES as readonly unknown[]).includes(t.type)) {
    const shown = typeof t.type === 'string' ? `\`${t.type}\`` : show(t.type);
    throw invalid(`Unknown task type ${shown}; use one of: ${TASK_TYPES.join(', ')}.`);
  }
  if (t.risk !== undefined) checkEnum('risk', t.risk, ['low', 'medium', 'high']);
  if (t.min_tier !== undefined) checkEnum('min_tier', t.min_tier, ['fast', 'standard', 'advanced']);
  if (t.stream !== undefined) checkBoolean('stream', t.stream);
  if (t.prompt_cache !== undefined) checkBoolean('prompt_cache', t.prompt_cache);
  if (t.cache !== undefined) checkCacheShape(t.cache);
  if (t.fallback !== undefined) checkBoolean('fallback', t.fallback);
  if (t.timeout !== undefined) {
    if (typeof t.timeout !== 'number' || !Number.isSafeInteger(t.timeout)) throw wrong('timeout', `must be a whole number, not ${show(t.timeout)}`);
    if (t.timeout < 1 || t.timeout > MAX_TIMEOUT_SECS) {
      throw wrong('timeout', `must be between 1 second and ${MAX_TIMEOUT_SECS} seconds (30 days), not ${t.timeout}`);
    }
  }
  if (t.max_attempts === 0) throw wrong('max_attempts', 'must be at least 1');
  if (t.max_attempts !== undefined) checkInteger('max_attempts', t.max_attempts, 1, U32_MAX, 'give at least 1');
  if (t.max_tokens !== undefined) checkInteger('max_tokens', t.max_tokens, 0, U32_MAX, `give 0 to ${U32_MAX}`);
  if (t.temperature !== undefined) {
    if (typeof t.temperature !== 'number' || !Number.isFinite(t.temperature)) {
      throw wrong('temperature', `must be a finite number, not ${show(t.temperature)}`);
    }
    if (!Number.isFinite(Math.fround(t.temperature))) {
      throw wrong('temperature', `${t.temperature} is too large for the worker's 32-bit float; give a sampling temperature such as 0.2`);
    }
  }
  checkClass(t.priority, t.tenant);
  checkTags(t.tags);
  const key = t.concurrency_key;
  const limit = t.concurrency_limit;
  if (key !== undefined && limit === undefined) {
    throw wrong('concurrency_key', 'needs a concurrency_limit, how many tasks of the key may run at once');
  }
  if (key === undefined && limit !== undefined) {
    throw wrong('concurrency_limit', 'needs a concurrency_key, the name of the group it limits');
  }
  if (key !== undefined) {
    checkString('concurrency_key', key);
    if (blank(key) || chars(key) > MAX_CONCURRENCY_KEY) {
      throw wrong('concurrency_key', `must be a non-empty string of at most ${MAX_CONCURRENCY_KEY} characters`);
    }
    checkInteger('concurrency_limit', limit, 1, U32_MAX, 'give a whole number of at least 1');
  }
  if (t.deadline !== undefined) checkDeadline(t.deadline, t.stream === true);
  checkConversation(t);
  if (blank(prompt) && messages.every((m) => isObject(m) && m.role === 'system')) {
    throw wrong('messages', 'has only system turns and the prompt is empty; add a user turn or set "prompt"');
  }
  if (t.stream === true && (t.tools ?? []).length > 0) {
    throw wrong('stream', 'cannot be used with tools yet: a streamed answer carries text only; drop one of them');
  }
  if (t.cache !== undefined) checkCache(t.cache, t.stream === true, t.temperature);
  checkIdempotency(t.idempotency_key, t.idempotency_window);
  if (t.batch_id !== undefined) checkBatchId(t.batch_id);
  if (t.idempotency_key?.includes('\0')) throw wrong('idempotency_key', NUL);

  const id = t.id ?? randomUUID();
  const envelope: JsonObject = { v: 1, id };
  for (const f of TASK_FIELDS) {
    if (f === 'id' || t[f] === undefined) continue;
    envelope[f] = f === 'run_at' || f === 'enqueued_at' ? timestamp(f, t[f]) : f === 'cache' ? cacheWritten(t[f]) : t[f];
  }
  envelope.enqueued_at ??= new Date().toISOString();
  checkNesting(envelope);
  for (const [field, value] of Object.entries(envelope)) checkText(field, value);
  let json: string;
  try {
    json = JSON.stringify(envelope);
  } catch (e) {
    throw wrong('metadata', `cannot be written as JSON (${(e as Error).message})`);
  }
  const size = Buffer.byteLength(json, 'utf8');
  if (size > maxPayloadBytes) {
    throw invalid(
      `The task is ${size} bytes, over the ${maxPayloadBytes}-byte limit; send a shorter prompt, or raise --max-payload-bytes on the workers and maxPayloadBytes here.`,
    );
  }
  return { id, json };
}
