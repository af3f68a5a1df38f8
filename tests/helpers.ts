/**
 * Reusable helpers for the tests: spawn `bun vpn.ts …` as a user would, wait for its log lines, make keys and
 * random data, hash outputs. Everything binds to 127.0.0.1 and cleans up after itself.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Socket, Subprocess } from 'bun';
import type { Engine } from '../engine.ts';

export const ROOT = join(import.meta.dir, '..');
export const VPN = join(ROOT, 'vpn.ts');

export function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

export function random(n: number): Uint8Array {
  return new Uint8Array(randomBytes(n));
}

/** A temporary directory removed by `dispose` (use with `using`). */
export function tempDir(): { path: string; [Symbol.dispose](): void } {
  const path = mkdtempSync(join(tmpdir(), 'vpn-test-'));
  return { path, [Symbol.dispose]: () => rmSync(path, { recursive: true, force: true }) };
}

/** Run `bun vpn.ts keygen` into `dir` and return the key path. */
export async function keygen(dir: string, name = 'key'): Promise<string> {
  const path = join(dir, name);
  const p = Bun.spawn(['bun', VPN, 'keygen', path], { stdout: 'ignore', stderr: 'pipe' });
  if ((await p.exited) !== 0) throw new Error(`keygen failed: ${await new Response(p.stderr).text()}`);
  return path;
}

export type SpawnOptions = { stdin?: 'pipe' | 'ignore'; env?: Record<string, string>; cwd?: string };

/**
 * A spawned command whose stdout is collected as bytes and stderr as text, with waits on its log lines. Used for
 * `bun vpn.ts …` (VpnProcess) and for commands VpnProcess cannot start (`ip netns exec …`, relays, HTTP servers).
 */
export class Proc {
  readonly proc: Subprocess<'pipe' | 'ignore', 'pipe', 'pipe'>;
  stderr = '';
  private waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
  readonly stdoutBytes: Promise<Uint8Array>;
  private readonly stderrDone: Promise<void>;

  constructor(cmd: string[], opts: SpawnOptions = {}) {
    this.proc = Bun.spawn(cmd, {
      stdin: opts.stdin ?? 'ignore',
      stdout: 'pipe',
      stderr: 'pipe',
      env: { ...process.env, ...(opts.env ?? {}) },
      cwd: opts.cwd ?? ROOT,
    }) as Subprocess<'pipe' | 'ignore', 'pipe', 'pipe'>;
    this.stdoutBytes = new Response(this.proc.stdout).arrayBuffer().then((b) => new Uint8Array(b));
    this.stderrDone = this.readStderr();
  }

  private async readStderr(): Promise<void> {
    const dec = new TextDecoder();
    for await (const chunk of this.proc.stderr) {
      this.stderr += dec.decode(chunk, { stream: true });
      this.check();
    }
  }

  private check(): void {
    this.waiters = this.waiters.filter((w) => {
      const m = this.stderr.match(w.re);
      if (m) w.resolve(m);
      return !m;
    });
  }

  /** Resolve when stderr matches `re`; reject after `ms` or if the process exits first. */
  async waitFor(re: RegExp, ms = 15000): Promise<RegExpMatchArray> {
    const m = this.stderr.match(re);
    if (m) return m;
    const { promise, resolve, reject } = Promise.withResolvers<RegExpMatchArray>();
    this.waiters.push({ re, resolve });
    const t = setTimeout(() => reject(new Error(`timed out waiting for ${re} in stderr:\n${this.stderr}`)), ms);
    void this.proc.exited.then(async () => {
      await Promise.race([this.stderrDone, Bun.sleep(2000)]);
      this.check();
      reject(new Error(`process exited (${this.proc.exitCode}) before ${re} appeared in stderr:\n${this.stderr}`));
    });
    try {
      return await promise;
    } finally {
      clearTimeout(t);
    }
  }

  /** The port of the `listening on HOST:PORT` line. */
  async listeningPort(): Promise<number> {
    const m = await this.waitFor(/^listening on .*:(\d+)$/m);
    return Number(m[1]);
  }

