/**
 * proxy.ts in-process: the PROXY protocol v1/v2 parser against vectors (haproxy's doc/proxy-protocol.txt examples
 * and byte layouts written out by hand here, not by encodeProxyV2), every prefix of each valid header, junk of every
 * kind, and the acceptor that runs it on a connection's first bytes (through a fake Link). The real haproxy in
 * front of real servers is in tests/ops.test.ts.
 */
import { describe, expect, test } from 'bun:test';
import { proxyHeader } from '../forward.ts';
import type { Link, LinkEvents } from '../net.ts';
import { encodeProxyV2, parseProxyHeader, PROXY_MAX, PROXY_PENDING_MAX, ProxyAcceptor, type ProxyParse, V1_MAX, V2_SIGNATURE } from '../proxy.ts';
import { sourceOf } from '../server.ts';

const ascii = (s: string) => new TextEncoder().encode(s);
const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
const hex = (h: string) => new Uint8Array(Buffer.from(h.replace(/\s+/g, ''), 'hex'));

function ok(r: ProxyParse) {
  if (r.status !== 'ok') throw new Error(`expected ok, got ${JSON.stringify(r)}`);
  return r;
}

/** Every strict prefix of a valid header must ask for more, never refuse it nor accept it early. */
function everyPrefixWaits(h: Uint8Array): void {
  for (let i = 0; i < h.length; i++) expect(parseProxyHeader(h.subarray(0, i))).toEqual({ status: 'more' });
}

