/**
 * stdio mode, the default: a line chat when stdin is a terminal, otherwise a binary-safe byte pipe like `nc`
 * (stdin → tunnel, tunnel → stdout; stdin EOF sends CLOSE).
 */
import { createInterface } from 'node:readline';
import type { Session, SessionApp } from './session.ts';
import type { VpnError } from './errors.ts';

/** Where a stdio session's bytes come from and go to. One source serves sessions one after another. */
export class StdioBridge {
  private readonly chat: boolean;
  private session: Session | null = null;
  private stdinDone = false;
  private reader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  private pumping = false;
  private waitWritable: (() => void) | null = null;
  private rl: ReturnType<typeof createInterface> | null = null;
  private partialLine = '';
  private readonly decoder = new TextDecoder();

  constructor(chat = process.stdin.isTTY === true) {
    this.chat = chat;
  }

  /** Session callbacks for one session; `done` is called once when it ends. */
  app(done: (err: VpnError | null) => void): SessionApp {
    return {
      onOpen: (s) => {
        this.session = s;
        if (this.chat) this.startChat(s);
        else if (this.stdinDone) s.close();
        else void this.pump();
      },
      onData: (payload) => (this.chat ? this.printChat(payload) : this.writeOut(payload)),
      onPeerClose: () => {
        if (this.chat) {
          if (this.partialLine) process.stdout.write(`peer> ${this.partialLine}\n`);
          this.partialLine = '';
          process.stderr.write('(the peer closed the chat)\n');
          this.session?.close();
        }
      },
      onEnd: (err) => {
        this.session = null;
        this.rl?.close();
        this.rl = null;
        const w = this.waitWritable;
        this.waitWritable = null;
        w?.();
        // Let stdout drain before the caller may exit.
        process.stdout.write('', () => done(err));
      },
      onWritable: () => {
        const w = this.waitWritable;
        this.waitWritable = null;
        w?.();
      },
    };
  }

  private writeOut(payload: Uint8Array): void {
    const s = this.session;
    if (!process.stdout.write(payload) && s) {
      s.pauseInbound();
      process.stdout.once('drain', () => s.resumeInbound());
    }
  }

  /** Copy stdin into the current session, pausing while the tunnel's queue is above its high-water mark. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const reader = (this.reader ??= Bun.stdin.stream().getReader() as unknown as ReadableStreamDefaultReader<Uint8Array>);
      for (;;) {
        const s = this.session;
        if (!s || s.phase !== 'open') return;
        const { value, done } = await reader.read();
        if (done) {
          this.stdinDone = true;
          this.session?.close();
          return;
        }
        const cur = this.session;
        if (!cur || cur.phase !== 'open') return; // the chunk is lost only because the session already ended
        if (!cur.write(value)) await new Promise<void>((r) => (this.waitWritable = r));
      }
    } finally {
      this.pumping = false;
    }
  }

  private startChat(s: Session): void {
    process.stderr.write('connected; type lines to send them, an empty line or Ctrl-D ends the chat\n');
    const rl = createInterface({ input: process.stdin, terminal: false });
    this.rl = rl;
    rl.on('line', (line) => {
      if (line === '') {
        rl.close();
        return;
      }
      s.write(new TextEncoder().encode(line + '\n'));
    });
    rl.on('close', () => s.close());
  }

  private printChat(payload: Uint8Array): void {
    const text = this.partialLine + this.decoder.decode(payload, { stream: true });
    const lines = text.split('\n');
    this.partialLine = lines.pop() ?? '';
    for (const l of lines) process.stdout.write(`peer> ${l}\n`);
  }
}
