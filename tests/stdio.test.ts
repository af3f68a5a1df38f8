/**
 * stdio mode end to end with real processes: `bun vpn.ts serve` and `bun vpn.ts connect` on 127.0.0.1, as a user
 * runs them — byte pipes, the one-session-at-a-time server, its limits and logs, and the chat on a real pty.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import type { Socket } from 'bun';
import { join } from 'node:path';
import { feedStdin, keygen, Pty, random, rssKiB, sha256, tempDir, until, VpnProcess } from './helpers.ts';
import { feedQuietly, MitmProxy } from './mitm.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

async function pipeBothWays(serveArgs: string[], connectArgs: string[], env: Record<string, string> = {}, size = 4 << 20) {
  const fromServer = random(size);
  const fromClient = random(size + 12345);
  using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', ...serveArgs], { stdin: 'pipe', env });
  const port = await srv.listeningPort();
  using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, ...connectArgs], { stdin: 'pipe', env });
  await Promise.all([feedStdin(srv, fromServer), feedStdin(cli, fromClient)]);
  const [srvOut, cliOut, srvCode, cliCode] = await Promise.all([srv.stdoutBytes, cli.stdoutBytes, srv.exit(), cli.exit()]);
  return { fromServer, fromClient, srvOut, cliOut, srvCode, cliCode, srv, cli };
}

describe('stdio pipe', () => {
  test('pipes several MiB both ways at once, intact, and both ends exit 0', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const r = await pipeBothWays(['--key', key], ['--key', key]);
    expect(r.srvCode).toBe(0);
    expect(r.cliCode).toBe(0);
    expect(sha256(r.cliOut)).toBe(sha256(r.fromServer));
    expect(sha256(r.srvOut)).toBe(sha256(r.fromClient));
  });

  test('a passphrase in VPN_SECRET works on both ends', async () => {
    const r = await pipeBothWays([], [], { VPN_SECRET: 'correct horse battery staple' }, 1 << 20);
    expect([r.srvCode, r.cliCode]).toEqual([0, 0]);
    expect(sha256(r.cliOut)).toBe(sha256(r.fromServer));
    expect(sha256(r.srvOut)).toBe(sha256(r.fromClient));
  });

  test('speaks protocol version 1 with --no-pfs to a default server', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const r = await pipeBothWays(['--key', key], ['--key', key, '--no-pfs'], {}, 1 << 20);
    expect([r.srvCode, r.cliCode]).toEqual([0, 0]);
    expect(sha256(r.srvOut)).toBe(sha256(r.fromClient));
    expect(r.srv.stderr).toContain('protocol v1');
  });

  test('works over IPv6 loopback', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '[::1]:0', '--once', '--key', key], { stdin: 'pipe' });
    const m = await srv.waitFor(/^listening on \[::1\]:(\d+)$/m);
    using cli = new VpnProcess(['connect', `[::1]:${m[1]}`, '--key', key], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new TextEncoder().encode('from server')), feedStdin(cli, new TextEncoder().encode('from client'))]);
    expect(new TextDecoder().decode(await cli.stdoutBytes)).toBe('from server');
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('from client');
    expect([await srv.exit(), await cli.exit()]).toEqual([0, 0]);
  });
});

describe('a server survives bad clients', () => {
  test('a wrong key makes connect exit 3, and the server still serves the next good client', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path, 'good');
    const wrong = await keygen(dir.path, 'wrong');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key]);
    const port = await srv.listeningPort();
    using bad = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', wrong], { stdin: 'pipe' });
    await feedStdin(bad, new TextEncoder().encode('should never arrive'));
    expect(await bad.exit()).toBe(3);
    expect(bad.stderr).toMatch(/failed verification/);
    expect(await bad.stdoutBytes).toHaveLength(0);
    using good = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    await feedStdin(good, new TextEncoder().encode('hello'));
    expect(await good.exit()).toBe(0);
    await srv.waitFor(/session closed .*: clean end/);
  });

  test('junk bytes and an idle connection each end only their own connection', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--handshake-timeout', '1']);
    const port = await srv.listeningPort();
    const closed = Promise.withResolvers<void>();
    const idle = await Bun.connect({ hostname: '127.0.0.1', port, socket: { data() {}, close: () => closed.resolve() } });
    const junk = await Bun.connect({ hostname: '127.0.0.1', port, socket: { data() {} } });
    const junkBytes = random(300);
    junkBytes[0] = 0xff; // names no protocol version
    junk.write(junkBytes);
    await srv.waitFor(/handshake failed .*unknown protocol version byte 0xff/);
    await closed.promise; // the idle connection is closed by the handshake timeout
    await srv.waitFor(/handshake failed .*not completed within 1 s/);
    idle.end();
    junk.end();
    using good = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    await feedStdin(good, new TextEncoder().encode('hello'));
    expect(await good.exit()).toBe(0);
  });
});

describe('terminal chat (a real pty through script(1))', () => {
  /** Run `connect` on a pseudo-terminal; `typed` is what a user types, one [delay ms, text] at a time. */
  async function chatClient(port: number, key: string, extra: string[], typed: [number, string][], env: Record<string, string> = {}) {
    const cmd = ['bun', 'vpn.ts', 'connect', `127.0.0.1:${port}`, ...(key ? ['--key', key] : []), ...extra].join(' ');
    const p = Bun.spawn(['script', '-qfec', cmd, '/dev/null'], {
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
      cwd: join(import.meta.dir, '..'),
      env: { ...process.env, ...env },
    });
    const out = new Response(p.stdout).text();
    for (const [ms, text] of typed) {
      await Bun.sleep(ms);
      p.stdin.write(text);
      await p.stdin.flush();
    }
    const code = await Promise.race([p.exited, Bun.sleep(20000).then(() => -1)]);
    p.stdin.end();
    p.kill();
    return { code, out: await out };
  }

  test('lines typed on a terminal arrive as lines, received lines are printed with a prefix, an empty line ends', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    const sink = srv.proc.stdin as import('bun').FileSink;
    sink.write('hello from server\n');
    await sink.flush();
    const pending = chatClient(port, key, [], [[1500, 'hi there\n'], [500, '\n']]);
    await Bun.sleep(3000); // the server's user keeps the chat open a little longer, then ends it too
    await sink.end();
    const chat = await pending;
    expect(chat.code).toBe(0);
    expect(chat.out).toContain('peer> hello from server');
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('hi there\n');
    expect(await srv.exit()).toBe(0);
  });

  test('with no other secret on a terminal, the passphrase is prompted for without echo', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once'], { stdin: 'pipe', env: { VPN_SECRET: 'typed at the prompt' } });
    const port = await srv.listeningPort();
    const pending = chatClient(port, '', [], [[800, 'typed at the prompt\r'], [2500, 'after the prompt\n'], [500, '\n']], { VPN_SECRET: '' });
    await Bun.sleep(5000);
    await (srv.proc.stdin as import('bun').FileSink).end();
    const r = await pending;
    expect(r.out).toContain('passphrase: ');
    expect(r.out).not.toContain('typed at the prompt'); // no echo
    expect(r.code).toBe(0);
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('after the prompt\n');
  });

  test('--step with -v waits for Enter before each handshake message', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    const chat = chatClient(port, key, ['-v', '--step'], [[1500, '\n'], [1500, '\n'], [1000, '\n']]);
    // Nothing reaches the server before the first Enter.
    await Bun.sleep(1000);
    expect(srv.stderr).not.toContain('session opened');
    await (srv.proc.stdin as import('bun').FileSink).end();
    const r = await chat;
    expect(r.out).toContain('press Enter to send message 1');
    expect(r.out).toContain('press Enter to send message 3');
    await srv.waitFor(/session opened/);
    expect(r.code).toBe(0);
  });
});

