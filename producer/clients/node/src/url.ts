// REDIS_URL as every llmq binary reads it (shared/src/queue/conn.rs, docs/configuration.md
// "Redis: one server or a cluster"):
//   redis://[user:password@]host:port[/db]            one Redis
//   rediss://...                                      one Redis over TLS
//   redis+cluster://[user:password@]host:port[,...]   a Redis Cluster (seeds; the rest is found)
//   rediss+cluster://...                              a Redis Cluster over TLS
//   redis+sentinel://[:password@]host:port[,...]/MASTER[/db]   the master Sentinel names
//   rediss+sentinel://...                             the same, the master over TLS

import { LlmqError } from './errors.js';

export interface HostPort {
  host: string;
  port: number;
}

/** What a Redis URL names. */
export type RedisTarget =
  | { kind: 'single'; url: string }
  | {
      kind: 'cluster';
      seeds: HostPort[];
      username?: string;
      password?: string;
      tls: boolean;
    }
  | {
      kind: 'sentinel';
      sentinels: HostPort[];
      master: string;
      db: number;
      username?: string;
      password?: string;
      tls: boolean;
    };

const FORMS =
  'redis://host:port[/db], rediss://host:port[/db], redis+cluster://host:port[,host:port...], ' +
  'rediss+cluster:// (the same over TLS), redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db] or rediss+sentinel:// (the same, the master over TLS)';

/** `url` without its user info or query, for messages (as llmq prints URLs). */
export function withoutCredentials(url: string): string {
  const start = url.includes('://') ? url.indexOf('://') + 3 : 0;
  const slash = url.indexOf('/', start);
  const end = slash < 0 ? url.length : slash;
  const at = url.slice(start, end).lastIndexOf('@');
  const host = at < 0 ? start : start + at + 1;
  const q = url.slice(host).search(/[?#]/);
  const query = q < 0 ? -1 : host + q;
  if (at < 0 && query < 0) return url;
  return (
    url.slice(0, start) +
    (at < 0 ? '' : '***@') +
    url.slice(host, query < 0 ? url.length : query) +
    (query < 0 ? '' : '?…')
  );
}

function bad(url: string, why: string): LlmqError {
  return new LlmqError('url', `Bad Redis URL \`${withoutCredentials(url)}\`: ${why}.`);
}

/** `user:password` (either part may be empty) as the two credentials, percent-decoded. */
function credentials(url: string, userinfo: string): { username?: string; password?: string } {
  const colon = userinfo.indexOf(':');
  const [user, pass] = colon < 0 ? [userinfo, ''] : [userinfo.slice(0, colon), userinfo.slice(colon + 1)];
  try {
    const out: { username?: string; password?: string } = {};
    if (user !== '') out.username = decodeURIComponent(user);
    if (pass !== '') out.password = decodeURIComponent(pass);
    return out;
  } catch {
    throw bad(url, 'its user name or password has a broken %-escape; write a literal % as %25');
  }
}

/** `host:port`, `[v6]:port` or `host` (port 6379, as redis-rs takes it). */
function hostPort(url: string, text: string): HostPort {
  let parsed: URL;
  try {
    parsed = new URL(`redis://${text}`);
  } catch {
    throw bad(url, `\`${text}\` is not host:port`);
  }
  if (parsed.hostname === '' || parsed.pathname !== '' || parsed.search !== '' || parsed.username !== '') {
    throw bad(url, `\`${text}\` is not host:port`);
  }
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  return { host, port: parsed.port === '' ? 6379 : Number(parsed.port) };
}

/** Splits `[userinfo@]rest` at the last `@`, as llmq does (a password may hold `@`). */
function splitUserinfo(rest: string): [string, string] {
  const at = rest.lastIndexOf('@');
  return at < 0 ? ['', rest] : [rest.slice(0, at), rest.slice(at + 1)];
}

function hosts(url: string, list: string): HostPort[] {
  return list
    .split(',')
    .map((h) => h.trim())
    .filter((h) => h !== '')
    .map((h) => hostPort(url, h));
}

/**
 * Reads a Redis URL exactly as the llmq binaries take it.
 *
 * @throws {LlmqError} code `url`: a sentence naming what is wrong and the forms that work.
 */
export function parseRedisUrl(url: string): RedisTarget {
  if (typeof url !== 'string' || url.trim() === '') {
    throw new LlmqError('url', `The Redis URL is empty; give one such as redis://127.0.0.1:6379 (forms: ${FORMS}).`);
  }
  const scheme = /^([a-z+]+):\/\//i.exec(url)?.[1]?.toLowerCase();
  switch (scheme) {
    case 'redis':
    case 'rediss': {
      let parsed: URL;
      try {
        parsed = new URL(url);
      } catch {
        throw bad(url, `it is not a URL; write it as ${scheme}://[user:password@]host:port[/db]`);
      }
      if (parsed.hostname === '') throw bad(url, `it names no host; write it as ${scheme}://host:port[/db]`);
      const db = parsed.pathname.replace(/^\//, '');
      if (db !== '' && !/^\d+$/.test(db)) {
        throw bad(url, `\`${db}\` is not a database number; end it with /0, /1, ... or nothing`);
      }
      credentials(url, `${parsed.username}${parsed.password === '' ? '' : `:${parsed.password}`}`);
      return { kind: 'single', url };
    }
    case 'redis+cluster':
    case 'rediss+cluster': {
      const [userinfo, rest] = splitUserinfo(url.slice(scheme.length + 3));
      // The path and query, if any, are ignored, as llmq ignores them.
      const seeds = hosts(url, rest.split(/[/?]/)[0] ?? '');
      if (seeds.length === 0) {
        throw bad(url, 'a cluster URL needs at least one seed node: redis+cluster://host:port[,host:port...]');
      }
      return { kind: 'cluster', seeds, tls: scheme === 'rediss+cluster', ...credentials(url, userinfo) };
    }
    case 'redis+sentinel':
    case 'rediss+sentinel': {
      const [userinfo, rest] = splitUserinfo(url.slice(scheme.length + 3));
      const [list = '', master = '', db = ''] = rest.split('/');
      const sentinels = hosts(url, list);
      if (sentinels.length === 0 || master === '') {
        throw bad(
          url,
          "a Sentinel URL needs the sentinels and the master's name: redis+sentinel://host:port[,host:port...]/MASTER_NAME",
        );
      }
      if (db !== '' && !/^\d+$/.test(db)) {
        throw bad(url, `\`${db}\` is not a database number; end it with /MASTER_NAME/0, /MASTER_NAME/1, ... or /MASTER_NAME`);
      }
      return {
        kind: 'sentinel',
        sentinels,
        master,
        db: db === '' ? 0 : Number(db),
        tls: scheme === 'rediss+sentinel',
        ...credentials(url, userinfo),
      };
    }
    default:
      throw bad(url, `llmq reads only these forms: ${FORMS}`);
  }
}
