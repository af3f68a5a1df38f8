/**
 * `--tun` mode (Linux): a layer-3 VPN, dual-stack. Each end opens a TUN interface (tundevice.ts) and carries one IP
 * packet (IPv4 or IPv6) per DATA record (PROTOCOL.md §7). This file is the mode: the MTU arithmetic, the server's
 * address pools (one per family) and router, the client's inbound filter, and the CONFIG exchange and app of each
 * side on the serve/connect skeleton of server.ts (PROTOCOL.md §8.5).
 *
 *   client                                   server
 *   CONFIG {mode:"tun", request,      ──▶    per family it has and the client asks for: the requested address
 *           request6, families}               or a free one (v4 lowest first; v6 the v4 host number, else lowest)
 *                                     ◀──    CONFIG {mode:"tun", address, server, routes,        (IPv4)
 *                                                    address6, server6, routes6, mtu}             (IPv6)
 *                                             or a refusal {error, code} (address in use, wrong mode …)
 *
 * The server routes by destination between its own interface and every client, per family: a client may only send
 * from its own address of that family; packets for a connected client go to that client, for the server or outside
 * the subnet to the server's kernel, and for an unassigned address of the subnet or a multicast group are dropped
 * and counted. The client writes into its kernel only packets for its own addresses from the tunnel subnet or a
 * route it accepted (InboundFilter).
 */
import {
  type Cidr,
  type Cidr6,
  cidr6Contains,
  cidrContains,
  formatCidr,
  formatCidr6,
  formatIPv4,
  formatIPv6,
  formatPrefix,
  isCidr6,
  maskOf,
  maskOf6,
  parseCidr,
  parseCidr6,
  parseIPv4,
  parseIPv6,
  parseRoute,
  type Prefix,
} from './address.ts';
import { BLOCK, FRAME_OVERHEAD, TYPE_LEN } from './channel.ts';
import { asVpnError, VpnError } from './errors.ts';
import { log } from './log.ts';
import { type Mode, modeName } from './server.ts';
import { escapeText, type Json, type Session } from './session.ts';
import { type Checked, checkVnet, completeChecksum, GSO_NONE, GSO_TCPV4, readVnetHdr, segment, VNET_HDR_LEN, writeVnetHdr } from './offload.ts';
import { MAX_PAYLOAD } from './channel.ts';
import { hostNetworks, type HostNetworks, ipv4Dst, ipv4Src, ipv6Dst, ipv6Src, isIPv4, isIPv6, packetLength, removeStalePins, TunDevice } from './tundevice.ts';

// ---- MTU: one inner packet should fit one outer TCP segment on a 1500-byte path ----
export const PATH_MTU = 1500;
/** outer IPv6 (40) + TCP (20), or IPv4 (20) + TCP with 20 bytes of options (40): the larger of the usual cases */
export const OUTER_TCPIP_MAX = 60;
/** per packet: 4 length + 16 IV + 32 MAC, the type byte, and up to one block of CBC padding */
export const RECORD_OVERHEAD_MAX = FRAME_OVERHEAD + TYPE_LEN + BLOCK; // 52 + 1 + 16 = 69
/** 1500 − 60 − 69 = 1371 */
export const DEFAULT_MTU = PATH_MTU - OUTER_TCPIP_MAX - RECORD_OVERHEAD_MAX;
/** RFC 791's minimum datagram every host must take */
export const MIN_MTU = 576;
/** RFC 8200 §5: every link that carries IPv6 has an MTU of at least 1280 */
export const MIN_MTU6 = 1280;
/** jumbo frames; also well under the 16 KiB that Bun's reader leaves free for each read(2) */
export const MAX_MTU = 9000;

// ---- Tuning ----
/** Most routes of each family a server pushes, or a client accepts, in one CONFIG (§8.5). */
export const MAX_ROUTES = 32;
/** Drop packets for a peer whose outbound queue is above this (IP is lossy; the inner TCP backs off). */
export const MAX_PEER_QUEUE = 1024 * 1024;

// ---- the server's address pool ----

/**
 * The server's subnet: its own address, and which client holds which host address. Addresses go out lowest first,
 * so an address that was released is the next one handed out.
 */
/** How long a released address is kept for the client that held it (it asks for it again when it reconnects). */
export const RESERVE_MS = 10 * 60_000;
/** At most this many released addresses are remembered (the oldest is forgotten first). */
const RESERVED_MAX = 4096;

export class AddressPool {
  /** released addresses and when: kept for their previous holder for RESERVE_MS */
  private readonly released = new Map<number, number>();
  readonly server: number;
  readonly prefix: number;
  readonly network: number;
  readonly broadcast: number;
  private readonly used = new Set<number>();

  /** Throws USAGE when `server` is not a host address of a subnet with room for clients. */
  constructor(server: Cidr) {
    if (server.prefix < 1 || server.prefix > 30) {
      throw new VpnError('USAGE', `--tun ${formatCidr(server)}: the prefix must be between /1 and /30 to leave room for clients`);
    }
    this.server = server.addr;
    this.prefix = server.prefix;
    const m = maskOf(server.prefix);
    this.network = (server.addr & m) >>> 0;
    this.broadcast = (this.network | ~m) >>> 0;
    if (!this.isHost(server.addr)) {
      throw new VpnError('USAGE', `--tun ${formatCidr(server)}: that is the subnet's network or broadcast address; use a host address such as ${formatIPv4(this.network + 1)}/${this.prefix}`);
    }
  }

  get subnet(): Cidr {
    return { addr: this.network, prefix: this.prefix };
  }

  contains(addr: number): boolean {
    return cidrContains(this.subnet, addr);
  }

  /** A usable host address of the subnet (neither the network nor the broadcast address). */
  isHost(addr: number): boolean {
    return this.contains(addr) && addr !== this.network && addr !== this.broadcast;
  }

  inUse(addr: number): boolean {
    return this.used.has(addr);
  }

  /**
   * Reserve `request` (a client's `--tun ADDR[/PREFIX]`) or, when null, the lowest free address. Returns the address,
   * or a VpnError (USAGE) that explains the refusal to the client.
   */
  take(request: Cidr | null): number | VpnError {
    const subnet = formatCidr(this.subnet);
    if (request) {
      const a = formatIPv4(request.addr);
      if (request.prefix !== this.prefix) return new VpnError('USAGE', `asked for ${formatCidr(request)}, but the tunnel subnet is ${subnet}; ask for an address with /${this.prefix}`);
      if (!this.isHost(request.addr)) return new VpnError('USAGE', `asked for ${a}, which is not a host address of the tunnel subnet ${subnet}`);
      if (request.addr === this.server) return new VpnError('USAGE', `address ${a} is the server's own address`);
      if (this.used.has(request.addr)) return new VpnError('USAGE', `address ${a} is in use by another client; ask for another or use --tun auto`);
      this.used.add(request.addr);
      this.released.delete(request.addr);
      return request.addr;
    }
    // An address released lately is kept for its previous holder, who asks for it by name when it reconnects
    // (connect --tun remembers it): a first pass skips those, a second takes one only if nothing else is free.
    // Bounded: each pass takes at most `used.size + released.size + 1` steps past the server's address.
    const now = Date.now();
    for (const respectReserved of [true, false]) {
      for (let a = this.network + 1, steps = 0; a < this.broadcast && steps <= this.used.size + this.released.size + 1; a++) {
        if (a === this.server) continue;
        const at = this.released.get(a);
        const reserved = respectReserved && at !== undefined && now - at < RESERVE_MS;
        if (!this.used.has(a) && !reserved) {
          this.used.add(a);
          this.released.delete(a);
          return a;
        }
        steps++;
      }
    }
    return new VpnError('NETWORK', `no free address left in the tunnel subnet ${subnet}`);
  }

