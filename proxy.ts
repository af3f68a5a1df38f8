/**
 * The receiving side of the PROXY protocol, versions 1 and 2 (haproxy's doc/proxy-protocol.txt), for
 * `serve --accept-proxy`: a trusted TCP load balancer in front of the server opens each connection with a header
 * naming the client's real address, and that address — not the balancer's — is then what logs, limits, the
 * per-source pre-auth budget and `--proxy-protocol` to a forward target see.
 *
 *   v1 (§2.1), text, at most 107 bytes with its CRLF:
 *     "PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF
 *     "PROXY" SP "UNKNOWN" [anything but CRLF] CRLF          (use the connection's own addresses)
 *
 *   v2 (§2.2), binary:
 *     off  0  12  signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
 *         12   1  version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
 *         13   1  family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
 *         14   2  length of what follows, big-endian
 *         16      addresses (INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108), then TLVs (type 1, length 2, value)
 *     LOCAL (the balancer's own health check) and UNSPEC/UNIX families: use the connection's own addresses.
 *
 * `parseProxyHeader` is pure: it looks at the bytes received so far and says "more", "bad" (with a reason) or "ok"
 * (the header's length and what it names). It decides as early as the bytes allow — a first byte that can start
 * neither version is refused at once — and never needs more than PROXY_MAX bytes. `ProxyAcceptor` runs it on the
 * first bytes of each accepted Link, bounded in count (PROXY_PENDING_MAX) and time (the handshake timeout).
 */
import { formatIPv4, formatIPv6, parseIPv4, parseIPv6 } from './address.ts';
import type { Link, LinkEvents } from './net.ts';

// ---- Specification constants (proxy-protocol.txt) ----
/** §2.1: a v1 line is at most 107 bytes, CRLF included ("PROXY TCP6" and two full IPv6 addresses and ports). */
export const V1_MAX = 107;
const V1_PREFIX = new TextEncoder().encode('PROXY ');
/** §2.2: the v2 signature, chosen so that it can never start a v1 line nor most other protocols. */
export const V2_SIGNATURE = Uint8Array.of(0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a);
const V2_FIXED = V2_SIGNATURE.length + 1 + 1 + 2; // signature, version|command, family|transport, length
const V2_VERSION = 0x2;
const V2_CMD_LOCAL = 0x0;
const V2_CMD_PROXY = 0x1;
const V2_INET_STREAM = 0x11;
const V2_INET6_STREAM = 0x21;
const V2_UNSPEC = 0x00;
const V2_UNIX_STREAM = 0x31;
const V2_ADDR_INET = 4 + 4 + 2 + 2;
const V2_ADDR_INET6 = 16 + 16 + 2 + 2;
const V2_ADDR_UNIX = 108 + 108;
const V2_TLV_HEAD = 1 + 2;

// ---- Tuning constants ----
/**
 * Largest v2 body (addresses and TLVs) accepted: the UNIX address block and 304 bytes of TLVs — haproxy's own
 * (ALPN, authority, unique id, SSL fields) fit — so a header is never more than PROXY_MAX bytes.
 */
export const V2_MAX_BODY = 520;
export const PROXY_MAX = V2_FIXED + V2_MAX_BODY; // 536
/** Connections waiting for their header, at most; more are dropped at accept (a front sends it at once). */
export const PROXY_PENDING_MAX = 512;

export interface ProxyEndpoint {
  /** IPv4 dotted quad or RFC 5952 IPv6 text, as the header named it (normalised) */
  readonly address: string;
  readonly port: number;
}

/** What a header said. `source` null: use the connection's own addresses (v1 UNKNOWN, v2 LOCAL/UNSPEC/UNIX). */
export interface ProxyOrigin {
  readonly version: 1 | 2;
  readonly source: ProxyEndpoint | null;
  readonly destination: ProxyEndpoint | null;
}

export type ProxyParse = { status: 'more' } | { status: 'bad'; reason: string } | { status: 'ok'; length: number; origin: ProxyOrigin };

const MORE: ProxyParse = { status: 'more' };
const bad = (reason: string): ProxyParse => ({ status: 'bad', reason });

