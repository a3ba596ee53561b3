"""The pages in real headless Chromium, against the proxy as a real server process: standalone
(the add-on's own sign-in form) and inside the example portal (the portal's sign-in, the pages
under its `/registry` prefix), with a real pull through the real upstream first.

Screenshots of every page land in `test-artifacts/pages/<kind>/` (git ignores it); the path is
printed. Headless Chromium's clipboard works on 127.0.0.1 (a secure context) once the test
grants it; the test reads it back, and checks the attribute the button copies from as well.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait
from sqlalchemy import select

from depproxy_pyramid.credentials import hash_password
from depproxy_pyramid.models import Group, Membership, Role, User
from tests.proxy import PULLER, running_proxy
from tests.server import BIN, ROOT
from tests.support.registry import skopeo_pull

ARTIFACTS = ROOT / "test-artifacts" / "pages"
PASSWORDS = {name: f"{name}-password-1" for name in ("owner", "guest", "stranger", "root")}
PORTAL_SECRET = "portal-browser-test-secret-" + "z" * 40


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(
        service=Service(executable_path="/usr/bin/chromedriver"), options=options
    )
    yield browser
    browser.quit()


def portal_admin(ini: Path, *args: str, stdin: str = "") -> None:
    result = subprocess.run(
        [str(BIN / "portal-admin"), str(ini), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


class Pages:
    """The browser on one kind of deployment: where its pages are and how one signs in."""

    def __init__(self, kind: str, proxy, driver, artifacts: Path) -> None:
        self.kind = kind
        self.proxy = proxy
        self.driver = driver
        self.artifacts = artifacts
        self.prefix = "/registry" if kind == "portal" else ""

    def group_url(self, group: str) -> str:
        return f"{self.proxy.url}{self.prefix}/groups/{group}/-/dependency_proxy"

    def screenshot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.artifacts / f"{name}.png"))

    def sign_in(self, username: str, then: str) -> None:
        self.driver.delete_all_cookies()
        if self.kind == "portal":
            self.driver.get(f"{self.proxy.url}/login")
            form = self.driver.find_element(By.TAG_NAME, "form")
        else:
            # Asked to sign in on the way to the page, and brought back to it.
            self.driver.get(then)
            form = self.driver.find_element(By.ID, "sign-in-form")
            self.screenshot("sign-in")
        form.find_element(By.NAME, "username").send_keys(username)
        form.find_element(By.NAME, "password").send_keys(PASSWORDS[username])
        self.mark_page()
        form.find_element(By.CSS_SELECTOR, "button[type=submit], button").click()
        self.wait_for_next_page()
        if self.kind == "portal":
            self.driver.get(then)
        assert self.driver.current_url == then
        assert self.text("signed-in-as") == username

    def click(self, element_id: str) -> None:
        """Click a button that loads another page, and wait for that page."""
        self.mark_page()
        self.driver.find_element(By.ID, element_id).click()
        self.wait_for_next_page()

    def mark_page(self) -> None:
        self.driver.execute_script("window.depproxyOldPage = true;")

    def wait_for_next_page(self) -> None:
        WebDriverWait(self.driver, 10).until(
            lambda driver: driver.execute_script(
                "return window.depproxyOldPage === undefined"
                " && document.readyState === 'complete';"
            )
        )

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def has(self, element_id: str) -> bool:
        return bool(self.driver.find_elements(By.ID, element_id))


def _add_standalone_users(proxy, group: str) -> None:
    manager, session = proxy.db.session()
    with manager:
        acme = session.scalar(select(Group).where(Group.path == group))
        for name, role, admin in (
            ("owner", Role.OWNER, False),
            ("guest", Role.GUEST, False),
            ("stranger", None, False),
            ("root", None, True),
        ):
            user = User(username=name, password_hash=hash_password(PASSWORDS[name]), is_admin=admin)
            session.add(user)
            if role is not None:
                session.add(Membership(group=acme, user=user, role=role))


def _add_portal_users(proxy, group: str) -> None:
    portal_admin(proxy.ini, "initdb")
    for name, password in [*PASSWORDS.items(), PULLER]:
        portal_admin(proxy.ini, "user", "add", name, stdin=f"{password}\n")
    for name, role in (("owner", "owner"), ("guest", "guest"), (PULLER[0], "developer")):
        portal_admin(proxy.ini, "team", "add", name, group, role)


@pytest.mark.parametrize("kind", ["standalone", "portal"])
def test_an_owner_runs_the_proxy_from_its_page(kind, upstream, driver, tmp_path):
    artifacts = ARTIFACTS / kind
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the pages ({kind}): {artifacts}")
    extra = (
        {"app_use": "egg:depproxy-portal-example", "portal.session_secret": PORTAL_SECRET}
        if kind == "portal"
        else {}
    )
    with running_proxy(
        tmp_path / "proxy", f"sqlite:///{tmp_path / 'proxy.sqlite'}", upstream.url, **extra
    ) as proxy:
        group = proxy.new_group("acme")
        (_add_portal_users if kind == "portal" else _add_standalone_users)(proxy, group)
        pages = Pages(kind, proxy, driver, artifacts)
        page_url = pages.group_url(group)

        # A real pull through the real upstream fills the cache.
        skopeo_pull(proxy.ref(group, "library/alpine:latest"), tmp_path / "pulled", creds=PULLER)

        pages.sign_in("owner", page_url)
        pages.screenshot("group-owner")
        prefix = f"{proxy.host}/{group}/dependency_proxy/containers"
        assert driver.find_element(By.ID, "image-prefix").get_attribute("value") == prefix
        assert f"docker pull {prefix}/alpine:latest" in pages.text("pull-commands")
        assert f"FROM {prefix}/alpine:latest" in pages.text("pull-commands")
        rows = driver.find_elements(By.CSS_SELECTOR, "#cached-images tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == ["library/alpine"]
        assert pages.text("manifest-count") == "1"

        # The copy button copies the prefix.
        copy = driver.find_element(By.ID, "copy-prefix")
        assert copy.get_attribute("data-copy") == prefix
        driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {
                "origin": proxy.url,
                "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"],
            },
        )
        copy.click()
        WebDriverWait(driver, 10).until(lambda _: copy.text == "Copied")
        clipboard = driver.execute_async_script(
            "const done = arguments[0];"
            "navigator.clipboard.readText().then(done, e => done('unreadable: ' + e));"
        )
        assert clipboard == prefix

        # Off: the registry refuses the pull; on again: it serves it.
        pages.click("toggle-proxy")
        assert pages.text("proxy-status") == "disabled"
        pages.screenshot("group-disabled")
        assert proxy.get(group, "library/alpine", "manifests", "latest").status_code == 403
        pages.click("toggle-proxy")
        assert pages.text("proxy-status") == "enabled"
        assert proxy.get(group, "library/alpine", "manifests", "latest").status_code == 200

        # The cleanup policy.
        ttl_enabled = driver.find_element(By.ID, "ttl-enabled")
        if not ttl_enabled.is_selected():
            ttl_enabled.click()
        days = driver.find_element(By.ID, "ttl-days")
        days.clear()
        days.send_keys("14")
        pages.click("save-ttl")
        assert driver.find_element(By.ID, "ttl-days").get_attribute("value") == "14"
        assert driver.find_element(By.ID, "ttl-enabled").is_selected()
        assert "Cleanup policy saved." in driver.page_source

        # Purge, with a confirmation step.
        pages.click("purge")
        assert driver.current_url == page_url + "/purge"
        pages.screenshot("purge-confirmation")
        pages.click("confirm-purge")
        assert driver.current_url == page_url
        assert pages.text("manifest-count") == "0"
        assert pages.text("blob-count") == "0"
        assert pages.has("no-images")
        # The group's own audit log, newest first: the purge, the policy, the two switches.
        changes = driver.find_elements(By.CSS_SELECTOR, "#group-audit-log tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[2].text for row in changes[:4]] == [
            "cache.purge",
            "proxy.ttl_policy",
            "proxy.settings",
            "proxy.settings",
        ]
        assert {row.find_elements(By.TAG_NAME, "td")[1].text for row in changes[:4]} == {
            "user:owner"
        }
        pages.screenshot("group-purged")

        # A form posted without its CSRF token is refused.
        driver.execute_script(
            "document.querySelector('#ttl-form input[name=csrf_token]').remove();"
        )
        pages.click("save-ttl")
        assert "without its security token" in pages.text("error-message")
        pages.screenshot("csrf-refused")

        # A guest sees how to pull, and no controls.
        pages.sign_in("guest", page_url)
        pages.screenshot("group-guest")
        assert driver.find_element(By.ID, "image-prefix").get_attribute("value") == prefix
        assert not pages.has("settings")
        assert not pages.has("toggle-proxy")
        assert not pages.has("group-audit-log")

        # A non-member of the private group gets the page of a missing one.
        pages.sign_in("stranger", page_url)
        pages.screenshot("group-non-member")
        assert "There is no such page, or you may not see it." in pages.text("error-message")
        assert "acme" not in driver.find_element(By.TAG_NAME, "main").text

        if kind == "standalone":
            # The instance admin overview, with the owner's changes in the audit log.
            pages.sign_in("root", f"{proxy.url}/admin/dependency_proxy")
            pages.screenshot("admin-overview")
            log = pages.text("audit-log")
            assert "user:owner cache.purge acme" in log
            assert "user:owner proxy.ttl_policy acme" in log
