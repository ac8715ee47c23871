// The llmq client: enqueue tasks and chains, wait for and follow them, list and replay dead
// letters. Everything it writes and reads is docs/wire-format.md.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import { buildChain, type Chain, type ChainEvent, type ChainState, type StepState } from './chain.js';
import {
  BATCH_ID,
  buildEnvelope,
  CONTROL,
  DEFAULT_MAX_PAYLOAD_BYTES,
  MAX_TENANT_BYTES,
  type Task,
  type TaskRecord,
} from './envelope.js';
import { invalid, LlmqError } from './errors.js';
import { connectRedis, redisError, type Commands, type Connection, type StreamEntry } from './redis.js';
import { chainStepOf, replayedTask, taskIdOf } from './replay.js';
import { CANONICAL_UUID, canonicalUuid, deriveId } from './uuid.js';

/** The statuses after which nothing more happens to a task without an operator. */
const FINAL = new Set(['succeeded', 'failed', 'dead', 'cancelled']);
/** The statuses of a task that has ended: a cancel leaves it as it was. */
const ENDED: ReadonlySet<string> = new Set(['succeeded', 'failed', 'dead', 'cancelled']);
/** Tasks per MULTI/EXEC of a batch, as `llmq batch` sends 1000 per round trip. */
const BATCH_CHUNK = 1000;
/** The most dead letters one {@link Queue.deadLetters} reads (each may be up to a payload's size). */
export const MAX_DEAD_LETTERS = 1000;
/** How many of the newest dead letters a replay by task id looks through. */
export const DEAD_SCAN = 10_000;
/** Chains submitted here whose entries are kept to tell a refusal, at most (the newest). */
export const CHAINS_KEPT = 1000;

/** replay.lua, shipped beside this file by the build from shared/src/queue/replay.lua. */
const REPLAY_LUA = readFileSync(new URL('./replay.lua', import.meta.url), 'utf8');
const REPLAY_SHA = createHash('sha1').update(REPLAY_LUA).digest('hex');

export interface ConnectOptions {
  /** The Redis URL, as llmq takes it; default `REDIS_URL`, else redis://127.0.0.1:6379. */
  url?: string;
  /** The queue; default `default`. */
  queue?: string;
  /** The workers' `--max-payload-bytes`; default 1 MiB. */
  maxPayloadBytes?: number;
}

export interface WaitOptions {
  /** Give up after this many milliseconds (default 60000); `Infinity` waits for ever. */
  timeoutMs?: number;
  /** How often to look, in milliseconds (default 100). */
  pollMs?: number;
}

export interface FollowAnswerOptions {
  /** Give up after this many milliseconds (default 60000); `Infinity` waits for ever. */
  timeoutMs?: number;
}

/**
 * What following a live answer yields: a piece of its text, or a restart. After a restart the
 * text so far is void (a call failed halfway): the retry's answer follows in full, from its
 * start, so a reader drops what it has (or shows it struck out) and starts again.
 */
export type AnswerEvent = { type: 'text'; text: string } | { type: 'restart'; error: string };

/** A dead letter (`llmq:{q}:dead`), as `llmq dlq list` shows it. */
export interface DeadLetter {
  /** The dead-entry id, e.g. `1763900000000-0`. */
  id: string;
  taskId: string;
  queue: string;
  error: string;
  class: string;
  attempts: number;
  failedAt: Date | null;
  /** The payload as it was when the task died. */
  task: string;
}

/** What replaying a dead letter did. */
export interface Replayed {
  /** `enqueued`: back in the stream; `gone`: someone else replayed or purged it meanwhile. */
  status: 'enqueued' | 'gone';
  taskId: string;
}

/** What {@link Queue.cancel} is to cancel; give at least one. */
export interface CancelOptions {
  /** Tasks, by the ids enqueue() returned: each wherever it is (queued, waiting, in a call). */
  taskIds?: readonly string[];
  /** Every task enqueued with this `batch_id`. */
  batch?: string;
  /** The tenant's tasks enqueued until now; its later ones run. */
  tenant?: string;
}