describe('stdout backpressure', () => {
  test('a stdout reader that stalls holds the tunnel back: connect stays bounded and nothing is lost', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const data = random(48 << 20);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    // connect's stdout is a pipe to a reader that sleeps 4 s before it reads anything.
    const vpn = join(import.meta.dir, '..', 'vpn.ts');
    const sh = Bun.spawn(['sh', '-c', `bun ${vpn} connect 127.0.0.1:${port} --key ${key} < /dev/null | { sleep 4; sha256sum; }`], {
      stdout: 'pipe',
      stderr: 'pipe',
    });
    try {
      const feeding = feedStdin(srv, data);
      await Bun.sleep(2500);
      const pgrep = Bun.spawnSync(['pgrep', '-f', `connect 127.0.0.1:${port} `]);
      const pid = Number(new TextDecoder().decode(pgrep.stdout).trim().split('\n')[0]);
      expect(pid).toBeGreaterThan(0); // still running: the reader has not read yet
      expect(rssKiB(pid)).toBeLessThan(150 * 1024); // 48 MiB are waiting upstream, not in this process
      const out = await new Response(sh.stdout).text();
      await feeding;
      expect(await sh.exited).toBe(0);
      expect(out.split(' ')[0]).toBe(sha256(data));
      expect(await srv.exit()).toBe(0);
    } finally {
      sh.kill('SIGKILL');
    }
  }, 40_000); // 48 MiB through noble behind a 4 s stall
});

