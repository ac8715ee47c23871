// npm run build: compiles src/*.ts to dist/ (JavaScript and .d.ts types) with the pinned
// TypeScript, then copies llmq's replay script from the repository, the one `llmq dlq
// replay` runs, beside the code that loads it (dist/replay.lua).
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const lua = join(root, '..', '..', '..', 'shared', 'src', 'queue', 'replay.lua');
if (!existsSync(lua)) {
  console.error(`build: ${lua} is missing; build the client inside the llmq repository, whose shared/src/queue/replay.lua it ships.`);
  process.exit(1);
}
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
rmSync(join(root, 'dist'), { recursive: true, force: true });
try {
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
} catch {
  console.error('build: tsc found the errors above; fix them in src/ and build again.');
  process.exit(1);
}
copyFileSync(lua, join(root, 'dist', 'replay.lua'));
