/**
 * `--config FILE`: a TOML file (https://toml.io/en/v1.0.0, parsed by Bun's built-in Bun.TOML) that gives values for the
 * flags of one command. Its keys are the long flag names exactly (`listen`, `max-conns`, `tun-name`, `no-pfs` — TOML
 * bare keys may contain `-`), taken from vpn.ts's option table, so a new flag is a new key with no change here;
 * plus `server` for connect's HOST:PORT argument. Values: `true`/`false` for a switch (false = not given), a string
 * (or a number, for flags that take one) for a flag with a value, a string or an array of strings for a repeatable
 * flag (`route = ["10.0.0.0/8", "fd00::/16"]`). There are no tables: one file is one command's settings, and the
 * command is named on the command line (`vpn serve --config /etc/vpn/server.toml`).
 *
 * A flag on the command line replaces the file's value for it (a repeatable one replaces the whole list). An unknown
 * key, a key the command does not take, a value of the wrong type and a TOML syntax error are USAGE errors naming the
 * file, the key and its line; a value the command's own parsers refuse later is named the same way (`locate`).
 *
 * A file that holds `secret` is a key file: it is refused if group or others can read it or another user owns it,
 * as --key files are, unless --insecure-key-file.
 */
import { VpnError } from './errors.ts';
import { log } from './log.ts';
import { privacyProblems, readFileOnce } from './keyring.ts';

/** How a flag takes its value (vpn.ts's option table). */
export type OptionKind = 'string' | 'boolean' | 'list';
/** Flags as vpn.ts's parser returns them. */
export type ConfigFlags = Record<string, string | boolean | string[] | undefined>;

/** The key for connect's positional HOST:PORT. */
export const SERVER_KEY = 'server';
/** Flags that make no sense in a file. */
const NOT_IN_FILE = new Set(['config', 'help']);
/** Bigger than any honest configuration file. */
const MAX_CONFIG_BYTES = 64 << 10;

export interface Config {
  path: string;
  flags: ConfigFlags;
  /** connect's HOST:PORT (`server = …`), if the file gives one */
  server?: string;
  /** the line (1-based) of each key the file sets */
  lines: Map<string, number>;
}

/**
 * Parse `text`, the contents of config file `path`, for `command`, whose flags are `allowed` of `options`. Returns the
 * flags it sets. Throws USAGE naming the file, key and line for a syntax error, an unknown key, a key `command` does
 * not take, or a value of the wrong type.
 */
export function parseConfig(text: string, path: string, command: string, options: Record<string, { kind: OptionKind }>, allowed: readonly string[]): Config {
  let doc: Record<string, unknown>;
  try {
    doc = Bun.TOML.parse(text) as Record<string, unknown>;
  } catch (e) {
    // Bun's error has no position in the file (its line/column are of the JS caller): find the line by parsing
    // shorter and shorter prefixes. A statement spanning lines (an array) is named by its first line.
    const msg = ((e as Error).message ?? String(e)).replace(/^TOML Parse error: /, '');
    throw new VpnError('USAGE', `config file ${path} line ${syntaxErrorLine(text)}: ${msg}`);
  }
  const lines = keyLines(text);
  const at = (key: string) => `config file ${path} line ${lines.get(key) ?? '?'}`;
  const cfg: Config = { path, flags: {}, lines: new Map() };
  for (const [key, value] of Object.entries(doc)) {
    cfg.lines.set(key, lines.get(key) ?? 0);
    const shown = JSON.stringify(key);
    if (command === 'connect' && key === SERVER_KEY && !Object.hasOwn(options, key)) {
      if (typeof value !== 'string') throw new VpnError('USAGE', `${at(key)}: ${shown} (the server's HOST:PORT) expects a string, got ${typeName(value)}`);
      cfg.server = value;
      continue;
    }
    const spec = Object.hasOwn(options, key) ? options[key] : undefined; // not toString, __proto__ …
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
      throw new VpnError('USAGE', `${at(key)}: [${key}] is a table; this file takes no tables, only the flags of ${command} as top-level keys`);
    }
    if (!spec || NOT_IN_FILE.has(key)) throw new VpnError('USAGE', `${at(key)}: unknown key ${shown} (the keys are the long flags of ${command}, without --)`);
    if (!allowed.includes(key)) throw new VpnError('USAGE', `${at(key)}: ${command} does not take ${shown} (--${key})`);
    if (spec.kind === 'boolean') {
      if (typeof value !== 'boolean') throw new VpnError('USAGE', `${at(key)}: ${shown} expects true or false, got ${typeName(value)}`);
      if (value) cfg.flags[key] = true;
    } else if (spec.kind === 'string') {
      const s = scalar(value);
      if (s === null) throw new VpnError('USAGE', `${at(key)}: ${shown} expects a string${typeof value === 'boolean' ? '' : ' or a number'}, got ${typeName(value)}`);
      cfg.flags[key] = s;
    } else {
      const list = Array.isArray(value) ? value.map(scalar) : [scalar(value)];
      if (list.some((s) => s === null)) throw new VpnError('USAGE', `${at(key)}: ${shown} expects a string or an array of strings, got ${typeName(value)}`);
      cfg.flags[key] = list as string[];
    }
  }
  return cfg;
}