  /** Exit status (SIGKILL after `ms`), once stderr has been read to its end. */
  async exit(ms = 60000): Promise<number> {
    const t = setTimeout(() => this.kill('SIGKILL'), ms);
    try {
      const code = await this.proc.exited;
      await Promise.race([this.stderrDone, Bun.sleep(2000)]);
      return code;
    } finally {
      clearTimeout(t);
    }
  }

  get pid(): number {
    return this.proc.pid;
  }

  kill(sig: NodeJS.Signals | number = 'SIGTERM'): void {
    try {
      this.proc.kill(sig);
    } catch {
      // already gone
    }
  }

  [Symbol.dispose](): void {
    this.kill('SIGKILL');
  }
}

/** `bun vpn.ts ARGS…`, spawned as a user would run it. */
export class VpnProcess extends Proc {
  constructor(args: string[], opts: SpawnOptions = {}) {
    super(['bun', VPN, ...args], opts);
  }
}

/** An engine that counts decryptCbc calls: proves when (and that never) something was decrypted. */
export function spied(e: Engine): { engine: Engine; decrypts: () => number } {
  let n = 0;
  const engine: Engine = {
    ...e,
    decryptCbc(...args: Parameters<Engine['decryptCbc']>) {
      n++;
      return e.decryptCbc(...args);
    },
    cbc(key) {
      const c = e.cbc(key);
      return {
        encrypt: c.encrypt.bind(c),
        decrypt(...args) {
          n++;
          return c.decrypt(...args);
        },
        wipe: c.wipe.bind(c),
      };
    },
  };
  return { engine, decrypts: () => n };
}

/** `serve --forward TARGET` and `connect --local` to it on free ports, both killed on dispose. */
export async function forwardPair(key: string, target: string, o: { serve?: string[]; connect?: string[]; clientKey?: string } = {}) {
  const srv = new VpnProcess(['serve', '--listen', '127.0.0.1:0', '--key', key, '--forward', target, ...(o.serve ?? [])]);
  const sport = await srv.listeningPort();
  const cli = new VpnProcess(['connect', `127.0.0.1:${sport}`, '--key', o.clientKey ?? key, '--local', '127.0.0.1:0', ...(o.connect ?? [])]);
  const lport = await cli.listeningPort();
  return {
    srv,
    cli,
    sport,
    lport,
    [Symbol.dispose]() {
      cli.kill('SIGKILL');
      srv.kill('SIGKILL');
    },
  };
}

/** Write `data` to a process's stdin in chunks (respecting its pipe), then close it. */
export async function feedStdin(p: VpnProcess, data: Uint8Array, chunk = 1 << 16): Promise<void> {
  const sink = p.proc.stdin as import('bun').FileSink;
  for (let off = 0; off < data.length; off += chunk) {
    const w = sink.write(data.subarray(off, Math.min(off + chunk, data.length)));
    if (w instanceof Promise) await w; // never leave a write's rejection unhandled
    await sink.flush();
  }
  await sink.end();
}

/** Open TCP connection count helpers: descriptors of a process (Linux /proc). */
export function fdCount(pid: number): number {
  return require('node:fs').readdirSync(`/proc/${pid}/fd`).length;
}

/** VmRSS of a process in KiB (Linux /proc). */
export function rssKiB(pid: number): number {
  const s = require('node:fs').readFileSync(`/proc/${pid}/status`, 'utf8') as string;
  return Number(/VmRSS:\s+(\d+)/.exec(s)?.[1] ?? 0);
}

/** Poll `cond` every 50 ms until it holds or `ms` passes; returns whether it held. */
export async function until(cond: () => boolean | Promise<boolean>, ms = 10000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return true;
    await Bun.sleep(50);
  }
  return await cond();
}

/**
 * `bun vpn.ts ARGS…` on a real pseudo-terminal (script(1)): what it prints (stdout and stderr, merged by the
 * terminal) is collected as it comes, `waitFor` waits for a pattern in it, `type` is a user typing.
 */
