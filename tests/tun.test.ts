/**
 * `--tun` mode. Pure parts (address pool, router, packet splitting, flags) run everywhere; the end-to-end tests build
 * hosts out of network namespaces joined by veth pairs (addresses only inside them: 192.168.77.0/24 underneath,
 * 10.66.0.0/24 in the tunnel), run `bun vpn.ts` in them as a user would, and remove everything afterwards. They are
 * skipped, with the reason printed, only where a namespace cannot be created (not Linux, not root).
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Proc as BaseProc, until, VPN } from './helpers.ts';
import { execIn, inNetns, must, Namespaces, netnsUnavailable, sh } from './netns.ts';
import { formatIPv4, parseCidr, parseRoute } from '../address.ts';
import { AddressPool, DEFAULT_MTU, MAX_PEER_QUEUE, RECORD_OVERHEAD_MAX, TunRouter } from '../tun.ts';
import { packetLength, splitPackets } from '../tundevice.ts';
import { VpnError } from '../errors.ts';
import { log } from '../log.ts';

// ---- pure parts ----

/** A minimal IPv4 header (and `extra` payload bytes) from `src` to `dst`. */
function ipv4(src: string, dst: string, extra = 8): Uint8Array {
  const p = new Uint8Array(20 + extra);
  p[0] = 0x45;
  new DataView(p.buffer).setUint16(2, p.length);
  p[9] = 17;
  p.set(src.split('.').map(Number), 12);
  p.set(dst.split('.').map(Number), 16);
  return p;
}
const ip = (t: string) => parseCidr(t, 'test', 32).addr;
/** A client that holds IPv4 address `t` only. */
const v4 = (t: string) => ({ v4: ip(t), v6: null });