  release(addr: number): void {
    this.used.delete(addr);
    this.released.set(addr, Date.now());
    if (this.released.size > RESERVED_MAX) this.released.delete(this.released.keys().next().value!);
  }
}

/**
 * The server's IPv6 subnet: its own address, and which client holds which address. The subnet's first address
 * (the Subnet-Router anycast address, RFC 4291 §2.6.1) is never handed out. `take(null, hint)` gives the address
 * whose host part is `hint` (the client's IPv4 host number: 10.66.0.7 ↔ fd00:66::7) when that one is free, else the
 * lowest free one: deterministic, and easy to read next to the IPv4 address.
 */
export class AddressPool6 {
  readonly server: bigint;
  readonly prefix: number;
  readonly network: bigint;
  /** number of addresses in the subnet */
  readonly size: bigint;
  private readonly used = new Set<bigint>();

  /** Throws USAGE when `server` is not a host address of a subnet with room for clients. */
  constructor(server: Cidr6) {
    if (server.prefix < 1 || server.prefix > 126) {
      throw new VpnError('USAGE', `--tun ${formatCidr6(server)}: the IPv6 prefix must be between /1 and /126 to leave room for clients (/64 is usual)`);
    }
    this.server = server.addr;
    this.prefix = server.prefix;
    this.network = server.addr & maskOf6(server.prefix);
    this.size = 1n << BigInt(128 - server.prefix);
    if (server.addr === this.network) {
      throw new VpnError('USAGE', `--tun ${formatCidr6(server)}: that is the subnet's first address (its Subnet-Router anycast address); use a host address such as ${formatIPv6(this.network + 1n)}/${this.prefix}`);
    }
  }

  get subnet(): Cidr6 {
    return { v6: true, addr: this.network, prefix: this.prefix };
  }

  contains(addr: bigint): boolean {
    return cidr6Contains(this.subnet, addr);
  }

  /** An address of the subnet other than its first. */
  isHost(addr: bigint): boolean {
    return this.contains(addr) && addr !== this.network;
  }

  inUse(addr: bigint): boolean {
    return this.used.has(addr);
  }

  /**
   * Reserve `request` (prefix -1: the subnet's), or when null the address with host part `hint`, or the lowest free
   * one. Returns the address, or a VpnError (USAGE) that explains the refusal to the client.
   */
  take(request: Cidr6 | null, hint: bigint | null = null): bigint | VpnError {
    const subnet = formatCidr6(this.subnet);
    if (request) {
      const a = formatIPv6(request.addr);
      if (request.prefix !== -1 && request.prefix !== this.prefix) return new VpnError('USAGE', `asked for ${formatCidr6(request)}, but the tunnel's IPv6 subnet is ${subnet}; ask for an address with /${this.prefix}`);
      if (!this.isHost(request.addr)) return new VpnError('USAGE', `asked for ${a}, which is not a host address of the tunnel subnet ${subnet}`);
      if (request.addr === this.server) return new VpnError('USAGE', `address ${a} is the server's own address`);
      if (this.used.has(request.addr)) return new VpnError('USAGE', `address ${a} is in use by another client; ask for another or use --tun auto`);
      this.used.add(request.addr);
      return request.addr;
    }
    if (hint !== null && hint > 0n && hint < this.size) {
      const a = this.network + hint;
      if (a !== this.server && !this.used.has(a)) {
        this.used.add(a);
        return a;
      }
    }
    // Bounded: at most `used.size + 1` steps past the server's address find a free one, or the subnet is full.
    for (let a = this.network + 1n, steps = 0; a < this.network + this.size && steps <= this.used.size + 1; a++) {
      if (a === this.server) continue;
      if (!this.used.has(a)) {
        this.used.add(a);
        return a;
      }
      steps++;
    }
    return new VpnError('NETWORK', `no free address left in the tunnel subnet ${subnet}`);
  }

  release(addr: bigint): void {
    this.used.delete(addr);
  }
}

/** A client's tunnel addresses, one per family (null: that family is not in its tunnel). */
export interface TunAddrs {
  v4: number | null;
  v6: bigint | null;
}

/** The server's pools: one per family it carries, at least one. */
export interface TunPools {
  v4: AddressPool | null;
  v6: AddressPool6 | null;
}

const isMulticast6 = (a: bigint) => a >> 120n === 0xffn;
const isLinkLocal6 = (a: bigint) => a >> 118n === 0x3fan; // fe80::/10: never routed, and no TUN here has one

// ---- the server's router ----

/** What the router needs of a client session (a Session). */
export interface RoutePeer {
  writeRecord(p: Uint8Array): boolean;
  readonly queued: number;
}

/** A packet that came with a virtio_net_hdr (offloads, §8.5): its checked header and the whole of it, header first. */
export interface Offloaded {
  c: Checked;
  frame: Uint8Array;
}

/** How a packet goes to a peer: `o` when it came with a header (see carry). */
export type PeerOut = (peer: RoutePeer, p: Uint8Array, o: Offloaded | null) => void;

/**
 * Routes IPv4 and IPv6 packets between the server's interface and its clients by destination address, each family
 * by its own pool and table; counts drops. A packet of a family the tunnel does not carry is dropped as such.
 */
export class TunRouter {
  readonly stats = { fromClients: 0, toClients: 0, toInterface: 0, unknown: 0, spoofed: 0, queueFull: 0, malformed: 0, otherFamily: 0 };
  readonly pools: TunPools;
  private readonly clients4 = new Map<number, RoutePeer>();
  private readonly clients6 = new Map<bigint, RoutePeer>();

  /** `pools`: an IPv4 pool alone (an IPv4-only tunnel), or one pool per family. */
  /**
   * `iface` takes what goes to the server's kernel (with its header when it came with one); `out` (default: one
   * record per packet) carries a packet to a client.
   */
  constructor(
    pools: AddressPool | TunPools,
    private readonly iface: { write(p: Uint8Array, o?: Offloaded | null): boolean },
    private readonly out: PeerOut = (peer, p) => void peer.writeRecord(p),
  ) {
    this.pools = pools instanceof AddressPool ? { v4: pools, v6: null } : pools;
  }

  /** The IPv4 pool (null in an IPv6-only tunnel). */
  get pool(): AddressPool | null {
    return this.pools.v4;
  }

  attach(addr: number | bigint, peer: RoutePeer): void {
    if (typeof addr === 'bigint') this.clients6.set(addr, peer);
    else this.clients4.set(addr, peer);
  }

  /** Forget `addr` if `peer` still holds it. */
  detach(addr: number | bigint, peer: RoutePeer): void {
    if (typeof addr === 'bigint') {
      if (this.clients6.get(addr) === peer) this.clients6.delete(addr);
    } else if (this.clients4.get(addr) === peer) this.clients4.delete(addr);
  }

  has(addr: number | bigint): boolean {
    return typeof addr === 'bigint' ? this.clients6.has(addr) : this.clients4.has(addr);
  }

  /** addresses routed to clients, both families */
  get size(): number {
    return this.clients4.size + this.clients6.size;
  }

  /** A packet the server's kernel sent into the interface (trusted: only its destination matters). */
  fromInterface(p: Uint8Array, o: Offloaded | null = null): void {
    if (isIPv4(p) && this.pools.v4) {
      const dst = ipv4Dst(p);
      const peer = this.clients4.get(dst);
      if (peer) this.toPeer(peer, p, o);
      else this.dropUnknown(formatIPv4(dst), 'the server');
    } else if (isIPv6(p) && this.pools.v6) {
      const dst = ipv6Dst(p);
      const peer = this.clients6.get(dst);
      if (peer) this.toPeer(peer, p, o);
      else this.dropUnknown(formatIPv6(dst), 'the server');
    } else if (isIPv4(p) || isIPv6(p)) this.stats.otherFamily++;
    else this.stats.malformed++;
  }

