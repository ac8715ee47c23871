// What llmq's Rust side reads and writes, done the same way here: serde_json's JSON (its
// nesting limit, its numbers, its float formatting), humantime's durations, chrono's times and
// Rust's idea of whitespace. The client checks what it writes with these, and re-encodes a
// dead letter's envelope with them exactly as `llmq dlq replay` does (replay.ts).

/** `char::is_whitespace` (Unicode White_Space), which Rust's trim and humantime use. */
const RUST_SPACE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$/u;

export function isRustSpace(c: string): boolean {
  return RUST_SPACE.test(c);
}

/** `str::trim_start`. */
export function rustTrimStart(s: string): string {
  let i = 0;
  for (const c of s) {
    if (!isRustSpace(c)) break;
    i += c.length;
  }
  return s.slice(i);
}

/** `str::trim`. */
export function rustTrim(s: string): string {
  const chars = [...rustTrimStart(s)];
  while (chars.length > 0 && isRustSpace(chars[chars.length - 1]!)) chars.pop();
  return chars.join('');
}

/** `crate::text::excerpt`: the text trimmed, cut after `max` characters with an ellipsis. */
export function excerpt(text: string, max: number): string {
  const chars = [...rustTrim(text)];
  return chars.length > max ? `${chars.slice(0, max).join('')}…` : chars.join('');
}

// ---------------------------------------------------------------------------------------------
// JSON as serde_json reads it.

/** A JSON number as serde_json holds it: an unsigned or a negative 64-bit integer, or an f64. */
export type JsonNumber =
  | { k: 'num'; kind: 'u64' | 'i64'; int: bigint; raw: string }
  | { k: 'num'; kind: 'f64'; f: number; raw: string };

/** A parsed JSON value; objects keep every entry in order, duplicates too. */
export type Json =
  | { k: 'null' }
  | { k: 'bool'; v: boolean }
  | JsonNumber
  | { k: 'str'; v: string }
  | { k: 'arr'; v: Json[] }
  | { k: 'obj'; v: [string, Json][] };

/** serde_json's nesting limit: a value nested 128 deep is refused, 127 is read. */
export const MAX_JSON_DEPTH = 127;

export class JsonError extends Error {}

const U64_MAX = (1n << 64n) - 1n;
const I64_MIN_MAGNITUDE = 1n << 63n;
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/y;

/**
 * Parses `text` as serde_json does (RFC 8259: no lone surrogates, no raw control characters,
 * at most 127 levels, numbers in range), keeping what serde_json tells apart: integers from
 * floats, and every entry of an object.
 *
 * @throws {JsonError} where serde_json would refuse it.
 */
