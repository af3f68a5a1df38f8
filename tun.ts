/**
 * `--tun` mode (Linux): a layer-3 VPN. Each end opens a TUN interface (/dev/net/tun, the TUNSETIFF ioctl through
 * `bun:ffi`, IFF_TUN|IFF_NO_PI: every read(2) is one bare IP packet, every write(2) injects one), configures it with
 * iproute2's `ip`, and carries one IPv4 packet per DATA record (PROTOCOL.md §7).
 *
 *   client                                   server
 *   CONFIG {mode:"tun", request}      ──▶    takes `request` or the lowest free address of its subnet
 *                                     ◀──    CONFIG {mode:"tun", address:"10.66.0.2/24", server, mtu, routes}
 *                                             or a refusal {error, code} (address in use, wrong mode …)
 *
 * The server routes by destination between its own interface and every client: a client may only send from its own
 * address; packets for a connected client go to that client, for the server or outside the subnet to the server's
 * kernel, and for an unassigned address of the subnet are dropped and counted.
 *
 * Reading the TUN fd: it is opened O_NONBLOCK and read through `Bun.file(fd).stream()`, which polls it on Bun's event
 * loop (epoll) and never blocks it. One chunk may hold several packets (Bun reads until EAGAIN into one buffer, with
 * at least 16 KiB free for each read(2), so with MTU ≤ MAX_MTU no packet is ever cut); IP's own length fields split
 * them again. Writes are one packet per write(2).
 */
import { closeSync, existsSync, openSync, readFileSync, writeSync, constants as fsc } from 'node:fs';
import type { Socket } from 'bun';
import { type Address, formatAddress } from './address.ts';
import { BLOCK, FRAME_OVERHEAD, TYPE_LEN } from './channel.ts';
import { asVpnError, EXIT_OK, VpnError } from './errors.ts';
import { log } from './log.ts';
import { type Json, Session, sessionHandler } from './session.ts';
import { boundAddress, listenOn } from './server.ts';
import type { Settings } from './vpn.ts';

// ---- Linux ABI (linux/if_tun.h, linux/if.h, linux/capability.h) ----
const TUN_PATH = '/dev/net/tun';
/** _IOW('T', 202, int) */
const TUNSETIFF = 0x400454ca;
const IFF_TUN = 0x0001;
const IFF_NO_PI = 0x1000;
const IFNAMSIZ = 16;
/** sizeof(struct ifreq): the name, then a 24-byte union whose first member is `short ifr_flags` */
const IFREQ_LEN = IFNAMSIZ + 24;
const CAP_NET_ADMIN = 12;
/** keeps the fd (and so the interface) out of child processes such as `ip` */
const O_CLOEXEC = 0o2000000;
const EPERM = 1;
const EBUSY = 16;
const EINVAL = 22;

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
/** jumbo frames; also well under the 16 KiB that Bun's reader leaves free for each read(2) */
export const MAX_MTU = 9000;

// ---- Tuning ----
/** Drop packets for a peer whose outbound queue is above this (IP is lossy; the inner TCP backs off). */
export const MAX_PEER_QUEUE = 1024 * 1024;
/** How long a stopping process waits for its peers' CLOSE before it tears down anyway (`--grace`). */
const STOP_GRACE_MS = 2000;
const DEFAULT_NAME = 'vpn%d';
/** `ip` answers in milliseconds; a hung one must not hang the VPN. */
const IP_TIMEOUT_MS = 10_000;

// ---- IPv4 addresses and prefixes ----

export interface Cidr {
  addr: number;
  prefix: number;
}

/** Dotted quad → u32, or null. */
export function parseIPv4(text: string): number | null {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(text);
  if (!m) return null;
  let n = 0;
  for (let i = 1; i <= 4; i++) {
    const o = Number(m[i]);
    if (o > 255) return null;
    n = n * 256 + o;
  }
  return n;
}