/**
 * Read and parse config file `path` (parseConfig). The file is opened once and the open descriptor checked and read;
 * one holding `secret` must be private like a key file unless `insecure`. Throws USAGE.
 */
export function readConfig(path: string, command: string, options: Record<string, { kind: OptionKind }>, allowed: readonly string[], insecure: boolean): Config {
  const { text, st } = readFileOnce(path, 'config file', MAX_CONFIG_BYTES);
  const cfg = parseConfig(text, path, command, options, allowed);
  if (cfg.flags.secret !== undefined) {
    const uid = process.getuid?.() ?? st.uid;
    const problems = privacyProblems(st); // the key files' rule (keyring.ts)
    if (problems.length > 0) {
      const what = `config file ${path} holds a secret (line ${cfg.lines.get('secret')}) and ${problems.join(' and ')}`;
      const fix = `chmod 600 ${path}${st.uid !== uid ? ' and chown it to this user' : ''}, or move the secret to a key file (key = …)`;
      if (!insecure && cfg.flags['insecure-key-file'] !== true) throw new VpnError('USAGE', `${what}; ${fix}, or pass --insecure-key-file to use it anyway`);
      log.warn(`warning: ${what}; using it because of --insecure-key-file (${fix})`);
    }
  }
  return cfg;
}

/** The file's flags overridden by the command line's (`cli`); `cfg.lines` keeps only the keys that still count. */
export function mergeFlags(cfg: Config, cli: ConfigFlags, cliPositionals: string[]): { flags: ConfigFlags; positionals: string[] } {
  for (const k of Object.keys(cli)) if (cli[k] !== undefined) cfg.lines.delete(k);
  const positionals = cliPositionals.length > 0 || cfg.server === undefined ? cliPositionals : [cfg.server];
  if (cliPositionals.length > 0) cfg.lines.delete(SERVER_KEY);
  return { flags: { ...cfg.flags, ...cli }, positionals };
}

/**
 * `e` with the place in the config file of the flag its message names first (`--workers: …` → `config file F line 3
 * (workers): --workers: …`), when that flag's value came from the file; else `e` unchanged.
 */
export function locate(e: VpnError, cfg: Config): VpnError {
  if (e.code !== 'USAGE') return e;
  for (const m of e.message.matchAll(/--([a-z][a-z0-9-]*)/g)) {
    const key = m[1]!;
    const line = cfg.lines.get(key);
    if (line !== undefined) {
      const out = new VpnError('USAGE', `config file ${cfg.path} line ${line} (${key}): ${e.message}`);
      out.final = e.final;
      return out;
    }
    return e; // the first flag named came from the command line
  }
  if (cfg.lines.has(SERVER_KEY) && /^address\b/.test(e.message)) return new VpnError('USAGE', `config file ${cfg.path} line ${cfg.lines.get(SERVER_KEY)} (${SERVER_KEY}): ${e.message}`);
  return e;
}

/** `flags` as command-line arguments again (`--name=value`, repeated for a list), for a child running the same command. */
export function flagsToArgs(flags: ConfigFlags, options: Record<string, { kind: OptionKind }>): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(flags)) {
    if (v === undefined || v === false || !Object.hasOwn(options, k)) continue;
    if (v === true) out.push(`--${k}`);
    else if (Array.isArray(v)) for (const x of v) out.push(`--${k}=${x}`);
    else out.push(`--${k}=${v}`);
  }
  return out;
}

function scalar(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  return null;
}

function typeName(v: unknown): string {
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return 'a string';
  if (typeof v === 'number') return `the number ${v}`;
  if (typeof v === 'boolean') return String(v);
  return typeof v;
}

/**
 * The line of each top-level key in `text`: `key =`, `"key" =` or `'key' =` at the start of a line before the first
 * table header. Keys inside multi-line strings are not told apart; a config file has none worth the complexity.
 */
export function keyLines(text: string): Map<string, number> {
  const out = new Map<string, number>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i]!;
    const table = /^\s*\[+\s*([A-Za-z0-9_-]+|"[^"]*"|'[^']*')/.exec(l);
    if (table) {
      const name = table[1]!.replace(/^["']|["']$/g, '');
      if (!out.has(name)) out.set(name, i + 1);
      continue;
    }
    const m = /^\s*(?:([A-Za-z0-9_-]+)|"([^"\\]*)"|'([^']*)')\s*=/.exec(l);
    if (m) {
      const key = m[1] ?? m[2] ?? m[3]!;
      if (!out.has(key)) out.set(key, i + 1);
    }
  }
  return out;
}

/** The line a TOML syntax error is on: one past the longest prefix of whole lines that still parses. */
function syntaxErrorLine(text: string): number | string {
  const lines = text.split('\n');
  if (lines.length > 2_000) return '?'; // one parse per line: bounded
  for (let n = lines.length - 1; n >= 0; n--) {
    try {
      Bun.TOML.parse(lines.slice(0, n).join('\n'));
      return n + 1;
    } catch {
      // the error is at or before line n
    }
  }
  return 1;
}
