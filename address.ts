/**
 * Endpoint syntax shared by every flag that takes an address: `HOST:PORT`, `[IPv6]:PORT`, `PORT` (where a default
 * host applies) and `unix:/path`.
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
