/**
 * The Linux TUN device and the host around it: /dev/net/tun opened and configured with the TUNSETIFF ioctl through
 * `bun:ffi` (IFF_TUN|IFF_NO_PI: every read(2) is one bare IP packet, every write(2) injects one), iproute2's `ip` for
 * addresses, MTU, links and routes, the preflight checks that say what a host lacks, and the IP header fields the
 * device and the router read.
 *
 * Reading the TUN fd, plain (no offloads): it is opened O_NONBLOCK and read through `Bun.file(fd).stream()`, which
 * polls it on Bun's event loop (epoll) and never blocks it. One chunk may hold several packets (Bun reads until EAGAIN
 * into one buffer, with at least 16 KiB free for each read(2), so with MTU ≤ MAX_MTU no packet is ever cut); IP's own
 * length fields split them again. Writes are one packet per write(2).
 *
 * With offloads (IFF_VNET_HDR + TUNSETOFFLOAD CSUM|TSO4|TSO6, offload.ts): every read(2) and write(2) is a 10-byte
 * virtio_net_hdr and one packet of up to 64 KiB (a TCP super-segment). Bun's reader could cut such a packet (it
 * leaves only "more than 16 KiB" free per read, and a TUN read into a short buffer loses the rest), so this path
 * reads with read(2) through bun:ffi into one 64 KiB + header buffer, a packet per call, until EAGAIN (at most
 * READ_BATCH per turn of the event loop). Readiness comes from the kernel as SIGIO (O_ASYNC, owned by the main
 * thread), one signal per packet queued; where that is refused, from a small worker thread blocked in poll(2) on the
 * fd, which writes one byte to a pipe that the main thread's event loop reads and waits (Atomics) until the main
 * thread has drained the device.
 */
import { closeSync, existsSync, openSync, readFileSync, writeSync, constants as fsc } from 'node:fs';
import { formatPrefix, isCidr6, parsePrefix, type Prefix } from './address.ts';
import { VpnError } from './errors.ts';
import { log } from './log.ts';
import { corked } from './net.ts';
import { Coalescer, VNET_HDR_LEN } from './offload.ts';

// ---- Linux ABI (linux/if_tun.h, linux/if.h, linux/capability.h) ----
const TUN_PATH = '/dev/net/tun';
/** _IOW('T', 202, int) */
const TUNSETIFF = 0x400454ca;
/** _IOW('T', 208, unsigned int) */
const TUNSETOFFLOAD = 0x400454d0;
const IFF_TUN = 0x0001;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const TUN_F_CSUM = 0x01;
const TUN_F_TSO4 = 0x02;
const TUN_F_TSO6 = 0x04;
const EAGAIN = 11;
const POLLIN = 1;
const IFNAMSIZ = 16;
/** sizeof(struct ifreq): the name, then a 24-byte union whose first member is `short ifr_flags` */
const IFREQ_LEN = IFNAMSIZ + 24;
const CAP_NET_ADMIN = 12;
/** keeps the fd (and so the interface) out of child processes such as `ip` */
const O_CLOEXEC = 0o2000000;
const O_NONBLOCK = 0o4000;
const O_ASYNC = 0o20000;
const F_GETFL = 3;
const F_SETFL = 4;
/** fcntl F_SETOWN_EX with struct f_owner_ex { int type; pid_t pid; }, type F_OWNER_TID: signal one thread */
const F_SETOWN_EX = 15;
const F_OWNER_TID = 0;
const EPERM = 1;
const EBUSY = 16;
const EINVAL = 22;
/** The kernel numbers interfaces named with %d: vpn0, vpn1, … */
export const DEFAULT_NAME = 'vpn%d';
/** `ip` answers in milliseconds; a hung one must not hang the VPN. */
const IP_TIMEOUT_MS = 10_000;
/** Offload reads: one packet of at most 64 KiB (IPv6: 40 + 65535) behind its header fits this buffer. */
const VNET_READ_BUF = VNET_HDR_LEN + 40 + 65535;
/** Offload reads per turn of the event loop before socket events get their turn: at most this many packets … */
const READ_BATCH = 64;
/** … and this many bytes (with noble, sealing 256 KiB takes ~9 ms: the peer's ACKs must not wait longer). */
const READ_BUDGET = 256 * 1024;
/** The poller thread wakes this often to see whether the device was closed. */
const POLL_MS = 250;
/** The largest packet the kernel should hand us with offloads: with its header, one record's 65536 bytes. */
export const MAX_SUPER_SEGMENT = 65536 - VNET_HDR_LEN;

