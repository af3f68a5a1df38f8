/**
 * Graceful shutdown in every mode, with real processes and real sockets on 127.0.0.1: on SIGINT/SIGTERM a process
 * stops accepting, lets its sessions run for --grace seconds, then aborts what is left (a reset, never a clean end
 * for a cut stream) and exits non-zero; a session that ends by itself within the grace period is untouched and the
 * process exits 0 as soon as it has. A chat on a terminal ends with CLOSE on Ctrl-C.
 *
 * These tests specify the behaviour of the serve/connect restructuring (a serve skeleton shared by every mode,
 * graceful shutdown, a new CLI parser); they fail against the code from before it.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import type { Socket, TCPSocketListener } from 'bun';
import { forwardPair, keygen, Pty, random, sha256, tempDir, until, VpnProcess } from './helpers.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

const dir = tempDir();
let key = '';
beforeAll(async () => {
  key = await keygen(dir.path, 'key');
});
afterAll(() => dir[Symbol.dispose]());

// ---- helpers ----

/**
 * How one TCP connection ended, as its owner saw it: `ended` is Bun's `end` event (a FIN while our side was still
 * open; after our own shutdown() a FIN shows as a plain `close`), `error` a reset or error, `closed` that it is over.
 * A clean end is closed without an error; a reset is an error and never an `end`.
 */
type Ending = { ended: boolean; error: boolean; closed: boolean };

/** A target (a TCP server in this process) whose every connection `start`s sending when opened; records each end. */
function target(start: (s: Socket<TargetData>) => void): { listener: TCPSocketListener<TargetData>; conns: TargetEnd[]; port: number } {
  const conns: TargetEnd[] = [];
  const listener = Bun.listen<TargetData>({
    hostname: '127.0.0.1',
    port: 0,
    allowHalfOpen: true,
    data: { q: [], ending: false, finSent: false, end: { ended: false, error: false, closed: false, received: [] } },
    socket: {
      open(s) {
        s.data = { q: [], ending: false, finSent: false, end: { ended: false, error: false, closed: false, received: [] } };
        conns.push(s.data.end);
        start(s);
      },
      data(s, d) {
        s.data.end.received.push(new Uint8Array(d));
      },
      drain: (s) => flushTarget(s),
      end(s) {
        s.data.end.ended = true;
      },
      error(s) {
        s.data.end.error = true;
      },
      close(s, err) {
        if (err) s.data.end.error = true;
        s.data.end.closed = true;
        clearInterval(s.data.timer);
      },
    },
  });
  return { listener, conns, port: listener.port };
}
type TargetEnd = Ending & { received: Uint8Array[] };
type TargetData = { q: Uint8Array[]; ending: boolean; finSent: boolean; timer?: ReturnType<typeof setInterval>; end: TargetEnd };

/** Write what a target connection has queued; once it is all out and the target is `ending`, send FIN. */
function flushTarget(s: Socket<TargetData>): void {
  const q = s.data.q;
  while (q.length > 0) {
    const head = q[0]!;
    const n = s.write(head);
    if (n < head.length) {
      q[0] = head.subarray(Math.max(n, 0));
      return;
    }
    q.shift();
  }
  if (s.data.ending && !s.data.finSent) {
    s.data.finSent = true;
    s.shutdown(); // FIN, and keep reading: Bun's end() would stop reading and lose the rest of the upload
  }
}

/** A target that trickles 10 bytes every 100 ms, for at most 30 s (bounded by the test). */
function trickleTarget() {
  return target((s) => {
    let ticks = 0;
    s.data.timer = setInterval(() => {
      if (++ticks > 300) return clearInterval(s.data.timer);
      s.data.q.push(new TextEncoder().encode('0123456789'));
      flushTarget(s);
    }, 100);
  });
}

/** A target that sends `payload` in 16 pieces 60 ms apart (about 1 s) and then ends its side (FIN). */
function burstTarget(payload: Uint8Array) {
  return target((s) => {
    const pieces = 16;
    const size = Math.ceil(payload.length / pieces);
    let i = 0;
    s.data.timer = setInterval(() => {
      s.data.q.push(payload.subarray(i * size, Math.min((i + 1) * size, payload.length)));
      if (++i === pieces) {
        clearInterval(s.data.timer);
        s.data.ending = true;
      }
      flushTarget(s);
    }, 60);
  });
}