/**
 * What a cancel did to one thing it named: `cancelled` (its mark is set), or the status the
 * task had already ended with, for which no mark is set.
 */
export type CancelOutcome = 'cancelled' | 'succeeded' | 'failed' | 'dead';

/** A queue name as llmq takes one: it goes into `llmq:{<queue>}:...` keys verbatim. */
export function checkQueueName(name: unknown): asserts name is string {
  if (
    typeof name !== 'string' ||
    name.trim() === '' ||
    Buffer.byteLength(name, 'utf8') > 200 ||
    /[{}\u0000-\u001f\u007f-\u009f]/.test(name) ||
    !name.isWellFormed()
  ) {
    throw invalid(
      `Queue name ${JSON.stringify(name)} cannot be used: use 1 to 200 bytes without braces or control characters, such as default (letters, digits, -, _ and . are safest).`,
    );
  }
}

function timeoutOf(opts: WaitOptions | undefined, fallback: number): { deadline: number; ms: number; poll: number } {
  const ms = opts?.timeoutMs ?? fallback;
  const poll = opts?.pollMs ?? 100;
  if (typeof ms !== 'number' || Number.isNaN(ms) || ms < 0) {
    throw invalid(`The timeoutMs option must be a number of milliseconds of at least 0, not ${String(ms)}.`);
  }
  if (typeof poll !== 'number' || !Number.isFinite(poll) || poll < 1) {
    throw invalid(`The pollMs option must be a number of milliseconds of at least 1, not ${String(poll)}.`);
  }
  return { deadline: performance.now() + ms, ms, poll };
}

/** Milliseconds left until `deadline` on the monotonic clock (a wall clock may jump). */
const left = (deadline: number) => deadline - performance.now();

/** A task id as the worker stores results under: a canonical UUID. */
function checkTaskId(id: unknown): asserts id is string {
  if (typeof id !== 'string' || !CANONICAL_UUID.test(id)) {
    throw invalid(
      `${JSON.stringify(id) ?? String(id)} is not a task id; give the id enqueue() returned (a lower-case, hyphenated UUID).`,
    );
  }
}

/** A chain id as a worker takes one. */
function checkChainId(id: unknown): asserts id is string {
  if (typeof id !== 'string' || id.trim() === '' || [...id].length > 512 || /[\u0000-\u001f\u007f-\u009f]/.test(id)) {
    throw invalid(`${JSON.stringify(id) ?? String(id)} is not a chain id; give the id submitChain() returned.`);
  }
}