/** Whether `buf` starts like `prefix` as far as both go. */
function startsLike(buf: Uint8Array, prefix: Uint8Array): boolean {
  const n = Math.min(buf.length, prefix.length);
  for (let i = 0; i < n; i++) if (buf[i] !== prefix[i]) return false;
  return true;
}

/**
 * Parse a PROXY protocol header at the start of `buf` (the connection's first bytes so far). Returns "more" while
 * a valid header may still come, "bad" with a reason as soon as none can, else "ok" with the header's length (the
 * bytes after it belong to the tunnel) and what it names. Never reads past PROXY_MAX bytes. Throws nothing.
 */
export function parseProxyHeader(buf: Uint8Array): ProxyParse {
  if (buf.length === 0) return MORE;
  if (buf[0] === V2_SIGNATURE[0]) return startsLike(buf, V2_SIGNATURE) ? parseV2(buf) : bad('not a PROXY protocol header (a broken v2 signature)');
  if (buf[0] === V1_PREFIX[0]) return startsLike(buf, V1_PREFIX) ? parseV1(buf) : bad('not a PROXY protocol header (it does not start with "PROXY ")');
  return bad('not a PROXY protocol header (a connection straight to the server, not through the load balancer?)');
}

const PORT_RE = /^(?:0|[1-9]\d{0,4})$/;

/**
 * An IPv6 address as text; an IPv4-mapped one (::ffff:a.b.c.d, an IPv4 client of a dual-stack front) as the IPv4
 * address it is, so that it counts as that IPv4 source (sourceOf), not as one /64 shared by every IPv4 client.
 */
function ip6Text(n: bigint): string {
  return n >> 32n === 0xffffn ? formatIPv4(Number(n & 0xffffffffn)) : formatIPv6(n);
}

function port(text: string): number | null {
  if (!PORT_RE.test(text)) return null;
  const n = Number(text);
  return n <= 65535 ? n : null;
}

function parseV1(buf: Uint8Array): ProxyParse {
  const limit = Math.min(buf.length, V1_MAX);
  let lf = -1;
  for (let i = V1_PREFIX.length; i < limit; i++) {
    const b = buf[i]!;
    if (b === 0x0a) {
      lf = i;
      break;
    }
    if (b !== 0x0d && (b < 0x20 || b > 0x7e)) return bad('a v1 header with a byte that is not printable ASCII');
  }
  if (lf < 0) return buf.length >= V1_MAX ? bad(`a v1 header longer than ${V1_MAX} bytes`) : MORE;
  if (buf[lf - 1] !== 0x0d) return bad('a v1 header not ended by CRLF');
  const line = new TextDecoder('ascii').decode(buf.subarray(0, lf - 1));
  if (line.includes('\r')) return bad('a v1 header with a stray CR');
  const f = line.split(' ');
  if (f[1] === 'UNKNOWN') return { status: 'ok', length: lf + 1, origin: { version: 1, source: null, destination: null } };
  if (f.length !== 6 || (f[1] !== 'TCP4' && f[1] !== 'TCP6')) return bad('a v1 header that is not "PROXY TCP4|TCP6 SRC DST SPORT DPORT" nor "PROXY UNKNOWN"');
  const v6 = f[1] === 'TCP6';
  const addr = (t: string): string | null => {
    if (v6) {
      const n = t.includes(':') ? parseIPv6(t) : null;
      return n === null ? null : ip6Text(n);
    }
    const n = parseIPv4(t);
    return n === null || !/^(?:(?:0|[1-9]\d*)\.){3}(?:0|[1-9]\d*)$/.test(t) ? null : formatIPv4(n);
  };
  const src = addr(f[2]!);
  const dst = addr(f[3]!);
  const sport = port(f[4]!);
  const dport = port(f[5]!);
  if (src === null || dst === null) return bad(`a v1 header with an invalid ${v6 ? 'IPv6' : 'IPv4'} address`);
  if (sport === null || dport === null) return bad('a v1 header with an invalid port');
  return { status: 'ok', length: lf + 1, origin: { version: 1, source: { address: src, port: sport }, destination: { address: dst, port: dport } } };
}