  /**
   * A packet from the client that holds `from`: only its own source address of the packet's family gets through.
   * A super-segment (`o`) has one IP header for all its segments, so the checks below hold for each of them.
   */
  fromClient(from: TunAddrs, p: Uint8Array, o: Offloaded | null = null): void {
    this.stats.fromClients++;
    if (!(isIPv4(p) || isIPv6(p)) || packetLength(p) !== p.length) {
      this.stats.malformed++;
      return;
    }
    if (isIPv4(p)) {
      const pool = this.pools.v4;
      if (!pool || from.v4 === null) {
        this.stats.otherFamily++;
        return;
      }
      const src = ipv4Src(p);
      if (src !== from.v4) return this.dropSpoofed(formatIPv4(from.v4), formatIPv4(src));
      const dst = ipv4Dst(p);
      const peer = this.clients4.get(dst);
      if (peer) return this.toPeer(peer, p, o);
      const multicastOrBroadcast = dst >>> 28 === 0xe || dst === 0xffffffff || dst === pool.broadcast;
      if (multicastOrBroadcast || (pool.contains(dst) && dst !== pool.server)) return this.dropUnknown(formatIPv4(dst), formatIPv4(src));
    } else {
      const pool = this.pools.v6;
      if (!pool || from.v6 === null) {
        this.stats.otherFamily++;
        return;
      }
      const src = ipv6Src(p);
      if (src !== from.v6) return this.dropSpoofed(formatIPv6(from.v6), formatIPv6(src));
      const dst = ipv6Dst(p);
      const peer = this.clients6.get(dst);
      if (peer) return this.toPeer(peer, p, o);
      // No multicast crosses this router (no NDP or MLD on a point-to-point TUN link), and no link-local address.
      if (isMulticast6(dst) || isLinkLocal6(dst) || (pool.contains(dst) && dst !== pool.server)) return this.dropUnknown(formatIPv6(dst), formatIPv6(src));
    }
    // The server's own address, or beyond the subnet: the server's kernel delivers or forwards it.
    if (this.iface.write(p, o)) this.stats.toInterface++;
  }

  private toPeer(peer: RoutePeer, p: Uint8Array, o: Offloaded | null): void {
    if (peer.queued > MAX_PEER_QUEUE) {
      this.stats.queueFull++;
      return;
    }
    this.out(peer, p, o);
    this.stats.toClients++;
  }

  private dropSpoofed(client: string, src: string): void {
    this.stats.spoofed++;
    log.limited('warn', `spoofed|${client}`, `dropped a packet from client ${client} with source address ${src}`);
  }

  private dropUnknown(dst: string, from: string): void {
    this.stats.unknown++;
    log.limited('info', `unknown|${dst}`, `dropped a packet for unknown destination ${dst} (from ${from})`);
  }

  summary(): string {
    const s = this.stats;
    return `${s.fromClients} packets from clients, ${s.toClients} to clients, ${s.toInterface} to the interface; dropped: ${s.unknown} unknown destination, ${s.spoofed} spoofed source, ${s.queueFull} queue full, ${s.malformed} malformed, ${s.otherFamily} of a family the tunnel does not carry`;
  }
}


// ---- offloads (§8.5): a virtio_net_hdr and a super-segment per record, when both ends can ----

/** What a side names in its CONFIG's `offload`: the header on every record (`csum`) and the GSO kinds it takes. */
export const OFFLOAD_NAMES = ['csum', 'tso4', 'tso6'];
/** What the peer takes, when both CONFIGs hold `csum` (records carry headers both ways); null: plain records. */
export interface PeerOffload {
  tso4: boolean;
  tso6: boolean;
}

/** Whether this process asks its kernel for offloads: yes unless VPN_TUN_OFFLOAD=off (tests, benchmarks, trouble). */
export function offloadWanted(env: Record<string, string | undefined> = process.env): boolean {
  return env.VPN_TUN_OFFLOAD !== 'off' && env.VPN_TUN_OFFLOAD !== '0';
}

/**
 * Read a CONFIG's `offload` field (§8.5). Absent or null: none. Throws an Error naming the field when it is not a
 * list of at most 8 strings. Returns what the peer takes, or null when the list lacks `csum` (plain records).
 */
export function readOffload(v: unknown): PeerOffload | null {
  if (v === undefined || v === null) return null;
  if (!Array.isArray(v) || v.length > 8 || v.some((x) => typeof x !== 'string')) throw new Error('offload must be a list of at most 8 strings');
  if (!v.includes('csum')) return null;
  return { tso4: v.includes('tso4'), tso6: v.includes('tso6') };
}

/**
 * A record from a peer that sends headers, or a read from an offload device: the packet and its checked header, or
 * why it is dropped. From a peer (`mtu` given), every segment of a super-segment must fit the tunnel's MTU.
 */
export function unwrapVnet(rec: Uint8Array, mtu = 65535): { p: Uint8Array; o: Offloaded } | string {
  if (rec.length < VNET_HDR_LEN + 20) return 'too short for a header and a packet';
  const p = rec.subarray(VNET_HDR_LEN);
  const c = checkVnet(readVnetHdr(rec, 0), p, 65535);
  if (typeof c === 'string') return c;
  if (c.hdr.gsoType !== GSO_NONE && c.hdr.hdrLen + c.hdr.gsoSize > mtu) return `segments of ${c.hdr.hdrLen + c.hdr.gsoSize} bytes exceed the MTU ${mtu}`;
  return { p, o: { c, frame: rec } };
}

/**
 * Carry packet `p` to `peer`: as it is to a peer without headers (a super-segment cut into packets with complete
 * checksums, a pending checksum completed); with a header to one with them (a super-segment of a kind it does not
 * take cut into packets, one too long for a record cut into shorter super-segments).
 */
export function carry(peer: RoutePeer, caps: PeerOffload | null, p: Uint8Array, o: Offloaded | null): void {
  if (!o) {
    if (!caps) peer.writeRecord(p);
    else {
      const r = new Uint8Array(VNET_HDR_LEN + p.length); // a zero header: nothing pending
      r.set(p, VNET_HDR_LEN);
      peer.writeRecord(r);
    }
    return;
  }
  const { c, frame } = o;
  const gso = c.hdr.gsoType !== GSO_NONE;
  if (caps) {
    const takes = !gso || (c.hdr.gsoType === GSO_TCPV4 ? caps.tso4 : caps.tso6);
    if (takes && frame.length <= MAX_PAYLOAD) {
      writeVnetHdr(frame, 0, c.hdr);
      peer.writeRecord(frame);
      return;
    }
    const step = takes ? Math.max(1, Math.floor((MAX_PAYLOAD - VNET_HDR_LEN - c.hdr.hdrLen) / c.hdr.gsoSize)) * c.hdr.gsoSize : c.hdr.gsoSize;
    segment(p, c, step, false, (buf, h) => (writeVnetHdr(buf, 0, h), peer.writeRecord(buf)), VNET_HDR_LEN);
    return;
  }
  if (gso) segment(p, c, c.hdr.gsoSize, true, (q) => peer.writeRecord(q));
  else {
    completeChecksum(p, c);
    peer.writeRecord(p);
  }
}

/** Write `p` into the device: with its header when it has one and the device takes them, else as plain packets. */
function toDevice(dev: TunDevice, p: Uint8Array, o: Offloaded | null): boolean {
  if (!o) return dev.writePlain(p);
  if (dev.vnet) {
    writeVnetHdr(o.frame, 0, o.c.hdr);
    return dev.write(o.frame);
  }
  if (o.c.hdr.gsoType === GSO_NONE) {
    completeChecksum(p, o.c);
    return dev.write(p);
  }
  let ok = true;
  segment(p, o.c, o.c.hdr.gsoSize, true, (q) => (ok = dev.write(q) && ok));
  return ok;
}

