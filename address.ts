/**
 * Address syntax: endpoints for every flag that takes one (`HOST:PORT`, `[IPv6]:PORT`, `PORT` where a default host
 * applies, `unix:/path`), and IPv4 addresses and prefixes for TUN mode (`10.66.0.1/24`, `--route`).
 */
import { VpnError } from './errors.ts';

export type Address = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export const DEFAULT_HOST = '127.0.0.1';
export const DEFAULT_PORT = 32694;

/** Parse an endpoint; `defaultHost` lets a bare `PORT` through. Throws USAGE naming `flag` on bad input. */
export function parseAddress(text: string, flag: string, defaultHost?: string): Address {
  if (text.startsWith('unix:')) {
    const path = text.slice(5);
    if (!path) throw new VpnError('USAGE', `${flag}: "unix:" needs a path, as in unix:/run/vpn.sock`);
    return { kind: 'unix', path };
  }
  let host: string;
  let portText: string;
  const v6 = /^\[([0-9a-fA-F:.]+)\]:(\d+)$/.exec(text);
  if (v6) {
    host = v6[1]!;
    portText = v6[2]!;
  } else if (/^\d+$/.test(text) && defaultHost !== undefined) {
    host = defaultHost;
    portText = text;
  } else {
    const i = text.lastIndexOf(':');
    if (i <= 0 || text.indexOf(':') !== i) {
      throw new VpnError('USAGE', `${flag}: expected HOST:PORT, [IPv6]:PORT or unix:/path, got "${text}"`);
    }
    host = text.slice(0, i);
    portText = text.slice(i + 1);
  }
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535) throw new VpnError('USAGE', `${flag}: invalid port "${portText}"`);
  return { kind: 'tcp', host, port };
}

/** `HOST:PORT` with brackets around IPv6 literals, or `unix:/path`. */
export function formatAddress(a: Address): string {
  if (a.kind === 'unix') return `unix:${a.path}`;
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

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