// ---- IP packets ----

/** Total length of the IP packet at `off` from its header, or 0 if there is no well-formed header there. */
export function packetLength(b: Uint8Array, off = 0): number {
  const rest = b.length - off;
  if (rest < 1) return 0;
  const version = b[off]! >> 4;
  if (version === 4 && rest >= 20) {
    const len = (b[off + 2]! << 8) | b[off + 3]!;
    return len >= 20 ? len : 0;
  }
  if (version === 6 && rest >= 40) return 40 + ((b[off + 4]! << 8) | b[off + 5]!);
  return 0;
}

export const isIPv4 = (p: Uint8Array) => p.length >= 20 && p[0]! >> 4 === 4;
export const ipv4Src = (p: Uint8Array) => ((p[12]! << 24) | (p[13]! << 16) | (p[14]! << 8) | p[15]!) >>> 0;
export const ipv4Dst = (p: Uint8Array) => ((p[16]! << 24) | (p[17]! << 16) | (p[18]! << 8) | p[19]!) >>> 0;
/** IPv6 header (RFC 8200 §3): version 6 in the first nibble, the source at offset 8, the destination at 24 (16 bytes each). */
export const isIPv6 = (p: Uint8Array) => p.length >= 40 && p[0]! >> 4 === 6;
const u128 = (p: Uint8Array, off: number) => {
  const v = new DataView(p.buffer, p.byteOffset + off, 16);
  return (v.getBigUint64(0) << 64n) | v.getBigUint64(8);
};
export const ipv6Src = (p: Uint8Array) => u128(p, 8);
export const ipv6Dst = (p: Uint8Array) => u128(p, 24);

/** Split a chunk of whole packets read from a TUN fd; returns how many bytes at its end were not a whole packet. */
export function splitPackets(chunk: Uint8Array, onPacket: (p: Uint8Array) => void): number {
  let off = 0;
  while (off < chunk.length) {
    const len = packetLength(chunk, off);
    if (len === 0 || off + len > chunk.length) return chunk.length - off;
    onPacket(chunk.subarray(off, off + len));
    off += len;
  }
  return 0;
}

// ---- the host: preflight checks, `ip`, the device ----

/**
 * Throw USAGE (exit 2) with what to do when this host cannot run `--tun`: not Linux, no root/CAP_NET_ADMIN, no
 * /dev/net/tun, or no iproute2.
 */
export function checkTunSupport(platform: string = process.platform): void {
  if (platform !== 'linux') throw new VpnError('USAGE', `--tun works on Linux only (this is ${platform}); use stdio or port forwarding here`);
  let capEff = -1n;
  try {
    const m = /^CapEff:\s*([0-9a-fA-F]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) capEff = BigInt(`0x${m[1]}`);
  } catch {
    // no /proc: let the ioctl say it
  }
  if (capEff >= 0n && (capEff & (1n << BigInt(CAP_NET_ADMIN))) === 0n) {
    throw new VpnError('USAGE', '--tun needs root or the CAP_NET_ADMIN capability to create a network interface; run it with sudo');
  }
  if (!existsSync(TUN_PATH)) {
    throw new VpnError('USAGE', `${TUN_PATH} does not exist: load the tun module (modprobe tun), or in a container pass the device in (--device ${TUN_PATH})`);
  }
  if (!ipPath()) throw new VpnError('USAGE', "--tun needs iproute2's ip command; install iproute2");
}

/** Where `ip` is looked for, in this order, once: a root process does not search the caller's PATH. */
export const IP_DIRS = ['/usr/sbin', '/sbin', '/usr/bin', '/bin'];
let ipFound: string | null | undefined;
/** The absolute path of `ip` (the first in IP_DIRS), found on the first call and kept; null when there is none. */
export function ipPath(): string | null {
  if (ipFound === undefined) ipFound = Bun.which('ip', { PATH: IP_DIRS.join(':') });
  return ipFound;
}

/**
 * The whole environment an `ip` child gets: a fixed PATH and the C locale (its messages, quoted in ours, stay
 * English); nothing of ours, so never VPN_SECRET.
 */
