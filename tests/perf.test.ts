/**
 * Behaviour of the performance work (issue #6): engines writing in place, frames laid out to dodge slow copies,
 * write coalescing, and `serve --workers`. No timing is asserted here: timing belongs to `bun run bench`.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ChannelReceiver, ChannelSender, HEADER_LEN, MAX_PAYLOAD, RECORD } from '../channel.ts';
import { type Engine, nativeEngine, nobleEngine } from '../engine.ts';
import type { DirectionKeys } from '../handshake.ts';
import { corked, WriteQueue } from '../session.ts';
import { workerArgs } from '../workers.ts';
import { keygen, random, sha256, tempDir, until, VpnProcess } from './helpers.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

const ENGINES: readonly Engine[] = [nobleEngine, nativeEngine];
const EACH_ENGINE = ENGINES.map((e) => [e.name, e] as const);
const rand = (n: number) => new Uint8Array(randomBytes(n));
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const padded = (n: number) => (Math.floor(n / 16) + 1) * 16;
const dirKeys = (): DirectionKeys => ({ enc: rand(32), mac: rand(32), chain0: rand(32) });

describe('engines: output buffers', () => {
  test.each(EACH_ENGINE)('encryptCbc in place (plaintext laid out where its ciphertext goes) equals the plain call (%s)', (_n, e) => {
    for (const n of [0, 1, 15, 16, 17, 1000, MAX_PAYLOAD + 1]) {
      const key = rand(32);
      const iv = rand(16);
      const pt = rand(n);
      const want = hex(nobleEngine.encryptCbc(key, iv, pt, true));
      const buf = new Uint8Array(padded(n));
      buf.set(pt);
      const out = e.encryptCbc(key, iv, buf.subarray(0, n), true, buf);
      expect(out).toBe(buf);
      expect(hex(buf)).toBe(want);
    }
  });

  test.each(EACH_ENGINE)('decryptCbc into the ciphertext itself, into a misaligned buffer, or into a wrong-sized one all give the right plaintext (%s)', (_n, e) => {
    const key = rand(32);
    const iv = rand(16);
    const pt = rand(1000);
    const ct = nobleEngine.encryptCbc(key, iv, pt, true);
    expect(hex(e.decryptCbc(key, iv, ct.slice(), true, undefined))).toBe(hex(pt));
    const inPlace = ct.slice();
    expect(hex(e.decryptCbc(key, iv, inPlace, true, inPlace))).toBe(hex(pt));
    const odd = new Uint8Array(ct.length + 1).subarray(1); // byteOffset 1: noble cannot write there
    expect(hex(e.decryptCbc(key, iv, ct, true, odd))).toBe(hex(pt));
    expect(hex(e.decryptCbc(key, iv, ct, true, new Uint8Array(5)))).toBe(hex(pt));
    // A misaligned input (a frame somewhere inside a socket chunk) decrypts correctly and is left as it was.
    const shifted = new Uint8Array(ct.length + 3).subarray(3);
    shifted.set(ct);
    expect(hex(e.decryptCbc(key, iv, shifted, true))).toBe(hex(pt));
    expect(hex(shifted)).toBe(hex(ct));
  });

  test.each(EACH_ENGINE)('decryptCbc refuses a ciphertext that is not whole blocks, and an empty one with padding (%s)', (_n, e) => {
    const key = rand(32);
    const iv = rand(16);
    for (const n of [1, 15, 17, 33]) expect(() => e.decryptCbc(key, iv, rand(n), false)).toThrow();
    expect(() => e.decryptCbc(key, iv, new Uint8Array(0), true)).toThrow();
  });

  test('native X25519 with a key it generated agrees with noble, and a key changed after keygen is not served from its cache', () => {
    const a = nativeEngine.x25519Keygen();
    const b = nobleEngine.x25519Keygen();
    const c = nobleEngine.x25519Keygen();
    const want = hex(nobleEngine.x25519(a.secretKey.slice(), b.publicKey));
    expect(hex(nativeEngine.x25519(a.secretKey, b.publicKey))).toBe(want);
    // The caller overwrites the array it got from keygen: the result must follow the bytes, not the cached key.
    a.secretKey.set(c.secretKey);
    expect(hex(nativeEngine.x25519(a.secretKey, b.publicKey))).toBe(hex(nobleEngine.x25519(c.secretKey, b.publicKey)));
    // A second use of a generated key (the cache serves one) still gives the right answer.
    const d = nativeEngine.x25519Keygen();
    const once = hex(nativeEngine.x25519(d.secretKey, b.publicKey));
    expect(hex(nativeEngine.x25519(d.secretKey, b.publicKey))).toBe(once);
    expect(hex(nativeEngine.x25519Public(d.secretKey))).toBe(hex(d.publicKey));
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

/** A stand-in for a Bun socket: records each write, takes at most `room` bytes per call. */
function fakeSocket(room = Infinity) {
  const writes: Uint8Array[] = [];
  return {
    writes,
    room,
    write(d: Uint8Array) {
      const n = Math.min(d.length, this.room);
      writes.push(d.slice(0, n));
      return n;
    },
  };
}
const joined = (ws: Uint8Array[]) => new Uint8Array(Buffer.concat(ws));

