// One Redis, a Redis Cluster or Sentinel's master, behind the few commands the client uses.
// node-redis v5 types its clients with deep generics; this file alone touches them.

import { createClient, createCluster, createSentinel, ErrorReply, MultiErrorReply } from 'redis';

import { LlmqError } from './errors.js';
import { parseRedisUrl, withoutCredentials, type RedisTarget } from './url.js';

export interface StreamEntry {
  id: string;
  message: Record<string, string>;
}

/** The commands the client sends, as node-redis v5 names them. */
export interface Commands {
  xAdd(key: string, id: string, message: Record<string, string>): Promise<string>;
  get(key: string): Promise<string | null>;
  mGet(keys: string[]): Promise<(string | null)[]>;
  zAdd(key: string, members: { score: number; value: string }[], options?: { comparison?: 'GT' | 'LT' }): Promise<unknown>;
  hGet(key: string, field: string): Promise<string | null | undefined>;
  hGetAll(key: string): Promise<Record<string, string>>;
  xRange(key: string, start: string, end: string, options?: { COUNT: number }): Promise<StreamEntry[]>;
  xRevRange(key: string, end: string, start: string, options?: { COUNT: number }): Promise<StreamEntry[]>;
  xRead(
    stream: { key: string; id: string },
    options?: { BLOCK?: number; COUNT?: number },
  ): Promise<{ name: string; messages: StreamEntry[] }[] | null>;
  evalSha(sha: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
  eval(script: string, options: { keys: string[]; arguments: string[] }): Promise<unknown>;
}

/** A MULTI ... EXEC of XADDs. */
export interface Transaction {
  xAdd(key: string, id: string, message: Record<string, string>): Transaction;
  exec(): Promise<unknown[]>;
}

/** A connection for blocking reads, released after. */
export interface Lease {
  cmd: Commands;
  release(): Promise<void>;
}

export interface Connection {
  /** The URL without its credentials, for messages. */
  readonly where: string;
  readonly cmd: Commands;
  /** A transaction whose keys all hash to the slot of `routingKey`. */
  multi(routingKey: string): Transaction;
  /** A connection of its own, for a blocking read that must not hold up other commands. */
  lease(): Promise<Lease>;
  close(): Promise<void>;
}

const CONNECT_TIMEOUT_MS = 5000;

/** The sentence for a Redis that cannot be reached, or that answered a command with an error. */
export function redisError(where: string, e: unknown): LlmqError {
  if (e instanceof LlmqError) return e;
  const err = e as { message?: string; errors?: { message?: string }[] } | undefined;
  // A transaction's error: the first command's that failed says what happened.
  const first = e instanceof MultiErrorReply ? [...e.errors()][0]?.message : undefined;
  const detail = (
    first ||
    err?.message ||
    (err?.errors ?? []).map((x) => x.message).filter(Boolean).join('; ') ||
    String(e) ||
    'no reason given'
  ).replace(/[.\s]+$/, '');
  if (/cluster support disabled/i.test(detail)) {
    return new LlmqError(
      'redis',
      `The Redis URL names a Redis Cluster (redis+cluster://), but ${where} is not in cluster mode (${detail}); use redis://host:port for a single Redis.`,
      { cause: e },
    );
  }
  if (e instanceof ErrorReply) {
    // Redis is there and said no: say what it said, and what that usually means.
    const kind = /^[A-Z]+/.exec(detail)?.[0] ?? '';
    const hint =
      {
        WRONGTYPE: 'a key of the queue holds another kind of value than llmq writes there; look at the key (another program may share this Redis) and delete it if it is stray',
        OOM: 'Redis is out of memory under its maxmemory setting; free memory (trim or purge dead letters, expire results) or raise maxmemory',
        READONLY: 'the URL names a read-only replica; point it at the master (or use redis+sentinel:// to find it)',
        NOPERM: "the Redis user may not run this command or touch these keys; grant it llmq's keys (~llmq:*) and commands in its ACL",
        NOAUTH: 'Redis wants a password; put it in the URL (redis://:password@host:port)',
        WRONGPASS: 'the user name or password in the URL is wrong',
        MISCONF: 'Redis cannot save to disk and refuses writes; fix its persistence (see its log)',
        BUSY: 'Redis is busy running a script; wait, or end the script with SCRIPT KILL',
        LOADING: 'Redis is loading its data set; wait until it has',
        CROSSSLOT: "the keys are not in one cluster slot; the queue's keys share a hash tag, so check the queue name",
      }[kind] ?? 'see what it said, fix that and try again';
    return new LlmqError('redis_reply', `Redis at ${where} refused the command: ${detail}; ${hint}.`, { cause: e });
  }
  return new LlmqError(
    'redis',
    `Cannot reach Redis at ${where} (${detail}); check the URL and that Redis is running and reachable.`,
    { cause: e },
  );
}

/**
 * Gives up on a first connection after a few tries (so a wrong URL is an error, not a hang),
 * and reconnects for ever once it has been connected.
 */
function reconnect(state: { connected: boolean }) {
  return (retries: number, cause: Error) =>
    !state.connected && retries >= 4 ? cause : Math.min(100 * 2 ** retries, 2000);
}

type Closable = { close(): Promise<void>; on(event: 'error', f: (e: Error) => void): unknown };

async function opened<T extends Closable>(client: T, connect: () => Promise<unknown>, where: string, state: { connected: boolean }): Promise<T> {
  let last: Error | undefined;
  client.on('error', (e: Error) => {
    last = e;
  });
  try {
    await connect();
  } catch (e) {
    await client.close().catch(() => undefined);
    throw redisError(where, e ?? last);
  }
  state.connected = true;
  return client;
}

/** One command to one node with a throwaway connection that does not retry. */
async function probe(node: { host: string; port: number }, tls: boolean, args: string[]): Promise<unknown> {
  const client = createClient({
    socket: { host: node.host, port: node.port, connectTimeout: CONNECT_TIMEOUT_MS, reconnectStrategy: false, ...(tls ? { tls: true as const } : {}) },
  });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return await client.sendCommand(args);
  } finally {
    await client.close().catch(() => undefined);
  }
}

