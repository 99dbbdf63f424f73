"""Regenerate docs/dashboard-*.png: a real peer pair runs a few rounds, headless Chromium shoots each page.

Usage (needs Debian's chromium + chromium-driver, see ``make browser-deps``)::

    .venv/bin/python docs/screenshots.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))

from dashkit import base_url, login_url, make_driver, missing_browser, start_pair  # noqa: E402
from peerkit import write_png_folder  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROUNDS = 4
SHOTS = ("overview", "neighbours", "rounds", "models", "data", "approvals", "audit")


def main() -> int:
    reason = missing_browser()
    if reason:
        print(f"cannot take screenshots: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        peers = start_pair(Path(tmp), participation="manual", rounds=ROUNDS + 2, deadline=8.0)
        a = peers.peers[0]
        try:
            # approve rounds as they are asked for, until ROUNDS are done; the next one stays pending
            deadline = time.monotonic() + 240
            while len([r for r in peers.call(a.rounds) if r["status"] == "done"]) < ROUNDS:
                if time.monotonic() > deadline:
                    raise TimeoutError("rounds did not finish")
                done = len(peers.call(a.rounds))
                for ask in peers.call(a.approvals):
                    if ask["status"] == "pending" and ask["round"] < ROUNDS and ask["round"] >= done - 1:
                        peers.call(a.decide, ask["id"], True)
                time.sleep(0.3)
            while not [x for x in peers.call(a.approvals) if x["status"] == "pending"]:
                time.sleep(0.3)
            models = peers.call(a.models)
            peers.call(a.rename_model, models[-1]["digest"], f"after-round-{models[-1]['round']}")
            data = write_png_folder(Path(tmp) / "xray-site-a", 12, 32)
            peers.call(a.register_dataset, str(data))
            driver = make_driver(1200, 800)
            try:
                driver.get(login_url(a))
                time.sleep(1.0)
                for name in SHOTS:
                    sub = "" if name == "overview" else name
                    driver.get(f"{base_url(a)}/dashboard/{sub}")
                    WebDriverWait(driver, 10).until(  # the first live event has arrived
                        lambda d: d.execute_script("return Number(document.body.dataset.liveUpdates || 0)") >= 1
                    )
                    time.sleep(0.5)
                    out = DOCS / f"dashboard-{name}.png"
                    driver.save_screenshot(str(out))
                    Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)
                    print(f"{out} {out.stat().st_size // 1024} KiB")
            finally:
                driver.quit()
        finally:
            peers.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
