/**
 * The example config files of README "Operating it" → "Config files", so that tests run exactly what the README shows
 * (tests/ops-config.test.ts parses all four and runs the forward pair; tests/privileges.test.ts runs the TUN pair).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers.ts';

export interface ReadmeExample {
  /** the path its first line names, as /etc/vpn/db.toml */
  name: string;
  command: 'serve' | 'connect';
  text: string;
}

/** Every ```toml block of README.md; each must open with `# PATH: vpn serve|connect --config PATH`. */
export function readmeExamples(): ReadmeExample[] {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const out: ReadmeExample[] = [];
  for (const m of readme.matchAll(/```toml\n([\s\S]*?)```/g)) {
    const text = m[1]!;
    const head = /^# (\S+): vpn (serve|connect) --config/.exec(text);
    if (!head) throw new Error(`a README toml example does not start with "# PATH: vpn serve|connect --config": ${text.split('\n')[0]}`);
    out.push({ name: head[1]!, command: head[2] as 'serve' | 'connect', text });
  }
  return out;
}

/** The example named `name`, with each `key = …` line of `values` replaced by `key = <JSON of the value>`. */
export function readmeExample(name: string, values: Record<string, string | string[]>): string {
  const e = readmeExamples().find((x) => x.name === name);
  if (!e) throw new Error(`README has no example ${name}`);
  let text = e.text;
  for (const [k, v] of Object.entries(values)) {
    const re = new RegExp(`^${k} = .*$`, 'm');
    if (!re.test(text)) throw new Error(`README example ${name} has no ${k}`);
    text = text.replace(re, `${k} = ${JSON.stringify(v)}`);
  }
  return text;
}