describe('write coalescing', () => {
  test('small writes inside corked() leave as one socket write, in order', () => {
    const sock = fakeSocket();
    const q = new WriteQueue(sock as never);
    const parts = Array.from({ length: 100 }, (_, i) => new Uint8Array(10).fill(i));
    corked(() => {
      for (const p of parts) q.write(p);
      expect(sock.writes.length).toBe(0);
      expect(q.empty).toBe(false);
    });
    expect(sock.writes.length).toBe(1);
    expect(hex(sock.writes[0]!)).toBe(hex(joined(parts)));
    expect(q.empty).toBe(true);
  });

  test('outside corked() every write goes straight to the socket', () => {
    const sock = fakeSocket();
    const q = new WriteQueue(sock as never);
    for (let i = 0; i < 5; i++) q.write(new Uint8Array(10));
    expect(sock.writes.length).toBe(5);
  });

  test('a large write inside corked() sends what was gathered first, so the byte order never changes', () => {
    const sock = fakeSocket();
    const q = new WriteQueue(sock as never);
    const a = rand(100);
    const b = rand(100);
    const big = rand(40_000);
    const c = rand(100);
    corked(() => {
      q.write(a);
      q.write(b);
      q.write(big);
      q.write(c);
    });
    expect(sock.writes.map((w) => w.length)).toEqual([200, 40_000, 100]);
    expect(hex(joined(sock.writes))).toBe(hex(joined([a, b, big, c])));
  });

  test('a gathered batch is sent early once it reaches 64 KiB, so gathering never holds more', () => {
    const sock = fakeSocket();
    const q = new WriteQueue(sock as never);
    const parts = Array.from({ length: 10 }, () => rand(10_000));
    corked(() => {
      for (const p of parts) q.write(p);
      expect(sock.writes.length).toBe(1);
    });
    expect(sock.writes.map((w) => w.length)).toEqual([70_000, 30_000]);
    expect(hex(joined(sock.writes))).toBe(hex(joined(parts)));
  });

  test('when the socket takes only part, the rest is queued and onDrained waits for the drain; when it takes all, onDrained runs', () => {
    let drained = 0;
    const sock = fakeSocket(50);
    const q = new WriteQueue(sock as never, () => drained++);
    corked(() => {
      for (let i = 0; i < 4; i++) q.write(new Uint8Array(30).fill(i));
    });
    expect(drained).toBe(0); // 70 bytes still queued: a real socket will emit drain
    expect(q.empty).toBe(false);
    sock.room = Infinity;
    expect(q.flush()).toBe(true);
    expect(joined(sock.writes).length).toBe(120);
    corked(() => q.write(new Uint8Array(10)));
    expect(drained).toBe(1);
  });

  test('nested corked() sends once, when the outermost returns', () => {
    const sock = fakeSocket();
    const q = new WriteQueue(sock as never);
    corked(() => {
      q.write(new Uint8Array(1));
      corked(() => q.write(new Uint8Array(2)));
      expect(sock.writes.length).toBe(0);
    });
    expect(sock.writes.map((w) => w.length)).toEqual([3]);
  });
});