describe('the address pool', () => {
  test('hands out the lowest free host address, skipping the server, and the same one again once released', () => {
    const pool = new AddressPool(parseCidr('10.66.0.1/24', 't'));
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.2');
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.3');
    pool.release(ip('10.66.0.2'));
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.2');
  });

  test('gives a requested address once, and refuses it while in use, outside the subnet, or with another prefix', () => {
    const pool = new AddressPool(parseCidr('10.66.0.1/24', 't'));
    expect(formatIPv4(pool.take(parseCidr('10.66.0.7/24', 't')) as number)).toBe('10.66.0.7');
    const refusals: [string, RegExp][] = [
      ['10.66.0.7/24', /address 10\.66\.0\.7 is in use/],
      ['10.66.0.1/24', /server's own address/],
      ['10.66.0.255/24', /not a host address/],
      ['10.66.0.0/24', /not a host address/],
      ['10.67.0.5/24', /not a host address/],
      ['10.66.0.9/16', /tunnel subnet is 10\.66\.0\.0\/24/],
    ];
    for (const [req, re] of refusals) {
      const r = pool.take(parseCidr(req, 't'));
      expect(r).toBeInstanceOf(VpnError);
      expect((r as VpnError).code).toBe('USAGE');
      expect((r as VpnError).message).toMatch(re);
    }
  });

  test('says so when the subnet is full, and refuses a server address that leaves no room', () => {
    const pool = new AddressPool(parseCidr('10.66.0.1/30', 't'));
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.2');
    expect((pool.take(null) as VpnError).message).toMatch(/no free address/);
    expect(() => new AddressPool(parseCidr('10.66.0.1/31', 't'))).toThrow(/between \/1 and \/30/);
    expect(() => new AddressPool(parseCidr('10.66.0.0/24', 't'))).toThrow(/network or broadcast/);
  });
});

describe('the router', () => {
  // its drop lines would only clutter the test output here
  let wasQuiet = false;
  beforeAll(() => {
    wasQuiet = log.quiet;
    log.quiet = true;
  });
  afterAll(() => void (log.quiet = wasQuiet));

  function setup() {
    const pool = new AddressPool(parseCidr('10.66.0.1/24', 't'));
    const toKernel: Uint8Array[] = [];
    const router = new TunRouter(pool, { write: (p) => (toKernel.push(p.slice()), true) });
    const peer = () => {
      const got: Uint8Array[] = [];
      return { got, queued: 0, writeRecord: (p: Uint8Array) => (got.push(p.slice()), true) };
    };
    const a = peer();
    const b = peer();
    router.attach(ip('10.66.0.2'), a);
    router.attach(ip('10.66.0.3'), b);
    return { router, toKernel, a, b };
  }

  test('carries a packet from one client to another, and to the kernel for the server or beyond the subnet', () => {
    const { router, toKernel, b } = setup();
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.3'));
    expect(b.got).toHaveLength(1);
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.1'));
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.77.0.1'));
    expect(toKernel).toHaveLength(2);
  });

  test('delivers what the kernel sends by destination, and drops and counts unknown destinations', () => {
    const { router, a, toKernel } = setup();
    router.fromInterface(ipv4('10.66.0.1', '10.66.0.2'));
    expect(a.got).toHaveLength(1);
    router.fromInterface(ipv4('10.66.0.1', '10.66.0.99'));
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.99'));
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.255'));
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '224.0.0.22'));
    expect(router.stats.unknown).toBe(4);
    expect(toKernel).toHaveLength(0);
  });

  test('drops a packet whose source is not the sending client (no spoofing another client)', () => {
    const { router, b, toKernel } = setup();
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.3', '10.66.0.1'));
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.9', '10.66.0.3'));
    expect(router.stats.spoofed).toBe(2);
    expect(b.got).toHaveLength(0);
    expect(toKernel).toHaveLength(0);
  });

  test('drops IPv6 in an IPv4-only tunnel, truncated packets, and packets for a client whose queue is full; forgets a detached client', () => {
    const { router, a, b } = setup();
    const v6 = new Uint8Array(48);
    v6[0] = 0x60;
    v6[5] = 8;
    router.fromClient(v4('10.66.0.2'), v6);
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.3').subarray(0, 24));
    expect([router.stats.otherFamily, router.stats.malformed]).toEqual([1, 1]);
    b.queued = MAX_PEER_QUEUE + 1;
    router.fromClient(v4('10.66.0.2'), ipv4('10.66.0.2', '10.66.0.3'));
    expect(router.stats.queueFull).toBe(1);
    router.detach(ip('10.66.0.2'), b); // not the holder: ignored
    router.fromInterface(ipv4('10.66.0.1', '10.66.0.2'));
    expect(a.got).toHaveLength(1);
    router.detach(ip('10.66.0.2'), a);
    router.fromInterface(ipv4('10.66.0.1', '10.66.0.2'));
    expect(router.stats.unknown).toBe(1);
  });
});

describe('packets and flags', () => {
  test('splits a chunk of several packets read at once, and reports a cut-off tail', () => {
    const v6 = new Uint8Array(40 + 10);
    v6[0] = 0x60;
    v6[5] = 10;
    const chunk = Buffer.concat([ipv4('1.2.3.4', '5.6.7.8', 100), v6, ipv4('1.2.3.4', '5.6.7.8', 0)]);
    const lens: number[] = [];
    expect(splitPackets(chunk, (p) => lens.push(p.length))).toBe(0);
    expect(lens).toEqual([120, 50, 20]);
    lens.length = 0;
    expect(splitPackets(chunk.subarray(0, 130), (p) => lens.push(p.length))).toBe(10);
    expect(lens).toEqual([120]);
    expect(packetLength(new Uint8Array([0x45, 0, 0, 4]))).toBe(0);
  });

  test('the default MTU leaves room for the frame and TCP/IP on a 1500-byte path', () => {
    expect(RECORD_OVERHEAD_MAX).toBe(4 + 16 + 32 + 1 + 16);
    expect(DEFAULT_MTU).toBe(1500 - 60 - 69);
    // the largest frame a DEFAULT_MTU packet makes: 52 + the padded ciphertext of type byte + packet
    const frame = 52 + (Math.floor((1 + DEFAULT_MTU) / 16) + 1) * 16;
    expect(frame + 60).toBeLessThanOrEqual(1500);
  });

  test('parses addresses and routes, naming what is wrong', () => {
    expect(parseCidr('10.66.0.7/24', 't')).toEqual({ addr: ip('10.66.0.7'), prefix: 24 });
    for (const bad of ['10.66.0.256/24', '10.66.0/24', '10.66.0.1/33', '10.66.0.1', 'auto', '10.66.0.1/24/1']) {
      expect(() => parseCidr(bad, '--tun')).toThrow(/--tun: expected an IPv4 address and prefix/);
    }
    expect(() => parseRoute('10.77.0.1/24')).toThrow(/did you mean 10\.77\.0\.0\/24/);
  });
});

