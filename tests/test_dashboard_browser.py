"""The dashboard in a real headless Chromium against real running peers.

Peer A (participation ``manual``) serves its control API and dashboard on a free loopback
port; peer B is its trusted neighbour. Selenium drives Debian's ``chromium`` through
``chromedriver``. Without them the tests skip, except when ``CI`` is set: there they fail,
so CI really runs them (``make test`` installs both).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
import pytest
from dashkit import PeerThread, base_url, login_url, make_driver, missing_browser, start_pair
from peerkit import TINY_CATHETER, write_png_folder
from safetensors.numpy import save_file

from silomesh.peer.control import TOKEN_FILE_NAME, read_token_file
from silomesh.peer.dashboard.pages import PAGES

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

T = TypeVar("T")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(120)]

WAIT = 20.0


def _require_browser() -> None:
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeerThread]:
    _require_browser()
    running = start_pair(tmp_path_factory.mktemp("dashboard"), participation="manual", rounds=20, deadline=8.0)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser(peers: PeerThread) -> Iterator[WebDriver]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver = make_driver()
    try:
        driver.get(login_url(peers.peers[0]))
        WebDriverWait(driver, WAIT).until(lambda d: d.current_url.endswith("/dashboard/"))
        yield driver
    finally:
        driver.quit()


def wait(
    driver: WebDriver, condition: Callable[[WebDriver], T | Literal[False]], timeout: float = WAIT, message: str = ""
) -> T:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    # Pages reload after an action; reading an element while the old document goes away
    # raises a stale-element error or chromedriver's "unhandled inspector error". Both
    # are WebDriverExceptions and are retried until the condition holds or time runs out.
    return WebDriverWait(driver, timeout, ignored_exceptions=(WebDriverException,)).until(condition, message)


def css(driver: WebDriver, selector: str) -> list[WebElement]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def texts(driver: WebDriver, selector: str) -> list[str]:
    """The text of every element matching ``selector`` (empty while a page reloads)."""
    return [e.text for e in css(driver, selector)]


def open_page(driver: WebDriver, peers: PeerThread, sub: str) -> None:
    driver.get(base_url(peers.peers[0]) + "/dashboard" + sub)
    title = next(t for s, _, t in PAGES if s == sub)
    wait(driver, lambda d: texts(d, "main h1") == [title], message=f"page {sub}")


def server_wait(peers: PeerThread, check: Callable[[], T], timeout: float = 60.0) -> T:
    """Poll ``check()`` (on this thread) until it returns something truthy."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise TimeoutError("condition not reached on the peer")


# --------------------------------------------------------------------------- tests


def test_request_without_token_or_session_is_refused_and_cross_site_post_too(peers: PeerThread) -> None:
    url = base_url(peers.peers[0])
    token = read_token_file(peers.peers[0].config.data_dir / TOKEN_FILE_NAME)
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
        page = client.get("/dashboard/")
        api = client.get("/api/status")
        cross = client.post(
            "/api/approvals/1",
            json={"approve": True},
            headers={"Authorization": f"Bearer {token}", "Origin": "https://evil.example"},
        )
    assert page.status_code == 401 and "silomesh peer dashboard" in page.text
    assert api.status_code == 401
    assert cross.status_code == 403


def test_each_page_loads_in_chromium(browser: WebDriver, peers: PeerThread) -> None:
    for sub, _template, _title in PAGES:
        open_page(browser, peers, sub)
        assert not css(browser, "#flash:not([hidden])")
    open_page(browser, peers, "/")
    assert peers.peers[0].peer_id in browser.page_source


def test_approving_a_pending_round_in_the_browser_lets_it_run(browser: WebDriver, peers: PeerThread) -> None:
    a = peers.peers[0]

    def pending() -> list[dict[str, Any]]:
        return [x for x in peers.call(a.operator.approvals) if x["status"] == "pending" and x["kind"] == "round"]

    ask = server_wait(peers, pending, timeout=30)[0]
    open_page(browser, peers, "/approvals")
    css(browser, f'button.decide[data-id="{ask["id"]}"][data-approve="true"]')[0].click()
    wait(
        browser,
        lambda d: any(r.text.startswith(f"{ask['id']} ") and "approved" in r.text for r in css(d, "#decided tbody tr")),
        message="approved row",
    )
    decided = {x["id"]: x["status"] for x in peers.call(a.operator.approvals)}
    assert decided[ask["id"]] == "approved"


def test_import_rename_and_delete_a_model(browser: WebDriver, peers: PeerThread, tmp_path: Path) -> None:
    from selenium.webdriver.support import expected_conditions

    a = peers.peers[0]

    async def state() -> dict[str, Any]:
        return a.learner.state()

    weights = {k: v.copy() for k, v in peers.call(state).items()}
    first = next(k for k, v in weights.items() if v.dtype.kind == "f")
    weights[first] = weights[first] + 0.125
    file = tmp_path / "initial.safetensors"
    save_file(weights, str(file))

    open_page(browser, peers, "/models")
    css(browser, "#import-file")[0].send_keys(str(file))
    css(browser, "#import-form button[type=submit]")[0].click()
    row = "tr[data-digest] td:nth-child(4)"
    wait(browser, lambda d: any(td.text == "import:initial.safetensors" for td in css(d, row)), message="imported row")
    digest = next(m["digest"] for m in peers.call(a.operator.models) if m["origin"] == "import:initial.safetensors")

    here = f'tr[data-digest="{digest}"]'
    css(browser, f"{here} .rename-input")[0].send_keys("baseline-v1")
    css(browser, f"{here} button.rename")[0].click()
    wait(browser, lambda d: texts(d, f"{here} .model-name") == ["baseline-v1"], message="renamed")
    assert {m["digest"]: m["name"] for m in peers.call(a.operator.models)}[digest] == "baseline-v1"

    css(browser, f"{here} button.delete")[0].click()
    alert = wait(browser, expected_conditions.alert_is_present(), message="confirm dialog")
    assert "baseline-v1" in alert.text
    alert.accept()
    wait(browser, lambda d: not css(d, here), message="row gone")
    assert digest not in {m["digest"] for m in peers.call(a.operator.models)}


