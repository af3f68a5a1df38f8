/**
 * End to end with real processes: `bun vpn.ts serve` and `bun vpn.ts connect` on 127.0.0.1, as a user runs them.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { feedStdin, keygen, random, rssKiB, sha256, tempDir, VpnProcess } from './helpers.ts';

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

describe('keygen', () => {
  test('writes a 256-bit key with mode 0600 and refuses to overwrite it', async () => {
    using dir = tempDir();
    const path = await keygen(dir.path);
    expect((statSync(path).mode & 0o777).toString(8)).toBe('600');
    expect((await Bun.file(path).text()).trim()).toMatch(/^[0-9a-f]{64}$/);
    const again = new VpnProcess(['keygen', path]);
    expect(await again.exit()).toBe(2);
    expect(again.stderr).toContain('already exists');
  });
});

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

describe('usage', () => {
  test('no secret and no terminal exits 2 naming the options', async () => {
    const p = new VpnProcess(['connect', '127.0.0.1:1'], { env: { VPN_SECRET: '' } });
    expect(await p.exit()).toBe(2);
    expect(p.stderr).toContain('--key');
    expect(p.stderr).toContain('VPN_SECRET');
  });

  test('a refused connection exits 1', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const p = new VpnProcess(['connect', '127.0.0.1:1', '--key', key]);
    expect(await p.exit()).toBe(1);
  });

  test('--help lists the exit statuses; --version prints the version', async () => {
    const h = new VpnProcess(['--help']);
    expect(await h.exit()).toBe(0);
    const text = new TextDecoder().decode(await h.stdoutBytes);
    for (const s of ['0  clean end', '1  network', '2  usage', '3  authentication', '4  integrity']) expect(text).toContain(s);
    const v = new VpnProcess(['--version']);
    expect(await v.exit()).toBe(0);
    expect(new TextDecoder().decode(await v.stdoutBytes)).toMatch(/^vpn \d+\.\d+\.\d+/);
  });

  test('-v warns that it prints secrets, and without -v no key material appears', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    const keyHex = (await Bun.file(key).text()).trim();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '-v'], { stdin: 'pipe' });
    await Promise.all([feedStdin(srv, new Uint8Array(0)), feedStdin(cli, new TextEncoder().encode('x'))]);
    expect([await srv.exit(), await cli.exit()]).toEqual([0, 0]);
    expect(cli.stderr).toMatch(/^WARNING: -v prints secret/m);
    expect(cli.stderr).toMatch(/c2s enc key \(32\): [0-9a-f]{64}/);
    expect(cli.stderr).toMatch(/frame send type=0 len=16 iv=[0-9a-f]{32} chain=[0-9a-f]{64}/);
    expect(srv.stderr).not.toMatch(/[0-9a-f]{32}/);
    expect(srv.stderr + cli.stderr).not.toContain(keyHex);
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