// ---- the command line, without a network ----

/** A Proc that the afterEach below kills if the test left it running. */
class Proc extends BaseProc {
  constructor(argv: string[], env: Record<string, string> = {}) {
    super(argv, { env });
    live.add(this);
  }

  override async exit(ms = 20000): Promise<number> {
    try {
      return await super.exit(ms);
    } finally {
      live.delete(this);
    }
  }

  /** stdout as text */
  get stdout(): Promise<string> {
    return this.stdoutBytes.then((b) => new TextDecoder().decode(b));
  }
}

/** Every process a test started, killed after each test whatever happened. */
const live = new Set<Proc>();
afterEach(async () => {
  for (const p of live) p.kill('SIGKILL');
  await Promise.all([...live].map((p) => p.exit(5000)));
});

const SECRET = { VPN_SECRET: 'tun test passphrase' };

describe('usage', () => {
  test('mistakes in the TUN flags exit 2 with a message that names the flag', async () => {
    const cases: [string[], RegExp][] = [
      [['serve', '--tun', 'auto'], /serve --tun needs the server's tunnel address/],
      [['serve', '--tun', '10.66.0.1'], /--tun: expected an IPv4 address and prefix/],
      [['connect', '--tun', 'auto', '--mtu', '100'], /--mtu: expected a whole number from 576 to 9000/],
      [['connect', '--mtu', '1400'], /--mtu only applies in TUN mode; add --tun auto/],
      [['connect', '--tun', 'auto', '--route', '10.77.0.1/24'], /did you mean 10\.77\.0\.0\/24/],
      [['connect', '--tun', 'auto', '--tun-name', 'a/b'], /--tun-name: expected an interface name/],
      [['serve', '--tun', '10.66.0.1/24', '--forward', '127.0.0.1:1'], /--forward belongs to port forwarding/],
      [['serve', '--tun', '10.66.0.1/24', '--once'], /--once does not apply to --tun/],
    ];
    for (const [args, re] of cases) {
      const p = new Proc(['bun', VPN, ...args], SECRET);
      expect(await p.exit()).toBe(2);
      expect(p.stderr).toMatch(re);
    }
  });

  test('--help documents every TUN flag with its default', async () => {
    for (const cmd of ['serve', 'connect']) {
      const p = new Proc(['bun', VPN, cmd, '--help']);
      expect(await p.exit()).toBe(0);
      const text = await p.stdout;
      for (const flag of ['--tun', '--tun-name NAME', '--mtu N', '--route CIDR', 'default vpn%d', String(DEFAULT_MTU)]) expect(text).toContain(flag);
    }
  });
});

// ---- end to end, in network namespaces ----

const spaces = new Namespaces();
const TAG = spaces.tag;
const NS = { srv: spaces.name('s'), c1: spaces.name('a'), c2: spaces.name('b') };
const SERVER1 = '192.168.77.1'; // the server, seen from c1
const SERVER2 = '192.168.77.5'; // the server, seen from c2

/** Why the namespace tests cannot run here, or null when they can (checked once: can we create one?). */
const skipReason = netnsUnavailable();
if (skipReason) console.log(`tun.test.ts: skipping the network-namespace tests: ${skipReason}`);

let work = '';
let keyPath = '';
let wrongKeyPath = '';

/** `bun vpn.ts ARGS` inside namespace `ns`. */
const vpnIn = (ns: string, args: string[]) => new Proc(inNetns(ns, ['bun', VPN, ...args]));
const exec = execIn;

/** ICMP echo from namespace `ns` to `dst` (python3, a raw socket): replies received and their round-trip times. */
function ping(ns: string, dst: string, count = 3, timeoutS = 2): { sent: number; received: number; rtts_ms: number[] } {
  const r = exec(ns, ['python3', join(work, 'ping.py'), dst, String(count), String(timeoutS)]);
  if (r.code !== 0) throw new Error(`ping failed: ${r.err}`);
  return JSON.parse(r.out);
}

const PING_PY = `
import json, os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b'\\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xffff
rtts = []
for seq in range(count):
    payload = os.urandom(56)
    hdr = struct.pack('!BBHHH', 8, 0, 0, ident, seq)
    pkt = struct.pack('!BBHHH', 8, 0, csum(hdr + payload), ident, seq) + payload
    t0 = time.perf_counter(); s.sendto(pkt, (dst, 0)); deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0: break
        s.settimeout(left)
        try: data, addr = s.recvfrom(4096)
        except socket.timeout: break
        ihl = (data[0] & 15) * 4
        typ, code, _, rid, rseq = struct.unpack('!BBHHH', data[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq and addr[0] == dst and data[ihl + 8:] == payload:
            rtts.append((time.perf_counter() - t0) * 1000); break
print(json.dumps({'sent': count, 'received': len(rtts), 'rtts_ms': rtts}))
`;

// These tests spawn real processes and move megabytes; bun test's 5 s default is too short for some. A test that
// needs longer still says so itself.
setDefaultTimeout(20_000);

/** Names of the TUN interfaces (link/none) in namespace `ns`. */
function tunLinks(ns: string): string[] {
  const out = sh(['ip', '-n', ns, '-o', 'link', 'show']).out;
  return out
    .split('\n')
    .filter((l) => l.includes('link/none'))
    .map((l) => l.split(':')[1]!.trim());
}

let nextPort = 40000;
/** A TUN server in NS.srv listening on every address of it; resolves once it is up. */
async function startServer(extra: string[] = []): Promise<{ p: Proc; port: number }> {
  const port = nextPort++;
  const p = vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${port}`, '--tun', '10.66.0.1/24', '--key', keyPath, ...extra]);
  await p.waitFor(/^listening on /m);
  return { p, port };
}

/** A TUN client in `ns`; resolves with its interface and address once the tunnel is up. */
async function startClient(ns: string, port: number, extra: string[] = ['--tun', 'auto']) {
  const server = ns === NS.c2 ? SERVER2 : SERVER1;
  const p = vpnIn(ns, ['connect', `${server}:${port}`, '--key', keyPath, ...extra]);
  const m = await p.waitFor(/^tunnel up: (\S+) (\S+)\/24/m);
  return { p, dev: m[1]!, addr: m[2]! };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

describe.skipIf(skipReason !== null)('TUN across network namespaces', () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'vpn-tun-'));
    writeFileSync(join(work, 'ping.py'), PING_PY);
    keyPath = join(work, 'key');
    wrongKeyPath = join(work, 'wrong');
    writeFileSync(keyPath, randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
    writeFileSync(wrongKeyPath, randomBytes(32).toString('hex') + '\n', { mode: 0o600 });
    for (const ns of Object.values(NS)) spaces.add(ns); // removed at exit too, should the run die before afterAll
    // srv ─ v1 ══ v0 ─ c1 (192.168.77.0/30) and srv ─ v2 ══ v0 ─ c2 (192.168.77.4/30)
    spaces.veth(NS.srv, 'v1', NS.c1, 'v0', { a: `${SERVER1}/30`, b: '192.168.77.2/30' });
    spaces.veth(NS.srv, 'v2', NS.c2, 'v0', { a: `${SERVER2}/30`, b: '192.168.77.6/30' });
    // a network on the server's side beyond the tunnel subnet, for --route
    must(['ip', '-n', NS.srv, 'addr', 'add', '10.77.0.1/24', 'dev', 'lo']);
  });

  afterAll(() => {
    spaces.remove();
    if (work) rmSync(work, { recursive: true, force: true });
    const left = sh(['ip', 'netns', 'list']).out;
    expect(left).not.toContain(TAG);
  });

  test('a client gets the first free address; ping crosses the tunnel both ways (protocol v2); SIGTERM removes the interface', async () => {
    const { p: srv, port } = await startServer();
    const cli = await startClient(NS.c1, port);
    expect(cli.addr).toBe('10.66.0.2');
    expect(exec(NS.c1, ['ip', '-4', '-o', 'addr', 'show', 'dev', cli.dev]).out).toContain('inet 10.66.0.2/24');
    await srv.waitFor(/client 192\.168\.77\.2:\d+ is 10\.66\.0\.2 \(protocol v2\)/);
    const there = ping(NS.c1, '10.66.0.1', 10);
    expect(there.received).toBe(10);
    expect(ping(NS.srv, '10.66.0.2', 3).received).toBe(3);
    console.log(`tun: ping through the tunnel: median ${median(there.rtts_ms).toFixed(2)} ms, min ${Math.min(...there.rtts_ms).toFixed(2)} ms over ${there.received}`);
    // an address of the subnet that nobody holds: dropped and counted by the server
    expect(ping(NS.c1, '10.66.0.99', 1, 1).received).toBe(0);
    await srv.waitFor(/dropped a packet for unknown destination 10\.66\.0\.99 \(from 10\.66\.0\.2\)/);
    cli.p.kill('SIGTERM');
    expect(await cli.p.exit()).toBe(0);
    expect(tunLinks(NS.c1)).toEqual([]);
    await srv.waitFor(/client 10\.66\.0\.2 .* gone after .*: clean end; address released/);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(srv.stderr).toMatch(/tun stats: .*dropped: [1-9]\d* unknown destination, 0 spoofed/);
    expect(tunLinks(NS.srv)).toEqual([]);
  });

  test('a 16 MiB HTTP download across the tunnel arrives intact', async () => {
    const { p: srv, port } = await startServer();
    const cli = await startClient(NS.c1, port);
    const blob = randomBytes(16 << 20);
    const www = join(work, 'www');
    rmSync(www, { recursive: true, force: true });
    require('node:fs').mkdirSync(www);
    writeFileSync(join(www, 'blob'), blob);
    const http = new Proc(['ip', 'netns', 'exec', NS.srv, 'python3', '-u', '-m', 'http.server', '8080', '--bind', '10.66.0.1', '--directory', www]);
    expect(await until(() => exec(NS.c1, ['curl', '-s', '-o', '/dev/null', '--max-time', '2', 'http://10.66.0.1:8080/']).code === 0, 15000)).toBe(true);
    const out = join(work, 'got');
    const t0 = performance.now();
    const r = exec(NS.c1, ['curl', '-sS', '--max-time', '90', '-o', out, '-w', '%{http_code}', 'http://10.66.0.1:8080/blob']);
    const secs = (performance.now() - t0) / 1000;
    expect(r.err).toBe('');
    expect(r.out).toBe('200');
    const got = await Bun.file(out).bytes();
    expect(got.length).toBe(blob.length);
    expect(createHash('sha256').update(got).digest('hex')).toBe(createHash('sha256').update(blob).digest('hex'));
    console.log(`tun: 16 MiB over HTTP through the tunnel in ${secs.toFixed(2)} s (${(16 / secs).toFixed(1)} MiB/s)`);
    http.kill('SIGKILL');
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
    // every read from either interface split into whole packets
    expect(srv.stderr).toMatch(/, 0 malformed reads/);
    expect(cli.p.stderr).toMatch(/, 0 malformed reads/);
  });

  test('two clients in two namespaces (native engine, protocol v1) reach each other through the server; a taken address is refused', async () => {
    const { p: srv, port } = await startServer();
    const a = await startClient(NS.c1, port, ['--tun', 'auto', '--engine', 'native']);
    const b = await startClient(NS.c2, port, ['--tun', '10.66.0.7/24', '--no-pfs']);
    expect([a.addr, b.addr]).toEqual(['10.66.0.2', '10.66.0.7']);
    await srv.waitFor(/is 10\.66\.0\.7 \(protocol v1\)/);
    expect(ping(NS.c1, '10.66.0.7', 5).received).toBe(5);
    expect(ping(NS.c2, '10.66.0.2', 5).received).toBe(5);
    const taken = vpnIn(NS.c1, ['connect', `${SERVER1}:${port}`, '--key', keyPath, '--tun', '10.66.0.7', '--tun-name', 'vt9']);
    expect(await taken.exit()).toBe(2);
    expect(taken.stderr).toMatch(/the server refused the session: address 10\.66\.0\.7 is in use/);
    expect(tunLinks(NS.c1)).toEqual([a.dev]);
    expect(ping(NS.c2, '10.66.0.2', 1).received).toBe(1);
    for (const p of [a.p, b.p, srv]) p.kill('SIGTERM');
    expect([await a.p.exit(), await b.p.exit(), await srv.exit()]).toEqual([0, 0, 0]);
  });

  test('killing a client removes its interface; the server forgets its route and hands the address out again', async () => {
    const { p: srv, port } = await startServer();
    const a = await startClient(NS.c1, port);
    const b = await startClient(NS.c2, port);
    expect([a.addr, b.addr]).toEqual(['10.66.0.2', '10.66.0.3']);
    expect(ping(NS.c2, '10.66.0.2', 1).received).toBe(1);
    a.p.kill('SIGKILL');
    await a.p.exit();
    expect(await until(() => tunLinks(NS.c1).length === 0, 5000)).toBe(true);
    await srv.waitFor(/client 10\.66\.0\.2 .* gone after .*; address released/);
    expect(ping(NS.c2, '10.66.0.2', 1, 1).received).toBe(0);
    await srv.waitFor(/dropped a packet for unknown destination 10\.66\.0\.2 \(from 10\.66\.0\.3\)/);
    const again = await startClient(NS.c1, port);
    expect(again.addr).toBe('10.66.0.2');
    expect(ping(NS.c2, '10.66.0.2', 3).received).toBe(3);
    // the server stops first: its clients get its CLOSE, remove their interfaces and exit 0 on their own
    srv.kill('SIGTERM');
    expect([await srv.exit(), await again.p.exit(), await b.p.exit()]).toEqual([0, 0, 0]);
    expect([...tunLinks(NS.c1), ...tunLinks(NS.c2), ...tunLinks(NS.srv)]).toEqual([]);
  });

  test('--max-conns holds in TUN mode too: a client over the limit is refused with one log line, and the next gets in once a slot is free', async () => {
    const { p: srv, port } = await startServer(['--max-conns', '1']);
    const a = await startClient(NS.c1, port);
    const over = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', keyPath, '--tun', 'auto']);
    expect(await over.exit()).not.toBe(0);
    expect(over.stderr).not.toContain('tunnel up');
    expect(tunLinks(NS.c2)).toEqual([]);
    await srv.waitFor(/connection limit reached \(--max-conns 1\): refusing new tunnel connections, first from 192\.168\.77\.6/);
    a.p.kill('SIGTERM');
    expect(await a.p.exit()).toBe(0);
    const b = await startClient(NS.c2, port);
    expect(b.addr).toBe('10.66.0.2');
    await Bun.sleep(1000);
    srv.kill('SIGTERM');
    expect([await srv.exit(), await b.p.exit()], srv.stderr + b.p.stderr).toEqual([0, 0]);
  });

  test('a wrong key: no tunnel address, no traffic, exit 3', async () => {
    const { p: srv, port } = await startServer();
    const bad = vpnIn(NS.c1, ['connect', `${SERVER1}:${port}`, '--key', wrongKeyPath, '--tun', 'auto']);
    expect(await bad.exit()).toBe(3);
    expect(bad.stderr).not.toContain('tunnel up');
    expect(bad.stderr).toMatch(/check that both ends use the same key/);
    expect(tunLinks(NS.c1)).toEqual([]);
    expect(exec(NS.c1, ['ip', '-4', '-o', 'addr']).out).not.toContain('10.66.');
    await srv.waitFor(/handshake failed 192\.168\.77\.2/);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(srv.stderr).not.toMatch(/ is 10\.66\./);
    expect(srv.stderr).toMatch(/tun stats: 0 packets from clients, 0 to clients/);
  });

  test('--route on either end sends a subnet through the tunnel; a route over the server keeps the tunnel outside', async () => {
    const { p: srv, port } = await startServer(['--route', '10.77.0.0/24']);
    // 128.0.0.0/1 covers the server's own address: the client pins a host route to it through the underlay
    const cli = await startClient(NS.c1, port, ['--tun', 'auto', '--route', '128.0.0.0/1']);
    expect(cli.p.stderr).toMatch(/routes 128\.0\.0\.0\/1 10\.77\.0\.0\/24/);
    const routes = exec(NS.c1, ['ip', '-4', 'route']).out;
    expect(routes).toContain(`10.77.0.0/24 dev ${cli.dev}`);
    expect(routes).toContain(`128.0.0.0/1 dev ${cli.dev}`);
    expect(routes).toContain(`${SERVER1} dev v0`);
    expect(ping(NS.c1, '10.77.0.1', 3).received).toBe(3);
    cli.p.kill('SIGTERM');
    expect(await cli.p.exit()).toBe(0);
    expect(exec(NS.c1, ['ip', '-4', 'route']).out).not.toContain(SERVER1 + ' ');
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
  });

  test('mode mismatches, a missing CAP_NET_ADMIN and a missing /dev/net/tun exit 2 with a clear message', async () => {
    // a TUN client to a stdio server
    const stdioPort = nextPort++;
    const stdioSrv = vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${stdioPort}`, '--key', keyPath]);
    await stdioSrv.waitFor(/^listening on /m);
    const tunCli = vpnIn(NS.c1, ['connect', `${SERVER1}:${stdioPort}`, '--key', keyPath, '--tun', 'auto']);
    expect(await tunCli.exit()).toBe(2);
    expect(tunCli.stderr).toMatch(/the server refused the session: this server is not in TUN mode .*serve --tun ADDR\/PREFIX/);
    expect(tunLinks(NS.c1)).toEqual([]);
    stdioSrv.kill('SIGKILL');
    // a TUN client to a port-forwarding server
    const fwdPort = nextPort++;
    const fwdSrv = vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${fwdPort}`, '--key', keyPath, '--forward', '127.0.0.1:9']);
    await fwdSrv.waitFor(/^listening on /m);
    const tunCli2 = vpnIn(NS.c1, ['connect', `${SERVER1}:${fwdPort}`, '--key', keyPath, '--tun', 'auto']);
    expect(await tunCli2.exit()).toBe(2);
    expect(tunCli2.stderr).toMatch(/the server refused the session: .*"tun" client cannot use it/);
    fwdSrv.kill('SIGKILL');
    // a stdio client to a TUN server
    const { p: srv, port } = await startServer();
    const stdioCli = vpnIn(NS.c1, ['connect', `${SERVER1}:${port}`, '--key', keyPath]);
    expect(await stdioCli.exit()).toBe(2);
    expect(stdioCli.stderr).toMatch(/this server runs in TUN mode .*connect with --tun auto/);
    // no CAP_NET_ADMIN: dropped from the bounding set, so the new program never has it
    const noCap = new Proc(['ip', 'netns', 'exec', NS.c1, 'setpriv', '--bounding-set', '-net_admin', 'bun', VPN, 'connect', `${SERVER1}:${port}`, '--key', keyPath, '--tun', 'auto']);
    expect(await noCap.exit()).toBe(2);
    expect(noCap.stderr).toMatch(/--tun needs root or the CAP_NET_ADMIN capability/);
    // no /dev/net/tun: hidden under an empty tmpfs in a private mount namespace
    const noDev = new Proc(['ip', 'netns', 'exec', NS.c1, 'unshare', '-m', 'sh', '-c', `mount -t tmpfs none /dev/net && exec bun ${VPN} connect ${SERVER1}:${port} --key ${keyPath} --tun auto`]);
    expect(await noDev.exit()).toBe(2);
    expect(noDev.stderr).toMatch(/\/dev\/net\/tun does not exist: load the tun module/);
    expect(tunLinks(NS.c1)).toEqual([]);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
  });
});
