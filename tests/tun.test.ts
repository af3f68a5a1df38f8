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
import { formatIPv4, formatIPv6, formatPrefix, parseAnyRoute, parseCidr, parseCidr6, parseIPv6, parsePrefix, parseRoute } from '../address.ts';
import { AddressPool, AddressPool6, answerTunClient, DEFAULT_MTU, expandOwnRoutes, InboundFilter, MAX_PEER_QUEUE, overlaps, readTunAnswer, RECORD_OVERHEAD_MAX, routePlan, TunRouter } from '../tun.ts';
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
  test('hands out the lowest free host address, skipping the server; a released one is kept for its previous holder, who gets it by asking', () => {
    const pool = new AddressPool(parseCidr('10.66.0.1/24', 't'));
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.2');
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.3');
    pool.release(ip('10.66.0.2'));
    expect(formatIPv4(pool.take(null) as number)).toBe('10.66.0.4'); // not the one just released
    expect(formatIPv4(pool.take(parseCidr('10.66.0.2/24', 't')) as number)).toBe('10.66.0.2'); // its holder, reconnecting
    const tiny = new AddressPool(parseCidr('10.67.0.1/30', 't')); // one client address only
    const only = tiny.take(null) as number;
    tiny.release(only);
    expect(tiny.take(null)).toBe(only); // kept for its holder only while another address is free
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

// ---- IPv6: syntax, pool, router, the client's filter, the CONFIG exchange ----

/** A minimal IPv6 header (RFC 8200 §3) and `extra` payload bytes from `src` to `dst` (next header UDP). */
function ipv6(src: string, dst: string, extra = 8): Uint8Array {
  const p = new Uint8Array(40 + extra);
  const v = new DataView(p.buffer);
  p[0] = 0x60;
  v.setUint16(4, extra);
  p[6] = 17;
  p[7] = 64;
  for (const [off, text] of [[8, src], [24, dst]] as const) {
    const n = parseIPv6(text)!;
    v.setBigUint64(off, n >> 64n);
    v.setBigUint64(off + 8, n & 0xffffffffffffffffn);
  }
  return p;
}
const ip6 = (t: string) => parseIPv6(t)!;
const pool6 = (t: string) => new AddressPool6(parseCidr6(t, 't'));

describe('IPv6 syntax', () => {
  test('reads RFC 4291 text and writes RFC 5952 text (vectors from RFC 5952 §4 and RFC 4291 §2.2)', () => {
    const vectors: [string, string][] = [
      ['2001:0db8:0000:0000:0000:0000:0000:0001', '2001:db8::1'], // §4.1 leading zeros, §4.2.1 the longest run
      ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'], // §4.2.3: the first of two equal runs
      ['2001:db8:0:1:1:1:1:1', '2001:db8:0:1:1:1:1:1'], // §4.2.2: one zero group is not shortened
      ['2001:DB8::AAAA', '2001:db8::aaaa'], // §4.3 lower case
      ['::', '::'],
      ['::1', '::1'],
      ['fd00:66::', 'fd00:66::'],
      ['1:2:3:4:5:6:7::', '1:2:3:4:5:6:7:0'],
      ['::ffff:10.66.0.1', '::ffff:a42:1'], // an embedded dotted quad (RFC 4291 §2.2 form 3)
    ];
    for (const [text, canonical] of vectors) expect(formatIPv6(ip6(text))).toBe(canonical);
    for (const bad of ['', ':', ':::', '1::2::3', '1:2:3:4:5:6:7:8:9', '12345::', 'g::1', '::1.2.3', ':1::', '1:2:3:4:5:6:7', 'fe80::1%eth0', '[::1]', '::1/64']) {
      expect(parseIPv6(bad)).toBeNull();
    }
  });

  test('parses IPv6 prefixes and routes next to IPv4 ones, naming what is wrong', () => {
    expect(parsePrefix('fd00:66::1/64', '--tun')).toEqual({ v6: true, addr: ip6('fd00:66::1'), prefix: 64 });
    expect(parsePrefix('10.66.0.1/24', '--tun')).toEqual({ addr: ip('10.66.0.1'), prefix: 24 });
    expect(parsePrefix('fd00:66::7', '--tun', -1)).toEqual({ v6: true, addr: ip6('fd00:66::7'), prefix: -1 });
    for (const bad of ['fd00:66::1/129', 'fd00:66::1', 'fd00::66::1/64', 'fd00:66::1/64/1', '10.66.0.1']) {
      expect(() => parsePrefix(bad, '--tun')).toThrow(/--tun: expected an IPv4 address and prefix such as 10\.66\.0\.1\/24, or an IPv6 one such as fd00:66::1\/64/);
    }
    expect(parseAnyRoute('2001:db8::/48')).toEqual({ v6: true, addr: ip6('2001:db8::'), prefix: 48 });
    expect(() => parseAnyRoute('2001:db8::1/48')).toThrow(/did you mean 2001:db8::\/48/);
    expect(parseAnyRoute('10.77.0.0/24')).toEqual({ addr: ip('10.77.0.0'), prefix: 24 });
  });
});

describe('the IPv6 address pool', () => {
  test('gives the address with the IPv4 host number when free, else the lowest free one, skipping the server', () => {
    const pool = pool6('fd00:66::1/64');
    expect(formatIPv6(pool.take(null, 7n) as bigint)).toBe('fd00:66::7');
    expect(formatIPv6(pool.take(null, 7n) as bigint)).toBe('fd00:66::2'); // 7 is taken now
    expect(formatIPv6(pool.take(null, 1n) as bigint)).toBe('fd00:66::3'); // 1 is the server's
    expect(formatIPv6(pool.take(null) as bigint)).toBe('fd00:66::4');
    pool.release(ip6('fd00:66::2'));
    expect(formatIPv6(pool.take(null) as bigint)).toBe('fd00:66::2');
  });

  test('gives a requested address once, and refuses it while in use, outside the subnet, with another prefix, or the subnet\'s first address', () => {
    const pool = pool6('fd00:66::1/64');
    expect(formatIPv6(pool.take(parseCidr6('fd00:66::abcd', 't', -1)) as bigint)).toBe('fd00:66::abcd');
    const refusals: [string, RegExp][] = [
      ['fd00:66::abcd/64', /address fd00:66::abcd is in use/],
      ['fd00:66::1/64', /server's own address/],
      ['fd00:66::/64', /not a host address/],
      ['fd00:67::5/64', /not a host address/],
      ['fd00:66::9/48', /IPv6 subnet is fd00:66::\/64/],
    ];
    for (const [req, re] of refusals) {
      const r = pool.take(parseCidr6(req, 't'));
      expect(r).toBeInstanceOf(VpnError);
      expect((r as VpnError).message).toMatch(re);
    }
  });

  test('says so when the subnet is full, and refuses a server address that leaves no room', () => {
    const pool = pool6('fd00:66::1/126');
    expect([pool.take(null), pool.take(null)].map((a) => formatIPv6(a as bigint))).toEqual(['fd00:66::2', 'fd00:66::3']);
    expect((pool.take(null, 3n) as VpnError).message).toMatch(/no free address left in the tunnel subnet fd00:66::\/126/);
    expect(() => pool6('fd00:66::1/127')).toThrow(/between \/1 and \/126/);
    expect(() => pool6('fd00:66::/64')).toThrow(/Subnet-Router anycast/);
  });
});

describe('the router, IPv6 and dual-stack', () => {
  let wasQuiet = false;
  beforeAll(() => {
    wasQuiet = log.quiet;
    log.quiet = true;
  });
  afterAll(() => void (log.quiet = wasQuiet));

  function setup() {
    const pools = { v4: new AddressPool(parseCidr('10.66.0.1/24', 't')), v6: pool6('fd00:66::1/64') };
    const toKernel: Uint8Array[] = [];
    const router = new TunRouter(pools, { write: (p) => (toKernel.push(p.slice()), true) });
    const peer = () => {
      const got: Uint8Array[] = [];
      return { got, queued: 0, writeRecord: (p: Uint8Array) => (got.push(p.slice()), true) };
    };
    const a = peer();
    const b = peer();
    const A = { v4: ip('10.66.0.2'), v6: ip6('fd00:66::2') };
    const B = { v4: ip('10.66.0.3'), v6: ip6('fd00:66::3') };
    for (const [addrs, p] of [[A, a], [B, b]] as const) {
      router.attach(addrs.v4, p);
      router.attach(addrs.v6, p);
    }
    return { router, toKernel, a, b, A, B };
  }

  test('carries IPv6 from one client to another, and to the kernel for the server or beyond the subnet; IPv4 still works beside it', () => {
    const { router, toKernel, a, b, A } = setup();
    router.fromClient(A, ipv6('fd00:66::2', 'fd00:66::3'));
    router.fromClient(A, ipv4('10.66.0.2', '10.66.0.3'));
    expect(b.got).toHaveLength(2);
    router.fromClient(A, ipv6('fd00:66::2', 'fd00:66::1'));
    router.fromClient(A, ipv6('fd00:66::2', '2001:db8:77::1'));
    expect(toKernel).toHaveLength(2);
    router.fromInterface(ipv6('fd00:66::1', 'fd00:66::2'));
    expect(a.got).toHaveLength(1);
    expect(router.stats).toMatchObject({ unknown: 0, spoofed: 0, malformed: 0, otherFamily: 0 });
  });

  test('drops an IPv6 packet whose source is not the sending client\'s IPv6 address', () => {
    const { router, toKernel, b, A } = setup();
    router.fromClient(A, ipv6('fd00:66::3', 'fd00:66::1')); // another client's
    router.fromClient(A, ipv6('fd00:66::99', 'fd00:66::3'));
    router.fromClient(A, ipv6('2001:db8::1', '2001:db8:77::1'));
    router.fromClient(A, ipv6('fe80::2', 'fd00:66::1'));
    router.fromClient({ v4: A.v4, v6: null }, ipv6('fd00:66::2', 'fd00:66::1')); // a client that has no IPv6 address
    expect(router.stats.spoofed).toBe(4);
    expect(router.stats.otherFamily).toBe(1);
    expect(b.got).toHaveLength(0);
    expect(toKernel).toHaveLength(0);
  });

  test('drops and counts IPv6 for unknown addresses of the subnet, multicast and link-local destinations, and a wrong length', () => {
    const { router, toKernel, A } = setup();
    for (const dst of ['fd00:66::99', 'ff02::1', 'ff02::16', 'ff05::2', 'fe80::1']) router.fromClient(A, ipv6('fd00:66::2', dst));
    router.fromInterface(ipv6('fd00:66::1', 'fd00:66::99'));
    expect(router.stats.unknown).toBe(6);
    router.fromClient(A, ipv6('fd00:66::2', 'fd00:66::1').subarray(0, 44));
    expect(router.stats.malformed).toBe(1);
    expect(toKernel).toHaveLength(0);
  });

  test('an IPv6-only router drops IPv4 as a family it does not carry', () => {
    const toKernel: Uint8Array[] = [];
    const router = new TunRouter({ v4: null, v6: pool6('fd00:66::1/64') }, { write: (p) => (toKernel.push(p), true) });
    router.fromClient({ v4: null, v6: ip6('fd00:66::2') }, ipv4('10.66.0.2', '10.66.0.1'));
    router.fromInterface(ipv4('10.66.0.1', '10.66.0.2'));
    expect(router.stats.otherFamily).toBe(2);
    router.fromClient({ v4: null, v6: ip6('fd00:66::2') }, ipv6('fd00:66::2', 'fd00:66::1'));
    expect(toKernel).toHaveLength(1);
  });
});

describe("the client's inbound filter", () => {
  let wasQuiet = false;
  beforeAll(() => {
    wasQuiet = log.quiet;
    log.quiet = true;
  });
  afterAll(() => void (log.quiet = wasQuiet));

  const dual = () =>
    new InboundFilter({ v4: ip('10.66.0.2'), v6: ip6('fd00:66::2') }, [parseCidr('10.66.0.0/24', 't'), parseRoute('10.77.0.0/24')], [parseCidr6('fd00:66::/64', 't'), parseCidr6('2001:db8:77::/48', 't')]);

  test('lets in packets for its own addresses from the tunnel subnet or an accepted route, of both families', () => {
    const f = dual();
    for (const p of [ipv4('10.66.0.1', '10.66.0.2'), ipv4('10.66.0.3', '10.66.0.2'), ipv4('10.77.0.1', '10.66.0.2'), ipv6('fd00:66::1', 'fd00:66::2'), ipv6('2001:db8:77::1', 'fd00:66::2')]) {
      expect(f.check(p)).toBe(true);
    }
    expect(f.stats.accepted).toBe(5);
  });

  test('drops a forged source, another destination (multicast and broadcast included), a wrong length, and a family the tunnel does not carry', () => {
    const f = dual();
    const drops = [
      ipv6('2001:db8:bad::1', 'fd00:66::2'), // source outside the subnet and every route
      ipv6('fe80::1', 'fd00:66::2'),
      ipv4('198.18.0.1', '10.66.0.2'),
      ipv6('fd00:66::1', 'fd00:66::3'), // not our address
      ipv6('fd00:66::1', 'ff02::1'), // no multicast, not even link-local: no NDP or MLD runs on a TUN link
      ipv4('10.66.0.1', '10.66.0.255'),
      ipv4('10.66.0.1', '224.0.0.1'),
      ipv6('fd00:66::1', 'fd00:66::2').subarray(0, 44),
      ipv4('10.66.0.1', '10.66.0.2').subarray(0, 24),
    ];
    for (const p of drops) expect(f.check(p)).toBe(false);
    expect(f.stats).toEqual({ accepted: 0, malformed: 2, otherFamily: 0, notForUs: 4, badSource: 3 });
    const only4 = new InboundFilter({ v4: ip('10.66.0.2'), v6: null }, [parseCidr('10.66.0.0/24', 't')], []);
    expect(only4.check(ipv6('fd00:66::1', 'fd00:66::2'))).toBe(false);
    expect(only4.stats.otherFamily).toBe(1);
  });
});

describe('the CONFIG exchange, both families (PROTOCOL.md §8.5)', () => {
  const offer = { mtu: 1371, routes: [parseRoute('10.77.0.0/24')], routes6: [parseCidr6('2001:db8:77::/48', 't')] };
  const pools = () => ({ v4: new AddressPool(parseCidr('10.66.0.1/24', 't')), v6: pool6('fd00:66::1/64') });

  test('an old, IPv4-only client (no families field) gets its IPv4 address and nothing of IPv6 from a dual-stack server', () => {
    const p = pools();
    const r = answerTunClient({ mode: 'tun', request: null }, p, offer);
    if (r instanceof VpnError) throw r;
    expect(r.answer).toEqual({ mode: 'tun', address: '10.66.0.2/24', server: '10.66.0.1', routes: ['10.77.0.0/24'], mtu: 1371 });
    expect(r.addrs).toEqual({ v4: ip('10.66.0.2'), v6: null });
    expect(p.v6.inUse(ip6('fd00:66::2'))).toBe(false);
  });

  test('a dual-stack client gets both, the IPv6 one with the IPv4 host number, and may ask for either', () => {
    const p = pools();
    const r = answerTunClient({ mode: 'tun', request: '10.66.0.7', families: ['ipv4', 'ipv6'] }, p, offer);
    if (r instanceof VpnError) throw r;
    expect(r.answer).toMatchObject({ address: '10.66.0.7/24', address6: 'fd00:66::7/64', server6: 'fd00:66::1', routes6: ['2001:db8:77::/48'], mtu: 1371 });
    const r2 = answerTunClient({ mode: 'tun', request: null, request6: 'fd00:66::beef', families: ['ipv4', 'ipv6', 'ipx'] }, p, offer);
    if (r2 instanceof VpnError) throw r2;
    expect(r2.answer).toMatchObject({ address: '10.66.0.2/24', address6: 'fd00:66::beef/64' });
  });

  test('refuses what it cannot give, and then holds no address for the client', () => {
    const p = pools();
    answerTunClient({ mode: 'tun', request6: 'fd00:66::7', families: ['ipv6'] }, p, offer);
    const taken = answerTunClient({ mode: 'tun', request6: 'fd00:66::7', families: ['ipv4', 'ipv6'] }, p, offer);
    expect((taken as VpnError).message).toMatch(/address fd00:66::7 is in use/);
    expect(p.v4.inUse(ip('10.66.0.2'))).toBe(false); // its IPv4 address was given back
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ mode: 'tun', request6: 7 }, /requested IPv6 address must be a string or null/],
      [{ mode: 'tun', request6: 'fd00::66::1' }, /cannot read the requested IPv6 address/],
      [{ mode: 'tun', families: 'ipv6' }, /families must be a list/],
    ];
    for (const [peer, re] of cases) expect((answerTunClient(peer, p, offer) as VpnError).message).toMatch(re);
    const only6 = { v4: null, v6: pool6('fd00:66::1/64') };
    expect((answerTunClient({ mode: 'tun', request: null }, only6, offer) as VpnError).message).toMatch(/this tunnel carries IPv6 \(fd00:66::\/64\) only, and the client asked for ipv4/);
    const only4 = { v4: new AddressPool(parseCidr('10.66.0.1/24', 't')), v6: null };
    expect((answerTunClient({ mode: 'tun', request6: 'fd00:66::7' }, only4, offer) as VpnError).message).toMatch(/carries no IPv6/);
  });

  test('the client checks the answer field by field: IPv6 needs an MTU of 1280 and must have been asked for', () => {
    const ok = { mode: 'tun', address6: 'fd00:66::2/64', server6: 'fd00:66::1', routes6: ['2001:db8:77::/48'], mtu: 1280 };
    const a = readTunAnswer(ok, true);
    expect(a.v4).toBeNull();
    expect(a.v6!.address).toEqual({ v6: true, addr: ip6('fd00:66::2'), prefix: 64 });
    const bad: [Record<string, unknown>, boolean, RegExp][] = [
      [{ ...ok, mtu: 1279 }, true, /mtu must be at least 1280 with IPv6, got 1279/],
      [ok, false, /address6 was sent, but this client asked for IPv4 only/],
      [{ ...ok, server6: '10.66.0.1' }, true, /server6 must be an IPv6 address/],
      [{ ...ok, routes6: ['10.77.0.0/24'] }, true, /route6: expected an IPv6 address/],
      [{ ...ok, routes6: ['2001:db8:77::1/48'] }, true, /host bits set/],
      [{ ...ok, routes6: Array(33).fill('2001:db8::/32') }, true, /more than 32 routes6/],
      [{ ...ok, address6: 'fd00:66::2/128' }, true, /prefix from \/64 to \/126/],
      [{ mode: 'tun', mtu: 1371 }, true, /address or address6 is required/],
    ];
    for (const [peer, asked6, re] of bad) {
      expect(() => readTunAnswer(peer, asked6)).toThrow(/the server sent a TUN configuration this client cannot use/);
      expect(() => readTunAnswer(peer, asked6)).toThrow(re);
    }
  });

  test('the client takes only a sane tunnel address: IPv4 /8 to /30, IPv6 /64 to /126, a host address of the subnet the answer states, with the server in it', () => {
    const ok4 = { mode: 'tun', address: '10.66.0.2/24', server: '10.66.0.1', mtu: 1371 };
    const ok6 = { mode: 'tun', address6: 'fd00:66::2/64', server6: 'fd00:66::1', mtu: 1371 };
    expect(readTunAnswer({ ...ok4, address: '10.0.0.2/8', server: '10.0.0.1' }, true).v4!.address.prefix).toBe(8);
    expect(readTunAnswer({ ...ok4, address: '10.66.0.2/30' }, true).v4!.address.prefix).toBe(30);
    expect(readTunAnswer({ ...ok6, address6: 'fd00:66::2/126' }, true).v6!.address.prefix).toBe(126);
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ ...ok4, address: '10.66.0.2/7', server: '10.66.0.1' }, /address needs a prefix from \/8 to \/30, got 10\.66\.0\.2\/7/],
      [{ ...ok4, address: '10.66.0.2/31' }, /address needs a prefix from \/8 to \/30/],
      [{ ...ok4, address: '10.66.0.2/32' }, /address needs a prefix from \/8 to \/30/],
      [{ ...ok4, address: '10.66.0.0/24' }, /not a host address of its subnet/],
      [{ ...ok4, address: '10.66.0.255/24' }, /not a host address of its subnet/],
      [{ ...ok4, server: '198.51.100.1' }, /server 198\.51\.100\.1 is not a host address of the subnet 10\.66\.0\.0\/24/],
      [{ ...ok4, server: '10.66.0.2' }, /is the server's own/],
      [{ ...ok6, address6: 'fd00:66::2/48' }, /address6 needs a prefix from \/64 to \/126, got fd00:66::2\/48/],
      [{ ...ok6, address6: 'fd00:66::2/127' }, /address6 needs a prefix from \/64 to \/126/],
      [{ ...ok6, address6: 'fd00:66::/64' }, /Subnet-Router anycast/],
      [{ ...ok6, server6: 'fd00:67::1' }, /server6 fd00:67::1 is not a host address of the subnet fd00:66::\/64/],
    ];
    for (const [peer, re] of bad) expect(() => readTunAnswer(peer, true)).toThrow(re);
  });

  test("the client's route policy: pushed routes only when accepted, never a default route or a wide one, never one overlapping the host's routes, addresses or the tunnel; the user's 0.0.0.0/0 and ::/0 go in as halves; an overlapping tunnel address is refused", () => {
    const answer = readTunAnswer(
      {
        mode: 'tun', address: '10.66.0.2/24', server: '10.66.0.1', address6: 'fd00:66::2/64', server6: 'fd00:66::1', mtu: 1371,
        routes: ['0.0.0.0/0', '198.51.100.0/24', '198.51.0.0/16', '10.77.0.0/24', '10.66.0.0/16', '0.0.0.0/1', '172.16.5.0/24'],
        routes6: ['::/0', '2001:db8:51::/64', '2001:db8:77::/48', '2000::/3'],
      },
      true,
    );
    const host = {
      routes: [
        { prefix: parsePrefix('0.0.0.0/0', 't'), dev: 'lan0' },
        { prefix: parsePrefix('198.51.100.0/24', 't'), dev: 'lan0' },
        { prefix: parsePrefix('::/0', 't'), dev: 'lan0' },
        { prefix: parsePrefix('2001:db8:51::/64', 't'), dev: 'lan0' },
        { prefix: parsePrefix('172.16.5.0/24', 't'), dev: '' },
      ],
      addrs: [{ prefix: parsePrefix('127.0.0.1/8', 't'), dev: 'lo' }, { prefix: parsePrefix('198.51.100.7/24', 't'), dev: 'lan0' }],
    };
    const fmt = (xs: { prefix?: unknown }[] | unknown[]) => (xs as Parameters<typeof formatPrefix>[0][]).map(formatPrefix);
    const off = routePlan(answer, [], false, host);
    expect(fmt(off.install)).toEqual([]);
    expect(off.ignored.length).toBe(11);
    const on = routePlan(answer, [], true, host);
    expect(fmt(on.install)).toEqual(['10.77.0.0/24', '2001:db8:77::/48']);
    const why = Object.fromEntries(on.skipped.map((k) => [formatPrefix(k.route), k.why]));
    expect(why['0.0.0.0/0']).toMatch(/a default route is never taken from a server/);
    expect(why['::/0']).toMatch(/a default route is never taken from a server/);
    expect(why['198.51.100.0/24']).toMatch(/overlaps this host's address 198\.51\.100\.7\/24 on lan0/);
    expect(why['198.51.0.0/16']).toMatch(/overlaps this host's/);
    expect(why['2001:db8:51::/64']).toMatch(/overlaps this host's route 2001:db8:51::\/64 via lan0/);
    expect(why['10.66.0.0/16']).toMatch(/overlaps the tunnel subnet 10\.66\.0\.0\/24/);
    expect(why['0.0.0.0/1']).toMatch(/wider than \/8/);
    expect(why['2000::/3']).toMatch(/wider than \/16/);
    expect(why['172.16.5.0/24']).toMatch(/overlaps this host's route 172\.16\.5\.0\/24/);
    expect(on.skipped.length).toBe(9);
    // the user's own: everything through the tunnel as two halves per family, without touching the default routes
    const all = routePlan(answer, [parseAnyRoute('0.0.0.0/0'), parseAnyRoute('::/0'), parseAnyRoute('0.0.0.0/0')], false, host);
    expect(fmt(all.install)).toEqual(['0.0.0.0/1', '128.0.0.0/1', '::/1', '8000::/1']);
    expect(fmt(expandOwnRoutes([parseAnyRoute('10.1.0.0/16')]))).toEqual(['10.1.0.0/16']);
    // a tunnel subnet that overlaps the host's LAN (or any route but the default) is refused
    const lan = readTunAnswer({ mode: 'tun', address: '198.51.100.50/24', server: '198.51.100.49', mtu: 1371 }, false);
    expect(() => routePlan(lan, [], false, host)).toThrow(/the server handed out a tunnel address in 198\.51\.100\.0\/24, which overlaps this host's address 198\.51\.100\.7\/24 on lan0; refusing it/);
    const wide = readTunAnswer({ mode: 'tun', address: '172.16.0.2/12', server: '172.16.0.1', mtu: 1371 }, false);
    expect(() => routePlan(wide, [], false, host)).toThrow(/overlaps this host's route 172\.16\.5\.0\/24/);
    expect(overlaps(parsePrefix('10.0.0.0/8', 't'), parsePrefix('10.66.0.0/24', 't'))).toBe(true);
    expect(overlaps(parsePrefix('10.0.0.0/8', 't'), parsePrefix('11.0.0.0/8', 't'))).toBe(false);
    expect(overlaps(parsePrefix('10.0.0.0/8', 't'), parsePrefix('::/0', 't'))).toBe(false);
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

  test('IPv6 in the tunnel refuses an MTU below 1280 with a clear sentence; the --tun and --route flags take at most one prefix of each family that the tunnel carries', async () => {
    const cases: [string[], RegExp][] = [
      [['serve', '--tun', 'fd00:66::1/64', '--mtu', '1000'], /--mtu 1000 is below 1280, the smallest MTU IPv6 allows \(RFC 8200\), and --tun fd00:66::1\/64 puts IPv6 in the tunnel: use --mtu 1280 or more/],
      [['serve', '--tun', '10.66.0.1/24', '--tun', 'fd00:66::1/64', '--mtu', '1279'], /--mtu 1279 is below 1280/],
      [['connect', '--tun', 'fd00:66::7', '--mtu', '1000'], /--mtu 1000 is below 1280, .*--tun fd00:66::7 asks for IPv6/],
      [['connect', '--tun', 'auto', '--mtu', '1000', '--route', '2001:db8::/48'], /--route 2001:db8::\/48 needs IPv6 in the tunnel/],
      [['serve', '--tun', '10.66.0.1/24', '--tun', '10.67.0.1/24'], /--tun: one IPv4 and one IPv6 address at most, got two IPv4 ones/],
      [['serve', '--tun', '10.66.0.1/24', '--route', '2001:db8::/48'], /--route 2001:db8::\/48 is IPv6, but the tunnel carries no IPv6/],
      [['serve', '--tun', 'fd00:66::1/64', '--route', '10.77.0.0/24'], /--route 10\.77\.0\.0\/24 is IPv4, but the tunnel carries no IPv4/],
      [['serve', '--tun', 'fd00:66::1'], /--tun: expected an IPv4 address and prefix .* or an IPv6 one such as fd00:66::1\/64/],
      [['connect', '--tun', 'auto', '--tun', 'fd00:66::7'], /--tun auto asks for every address the server has; give it alone/],
      [['connect', '--tun', 'auto', '--route', '2001:db8::1/48'], /did you mean 2001:db8::\/48/],
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
const NS = { srv: spaces.name('s'), c1: spaces.name('a'), c2: spaces.name('b'), c3: spaces.name('c'), lan: spaces.name('l') };
const SERVER3 = '192.168.77.9'; // the server, seen from c3 (a client with a LAN and default routes of its own)
const SERVER1 = '192.168.77.1'; // the server, seen from c1
const SERVER2 = '192.168.77.5'; // the server, seen from c2
const SERVER1_6 = 'fd00:77::1'; // the server over IPv6, seen from c1

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
v6 = ':' in dst  # ICMPv6 (RFC 4443): echo 128/129, the kernel fills in the checksum and strips the IPv6 header
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) if v6 else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
req, rep = (128, 129) if v6 else (8, 0)
ident = os.getpid() & 0xffff
rtts = []
for seq in range(count):
    payload = os.urandom(56)
    hdr = struct.pack('!BBHHH', req, 0, 0, ident, seq)
    pkt = struct.pack('!BBHHH', req, 0, 0 if v6 else csum(hdr + payload), ident, seq) + payload
    t0 = time.perf_counter(); s.sendto(pkt, (dst, 0)); deadline = t0 + timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0: break
        s.settimeout(left)
        try: data, addr = s.recvfrom(4096)
        except socket.timeout: break
        ihl = 0 if v6 else (data[0] & 15) * 4
        typ, code, _, rid, rseq = struct.unpack('!BBHHH', data[ihl:ihl + 8])
        if typ == rep and rid == ident and rseq == seq and addr[0] == dst and data[ihl + 8:] == payload:
            rtts.append((time.perf_counter() - t0) * 1000); break
print(json.dumps({'sent': count, 'received': len(rtts), 'rtts_ms': rtts}))
`;

/**
 * \`udp.py recv ADDR PORT SECONDS\`: print "ready", then the payloads that arrived within SECONDS (a JSON list).
 * \`udp.py send SRC DST PORT TEXT\`: one UDP datagram with a hand-made IP header, so with any source address we like
 * (a raw IPPROTO_RAW socket: the kernel takes our header as it is).
 */
const UDP_PY = `
import json, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b'\\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
cmd = sys.argv[1]
if cmd == 'recv':
    addr, port, secs = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print('ready', file=sys.stderr, flush=True)
    got, deadline = [], time.time() + secs
    while True:
        left = deadline - time.time()
        if left <= 0: break
        s.settimeout(left)
        try: data, _ = s.recvfrom(2048)
        except socket.timeout: break
        got.append(data.decode())
    print(json.dumps(got), flush=True)
else:
    src, dst, port, payload = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].encode()
    n = 8 + len(payload)
    if ':' in dst:
        s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
        c = csum(s6 + d6 + struct.pack('!I3xB', n, 17) + struct.pack('!HHHH', 4000, port, n, 0) + payload) or 0xffff
        pkt = struct.pack('!IHBB', 6 << 28, n, 17, 64) + s6 + d6 + struct.pack('!HHHH', 4000, port, n, c) + payload
        socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(pkt, (dst, 0))
    else:
        s4, d4 = socket.inet_aton(src), socket.inet_aton(dst)
        c = csum(s4 + d4 + struct.pack('!xBH', 17, n) + struct.pack('!HHHH', 4000, port, n, 0) + payload) or 0xffff
        hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + n, 0, 0, 64, 17, 0, s4, d4)
        hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(hdr + struct.pack('!HHHH', 4000, port, n, c) + payload, (dst, 0))
`;

/** Listen for UDP on ADDR:PORT in \`ns\` for \`secs\`; \`done\` resolves with the payloads that arrived. */
async function udpListen(ns: string, addr: string, port: number, secs = 3): Promise<{ done: Promise<string[]> }> {
  const p = new Proc(inNetns(ns, ['python3', '-u', join(work, 'udp.py'), 'recv', addr, String(port), String(secs)]));
  await p.waitFor(/^ready$/m);
  return {
    done: (async () => {
      expect(await p.exit()).toBe(0);
      return JSON.parse((await p.stdout).trim().split('\n').pop()!);
    })(),
  };
}

/** Send one UDP datagram from \`ns\` with source address \`src\`, whatever the namespace's own addresses are. */
function udpForge(ns: string, src: string, dst: string, port: number, text: string): void {
  const r = exec(ns, ['python3', join(work, 'udp.py'), 'send', src, dst, String(port), text]);
  if (r.code !== 0) throw new Error(`udp.py send failed: ${r.err}`);
}

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

/** A TUN server in NS.srv with these --tun values (and `extra`), listening on `listen` (port added). */
async function startServerWith(tun: string[], extra: string[] = [], listen = '0.0.0.0'): Promise<{ p: Proc; port: number }> {
  const port = nextPort++;
  const where = listen.includes(':') ? `[${listen}]:${port}` : `${listen}:${port}`;
  const p = vpnIn(NS.srv, ['serve', '--listen', where, ...tun.flatMap((t) => ['--tun', t]), '--key', keyPath, ...extra]);
  await p.waitFor(/^listening on /m);
  return { p, port };
}

/** A TUN client in `ns` against `server` (HOST:PORT); resolves with its interface and the rest of its "tunnel up" line. */
async function startClientAt(ns: string, server: string, extra: string[] = ['--tun', 'auto']) {
  const p = vpnIn(ns, ['connect', server, '--key', keyPath, ...extra]);
  const m = await p.waitFor(/^tunnel up: (\S+) (.*)$/m);
  return { p, dev: m[1]!, line: m[2]! };
}

const DUAL = ['10.66.0.1/24', 'fd00:66::1/64'];

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

describe.skipIf(skipReason !== null)('TUN across network namespaces', () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'vpn-tun-'));
    writeFileSync(join(work, 'ping.py'), PING_PY);
    writeFileSync(join(work, 'udp.py'), UDP_PY);
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
    // the same in IPv6, and an IPv6 underlay between srv and c1 for the outer connection
    spaces.address(NS.srv, 'lo', '2001:db8:77::1/128');
    spaces.address(NS.srv, 'v1', `${SERVER1_6}/64`);
    spaces.address(NS.c1, 'v0', 'fd00:77::2/64');
    // srv ─ v3 ══ v0 ─ c3 (192.168.77.8/30), and c3's own LAN: c3 ─ lan0 ══ gw0 ─ lan, 198.51.100.0/24 and
    // 2001:db8:51::/64, with c3's default routes via the LAN's gateway (.1) — the routes a VPN must not take away
    spaces.veth(NS.srv, 'v3', NS.c3, 'v0', { a: `${SERVER3}/30`, b: '192.168.77.10/30' });
    spaces.veth(NS.c3, 'lan0', NS.lan, 'gw0', { a: '198.51.100.7/24', b: '198.51.100.1/24' });
    spaces.address(NS.c3, 'lan0', '2001:db8:51::7/64');
    spaces.address(NS.lan, 'gw0', '2001:db8:51::1/64');
    must(['ip', '-n', NS.c3, '-4', 'route', 'add', 'default', 'via', '198.51.100.1']);
    must(['ip', '-n', NS.c3, '-6', 'route', 'add', 'default', 'via', '2001:db8:51::1']);
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

  test('killing a client removes its interface; the server forgets its route and keeps the address for it; a stopped server ends a --no-reconnect client with status 1, and the others wait for it', async () => {
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
    const again = await startClient(NS.c1, port, ['--tun', '10.66.0.2', '--no-reconnect']); // asks for it by name
    expect(again.addr).toBe('10.66.0.2');
    expect(ping(NS.c2, '10.66.0.2', 3).received).toBe(3);
    // The server stops first: its clients get its CLOSE. One without reconnecting exits 1 saying so (a service
    // manager restarts it); the other keeps its interface and waits for the server to come back.
    srv.kill('SIGTERM');
    expect([await srv.exit(), await again.p.exit()]).toEqual([0, 1]);
    expect(again.p.stderr).toMatch(/the server closed the tunnel \(it stopped or is restarting\)/);
    expect(again.p.stderr).not.toMatch(/may be incomplete/);
    await b.p.waitFor(/reconnecting to /);
    expect(tunLinks(NS.c2)).toEqual([b.dev]);
    b.p.kill('SIGTERM');
    expect(await b.p.exit()).toBe(0);
    expect([...tunLinks(NS.c1), ...tunLinks(NS.c2), ...tunLinks(NS.srv)]).toEqual([]);
  });

  test('a TUN server restarted twice (SIGTERM, then SIGKILL) under ping and a 64 MiB download: the client keeps its interface and address, reconnects within the backoff bound, and the download completes byte-exact', async () => {
    const port = nextPort++;
    const serve = () => vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${port}`, '--tun', '10.66.0.1/24', '--key', keyPath, '--engine', 'native']);
    let srv = serve();
    await srv.waitFor(/^listening on /m);
    const cli = await startClient(NS.c1, port, ['--tun', 'auto', '--engine', 'native']);
    expect(cli.addr).toBe('10.66.0.2');
    const blob = randomBytes(64 << 20);
    const www = join(work, 'www-restart');
    rmSync(www, { recursive: true, force: true });
    require('node:fs').mkdirSync(www);
    writeFileSync(join(www, 'blob'), blob);
    // Bound to every address of the server's namespace, so it serves again when the restarted server's interface
    // comes back with 10.66.0.1.
    const http = new Proc(inNetns(NS.srv, ['python3', '-u', '-m', 'http.server', '8081', '--bind', '0.0.0.0', '--directory', www]));
    try {
      expect(await until(() => exec(NS.c1, ['curl', '-s', '-o', '/dev/null', '--max-time', '2', 'http://10.66.0.1:8081/']).code === 0, 15000)).toBe(true);
      // The interface must never disappear: sampled every 50 ms for the whole test.
      let gone = 0;
      const watch = setInterval(() => {
        if (!tunLinks(NS.c1).includes(cli.dev)) gone++;
      }, 50);
      const out = join(work, 'got-restart');
      const curl = new Proc(inNetns(NS.c1, ['curl', '-sS', '--fail', '--retry', '30', '--retry-all-errors', '--retry-delay', '1', '--retry-max-time', '100', '--limit-rate', '8M', '-o', out, 'http://10.66.0.1:8081/blob']));
      const pinger = new Proc(inNetns(NS.c1, ['ping', '-n', '-i', '0.2', '-w', '60', '10.66.0.1']));
      const backUps = () => (cli.p.stderr.match(/^tunnel back up: \S+ 10\.66\.0\.2\/24/gm) ?? []).length;
      await Bun.sleep(1500);
      // 1: a graceful stop (the client gets the server's CLOSE), and a new server on the same port
      srv.kill('SIGTERM');
      expect(await srv.exit()).toBe(0);
      srv = serve();
      await srv.waitFor(/^listening on /m);
      let t0 = Date.now();
      expect(await until(() => backUps() >= 1, 12_000), cli.p.stderr).toBe(true);
      const firstMs = Date.now() - t0;
      await Bun.sleep(1500);
      // 2: a crash, and a new server
      srv.kill('SIGKILL');
      await srv.exit();
      srv = serve();
      await srv.waitFor(/^listening on /m);
      t0 = Date.now();
      expect(await until(() => backUps() >= 2, 12_000), cli.p.stderr).toBe(true);
      const secondMs = Date.now() - t0;
      expect(await curl.exit(120_000), curl.stderr).toBe(0);
      clearInterval(watch);
      const got = await Bun.file(out).bytes();
      expect(got.length).toBe(blob.length);
      expect(createHash('sha256').update(got).digest('hex')).toBe(createHash('sha256').update(blob).digest('hex'));
      expect(gone, 'the client interface disappeared').toBe(0);
      expect(ping(NS.c1, '10.66.0.1', 3).received).toBe(3);
      expect(cli.p.stderr).toMatch(/the server closed the tunnel \(it stopped or is restarting\); reconnecting/);
      expect(cli.p.stderr).toMatch(/the connection to the server was lost .*; reconnecting/);
      expect(cli.p.stderr).not.toMatch(/may be incomplete|modified in transit/);
      console.log(`tun: reconnected ${firstMs} ms after a graceful restart, ${secondMs} ms after a crash`);
      pinger.kill('SIGINT');
      await pinger.exit();
    } finally {
      http.kill('SIGKILL');
    }
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(tunLinks(NS.c1)).toEqual([]);
  }, 180_000);

  test('--max-conns holds in TUN mode too: a client over the limit is refused with one log line, and the next gets in once a slot is free', async () => {
    const { p: srv, port } = await startServer(['--max-conns', '1']);
    const a = await startClient(NS.c1, port);
    const over = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', keyPath, '--tun', 'auto', '--no-reconnect']);
    expect(await over.exit()).not.toBe(0);
    expect(over.stderr).not.toContain('tunnel up');
    expect(tunLinks(NS.c2)).toEqual([]);
    await srv.waitFor(/connection limit reached \(--max-conns 1\): refusing new tunnel connections, first from 192\.168\.77\.6/);
    a.p.kill('SIGTERM');
    expect(await a.p.exit()).toBe(0);
    const b = await startClient(NS.c2, port);
    expect(b.addr).toBe('10.66.0.3'); // 10.66.0.2 is kept for the client that had it
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    await b.p.waitFor(/the server closed the tunnel \(it stopped or is restarting\); reconnecting/);
    b.p.kill('SIGTERM'); // a signal while it waits to reconnect ends it at once, cleanly
    expect(await b.p.exit(5000)).toBe(0);
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
    const cli = await startClient(NS.c1, port, ['--tun', 'auto', '--route', '128.0.0.0/1', '--accept-routes']);
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
  // ---- IPv6 inside the tunnel (dual-stack, IPv6-only) and IPv6 underneath ----

  test('dual-stack: each client gets one address of each family (fd00:66::N next to 10.66.0.N), ping -6 crosses the tunnel both ways and between clients, an unknown IPv6 destination is dropped and counted', async () => {
    const { p: srv, port } = await startServerWith(DUAL);
    await srv.waitFor(/tun \S+ up: 10\.66\.0\.1\/24 fd00:66::1\/64, mtu 1371/);
    const a = await startClient(NS.c1, port);
    const b = await startClient(NS.c2, port, ['--tun', '10.66.0.7']);
    expect([a.addr, b.addr]).toEqual(['10.66.0.2', '10.66.0.7']);
    expect(a.p.stderr).toMatch(/tunnel up: \S+ 10\.66\.0\.2\/24 fd00:66::2\/64, server 10\.66\.0\.1 fd00:66::1, mtu 1371/);
    expect(b.p.stderr).toMatch(/tunnel up: \S+ 10\.66\.0\.7\/24 fd00:66::7\/64, server 10\.66\.0\.1 fd00:66::1/);
    await srv.waitFor(/client 192\.168\.77\.2:\d+ is 10\.66\.0\.2 and fd00:66::2 \(protocol v2\)/);
    const addrs = exec(NS.c1, ['ip', '-6', '-o', 'addr', 'show', 'dev', a.dev]).out;
    expect(addrs).toContain('inet6 fd00:66::2/64');
    expect(addrs).not.toContain('fe80'); // no link-local address: a point-to-point TUN link needs none
    const there = ping(NS.c1, 'fd00:66::1', 5);
    expect(there.received).toBe(5);
    expect(ping(NS.srv, 'fd00:66::2', 3).received).toBe(3);
    expect(ping(NS.c1, 'fd00:66::7', 3).received).toBe(3);
    expect(ping(NS.c2, 'fd00:66::2', 3).received).toBe(3);
    expect(ping(NS.c1, '10.66.0.7', 3).received).toBe(3); // and IPv4 as before
    console.log(`tun: ping -6 through the tunnel: median ${median(there.rtts_ms).toFixed(2)} ms over ${there.received}`);
    expect(ping(NS.c1, 'fd00:66::99', 1, 1).received).toBe(0);
    await srv.waitFor(/dropped a packet for unknown destination fd00:66::99 \(from fd00:66::2\)/);
    b.p.kill('SIGTERM');
    expect(await b.p.exit()).toBe(0);
    await srv.waitFor(/client 10\.66\.0\.7 and fd00:66::7 .* gone after .*: clean end; addresses released/);
    a.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await a.p.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(srv.stderr).toMatch(/tun stats: .*dropped: [1-9]\d* unknown destination, 0 spoofed source, 0 queue full, 0 malformed, 0 of a family/);
  });

  test('16 MiB over HTTP over IPv6 inside the tunnel arrives intact (curl -g), then 16 MiB over each family at the same time', async () => {
    const { p: srv, port } = await startServerWith(DUAL);
    const cli = await startClient(NS.c1, port);
    const blob = randomBytes(16 << 20);
    const sum = createHash('sha256').update(blob).digest('hex');
    const www = join(work, 'www6');
    rmSync(www, { recursive: true, force: true });
    require('node:fs').mkdirSync(www);
    writeFileSync(join(www, 'blob'), blob);
    const http6 = new Proc(inNetns(NS.srv, ['python3', '-u', '-m', 'http.server', '8080', '--bind', 'fd00:66::1', '--directory', www]));
    const http4 = new Proc(inNetns(NS.srv, ['python3', '-u', '-m', 'http.server', '8080', '--bind', '10.66.0.1', '--directory', www]));
    const up = (url: string) => exec(NS.c1, ['curl', '-g', '-s', '-o', '/dev/null', '--max-time', '2', url]).code === 0;
    expect(await until(() => up('http://[fd00:66::1]:8080/') && up('http://10.66.0.1:8080/'), 15000)).toBe(true);
    const fetch = async (url: string, out: string) => {
      const p = new Proc(inNetns(NS.c1, ['curl', '-g', '-sS', '--max-time', '90', '-o', out, '-w', '%{http_code}', url]));
      expect(await p.exit(100_000)).toBe(0);
      expect(await p.stdout).toBe('200');
      const got = await Bun.file(out).bytes();
      expect(got.length).toBe(blob.length);
      expect(createHash('sha256').update(got).digest('hex')).toBe(sum);
    };
    let t0 = performance.now();
    await fetch('http://[fd00:66::1]:8080/blob', join(work, 'got6'));
    const secs6 = (performance.now() - t0) / 1000;
    t0 = performance.now();
    await Promise.all([fetch('http://[fd00:66::1]:8080/blob', join(work, 'got6b')), fetch('http://10.66.0.1:8080/blob', join(work, 'got4b'))]);
    const both = (performance.now() - t0) / 1000;
    console.log(`tun: 16 MiB over HTTP over IPv6 through the tunnel in ${secs6.toFixed(2)} s (${(16 / secs6).toFixed(1)} MiB/s); 2 × 16 MiB, IPv4 and IPv6 at once, in ${both.toFixed(2)} s (${(32 / both).toFixed(1)} MiB/s)`);
    http6.kill('SIGKILL');
    http4.kill('SIGKILL');
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(srv.stderr).toMatch(/, 0 malformed reads/);
    expect(cli.p.stderr).toMatch(/dropped inbound: 0 malformed, 0 of a family the tunnel does not carry, 0 not for this client, 0 from a source outside/);
  }, 120_000);

  test('an IPv6-only tunnel: the client gets an IPv6 address and no IPv4 one; an IPv4 request, and a client whose --mtu is below 1280, are refused with exit 2', async () => {
    const { p: srv, port } = await startServerWith(['fd00:66::1/64']);
    const cli = await startClientAt(NS.c1, `${SERVER1}:${port}`);
    expect(cli.line).toMatch(/^fd00:66::2\/64, server fd00:66::1, mtu 1371/);
    expect(exec(NS.c1, ['ip', '-4', '-o', 'addr', 'show', 'dev', cli.dev]).out).toBe('');
    expect(ping(NS.c1, 'fd00:66::1', 3).received).toBe(3);
    expect(ping(NS.srv, 'fd00:66::2', 3).received).toBe(3);
    await srv.waitFor(/client 192\.168\.77\.2:\d+ is fd00:66::2 \(protocol v2\)/);
    const v4 = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', keyPath, '--tun', '10.66.0.7']);
    expect(await v4.exit()).toBe(2);
    expect(v4.stderr).toMatch(/the server refused the session: asked for 10\.66\.0\.7, but this tunnel carries no IPv4, only IPv6 \(fd00:66::\/64\)/);
    const small = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', keyPath, '--tun', 'auto', '--mtu', '1000']);
    expect(await small.exit()).toBe(2);
    expect(small.stderr).toMatch(/the server refused the session: this tunnel carries IPv6 \(fd00:66::\/64\) only, and the client asked for ipv4; an IPv6 client needs --mtu 1280 or more/);
    expect(tunLinks(NS.c2)).toEqual([]);
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
  });

  test('a client sending from an IPv6 source that is not its own is dropped and counted by the server', async () => {
    const { p: srv, port } = await startServerWith(DUAL);
    const a = await startClient(NS.c1, port);
    const b = await startClient(NS.c2, port);
    expect(b.addr).toBe('10.66.0.3');
    const l = await udpListen(NS.srv, 'fd00:66::1', 9999);
    udpForge(NS.c1, 'fd00:66::99', 'fd00:66::1', 9999, 'unassigned source');
    udpForge(NS.c1, 'fd00:66::3', 'fd00:66::1', 9999, "another client's source");
    udpForge(NS.c1, '2001:db8:bad::1', 'fd00:66::3', 9999, 'outside source to a client');
    udpForge(NS.c1, 'fd00:66::2', 'fd00:66::1', 9999, 'own source');
    expect(await l.done).toEqual(['own source']);
    await srv.waitFor(/dropped a packet from client fd00:66::2 with source address fd00:66::99/);
    for (const p of [a.p, b.p, srv]) p.kill('SIGTERM');
    expect([await a.p.exit(), await b.p.exit(), await srv.exit()]).toEqual([0, 0, 0]);
    expect(srv.stderr).toMatch(/tun stats: .* 3 spoofed source/);
    expect(b.p.stderr).not.toMatch(/tun stats: \d+ packets read from \S+, [1-9]/); // c2 got nothing written
  });

  test('the client writes into its kernel only packets from the tunnel or its routes: forged IPv4 and IPv6 sources from the server side are dropped and counted', async () => {
    const { p: srv, port } = await startServerWith(DUAL, ['--route', '2001:db8:77::/48']);
    const cli = await startClient(NS.c1, port, ['--tun', 'auto', '--accept-routes']);
    const l6 = await udpListen(NS.c1, 'fd00:66::2', 9999);
    const l4 = await udpListen(NS.c1, '10.66.0.2', 9998);
    // written into the server's kernel, which routes them into its interface toward the client
    udpForge(NS.srv, '2001:db8:bad::1', 'fd00:66::2', 9999, 'forged6');
    udpForge(NS.srv, '198.18.0.1', '10.66.0.2', 9998, 'forged4');
    udpForge(NS.srv, 'fd00:66::1', 'fd00:66::2', 9999, 'tunnel6');
    udpForge(NS.srv, '2001:db8:77::1', 'fd00:66::2', 9999, 'route6');
    udpForge(NS.srv, '10.66.0.1', '10.66.0.2', 9998, 'tunnel4');
    expect(await l6.done).toEqual(['tunnel6', 'route6']);
    expect(await l4.done).toEqual(['tunnel4']);
    await cli.p.waitFor(/dropped a packet from the server with source address 2001:db8:bad::1, outside the tunnel subnet and every accepted route/);
    await cli.p.waitFor(/dropped a packet from the server with source address 198\.18\.0\.1/);
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
    expect(cli.p.stderr).toMatch(/dropped inbound: 0 malformed, 0 of a family the tunnel does not carry, 0 not for this client, 2 from a source outside the tunnel and its routes/);
  });

  test('an IPv6 route pushed by the server, and one of the client\'s own, are installed and carry traffic', async () => {
    const { p: srv, port } = await startServerWith(DUAL, ['--route', '2001:db8:77::/48', '--route', '10.77.0.0/24']);
    await srv.waitFor(/pushing routes 10\.77\.0\.0\/24 2001:db8:77::\/48/);
    const cli = await startClient(NS.c1, port, ['--tun', 'auto', '--route', '2001:db8:99::/48', '--accept-routes']);
    expect(cli.p.stderr).toMatch(/routes 10\.77\.0\.0\/24 2001:db8:99::\/48 2001:db8:77::\/48/);
    const routes = exec(NS.c1, ['ip', '-6', 'route']).out;
    expect(routes).toContain(`2001:db8:77::/48 dev ${cli.dev}`);
    expect(routes).toContain(`2001:db8:99::/48 dev ${cli.dev}`);
    expect(ping(NS.c1, '2001:db8:77::1', 3).received).toBe(3);
    expect(ping(NS.c1, '10.77.0.1', 1).received).toBe(1);
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
  });

  test('the outer connection over IPv6: connect [fd00:77::1]:PORT; an IPv6 route over the server pins a host route outside the tunnel', async () => {
    const { p: srv, port } = await startServerWith(DUAL, [], '::');
    // 8000::/1 covers fd00:77::1, the server's own outer address
    const cli = await startClientAt(NS.c1, `[${SERVER1_6}]:${port}`, ['--tun', 'auto', '--route', '8000::/1']);
    expect(cli.line).toMatch(/^10\.66\.0\.2\/24 fd00:66::2\/64, .*routes 8000::\/1/);
    await srv.waitFor(/client \[?fd00:77::2\]?:\d+ is 10\.66\.0\.2 and fd00:66::2/);
    const routes = exec(NS.c1, ['ip', '-6', 'route']).out;
    expect(routes).toContain(`8000::/1 dev ${cli.dev}`);
    expect(routes).toContain(`${SERVER1_6} dev v0`);
    expect(ping(NS.c1, 'fd00:66::1', 3).received).toBe(3);
    expect(ping(NS.c1, '10.66.0.1', 3).received).toBe(3);
    cli.p.kill('SIGTERM');
    expect(await cli.p.exit()).toBe(0);
    expect(exec(NS.c1, ['ip', '-6', 'route']).out).not.toContain(`${SERVER1_6} dev`);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
  });

  test('MTU: an IPv4-only tunnel works with --mtu 576 (IPv6 turned off on its interfaces); a client with --mtu below 1280 gets IPv4 only from a dual-stack server', async () => {
    const { p: srv, port } = await startServer(['--mtu', '576']);
    const cli = await startClient(NS.c1, port);
    expect(cli.p.stderr).toMatch(/tunnel up: \S+ 10\.66\.0\.2\/24, server 10\.66\.0\.1, mtu 576/);
    expect(exec(NS.c1, ['ip', '-o', 'link', 'show', 'dev', cli.dev]).out).toContain('mtu 576');
    expect(exec(NS.c1, ['ip', '-6', '-o', 'addr', 'show', 'dev', cli.dev]).out).toBe('');
    expect(ping(NS.c1, '10.66.0.1', 3).received).toBe(3);
    cli.p.kill('SIGTERM');
    srv.kill('SIGTERM');
    expect([await cli.p.exit(), await srv.exit()]).toEqual([0, 0]);
    const dual = await startServerWith(DUAL);
    const small = await startClient(NS.c1, dual.port, ['--tun', 'auto', '--mtu', '1000']);
    expect(small.p.stderr).toMatch(/tunnel up: \S+ 10\.66\.0\.2\/24, server 10\.66\.0\.1, mtu 1000/);
    await dual.p.waitFor(/client 192\.168\.77\.2:\d+ is 10\.66\.0\.2 \(protocol v2\)/);
    expect(ping(NS.c1, '10.66.0.1', 3).received).toBe(3);
    small.p.kill('SIGTERM');
    dual.p.kill('SIGTERM');
    expect([await small.p.exit(), await dual.p.exit()]).toEqual([0, 0]);
  });

  // ---- a TUN client trusts no route or address it did not ask for (issue 13) ----

  /** c3's routing state: what must be exactly the same before a client starts and after it exits. */
  const tables = (ns = NS.c3) => ['-4 route', '-6 route', '-4 rule', '-6 rule'].map((w) => `# ip ${w}\n${must(['ip', '-n', ns, ...w.split(' ')])}`).join('');
  const PUSHY = ['--route', '0.0.0.0/0', '--route', '198.51.100.0/24', '--route', '10.77.0.0/24', '--route', '::/0', '--route', '2001:db8:51::/64', '--route', '2001:db8:77::/48'];

  test('pushed routes: without --accept-routes none is installed (one log line says how many and how); with it the default routes and those overlapping the LAN are refused, harmless ones installed; ip route and ip rule are the same after SIGTERM and after a stopped server with --no-reconnect', async () => {
    const before = tables();
    expect(before).toContain('default via 198.51.100.1 dev lan0');
    const { p: srv, port } = await startServerWith(DUAL, PUSHY);
    // without --accept-routes: only the tunnel's own subnets go through the interface
    const a = await startClientAt(NS.c3, `${SERVER3}:${port}`);
    await a.p.waitFor(/ignoring 6 routes pushed by the server \(0\.0\.0\.0\/0 198\.51\.100\.0\/24 10\.77\.0\.0\/24 ::\/0 2001:db8:51::\/64 2001:db8:77::\/48\); connect with --accept-routes to install them/);
    const on = must(['ip', '-n', NS.c3, '-4', 'route']) + must(['ip', '-n', NS.c3, '-6', 'route']);
    expect(on.split('\n').filter((l) => l.includes(`dev ${a.dev}`) && !l.includes('proto kernel'))).toEqual([]);
    expect(on).toContain('default via 198.51.100.1 dev lan0');
    expect(ping(NS.c3, '10.66.0.1', 1).received).toBe(1);
    a.p.kill('SIGTERM');
    expect(await a.p.exit()).toBe(0);
    expect(tables()).toBe(before);
    // with --accept-routes: only what passes the checks, each refusal logged once with its reason
    const b = await startClientAt(NS.c3, `${SERVER3}:${port}`, ['--tun', 'auto', '--accept-routes', '--no-reconnect']);
    expect(b.line).toMatch(/routes 10\.77\.0\.0\/24 2001:db8:77::\/48 \(protocol/);
    for (const re of [
      /not installing the route 0\.0\.0\.0\/0 pushed by the server: a default route is never taken from a server/,
      /not installing the route ::\/0 pushed by the server: a default route is never taken/,
      /not installing the route 198\.51\.100\.0\/24 pushed by the server: it overlaps this host's address 198\.51\.100\.7\/24 on lan0/,
      /not installing the route 2001:db8:51::\/64 pushed by the server: it overlaps this host's/,
    ]) expect(b.p.stderr).toMatch(re);
    const r4 = must(['ip', '-n', NS.c3, '-4', 'route']);
    const r6 = must(['ip', '-n', NS.c3, '-6', 'route']);
    expect(r4).toContain(`10.77.0.0/24 dev ${b.dev}`);
    expect(r6).toContain(`2001:db8:77::/48 dev ${b.dev}`);
    expect(r4).toContain('default via 198.51.100.1 dev lan0');
    expect(r4).toContain('198.51.100.0/24 dev lan0');
    expect(r4).not.toMatch(new RegExp(`(default|198\\.51\\.100\\.0/24) dev ${b.dev}`));
    expect(r6).not.toMatch(new RegExp(`(default|2001:db8:51::/64) dev ${b.dev}`));
    expect(ping(NS.c3, '10.77.0.1', 2).received).toBe(2);
    expect(ping(NS.c3, '2001:db8:77::1', 2).received).toBe(2);
    // the server goes away: a --no-reconnect client exits 1, and leaves the tables as they were
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(await b.p.exit()).toBe(1);
    expect(b.p.stderr.match(/not installing the route 0\.0\.0\.0\/0/g)!.length).toBe(1);
    expect(tables()).toBe(before);
  });

  test("the user's --route 0.0.0.0/0 and ::/0 send everything through the tunnel as two halves each, keeping the default routes; a reconnect adds nothing twice; the tables are the same after exit, and after SIGKILL once the next client has started", async () => {
    const before = tables();
    const { p: srv, port } = await startServerWith(DUAL);
    const args = ['--tun', 'auto', '--route', '0.0.0.0/0', '--route', '::/0'];
    const cli = await startClientAt(NS.c3, `${SERVER3}:${port}`, args);
    expect(cli.line).toMatch(/routes 0\.0\.0\.0\/1 128\.0\.0\.0\/1 ::\/1 8000::\/1/);
    const r4 = must(['ip', '-n', NS.c3, '-4', 'route']);
    expect(r4).toContain('default via 198.51.100.1 dev lan0');
    expect(r4).toContain(`0.0.0.0/1 dev ${cli.dev}`);
    expect(r4).toContain(`128.0.0.0/1 dev ${cli.dev}`);
    expect(r4).toMatch(new RegExp(`${SERVER3.replaceAll('.', '\\.')} dev v0 proto 157 scope link metric \\d+`)); // the outer connection stays outside
    expect(must(['ip', '-n', NS.c3, '-6', 'route'])).toMatch(/default via 2001:db8:51::1 dev lan0/);
    expect(must(['ip', '-n', NS.c3, '-4', 'route', 'get', '203.0.113.9'])).toContain(`dev ${cli.dev}`);
    // beyond the server: only the tunnel leads there (the LAN's gateway has no route to it)
    expect(ping(NS.c3, '10.77.0.1', 2).received).toBe(2);
    expect(ping(NS.c3, '2001:db8:77::1', 2).received).toBe(2);
    // the server restarts: the client reconnects with the same answer and does not add its routes again
    srv.kill('SIGKILL');
    await srv.exit();
    const srv2 = vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${port}`, ...DUAL.flatMap((t) => ['--tun', t]), '--key', keyPath]);
    await srv2.waitFor(/^listening on /m);
    await cli.p.waitFor(/tunnel back up: /, 15_000);
    expect(cli.p.stderr).not.toMatch(/cannot route|failed/);
    expect(ping(NS.c3, '10.77.0.1', 2).received).toBe(2);
    cli.p.kill('SIGTERM');
    expect(await cli.p.exit()).toBe(0);
    expect(tables()).toBe(before);
    // SIGKILL: the interface and its routes vanish with the process; the pinned host route is left …
    const k = await startClientAt(NS.c3, `${SERVER3}:${port}`, args);
    k.p.kill('SIGKILL');
    await k.p.exit();
    await until(() => tunLinks(NS.c3).length === 0, 3000);
    expect(must(['ip', '-n', NS.c3, '-4', 'route'])).toMatch(/proto 157/);
    // … and removed by the next client as it starts
    const n = await startClientAt(NS.c3, `${SERVER3}:${port}`);
    expect(n.p.stderr).toMatch(/removed the host route 192\.168\.77\.9 dev v0 that a vpn client killed before it could remove it had left behind/);
    n.p.kill('SIGTERM');
    expect(await n.p.exit()).toBe(0);
    expect(tables()).toBe(before);
    srv2.kill('SIGTERM');
    expect(await srv2.exit()).toBe(0);
  }, 40_000);

  test("a tunnel address the client cannot take is refused, exit 2: an IPv4 prefix wider than /8, an IPv6 one wider than /64, a subnet overlapping the client's LAN; a user route the host has already fails instead of overwriting it; the tables are unchanged", async () => {
    const before = tables();
    const cases: [string[], string[], RegExp][] = [
      [['12.0.0.1/7'], ['--tun', 'auto'], /address needs a prefix from \/8 to \/30, got 12\.0\.0\.2\/7/],
      [['fd00:66::1/48'], ['--tun', 'auto'], /address6 needs a prefix from \/64 to \/126, got fd00:66::2\/48/],
      [['198.51.100.50/24'], ['--tun', 'auto'], /the server handed out a tunnel address in 198\.51\.100\.0\/24, which overlaps this host's address 198\.51\.100\.7\/24 on lan0; refusing it/],
      [DUAL, ['--tun', 'auto', '--route', '198.51.100.0/24'], /cannot route 198\.51\.100\.0\/24 through \S+: this host has a route for 198\.51\.100\.0\/24 already \(198\.51\.100\.0\/24 dev lan0 .*\), and vpn does not overwrite routes/],
    ];
    for (const [tun, extra, re] of cases) {
      const { p: srv, port } = await startServerWith(tun);
      const cli = vpnIn(NS.c3, ['connect', `${SERVER3}:${port}`, '--key', keyPath, ...extra]);
      expect(await cli.exit()).toBe(2);
      expect(cli.stderr).toMatch(re);
      expect(tables()).toBe(before);
      srv.kill('SIGTERM');
      expect(await srv.exit()).toBe(0);
    }
  }, 40_000);

  test('a reconnect checks a changed answer again: other pushed routes replace the old ones (nothing added twice), and routes now overlapping the LAN or default are not installed; the tables are as before after exit', async () => {
    const before = tables();
    const port = nextPort++;
    const serve = (extra: string[]) => vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${port}`, '--tun', '10.66.0.1/24', '--key', keyPath, ...extra]);
    let srv = serve(['--route', '10.77.0.0/24']);
    await srv.waitFor(/^listening on /m);
    const cli = await startClientAt(NS.c3, `${SERVER3}:${port}`, ['--tun', 'auto', '--accept-routes']);
    expect(cli.line).toMatch(/routes 10\.77\.0\.0\/24 /);
    srv.kill('SIGKILL');
    await srv.exit();
    srv = serve(['--route', '10.78.0.0/24']);
    await srv.waitFor(/^listening on /m);
    await cli.p.waitFor(/tunnel back up: .*routes 10\.78\.0\.0\/24 /, 15_000);
    let r4 = must(['ip', '-n', NS.c3, '-4', 'route']);
    expect(r4).toContain(`10.78.0.0/24 dev ${cli.dev}`);
    expect(r4).not.toContain('10.77.0.0/24');
    srv.kill('SIGKILL');
    await srv.exit();
    srv = serve(['--route', '198.51.100.0/24', '--route', '0.0.0.0/0']);
    await srv.waitFor(/^listening on /m);
    await cli.p.waitFor(/tunnel back up: \S+ 10\.66\.0\.2\/24, server 10\.66\.0\.1, mtu 1371 \(protocol/, 15_000);
    expect(cli.p.stderr).toMatch(/not installing the route 198\.51\.100\.0\/24 pushed by the server: it overlaps this host's address 198\.51\.100\.7\/24 on lan0/);
    expect(cli.p.stderr).toMatch(/not installing the route 0\.0\.0\.0\/0 pushed by the server: a default route/);
    r4 = must(['ip', '-n', NS.c3, '-4', 'route']);
    expect(r4.split('\n').filter((l) => l.includes(`dev ${cli.dev}`) && !l.includes('proto kernel'))).toEqual([]);
    expect(r4).toContain('default via 198.51.100.1 dev lan0');
    cli.p.kill('SIGTERM');
    expect(await cli.p.exit()).toBe(0);
    expect(tables()).toBe(before);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
  }, 45_000);

  test('a keyring server (issue 13): each key gets its bound address (explicit, or derived from its name and the same after a reconnect), no key gets another\'s, the log names each client', async () => {
    const ring = join(work, 'tun-ring');
    const alice = join(work, 'alice.key');
    const bob = join(work, 'bob.key');
    for (const f of [ring, alice, bob]) rmSync(f, { force: true });
    for (const [name, out, extra] of [['alice', alice, ['--tun-address', '10.66.0.50']], ['bob', bob, []]] as const) {
      const k = new Proc(['bun', VPN, 'keygen', '--client', name, '--keyring', ring, ...extra, out]);
      expect(await k.exit(), k.stderr).toBe(0);
    }
    // bob's address: what the keyring's rule derives from his name in this subnet (keyring.ts bindAddresses)
    const { Keyring, bindAddresses, parseKeyringText } = await import('../keyring.ts');
    const { readFileSync } = await import('node:fs');
    const bound = bindAddresses(new Keyring(ring, parseKeyringText(readFileSync(ring, 'utf8'), ring)), new AddressPool(parseCidr('10.66.0.1/24', 't')), (e) => e.tun, formatIPv4);
    const bobAddr = formatIPv4(bound.get('bob')!);
    const port = nextPort++;
    const control = join(work, 'tun-ring.sock');
    const srv = vpnIn(NS.srv, ['serve', '--listen', `0.0.0.0:${port}`, '--tun', '10.66.0.1/24', '--keyring', ring, '--control', control]);
    await srv.waitFor(/^listening on /m);
    const a = vpnIn(NS.c1, ['connect', `${SERVER1}:${port}`, '--key', alice, '--tun', 'auto']);
    expect((await a.waitFor(/^tunnel up: (\S+) (\S+)\/24/m))[2]).toBe('10.66.0.50');
    let b = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', bob, '--tun', 'auto']);
    expect((await b.waitFor(/^tunnel up: (\S+) (\S+)\/24/m))[2]).toBe(bobAddr);
    await srv.waitFor(/session opened alice 192\.168\.77\.2:\d+ \(protocol v3\)/);
    await srv.waitFor(/session opened bob 192\.168\.77\.6:\d+ \(protocol v3\)/);
    expect(ping(NS.c1, '10.66.0.1', 2).received).toBe(2);
    expect(ping(NS.c2, '10.66.0.1', 2).received).toBe(2);
    // status names each client with its tunnel address (wg show's peer and allowed ips)
    const st = new Proc(['bun', VPN, 'status', '--control', control, '--json']);
    expect(await st.exit(), st.stderr).toBe(0);
    const sessions = (JSON.parse(await st.stdout) as { sessions: { peer: string; tunnel: string[] }[] }).sessions;
    expect(sessions.map((x) => [x.peer, x.tunnel]).sort()).toEqual([['alice', ['10.66.0.50']], ['bob', [bobAddr]]]);
    // bob asks for alice's address: refused, and alice keeps it.
    const thief = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', bob, '--tun', '10.66.0.50', '--no-reconnect']);
    expect(await thief.exit()).toBe(2);
    expect(thief.stderr).toMatch(new RegExp(`asked for 10\\.66\\.0\\.50, but the key of bob is bound to ${bobAddr.replaceAll(".", "\\.")} on this server`));
    expect(ping(NS.c1, '10.66.0.1', 2).received).toBe(2);
    // bob comes back: the same address.
    b.kill('SIGTERM');
    expect(await b.exit()).toBe(0);
    b = vpnIn(NS.c2, ['connect', `${SERVER2}:${port}`, '--key', bob, '--tun', 'auto']);
    expect((await b.waitFor(/^tunnel up: (\S+) (\S+)\/24/m))[2]).toBe(bobAddr);
    for (const p of [a, b]) p.kill('SIGTERM');
    for (const p of [a, b]) expect(await p.exit()).toBe(0);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    expect(srv.stderr).toMatch(/client alice 192\.168\.77\.2:\d+ is 10\.66\.0\.50/);
  }, 40_000);
});