/** The ids of the tasks a cancel names (each once, in order) and its other marks. */
function cancelTargets(options: unknown): { ids: string[]; others: string[] } {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw invalid('`cancel` takes an object: { taskIds, batch, tenant }, each optional, at least one given.');
  }
  const o = options as Record<string, unknown>;
  const unknown = Object.keys(o).filter((k) => !['taskIds', 'batch', 'tenant'].includes(k));
  if (unknown.length > 0) {
    throw invalid(`\`cancel\` takes taskIds, batch and tenant, not ${unknown.map((k) => `\`${k}\``).join(', ')}.`);
  }
  const { taskIds, batch, tenant } = o;
  if (taskIds != null && !Array.isArray(taskIds)) {
    throw invalid(`The taskIds option must be an array of task ids, not ${JSON.stringify(taskIds) ?? String(taskIds)}.`);
  }
  const given: unknown[] = taskIds ?? [];
  given.forEach(checkTaskId);
  const ids = [...new Set(given as string[])];
  const others: string[] = [];
  if (batch != null) {
    if (typeof batch !== 'string' || !BATCH_ID.test(batch)) {
      throw invalid(
        `The batch option must be the batch_id its tasks were enqueued with: 1 to 128 letters, digits, \`-\`, \`_\`, \`.\` or \`:\`, not ${JSON.stringify(batch) ?? String(batch)}.`,
      );
    }
    others.push(`batch:${batch}`);
  }
  if (tenant != null) {
    const fix = 'give the tenant its tasks were enqueued with';
    if (typeof tenant !== 'string') throw invalid(`The tenant option must be a string, not ${JSON.stringify(tenant) ?? String(tenant)}; ${fix}.`);
    if (tenant === '') throw invalid('The tenant option is empty; give the tenant whose tasks to cancel, or leave it out.');
    if (!tenant.isWellFormed()) throw invalid(`The tenant option holds a lone UTF-16 surrogate, which no task's tenant has; ${fix}.`);
    const bytes = Buffer.byteLength(tenant, 'utf8');
    if (bytes > MAX_TENANT_BYTES) {
      throw invalid(`The tenant option is ${bytes} bytes long, and no task's tenant is longer than ${MAX_TENANT_BYTES}; ${fix}.`);
    }
    if (CONTROL.test(tenant)) {
      throw invalid(`The tenant option contains a control character (a newline, tab or NUL), which no task's tenant has; ${fix}.`);
    }
    others.push(`tenant:${tenant}`);
  }
  if (ids.length === 0 && others.length === 0) {
    throw invalid('`cancel` names nothing to cancel: give taskIds, batch or tenant.');
  }
  return { ids, others };
}

/**
 * The status of a task whose result record says it has ended, else `null`: no record, one
 * still `delayed`, or one llmq did not write (its mark is set, as `llmq cancel` sets it).
 */
function endedStatus(raw: string | null): CancelOutcome | null {
  if (raw === null) return null;
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch {
    return null;
  }
  const status = typeof v === 'object' && v !== null ? (v as { status?: unknown }).status : undefined;
  return typeof status === 'string' && ENDED.has(status) ? (status as CancelOutcome) : null;
}

const seconds = (ms: number) => `${Math.round(ms / 100) / 10}s`;

/** `s.parse::<u64>()` / `s.parse::<i64>()` as Rust reads a dead letter's numbers. */
function rustInt(s: string | undefined, signed: boolean): bigint | null {
  if (s === undefined || !(signed ? /^[+-]?[0-9]+$/ : /^\+?[0-9]+$/).test(s)) return null;
  const n = BigInt(s);
  const ok = signed ? n >= -(1n << 63n) && n < 1n << 63n : n < 1n << 64n;
  return ok ? n : null;
}

/** What a result record must at least be: an object with a status. */
function parseRecord(raw: string, what: string, fix: string): TaskRecord {
  let v: unknown;
  let why = '';
  try {
    v = JSON.parse(raw);
  } catch (e) {
    why = (e as Error).message;
  }
  if (why === '' && !(typeof v === 'object' && v !== null && !Array.isArray(v) && typeof (v as TaskRecord).status === 'string')) {
    why = 'not an object with a "status"';
  }
  if (why !== '') {
    throw new LlmqError(
      'bad_record',
      `${what} is not what llmq writes there (${why.replace(/[.\s]+$/, '')}); something else wrote it, so ${fix}.`,
    );
  }
  return v as TaskRecord;
}

/** @internal For the tests: the chain entries a queue keeps. */
export let chainEntriesOf: (q: Queue) => ReadonlyMap<string, string>;

/** A queue of llmq on one Redis connection. Make one with {@link connect}. */
export class Queue {
  readonly name: string;
  readonly #conn: Connection;
  readonly #maxPayloadBytes: number;
  /**
   * Stream entries of chains submitted here, to find a refused chain's reason: the newest
   * {@link CHAINS_KEPT}, each dropped once a follow of its chain has ended.
   */
  readonly #chainEntries = new Map<string, string>();

  static {
    chainEntriesOf = (q) => q.#chainEntries;
  }

