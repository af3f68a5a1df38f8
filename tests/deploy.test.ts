/**
 * Deployment: the one executable (`bun run build`, bun build --compile) run with Bun removed from PATH — keygen, a
 * serve/connect pipe, `serve --forward … --workers 2` — and the systemd unit files in systemd/ checked by
 * `systemd-analyze verify`. Real processes on 127.0.0.1 only.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import { accessSync, constants, cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Proc, random, ROOT, sha256, tempDir } from './helpers.ts';

setDefaultTimeout(20_000);

/** How long the build may take (it is well under a second on an idle machine; the CI machine is shared). */
const BUILD_TIMEOUT_MS = 60_000;

const buildDir = mkdtempSync(join(tmpdir(), 'vpn-build-'));
const exe = join(buildDir, 'vpn');
let buildError = '';

/** PATH of the usual system directories without any that holds a `bun`. */
const systemPath = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'].filter((d) => !existsSync(join(d, 'bun'))).join(':');
const noBun = { PATH: systemPath, BUN_INSTALL: '' };

/** The executable, with Bun off PATH, from a directory without node_modules. */
const run = (args: string[], o: { stdin?: 'pipe' | 'ignore'; env?: Record<string, string> } = {}) => new Proc([exe, ...args], { stdin: o.stdin, env: { ...noBun, ...o.env }, cwd: buildDir });

