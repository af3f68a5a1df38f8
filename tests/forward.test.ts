/**
 * Port forwarding with real processes and real peers on 127.0.0.1: curl → `connect --local` → `serve --forward`
 * → an HTTP server or a TCP server in this test process.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import type { Socket, TCPSocketListener } from 'bun';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { feedStdin, forwardPair, keygen, Pty, random, rssKiB, sha256, tempDir, until, VPN, VpnProcess } from './helpers.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

const dir = tempDir();
let key = '';
let wrongKey = '';
beforeAll(async () => {
  key = await keygen(dir.path, 'key');
  wrongKey = await keygen(dir.path, 'wrong');
});
afterAll(() => dir[Symbol.dispose]());

/** Read everything a TCP connection sends until it closes; optionally send `request` and half-close first. */
async function exchange(port: number, request: Uint8Array, halfClose = true): Promise<{ data: Uint8Array; error: boolean }> {
  const chunks: Uint8Array[] = [];
  const done = Promise.withResolvers<{ data: Uint8Array; error: boolean }>();
  let error = false;
  const finish = () => done.resolve({ data: new Uint8Array(Buffer.concat(chunks)), error });
  const sock = await Bun.connect({
    hostname: '127.0.0.1',
    port,
    allowHalfOpen: true,
    socket: {
      data: (_s, d) => void chunks.push(new Uint8Array(d)),
      end: (s) => void s.end(),
      error: () => void (error = true),
      close: finish,
    },
  });
  sock.write(request);
  if (halfClose) sock.shutdown();
  return await done.promise;
}

/** A TCP server in this process; `onConn` gets each socket. Returns the listener (stop it with .stop(true)). */
function tcpServer(handlers: {
  open?: (s: Socket<any>) => void;
  data?: (s: Socket<any>, d: Uint8Array) => void;
  end?: (s: Socket<any>) => void;
  drain?: (s: Socket<any>) => void;
  close?: (s: Socket<any>) => void;
}): TCPSocketListener<any> {
  return Bun.listen({
    hostname: '127.0.0.1',
    port: 0,
    allowHalfOpen: true,
    socket: {
      open: (s) => handlers.open?.(s),
      data: (s, d) => handlers.data?.(s, new Uint8Array(d)),
      end: (s) => handlers.end?.(s),
      drain: (s) => handlers.drain?.(s),
      close: (s) => handlers.close?.(s),
    },
  });
}

describe('forward through real HTTP', () => {
  const big = random(32 << 20);
  let http: ReturnType<typeof Bun.serve>;
  beforeAll(() => {
    http = Bun.serve({
      hostname: '127.0.0.1',
      port: 0,
      fetch: (req) => (new URL(req.url).pathname === '/big' ? new Response(big) : new Response(`hello ${new URL(req.url).pathname}\n`)),
    });
  });
  afterAll(() => http.stop(true));

  test('curl downloads a 32 MiB body intact, and 50 concurrent requests all succeed', async () => {
    using pair = await forwardPair(key, `127.0.0.1:${http.port}`);
    const out = join(dir.path, 'big.out');
    const curl = Bun.spawn(['curl', '-sS', '--fail', '-o', out, `http://127.0.0.1:${pair.lport}/big`]);
    expect(await curl.exited).toBe(0);
    expect(sha256(new Uint8Array(await Bun.file(out).arrayBuffer()))).toBe(sha256(big));

    const urls = Array.from({ length: 50 }, (_, i) => `http://127.0.0.1:${pair.lport}/r${i}`);
    const args = ['curl', '-sS', '--fail', '--parallel', '--parallel-max', '50'];
    for (const u of urls) args.push(u);
    const many = Bun.spawn(args, { stdout: 'pipe', stderr: 'pipe' });
    const text = await new Response(many.stdout).text();
    expect(await many.exited).toBe(0);
    for (let i = 0; i < 50; i++) expect(text).toContain(`hello /r${i}\n`);
    // Every session ended cleanly on both sides.
    await until(() => (pair.srv.stderr.match(/session closed .*clean end/g) ?? []).length >= 51);
    expect(pair.srv.stderr).not.toMatch(/session closed .*(failed|truncated|verification)/);
  }, 60_000); // 32 MiB through noble at ~25 MiB/s each way, plus 51 handshakes
});

