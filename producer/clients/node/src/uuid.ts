import { createHash } from 'node:crypto';

/** The OID namespace llmq derives task ids in (shared/src/envelope.rs, `derive_id`). */
const NAMESPACE_OID = '6ba7b812-9dad-11d1-80b4-00c04fd430c8';

/** A canonical UUID: lower-case hex, hyphenated; what the worker stores results under. */
export const CANONICAL_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function spell(bytes: Uint8Array): string {
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
  return spell(bytes);
}

/** The id a worker gives a task whose envelope has none: from where it sat in the stream. */
export function deriveId(queue: string, entryId: string): string {
  return uuid5(NAMESPACE_OID, `llmq:${queue}:${entryId}`);
}

/**
 * The id a worker gives a chain submitted with `idempotency_key` `key` and no `chain_id`
 * (`chain_id` in shared/src/idempotency.rs): UUID version 5, in the OID namespace, of
 * `llmq-chain-key:<queue>:<tenant's length in UTF-8 bytes>:<tenant>:<key>`, the tenant empty
 * when the chain names none. Submitting it twice names one chain.
 */
export function chainKeyId(queue: string, tenant: string | undefined, key: string): string {
  const t = tenant ?? '';
  return uuid5(NAMESPACE_OID, `llmq-chain-key:${queue}:${Buffer.byteLength(t, 'utf8')}:${t}:${key}`);
}

const HEX32 = /^[0-9a-fA-F]{32}$/;
const HYPHENATED = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

/**
 * A UUID in a spelling the worker parses (`Uuid::parse_str` of the uuid crate), in canonical
 * form; `null` for any other. Exactly four spellings, hex digits in either case: 32 digits
 * (`0b6f...1b90`), hyphenated (`0b6f4c2e-8a57-...`), hyphenated in braces (`{0b6f4c2e-...}`),
 * and hyphenated after `urn:uuid:` (the prefix in any case). Not 32 digits in braces, nor
 * anything with spaces, other hyphens or other brackets.
 */
export function canonicalUuid(text: string): string | null {
  let hex: string | null = null;
  if (HEX32.test(text)) hex = text;
  else if (HYPHENATED.test(text)) hex = text;
  else if (text.length === 38 && text.startsWith('{') && text.endsWith('}') && HYPHENATED.test(text.slice(1, -1))) {
    hex = text.slice(1, -1);
  } else if (text.length === 45 && /^urn:uuid:/i.test(text) && HYPHENATED.test(text.slice(9))) {
    hex = text.slice(9);
  }
  return hex === null ? null : spell(Buffer.from(hex.replace(/-/g, ''), 'hex'));
}
