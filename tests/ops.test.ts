/**
 * Running it as a service (issue 18), with real processes on 127.0.0.1: `bun vpn.ts status` over the control socket,
 * `serve --metrics` checked by Debian's promtool and scraped by a real Prometheus server, and `serve --accept-proxy`
 * behind a real haproxy (send-proxy and send-proxy-v2) in front of two `serve --forward` instances. The parser of
 * PROXY headers is tested in-process in tests/proxy.test.ts.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import type { Socket, SocketHandler } from 'bun';
import { chmodSync, lstatSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { controlDir, defaultControlPath, formatStatus } from '../control.ts';
import { nativeEngine } from '../engine.ts';
import { keysFromKeyFile } from '../handshake.ts';
import { Link, type LinkData } from '../net.ts';
import { encodeProxyV2 } from '../proxy.ts';
import { type Json, Session } from '../session.ts';
import { echoTarget, keygen, Proc, random, sha256, tempDir, until, VPN, VpnProcess } from './helpers.ts';

setDefaultTimeout(20_000);

const dir = tempDir();
let key = '';
beforeAll(async () => {
  key = await keygen(dir.path, 'key');
});
afterAll(() => dir[Symbol.dispose]());

const has = (cmd: string) => Bun.which(cmd) !== null;

/** `bun vpn.ts ARGS` to its end: status, stdout, stderr. */
async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const p = new VpnProcess(args);
  const code = await p.exit(15_000);
  return { code, out: new TextDecoder().decode(await p.stdoutBytes), err: p.stderr };
}

async function statusJson(control: string): Promise<any> {
  const r = await run(['status', '--control', control, '--json']);
  if (r.code !== 0) throw new Error(`status exited ${r.code}: ${r.err}`);
  return JSON.parse(r.out);
}

/**
 * A VPN client built from the project's own Session over a Bun socket from `from` (any 127.x.y.z), optionally
 * sending `header` (a PROXY header, as a load balancer would) first: sends `payload`, CLOSE, and resolves with what
 * came back and how the session ended.
 */
async function vpnClient(port: number, payload: Uint8Array, o: { from?: string; header?: Uint8Array; keyPath?: string } = {}) {
  const keys = keysFromKeyFile(new Uint8Array(Buffer.from(readFileSync(o.keyPath ?? key, 'utf8').trim(), 'hex')));
  const got: Uint8Array[] = [];
  const ended = Promise.withResolvers<Error | null>();
  const opened = Promise.withResolvers<Link>();
  const socket: SocketHandler<LinkData> = {
    open: (s) => opened.resolve(new Link(s)),
    data: (s, chunk) => s.data.link?.receive({ kind: 'data', chunk }),
    drain: (s) => s.data.link?.flush(),
    end: (s) => s.data.link?.receive({ kind: 'end' }),
    close: (s, err) => s.data.link?.receive({ kind: 'close', err }),
    error: (s, err) => s.data.link?.receive({ kind: 'close', err }),
  };
  // localAddress (the client's source address) is not in Bun's types, but Bun.connect honours it.
  await Bun.connect<LinkData>({ hostname: '127.0.0.1', port, allowHalfOpen: true, data: {}, socket, ...(o.from ? { localAddress: o.from } : {}) } as never);
  const link = await opened.promise;
  const localPort = link.socket.localPort;
  if (o.header) link.write(o.header);
  const session = new Session(link, { role: 'client', keys, engine: nativeEngine, handshakeTimeoutMs: 10_000, keepaliveMs: 0, config: (): Json => ({ mode: 'forward' }) }, {
    onOpen: (s) => {
      s.write(payload);
      s.close();
    },
    onData: (p) => void got.push(new Uint8Array(p)),
    onPeerClose: () => {},
    onEnd: (err) => ended.resolve(err),
  });
  link.attach(session);
  session.start();
  const err = await ended.promise;
  return { err, data: new Uint8Array(Buffer.concat(got)), localPort };
}