export function ipEnv(): Record<string, string> {
  return { PATH: IP_DIRS.join(':'), LC_ALL: 'C' };
}

/** Run `ip ARGS`; throws USAGE with ip's own message when it fails. */
function ip(args: string[]): string {
  let r;
  try {
    const path = ipPath();
    if (!path) throw new Error(`no ip in ${IP_DIRS.join(', ')}`);
    r = Bun.spawnSync([path, ...args], { stdin: 'ignore', stdout: 'pipe', stderr: 'pipe', env: ipEnv(), timeout: IP_TIMEOUT_MS, killSignal: 'SIGKILL' });
  } catch (e) {
    throw new VpnError('USAGE', `cannot run ip (${(e as Error).message}); install iproute2`);
  }
  if (r.exitCode !== 0) throw new VpnError('USAGE', `ip ${args.join(' ')} failed: ${r.stderr.toString().trim() || `exit ${r.exitCode}`}`);
  return r.stdout.toString();
}

/**
 * The routing protocol number (RTPROT, 0–255; `ip route … proto 157`) on the host routes a client pins to its server
 * (pinHostRoute), with the pinning process's ID as the route's metric: a route left behind by a client that was
 * killed (SIGKILL) is recognised by both and removed when the next client starts (removeStalePins). 157 is in no
 * iproute2 `rt_protos` list and used by no routing daemon we know of.
 */
export const PIN_PROTO = 157;

/** A prefix of `ip -j` output: `default`, `A.B.C.D`, `A.B.C.D/N`, or the same in IPv6. */
function jsonPrefix(dst: string, v6: boolean): Prefix | null {
  const t = dst === 'default' ? (v6 ? '::/0' : '0.0.0.0/0') : dst.includes('/') ? dst : `${dst}/${v6 ? 128 : 32}`;
  try {
    return parsePrefix(t, 'route');
  } catch {
    return null;
  }
}

interface IpRoute {
  dst: string;
  dev?: string;
  protocol?: string;
  metric?: number;
  type?: string;
}

function ipRoutes(args: string[]): IpRoute[] {
  const out = ip(['-j', ...args]).trim();
  return out ? (JSON.parse(out) as IpRoute[]) : [];
}

/** What a host has before a tunnel is added to it: its routes (main table) and its addresses, both families. */
export interface HostNetworks {
  /** routes of the main table, with the device they go through (`dev` may be empty: blackhole, unreachable) */
  routes: { prefix: Prefix; dev: string }[];
  /** every address of every interface, with its prefix length */
  addrs: { prefix: Prefix; dev: string }[];
}

/**
 * The host's routes (`ip -4/-6 route show`) and addresses (`ip addr show`), leaving out interface `exceptDev` (the
 * tunnel's own, on a reconnect) and host routes pinned by a vpn client (PIN_PROTO): what a server's answer must not
 * overlap. Throws USAGE when `ip` fails.
 */
export function hostNetworks(exceptDev: string): HostNetworks {
  const routes: HostNetworks['routes'] = [];
  for (const v6 of [false, true]) {
    for (const r of ipRoutes([v6 ? '-6' : '-4', 'route', 'show'])) {
      if (r.dev === exceptDev || r.protocol === String(PIN_PROTO)) continue;
      const prefix = jsonPrefix(r.dst, v6);
      if (prefix) routes.push({ prefix, dev: r.dev ?? '' });
    }
  }
  const addrs: HostNetworks['addrs'] = [];
  const links = JSON.parse(ip(['-j', 'addr', 'show']).trim() || '[]') as { ifname: string; addr_info?: { family: string; local?: string; prefixlen?: number }[] }[];
  for (const l of links) {
    if (l.ifname === exceptDev) continue;
    for (const a of l.addr_info ?? []) {
      if ((a.family !== 'inet' && a.family !== 'inet6') || !a.local || a.prefixlen === undefined) continue;
      try {
        addrs.push({ prefix: parsePrefix(`${a.local}/${a.prefixlen}`, 'address'), dev: l.ifname });
      } catch {
        // not an address we can read (a zone, say): it cannot collide with a tunnel address either
      }
    }
  }
  return { routes, addrs };
}

/**
 * Remove host routes pinned by vpn clients that no longer run (killed with SIGKILL before they could remove them):
 * routes with proto PIN_PROTO whose metric (the pinning process's ID) is no live process. Returns what it removed.
 */
