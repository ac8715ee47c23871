// A chain spec (schema/chain.schema.json, shared/src/chain/mod.rs): the fields, typed, and the
// checks `llmq chain submit` makes before it writes one (`Chain::parse`): its shape (names,
// parents, cycles, what each kind of step needs), its `{{...}}` references, its sizes and each
// step's task. What needs the provider file (a check's command, chains.max_rounds) is left to
// the worker; a chain it refuses ends its follow with the worker's reason.

import { randomUUID } from 'node:crypto';

import { invalid, LlmqError } from './errors.js';
import {
  buildEnvelope,
  checkClass,
  DEFAULT_MAX_PAYLOAD_BYTES,
  type ResponseFormat,
  type Risk,
  type Task,
  type TaskType,
  type Tool,
  type ToolChoice,
} from './envelope.js';
import { chainKeyId } from './uuid.js';
import { byCodePoint, humantime, MAX_JSON_DEPTH, nesting, rustTrim } from './wire.js';

/** Task fields a step takes, from `defaults` or its own. */
export interface StepFields {
  type?: TaskType;
  risk?: Risk;
  area?: string;
  provider?: string;
  model?: string;
  system?: string;
  max_tokens?: number;
  temperature?: number;
  max_attempts?: number;
  /** Seconds, or a duration such as `"5m"`. */
  timeout?: number | string;
  response_format?: ResponseFormat;
  tools?: Tool[];
  tool_choice?: ToolChoice;
  /** `true`: the step's answer is written to its task's live answer as it arrives (not with tools). */
  stream?: boolean;
  /** `false`: llmq does not ask the provider to cache the step's prompt prefix. */
  prompt_cache?: boolean;
}

export interface Step extends StepFields {
  /** Unique in the chain: letters, digits, `_`, `-`. */
  name: string;
  after?: string[];
  kind?: 'llm' | 'judge' | 'consensus' | 'review' | 'check' | 'approval';
  on_timeout?: 'reject' | 'approve';
  command?: string;
  /** `{{var}}`, `{{step.summary}}`, `{{step.output}}`, `{{step.json.path}}` are filled in. */
  prompt?: string;
  reviews?: string;
  distinct?: 'model' | 'provider';
  min_success?: number;
  escalate?: boolean;
  on_reject?: { rerun: string; max_rounds?: number; escalate?: boolean };
}

/** A chain to submit; `v` is written by the client. */
export interface Chain {
  /**
   * Names the chain; when left out, the id its `idempotency_key` names, else a fresh UUID.
   * Submitting the same id twice runs it once.
   */
  chain_id?: string;
  /**
   * Without `chain_id`, names the chain: `uuid5(OID, "llmq-chain-key:<queue>:<tenant's length
   * in bytes>:<tenant>:<key>")` ({@link chainKeyId}), so a chain submitted twice with one key
   * is one chain; submitted again after it ended failed, its failed and cancelled steps run
   * again. Not empty, no NUL.
   */
  idempotency_key?: string;
  on_failure?: 'cancel_descendants' | 'fail_chain';
  vars?: Record<string, string>;
  max_parallel?: number;
  priority?: number;
  tenant?: string;
  defaults?: StepFields;
  steps: Step[];
}

/** The top-level fields of a chain spec a {@link Chain} may carry (`v` is the client's). */
export const CHAIN_FIELDS = [
  'chain_id',
  'idempotency_key',
  'on_failure',
  'vars',
  'max_parallel',
  'priority',
  'tenant',
  'defaults',
  'steps',
] as const satisfies readonly (keyof Chain)[];

/** The fields of `defaults`. */
export const STEP_DEFAULT_FIELDS = [
  'type',
  'risk',
  'area',
  'provider',
  'model',
  'system',
  'max_tokens',
  'temperature',
  'max_attempts',
  'timeout',
  'response_format',
  'tools',
  'tool_choice',
  'stream',
  'prompt_cache',
] as const satisfies readonly (keyof StepFields)[];

/** The fields of a step. */
export const STEP_FIELDS = [
  'name',
  'after',
  'kind',
  'on_timeout',
  'command',
  'prompt',
  'reviews',
  'distinct',
  'min_success',
  'escalate',
  'on_reject',
  ...STEP_DEFAULT_FIELDS,
] as const satisfies readonly (keyof Step)[];