/** The `offload` field this side sends: what its device does (nothing without offloads). */
const offloadField = (dev: TunDevice): Json => (dev.vnet ? { offload: OFFLOAD_NAMES } : {});

// ---- the client's inbound filter ----

/**
 * What the client writes into its kernel: a packet of a family its tunnel carries, whose length field is its length,
 * whose destination is the client's own address of that family (no broadcast, no multicast: TUN is point-to-point,
 * no ARP, NDP or MLD runs on it), and whose source is in the tunnel subnet of that family or in a route the client
 * accepted. Everything else is dropped and counted — an authenticated but hostile server cannot inject packets
 * from addresses the client never routed into the tunnel.
 */
export class InboundFilter {
  readonly stats = { accepted: 0, malformed: 0, otherFamily: 0, notForUs: 0, badSource: 0 };

  /** `own`: the client's addresses; `from4`/`from6`: the tunnel subnet and the accepted routes of each family. */
  constructor(
    private readonly own: TunAddrs,
    private readonly from4: Cidr[],
    private readonly from6: Cidr6[],
  ) {}

  /** Whether `p` may go into the client's kernel; counts (and logs, rate-limited) what may not. */
  check(p: Uint8Array): boolean {
    const v4 = isIPv4(p);
    if (!(v4 || isIPv6(p)) || packetLength(p) !== p.length) {
      this.stats.malformed++;
      return false;
    }
    let ok: boolean;
    if (v4) {
      if (this.own.v4 === null) return this.drop('otherFamily');
      if (ipv4Dst(p) !== this.own.v4) return this.drop('notForUs', formatIPv4(ipv4Dst(p)));
      const src = ipv4Src(p);
      ok = this.from4.some((c) => cidrContains(c, src));
      if (!ok) return this.drop('badSource', formatIPv4(src));
    } else {
      if (this.own.v6 === null) return this.drop('otherFamily');
      if (ipv6Dst(p) !== this.own.v6) return this.drop('notForUs', formatIPv6(ipv6Dst(p)));
      const src = ipv6Src(p);
      ok = this.from6.some((c) => cidr6Contains(c, src));
      if (!ok) return this.drop('badSource', formatIPv6(src));
    }
    this.stats.accepted++;
    return true;
  }

  private drop(why: 'otherFamily' | 'notForUs' | 'badSource', addr = ''): false {
    this.stats[why]++;
    if (why === 'notForUs') log.limited('info', `inbound dst|${addr}`, `dropped a packet from the server for ${addr}, which is not this client's address`);
    if (why === 'badSource') log.limited('warn', `inbound src|${addr}`, `dropped a packet from the server with source address ${addr}, outside the tunnel subnet and every accepted route`);
    return false;
  }

  summary(): string {
    const s = this.stats;
    return `${s.malformed} malformed, ${s.otherFamily} of a family the tunnel does not carry, ${s.notForUs} not for this client, ${s.badSource} from a source outside the tunnel and its routes`;
  }
}

// ---- serve --tun: the CONFIG answer ----

const FAMILY4 = 'ipv4';
const FAMILY6 = 'ipv6';

/** What a server answers with besides the addresses. */
export interface TunOffer {
  mtu: number;
  routes: Cidr[];
  routes6: Cidr6[];
}

/**
 * The server's side of §8.5: read the client's CONFIG (`request`, `request6`, `families`; a client that sends no
 * `families` is an IPv4-only one), reserve one address per family both sides have, and build the answer. Returns
 * the answer and the addresses reserved (release them when the session ends), or a VpnError that refuses the
 * session; nothing stays reserved then.
 */
export function answerTunClient(peer: Json, pools: TunPools, offer: TunOffer): { answer: Json; addrs: TunAddrs } | VpnError {
  if (peer.mode !== 'tun') {
    return new VpnError('USAGE', `this server runs in TUN mode and the client asked for ${modeName(peer.mode)}; connect with --tun auto`);
  }
  let request: Cidr | null = null;
  if (typeof peer.request === 'string') {
    try {
      request = parseCidr(peer.request, 'requested address', -1);
    } catch {
      return new VpnError('USAGE', `cannot read the requested address "${escapeText(peer.request, 40)}"`);
    }
  } else if (peer.request !== null && peer.request !== undefined) {
    return new VpnError('USAGE', 'the requested address must be a string or null');
  }
  let request6: Cidr6 | null = null;
  if (typeof peer.request6 === 'string') {
    try {
      request6 = parseCidr6(peer.request6, 'requested IPv6 address', -1);
    } catch {
      return new VpnError('USAGE', `cannot read the requested IPv6 address "${escapeText(peer.request6, 50)}"`);
    }
  } else if (peer.request6 !== null && peer.request6 !== undefined) {
    return new VpnError('USAGE', 'the requested IPv6 address must be a string or null');
  }
  let families: unknown[] = [FAMILY4];
  if (peer.families !== undefined) {
    if (!Array.isArray(peer.families) || peer.families.length > 8) return new VpnError('USAGE', 'families must be a list of at most 8 strings');
    families = peer.families;
  }
  const { v4: pool4, v6: pool6 } = pools;
  const carried = [pool4 && `IPv4 (${formatCidr(pool4.subnet)})`, pool6 && `IPv6 (${formatCidr6(pool6.subnet)})`].filter(Boolean).join(' and ');
  if (request && !pool4) return new VpnError('USAGE', `asked for ${formatIPv4(request.addr)}, but this tunnel carries no IPv4, only ${carried}`);
  if (request6 && !pool6) return new VpnError('USAGE', `asked for ${formatIPv6(request6.addr)}, but this tunnel carries no IPv6, only ${carried}`);
  const give4 = pool4 !== null && (request !== null || families.includes(FAMILY4));
  const give6 = pool6 !== null && (request6 !== null || families.includes(FAMILY6));
  if (!give4 && !give6) {
    const asked = families.filter((x) => x === FAMILY4 || x === FAMILY6).join(', ') || 'no family it knows';
    return new VpnError('USAGE', `this tunnel carries ${carried} only, and the client asked for ${asked}${pool6 ? '; an IPv6 client needs --mtu 1280 or more (or the default) and a version of vpn that speaks IPv6' : ''}`);
  }
  const addrs: TunAddrs = { v4: null, v6: null };
  const answer: Json = { mode: 'tun' };
  if (give4) {
    if (request && request.prefix === -1) request = { addr: request.addr, prefix: pool4.prefix };
    const got = pool4.take(request);
    if (got instanceof VpnError) return got;
    addrs.v4 = got;
    Object.assign(answer, { address: `${formatIPv4(got)}/${pool4.prefix}`, server: formatIPv4(pool4.server), routes: offer.routes.map(formatCidr) });
  }
  if (give6) {
    const hint = addrs.v4 === null ? null : BigInt((addrs.v4 - pool4!.network) >>> 0);
    const got = pool6.take(request6, hint);
    if (got instanceof VpnError) {
      if (addrs.v4 !== null) pool4!.release(addrs.v4);
      return got;
    }
    addrs.v6 = got;
    Object.assign(answer, { address6: `${formatIPv6(got)}/${pool6.prefix}`, server6: formatIPv6(pool6.server), routes6: offer.routes6.map(formatCidr6) });
  }
  answer.mtu = offer.mtu;
  return { answer, addrs };
}