describe('half-close and ends', () => {
  test('a client that sends a request and shuts its write side still receives the whole reply', async () => {
    const reply = random(3 << 20);
    let got = 0;
    const target = tcpServer({
      data: (_s, d) => void (got += d.length),
      end: (s) => {
        // Reply only after the request is complete (FIN seen), like a one-shot RPC server.
        let off = 0;
        const pump = () => {
          while (off < reply.length) {
            const n = s.write(reply.subarray(off, Math.min(off + 65536, reply.length)));
            if (n <= 0) return;
            off += n;
          }
          s.end();
        };
        (s as any).pump = pump;
        pump();
      },
      drain: (s) => (s as any).pump?.(),
    });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`);
    const request = random(100_000);
    const r = await exchange(pair.lport, request);
    expect(got).toBe(request.length);
    expect(r.data.length).toBe(reply.length);
    expect(sha256(r.data)).toBe(sha256(reply));
    target.stop(true);
  });

  test('unix sockets work for --listen, --forward and --local', async () => {
    const targetPath = join(dir.path, 'target.sock');
    const target = Bun.listen({
      unix: targetPath,
      allowHalfOpen: true,
      socket: { data: (s, d) => void s.write(d), end: (s) => void s.end() },
    });
    using srv = new VpnProcess(['serve', '--listen', `unix:${join(dir.path, 'vpn.sock')}`, '--key', key, '--forward', `unix:${targetPath}`]);
    await srv.waitFor(/^listening on unix:/m);
    using cli = new VpnProcess(['connect', `unix:${join(dir.path, 'vpn.sock')}`, '--key', key, '--local', `unix:${join(dir.path, 'local.sock')}`]);
    await cli.waitFor(/^listening on unix:/m);
    const chunks: Uint8Array[] = [];
    const closed = Promise.withResolvers<void>();
    const s = await Bun.connect({
      unix: join(dir.path, 'local.sock'),
      allowHalfOpen: true,
      socket: { data: (_s, d) => void chunks.push(new Uint8Array(d)), end: (so) => void so.end(), close: () => closed.resolve() },
    });
    s.write('echo over unix sockets');
    s.shutdown();
    await closed.promise;
    expect(Buffer.concat(chunks).toString()).toBe('echo over unix sockets');
    target.stop(true);
  });
});

describe('backpressure', () => {
  test('a target that does not read keeps both tunnel processes bounded, and 256 MiB arrive intact once it reads', async () => {
    const TOTAL = 256 << 20;
    const BOUND_KIB = 200 * 1024; // README "Limits": a forward process stays under 200 MiB RSS
    const hash = createHash('sha256');
    let received = 0;
    let targetSock: Socket<any> | null = null;
    const allIn = Promise.withResolvers<void>();
    const target = tcpServer({
      open: (s) => {
        targetSock = s;
        s.pause(); // a target that does not read
      },
      data: (_s, d) => {
        hash.update(d);
        received += d.length;
        if (received === TOTAL) allIn.resolve();
      },
      end: (s) => void s.end(),
    });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`);

    // The source: 1 MiB of random bytes repeated with a counter, hashed as it goes.
    const block = random(1 << 20);
    const sent = createHash('sha256');
    let off = 0;
    let peakCli = 0;
    let peakSrv = 0;
    const sourceDone = Promise.withResolvers<void>();
    const pump = (s: Socket<any>) => {
      while (off < TOTAL) {
        const i = off % block.length;
        const piece = block.subarray(i);
        piece[0] = (off / block.length) & 0xff;
        const n = s.write(piece);
        if (n > 0) sent.update(piece.subarray(0, n));
        off += Math.max(n, 0);
        if (n < piece.length) return;
      }
      s.shutdown();
      sourceDone.resolve();
    };
    await Bun.connect({ hostname: '127.0.0.1', port: pair.lport, allowHalfOpen: true, socket: { open: pump, drain: pump, data() {} } });
    // Let the source fill every buffer on the way, then measure while the target still does not read.
    await until(() => false, 4000);
    const stalledAt = off;
    for (let i = 0; i < 10; i++) {
      peakCli = Math.max(peakCli, rssKiB(pair.cli.pid));
      peakSrv = Math.max(peakSrv, rssKiB(pair.srv.pid));
      await Bun.sleep(100);
    }
    expect(stalledAt).toBeLessThan(TOTAL); // the source really was held back
    expect(peakCli).toBeLessThan(BOUND_KIB);
    expect(peakSrv).toBeLessThan(BOUND_KIB);
    (targetSock as Socket<any> | null)?.resume();
    await Promise.all([allIn.promise, sourceDone.promise]);
    expect(received).toBe(TOTAL);
    expect(hash.digest('hex')).toBe(sent.digest('hex'));
    target.stop(true);
  }, 240_000);
});

