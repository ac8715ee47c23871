// A chain spec (schema/chain.schema.json, shared/src/chain/mod.rs): the fields, typed, and the
// checks that need no provider file. The worker checks the rest (cycles, `{{step.*}}`
// references, sizes); a chain it refuses ends its follow with the worker's reason.

import { randomUUID } from 'node:crypto';

import { invalid } from './errors.js';
import { checkClass, type ResponseFormat, type Risk, type TaskType, type Tool, type ToolChoice } from './envelope.js';

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
  /** Names the chain; a fresh UUID when left out. Submitting the same id twice runs it once. */
  chain_id?: string;
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
 * Checks a chain and returns its spec as JSON, with `"v": 1` and its chain id.
 *
 * @throws {LlmqError} code `invalid`: a sentence naming the step and the problem.
 */
export function buildChain(chain: Chain): { chainId: string; json: string } {
  if (!isObject(chain)) throw invalid('A chain must be an object such as {steps: [{name: "plan", prompt: "..."}]}.');
  onlyKeys('the spec', chain, CHAIN_FIELDS);
  const chainId = chain.chain_id ?? randomUUID();
  if (typeof chainId !== 'string' || chainId.trim() === '') {
    throw bad('`chain_id` is empty; leave it out or name the chain');
  }
  if ([...chainId].length > 512 || CONTROL.test(chainId) || !chainId.isWellFormed()) {
    throw bad('`chain_id` must be at most 512 characters, none of them control characters (tab, newline, NUL, ...)');
  }
  checkClass(chain.priority, chain.tenant, "The chain's");
  if (chain.on_failure !== undefined && !['cancel_descendants', 'fail_chain'].includes(chain.on_failure)) {
    throw bad('`on_failure` must be cancel_descendants or fail_chain');
  }
  if (chain.max_parallel !== undefined && !(Number.isSafeInteger(chain.max_parallel) && chain.max_parallel >= 1)) {
    throw bad('`max_parallel` must be a whole number of at least 1');
  }
  if (chain.vars !== undefined) {
    if (!isObject(chain.vars)) throw bad('`vars` must be an object of strings');
    for (const [name, value] of Object.entries(chain.vars)) {
      if (typeof value !== 'string') throw bad(`variable \`${name}\` must be a string`);
      if (/\{\{\s*[A-Za-z0-9_.-]+\s*\}\}/.test(value)) {
        throw bad(`variable \`${name}\` contains a \`{{...}}\` reference; variables are text, not templates`);
      }
    }
  }
  if (chain.defaults !== undefined) {
    if (!isObject(chain.defaults)) throw bad('`defaults` must be an object of task fields');
    onlyKeys('`defaults`', chain.defaults, STEP_DEFAULT_FIELDS);
  }
  const steps = chain.steps;
  if (!Array.isArray(steps) || steps.length === 0) throw bad('the chain has no steps; list at least one under "steps"');
  if (steps.length > 64) throw bad(`the chain has ${steps.length} steps; a chain may have at most 64`);
  const names = new Set<string>();
  for (const s of steps) {
    if (!isObject(s)) throw bad('every step must be an object with a name');
    if (typeof s.name !== 'string' || !NAME.test(s.name)) {
      throw bad(`step name ${JSON.stringify(s.name)} must be letters, digits, \`_\` or \`-\``);
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
        throw bad(`step \`${s.name}\` is after ${JSON.stringify(p)}, which is not a step of this chain`);
      }
      if (p === s.name) throw bad(`step \`${s.name}\` is after itself`);
      if (after.indexOf(p) !== i) throw bad(`step \`${s.name}\` names \`${p}\` twice in \`after\`; name each parent once`);
    });
    const kind = s.kind ?? 'llm';
    if (!['llm', 'judge', 'consensus', 'review', 'check', 'approval'].includes(kind)) {
      throw bad(`step \`${s.name}\`: unknown kind \`${kind}\`; use one of llm, judge, consensus, review, check, approval`);
    }
    if (s.prompt !== undefined && (typeof s.prompt !== 'string' || s.prompt.includes('\0'))) {
      throw bad(`step \`${s.name}\`: \`prompt\` must be a string without NUL characters`);
    }
    if (kind === 'llm' && (s.prompt ?? '').trim() === '') throw bad(`step \`${s.name}\`: the step has no prompt; set "prompt"`);
  }
  const spec: Record<string, unknown> = { v: 1, chain_id: chainId };
  for (const f of CHAIN_FIELDS) if (f !== 'chain_id' && chain[f] !== undefined) spec[f] = chain[f];
  return { chainId, json: JSON.stringify(spec) };
}