/** `10.66.0.2 and fd00:66::2`: a client's addresses for a log line. */
function addrsText(a: TunAddrs): string {
  return [a.v4 === null ? null : formatIPv4(a.v4), a.v6 === null ? null : formatIPv6(a.v6)].filter((x) => x !== null).join(' and ');
}

// ---- serve --tun ----

export interface TunServerOptions {
  /** the server's own IPv4 address and the subnet it hands out, or null for an IPv6-only tunnel */
  address: Cidr | null;
  /** the same for IPv6, or null for an IPv4-only tunnel */
  address6: Cidr6 | null;
  /** interface name pattern (`vpn%d`) */
  name: string;
  /** at least MIN_MTU6 when address6 is set (vpn.ts checks) */
  mtu: number;
  /** pushed to every client: IPv4 routes (needs `address`) and IPv6 routes (needs `address6`) */
  routes: Cidr[];
  routes6: Cidr6[];
  /** `--keyring`: the addresses bound to each client key (keyring.ts TunBindings); a keyed client gets exactly those */
  bindings?: { of(name: string): { v4: number | null; v6: bigint | null } };
}

/**
 * A keyring client's CONFIG with its bound addresses as the request (§8.5): the key decides the address, never the
 * client. A request for another address is refused; a previous session still holding the address is ended (the
 * client reconnected before the server noticed the old connection was gone), as WireGuard's latest handshake wins.
 */
function boundRequest(peer: Json, name: string, b: { v4: number | null; v6: bigint | null }, pools: TunPools, holder: (a: number | bigint) => Session | undefined): Json | VpnError {
  const asked = [typeof peer.request === 'string' ? peer.request : null, typeof peer.request6 === 'string' ? peer.request6 : null];
  const mine = [b.v4 === null ? null : formatIPv4(b.v4), b.v6 === null ? null : formatIPv6(b.v6)];
  for (const a of asked) {
    if (a === null) continue;
    const bare = a.replace(/\/\d+$/, '');
    if (!mine.includes(bare)) return new VpnError('USAGE', `asked for ${escapeText(a, 50)}, but the key of ${name} is bound to ${mine.filter((x) => x !== null).join(' and ') || 'no address'} on this server; connect with --tun auto`);
  }
  for (const a of [b.v4, b.v6]) {
    if (a === null) continue;
    const old = holder(a);
    if (old) {
      log.warn(`a new session of ${name} takes over ${typeof a === 'bigint' ? formatIPv6(a) : formatIPv4(a)} from its previous one (${old.peer})`);
      old.refuse(new VpnError('NETWORK', `replaced by a newer session of ${name}`));
    }
  }
  // The families the client asked for (an old client sends none: IPv4 only), each at its bound address.
  const families = Array.isArray(peer.families) ? peer.families : [FAMILY4];
  const want4 = asked[0] !== null || families.includes(FAMILY4);
  const want6 = asked[1] !== null || families.includes(FAMILY6);
  return {
    ...peer,
    request: !want4 || b.v4 === null || !pools.v4 ? null : `${formatIPv4(b.v4)}/${pools.v4.prefix}`,
    request6: !want6 || b.v6 === null || !pools.v6 ? null : `${formatIPv6(b.v6)}/${pools.v6.prefix}`,
    families: [...(want4 && b.v4 !== null ? [FAMILY4] : []), ...(want6 && b.v6 !== null ? [FAMILY6] : [])],
  };
}

/**
 * `serve --tun ADDR/PREFIX [--tun ADDR6/PREFIX]`: create and bring up the server's interface; returns the mode for
 * `serve` and `close`, which removes the interface and logs the counters. Throws USAGE when the interface cannot be
 * made or a prefix leaves no room for clients.
 */
export function openTunServer(o: TunServerOptions): { mode: Mode; close(): void } {
  const pools: TunPools = { v4: o.address ? new AddressPool(o.address) : null, v6: o.address6 ? new AddressPool6(o.address6) : null };
  if (!pools.v4 && !pools.v6) throw new VpnError('USAGE', 'serve --tun needs an IPv4 or IPv6 prefix');
  const offer: TunOffer = { mtu: o.mtu, routes: o.routes, routes6: o.routes6 };
  const own: Prefix[] = [o.address, o.address6].filter((x) => x !== null);
  const dev = TunDevice.create(o.name, offloadWanted());
  const onExit = () => dev.close();
  process.on('exit', onExit);
  try {
    dev.up(own, o.mtu);
  } catch (e) {
    dev.close();
    throw e;
  }
  /** what each client takes when both CONFIGs named offloads (records carry headers both ways) */
  const caps = new Map<RoutePeer, PeerOffload>();
  let badOffload = 0;
  const router = new TunRouter(pools, { write: (p, x) => toDevice(dev, p, x ?? null) }, (peer, p, x) => carry(peer, caps.get(peer) ?? null, p, x));
  dev.start((f) => {
    if (!dev.vnet) return router.fromInterface(f);
    const u = unwrapVnet(f);
    if (typeof u === 'string') {
      badOffload++;
      return;
    }
    router.fromInterface(u.p, u.o);
  });
  const routes = [...o.routes, ...o.routes6].map(formatPrefix);
  log.info(`tun ${dev.name} up: ${own.map(formatPrefix).join(' ')}, mtu ${o.mtu}${routes.length ? `, pushing routes ${routes.join(' ')}` : ''}${dev.vnet ? ', offloads on' : ''}`);
  const addrs = new Map<Session, TunAddrs>();

  const release = (a: TunAddrs, s: Session) => {
    if (a.v4 !== null) {
      router.detach(a.v4, s);
      pools.v4?.release(a.v4);
    }
    if (a.v6 !== null) {
      router.detach(a.v6, s);
      pools.v6?.release(a.v6);
    }
  };

  const mode: Mode = {
    onShutdown: 'close', // packets are no stream to cut: tell every client we are going
    config: (peer: Json, session: Session): Json | VpnError => {
      let takes: PeerOffload | null;
      try {
        takes = readOffload(peer.offload);
      } catch (e) {
        return new VpnError('USAGE', (e as Error).message);
      }
      const name = session.clientName;
      if (o.bindings && name !== null && peer.mode === 'tun') {
        const holder = (a: number | bigint) => [...addrs].find(([, x]) => x.v4 === a || x.v6 === a)?.[0];
        const bound = boundRequest(peer, name, o.bindings.of(name), pools, holder);
        if (bound instanceof VpnError) return bound;
        peer = bound;
      }
      const r = answerTunClient(peer, pools, offer);
      if (r instanceof VpnError) return r;
      addrs.set(session, r.addrs);
      if (dev.vnet && takes) caps.set(session, takes);
      return { ...r.answer, ...offloadField(dev) };
    },
    describe: (s) => `client ${s.clientName === null ? s.peer : `${s.clientName} ${s.peer}`} is ${addrsText(addrs.get(s)!)} (protocol v${s.version})`,
    app: (session) => ({
      onOpen: (s) => {
        const a = addrs.get(s)!;
        if (a.v4 !== null) router.attach(a.v4, s);
        if (a.v6 !== null) router.attach(a.v6, s);
        s.tunnel = addrsText(a).split(' and ');
      },
      onData: (rec) => {
        if (!caps.has(session)) return router.fromClient(addrs.get(session)!, rec);
        const u = unwrapVnet(rec, o.mtu);
        if (typeof u === 'string') {
          badOffload++;
          log.limited('warn', `vnet|${session.peer}`, `dropped a packet from client ${session.clientName ?? session.peer} with a bad offload header: ${u}`);
          return;
        }
        router.fromClient(addrs.get(session)!, u.p, u.o);
      },
      onPeerClose: () => session.close(),
      onEnd: (err) => {
        caps.delete(session);
        const a = addrs.get(session);
        if (a === undefined) return;
        addrs.delete(session);
        release(a, session);
        const secs = ((Date.now() - session.startedAt) / 1000).toFixed(1);
        const why = err ? err.message : 'clean end';
        const n = (a.v4 !== null ? 1 : 0) + (a.v6 !== null ? 1 : 0);
        const line = `client ${addrsText(a)} (${session.clientName === null ? session.peer : `${session.clientName} ${session.peer}`}) gone after ${secs} s, ${session.bytesIn} bytes in, ${session.bytesOut} bytes out: ${why}; ${n > 1 ? 'addresses' : 'address'} released`;
        if (err) log.warn(line);
        else log.info(line);
      },
    }),
  };
  return {
    mode,
    close: () => {
      dev.close();
      process.off('exit', onExit);
      log.info(`tun stats: ${router.summary()}; ${dev.stats.read} read from ${dev.name}, ${dev.stats.written} written, ${dev.stats.malformed} malformed reads, ${badOffload} bad offload headers`);
    },
  };
}