describe('a server stays up whatever clients do', () => {
  test('a wrong key closes that local connection, the listener keeps working, and the target never sees a connection', async () => {
    let targetConns = 0;
    const target = tcpServer({ open: () => void targetConns++, data: (s, d) => void s.write(d), end: (s) => void s.end() });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`, { clientKey: wrongKey });
    const r = await exchange(pair.lport, new TextEncoder().encode('secret request'));
    expect(r.data.length).toBe(0);
    await pair.cli.waitFor(/handshake failed .*failed verification/);
    // The listener is still up: a second attempt is accepted (and fails the same way).
    const r2 = await exchange(pair.lport, new TextEncoder().encode('again'));
    expect(r2.data.length).toBe(0);
    expect(targetConns).toBe(0);
    expect(pair.cli.proc.exitCode).toBeNull();
    expect(pair.srv.proc.exitCode).toBeNull();
    target.stop(true);
  });

  test('--max-conns refuses with a log line, and serving resumes when sessions end', async () => {
    const held: Socket<any>[] = [];
    const target = tcpServer({ open: (s) => void held.push(s), data: (s, d) => void s.write(d), end: (s) => void s.end() });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`, { serve: ['--max-conns', '2'] });
    const open: Socket<any>[] = [];
    for (let i = 0; i < 2; i++) {
      open.push(await Bun.connect({ hostname: '127.0.0.1', port: pair.lport, socket: { data() {} } }));
      open[i]!.write('x');
    }
    await until(() => held.length === 2);
    expect(held.length).toBe(2);
    const refused = await exchange(pair.lport, new TextEncoder().encode('third'));
    expect(refused.data.length).toBe(0);
    await pair.srv.waitFor(/connection limit reached \(--max-conns 2\)/);
    for (const s of open) s.end();
    await pair.srv.waitFor(/below the connection limit again/);
    const ok = await exchange(pair.lport, new TextEncoder().encode('fourth'));
    expect(new TextDecoder().decode(ok.data)).toBe('fourth');
    target.stop(true);
  });

  test('the handshake timeout closes a silent connection', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', '127.0.0.1:9', '--handshake-timeout', '1']);
    const port = await srv.listeningPort();
    const closed = Promise.withResolvers<number>();
    const t0 = Date.now();
    await Bun.connect({ hostname: '127.0.0.1', port, socket: { data() {}, close: () => closed.resolve(Date.now() - t0) } });
    const ms = await closed.promise;
    expect(ms).toBeGreaterThanOrEqual(900);
    expect(ms).toBeLessThan(5000);
    await srv.waitFor(/handshake failed .*not completed within 1 s/);
  });

  test('keepalive closes a session whose peer stops answering (SIGSTOP)', async () => {
    const target = tcpServer({ data: (s, d) => void s.write(d), end: (s) => void s.end() });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`, { serve: ['--keepalive', '1'], connect: ['--keepalive', '1'] });
    const sock = await Bun.connect({ hostname: '127.0.0.1', port: pair.lport, socket: { data() {} } });
    sock.write('hello');
    await pair.srv.waitFor(/session opened/);
    process.kill(pair.cli.pid, 'SIGSTOP');
    try {
      await pair.srv.waitFor(/session closed .*nothing heard from the peer for 3 s/, 10000);
    } finally {
      process.kill(pair.cli.pid, 'SIGCONT');
    }
    sock.end();
    target.stop(true);
  });
});

describe('graceful shutdown and PROXY protocol', () => {
  test('SIGTERM lets open sessions run for --grace, then resets them (never a clean end), and the server exits 1', async () => {
    const target = tcpServer({ data: (s, d) => void s.write(d), end: (s) => void s.end() });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`, { serve: ['--grace', '1'] });
    // A session that ended before the signal must not cut the grace period short.
    await exchange(pair.lport, new TextEncoder().encode('warm-up'));
    await pair.srv.waitFor(/session closed .*clean end/);
    const ends: Promise<{ ended: boolean; error: boolean }>[] = [];
    const socks = [];
    for (let i = 0; i < 3; i++) {
      const r = Promise.withResolvers<{ ended: boolean; error: boolean }>();
      let ended = false;
      let error = false;
      const s = await Bun.connect({
        hostname: '127.0.0.1',
        port: pair.lport,
        allowHalfOpen: true,
        socket: {
          data() {},
          end: () => void (ended = true), // a FIN would make the app believe its stream was complete
          error: () => void (error = true),
          close: (_so, err) => r.resolve({ ended, error: error || err !== undefined }),
        },
      });
      s.write('ping');
      socks.push(s);
      ends.push(r.promise);
    }
    await until(() => (pair.srv.stderr.match(/session opened/g) ?? []).length === 4);
    const t0 = Date.now();
    pair.srv.kill('SIGTERM');
    await pair.srv.waitFor(/shutting down \(SIGTERM\): 3 session\(s\) open, waiting up to 1 s/);
    expect(await pair.srv.exit(15000)).toBe(1);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900); // the sessions ran on for the grace period
    for (const e of await Promise.all(ends)) expect(e).toEqual({ ended: false, error: true });
    expect(pair.srv.stderr).toMatch(/grace period \(--grace 1\) is over: aborting 3 session/);
    expect(pair.srv.stderr.match(/session closed .*clean end/g)).toHaveLength(1); // the warm-up only
    target.stop(true);
  });

  test('the target receives a PROXY v1 header with the tunnel client address and port', async () => {
    const first = Promise.withResolvers<string>();
    const target = tcpServer({ data: (_s, d) => first.resolve(new TextDecoder().decode(d)) });
    using pair = await forwardPair(key, `127.0.0.1:${target.port}`, { serve: ['--proxy-protocol'] });
    const s = await Bun.connect({ hostname: '127.0.0.1', port: pair.lport, socket: { data() {} } });
    s.write('after the header');
    let text = await first.promise;
    const m = /^PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 (\d+) (\d+)\r\n/.exec(text);
    expect(m).not.toBeNull();
    expect(Number(m![2])).toBe(pair.sport);
    const clientPort = Number(m![1]);
    // The client's tunnel socket is the one the server logged as the session's peer.
    await pair.srv.waitFor(new RegExp(`session opened 127\\.0\\.0\\.1:${clientPort} `));
    s.end();
    target.stop(true);
  });
});

