/**
 * TUN offloads (Linux): the virtio_net_hdr that precedes every packet on a TUN fd opened with IFF_VNET_HDR
 * (linux/virtio_net.h), its checks, and software segmentation with correct checksums (RFC 791 header checksum,
 * RFC 793/RFC 8200 §8.1 pseudo-header checksums) for a peer that cannot take a super-segment (PROTOCOL.md §8.5,
 * "Offloads").
 *
 *   virtio_net_hdr (10 bytes, little-endian on every Linux we run on: TUN's default, TUNSETVNETLE aside)
 *   offset size field
 *        0    1 flags        F_NEEDS_CSUM (1): the L4 checksum field holds only the pseudo-header sum; the rest of
 *                            the sum over [csum_start, end) is still to be added.  F_DATA_VALID (2): verified.
 *        1    1 gso_type     GSO_NONE (0), GSO_TCPV4 (1), GSO_TCPV6 (4); bit 0x80 (ECN) and UDP kinds are refused
 *        2    2 hdr_len      bytes of headers (IP + TCP) in front of the payload (the kernel's value is a hint only:
 *                            it may be the linear part's length, so we compute it ourselves)
 *        4    2 gso_size     payload bytes per segment (the MSS)
 *        6    2 csum_start   where the checksummed L4 part begins (= IP header length)
 *        8    2 csum_offset  where in it the checksum field is (TCP 16, UDP 6)
 *
 * A super-segment is one IPv4 or IPv6 header (its length field: the whole packet), one TCP header and up to
 * 64 KiB of payload; cutting it every gso_size bytes of payload gives the packets the kernel would have sent:
 * consecutive sequence numbers, FIN and PSH on the last only, CWR on the first only, IPv4 IDs counting up.
 */

// ---- Specification constants (linux/virtio_net.h, linux/if_tun.h) ----
export const VNET_HDR_LEN = 10;
export const F_NEEDS_CSUM = 1;
export const F_DATA_VALID = 2;
export const GSO_NONE = 0;
export const GSO_TCPV4 = 1;
export const GSO_TCPV6 = 4;
const PROTO_TCP = 6;
const PROTO_UDP = 17;
const TCP_CSUM_OFFSET = 16;
const UDP_CSUM_OFFSET = 6;
const TCP_MIN_HDR = 20;
const UDP_HDR = 8;
const IPV4_MIN_HDR = 20;
const IPV6_HDR = 40;
const TCP_FIN = 0x01;
const TCP_PSH = 0x08;
const TCP_CWR = 0x80;

// ---- Tuning / policy ----
/** The smallest gso_size taken from a peer: Linux's own floor for the MSS is 48 (tcp_min_snd_mss), and a smaller
 * one would let one record expand into thousands of packets when we segment it. */
export const MIN_GSO_SIZE = 48;

/** A parsed virtio_net_hdr. */
export interface VnetHdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
}

export function readVnetHdr(b: Uint8Array, off = 0): VnetHdr {
  return {
    flags: b[off]!,
    gsoType: b[off + 1]!,
    hdrLen: b[off + 2]! | (b[off + 3]! << 8),
    gsoSize: b[off + 4]! | (b[off + 5]! << 8),
    csumStart: b[off + 6]! | (b[off + 7]! << 8),
    csumOffset: b[off + 8]! | (b[off + 9]! << 8),
  };
}

export function writeVnetHdr(b: Uint8Array, off: number, h: VnetHdr): void {
  b[off] = h.flags;
  b[off + 1] = h.gsoType;
  b[off + 2] = h.hdrLen & 0xff;
  b[off + 3] = h.hdrLen >> 8;
  b[off + 4] = h.gsoSize & 0xff;
  b[off + 5] = h.gsoSize >> 8;
  b[off + 6] = h.csumStart & 0xff;
  b[off + 7] = h.csumStart >> 8;
  b[off + 8] = h.csumOffset & 0xff;
  b[off + 9] = h.csumOffset >> 8;
}

/** The header of a plain packet: no checksum left to do, no segmentation. */
export const PLAIN_HDR: VnetHdr = Object.freeze({ flags: 0, gsoType: GSO_NONE, hdrLen: 0, gsoSize: 0, csumStart: 0, csumOffset: 0 });

// ---- checksums (RFC 1071) ----