type Connectable = Closable & { connect(): Promise<unknown> };

/**
 * The connection over `client` (already open): its commands, its transactions by `multi`, and
 * leases that are clients of their own, made by `make` and opened as `client` was.
 */
function connection<C extends Connectable>(
  where: string,
  client: C,
  make: () => { c: Connectable; state: { connected: boolean } },
  multi: (routingKey: string) => Transaction,
): Connection {
  return {
    where,
    cmd: client as unknown as Commands,
    multi,
    lease: async () => {
      const { c: dup, state: s } = make();
      await opened(dup, () => dup.connect(), where, s);
      return { cmd: dup as unknown as Commands, release: () => dup.close().catch(() => undefined) };
    },
    close: () => client.close(),
  };
}

const nodes = (list: { host: string; port: number }[]) => list.map(({ host, port }) => `${host}:${port}`).join(', ');

function single(target: Extract<RedisTarget, { kind: 'single' }>, where: string): () => Promise<Connection> {
  return async () => {
    const state = { connected: false };
    const options = {
      url: target.url,
      socket: { connectTimeout: CONNECT_TIMEOUT_MS, reconnectStrategy: reconnect(state) },
      // A command while Redis is away fails at once (a sentence), instead of waiting unbounded.
      disableOfflineQueue: true,
    };
    const client = createClient(options);
    await opened(client, () => client.connect(), where, state);
    const fresh = () => {
      const s = { connected: false };
      return { c: client.duplicate({ socket: { ...options.socket, reconnectStrategy: reconnect(s) } }), state: s };
    };
    return connection(where, client, fresh, () => client.multi() as unknown as Transaction);
  };
}