export function parseJson(text: string): Json {
  let i = 0;
  let depth = 128;
  const fail = (why: string): never => {
    throw new JsonError(`${why} at character ${i}`);
  };
  const space = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else break;
    }
  };
  const literal = (word: string, value: Json): Json => {
    if (!text.startsWith(word, i)) fail('expected a value');
    i += word.length;
    return value;
  };
  const string = (): string => {
    i++; // the opening quote
    let out = '';
    let from = i;
    for (;;) {
      if (i >= text.length) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 0x22) {
        out += text.slice(from, i);
        i++;
        return out;
      }
      if (c < 0x20) fail('control character in a string');
      if (c >= 0xd800 && c <= 0xdfff) {
        // Text from Redis is well-formed; a lone surrogate is not UTF-8 a worker could read.
        const pair = c <= 0xdbff && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00;
        if (!pair) fail('lone surrogate');
        i += 2;
        continue;
      }
      if (c !== 0x5c) {
        i++;
        continue;
      }
      out += text.slice(from, i);
      const e = text[i + 1];
      i += 2;
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          const hex4 = () => {
            const h = text.slice(i, i + 4);
            if (!/^[0-9a-fA-F]{4}$/.test(h)) fail('bad \\u escape');
            i += 4;
            return Number.parseInt(h, 16);
          };
          const u = hex4();
          if (u >= 0xdc00 && u <= 0xdfff) fail('lone trailing surrogate in a \\u escape');
          if (u >= 0xd800 && u <= 0xdbff) {
            if (text[i] !== '\\' || text[i + 1] !== 'u') fail('lone leading surrogate in a \\u escape');
            i += 2;
            const low = hex4();
            if (low < 0xdc00 || low > 0xdfff) fail('lone leading surrogate in a \\u escape');
            out += String.fromCharCode(u, low);
          } else {
            out += String.fromCharCode(u);
          }
          break;
        }
        default:
          fail('bad escape');
      }
      from = i;
    }
  };
  const number = (): Json => {
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (m === null) return fail('expected a value');
    const raw = m[0];
    i += raw.length;
    if (m[1] === undefined && m[2] === undefined) {
      const n = BigInt(raw);
      if (n >= 0n && n <= U64_MAX && !raw.startsWith('-')) return { k: 'num', kind: 'u64', int: n, raw };
      // serde_json: a negative integer within i64 (but not -0), else an f64.
      if (n < 0n && -n <= I64_MIN_MAGNITUDE) return { k: 'num', kind: 'i64', int: n, raw };
    }
    const f = Number(raw);
    if (!Number.isFinite(f)) fail('number out of range');
    return { k: 'num', kind: 'f64', f, raw };
  };
  const value = (): Json => {
    space();
    const c = text[i];
    switch (c) {
      case 'n':
        return literal('null', { k: 'null' });
      case 't':
        return literal('true', { k: 'bool', v: true });
      case 'f':
        return literal('false', { k: 'bool', v: false });
      case '"':
        return { k: 'str', v: string() };
      case '[': {
        if (--depth === 0) fail('recursion limit exceeded');
        i++;
        const items: Json[] = [];
        space();
        if (text[i] === ']') i++;
        else {
          for (;;) {
            items.push(value());
            space();
            if (text[i] === ',') i++;
            else if (text[i] === ']') {
              i++;
              break;
            } else fail('expected , or ]');
          }
        }
        depth++;
        return { k: 'arr', v: items };
      }
      case '{': {
        if (--depth === 0) fail('recursion limit exceeded');
        i++;
        const entries: [string, Json][] = [];
        space();
        if (text[i] === '}') i++;
        else {
          for (;;) {
            space();
            if (text[i] !== '"') fail('expected a key');
            const key = string();
            space();
            if (text[i] !== ':') fail('expected :');
            i++;
            entries.push([key, value()]);
            space();
            if (text[i] === ',') i++;
            else if (text[i] === '}') {
              i++;
              break;
            } else fail('expected , or }');
          }
        }
        depth++;
        return { k: 'obj', v: entries };
      }
      default:
        if (c === '-' || (c !== undefined && c >= '0' && c <= '9')) return number();
        return fail('expected a value');
    }
  };
  const v = value();
  space();
  if (i !== text.length) fail('trailing characters');
  return v;
}

/** Reads JSON as serde_json would, `null` where it would refuse it. */
export function tryParseJson(text: string): Json | null {
  try {
    return parseJson(text);
  } catch (e) {
    if (e instanceof JsonError) return null;
    throw e;
  }
}

/** An object's entry as a `serde_json::Value` holds it: the last of duplicates. */
export function member(obj: Json, key: string): Json | undefined {
  if (obj.k !== 'obj') return undefined;
  let found: Json | undefined;
  for (const [k, v] of obj.v) if (k === key) found = v;
  return found;
}