export function removeStalePins(): string[] {
  const removed: string[] = [];
  for (const family of ['-4', '-6']) {
    let list: IpRoute[];
    try {
      list = ipRoutes([family, 'route', 'show', 'proto', String(PIN_PROTO)]);
    } catch {
      continue; // no IPv6 on this host, say
    }
    for (const r of list) {
      const pid = r.metric ?? 0;
      if (pid > 0 && (pid === process.pid || existsSync(`/proc/${pid}`))) continue;
      try {
        ip([family, 'route', 'del', r.dst, 'proto', String(PIN_PROTO), 'metric', String(pid), ...(r.dev ? ['dev', r.dev] : [])]);
        removed.push(`${r.dst}${r.dev ? ` dev ${r.dev}` : ''}`);
      } catch {
        // gone already
      }
    }
  }
  return removed;
}

let libc: ReturnType<typeof loadLibc> | undefined;
function loadLibc() {
  // Loaded on first use only, so that importing this module works on every platform.
  const { dlopen, FFIType } = require('bun:ffi') as typeof import('bun:ffi');
  return dlopen('libc.so.6', {
    ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.u64], returns: FFIType.i32 },
    read: { args: [FFIType.i32, FFIType.ptr, FFIType.u64], returns: FFIType.i64 },
    pipe2: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
    fcntl: { args: [FFIType.i32, FFIType.i32, FFIType.i64], returns: FFIType.i32 },
    __errno_location: { args: [], returns: FFIType.ptr },
  });
}

function errno(): number {
  const { read } = require('bun:ffi') as typeof import('bun:ffi');
  const p = libc!.symbols.__errno_location();
  return p ? read.i32(p, 0) : 0;
}

/** Interface names: IFNAMSIZ − 1 bytes of letters, digits and `_.-`, optionally one `%d` for the kernel to number. */
export function checkIfName(name: string): string {
  if (!/^[A-Za-z0-9_.-]*(%d)?[A-Za-z0-9_.-]*$/.test(name) || name.length === 0 || name.length >= IFNAMSIZ || name === '.' || name === '..') {
    throw new VpnError('USAGE', `--tun-name: expected an interface name of at most ${IFNAMSIZ - 1} letters, digits, "_", "." or "-" (with an optional %d), got "${name}"`);
  }
  return name;
}

/** One TUN interface, owned by this process: the kernel removes it when the fd closes, even on SIGKILL. */
export class TunDevice {
  private closed = false;
  private reader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  /** host routes this process added (`ip route del` on close) */
  private pinned: string[][] = [];
  readonly stats = { read: 0, written: 0, writeErrors: 0, malformed: 0 };

  private poller: Worker | null = null;
  /** plain writes with offloads on: consecutive segments of a TCP flow go in as one super-segment (GRO) */
  private gro: Coalescer | null = null;
  private groPending = false;

  private constructor(
    readonly fd: number,
    readonly name: string,
    /** whether every read and write carries a virtio_net_hdr (offloads on) */
    readonly vnet: boolean,
  ) {}

  /**
   * Create the interface (name pattern like `vpn%d`); with `offload`, ask for IFF_VNET_HDR and the checksum and TSO
   * offloads, and fall back to a plain device when the kernel refuses either (`vnet` says which it is). Throws USAGE
   * with the reason when the kernel refuses the device itself.
   */
  static create(pattern = DEFAULT_NAME, offload = false): TunDevice {
    if (offload) {
      try {
        return TunDevice.open(pattern, true);
      } catch (e) {
        if (!(e instanceof VpnError) || !/offload/.test(e.message)) throw e;
        log.info(`vpn: TUN offloads unavailable (${e.message}); carrying one packet per read and write`);
      }
    }
    return TunDevice.open(pattern, false);
  }

