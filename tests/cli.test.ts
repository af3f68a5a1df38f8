/**
 * The command line with real processes: keygen, help and usage errors, flag checks, and start-up errors that name
 * their cause. Every command is `bun vpn.ts …` as a user types it; servers listen on 127.0.0.1 (or a unix socket in
 * a temporary directory) only.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import { chmodSync, chownSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { IP_DIRS, ipEnv, ipPath } from '../tundevice.ts';
import { weakPassphrase } from '../vpn.ts';
import { feedStdin, keygen, Pty, tempDir, VpnProcess } from './helpers.ts';

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

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

// ---- the behaviour of the restructured command line (these specify it; see the commit message) ----

const dir = tempDir();
let key = '';
beforeAll(async () => {
  key = await keygen(dir.path, 'key');
});
afterAll(() => dir[Symbol.dispose]());

const dec = new TextDecoder();

/**
 * Run `bun vpn.ts ARGS…` to its end and return what it printed. A command that should stop at once but starts
 * serving instead is killed after `ms` (its status is then 137, which no assertion here accepts).
 */
async function run(args: string[], o: { ms?: number; stdin?: 'pipe' | 'ignore'; input?: string } = {}) {
  const p = new VpnProcess(args, { stdin: o.input !== undefined ? 'pipe' : (o.stdin ?? 'ignore') });
  if (o.input !== undefined) await feedStdin(p, new TextEncoder().encode(o.input)).catch(() => {});
  const code = await p.exit(o.ms ?? 8000);
  const stdout = dec.decode(await p.stdoutBytes);
  return { code, stdout, stderr: p.stderr, all: `status ${code}\nstdout: ${stdout}\nstderr: ${p.stderr}` };
}

/** A usage error: exit 2. Each test then checks the message, and last `unglued` (below). */
async function usageError(args: string[], o: { ms?: number; stdin?: 'pipe' | 'ignore'; input?: string } = {}) {
  const r = await run(args, o);
  expect(r.code, r.all).toBe(2);
  return r;
}

/** The message no longer ends with the old glued ": see --help." suffix (it may point to --help on a line of its own). */
function unglued(r: { stderr: string; all: string }): void {
  expect(r.stderr, r.all).not.toMatch(/: see --help\.\s*$/m);
}

/** A free TCP port on 127.0.0.1 that nothing listens on any more. */
function closedPort(): number {
  const l = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  return port;
}

/** A `serve --once` stdio pipe on `listen` (already started as `srv`) with one `connect` to `target`: both ways intact. */
async function pipeThrough(srv: VpnProcess, target: string): Promise<void> {
  using cli = new VpnProcess(['connect', target, '--key', key], { stdin: 'pipe' });
  await Promise.all([feedStdin(srv, new TextEncoder().encode('from server')), feedStdin(cli, new TextEncoder().encode('from client'))]);
  expect(dec.decode(await cli.stdoutBytes)).toBe('from server');
  expect(dec.decode(await srv.stdoutBytes)).toBe('from client');
  expect([await srv.exit(), await cli.exit()]).toEqual([0, 0]);
}