function parseV2(buf: Uint8Array): ProxyParse {
  if (buf.length < V2_FIXED) return MORE;
  const verCmd = buf[12]!;
  const fam = buf[13]!;
  const len = (buf[14]! << 8) | buf[15]!;
  if (verCmd >> 4 !== V2_VERSION) return bad(`a v2 header of version ${verCmd >> 4}, not 2`);
  const cmd = verCmd & 0x0f;
  if (cmd !== V2_CMD_LOCAL && cmd !== V2_CMD_PROXY) return bad(`a v2 header with an unknown command ${cmd}`);
  if (len > V2_MAX_BODY) return bad(`a v2 header of ${V2_FIXED + len} bytes, more than the ${PROXY_MAX} accepted`);
  // Checks that need no more bytes come first: a bad family is refused before its body has arrived.
  const need = cmd === V2_CMD_LOCAL ? 0 : fam === V2_INET_STREAM ? V2_ADDR_INET : fam === V2_INET6_STREAM ? V2_ADDR_INET6 : fam === V2_UNIX_STREAM ? V2_ADDR_UNIX : fam === V2_UNSPEC ? 0 : -1;
  if (need < 0) return bad(`a v2 header for family/transport 0x${fam.toString(16).padStart(2, '0')}, not a TCP stream`);
  if (len < need) return bad(`a v2 header whose length ${len} is too short for its addresses (${need})`);
  const total = V2_FIXED + len;
  if (buf.length < total) return MORE;
  const body = buf.subarray(V2_FIXED, total);
  // The TLVs after the addresses must be whole (they are skipped, not used).
  for (let off = need; off < len; ) {
    if (off + V2_TLV_HEAD > len) return bad('a v2 header with a cut TLV');
    off += V2_TLV_HEAD + ((body[off + 1]! << 8) | body[off + 2]!);
    if (off > len) return bad('a v2 header with a TLV longer than the header');
  }
  const origin = (source: ProxyEndpoint | null, destination: ProxyEndpoint | null): ProxyParse => ({ status: 'ok', length: total, origin: { version: 2, source, destination } });
  if (cmd === V2_CMD_LOCAL || fam === V2_UNSPEC || fam === V2_UNIX_STREAM) return origin(null, null);
  const v = new DataView(body.buffer, body.byteOffset, body.length);
  if (fam === V2_INET_STREAM) {
    return origin({ address: formatIPv4(v.getUint32(0)), port: v.getUint16(8) }, { address: formatIPv4(v.getUint32(4)), port: v.getUint16(10) });
  }
  const ip6 = (at: number) => ip6Text((v.getBigUint64(at) << 64n) | v.getBigUint64(at + 8));
  return origin({ address: ip6(0), port: v.getUint16(32) }, { address: ip6(16), port: v.getUint16(34) });
}

/** `ADDR:PORT`, with brackets around IPv6: the peer text logs use. */
export function formatEndpoint(e: ProxyEndpoint): string {
  return e.address.includes(':') ? `[${e.address}]:${e.port}` : `${e.address}:${e.port}`;
}

/** Build a v2 header (for tests and for a front written in TypeScript): PROXY TCP4/TCP6, or LOCAL when `src` is null. */
export function encodeProxyV2(src: ProxyEndpoint | null, dst: ProxyEndpoint | null, tlvs: Uint8Array = new Uint8Array(0)): Uint8Array {
  const v6 = src?.address.includes(':') ?? false;
  const addrLen = src && dst ? (v6 ? V2_ADDR_INET6 : V2_ADDR_INET) : 0;
  const out = new Uint8Array(V2_FIXED + addrLen + tlvs.length);
  out.set(V2_SIGNATURE);
  out[12] = (V2_VERSION << 4) | (src ? V2_CMD_PROXY : V2_CMD_LOCAL);
  out[13] = src ? (v6 ? V2_INET6_STREAM : V2_INET_STREAM) : V2_UNSPEC;
  const v = new DataView(out.buffer);
  v.setUint16(14, addrLen + tlvs.length);
  if (src && dst) {
    if (v6) {
      const put = (at: number, a: string) => {
        const n = parseIPv6(a)!;
        v.setBigUint64(at, n >> 64n);
        v.setBigUint64(at + 8, n & 0xffffffffffffffffn);
      };
      put(V2_FIXED, src.address);
      put(V2_FIXED + 16, dst.address);
      v.setUint16(V2_FIXED + 32, src.port);
      v.setUint16(V2_FIXED + 34, dst.port);
    } else {
      v.setUint32(V2_FIXED, parseIPv4(src.address)!);
      v.setUint32(V2_FIXED + 4, parseIPv4(dst.address)!);
      v.setUint16(V2_FIXED + 8, src.port);
      v.setUint16(V2_FIXED + 10, dst.port);
    }
  }
  out.set(tlvs, V2_FIXED + addrLen);
  return out;
}