type Unlisted =
  | Exclude<keyof Chain, (typeof CHAIN_FIELDS)[number]>
  | Exclude<keyof Step, (typeof STEP_FIELDS)[number]>
  | Exclude<keyof StepFields, (typeof STEP_DEFAULT_FIELDS)[number]>;
const everyFieldListed: [Unlisted] extends [never] ? true : Unlisted = true;
void everyFieldListed;

/** What a chain's step is at a moment (the steps hash, `llmq:{q}:chain:<id>:steps`). */
export interface StepState {
  status: 'blocked' | 'queued' | 'awaiting_approval' | 'succeeded' | 'failed' | 'cancelled' | string;
  task_id: string;
  round: number;
  provider?: string;
  model?: string;
  cost_usd?: number;
  summary?: string;
  error?: string;
  [field: string]: unknown;
}

/** The state of a chain: `running` until it ends `succeeded`, `failed` or `cancelled`. */
export type ChainState = 'running' | 'succeeded' | 'failed' | 'cancelled';

/** What following a chain yields: each step as it changes, then the chain's end. */
export type ChainEvent =
  | { type: 'step'; chainId: string; step: string; state: StepState }
  | { type: 'end'; chainId: string; state: ChainState; steps: Record<string, StepState> };

const NAME = /^[A-Za-z0-9_-]+$/;
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const KINDS = ['llm', 'judge', 'consensus', 'review', 'check', 'approval'] as const;
/** The most rounds `on_reject.max_rounds` may ask for (the provider file may allow fewer). */
const MAX_ROUNDS_CEILING = 100;
/** A chain's prompts, variables filled in, may come to this many times the payload limit. */
const EXPANSION_FACTOR = 4;

const isName = (s: string) => NAME.test(s);

/** A `{{...}}` in a prompt, as the worker reads it (`references` in chain/mod.rs). */
type Reference =
  | { kind: 'var'; name: string }
  | { kind: 'summary' | 'output'; step: string }
  | { kind: 'json'; step: string; path: string[] };

/** Every `{{...}}` reference in `text`, with where it is. */
function references(text: string): { start: number; end: number; ref: Reference }[] {
  const out: { start: number; end: number; ref: Reference }[] = [];
  let from = 0;
  for (;;) {
    const start = text.indexOf('{{', from);
    if (start < 0) break;
    const close = text.indexOf('}}', start + 2);
    if (close < 0) break;
    const inner = rustTrim(text.slice(start + 2, close));
    let ref: Reference | null = null;
    const dot = inner.indexOf('.');
    if (dot >= 0) {
      const step = inner.slice(0, dot);
      const rest = inner.slice(dot + 1);
      if (rest.startsWith('json')) {
        const tail = rest.slice(4);
        const path = tail === '' ? [] : tail.startsWith('.') ? tail.slice(1).split('.') : null;
        if (path !== null && isName(step) && path.every((k) => k !== '')) ref = { kind: 'json', step, path };
      }
    }
    if (ref === null) {
      const last = inner.lastIndexOf('.');
      if (last >= 0 && inner.slice(last + 1) === 'summary') ref = { kind: 'summary', step: inner.slice(0, last) };
      else if (last >= 0 && inner.slice(last + 1) === 'output') ref = { kind: 'output', step: inner.slice(0, last) };
      else if (last < 0 && isName(inner)) ref = { kind: 'var', name: inner };
    }
    if (ref !== null) out.push({ start, end: close + 2, ref });
    from = close + 2;
  }
  return out;
}

const shown = (r: Reference) =>
  r.kind === 'var' ? `{{${r.name}}}` : r.kind === 'json' ? `{{${[r.step, 'json', ...r.path].join('.')}}}` : `{{${r.step}.${r.kind}}}`;

/** The steps `name` runs after, directly or not. */
function ancestors(name: string, parents: Map<string, readonly string[]>): Set<string> {
  const out = new Set<string>();
  const todo = [...(parents.get(name) ?? [])];
  while (todo.length > 0) {
    const p = todo.pop()!;
    if (parents.has(p) && !out.has(p)) {
      out.add(p);
      todo.push(...parents.get(p)!);
    }
  }
  return out;
}