beforeAll(() => {
  // package.json's build script, as `bun run build` runs it, with the output here instead of dist/ (parallel test
  // runs must not race on one file).
  const script: string = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).scripts.build;
  const argv = script.split(/\s+/);
  expect(argv.slice(0, 3)).toEqual(['bun', 'build', '--compile']);
  const out = argv.indexOf('--outfile');
  expect(argv[out + 1]).toBe('dist/vpn');
  argv[out + 1] = exe;
  const started = Date.now();
  const r = Bun.spawnSync(argv, { cwd: ROOT, stdout: 'pipe', stderr: 'pipe', timeout: BUILD_TIMEOUT_MS, killSignal: 'SIGKILL' });
  if (r.exitCode !== 0) buildError = `${script} failed (${r.exitCode}): ${r.stderr.toString()}${r.stdout.toString()}`;
  else console.log(`built ${exe}: ${(statSync(exe).size / 1e6).toFixed(1)} MB in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}, BUILD_TIMEOUT_MS + 5_000);

afterAll(() => rmSync(buildDir, { recursive: true, force: true }));

/** An echo server on 127.0.0.1. */
function echoServer() {
  return Bun.listen({
    hostname: '127.0.0.1',
    port: 0,
    allowHalfOpen: true,
    socket: { data: (s, d) => void s.write(d), end: (s) => void s.end(), error() {} },
  });
}

/** Connect to 127.0.0.1:`port`, send `data`, half-close, and collect what comes back until the far end closes. */
async function roundTrip(port: number, data: Uint8Array): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const { promise, resolve, reject } = Promise.withResolvers<void>();
  let off = 0;
  let ended = false;
  const pump = (s: import('bun').Socket<undefined>) => {
    while (off < data.length) {
      const n = s.write(data.subarray(off, off + 65536));
      off += n;
      if (n === 0) return;
    }
    if (!ended) s.shutdown();
    ended = true;
  };
  const sock = await Bun.connect({
    hostname: '127.0.0.1',
    port,
    allowHalfOpen: true,
    socket: {
      open: pump,
      drain: pump,
      data: (_s, d) => void chunks.push(new Uint8Array(d)),
      end: () => resolve(),
      close: () => resolve(),
      error: (_s, e) => reject(e),
      connectError: (_s, e) => reject(e),
    },
  });
  const timer = setTimeout(() => reject(new Error('round trip timed out')), 15_000);
  try {
    await promise;
  } finally {
    clearTimeout(timer);
    sock.end();
  }
  return new Uint8Array(Buffer.concat(chunks));
}

describe('one executable (bun run build)', () => {
  test('builds, and the environment the tests give it has no bun', () => {
    expect(buildError).toBe('');
    accessSync(exe, constants.X_OK);
    const which = Bun.spawnSync(['/bin/sh', '-c', 'command -v bun'], { env: noBun, stdout: 'pipe' });
    expect(which.exitCode).not.toBe(0);
    expect(which.stdout.toString()).toBe('');
    expect(existsSync(join(buildDir, 'node_modules'))).toBe(false);
  });

  test('keygen and --version run without Bun', async () => {
    expect(buildError).toBe('');
    const v = run(['--version']);
    expect(await v.exit()).toBe(0);
    expect(new TextDecoder().decode(await v.stdoutBytes)).toMatch(/^vpn \d+\.\d+\.\d+\n$/);
    const key = join(buildDir, 'k1');
    const k = run(['keygen', key]);
    expect(await k.exit()).toBe(0);
    expect((statSync(key).mode & 0o777).toString(8)).toBe('600');
    expect(readFileSync(key, 'utf8').trim()).toMatch(/^[0-9a-f]{64}$/);
  });

  test('a serve/connect pipe carries 1 MiB intact, both ends the executable', async () => {
    expect(buildError).toBe('');
    const key = join(buildDir, 'k2');
    expect(await run(['keygen', key]).exit()).toBe(0);
    using srv = run(['serve', '--listen', '127.0.0.1:0', '--key', key, '--once'], { stdin: 'pipe' });
    const port = await srv.listeningPort();
    expect(realpathSync(`/proc/${srv.pid}/exe`)).toBe(realpathSync(exe));
    using cli = run(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
    const up = random(1 << 20);
    const sink = cli.proc.stdin as import('bun').FileSink;
    sink.write(up);
    await sink.end();
    await (srv.proc.stdin as import('bun').FileSink).end();
    expect(await cli.exit()).toBe(0);
    expect(await srv.exit()).toBe(0);
    expect(sha256(await srv.stdoutBytes)).toBe(sha256(up));
  });

  test('serve --forward … --workers 2: two workers, each the executable itself, serve connections; SIGTERM ends all with 0', async () => {
    expect(buildError).toBe('');
    const key = join(buildDir, 'k3');
    expect(await run(['keygen', key]).exit()).toBe(0);
    using target = echoServer();
    using srv = run(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--workers', '2']);
    const sport = await srv.listeningPort();
    const workers = readFileSync(`/proc/${srv.pid}/task/${srv.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    expect(workers.length).toBe(2);
    for (const w of workers) {
      expect(realpathSync(`/proc/${w}/exe`)).toBe(realpathSync(exe));
      const argv = readFileSync(`/proc/${w}/cmdline`, 'utf8').split('\0');
      expect(argv[1]).toBe('serve'); // not the embedded /$bunfs/root/vpn, which the worker took for a command
    }
    using cli = run(['connect', `127.0.0.1:${sport}`, '--key', key, '--local', '127.0.0.1:0']);
    const lport = await cli.listeningPort();
    const sizes = [1, 70_000, 300_000, 5, 1 << 20, 12_345];
    const got = await Promise.all(sizes.map(async (n) => {
      const d = random(n);
      return sha256(await roundTrip(lport, d)) === sha256(d);
    }));
    expect(got).toEqual(sizes.map(() => true));
    expect(srv.stderr).not.toContain('unknown command');
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
  });
});