describe('limits are the same in every mode (flags)', () => {
  const modes: [string, string[]][] = [
    ['stdio serve', ['serve', '--listen', '127.0.0.1:0']],
    ['serve --forward', ['serve', '--listen', '127.0.0.1:0', '--forward', '127.0.0.1:9']],
    ['connect --local', ['connect', '127.0.0.1:9', '--local', '127.0.0.1:0']],
  ];

  for (const [mode, args] of modes) {
    test(`${mode}: a --max-conns that is not a whole number from 1 up exits 2 naming the flag and the allowed range`, async () => {
      for (const bad of ['abc', '1e3', '0']) {
        const r = await usageError([...args, '--key', key, '--max-conns', bad], { stdin: 'pipe' });
        expect(r.stderr, r.all).toMatch(/--max-conns: expected a whole number from 1 to \d+/);
        expect(r.stderr, r.all).not.toMatch(/^listening on/m);
        unglued(r);
      }
    });

    test(`${mode}: --grace 90000 exits 2 naming the flag and the allowed range of seconds`, async () => {
      const r = await usageError([...args, '--key', key, '--grace', '90000'], { stdin: 'pipe' });
      expect(r.stderr, r.all).toMatch(/--grace: expected .*seconds from 0 to 86400/);
      expect(r.stderr, r.all).not.toMatch(/^listening on/m);
      unglued(r);
    });
  }

  test('serve --forward --workers 1e3 exits 2 naming the flag and the allowed range', async () => {
    const r = await usageError(['serve', '--listen', '127.0.0.1:0', '--forward', '127.0.0.1:9', '--key', key, '--workers', '1e3']);
    expect(r.stderr, r.all).toMatch(/--workers: expected a whole number from 1 to \d+/);
    unglued(r);
  });

  test('--help says --grace defaults to 10 seconds, for serve and for connect', async () => {
    for (const cmd of ['serve', 'connect']) {
      const r = await run([cmd, '--help']);
      expect(r.code, r.all).toBe(0);
      // The --grace entry: its own line and the indented lines that continue it.
      const entry = /^ +--grace S\b.*(?:\n {8,}\S.*)*/m.exec(r.stdout)?.[0] ?? '';
      expect(entry, r.all).toContain('(default 10)');
    }
  });
});

describe('--step needs a terminal', () => {
  test('connect -v --step with stdin not a terminal exits 2, and nothing is sent or delivered', async () => {
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    const r = await usageError(['connect', `127.0.0.1:${port}`, '--key', key, '-v', '--step'], { input: '\n\n\nfrom the client\n' });
    expect(r.stderr, r.all).toMatch(/--step needs a terminal/);
    expect(r.stdout).toBe('');
    await Bun.sleep(500);
    expect(srv.stderr).not.toMatch(/session opened|handshake failed/);
    srv.kill('SIGKILL');
    expect(await srv.stdoutBytes).toHaveLength(0);
    unglued(r);
  });

  test('serve -v --step with stdin not a terminal exits 2 and never listens', async () => {
    const r = await usageError(['serve', '--listen', '127.0.0.1:0', '--once', '--key', key, '-v', '--step'], { input: '\n\n\n' });
    expect(r.stderr, r.all).toMatch(/--step needs a terminal/);
    expect(r.stderr, r.all).not.toMatch(/^listening on/m);
    unglued(r);
  });
});

describe('start-up errors name the cause', () => {
  test('a port in use exits 2 saying "address already in use", not the peer-not-running advice', async () => {
    const held = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } });
    try {
      const r = await usageError(['serve', '--listen', `127.0.0.1:${held.port}`, '--key', key], { stdin: 'pipe' });
      expect(r.stderr, r.all).toMatch(/address already in use/i);
      expect(r.stderr, r.all).not.toMatch(/check the address and that the peer is running/);
      unglued(r);
    } finally {
      held.stop(true);
    }
  });

  test('--listen 999.1.1.1:80 exits 2 naming the address', async () => {
    const r = await usageError(['serve', '--listen', '999.1.1.1:80', '--key', key], { stdin: 'pipe' });
    expect(r.stderr, r.all).toContain('999.1.1.1');
    unglued(r);
  });

  test('--listen on a valid address that is not this machine\'s exits 2 saying so', async () => {
    // 192.0.2.1 is TEST-NET-1 (RFC 5737): valid, and no address of this machine; binding to it sends nothing.
    const r = await usageError(['serve', '--listen', '192.0.2.1:32694', '--key', key], { stdin: 'pipe' });
    expect(r.stderr, r.all).toMatch(/not an address of this machine/);
    unglued(r);
  });

  test('a stale unix socket left by a killed server is replaced, and the new server works', async () => {
    using d = tempDir();
    const path = join(d.path, 's.sock');
    const first = new VpnProcess(['serve', '--listen', `unix:${path}`, '--key', key], { stdin: 'pipe' });
    await first.waitFor(/^listening on unix:/m);
    first.kill('SIGKILL');
    await first.exit();
    expect(existsSync(path)).toBe(true); // the stale socket file is still there: that is the case under test
    using again = new VpnProcess(['serve', '--listen', `unix:${path}`, '--once', '--key', key], { stdin: 'pipe' });
    await again.waitFor(/^listening on unix:/m, 8000);
    await pipeThrough(again, `unix:${path}`);
  });

  test('a unix socket a live server listens on is not taken over: exit 2 "address already in use", the first keeps working', async () => {
    using d = tempDir();
    const path = join(d.path, 's.sock');
    using first = new VpnProcess(['serve', '--listen', `unix:${path}`, '--once', '--key', key], { stdin: 'pipe' });
    await first.waitFor(/^listening on unix:/m);
    const r = await usageError(['serve', '--listen', `unix:${path}`, '--key', key], { stdin: 'pipe', ms: 5000 });
    expect(r.stderr, r.all).toMatch(/address already in use/i);
    await pipeThrough(first, `unix:${path}`);
    unglued(r);
  });

  test('a regular file at the unix socket path exits 2 and the file is left as it was', async () => {
    using d = tempDir();
    const path = join(d.path, 's.sock');
    writeFileSync(path, 'not a socket\n');
    const r = await usageError(['serve', '--listen', `unix:${path}`, '--key', key], { stdin: 'pipe', ms: 5000 });
    expect(existsSync(path)).toBe(true);
    expect(readFileSync(path, 'utf8')).toBe('not a socket\n');
    unglued(r);
  });

  test('connect to a closed port exits 1 saying "connection refused", not Bun\'s "Failed to connect"', async () => {
    const port = closedPort();
    const r = await run(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    expect(r.code, r.all).toBe(1);
    expect(r.stderr, r.all).toMatch(/connection refused/i);
    expect(r.stderr, r.all).not.toMatch(/Failed to connect/);
  });
});