describe('logs', () => {
  test('identical handshake failures from one address are rate-limited, and --quiet keeps errors only', async () => {
    const target = tcpServer({ data: (so, d) => void so.write(d), end: (so) => void so.end() });
    const junk = new Uint8Array(200).fill(0xff); // version byte 0xff: rejected at once
    const hammer = async (port: number) => {
      for (let i = 0; i < 40; i++) {
        const closed = Promise.withResolvers<void>();
        const s = await Bun.connect({ hostname: '127.0.0.1', port, socket: { data() {}, close: () => closed.resolve() } });
        s.write(junk);
        await closed.promise;
      }
    };
    {
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`]);
      const port = await srv.listeningPort();
      await hammer(port);
      await srv.waitFor(/handshake failed/);
      await Bun.sleep(300);
      const lines = srv.stderr.match(/^handshake failed .*unknown protocol version byte 0xff/gm) ?? [];
      expect(lines.length).toBeGreaterThanOrEqual(1);
      expect(lines.length).toBeLessThanOrEqual(5);
    }
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--quiet']);
    const port = await srv.listeningPort();
    // One good session first: with --quiet its "session opened/closed" info lines are not printed.
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '--local', '127.0.0.1:0']);
    const echoed = await exchange(await cli.listeningPort(), new TextEncoder().encode('quiet please'));
    expect(new TextDecoder().decode(echoed.data)).toBe('quiet please');
    await cli.waitFor(/session closed .*clean end/);
    await hammer(port);
    await Bun.sleep(300);
    expect(srv.stderr).not.toContain('session opened'); // info lines are gone with --quiet
    expect(srv.stderr).not.toContain('session closed');
    expect(srv.stderr).not.toContain('handshake failed'); // a stranger's failed handshake is a warning, not an error
    target.stop(true);
  });
});

// ---- the behaviour of the restructured forward mode (these tests specify it; see the commit message) ----


describe('a terminal chat is not sent into a forwarded service; a pipe is', () => {
  test('a chat on a terminal against serve --forward exits 2 naming forward mode, and the target never gets a byte', async () => {
    let conns = 0;
    let bytes = 0;
    const target = tcpServer({ open: () => void conns++, data: (_s, d) => void (bytes += d.length) });
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`]);
    const port = await srv.listeningPort();
    using pty = new Pty(['connect', `127.0.0.1:${port}`, '--key', key]);
    // A user who types a line soon after starting the chat.
    await Bun.sleep(1500);
    if (pty.p.exitCode === null) await pty.type('this line must not reach the service\r').catch(() => {});
    const code = await pty.exit(10000);
    await Bun.sleep(300);
    expect(code, pty.out).toBe(2);
    expect(pty.out).toMatch(/forward/);
    expect(bytes, `the target got ${bytes} bytes on ${conns} connection(s)`).toBe(0);
    target.stop(true);
  });

  test('an HTTP request piped into connect (like ssh ProxyCommand) gets the 200 response on stdout, and connect exits 0', async () => {
    using web = tempDir();
    await Bun.write(join(web.path, 'hello-through-the-tunnel.txt'), 'hello\n');
    const http = Bun.spawn(['python3', '-u', '-m', 'http.server', '--bind', '127.0.0.1', '0'], { cwd: web.path, stdout: 'pipe', stderr: 'ignore' });
    try {
      // "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
      let banner = '';
      const reader = http.stdout.getReader();
      while (!/port (\d+)/.test(banner)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`python3 -m http.server did not start: ${banner}`);
        banner += new TextDecoder().decode(value);
      }
      const httpPort = Number(/port (\d+)/.exec(banner)![1]);
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${httpPort}`]);
      const port = await srv.listeningPort();
      const sh = Bun.spawn(['sh', '-c', `printf 'GET / HTTP/1.0\\r\\n\\r\\n' | bun ${VPN} connect 127.0.0.1:${port} --key ${key}`], {
        stdout: 'pipe',
        stderr: 'pipe',
      });
      const kill = setTimeout(() => sh.kill('SIGKILL'), 15000);
      const [out, err, code] = await Promise.all([new Response(sh.stdout).text(), new Response(sh.stderr).text(), sh.exited]);
      clearTimeout(kill);
      expect(out, err).toMatch(/^HTTP\/1\.[01] 200 /);
      expect(out).toContain('hello-through-the-tunnel.txt'); // the directory listing, whole
      expect(out).toContain('</html>');
      expect(code, err).toBe(0);
    } finally {
      http.kill('SIGKILL');
    }
  });
});

describe('each side checks the mode (PROTOCOL.md §8.2)', () => {
  test('connect --local against a stdio server: the server refuses the session by name, the app is reset, and the stdio server keeps its stdin for a real client', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--once'], { stdin: 'pipe' });
    const sport = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--key', key, '--local', '127.0.0.1:0']);
    const lport = await cli.listeningPort();
    const r = await exchange(lport, new TextEncoder().encode('not for a stdio server'));
    expect(r.data.length).toBe(0);
    await srv.waitFor(/^session refused 127\.0\.0\.1:\d+: this server runs stdio mode, not port forwarding/m);
    await cli.waitFor(/the server refused the session: this server runs stdio mode, not port forwarding/);
    // --once was not used up by the refused session: a pipe client still gets the server's stdin.
    using pipe = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--key', key], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new TextEncoder().encode('for the pipe')), feedStdin(pipe, new Uint8Array(0))]);
    expect(new TextDecoder().decode(await pipe.stdoutBytes)).toBe('for the pipe');
    expect([await pipe.exit(), await srv.exit()]).toEqual([0, 0]);
  });
});
