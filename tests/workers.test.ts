/**
 * `serve --workers N`: the argument rewriting for the workers, connections spread over N processes on one port,
 * a dying worker or supervisor taking the rest down, and the refusals. Real `bun vpn.ts` processes on 127.0.0.1.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { readFileSync } from 'node:fs';
import { workerArgs, workerEnv } from '../workers.ts';
import { keygen, random, sha256, tempDir, until, VpnProcess } from './helpers.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

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

  test('workerArgs drops --secret and its value, in both spellings; workerEnv keeps nothing secret', () => {
    expect(workerArgs(['--secret', 'pw pw pw', '--forward', 'x:1', '--secret=pw2', '--workers', '2'], '127.0.0.1:5')).toEqual(['--listen', '127.0.0.1:5', '--forward', 'x:1']);
    const env = workerEnv(3, { PATH: '/bin', HOME: '/root', VPN_SECRET: 'pw', AWS_SECRET_ACCESS_KEY: 'x', VPN_WORKER: '9' });
    expect(env).toEqual({ PATH: '/bin', HOME: '/root', VPN_WORKER: '3' });
  });

  /** NUL-separated /proc/PID/cmdline or environ, as text (for a substring search). */
  const procText = (pid: number, what: 'cmdline' | 'environ') => readFileSync(`/proc/${pid}/${what}`, 'utf8').replaceAll('\0', ' ');

  for (const how of ['--secret', 'VPN_SECRET'] as const) {
    test(`serve --workers 2 with the passphrase from ${how}: it is in no worker's argv or environment, and the workers serve with it`, async () => {
      const secret = `pass-${Buffer.from(random(12)).toString('hex')}`;
      const target = Bun.listen({
        hostname: '127.0.0.1',
        port: 0,
        allowHalfOpen: true,
        socket: { data: (s, d) => void s.write(d), end: (s) => void s.end(), error() {} },
      });
      const secretArgs = how === '--secret' ? ['--secret', secret] : [];
      const env = { VPN_SECRET: how === 'VPN_SECRET' ? secret : '' };
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--forward', `127.0.0.1:${target.port}`, ...secretArgs, '--workers', '2'], { env });
      try {
        const sport = await srv.listeningPort();
        const workers = childrenOf(srv.pid);
        expect(workers.length).toBe(2);
        for (const w of workers) {
          const cmdline = procText(w, 'cmdline');
          const environ = procText(w, 'environ');
          expect(cmdline).toContain('serve --listen 127.0.0.1:'); // it is a worker's we read
          expect(environ).toContain('VPN_WORKER=');
          expect(cmdline).not.toContain(secret);
          expect(environ).not.toContain(secret);
          expect(environ).not.toContain('VPN_SECRET');
        }
        using cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--local', '127.0.0.1:0'], { env: { VPN_SECRET: secret } });
        const lport = await cli.listeningPort();
        const data = random(5000);
        expect(sha256(await echo(lport, data))).toBe(sha256(data));
        srv.kill('SIGTERM');
        expect(await srv.exit()).toBe(0);
      } finally {
        target.stop(true);
      }
    });
  }

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
    expect(await p.exit()).toBe(2); // a port in use is a configuration error, as without --workers
    expect(p.stderr).toMatch(/cannot listen on .*: address already in use/);
    expect(p.stderr).not.toContain('[worker');
  });
});