// ---- the behaviour of the restructured stdio mode (these tests specify it; see the commit message) ----


/**
 * Write `data` in `chunk`-byte pieces `ms` apart; before the last piece wait for `gate` (at most `gateMs`); then end.
 * A process that exits early (EPIPE) just stops the feeding: the test's assertions on it say what went wrong.
 */
async function feedSlowly(p: VpnProcess, data: Uint8Array, o: { chunk?: number; ms?: number; gate?: Promise<unknown>; gateMs?: number } = {}) {
  const sink = p.proc.stdin as import('bun').FileSink;
  const chunk = o.chunk ?? 1 << 16;
  try {
    for (let off = 0; off < data.length; off += chunk) {
      const end = Math.min(off + chunk, data.length);
      if (end === data.length && o.gate) await Promise.race([o.gate, Bun.sleep(o.gateMs ?? 20000)]);
      const w = sink.write(data.subarray(off, end));
      if (w instanceof Promise) await w;
      await sink.flush();
      await Bun.sleep(o.ms ?? 30);
    }
    await sink.end();
  } catch {
    // the process is gone
  }
}

/** A raw TCP connection that records how it ended: a FIN (`ended`), a reset/error (`error`), and when it closed. */
async function rawConnect(port: number) {
  const state = { ended: false, error: false, closed: false, closedAt: 0, bytes: 0 };
  const closed = Promise.withResolvers<void>();
  const connecting = Bun.connect({
    hostname: '127.0.0.1',
    port,
    allowHalfOpen: true,
    socket: {
      data: (_s, d) => void (state.bytes += d.length),
      end: (s) => {
        state.ended = true; // the server's FIN: close our side too, so that `close` follows
        s.end();
      },
      error: () => void (state.error = true),
      close: (_s, err) => {
        if (err) state.error = true;
        state.closed = true;
        state.closedAt = Date.now();
        closed.resolve();
      },
    },
  });
  let sock: Socket<undefined> | null = null;
  try {
    sock = await connecting;
  } catch {
    // Reset while connecting: a server that refuses at once can do that before the connect completes.
    Object.assign(state, { error: true, closed: true, closedAt: Date.now() });
    closed.resolve();
  }
  return { sock, state, closed: closed.promise };
}

describe('a stdio server serves one session; nothing else touches it', () => {
  test('junk, an idle connection, a wrong key and a second client each get their outcome while a 4 MiB pipe each way goes on intact', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path, 'good');
    const wrong = await keygen(dir.path, 'wrong');
    const fromServer = random(4 << 20);
    const fromClient = random(4 << 20);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    // 64 KiB every 30 ms: the session lasts a couple of seconds, and its last bytes wait until every intruder is done.
    const intrudersDone = Promise.withResolvers<void>();
    const feeding = Promise.all([
      feedSlowly(srv, fromServer, { gate: intrudersDone.promise }),
      feedSlowly(cli, fromClient, { gate: intrudersDone.promise }),
    ]);
    await srv.waitFor(/session opened/);

    // A bare TCP connect that closes at once.
    const bare = await rawConnect(port);
    bare.sock!.end();
    // 200 junk bytes (0xff names no protocol version): the server closes it.
    const junk = await rawConnect(port);
    const junkBytes = random(200);
    junkBytes[0] = 0xff;
    junk.sock!.write(junkBytes);
    // A client with the wrong key, and a second client with the right one.
    using bad = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', wrong], { stdin: 'pipe' });
    using busy = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    const outcome = <T>(p: Promise<T>, what: string) =>
      Promise.race([p, Bun.sleep(15000).then(() => Promise.reject(new Error(`${what}: no outcome within 15 s\n${srv.stderr}`)))]);
    const [, , badCode, busyCode] = await Promise.all([
      outcome(bare.closed, 'the bare connection'),
      outcome(junk.closed, 'the junk connection (the server should close it)'),
      outcome(feedStdin(bad, new TextEncoder().encode('from the wrong key')).catch(() => {}).then(() => bad.exit(15000)), 'the wrong-key client'),
      outcome(feedStdin(busy, new TextEncoder().encode('from the second client')).catch(() => {}).then(() => busy.exit(15000)), 'the second client'),
    ]);
    // Every intruder had its outcome while the session was still going.
    const stillRunning = { serve: srv.proc.exitCode, connect: cli.proc.exitCode };
    intrudersDone.resolve();
    expect(stillRunning, `serve:\n${srv.stderr}\nconnect:\n${cli.stderr}`).toEqual({ serve: null, connect: null });
    expect(badCode, bad.stderr).toBe(3);
    expect(busyCode, busy.stderr).toBe(1);
    expect(busy.stderr).toMatch(/busy/);
    expect(await bad.stdoutBytes).toHaveLength(0);
    expect(await busy.stdoutBytes).toHaveLength(0);

    await feeding;
    const [srvOut, cliOut, srvCode, cliCode] = await Promise.all([srv.stdoutBytes, cli.stdoutBytes, srv.exit(), cli.exit()]);
    expect(sha256(srvOut)).toBe(sha256(fromClient));
    expect(sha256(cliOut)).toBe(sha256(fromServer));
    expect(srvCode, srv.stderr).toBe(0);
    expect(cliCode, cli.stderr).toBe(0);
  }, 60_000); // 4 MiB each way through noble, fed slowly, and four intruders
});

