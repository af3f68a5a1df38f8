/**
 * stdio mode, the default: a line chat when stdin is a terminal, otherwise a binary-safe byte pipe like `nc`
 * (stdin → tunnel, tunnel → stdout; stdin EOF sends CLOSE).
 *
 * The process has one stdin and one stdout, so a stdio server serves one session at a time: the first client
 * whose CONFIG arrives while none is active owns them; any other connection handshakes in its own Session and is
 * refused (busy) without touching the active one.
 */
import { createInterface } from 'node:readline';
import { VpnError } from './errors.ts';
import { type Mode, modeName } from './server.ts';
import type { Session, SessionApp } from './session.ts';

/**
 * stdout with real backpressure. Bun's process.stdout buffers without limit and its write callbacks fire before
 * the bytes are out (so process.exit loses them); a FileSink's flush() returns a promise while bytes are pending.
 */
export class StdoutSink {
  private readonly w = Bun.stdout.writer({ highWaterMark: 64 * 1024 });
  private pending: Promise<void> | null = null;
  onDrain?: () => void;

  /** Write; false means "pause the source until onDrain". */
  write(data: Uint8Array | string): boolean {
    this.w.write(data);
    if (this.pending) return false;
    const f = this.w.flush();
    if (!(f instanceof Promise)) return true;
    this.pending = f.then(
      () => this.settled(),
      () => this.settled(),
    );
    return false;
  }

  private settled(): void {
    this.pending = null;
    const f = this.w.flush();
    if (f instanceof Promise) {
      this.pending = f.then(
        () => this.settled(),
        () => this.settled(),
      );
      return;
    }
    this.onDrain?.();
  }

  /** Resolves once every byte written so far has left the process. */
  async drain(): Promise<void> {
    for (let i = 0; i < 1_000_000; i++) {
      if (this.pending) await this.pending;
      const f = this.w.flush();
      if (!(f instanceof Promise)) return;
      await f;
    }
  }
}

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

  private readonly out = new StdoutSink();

  constructor(chat = process.stdin.isTTY === true) {
    this.chat = chat;
    this.out.onDrain = () => this.session?.resumeInbound();
  }

  /** Whether stdin is a terminal: a line chat rather than a byte pipe. */
  get isChat(): boolean {
    return this.chat;
  }

  /** Resolves once every byte written to stdout so far has left the process. */
  drained(): Promise<void> {
    return this.out.drain();
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
          if (this.partialLine) this.out.write(`peer> ${this.partialLine}\n`);
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
        void this.out.drain().then(() => done(err));
      },
      onWritable: () => {
        const w = this.waitWritable;
        this.waitWritable = null;
        w?.();
      },
    };
  }

  private writeOut(payload: Uint8Array): void {
    if (!this.out.write(payload)) this.session?.pauseInbound();
  }

  /** Copy stdin into the current session, pausing while the tunnel's queue is above its high-water mark. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const reader = (this.reader ??= Bun.stdin.stream().getReader() as unknown as ReadableStreamDefaultReader<Uint8Array>);
      for (;;) {
        const s = this.session;
        if (!s || !s.sending) return;
        const { value, done } = await reader.read();
        if (done) {
          this.stdinDone = true;
          this.session?.close();
          return;
        }
        const cur = this.session;
        if (!cur || !cur.sending) return; // the chunk is lost only because the session already ended
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
    for (const l of lines) this.out.write(`peer> ${l}\n`);
  }
}

/**
 * The stdio mode for the serve skeleton (server) or a single connect (client). `mode` in CONFIG (§8): the client
 * says "chat" for a terminal, "stdio" for a pipe; the server answers "stdio", or refuses while another session owns
 * stdin and stdout.
 */
export function stdioMode(io: StdioBridge, role: 'client' | 'server'): Mode {
  let owner: Session | null = null;
  const idle: SessionApp = { onOpen() {}, onData() {}, onPeerClose() {}, onEnd() {} };
  return {
    onShutdown: io.isChat ? 'close' : 'wait', // a chat's Ctrl-C ends it with CLOSE; a pipe runs to its end
    config: (peer, session) => {
      if (role === 'client') return { mode: io.isChat ? 'chat' : 'stdio' };
      if (peer.mode === 'tun') return new VpnError('USAGE', 'this server is not in TUN mode (it runs stdio mode); start it with serve --tun ADDR/PREFIX');
      if (peer.mode === 'forward') return new VpnError('USAGE', 'this server runs stdio mode, not port forwarding; start it with serve --forward HOST:PORT, or connect without --local');
      if (peer.mode !== 'stdio' && peer.mode !== 'chat') return new VpnError('USAGE', `this server runs stdio mode and the client asked for ${modeName(peer.mode)}`);
      if (owner) return new VpnError('NETWORK', 'busy: this stdio server serves one session at a time; try again later');
      owner = session;
      return { mode: 'stdio' };
    },
    // A pipe works into a forwarded service too (like spipe); a chat would type into it, so it does not.
    accept: (answer) => {
      if (answer.mode === 'stdio' || (answer.mode === 'forward' && !io.isChat)) return null;
      if (answer.mode === 'forward') {
        return new VpnError('USAGE', 'the server forwards to a TCP port, and a terminal chat would type into that service; pipe data in instead (connect < file), or use connect --local PORT');
      }
      return new VpnError('USAGE', `the server answered ${modeName(answer.mode)}, which a stdio client cannot use (is it a TUN server? connect with --tun auto)`);
    },
    app: (session) => {
      if (role === 'client') owner = session;
      let app: SessionApp | null = null;
      // Only the owner reaches stdin and stdout; the callbacks are looked up per event, since ownership is decided
      // by the CONFIG exchange, after the session was made.
      const mine = () => {
        if (owner !== session) return idle;
        app ??= io.app(() => {});
        return app;
      };
      return {
        onOpen: (s, cfg) => mine().onOpen(s, cfg),
        onData: (p) => mine().onData(p),
        onPeerClose: () => mine().onPeerClose(),
        onWritable: () => mine().onWritable?.(),
        onEnd: (err) => {
          if (owner !== session) return;
          mine().onEnd(err);
          owner = null;
        },
      };
    },
  };
}