/** A cycle among the steps, as the names along it (the first repeated at the end), as the worker finds it. */
function findCycle(names: readonly string[], parents: Map<string, readonly string[]>): string[] | null {
  const marks = new Map<string, 'open' | 'done'>();
  const visit = (n: string, path: string[]): string[] | null => {
    const mark = marks.get(n);
    if (mark === 'done') return null;
    if (mark === 'open') return [...path.slice(Math.max(0, path.indexOf(n))), n];
    marks.set(n, 'open');
    path.push(n);
    for (const p of parents.get(n) ?? []) {
      if (!parents.has(p)) continue;
      const c = visit(p, path);
      if (c !== null) return c;
    }
    path.pop();
    marks.set(n, 'done');
    return null;
  };
  for (const n of names) {
    const c = visit(n, []);
    if (c !== null) return c;
  }
  return null;
}

function bad(message: string): Error {
  return invalid(`The chain is invalid: ${message}.`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function onlyKeys(where: string, obj: Record<string, unknown>, known: readonly string[]): void {
  const extra = Object.keys(obj).find((k) => !known.includes(k) && obj[k] !== undefined);
  if (extra !== undefined) throw bad(`${where} has a field \`${extra}\` that chains do not have; use only ${known.join(', ')}`);
}

/**
 * Checks a chain and returns its spec as JSON, with `"v": 1`, and its chain id on `queue`:
 * its `chain_id`; else, with an `idempotency_key`, the id the worker names it by from the key
 * (no `chain_id` is written); else a fresh UUID (written as its `chain_id`).
 *
 * @throws {LlmqError} code `invalid`: a sentence naming the step and the problem.
 */
export function buildChain(
  chain: Chain,
  maxPayloadBytes = DEFAULT_MAX_PAYLOAD_BYTES,
  queue = 'default',
): { chainId: string; json: string } {
  if (!isObject(chain)) throw invalid('A chain must be an object such as {steps: [{name: "plan", prompt: "..."}]}.');
  onlyKeys('the spec', chain, CHAIN_FIELDS);
  // `null` is none, as the worker reads it. Its type first, as the worker's deserializer refuses it.
  const key: unknown = chain.idempotency_key ?? undefined;
  if (key !== undefined && typeof key !== 'string') throw bad(`\`idempotency_key\` must be a string, not ${JSON.stringify(key)}`);
  const given = chain.chain_id ?? (key === undefined ? randomUUID() : undefined);
  if (given !== undefined && (typeof given !== 'string' || given.trim() === '')) {
    throw bad('`chain_id` is empty; leave it out or name the chain');
  }
  if (given !== undefined && ([...given].length > 512 || CONTROL.test(given) || !given.isWellFormed())) {
    throw bad('`chain_id` must be at most 512 characters, none of them control characters (tab, newline, NUL, ...)');
  }
  // Chain::parse's order: the chain id, then the key.
  if (key === '' || key?.includes('\0')) {
    throw bad('`idempotency_key` is empty or holds a NUL character; give the chain a key of its own, or leave it out');
  }
  if (key !== undefined && !key.isWellFormed()) {
    throw bad('`idempotency_key` holds a lone UTF-16 surrogate, which is not valid JSON text; fix the string');
  }
  try {
    checkClass(chain.priority, chain.tenant);
  } catch (e) {
    // In the words of the worker's dead letter: "the chain is invalid: field `priority` ...".
    throw bad((e as Error).message.replace(/^The task's /, '').replace(/\.$/, ''));
  }
  if (chain.on_failure !== undefined && !['cancel_descendants', 'fail_chain'].includes(chain.on_failure)) {
    throw bad('`on_failure` must be cancel_descendants or fail_chain');
  }
  if (chain.max_parallel !== undefined && !(Number.isSafeInteger(chain.max_parallel) && chain.max_parallel >= 0 && chain.max_parallel <= 4294967295)) {
    throw bad('`max_parallel` must be a whole number of at least 1');
  }
  if (chain.vars !== undefined) {
    if (!isObject(chain.vars)) throw bad('`vars` must be an object of strings');
    for (const [name, value] of Object.entries(chain.vars)) {
      if (typeof value !== 'string') throw bad(`variable \`${name}\` must be a string`);
    }
  }
  if (chain.defaults !== undefined) {
    if (!isObject(chain.defaults)) throw bad('`defaults` must be an object of task fields');
    onlyKeys('`defaults`', chain.defaults, STEP_DEFAULT_FIELDS);
  }
  const spec: Record<string, unknown> = given === undefined ? { v: 1 } : { v: 1, chain_id: given };
  for (const f of CHAIN_FIELDS) if (f !== 'chain_id' && chain[f] !== undefined) spec[f] = chain[f];
  if (nesting(spec) > MAX_JSON_DEPTH) {
    throw bad(`it nests deeper than the ${MAX_JSON_DEPTH} levels of JSON a worker reads (the spec's own levels included); flatten its tools' parameters and schemas`);
  }
  let json: string;
  try {
    json = JSON.stringify(spec);
  } catch (e) {
    throw bad(`it cannot be written as JSON (${(e as Error).message})`);
  }
  const size = Buffer.byteLength(json, 'utf8');
  if (size > maxPayloadBytes) {
    throw bad(
      `the chain is ${size} bytes, over the ${maxPayloadBytes}-byte limit; shorten its prompts or raise --max-payload-bytes`,
    );
  }
  const steps = chain.steps;
  if (!Array.isArray(steps) || steps.length === 0) throw bad('the chain has no steps; list at least one under "steps"');
  if (steps.length > 64) throw bad(`the chain has ${steps.length} steps; a chain may have at most 64`);
  const names = new Set<string>();
  for (const s of steps) {
    if (!isObject(s)) throw bad('every step must be an object with a name');
    if (typeof s.name !== 'string' || !NAME.test(s.name)) {
      throw bad(`step name ${typeof s.name === 'string' ? `\`${s.name}\`` : JSON.stringify(s.name)} must be letters, digits, \`_\` or \`-\``);
    }
    if (names.has(s.name)) throw bad(`two steps are named \`${s.name}\`; give every step its own name`);
    names.add(s.name);
    onlyKeys(`step \`${s.name}\``, s, STEP_FIELDS);
  }
  for (const s of steps) {
    const after = s.after ?? [];
    if (!Array.isArray(after)) throw bad(`step \`${s.name}\`: \`after\` must be a list of step names`);
    after.forEach((p, i) => {
      if (typeof p !== 'string' || !names.has(p)) {
        throw bad(`step \`${s.name}\` is after ${typeof p === 'string' ? `\`${p}\`` : JSON.stringify(p)}, which is not a step of this chain`);
      }
      if (p === s.name) throw bad(`step \`${s.name}\` is after itself`);
      if (after.indexOf(p) !== i) throw bad(`step \`${s.name}\` names \`${p}\` twice in \`after\`; name each parent once`);
    });
  }
  const parents = new Map<string, readonly string[]>(steps.map((s) => [s.name, s.after ?? []]));
  const cycle = findCycle(steps.map((s) => s.name), parents);
  if (cycle !== null) throw bad(`steps ${cycle.join(' -> ')} form a cycle; a chain must not loop`);
  const vars = chain.vars ?? {};
  for (const [name, value] of Object.entries(vars).sort(([a], [b]) => byCodePoint(a, b))) {
    if (references(value).length > 0) {
      throw bad(`variable \`${name}\` contains a \`{{...}}\` reference; variables are text, not templates`);
    }
  }
  let budget = maxPayloadBytes * EXPANSION_FACTOR;
  for (const s of steps) budget = checkStep(chain, s, parents, vars, maxPayloadBytes, budget);
  // Without an id of its own, the chain is named from its key (the tenant checked above).
  return { chainId: given ?? chainKeyId(queue, chain.tenant ?? undefined, key as string), json };
}

/** What `step()` in chain/mod.rs checks of one step; returns the expansion budget left. */
function checkStep(
  chain: Chain,
  s: Step,
  parents: Map<string, readonly string[]>,
  vars: Record<string, string>,
  maxBytes: number,
  budget: number,
): number {
  const at = (problem: string) => bad(`step \`${s.name}\`: ${problem}`);
  const kind = s.kind ?? 'llm';
  if (!(KINDS as readonly string[]).includes(kind)) {
    throw at(`unknown kind \`${String(kind)}\`; use one of llm, judge, consensus, review, check, approval`);
  }
  const after = s.after ?? [];
  if (s.on_timeout !== undefined) {
    if (kind !== 'approval') throw at('`on_timeout` is only for approval steps');
    if (s.on_timeout !== 'reject' && s.on_timeout !== 'approve') {
      throw at(`on_timeout \`${String(s.on_timeout)}\` is neither \`reject\` nor \`approve\``);
    }
  }
  if (s.escalate !== undefined && typeof s.escalate !== 'boolean') throw at('`escalate` must be true or false');
  if (s.escalate === true && !['llm', 'judge', 'review'].includes(kind)) {
    throw at('`escalate` is only for steps that call a model (llm, judge, review)');
  }
  if (kind === 'check') {
    if (typeof s.command !== 'string' || rustTrim(s.command) === '') {
      throw at('a check step needs `command`: the name of a check under `checks:` in the provider file');
    }
  } else if (s.command !== undefined) {
    throw at('`command` is only for check steps');
  }
  if (kind === 'check' && after.length !== 1) throw at('a check step runs after exactly one step, whose output it checks');
  if ((kind === 'judge' || kind === 'consensus') && after.length < 2) {
    throw at(`a ${kind} step needs at least two steps in \`after\` to choose from`);
  }
  const minSuccess = s.min_success ?? 1;
  if (!Number.isSafeInteger(minSuccess) || minSuccess < 0 || minSuccess > 4294967295) {
    throw at('`min_success` must be a whole number of at least 1');
  }
  if (minSuccess === 0 || minSuccess > Math.max(after.length, 1)) {
    throw at(`min_success ${minSuccess} must be between 1 and the number of parents (${after.length})`);
  }
  if (kind === 'review') {
    if (s.reviews !== undefined && !after.includes(s.reviews)) {
      throw at(`it reviews \`${String(s.reviews)}\`, which is not in its \`after\`; add it there`);
    }
    if (s.reviews === undefined && after.length !== 1) throw at('name the step it reviews in `reviews`');
  } else if (s.reviews !== undefined) {
    throw at('`reviews` is only for review steps');
  }
  if (s.on_reject !== undefined) {
    if (kind !== 'review' && kind !== 'check') throw at('`on_reject` is only for review and check steps');
    const o = s.on_reject as unknown;
    if (!isObject(o) || typeof o.rerun !== 'string') throw at('`on_reject` is wrong: it needs `rerun`, the name of the step to run again');
    const extra = Object.keys(o).find((k) => !['rerun', 'max_rounds', 'escalate'].includes(k));
    if (extra !== undefined) throw at(`\`on_reject\` is wrong: unknown field \`${extra}\`, expected one of \`rerun\`, \`max_rounds\`, \`escalate\``);
    const rounds = o.max_rounds ?? 1;
    if (typeof rounds !== 'number' || !Number.isSafeInteger(rounds) || rounds < 1 || rounds > MAX_ROUNDS_CEILING) {
      throw at(`on_reject.max_rounds ${String(rounds)} must be between 1 and ${MAX_ROUNDS_CEILING}`);
    }
    if (o.escalate !== undefined && typeof o.escalate !== 'boolean') throw at('`on_reject` is wrong: `escalate` must be true or false');
    if (!ancestors(s.name, parents).has(o.rerun)) {
      throw at(`on_reject reruns \`${o.rerun}\`, which is not a step this one runs after`);
    }
  }
  if (s.distinct !== undefined && kind !== 'review' && kind !== 'judge') throw at('`distinct` is only for review and judge steps');
  if (s.prompt !== undefined && (typeof s.prompt !== 'string' || s.prompt.includes('\0'))) {
    throw at('`prompt` must be a string without NUL characters');
  }
  const own = typeof s.prompt === 'string' && rustTrim(s.prompt) !== '' ? s.prompt : null;
  if (own === null && kind === 'llm') throw at('the step has no prompt; set "prompt"');
  const prompt =
    own ??
    {
      consensus: "The majority of its parents' outputs (no call).",
      judge: 'Pick the best candidate.',
      review: 'Review this work.',
      check: "Its parent's output, checked by a command (no call).",
      approval: 'Approve to go on.',
      llm: '',
    }[kind];
  const before = ancestors(s.name, parents);
  const refs = references(prompt);
  for (const { ref } of refs) {
    if (ref.kind === 'var' && !Object.hasOwn(vars, ref.name)) {
      throw at(`{{${ref.name}}} is not a variable of the chain; give it in "vars" (llmq chain submit --var ${ref.name}=...)`);
    }
    if (ref.kind !== 'var' && !before.has(ref.step)) {
      throw at(`the prompt uses \`${ref.step}\`, which is not a step this one runs after`);
    }
  }
  // The prompt's size once the variables are in, counted in bytes as the worker counts it.
  const bytes = (t: string) => Buffer.byteLength(t, 'utf8');
  let size = bytes(prompt);
  for (const { start, end, ref } of refs) {
    if (ref.kind === 'var') size = Math.max(0, size - bytes(prompt.slice(start, end))) + bytes(vars[ref.name] ?? '');
  }
  if (size > maxBytes) {
    throw at(
      `its prompt is ${size} bytes once its variables are filled in, over the ${maxBytes}-byte limit; shorten it or raise --max-payload-bytes`,
    );
  }
  if (size > budget) {
    throw at(
      `the chain's prompts come to more than ${maxBytes * EXPANSION_FACTOR} bytes once its variables are filled in (${EXPANSION_FACTOR} times the ${maxBytes}-byte limit); shorten them or the variables`,
    );
  }
  let filled = '';
  let last = 0;
  for (const { start, end, ref } of refs) {
    if (ref.kind !== 'var' || vars[ref.name] === undefined) continue;
    filled += prompt.slice(last, start) + vars[ref.name]!;
    last = end;
  }
  filled += prompt.slice(last);
  const handoffs = (t: string) =>
    references(t)
      .filter(({ ref }) => ref.kind !== 'var')
      .map(({ ref }) => shown(ref))
      .join('\n');
  if (handoffs(filled) !== handoffs(prompt)) {
    throw at(
      "its variables, filled in, would form a `{{...}}` reference with the prompt's own text; variables are text, not templates: keep `{{` and `}}` out of their values",
    );
  }
  // The step's task, which must be one a worker accepts like any other.
  const d = chain.defaults ?? {};
  const field = <K extends keyof StepFields>(k: K): StepFields[K] => (s[k] !== undefined ? s[k] : d[k]);
  const type = field('type');
  if (type !== undefined && typeof type === 'string' && !['code_generation', 'research', 'data_analysis', 'refactoring', 'documentation', 'code_review', 'sql_db_work', 'testing', 'debugging', 'planning'].includes(type)) {
    throw at(`unknown task type \`${type}\`; use one of: code_generation, research, data_analysis, refactoring, documentation, code_review, sql_db_work, testing, debugging, planning`);
  }
  if (chain.max_parallel === 0) throw bad("`max_parallel` must be at least 1: how many of the chain's steps may run at once");
  let timeout: number | undefined;
  const t = field('timeout');
  if (typeof t === 'number') {
    if (!Number.isSafeInteger(t) || t < 0) throw at('timeout must be whole seconds or a duration such as "5m"');
    timeout = t;
  } else if (typeof t === 'string') {
    const parsed = humantime(t);
    if (typeof parsed === 'string') throw at(`timeout \`${t}\` is not a duration (${parsed})`);
    timeout = Number(parsed.secs);
  } else if (t !== undefined) {
    throw at('timeout must be whole seconds or a duration such as "5m"');
  }
  const task: Task = { prompt: filled, chain_id: 'x', priority: chain.priority, tenant: chain.tenant, timeout };
  for (const k of ['type', 'risk', 'area', 'provider', 'model', 'system', 'max_tokens', 'temperature', 'max_attempts', 'response_format', 'tools', 'tool_choice', 'stream', 'prompt_cache'] as const) {
    (task as Record<string, unknown>)[k] = field(k);
  }
  try {
    buildEnvelope(task, Number.MAX_SAFE_INTEGER);
  } catch (e) {
    if (!(e instanceof LlmqError)) throw e;
    const m = e.message.replace(/\.$/, '').replace(/^The task's /, '').replace(/^([A-Z])/, (c) => c.toLowerCase());
    throw at(`its task is not valid: ${m}`);
  }
  return budget - size;
}