describe('serve --workers', () => {
  test('workerArgs drops --workers and sets --listen, in both spellings', () => {
    expect(workerArgs(['--listen', '127.0.0.1:0', '--workers', '2', '--forward', 'x:1', '--key', 'k'], '127.0.0.1:5000')).toEqual([
      '--listen',
      '127.0.0.1:5000',
      '--forward',
      'x:1',
      '--key',
      'k',
    ]);
    expect(workerArgs(['--workers=3', '--listen=[::1]:0', '-v'], '[::1]:7')).toEqual(['--listen', '[::1]:7', '-v']);
  });

  /** An echo target, a server with `workers`, a --local client in front of it. */
  async function rig(dir: string, workers: number, extra: string[] = []) {
    const key = await keygen(dir);
    const target = Bun.listen({
      hostname: '127.0.0.1',
      port: 0,
      allowHalfOpen: true,
      socket: { data: (s, d) => void s.write(d), end: (s) => void s.end(), error() {} },
    });
    const srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--forward', `127.0.0.1:${target.port}`, '--key', key, '--workers', String(workers), ...extra]);
    const sport = await srv.listeningPort();
    const cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--local', '127.0.0.1:0', '--key', key]);
    const lport = await cli.listeningPort();
    return { key, target, srv, cli, sport, lport };
  }

  /** Send `data` through `port`, half-close, and resolve with what came back. */
  function echo(port: number, data: Uint8Array): Promise<Uint8Array> {
    const chunks: Uint8Array[] = [];
    const { promise, resolve, reject } = Promise.withResolvers<Uint8Array>();
    Bun.connect({
      hostname: '127.0.0.1',
      port,
      allowHalfOpen: true,
      socket: {
        open(s) {
          s.write(data); // small enough for one write on loopback
          s.shutdown(); // FIN, and keep reading (Bun 1.4: shutdown(true) would stop reading too)
        },
        data: (_s, d) => void chunks.push(new Uint8Array(d)),
        close: () => resolve(new Uint8Array(Buffer.concat(chunks))),
        error: (_s, e) => reject(e),
      },
    }).catch(reject);
    return promise;
  }

  /** Worker pids that logged "session opened" (the supervisor prefixes each worker line with its pid). */
  const servingPids = (stderr: string) => new Set([...stderr.matchAll(/^\[worker \d+ pid (\d+)\] session opened/gm)].map((m) => Number(m[1])));

  const childrenOf = (pid: number): number[] => {
    try {
      return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    } catch {
      return [];
    }
  };
  /** Gone, or a zombie waiting for its (re)parent to reap it. */
  const dead = (pid: number) => {
    try {
      return /^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
    } catch {
      return true;
    }
  };

  test('with --workers 2 connections are served by two processes, every one gets its bytes back, and SIGTERM ends all with 0', async () => {
    using dir = tempDir();
    const r = await rig(dir.path, 2);
    using _srv = r.srv;
    using _cli = r.cli;
    try {
      expect(r.srv.stderr.match(/^listening on /gm)?.length).toBe(1);
      const workers = childrenOf(r.srv.pid);
      expect(workers.length).toBe(2);
      // The kernel picks a worker by a hash of each connection's addresses; keep going (bounded) until both served.
      let rounds = 0;
      while (servingPids(r.srv.stderr).size < 2 && rounds < 8) {
        rounds++;
        const sent = Array.from({ length: 8 }, () => random(20_000));
        const back = await Promise.all(sent.map((d) => echo(r.lport, d)));
        expect(back.map(sha256)).toEqual(sent.map(sha256));
        await until(() => (r.srv.stderr.match(/session opened/g)?.length ?? 0) >= rounds * 8, 5000);
      }
      const pids = servingPids(r.srv.stderr);
      expect(pids.size).toBe(2);
      for (const p of pids) expect(workers).toContain(p);
      r.srv.kill('SIGTERM');
      expect(await r.srv.exit()).toBe(0);
      for (const w of workers) expect(await until(() => dead(w), 5000)).toBe(true);
    } finally {
      r.target.stop(true);
    }
  });

  test('a worker that dies takes the other workers down, and the server exits non-zero', async () => {
    using dir = tempDir();
    const r = await rig(dir.path, 2);
    using _srv = r.srv;
    using _cli = r.cli;
    try {
      const [a, b] = childrenOf(r.srv.pid) as [number, number];
      process.kill(a, 'SIGKILL');
      expect(await r.srv.exit()).not.toBe(0);
      expect(r.srv.stderr).toMatch(/worker \d \(pid \d+\) exited/);
      expect(await until(() => dead(b), 5000)).toBe(true);
    } finally {
      r.target.stop(true);
    }
  });

  test('workers shut down when their supervisor is killed outright', async () => {
    using dir = tempDir();
    const r = await rig(dir.path, 2);
    using _srv = r.srv;
    using _cli = r.cli;
    try {
      const workers = childrenOf(r.srv.pid);
      expect(workers.length).toBe(2);
      r.srv.kill('SIGKILL');
      for (const w of workers) expect(await until(() => dead(w), 5000)).toBe(true);
    } finally {
      r.target.stop(true);
    }
  });

  test('--workers is refused without --forward, with a unix address, out of range, and on a port already in use', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const cases = [
      ['serve', '--listen', '127.0.0.1:0', '--key', key, '--workers', '2'],
      ['serve', '--listen', `unix:${dir.path}/s`, '--forward', '127.0.0.1:9', '--key', key, '--workers', '2'],
      ['serve', '--listen', '127.0.0.1:0', '--forward', '127.0.0.1:9', '--key', key, '--workers', '0'],
      ['serve', '--listen', '127.0.0.1:0', '--forward', '127.0.0.1:9', '--key', key, '--workers', 'two'],
    ];
    for (const args of cases) {
      const p = new VpnProcess(args);
      expect(await p.exit()).toBe(2);
    }
    using busy = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } });
    const p = new VpnProcess(['serve', '--listen', `127.0.0.1:${busy.port}`, '--forward', '127.0.0.1:9', '--key', key, '--workers', '2']);
    expect(await p.exit()).toBe(1);
    expect(p.stderr).toContain('cannot listen');
    expect(p.stderr).not.toContain('[worker');
  });
});
