import { createHash } from 'node:crypto';

/** The OID namespace llmq derives task ids in (shared/src/envelope.rs, `derive_id`). */
const NAMESPACE_OID = '6ba7b812-9dad-11d1-80b4-00c04fd430c8';

/** A canonical UUID: lower-case hex, hyphenated; what the worker stores results under. */
export const CANONICAL_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function hex(bytes: Uint8Array): string {
  const h = Buffer.from(bytes).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** UUID version 5 of `name` in `namespace` (RFC 9562). */
export function uuid5(namespace: string, name: string): string {
  const ns = Buffer.from(namespace.replace(/-/g, ''), 'hex');
  const digest = createHash('sha1').update(ns).update(name, 'utf8').digest();
  const bytes = digest.subarray(0, 16);
  bytes[6] = (bytes[6]! & 0x0f) | 0x50;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  return hex(bytes);
}

/** The id a worker gives a task whose envelope has none: from where it sat in the stream. */
export function deriveId(queue: string, entryId: string): string {
  return uuid5(NAMESPACE_OID, `llmq:${queue}:${entryId}`);
}

/**
 * A UUID in any spelling the worker parses (hyphenated, simple, braced, `urn:uuid:`, any
 * case), in canonical form; `null` when it is none.
 */
export function canonicalUuid(text: string): string | null {
  let t = text;
  if (/^urn:uuid:/i.test(t)) t = t.slice(9);
  else if (t.startsWith('{') && t.endsWith('}')) t = t.slice(1, -1);
  const simple = /^[0-9a-fA-F]{32}$/.test(t);
  const hyphenated = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/.test(t);
  if (!simple && !hyphenated) return null;
  return hex(Buffer.from(t.replace(/-/g, ''), 'hex'));
}