/** A TCP connection that stays open and idle (optionally after writing `first`); closed on dispose. */
async function idleSocket(port: number, first?: Uint8Array, from?: string) {
  const closed = Promise.withResolvers<void>();
  const s = await Bun.connect({ hostname: '127.0.0.1', port, ...(from ? { localAddress: from } : {}), socket: { data() {}, close: () => closed.resolve(), error: () => closed.resolve() } } as never) as Socket<undefined>;
  if (first) s.write(first);
  return { closed: closed.promise, [Symbol.dispose]: () => s.terminate() };
}

// ---------------------------------------------------------------------------------------------------------------
describe('status', () => {
  test('lists an open forward session (address, mode, protocol, since, last record, bytes each way, queued) and the server\'s counters', async () => {
    using target = echoTarget();
    const control = join(dir.path, 'status.sock');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--control', control]);
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', key, '--local', '127.0.0.1:0']);
    const lport = await cli.listeningPort();
    // One connection through the tunnel that stays open: 100,000 bytes out, all echoed back.
    const payload = random(100_000);
    let back = 0;
    const sock = await Bun.connect({ hostname: '127.0.0.1', port: lport, socket: { data: (_s, d) => void (back += d.length) } });
    sock.write(payload);
    expect(await until(() => back === payload.length)).toBe(true);

    const j = await statusJson(control);
    expect(j.format).toBe(1);
    expect(j.server.listeners).toEqual([`127.0.0.1:${port}`]);
    expect(j.server.control).toBe(control);
    expect(j.server.limits).toMatchObject({ max_conns: 100, handshake_timeout_s: 5, keepalive_s: 25, grace_s: 10, accept_proxy: false });
    expect(j.server.sessions_open).toBe(1);
    expect(j.server.handshakes.ok).toBe(1);
    expect(j.server.bytes).toEqual({ in: 100_000, out: 100_000 });
    expect(j.server.records.in.config).toBe(1);
    expect(j.sessions).toHaveLength(1);
    const s = j.sessions[0];
    expect(Object.keys(s).sort()).toEqual(['address', 'bytes_in', 'bytes_out', 'last_record', 'mode', 'peer', 'protocol', 'queued_bytes', 'rekeys', 'since', 'tunnel'].sort());
    expect(s).toMatchObject({ peer: null, mode: 'forward', tunnel: null, protocol: 2, bytes_in: 100_000, bytes_out: 100_000, queued_bytes: 0 });
    expect(s.address).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(Date.parse(s.since)).toBeLessThanOrEqual(Date.parse(s.last_record));
    expect(JSON.stringify(j)).not.toMatch(/[0-9a-f]{64}/); // nothing that looks like key material
    expect(JSON.stringify(j)).not.toContain(readFileSync(key, 'utf8').trim());

    const human = await run(['status', '--control', control]);
    expect(human.code).toBe(0);
    expect(human.out).toContain(`server: 127.0.0.1:${port}`);
    expect(human.out).toContain(`session: ${s.address}`);
    expect(human.out).toContain('  peer: -');
    expect(human.out).toContain('  mode: forward, protocol v2');
    expect(human.out).toContain('  transfer: 97.66 KiB received, 97.66 KiB sent');
    expect(human.out).toContain('  handshakes: ok 1');
    expect(human.out).toContain('  limits: max-conns 100, handshake-timeout 5 s, keepalive 25 s, grace 10 s, preauth-max 512, preauth-per-source 64\n');

    sock.end();
    expect(await until(async () => (await statusJson(control)).server.sessions_open === 0)).toBe(true);
    const after = await statusJson(control);
    expect(after.sessions).toEqual([]);
    expect(after.server.sessions_total).toBe(1);
  });

  test('names a keyring client by its name', async () => {
    const ring = join(dir.path, 'ring');
    const aliceKey = join(dir.path, 'alice.key');
    const made = await run(['keygen', '--client', 'alice', '--keyring', ring, aliceKey]);
    expect(made.code, made.err).toBe(0);
    using target = echoTarget();
    const control = join(dir.path, 'ring.sock');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--keyring', ring, '--forward', `127.0.0.1:${target.port}`, '--control', control]);
    const port = await srv.listeningPort();
    using cli = new VpnProcess(['connect', `127.0.0.1:${port}`, '--key', aliceKey, '--local', '127.0.0.1:0']);
    const lport = await cli.listeningPort();
    let back = 0;
    const sock = await Bun.connect({ hostname: '127.0.0.1', port: lport, socket: { data: (_s, d) => void (back += d.length) } });
    sock.write('hello');
    expect(await until(() => back === 5)).toBe(true);
    const j = await statusJson(control);
    expect(j.sessions[0].peer).toBe('alice');
    expect(j.sessions[0].protocol).toBe(3);
    expect((await run(['status', '--control', control])).out).toContain('  peer: alice');
    sock.end();
  });

  test('the default socket is mode 0600 in a 0700 directory, found by --listen, and removed at exit; a killed server\'s leftover there is swept, a live socket kept', async () => {
    mkdirSync(controlDir(), { recursive: true, mode: 0o700 });
    const leftover = join(controlDir(), `ops-test-leftover-${process.pid}.sock`);
    const live = join(controlDir(), `ops-test-live-${process.pid}.sock`);
    const killed = Bun.spawn(['bun', '-e', `Bun.listen({ unix: ${JSON.stringify(leftover)}, socket: { data() {} } }); process.kill(process.pid, 'SIGKILL')`]);
    await killed.exited;
    expect(lstatSync(leftover).isSocket()).toBe(true);
    // A live server in another network namespace (unshare -n) shares the directory but not our /proc/net/unix.
    // (Without root, where unshare cannot make one, the live socket is in ours.)
    const ns = process.getuid?.() === 0 && has('unshare') ? ['unshare', '-n'] : [];
    using other = new Proc([...ns, 'bun', '-e', `Bun.listen({ unix: ${JSON.stringify(live)}, socket: { data() {} } }); console.error('bound'); await Bun.sleep(20000)`]);
    await other.waitFor(/bound/);
    if (ns.length > 0) expect(readFileSync('/proc/net/unix', 'latin1')).not.toContain(live);
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key]);
    const port = await srv.listeningPort();
    expect(() => lstatSync(leftover)).toThrow();
    expect(lstatSync(live).isSocket()).toBe(true);
    other.kill('SIGKILL'); // (it accepts but never answers: status below would wait for it)
    await other.exit();
    rmSync(live, { force: true });
    const path = defaultControlPath({ kind: 'tcp', host: '127.0.0.1', port });
    expect(dirname(path)).toBe(controlDir());
    const st = lstatSync(path);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(statSync(dirname(path)).mode & 0o777).toBe(0o700);
    const r = await run(['status', '--listen', `127.0.0.1:${port}`, '--json']);
    expect(r.code, r.err).toBe(0);
    expect(JSON.parse(r.out).server.control).toBe(path);
    // Without --control or --listen: every server with a socket there (other tests' servers may be among them).
    const all = await run(['status', '--json']);
    expect(all.code, all.err).toBe(0);
    const servers = JSON.parse(all.out).servers as any[];
    expect(servers.filter((x) => x.server.control === path).map((x) => x.server.listeners)).toEqual([[`127.0.0.1:${port}`]]);
    expect((await run(['status'])).out).toContain(`server: 127.0.0.1:${port}\n`);
    expect((await run(['status', '--control', path, '--listen', `127.0.0.1:${port}`])).code).toBe(2);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(() => lstatSync(path)).toThrow();
  });

  test('$RUNTIME_DIRECTORY (systemd RuntimeDirectory=) holds the default socket; a directory others may write to is refused with a warning', async () => {
    const rt = join(dir.path, 'runtime');
    mkdirSync(rt, { mode: 0o755 });
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key], { env: { RUNTIME_DIRECTORY: rt } });
    const port = await srv.listeningPort();
    expect(lstatSync(join(rt, `127.0.0.1_${port}.sock`)).mode & 0o777).toBe(0o600);
    const p = new VpnProcess(['status', '--listen', `127.0.0.1:${port}`, '--json'], { env: { RUNTIME_DIRECTORY: rt } });
    expect(await p.exit(), p.stderr).toBe(0);
    const open = join(dir.path, 'open-runtime');
    mkdirSync(open);
    chmodSync(open, 0o777);
    using srv2 = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key], { env: { RUNTIME_DIRECTORY: open } });
    await srv2.listeningPort();
    expect(srv2.stderr).toContain(`warning: no control socket (bun vpn.ts status will not reach this server): control socket directory ${open} is writable by other users (mode 777)`);
  });

  test('a stale socket of a killed server is replaced; a live one, or a file that is not a socket, is refused (exit 2)', async () => {
    const control = join(dir.path, 'stale.sock');
    using first = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--control', control]);
    await first.listeningPort();
    const busy = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--control', control]);
    expect(await busy.exit()).toBe(2);
    expect(busy.stderr).toContain('another server answers there');
    first.kill('SIGKILL');
    await first.exit();
    expect(lstatSync(control).isSocket()).toBe(true); // left behind
    using second = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--control', control]);
    await second.listeningPort();
    expect((await statusJson(control)).server.pid).toBe(second.pid);
    const file = join(dir.path, 'plain-file');
    writeFileSync(file, 'x');
    const r = await run(['serve', '--listen', '127.0.0.1:0', '--key', key, '--control', file]);
    expect(r.code).toBe(2);
    expect(r.err).toContain('a file that is not a socket is in the way');
  });

  test('serve --workers 2: each worker has a socket of its own (PATH-wN.sock), and status asks them all', async () => {
    using target = echoTarget();
    const control = join(dir.path, 'workers.sock');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--workers', '2', '--control', control]);
    const port = await srv.listeningPort();
    for (let i = 0; i < 6; i++) {
      const r = await vpnClient(port, random(1000 + i));
      expect(r.err).toBeNull();
    }
    const r = await run(['status', '--control', control, '--json']);
    expect(r.code, r.err).toBe(0);
    const j = JSON.parse(r.out);
    expect(j.workers).toHaveLength(2);
    expect(j.workers.map((w: any) => w.server.control)).toEqual([join(dir.path, 'workers-w1.sock'), join(dir.path, 'workers-w2.sock')]);
    expect(new Set(j.workers.map((w: any) => w.server.pid)).size).toBe(2);
    expect(j.workers.every((w: any) => w.server.listeners[0] === `127.0.0.1:${port}`)).toBe(true);
    expect(j.workers.reduce((n: number, w: any) => n + w.server.sessions_total, 0)).toBe(6);
    const human = await run(['status', '--control', control]);
    expect(human.out.match(/^server: /gm)).toHaveLength(2);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(() => lstatSync(join(dir.path, 'workers-w1.sock'))).toThrow();
    expect(() => lstatSync(join(dir.path, 'workers-w2.sock'))).toThrow();
  });

  test('no server there: exit 1 with a sentence naming the socket', async () => {
    const r = await run(['status', '--control', join(dir.path, 'nobody.sock')]);
    expect(r.code).toBe(1);
    expect(r.err).toContain('nobody.sock');
    expect(r.err).toContain('is the server running?');
  });

  test('status clients that never send, or send too much, never stall the tunnels, and are cut off', async () => {
    using target = echoTarget();
    const control = join(dir.path, 'slow.sock');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--control', control]);
    const port = await srv.listeningPort();
    const idle: Socket<undefined>[] = [];
    const idleClosed: Promise<void>[] = [];
    for (let i = 0; i < 12; i++) {
      const c = Promise.withResolvers<void>();
      idleClosed.push(c.promise);
      idle.push(await Bun.connect({ unix: control, socket: { data() {}, close: () => c.resolve(), error: () => c.resolve() } }));
    }
    // Meanwhile tunnels go on.
    const payload = random(200_000);
    const r = await vpnClient(port, payload);
    expect(r.err).toBeNull();
    expect(sha256(r.data)).toBe(sha256(payload));
    // The idle ones are cut off within the control timeout (5 s), and status answers again.
    const cut = await Promise.race([Promise.all(idleClosed).then(() => true), Bun.sleep(8000).then(() => false)]);
    expect(cut).toBe(true);
    // An oversized request gets an error line, not a stall.
    const big = Promise.withResolvers<string>();
    let text = '';
    const bigSock = await Bun.connect({ unix: control, socket: { data: (_s, d) => void (text += d.toString()), close: () => big.resolve(text) } });
    bigSock.write('{"command":"' + 'x'.repeat(3000));
    expect(await big.promise).toContain('request longer than 1024 bytes');
    expect((await statusJson(control)).server.sessions_total).toBe(1);
  });

  test('text a peer or a keyring could put in a session (names, modes) is escaped in the human output', () => {
    const evil = '\u001b[2J\u001b]0;pwned\u0007bob\u202e\r\n';
    const out = formatStatus({ time: new Date().toISOString(), server: { listeners: ['127.0.0.1:1'] }, sessions: [{ peer: evil, address: evil, mode: evil, since: null, last_record: null }] });
    expect(out).not.toMatch(/[\u0000-\u0009\u000b-\u001f\u007f\u202e]/);
    expect(out).toContain('  peer: ?[2J?]0;pwned?bob???');
  });
});