function cluster(target: Extract<RedisTarget, { kind: 'cluster' }>, where: string): () => Promise<Connection> {
  return async () => {
    const make = () => {
      const state = { connected: false };
      const c = createCluster({
        rootNodes: target.seeds.map(({ host, port }) => ({ socket: { host, port } })),
        defaults: {
          ...(target.username === undefined ? {} : { username: target.username }),
          ...(target.password === undefined ? {} : { password: target.password }),
          disableOfflineQueue: true,
          socket: {
            connectTimeout: CONNECT_TIMEOUT_MS,
            reconnectStrategy: reconnect(state),
            ...(target.tls ? { tls: true as const } : {}),
          },
        },
      });
      return { c, state };
    };
    const { c: client, state } = make();
    try {
      await opened(client, () => client.connect(), where, state);
    } catch (e) {
      // Say which: a seed that is not in cluster mode, or no seed that answers (as llmq says).
      let last: unknown = e;
      for (const seed of target.seeds) {
        try {
          await probe(seed, target.tls, ['CLUSTER', 'INFO']);
        } catch (p) {
          if (/cluster support disabled/i.test((p as Error)?.message ?? '')) {
            throw new LlmqError(
              'redis',
              `The Redis URL names a Redis Cluster (redis+cluster://), but ${seed.host}:${seed.port} is not in cluster mode; use redis://host:port for a single Redis.`,
            );
          }
          last = p;
        }
      }
      const why = (last as Error)?.message || (e as Error)?.message || String(e);
      throw new LlmqError(
        'redis',
        `No seed node of the Redis Cluster answered (${nodes(target.seeds)}): ${why}; check the seeds in the Redis URL and that the cluster is up.`,
        { cause: e },
      );
    }
    return connection(where, client, make, (routingKey: string) => client.multi(routingKey) as unknown as Transaction);
  };
}

/**
 * Asks the sentinels for the master first, as llmq does, so that a wrong URL is one sentence
 * at once (node-redis's Sentinel client would retry and log for a while).
 */
async function resolveMaster(target: Extract<RedisTarget, { kind: 'sentinel' }>): Promise<void> {
  let last: unknown;
  for (const s of target.sentinels) {
    let addr: unknown;
    try {
      addr = await probe(s, false, ['SENTINEL', 'get-master-addr-by-name', target.master]);
    } catch (e) {
      last = e;
      continue;
    }
    if (addr === null) {
      throw new LlmqError(
        'redis',
        `The sentinels know no master named \`${target.master}\`; check the name at the end of the Redis URL.`,
      );
    }
    return;
  }
  throw new LlmqError(
    'redis',
    `No sentinel named a reachable master \`${target.master}\` (${nodes(target.sentinels)}): ${(last as Error)?.message ?? String(last)}; check the sentinels' addresses in the Redis URL.`,
    { cause: last },
  );
}

function sentinel(target: Extract<RedisTarget, { kind: 'sentinel' }>, where: string): () => Promise<Connection> {
  return async () => {
    const make = () => {
      const state = { connected: false };
      const c = createSentinel({
        name: target.master,
        sentinelRootNodes: target.sentinels,
        // The credentials and TLS are the master's; the sentinels are asked without, as llmq asks them.
        nodeClientOptions: {
          ...(target.username === undefined ? {} : { username: target.username }),
          ...(target.password === undefined ? {} : { password: target.password }),
          database: target.db,
          disableOfflineQueue: true,
          socket: {
            connectTimeout: CONNECT_TIMEOUT_MS,
            reconnectStrategy: reconnect(state),
            ...(target.tls ? { tls: true as const } : {}),
          },
        },
        sentinelClientOptions: { socket: { connectTimeout: CONNECT_TIMEOUT_MS, reconnectStrategy: reconnect(state) } },
      });
      return { c, state };
    };
    await resolveMaster(target);
    const { c: client, state } = make();
    await opened(client, () => client.connect(), where, state);
    return connection(where, client, make, () => client.multi() as unknown as Transaction);
  };
}

/**
 * Connects to what `url` names.
 *
 * @throws {LlmqError} code `url` for a URL llmq does not read, `redis` when Redis cannot be reached.
 */
export async function connectRedis(url: string): Promise<Connection> {
  const target = parseRedisUrl(url);
  const where = withoutCredentials(url);
  switch (target.kind) {
    case 'single':
      return single(target, where)();
    case 'cluster':
      return cluster(target, where)();
    case 'sentinel':
      return sentinel(target, where)();
  }
}