// ---- connect --tun ----

export interface TunClientOptions {
  /** the IPv4 address asked for (prefix -1: the server's), or null for any */
  request: Cidr | null;
  /** the IPv6 address asked for (prefix -1: the server's), or null for any */
  request6: Cidr6 | null;
  /** whether to ask for IPv6 at all (false when --mtu is below MIN_MTU6) */
  ipv6: boolean;
  name: string;
  /** overrides the server's MTU */
  mtu?: number;
  /** sent through the tunnel besides the server's, either family (0.0.0.0/0 and ::/0 go in as their two halves) */
  routes: Prefix[];
  /** `--accept-routes`: install the routes the server pushes (those that pass routePlan's checks) */
  acceptRoutes?: boolean;
}

/** The server's answer, checked: one part per family it gave the client. */
export interface TunAnswer {
  v4: { address: Cidr; server: number; routes: Cidr[] } | null;
  v6: { address: Cidr6; server: bigint; routes: Cidr6[] } | null;
  mtu: number;
  /** what the server takes in records with headers (its `offload`), null: plain records */
  offload: PeerOffload | null;
}

/** The network of `c` (host bits cleared). */
const network4 = (c: Cidr): Cidr => ({ addr: (c.addr & maskOf(c.prefix)) >>> 0, prefix: c.prefix });
const network6 = (c: Cidr6): Cidr6 => ({ v6: true, addr: c.addr & maskOf6(c.prefix), prefix: c.prefix });

/**
 * The prefixes a client takes for its tunnel address (§8.5). IPv4: /8 at the widest (a wider one would make most of
 * the address space "on the link" of the tunnel, a default route in disguise) to /30 (the narrowest with a server
 * and a client besides network and broadcast). IPv6: /64 at the widest (the usual subnet, RFC 4291 §2.5.1 and
 * RFC 7421; a wider "on-link" prefix captures whole sites or all of 2000::/3) to /126 (the narrowest our server's
 * pool has room in, since it never hands out the subnet's first, anycast, address; /127 and /128 leave none).
 */
export const MIN_PREFIX4 = 8;
export const MAX_PREFIX4 = 30;
export const MIN_PREFIX6 = 64;
export const MAX_PREFIX6 = 126;
/** Pushed routes wider than these are default routes in disguise (0.0.0.0/1 + 128.0.0.0/1) and are never installed. */
export const MIN_PUSHED_PREFIX4 = 8;
export const MIN_PUSHED_PREFIX6 = 16;

/** Whether prefixes `a` and `b` (either family) share any address: one contains the other. */
export function overlaps(a: Prefix, b: Prefix): boolean {
  if (isCidr6(a) !== isCidr6(b)) return false;
  const p = Math.min(a.prefix, b.prefix);
  if (isCidr6(a)) return (a.addr & maskOf6(p)) === ((b as Cidr6).addr & maskOf6(p));
  return ((a.addr & maskOf(p)) >>> 0) === (((b as Cidr).addr & maskOf(p)) >>> 0);
}

const isDefault = (c: Prefix) => c.prefix === 0;

/** The user's own routes as installed: 0.0.0.0/0 as 0.0.0.0/1 and 128.0.0.0/1, ::/0 as ::/1 and 8000::/1 (no existing default route is touched; the halves are more specific and win), duplicates once. */
export function expandOwnRoutes(routes: Prefix[]): Prefix[] {
  const out: Prefix[] = [];
  const seen = new Set<string>();
  for (const r of routes) {
    const parts: Prefix[] = !isDefault(r)
      ? [r]
      : isCidr6(r)
        ? [{ v6: true, addr: 0n, prefix: 1 }, { v6: true, addr: 1n << 127n, prefix: 1 }]
        : [{ addr: 0, prefix: 1 }, { addr: 0x80000000, prefix: 1 }];
    for (const p of parts) {
      const k = formatPrefix(p);
      if (!seen.has(k)) {
        seen.add(k);
        out.push(p);
      }
    }
  }
  return out;
}

/** What a client installs for one answer, and what it leaves out and why. */
export interface RoutePlan {
  /** the routes to have through the interface: the user's own (expanded) and the pushed ones accepted */
  install: Prefix[];
  /** pushed routes left out, each with the reason (our own text: the prefixes are parsed and formatted again) */
  skipped: { route: Prefix; why: string }[];
  /** pushed routes ignored as a whole (no --accept-routes) */
  ignored: Prefix[];
}

/**
 * The client's policy for the server's answer `a` on a host with `host` (its routes and addresses before the tunnel,
 * the tunnel's own interface left out). Throws USAGE when the tunnel address itself cannot be taken: its subnet
 * overlaps an address or a route (other than a default route) the host has. Pushed routes go in only with `accept`,
 * and then never a default route or one wider than /8 (IPv6: /16), never one overlapping the tunnel subnets, an
 * address of the host or a route of the host other than its default route (the tunnel's more specific route
 * would take that traffic away); a duplicate of the user's own is left out silently.
 */
export function routePlan(a: TunAnswer, own: Prefix[], accept: boolean, host: HostNetworks): RoutePlan {
  const tunnel: Prefix[] = [a.v4 && network4(a.v4.address), a.v6 && network6(a.v6.address)].filter((x) => x !== null);
  const hostClash = (c: Prefix): string | null => {
    for (const h of host.addrs) if (overlaps(c, h.prefix)) return `this host's address ${formatPrefix(h.prefix)} on ${h.dev}`;
    for (const r of host.routes) if (!isDefault(r.prefix) && overlaps(c, r.prefix)) return `this host's route ${formatPrefix(r.prefix)}${r.dev ? ` via ${r.dev}` : ''}`;
    return null;
  };
  for (const t of tunnel) {
    const clash = hostClash(t);
    if (clash) throw new VpnError('USAGE', `the server handed out a tunnel address in ${formatPrefix(t)}, which overlaps ${clash}; refusing it (give the server another subnet, or ask for another with --tun)`);
  }
  const install = expandOwnRoutes(own);
  const pushed: Prefix[] = [...(a.v4?.routes ?? []), ...(a.v6?.routes ?? [])];
  if (!accept) return { install, skipped: [], ignored: pushed };
  const skipped: RoutePlan['skipped'] = [];
  const have = new Set(install.map(formatPrefix));
  for (const r of pushed) {
    const k = formatPrefix(r);
    if (have.has(k)) continue;
    let why: string | null = null;
    if (isDefault(r)) why = 'a default route is never taken from a server (route everything yourself with --route ' + (isCidr6(r) ? '::/0' : '0.0.0.0/0') + ')';
    else if (r.prefix < (isCidr6(r) ? MIN_PUSHED_PREFIX6 : MIN_PUSHED_PREFIX4)) why = `it is wider than /${isCidr6(r) ? MIN_PUSHED_PREFIX6 : MIN_PUSHED_PREFIX4}, a default route in all but name`;
    else {
      const t = tunnel.find((x) => overlaps(r, x));
      why = t ? `it overlaps the tunnel subnet ${formatPrefix(t)}` : hostClash(r) && `it overlaps ${hostClash(r)}`;
    }
    if (why) skipped.push({ route: r, why });
    else {
      have.add(k);
      install.push(r);
    }
  }
  // IPv4 first, then IPv6; the user's own before the pushed ones within each family
  return { install: [...install.filter((r) => !isCidr6(r)), ...install.filter(isCidr6)], skipped, ignored: [] };
}

