/**
 * Logs: one line per event on stderr, never a secret. `--quiet` keeps errors only. Repeated identical failures
 * from one source are rate-limited so that a flood cannot fill a disk.
 */

export type Level = 'info' | 'warn' | 'error';

/** At most this many identical lines per key per window; the rest are counted and summarised. */
const RATE_BURST = 5;
const RATE_WINDOW_MS = 10_000;
const RATE_MAX_KEYS = 10_000;

export class Logger {
  quiet = false;
  private buckets = new Map<string, { start: number; count: number; suppressed: number }>();
  constructor(private readonly out: (line: string) => void = (l) => process.stderr.write(l + '\n')) {}

  info(msg: string): void {
    if (!this.quiet) this.out(msg);
  }
  warn(msg: string): void {
    if (!this.quiet) this.out(msg);
  }
  error(msg: string): void {
    this.out(msg);
  }

  /** Log `msg` at `level` unless `key` (say, "handshake failed|10.0.0.1|reason") was logged too often lately. */
  limited(level: Level, key: string, msg: string): void {
    const now = Date.now();
    let b = this.buckets.get(key);
    if (b && now - b.start > RATE_WINDOW_MS) {
      if (b.suppressed > 0) this[level](`(${b.suppressed} similar lines suppressed: ${key.split('|').join(' ')})`);
      this.buckets.delete(key);
      b = undefined;
    }
    if (!b) {
      if (this.buckets.size >= RATE_MAX_KEYS) this.buckets.clear();
      b = { start: now, count: 0, suppressed: 0 };
      this.buckets.set(key, b);
    }
    if (++b.count <= RATE_BURST) this[level](msg);
    else b.suppressed++;
  }
}

export const log = new Logger();