  private static open(pattern: string, vnet: boolean): TunDevice {
    let fd: number;
    try {
      fd = openSync(TUN_PATH, fsc.O_RDWR | fsc.O_NONBLOCK | O_CLOEXEC);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EACCES' || code === 'EPERM') throw new VpnError('USAGE', `cannot open ${TUN_PATH} (${code}): --tun needs root or CAP_NET_ADMIN`);
      throw new VpnError('USAGE', `cannot open ${TUN_PATH} (${code ?? (e as Error).message}); is the tun module loaded (modprobe tun)?`);
    }
    libc ??= loadLibc();
    const { ptr } = require('bun:ffi') as typeof import('bun:ffi');
    const ifr = new Uint8Array(IFREQ_LEN);
    ifr.set(new TextEncoder().encode(pattern));
    new DataView(ifr.buffer).setUint16(IFNAMSIZ, IFF_TUN | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0), true);
    if (libc.symbols.ioctl(fd, TUNSETIFF, ptr(ifr)) < 0) {
      const err = errno();
      closeSync(fd);
      if (err === EPERM) throw new VpnError('USAGE', 'creating a TUN interface was refused (EPERM): --tun needs root or CAP_NET_ADMIN');
      if (err === EBUSY) throw new VpnError('USAGE', `--tun-name ${pattern}: an interface of that name exists already`);
      if (err === EINVAL) throw new VpnError('USAGE', `--tun-name ${pattern}: the kernel refused that name`);
      if (vnet) throw new VpnError('USAGE', `IFF_VNET_HDR refused (errno ${err}): no offload`);
      throw new VpnError('USAGE', `creating a TUN interface failed (errno ${err})`);
    }
    if (vnet && libc.symbols.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) {
      const err = errno();
      closeSync(fd);
      throw new VpnError('USAGE', `TUNSETOFFLOAD refused (errno ${err}): no offload`);
    }
    const end = ifr.indexOf(0);
    return new TunDevice(fd, new TextDecoder().decode(ifr.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end)), vnet);
  }

  /**
   * Give the interface its addresses (one per family) and MTU and bring it up. It never gets an IPv6 link-local
   * address (addrgenmode none: TUN is point-to-point, no neighbour discovery runs on it), and IPv6 addresses skip
   * duplicate address detection (nodad: nobody else is on the link). Throws USAGE when `ip` refuses.
   */
  up(addresses: Prefix[], mtu: number): void {
    const has6 = addresses.some(isCidr6);
    // addrgenmode first, at the device's initial MTU: once the MTU is below 1280 the kernel turns IPv6 off on the
    // interface, and then setting addrgenmode fails (it is an IPv6 attribute).
    try {
      ip(['link', 'set', 'dev', this.name, 'addrgenmode', 'none']);
    } catch (e) {
      // Without IPv6 on this host there is no link-local address to suppress; only an IPv6 tunnel needs it.
      if (has6) throw new VpnError('USAGE', `IPv6 is not available on ${this.name} (${(e as Error).message}); enable IPv6 on this host (sysctl net.ipv6.conf.all.disable_ipv6=0) or leave the IPv6 prefix out of --tun`);
    }
    ip(['link', 'set', 'dev', this.name, 'mtu', String(mtu)]);
    if (this.vnet) {
      // A super-segment and its header should fit one record (65536 bytes); where the kernel does not let us say
      // so, tun.ts splits the rare larger one.
      try {
        ip(['link', 'set', 'dev', this.name, 'gso_max_size', String(MAX_SUPER_SEGMENT)]);
      } catch {
        // older kernel or iproute2
      }
    }
    for (const a of addresses) {
      if (isCidr6(a)) ip(['-6', 'addr', 'add', formatPrefix(a), 'dev', this.name, 'nodad']);
      else ip(['-4', 'addr', 'add', formatPrefix(a), 'dev', this.name]);
    }
    ip(['link', 'set', 'dev', this.name, 'up']);
  }

  /** A reconnect got other addresses (or another MTU): replace the interface's addresses; its routes stay. */
  readdress(addresses: Prefix[], mtu: number): void {
    ip(['addr', 'flush', 'dev', this.name]);
    ip(['link', 'set', 'dev', this.name, 'mtu', String(mtu)]);
    for (const a of addresses) {
      if (isCidr6(a)) ip(['-6', 'addr', 'add', formatPrefix(a), 'dev', this.name, 'nodad']);
      else ip(['-4', 'addr', 'add', formatPrefix(a), 'dev', this.name]);
    }
  }

  /**
   * Route `c` (either family) through the interface with `ip route add`, never `replace`: a route the host has
   * already for exactly `c` is not overwritten; that fails with USAGE and a sentence saying so.
   */
  addRoute(c: Prefix): void {
    const family = isCidr6(c) ? '-6' : '-4';
    const text = formatPrefix(c);
    try {
      ip([family, 'route', 'add', text, 'dev', this.name]);
    } catch (e) {
      if (/File exists/i.test((e as Error).message)) {
        const there = (() => {
          try {
            return ip([family, 'route', 'show', 'exact', text]).trim().split('\n')[0] ?? '';
          } catch {
            return '';
          }
        })();
        throw new VpnError('USAGE', `cannot route ${text} through ${this.name}: this host has a route for ${text} already${there ? ` (${there})` : ''}, and vpn does not overwrite routes; remove it first, or leave the route out`);
      }
      throw e;
    }
  }

  /** Remove the route for `c` through the interface (a reconnect whose answer no longer has it). */
  delRoute(c: Prefix): void {
    try {
      ip([isCidr6(c) ? '-6' : '-4', 'route', 'del', formatPrefix(c), 'dev', this.name]);
    } catch {
      // gone already
    }
  }

  /** The routes through the interface now, both families, without the ones the kernel made for its addresses. */
  routes(): Prefix[] {
    const out: Prefix[] = [];
    for (const v6 of [false, true]) {
      let list: IpRoute[];
      try {
        list = ipRoutes([v6 ? '-6' : '-4', 'route', 'show', 'dev', this.name]);
      } catch {
        continue;
      }
      for (const r of list) {
        if (r.protocol === 'kernel') continue;
        const p = jsonPrefix(r.dst, v6);
        if (p) out.push(p);
      }
    }
    return out;
  }

  /** Whether a host route to the server is pinned by this device. */
  get hasPin(): boolean {
    return this.pinned.length > 0;
  }

  /**
   * Keep the tunnel's own outer connection to `host` off the tunnel when a `--route` covers it: pin a host route
   * through the path it takes now, tagged `proto PIN_PROTO metric PID` so that removeStalePins recognises it should
   * this process be killed before it removes it. A host route the host has already is left alone (and used).
   */
  pinHostRoute(host: string): void {
    const v6 = host.includes(':');
    const family = v6 ? '-6' : '-4';
    const dst = `${host}/${v6 ? 128 : 32}`;
    const how = ip(['-o', family, 'route', 'get', host]);
    const via = /\bvia (\S+)/.exec(how)?.[1];
    const dev = /\bdev (\S+)/.exec(how)?.[1];
    if (!dev || dev === this.name) return;
    if (ipRoutes([family, 'route', 'show', 'exact', dst]).length > 0) return; // someone else's to keep
    const args = [family, 'route', 'add', dst, ...(via ? ['via', via] : []), 'dev', dev, 'proto', String(PIN_PROTO), 'metric', String(process.pid)];
    try {
      ip(args);
      this.pinned.push(args);
    } catch {
      // a host route exists already: it is someone else's to keep
    }
  }

  /**
   * Start reading packets; `onPacket` gets each one (a view valid only during the call): a bare IP packet, or with
   * offloads (`vnet`) its virtio_net_hdr and the packet. Every batch read at one wake-up runs inside `corked`, so
   * the records it makes leave as one socket write per peer.
   */
  start(onPacket: (p: Uint8Array) => void): void {
    if (this.reader || this.poller || this.closed) return;
    if (this.vnet) return this.startVnet(onPacket);
    const reader = Bun.file(this.fd).stream().getReader() as ReadableStreamDefaultReader<Uint8Array>;
    this.reader = reader;
    const each = (p: Uint8Array) => {
      this.stats.read++;
      onPacket(p);
    };
    void (async () => {
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done || this.closed) return;
          // One chunk holds every packet one wake-up read: their records leave as one socket write per peer.
          if (corked(() => splitPackets(value, each)) > 0) this.stats.malformed++;
        }
      } catch (e) {
        if (!this.closed) log.error(`vpn: reading ${this.name} failed: ${(e as Error).message}`);
      }
    })();
  }

  private startVnet(onPacket: (p: Uint8Array) => void): void {
    const { ptr, read } = require('bun:ffi') as typeof import('bun:ffi');
    const buf = new Uint8Array(VNET_READ_BUF);
    const at = ptr(buf);
    /** [0]: 1 while the main thread drains (the poller waits), [1]: 1 when closed */
    const state = new Int32Array(new SharedArrayBuffer(8));
    let failed = false;
    const drain = () => {
      if (this.closed || failed) return;
      let more = false;
      let bytes = 0;
      corked(() => {
        for (let i = 0; i < READ_BATCH && bytes < READ_BUDGET; i++) {
          const n = Number(libc!.symbols.read(this.fd, at, VNET_READ_BUF));
          if (n < 0) {
            const e = read.i32(libc!.symbols.__errno_location()!, 0);
            if (e === EAGAIN || this.closed) return;
            // As the plain reader does on an error: say so once and stop reading (the poller keeps waiting).
            failed = true;
            log.error(`vpn: reading ${this.name} failed (errno ${e})`);
            return;
          }
          if (n < VNET_HDR_LEN + 20 || n > VNET_READ_BUF) {
            this.stats.malformed++;
            continue;
          }
          this.stats.read++;
          bytes += n;
          onPacket(buf.subarray(0, n));
          if (this.closed) return;
        }
        more = true;
      });
      if (failed) return;
      if (more) setImmediate(drain);
      else if (this.poller) {
        Atomics.store(state, 0, 0);
        Atomics.notify(state, 0);
      }
    };
    this.drainNow = drain;
    if (this.startSigio(drain)) return;
    // The poller wakes this thread through a pipe that Bun's own event loop (epoll) reads, not with a worker
    // message (measured, mean ping RTT through the tunnel: 1.03 → 0.94 ms 50 ms apart, 0.48 → 0.42 ms 2 ms apart).
    const fds = new Int32Array(2);
    if (libc!.symbols.pipe2(ptr(fds), O_CLOEXEC | O_NONBLOCK) !== 0) throw new VpnError('NETWORK', `pipe2 failed (errno ${errno()})`);
    this.wakeFds = [fds[0]!, fds[1]!];
    const wakes = Bun.file(fds[0]!).stream().getReader() as ReadableStreamDefaultReader<Uint8Array>;
    void (async () => {
      try {
        for (;;) {
          const { done } = await wakes.read();
          if (done || this.closed) return;
          drain();
        }
      } catch {
        // closed
      }
    })();
    const w = new Worker(URL.createObjectURL(new Blob([POLLER_SOURCE], { type: 'application/javascript' })));
    w.postMessage({ fd: this.fd, wake: fds[1], state: state.buffer, ms: POLL_MS });
    w.unref();
    this.poller = w;
    this.pollerState = state;
    this.wakeReader = wakes;
  }

  /**
   * Readiness by signal: with O_ASYNC and the main thread as the owner (F_SETOWN_EX, F_OWNER_TID), the kernel sends
   * SIGIO to this thread for every packet queued on the device, which interrupts its epoll wait; Bun runs the
   * handler on its event loop. That is one wake-up per packet instead of the poller thread's two (measured here: a
   * thread that polls and then wakes the main thread costs ~150 µs at the median, a SIGIO ~70 µs). False when the
   * kernel refuses, and the poller is used instead.
   */
  private startSigio(drain: () => void): boolean {
    if (process.env.VPN_TUN_WAKE === 'poller') return false;
    const { ptr } = require('bun:ffi') as typeof import('bun:ffi');
    installSigio(); // before O_ASYNC: SIGIO's default action ends the process
    const owner = new Int32Array([F_OWNER_TID, process.pid]); // the main thread's id is the process id
    const fl = libc!.symbols.fcntl(this.fd, F_GETFL, 0n);
    if (libc!.symbols.fcntl(this.fd, F_SETOWN_EX, BigInt(ptr(owner))) !== 0 || fl < 0 || libc!.symbols.fcntl(this.fd, F_SETFL, BigInt(fl | O_ASYNC)) !== 0) {
      log.info(`vpn: ${this.name}: no SIGIO (errno ${errno()}); a poller thread reports readiness`);
      return false;
    }
    sigioDrains.add(drain);
    this.sigioDrain = drain;
    drain(); // whatever was queued before O_ASYNC was set raises no signal
    return true;
  }

  private sigioDrain: (() => void) | null = null;
  private wakeFds: [number, number] | null = null;
  private wakeReader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  private pollerState: Int32Array | null = null;
  private drainNow: (() => void) | null = null;
  private kickPending = false;

  /** Inject one packet into the kernel (one write(2)); with offloads, `p` starts with its virtio_net_hdr. False if it was refused. */
  write(p: Uint8Array): boolean {
    if (this.gro && this.groPending) this.gro.flush(); // what was gathered goes first
    return this.writeNow(p);
  }

  private writeNow(p: Uint8Array): boolean {
    if (this.closed) return false;
    try {
      writeSync(this.fd, p);
      this.stats.written++;
      // What we write is often answered at once — an echo reply, a TCP ACK, made by the kernel before write(2)
      // returns: read it once this event is handled, without waiting for the poller thread to notice.
      if (this.drainNow && !this.kickPending) {
        this.kickPending = true;
        queueMicrotask(() => {
          this.kickPending = false;
          this.drainNow?.();
        });
      }
      return true;
    } catch {
      this.stats.writeErrors++;
      return false;
    }
  }

  /**
   * Inject a bare packet (no pending checksum, no GSO). With offloads it goes in behind a header, and the packets
   * written while one event is handled are coalesced (offload.ts Coalescer) and written when it ends: true then
   * means taken, not yet written.
   */
  writePlain(p: Uint8Array): boolean {
    if (!this.vnet) return this.write(p);
    if (this.closed || p.length > VNET_READ_BUF - VNET_HDR_LEN) {
      this.stats.writeErrors++;
      return false;
    }
    const gro = (this.gro ??= new Coalescer((frame) => void this.writeNow(frame)));
    gro.add(p);
    if (!this.groPending) {
      this.groPending = true;
      queueMicrotask(() => {
        this.groPending = false;
        gro.flush();
      });
    }
    return true;
  }

  /** Remove the pinned routes and close the fd, which removes the interface and its routes. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const args of this.pinned) {
      try {
        ip([args[0]!, 'route', 'del', ...args.slice(3)]);
      } catch {
        // gone already
      }
    }
    this.pinned = [];
    if (this.pollerState) {
      Atomics.store(this.pollerState, 1, 1);
      Atomics.store(this.pollerState, 0, 0);
      Atomics.notify(this.pollerState, 0);
    }
    this.poller?.terminate();
    this.poller = null;
    if (this.sigioDrain) sigioDrains.delete(this.sigioDrain);
    this.sigioDrain = null;
    if (this.wakeFds) {
      void this.wakeReader?.cancel().catch(() => {});
      for (const f of this.wakeFds) {
        try {
          closeSync(f);
        } catch {
          // the stream closed it
        }
      }
      this.wakeFds = null;
    }
    try {
      void this.reader?.cancel().catch(() => {});
    } catch {
      // not readable any more
    }
    try {
      closeSync(this.fd);
    } catch {
      // the stream may have closed it
    }
  }
}

/** Every offload device's drain that SIGIO readiness serves (one per device; a process usually has one). */
const sigioDrains = new Set<() => void>();
let sigioInstalled = false;