function routeList<T>(value: unknown, field: string, parse: (t: string) => T): T[] {
  if (value !== undefined && !Array.isArray(value)) throw new Error(`${field} must be a list`);
  const list = (value as unknown[] | undefined) ?? [];
  if (list.length > MAX_ROUTES) throw new Error(`more than ${MAX_ROUTES} ${field}`);
  return list.map((r) => parse(String(r)));
}

/**
 * Read the server's TUN answer (§8.5): `address` (A.B.C.D/N), `server` (A.B.C.D), `routes`; `address6` (IPv6/N),
 * `server6` (IPv6), `routes6`; at least one family; `mtu` (MIN_MTU … MAX_MTU, at least MIN_MTU6 with IPv6); routes at
 * most MAX_ROUTES network prefixes of their family. IPv6 is refused when `asked6` is false. Throws USAGE naming the
 * field: the server is authenticated, so a bad answer is a broken or hostile server, not tampering on the path.
 */
export function readTunAnswer(peer: Json, asked6: boolean): TunAnswer {
  try {
    const has4 = peer.address !== undefined && peer.address !== null;
    const has6 = peer.address6 !== undefined && peer.address6 !== null;
    if (!has4 && !has6) throw new Error('address or address6 is required');
    const mtu = Number(peer.mtu);
    if (!Number.isInteger(mtu) || mtu < MIN_MTU || mtu > MAX_MTU) throw new Error(`mtu must be a whole number from ${MIN_MTU} to ${MAX_MTU}`);
    let v4: TunAnswer['v4'] = null;
    if (has4) {
      const address = parseCidr(String(peer.address), 'address');
      if (address.prefix < MIN_PREFIX4 || address.prefix > MAX_PREFIX4) throw new Error(`address needs a prefix from /${MIN_PREFIX4} to /${MAX_PREFIX4}, got ${formatCidr(address)}`);
      const net = network4(address);
      const broadcast = (net.addr | ~maskOf(address.prefix)) >>> 0;
      if (address.addr === net.addr || address.addr === broadcast) throw new Error(`address ${formatCidr(address)} is not a host address of its subnet`);
      const server = parseIPv4(String(peer.server));
      if (server === null) throw new Error('server must be an IPv4 address');
      if (!cidrContains(net, server) || server === net.addr || server === broadcast) throw new Error(`server ${formatIPv4(server)} is not a host address of the subnet ${formatCidr(net)} of address ${formatCidr(address)}`);
      if (server === address.addr) throw new Error(`address ${formatCidr(address)} is the server's own`);
      v4 = { address, server, routes: routeList(peer.routes, 'routes', (t) => parseRoute(t, 'route')) };
    }
    let v6: TunAnswer['v6'] = null;
    if (has6) {
      if (!asked6) throw new Error('address6 was sent, but this client asked for IPv4 only');
      if (mtu < MIN_MTU6) throw new Error(`mtu must be at least ${MIN_MTU6} with IPv6, got ${mtu}`);
      const address = parseCidr6(String(peer.address6), 'address6');
      if (address.prefix < MIN_PREFIX6 || address.prefix > MAX_PREFIX6) throw new Error(`address6 needs a prefix from /${MIN_PREFIX6} to /${MAX_PREFIX6}, got ${formatCidr6(address)}`);
      const net = network6(address);
      if (address.addr === net.addr) throw new Error(`address6 ${formatCidr6(address)} is its subnet's first (Subnet-Router anycast) address`);
      const server = parseIPv6(String(peer.server6));
      if (server === null) throw new Error('server6 must be an IPv6 address');
      if (!cidr6Contains(net, server) || server === net.addr) throw new Error(`server6 ${formatIPv6(server)} is not a host address of the subnet ${formatCidr6(net)} of address6 ${formatCidr6(address)}`);
      if (server === address.addr) throw new Error(`address6 ${formatCidr6(address)} is the server's own`);
      const route6 = (t: string) => {
        const c = parseCidr6(t, 'route6');
        if ((c.addr & maskOf6(c.prefix)) !== c.addr) throw new Error(`route6 ${t} has host bits set`);
        return c;
      };
      v6 = { address, server, routes: routeList(peer.routes6, 'routes6', route6) };
    }
    return { v4, v6, mtu, offload: readOffload(peer.offload) };
  } catch (e) {
    throw new VpnError('USAGE', `the server sent a TUN configuration this client cannot use (${escapeText((e as Error).message)})`);
  }
}


/**
 * `connect HOST:PORT --tun auto|ADDR[/PREFIX] [--tun ADDR6[/PREFIX]]`: create the interface first (local problems
 * end the run before the server sees us); the mode asks for both families (IPv4 only when `ipv6` is false), takes
 * the addresses the server hands out and carries packets through the inbound filter. `close` removes the interface
 * and logs the counters. Throws USAGE when the interface cannot be made.
 */