/**
 * An app: connects, reads everything and records how its connection ended. By default it answers a FIN with its own
 * (as most clients do); with `upload` it sends those bytes in 16 pieces 60 ms apart and then ends its side itself.
 */
async function app(port: number, upload?: Uint8Array) {
  const chunks: Uint8Array[] = [];
  const state: Ending & { bytes: number } = { ended: false, error: false, closed: false, bytes: 0 };
  const closed = Promise.withResolvers<void>();
  const sock = await Bun.connect({
    hostname: '127.0.0.1',
    port,
    allowHalfOpen: true,
    socket: {
      data(_s, d) {
        chunks.push(new Uint8Array(d));
        state.bytes += d.length;
      },
      end(s) {
        state.ended = true; // a FIN: the clean end
        if (!upload) s.end();
      },
      error() {
        state.error = true;
      },
      close(_s, err) {
        if (err) state.error = true; // a reset arrives as a close with an error, never as `end`
        state.closed = true;
        closed.resolve();
      },
    },
  });
  if (upload) {
    void (async () => {
      const size = Math.ceil(upload.length / 16);
      const q: Uint8Array[] = [];
      for (let i = 0; i < 16 && !state.closed; i++) {
        q.push(upload.subarray(i * size, Math.min((i + 1) * size, upload.length)));
        while (q.length > 0 && !state.closed) {
          const n = sock.write(q[0]!);
          if (n < q[0]!.length) {
            q[0] = q[0]!.subarray(Math.max(n, 0));
            await Bun.sleep(10);
          } else q.shift();
        }
        await Bun.sleep(60);
      }
      if (!state.closed) sock.shutdown(); // FIN: the upload is complete
    })();
  }
  return { sock, state, closed: closed.promise, data: () => new Uint8Array(Buffer.concat(chunks)) };
}

/** Whether a TCP connect to 127.0.0.1:port is refused. */
async function refused(port: number): Promise<boolean> {
  try {
    const s = await Bun.connect({ hostname: '127.0.0.1', port, socket: { data() {} } });
    s.end();
    return false;
  } catch {
    return true;
  }
}

/** The `session closed …` lines of a log. */
function sessionLines(stderr: string): string[] {
  return stderr.match(/^.*session closed .*$/gm) ?? [];
}

/** Exit status and how long after `t0` it came; the process is SIGKILLed after `ms` (then `signalCode` says so). */
async function exitAfter(p: VpnProcess, t0: number, ms = 20000): Promise<{ code: number; ms: number; signal: unknown }> {
  const code = await p.exit(ms);
  return { code, ms: Date.now() - t0, signal: p.proc.signalCode };
}

/** Write `data` in 64 KiB pieces `ms` apart, then end; a process that has exited (EPIPE) just stops the feeding. */
async function feedSlowly(p: VpnProcess, data: Uint8Array, ms = 60, end = true): Promise<void> {
  const sink = p.proc.stdin as import('bun').FileSink;
  try {
    for (let off = 0; off < data.length; off += 1 << 16) {
      const w = sink.write(data.subarray(off, Math.min(off + (1 << 16), data.length)));
      if (w instanceof Promise) await w;
      await sink.flush();
      await Bun.sleep(ms);
    }
    if (end) await sink.end();
  } catch {
    // the process is gone
  }
}


// ---- forward mode ----

