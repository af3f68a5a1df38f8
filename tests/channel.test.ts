/**
 * The data channel (PROTOCOL.md §6–§7, steps D1 and D2), sender and receiver in-process, no network.
 * Tests name the attack or the promise. Wherever a test shows a rejection it also shows the honest frame passing
 * through the same kind of receiver, so a receiver that refused everything would not pass. The last block checks the
 * frame layout: the same bytes wherever the payload sits in its buffer, and Buffer chunks (as Bun delivers them) in.
 */
import { describe, expect, test } from 'bun:test';
import { createHmac, randomBytes } from 'node:crypto';
import {
  ChannelReceiver,
  ChannelSender,
  FRAME_OVERHEAD,
  HEADER_LEN,
  MAX_CIPHERTEXT,
  MAX_FRAME,
  MAX_PAYLOAD,
  RECORD,
  type RecordType,
} from '../channel.ts';
import { type Engine, nativeEngine, nobleEngine } from '../engine.ts';
import { type ErrorCode, VpnError } from '../errors.ts';
import { ClientHandshake, type DirectionKeys, keysFromKeyFile, ServerHandshake, VERSION_2 } from '../handshake.ts';
import { sha256, spied } from './helpers.ts';

const ENGINES: readonly Engine[] = [nobleEngine, nativeEngine];
const EACH_ENGINE = ENGINES.map((e) => [e.name, e] as const);
const rand = (n: number) => new Uint8Array(randomBytes(n));
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const cat = (...p: Uint8Array[]) => new Uint8Array(Buffer.concat(p));
const utf8 = (s: string) => new TextEncoder().encode(s);
const dirKeys = (): DirectionKeys => ({ enc: rand(32), mac: rand(32), chain0: rand(32) });
const padded = (n: number) => (Math.floor(n / 16) + 1) * 16;

/** mulberry32: a tiny seeded PRNG so that "random" chunkings are the same on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A sender and a spied receiver sharing one direction's keys. */
function link(e: Engine = nobleEngine, re: Engine = e) {
  const keys = dirKeys();
  const s = spied(re);
  return { keys, tx: new ChannelSender(e, keys), rx: new ChannelReceiver(s.engine, keys), decrypts: s.decrypts };
}

type Got = [type: number, payloadHex: string];

/** Push `chunks` in order; returns what was delivered and the error that stopped it (null if none). */
function feed(rx: ChannelReceiver, chunks: Iterable<Uint8Array>): { got: Got[]; err: VpnError | null } {
  const got: Got[] = [];
  try {
    for (const c of chunks) rx.push(c, (type, payload) => got.push([type, hex(payload)]));
  } catch (e) {
    if (!(e instanceof VpnError)) throw e;
    return { got, err: e };
  }
  return { got, err: null };
}

function expectCode(err: VpnError | null, code: ErrorCode): void {
  expect(err).toBeInstanceOf(VpnError);
  expect(err!.code).toBe(code);
}

function expectThrowsCode(fn: () => unknown, code: ErrorCode): void {
  let err: unknown = null;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(VpnError);
  expect((err as VpnError).code).toBe(code);
}