describe('limits and logs are the same in every mode', () => {
  test('a stdio serve --max-conns 2 closes a third connection at once while two idle ones stay open, then serves', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--max-conns', '2', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    const idle = [await rawConnect(port), await rawConnect(port)];
    await Bun.sleep(300); // the server has taken both in
    const t0 = Date.now();
    const third = await rawConnect(port);
    const closedInTime = await until(() => third.state.closed, 1000);
    expect(closedInTime, `the third connection was not closed within 1 s\n${srv.stderr}`).toBe(true);
    expect(third.state.closedAt - t0).toBeLessThan(1000);
    expect(third.state.bytes).toBe(0);
    await Bun.sleep(300);
    expect(idle.map((c) => c.state.closed)).toEqual([false, false]);
    await srv.waitFor(/connection limit reached \(--max-conns 2\)/, 3000);
    for (const c of idle) c.sock!.end();
    await Promise.all(idle.map((c) => c.closed));
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new TextEncoder().encode('from server')), feedStdin(cli, new TextEncoder().encode('from client'))]);
    expect(new TextDecoder().decode(await cli.stdoutBytes)).toBe('from server');
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('from client');
    expect([await srv.exit(), await cli.exit()]).toEqual([0, 0]);
  });

  test('a wrong-key client is logged the same by a stdio server and a forward server, and --quiet hides it in both', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path, 'good');
    const wrong = await keygen(dir.path, 'wrong');
    const servers: [string, string[]][] = [
      ['stdio', []],
      ['forward', ['--forward', '127.0.0.1:9']],
      ['stdio --quiet', ['--quiet']],
      ['forward --quiet', ['--forward', '127.0.0.1:9', '--quiet']],
    ];
    for (const [name, extra] of servers) {
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, ...extra], { stdin: 'pipe' });
      const port = await srv.listeningPort();
      using bad = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', wrong], { stdin: 'pipe' });
      await feedStdin(bad, new TextEncoder().encode('x'));
      expect(await bad.exit(), `${name}: ${bad.stderr}`).toBe(3);
      if (name.endsWith('--quiet')) {
        await Bun.sleep(500);
        expect(srv.stderr, name).not.toMatch(/handshake failed/);
      } else {
        await srv.waitFor(/^handshake failed 127\.0\.0\.1:\d+: /m, 5000);
      }
    }
  }, 40_000); // four servers, one after another
});

describe('--step on a terminal', () => {
  test('the prompt suspends the client\'s own handshake timeout: 2 s at a prompt with --handshake-timeout 1 still connects', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--handshake-timeout', '10', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using pty = new Pty(['connect', `127.0.0.1:${port}`, '--key', key, '-v', '--step', '--handshake-timeout', '1']);
    await pty.waitFor(/press Enter to send message 1/);
    await Bun.sleep(2000); // the user reads the trace for twice the client's handshake timeout
    await pty.type('\r');
    await pty.waitFor(/press Enter to send message 3/);
    await pty.type('\r');
    await pty.waitFor(/connected/);
    await srv.waitFor(/session opened/);
    await pty.type('typed after the handshake\r');
    await Bun.sleep(500);
    await pty.type('\r'); // an empty line ends the chat
    await Bun.sleep(500);
    await (srv.proc.stdin as import('bun').FileSink).end();
    expect(await pty.exit(), pty.out).toBe(0);
    expect(new TextDecoder().decode(await srv.stdoutBytes)).toBe('typed after the handshake\n');
    expect(await srv.exit()).toBe(0);
  });
});