for (const side of ['server', 'client'] as const) {
  const who = side === 'server' ? 'serve --forward' : 'connect --local';
  const grace = (s: string) => (side === 'server' ? { serve: ['--grace', s] } : { connect: ['--grace', s] });

  describe(`SIGTERM to ${who}`, () => {
    test('stops accepting, lets the session run for --grace, then resets it (never a clean end) and exits 1', async () => {
      const t = trickleTarget();
      using pair = await forwardPair(key, `127.0.0.1:${t.port}`, grace('1'));
      const proc = side === 'server' ? pair.srv : pair.cli;
      const port = side === 'server' ? pair.sport : pair.lport;
      const a = await app(pair.lport);
      expect(await until(() => a.state.bytes >= 40, 10000), 'the trickle came through').toBe(true); // about 0.5 s in
      const t0 = Date.now();
      proc.kill('SIGTERM');
      const atSignal = a.state.bytes;
      // New connections are refused while the process is still in its grace period (300 ms in: the signal has been
      // handled, the grace period is not over).
      await Bun.sleep(300);
      const refusedNow = await refused(port);
      const upThen = proc.proc.exitCode === null;
      const end = await exitAfter(proc, t0);
      await Promise.race([a.closed, Bun.sleep(5000)]);
      await Bun.sleep(200);
      expect(end.code, proc.stderr).toBe(1);
      expect(end.signal, proc.stderr).toBeNull(); // it exited by itself, not by the signal
      expect(end.ms, proc.stderr).toBeGreaterThanOrEqual(800); // it let the session run for --grace
      expect(end.ms, proc.stderr).toBeLessThan(6000);
      expect({ refusedNow, upThen }, `a connection to ${port} 300 ms after SIGTERM\n${proc.stderr}`).toEqual({ refusedNow: true, upThen: true });
      expect(a.state.bytes, 'the session went on during the grace period').toBeGreaterThanOrEqual(atSignal + 30);
      expect(a.state, 'the app must see a reset, never a FIN').toEqual({ ended: false, error: true, closed: true, bytes: a.state.bytes });
      expect(t.conns.length, 'one session, one target connection').toBe(1);
      expect(t.conns[0]!.ended, 'the target must not get a FIN for the cut stream').toBe(false);
      expect(proc.stderr).toMatch(/grace/);
      const lines = sessionLines(proc.stderr);
      expect(lines.length, proc.stderr).toBeGreaterThanOrEqual(1);
      for (const l of lines) expect(l).not.toMatch(/clean end/);
      t.listener.stop(true);
    });

    test('a session that ends by itself within --grace is untouched, and the process exits 0 right after it', async () => {
      const payload = random(1 << 20); // the target sends it over about 1 s, then FIN
      const upload = random(1 << 20); // the app sends it over about 1 s, then FIN
      const t = burstTarget(payload);
      using pair = await forwardPair(key, `127.0.0.1:${t.port}`, grace('5'));
      const proc = side === 'server' ? pair.srv : pair.cli;
      const a = await app(pair.lport, upload);
      await pair.srv.waitFor(/session opened/);
      await Bun.sleep(200);
      const t0 = Date.now();
      proc.kill('SIGTERM');
      await Promise.race([a.closed, Bun.sleep(10000)]);
      const appDone = Date.now();
      const end = await exitAfter(proc, t0);
      expect(a.state.bytes).toBe(payload.length);
      expect(sha256(a.data())).toBe(sha256(payload));
      expect(a.state, 'a clean EOF').toMatchObject({ error: false, closed: true });
      await until(() => t.conns[0]?.closed === true, 3000);
      const up = new Uint8Array(Buffer.concat(t.conns[0]?.received ?? []));
      expect(up.length, 'the upload arrived whole').toBe(upload.length);
      expect(sha256(up)).toBe(sha256(upload));
      expect(t.conns[0], 'and ended with a FIN').toMatchObject({ error: false, closed: true });
      expect(end.code, proc.stderr).toBe(0);
      expect(end.ms, proc.stderr).toBeLessThan(4000); // well before the 5 s grace period is over
      expect(Date.now() - appDone, proc.stderr).toBeLessThan(3000); // soon after the session ended
      const lines = sessionLines(proc.stderr);
      expect(lines.length, proc.stderr).toBe(1);
      expect(lines[0]).toMatch(/clean end/);
      t.listener.stop(true);
    });
  });
}

// ---- stdio mode ----

