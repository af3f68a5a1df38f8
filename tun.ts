/**
 * `--tun` mode (Linux): a layer-3 VPN. Each end opens a TUN interface (tundevice.ts) and carries one IPv4 packet
 * per DATA record (PROTOCOL.md §7). This file is the mode: the MTU arithmetic, the server's address pool and router,
 * and the CONFIG exchange and app of each side on the serve/connect skeleton of server.ts.
 *
 *   client                                   server
 *   CONFIG {mode:"tun", request}      ──▶    takes `request` or the lowest free address of its subnet
 *                                     ◀──    CONFIG {mode:"tun", address:"10.66.0.2/24", server, mtu, routes}
 *                                             or a refusal {error, code} (address in use, wrong mode …)
 *
 * The server routes by destination between its own interface and every client: a client may only send from its own
 * address; packets for a connected client go to that client, for the server or outside the subnet to the server's
 * kernel, and for an unassigned address of the subnet are dropped and counted.
 */
import { type Cidr, cidrContains, formatCidr, formatIPv4, maskOf, parseCidr, parseIPv4, parseRoute } from './address.ts';
import { BLOCK, FRAME_OVERHEAD, TYPE_LEN } from './channel.ts';
import { asVpnError, VpnError } from './errors.ts';
import { log } from './log.ts';
import { type Mode, modeName } from './server.ts';
import { escapeText, type Json, type Session } from './session.ts';
import { ipv4Dst, ipv4Src, isIPv4, packetLength, TunDevice } from './tundevice.ts';

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
/** Most routes a server pushes, or a client accepts, in one CONFIG (§8.4). */
export const MAX_ROUTES = 32;
/** Drop packets for a peer whose outbound queue is above this (IP is lossy; the inner TCP backs off). */
export const MAX_PEER_QUEUE = 1024 * 1024;

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

// ---- serve --tun ----

export interface TunServerOptions {
  /** the server's own address and the subnet it hands out */
  address: Cidr;
  /** interface name pattern (`vpn%d`) */
  name: string;
  mtu: number;
  /** pushed to every client */
  routes: Cidr[];
}

/**
 * `serve --tun ADDR/PREFIX`: create and bring up the server's interface; returns the mode for `serve` and `close`,
 * which removes the interface and logs the counters. Throws USAGE when the interface cannot be made.
 */
