"""Screenshots of the real TensorBoard dashboard for the docs, taken from a digits demo run.

Run by hand when the dashboard changes (it is not part of ``make test``); the images are committed
under ``docs/images/``. It runs the demo with its normal settings into a temporary log directory
(or reads an existing run given with ``--logdir``), starts TensorBoard on loopback, captures four
pages with headless Chromium through Playwright, and stops TensorBoard, also on error:

- ``custom_scalars.png``: the Custom Scalars tab, ``reg/train_eval/loss`` against ``val_loss``
  for one seed's three recipes, with the legend;
- ``gap.png``: the gap chart ``reg/gap/loss`` (val - train_eval, > 0: overfitting), with its legend;
- ``hparams.png``: the HParams table view, one row per run, with the settings that tell the
  recipes apart and the test and gap metrics (``--hparams-columns``), sorted by test accuracy;
- ``diagnosis.png``: the Text tab with the ``reg/diagnosis`` card of the plain baseline.

Set-up, once, into the demo environment (``make demo`` creates ``.venv``; neither ``make demo`` nor
``make test`` needs Playwright or Chromium)::

    apt-get install -y chromium && .venv/bin/python -m pip install playwright

Playwright drives Debian's ``/usr/bin/chromium`` (never ``playwright install``, which downloads a
browser of its own). Then::

    .venv/bin/python scripts/tensorboard_screenshots.py                # with the demo: 2-10 min
    .venv/bin/python scripts/tensorboard_screenshots.py --logdir lightning_logs/digits
    .venv/bin/python scripts/tensorboard_screenshots.py -- --epochs 20 --seeds 0  # demo options
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1400, 900  # the viewport of every page picture
# Headless Chromium as these machines need it: no sandbox as root, and no background networking,
# whose connections a closed network refuses (see the environment notes).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # generous: the machine may be busy
# The HParams tab has a column for every setting of every recipe (some 40): the picture shows the
# knobs that tell the demo's recipes apart and the results the runs are compared by.
HPARAMS_COLUMNS = [
    "dropout",
    "weight_decay",
    "EarlyStopping[val_loss]/patience",
    "Mixup/mixup_alpha",
    "test/acc",
    "test/ece",
    "reg/gap/loss",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; what follows ``--`` is kept in ``demo_args`` for examples/digits.py."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Arguments after '--' go to examples/digits.py when the demo is run.",
    )
    parser.add_argument(
        "--logdir", type=Path, help="an existing demo run (the folder TensorBoard is pointed at, "
        "e.g. lightning_logs/digits); default: run the demo into a temporary folder",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument(
        "--runs", default="-seed0$", help="regex of the runs shown in the charts (one seed)"
    )
    parser.add_argument(
        "--diagnosis-run", default="baseline-seed0", help="run whose diagnosis card is shown"
    )
    parser.add_argument(
        "--hparams-columns", nargs="+", default=HPARAMS_COLUMNS, metavar="NAME",
        help="hyperparameters and metrics shown in hparams.png (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--keep-logs", action="store_true", help="keep the demo's temporary logs")
    args, demo_args = parser.parse_known_args(argv)
    args.demo_args = [a for a in demo_args if a != "--"]
    return args


def check_tools(chromium: str) -> None:
    """Fail early, saying how to install what is missing."""
    if shutil.which(chromium) is None:
        sys.exit(
            f"Chromium not found at {chromium}. Install Debian's package: "
            "apt-get install -y chromium (or pass --chromium PATH)."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        sys.exit(
            f"Playwright is not installed in {sys.executable}. Install it (the Python package "
            f"only; it drives {chromium}): {sys.executable} -m pip install playwright"
        )


def run_demo(workdir: Path, demo_args: list[str]) -> Path:
    """Run examples/digits.py in ``workdir``; return the folder TensorBoard reads, relative to it.

    The logs go to ``lightning_logs/`` there, the demo's default, so that the pictures show the
    log folder a reader of the docs gets from ``make demo``.
    """
    command = [sys.executable, str(ROOT / "examples" / "digits.py"), "--logdir", "lightning_logs"]
    print("running the demo:", " ".join([*command, *demo_args]), flush=True)
    subprocess.run([*command, *demo_args], cwd=workdir, check=True)
    return Path("lightning_logs") / "digits"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tensorboard(logdir: Path, cwd: Path) -> Iterator[str]:
    """TensorBoard on loopback, every event file loaded before it answers; stopped on exit."""
    port = free_port()
    command = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
        "--host", "127.0.0.1", "--port", str(port), "--load_fast=false",
        # load everything once, before serving: the pages then never show a partial run
        "--reload_interval", "0", "--reload_task", "blocking",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_served(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_served(url: str, process: subprocess.Popen[bytes], log: Any) -> None:
    """Poll until TensorBoard lists the runs; exit with its output if it dies or never answers."""
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            log.seek(0)
            sys.exit(f"TensorBoard exited ({process.returncode}):\n{log.read().decode()}")
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as answer:
                if json.load(answer):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"TensorBoard did not answer at {url} within 120 s")
        time.sleep(0.5)


def post(url: str, body: dict[str, Any]) -> Any:
    """POST to TensorBoard's hparams API (it wants the XSRF header)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def hparams_names(url: str) -> set[str]:
    """The hyperparameters and metric tags of TensorBoard's HParams tab, from its API."""
    experiment = post(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
    return {info["name"] for info in experiment.get("hparamInfos", [])} | {
        info["name"]["tag"] for info in experiment.get("metricInfos", [])
    }


def wait_for_charts(page: Any, count: int) -> None:
    """Wait until ``count`` custom-scalar charts have drawn lines."""
    page.wait_for_function(
        """n => {
            const found = [];
            const walk = root => root.querySelectorAll('*').forEach(e => {
                if (e.tagName === 'VZ-LINE-CHART2') found.push(e);
                if (e.shadowRoot) walk(e.shadowRoot);
            });
            walk(document);
            const drawn = found.filter(c => {
                const paths = [];
                const inner = r => r.querySelectorAll('*').forEach(e => {
                    if (e.tagName === 'path' && e.classList.contains('line')
                        && (e.getAttribute('d') || '').length > 20) paths.push(e);
                    if (e.shadowRoot) inner(e.shadowRoot);
                });
                inner(c.shadowRoot || c);
                return paths.length > 0;
            });
            return drawn.length >= n;
        }""",
        arg=count,
        timeout=TIMEOUT_MS,
    )


def scroll_to_top(page: Any) -> None:
    """Scroll every scrolled container (they live in shadow roots) back to its top."""
    page.evaluate(
        """() => {
            const walk = root => root.querySelectorAll('*').forEach(e => {
                if (e.scrollTop > 0) e.scrollTop = 0;
                if (e.shadowRoot) walk(e.shadowRoot);
            });
            walk(document);
        }"""
    )
    page.mouse.move(0, 0)
    page.wait_for_timeout(500)


def screenshot_with_margin(page: Any, element: Any, path: Path, margin: int = 12) -> None:
    """Screenshot of an element and a few pixels around it (its title touches its top edge)."""
    box = element.bounding_box()
    x, y = max(box["x"] - margin, 0), max(box["y"] - margin, 0)
    page.screenshot(
        path=path,
        clip={"x": x, "y": y, "width": box["width"] + 2 * margin,
              "height": min(box["height"] + 2 * margin, HEIGHT - y)},
    )  # fmt: skip


def settle(page: Any) -> None:
    """Let animations and redraws finish (charts redraw after every selection change)."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)


def custom_scalars(page: Any, url: str, runs: str, out: Path) -> None:
    """custom_scalars.png and gap.png: one seed's runs, no smoothing, full-width charts, legends."""
    page.goto(f"{url}/#custom_scalars")
    dashboard = page.locator("tf-custom-scalar-dashboard")
    cards = dashboard.locator("tf-custom-scalar-multi-line-chart-card")
    cards.first.wait_for(timeout=TIMEOUT_MS)
    wait_for_charts(page, 2)
    dashboard.locator("#names-regex input").fill(runs)
    smoothing = dashboard.locator("tf-smoothing-input paper-input input")
    smoothing.fill("0")
    smoothing.press("Enter")
    # the first group is "Generalization: loss": its charts are train_eval vs val, then the gap
    for name, card in (("custom_scalars", cards.nth(0)), ("gap", cards.nth(1))):
        card.locator("paper-icon-button").first.click()  # full-width chart
        card.locator(".toggle-matches-button").click()  # the legend: one line per tag and run
        settle(page)
        if name == "custom_scalars":
            scroll_to_top(page)
            page.screenshot(path=out / f"{name}.png")
        else:
            card.scroll_into_view_if_needed()
            screenshot_with_margin(page, card, out / f"{name}.png")


def hparams(page: Any, url: str, columns: list[str], out: Path) -> None:
    """hparams.png: the table view with ``columns``, sorted by test accuracy if it is one."""
    missing = [c for c in columns if c not in hparams_names(url)]
    if missing:
        sys.exit(
            f"the HParams tab has no column {missing}; its columns are "
            f"{sorted(hparams_names(url))}: pass the ones to show with --hparams-columns"
        )
    page.goto(f"{url}/#hparams")
    pane = page.locator("tf-hparams-query-pane")
    page.locator("vaadin-grid-cell-content", has_text="seed").first.wait_for(timeout=TIMEOUT_MS)
    # every setting of every recipe is a column: the picture keeps those that tell the recipes
    # apart, and the results
    boxes = pane.locator("paper-checkbox.hparam-checkbox, paper-checkbox.metric-checkbox")
    for i in range(boxes.count()):
        box = boxes.nth(i)
        if (box.get_attribute("aria-checked") == "true") != (box.inner_text().strip() in columns):
            box.click()
    sort_by = next((c for c in columns if "test" in c and "acc" in c), None)
    if sort_by is not None:
        dropdowns = pane.locator("paper-dropdown-menu")
        dropdowns.nth(0).click()
        dropdowns.nth(0).locator("paper-item", has_text=sort_by).first.click()
        dropdowns.nth(1).click()
        dropdowns.nth(1).locator("paper-item", has_text="Descending").first.click()
    # fit the table in the picture: room for "baseline+restore-seed0", narrower value columns,
    # and no "Show Metrics" column (its check boxes open per-run charts, not wanted here)
    page.evaluate(
        """() => {
            const walk = root => root.querySelectorAll('*').forEach(e => {
                if (e.id === 'sessionGroupsTable') {
                    e.querySelectorAll('vaadin-grid-column').forEach((column, i) => {
                        column.flexGrow = 0;
                        column.width = i === 0 ? '210px' : '125px';
                        if (i === 1) column.hidden = true;
                    });
                }
                if (e.shadowRoot) walk(e.shadowRoot);
            });
            walk(document);
        }"""
    )
    settle(page)
    scroll_to_top(page)
    page.screenshot(path=out / "hparams.png")


def diagnosis(page: Any, url: str, run: str, out: Path) -> None:
    """diagnosis.png: the Text tab, filtered to one run's ``reg/diagnosis`` card."""
    page.goto(f"{url}/#text")
    dashboard = page.locator("tf-text-dashboard")
    dashboard.locator("tf-text-loader").first.wait_for(timeout=TIMEOUT_MS)
    dashboard.locator("#names-regex input").fill(f"^{run}$")
    page.locator("tf-text-loader", has_text=run).first.wait_for(timeout=TIMEOUT_MS)
    page.locator("tf-markdown-view", has_text="Diagnosis").first.wait_for(timeout=TIMEOUT_MS)
    settle(page)
    scroll_to_top(page)
    page.screenshot(path=out / "diagnosis.png")


def capture(url: str, args: argparse.Namespace) -> None:
    """Open TensorBoard in headless Chromium and write the four pictures."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with urllib.request.urlopen(f"{url}/data/runs", timeout=30) as answer:
        runs = json.load(answer)
    if args.diagnosis_run not in runs or not any(re.search(args.runs, r) for r in runs):
        sys.exit(f"--runs {args.runs!r} and --diagnosis-run {args.diagnosis_run!r} must name "
                 f"runs of the log folder; its runs are {runs}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": WIDTH, "height": HEIGHT}, device_scale_factor=1,
        )  # fmt: skip
        try:
            page = browser.new_page()
            for take in (
                lambda: custom_scalars(page, url, args.runs, args.out),
                lambda: hparams(page, url, args.hparams_columns, args.out),
                lambda: diagnosis(page, url, args.diagnosis_run, args.out),
            ):
                try:
                    take()
                except PlaywrightTimeout as error:
                    sys.exit(
                        f"TensorBoard's page did not show what the picture needs within "
                        f"{TIMEOUT_MS // 1000} s ({error.message.splitlines()[0]}): is the log "
                        "folder a digits demo run, with the runs --runs and --diagnosis-run name?"
                    )
        finally:
            browser.close()
    for name in ("custom_scalars", "gap", "hparams", "diagnosis"):
        path = args.out / f"{name}.png"
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
              f" ({path.stat().st_size // 1024} KiB)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the demo (or read ``--logdir``), serve it with TensorBoard, take the pictures."""
    args = parse_args(argv)
    check_tools(args.chromium)
    args.out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="tb-screenshots-") as tmp:
        if args.logdir is None:
            cwd = Path(tmp)
            logdir = run_demo(cwd, args.demo_args)
            if args.keep_logs:
                kept = Path(tempfile.mkdtemp(prefix="tb-screenshots-logs-"))
                shutil.copytree(cwd / logdir, kept, dirs_exist_ok=True)
                print(f"demo logs kept in {kept}")
        else:
            cwd, logdir = Path.cwd(), args.logdir
            if not any(logdir.rglob("events.out.tfevents.*")):
                sys.exit(f"no TensorBoard event files under {logdir}")
        with tensorboard(logdir, cwd) as url:
            print(f"TensorBoard at {url}", flush=True)
            capture(url, args)


if __name__ == "__main__":
    main()
