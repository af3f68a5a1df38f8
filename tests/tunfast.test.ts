/**
 * TUN offloads and batching (issue 17). In-process: offload.ts's header checks, software segmentation and
 * checksums against hand-built packets, with every checksum cross-checked by an independent implementation below
 * (a plain RFC 1071 loop over a DataView, written apart from offload.ts); carry(), the CONFIG field, and junk headers
 * of every kind. End to end, in network namespaces this file creates and removes (192.168.75.0/24 underneath,
 * 10.75.0.0/24 and fd00:75::/64 in the tunnel): TCP transfers through the tunnel checked byte for byte (SHA-256 at
 * both ends) with offloads on, off, and mixed either way; UDP and ICMP; the largest packet and the smallest MTU.
 *
 * Sizes: 256 MiB with offloads on, with them off, and in each mixed pair in the direction where the offload end
 * cuts super-segments for its plain peer (the three cases); the way back and the edge cases are 16–64 MiB.
 * The plain and mixed paths run at 200–300 Mbit/s on the 2-core CI machine, so each 256 MiB there takes 7–12 s.
 */
import { afterAll, afterEach, beforeAll, describe, expect, setDefaultTimeout, test } from 'bun:test';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Proc, ROOT, VPN } from './helpers.ts';
import { inNetns, Namespaces, netnsUnavailable, sh } from './netns.ts';
import { checkVnet, type Checked, Coalescer, completeChecksum, F_NEEDS_CSUM, fold, GSO_NONE, GSO_TCPV4, GSO_TCPV6, MIN_GSO_SIZE, PLAIN_HDR, readVnetHdr, segment, sum16, VNET_HDR_LEN, type VnetHdr, writeVnetHdr } from '../offload.ts';
import { carry, InboundFilter, readOffload, unwrapVnet } from '../tun.ts';
import { MAX_PAYLOAD } from '../channel.ts';
import { parseCidr, parseCidr6 } from '../address.ts';
import { log } from '../log.ts';

setDefaultTimeout(20_000);

// ---- an independent checksum (RFC 1071), for cross-checks only ----

function refSum(b: Uint8Array): number {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let s = 0;
  for (let i = 0; i + 1 < b.length; i += 2) s += v.getUint16(i);
  if (b.length % 2) s += b[b.length - 1]! * 256;
  while (s >> 16) s = (s & 0xffff) + (s >> 16);
  return s;
}
/** Whether the bytes' one's-complement sum is 0xffff: a header or segment (with its pseudo-header) that verifies. */
const verifies = (...parts: Uint8Array[]) => {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length + (p.length % 2), 0));
  let off = 0;
  for (const p of parts) {
    all.set(p, off);
    off += p.length + (p.length % 2); // each part padded to 16 bits on its own
  }
  return refSum(all) === 0xffff;
};
function pseudo(pkt: Uint8Array, v6: boolean, proto: number, l4len: number): Uint8Array {
  if (v6) {
    const ph = new Uint8Array(40);
    ph.set(pkt.subarray(8, 40));
    new DataView(ph.buffer).setUint32(32, l4len);
    ph[39] = proto;
    return ph;
  }
  const ph = new Uint8Array(12);
  ph.set(pkt.subarray(12, 20));
  ph[9] = proto;
  new DataView(ph.buffer).setUint16(10, l4len);
  return ph;
}

// ---- hand-built packets ----

const rnd = (n: number, seed: number) => {
  const b = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
};

/**
 * A TCP super-segment as the kernel hands it to an offload device: IPv4 (ID 0x1234, DF) or IPv6 from 10.75.0.2 /
 * fd00:75::2 to .1 / ::1, a TCP header with 12 bytes of options (doff 8), `flags`, the pseudo-header sum in the
 * checksum field (NEEDS_CSUM form), and `payload`.
 */
function superSegment(v6: boolean, payload: Uint8Array, flags = 0x18 | 0x80, seq = 0xfffff000): Uint8Array {
  const l3 = v6 ? 40 : 20;
  const tcp = 32;
  const p = new Uint8Array(l3 + tcp + payload.length);
  const d = new DataView(p.buffer);
  if (v6) {
    p[0] = 0x60;
    d.setUint16(4, tcp + payload.length);
    p[6] = 6;
    p[7] = 64;
    p.set([0xfd, 0, 0, 0x75, ...new Array(11).fill(0), 2], 8);
    p.set([0xfd, 0, 0, 0x75, ...new Array(11).fill(0), 1], 24);
  } else {
    p[0] = 0x45;
    d.setUint16(2, p.length);
    d.setUint16(4, 0x1234);
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p.set([10, 75, 0, 2], 12);
    p.set([10, 75, 0, 1], 16);
    d.setUint16(10, (~refSum(p.subarray(0, 20))) & 0xffff);
  }
  d.setUint16(l3, 40000);
  d.setUint16(l3 + 2, 5001);
  d.setUint32(l3 + 4, seq);
  d.setUint32(l3 + 8, 0x01020304);
  p[l3 + 12] = 8 << 4;
  p[l3 + 13] = flags;
  d.setUint16(l3 + 14, 512);
  p.set([1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], l3 + 20); // NOP NOP timestamps
  p.set(payload, l3 + tcp);
  d.setUint16(l3 + 16, refSum(pseudo(p, v6, 6, tcp + payload.length)));
  return p;
}