export function formatIPv4(n: number): string {
  return `${n >>> 24}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;
}

export function formatCidr(c: Cidr): string {
  return `${formatIPv4(c.addr)}/${c.prefix}`;
}

export function maskOf(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

export function cidrContains(c: Cidr, addr: number): boolean {
  const m = maskOf(c.prefix);
  return ((c.addr & m) >>> 0) === ((addr & m) >>> 0);
}

/**
 * Parse `A.B.C.D/N`, or a bare `A.B.C.D` when `bare` is given (it gets `bare` as its prefix, unchecked, so -1 can
 * mean "none given"). Throws USAGE naming `what`.
 */
export function parseCidr(text: string, what: string, bare?: number): Cidr {
  const [a, p, extra] = text.split('/');
  const addr = parseIPv4(a ?? '');
  const prefix = p === undefined ? bare : /^\d{1,2}$/.test(p) ? Number(p) : NaN;
  if (addr === null || extra !== undefined || prefix === undefined || (p !== undefined && !(prefix >= 0 && prefix <= 32))) {
    throw new VpnError('USAGE', `${what}: expected an IPv4 address and prefix such as 10.66.0.1/24, got "${text}"`);
  }
  return { addr, prefix };
}

/** A `--route` value: a network address with its prefix (host bits zero). */
export function parseRoute(text: string, what = '--route'): Cidr {
  const c = parseCidr(text, what);
  const net = (c.addr & maskOf(c.prefix)) >>> 0;
  if (net !== c.addr) throw new VpnError('USAGE', `${what}: ${text} has host bits set; did you mean ${formatCidr({ addr: net, prefix: c.prefix })}?`);
  return c;
}

// ---- the server's address pool ----

/**
 * The server's subnet: its own address, and which client holds which host address. Addresses go out lowest first,
 * so an address that was released is the next one handed out.
 */
export class AddressPool {
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
      return request.addr;
    }
    // Bounded: at most `used.size + 1` steps past the server's address find a free one, or the subnet is full.
    for (let a = this.network + 1, steps = 0; a < this.broadcast && steps <= this.used.size + 1; a++) {
      if (a === this.server) continue;
      if (!this.used.has(a)) {
        this.used.add(a);
        return a;
      }
      steps++;
    }
    return new VpnError('NETWORK', `no free address left in the tunnel subnet ${subnet}`);
  }

  release(addr: number): void {
    this.used.delete(addr);
  }
}

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

// ---- the host: preflight checks, the TUN device, `ip` ----

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
  if (!Bun.which('ip')) throw new VpnError('USAGE', "--tun needs iproute2's ip command; install iproute2");
}

/** Run `ip ARGS`; throws USAGE with ip's own message when it fails. */
function ip(args: string[]): string {
  let r;
  try {
    r = Bun.spawnSync(['ip', ...args], { stdin: 'ignore', stdout: 'pipe', stderr: 'pipe', timeout: IP_TIMEOUT_MS, killSignal: 'SIGKILL' });
  } catch (e) {
    throw new VpnError('USAGE', `cannot run ip (${(e as Error).message}); install iproute2`);
  }
  if (r.exitCode !== 0) throw new VpnError('USAGE', `ip ${args.join(' ')} failed: ${r.stderr.toString().trim() || `exit ${r.exitCode}`}`);
  return r.stdout.toString();
}

let libc: ReturnType<typeof loadLibc> | undefined;
function loadLibc() {
  // Loaded on first use only, so that importing this module works on every platform.
  const { dlopen, FFIType } = require('bun:ffi') as typeof import('bun:ffi');
  return dlopen('libc.so.6', {
    ioctl: { args: [FFIType.i32, FFIType.u64, FFIType.ptr], returns: FFIType.i32 },
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

  private constructor(
    readonly fd: number,
    readonly name: string,
  ) {}

  /** Create the interface (name pattern like `vpn%d`). Throws USAGE with the reason when the kernel refuses. */
  static create(pattern = DEFAULT_NAME): TunDevice {
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
    new DataView(ifr.buffer).setUint16(IFNAMSIZ, IFF_TUN | IFF_NO_PI, true);
    if (libc.symbols.ioctl(fd, TUNSETIFF, ptr(ifr)) < 0) {
      const err = errno();
      closeSync(fd);
      if (err === EPERM) throw new VpnError('USAGE', 'creating a TUN interface was refused (EPERM): --tun needs root or CAP_NET_ADMIN');
      if (err === EBUSY) throw new VpnError('USAGE', `--tun-name ${pattern}: an interface of that name exists already`);
      if (err === EINVAL) throw new VpnError('USAGE', `--tun-name ${pattern}: the kernel refused that name`);
      throw new VpnError('USAGE', `creating a TUN interface failed (errno ${err})`);
    }
    const end = ifr.indexOf(0);
    return new TunDevice(fd, new TextDecoder().decode(ifr.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end)));
  }

  /** Give the interface its address and MTU and bring it up (no IPv6 link-local address: this tunnel is IPv4). */
  up(address: Cidr, mtu: number): void {
    ip(['link', 'set', 'dev', this.name, 'mtu', String(mtu), 'addrgenmode', 'none']);
    ip(['addr', 'add', formatCidr(address), 'dev', this.name]);
    ip(['link', 'set', 'dev', this.name, 'up']);
  }

  /** Route `c` through the interface. */
  addRoute(c: Cidr): void {
    ip(['route', 'replace', formatCidr(c), 'dev', this.name]);
  }

  /**
   * Keep the tunnel's own outer connection to `host` off the tunnel when a `--route` covers it: pin a host route
   * through the path it takes now.
   */
  pinHostRoute(host: string): void {
    const how = ip(['-o', '-4', 'route', 'get', host]);
    const via = /\bvia (\S+)/.exec(how)?.[1];
    const dev = /\bdev (\S+)/.exec(how)?.[1];
    if (!dev || dev === this.name) return;
    const args = ['route', 'add', `${host}/32`, ...(via ? ['via', via] : []), 'dev', dev];
    try {
      ip(args);
      this.pinned.push(args);
    } catch {
      // a host route exists already: it is someone else's to keep
    }
  }

  /** Start reading packets; `onPacket` gets each one (a view valid only during the call). */
  start(onPacket: (p: Uint8Array) => void): void {
    if (this.reader || this.closed) return;
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
          if (splitPackets(value, each) > 0) this.stats.malformed++;
        }
      } catch (e) {
        if (!this.closed) log.error(`vpn: reading ${this.name} failed: ${(e as Error).message}`);
      }
    })();
  }

  /** Inject one packet into the kernel (one write(2)); false if it was refused. */
  write(p: Uint8Array): boolean {
    if (this.closed) return false;
    try {
      writeSync(this.fd, p);
      this.stats.written++;
      return true;
    } catch {
      this.stats.writeErrors++;
      return false;
    }
  }

  /** Remove the pinned routes and close the fd, which removes the interface and its routes. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const args of this.pinned) {
      try {
        ip(['route', 'del', ...args.slice(2)]);
      } catch {
        // gone already
      }
    }
    this.pinned = [];
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

// ---- the server's router ----

/** What the router needs of a client session (a Session). */
export interface RoutePeer {
  writeRecord(p: Uint8Array): boolean;
  readonly queued: number;
}

/** Routes IPv4 packets between the server's interface and its clients by destination address; counts drops. */
export class TunRouter {
  readonly stats = { fromClients: 0, toClients: 0, toInterface: 0, unknown: 0, spoofed: 0, queueFull: 0, notIPv4: 0 };
  private readonly clients = new Map<number, RoutePeer>();

  constructor(
    readonly pool: AddressPool,
    private readonly iface: { write(p: Uint8Array): boolean },
  ) {}

  attach(addr: number, peer: RoutePeer): void {
    this.clients.set(addr, peer);
  }

  /** Forget `addr` if `peer` still holds it. */
  detach(addr: number, peer: RoutePeer): void {
    if (this.clients.get(addr) === peer) this.clients.delete(addr);
  }

  has(addr: number): boolean {
    return this.clients.has(addr);
  }

  get size(): number {
    return this.clients.size;
  }

  /** A packet the server's kernel sent into the interface. */
  fromInterface(p: Uint8Array): void {
    if (!isIPv4(p)) {
      this.stats.notIPv4++;
      return;
    }
    const dst = ipv4Dst(p);
    const peer = this.clients.get(dst);
    if (peer) this.toPeer(peer, p);
    else this.dropUnknown(dst, 'the server');
  }

  /** A packet from the client that holds `src`: only its own source address is let through. */
  fromClient(src: number, p: Uint8Array): void {
    this.stats.fromClients++;
    if (!isIPv4(p) || packetLength(p) !== p.length) {
      this.stats.notIPv4++;
      return;
    }
    if (ipv4Src(p) !== src) {
      this.stats.spoofed++;
      log.limited('warn', `spoofed|${src}`, `dropped a packet from client ${formatIPv4(src)} with source address ${formatIPv4(ipv4Src(p))}`);
      return;
    }
    const dst = ipv4Dst(p);
    const peer = this.clients.get(dst);
    if (peer) {
      this.toPeer(peer, p);
      return;
    }
    const pool = this.pool;
    const multicastOrBroadcast = dst >>> 28 === 0xe || dst === 0xffffffff || dst === pool.broadcast;
    if (multicastOrBroadcast || (pool.contains(dst) && dst !== pool.server)) {
      this.dropUnknown(dst, formatIPv4(src));
      return;
    }
    // The server's own address, or beyond the subnet: the server's kernel delivers or forwards it.
    if (this.iface.write(p)) this.stats.toInterface++;
  }

  private toPeer(peer: RoutePeer, p: Uint8Array): void {
    if (peer.queued > MAX_PEER_QUEUE) {
      this.stats.queueFull++;
      return;
    }
    peer.writeRecord(p);
    this.stats.toClients++;
  }

  private dropUnknown(dst: number, from: string): void {
    this.stats.unknown++;
    log.limited('info', `unknown|${dst}`, `dropped a packet for unknown destination ${formatIPv4(dst)} (from ${from})`);
  }

  summary(): string {
    const s = this.stats;
    return `${s.fromClients} packets from clients, ${s.toClients} to clients, ${s.toInterface} to the interface; dropped: ${s.unknown} unknown destination, ${s.spoofed} spoofed source, ${s.queueFull} queue full, ${s.notIPv4} not IPv4`;
  }
}

// ---- flags ----

type AnyFlags = Record<string, unknown>;

const TUN_FLAGS = ['tun', 'tun-name', 'mtu', 'route'] as const;

/** Whether the command line asks for TUN mode (any of its flags; the others alone are refused by serveTun/connectTun). */
export function wantsTun(flags: object): boolean {
  return TUN_FLAGS.some((f) => (flags as AnyFlags)[f] !== undefined);
}

interface TunOptions {
  /** serve: the server's own address and subnet. connect: the address asked for, or null for any. */
  address: Cidr | null;
  name: string;
  mtu: number | undefined;
  routes: Cidr[];
  /** on SIGTERM/SIGINT: how long to wait for the peers' CLOSE */
  graceMs: number;
}

function tunOptions(flags: AnyFlags, role: 'client' | 'server'): TunOptions {
  const tun = flags.tun as string | undefined;
  if (tun === undefined) {
    const given = TUN_FLAGS.filter((f) => flags[f] !== undefined).map((f) => `--${f}`);
    const how = role === 'server' ? '--tun ADDR/PREFIX' : '--tun auto (or --tun ADDR/PREFIX)';
    throw new VpnError('USAGE', `${given.join(', ')} only ${given.length > 1 ? 'apply' : 'applies'} in TUN mode; add ${how}`);
  }
  for (const other of ['forward', 'local', 'proxy-protocol', 'max-conns']) {
    if (flags[other] !== undefined) throw new VpnError('USAGE', `--${other} belongs to port forwarding, not to TUN mode; use one or the other`);
  }
  let graceMs = STOP_GRACE_MS;
  if (flags.grace !== undefined) {
    graceMs = Number(flags.grace) * 1000;
    if (!(graceMs >= 0 && graceMs <= 3_600_000)) throw new VpnError('USAGE', `--grace: expected a number of seconds, got "${flags.grace}"`);
  }
  let address: Cidr | null;
  if (role === 'server') {
    if (tun === 'auto') throw new VpnError('USAGE', 'serve --tun needs the server\'s tunnel address and subnet, as in --tun 10.66.0.1/24');
    address = parseCidr(tun, '--tun');
    if (flags.once) throw new VpnError('USAGE', '--once does not apply to --tun; a TUN server serves every client until it is stopped');
  } else {
    // A bare ADDR gets the server's prefix: -1 stands for "whatever the subnet is".
    address = tun === 'auto' ? null : parseCidr(tun, '--tun (auto, ADDR or ADDR/PREFIX)', -1);
  }
  let mtu: number | undefined;
  if (flags.mtu !== undefined) {
    mtu = Number(flags.mtu);
    if (!/^\d+$/.test(String(flags.mtu)) || mtu < MIN_MTU || mtu > MAX_MTU) {
      throw new VpnError('USAGE', `--mtu: expected a whole number from ${MIN_MTU} to ${MAX_MTU}, got "${flags.mtu}"`);
    }
  }
  const r = flags.route;
  const routes = (Array.isArray(r) ? r : r === undefined ? [] : [r]).map((t) => parseRoute(String(t)));
  return { address, name: checkIfName((flags['tun-name'] as string | undefined) ?? DEFAULT_NAME), mtu, routes, graceMs };
}

// ---- signals ----

/** Call `stop` once on SIGTERM or SIGINT; returns a function that removes the handlers. */
function onStopSignal(stop: (sig: string) => void): () => void {
  let called = false;
  const h = (sig: string) => {
    if (called) return;
    called = true;
    stop(sig);
  };
  process.on('SIGTERM', h);
  process.on('SIGINT', h);
  return () => {
    process.off('SIGTERM', h);
    process.off('SIGINT', h);
  };
}

function logHandshakeFailure(peer: string, err: VpnError): void {
  log.limited('warn', `handshake failed|${peer.replace(/:\d+$/, '')}|${err.code}`, `handshake failed ${peer}: ${err.message}`);
}

// ---- serve --tun ----

/**
 * `serve --tun ADDR/PREFIX`: one TUN interface with the server's address, every client a session with an address of
 * the subnet. Runs until SIGTERM/SIGINT, then closes every session, removes the interface and returns 0.
 * Throws USAGE (exit 2) on bad flags or a host that cannot run TUN, NETWORK when it cannot listen.
 */
export async function serveTun(s: Settings, listen: Address): Promise<number> {
  const o = tunOptions(s.flags as AnyFlags, 'server');
  checkTunSupport();
  const pool = new AddressPool(o.address!);
  const mtu = o.mtu ?? DEFAULT_MTU;
  const routes = o.routes.map(formatCidr);
  const serverText = formatIPv4(pool.server);
  const dev = TunDevice.create(o.name);
  const onExit = () => dev.close();
  process.on('exit', onExit);
  try {
    dev.up(o.address!, mtu);
  } catch (e) {
    dev.close();
    throw e;
  }
  const router = new TunRouter(pool, dev);
  dev.start((p) => router.fromInterface(p));
  const sessions = new Set<Session>();
  const { promise: allGone, resolve: allGoneResolve } = Promise.withResolvers<void>();
  let stopping = false;

  const handler = {
    ...sessionHandler,
    open(socket: Socket<{ session?: Session }>) {
      socket.data = { session: undefined };
      let addr: number | null = null;
      const config = (peer: Json): Json | VpnError => {
        if (stopping) return new VpnError('NETWORK', 'the server is shutting down');
        if (peer.mode !== 'tun') {
          return new VpnError('USAGE', `this server runs in TUN mode and the client asked for ${typeof peer.mode === 'string' ? `"${peer.mode}"` : 'stdio'} mode; connect with --tun auto`);
        }
        let request: Cidr | null = null;
        if (typeof peer.request === 'string') {
          try {
            request = parseCidr(peer.request, 'requested address', -1);
          } catch {
            return new VpnError('USAGE', `cannot read the requested address "${peer.request.slice(0, 40)}"`);
          }
          if (request.prefix === -1) request = { addr: request.addr, prefix: pool.prefix };
        } else if (peer.request !== null && peer.request !== undefined) {
          return new VpnError('USAGE', 'the requested address must be a string or null');
        }
        const got = pool.take(request);
        if (got instanceof VpnError) return got;
        addr = got;
        return { mode: 'tun', address: `${formatIPv4(got)}/${pool.prefix}`, server: serverText, mtu, routes };
      };
      const session: Session = new Session(socket, { ...s.base, role: 'server', config }, {
        onOpen: (sess) => {
          sessions.add(sess);
          router.attach(addr!, sess);
          log.info(`client ${sess.peer} is ${formatIPv4(addr!)} (protocol v${sess.version})`);
        },
        onData: (p) => router.fromClient(addr!, p),
        onPeerClose: () => session.close(),
        onEnd: (err) => {
          sessions.delete(session);
          if (addr !== null) {
            router.detach(addr, session);
            pool.release(addr);
            const secs = ((Date.now() - session.startedAt) / 1000).toFixed(1);
            const why = err ? err.message : 'clean end';
            const line = `client ${formatIPv4(addr)} (${session.peer}) gone after ${secs} s, ${session.bytesIn} bytes in, ${session.bytesOut} bytes out: ${why}; address released`;
            if (err) log.warn(line);
            else log.info(line);
            addr = null;
          } else if (err && !session.opened) {
            logHandshakeFailure(session.peer, err);
          } else if (err) {
            log.warn(`refused client ${session.peer}: ${err.message}`);
          }
          if (stopping && sessions.size === 0) allGoneResolve();
        },
      });
      socket.data.session = session;
    },
  };

  let server;
  try {
    server = listenOn(listen, {}, handler);
  } catch (e) {
    dev.close();
    throw e;
  }
  log.info(`tun ${dev.name} up: ${formatCidr(o.address!)}, mtu ${mtu}${routes.length ? `, pushing routes ${routes.join(' ')}` : ''}`);
  process.stderr.write(`listening on ${formatAddress(boundAddress(listen, server))}\n`);

  const { promise: stopped, resolve: stop } = Promise.withResolvers<string>();
  const removeSignals = onStopSignal(stop);
  const sig = await stopped;
  removeSignals();
  stopping = true;
  log.info(`${sig}: closing ${sessions.size} session(s) and removing ${dev.name}`);
  server.stop(false); // stop accepting; the open sessions get their CLOSE below
  if (sessions.size === 0) allGoneResolve();
  for (const sess of sessions) sess.close();
  const grace = setTimeout(allGoneResolve, o.graceMs);
  await allGone;
  clearTimeout(grace);
  for (const sess of sessions) sess.finish(new VpnError('TRUNCATED', `no CLOSE from the client within ${o.graceMs / 1000} s of shutting down`));
  server.stop(true);
  dev.close();
  process.off('exit', onExit);
  log.info(`tun stats: ${router.summary()}; ${dev.stats.read} read from ${dev.name}, ${dev.stats.written} written, ${dev.stats.malformed} malformed reads`);
  return EXIT_OK;
}

// ---- connect --tun ----

interface TunAnswer {
  address: Cidr;
  server: string;
  mtu: number;
  routes: Cidr[];
}

/** Check the server's CONFIG answer (§8); throws USAGE for a server in another mode, INTEGRITY for nonsense. */
function readAnswer(peer: Json): TunAnswer {
  if (peer.mode !== 'tun') {
    throw new VpnError('USAGE', `the server is not in TUN mode (it runs ${typeof peer.mode === 'string' ? `"${peer.mode}"` : 'another'} mode); start it with serve --tun ADDR/PREFIX`);
  }
  try {
    const address = parseCidr(String(peer.address), 'address');
    const mtu = Number(peer.mtu);
    if (!Number.isInteger(mtu) || mtu < MIN_MTU || mtu > MAX_MTU) throw new Error('mtu');
    if (parseIPv4(String(peer.server)) === null) throw new Error('server');
    const routes = Array.isArray(peer.routes) ? peer.routes.map((r) => parseRoute(String(r), 'route')) : [];
    return { address, server: String(peer.server), mtu, routes };
  } catch (e) {
    throw new VpnError('INTEGRITY', `the server's TUN configuration is not valid (${(e as Error).message})`);
  }
}