export function openTunServer(o: TunServerOptions): { mode: Mode; close(): void } {
  const pool = new AddressPool(o.address);
  const routes = o.routes.map(formatCidr);
  const serverText = formatIPv4(pool.server);
  const dev = TunDevice.create(o.name);
  const onExit = () => dev.close();
  process.on('exit', onExit);
  try {
    dev.up(o.address, o.mtu);
  } catch (e) {
    dev.close();
    throw e;
  }
  const router = new TunRouter(pool, dev);
  dev.start((p) => router.fromInterface(p));
  log.info(`tun ${dev.name} up: ${formatCidr(o.address)}, mtu ${o.mtu}${routes.length ? `, pushing routes ${routes.join(' ')}` : ''}`);
  const addrs = new Map<Session, number>();

  const mode: Mode = {
    onShutdown: 'close', // packets are no stream to cut: tell every client we are going
    config: (peer: Json, session: Session): Json | VpnError => {
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
        if (request.prefix === -1) request = { addr: request.addr, prefix: pool.prefix };
      } else if (peer.request !== null && peer.request !== undefined) {
        return new VpnError('USAGE', 'the requested address must be a string or null');
      }
      const got = pool.take(request);
      if (got instanceof VpnError) return got;
      addrs.set(session, got);
      return { mode: 'tun', address: `${formatIPv4(got)}/${pool.prefix}`, server: serverText, mtu: o.mtu, routes };
    },
    describe: (s) => `client ${s.peer} is ${formatIPv4(addrs.get(s)!)} (protocol v${s.version})`,
    app: (session) => ({
      onOpen: (s) => router.attach(addrs.get(s)!, s),
      onData: (p) => router.fromClient(addrs.get(session)!, p),
      onPeerClose: () => session.close(),
      onEnd: (err) => {
        const addr = addrs.get(session);
        if (addr === undefined) return;
        addrs.delete(session);
        router.detach(addr, session);
        pool.release(addr);
        const secs = ((Date.now() - session.startedAt) / 1000).toFixed(1);
        const why = err ? err.message : 'clean end';
        const line = `client ${formatIPv4(addr)} (${session.peer}) gone after ${secs} s, ${session.bytesIn} bytes in, ${session.bytesOut} bytes out: ${why}; address released`;
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
      log.info(`tun stats: ${router.summary()}; ${dev.stats.read} read from ${dev.name}, ${dev.stats.written} written, ${dev.stats.malformed} malformed reads`);
    },
  };
}

// ---- connect --tun ----

export interface TunClientOptions {
  /** the address asked for (prefix -1: the server's), or null for any */
  request: Cidr | null;
  name: string;
  /** overrides the server's MTU */
  mtu?: number;
  /** sent through the tunnel besides the server's */
  routes: Cidr[];
}

interface TunAnswer {
  address: Cidr;
  server: string;
  mtu: number;
  routes: Cidr[];
}

/**
 * Read the server's TUN answer (§8.4): address (A.B.C.D/N), server (A.B.C.D), mtu (MIN_MTU … MAX_MTU), routes (at most
 * MAX_ROUTES network prefixes). Throws USAGE naming the field: the server is authenticated, so a bad answer is a
 * broken or hostile server, not tampering on the path.
 */
function readAnswer(peer: Json): TunAnswer {
  try {
    const address = parseCidr(String(peer.address), 'address');
    const mtu = Number(peer.mtu);
    if (!Number.isInteger(mtu) || mtu < MIN_MTU || mtu > MAX_MTU) throw new Error(`mtu must be a whole number from ${MIN_MTU} to ${MAX_MTU}`);
    if (parseIPv4(String(peer.server)) === null) throw new Error('server must be an IPv4 address');
    if (peer.routes !== undefined && !Array.isArray(peer.routes)) throw new Error('routes must be a list');
    const list = (peer.routes as unknown[] | undefined) ?? [];
    if (list.length > MAX_ROUTES) throw new Error(`more than ${MAX_ROUTES} routes`);
    const routes = list.map((r) => parseRoute(String(r), 'route'));
    return { address, server: String(peer.server), mtu, routes };
  } catch (e) {
    throw new VpnError('USAGE', `the server sent a TUN configuration this client cannot use (${escapeText((e as Error).message)})`);
  }
}

/**
 * `connect HOST:PORT --tun auto|ADDR[/PREFIX]`: create the interface first (local problems end the run before the
 * server sees us); the mode takes the address the server hands out and carries packets. `close` removes the
 * interface and logs the counters. Throws USAGE when the interface cannot be made.
 */
export function openTunClient(o: TunClientOptions): { mode: Mode; close(): void } {
  const dev = TunDevice.create(o.name);
  const onExit = () => dev.close();
  process.on('exit', onExit);
  const request = o.request ? (o.request.prefix === -1 ? formatIPv4(o.request.addr) : formatCidr(o.request)) : null;
  let dropped = 0;
  let notIPv4 = 0;
  const mode: Mode = {
    onShutdown: 'close',
    config: () => ({ mode: 'tun', request }),
    accept: (answer) =>
      answer.mode === 'tun' ? null : new VpnError('USAGE', `the server is not in TUN mode (it answered ${modeName(answer.mode)}); start it with serve --tun ADDR/PREFIX`),
    app: (session, link) => ({
      onOpen: (sess: Session, peer: Json) => {
        try {
          const a = readAnswer(peer);
          const mtu = o.mtu ?? a.mtu;
          dev.up(a.address, mtu);
          const routes = [...o.routes, ...a.routes];
          const remote = link.socket.remoteAddress;
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
          sess.refuse(asVpnError(e, 'USAGE'));
        }
      },
      onData: (p) => {
        dev.write(p);
      },
      onPeerClose: () => session.close(),
      onEnd: () => {},
    }),
  };
  return {
    mode,
    close: () => {
      dev.close();
      process.off('exit', onExit);
      if (dev.stats.read + dev.stats.written > 0) {
        log.info(`tun stats: ${dev.stats.read} packets read from ${dev.name}, ${dev.stats.written} written; dropped: ${dropped} queue full, ${notIPv4} not IPv4, ${dev.stats.writeErrors} refused by the kernel, ${dev.stats.malformed} malformed reads`);
      }
    },
  };
}