// ---------------------------------------------------------------------------------------------------------------
describe('metrics', () => {
  /** serve --forward with --metrics on a free port; the metrics address from its log. */
  async function metricsServer(target: number, extra: string[] = []) {
    const srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target}`, '--metrics', '127.0.0.1:0', '--control', 'none', ...extra]);
    const port = await srv.listeningPort();
    const m = await srv.waitFor(/^metrics on http:\/\/(127\.0\.0\.1:\d+)\/metrics$/m);
    return { srv, port, metrics: m[1]!, [Symbol.dispose]: () => srv.kill('SIGKILL') };
  }

  const sample = (text: string, series: string) => {
    const line = text.split('\n').find((l) => l.startsWith(`${series} `));
    return line === undefined ? undefined : Number(line.slice(series.length + 1));
  };

  test('GET /metrics: the traffic, records, handshakes and drops, in a format promtool accepts', async () => {
    using target = echoTarget();
    using m = await metricsServer(target.port);
    const payload = random(123_456);
    const r = await vpnClient(m.port, payload);
    expect(r.err).toBeNull();
    const wrong = await keygen(dir.path, 'wrong-metrics');
    const bad = await vpnClient(m.port, payload, { keyPath: wrong });
    expect(bad.err).not.toBeNull();
    await until(async () => sample(await (await fetch(`http://${m.metrics}/metrics`)).text(), 'vpn_handshakes_total{outcome="auth_failed"}') === 1);
    const res = await fetch(`http://${m.metrics}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
    const text = await res.text();
    expect(sample(text, 'vpn_sessions_open')).toBe(0);
    expect(sample(text, 'vpn_sessions_total')).toBe(1);
    expect(sample(text, 'vpn_bytes_total{direction="in"}')).toBe(123_456);
    expect(sample(text, 'vpn_bytes_total{direction="out"}')).toBe(123_456);
    expect(sample(text, 'vpn_records_total{direction="in",type="config"}')).toBe(1);
    expect(sample(text, 'vpn_records_total{direction="in",type="close"}')).toBe(1);
    expect(sample(text, 'vpn_records_total{direction="in",type="data"}')).toBeGreaterThanOrEqual(2);
    expect(sample(text, 'vpn_handshakes_total{outcome="ok"}')).toBe(1);
    expect(sample(text, 'vpn_handshakes_total{outcome="auth_failed"}')).toBe(1);
    expect(sample(text, 'vpn_drops_total{reason="max_conns"}')).toBe(0);
    expect(sample(text, 'vpn_queue_bytes')).toBe(0);
    for (const name of ['vpn_sessions_open', 'vpn_bytes_total', 'vpn_records_total', 'vpn_handshakes_total', 'vpn_drops_total', 'vpn_queue_bytes']) {
      expect(text).toContain(`# HELP ${name} `);
      expect(text).toMatch(new RegExp(`^# TYPE ${name} (counter|gauge)$`, 'm'));
    }
    expect((await fetch(`http://${m.metrics}/other`)).status).toBe(404);
    expect((await fetch(`http://${m.metrics}/metrics`, { method: 'POST', body: 'x' })).status).toBe(405);

    if (!has('promtool')) {
      console.warn('SKIPPED promtool check: promtool not installed (Debian package prometheus; .ci/run installs it)');
      return;
    }
    const p = Bun.spawn(['promtool', 'check', 'metrics'], { stdin: new Blob([text]), stdout: 'pipe', stderr: 'pipe' });
    const [code, out, err] = await Promise.all([p.exited, new Response(p.stdout).text(), new Response(p.stderr).text()]);
    expect(`${code} ${out}${err}`.trim()).toBe('0');
  });

  test('a real Prometheus server scrapes it: up == 1 and the vpn_ series in its query API', async () => {
    if (!has('prometheus')) {
      console.warn('SKIPPED Prometheus scrape: prometheus not installed (Debian package prometheus; .ci/run installs it)');
      return;
    }
    using target = echoTarget();
    using m = await metricsServer(target.port);
    const r = await vpnClient(m.port, random(5000));
    expect(r.err).toBeNull();
    using work = tempDir();
    const cfg = join(work.path, 'prometheus.yml');
    writeFileSync(cfg, `global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vpn\n    static_configs:\n      - targets: ['${m.metrics}']\n`);
    const free = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } });
    const promPort = free.port;
    free.stop(true);
    mkdirSync(join(work.path, 'data'));
    using prom = new Proc(['prometheus', `--config.file=${cfg}`, `--web.listen-address=127.0.0.1:${promPort}`, `--storage.tsdb.path=${join(work.path, 'data')}`, '--storage.tsdb.retention.time=1h'], { cwd: work.path });
    const query = async (q: string) => {
      try {
        const res = await fetch(`http://127.0.0.1:${promPort}/api/v1/query?query=${encodeURIComponent(q)}`);
        const j = (await res.json()) as { data?: { result?: { value: [number, string] }[] } };
        return j.data?.result?.[0]?.value[1] ?? null;
      } catch {
        return null; // not up yet
      }
    };
    expect(await until(async () => (await query('up{job="vpn"}')) === '1', 30_000), prom.stderr.slice(-2000)).toBe(true);
    expect(await until(async () => (await query('vpn_bytes_total{job="vpn",direction="in"}')) === '5000', 5000)).toBe(true);
    expect(await query('vpn_sessions_total{job="vpn"}')).toBe('1');
  }, 45_000); // Prometheus itself takes a few seconds to start, more on a loaded machine

  test('refuses a non-loopback address without --metrics-public, a unix socket, and --workers (exit 2)', async () => {
    const base = ['serve', '--listen', '127.0.0.1:0', '--key', key];
    const pub = await run([...base, '--metrics', '0.0.0.0:9100']);
    expect(pub.code).toBe(2);
    expect(pub.err).toContain('not a loopback address');
    expect(pub.err).toContain('--metrics-public');
    expect((await run([...base, '--metrics-public'])).err).toContain('--metrics-public needs --metrics');
    expect((await run([...base, '--metrics', 'unix:/tmp/x.sock'])).err).toContain('not a unix socket');
    const w = await run([...base, '--forward', '127.0.0.1:1', '--workers', '2', '--metrics', '127.0.0.1:0']);
    expect(w.code).toBe(2);
    expect(w.err).toContain('--metrics does not take --workers');
  });
});