describe('round trips (§6)', () => {
  const SIZES = [0, 1, 15, 16, 17, 65536];
  const cases = SIZES.flatMap((n) => EACH_ENGINE.map(([name, e]) => [n, name, e] as const));
  test.each(cases)('%i payload bytes survive the trip exactly (%s)', (n, _name, e) => {
    const { tx, rx, decrypts } = link(e);
    const payload = rand(n);
    const frame = tx.seal(RECORD.DATA, payload);
    const ctLen = (Math.floor((1 + n) / 16) + 1) * 16; // type byte + payload, PKCS#7 padded
    expect(frame.length).toBe(FRAME_OVERHEAD + ctLen);
    expect(new DataView(frame.buffer, frame.byteOffset).getUint32(0)).toBe(ctLen);
    const r = rx.open(frame);
    expect(r.type).toBe(RECORD.DATA);
    expect(hex(r.payload)).toBe(hex(payload));
    expect(decrypts()).toBe(1);
  });

  test('every record type arrives with its type and payload', () => {
    const { tx, rx } = link();
    const sent: Got[] = [
      [RECORD.CONFIG, hex(utf8('{"mode":"stdio"}'))],
      [RECORD.PING, ''],
      [RECORD.PONG, ''],
      [RECORD.DATA, hex(utf8('payload'))],
      [RECORD.CLOSE, ''],
    ];
    const frames = sent.map(([t, p]) => tx.seal(t as RecordType, Buffer.from(p, 'hex')));
    const { got, err } = feed(rx, [cat(...frames)]);
    expect(err).toBeNull();
    expect(got).toEqual(sent);
  });

  test('the largest ciphertext is exactly MAX_CIPHERTEXT', () => {
    expect(MAX_PAYLOAD).toBe(65536);
    expect(MAX_CIPHERTEXT).toBe(65552);
    expect(link().tx.seal(RECORD.DATA, new Uint8Array(MAX_PAYLOAD)).length).toBe(MAX_FRAME);
  });

  test('the sender refuses a 65537-byte payload and stays usable', () => {
    const { tx, rx } = link();
    expect(() => tx.seal(RECORD.DATA, new Uint8Array(MAX_PAYLOAD + 1))).toThrow(RangeError);
    expect(tx.frames).toBe(0);
    // The refusal did not advance the chain: the next frame is frame 1 for the receiver.
    expect(hex(rx.open(tx.seal(RECORD.DATA, utf8('after'))).payload)).toBe(hex(utf8('after')));
  });

  test('every frame gets a fresh IV: the same payload never gives the same bytes', () => {
    const { tx } = link();
    const payload = utf8('same every time');
    // 600 frames cross the 4096-byte IV pool twice.
    const frames = Array.from({ length: 600 }, () => tx.seal(RECORD.DATA, payload));
    const ivs = new Set(frames.map((f) => hex(f.subarray(4, HEADER_LEN))));
    const cts = new Set(frames.map((f) => hex(f.subarray(HEADER_LEN, f.length - 32))));
    expect(ivs.size).toBe(600);
    expect(cts.size).toBe(600);
  });
});

describe('tampering is caught before decryption (§6 D2)', () => {
  /** Push a tampered frame, then (if the receiver is still waiting) enough filler to complete any valid length. */
  function tamperedRun(e: Engine, keys: DirectionKeys, frame: Uint8Array, positions: Iterable<number>, masks: number[]) {
    let cases = 0;
    for (const i of positions) {
      for (const m of masks) {
        const bad = frame.slice();
        bad[i]! ^= m;
        const s = spied(e);
        const rx = new ChannelReceiver(s.engine, keys);
        const { got, err } = feed(rx, [bad, new Uint8Array(MAX_FRAME)]);
        expectCode(err, 'INTEGRITY');
        expect(got).toEqual([]);
        expect(s.decrypts()).toBe(0);
        expectThrowsCode(() => rx.end(), 'INTEGRITY');
        cases++;
      }
    }
    // Control: the untouched frame opens with one decryption.
    const s = spied(e);
    const ok = feed(new ChannelReceiver(s.engine, keys), [frame]);
    expect(ok.err).toBeNull();
    expect(ok.got.length).toBe(1);
    expect(s.decrypts()).toBe(1);
    return cases;
  }

  test.each(EACH_ENGINE)('flipping any bit pattern of any byte of a small frame is rejected with INTEGRITY (%s)', (_n, e) => {
    const keys = dirKeys();
    const frame = new ChannelSender(e, keys).seal(RECORD.DATA, utf8('hello'));
    expect(frame.length).toBe(68);
    const all = Array.from({ length: frame.length }, (_, i) => i);
    expect(tamperedRun(e, keys, frame, all, [0x01, 0x80, 0xff])).toBe(68 * 3);
  });

  test.each(EACH_ENGINE)('flipping sampled bytes of a 64 KiB frame is rejected with INTEGRITY (%s)', (_n, e) => {
    const keys = dirKeys();
    const frame = new ChannelSender(e, keys).seal(RECORD.DATA, rand(MAX_PAYLOAD));
    const ctEnd = frame.length - 32;
    const r = prng(7);
    const positions = new Set<number>([
      ...Array.from({ length: HEADER_LEN }, (_, i) => i), // length field and IV
      HEADER_LEN, HEADER_LEN + 1, HEADER_LEN + 15, HEADER_LEN + 16, // first ciphertext blocks
      Math.floor(frame.length / 2),
      ...Array.from({ length: 16 }, (_, i) => ctEnd - 16 + i), // the padding block
      ...Array.from({ length: 32 }, (_, i) => ctEnd + i), // the chain value
      ...Array.from({ length: 16 }, () => Math.floor(r() * frame.length)),
    ]);
    expect(tamperedRun(e, keys, frame, positions, [0x01])).toBe(positions.size);
  });

  test('a frame sealed under another MAC key or chain start is rejected', () => {
    const { keys, tx } = link();
    const frame = tx.seal(RECORD.DATA, utf8('x'));
    for (const other of [{ ...keys, mac: rand(32) }, { ...keys, chain0: rand(32) }]) {
      const s = spied(nobleEngine);
      expectThrowsCode(() => new ChannelReceiver(s.engine, other).open(frame), 'INTEGRITY');
      expect(s.decrypts()).toBe(0);
    }
    expect(new ChannelReceiver(nobleEngine, keys).open(frame).type).toBe(RECORD.DATA);
  });
});

