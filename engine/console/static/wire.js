// realtalk console: the events socket's binary batches (docs/console.md, "The events socket"),
// and a small MessagePack decoder for their bodies. Plain JS, no build step; loaded by the page
// (and by the tests on their own) before console.js.
//
// A batch: a 16-byte header (u8 version = 1, 3 zero bytes, u32 LE dropped, u64 LE now_ns),
// then records, each u16 LE topic length, u32 LE body length, the topic (UTF-8), the body
// (the bus's own msgpack map, as published). bin values decode as {bytes: length}, the way
// the page shows bytes fields; ext values as {ext: type, bytes: length}.
"use strict";

const BATCH_VERSION = 1;
const BATCH_HEADER_BYTES = 16;
const RECORD_HEADER_BYTES = 6;
const utf8 = new TextDecoder("utf-8");

class MsgpackError extends Error {}

// Decodes one msgpack value from ``bytes`` (a Uint8Array) at ``pos``; decode(bytes) the whole
// buffer (which must hold exactly one value). Integers beyond 2^53 lose precision (as JSON.parse).
class MsgpackReader {
  constructor(bytes) {
    this.b = bytes; this.pos = 0;
    this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  need(n) { if (this.pos + n > this.b.length) throw new MsgpackError("msgpack: truncated at byte " + this.pos); }
  str(n) { this.need(n); const s = utf8.decode(this.b.subarray(this.pos, this.pos + n)); this.pos += n; return s; }
  bin(n) { this.need(n); this.pos += n; return { bytes: n }; }
  ext(n) { this.need(1 + n); const type = this.v.getInt8(this.pos); this.pos += 1 + n; return { ext: type, bytes: n }; }
  arr(n, depth) { const a = new Array(n); for (let i = 0; i < n; i++) a[i] = this.read(depth); return a; }
  map(n, depth) {
    const o = {};
    for (let i = 0; i < n; i++) {
      const k = this.read(depth);
      const key = typeof k === "string" ? k : JSON.stringify(k);
      const val = this.read(depth);
      if (key === "__proto__") Object.defineProperty(o, key, { value: val, enumerable: true, writable: true, configurable: true });
      else o[key] = val;
    }
    return o;
  }
  u8() { this.need(1); return this.b[this.pos++]; }
  u16() { this.need(2); const x = this.v.getUint16(this.pos); this.pos += 2; return x; }
  u32() { this.need(4); const x = this.v.getUint32(this.pos); this.pos += 4; return x; }
  read(depth = 0) {
    if (depth > 64) throw new MsgpackError("msgpack: nested deeper than 64");
    const t = this.u8(), v = this.v;
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t <= 0x8f) return this.map(t & 0x0f, depth + 1);
    if (t <= 0x9f) return this.arr(t & 0x0f, depth + 1);
    if (t <= 0xbf) return this.str(t & 0x1f);
    let x;
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bin(this.u8());
      case 0xc5: return this.bin(this.u16());
      case 0xc6: return this.bin(this.u32());
      case 0xc7: return this.ext(this.u8());
      case 0xc8: return this.ext(this.u16());
      case 0xc9: return this.ext(this.u32());
      case 0xca: this.need(4); x = v.getFloat32(this.pos); this.pos += 4; return x;
      case 0xcb: this.need(8); x = v.getFloat64(this.pos); this.pos += 8; return x;
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: this.need(8); x = Number(v.getBigUint64(this.pos)); this.pos += 8; return x;
      case 0xd0: this.need(1); x = v.getInt8(this.pos); this.pos += 1; return x;
      case 0xd1: this.need(2); x = v.getInt16(this.pos); this.pos += 2; return x;
      case 0xd2: this.need(4); x = v.getInt32(this.pos); this.pos += 4; return x;
      case 0xd3: this.need(8); x = Number(v.getBigInt64(this.pos)); this.pos += 8; return x;
      case 0xd4: return this.ext(1);
      case 0xd5: return this.ext(2);
      case 0xd6: return this.ext(4);
      case 0xd7: return this.ext(8);
      case 0xd8: return this.ext(16);
      case 0xd9: return this.str(this.u8());
      case 0xda: return this.str(this.u16());
      case 0xdb: return this.str(this.u32());
      case 0xdc: return this.arr(this.u16(), depth + 1);
      case 0xdd: return this.arr(this.u32(), depth + 1);
      case 0xde: return this.map(this.u16(), depth + 1);
      case 0xdf: return this.map(this.u32(), depth + 1);
      default: throw new MsgpackError("msgpack: unknown type byte 0x" + t.toString(16) + " at byte " + (this.pos - 1));
    }
  }
}

function msgpackDecode(bytes) {
  const r = new MsgpackReader(bytes);
  const value = r.read();
  if (r.pos !== bytes.length) throw new MsgpackError(`msgpack: ${bytes.length - r.pos} bytes after the value`);
  return value;
}

// One binary batch (an ArrayBuffer) → {nowNs, dropped, events: [{topic, body}], malformed}.
// A record whose body is not a msgpack map is left out and counted in ``malformed``; a batch
// that is not one (wrong version, truncated records) throws a MsgpackError.
function decodeBatch(buffer) {
  const all = new Uint8Array(buffer), dv = new DataView(buffer);
  if (all.length < BATCH_HEADER_BYTES) throw new MsgpackError("batch: shorter than its header");
  if (all[0] !== BATCH_VERSION) throw new MsgpackError("batch: version " + all[0] + ", expected " + BATCH_VERSION);
  const dropped = dv.getUint32(4, true);
  const nowNs = Number(dv.getBigUint64(8, true));
  const events = [];
  let malformed = 0, pos = BATCH_HEADER_BYTES;
  while (pos < all.length) {
    if (pos + RECORD_HEADER_BYTES > all.length) throw new MsgpackError("batch: a truncated record header at byte " + pos);
    const tlen = dv.getUint16(pos, true), blen = dv.getUint32(pos + 2, true);
    const t0 = pos + RECORD_HEADER_BYTES, b0 = t0 + tlen, end = b0 + blen;
    if (end > all.length) throw new MsgpackError("batch: a truncated record at byte " + pos);
    const topic = utf8.decode(all.subarray(t0, b0));
    try {
      const body = msgpackDecode(all.subarray(b0, end));
      if (body === null || typeof body !== "object" || Array.isArray(body)) malformed++;
      else events.push({ topic, body });
    } catch (e) {
      if (!(e instanceof MsgpackError)) throw e;
      malformed++;
    }
    pos = end;
  }
  return { nowNs, dropped, events, malformed };
}

if (typeof window !== "undefined") { window.msgpackDecode = msgpackDecode; window.decodeBatch = decodeBatch; }