// ---------------------------------------------------------------------------------------------------------------
describe('--accept-proxy', () => {
  test('50 clients through a real haproxy (send-proxy and send-proxy-v2, roundrobin) to two servers: every byte intact, both used, logs and the target see the real addresses', async () => {
    if (!has('haproxy')) {
      console.warn('SKIPPED haproxy test: haproxy not installed (Debian package haproxy; .ci/run installs it)');
      return;
    }
    using target = echoTarget(true);
    const serveArgs = ['serve', '--listen', '127.0.0.1:0', '--key', key, '--engine', 'native', '--forward', `127.0.0.1:${target.port}`, '--proxy-protocol', '--accept-proxy', '--control', 'none'];
    using s1 = new VpnProcess(serveArgs);
    using s2 = new VpnProcess(serveArgs);
    const [p1, p2] = await Promise.all([s1.listeningPort(), s2.listeningPort()]);
    using work = tempDir();
    const free = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } });
    const hport = free.port;
    free.stop(true);
    const cfg = join(work.path, 'haproxy.cfg');
    // haproxy reaches the servers from 127.0.0.2; the clients come from 127.0.1.x: three different addresses.
    writeFileSync(
      cfg,
      [
        'global',
        '  maxconn 1000',
        'defaults',
        '  mode tcp',
        '  timeout connect 5s',
        '  timeout client 30s',
        '  timeout server 30s',
        'frontend vpn',
        `  bind 127.0.0.1:${hport}`,
        '  default_backend servers',
        'backend servers',
        '  balance roundrobin',
        '  source 127.0.0.2',
        // plain TCP health checks (connect, close without a byte): the servers must take them without a word
        `  server s1 127.0.0.1:${p1} send-proxy check inter 200ms`,
        `  server s2 127.0.0.1:${p2} send-proxy-v2 check inter 200ms`,
        '',
      ].join('\n'),
    );
    using haproxy = new Proc(['haproxy', '-db', '-f', cfg], { cwd: work.path });
    const reachable = await until(async () => {
      try {
        const s = await Bun.connect({ hostname: '127.0.0.1', port: hport, socket: { data() {} } });
        s.terminate();
        return true;
      } catch {
        return false;
      }
    }, 10_000);
    expect(reachable, haproxy.stderr).toBe(true);
    // That probe reached a server without a handshake: one dropped handshake, from 127.0.0.1, is expected.
    const clients = Array.from({ length: 50 }, (_, i) => ({ from: `127.0.1.${i + 10}`, payload: random(32 * 1024 + i * 997) }));
    const results = await Promise.all(clients.map((c) => vpnClient(hport, c.payload, { from: c.from })));
    results.forEach((r, i) => {
      expect(r.err).toBeNull();
      expect(sha256(r.data)).toBe(sha256(clients[i]!.payload));
    });
    const real = new Set(results.map((r, i) => `${clients[i]!.from}:${r.localPort}`));
    await until(() => [...(s1.stderr + s2.stderr).matchAll(/^session closed /gm)].length >= 50, 5000);
    const opened = (log: string) => [...log.matchAll(/^session opened (\S+) \(protocol v2\)$/gm)].map((m) => m[1]!);
    const o1 = opened(s1.stderr);
    const o2 = opened(s2.stderr);
    expect(o1.length).toBeGreaterThan(0);
    expect(o2.length).toBeGreaterThan(0);
    expect(new Set([...o1, ...o2])).toEqual(real);
    // The target behind each server got a PROXY header naming the client, not haproxy (127.0.0.2) nor the server.
    const named = new Set(target.headers.map((h) => {
      const f = h.split(' ');
      expect(f.slice(0, 2)).toEqual(['PROXY', 'TCP4']);
      return `${f[2]}:${f[4]}`;
    }));
    expect(named).toEqual(real);
    expect(s1.stderr + s2.stderr).not.toContain('127.0.0.2');
    expect(s1.stderr + s2.stderr).not.toContain('dropping connection');
    expect(s1.stderr + s2.stderr).not.toContain('handshake failed');
    console.log(`haproxy: ${o1.length} sessions on the send-proxy server, ${o2.length} on the send-proxy-v2 server`);
  });

  test('a connection without a valid header is dropped with its reason logged; silence is dropped after the handshake timeout; the real address counts', async () => {
    using target = echoTarget(true);
    const control = join(dir.path, 'proxy.sock');
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--proxy-protocol', '--accept-proxy', '--handshake-timeout', '1', '--control', control]);
    const port = await srv.listeningPort();
    // A client straight to the server (no load balancer): its message 1 is not a PROXY header.
    const direct = await vpnClient(port, random(100));
    expect(direct.err).not.toBeNull();
    await srv.waitFor(/dropping connection from 127\.0\.0\.1:\d+: not a PROXY protocol header/);
    {
      using silent = await idleSocket(port);
      await Promise.race([silent.closed, Bun.sleep(5000)]);
      await srv.waitFor(/dropping connection from 127\.0\.0\.1:\d+: no PROXY header within 1 s/);
    }
    // Through a v2 header naming 198.51.100.7:4242 (a front written by hand), and a v1 one naming an IPv6 client.
    const payload = random(70_000);
    const v2 = await vpnClient(port, payload, { header: encodeProxyV2({ address: '198.51.100.7', port: 4242 }, { address: '192.0.2.1', port: 443 }) });
    expect(v2.err).toBeNull();
    expect(sha256(v2.data)).toBe(sha256(payload));
    const v1 = await vpnClient(port, payload, { header: new TextEncoder().encode('PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n') });
    expect(v1.err).toBeNull();
    expect(sha256(v1.data)).toBe(sha256(payload));
    await srv.waitFor(/^session opened 198\.51\.100\.7:4242 \(protocol v2\)$/m);
    await srv.waitFor(/^session opened \[2001:db8::7\]:5555 \(protocol v2\)$/m);
    expect(target.headers).toEqual(['PROXY TCP4 198.51.100.7 192.0.2.1 4242 443', 'PROXY TCP6 2001:db8::7 2001:db8::1 5555 443']);
    const j = await statusJson(control);
    expect(j.server.drops.proxy_header).toBe(2);
    expect(j.server.limits.accept_proxy).toBe(true);
  });

  test('the per-source handshake budget counts the address the header named, not the balancer\'s', async () => {
    using target = echoTarget();
    using srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', `127.0.0.1:${target.port}`, '--accept-proxy', '--max-conns', '2', '--control', 'none']);
    const port = await srv.listeningPort();
    const header = (a: string, p: number) => new TextEncoder().encode(`PROXY TCP4 ${a} 127.0.0.1 ${p} ${port}\r\n`);
    const stalled = (a: string, p: number) => new Uint8Array([...header(a, p), 0x02]); // and the first byte of a message 1
    // Two handshakes in progress from 198.51.100.1 fill its share (min(64, --max-conns 2)); a third is refused.
    using a1 = await idleSocket(port, stalled('198.51.100.1', 1));
    using a2 = await idleSocket(port, stalled('198.51.100.1', 2));
    await Bun.sleep(200);
    using a3 = await idleSocket(port, stalled('198.51.100.1', 3));
    await Promise.race([a3.closed, Bun.sleep(3000)]);
    await srv.waitFor(/for handshakes from 198\.51\.100\.1: refusing 198\.51\.100\.1:3/);
    // Another client behind the same balancer (same socket address) is not held up by them.
    const r = await vpnClient(port, random(1000), { header: header('198.51.100.2', 9) });
    expect(r.err).toBeNull();
    await srv.waitFor(/^session opened 198\.51\.100\.2:9 /m);
  });
});
