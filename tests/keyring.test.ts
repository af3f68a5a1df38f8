/**
 * A key per client (issue 13): the keyring file, protocol version 3's key hint (PROTOCOL.md §3, §4.1), names in
 * logs, SIGHUP reload and revocation, and TUN addresses bound to keys. In-process tests use the real crypto; the
 * rest run `bun vpn.ts …` as a user would, on loopback.
 */
import { describe, expect, setDefaultTimeout, test } from 'bun:test';
import { chmodSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'bun';
import { nobleEngine } from '../engine.ts';
import { VpnError } from '../errors.ts';
import { createHmac } from 'node:crypto';
import { ClientHandshake, HINT_LEN, hintMac, keyHint, keysFromKeyFile, MSG1_V2_LEN, MSG1_V3_LEN, ServerHandshake, sharedKey, VERSION_2, VERSION_3 } from '../handshake.ts';
import { bindAddresses, HintTable, Keyring, keyringLine, parseKeyFile, parseKeyringText } from '../keyring.ts';
import { AddressPool, AddressPool6 } from '../tun.ts';
import { formatIPv4, formatIPv6, parseCidr, parseCidr6 } from '../address.ts';
import { random, sha256, tempDir, VpnProcess } from './helpers.ts';

setDefaultTimeout(20_000);

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const ring = (lines: string[]) => new Keyring('test-ring', parseKeyringText(lines.join('\n'), 'test-ring'));

function expectUsage(fn: () => unknown, re: RegExp): void {
  let err: unknown = null;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(VpnError);
  expect((err as VpnError).code).toBe('USAGE');
  expect((err as VpnError).message).toMatch(re);
}

/** Run a whole handshake; returns the server's handshake (or the error of whichever side failed). */
function handshake(clientKey: Uint8Array, version: number, server: ConstructorParameters<typeof ServerHandshake>[0]) {
  const c = new ClientHandshake(keysFromKeyFile(clientKey), version, { engine: nobleEngine });
  const s = new ServerHandshake(server, { engine: nobleEngine });
  const m1 = c.createMessage1();
  const m2 = s.consumeMessage1(m1);
  const m3 = c.consumeMessage2(m2);
  s.consumeMessage3(m3);
  expect(s.keys!.recv.enc).toEqual(c.keys!.send.enc);
  expect(s.keys!.send.mac).toEqual(c.keys!.recv.mac);
  return { s, m1 };
}

function failure(fn: () => unknown): VpnError {
  try {
    fn();
  } catch (e) {
    return e as VpnError;
  }
  throw new Error('expected a failure');
}

describe('protocol version 3: a key per client (in process)', () => {
  const alice = random(32);
  const bob = random(32);
  const carol = random(32);
  const keys = ring([`alice ${hex(alice)}`, `bob ${hex(bob)} tun=10.66.0.9`]);

  test('each client completes a handshake with its own key, and the server knows which one it was', () => {
    for (const [k, name] of [[alice, 'alice'], [bob, 'bob']] as const) {
      const { s, m1 } = handshake(k, VERSION_3, keys);
      expect(m1.length).toBe(MSG1_V3_LEN);
      expect(s.version).toBe(3);
      expect(s.client!.name).toBe(name);
    }
  });

  test('a key the keyring does not hold is refused at message 1 (the server answers nothing)', () => {
    const c = new ClientHandshake(keysFromKeyFile(carol), VERSION_3, { engine: nobleEngine });
    const s = new ServerHandshake(keys, { engine: nobleEngine });
    const e = failure(() => s.consumeMessage1(c.createMessage1()));
    expect(e.code).toBe('AUTH_FAILED');
    expect(e.message).toMatch(/names no key/);
    expect(s.state).toBe('awaiting message 1');
  });

  test('a version 1 or 2 message 1 (no hint) is refused by a keyring server, even with a keyring key', () => {
    for (const v of [1, 2]) {
      const c = new ClientHandshake(keysFromKeyFile(alice), v, { engine: nobleEngine });
      const e = failure(() => new ServerHandshake(keys, { engine: nobleEngine }).consumeMessage1(c.createMessage1()));
      expect(e.code).toBe('AUTH_FAILED');
      expect(e.message).toMatch(/names no key.*version 3/);
    }
  });

  test('a one-key server (--key) takes versions 2 and 3 of that key, and no other key', () => {
    const one = sharedKey(keysFromKeyFile(alice));
    expect(handshake(alice, VERSION_2, one).s.client!.name).toBeNull();
    expect(handshake(alice, VERSION_3, one).s.version).toBe(3);
    const c = new ClientHandshake(keysFromKeyFile(bob), VERSION_3, { engine: nobleEngine });
    expect(failure(() => new ServerHandshake(one, { engine: nobleEngine }).consumeMessage1(c.createMessage1())).code).toBe('AUTH_FAILED');
  });

  test("one client's key cannot act as the server to another client: even a server that answers anyway fails at C2", () => {
    // Alice runs a server with her key and answers bob's message 1 as if it named her key.
    const rogue = { shared: null, find: () => ({ name: 'alice', keys: keysFromKeyFile(alice) }) };
    const c = new ClientHandshake(keysFromKeyFile(bob), VERSION_3, { engine: nobleEngine });
    const m2 = new ServerHandshake(rogue, { engine: nobleEngine }).consumeMessage1(c.createMessage1());
    const e = failure(() => c.consumeMessage2(m2));
    expect(e.code).toBe('AUTH_FAILED');
    expect(c.keys).toBeNull();
  });

  test('the hint is fresh in every message 1, is not the name, and a flipped hint byte names no key', () => {
    const hints = new Set<string>();
    for (let i = 0; i < 50; i++) {
      const m1 = new ClientHandshake(keysFromKeyFile(alice), VERSION_3, { engine: nobleEngine }).createMessage1();
      const h = m1.subarray(MSG1_V2_LEN);
      expect(h.length).toBe(HINT_LEN);
      hints.add(hex(h));
      expect(Buffer.from(m1).includes(Buffer.from('alice'))).toBe(false);
    }
    expect(hints.size).toBe(50);
    const m1 = new ClientHandshake(keysFromKeyFile(alice), VERSION_3, { engine: nobleEngine }).createMessage1();
    m1[MSG1_V3_LEN - 1]! ^= 1;
    expect(failure(() => new ServerHandshake(keys, { engine: nobleEngine }).consumeMessage1(m1)).code).toBe('AUTH_FAILED');
  });

  test('the lookup finds a key at any position and none for a stranger; its hints are HMAC-SHA256(K_hint, R_A)[0:16] (node:crypto)', () => {
    const others = Array.from({ length: 40 }, () => random(32));
    for (const at of [0, 20, 40]) {
      const list = [...others];
      list.splice(at, 0, alice);
      const big = ring(list.map((k, i) => `c${i} ${hex(k)}`));
      const m1 = new ClientHandshake(keysFromKeyFile(alice), VERSION_3, { engine: nobleEngine }).createMessage1();
      expect(new ServerHandshake(big, { engine: nobleEngine }).consumeMessage1(m1).length).toBe(96);
      expect(big.find(m1.subarray(49, 81), m1.subarray(MSG1_V2_LEN))!.name).toBe(`c${at}`);
      expect(big.find(random(32), m1.subarray(MSG1_V2_LEN))).toBeNull();
    }
    const keys = Array.from({ length: 8 }, () => random(32));
    const table = new HintTable(keys);
    for (let t = 0; t < 20; t++) {
      const ra = random(32);
      const i = t % 8;
      const h = createHmac('sha256', keys[i]!).update(ra).digest().subarray(0, HINT_LEN);
      expect(table.find(ra, new Uint8Array(h))).toBe(i);
      expect(keyHint(hintMac(keys[i]!), ra)).toEqual(new Uint8Array(h));
      h[t % 16]! ^= 1 << (t % 8);
      expect(table.find(ra, new Uint8Array(h))).toBe(-1);
    }
  });
});

describe('key files and the keyring file', () => {
  const k = 'ab'.repeat(32);
  test('a key file is 64 hex digits, or the name and key lines of keygen --client', () => {
    expect(parseKeyFile(`  ${k}\n`, 'f').name).toBeNull();
    const named = parseKeyFile(`# comment\nname alice\nkey ${k}\n`, 'f');
    expect(named.name).toBe('alice');
    expect(hex(named.key)).toBe(k);
    expectUsage(() => parseKeyFile(`name alice\n`, 'f'), /does not hold a key/);
    expectUsage(() => parseKeyFile(`name al ice\nkey ${k}`, 'f'), /key file f, line 1/);
    expectUsage(() => parseKeyFile(`name alice\nkey ${k}\nkey ${k}`, 'f'), /line 3: a bad or repeated key/);
    expectUsage(() => parseKeyFile(`colour blue\nkey ${k}`, 'f'), /line 1: unknown field "colour"/);
  });

  test.each([
    ['a malformed name', ['-x ' + k], /line 1: "-x" is not a client name/],
    ['no key', ['alice'], /line 1: no key after the name alice/],
    ['a bad key', ['alice abcd'], /line 1: the key of alice is not 64 hex digits/],
    ['a duplicate name', [`alice ${k}`, '', `alice ${'cd'.repeat(32)}`], /line 3: the name alice is already used on line 1/],
    ['a duplicate key', [`alice ${k}`, `bob ${k.toUpperCase()}`], /line 2: the key of bob is the key of line 1 too/],
    ['a duplicate address', [`alice ${k} tun=10.0.0.2`, `bob ${'cd'.repeat(32)} tun=10.0.0.2/32`], /line 2: the address 10.0.0.2 of bob is bound to the key of line 1/],
    ['a bad address', [`alice ${k} tun=10.0.0.300`], /line 1: tun=10.0.0.300 is not an IPv4 address/],
    ['an unknown option', [`alice ${k} colour=blue`], /line 1: unknown option "colour=blue"/],
    ['an unknown mode', [`alice ${k} modes=tun,ftp`], /line 1: modes=tun,ftp: "ftp" is not a mode/],
    ['an option given twice', [`alice ${k} tun=10.0.0.2 tun=10.0.0.3`], /line 1: tun= is given twice/],
  ])('%s is an error naming the file and the line', (_what, lines, re) => {
    expectUsage(() => parseKeyringText((lines as string[]).join('\n'), 'ring.txt'), new RegExp(`keyring ring\\.txt, ${(re as RegExp).source}`));
  });

  test('comments, blank lines, CRLF and every option parse; keyringLine writes what the parser reads', () => {
    const line = keyringLine('alice', Buffer.from(k, 'hex'), parseCidr('10.0.0.2', 'x', 32).addr, parseCidr6('fd00::2', 'x', 128).addr, ['tun', 'forward']);
    const p = parseKeyringText(`# header\r\n\r\n${line}`, 'r');
    expect(p).toHaveLength(1);
    expect(p[0]).toMatchObject({ name: 'alice', modes: ['tun', 'forward'], line: 3 });
    expect(formatIPv4(p[0]!.tun!)).toBe('10.0.0.2');
    expect(formatIPv6(p[0]!.tun6!)).toBe('fd00::2');
  });
});

describe('TUN addresses bound to keys', () => {
  const pool = new AddressPool(parseCidr('10.66.0.1/24', 'x'));
  const names = Array.from({ length: 200 }, (_, i) => `host-${i}`);
  const lines = names.map((n) => `${n} ${hex(random(32))}`);

  test('explicit addresses are kept; the others are derived from the name, distinct, never the server, stable', () => {
    const r = ring([...lines, `pinned ${hex(random(32))} tun=10.66.0.77`]);
    const a = bindAddresses(r, pool, (e) => e.tun, formatIPv4);
    expect(a.get('pinned')).toBe(parseCidr('10.66.0.77/32', 'x').addr);
    const all = [...a.values()];
    expect(new Set(all).size).toBe(201);
    for (const x of all) {
      expect(pool.isHost(x)).toBe(true);
      expect(x).not.toBe(pool.server);
    }
    // The same file gives the same addresses (a restart); an appended name moves nobody.
    const again = bindAddresses(ring([...lines, `pinned ${hex(random(32))} tun=10.66.0.77`]), pool, (e) => e.tun, formatIPv4);
    for (const n of names) expect(again.get(n)).toBe(a.get(n)!);
    const more = bindAddresses(ring([...lines, `newcomer ${hex(random(32))}`]), pool, (e) => e.tun, formatIPv4);
    const before = bindAddresses(ring(lines), pool, (e) => e.tun, formatIPv4);
    for (const n of names) expect(more.get(n)).toBe(before.get(n)!);
  });

  test('an explicit address outside the subnet, or the server\'s own, is an error naming the line', () => {
    expectUsage(() => bindAddresses(ring([`a ${hex(random(32))}`, `b ${hex(random(32))} tun=10.67.0.5`]), pool, (e) => e.tun, formatIPv4), /line 2: the address 10.67.0.5 of b is not a host address of the tunnel subnet 10.66.0.0\/24/);
    expectUsage(() => bindAddresses(ring([`a ${hex(random(32))} tun=10.66.0.1`]), pool, (e) => e.tun, formatIPv4), /line 1: the address 10.66.0.1 of a is the server's own address/);
  });

  test('a subnet too small for the keyring is an error; IPv6 addresses bind the same way', () => {
    const tiny = new AddressPool(parseCidr('10.9.0.1/30', 'x'));
    expectUsage(() => bindAddresses(ring(lines.slice(0, 3)), tiny, (e) => e.tun, formatIPv4), /has no address left/);
    const p6 = new AddressPool6(parseCidr6('fd00:66::1/64', 'x'));
    const a6 = bindAddresses(ring(lines), p6, (e) => e.tun6, formatIPv6);
    expect(new Set(a6.values()).size).toBe(200);
    for (const x of a6.values()) expect(p6.isHost(x)).toBe(true);
  });
});

// ---- real processes ----

/** keygen --client NAME into `dir`'s keyring; returns the client key file's path. */
async function addKey(dir: string, name: string, extra: string[] = []): Promise<string> {
  const out = join(dir, `${name}.key`);
  const p = new VpnProcess(['keygen', '--client', name, '--keyring', join(dir, 'ring'), ...extra, out]);
  expect(await p.exit(), p.stderr).toBe(0);
  return out;
}

/** An echo server on 127.0.0.1 (the forward target). */
function echoServer() {
  const l = Bun.listen<undefined>({
    hostname: '127.0.0.1',
    port: 0,
    socket: {
      data(s, d) {
        s.write(d);
      },
      end(s) {
        s.end();
      },
    },
  });
  return { port: l.port, [Symbol.dispose]: () => l.stop(true) };
}

/** Send `data` through `port` paced over about `ms`, return the SHA-256 of what came back (or the error). */
async function echoThrough(port: number, data: Uint8Array, ms: number): Promise<{ digest: string; error: string | null }> {
  const got: Uint8Array[] = [];
  let have = 0;
  const done = Promise.withResolvers<string | null>();
  let over = false;
  void done.promise.then(() => (over = true));
  const sock = await Bun.connect<undefined>({
    hostname: '127.0.0.1',
    port,
    socket: {
      data(_s, d) {
        got.push(new Uint8Array(d));
        have += d.length;
        if (have >= data.length) done.resolve(null);
      },
      close: () => done.resolve(have >= data.length ? null : `closed after ${have} bytes`),
      error: (_s, e) => done.resolve(`error ${e.message}`),
    },
  });
  const chunk = 32 * 1024;
  const pause = ms / Math.ceil(data.length / chunk);
  const end = Date.now() + 15000;
  for (let off = 0; off < data.length && !over && Date.now() < end; off += chunk) {
    let part = data.subarray(off, off + chunk);
    while (part.length > 0 && !over && Date.now() < end) {
      const w = (sock as Socket<undefined>).write(part);
      part = part.subarray(Math.max(w, 0));
      if (part.length > 0) await Bun.sleep(5);
    }
    await Bun.sleep(pause);
  }
  const error = await Promise.race([done.promise, Bun.sleep(15000).then(() => `timed out with ${have} bytes`)]);
  sock.end();
  return { digest: sha256(new Uint8Array(Buffer.concat(got)).subarray(0, data.length)), error };
}

describe('keygen --client and serve --keyring (real processes)', () => {
  test('keygen --client writes a 0600 client key and a 0600 keyring; a duplicate name or address exits 2 naming file and line', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice', ['--tun-address', '10.66.0.5']);
    expect(statSync(alice).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir.path, 'ring')).mode & 0o777).toBe(0o600);
    expect(parseKeyFile(readFileSync(alice, 'utf8'), alice).name).toBe('alice');
    const dup = new VpnProcess(['keygen', '--client', 'alice', '--keyring', join(dir.path, 'ring'), join(dir.path, 'x.key')]);
    expect(await dup.exit()).toBe(2);
    expect(dup.stderr).toMatch(/keyring .*ring, line \d+: the name alice is already used on line 3/);
    const addr = new VpnProcess(['keygen', '--client', 'carol', '--keyring', join(dir.path, 'ring'), '--tun-address', '10.66.0.5', join(dir.path, 'c.key')]);
    expect(await addr.exit()).toBe(2);
    expect(addr.stderr).toMatch(/the address 10\.66\.0\.5 of carol is bound to the key of line 3/);
    expect(existsSync(join(dir.path, 'x.key')) || existsSync(join(dir.path, 'c.key'))).toBe(false);
  });

  test('a keyring that group or others may read exits 2 at start-up; so does a malformed one, naming the line', async () => {
    using dir = tempDir();
    await addKey(dir.path, 'alice');
    const ringPath = join(dir.path, 'ring');
    chmodSync(ringPath, 0o644);
    const open = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', ringPath]);
    expect(await open.exit()).toBe(2);
    expect(open.stderr).toMatch(/keyring .*ring has mode 0644.*chmod 600/);
    chmodSync(ringPath, 0o600);
    writeFileSync(ringPath, readFileSync(ringPath, 'utf8') + 'bob not-a-key\n');
    const bad = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', ringPath]);
    expect(await bad.exit()).toBe(2);
    expect(bad.stderr).toMatch(/keyring .*ring, line 4: the key of bob is not 64 hex digits/);
  });

  test('two clients with their own keys: the log names each; a stranger, a v2 client and each client posing as the server to the other fail with exit 3', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice');
    const bob = await addKey(dir.path, 'bob');
    using echo = echoServer();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', join(dir.path, 'ring'), '--forward', `127.0.0.1:${echo.port}`]);
    const port = await srv.listeningPort();
    for (const [name, key] of [['alice', alice], ['bob', bob]] as const) {
      using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '--local', '127.0.0.1:0']);
      const lport = await cli.listeningPort();
      const data = random(100_000);
      const r = await echoThrough(lport, data, 50);
      expect(r.error).toBeNull();
      expect(r.digest).toBe(sha256(data));
      await srv.waitFor(new RegExp(`session opened ${name} 127\\.0\\.0\\.1:\\d+ \\(protocol v3\\)`));
    }
    // A key the keyring does not hold, and a plain shared key (version 2): exit 3, nothing opened.
    const strangerKey = join(dir.path, 'stranger');
    expect(await new VpnProcess(['keygen', strangerKey]).exit()).toBe(0);
    for (const key of [strangerKey]) {
      const c = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key], { stdin: 'pipe' });
      expect(await c.exit(), c.stderr).toBe(3);
    }
    await srv.waitFor(/handshake failed 127\.0\.0\.1:\d+: the client offered protocol version 2, which names no key/);
    // Bob serves with his own client key; Alice connecting to him fails (and the other way round).
    for (const [server, client] of [[bob, alice], [alice, bob]] as const) {
      using rogue = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', server], { stdin: 'pipe' });
      const rport = await rogue.listeningPort();
      const c = new VpnProcess(['connect', `127.0.0.1:${rport}`, '--key', client], { stdin: 'pipe' });
      expect(await c.exit(), c.stderr).toBe(3);
      expect(rogue.stderr).not.toMatch(/session opened/);
    }
  });

  test('a one-key server (--key) takes a client key file holding its key, with --workers too (the workers get K_hint)', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice');
    using echo = echoServer();
    for (const extra of [[], ['--workers', '2']]) {
      using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', alice, '--forward', `127.0.0.1:${echo.port}`, ...extra]);
      const port = await srv.listeningPort();
      using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', alice, '--local', '127.0.0.1:0']);
      const lport = await cli.listeningPort();
      const data = random(50_000);
      const r = await echoThrough(lport, data, 20);
      expect(r.error, srv.stderr).toBeNull();
      expect(r.digest).toBe(sha256(data));
      await srv.waitFor(/session opened 127\.0\.0\.1:\d+ \(protocol v3\)/);
    }
  });

  test('serve --keyring --workers 2: every worker reads the keyring, both clients get in, and the supervisor passes SIGHUP on (bob revoked, alice stays)', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice');
    const bob = await addKey(dir.path, 'bob');
    const ringPath = join(dir.path, 'ring');
    using echo = echoServer();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', ringPath, '--forward', `127.0.0.1:${echo.port}`, '--workers', '2']);
    const port = await srv.listeningPort();
    expect(srv.stderr.match(/keyring .*ring: 2 client keys/g)?.length ?? 0).toBeGreaterThanOrEqual(2); // the supervisor, and workers
    using ca = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', alice, '--local', '127.0.0.1:0']);
    using cb = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', bob, '--local', '127.0.0.1:0']);
    const [la, lb] = await Promise.all([ca.listeningPort(), cb.listeningPort()]);
    const dataA = random(2 << 20);
    const a = echoThrough(la, dataA, 2500);
    const b = echoThrough(lb, random(2 << 20), 2500);
    await srv.waitFor(/\[worker \d pid \d+\] session opened alice/);
    await srv.waitFor(/\[worker \d pid \d+\] session opened bob/);
    await Bun.sleep(500);
    writeFileSync(ringPath, readFileSync(ringPath, 'utf8').split('\n').filter((l) => !l.startsWith('bob ')).join('\n'));
    srv.kill('SIGHUP');
    await srv.waitFor(/session of bob \(127\.0\.0\.1:\d+\) ends: its key was removed from the keyring \(SIGHUP\)/, 2000);
    expect((await b).error).not.toBeNull();
    const ra = await a;
    expect(ra.error).toBeNull();
    expect(ra.digest).toBe(sha256(dataA));
    expect(srv.stderr.match(/keyring .*ring reloaded: 1 client key/g)?.length).toBe(2); // both workers
    expect(srv.proc.exitCode).toBeNull();
  });

  test('modes= limits what a key may be used for: a tun-only key is refused by a forward server with the reason', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice', ['--modes', 'tun']);
    using echo = echoServer();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', join(dir.path, 'ring'), '--forward', `127.0.0.1:${echo.port}`]);
    const port = await srv.listeningPort();
    const c = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', alice], { stdin: 'pipe' });
    await c.exit();
    expect(c.stderr + srv.stderr).toMatch(/the key of alice may not be used for "(stdio|forward)" here \(its keyring entry allows tun\)/);
  });

  test('SIGHUP: a removed key\'s session ends within 1 s with a logged reason; another client\'s transfer goes on byte-exact; a bad file keeps the old keyring', async () => {
    using dir = tempDir();
    const alice = await addKey(dir.path, 'alice');
    const bob = await addKey(dir.path, 'bob');
    const ringPath = join(dir.path, 'ring');
    using echo = echoServer();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', ringPath, '--forward', `127.0.0.1:${echo.port}`]);
    const port = await srv.listeningPort();
    using ca = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', alice, '--local', '127.0.0.1:0']);
    using cb = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', bob, '--local', '127.0.0.1:0']);
    const [la, lb] = await Promise.all([ca.listeningPort(), cb.listeningPort()]);
    const dataA = random(4 << 20);
    const dataB = random(4 << 20);
    const a = echoThrough(la, dataA, 3000);
    const b = echoThrough(lb, dataB, 3000);
    await srv.waitFor(/session opened alice/);
    await srv.waitFor(/session opened bob/);
    await Bun.sleep(800);
    // Remove bob's line and reload.
    writeFileSync(ringPath, readFileSync(ringPath, 'utf8').split('\n').filter((l) => !l.startsWith('bob ')).join('\n'));
    const t0 = Date.now();
    srv.kill('SIGHUP');
    await srv.waitFor(/session of bob \(127\.0\.0\.1:\d+\) ends: its key was removed from the keyring \(SIGHUP\)/, 1000);
    await srv.waitFor(/session closed bob .*revoked/, 1000);
    expect(Date.now() - t0).toBeLessThan(1000);
    const rb = await b;
    expect(rb.error).not.toBeNull(); // bob's stream was cut, and says so
    await cb.waitFor(/the server revoked this client key \(the key of bob was removed from the keyring\)/, 3000);
    const ra = await a;
    expect(ra.error).toBeNull();
    expect(ra.digest).toBe(sha256(dataA));
    expect(srv.stderr).not.toMatch(/session closed alice/);
    // A bad keyring on reload: logged with file and line, the old one kept (alice still gets in, bob still not).
    writeFileSync(ringPath, readFileSync(ringPath, 'utf8') + 'broken line-without-a-key\n');
    srv.kill('SIGHUP');
    await srv.waitFor(/keyring reload failed, keeping the keyring loaded before: keyring .*ring, line \d+: the key of broken is not 64 hex digits/);
    const again = echoThrough(la, random(1000), 10);
    expect((await again).error).toBeNull();
    expect(srv.proc.exitCode).toBeNull();
  });
});