/**
 * `connect HOST:PORT --tun auto|ADDR[/PREFIX]`: create the interface, authenticate, take the address the server
 * hands out, and carry packets until either end stops. Returns the exit status (0 for a clean end or a signal).
 * Throws USAGE (exit 2) before connecting when this host cannot run TUN.
 */
export async function connectTun(s: Settings, target: Address): Promise<number> {
  const o = tunOptions(s.flags as AnyFlags, 'client');
  checkTunSupport();
  // Created before connecting: local problems (name in use, permissions) end the run before the server sees us.
  const dev = TunDevice.create(o.name);
  const onExit = () => dev.close();
  process.on('exit', onExit);
  const request = o.address ? (o.address.prefix === -1 ? formatIPv4(o.address.addr) : formatCidr(o.address)) : null;
  const { promise: ended, resolve: endedResolve } = Promise.withResolvers<VpnError | null>();
  let session: Session | undefined;
  let dropped = 0;
  let notIPv4 = 0;

  const app = {
    onOpen: (sess: Session, peer: Json) => {
      let a: TunAnswer;
      try {
        a = readAnswer(peer);
        const mtu = o.mtu ?? a.mtu;
        dev.up(a.address, mtu);
        const routes = [...o.routes, ...a.routes];
        const remote = sess.socket.remoteAddress;
        const outer = remote ? parseIPv4(remote) : null;
        if (outer !== null && routes.some((r) => cidrContains(r, outer))) dev.pinHostRoute(remote!);
        for (const r of routes) dev.addRoute(r);
        dev.start((p) => {
          if (!isIPv4(p)) {
            notIPv4++;
            return;
          }
          if (sess.queued > MAX_PEER_QUEUE) {
            dropped++;
            return;
          }
          sess.writeRecord(p);
        });
        const via = routes.length ? `, routes ${routes.map(formatCidr).join(' ')}` : '';
        log.info(`tunnel up: ${dev.name} ${formatCidr(a.address)}, server ${a.server}, mtu ${mtu}${via} (protocol v${sess.version})`);
      } catch (e) {
        sess.finish(asVpnError(e, 'USAGE'));
      }
    },
    onData: (p: Uint8Array) => {
      dev.write(p);
    },
    onPeerClose: () => session?.close(),
    onEnd: (err: VpnError | null) => endedResolve(err),
  };
  const handler = {
    ...sessionHandler,
    open(socket: Socket<{ session?: Session }>) {
      socket.data = { session: undefined };
      session = new Session(socket, { ...s.base, role: 'client', config: () => ({ mode: 'tun', request }) }, app);
      socket.data.session = session;
    },
  };
  let stoppedBy: string | null = null;
  const removeSignals = onStopSignal((sig) => {
    stoppedBy = sig;
    if (!session || session.phase !== 'open') {
      endedResolve(null);
      return;
    }
    session.close();
    setTimeout(() => session?.finish(null), o.graceMs).unref();
  });
  try {
    try {
      if (target.kind === 'unix') await Bun.connect({ unix: target.path, allowHalfOpen: true, data: {}, socket: handler });
      else await Bun.connect({ hostname: target.host, port: target.port, allowHalfOpen: true, data: {}, socket: handler });
    } catch (e) {
      throw new VpnError('NETWORK', `cannot connect to ${formatAddress(target)} (${(e as Error).message})`);
    }
    const err = await ended;
    if (stoppedBy) log.info(`${stoppedBy}: tunnel closed, ${dev.name} removed`);
    if (dev.stats.read + dev.stats.written > 0) {
      log.info(`tun stats: ${dev.stats.read} packets read from ${dev.name}, ${dev.stats.written} written; dropped: ${dropped} queue full, ${notIPv4} not IPv4, ${dev.stats.writeErrors} refused by the kernel, ${dev.stats.malformed} malformed reads`);
    }
    if (!err || stoppedBy) return EXIT_OK;
    log.error(`vpn: ${formatAddress(target)}: ${err.sentence}`);
    return err.exitStatus;
  } finally {
    removeSignals();
    session?.finish(null);
    dev.close();
    process.off('exit', onExit);
  }
}
