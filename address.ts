/**
 * Address syntax: endpoints for every flag that takes one (`HOST:PORT`, `[IPv6]:PORT`, `PORT` where a default host
 * applies, `unix:/path`), and IPv4 and IPv6 addresses and prefixes for TUN mode (`10.66.0.1/24`, `fd00:66::1/64`,
 * `--route`). IPv4 addresses are u32 numbers, IPv6 addresses 128-bit bigints; IPv6 text is RFC 4291 §2.2 on input
 * (`::`, an embedded dotted quad) and RFC 5952 on output (lower case, the longest run of zero groups as `::`).
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

// ---- IPv6 addresses and prefixes ----

/** An IPv6 prefix: `v6` tells it from an IPv4 Cidr. */
export interface Cidr6 {
  v6: true;
  addr: bigint;
  prefix: number;
}

/** A prefix of either family (TUN mode takes both). */
export type Prefix = Cidr | Cidr6;

export const isCidr6 = (c: Prefix): c is Cidr6 => (c as Cidr6).v6 === true;

const ALL_ONES6 = (1n << 128n) - 1n;

/** RFC 4291 §2.2 text (`fd00:66::1`, `::`, `::ffff:10.0.0.1`; no zone, no brackets) → 128-bit bigint, or null. */
export function parseIPv6(text: string): bigint | null {
  if (text.length < 2 || text.length > 45 || !/^[0-9a-fA-F:.]+$/.test(text)) return null;
  let head = text;
  let v4tail: number | null = null;
  const lastColon = text.lastIndexOf(':');
  if (text.includes('.')) {
    v4tail = parseIPv4(text.slice(lastColon + 1));
    if (v4tail === null) return null;
    head = `${text.slice(0, lastColon + 1)}0:0`; // the dotted quad stands for two groups
  }
  const halves = head.split('::');
  if (halves.length > 2) return null;
  const groups = (h: string) => (h === '' ? [] : h.split(':'));
  const left = groups(halves[0]!);
  const right = halves.length === 2 ? groups(halves[1]!) : [];
  const given = left.length + right.length;
  if (halves.length === 1 ? given !== 8 : given > 7) return null;
  const all = [...left, ...Array<string>(8 - given).fill('0'), ...right];
  let n = 0n;
  for (const g of all) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return null;
    n = (n << 16n) | BigInt(parseInt(g, 16));
  }
  if (v4tail !== null) n = (n & ~0xffffffffn) | BigInt(v4tail);
  return n;
}

/** 128-bit bigint → RFC 5952 text: lower-case hex, no leading zeros, the first longest run (≥ 2) of zero groups as `::`. */
export function formatIPv6(n: bigint): string {
  const g: number[] = [];
  for (let i = 7; i >= 0; i--) g.push(Number((n >> BigInt(i * 16)) & 0xffffn));
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) {
      best = i;
      bestLen = j - i;
    }
    i = j === i ? i + 1 : j;
  }
  const hex = (a: number[]) => a.map((x) => x.toString(16)).join(':');
  if (best < 0) return hex(g);
  return `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

export function formatCidr6(c: Cidr6): string {
  return `${formatIPv6(c.addr)}/${c.prefix}`;
}

/** A prefix of either family as text. */
export function formatPrefix(c: Prefix): string {
  return isCidr6(c) ? formatCidr6(c) : formatCidr(c);
}

export function maskOf6(prefix: number): bigint {
  return prefix === 0 ? 0n : (ALL_ONES6 << BigInt(128 - prefix)) & ALL_ONES6;
}

export function cidr6Contains(c: Cidr6, addr: bigint): boolean {
  const m = maskOf6(c.prefix);
  return (c.addr & m) === (addr & m);
}

/**
 * Parse `IPv6/N`, or a bare IPv6 address when `bare` is given (it gets `bare` as its prefix, unchecked, as with
 * parseCidr). Throws USAGE naming `what`.
 */
export function parseCidr6(text: string, what: string, bare?: number): Cidr6 {
  const [a, p, extra] = text.split('/');
  const addr = parseIPv6(a ?? '');
  const prefix = p === undefined ? bare : /^\d{1,3}$/.test(p) ? Number(p) : NaN;
  if (addr === null || extra !== undefined || prefix === undefined || (p !== undefined && !(prefix >= 0 && prefix <= 128))) {
    throw new VpnError('USAGE', `${what}: expected an IPv6 address and prefix such as fd00:66::1/64, got "${text}"`);
  }
  return { v6: true, addr, prefix };
}

/**
 * Parse a prefix of either family: IPv6 when the text holds a ":", else IPv4 (parseCidr). Throws USAGE naming `what`
 * and both forms.
 */
export function parsePrefix(text: string, what: string, bare?: number): Prefix {
  try {
    return text.includes(':') ? parseCidr6(text, what, bare) : parseCidr(text, what, bare);
  } catch {
    throw new VpnError('USAGE', `${what}: expected an IPv4 address and prefix such as 10.66.0.1/24, or an IPv6 one such as fd00:66::1/64, got "${text}"`);
  }
}

/** A `--route` value of either family: a network address with its prefix (host bits zero). */
export function parseAnyRoute(text: string, what = '--route'): Prefix {
  if (!text.includes(':')) return parseRoute(text, what);
  const c = parseCidr6(text, what);
  const net = c.addr & maskOf6(c.prefix);
  if (net !== c.addr) throw new VpnError('USAGE', `${what}: ${text} has host bits set; did you mean ${formatCidr6({ v6: true, addr: net, prefix: c.prefix })}?`);
  return c;
}