/**
 * One SIGIO listener for the life of the process, never removed: removing it would restore the default action,
 * and a signal still on its way from a device being closed would end the process.
 */
function installSigio(): void {
  if (sigioInstalled) return;
  sigioInstalled = true;
  process.on('SIGIO', () => {
    for (const d of sigioDrains) d();
  });
}

/**
 * The poller thread of an offload device: poll(2) the fd (POLLIN, at most `ms` per call so that it sees a close),
 * write one byte to the wake pipe when it is readable, then wait until the main thread has read it dry (state[0] back to 0).
 */
const POLLER_SOURCE = `
const { dlopen, FFIType, ptr } = require('bun:ffi');
const libc = dlopen('libc.so.6', { poll: { args: [FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i32 }, write: { args: [FFIType.i32, FFIType.ptr, FFIType.u64], returns: FFIType.i64 } });
const one = new Uint8Array(1);
self.onmessage = (e) => {
  const { fd, wake, ms } = e.data;
  const state = new Int32Array(e.data.state);
  const pfd = new Int32Array([fd, ${POLLIN}]);
  for (let i = 0; Atomics.load(state, 1) === 0; i++) {
    const r = libc.symbols.poll(ptr(pfd), 1, ms);
    if (Atomics.load(state, 1) !== 0) break;
    if (r > 0) {
      if ((pfd[1] >>> 16) & 0x38) break; // POLLERR|POLLHUP|POLLNVAL in revents: the device is gone
      Atomics.store(state, 0, 1);
      libc.symbols.write(wake, ptr(one), 1);
      while (Atomics.load(state, 0) === 1 && Atomics.load(state, 1) === 0) Atomics.wait(state, 0, 1, ms);
    }
  }
};
`;
