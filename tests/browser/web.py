"""The operator page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright), against a server the Rust test (tests/tests/e2e/browser.rs) started over the
real Redis, Postgres and llmq-mock. It reads what to check as JSON on stdin:

    {"base": "http://127.0.0.1:PORT", "token": "...", "queue": "...",
     "held": "a paused queue", "counts": {"ready": 3, "in_flight": 0, "delayed": 0, "dead": 1},
     "chain": "...", "steps": ["impl", "ship", "docs"], "dead": "<dead letter id>",
     "hostile_task": "<task id whose prompt is a <script>>", "screenshots": "dir or null",
     "failed_task": "<a chain step's dead task>", "failed_word": "<a word of its error>",
     "failing_chain": "<its chain>", "drainee": "<a worker's id>"}

and exits 0 when every check held, 1 with the failing check on stderr. It checks:
- the overview shows the queue's counts as `llmq status` counted them;
- the chain's DAG has a box per step, each named;
- approving in the page moves the chain on, and the open chain page sees it without a
  reload (the live refresh);
- replaying a dead letter from the page says so (the test then sees the task run);
- a prompt containing <script> renders as text and runs nothing;
- a failed task is found by a word of its error, followed to its chain and replayed;
- a worker drained from the workers page is shown draining;
- the charts and the task search render (and, with screenshots, every page is shot).
A confirm() an action asks is accepted; any other dialog means some script ran.
"""

import json
import os
import sys

from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("LLMQ_CHROMIUM", "/usr/bin/chromium")


def main() -> int:
    args = json.load(sys.stdin)
    base, queue = args["base"], args["queue"]
    shots = args.get("screenshots")
    dialogs, confirms = [], []

    def on_dialog(d):
        # The page's own actions ask to confirm (live.js); anything else is a script that ran.
        if d.type == "confirm":
            confirms.append(d.message)
            d.accept()
        else:
            dialogs.append(d.message)
            d.dismiss()

    def shot(page, name):
        if shots:
            page.screenshot(path=os.path.join(shots, f"{name}.png"), full_page=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.on("page", lambda pg: pg.on("dialog", on_dialog))
        page = context.new_page()
        page.set_default_timeout(20_000)

        # The overview: the paused queue's row shows what `llmq status` counted.
        held = args["held"]
        page.goto(f"{base}/")
        row = page.locator(f'#queues tr[data-queue="{held}"] td')
        want = args["counts"]
        for i, key in enumerate(["ready", "in_flight", "delayed", "dead"], start=1):
            expect(row.nth(i)).to_have_text(str(want[key]))
        expect(page.locator("nav")).to_contain_text("sign in")
        shot(page, "overview-read-only")

        # Sign in with the token.
        page.goto(f"{base}/login")
        page.fill('input[name="token"]', args["token"])
        page.click('button:has-text("Sign in")')
        expect(page.locator("nav")).to_contain_text("signed in")
        expect(page.locator(f'#queues tr[data-queue="{held}"]')).to_contain_text("paused")
        expect(page.locator(".bar").first).to_be_visible()
        shot(page, "overview")

        # The chain: a box per step, each named; it waits for approval.
        chain_url = f"{base}/chain?queue={queue}&id={args['chain']}"
        page.goto(chain_url)
        expect(page.locator("svg rect")).to_have_count(len(args["steps"]))
        for step in args["steps"]:
            expect(page.locator("svg text", has_text=step).first).to_be_visible()
        expect(page.locator("#chain-state")).to_have_text("running")
        shot(page, "chain-waiting")

        # Approve in a second tab; the chain page, left open, sees the chain move on.
        approvals = context.new_page()
        approvals.set_default_timeout(20_000)
        approvals.goto(f"{base}/approvals")
        item = approvals.locator(f'.approval[data-chain="{args["chain"]}"]')
        expect(item).to_contain_text("impl")
        shot(approvals, "approvals")
        item.locator('input[name="note"]').fill("ship it")
        item.locator('button[value="approve"]').click()
        expect(approvals.locator(".done")).to_contain_text("Approved step ship")
        expect(page.locator("#chain-state")).to_have_text("succeeded", timeout=30_000)
        shot(page, "chain")

        # Dead letters: select one and replay it.
        dead = context.new_page()
        dead.set_default_timeout(20_000)
        dead.goto(f"{base}/dead?queue={queue}")
        expect(dead.locator(f'tr[data-dead="{args["dead"]}"]')).to_be_visible()
        shot(dead, "dead-letters")
        dead.check(f'input[name="id"][value="{args["dead"]}"]')
        dead.click('button:has-text("Replay selected")')
        expect(dead.locator(".done")).to_contain_text("Replayed 1 dead letter")

        # A prompt that is a script: shown as text, never run.
        task = context.new_page()
        task.goto(f"{base}/task?queue={queue}&id={args['hostile_task']}")
        expect(task.locator("body")).to_contain_text("<script>")
        pwned = task.evaluate("() => window.__llmq_pwned === undefined")
        if not pwned:
            raise AssertionError("the task's script ran in the page")
        shot(task, "task")

        # Costs, for the screenshot and that it renders.
        costs = context.new_page()
        costs.goto(f"{base}/costs")
        expect(costs.locator("#by-day")).to_be_visible()
        shot(costs, "costs")

        # A failed task found by a word of its error, followed to its chain, replayed.
        search = context.new_page()
        search.set_default_timeout(20_000)
        search.goto(f"{base}/tasks?queue={queue}&state=dead")
        search.fill('form.search input[name="q"]', args["failed_word"])
        search.click('form.search button:has-text("Search")')
        link = search.locator(f'a[href*="id={args["failed_task"]}"]')
        expect(link).to_be_visible()
        shot(search, "tasks")
        link.click()
        expect(search.locator("table.story").first).to_contain_text(args["failed_word"])
        expect(search.locator("h2", has_text="Provider calls")).to_be_visible()
        shot(search, "task-failed")
        search.click(f'a:has-text("{args["failing_chain"]}")')
        expect(search.locator("#chain-state")).to_have_text("failed")
        search.go_back()
        search.click('button:has-text("Replay")')
        expect(search.locator(".done")).to_contain_text("Replayed 1 dead letter")
        if not any("Replay" in c for c in confirms):
            raise AssertionError(f"the replay did not ask to confirm: {confirms}")

        # Over time: the charts are drawn.
        charts = context.new_page()
        charts.goto(f"{base}/charts?queue={queue}&span=hour")
        expect(charts.locator("svg.chart").first).to_be_visible()
        shot(charts, "charts")

        # The workers page: drain the second worker and watch it go.
        workers = context.new_page()
        workers.set_default_timeout(30_000)
        workers.goto(f"{base}/workers")
        row = workers.locator(f'tr[data-worker="{args["drainee"]}"]')
        expect(row).to_contain_text("live")
        shot(workers, "workers")
        row.locator('button:has-text("Drain")').click()
        expect(workers.locator(".done")).to_contain_text("drains")
        workers.goto(f"{base}/workers")
        expect(workers.locator(f'tr[data-worker="{args["drainee"]}"] .state')).to_have_text(
            "drained", timeout=30_000
        )

        if dialogs:
            raise AssertionError(f"a dialog opened, so some script ran: {dialogs}")
        browser.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # one line saying which check failed, for the Rust test
        print(f"browser check failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