def test_export_link_downloads_the_weights(browser: WebDriver, peers: PeerThread) -> None:
    server_wait(peers, lambda: peers.call(peers.peers[0].operator.models), timeout=60)  # round 0 makes one
    open_page(browser, peers, "/models")
    links = css(browser, 'a[href*="/export?format=safetensors"]')
    href = links[0].get_attribute("href")
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    reply = httpx.get(href, cookies=cookies, trust_env=False, timeout=20)
    assert reply.status_code == 200 and reply.headers["content-disposition"].startswith("attachment")
    assert len(reply.content) > 1000


def test_register_a_dataset_and_see_errors_in_plain_words(
    browser: WebDriver, peers: PeerThread, tmp_path: Path
) -> None:
    size = TINY_CATHETER["image_size"]
    broken = write_png_folder(tmp_path / "broken", 3, size)
    (broken / "images" / "s1.png").write_bytes(b"not a png at all")
    good = write_png_folder(tmp_path / "good", 4, size)

    open_page(browser, peers, "/data")
    field = css(browser, "#dataset-path")[0]
    field.send_keys(str(broken))
    css(browser, "#dataset-form button[type=submit]")[0].click()
    wait(browser, lambda d: css(d, "#flash:not([hidden])"), message="error shown")
    assert "s1.png" in css(browser, "#flash")[0].text

    field.clear()
    field.send_keys(str(good))
    css(browser, "#dataset-form button[type=submit]")[0].click()
    wait(browser, lambda d: any(str(good) in r.text for r in css(d, "#datasets tbody tr")), message="dataset row")
    row = next(r for r in css(browser, "#datasets tbody tr") if str(good) in r.text)
    assert row.find_element("css selector", ".count").text == "4"
    assert "mask" in row.text


def test_live_update_arrives_without_reloading(browser: WebDriver, peers: PeerThread) -> None:
    a, b = peers.peers
    open_page(browser, peers, "/")
    wait(
        browser,
        lambda d: int(d.execute_script("return document.body.dataset.liveUpdates || 0")) >= 1,
        message="first live event",
    )
    browser.execute_script("window.__sameDocument = 42;")
    try:
        peers.call(a.operator.select_neighbours, [])
        wait(browser, lambda d: texts(d, "#ov-neighbours tr td:nth-child(4)") == ["no"], message="live change")
    finally:
        peers.call(a.operator.select_neighbours, [b.peer_id])
    wait(browser, lambda d: texts(d, "#ov-neighbours tr td:nth-child(4)") == ["yes"], message="live change back")
    assert browser.execute_script("return window.__sameDocument") == 42


def test_rounds_page_charts_the_local_metric(browser: WebDriver, peers: PeerThread) -> None:
    a = peers.peers[0]
    server_wait(peers, lambda: [r for r in peers.call(a.operator.rounds) if r["status"] == "done" and r["metrics"]], 60)
    open_page(browser, peers, "/rounds")
    points = wait(
        browser,
        lambda d: d.execute_script(
            "const c = window.Chart && Chart.getChart('metric-chart');"
            "return c ? c.data.datasets.reduce((n, s) => n + s.data.filter(v => v !== null).length, 0) : 0;"
        ),
        message="chart drawn",
    )
    assert points >= 1
    assert "done" in css(browser, "#rounds tbody")[0].text


def test_verify_log_shows_the_result(browser: WebDriver, peers: PeerThread) -> None:
    open_page(browser, peers, "/audit")
    assert css(browser, "#audit tbody tr")
    css(browser, "#verify-log")[0].click()
    wait(browser, lambda d: css(d, "#verify-summary"), message="verify result")
    assert css(browser, "#verify-summary")[0].text.startswith("OK")


def test_choosing_neighbours_for_the_next_round(browser: WebDriver, peers: PeerThread) -> None:
    a, b = peers.peers

    def selected() -> bool:
        return bool({n["peer_id"]: n["selected"] for n in peers.call(a.operator.neighbours)}[b.peer_id])

    for want in (False, True):
        open_page(browser, peers, "/neighbours")
        box = css(browser, f'input.select-neighbour[value="{b.peer_id}"]')[0]
        if box.is_selected() != want:
            box.click()
        css(browser, "#save-selection")[0].click()
        server_wait(peers, lambda want=want: selected() == want, timeout=10)
        wait(browser, lambda d, want=want: [e.is_selected() for e in css(d, "input.select-neighbour")] == [want])
