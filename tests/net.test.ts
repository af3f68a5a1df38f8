/**
 * The network write path: `WriteQueue` and `corked()` coalesce the small writes of one event-loop turn into one
 * socket write, keep the byte order when a large write comes in between, cap a gathered batch at 64 KiB, and queue
 * what a socket does not take. A fake socket stands in for Bun's; no network, no timing.
 */
import { describe, expect, test } from 'bun:test';
import { randomBytes } from 'node:crypto';
import { corked, WriteQueue } from '../net.ts';

const rand = (n: number) => new Uint8Array(randomBytes(n));
const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

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