/** Orders strings as Rust orders `String`s: by code point (UTF-8 bytes), not UTF-16 units. */
export function byCodePoint(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let j = 0; j < Math.min(x.length, y.length); j++) {
    const d = x[j]!.codePointAt(0)! - y[j]!.codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

/** A string as serde_json writes it. */
export function jsonString(s: string): string {
  return JSON.stringify(s);
}

/** A value as `serde_json::Value` writes it: objects without duplicates, keys sorted. */
export function valueJson(v: Json): string {
  switch (v.k) {
    case 'null':
      return 'null';
    case 'bool':
      return v.v ? 'true' : 'false';
    case 'num':
      return v.kind === 'f64' ? formatF64(v.f) : v.int.toString();
    case 'str':
      return jsonString(v.v);
    case 'arr':
      return `[${v.v.map(valueJson).join(',')}]`;
    case 'obj': {
      const last = new Map<string, Json>();
      for (const [k, x] of v.v) last.set(k, x);
      const keys = [...last.keys()].sort(byCodePoint);
      return `{${keys.map((k) => `${jsonString(k)}:${valueJson(last.get(k)!)}`).join(',')}}`;
    }
  }
}

/** How deep `v` nests (a scalar is 0, `[]` is 1); stops counting past `limit`. */
export function nesting(v: unknown, limit = MAX_JSON_DEPTH + 1): number {
  if (limit <= 0) return 0;
  if (Array.isArray(v)) return 1 + Math.max(0, ...v.map((x) => nesting(x, limit - 1)));
  if (typeof v === 'object' && v !== null && !(v instanceof Date)) {
    const json = (v as { toJSON?: unknown }).toJSON;
    if (typeof json === 'function') return nesting((v as { toJSON(): unknown }).toJSON(), limit);
    return 1 + Math.max(0, ...Object.values(v).map((x) => nesting(x, limit - 1)));
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Floats as serde_json writes them (the zmij crate): the shortest digits that read back the
// same, in fixed notation for decimal exponents -5..=15 (f64) or -6..=12 (f32), else d.ddde±x.

function layout(negative: boolean, digits: string, exp: number, fixedMin: number, fixedMax: number): string {
  const sign = negative ? '-' : '';
  if (exp >= fixedMin && exp <= fixedMax) {
    if (digits.length - 1 <= exp) return `${sign}${digits}${'0'.repeat(exp + 1 - digits.length)}.0`;
    if (exp >= 0) return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
    return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`;
  }
  const mantissa = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${mantissa}e${exp < 0 ? '-' : '+'}${Math.abs(exp)}`;
}

/** Digits and decimal exponent of a `toExponential` text: "1.25e+3" -> ["125", 3]. */
function splitExponential(s: string): [string, number] {
  const [m, e] = s.split('e') as [string, string];
  return [m.replace('.', '').replace(/0+$/, '') || '0', Number(e)];
}

/** An f64 as serde_json writes it (`null` for NaN and infinities). */
export function formatF64(f: number): string {
  if (!Number.isFinite(f)) return 'null';
  if (f === 0) return Object.is(f, -0) ? '-0.0' : '0.0';
  const [digits, exp] = splitExponential(Math.abs(f).toExponential());
  return layout(f < 0, digits, exp, -5, 15);
}

/** A finite double as an exact integer mantissa and power of two. */
function decompose(a: number): [bigint, number] {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, a);
  const bits = view.getBigUint64(0);
  const exp = Number((bits >> 52n) & 0x7ffn);
  const frac = bits & ((1n << 52n) - 1n);
  return exp === 0 ? [frac, -1074] : [frac | (1n << 52n), exp - 1075];
}

/** A positive f32 (given as the number it is) as serde_json writes it. */
function shortestF32(a: number): [string, number] {
  const [mant, e2] = decompose(a);
  for (let p = 1; p <= 9; p++) {
    // The decimals of p digits around a; the shortest that reads back as a, the closest of
    // those, the even one of two as close (as zmij chooses).
    const [digits, exp] = splitExponential(a.toExponential(p - 1));
    const m = BigInt(digits.padEnd(p, '0'));
    const k = exp - (p - 1);
    // a and c * 10^k, both times 2^max(-e2, 0) * 10^max(-k, 0): integers to compare.
    const twos = (x: bigint, n: number) => (n > 0 ? x << BigInt(n) : x);
    const tens = (x: bigint, n: number) => (n > 0 ? x * 10n ** BigInt(n) : x);
    const A = tens(twos(mant, Math.max(e2, 0)), -k);
    let best: bigint | null = null;
    let bestDistance = 0n;
    for (const c of [m - 1n, m, m + 1n]) {
      if (c <= 0n) continue;
      const back = k >= 0 ? ratioToF32(c * 10n ** BigInt(k), 1n) : ratioToF32(c, 10n ** BigInt(-k));
      if (back !== a) continue;
      const C = twos(tens(c, k), -e2);
      const distance = C > A ? C - A : A - C;
      if (best === null || distance < bestDistance || (distance === bestDistance && c % 2n === 0n)) {
        best = c;
        bestDistance = distance;
      }
    }
    if (best !== null) {
      const text = best.toString();
      return [text.replace(/0+$/, '') || '0', k + text.length - 1];
    }
  }
  return splitExponential(a.toExponential(8));
}

/** An f32 (given as the number it is) as serde_json writes it (`null` for infinities). */
export function formatF32(f: number): string {
  if (!Number.isFinite(f)) return 'null';
  if (f === 0) return Object.is(f, -0) ? '-0.0' : '0.0';
  const [digits, exp] = shortestF32(Math.abs(f));
  return layout(f < 0, digits, exp, -6, 12);
}

const F32_MAX = 3.4028234663852886e38;

function bitLength(v: bigint): number {
  return v === 0n ? 0 : v.toString(2).length;
}

/** num / den (both positive) rounded to the nearest f32, ties to even; Infinity past the largest. */
function ratioToF32(num: bigint, den: bigint): number {
  // e: the power of two of the last of 24 significant bits, no lower than -149 (subnormals).
  let e = bitLength(num) - bitLength(den) - 24;
  const floorScaled = (x: number) => (x >= 0 ? num / (den << BigInt(x)) : (num << BigInt(-x)) / den);
  while (floorScaled(e) >= 1n << 24n) e++;
  while (e > -149 && floorScaled(e) < 1n << 23n) e--;
  if (e < -149) e = -149;
  const n2 = e >= 0 ? num : num << BigInt(-e);
  const d2 = e >= 0 ? den << BigInt(e) : den;
  let q = n2 / d2;
  const twice = (n2 % d2) * 2n;
  if (twice > d2 || (twice === d2 && (q & 1n) === 1n)) q += 1n;
  const f = Number(q) * 2 ** e;
  return f > F32_MAX ? Infinity : f;
}

/**
 * The f32 a JSON number becomes where Rust reads an `f32`: a float's decimal rounded once to
 * nearest, ties to even, `null` when that overflows (serde_json refuses it); an integer as
 * `v as f32`.
 */
export function toF32(n: JsonNumber): number | null {
  if (n.kind !== 'f64') {
    const a = n.int < 0n ? -n.int : n.int;
    const f = a === 0n ? 0 : ratioToF32(a, 1n);
    return n.int < 0n ? -f : f;
  }
  const m = /^(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?$/.exec(n.raw)!;
  const frac = m[3] ?? '';
  const sign = m[1] === '-' ? -1 : 1;
  const digits = BigInt(m[2]! + frac);
  const exp = Number(m[4] ?? '0') - frac.length;
  if (digits === 0n) return sign * 0;
  const size = digits.toString().length + exp; // 10^(size-1) <= value < 10^size
  if (size > 40) return null;
  if (size < -46) return sign * 0;
  const f = exp >= 0 ? ratioToF32(digits * 10n ** BigInt(exp), 1n) : ratioToF32(digits, 10n ** BigInt(-exp));
  return Number.isFinite(f) ? sign * f : null;
}

// ---------------------------------------------------------------------------------------------
// Durations as humantime 2 reads them (deadline, a chain step's timeout).

const UNIT_NANOS: Record<string, [bigint, bigint]> = {};
for (const [names, secs, nanos] of [
  [['nanos', 'nsec', 'ns'], 0n, 1n],
  [['usec', 'us', 'µs'], 0n, 1_000n],
  [['millis', 'msec', 'ms'], 0n, 1_000_000n],
  [['seconds', 'second', 'secs', 'sec', 's'], 1n, 0n],
  [['minutes', 'minute', 'min', 'mins', 'm'], 60n, 0n],
  [['hours', 'hour', 'hr', 'hrs', 'h'], 3600n, 0n],
  [['days', 'day', 'd'], 86400n, 0n],
  [['weeks', 'week', 'wk', 'wks', 'w'], 604800n, 0n],
  [['months', 'month', 'M'], 2_630_016n, 0n],
  [['years', 'year', 'yr', 'yrs', 'y'], 31_557_600n, 0n],
] as const) {
  for (const n of names) UNIT_NANOS[n] = [secs, nanos];
}

/** A duration: whole seconds and nanoseconds below one second. */
export interface Duration {
  secs: bigint;
  nanos: bigint;
}

export class DurationError extends Error {}

const OVERFLOW =
  'number is too large or cannot be represented without a lack of precision (values below 1ns are not supported)';

/**
 * `humantime::parse_duration`: `24h`, `3d`, `1day 12h`, `1.5h`, `90 min`... Whitespace may
 * stand between (and inside) numbers and units, as humantime allows.
 *
 * @throws {DurationError} with humantime's own message.
 */
export function parseHumantime(src: string): Duration {
  if (src === '0') return { secs: 0n, nanos: 0n };
  const chars = [...src];
  const offsets = [0];
  for (const c of chars) offsets.push(offsets[offsets.length - 1]! + Buffer.byteLength(c, 'utf8'));
  let at = 0;
  const off = () => offsets[at]!;
  const next = (): string | undefined => (at < chars.length ? chars[at++] : undefined);
  const digit = (c: string) => c >= '0' && c <= '9';
  const alpha = (c: string) => /^[a-zA-Zµ]$/.test(c);
  const fail = (message: string): never => {
    throw new DurationError(message);
  };
  const checked = (v: bigint) => (v > U64_MAX ? fail(OVERFLOW) : v);
  const out: Duration = { secs: 0n, nanos: 0n };
  const add = (secs: bigint, nanos: bigint) => {
    let n = checked(out.nanos + nanos);
    let s = secs;
    if (n > 1_000_000_000n) {
      s = checked(s + n / 1_000_000_000n);
      n %= 1_000_000_000n;
    }
    s = checked(out.secs + s);
    if (n >= 1_000_000_000n) {
      s = checked(s + n / 1_000_000_000n);
      n %= 1_000_000_000n;
    }
    out.secs = s;
    out.nanos = n;
  };
  const exactDiv = (a: bigint, b: bigint) => (a % b === 0n ? a / b : fail(OVERFLOW));
  const firstNumber = (): bigint | null => {
    const start = off();
    for (let c = next(); c !== undefined; c = next()) {
      if (digit(c)) return BigInt(c);
      if (isRustSpace(c)) continue;
      return fail(`expected number at ${start}`);
    }
    return null;
  };
  const unit = (n: bigint, frac: [bigint, bigint] | null, start: number, end: number) => {
    const name = Buffer.from(src, 'utf8').subarray(start, end).toString('utf8');
    const u = UNIT_NANOS[name];
    if (u === undefined) {
      return fail(name === '' ? `time unit needed, for example ${n}sec or ${n}ms` : `unknown time unit ${JSON.stringify(name)}, supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)`);
    }
    const [secs, nanos] = u;
    add(checked(n * secs), checked(n * nanos));
    if (frac !== null) {
      const [num, den] = frac;
      if (secs === 0n && nanos === 1n) fail(OVERFLOW);
      if (secs === 0n) add(0n, exactDiv(checked(num * nanos), den));
      else if (secs === 1n) add(0n, exactDiv(checked(num * 1_000_000_000n), den));
      else if (secs === 60n) add(0n, exactDiv(checked(num * 60_000_000_000n), den));
      else add(exactDiv(checked(num * secs), den), 0n);
    }
  };
  let n = firstNumber();
  if (n === null) return fail('value was empty');
  for (;;) {
    let frac: [bigint, bigint] | null = null;
    let o = off();
    let restart = false;
    for (let c = next(); c !== undefined; c = next()) {
      if (digit(c)) n = checked(n * 10n + BigInt(c));
      else if (isRustSpace(c)) {
        // skipped, even between digits
      } else if (alpha(c)) {
        at--;
        break;
      } else if (c === '.') {
        let num = 0n;
        let den = 1n;
        for (let d = next(); d !== undefined; d = next()) {
          if (digit(d)) {
            den = checked(den * 10n);
            num = checked(num * 10n + BigInt(d));
          } else if (isRustSpace(d)) {
            // skipped
          } else if (alpha(d)) {
            at--;
            break;
          } else {
            return fail(`invalid character at ${o}`);
          }
          o = off();
        }
        if (den === 1n) return fail(`invalid character at ${o}`);
        frac = [num, den];
        break;
      } else {
        return fail(`invalid character at ${o}`);
      }
      o = off();
    }
    const start = o;
    // The unit: letters up to a space, a digit (the next number) or the end.
    let end = off();
    for (let c = next(); c !== undefined; c = next()) {
      if (digit(c)) {
        unit(n, frac, start, end);
        n = BigInt(c);
        restart = true;
        break;
      }
      if (isRustSpace(c)) break;
      if (!alpha(c)) return fail(`invalid character at ${end}`);
      end = off();
    }
    if (restart) continue;
    unit(n, frac, start, end);
    const more = firstNumber();
    if (more === null) return out;
    n = more;
  }
}

/** `humantime::parse_duration` as `Ok(duration)` or `Err(message)`. */
export function humantime(text: string): Duration | string {
  try {
    return parseHumantime(text);
  } catch (e) {
    if (e instanceof DurationError) return e.message;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Times as chrono reads a `DateTime<Utc>` (its relaxed RFC 3339) and writes one.

/** A UTC time: seconds since 1970 and nanoseconds, `nanos` >= 1e9 in a leap second. */
export interface Instant {
  secs: number;
  nanos: number;
}

const MIN_YEAR = -262143;
const MAX_YEAR = 262142;

/** Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar. */
function daysFromCivil(y: number, m: number, d: number): number {
  const yy = m <= 2 ? y - 1 : y;
  const era = Math.floor(yy / 400);
  const yoe = yy - era * 400;
  const doy = Math.floor((153 * (m + (m > 2 ? -3 : 9)) + 2) / 5) + d - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}

function civilFromDays(z0: number): [number, number, number] {
  const z = z0 + 719468;
  const era = Math.floor(z / 146097);
  const doe = z - era * 146097;
  const yoe = Math.floor((doe - Math.floor(doe / 1460) + Math.floor(doe / 36524) - Math.floor(doe / 146096)) / 365);
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  const d = doy - Math.floor((153 * mp + 2) / 5) + 1;
  const m = mp + (mp < 10 ? 3 : -9);
  return [yoe + era * 400 + (m <= 2 ? 1 : 0), m, d];
}

function daysInMonth(y: number, m: number): number {
  if (m === 2) return (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0 ? 29 : 28;
  return [4, 6, 9, 11].includes(m) ? 30 : 31;
}

/**
 * A time as chrono's `DateTime<Utc>` deserializes one (`parse_rfc3339_relaxed`: a space for
 * the `T`, `UTC` for the offset, spaces between parts, unpadded numbers, leap seconds), or
 * `null` where chrono refuses it (2030-02-30, 24:00, an offset of a day or more...).
 */
export function parseChrono(text: string): Instant | null {
  let s = text;
  const trim = () => {
    s = rustTrimStart(s);
  };
  const num = (min: number, max: number): number | null => {
    let k = 0;
    while (k < max && k < s.length && s[k]! >= '0' && s[k]! <= '9') k++;
    if (k < min) return null;
    const digits = s.slice(0, k);
    s = s.slice(k);
    const v = BigInt(digits);
    return v > 9223372036854775807n ? null : Number(v);
  };
  const lit = (c: string) => {
    if (!s.startsWith(c)) return false;
    s = s.slice(c.length);
    return true;
  };
  trim();
  let year: number | null;
  if (s.startsWith('-') || s.startsWith('+')) {
    const negative = s[0] === '-';
    s = s.slice(1);
    year = num(1, Infinity);
    if (year !== null && negative) year = -year;
  } else {
    year = num(1, 4);
  }
  if (year === null || year < -2147483648 || year > 2147483647) return null;
  trim();
  if (!lit('-')) return null;
  trim();
  const month = num(1, 2);
  if (month === null || month < 1 || month > 12) return null;
  trim();
  if (!lit('-')) return null;
  trim();
  const day = num(1, 2);
  if (day === null || day < 1 || day > 31) return null;
  if (!(s.startsWith('T') || s.startsWith('t') || s.startsWith(' '))) return null;
  s = s.slice(1);
  trim();
  const hour = num(1, 2);
  if (hour === null || hour > 23) return null;
  trim();
  if (!lit(':')) return null;
  trim();
  const minute = num(1, 2);
  if (minute === null || minute > 59) return null;
  trim();
  if (!lit(':')) return null;
  trim();
  const second = num(1, 2);
  if (second === null || second > 60) return null;
  let nanos = 0;
  if (s.startsWith('.')) {
    s = s.slice(1);
    let k = 0;
    while (k < 9 && k < s.length && s[k]! >= '0' && s[k]! <= '9') k++;
    if (k === 0) return null;
    nanos = Number(s.slice(0, k).padEnd(9, '0'));
    s = s.slice(k).replace(/^[0-9]+/, '');
  }
  trim();
  let offset: number;
  if (s.length >= 3 && s.slice(0, 3).toUpperCase() === 'UTC' && /^[\x00-\x7f]{3}/.test(s)) {
    offset = 0;
    s = s.slice(3);
  } else if (s.startsWith('Z') || s.startsWith('z')) {
    offset = 0;
    s = s.slice(1);
  } else {
    let negative: boolean;
    if (s.startsWith('+')) negative = false;
    else if (s.startsWith('-') || s.startsWith('\u2212')) negative = true;
    else return null;
    s = s.slice(1);
    if (!/^[0-9]{2}/.test(s)) return null;
    const oh = Number(s.slice(0, 2));
    s = s.slice(2);
    s = s.replace(/^(?:[:]|[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])*/u, '');
    if (!/^[0-5][0-9]/.test(s)) return null;
    const om = Number(s.slice(0, 2));
    s = s.slice(2);
    offset = (negative ? -1 : 1) * (oh * 3600 + om * 60);
  }
  if (rustTrimStart(s) !== '') return null;
  if (year < MIN_YEAR || year > MAX_YEAR || day > daysInMonth(year, month)) return null;
  if (Math.abs(offset) >= 86400) return null;
  const leap = second === 60;
  const local = daysFromCivil(year, month, day) * 86400 + hour * 3600 + minute * 60 + (leap ? 59 : second);
  const secs = local - offset;
  const min = daysFromCivil(MIN_YEAR, 1, 1) * 86400;
  const max = daysFromCivil(MAX_YEAR, 12, 31) * 86400 + 86399;
  if (secs < min || secs > max) return null;
  return { secs, nanos: nanos + (leap ? 1_000_000_000 : 0) };
}

/** A UTC time as chrono's `DateTime<Utc>` serializes it: `2030-01-02T03:04:05.500Z`. */
export function formatChrono(t: Instant): string {
  const days = Math.floor(t.secs / 86400);
  const rest = t.secs - days * 86400;
  const [y, m, d] = civilFromDays(days);
  const leap = t.nanos >= 1_000_000_000;
  const nano = leap ? t.nanos - 1_000_000_000 : t.nanos;
  const pad = (v: number, w = 2) => String(v).padStart(w, '0');
  const year = y >= 0 && y <= 9999 ? pad(y, 4) : `${y < 0 ? '-' : '+'}${pad(Math.abs(y), 4)}`;
  const hh = Math.floor(rest / 3600);
  const mm = Math.floor((rest % 3600) / 60);
  const ss = (rest % 60) + (leap ? 1 : 0);
  const frac =
    nano === 0 ? '' : nano % 1_000_000 === 0 ? `.${pad(nano / 1_000_000, 3)}` : nano % 1000 === 0 ? `.${pad(nano / 1000, 6)}` : `.${pad(nano, 9)}`;
  return `${year}-${pad(m)}-${pad(d)}T${pad(hh)}:${pad(mm)}:${pad(ss)}${frac}Z`;
}