export function openTunClient(o: TunClientOptions): { mode: Mode; close(): void } {
  // A client killed with SIGKILL cannot remove the host route it pinned to its server: the next one does.
  for (const r of removeStalePins()) log.info(`removed the host route ${r} that a vpn client killed before it could remove it had left behind`);
  const dev = TunDevice.create(o.name, offloadWanted());
  const onExit = () => dev.close();
  process.on('exit', onExit);
  /** what the server takes when both CONFIGs named offloads (records carry headers both ways), else null */
  let caps: PeerOffload | null = null;
  let mtuNow = o.mtu ?? DEFAULT_MTU;
  let badOffload = 0;
  // What the next CONFIG asks for: the user's request first; after a session, the addresses it got, so that a
  // reconnect (server.ts connectOne with `reconnect`) gets the same ones back from a server that kept them.
  let request = o.request ? (o.request.prefix === -1 ? formatIPv4(o.request.addr) : formatCidr(o.request)) : null;
  let request6 = o.request6 ? (o.request6.prefix === -1 ? formatIPv6(o.request6.addr) : formatCidr6(o.request6)) : null;
  const families = o.ipv6 ? [FAMILY4, FAMILY6] : [FAMILY4];
  let dropped = 0;
  let otherFamily = 0;
  let offline = 0;
  let filter: InboundFilter | null = null;
  /** the interface's set-up so far (addresses, MTU, routes), to tell a reconnect that changes nothing */
  let shape: string | null = null;
  /** the session that packets read from the interface go to; null between sessions (they are dropped) */
  let current: Session | null = null;
  /** the routes this client has through the interface (each added once, never replaced), and for the log line */
  let installed: Prefix[] = [];
  let routes: Prefix[] = [];
  /** lines logged once per run (a skipped route is not logged again on every reconnect) */
  const noted = new Set<string>();
  const once = (key: string, level: 'info' | 'warn', line: string) => {
    if (noted.has(key)) return;
    noted.add(key);
    log[level](line);
  };
  let carries4 = false;
  let carries6 = false;
  const toTunnel = (f: Uint8Array) => {
    const sess = current;
    if (!sess || !sess.sending) {
      offline++;
      return;
    }
    let p = f;
    let x: Offloaded | null = null;
    if (dev.vnet) {
      const u = unwrapVnet(f);
      if (typeof u === 'string') {
        badOffload++;
        return;
      }
      p = u.p;
      x = u.o;
    }
    if (isIPv4(p) ? !carries4 : isIPv6(p) ? !carries6 : true) {
      otherFamily++;
      return;
    }
    if (sess.queued > MAX_PEER_QUEUE) {
      dropped++;
      return;
    }
    carry(sess, caps, p, x);
  };
  const mode: Mode = {
    onShutdown: 'close',
    config: () => ({ mode: 'tun', request, ...(request6 ? { request6 } : {}), families, ...offloadField(dev) }),
    accept: (answer) =>
      answer.mode === 'tun' ? null : new VpnError('USAGE', `the server is not in TUN mode (it answered ${modeName(answer.mode)}); start it with serve --tun ADDR/PREFIX`),
    app: (session, link) => ({
      onOpen: (sess: Session, peer: Json) => {
        try {
          const a = readTunAnswer(peer, o.ipv6);
          if (o.request && !a.v4) throw new VpnError('USAGE', `asked for ${request}, but the server's tunnel carries no IPv4`);
          if (o.request6 && !a.v6) throw new VpnError('USAGE', `asked for ${request6}, but the server's tunnel carries no IPv6`);
          const own4 = o.routes.filter((r): r is Cidr => !isCidr6(r));
          const own6 = o.routes.filter(isCidr6);
          if (own4.length && !a.v4) throw new VpnError('USAGE', `--route ${formatCidr(own4[0]!)} is IPv4, and the server's tunnel carries no IPv4`);
          if (own6.length && !a.v6) throw new VpnError('USAGE', `--route ${formatCidr6(own6[0]!)} is IPv6, and the server's tunnel carries no IPv6`);
          const mtu = o.mtu ?? a.mtu;
          const addrs = [a.v4?.address, a.v6?.address].filter((x) => x !== undefined);
          const pushed = [...(a.v4?.routes ?? []), ...(a.v6?.routes ?? [])];
          const next = JSON.stringify([addrs.map(formatPrefix), mtu, pushed.map(formatPrefix)]);
          const again = shape !== null;
          if (shape !== next) {
            // Checked against the host as it is now, the tunnel's own interface left out: a changed answer on a
            // reconnect passes the same checks as the first.
            const plan = routePlan(a, o.routes, o.acceptRoutes === true, hostNetworks(dev.name));
            if (plan.ignored.length) {
              once(`ignored|${plan.ignored.map(formatPrefix).join(' ')}`, 'info', `ignoring ${plan.ignored.length} ${plan.ignored.length > 1 ? 'routes' : 'route'} pushed by the server (${plan.ignored.map(formatPrefix).join(' ')}); connect with --accept-routes to install them`);
            }
            for (const k of plan.skipped) once(`skip|${formatPrefix(k.route)}|${k.why}`, 'warn', `not installing the route ${formatPrefix(k.route)} pushed by the server: ${k.why}`);
            if (again) dev.readdress(addrs, mtu); // a server that handed out other addresses this time
            else dev.up(addrs, mtu);
            const remote = link.socket.remoteAddress;
            if (remote && !dev.hasPin) {
              const outer4 = parseIPv4(remote);
              const outer6 = outer4 === null ? parseIPv6(remote) : null;
              const covered = plan.install.some((r) => (isCidr6(r) ? outer6 !== null && cidr6Contains(r, outer6) : outer4 !== null && cidrContains(r, outer4)));
              if (covered) dev.pinHostRoute(remote);
            }
            // Reconcile: routes already through the interface (a reconnect) stay and are not added again; routes of
            // an earlier answer that this one lacks go.
            const present = new Set(dev.routes().map(formatPrefix));
            const want = new Set(plan.install.map(formatPrefix));
            for (const r of installed) if (!want.has(formatPrefix(r))) dev.delRoute(r);
            installed = [];
            for (const r of plan.install) {
              if (!present.has(formatPrefix(r))) {
                try {
                  dev.addRoute(r);
                } catch (e) {
                  // A pushed route the host got meanwhile is left out; the user's own route must go in.
                  if (!pushed.some((x) => formatPrefix(x) === formatPrefix(r))) throw e;
                  once(`skip|${formatPrefix(r)}|exists`, 'warn', `not installing the route ${formatPrefix(r)} pushed by the server: ${(e as Error).message}`);
                  continue;
                }
              }
              installed.push(r);
            }
            routes = installed;
            // The inbound filter's "accepted route" sources: only the routes actually installed.
            const from4 = a.v4 ? [network4(a.v4.address), ...installed.filter((r): r is Cidr => !isCidr6(r))] : [];
            const from6 = a.v6 ? [network6(a.v6.address), ...installed.filter(isCidr6)] : [];
            filter = new InboundFilter({ v4: a.v4?.address.addr ?? null, v6: a.v6?.address.addr ?? null }, from4, from6);
            shape = next;
          }
          carries4 = a.v4 !== null;
          carries6 = a.v6 !== null;
          caps = dev.vnet ? a.offload : null;
          // the server's kernel cuts by its own MTU: a client with a smaller --mtu still takes its segments
          mtuNow = Math.max(mtu, a.mtu);
          if (a.v4) request = formatCidr(a.v4.address);
          if (a.v6) request6 = formatCidr6(a.v6.address);
          current = sess;
          if (!again) dev.start(toTunnel);
          const addresses = [a.v4 && formatCidr(a.v4.address), a.v6 && formatCidr6(a.v6.address)].filter(Boolean).join(' ');
          const servers = [a.v4 && formatIPv4(a.v4.server), a.v6 && formatIPv6(a.v6.server)].filter(Boolean).join(' ');
          const via = routes.length ? `, routes ${routes.map(formatPrefix).join(' ')}` : '';
          log.info(`tunnel ${again ? 'back ' : ''}up: ${dev.name} ${addresses}, server ${servers}, mtu ${mtu}${via} (protocol v${sess.version})`);
          if (caps) log.info(`offloads on: records carry super-segments (the server takes ${[caps.tso4 && 'TSO4', caps.tso6 && 'TSO6'].filter(Boolean).join(' and ') || 'checksum offload only'})`);
        } catch (e) {
          sess.refuse(asVpnError(e, 'USAGE'));
        }
      },
      onData: (rec) => {
        if (!caps) {
          if (filter?.check(rec)) dev.writePlain(rec);
          return;
        }
        const u = unwrapVnet(rec, mtuNow);
        if (typeof u === 'string') {
          badOffload++;
          log.limited('warn', 'vnet|server', `dropped a packet from the server with a bad offload header: ${u}`);
          return;
        }
        // One IP header for every segment: the filter's verdict holds for each.
        if (filter?.check(u.p)) toDevice(dev, u.p, u.o);
      },
      onPeerClose: () => session.close(),
      onEnd: () => {
        if (current === session) current = null;
      },
    }),
  };
  return {
    mode,
    close: () => {
      dev.close();
      process.off('exit', onExit);
      const f = filter?.stats;
      if (dev.stats.read + dev.stats.written > 0 || badOffload > 0 || (f && f.malformed + f.otherFamily + f.notForUs + f.badSource > 0)) {
        const inbound = filter ? filter.summary() : 'none';
        log.info(`tun stats: ${dev.stats.read} packets read from ${dev.name}, ${dev.stats.written} written; dropped outbound: ${dropped} queue full, ${otherFamily} of a family the tunnel does not carry, ${offline} while reconnecting; dropped inbound: ${inbound}; ${dev.stats.writeErrors} refused by the kernel, ${dev.stats.malformed} malformed reads, ${badOffload} bad offload headers`);
      }
    },
  };
}