describe('acknowledged close: a sender exits 0 only when the peer confirmed everything', () => {
  test('a FIN forged 1 MiB into a 4 MiB upload: serve --once exits 4 with a strict prefix, and connect exits 4 too, saying how much was unconfirmed', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const upload = random(4 << 20);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using mitm = MitmProxy.start({ target: { port }, tamper: [{ dir: 'c2s', at: (1 << 20) + 12345, action: { kind: 'fin' } }] });
    using cli = new VpnProcess(['connect', `127.0.0.1:${mitm.port}`, '--key', key], { stdin: 'pipe' });
    void feedQuietly(srv.proc, new Uint8Array(0), { end: true });
    void feedQuietly(cli.proc, upload, { end: true });
    const [srvCode, cliCode] = await Promise.all([srv.exit(20000), cli.exit(20000)]);
    const out = await srv.stdoutBytes;
    expect(mitm.conns[0]?.fired).toBe(true);
    expect(srvCode).toBe(4);
    expect(out.length).toBeLessThan(upload.length);
    expect(Buffer.compare(out, upload.subarray(0, out.length))).toBe(0);
    expect(cliCode).toBe(4); // before acknowledged close this was 0: "all sent" is not "all received"
    expect(cli.stderr).toMatch(/the peer did not confirm receipt: \d+ bytes unconfirmed/);
  });

  // The client's stream after the handshake (145 bytes): its CONFIG frame, one DATA frame (a 1000-byte upload fits
  // one), then CLOSE. Frame sizes follow §6: 52 + 16 · (⌊(1 + payload) / 16⌋ + 1).
  const frameLen = (payload: number) => 52 + 16 * (Math.floor((1 + payload) / 16) + 1);
  const CONFIG_AT = 113 + 32;
  const DATA_AT = CONFIG_AT + frameLen(JSON.stringify({ mode: 'stdio', ack: true, rekey: true }).length);
  const CLOSE_AT = DATA_AT + frameLen(1000);
  const lastFrames: [string, import('./mitm.ts').Tamper][] = [
    ['the last DATA frame dropped', { dir: 'c2s', at: DATA_AT, unit: 'frame', framesFrom: CONFIG_AT, action: { kind: 'drop', n: 1 } }],
    ['the CLOSE frame dropped', { dir: 'c2s', at: CLOSE_AT, unit: 'frame', framesFrom: CONFIG_AT, action: { kind: 'drop', n: 1 } }],
    ['a reset after the last DATA frame', { dir: 'c2s', at: CLOSE_AT, unit: 'frame', framesFrom: CONFIG_AT, action: { kind: 'reset' } }],
  ];
  for (const [name, tamper] of lastFrames) {
    test(`${name}: the sender does not exit 0 (and the receiver exits 4)`, async () => {
      using dir = tempDir();
      const key = await keygen(dir.path);
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key, '--keepalive', '1'], { stdin: 'pipe' });
      const port = await srv.listeningPort();
      using mitm = MitmProxy.start({ target: { port }, tamper: [tamper] });
      using cli = new VpnProcess(['connect', `127.0.0.1:${mitm.port}`, '--key', key, '--keepalive', '1'], { stdin: 'pipe' });
      await Promise.all([feedStdin(srv, new Uint8Array(0)), feedStdin(cli, random(1000))]);
      const [srvCode, cliCode] = await Promise.all([srv.exit(20000), cli.exit(20000)]);
      expect(mitm.conns[0]?.fired).toBe(true);
      expect(srvCode, srv.stderr).toBe(4);
      expect(cliCode, cli.stderr).not.toBe(0);
      expect(cli.stderr).toMatch(/did not confirm receipt|failed verification|before an authenticated CLOSE/);
    });
  }

  test('-v says that acknowledged close applies', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '-v'], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new TextEncoder().encode('a')), feedStdin(cli, new TextEncoder().encode('b'))]);
    expect([await cli.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(cli.stderr).toContain('acknowledged close: on (both sides offered it)');
  });
});

describe('rekeying inside a session', () => {
  test('a rekey every second during a 256 MiB full-duplex transfer: byte-exact both ways, and the -v trace shows the key changes', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const up = random(256 << 20);
    const down = random(256 << 20);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key, '--engine', 'native'], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '--engine', 'native', '--rekey-after', '1', '-v'], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, down), feedStdin(cli, up)]);
    const [srvOut, cliOut, srvCode, cliCode] = await Promise.all([srv.stdoutBytes, cli.stdoutBytes, srv.exit(), cli.exit()]);
    expect([cliCode, srvCode]).toEqual([0, 0]);
    expect(sha256(srvOut)).toBe(sha256(up));
    expect(sha256(cliOut)).toBe(sha256(down));
    expect(cli.stderr).toContain('rekeying: on');
    const changes = cli.stderr.match(/^\[client\] rekey: new (c2s|s2c) keys/gm) ?? [];
    expect(changes.length).toBeGreaterThanOrEqual(2); // at least one rekey: both directions changed
  }, 90_000);
});