describe('stdio mode handles signals', () => {
  test('Ctrl-C in a terminal chat sends CLOSE: the line typed arrives and both ends exit 0', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using pty = new Pty(['connect', `127.0.0.1:${port}`, '--key', key]);
    await pty.waitFor(/connected/);
    await pty.type('hello\r');
    await Bun.sleep(500);
    await pty.type('\x03'); // Ctrl-C
    await Bun.sleep(1000);
    await (srv.proc.stdin as import('bun').FileSink).end(); // the server's user ends the session too
    const [cliCode, srvCode] = await Promise.all([pty.exit(15000), srv.exit(15000)]);
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('hello\n');
    expect(srvCode, srv.stderr).toBe(0);
    expect(cliCode, pty.out).toBe(0);
    expect(srv.stderr + pty.out).not.toMatch(/truncat|without an authenticated CLOSE|before an authenticated CLOSE/i);
  });

  test('SIGTERM to an idle stdio server exits 0 within 2 s saying it is shutting down', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key], { stdin: 'pipe' });
    await srv.listeningPort();
    const t0 = Date.now();
    srv.kill('SIGTERM');
    const end = await exitAfter(srv, t0, 5000);
    expect(end.code, srv.stderr).toBe(0);
    expect(end.ms).toBeLessThan(2000);
    expect(srv.stderr).toMatch(/shutting down/);
  });

  test('SIGTERM to serve --once --grace 1 during a pipe that never ends: after the grace period both ends exit non-zero', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--grace', '1', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    // Some bytes each way; neither stdin ever ends.
    void feedSlowly(srv, random(256 << 10), 60, false);
    void feedSlowly(cli, random(256 << 10), 60, false);
    await srv.waitFor(/session opened/);
    await Bun.sleep(300);
    const t0 = Date.now();
    srv.kill('SIGTERM');
    const s = await exitAfter(srv, t0, 10000);
    const c = await exitAfter(cli, t0, 10000);
    expect(s.signal, srv.stderr).toBeNull(); // the server handled the signal and exited by itself
    expect(s.code, srv.stderr).not.toBe(0);
    expect(s.ms, srv.stderr).toBeGreaterThanOrEqual(800); // it let the session run for --grace
    expect(s.ms, srv.stderr).toBeLessThan(4000);
    expect(c.signal, cli.stderr).toBeNull(); // the client noticed by itself (not killed by this test)
    expect(c.code, cli.stderr).not.toBe(0);
  });

  test('SIGTERM to serve --once --grace 5 during a pipe that finishes by itself: the data arrives intact and both exit 0', async () => {
    const fromServer = random(1 << 20);
    const fromClient = random(1 << 20);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--grace', '5', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    const feeding = Promise.all([feedSlowly(srv, fromServer), feedSlowly(cli, fromClient)]); // about 1 s each
    await srv.waitFor(/session opened/);
    await Bun.sleep(200);
    const t0 = Date.now();
    srv.kill('SIGTERM');
    await feeding;
    const [srvOut, cliOut, s, c] = await Promise.all([srv.stdoutBytes, cli.stdoutBytes, exitAfter(srv, t0), exitAfter(cli, t0)]);
    expect(sha256(srvOut)).toBe(sha256(fromClient));
    expect(sha256(cliOut)).toBe(sha256(fromServer));
    expect(s.code, srv.stderr).toBe(0);
    expect(c.code, cli.stderr).toBe(0);
    expect(s.ms, srv.stderr).toBeLessThan(4000); // well before the 5 s grace period is over
  });
});

// ---- the default grace period ----

describe('--grace defaults to 10 s in every mode', () => {
  test('stdio serve, serve --forward and connect --local each abort a session that never ends 10 s after SIGTERM', async () => {
    // Three setups at once, each with a session that would run forever.
    const echo = target(() => {});
    const runs: Promise<{ mode: string; code: number; ms: number; signal: unknown; stderr: string }>[] = [];

    const stdio = async () => {
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
      const port = await srv.listeningPort();
      using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
      void feedSlowly(cli, new TextEncoder().encode('never ends'), 60, false);
      await srv.waitFor(/session opened/);
      const t0 = Date.now();
      srv.kill('SIGTERM');
      return { mode: 'stdio serve', ...(await exitAfter(srv, t0, 25000)), stderr: srv.stderr };
    };
    const forward = async (side: 'server' | 'client') => {
      using pair = await forwardPair(key, `127.0.0.1:${echo.port}`);
      const proc = side === 'server' ? pair.srv : pair.cli;
      const a = await app(pair.lport);
      a.sock.write('never ends');
      await pair.srv.waitFor(/session opened/);
      await Bun.sleep(200);
      const t0 = Date.now();
      proc.kill('SIGTERM');
      return { mode: side === 'server' ? 'serve --forward' : 'connect --local', ...(await exitAfter(proc, t0, 25000)), stderr: proc.stderr };
    };
    runs.push(stdio(), forward('server'), forward('client'));
    for (const r of await Promise.all(runs)) {
      expect(r.signal, `${r.mode}\n${r.stderr}`).toBeNull();
      expect(r.code, `${r.mode}\n${r.stderr}`).not.toBe(0);
      expect(r.ms, `${r.mode}\n${r.stderr}`).toBeGreaterThanOrEqual(9000);
      expect(r.ms, `${r.mode}\n${r.stderr}`).toBeLessThan(16000);
    }
    echo.listener.stop(true);
  }, 45_000); // the default grace period is 10 s
});