const gsoHdr = (v6: boolean, gsoSize: number, hdrLen = 0): VnetHdr => ({ flags: F_NEEDS_CSUM, gsoType: v6 ? GSO_TCPV6 : GSO_TCPV4, hdrLen, gsoSize, csumStart: v6 ? 40 : 20, csumOffset: 16 });

function check(h: VnetHdr, p: Uint8Array): Checked {
  const c = checkVnet(h, p, 65535);
  if (typeof c === 'string') throw new Error(c);
  return c;
}

describe('offload.ts: checksums and segmentation', () => {
  test('the checksum sum matches RFC 1071 §3 numerical example and the independent implementation', () => {
    const ex = new Uint8Array([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
    expect(fold(sum16(ex, 0, ex.length))).toBe(0xddf2);
    for (const n of [0, 1, 2, 3, 7, 8, 9, 1499, 1500, 65535]) {
      const b = rnd(n, n + 7);
      expect(fold(sum16(b, 0, n))).toBe(refSum(b));
    }
  });

  for (const v6 of [false, true]) {
    test(`cuts an ${v6 ? 'IPv6' : 'IPv4'} TCP super-segment into the packets the kernel would send: lengths, sequence numbers, flags, IDs and both checksums right`, () => {
      const payload = rnd(10_000, v6 ? 6 : 4);
      const p = superSegment(v6, payload, 0x18 | 0x80 | 0x01); // PSH ACK CWR FIN
      const c = check(gsoHdr(v6, 1400, 999 /* the kernel's hint, recomputed */), p);
      const l3 = v6 ? 40 : 20;
      expect(c.hdr.hdrLen).toBe(l3 + 32);
      const out: Uint8Array[] = [];
      const n = segment(p, c, 1400, true, (q, h) => (expect(h).toEqual(PLAIN_HDR), out.push(q)));
      expect(n).toBe(Math.ceil(10_000 / 1400));
      const got: Uint8Array[] = [];
      out.forEach((q, i) => {
        const d = new DataView(q.buffer, q.byteOffset);
        const len = Math.min(1400, 10_000 - i * 1400);
        expect(q.length).toBe(l3 + 32 + len);
        if (v6) expect(d.getUint16(4)).toBe(32 + len);
        else {
          expect(d.getUint16(2)).toBe(q.length);
          expect(d.getUint16(4)).toBe(0x1234 + i);
          expect(verifies(q.subarray(0, 20))).toBe(true); // the IPv4 header checksum
        }
        expect(d.getUint32(l3 + 4)).toBe((0xfffff000 + i * 1400) >>> 0); // wraps past 2^32
        const f = q[l3 + 13]!;
        expect(f & 0x10).toBe(0x10); // ACK everywhere
        expect((f & 0x09) !== 0).toBe(i === out.length - 1); // PSH and FIN on the last only
        expect((f & 0x80) !== 0).toBe(i === 0); // CWR on the first only
        expect(verifies(pseudo(q, v6, 6, q.length - l3), q.subarray(l3))).toBe(true);
        got.push(q.subarray(l3 + 32));
      });
      expect(Buffer.concat(got).equals(Buffer.from(payload))).toBe(true);
    });
  }

  test('a super-segment too long for one record is cut into shorter super-segments that cut on into exactly the same packets', () => {
    for (const v6 of [false, true]) {
      const payload = rnd(65_000, 11);
      const p = superSegment(v6, payload);
      const c = check(gsoHdr(v6, 1331), p);
      const direct: Uint8Array[] = [];
      segment(p, c, 1331, true, (q) => direct.push(q));
      const again: Uint8Array[] = [];
      const step = 1331 * 20;
      segment(p, c, step, false, (piece, h) => {
        expect(h.gsoType).toBe(v6 ? GSO_TCPV6 : GSO_TCPV4);
        const cc = check(h, piece); // each piece is a valid super-segment again, pending checksum included
        expect(piece.length).toBeLessThanOrEqual(c.hdr.hdrLen + step);
        // its checksum field holds its own pseudo-header sum (NEEDS_CSUM form), for its own length
        expect(new DataView(piece.buffer).getUint16(c.l3 + 16)).toBe(refSum(pseudo(piece, v6, 6, piece.length - c.l3)));
        segment(piece, cc, 1331, true, (q) => again.push(q));
      });
      expect(again.length).toBe(direct.length);
      again.forEach((q, i) => expect(Buffer.from(q).equals(Buffer.from(direct[i]!))).toBe(true));
    }
  });

  test('completes a pending TCP or UDP checksum (UDP never 0), which the independent check verifies', () => {
    for (const v6 of [false, true]) {
      const p = superSegment(v6, rnd(777, 3));
      const c = check({ ...PLAIN_HDR, flags: F_NEEDS_CSUM, csumStart: v6 ? 40 : 20, csumOffset: 16 }, p);
      completeChecksum(p, c);
      expect(verifies(pseudo(p, v6, 6, p.length - c.l3), p.subarray(c.l3))).toBe(true);
      // UDP: turn the packet into a datagram with a pending checksum
      const l3 = v6 ? 40 : 20;
      const u = p.slice(0, l3 + 8 + 301);
      const d = new DataView(u.buffer);
      if (v6) (d.setUint16(4, u.length - 40), (u[6] = 17));
      else {
        d.setUint16(2, u.length);
        u[9] = 17;
        d.setUint16(10, 0);
        d.setUint16(10, ~refSum(u.subarray(0, 20)) & 0xffff);
      }
      d.setUint16(l3 + 4, u.length - l3);
      d.setUint16(l3 + 6, refSum(pseudo(u, v6, 17, u.length - l3)));
      const cu = check({ ...PLAIN_HDR, flags: F_NEEDS_CSUM, csumStart: l3, csumOffset: 6 }, u);
      completeChecksum(u, cu);
      expect(d.getUint16(l3 + 6)).not.toBe(0);
      expect(verifies(pseudo(u, v6, 17, u.length - l3), u.subarray(l3))).toBe(true);
    }
  });

  test('refuses every header it cannot vouch for: unknown flags and GSO kinds, ECN, a family mismatch, gso_size out of range, checksum positions that are not TCP/UDP behind the IP header, fragments, no payload, lengths that do not match', () => {
    const p4 = superSegment(false, rnd(3000, 1));
    const p6 = superSegment(true, rnd(3000, 2));
    const g4 = gsoHdr(false, 1400);
    const frag = p4.slice();
    frag[6] = 0x20; // MF
    const icmp = p4.slice();
    icmp[9] = 1;
    const shortLen = p4.slice();
    new DataView(shortLen.buffer).setUint16(2, p4.length - 1);
    const noPayload = p4.slice(0, 52);
    new DataView(noPayload.buffer).setUint16(2, 52);
    const badDoff = p4.slice();
    badDoff[20 + 12] = 4 << 4;
    const cases: [VnetHdr, Uint8Array, RegExp][] = [
      [{ ...g4, flags: 0x05 }, p4, /unknown flags/],
      [{ ...g4, gsoType: 3 }, p4, /unsupported gso_type 0x3/], // UDP (UFO)
      [{ ...g4, gsoType: 5 }, p4, /unsupported gso_type/], // UDP_L4
      [{ ...g4, gsoType: GSO_TCPV4 | 0x80 }, p4, /unsupported gso_type 0x81/], // ECN
      [{ ...g4, gsoType: GSO_TCPV6 }, p4, /does not match/],
      [{ ...gsoHdr(true, 1400), gsoType: GSO_TCPV4 }, p6, /does not match/],
      [{ ...g4, gsoSize: 0 }, p4, /gso_size 0/],
      [{ ...g4, gsoSize: MIN_GSO_SIZE - 1 }, p4, /gso_size 47/],
      [{ ...g4, flags: 0 }, p4, /GSO without NEEDS_CSUM/],
      [{ ...g4, csumStart: 24 }, p4, /checksum position/],
      [{ ...g4, csumOffset: 6 }, p4, /checksum position/],
      [{ ...g4, gsoType: GSO_NONE, csumOffset: 2 }, icmp, /protocol 1/],
      [{ ...g4, gsoType: GSO_NONE }, frag, /fragment/],
      [g4, shortLen, /bad IPv4 length/],
      [g4, noPayload, /without payload/],
      [g4, badDoff, /TCP header length/],
      [g4, new Uint8Array([0x45]), /short IPv4/],
      [g4, new Uint8Array(40), /not IP/],
    ];
    for (const [h, p, why] of cases) {
      const r = checkVnet(h, p, 65535);
      expect(typeof r === 'string' ? r : 'accepted').toMatch(why);
    }
    expect(checkVnet(g4, p4, 1399)).toMatch(/gso_size 1400 out of range/);
  });

  test('junk records never throw: every one is refused or a packet whose header checks out', () => {
    for (let i = 0; i < 3000; i++) {
      const n = i % 97 === 0 ? 0 : 1 + ((i * 7919) % 200);
      const b = rnd(n, i + 1);
      if (n > 12 && i % 2) b[VNET_HDR_LEN] = i % 4 ? 0x45 : 0x60;
      const r = unwrapVnet(b, 1371);
      if (typeof r !== 'string') expect(typeof checkVnet(r.o.c.hdr, r.p, 65535)).toBe('object');
    }
  });

  for (const v6 of [false, true]) {
    test(`coalescing (GRO, ${v6 ? 'IPv6' : 'IPv4'}): the packets of a cut super-segment merge back into exactly it, with a header the checks accept`, () => {
      const payload = rnd(20_000, 30);
      const orig = superSegment(v6, payload, 0x18); // ACK PSH
      const c = check(gsoHdr(v6, 1300), orig);
      const parts: Uint8Array[] = [];
      segment(orig, c, 1300, true, (q) => parts.push(q));
      const out: Uint8Array[] = [];
      const g = new Coalescer((f) => out.push(f));
      for (const q of parts) g.add(q);
      g.flush();
      expect(out.length).toBe(1); // PSH on the last closed the run
      const h = readVnetHdr(out[0]!);
      expect(h).toEqual({ ...c.hdr });
      expect(Buffer.from(out[0]!.subarray(VNET_HDR_LEN)).equals(Buffer.from(orig))).toBe(true);
      expect(typeof checkVnet(h, out[0]!.subarray(VNET_HDR_LEN), 1300)).toBe('object');
    });
  }

  test('coalescing merges only what GRO would: a bad checksum, another flow or a gap in the sequence each end the run, and every packet still goes in, in order', () => {
    const parts: Uint8Array[] = [];
    segment(superSegment(false, rnd(13_000, 31), 0x10), check(gsoHdr(false, 1300), superSegment(false, rnd(13_000, 31), 0x10)), 1300, true, (q) => parts.push(q));
    expect(parts.length).toBe(10);
    const bad = parts[3]!.slice();
    bad[bad.length - 1]! ^= 1; // payload changed, checksum not
    const other = parts[6]!.slice();
    new DataView(other.buffer).setUint16(20, 40001); // another source port
    const fixed = (q: Uint8Array) => {
      const d = new DataView(q.buffer);
      d.setUint16(36, 0);
      d.setUint16(36, ~refSum(new Uint8Array([...pseudo(q, false, 6, q.length - 20), ...q.subarray(20)])) & 0xffff);
      return q;
    };
    const seq = [parts[0]!, parts[1]!, parts[2]!, bad, parts[4]!, parts[5]!, fixed(other), parts[7]!, parts[9]!, parts[8]!];
    const out: Uint8Array[] = [];
    const g = new Coalescer((f) => out.push(f));
    for (const q of seq) g.add(q);
    g.flush();
    // runs: [0 1 2] merged; bad alone; [4 5] merged; other alone; 7 alone (9 is not next); 9 alone; 8 alone
    const sizes = out.map((f) => readVnetHdr(f).gsoType === GSO_NONE ? 1 : (f.length - VNET_HDR_LEN - 52) / 1300);
    expect(sizes).toEqual([3, 1, 2, 1, 1, 1, 1]);
    const bytes = Buffer.concat(out.map((f) => Buffer.from(f.subarray(VNET_HDR_LEN + 52))));
    expect(bytes.equals(Buffer.concat(seq.map((q) => Buffer.from(q.subarray(52)))))).toBe(true); // the same payload, in order
    const untouched = out.filter((f) => readVnetHdr(f).gsoType === GSO_NONE).map((f) => Buffer.from(f.subarray(VNET_HDR_LEN)));
    expect(untouched.some((b) => b.equals(Buffer.from(bad)))).toBe(true); // the bad one unchanged: its kernel drops it
  });

  test('a header reads and writes back unchanged (little-endian fields, as linux/virtio_net.h on x86 and arm64)', () => {
    const b = new Uint8Array(VNET_HDR_LEN);
    const h = { flags: 1, gsoType: 4, hdrLen: 0x1234, gsoSize: 0x0567, csumStart: 40, csumOffset: 16 };
    writeVnetHdr(b, 0, h);
    expect([...b]).toEqual([1, 4, 0x34, 0x12, 0x67, 0x05, 40, 0, 16, 0]);
    expect(readVnetHdr(b)).toEqual(h);
  });
});

describe('carrying packets to peers (tun.ts)', () => {
  let wasQuiet = false;
  beforeAll(() => {
    wasQuiet = log.quiet;
    log.quiet = true;
  });
  afterAll(() => void (log.quiet = wasQuiet));

  const peer = () => {
    const got: Uint8Array[] = [];
    return { got, queued: 0, writeRecord: (p: Uint8Array) => (got.push(p.slice()), true) };
  };
  const frameOf = (h: VnetHdr, p: Uint8Array) => {
    const f = new Uint8Array(VNET_HDR_LEN + p.length);
    writeVnetHdr(f, 0, h);
    f.set(p, VNET_HDR_LEN);
    return f;
  };

  test('to a peer without offloads: a super-segment leaves as packets with complete checksums, a plain one unchanged', () => {
    const p = superSegment(false, rnd(5000, 9));
    const u = unwrapVnet(frameOf(gsoHdr(false, 1300), p), 1371);
    if (typeof u === 'string') throw new Error(u);
    const old = peer();
    carry(old, null, u.p, u.o);
    expect(old.got.length).toBe(4);
    for (const q of old.got) expect(verifies(pseudo(q, false, 6, q.length - 20), q.subarray(20))).toBe(true);
    const plain = peer();
    const q = old.got[0]!;
    carry(plain, null, q, null);
    expect(Buffer.from(plain.got[0]!).equals(Buffer.from(q))).toBe(true);
  });

  test('to an offload peer: the header goes along; a kind it does not take is cut; one too long for a record is split under 65536 bytes', () => {
    const p6 = superSegment(true, rnd(5000, 10));
    const f6 = frameOf(gsoHdr(true, 1290), p6);
    const u6 = unwrapVnet(f6.slice(), 1371);
    if (typeof u6 === 'string') throw new Error(u6);
    const whole = peer();
    carry(whole, { tso4: true, tso6: true }, u6.p, u6.o);
    expect(whole.got.length).toBe(1);
    expect(readVnetHdr(whole.got[0]!).hdrLen).toBe(72);
    const no6 = peer();
    const u6b = unwrapVnet(f6.slice(), 1371) as Exclude<ReturnType<typeof unwrapVnet>, string>;
    carry(no6, { tso4: true, tso6: false }, u6b.p, u6b.o);
    expect(no6.got.length).toBe(4);
    for (const r of no6.got) {
      const h = readVnetHdr(r);
      expect(h.gsoType).toBe(GSO_NONE);
      expect(h.flags).toBe(F_NEEDS_CSUM); // the receiving kernel finishes the checksum
    }
    // IPv6 can be 40 + 65535 bytes long: header and packet would not fit one record
    const big = superSegment(true, rnd(65535 - 32, 12));
    const ub = unwrapVnet(frameOf(gsoHdr(true, 1290), big), 1371) as Exclude<ReturnType<typeof unwrapVnet>, string>;
    const split = peer();
    carry(split, { tso4: true, tso6: true }, ub.p, ub.o);
    expect(split.got.length).toBe(2);
    let total = 0;
    for (const r of split.got) {
      expect(r.length).toBeLessThanOrEqual(MAX_PAYLOAD);
      total += r.length - VNET_HDR_LEN - 72;
    }
    expect(total).toBe(65535 - 32);
  });

  test('a peer header whose segments exceed the MTU is dropped, never written', () => {
    const p = superSegment(false, rnd(5000, 13));
    expect(unwrapVnet(frameOf(gsoHdr(false, 1400), p), 1371)).toMatch(/exceed the MTU 1371/);
  });

  test("the client's inbound filter judges a super-segment by its one IP header, which every segment shares", () => {
    const f = new InboundFilter({ v4: parseCidr('10.75.0.2/32', 't').addr, v6: parseCidr6('fd00:75::2/128', 't').addr }, [parseCidr('10.75.0.0/24', 't')], [parseCidr6('fd00:75::/64', 't')]);
    const good = superSegment(false, rnd(4000, 14));
    // from the server to the client: swap the addresses
    good.set([10, 75, 0, 1], 12);
    good.set([10, 75, 0, 2], 16);
    const forged = good.slice();
    forged.set([192, 0, 2, 7], 12);
    for (const [p, ok] of [[good, true], [forged, false]] as const) {
      const u = unwrapVnet(frameOf(gsoHdr(false, 1300), p), 1371);
      if (typeof u === 'string') throw new Error(u);
      expect(f.check(u.p)).toBe(ok);
      const segs: Uint8Array[] = [];
      segment(u.p, u.o.c, 1300, true, (q) => segs.push(q));
      for (const q of segs) expect(f.check(q)).toBe(ok);
    }
  });

  test('the CONFIG field: a list naming csum turns headers on, tso4/tso6 say which super-segments; anything else is a type error', () => {
    expect(readOffload(undefined)).toBeNull();
    expect(readOffload(null)).toBeNull();
    expect(readOffload([])).toBeNull();
    expect(readOffload(['tso4'])).toBeNull(); // no header without csum
    expect(readOffload(['csum'])).toEqual({ tso4: false, tso6: false });
    expect(readOffload(['csum', 'tso4', 'tso6', 'uso', 'later'])).toEqual({ tso4: true, tso6: true });
    for (const bad of ['csum', 7, {}, [1], new Array(9).fill('csum')]) expect(() => readOffload(bad)).toThrow(/offload must be a list/);
  });
});

// ---- end to end ----

const skip = netnsUnavailable();
if (skip) console.log(`tunfast.test.ts: skipping the network-namespace tests: ${skip}`);

const spaces = new Namespaces();
const NS = { s: spaces.name('S'), c: spaces.name('C') };
const SERVER = '192.168.75.1';
let work = '';
let key = '';
let nextPort = 43000;
/** processes of the test under way: killed after it, whatever happened */
const live: Proc[] = [];

const SINK_PY = `
import hashlib, json, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1)
print('ready', file=sys.stderr, flush=True)
s.settimeout(30)
c, _ = s.accept(); c.settimeout(30)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(json.dumps({'bytes': n, 'sha256': h.hexdigest()}), flush=True)
`;
const SOURCE_PY = `
import hashlib, json, random, socket, sys, time
addr, port, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = random.Random(seed)
h, sent = hashlib.sha256(), 0
c = socket.create_connection((addr, port), timeout=30)
deadline = time.time() + 60
while sent < total and time.time() < deadline:
    b = r.randbytes(min(1 << 20, total - sent))
    c.sendall(b); h.update(b); sent += len(b)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(json.dumps({'bytes': sent, 'sha256': h.hexdigest()}), flush=True)
`;
const UDP_PY = `
import json, socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if mode == 'recv':
    s.bind((addr, port)); s.settimeout(5)
    print('ready', file=sys.stderr, flush=True)
    got = []
    try:
        while len(got) < int(sys.argv[4]):
            got.append(len(s.recv(65535)))
    except socket.timeout: pass
    print(json.dumps(got), flush=True)
else:
    for n in map(int, sys.argv[4].split(',')):
        s.sendto(bytes(range(256)) * (n // 256) + bytes(n % 256), (addr, port))
`;

/**
 * A hostile TUN server holding the key (every client of a server holds it): the real serve skeleton with a mode of
 * its own that answers with offloads and then sends the records in RECORDS (a file of hex lines) as DATA.
 */
const HOSTILE_TS = `
import { readFileSync } from 'node:fs';
import { serve } from '${ROOT}/server.ts';
import { keysFromKeyFile } from '${ROOT}/handshake.ts';
import { getEngine } from '${ROOT}/engine.ts';
const [keyPath, host, port, recordsPath] = process.argv.slice(2);
const keys = keysFromKeyFile(new Uint8Array(Buffer.from(readFileSync(keyPath, 'utf8').trim(), 'hex')));
const records = readFileSync(recordsPath, 'utf8').trim().split('\\n').map((h) => new Uint8Array(Buffer.from(h, 'hex')));
const mode = {
  onShutdown: 'close',
  config: () => ({ mode: 'tun', address: '10.75.0.2/24', server: '10.75.0.1', routes: [], mtu: 1371, offload: ['csum', 'tso4', 'tso6'] }),
  app: (session) => ({
    onOpen: (s) => void setTimeout(() => { for (const r of records) s.writeRecord(r); console.error('sent ' + records.length); }, 500),
    onData: () => {},
    onPeerClose: () => session.close(),
    onEnd: () => {},
  }),
};
process.exit(await serve({ keys, engine: getEngine('native'), handshakeTimeoutMs: 5000, keepaliveMs: 0 }, { listen: { kind: 'tcp', host, port: Number(port) }, maxConns: 4, graceMs: 1000, control: null }, mode));
`;

/** An IPv4 UDP datagram from `src` to 10.75.0.2:6002 holding `text`, both checksums complete. */
function udp4(src: number[], text: string): Uint8Array {
  const body = new TextEncoder().encode(text);
  const p = new Uint8Array(28 + body.length);
  const d = new DataView(p.buffer);
  p[0] = 0x45;
  d.setUint16(2, p.length);
  p[8] = 64;
  p[9] = 17;
  p.set(src, 12);
  p.set([10, 75, 0, 2], 16);
  d.setUint16(10, ~refSum(p.subarray(0, 20)) & 0xffff);
  d.setUint16(20, 4000);
  d.setUint16(22, 6002);
  d.setUint16(24, 8 + body.length);
  p.set(body, 28);
  d.setUint16(26, ~refSum(new Uint8Array([...pseudo(p, false, 17, 8 + body.length), ...p.subarray(20)])) & 0xffff || 0xffff);
  return p;
}
const hex = (h: VnetHdr, p: Uint8Array) => {
  const f = new Uint8Array(VNET_HDR_LEN + p.length);
  writeVnetHdr(f, 0, h);
  f.set(p, VNET_HDR_LEN);
  return Buffer.from(f).toString('hex');
};

const env = (offload: boolean, extra: Record<string, string> = {}) => ({ ...(process.env as Record<string, string>), VPN_TUN_OFFLOAD: offload ? 'on' : 'off', ...extra });

/** A server and a client, each with offloads or without; resolves once the tunnel is up. */
async function tunnel(o: { server: boolean; client: boolean; tun?: string[]; mtu?: number; clientEnv?: Record<string, string> }) {
  const port = nextPort++;
  const tun = (o.tun ?? ['10.75.0.1/24', 'fd00:75::1/64']).flatMap((t) => ['--tun', t]);
  const srv = new Proc(inNetns(NS.s, ['bun', VPN, 'serve', '--listen', `${SERVER}:${port}`, ...tun, '--key', key, '--engine', 'native', ...(o.mtu ? ['--mtu', String(o.mtu)] : [])]), { env: env(o.server) });
  live.push(srv);
  await srv.waitFor(/^listening on /m);
  // The client turns offloads off by its flag (--no-offload), the server by its environment: both ways are tested.
  const cli = new Proc(inNetns(NS.c, ['bun', VPN, 'connect', `${SERVER}:${port}`, '--tun', 'auto', '--key', key, '--engine', 'native', ...(o.client ? [] : ['--no-offload'])]), { env: env(true, o.clientEnv) });
  live.push(cli);
  await cli.waitFor(/^tunnel up: /m);
  const stop = async () => {
    cli.kill('SIGTERM');
    expect(await cli.exit()).toBe(0);
    srv.kill('SIGTERM');
    expect(await srv.exit()).toBe(0);
    return { srv: srv.stderr, cli: cli.stderr };
  };
  return { srv, cli, stop };
}

/** Send `bytes` over TCP from namespace `from` to `addr` in namespace `to`; both ends' byte counts and SHA-256. */
async function transfer(from: string, to: string, addr: string, bytes: number) {
  const port = 5001 + (nextPort % 1000);
  const sink = new Proc(inNetns(to, ['python3', '-u', join(work, 'sink.py'), addr, String(port)]));
  await sink.waitFor(/^ready$/m);
  const src = sh(inNetns(from, ['python3', join(work, 'source.py'), addr, String(port), String(bytes), String(bytes % 9973)]), 90_000);
  expect(src.err).toBe('');
  expect(await sink.exit(30_000)).toBe(0);
  const sent = JSON.parse(src.out.trim());
  const got = JSON.parse(new TextDecoder().decode(await sink.stdoutBytes).trim());
  return { sent, got };
}

describe.skipIf(skip !== null)('end to end, in network namespaces', () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'vpn-tunfast-'));
    writeFileSync(join(work, 'sink.py'), SINK_PY);
    writeFileSync(join(work, 'source.py'), SOURCE_PY);
    writeFileSync(join(work, 'udp.py'), UDP_PY);
    writeFileSync(join(work, 'hostile.ts'), HOSTILE_TS);
    key = join(work, 'vpn.key');
    expect(sh(['bun', VPN, 'keygen', key]).ok).toBe(true);
    spaces.add(NS.s);
    spaces.add(NS.c);
    spaces.veth(NS.s, 'fs0', NS.c, 'fc0', { a: `${SERVER}/24`, b: '192.168.75.2/24' });
  });
  afterEach(async () => {
    for (const p of live.splice(0)) {
      p.kill('SIGKILL');
      await p.exit(5000).catch(() => {});
    }
  });
  afterAll(() => {
    spaces.remove();
    expect(spaces.removed).toBe(true);
    rmSync(work, { recursive: true, force: true });
  });

  test('offloads on at both ends: they say so, and 256 MiB over IPv4 arrive byte for byte, 64 MiB back over IPv6 (TSO6)', async () => {
    const t = await tunnel({ server: true, client: true });
    expect(t.srv.stderr).toMatch(/offloads on/);
    await t.cli.waitFor(/^offloads on: records carry super-segments \(the server takes TSO4 and TSO6\)$/m);
    const a = await transfer(NS.c, NS.s, '10.75.0.1', 256 << 20);
    expect(a.got).toEqual(a.sent);
    expect(a.sent.bytes).toBe(256 << 20);
    const b = await transfer(NS.s, NS.c, 'fd00:75::2', 64 << 20);
    expect(b.got).toEqual(b.sent);
    expect(b.sent.bytes).toBe(64 << 20);
    const logs = await t.stop();
    // super-segments did cross: far fewer records than 1371-byte packets would have needed
    const read = Number(/tun stats: (\d+) packets read/.exec(logs.cli)![1]);
    expect(read).toBeLessThan((256 << 20) / 1371 / 3);
    expect(logs.srv).toMatch(/, 0 bad offload headers/);
    expect(logs.cli).toMatch(/, 0 bad offload headers/);
  }, 90_000);

  test('offloads off at both ends (VPN_TUN_OFFLOAD=off): 256 MiB byte for byte, 16 MiB back over IPv6, one packet per record as before', async () => {
    const t = await tunnel({ server: false, client: false });
    expect(t.srv.stderr).not.toMatch(/offloads on/);
    const a = await transfer(NS.c, NS.s, '10.75.0.1', 256 << 20);
    expect(a.got).toEqual(a.sent);
    expect(a.sent.bytes).toBe(256 << 20);
    const b = await transfer(NS.s, NS.c, 'fd00:75::2', 16 << 20);
    expect(b.got).toEqual(b.sent);
    await t.stop();
  }, 120_000);

  for (const [server, client] of [[true, false], [false, true]] as const) {
    test(`mixed, offloads only at the ${server ? 'server' : 'client'}: it cuts super-segments with correct checksums for its peer, 256 MiB from it and 32 MiB to it byte for byte, UDP of the largest size too`, async () => {
      const t = await tunnel({ server, client });
      expect(t.cli.stderr).not.toMatch(/^offloads on/m);
      // 256 MiB in the direction where the offload end reads super-segments and must cut them for its plain peer
      const [big, small] = server ? [256 << 20, 32 << 20] : [32 << 20, 256 << 20];
      const b = await transfer(NS.s, NS.c, '10.75.0.2', big);
      expect(b.got).toEqual(b.sent);
      expect(b.sent.bytes).toBe(big);
      const a = await transfer(NS.c, NS.s, '10.75.0.1', small);
      expect(a.got).toEqual(a.sent);
      expect(a.sent.bytes).toBe(small);
      // UDP with the kernel's pending checksum: completed for the plain peer, or its kernel drops the datagram
      const sizes = [1, 512, 1371 - 28, 1371 - 48];
      const rx = new Proc(inNetns(NS.s, ['python3', '-u', join(work, 'udp.py'), 'recv', '10.75.0.1', '6001', String(sizes.length)]));
      await rx.waitFor(/^ready$/m);
      expect(sh(inNetns(NS.c, ['python3', join(work, 'udp.py'), 'send', '10.75.0.1', '6001', sizes.join(',')])).ok).toBe(true);
      expect(await rx.exit()).toBe(0);
      expect(JSON.parse(new TextDecoder().decode(await rx.stdoutBytes).trim())).toEqual(sizes);
      await t.stop();
    }, 150_000);
  }

  /** The open flags of `pid`'s descriptor on /dev/net/tun, from /proc (octal in fdinfo). */
  const tunFdFlags = (pid: number): number => {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      let target = '';
      try {
        target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      if (target === '/dev/net/tun') return parseInt(/^flags:\s*([0-7]+)/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))![1]!, 8);
    }
    throw new Error(`no /dev/net/tun descriptor in process ${pid}`);
  };
  const O_ASYNC = 0o20000;

  test('readiness: an offload device signals its packets (SIGIO, O_ASYNC on the descriptor); with VPN_TUN_WAKE=poller a poller thread does instead; both carry 16 MiB byte for byte and answer pings', async () => {
    for (const wake of ['sigio', 'poller'] as const) {
      const t = await tunnel({ server: true, client: true, clientEnv: wake === 'poller' ? { VPN_TUN_WAKE: 'poller' } : {} });
      expect(tunFdFlags(t.srv.pid) & O_ASYNC).toBe(O_ASYNC);
      expect(tunFdFlags(t.cli.pid) & O_ASYNC).toBe(wake === 'sigio' ? O_ASYNC : 0);
      const a = await transfer(NS.c, NS.s, '10.75.0.1', 16 << 20);
      expect(a.got).toEqual(a.sent);
      const b = await transfer(NS.s, NS.c, '10.75.0.2', 16 << 20);
      expect(b.got).toEqual(b.sent);
      const ping = sh(inNetns(NS.c, ['ping', '-c', '20', '-i', '0.01', '-W', '2', '10.75.0.1']));
      expect(ping.out).toMatch(/20 received/);
      await t.stop();
    }
  }, 90_000);

  test('ICMP of both families passes with offloads on; the largest packet (MTU 1371) goes through with DF set and one byte more does not', async () => {
    const t = await tunnel({ server: true, client: true });
    for (const [dst, big] of [['10.75.0.1', 1371 - 28], ['fd00:75::1', 1371 - 48]] as const) {
      const ok = sh(inNetns(NS.c, ['ping', '-n', '-c', '3', '-i', '0.2', '-W', '2', '-M', 'do', '-s', String(big), dst]));
      expect(ok.out).toMatch(/3 received/);
      const over = sh(inNetns(NS.c, ['ping', '-n', '-c', '1', '-W', '1', '-M', 'do', '-s', String(big + 1), dst]));
      expect(over.out).not.toMatch(/1 received/);
    }
    await t.stop();
  });

  test('the smallest MTU (576, IPv4 only): 16 MiB byte for byte with offloads on, segments of the small MSS', async () => {
    const t = await tunnel({ server: true, client: true, tun: ['10.75.0.1/24'], mtu: 576 });
    const a = await transfer(NS.c, NS.s, '10.75.0.1', 16 << 20);
    expect(a.got).toEqual(a.sent);
    const b = await transfer(NS.s, NS.c, '10.75.0.2', 16 << 20);
    expect(b.got).toEqual(b.sent);
    const ok = sh(inNetns(NS.c, ['ping', '-n', '-c', '2', '-i', '0.2', '-W', '2', '-M', 'do', '-s', String(576 - 28), '10.75.0.1']));
    expect(ok.out).toMatch(/2 received/);
    const logs = await t.stop();
    expect(logs.srv).toMatch(/, 0 bad offload headers/);
  }, 60_000);

  test('a hostile server (it holds the key) gets no bad header and no forged source into the client: each is dropped and counted, only the good datagram arrives', async () => {
    const server = [10, 75, 0, 1];
    const forged = [192, 0, 2, 9];
    const udpAt = { ...PLAIN_HDR, flags: F_NEEDS_CSUM, csumStart: 20, csumOffset: 6 };
    const tcpForged = superSegment(false, rnd(4000, 21));
    tcpForged.set(forged, 12);
    tcpForged.set([10, 75, 0, 2], 16);
    const records = [
      hex({ ...PLAIN_HDR, flags: 0x04 }, udp4(server, 'bad-flags')),
      hex({ ...udpAt, csumOffset: 2 }, udp4(server, 'bad-position')),
      hex({ ...udpAt, gsoType: 3, gsoSize: 100 }, udp4(server, 'ufo')),
      hex({ ...gsoHdr(false, 1300), gsoType: GSO_TCPV4 | 0x80 }, superSegment(false, rnd(4000, 22))),
      hex(gsoHdr(false, 40), superSegment(false, rnd(4000, 23))),
      hex(gsoHdr(false, 1300), tcpForged),
      hex(PLAIN_HDR, udp4(forged, 'forged-source')),
      hex(PLAIN_HDR, udp4(server, 'good')),
    ];
    writeFileSync(join(work, 'records'), records.join('\n'));
    const port = nextPort++;
    const srv = new Proc(inNetns(NS.s, ['bun', join(work, 'hostile.ts'), key, SERVER, String(port), join(work, 'records')]));
    live.push(srv);
    await srv.waitFor(/^listening on /m);
    const rx = new Proc(inNetns(NS.c, ['python3', '-u', join(work, 'udp.py'), 'recv', '0.0.0.0', '6002', '8']));
    live.push(rx);
    await rx.waitFor(/^ready$/m);
    const cli = new Proc(inNetns(NS.c, ['bun', VPN, 'connect', `${SERVER}:${port}`, '--tun', 'auto', '--key', key, '--no-reconnect']));
    live.push(cli);
    await cli.waitFor(/^offloads on/m);
    await srv.waitFor(/^sent 8$/m);
    expect(await rx.exit()).toBe(0);
    expect(JSON.parse(new TextDecoder().decode(await rx.stdoutBytes).trim())).toEqual([4]); // 'good', nothing else
    cli.kill('SIGTERM');
    await cli.exit();
    expect(cli.stderr).toMatch(/dropped a packet from the server with a bad offload header/);
    expect(cli.stderr).toMatch(/, 2 from a source outside the tunnel and its routes; 0 refused by the kernel, 0 malformed reads, 5 bad offload headers/);
  });
});