describe('flags are checked once and evenly', () => {
  test('serve --once --forward exits 2 naming --once', async () => {
    const r = await usageError(['serve', '--listen', '127.0.0.1:0', '--once', '--forward', '127.0.0.1:9', '--key', key], { stdin: 'pipe' });
    expect(r.stderr, r.all).toMatch(/--once/);
    expect(r.stderr, r.all).not.toMatch(/^listening on/m);
    unglued(r);
  });

  test('serve -v --quiet exits 2 naming both', async () => {
    const r = await usageError(['serve', '--listen', '127.0.0.1:0', '-v', '--quiet', '--key', key], { stdin: 'pipe' });
    expect(r.stderr, r.all).toMatch(/-v\b|--verbose/);
    expect(r.stderr, r.all).toMatch(/--quiet/);
    expect(r.stderr, r.all).not.toMatch(/^listening on/m);
    unglued(r);
  });

  test('an unknown option exits 2 saying "unknown option --bogus", without parseArgs\' advice', async () => {
    const r = await usageError(['serve', '--bogus']);
    expect(r.stderr, r.all).toMatch(/unknown option ['"]?--bogus\b/);
    expect(r.stderr, r.all).not.toMatch(/To specify|ambiguous/);
    unglued(r);
  });

  test('an option value that starts with a dash exits 2 without parseArgs\' "ambiguous" advice', async () => {
    const r = await usageError(['serve', '--listen', '127.0.0.1:0', '--tun', '-XYZ']);
    expect(r.stderr, r.all).not.toMatch(/ambiguous|To specify|--tun=-XYZ/);
    unglued(r);
  });

  test('an option missing its value exits 2 saying "--listen needs a value"', async () => {
    const r = await usageError(['serve', '--listen']);
    expect(r.stderr, r.all).toMatch(/--listen needs a value/);
    unglued(r);
  });

  test('no usage error ends with the glued ": see --help." suffix', async () => {
    const cases: string[][] = [
      ['serve', '--bogus'],
      ['serve', '--listen'],
      ['serve', '--tun', '-XYZ'],
      ['serve', '--listen', '127.0.0.1:0', '--key', key, '--max-conns', '0'],
      ['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', '127.0.0.1:9', '--grace', '90000'],
      ['serve', '--listen', 'nowhere', '--key', key],
      ['serve', 'extra-positional', '--key', key],
      ['connect', '127.0.0.1:9', '--key', key, '--local', '127.0.0.1:0', '--handshake-timeout', 'x'],
      ['connect', '127.0.0.1:9', '--key', join(dir.path, 'no-such-key')],
      ['connect', '127.0.0.1:9', '--key', key, '--engine', 'bogus'],
      ['keygen'],
      ['help', 'bogus'],
      ['bogus'],
    ];
    for (const args of cases) {
      const r = await run(args, { stdin: 'pipe' });
      expect(r.code, `${args.join(' ')}\n${r.all}`).toBe(2);
      expect(r.stderr, `${args.join(' ')}\n${r.all}`).not.toMatch(/: see --help\.\s*$/m);
    }
  }, 60_000); // thirteen process starts

  test('help bogus exits 2 with "unknown command" on stderr and nothing on stdout', async () => {
    const r = await usageError(['help', 'bogus']);
    expect(r.stderr, r.all).toMatch(/unknown command/);
    expect(r.stdout).toBe('');
    unglued(r);
  });

  test('a bare `bun vpn.ts` exits 2 with the usage text on stderr and nothing on stdout', async () => {
    const r = await usageError([]);
    expect(r.stderr, r.all).toMatch(/Usage:/);
    expect(r.stderr, r.all).toMatch(/serve/);
    expect(r.stderr, r.all).toMatch(/connect/);
    expect(r.stdout).toBe('');
    unglued(r);
  });

  test('help serve and serve --help print the serve help on stdout and exit 0', async () => {
    for (const args of [['help', 'serve'], ['serve', '--help']]) {
      const r = await run(args);
      expect(r.code, r.all).toBe(0);
      expect(r.stdout, r.all).toMatch(/Usage: .*serve/);
      expect(r.stdout, r.all).toContain('--forward');
      expect(r.stdout, r.all).toContain('--listen');
    }
  });
});

describe('secret hygiene', () => {
  /** `connect` to a closed port with `args`: a secret that is accepted gets as far as the network (exit 1). */
  async function connectWith(args: string[], env: Record<string, string> = {}) {
    const p = new VpnProcess(['connect', `127.0.0.1:${closedPort()}`, ...args], { env: { VPN_SECRET: '', ...env } });
    const code = await p.exit(8000);
    return { code, stderr: p.stderr, all: `status ${code}\nstderr: ${p.stderr}` };
  }

  for (const mode of [0o644, 0o640, 0o604]) {
    const m = mode.toString(8).padStart(4, '0');
    test(`a key file with mode ${m} is refused: exit 2 naming the file, its mode and chmod 600`, async () => {
      using d = tempDir();
      const k = await keygen(d.path);
      chmodSync(k, mode);
      const r = await connectWith(['--key', k]);
      expect(r.code, r.all).toBe(2);
      expect(r.stderr, r.all).toContain(`key file ${k} has mode ${m}`);
      expect(r.stderr, r.all).toContain(`chmod 600 ${k}`);
      expect(r.stderr, r.all).toContain('--insecure-key-file');
      expect(r.stderr, r.all).not.toContain('connection refused');
    });
  }

  test('a key file from keygen (0600, ours) is accepted without a warning', async () => {
    using d = tempDir();
    const k = await keygen(d.path);
    const r = await connectWith(['--key', k]);
    expect(r.code, r.all).toBe(1); // the key was fine; the port is closed
    expect(r.stderr, r.all).not.toContain('warning');
  });

  test('--insecure-key-file uses a 0644 key file, with a warning that names it and its mode', async () => {
    using d = tempDir();
    const k = await keygen(d.path);
    chmodSync(k, 0o644);
    const r = await connectWith(['--key', k, '--insecure-key-file']);
    expect(r.code, r.all).toBe(1);
    expect(r.stderr, r.all).toMatch(new RegExp(`^warning: key file ${k} has mode 0644.*--insecure-key-file.*chmod 600`, 'm'));
  });

  test('a 0600 key file owned by another user (nobody) is refused, even for root, and accepted with --insecure-key-file', async () => {
    using d = tempDir();
    const k = await keygen(d.path);
    chownSync(k, 65534, 65534);
    const r = await connectWith(['--key', k]);
    expect(r.code, r.all).toBe(2);
    expect(r.stderr, r.all).toContain(`key file ${k} is owned by uid 65534, not by this user (uid ${process.getuid!()})`);
    expect(r.stderr, r.all).toContain(`chmod 600 ${k}`);
    const ok = await connectWith(['--key', k, '--insecure-key-file']);
    expect(ok.code, ok.all).toBe(1);
    expect(ok.stderr, ok.all).toMatch(/^warning: key file .* is owned by uid 65534/m);
  });

  test('a directory or a FIFO given as --key is refused (exit 2) without hanging', async () => {
    using d = tempDir();
    const r = await connectWith(['--key', d.path]);
    expect(r.code, r.all).toBe(2);
    expect(r.stderr, r.all).toContain('not a regular file');
    const fifo = join(d.path, 'fifo');
    expect(Bun.spawnSync(['mkfifo', '-m', '600', fifo]).exitCode).toBe(0);
    const f = await connectWith(['--key', fifo]);
    expect(f.code, f.all).toBe(2);
    expect(f.stderr, f.all).toContain('not a regular file');
  });

  test('weakPassphrase: under 12 characters, only digits, or one character repeated', () => {
    expect(weakPassphrase('a')).toContain('shorter than 12');
    expect(weakPassphrase('elevenchars')).toContain('shorter than 12');
    expect(weakPassphrase('123456789012345')).toBe('is only digits');
    expect(weakPassphrase('aaaaaaaaaaaaaaaa')).toBe('is one character repeated');
    expect(weakPassphrase('twelve chars')).toBeNull();
    expect(weakPassphrase('correct horse battery staple')).toBeNull();
  });

  test('a weak --secret or VPN_SECRET warns and points to keygen (and is still used); a strong one does not warn', async () => {
    const weak = await connectWith(['--secret', 'a']);
    expect(weak.code, weak.all).toBe(1);
    expect(weak.stderr, weak.all).toMatch(/^warning: the passphrase from --secret is shorter than 12 characters; the salt is fixed.*keygen/m);
    const digits = await connectWith([], { VPN_SECRET: '123456789012345' });
    expect(digits.code, digits.all).toBe(1);
    expect(digits.stderr, digits.all).toMatch(/^warning: the passphrase from VPN_SECRET is only digits;.*keygen/m);
    const strong = await connectWith([], { VPN_SECRET: 'correct horse battery staple' });
    expect(strong.code, strong.all).toBe(1);
    expect(strong.stderr, strong.all).not.toContain('warning');
  });

  test('a weak prompted passphrase warns and points to keygen', async () => {
    using t = new Pty(['connect', `127.0.0.1:${closedPort()}`], { VPN_SECRET: '' });
    await t.waitFor(/passphrase: /);
    await t.type('hunter2\r');
    await t.waitFor(/the passphrase from the prompt is shorter than 12 characters;.*keygen/);
    expect(await t.exit()).toBe(1);
  });

  test('ip is run by an absolute path from a fixed list, with an environment of its own (no VPN_SECRET)', () => {
    const path = ipPath();
    if (path !== null) {
      expect(IP_DIRS.some((d) => path === `${d}/ip`)).toBe(true);
      expect(ipPath()).toBe(path);
    }
    process.env.VPN_SECRET = 'must not reach ip';
    try {
      const env = ipEnv();
      expect(Object.keys(env).sort()).toEqual(['LC_ALL', 'PATH']);
      expect(env.PATH).toBe('/usr/sbin:/sbin:/usr/bin:/bin');
      expect(JSON.stringify(env)).not.toContain('must not reach ip');
    } finally {
      delete process.env.VPN_SECRET;
    }
  });

  test('--help documents --insecure-key-file and the passphrase rule, for serve and connect', async () => {
    for (const cmd of ['serve', 'connect']) {
      const r = await run([cmd, '--help']);
      expect(r.code, r.all).toBe(0);
      expect(r.stdout).toContain('--insecure-key-file');
      expect(r.stdout).toContain('under 12 characters');
    }
  });
});
