#!/usr/bin/env python3
"""`make bench-compare REF=<commit>`: the core benchmarks of REF against this working tree.

Builds REF's `llmq-bench` (release) in a worktree of its own with a target directory of its
own under `target/bench-compare/` (both kept, so comparing with the same REF again builds
nothing; only the last KEEP_REFS REFs compared are kept, 2 by default, as each takes about
1.5 GB of disk), builds this tree's, then runs each core benchmark alternately with the two
builds, RUNS times each (the order flips every run, so a drift of the machine weighs on
both), and prints every figure's median for REF and HEAD and their ratio. This machine is noisy
(about 25 % run to run): read the medians, and the ratios of figures measured in one run.

Environment: REF (required), RUNS (default 3), BENCHES (default the core six, space
separated), BENCH_ARGS (extra flags for every run, e.g. `--tasks 20000`), KEEP_REFS (the
REF builds kept, 2 by default).
"""

import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys

CORE = ["queue_noop", "pickup", "inflight", "chain", "e2e_mock", "idle_fleet"]
# Figures that are settings of the run, not results: the same in every run, left out.
SETTINGS = {"bench", "tasks", "workers", "concurrency", "rate", "ledger", "calls", "steps",
            "latency_ms", "prompt_bytes", "queues", "connections", "http2"}

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(cmd, **kw):
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build(src: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    run(["cargo", "build", "--release", "--quiet", "-p", "llmq-tests", "--bin", "llmq-bench"],
        cwd=src, env=env)
    return target / "release" / "llmq-bench"


# Benchmarks that write the ledger in the bench database (`llmq_bench`), which each build
# migrates to its own version: dropped before each of their runs, so that neither build meets
# a database the other migrated (an older build refuses a newer migration it does not know).
LEDGER_BENCHES = {"e2e_mock", "provider_batch", "prompt_cache", "routing_savings",
                  "stream_first_token", "rate_limited", "overhead", "memory"}


def fresh_bench_database() -> None:
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/llmq")
    subprocess.run(["psql", url, "-q", "-c", "DROP DATABASE IF EXISTS llmq_bench WITH (FORCE)"],
                   check=True, capture_output=True)


def figures(binary: pathlib.Path, bench: str, extra: list[str]) -> tuple[dict, str]:
    """One run of one benchmark: its numeric figures, and the machine line."""
    if bench in LEDGER_BENCHES:
        fresh_bench_database()
    out = subprocess.run([str(binary), "--only", bench, *extra], cwd=ROOT, check=False,
                         capture_output=True, text=True)
    machine, line = "", None
    for l in out.stdout.splitlines():
        if l.startswith("machine "):
            machine = l
        elif l.startswith(f"bench={bench} ") or l.startswith(f"bench={bench}\t"):
            line = l
    if out.returncode != 0 or line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        print(f"  {binary.parent.parent.name} {bench}: no result ({' / '.join(tail)})",
              file=sys.stderr)
        return {}, machine
    vals = {}
    for k, v in re.findall(r"(\w+)=(\S+)", line):
        try:
            vals[k] = float(v)
        except ValueError:
            pass
    return vals, machine


def prune(base: pathlib.Path, sha: str, keep: int) -> None:
    """Removes the worktrees and target directories of all but the `keep` REFs compared last
    (this one among them): each release target takes about 1.5 GB, and a machine that compares
    with many commits fills its disk (a CI run on it failed so, out of space)."""
    (base / f"target-{sha[:12]}").mkdir(parents=True, exist_ok=True)
    (base / f"target-{sha[:12]}").touch()
    targets = sorted(base.glob("target-*"), key=lambda t: t.stat().st_mtime, reverse=True)
    for target in targets[max(keep, 1):]:
        short = target.name.removeprefix("target-")
        src = base / f"src-{short}"
        print(f"removing the build of {short} (KEEP_REFS={keep})", file=sys.stderr)
        if src.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=ROOT,
                           check=False, stderr=subprocess.DEVNULL)
            shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)


def main() -> int:
    ref = os.environ.get("REF", "").strip()
    if not ref:
        print("give the commit to compare with: make bench-compare REF=<commit>", file=sys.stderr)
        return 2
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        print(f"`{ref}` is not a commit of this repository", file=sys.stderr)
        return 2
    runs = int(os.environ.get("RUNS", "3"))
    benches = os.environ.get("BENCHES", " ".join(CORE)).split()
    extra = shlex.split(os.environ.get("BENCH_ARGS", ""))
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.strip()

    base = ROOT / "target" / "bench-compare"
    prune(base, sha, int(os.environ.get("KEEP_REFS", "2")))
    src = base / f"src-{sha[:12]}"
    if not src.exists():
        base.mkdir(parents=True, exist_ok=True)
        run(["git", "worktree", "add", "--detach", "--force", str(src), sha], cwd=ROOT,
            stdout=subprocess.DEVNULL)
    builds = {
        "REF": build(src, base / f"target-{sha[:12]}"),
        "HEAD": build(ROOT, ROOT / "target"),
    }

    results = {(name, b): [] for name in builds for b in benches}
    machine = ""
    for i in range(runs):
        order = ["REF", "HEAD"] if i % 2 == 0 else ["HEAD", "REF"]
        for b in benches:
            for name in order:
                vals, m = figures(builds[name], b, extra)
                machine = machine or m
                if vals:
                    results[(name, b)].append(vals)
                    shown = " ".join(f"{k}={v:g}" for k, v in vals.items() if k not in SETTINGS)
                    print(f"  run {i + 1} {name:4} {b}: {shown}", file=sys.stderr, flush=True)

    label = f"{head}{' (+ uncommitted changes)' if dirty else ''}"
    print(f"bench-compare ref={sha[:12]} head={label} runs={runs}")
    print(machine)
    print(f"{'bench':<12} {'figure':<28} {'REF median':>14} {'HEAD median':>14} {'HEAD/REF':>9}")
    for b in benches:
        ref_runs, head_runs = results[("REF", b)], results[("HEAD", b)]
        keys = [k for k in (head_runs[0] if head_runs else {}) if k not in SETTINGS]
        if not ref_runs or not head_runs:
            print(f"{b:<12} {'(no result from ' + ('REF' if not ref_runs else 'HEAD') + ')':<28}")
            continue
        for k in keys:
            r = [v[k] for v in ref_runs if k in v]
            h = [v[k] for v in head_runs if k in v]
            if not r or not h:
                continue
            rm, hm = statistics.median(r), statistics.median(h)
            ratio = f"{hm / rm:.3f}" if rm else "-"
            print(f"{b:<12} {k:<28} {rm:>14.4g} {hm:>14.4g} {ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
