/**
 * Reusable helpers for the tests: spawn `bun vpn.ts …` as a user would, wait for its log lines, make keys and
 * random data, hash outputs. Everything binds to 127.0.0.1 and cleans up after itself.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Subprocess } from 'bun';

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

/** A spawned vpn process whose stderr is collected line by line. */
export class VpnProcess {
  readonly proc: Subprocess<'pipe' | 'ignore', 'pipe', 'pipe'>;
  stderr = '';
  private waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
  readonly stdoutBytes: Promise<Uint8Array>;

  constructor(args: string[], opts: { stdin?: 'pipe' | 'ignore'; env?: Record<string, string>; cwd?: string } = {}) {
    this.proc = Bun.spawn(['bun', VPN, ...args], {
      stdin: opts.stdin ?? 'ignore',
      stdout: 'pipe',
      stderr: 'pipe',
      env: { ...process.env, ...(opts.env ?? {}) },
      cwd: opts.cwd ?? ROOT,
    }) as Subprocess<'pipe' | 'ignore', 'pipe', 'pipe'>;
    this.stdoutBytes = new Response(this.proc.stdout).arrayBuffer().then((b) => new Uint8Array(b));
    void this.readStderr();
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
    void this.proc.exited.then(() =>
      setTimeout(() => {
        this.check();
        reject(new Error(`process exited (${this.proc.exitCode}) before ${re} appeared in stderr:\n${this.stderr}`));
      }, 200),
    );
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

  /** Exit status, or throw after `ms`. */
  async exit(ms = 60000): Promise<number> {
    const t = setTimeout(() => this.proc.kill('SIGKILL'), ms);
    try {
      return await this.proc.exited;
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