/**
 * `serve --accept-proxy`: every accepted Link must open with a valid header within `timeoutMs`. `ready` then gets
 * the Link — its `peer` and `origin` set to the address the header named (or left as the socket's, for LOCAL and
 * UNKNOWN) — and the bytes that came after the header (at least one: the tunnel's first bytes; deliver them first).
 * A Link without a valid header and a byte after it in time is reset and `dropped` gets why; one that closes without
 * sending a byte, or right after its header (a health check), is closed without a word. At most PROXY_PENDING_MAX
 * Links wait at once.
 */
export class ProxyAcceptor {
  private pending = 0;
  constructor(
    private readonly timeoutMs: number,
    private readonly ready: (link: Link, rest: Uint8Array) => void,
    private readonly dropped: (link: Link, reason: string) => void,
  ) {}

  get waiting(): number {
    return this.pending;
  }

  accept(link: Link): void {
    if (this.pending >= PROXY_PENDING_MAX) {
      link.abort();
      this.dropped(link, `${PROXY_PENDING_MAX} connections already waiting for their PROXY header`);
      return;
    }
    this.pending++;
    let buf: Uint8Array = new Uint8Array(0);
    let header: ProxyOrigin | null = null; // parsed; waiting for the tunnel's first byte
    let over = false;
    const end = (why: string | null): boolean => {
      if (over) return false;
      over = true;
      this.pending--;
      clearTimeout(timer);
      if (why !== null) {
        link.abort();
        this.dropped(link, why);
      }
      return true;
    };
    const quiet = () => {
      if (end(null)) link.abort();
    };
    const within = `within ${this.timeoutMs / 1000} s`;
    const timer = setTimeout(() => end(header ? `no byte after the PROXY header ${within}` : `no PROXY header ${within}`), this.timeoutMs);
    /** The header is read and a tunnel byte came: hand the Link over, with the bytes after the header. */
    const handOver = (origin: ProxyOrigin, rest: Uint8Array) => {
      end(null);
      if (origin.source) {
        link.origin = { source: origin.source, destination: origin.destination };
        link.peer = formatEndpoint(origin.source);
      }
      this.ready(link, rest);
    };
    const events: LinkEvents = {
      onData: (chunk) => {
        if (over) return;
        if (header) {
          handOver(header, chunk);
          return;
        }
        // Bounded: "more" is only ever said for fewer than PROXY_MAX bytes, so buf stays below PROXY_MAX + one read.
        if (buf.length === 0) buf = chunk;
        else {
          const b = new Uint8Array(buf.length + chunk.length);
          b.set(buf);
          b.set(chunk, buf.length);
          buf = b;
        }
        const r = parseProxyHeader(buf);
        if (r.status === 'more') return;
        if (r.status === 'bad') {
          end(r.reason);
          return;
        }
        const rest = buf.subarray(r.length);
        if (rest.length > 0) handOver(r.origin, rest);
        else header = r.origin; // a client speaks first: wait for its first byte
      },
      onDrain: () => {},
      // Closed without a byte, or right after the header: a health check or port probe (haproxy's `check`, which
      // sends the header too with send-proxy), not worth a log line.
      onEnd: () => void (buf.length === 0 || header ? quiet() : end('the connection ended before a complete PROXY header')),
      onClose: () => void (buf.length === 0 || header ? quiet() : end('the connection closed before a complete PROXY header')),
    };
    link.attach(events);
  }
}