  /** @internal Use {@link connect}. */
  constructor(conn: Connection, name: string, maxPayloadBytes: number) {
    checkQueueName(name);
    this.#conn = conn;
    this.name = name;
    this.#maxPayloadBytes = maxPayloadBytes;
  }

  /** Another queue on the same connection. */
  queue(name: string): Queue {
    return new Queue(this.#conn, name, this.#maxPayloadBytes);
  }

  /** A key of this queue: `llmq:{<queue>}:<rest>`. */
  key(rest: string): string {
    return `llmq:{${this.name}}:${rest}`;
  }

  async #redis<T>(f: (cmd: Commands) => Promise<T>): Promise<T> {
    try {
      return await f(this.#conn.cmd);
    } catch (e) {
      throw redisError(this.#conn.where, e);
    }
  }

  /**
   * Enqueues one task (one `XADD` of its envelope) and returns its id.
   *
   * @throws {LlmqError} `invalid` for a task a worker would refuse (nothing is written), `redis`.
   */
  async enqueue(task: Task): Promise<string> {
    const { id, json } = buildEnvelope(task, this.#maxPayloadBytes);
    await this.#redis((r) => r.xAdd(this.key('stream'), '*', { task: json }));
    return id;
  }

  /**
   * Enqueues tasks in order, 1000 to one MULTI/EXEC round trip, and returns their ids. Every
   * task is checked first: one a worker would refuse throws before anything is written.
   */
  async enqueueMany(tasks: readonly Task[]): Promise<string[]> {
    if (!Array.isArray(tasks)) throw invalid('`enqueueMany` takes an array of tasks.');
    const built = tasks.map((t, i) => {
      try {
        return buildEnvelope(t, this.#maxPayloadBytes);
      } catch (e) {
        const m = (e as Error).message;
        throw invalid(`Task ${i} of the batch: ${m} Nothing was enqueued.`);
      }
    });
    const ids = built.map((b) => b.id);
    const stream = this.key('stream');
    for (let at = 0; at < built.length; at += BATCH_CHUNK) {
      const chunk = built.slice(at, at + BATCH_CHUNK);
      const tx = this.#conn.multi(stream);
      for (const { json } of chunk) tx.xAdd(stream, '*', { task: json });
      try {
        await tx.exec();
      } catch (e) {
        // The error says which tasks went in: `enqueued` has their ids, which will run.
        const err = redisError(this.#conn.where, e);
        const after =
          err.code === 'redis_reply'
            ? 'the rest were not'
            : `the next ${chunk.length} may or may not have been (the connection broke as Redis ran them; look for them before sending them again), and the rest were not`;
        err.message += ` The first ${at} task(s) of the batch were enqueued (their ids are in the error's \`enqueued\`); ${after}.`;
        err.enqueued = ids.slice(0, at);
        throw err;
      }
    }
    return ids;
  }

  /**
   * The task's result record now, or `null` when it has none yet.
   *
   * @throws {LlmqError} `bad_record` for a record that is not what llmq writes.
   */
  async result(id: string): Promise<TaskRecord | null> {
    checkTaskId(id);
    const raw = await this.#redis((r) => r.get(this.key(`result:${id}`)));
    return raw === null ? null : this.#record(id, raw);
  }

  #record(id: string, raw: string): TaskRecord {
    const key = this.key(`result:${id}`);
    return parseRecord(raw, `The result record of task ${id} (${key})`, `look at it with \`llmq result ${id} --queue ${this.name}\` and delete the key if it is stray`);
  }

  /**
   * Waits until the task has a final record (`succeeded`, `failed` or `dead`) and returns it;
   * `delayed` (a retry pending) is waited through.
   *
   * @throws {LlmqError} `timeout` when it has none within `timeoutMs` (default 60 s).
   */
  async waitForResult(id: string, options?: WaitOptions): Promise<TaskRecord> {
    const [record] = await this.waitForResults([id], options);
    return record!;
  }

  /** Waits for several tasks at once (one `MGET` per look); records in the order of `ids`. */
  async waitForResults(ids: readonly string[], options?: WaitOptions): Promise<TaskRecord[]> {
    if (!Array.isArray(ids)) throw invalid('`waitForResults` takes an array of task ids.');
    ids.forEach(checkTaskId);
    const { deadline, ms, poll } = timeoutOf(options, 60_000);
    const done = new Map<string, TaskRecord>();
    for (;;) {
      const open = ids.filter((id) => !done.has(id));
      if (open.length === 0) return ids.map((id) => done.get(id)!);
      // The keys of a queue share one hash tag, so one MGET serves a cluster too.
      const raws = await this.#redis((r) => r.mGet(open.map((id) => this.key(`result:${id}`))));
      raws.forEach((raw, i) => {
        if (raw === null) return;
        const record = this.#record(open[i]!, raw);
        if (FINAL.has(record.status)) done.set(open[i]!, record);
      });
      if (ids.every((id) => done.has(id))) return ids.map((id) => done.get(id)!);
      if (left(deadline) <= 0) {
        const left = ids.filter((id) => !done.has(id));
        throw new LlmqError(
          'timeout',
          `Task ${left.slice(0, 3).join(', ')}${left.length > 3 ? ` and ${left.length - 3} more` : ''} did not reach a final status within ${seconds(ms)}; ` +
            `it is still in queue \`${this.name}\` (is a worker serving it?), so wait again or look with llmq result.`,
        );
      }
      await sleep(Math.max(0, Math.min(poll, left(deadline))));
    }
  }

  /**
   * Follows the live answer of a task enqueued with `stream: true`, as the worker writes it to
   * `llmq:{q}:out:<id>`: `{type: 'text', text}` for each piece, and `{type: 'restart', error}`
   * when a call failed after part of its answer, which voids the text so far (the retry's
   * answer follows in full). Ends when the answer is done or the task has a final record
   * (then read it with {@link waitForResult}).
   *
   * @throws {LlmqError} `timeout` when the task has not ended within `timeoutMs` (default 60 s).
   */
  async *followAnswer(id: string, options?: FollowAnswerOptions): AsyncGenerator<AnswerEvent, void, undefined> {
    checkTaskId(id);
    if (options !== undefined && 'onRestart' in options) {
      throw invalid("`followAnswer` takes no onRestart: it yields {type: 'restart'} events among {type: 'text'} ones; handle them in the loop.");
    }
    const { deadline, ms } = timeoutOf(options, 60_000);
    const out = this.key(`out:${id}`);
    let lease;
    try {
      lease = await this.#conn.lease();
    } catch (e) {
      throw redisError(this.#conn.where, e);
    }
    try {
      let after = '0';
      let ended = false;
      for (;;) {
        const remaining = left(deadline);
        if (remaining <= 0) {
          throw new LlmqError(
            'timeout',
            `The answer of task ${id} did not end within ${seconds(ms)}; it is still in queue \`${this.name}\`, so follow it again or wait for its result.`,
          );
        }
        // After the record turned final, one more read without blocking takes what is left.
        const block = ended ? undefined : Math.max(1, Math.min(1000, Math.floor(remaining)));
        let reply;
        try {
          reply = await lease.cmd.xRead({ key: out, id: after }, block === undefined ? { COUNT: 1000 } : { BLOCK: block, COUNT: 1000 });
        } catch (e) {
          throw redisError(this.#conn.where, e);
        }
        const entries: StreamEntry[] = reply?.[0]?.messages ?? [];
        for (const { id: entryId, message } of entries) {
          after = entryId;
          if (message.text !== undefined) yield { type: 'text', text: message.text };
          else if (message.event === 'restart') yield { type: 'restart', error: message.error ?? '' };
          else if (message.event === 'done') return;
        }
        if (ended && entries.length === 0) return;
        if (!ended && entries.length === 0) {
          const record = await this.result(id);
          ended = record !== null && FINAL.has(record.status);
        }
      }
    } finally {
      await lease.release();
    }
  }

  /**
   * Submits a chain (one `XADD` of its spec in the `chain` field) and returns its id. A worker
   * expands it; submitting the same `chain_id` again runs nothing twice.
   *
   * @throws {LlmqError} `invalid` for a chain the client can tell is wrong (nothing is written).
   */
  async submitChain(chain: Chain): Promise<string> {
    const { chainId, json } = buildChain(chain, this.#maxPayloadBytes, this.name);
    const entry = await this.#redis((r) => r.xAdd(this.key('stream'), '*', { chain: json }));
    this.#chainEntries.delete(chainId);
    this.#chainEntries.set(chainId, entry);
    for (const old of this.#chainEntries.keys()) {
      if (this.#chainEntries.size <= CHAINS_KEPT) break;
      this.#chainEntries.delete(old);
    }
    return chainId;
  }

  /**
   * Follows a chain: an event for each step whenever its state changes (first its state when
   * the follow begins), then one `end` event with the chain's final state and every step.
   *
   * @throws {LlmqError} `refused` when the worker refused a chain submitted by this client (its
   * reason), `timeout` when it has not ended within `timeoutMs` (default 10 minutes).
   */
  async *followChain(chainId: string, options?: WaitOptions): AsyncGenerator<ChainEvent, void, undefined> {
    checkChainId(chainId);
    const { deadline, ms, poll } = timeoutOf(options, 600_000);
    const seen = new Map<string, string>();
    const entry = this.#chainEntries.get(chainId);
    const stepsKey = this.key(`chain:${chainId}:steps`);
    for (;;) {
      const [state, rawSteps] = await this.#redis((r) =>
        Promise.all([r.hGet(this.key(`chain:${chainId}`), 'state'), r.hGetAll(stepsKey)]),
      );
      const steps: Record<string, StepState> = {};
      for (const [name, raw] of Object.entries(rawSteps)) {
        const step = parseRecord(
          raw,
          `The state of step \`${name}\` of chain ${chainId} (${stepsKey})`,
          `look at it with \`llmq chain show ${chainId} --queue ${this.name}\``,
        ) as unknown as StepState;
        steps[name] = step;
        const mark = `${step.status}/${step.round}/${step.task_id}`;
        if (seen.get(name) !== mark) {
          seen.set(name, mark);
          yield { type: 'step', chainId, step: name, state: step };
        }
      }
      if (state && state !== 'running') {
        this.#chainEntries.delete(chainId);
        yield { type: 'end', chainId, state: state as ChainState, steps };
        return;
      }
      if (!state && entry !== undefined) {
        // A chain the worker refused is a dead letter with a record under the entry's derived id.
        const record = await this.result(deriveId(this.name, entry));
        if (record !== null && record.status === 'dead') {
          this.#chainEntries.delete(chainId);
          throw new LlmqError('refused', `Chain ${chainId} was refused by the worker: ${record.error ?? 'no reason given'}; nothing of it ran.`);
        }
      }
      if (left(deadline) <= 0) {
        throw new LlmqError(
          'timeout',
          state
            ? `Chain ${chainId} did not end within ${seconds(ms)}; it still runs in queue \`${this.name}\`, so follow it again or look with llmq chain show ${chainId}.`
            : `Chain ${chainId} did not appear in queue \`${this.name}\` within ${seconds(ms)}; check the chain id and the queue, and that a worker serves it.`,
        );
      }
      await sleep(Math.max(0, Math.min(poll, left(deadline))));
    }
  }

  #deadLetter(e: StreamEntry): DeadLetter {
    const f = e.message;
    const task = f.task ?? '';
    const failedAt = rustInt(f.failed_at, true);
    const when = failedAt === null ? null : new Date(Number(failedAt));
    return {
      id: e.id,
      // As the worker finds it: the payload's id if it is a UUID it parses, else derived.
      taskId: taskIdOf(this.name, f.entry_id ?? '', task),
      queue: this.name,
      error: f.error ?? '',
      class: f.class ?? '',
      attempts: Number(rustInt(f.attempts, false) ?? 0n),
      failedAt: when === null || Number.isNaN(when.getTime()) ? null : when,
      task,
    };
  }

  /** The queue's dead letters, newest first, at most `limit` (default 100, at most 1000). */
  async deadLetters(options?: { limit?: number }): Promise<DeadLetter[]> {
    const limit = options?.limit ?? 100;
    if (!Number.isSafeInteger(limit) || limit < 1 || limit > MAX_DEAD_LETTERS) {
      throw invalid(
        `The limit must be a whole number from 1 to ${MAX_DEAD_LETTERS}, not ${String(limit)}; each letter may be as large as a task, so read more a page at a time (llmq dlq list pages them too).`,
      );
    }
    const entries = await this.#redis((r) => r.xRevRange(this.key('dead'), '+', '-', { COUNT: limit }));
    return entries.map((e) => this.#deadLetter(e));
  }

  /**
   * The dead letter with this dead-entry id, or the newest with this task id among the newest
   * {@link DEAD_SCAN} letters; `null` when there is none.
   */
  async #findDead(id: string): Promise<DeadLetter | null> {
    const dead = this.key('dead');
    const [ms, seq] = id.split('-');
    if (/^[0-9]+-[0-9]+$/.test(id) && BigInt(ms!) < 1n << 64n && BigInt(seq!) < 1n << 64n) {
      const [e] = await this.#redis((r) => r.xRange(dead, id, id));
      return e === undefined ? null : this.#deadLetter(e);
    }
    const taskId = canonicalUuid(id);
    if (taskId === null) {
      throw invalid(
        `${JSON.stringify(id)} is neither a dead-entry id (such as 1763900000000-0) nor a task id (a UUID); give one that deadLetters() lists.`,
      );
    }
    let end = '+';
    for (let read = 0; read < DEAD_SCAN; ) {
      const count = Math.min(500, DEAD_SCAN - read);
      const page = await this.#redis((r) => r.xRevRange(dead, end, '-', { COUNT: count }));
      const found = page.map((e) => this.#deadLetter(e)).find((d) => d.taskId === taskId);
      if (found) return found;
      if (page.length < count) return null;
      read += page.length;
      end = `(${page[page.length - 1]!.id}`;
    }
    throw new LlmqError(
      'not_found',
      `Task ${taskId} has no dead letter among the newest ${DEAD_SCAN} of queue \`${this.name}\`, and a replay by task id looks no further; give the letter's dead-entry id instead (deadLetters() or llmq dlq list --queue ${this.name} list them).`,
    );
  }

  /**
   * Replays a dead letter (by dead-entry id or task id) as `llmq dlq replay` does: its
   * envelope with attempts reset ({@link replayedTask}) goes back to the stream, and the dead
   * letter and the task's record are deleted, in one script (llmq's replay.lua).
   *
   * @throws {LlmqError} `not_found` for no such dead letter, `refused` for a chain step's.
   */
  async replay(id: string, options?: { provider?: string }): Promise<Replayed> {
    if (typeof id !== 'string' || id === '') throw invalid('Give the dead-entry id or the task id of the dead letter to replay.');
    const provider = options?.provider;
    if (provider !== undefined && (typeof provider !== 'string' || provider === '' || provider.includes('\0'))) {
      throw invalid('The provider must be the non-empty name of a provider in the workers\' provider file.');
    }
    const d = await this.#findDead(id);
    if (d === null) {
      throw new LlmqError(
        'not_found',
        `There is no dead letter ${id} in queue \`${this.name}\`; list them with deadLetters() (or llmq dlq list --queue ${this.name}).`,
      );
    }
    const step = chainStepOf(d.task);
    if (step !== null) {
      const [chain, name] = step;
      throw new LlmqError(
        'refused',
        `Dead letter ${d.id} is step \`${name}\` of chain ${chain}, and resuming a chain is the llmq binary's job; ` +
          `run \`llmq dlq replay ${d.id} --queue ${this.name}\` or \`llmq chain retry ${chain} --from ${name} --queue ${this.name}\`.`,
      );
    }
    const task = replayedTask(d.task, d.taskId, provider);
    const script = { keys: [this.key('dead'), this.key('stream'), this.key(`result:${d.taskId}`)], arguments: [d.id, task] };
    const replayed = await this.#redis(async (r) => {
      try {
        return await r.evalSha(REPLAY_SHA, script);
      } catch (e) {
        if (!/NOSCRIPT/.test((e as Error)?.message ?? '')) throw e;
        return r.eval(REPLAY_LUA, script);
      }
    });
    return { status: replayed === 1 ? 'enqueued' : 'gone', taskId: d.taskId };
  }

  /**
   * Cancels tasks: those of `taskIds` wherever they are, every task enqueued with `batch_id`
   * `batch`, and `tenant`'s tasks enqueued until now (its later ones run). One `MGET` of the
   * tasks' records, then one `ZADD llmq:{q}:cancels GT` of every mark (docs/wire-format.md,
   * "Cancelling"). Workers act within a second: a queued task never runs, a call in flight is
   * dropped, and the task ends with status `cancelled`. A task that had already ended is left
   * as it was, with no mark.
   *
   * A tenant's cutoff is this machine's clock (`Date.now()`): a client whose clock is far
   * behind Redis's may miss the tenant's tasks enqueued just before.
   *
   * @returns For each thing named, by `task:<id>`, `batch:<id>` and `tenant:<name>`:
   * `cancelled` (its mark is set) or the status the task had ended with (`succeeded`,
   * `failed`, `dead`, or `cancelled` already).
   * @throws {LlmqError} `invalid` for a task id that is not one, a batch id or tenant no task
   * could carry, or nothing named (nothing is sent).
   */
  async cancel(options: CancelOptions): Promise<Record<string, CancelOutcome>> {
    const { ids, others } = cancelTargets(options);
    const named = [...ids.map((id) => `task:${id}`), ...others];
    const ended = new Map<string, CancelOutcome>();
    if (ids.length > 0) {
      // The keys of a queue share one hash tag, so one MGET serves a cluster too.
      const raws = await this.#redis((r) => r.mGet(ids.map((id) => this.key(`result:${id}`))));
      raws.forEach((raw, i) => {
        const status = endedStatus(raw);
        if (status !== null) ended.set(`task:${ids[i]!}`, status);
      });
    }
    const marks = named.filter((m) => !ended.has(m));
    if (marks.length > 0) {
      const now = Date.now();
      const members = marks.map((value) => ({ score: now, value }));
      await this.#redis((r) => r.zAdd(this.key('cancels'), members, { comparison: 'GT' }));
    }
    return Object.fromEntries(named.map((m) => [m, ended.get(m) ?? 'cancelled']));
  }

  /** Closes the connection (every queue made from it with {@link queue} too). */
  async close(): Promise<void> {
    await this.#conn.close().catch(() => undefined);
  }
}

/**
 * Connects to Redis and returns the queue to work with.
 *
 * @throws {LlmqError} `invalid` for a bad queue name, `url` for a Redis URL llmq does not read,
 * `redis` when Redis cannot be reached.
 */
export async function connect(options: ConnectOptions = {}): Promise<Queue> {
  const queue = options.queue ?? 'default';
  checkQueueName(queue);
  const max = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  if (!Number.isSafeInteger(max) || max < 1) {
    throw invalid(`maxPayloadBytes must be a whole number of bytes, as the workers' --max-payload-bytes, not ${String(max)}.`);
  }
  const url = options.url ?? process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
  const conn = await connectRedis(url);
  return new Queue(conn, queue, max);
}