describe('PROXY v1 (text)', () => {
  test('TCP4: the spec example is parsed, and the bytes after it are left to the tunnel', () => {
    const h = ascii('PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n');
    const r = ok(parseProxyHeader(cat(h, ascii('tunnel bytes'))));
    expect(r.length).toBe(h.length);
    expect(r.origin).toEqual({ version: 1, source: { address: '192.168.0.1', port: 56324 }, destination: { address: '192.168.0.11', port: 443 } });
    everyPrefixWaits(h);
  });

  test('TCP6: addresses are normalised (RFC 5952); an IPv4-mapped one is the IPv4 client it stands for', () => {
    const r = ok(parseProxyHeader(ascii('PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:10.0.0.1 1 65535\r\n')));
    expect(r.origin.source).toEqual({ address: '2001:db8::1', port: 1 });
    expect(r.origin.destination).toEqual({ address: '10.0.0.1', port: 65535 });
    expect(ok(parseProxyHeader(ascii('PROXY TCP6 ::ffff:a00:2 ::ffff:10.0.0.1 1 2\r\n'))).origin.source).toEqual({ address: '10.0.0.2', port: 1 });
  });

  test('the longest TCP6 line fits, and UNKNOWN up to 107 bytes means "use the socket\'s addresses"', () => {
    const f = 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff';
    const longest = ascii(`PROXY TCP6 ${f} ${f} 65535 65535\r\n`);
    expect(longest.length).toBeLessThanOrEqual(V1_MAX);
    expect(ok(parseProxyHeader(longest)).length).toBe(longest.length);
    const unknown = ascii(`PROXY UNKNOWN ${f} ${f} 65535 65535\r\n`); // the spec's worst case: 107 bytes
    expect(unknown.length).toBe(V1_MAX);
    expect(ok(parseProxyHeader(unknown)).origin).toEqual({ version: 1, source: null, destination: null });
    expect(ok(parseProxyHeader(ascii('PROXY UNKNOWN\r\n'))).origin.source).toBeNull();
    everyPrefixWaits(unknown);
  });

  test.each([
    ['a line longer than 107 bytes', `PROXY UNKNOWN ${'x'.repeat(100)}\r\n`],
    ['no CRLF within 107 bytes', `PROXY TCP4 ${'1'.repeat(200)}`],
    ['LF without CR', 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n'],
    ['a stray CR', 'PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n'],
    ['lower-case protocol', 'PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n'],
    ['UDP4 (not a TCP stream)', 'PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n'],
    ['a field missing', 'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n'],
    ['a field too many', 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n'],
    ['two spaces', 'PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n'],
    ['an octet over 255', 'PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n'],
    ['an octet with a leading zero', 'PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n'],
    ['IPv6 under TCP4', 'PROXY TCP4 ::1 5.6.7.8 1 2\r\n'],
    ['IPv4 under TCP6', 'PROXY TCP6 1.2.3.4 ::1 1 2\r\n'],
    ['a bad IPv6 address', 'PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n'],
    ['a port over 65535', 'PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n'],
    ['a port with a leading zero', 'PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n'],
    ['a negative port', 'PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n'],
    ['a control character', 'PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n'],
    ['a byte above ASCII', 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\u00e9\r\n'],
  ])('refuses %s', (_what, text) => {
    expect(parseProxyHeader(ascii(text)).status).toBe('bad');
  });

  test('refuses a wrong first word as soon as it differs, without waiting for more bytes', () => {
    expect(parseProxyHeader(ascii('PROXZ')).status).toBe('bad');
    expect(parseProxyHeader(ascii('PR'))).toEqual({ status: 'more' });
    expect(parseProxyHeader(ascii('PROXY')).status).toBe('more');
    expect(parseProxyHeader(ascii('PROXY-')).status).toBe('bad');
  });
});

/** v2 header bytes for 127.0.0.5:40000 → 127.0.0.1:32694, laid out by hand from the spec (§2.2). */
const V2_TCP4 = hex(`
  0d0a0d0a000d0a515549540a   # signature
  21                         # version 2, command PROXY
  11                         # AF_INET, STREAM
  000c                       # 12 bytes follow
  7f000005 7f000001          # src, dst
  9c40 7fb6                  # 40000, 32694
`.replace(/#.*$/gm, ''));

describe('PROXY v2 (binary)', () => {
  test('TCP4 PROXY: a hand-written vector, and encodeProxyV2 builds the same bytes', () => {
    const r = ok(parseProxyHeader(cat(V2_TCP4, ascii('after'))));
    expect(r.length).toBe(28);
    expect(r.origin).toEqual({ version: 2, source: { address: '127.0.0.5', port: 40000 }, destination: { address: '127.0.0.1', port: 32694 } });
    expect(encodeProxyV2({ address: '127.0.0.5', port: 40000 }, { address: '127.0.0.1', port: 32694 })).toEqual(V2_TCP4);
    everyPrefixWaits(V2_TCP4);
  });

  test('TCP6 PROXY, with TLVs after the addresses (skipped, but they must be whole)', () => {
    const tlvs = hex('01 0002 6832   04 0000'); // ALPN "h2", NOOP of length 0
    const h = encodeProxyV2({ address: '2001:db8::7', port: 1234 }, { address: '::1', port: 443 }, tlvs);
    expect(h.length).toBe(16 + 36 + tlvs.length);
    const r = ok(parseProxyHeader(h));
    expect(r.origin.source).toEqual({ address: '2001:db8::7', port: 1234 });
    expect(r.origin.destination).toEqual({ address: '::1', port: 443 });
    everyPrefixWaits(h);
    const cut = encodeProxyV2({ address: '2001:db8::7', port: 1234 }, { address: '::1', port: 443 }, hex('01 0005 6832'));
    expect(parseProxyHeader(cut).status).toBe('bad');
    const half = encodeProxyV2({ address: '127.0.0.1', port: 1 }, { address: '127.0.0.1', port: 2 }, hex('01 00'));
    expect(parseProxyHeader(half).status).toBe('bad');
  });

  test('LOCAL (a health check), UNSPEC and UNIX mean "use the socket\'s addresses"', () => {
    expect(ok(parseProxyHeader(hex('0d0a0d0a000d0a515549540a 20 00 0000'))).origin).toEqual({ version: 2, source: null, destination: null });
    // LOCAL may still carry an address block, which is skipped
    expect(ok(parseProxyHeader(cat(hex('0d0a0d0a000d0a515549540a 20 11 000c'), new Uint8Array(12)))).length).toBe(28);
    expect(ok(parseProxyHeader(hex('0d0a0d0a000d0a515549540a 21 00 0000'))).origin.source).toBeNull();
    const unix = cat(hex('0d0a0d0a000d0a515549540a 21 31 00d8'), new Uint8Array(216));
    expect(ok(parseProxyHeader(unix)).length).toBe(16 + 216);
  });

  test.each([
    ['a broken signature', '0d0a0d0a000d0a515549540b 21 11 000c'],
    ['version 1 in a v2 header', '0d0a0d0a000d0a515549540a 11 11 000c'],
    ['an unknown command', '0d0a0d0a000d0a515549540a 22 11 000c'],
    ['UDP over IPv4', '0d0a0d0a000d0a515549540a 21 12 000c'],
    ['UDP over IPv6', '0d0a0d0a000d0a515549540a 21 22 0024'],
    ['an unknown family', '0d0a0d0a000d0a515549540a 21 41 000c'],
    ['a length too short for IPv4 addresses', '0d0a0d0a000d0a515549540a 21 11 000b'],
    ['a length too short for IPv6 addresses', '0d0a0d0a000d0a515549540a 21 21 0023'],
    ['a body over the bound (521 bytes)', '0d0a0d0a000d0a515549540a 21 11 0209'],
    ['the largest length field', '0d0a0d0a000d0a515549540a 21 11 ffff'],
  ])('refuses %s from the 16 fixed bytes alone', (_what, h) => {
    expect(parseProxyHeader(hex(h)).status).toBe('bad');
  });

  test('accepts a header of exactly PROXY_MAX bytes and nothing longer', () => {
    const tlvLen = PROXY_MAX - 16 - 12 - 3;
    const tlv = cat(hex('04'), Uint8Array.of(tlvLen >> 8, tlvLen & 255), new Uint8Array(tlvLen));
    const h = encodeProxyV2({ address: '10.0.0.1', port: 1 }, { address: '10.0.0.2', port: 2 }, tlv);
    expect(h.length).toBe(PROXY_MAX);
    expect(ok(parseProxyHeader(h)).length).toBe(PROXY_MAX);
    const tlv2 = cat(hex('04'), Uint8Array.of((tlvLen + 1) >> 8, (tlvLen + 1) & 255), new Uint8Array(tlvLen + 1));
    expect(parseProxyHeader(encodeProxyV2({ address: '10.0.0.1', port: 1 }, { address: '10.0.0.2', port: 2 }, tlv2)).status).toBe('bad');
  });
});

describe('junk', () => {
  test.each([
    ['a TLS ClientHello', '160301'],
    ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\n').toString('hex')],
    ['a vpn message 1 (what a client sends when it bypasses the balancer)', '02' + '00'.repeat(60)],
    ['a NUL byte', '00'],
  ])('refuses %s at its first byte', (_what, h) => {
    expect(parseProxyHeader(hex(h).subarray(0, 1)).status).toBe('bad');
  });

  test('2,000 random inputs (some with a valid signature or prefix): never a throw, never a length beyond the input or PROXY_MAX', () => {
    const starts = [new Uint8Array(0), V2_SIGNATURE, ascii('PROXY '), ascii('PROXY TCP4 '), V2_TCP4.subarray(0, 16)];
    for (let i = 0; i < 2000; i++) {
      const junk = new Uint8Array(Buffer.from(crypto.getRandomValues(new Uint8Array(Math.floor(Math.random() * 700)))));
      const buf = cat(starts[i % starts.length]!, junk);
      const r = parseProxyHeader(buf);
      expect(['more', 'bad', 'ok']).toContain(r.status);
      if (r.status === 'ok') {
        expect(r.length).toBeLessThanOrEqual(Math.min(buf.length, PROXY_MAX));
      }
      if (r.status === 'more') expect(buf.length).toBeLessThan(PROXY_MAX);
    }
  });
});

/** A Link as far as ProxyAcceptor uses it. */
function fakeLink(peer = '127.0.0.1:5000') {
  const l = {
    peer,
    origin: null as Link['origin'],
    aborted: false,
    events: null as LinkEvents | null,
    attach(e: LinkEvents) {
      this.events = e;
    },
    abort() {
      this.aborted = true;
    },
  };
  return l;
}

describe('ProxyAcceptor', () => {
  test('a header split over reads: the Link gets the real address, the bytes after the header go on, in order', () => {
    const ready: { peer: string; rest: string }[] = [];
    const a = new ProxyAcceptor(1000, (link, rest) => ready.push({ peer: link.peer, rest: Buffer.from(rest).toString() }), () => {
      throw new Error('dropped');
    });
    const l = fakeLink();
    a.accept(l as unknown as Link);
    const h = ascii('PROXY TCP4 203.0.113.9 127.0.0.1 4242 32694\r\nfirst');
    l.events!.onData(h.subarray(0, 10));
    expect(a.waiting).toBe(1);
    l.events!.onData(h.subarray(10));
    expect(ready).toEqual([{ peer: '203.0.113.9:4242', rest: 'first' }]);
    expect(l.origin).toEqual({ source: { address: '203.0.113.9', port: 4242 }, destination: { address: '127.0.0.1', port: 32694 } });
    expect(a.waiting).toBe(0);
  });

  test('LOCAL keeps the socket\'s address; an IPv6 client is written [addr]:port', () => {
    const peers: string[] = [];
    const a = new ProxyAcceptor(1000, (link) => peers.push(link.peer), () => {});
    const l1 = fakeLink('127.0.0.2:1');
    a.accept(l1 as unknown as Link);
    l1.events!.onData(cat(hex('0d0a0d0a000d0a515549540a 20 00 0000'), ascii('x')));
    const l2 = fakeLink();
    a.accept(l2 as unknown as Link);
    l2.events!.onData(cat(encodeProxyV2({ address: '2001:db8::1', port: 9 }, { address: '::1', port: 1 }), ascii('x')));
    expect(peers).toEqual(['127.0.0.2:1', '[2001:db8::1]:9']);
    expect(l1.origin).toBeNull();
  });

  test('garbage, an early end and silence are each dropped with a reason, and the Link reset; a health check that sends nothing is closed without a word', async () => {
    const drops: string[] = [];
    const a = new ProxyAcceptor(100, () => {
      throw new Error('must not be accepted');
    }, (_l, why) => drops.push(why));
    const bad = fakeLink();
    a.accept(bad as unknown as Link);
    bad.events!.onData(ascii('GET / HTTP/1.0\r\n'));
    const ended = fakeLink();
    a.accept(ended as unknown as Link);
    ended.events!.onData(ascii('PROXY TCP4'));
    ended.events!.onEnd();
    const silent = fakeLink();
    a.accept(silent as unknown as Link);
    const probe = fakeLink(); // a health check: connects and closes without a byte
    a.accept(probe as unknown as Link);
    probe.events!.onEnd();
    await Bun.sleep(250);
    expect([bad.aborted, ended.aborted, silent.aborted, probe.aborted]).toEqual([true, true, true, true]);
    expect(drops).toHaveLength(3); // the probe is not worth a line
    expect(drops[0]).toContain('not a PROXY protocol header');
    expect(drops[1]).toContain('ended before a complete PROXY header');
    expect(drops[2]).toContain('no PROXY header within 0.1 s');
    expect(a.waiting).toBe(0);
  });

  test('a header alone waits for the tunnel\'s first byte; closed right after its header (a health check), the Link goes without a word', () => {
    const ready: string[] = [];
    const drops: string[] = [];
    const a = new ProxyAcceptor(1000, (_l, rest) => ready.push(Buffer.from(rest).toString()), (_l, why) => drops.push(why));
    const l = fakeLink();
    a.accept(l as unknown as Link);
    l.events!.onData(ascii('PROXY TCP4 203.0.113.9 127.0.0.1 4242 32694\r\n'));
    expect(ready).toEqual([]);
    expect(a.waiting).toBe(1);
    l.events!.onData(ascii('m1'));
    expect(ready).toEqual(['m1']);
    const check = fakeLink();
    a.accept(check as unknown as Link);
    check.events!.onData(hex('0d0a0d0a000d0a515549540a 20 00 0000'));
    check.events!.onClose();
    expect([check.aborted, drops, a.waiting]).toEqual([true, [], 0]);
  });

  test(`at most ${PROXY_PENDING_MAX} connections wait for a header; the next is dropped at once`, () => {
    const drops: string[] = [];
    const a = new ProxyAcceptor(60_000, () => {}, (_l, why) => drops.push(why));
    const links = Array.from({ length: PROXY_PENDING_MAX + 1 }, () => fakeLink());
    for (const l of links) a.accept(l as unknown as Link);
    expect(a.waiting).toBe(PROXY_PENDING_MAX);
    expect(links.at(-1)!.aborted).toBe(true);
    expect(drops).toHaveLength(1);
    for (const l of links.slice(0, -1)) l.events!.onClose(); // and each closed one frees its place (and its timer)
    expect(a.waiting).toBe(0);
  });
});

describe('the real address is what counts', () => {
  const link = (origin: Link['origin']) => ({ socket: { remoteAddress: '127.0.0.1', remotePort: 1, localAddress: '127.0.0.1', localPort: 32694 }, origin }) as unknown as Link;

  test('sourceOf (the pre-auth budget\'s key) is the client the header named, not the balancer', () => {
    expect(sourceOf(link(null))).toBe('127.0.0.1');
    expect(sourceOf(link({ source: { address: '198.51.100.4', port: 7 }, destination: null }))).toBe('198.51.100.4');
    expect(sourceOf(link({ source: { address: '2001:db8:1:2:3::5', port: 7 }, destination: null }))).toBe('2001:db8:1:2::/64');
    // an IPv4 client of a dual-stack front, in a v2 TCP6 header as ::ffff:198.51.100.4: its own IPv4 source
    const mapped = ok(parseProxyHeader(encodeProxyV2({ address: '::ffff:198.51.100.4', port: 7 }, { address: '::ffff:192.0.2.1', port: 443 })));
    expect(mapped.origin.source).toEqual({ address: '198.51.100.4', port: 7 });
    expect(sourceOf(link({ source: mapped.origin.source!, destination: mapped.origin.destination }))).toBe('198.51.100.4');
  });

  test('serve --forward --proxy-protocol names the real client to the target', () => {
    expect(proxyHeader(link(null))).toBe('PROXY TCP4 127.0.0.1 127.0.0.1 1 32694\r\n');
    expect(proxyHeader(link({ source: { address: '198.51.100.4', port: 7 }, destination: { address: '192.0.2.1', port: 443 } }))).toBe('PROXY TCP4 198.51.100.4 192.0.2.1 7 443\r\n');
    expect(proxyHeader(link({ source: { address: '2001:db8::5', port: 7 }, destination: { address: '2001:db8::1', port: 443 } }))).toBe('PROXY TCP6 2001:db8::5 2001:db8::1 7 443\r\n');
  });
});
