/**
 * log.ts's limits, in-process on a fake clock: the per-key limit, the global cap on lines a second whatever the
 * key, the "(N lines suppressed …)" line, and the bounded key map. The same limit seen from a real server under a
 * flood of connections from 2,000 addresses is in tests/attacks.test.ts.
 */
import { describe, expect, test } from 'bun:test';
import { Logger } from '../log.ts';

function rig() {
  const lines: string[] = [];
  let t = 1_000_000;
  const log = new Logger((l) => lines.push(l), () => t);
  return { log, lines, advance: (ms: number) => (t += ms) };
}

describe('log limits', () => {
  test('one key: at most 5 lines per 10 s window, then one "similar lines suppressed" line', () => {
    const { log, lines, advance } = rig();
    for (let i = 0; i < 100; i++) log.limited('warn', 'handshake failed|10.0.0.1|AUTH_FAILED', `line ${i}`);
    expect(lines).toEqual(['line 0', 'line 1', 'line 2', 'line 3', 'line 4']);
    advance(10_001);
    log.limited('warn', 'handshake failed|10.0.0.1|AUTH_FAILED', 'again');
    expect(lines.slice(5)).toEqual(['(95 similar lines suppressed: handshake failed 10.0.0.1 AUTH_FAILED)', 'again']);
  });

  test('2,000 distinct keys in one burst write at most 20 lines; the rest is one "lines suppressed" line', () => {
    const { log, lines } = rig();
    for (let i = 0; i < 2000; i++) log.limited('warn', `handshake failed|127.1.${i >> 8}.${i & 255}|AUTH_FAILED`, `handshake failed 127.1.${i >> 8}.${i & 255}`);
    expect(lines).toHaveLength(20);
    expect(log.pendingSuppressed).toBe(1980);
    log.flushSuppressed();
    expect(lines).toHaveLength(21);
    expect(lines[20]).toMatch(/^\(1980 lines suppressed: more than 10 log lines a second about peers\)$/);
    log.flushSuppressed();
    expect(lines).toHaveLength(21); // nothing more to report, nothing written
  });

  test('a sustained flood of distinct keys writes at most 20 + 10 lines per second', () => {
    const { log, lines, advance } = rig();
    for (let s = 0; s < 30; s++) {
      for (let i = 0; i < 500; i++) log.limited('warn', `k|${s}|${i}`, 'x');
      advance(1000);
    }
    expect(lines.length).toBeLessThanOrEqual(20 + 10 * 30);
    expect(lines.length).toBeGreaterThanOrEqual(10 * 30); // the cap is a rate, not a silence
  });

  test('lines the process writes of itself (info, warn, error) are never held back', () => {
    const { log, lines } = rig();
    for (let i = 0; i < 100; i++) log.limited('warn', `k|${i}`, 'peer');
    log.info('listening on 127.0.0.1:1');
    log.error('shutting down');
    expect(lines.slice(-2)).toEqual(['listening on 127.0.0.1:1', 'shutting down']);
  });

  test('the key map holds at most 1024 keys; a dropped key\'s suppressed lines are counted, not lost', () => {
    const { log, lines, advance } = rig();
    for (let i = 0; i < 7; i++) log.limited('warn', 'first', 'first');
    expect(lines).toHaveLength(5);
    advance(60_000); // the global bucket is full again
    for (let i = 0; i < 5000; i++) {
      log.limited('warn', `k|${i}`, 'x');
      if (i % 10 === 0) advance(1000);
    }
    expect((log as unknown as { buckets: Map<string, unknown> }).buckets.size).toBeLessThanOrEqual(1024);
    const before = log.pendingSuppressed;
    log.flushSuppressed();
    expect(lines.at(-1)).toMatch(new RegExp(`^\\(${before} lines suppressed`));
    expect(before).toBeGreaterThanOrEqual(2); // the 2 lines suppressed under "first", whose key was dropped
  });
});
