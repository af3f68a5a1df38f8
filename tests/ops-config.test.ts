/**
 * `--config FILE` (config.ts): the README's example files parsed by the real parser with vpn.ts's option table, a
 * forward pair run from config files end to end, the command line overriding the file, and every refusal naming the
 * file, the key and the line with exit 2. Real `bun vpn.ts` processes on 127.0.0.1.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { flagsToArgs, keyLines, parseConfig } from '../config.ts';
import { COMMAND_FLAGS, OPTIONS } from '../vpn.ts';
import { keygen, random, sha256, tempDir, VpnProcess } from './helpers.ts';
import { readmeExample, readmeExamples } from './readme.ts';

setDefaultTimeout(20_000);

const parse = (text: string, command: 'serve' | 'connect', path = 'test.toml') => parseConfig(text, path, command, OPTIONS, COMMAND_FLAGS[command]!);

/** An echo server on 127.0.0.1 (each connection gets its bytes back, then our FIN after its own). */
function echoServer() {
  return Bun.listen({
    hostname: '127.0.0.1',
    port: 0,
    allowHalfOpen: true,
    socket: { data: (s, d) => void s.write(d), end: (s) => void s.end(), error() {} },
  });
}

/** Send `data` through 127.0.0.1:`port`, half-close, and return what comes back until the far end closes (15 s at most). */
async function roundTrip(port: number, data: Uint8Array): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const { promise, resolve, reject } = Promise.withResolvers<void>();
  let off = 0;
  let ended = false;
  const pump = (s: import('bun').Socket<undefined>) => {
    while (off < data.length) {
      const n = s.write(data.subarray(off, off + 65536));
      off += n;
      if (n === 0) return; // the rest when it drains
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

describe('config files: the README examples', () => {
  const examples = readmeExamples();

  test('the README has the four example files: a TUN server with a keyring, a TUN client, a forward pair', () => {
    expect(examples.map((e) => e.name)).toEqual(['/etc/vpn/tun-server.toml', '/etc/vpn/tun-client.toml', '/etc/vpn/db.toml', '/etc/vpn/db-client.toml']);
    expect(examples.find((e) => e.name.includes('tun-server'))!.text).toContain('keyring = ');
  });

  for (const e of readmeExamples()) {
    test(`${e.name} parses with the real parser for ${e.command}, every key on its line`, () => {
      const cfg = parse(e.text, e.command, e.name);
      const keys = [...e.text.matchAll(/^([a-z-]+) = /gm)].map((m) => m[1]!);
      expect(keys.length).toBeGreaterThan(2);
      for (const k of keys) {
        if (k === 'server') expect(cfg.server).toBeString();
        else expect(cfg.flags[k]).toBeDefined();
        expect(cfg.lines.get(k)).toBe(e.text.split('\n').findIndex((l) => l.startsWith(`${k} = `)) + 1);
      }
    });
  }
});

describe('config files: the parser', () => {
  test('switches, values, numbers, lists and single strings for lists', () => {
    const cfg = parse('listen = "127.0.0.1:0"\nonce = true\nrequire-pfs = false\nmax-conns = 7\ngrace = 0.5\n"tun-name" = \'x\'\ntun = "10.1.0.1/24"\nroute = ["10.2.0.0/16", "fd00::/16"]\n', 'serve');
    expect(cfg.flags).toEqual({ listen: '127.0.0.1:0', once: true, 'max-conns': '7', grace: '0.5', 'tun-name': 'x', tun: ['10.1.0.1/24'], route: ['10.2.0.0/16', 'fd00::/16'] });
    expect(flagsToArgs(cfg.flags, OPTIONS)).toEqual(['--listen=127.0.0.1:0', '--once', '--max-conns=7', '--grace=0.5', '--tun-name=x', '--tun=10.1.0.1/24', '--route=10.2.0.0/16', '--route=fd00::/16']);
  });

  test('keyLines finds bare, quoted and indented keys at their first line', () => {
    expect([...keyLines('# c\n\nlisten = "a"\n  "max-conns"=3\nroute = [\n "x",\n]\n[t]\n')]).toEqual([
      ['listen', 3],
      ['max-conns', 4],
      ['route', 5],
      ['t', 8],
    ]);
  });

  const refusals: [string, 'serve' | 'connect', string, RegExp][] = [
    ['unknown key', 'serve', 'listen = "127.0.0.1:0"\n\nmax-connections = 5\n', /^config file test\.toml line 3: unknown key "max-connections"/],
    ['a key of the other command', 'serve', 'local = "15432"\n', /^config file test\.toml line 1: serve does not take "local"/],
    ['server on serve', 'serve', 'server = "h:1"\n', /^config file test\.toml line 1: unknown key "server"/],
    ['config itself', 'connect', 'config = "other.toml"\n', /line 1: unknown key "config"/],
    ['a key named like an Object property', 'serve', 'toString = "x"\n', /line 1: unknown key "toString"/],
    ['a string for a switch', 'serve', 'once = "yes"\n', /line 1: "once" expects true or false, got a string/],
    ['an array for a value', 'serve', 'listen = ["a", "b"]\n', /line 1: "listen" expects a string or a number, got an array/],
    ['a number in a list', 'serve', 'tun = "10.1.0.1/24"\nroute = ["10.0.0.0/8", true]\n', /line 2: "route" expects a string or an array of strings/],
    ['a table', 'serve', 'listen = "x"\n[serve]\nonce = true\n', /line 2: \[serve\] is a table/],
    ['a syntax error', 'serve', 'listen = "127.0.0.1:0"\nonce =\nforward = "x"\n', /^config file test\.toml line 2: /],
    ['an unterminated array, named by its first line', 'serve', 'listen = "x"\nroute = [\n  "10.0.0.0/8",\n', /^config file test\.toml line 2: /],
  ];
  for (const [what, command, text, re] of refusals) {
    test(`refuses ${what}, naming the file, key and line`, () => {
      expect(() => parse(text, command)).toThrow(re);
    });
  }
});

describe('config files: end to end', () => {
  test('a forward pair runs from the README example files (workers = 2 from the file), bytes intact both ways', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using target = echoServer();
    const srvText = readmeExample('/etc/vpn/db.toml', { listen: '127.0.0.1:0', key, forward: `127.0.0.1:${target.port}` });
    writeFileSync(join(dir.path, 'db.toml'), srvText);
    using srv = new VpnProcess(['serve', '--config', join(dir.path, 'db.toml')]);
    const sport = await srv.listeningPort();
    expect(srv.stderr).not.toContain('[worker'); // no worker complained; and two of them run:
    const cliText = readmeExample('/etc/vpn/db-client.toml', { server: `127.0.0.1:${sport}`, key, local: '127.0.0.1:0' });
    writeFileSync(join(dir.path, 'db-client.toml'), cliText);
    using cli = new VpnProcess(['connect', '--config', join(dir.path, 'db-client.toml')]);
    const lport = await cli.listeningPort();
    const workers = readFileSync(`/proc/${srv.pid}/task/${srv.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    expect(workers.length).toBe(2);
    for (const w of workers) expect(readFileSync(`/proc/${w}/cmdline`, 'utf8')).toContain('--forward=127.0.0.1:'); // the file's flags, as argv
    for (let i = 0; i < 3; i++) {
      const data = random(256 * 1024 + i);
      expect(sha256(await roundTrip(lport, data))).toBe(sha256(data));
    }
    srv.kill('SIGTERM');
    cli.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(await cli.exit()).toBe(0);
  });

  test('workers = 2 with the secret in a 0600 file: the workers serve with it, and it is in no worker\'s argv or environment', async () => {
    using dir = tempDir();
    const secret = `cfg-${Buffer.from(random(12)).toString('hex')}`;
    using target = echoServer();
    const file = join(dir.path, 'w.toml');
    writeFileSync(file, `listen = "127.0.0.1:0"\nforward = "127.0.0.1:${target.port}"\nworkers = 2\nsecret = "${secret}"\n`, { mode: 0o600 });
    using srv = new VpnProcess(['serve', '--config', file]);
    const sport = await srv.listeningPort();
    const workers = readFileSync(`/proc/${srv.pid}/task/${srv.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    expect(workers.length).toBe(2);
    for (const w of workers) {
      expect(readFileSync(`/proc/${w}/cmdline`, 'utf8')).toContain('--forward=127.0.0.1:');
      expect(readFileSync(`/proc/${w}/cmdline`, 'utf8')).not.toContain(secret);
      expect(readFileSync(`/proc/${w}/cmdline`, 'utf8')).not.toContain('--config');
      expect(readFileSync(`/proc/${w}/environ`, 'utf8')).not.toContain(secret);
    }
    using cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--local', '127.0.0.1:0'], { env: { VPN_SECRET: secret } });
    const lport = await cli.listeningPort();
    const data = random(200_000);
    expect(sha256(await roundTrip(lport, data))).toBe(sha256(data));
    expect(srv.stderr + cli.stderr).not.toContain(secret);
  });

  test('command-line flags override the file: a bad --max-conns and a wrong listen in the file are replaced', async () => {
    using dir = tempDir();
    const key = await keygen(dir.path);
    using target = echoServer();
    const file = join(dir.path, 's.toml');
    writeFileSync(file, `listen = "256.0.0.1:1"\nmax-conns = "lots"\nkey = ${JSON.stringify(key)}\nforward = "127.0.0.1:${target.port}"\n`);
    using srv = new VpnProcess(['serve', '--config', file, '--listen', '127.0.0.1:0', '--max-conns', '3']);
    const sport = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--key', key, '--local', '127.0.0.1:0']);
    const lport = await cli.listeningPort();
    const data = random(100_000);
    expect(sha256(await roundTrip(lport, data))).toBe(sha256(data));
  });

  test('a value the flag refuses exits 2 naming the file, line and key; so does a missing file', async () => {
    using dir = tempDir();
    const file = join(dir.path, 'bad.toml');
    writeFileSync(file, `# a forwarding server\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:9"\nworkers = "two"\n`);
    const p = new VpnProcess(['serve', '--config', file, '--secret', 'a long enough passphrase']);
    expect(await p.exit()).toBe(2);
    expect(p.stderr).toContain(`config file ${file} line 4 (workers): --workers: expected a whole number from 1 to 64, got "two"`);
    writeFileSync(file, `listen = "127.0.0.1:0"\ntun = "10.66.0.1/24"\nmtu = 70000\n`);
    const q = new VpnProcess(['serve', '--config', file, '--secret', 'a long enough passphrase']);
    expect(await q.exit()).toBe(2);
    expect(q.stderr).toContain(`config file ${file} line 3 (mtu): --mtu: expected a whole number`);
    const r = new VpnProcess(['connect', '--config', join(dir.path, 'none.toml')]);
    expect(await r.exit()).toBe(2);
    expect(r.stderr).toContain(`cannot read config file ${join(dir.path, 'none.toml')} (ENOENT)`);
  });

  test('a file holding the secret is refused unless only its owner can read it, and the secret is never printed', async () => {
    using dir = tempDir();
    const secret = `cfg-${Buffer.from(random(12)).toString('hex')}`;
    const file = join(dir.path, 's.toml');
    writeFileSync(file, `listen = "127.0.0.1:0"\nonce = true\nsecret = "${secret}"\n`);
    chmodSync(file, 0o640);
    const p = new VpnProcess(['serve', '--config', file]);
    expect(await p.exit()).toBe(2);
    expect(p.stderr).toContain(`config file ${file} holds a secret (line 3) and has mode 0640`);
    expect(p.stderr).toContain('chmod 600');
    expect(p.stderr).not.toContain(secret);
    chmodSync(file, 0o600);
    using srv = new VpnProcess(['serve', '--config', file], { stdin: 'pipe' });
    const sport = await srv.listeningPort();
    expect(srv.stderr).not.toContain('visible to other local users'); // that warning is for --secret in argv
    const cli = new VpnProcess(['connect', `127.0.0.1:${sport}`], { stdin: 'pipe', env: { VPN_SECRET: secret } });
    const data = random(50_000);
    const sink = cli.proc.stdin as import('bun').FileSink;
    sink.write(data);
    await sink.end();
    await (srv.proc.stdin as import('bun').FileSink).end();
    expect(await cli.exit()).toBe(0);
    expect(await srv.exit()).toBe(0);
    expect(sha256(await srv.stdoutBytes)).toBe(sha256(data));
    expect(srv.stderr + cli.stderr).not.toContain(secret);
  });
});
