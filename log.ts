/**
 * Logs: one line per event on stderr, never a secret. `--quiet` keeps errors only.
 *
 * Lines a peer can cause (a failed handshake, a refusal, a session's end: everything logged through `limited`) pass
 * two limits, so that no flood can fill a disk or drown the operator's lines:
 *   per key   at most RATE_BURST identical lines per key ("handshake failed|10.0.0.1|AUTH_FAILED") per window, then
 *             one "(N similar lines suppressed …)" line when the window is over. At most RATE_MAX_KEYS keys are
 *             tracked; the oldest is dropped first (its suppressed count goes to the global one).
 *   global    at most GLOBAL_BURST such lines at once and GLOBAL_PER_SEC a second on average (a token bucket),
 *             whatever the key, since a flood from many addresses has many keys; what it holds back is counted and
 *             reported as one "(N lines suppressed …)" line every SUMMARY_MS while there is something to report.
 * Lines the process writes of itself (`info`, `warn`, `error`: listening, shutdown, a session opened) are not limited.
 */

export type Level = 'info' | 'warn' | 'error';

// ---- Tuning constants ----
/** At most this many identical lines per key per window; the rest are counted and summarised. */
const RATE_BURST = 5;
const RATE_WINDOW_MS = 10_000;
/** Keys tracked at once: enough for every address of a busy server, small enough to be nothing in memory. */
const RATE_MAX_KEYS = 1024;
/** Rate-limited lines, all keys together: 20 at once, 10 a second on average (36,000 an hour at most). */
const GLOBAL_BURST = 20;
const GLOBAL_PER_SEC = 10;
/** How often the count of globally suppressed lines is written while there is one. */
const SUMMARY_MS = 10_000;

type Bucket = { start: number; count: number; suppressed: number; level: Level };

export class Logger {
  quiet = false;
  private buckets = new Map<string, Bucket>();
  private tokens = GLOBAL_BURST;
  private refilledAt: number;
  private suppressed = 0;
  private summaryTimer: ReturnType<typeof setTimeout> | null = null;

  /** `out` receives each line; `now` is the clock (tests drive both). */
  constructor(
    private readonly out: (line: string) => void = (l) => process.stderr.write(l + '\n'),
    private readonly now: () => number = Date.now,
  ) {
    this.refilledAt = now();
  }

  info(msg: string): void {
    if (!this.quiet) this.out(msg);
  }
  warn(msg: string): void {
    if (!this.quiet) this.out(msg);
  }
  error(msg: string): void {
    this.out(msg);
  }

  /** Log `msg` at `level` unless `key` (say, "handshake failed|10.0.0.1|reason") or all keys together were too frequent lately. */
  limited(level: Level, key: string, msg: string): void {
    const now = this.now();
    let b = this.buckets.get(key);
    if (b && now - b.start > RATE_WINDOW_MS) {
      this.buckets.delete(key);
      if (b.suppressed > 0) this.emit(b.level, `(${b.suppressed} similar lines suppressed: ${key.split('|').join(' ')})`, now);
      b = undefined;
    }
    if (!b) {
      this.evictOldest();
      b = { start: now, count: 0, suppressed: 0, level };
      this.buckets.set(key, b);
    }
    if (++b.count <= RATE_BURST) {
      if (!this.emit(level, msg, now)) b.count--; // held back globally: counted there, not against its key
    } else b.suppressed++;
  }

  /** Lines held back by the global limit and not yet reported (tests). */
  get pendingSuppressed(): number {
    return this.suppressed;
  }

  /** Write the "(N lines suppressed …)" line now if there is one (tests; the timer does it otherwise). */
  flushSuppressed(): void {
    if (this.summaryTimer) clearTimeout(this.summaryTimer);
    this.summaryTimer = null;
    this.summary();
  }

  /** Keep the key map within RATE_MAX_KEYS: drop the oldest keys (insertion order is the order their windows began). */
  private evictOldest(): void {
    for (const [k, b] of this.buckets) {
      if (this.buckets.size < RATE_MAX_KEYS) break;
      this.buckets.delete(k);
      if (b.suppressed > 0) {
        this.suppressed += b.suppressed; // its own summary would be one more line: the global one counts it
        this.armSummary();
      }
    }
  }

  /** One rate-limited line through the global bucket; false when it was held back (and counted). */
  private emit(level: Level, msg: string, now: number): boolean {
    this.tokens = Math.min(GLOBAL_BURST, this.tokens + ((now - this.refilledAt) * GLOBAL_PER_SEC) / 1000);
    this.refilledAt = now;
    if (this.tokens >= 1) {
      this.tokens--;
      this[level](msg);
      return true;
    }
    this.suppressed++;
    this.armSummary();
    return false;
  }

  private armSummary(): void {
    if (this.summaryTimer) return;
    this.summaryTimer = setTimeout(() => {
      this.summaryTimer = null;
      this.summary();
    }, SUMMARY_MS);
    this.summaryTimer.unref?.();
  }

  private summary(): void {
    if (this.suppressed === 0) return;
    const n = this.suppressed;
    this.suppressed = 0;
    this.warn(`(${n} lines suppressed: more than ${GLOBAL_PER_SEC} log lines a second about peers)`);
    this.armSummary(); // one more look after the next period; it writes nothing if nothing was held back
  }
}

export const log = new Logger();