describe('systemd unit files', () => {
  const analyze = Bun.which('systemd-analyze');
  const unitDir = join(ROOT, 'systemd');
  const units = existsSync(unitDir) ? readdirSync(unitDir).filter((f) => f.endsWith('.service')) : [];
  const systemUnits = ['/usr/lib/systemd/system', '/lib/systemd/system'].find((d) => existsSync(join(d, 'multi-user.target')));

  /**
   * A temporary root for `systemd-analyze verify --root`: the system's own units (the targets ours name), ours in
   * /etc/systemd/system, and an executable at /usr/local/bin/vpn (verify checks that ExecStart's binary exists and
   * is executable; its contents do not matter here, the executable is tested above).
   */
  function fakeRoot(unitTexts: Record<string, string>): { path: string; [Symbol.dispose](): void } {
    const dir = tempDir();
    cpSync(systemUnits!, join(dir.path, 'usr/lib/systemd/system'), { recursive: true, verbatimSymlinks: true });
    mkdirSync(join(dir.path, 'etc/systemd/system'), { recursive: true });
    for (const [name, text] of Object.entries(unitTexts)) writeFileSync(join(dir.path, 'etc/systemd/system', name), text);
    mkdirSync(join(dir.path, 'usr/local/bin'), { recursive: true });
    writeFileSync(join(dir.path, 'usr/local/bin/vpn'), '#!/bin/sh\nexit 0\n');
    chmodSync(join(dir.path, 'usr/local/bin/vpn'), 0o755);
    return dir;
  }

  const verify = (root: string, unit: string) => {
    const r = Bun.spawnSync([analyze!, 'verify', `--root=${root}`, '--man=no', unit], { stdout: 'pipe', stderr: 'pipe', timeout: 30_000, killSignal: 'SIGKILL', env: { PATH: '/usr/bin:/bin', SYSTEMD_LOG_COLOR: '0' } });
    return { code: r.exitCode, out: (r.stdout.toString() + r.stderr.toString()).trim() };
  };

  test('systemd/ has a forwarding server, a TUN server and a TUN client template', () => {
    expect(units.sort()).toEqual(['vpn-client@.service', 'vpn-server@.service', 'vpn-tun-server@.service']);
  });

  const texts = Object.fromEntries(units.map((u) => [u, readFileSync(join(unitDir, u), 'utf8')]));
  const why = !analyze ? 'no systemd-analyze (Debian: apt-get install systemd)' : !systemUnits ? 'no system unit directory with multi-user.target' : null;
  if (why) console.log(`skipping systemd-analyze verify: ${why}`);

  for (const u of units) {
    test.skipIf(why !== null)(`systemd-analyze verify passes on ${u} with not one warning`, () => {
      using root = fakeRoot(texts);
      const r = verify(root.path, u.replace('@.', '@test.'));
      expect(r.out).toBe('');
      expect(r.code).toBe(0);
    });
  }

  test.skipIf(why !== null)('systemd-analyze verify does fail on a unit with a misspelt key and a bad Restart= (the check above can fail)', () => {
    const bad = texts['vpn-server@.service']!.replace('ProtectSystem=strict', 'ProtectSytem=strict').replace('Restart=on-failure', 'Restart=sometimes');
    using root = fakeRoot({ 'bad@.service': bad });
    const r = verify(root.path, 'bad@test.service');
    expect(r.out).toContain("Unknown key 'ProtectSytem'");
    expect(r.out).toContain('sometimes');
  });

  test('Restart= follows the exit statuses: on failure, never after a usage error (2), a client never after an authentication failure (3)', () => {
    for (const [u, t] of Object.entries(texts)) {
      expect(t).toMatch(/^Restart=on-failure$/m);
      expect(t).toMatch(new RegExp(`^RestartPreventExitStatus=${u.startsWith('vpn-client') ? '2 3' : '2'}$`, 'm'));
      expect(t).toMatch(/^NoNewPrivileges=yes$/m);
      expect(t).toMatch(/^ProtectSystem=strict$/m);
      expect(t).toMatch(/^PrivateTmp=yes$/m);
      const tun = u !== 'vpn-server@.service';
      expect(t.includes('DeviceAllow=/dev/net/tun rw')).toBe(tun);
      expect(t).toMatch(tun ? /^CapabilityBoundingSet=CAP_NET_ADMIN CAP_SETUID CAP_SETGID$/m : /^CapabilityBoundingSet=$/m);
    }
  });
});