export class Pty {
  readonly p: Subprocess<'pipe', 'pipe', 'pipe'>;
  out = '';
  private waiters: { re: RegExp; resolve: () => void }[] = [];
  private readonly done: Promise<void>;
  constructor(args: string[], env: Record<string, string> = {}) {
    // `exec`, so the terminal's foreground process is bun itself, as under an interactive shell: without it a
    // non-interactive shell (dash when SHELL is unset, as under CI) stays in the foreground, gets the Ctrl-C too and
    // exits 130 whatever bun did.
    const p = Bun.spawn(['script', '-qfec', ['exec', process.execPath, 'vpn.ts', ...args].join(' '), '/dev/null'], {
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
      cwd: ROOT,
      env: { ...process.env, ...env },
    });
    this.p = p;
    this.done = (async () => {
      const d = new TextDecoder();
      for await (const chunk of p.stdout) {
        this.out += d.decode(chunk, { stream: true });
        this.waiters = this.waiters.filter((w) => !(w.re.test(this.out) && (w.resolve(), true)));
      }
    })();
  }
  async waitFor(re: RegExp, ms = 15000): Promise<void> {
    if (re.test(this.out)) return;
    const { promise, resolve, reject } = Promise.withResolvers<void>();
    this.waiters.push({ re, resolve });
    const t = setTimeout(() => reject(new Error(`timed out waiting for ${re} on the terminal:\n${this.out}`)), ms);
    void this.p.exited.then(async () => {
      await Promise.race([this.done, Bun.sleep(1000)]);
      if (re.test(this.out)) resolve();
      else reject(new Error(`exited (${this.p.exitCode}) before ${re} appeared on the terminal:\n${this.out}`));
    });
    try {
      await promise;
    } finally {
      clearTimeout(t);
    }
  }
  async type(text: string): Promise<void> {
    this.p.stdin.write(text);
    await this.p.stdin.flush();
  }
  /** The command's exit status (script -e passes it on), or -1 if it had not exited after `ms`. */
  async exit(ms = 15000): Promise<number> {
    const code = await Promise.race([this.p.exited, Bun.sleep(ms).then(() => -1)]);
    await Promise.race([this.done, Bun.sleep(1000)]);
    return code;
  }
  [Symbol.dispose](): void {
    try {
      this.p.stdin.end();
    } catch {
      // already closed
    }
    this.p.kill('SIGKILL');
  }
}

/**
 * A TCP echo target standing in for the service behind `serve --forward`: each connection is echoed back; what the
 * socket does not take yet is queued and flushed on drain, and the FIN waits for it (under a flood the tunnel is slow
 * to read, and a dropped rest, or an end() before it is out, would cut the echo). Counts the connections it gets.
 * With `proxied`, it first reads the PROXY v1 line `serve --proxy-protocol` sends and keeps it in `headers`.
 */
export function echoTarget(proxied = false) {
  type Echo = { q: Uint8Array[]; ending: boolean; head: string | null };
  const headers: string[] = [];
  const stats = { conns: 0 };
  const flush = (s: Socket<Echo>) => {
    while (s.data.q.length > 0) {
      const head = s.data.q[0]!;
      const n = s.write(head);
      if (n < head.length) {
        s.data.q[0] = head.subarray(Math.max(n, 0));
        return;
      }
      s.data.q.shift();
    }
    if (s.data.ending) s.shutdown();
  };
  const listener = Bun.listen<Echo>({
    hostname: '127.0.0.1',
    port: 0,
    allowHalfOpen: true,
    data: { q: [], ending: false, head: null },
    socket: {
      open: (s) => {
        s.data = { q: [], ending: false, head: proxied ? '' : null };
        stats.conns++;
      },
      data: (s, d) => {
        let bytes = new Uint8Array(d);
        if (s.data.head !== null) {
          const text = s.data.head + Buffer.from(bytes).toString('latin1');
          const nl = text.indexOf('\r\n');
          if (nl < 0) {
            s.data.head = text;
            return;
          }
          headers.push(text.slice(0, nl));
          bytes = new Uint8Array(Buffer.from(text.slice(nl + 2), 'latin1'));
          s.data.head = null;
        }
        s.data.q.push(bytes);
        flush(s);
      },
      drain: (s) => flush(s),
      end: (s) => {
        s.data.ending = true;
        flush(s);
      },
    },
  });
  return { listener, stats, headers, port: listener.port, [Symbol.dispose]: () => listener.stop(true) };
}
