"""Load test of the dashboard on this machine: several browser sessions at once against one app.

    python bench/load_test.py                      # 4 clients, tiny demo (ANOMALY_DEMO_SMALL=1)
    python bench/load_test.py --clients 8 --rounds 3 --full

Starts ``streamlit run dashboard.py`` on a free port of 127.0.0.1 (never any other address),
then runs ``--clients`` Playwright browser contexts (separate sessions) in one headless
chromium, started ``--stagger`` seconds apart and then all at once. Each client, for ``--rounds`` rounds: opens Home, runs the demo (the
first round computes the shared bank once, later ones are cache hits), moves tau with the
slider, the exact input and the reset button, opens Inspect and steps Next ``--next`` times.
A page action fails after ``--action-timeout`` seconds or as soon as the app shows an exception;
everything stops at ``--deadline`` seconds at the latest, and the app is always stopped.

Prints requests served (HTTP responses and websocket frames seen by each browser, and page
actions completed), errors (failed actions, visible st.exception blocks, HTTP >= 400, page
script errors, tracebacks in the app's log), per-action latency, the app's peak memory and
whether the app stayed responsive: GET /_stcore/health answered "ok" within 2 s throughout.
Exit status 1 when there was any error or a health probe failed.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared browser helpers

from browser_support import ARTIFACTS, CHROMIUM, launch_chromium, streamlit_app  # noqa: E402

HEALTH_LIMIT_S = 2.0
PROBE_EVERY_S = 0.5
FIRST_DEMO = "run demo (first round)"


@dataclass
class ClientStats:
    actions: int = 0
    responses: int = 0
    frames_in: int = 0
    frames_out: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    doing: str = "starting"  # the action under way, to place HTTP and script errors


class Monitor(threading.Thread):
    """Polls the app every PROBE_EVERY_S: its health answer time and the RSS of its process tree."""

    def __init__(self, url: str, pid: int):
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.stop = threading.Event()
        self.health: list[float | None] = []  # seconds to an "ok", None when it failed or took > 2 s
        self.sent: list[float] = []  # when each probe was sent, seconds since the monitor started
        self.peak_rss = 0

    def run(self) -> None:
        origin = time.monotonic()
        while not self.stop.is_set():
            started = time.monotonic()
            self.sent.append(started - origin)
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=HEALTH_LIMIT_S) as response:
                    ok = response.read().strip() == b"ok"
                took = time.monotonic() - started
                self.health.append(took if ok and took <= HEALTH_LIMIT_S else None)
            except OSError:
                self.health.append(None)
            self.peak_rss = max(self.peak_rss, tree_rss(self.pid))
            self.stop.wait(max(0.0, PROBE_EVERY_S - (time.monotonic() - started)))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        return sum(_proc_status_kib(p, "VmRSS") * 1024 for p in [pid, *_proc_children(pid)])
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def _proc_children(pid: int) -> list[int]:
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [p for c in direct for p in (c, *_proc_children(c))]


def _proc_status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def settle(page, timeout_ms: float) -> None:
    """Wait until Streamlit has finished the current run (async API)."""
    await page.wait_for_timeout(300)
    await page.get_by_test_id("stStatusWidget").wait_for(state="hidden", timeout=timeout_ms)
    await page.wait_for_timeout(500)


def flagged(page):
    return page.get_by_test_id("stMetric").filter(has_text="Flagged anomalous").get_by_test_id("stMetricValue")


async def client(number: int, browser, url: str, args, deadline: float) -> ClientStats:
    """One browser session doing the rounds; a failed action is counted and ends that round."""
    from playwright.async_api import expect

    stats = ClientStats()
    scored = {"images": 0}  # the demo's test images, as the Score page reports them
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()

    def on_response(response) -> None:
        stats.responses += 1
        if response.status >= 400:
            stats.errors.append(f"client {number} {stats.doing}: HTTP {response.status} {response.url}")

    def on_websocket(socket) -> None:
        socket.on("framereceived", lambda _: setattr(stats, "frames_in", stats.frames_in + 1))
        socket.on("framesent", lambda _: setattr(stats, "frames_out", stats.frames_out + 1))

    page.on("response", on_response)
    page.on("websocket", on_websocket)
    page.on("pageerror", lambda error: stats.errors.append(f"client {number} {stats.doing}: script error {error}"))

    def left_ms() -> float:
        return max(1_000.0, min(args.action_timeout, deadline - time.monotonic()) * 1000)

    async def shows(target, ms: float) -> None:
        """Wait for ``target``, failing at once if the app shows an exception instead."""
        exception = page.get_by_test_id("stException")
        await expect(target.or_(exception).first).to_be_visible(timeout=ms)
        if await exception.count():
            raise RuntimeError(f"the app shows an exception: {(await exception.first.inner_text())[:200]!r}")

    async def action(name: str, steps) -> bool:
        """Do one step and time it; False when it failed (a timeout, a missing element)."""
        started, stats.doing = time.monotonic(), name
        try:
            await steps(left_ms())
            await settle(page, left_ms())
        except Exception as exc:  # counted as an error; the caller ends the round
            stats.errors.append(f"client {number} {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            return False
        stats.latencies[name].append(time.monotonic() - started)
        stats.actions += 1
        shown = await page.get_by_test_id("stException").count()
        if shown:
            stats.errors.append(f"client {number} {name}: {shown} st.exception block(s) on the page")
        return True

    async def open_home(ms):
        await page.goto(url, timeout=ms)
        await shows(page.get_by_role("heading", name="SPADE anomaly detection"), ms)

    async def run_demo(ms):
        await page.get_by_role("button", name="Run the demo").click(timeout=ms)
        count = page.get_by_test_id("stMetric").filter(has_text="Images scored").get_by_test_id("stMetricValue")
        await shows(count, ms)
        await expect(count).to_have_text(re.compile(r"^[1-9]\d*$"), timeout=ms)
        scored["images"] = int(await count.inner_text())

    async def move_tau(ms):
        slider = page.get_by_role("slider").first
        await slider.focus(timeout=ms)
        await slider.press("Home")
        await expect(flagged(page)).to_have_text(str(scored["images"]), timeout=ms)
        exact = page.get_by_label("Image threshold τ (exact)")
        await exact.fill("1000000", timeout=ms)
        await exact.press("Enter")
        await expect(flagged(page)).to_have_text("0", timeout=ms)
        await page.get_by_role("button", name=re.compile("Reset to suggested")).click(timeout=ms)

    async def open_inspect(ms):
        await page.get_by_test_id("stSidebarNav").get_by_role("link", name="Inspect").click(timeout=ms)
        await shows(page.get_by_text("Nearest normal images", exact=True), ms)

    def step_next(rank: int):
        async def steps(ms):
            await page.get_by_role("button", name="Next").click(timeout=ms)
            await shows(page.get_by_text(re.compile(rf"rank {rank} of")), ms)
        return steps

    try:
        await asyncio.sleep(number * args.stagger)
        for round_number in range(args.rounds):
            if time.monotonic() >= deadline:
                break
            demo = FIRST_DEMO if round_number == 0 else "run demo (later rounds)"
            ok = (await action("open home", open_home) and await action(demo, run_demo)
                  and await action("move tau", move_tau) and await action("open inspect", open_inspect))
            rank = 2
            while ok and rank <= min(args.next + 1, scored["images"]):
                ok = await action("inspect next", step_next(rank))
                rank += 1
    finally:
        await context.close()
    return stats


async def drive(url: str, args, deadline: float) -> list[ClientStats]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        try:
            return await asyncio.gather(*(client(n, browser, url, args, deadline) for n in range(args.clients)))
        finally:
            await browser.close()


def report(stats: list[ClientStats], monitor: Monitor, hwm_kib: int, log: Path, seconds: float) -> bool:
    """Print the figures; True when there was no error and the app stayed responsive."""
    print(f"\nfinished in {seconds:.1f} s\n")
    print(f"{'client':>6} {'actions':>8} {'HTTP responses':>15} {'WS frames in':>13} {'WS frames out':>14} "
          f"{'errors':>7} {'first demo s':>13}")
    for number, s in enumerate(stats):
        first = s.latencies.get(FIRST_DEMO)
        print(f"{number:>6} {s.actions:>8} {s.responses:>15} {s.frames_in:>13} {s.frames_out:>14} "
              f"{len(s.errors):>7} {f'{first[0]:.2f}' if first else '-':>13}")
    total = lambda attribute: sum(getattr(s, attribute) for s in stats)  # noqa: E731
    errors = [e for s in stats for e in s.errors]
    print(f"{'total':>6} {total('actions'):>8} {total('responses'):>15} {total('frames_in'):>13} "
          f"{total('frames_out'):>14} {len(errors):>7}")

    print(f"\n{'action':<26} {'n':>4} {'median s':>9} {'max s':>8}")
    merged: dict[str, list[float]] = defaultdict(list)
    for s in stats:
        for name, values in s.latencies.items():
            merged[name].extend(values)
    for name, values in merged.items():
        print(f"{name:<26} {len(values):>4} {statistics.median(values):>9.2f} {max(values):>8.2f}")

    tracebacks = log.read_text(errors="replace").count("Traceback") if log.exists() else 0
    if tracebacks:
        errors.append(f"{tracebacks} traceback(s) in the app's log {log}")
    print(f"\nerrors: {len(errors)}")
    for line in errors[:20]:
        print(f"  - {line}")

    probes = list(zip(monitor.sent, monitor.health))
    answered = [(sent, took) for sent, took in probes if took is not None]
    failed_at = [sent for sent, took in probes if took is None]
    print(f"\napp peak RSS (server process and children, sampled every {PROBE_EVERY_S} s): "
          f"{monitor.peak_rss / 2**20:,.0f} MiB; server VmHWM: {hwm_kib / 1024:,.0f} MiB")
    if answered:
        slowest_sent, slowest = max(answered, key=lambda probe: probe[1])
        print(f"health probes: {len(probes)}, {len(failed_at)} failed or slower than {HEALTH_LIMIT_S:g} s; answer "
              f"time median {statistics.median(took for _, took in answered) * 1000:.0f} ms, max "
              f"{slowest * 1000:.0f} ms (sent at t = {slowest_sent:.1f} s after the clients started)")
    if failed_at:
        print("failed probes sent at t = " + ", ".join(f"{t:.1f}" for t in failed_at[:20]) + " s")
    responsive = bool(probes) and not failed_at
    print(f"app stayed responsive: {'yes' if responsive else 'NO'}")
    return responsive and not errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent browser sessions (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="demo/tau/inspect rounds per client (default 2)")
    parser.add_argument("--next", type=int, default=3, help="Next steps in Inspect per round (default 3)")
    parser.add_argument("--stagger", type=float, default=1.0,
                        help="seconds between client starts (default 1; 0 = all at once)")
    parser.add_argument("--action-timeout", type=float, default=300.0,
                        help="limit for one page action in seconds (default 300)")
    parser.add_argument("--deadline", type=float, default=600.0, help="overall limit in seconds (default 600)")
    parser.add_argument("--full", action="store_true", help="the full-size demo instead of ANOMALY_DEMO_SMALL=1")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.next < 0 or args.stagger < 0 or min(
            args.deadline, args.action_timeout) <= 0:
        parser.error("--clients and --rounds must be at least 1, --next and --stagger at least 0, "
                     "--deadline and --action-timeout positive")
    if not CHROMIUM.exists():
        print(f"load_test.py: {CHROMIUM} is not installed", file=sys.stderr)
        return 2

    print("$ " + shlex.join([sys.executable, *sys.argv]))
    env = {"ANOMALY_DEMO_SMALL": "0" if args.full else "1"}
    log = ARTIFACTS / "load_test_streamlit.log"
    started = time.monotonic()
    with streamlit_app(env, log) as app:
        print(f"app: ANOMALY_DEMO_SMALL={env['ANOMALY_DEMO_SMALL']} {shlex.join(app.command)} (log: {log})")
        print(f"{args.clients} clients, started {args.stagger:g} s apart, x {args.rounds} rounds: home, "
              f"{'full' if args.full else 'tiny'} demo, tau, inspect, up to {args.next} x next; "
              f"deadline {args.deadline:g} s")
        monitor = Monitor(app.url, app.process.pid)
        monitor.start()
        deadline = time.monotonic() + args.deadline
        try:
            stats = asyncio.run(asyncio.wait_for(drive(app.url, args, deadline),
                                                 timeout=args.deadline + 60))
        finally:
            monitor.stop.set()
            monitor.join()
            hwm_kib = _proc_status_kib(app.process.pid, "VmHWM")
    return 0 if report(stats, monitor, hwm_kib, log, time.monotonic() - started) else 1


if __name__ == "__main__":
    sys.exit(main())