describe('replay, reorder, drop, reflection (§6 chain)', () => {
  function three() {
    const l = link();
    const f = [1, 2, 3].map((i) => l.tx.seal(RECORD.DATA, utf8(`frame ${i}`)));
    return { ...l, f: f as [Uint8Array, Uint8Array, Uint8Array] };
  }

  test('rejects a replayed frame', () => {
    const { rx, f } = three();
    expect(rx.open(f[0]).payload).toEqual(utf8('frame 1'));
    expectThrowsCode(() => rx.open(f[0]), 'INTEGRITY');
  });

  test('rejects reordered frames', () => {
    const { rx, f } = three();
    const { got, err } = feed(rx, [f[1], f[0], f[2]]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([]);
  });

  test('rejects a stream with a frame dropped', () => {
    const { rx, f, decrypts } = three();
    const { got, err } = feed(rx, [f[0], f[2]]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([[RECORD.DATA, hex(utf8('frame 1'))]]);
    expect(decrypts()).toBe(1);
  });

  test('control: the same three frames in order are accepted', () => {
    const { rx, f } = three();
    expect(feed(rx, f).got.map(([, p]) => Buffer.from(p, 'hex').toString())).toEqual(['frame 1', 'frame 2', 'frame 3']);
  });

  function session() {
    const lt = keysFromKeyFile(rand(32));
    const c = new ClientHandshake(lt, VERSION_2, { engine: nativeEngine });
    const s = new ServerHandshake(lt, { engine: nativeEngine });
    s.consumeMessage3(c.consumeMessage2(s.consumeMessage1(c.createMessage1())));
    return { client: c.keys!, server: s.keys! };
  }

  test('rejects a frame reflected back to its sender (distinct keys per direction)', () => {
    const { client, server } = session();
    const frame = new ChannelSender(nobleEngine, client.send).seal(RECORD.DATA, utf8('to the server'));
    expectThrowsCode(() => new ChannelReceiver(nobleEngine, client.recv).open(frame), 'INTEGRITY');
    expect(new ChannelReceiver(nobleEngine, server.recv).open(frame).payload).toEqual(utf8('to the server'));
  });

  test('rejects a frame replayed into another session under the same secret', () => {
    const a = session();
    const b = session();
    const frame = new ChannelSender(nobleEngine, a.client.send).seal(RECORD.DATA, utf8('session a'));
    expectThrowsCode(() => new ChannelReceiver(nobleEngine, b.server.recv).open(frame), 'INTEGRITY');
  });
});

describe('end of stream and record types (§7)', () => {
  test('EOF without CLOSE is TRUNCATED, also right at the start', () => {
    const { tx, rx } = link();
    expectThrowsCode(() => new ChannelReceiver(nobleEngine, dirKeys()).end(), 'TRUNCATED');
    feed(rx, [tx.seal(RECORD.DATA, utf8('a')), tx.seal(RECORD.DATA, utf8('b'))]);
    expectThrowsCode(() => rx.end(), 'TRUNCATED');
  });

  test('EOF after a verified CLOSE is a clean end', () => {
    const { tx, rx } = link();
    const { err } = feed(rx, [tx.seal(RECORD.DATA, utf8('a')), tx.seal(RECORD.CLOSE)]);
    expect(err).toBeNull();
    expect(rx.closed).toBe(true);
    expect(() => rx.end()).not.toThrow();
  });

  test('EOF in the middle of a frame is TRUNCATED, even after CLOSE', () => {
    const { tx, rx } = link();
    const close = tx.seal(RECORD.CLOSE);
    const ping = tx.seal(RECORD.PING);
    const { got, err } = feed(rx, [close, ping.subarray(0, 30)]);
    expect(err).toBeNull();
    expect(got).toEqual([[RECORD.CLOSE, '']]);
    expectThrowsCode(() => rx.end(), 'TRUNCATED');
  });

  test('a CLOSE cut short is not a CLOSE', () => {
    const { tx, rx } = link();
    const close = tx.seal(RECORD.CLOSE);
    feed(rx, [close.subarray(0, close.length - 1)]);
    expect(rx.closed).toBe(false);
    expectThrowsCode(() => rx.end(), 'TRUNCATED');
  });

  test('the sender refuses DATA and a second CLOSE after its CLOSE', () => {
    const { tx } = link();
    tx.seal(RECORD.CLOSE);
    expect(() => tx.seal(RECORD.DATA, utf8('late'))).toThrow();
    expect(() => tx.seal(RECORD.CLOSE)).toThrow();
  });

  test.each([
    ['DATA', RECORD.DATA],
    ['CLOSE', RECORD.CLOSE],
    ['CONFIG', RECORD.CONFIG],
  ] as const)('a verified %s after CLOSE is rejected and not delivered', (_name, type) => {
    const { tx, rx } = link();
    const close = tx.seal(RECORD.CLOSE);
    tx.closed = false; // play a peer that holds the keys and ignores its own CLOSE
    const late = tx.seal(type, utf8('late'));
    const { got, err } = feed(rx, [close, late]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([[RECORD.CLOSE, '']]);
  });

  test('PING and PONG after CLOSE are accepted (keepalive continues while the other direction is open)', () => {
    const { tx, rx } = link();
    const { got, err } = feed(rx, [tx.seal(RECORD.CLOSE), tx.seal(RECORD.PING), tx.seal(RECORD.PONG)]);
    expect(err).toBeNull();
    expect(got).toEqual([
      [RECORD.CLOSE, ''],
      [RECORD.PING, ''],
      [RECORD.PONG, ''],
    ]);
    expect(() => rx.end()).not.toThrow();
  });

  test.each([['07', 0x07], ['7f', 0x7f], ['ff', 0xff]] as const)('a verified frame of unknown record type 0x%s is rejected and not delivered', (_hex, type) => {
    const { tx, rx } = link();
    const { got, err } = feed(rx, [tx.seal(type as RecordType, utf8('?'))]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([]);
  });

  /** Build frame 1 by hand around any ciphertext, with a correct chain value (a peer that holds the keys). */
  function handmade(keys: DirectionKeys, iv: Uint8Array, ct: Uint8Array): Uint8Array {
    const head = new Uint8Array(HEADER_LEN);
    new DataView(head.buffer).setUint32(0, ct.length);
    head.set(iv, 4);
    return cat(head, ct, createHmac('sha256', keys.mac).update(keys.chain0).update(head).update(ct).digest());
  }

  test('a verified frame with bad padding is rejected with INTEGRITY and not delivered', () => {
    const keys = dirKeys();
    const iv = rand(16);
    // One block ending in 0x00: never valid PKCS#7.
    const ct = nobleEngine.encryptCbc(keys.enc, iv, cat(Uint8Array.of(RECORD.DATA), new Uint8Array(15)), false);
    for (const e of ENGINES) {
      const s = spied(e);
      const { got, err } = feed(new ChannelReceiver(s.engine, keys), [handmade(keys, iv, ct)]);
      expectCode(err, 'INTEGRITY');
      expect(err!.message).toContain('padding');
      expect(got).toEqual([]);
      expect(s.decrypts()).toBe(1); // it got past the MAC: only a key holder can reach the padding check
    }
    // Control: the same hand-made framing around a properly padded plaintext is accepted.
    const good = nobleEngine.encryptCbc(keys.enc, iv, Uint8Array.of(RECORD.PING), true);
    expect(feed(new ChannelReceiver(nobleEngine, keys), [handmade(keys, iv, good)]).got).toEqual([[RECORD.PING, '']]);
  });

  test('a verified frame of L = 65552 whose plaintext is longer than 1 + 65536 bytes is rejected and not delivered (§6 D2.5)', () => {
    const keys = dirKeys();
    const iv = rand(16);
    for (const over of [1, 14]) {
      // type ‖ (MAX_PAYLOAD + over) bytes, PKCS#7 padded: still L = MAX_CIPHERTEXT, a length the receiver must buffer.
      const ct = nobleEngine.encryptCbc(keys.enc, iv, cat(Uint8Array.of(RECORD.DATA), rand(MAX_PAYLOAD + over)), true);
      expect(ct.length).toBe(MAX_CIPHERTEXT);
      for (const e of ENGINES) {
        const { got, err } = feed(new ChannelReceiver(e, keys), [handmade(keys, iv, ct)]);
        expectCode(err, 'INTEGRITY');
        expect(err!.message).toContain(`more than ${MAX_PAYLOAD} bytes`);
        expect(got).toEqual([]);
      }
    }
    // Control: exactly MAX_PAYLOAD bytes in the same L is accepted by both engines.
    const payload = rand(MAX_PAYLOAD);
    const ct = nobleEngine.encryptCbc(keys.enc, iv, cat(Uint8Array.of(RECORD.DATA), payload), true);
    expect(ct.length).toBe(MAX_CIPHERTEXT);
    for (const e of ENGINES) expect(feed(new ChannelReceiver(e, keys), [handmade(keys, iv, ct)]).got).toEqual([[RECORD.DATA, hex(payload)]]);
  });

  test('a verified frame with an empty plaintext (no record type) is rejected', () => {
    const keys = dirKeys();
    const iv = rand(16);
    const ct = nobleEngine.encryptCbc(keys.enc, iv, new Uint8Array(0), true);
    const { got, err } = feed(new ChannelReceiver(nobleEngine, keys), [handmade(keys, iv, ct)]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([]);
  });
});

describe('the length field is bounded before buffering (§6)', () => {
  /**
   * Count the sizes of `new Uint8Array(n)` made while `fn` runs, by swapping the global constructor for a
   * subclass. channel.ts allocates its frame buffer with `new Uint8Array(total)`, so this sees it.
   */
  function allocations(fn: () => void): number[] {
    const Original = globalThis.Uint8Array;
    const sizes: number[] = [];
    class Counting extends Original {
      constructor(...args: any[]) {
        super(...(args as [number]));
        if (typeof args[0] === 'number') sizes.push(args[0]);
      }
    }
    (globalThis as any).Uint8Array = Counting;
    try {
      fn();
    } finally {
      (globalThis as any).Uint8Array = Original;
    }
    return sizes;
  }

  const header = (len: number) => {
    const h = new Uint8Array(4);
    new DataView(h.buffer).setUint32(0, len);
    return h;
  };

  const BAD = [0, 15, 17, 0xffffffff, 0xfffffff0, MAX_CIPHERTEXT + 1, MAX_CIPHERTEXT + 16, 0x80000000];
  test.each(BAD.map((n) => [n]))('L = %i is rejected from the 4 header bytes alone, with no buffer of that size', (len) => {
    for (const split of ['whole', 'bytewise', 'with more bytes'] as const) {
      const rx = new ChannelReceiver(nobleEngine, dirKeys());
      const h = header(len);
      const chunks = split === 'whole' ? [h] : split === 'bytewise' ? [...h].map((b) => Uint8Array.of(b)) : [cat(h, rand(64))];
      let result!: ReturnType<typeof feed>;
      const sizes = allocations(() => {
        result = feed(rx, chunks);
      });
      expectCode(result.err, 'INTEGRITY');
      expect(result.err!.message).toContain('length');
      expect(sizes.filter((n) => n > 64)).toEqual([]);
      expect(rx.buffered).toBeLessThanOrEqual(4); // at most the length field itself was held
    }
  });

  test.each([[16], [MAX_CIPHERTEXT]])('control: L = %i is accepted and buffered as one frame of its size', (len) => {
    const rx = new ChannelReceiver(nobleEngine, dirKeys());
    let result!: ReturnType<typeof feed>;
    const sizes = allocations(() => {
      result = feed(rx, [header(len)]);
    });
    expect(result.err).toBeNull();
    expect(sizes).toContain(FRAME_OVERHEAD + len);
    expect(rx.buffered).toBe(4);
  });
});

describe('chunking does not matter (§6 D2)', () => {
  const SIZES = [0, 1, 15, 16, 17, 100, 1000, 65536, 3];
  function stream() {
    const { tx, rx } = link();
    const payloads = SIZES.map((n) => rand(n));
    const frames = [...payloads.map((p) => tx.seal(RECORD.DATA, p)), tx.seal(RECORD.CLOSE)];
    const want: Got[] = [...payloads.map((p): Got => [RECORD.DATA, hex(p)]), [RECORD.CLOSE, '']];
    return { rx, bytes: cat(...frames), frames, want };
  }
  function split(b: Uint8Array, cuts: number[]): Uint8Array[] {
    const out: Uint8Array[] = [];
    let prev = 0;
    for (const c of [...cuts.filter((c) => c > 0 && c < b.length).sort((x, y) => x - y), b.length]) {
      out.push(b.subarray(prev, c));
      prev = c;
    }
    return out;
  }

  const chunkings: [string, (s: ReturnType<typeof stream>) => Uint8Array[]][] = [
    ['all frames in one chunk', (s) => [s.bytes]],
    ['one chunk per frame', (s) => s.frames],
    ['1-byte chunks', (s) => Array.from(s.bytes, (b) => Uint8Array.of(b))],
    ['cuts inside every length field', (s) => {
      const cuts: number[] = [];
      let off = 0;
      for (const f of s.frames) {
        cuts.push(off + 1, off + 3);
        off += f.length;
      }
      return split(s.bytes, cuts);
    }],
    ...[1, 2, 3].map((seed): [string, (s: ReturnType<typeof stream>) => Uint8Array[]] => [
      `random splits (seed ${seed})`,
      (s) => {
        const r = prng(seed);
        const cuts: number[] = [];
        for (let off = 0; off < s.bytes.length; off += 1 + Math.floor(r() * 3000)) cuts.push(off);
        return split(s.bytes, cuts);
      },
    ]),
  ];

  test.each(chunkings)('%s: the same records, in order, then a clean end', (_name, chunk) => {
    const s = stream();
    const { got, err } = feed(s.rx, chunk(s));
    expect(err).toBeNull();
    expect(got).toEqual(s.want);
    expect(s.rx.buffered).toBe(0);
    expect(() => s.rx.end()).not.toThrow();
  });
});

test('both directions sending at once stay in sync (one chain per direction)', () => {
  const lt = keysFromKeyFile(rand(32));
  const c = new ClientHandshake(lt, VERSION_2, { engine: nobleEngine });
  const s = new ServerHandshake(lt, { engine: nativeEngine });
  s.consumeMessage3(c.consumeMessage2(s.consumeMessage1(c.createMessage1())));
  const client = { tx: new ChannelSender(nobleEngine, c.keys!.send), rx: new ChannelReceiver(nobleEngine, c.keys!.recv) };
  const server = { tx: new ChannelSender(nativeEngine, s.keys!.send), rx: new ChannelReceiver(nativeEngine, s.keys!.recv) };
  const r = prng(42);
  const sent = { c2s: [] as string[], s2c: [] as string[] };
  const got = { c2s: [] as string[], s2c: [] as string[] };
  const wire = { c2s: [] as Uint8Array[], s2c: [] as Uint8Array[] };
  for (let round = 0; round < 40; round++) {
    // Both sides seal before either has read what the other sent: frames are in flight both ways.
    for (const [dir, side] of [['c2s', client], ['s2c', server]] as const) {
      for (let k = Math.floor(r() * 4); k > 0; k--) {
        const p = rand(Math.floor(r() * 300));
        sent[dir].push(hex(p));
        wire[dir].push(side.tx.seal(RECORD.DATA, p));
      }
    }
    // Deliver a random prefix of each direction's wire bytes, interleaved.
    for (const [dir, rx] of [['s2c', client.rx], ['c2s', server.rx]] as const) {
      const all = cat(...wire[dir]);
      const n = Math.floor(r() * (all.length + 1));
      rx.push(all.subarray(0, n), (_t, p) => got[dir].push(hex(p)));
      wire[dir] = [all.slice(n)];
    }
  }
  for (const [dir, side, rx] of [['c2s', client, server.rx], ['s2c', server, client.rx]] as const) {
    rx.push(cat(...wire[dir], side.tx.seal(RECORD.CLOSE)), (t, p) => {
      if (t === RECORD.DATA) got[dir].push(hex(p));
    });
    expect(() => rx.end()).not.toThrow();
  }
  expect(sent.c2s.length + sent.s2c.length).toBeGreaterThan(40);
  expect(got).toEqual(sent);
});

describe('buffers belong to their owners', () => {
  test.each(EACH_ENGINE)('the receiver never writes into the chunks it is given, and the sender never into the payload (%s)', (_n, e) => {
    const keys = dirKeys();
    const tx = new ChannelSender(e, keys);
    const payloads = [rand(0), rand(1), rand(100), rand(70000).subarray(3, 65539)];
    const before = payloads.map(hex);
    const frames = payloads.map((p) => tx.seal(RECORD.DATA, p));
    expect(payloads.map(hex)).toEqual(before);
    const whole = cat(...frames);
    const copy = whole.slice();
    // One chunk (frames opened where they lie) and awkward splits (frames reassembled in the receiver's own buffer).
    for (const chunks of [[whole], [whole.subarray(0, 7), whole.subarray(7, 5000), whole.subarray(5000)]]) {
      const { got, err } = feed(new ChannelReceiver(e, keys), chunks);
      expect(err).toBeNull();
      expect(got.map(([, p]) => p)).toEqual(before);
      expect(hex(whole)).toBe(hex(copy));
    }
  });

  test.each(EACH_ENGINE)('a delivered payload keeps its bytes while later frames arrive (%s)', (_n, e) => {
    const keys = dirKeys();
    const tx = new ChannelSender(e, keys);
    const payloads = Array.from({ length: 6 }, (_, i) => rand(1000 + i));
    const stream = cat(...payloads.map((p) => tx.seal(RECORD.DATA, p)));
    const rx = new ChannelReceiver(e, keys);
    const kept: Uint8Array[] = []; // the delivered arrays themselves, not copies
    for (let off = 0; off < stream.length; off += 777) rx.push(stream.subarray(off, off + 777), (_t, p) => kept.push(p));
    expect(kept.map(hex)).toEqual(payloads.map(hex));
  });
});

describe('after a failure (§6 D2)', () => {
  test('only the records before the bad frame are delivered, and then the receiver refuses everything', () => {
    const { tx, rx, keys } = link();
    const f1 = tx.seal(RECORD.DATA, utf8('one'));
    const f2 = tx.seal(RECORD.DATA, utf8('two'));
    const f3 = tx.seal(RECORD.CLOSE);
    const bad = f2.slice();
    bad[HEADER_LEN]! ^= 0x01;
    const { got, err } = feed(rx, [cat(f1, bad, f3)]);
    expectCode(err, 'INTEGRITY');
    expect(got).toEqual([[RECORD.DATA, hex(utf8('one'))]]);
    // The genuine frame 2, the rest, an empty chunk, the end of stream: all refused with the same error.
    for (const chunk of [f2, f3, new Uint8Array(0)]) expect(feed(rx, [chunk]).err).toBe(err);
    expectThrowsCode(() => rx.end(), 'INTEGRITY');
    // Control: a receiver that saw no tampering accepts f2 and f3 after f1.
    const fresh = new ChannelReceiver(nobleEngine, keys);
    expect(feed(fresh, [f1, f2, f3]).got.length).toBe(3);
  });
});

describe('frames', () => {
  test.each(EACH_ENGINE)('a receiver fed Buffer chunks (as Bun delivers them) opens every record and leaves the chunks untouched (%s)', (_n, e) => {
    const keys = dirKeys();
    const tx = new ChannelSender(e, keys);
    const rx = new ChannelReceiver(e, keys);
    const sent = [rand(MAX_PAYLOAD), rand(3), rand(40_000)];
    const stream = Buffer.concat(sent.map((p) => tx.seal(RECORD.DATA, p)));
    const copy = Buffer.from(stream);
    const got: Uint8Array[] = [];
    for (let off = 0; off < stream.length; off += 50_001) rx.push(stream.subarray(off, off + 50_001), (_t, p) => got.push(p.slice()));
    expect(got.map(sha256)).toEqual(sent.map(sha256));
    expect(stream.equals(copy)).toBe(true);
  });

  test.each(EACH_ENGINE)('a frame is the same bytes whatever the payload offset in its buffer, and opens with either engine (%s)', (_n, e) => {
    const keys = dirKeys();
    const iv = rand(16);
    const content = rand(MAX_PAYLOAD);
    const frames: string[] = [];
    // Offsets around page boundaries exercise every placement the sender picks for a frame.
    for (const off of [0, 1, 20, 21, 22, 64, 100, 4075, 4096 - 21, 4096, 4117, 65536]) {
      const payload = new Uint8Array(off + MAX_PAYLOAD).subarray(off);
      payload.set(content);
      const tx = new ChannelSender(e, keys, () => iv);
      const frame = tx.seal(RECORD.DATA, payload);
      expect(frame.length).toBe(HEADER_LEN + padded(1 + MAX_PAYLOAD) + 32);
      expect(frame.byteOffset % 4).toBe(0);
      for (const re of ENGINES) {
        const got = new ChannelReceiver(re, keys).open(frame);
        expect(sha256(got.payload)).toBe(sha256(payload));
      }
      frames.push(sha256(frame));
    }
    expect(new Set(frames).size).toBe(1);
  });

  test.each(EACH_ENGINE)('payloads delivered from reassembled frames stay intact after later frames are opened (%s)', (_n, e) => {
    const keys = dirKeys();
    const tx = new ChannelSender(e, keys);
    const rx = new ChannelReceiver(e, keys);
    const sent = [rand(MAX_PAYLOAD), rand(100), rand(MAX_PAYLOAD), rand(5000)];
    const stream = new Uint8Array(Buffer.concat(sent.map((p) => tx.seal(RECORD.DATA, p))));
    const got: Uint8Array[] = [];
    for (let off = 0; off < stream.length; off += 7777) rx.push(stream.subarray(off, off + 7777), (_t, p) => got.push(p));
    expect(got.map(sha256)).toEqual(sent.map(sha256));
  });
});