/** The 16-bit one's-complement sum (not folded, not complemented) of b[start, end), added to `sum`. */
export function sum16(b: Uint8Array, start: number, end: number, sum = 0): number {
  let i = start;
  const even = end - ((end - start) & 1);
  // 32 bits at a time while the sum stays far from 2^53
  for (; i + 8 <= even; i += 8) sum += ((b[i]! << 8) | b[i + 1]!) + ((b[i + 2]! << 8) | b[i + 3]!) + ((b[i + 4]! << 8) | b[i + 5]!) + ((b[i + 6]! << 8) | b[i + 7]!);
  for (; i < even; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if (i < end) sum += b[i]! << 8;
  return sum;
}

/** Fold a sum to 16 bits (end-around carry). */
export function fold(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return sum;
}

/** The pseudo-header sum (unfolded) of the packet `p` with IP header length `l3` for an L4 part of `l4len` bytes. */
function pseudoSum(p: Uint8Array, v6: boolean, proto: number, l4len: number): number {
  return v6 ? sum16(p, 8, 40, proto + l4len) : sum16(p, 12, 20, proto + l4len);
}

function put16(b: Uint8Array, off: number, v: number): void {
  b[off] = v >> 8;
  b[off + 1] = v & 0xff;
}

/** Recompute the IPv4 header checksum in place. */
function ipv4HeaderChecksum(p: Uint8Array, ihl: number): void {
  put16(p, 10, 0);
  put16(p, 10, ~fold(sum16(p, 0, ihl)) & 0xffff);
}

// ---- checks ----

/** What a packet with a header is, once checked: the header normalised, and where things are. */
export interface Checked {
  hdr: VnetHdr;
  v6: boolean;
  /** IP header length = csum_start when a checksum is pending */
  l3: number;
  /** L4 protocol, and its header length (0 when no checksum is pending) */
  proto: number;
  l4hdr: number;
}

/**
 * Check packet `p` (one IPv4 or IPv6 packet whose length field is its length) against its header `h`, from the
 * kernel or from a peer (untrusted): flags only NEEDS_CSUM/DATA_VALID; a pending checksum only at TCP's or UDP's
 * field right behind an IP header without options beyond IPv4's own and no IPv6 extension header, on a packet that
 * is no fragment; GSO only TCP of the packet's family, with NEEDS_CSUM, a gso_size from MIN_GSO_SIZE to
 * `maxGsoSize`, and a payload. Returns the header normalised (hdr_len computed, DATA_VALID dropped) or a reason.
 */
export function checkVnet(h: VnetHdr, p: Uint8Array, maxGsoSize: number): Checked | string {
  if (h.flags & ~(F_NEEDS_CSUM | F_DATA_VALID)) return `unknown flags 0x${h.flags.toString(16)}`;
  const n = p.length;
  if (n < 1) return 'empty packet';
  const version = p[0]! >> 4;
  let v6: boolean;
  let l3: number;
  let proto: number;
  let fragment = false;
  if (version === 4) {
    if (n < IPV4_MIN_HDR) return 'short IPv4 packet';
    l3 = (p[0]! & 0x0f) * 4;
    if (l3 < IPV4_MIN_HDR || l3 > n || ((p[2]! << 8) | p[3]!) !== n) return 'bad IPv4 length';
    proto = p[9]!;
    fragment = (p[6]! & 0x20) !== 0 || ((p[6]! & 0x1f) << 8) + p[7]! !== 0;
    v6 = false;
  } else if (version === 6) {
    if (n < IPV6_HDR || IPV6_HDR + ((p[4]! << 8) | p[5]!) !== n) return 'bad IPv6 length';
    l3 = IPV6_HDR;
    proto = p[6]!;
    v6 = true;
  } else return 'not IP';
  const gso = h.gsoType;
  if (gso !== GSO_NONE && gso !== GSO_TCPV4 && gso !== GSO_TCPV6) return `unsupported gso_type 0x${gso.toString(16)}`;
  if (!(h.flags & F_NEEDS_CSUM)) {
    if (gso !== GSO_NONE) return 'GSO without NEEDS_CSUM';
    return { hdr: { ...PLAIN_HDR }, v6, l3, proto, l4hdr: 0 };
  }
  if (fragment) return 'checksum pending on a fragment';
  let l4hdr: number;
  if (proto === PROTO_TCP) {
    if (h.csumStart !== l3 || h.csumOffset !== TCP_CSUM_OFFSET || l3 + TCP_MIN_HDR > n) return 'bad TCP checksum position';
    l4hdr = (p[l3 + 12]! >> 4) * 4;
    if (l4hdr < TCP_MIN_HDR || l3 + l4hdr > n) return 'bad TCP header length';
  } else if (proto === PROTO_UDP) {
    if (h.csumStart !== l3 || h.csumOffset !== UDP_CSUM_OFFSET || l3 + UDP_HDR > n) return 'bad UDP checksum position';
    l4hdr = UDP_HDR;
  } else return `checksum pending for protocol ${proto}`;
  if (gso === GSO_NONE) return { hdr: { flags: F_NEEDS_CSUM, gsoType: GSO_NONE, hdrLen: 0, gsoSize: 0, csumStart: l3, csumOffset: h.csumOffset }, v6, l3, proto, l4hdr };
  if (proto !== PROTO_TCP || (gso === GSO_TCPV4) === v6) return 'gso_type does not match the packet';
  if (h.gsoSize < MIN_GSO_SIZE || h.gsoSize > maxGsoSize) return `gso_size ${h.gsoSize} out of range`;
  const hdrLen = l3 + l4hdr;
  if (hdrLen >= n) return 'GSO packet without payload';
  return { hdr: { flags: F_NEEDS_CSUM, gsoType: gso, hdrLen, gsoSize: h.gsoSize, csumStart: l3, csumOffset: TCP_CSUM_OFFSET }, v6, l3, proto, l4hdr };
}

// ---- completing and segmenting ----

/** Finish a pending checksum in place (the field holds the pseudo-header sum, as NEEDS_CSUM promises). */
export function completeChecksum(p: Uint8Array, c: Checked): void {
  if (!(c.hdr.flags & F_NEEDS_CSUM)) return;
  const at = c.l3 + c.hdr.csumOffset;
  let v = ~fold(sum16(p, c.l3, p.length)) & 0xffff;
  if (v === 0 && c.proto === PROTO_UDP) v = 0xffff; // RFC 768: 0 means "no checksum"
  put16(p, at, v);
}

/** Write the full L4 checksum of `p` (pseudo-header included) from scratch. */
function fullL4Checksum(p: Uint8Array, v6: boolean, l3: number, proto: number, csumOffset: number): void {
  put16(p, l3 + csumOffset, 0);
  let v = ~fold(sum16(p, l3, p.length, pseudoSum(p, v6, proto, p.length - l3))) & 0xffff;
  if (v === 0 && proto === PROTO_UDP) v = 0xffff;
  put16(p, l3 + csumOffset, v);
}

/** Write the pseudo-header sum (folded, not complemented) into the L4 checksum field: NEEDS_CSUM's form. */
function partialL4Checksum(p: Uint8Array, v6: boolean, l3: number, proto: number, csumOffset: number): void {
  put16(p, l3 + csumOffset, fold(pseudoSum(p, v6, proto, p.length - l3)));
}

/**
 * Cut the checked GSO packet `p` into packets of at most `step` payload bytes (a multiple of gso_size; gso_size
 * itself for plain packets) and hand each to `emit` in a fresh buffer it may keep, with `lead` free bytes in front
 * of the packet (room for a header). With `step` = gso_size every packet is plain with its checksums complete
 * (`full`) or pending (NEEDS_CSUM form); with a larger `step` the pieces are smaller super-segments (pending form),
 * for a record that would be too long. Returns the count.
 */
export function segment(p: Uint8Array, c: Checked, step: number, full: boolean, emit: (buf: Uint8Array, hdr: VnetHdr) => void, lead = 0): number {
  const { l3, v6 } = c;
  const hl = c.hdr.hdrLen;
  if (c.hdr.gsoType === GSO_NONE || step < c.hdr.gsoSize || step % c.hdr.gsoSize !== 0) throw new Error(`segment: step ${step} is no multiple of gso_size ${c.hdr.gsoSize}`);
  const total = p.length - hl;
  const seq0 = ((p[l3 + 4]! << 24) | (p[l3 + 5]! << 16) | (p[l3 + 6]! << 8) | p[l3 + 7]!) >>> 0;
  const flags = p[l3 + 13]!;
  const id0 = v6 ? 0 : (p[4]! << 8) | p[5]!;
  let count = 0;
  for (let off = 0; off < total; off += step) {
    const len = Math.min(step, total - off);
    const buf = new Uint8Array(lead + hl + len);
    const q = lead ? buf.subarray(lead) : buf;
    q.set(p.subarray(0, hl));
    q.set(p.subarray(hl + off, hl + off + len), hl);
    const last = off + len >= total;
    if (v6) put16(q, 4, q.length - IPV6_HDR);
    else {
      put16(q, 2, q.length);
      put16(q, 4, (id0 + off / c.hdr.gsoSize) & 0xffff); // the ID the kernel gives segment off / gso_size
      ipv4HeaderChecksum(q, l3);
    }
    const seq = (seq0 + off) >>> 0;
    q[l3 + 4] = seq >>> 24;
    q[l3 + 5] = (seq >>> 16) & 0xff;
    q[l3 + 6] = (seq >>> 8) & 0xff;
    q[l3 + 7] = seq & 0xff;
    let f = flags;
    if (!last) f &= ~(TCP_FIN | TCP_PSH);
    if (off > 0) f &= ~TCP_CWR;
    q[l3 + 13] = f;
    const gso = len > c.hdr.gsoSize;
    if (full && !gso) fullL4Checksum(q, v6, l3, PROTO_TCP, TCP_CSUM_OFFSET);
    else partialL4Checksum(q, v6, l3, PROTO_TCP, TCP_CSUM_OFFSET);
    const hdr: VnetHdr = gso
      ? { ...c.hdr }
      : full
        ? { ...PLAIN_HDR }
        : { flags: F_NEEDS_CSUM, gsoType: GSO_NONE, hdrLen: 0, gsoSize: 0, csumStart: l3, csumOffset: TCP_CSUM_OFFSET };
    emit(buf, hdr);
    count++;
  }
  return count;
}

// ---- coalescing (GRO): consecutive TCP segments of one flow become one super-segment ----

const TCP_ACK = 0x10;
/** A coalesced packet stays below this many bytes (with its header it then fits a 65536-byte record too). */
const COALESCE_MAX = 65535 - VNET_HDR_LEN;

function csumOk(p: Uint8Array, v6: boolean, l3: number): boolean {
  return fold(sum16(p, l3, p.length, pseudoSum(p, v6, PROTO_TCP, p.length - l3))) === 0xffff;
}

/**
 * Gathers plain packets written to an offload device and writes runs of consecutive segments of one TCP flow as one
 * super-segment (as the kernel's GRO would), so that many packets cost one write(2). Only what GRO itself would
 * merge is merged: IPv4 without options and with DF, consecutive IDs, or IPv6 without extension headers; the same
 * addresses, TTL/hop limit, TOS/flow label, ports, ACK number, window and TCP options; only ACK set (PSH allowed on
 * the last); sequence numbers back to back; every segment but the last of the run's first size; each segment's own
 * checksum verified first (the merged one's is left to the kernel, which no longer checks the parts). Anything else
 * passes through alone and unchanged, in order. `emit` gets header + packet in a fresh buffer.
 */
export class Coalescer {
  private run: Uint8Array[] = [];
  private runBytes = 0;
  private gso = 0;
  private nextSeq = 0;
  private v6 = false;
  private l3 = 0;
  private hl = 0;

  constructor(private readonly emit: (frame: Uint8Array) => void) {}

  /** Take one whole plain packet (its length field checked by the caller); it goes out at the latest on `flush`. */
  add(p: Uint8Array): void {
    const seg = this.segmentInfo(p);
    if (seg && this.run.length > 0 && this.continues(p, seg)) {
      this.run.push(p.slice());
      this.runBytes += seg.len;
      this.nextSeq = (this.nextSeq + seg.len) >>> 0;
      if (p[seg.l3 + 13] !== TCP_ACK || seg.len < this.gso) this.flush(); // PSH, or a short one: the run is complete
      return;
    }
    this.flush();
    if (!seg) return this.emitPlain(p);
    this.run = [p.slice()];
    this.runBytes = seg.len;
    this.gso = seg.len;
    this.nextSeq = (seg.seq + seg.len) >>> 0;
    this.v6 = seg.v6;
    this.l3 = seg.l3;
    this.hl = seg.l3 + seg.l4;
    if (p[seg.l3 + 13] !== TCP_ACK) this.flush();
  }

  /** Write what is gathered. */
  flush(): void {
    const run = this.run;
    if (run.length === 0) return;
    this.run = [];
    if (run.length === 1) return this.emitPlain(run[0]!);
    const { l3, hl, v6 } = this;
    const last = run[run.length - 1]!;
    const frame = new Uint8Array(VNET_HDR_LEN + hl + this.runBytes);
    const q = frame.subarray(VNET_HDR_LEN);
    q.set(run[0]!.subarray(0, hl));
    let off = hl;
    for (const p of run) {
      q.set(p.subarray(hl), off);
      off += p.length - hl;
    }
    q[l3 + 13] = last[l3 + 13]!; // the last one's PSH
    if (v6) put16(q, 4, q.length - IPV6_HDR);
    else {
      put16(q, 2, q.length);
      ipv4HeaderChecksum(q, l3);
    }
    partialL4Checksum(q, v6, l3, PROTO_TCP, TCP_CSUM_OFFSET);
    writeVnetHdr(frame, 0, { flags: F_NEEDS_CSUM, gsoType: v6 ? GSO_TCPV6 : GSO_TCPV4, hdrLen: hl, gsoSize: this.gso, csumStart: l3, csumOffset: TCP_CSUM_OFFSET });
    this.emit(frame);
  }

  private emitPlain(p: Uint8Array): void {
    const frame = new Uint8Array(VNET_HDR_LEN + p.length); // a zero header: nothing pending
    frame.set(p, VNET_HDR_LEN);
    this.emit(frame);
  }

  /** Where a mergeable TCP segment's parts are, or null when it is not one (it then passes alone). */
  private segmentInfo(p: Uint8Array): { v6: boolean; l3: number; l4: number; seq: number; len: number } | null {
    const n = p.length;
    let v6: boolean;
    let l3: number;
    if (n >= IPV4_MIN_HDR && p[0] === 0x45) {
      if (p[9] !== PROTO_TCP || (p[6]! & 0xbf) !== 0 || p[7] !== 0 || !(p[6]! & 0x40)) return null; // DF, no fragment
      if (((p[2]! << 8) | p[3]!) !== n) return null;
      v6 = false;
      l3 = IPV4_MIN_HDR;
    } else if (n >= IPV6_HDR && p[0]! >> 4 === 6) {
      if (p[6] !== PROTO_TCP || IPV6_HDR + ((p[4]! << 8) | p[5]!) !== n) return null;
      v6 = true;
      l3 = IPV6_HDR;
    } else return null;
    if (l3 + TCP_MIN_HDR > n) return null;
    const l4 = (p[l3 + 12]! >> 4) * 4;
    if (l4 < TCP_MIN_HDR || l3 + l4 >= n) return null; // no payload: nothing to merge
    const f = p[l3 + 13]!;
    if (f !== TCP_ACK && f !== (TCP_ACK | TCP_PSH)) return null;
    if (!csumOk(p, v6, l3)) return null; // the kernel will check it alone
    const seq = ((p[l3 + 4]! << 24) | (p[l3 + 5]! << 16) | (p[l3 + 6]! << 8) | p[l3 + 7]!) >>> 0;
    return { v6, l3, l4, seq, len: n - l3 - l4 };
  }

  /** Whether segment `p` extends the run: same flow and fields, next in sequence, no larger than the run's size. */
  private continues(p: Uint8Array, s: { v6: boolean; l3: number; l4: number; seq: number; len: number }): boolean {
    const first = this.run[0]!;
    const prev = this.run[this.run.length - 1]!;
    if (s.v6 !== this.v6 || s.l3 + s.l4 !== this.hl || s.seq !== this.nextSeq || s.len > this.gso) return false;
    if (prev.length - this.hl !== this.gso) return false; // only the last may be short
    if (this.hl + this.runBytes + s.len > COALESCE_MAX) return false;
    const l3 = this.l3;
    if (this.v6) {
      for (let i = 0; i < 4; i++) if (p[i] !== first[i]) return false; // version, traffic class, flow label
      for (let i = 6; i < IPV6_HDR; i++) if (p[i] !== first[i]) return false; // next header, hop limit, addresses
    } else {
      if (p[1] !== first[1] || p[8] !== first[8]) return false; // TOS, TTL
      for (let i = 12; i < 20; i++) if (p[i] !== first[i]) return false;
      const id = (p[4]! << 8) | p[5]!;
      const prevId = (prev[4]! << 8) | prev[5]!;
      if (id !== ((prevId + 1) & 0xffff)) return false;
    }
    for (let i = 0; i < 4; i++) if (p[l3 + i] !== first[l3 + i]) return false; // ports
    for (let i = 8; i < 12; i++) if (p[l3 + i] !== first[l3 + i]) return false; // ACK number
    if (p[l3 + 14] !== first[l3 + 14] || p[l3 + 15] !== first[l3 + 15]) return false; // window
    for (let i = l3 + TCP_MIN_HDR; i < this.hl; i++) if (p[i] !== first[i]) return false; // options (timestamps)
    return true;
  }
}
