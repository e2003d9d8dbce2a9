"""The web console end to end in a real browser (Playwright driving Chromium) against real valetd
processes: login through `valet console --print-url`, a pending approval appearing without a
reload, approval with the typed confirmation releasing the agent's waiting call, the live grants
table following issue and revocation, revocation from the console, and every refusal: no session,
a used login link, a stale CSRF token, an expired session, a session ended by logging out.
The tests take screenshots of each page into target/console-screenshots/; `./scripts/screenshots.sh`
runs them with VALET_SCREENSHOTS=docs/console to regenerate the ones the docs show."""

from __future__ import annotations

import threading

import pytest
import valet

from conftest import (
    ADMIN_KEY,
    AGENT_KEY,
    OPERATOR_KEY,
    SCREENSHOTS,
    audit_records,
    certificates,
    client_for,
    console_config,
    login_url,
    sha256_hex,
    valet_cli,
)

LIVE = "body[data-live=connected]"


def log_in(context, valetd):
    """A page of `context` logged in as the operator through a fresh login link."""
    page = context.new_page()
    url, code = login_url(valetd)
    landing = page.goto(url)
    assert landing.status == 200
    page.fill("#code", code)
    page.click("#login")
    page.wait_for_url("**/approvals")
    page.wait_for_selector(LIVE)
    return page


def screenshot(page, name: str, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def test_a_pending_request_appears_live_and_the_typed_confirmation_releases_the_agents_call(deploy, context):
    deployment = deploy(console_config())
    valetd = deployment.start()
    page = log_in(context, valetd)
    page.evaluate("window.notReloaded = true")
    with client_for(valetd, AGENT_KEY) as agent:
        issued = agent.request_token("prod-approval", "console-approval", purpose="migrate the orders table")
        assert issued.pending
        approval_id = issued.approval.id
        card = page.locator(f"article[data-approval-id='{approval_id}']")
        card.wait_for(timeout=15_000)
        assert page.evaluate("window.notReloaded === true"), "the request arrived without a reload"
        # The approver sees the canonical rendering, the same text the CLI and webhook show.
        assert card.locator("pre.rendered").inner_text().strip() == issued.approval.rendered.strip()
        assert "migrate the orders table" in card.inner_text()
        screenshot(page, "approvals")

        granted = {}
        waiter = threading.Thread(
            target=lambda: granted.update(issued=agent.wait_for_grant(issued.grant.id, timeout=60)), daemon=True
        )
        waiter.start()

        approve = card.locator("form.approve button")
        confirm = card.locator("form.approve input[name=confirm]")
        assert approve.is_disabled()
        confirm.fill("staging")
        assert approve.is_disabled()
        # valetd checks the confirmation itself: a form posted past the page's check is refused.
        csrf = card.locator("form.approve input[name=csrf]").get_attribute("value")
        wrong = page.request.post(
            f"{valetd.console}/approvals/{approval_id}/approve",
            form={"csrf": csrf, "confirm": "staging", "reason": "bypassing the page"},
        )
        assert wrong.status == 400, wrong.text()
        assert "typed to confirm" in wrong.text()
        assert not granted, "a wrong confirmation releases nothing"

        confirm.fill("production")
        card.locator("form.approve input[name=reason]").fill("ticket OPS-42")
        approve.click()
        page.wait_for_url(f"**/approvals/{approval_id}")
        assert page.locator("p.status").inner_text().startswith("approved")
        waiter.join(60)
        assert granted["issued"].token, "the agent's waiting call went through"
        assert agent.introspect(granted["issued"].token).active

        # Denied from the console, with a reason: the agent's wait ends with it.
        page.goto(f"{valetd.console}/approvals")
        page.wait_for_selector(LIVE)
        second = agent.request_token("prod-approval", "console-denial", purpose="drop the orders table")
        card = page.locator(f"article[data-approval-id='{second.approval.id}']")
        card.wait_for(timeout=15_000)
        card.locator("form.deny input[name=reason]").fill("not during the freeze")
        card.locator("form.deny button").click()
        page.wait_for_url(f"**/approvals/{second.approval.id}")
        assert "denied by operator: not during the freeze" in page.locator("p.status").inner_text()
        with pytest.raises(valet.ApprovalDenied) as denied:
            agent.wait_for_grant(second.grant.id, timeout=30)
        assert "not during the freeze" in str(denied.value)
        page.goto(f"{valetd.console}/approvals")
        decided = page.locator(f"table.decided tr[data-approval-id='{second.approval.id}']").inner_text()
        assert "denied" in decided and "not during the freeze" in decided

    records = audit_records(deployment)
    approved = [
        record for record in records
        if record["action"] == "approval.approve" and record.get("approval_id") == approval_id
    ]
    assert [record["outcome"] for record in approved] == ["denied", "allowed"]
    assert all(record["principal"] == "operator" for record in approved)
    assert all(record["auth_method"] == "console_session" for record in approved)
    assert approved[1]["reason"] == "ticket OPS-42"
    # No session cookie, CSRF token or login link is ever written to the audit log.
    text = deployment.path("audit/audit.jsonl").read_text()
    assert csrf not in text
    for cookie in page.context.cookies():
        assert cookie["value"] not in text


def test_the_grants_table_follows_issue_and_revocation_and_the_console_revokes(deploy, context):
    deployment = deploy(console_config())
    valetd = deployment.start()
    page = log_in(context, valetd)
    page.goto(f"{valetd.console}/grants")
    page.wait_for_selector(LIVE)
    page.evaluate("window.notReloaded = true")
    with client_for(valetd, AGENT_KEY) as agent:
        first = agent.request_token("deploy-staging", "console-grants", params={"project": "shop"})
        row = page.locator(f"tr[data-grant-id='{first.grant.id}']")
        row.wait_for(timeout=15_000)
        assert row.get_attribute("data-status") == "active"
        # Revoked elsewhere (the agent, here): the row changes in place.
        agent.revoke(first.grant.id, reason="task done")
        page.wait_for_selector(f"tr[data-grant-id='{first.grant.id}'][data-status=revoked]", timeout=15_000)
        assert page.evaluate("window.notReloaded === true")

        second = agent.request_token("deploy-staging", "console-grants-2", params={"project": "shop"})
        third = agent.request_token("deploy-staging", "console-grants-2", params={"project": "cart"})
        second_row = page.locator(f"tr[data-grant-id='{second.grant.id}']")
        second_row.wait_for(timeout=15_000)
        page.locator(f"tr[data-grant-id='{third.grant.id}']").wait_for(timeout=15_000)
        screenshot(page, "grants")

        # Revoked from the console: the grant's page says so, and the token is dead.
        second_row.locator("input[name=reason]").fill("seen in the console")
        second_row.locator("form.revoke button").click()
        page.wait_for_url(f"**/grants/{second.grant.id}")
        assert page.locator("dd.status").inner_text().startswith("revoked")
        assert not agent.introspect(second.token).active
        trail = page.locator("ul.trail").inner_text()
        assert "token.issue" in trail and "token.revoke" in trail and "console_session" in trail
        screenshot(page, "grant")

        # The task's other grant, through the task form.
        page.locator("form.revoke-task input[name=reason]").fill("whole task")
        page.locator("form.revoke-task button").click()
        page.wait_for_url("**/grants?task=console-grants-2&status=any&revoked=1")
        page.wait_for_selector(f"tr[data-grant-id='{third.grant.id}'][data-status=revoked]")
        assert not agent.introspect(third.token).active

    # The status filter: revoked grants only; an unknown status is refused with the choices.
    page.goto(f"{valetd.console}/grants?status=revoked")
    statuses = page.locator("#grants tr[data-grant-id]").evaluate_all("rows => rows.map(row => row.dataset.status)")
    assert statuses == ["revoked"] * 3, statuses
    wrong = page.goto(f"{valetd.console}/grants?status=gone")
    assert wrong.status == 400
    assert "one of active, pending, revoked, expired, denied, any" in page.locator(".error").inner_text()

    # The chain, verified from the console.
    page.goto(f"{valetd.console}/audit")
    page.click("text=Verify the chain now")
    page.wait_for_selector("p.check.ok")
    assert "every MAC checked" in page.locator("p.check").inner_text()
    screenshot(page, "audit", full_page=False)  # the log runs long


def test_the_console_refuses_without_a_session_a_used_link_a_stale_csrf_token_and_after_logout(deploy, browser):
    deployment = deploy(console_config())
    valetd = deployment.start()

    # No session: pages and actions are refused, and actions are recorded.
    anonymous = browser.new_context()
    page = anonymous.new_page()
    answer = page.goto(f"{valetd.console}/grants")
    assert answer.status == 401
    assert "no console session" in page.locator(".error").inner_text()
    posted = anonymous.request.post(
        f"{valetd.console}/revoke-all",
        form={"target": "environment", "name": "staging", "reason": "x", "confirm": "revoke all", "csrf": "x"},
    )
    assert posted.status == 401
    events = anonymous.request.get(f"{valetd.console}/events/grants")
    assert events.status == 401

    # A login link opens nothing without its code, and one session, once, with it.
    url, code = login_url(valetd)
    bystander = browser.new_context().new_page()
    bystander.goto(url)
    bystander.fill("#code", "AAAA-AAAA")
    bystander.click("#login")
    assert "code does not match" in bystander.locator(".error").inner_text()
    page.goto(url)
    page.fill("#code", code)
    page.click("#login")
    page.wait_for_url("**/approvals")
    again = browser.new_context().new_page()
    again.goto(url)
    again.fill("#code", code)
    again.click("#login")
    assert "used already" in again.locator(".error").inner_text()

    # A stale CSRF token: a page from session A submitted after session B replaced it.
    context = browser.new_context()
    first = log_in(context, valetd)
    first.goto(f"{valetd.console}/grants")
    log_in(context, valetd)  # session B, same browser
    first.fill("form.panic input[name=name]", "staging")
    first.fill("form.panic input[name=reason]", "stale page")
    first.fill("form.panic input[name=confirm]", "revoke all")
    with first.expect_navigation():
        first.click("form.panic button")
    assert "CSRF token is not this session's" in first.locator(".error").inner_text()
    forged = context.request.post(
        f"{valetd.console}/revoke-all",
        form={"target": "environment", "name": "staging", "reason": "x", "confirm": "revoke all", "csrf": "forged"},
    )
    assert forged.status == 401
    # A form another site makes the browser post is refused on what the browser says of it,
    # even with the session's own token.
    current_csrf = context.new_page()
    current_csrf.goto(f"{valetd.console}/grants")
    token = current_csrf.locator("form.panic input[name=csrf]").get_attribute("value")
    cross_site = context.request.post(
        f"{valetd.console}/revoke-all",
        form={"target": "environment", "name": "staging", "reason": "x", "confirm": "revoke all", "csrf": token},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross_site.status == 401
    assert "posted from another site" in cross_site.text()

    # Logging out ends the session everywhere: its cookie, replayed, is refused.
    current = context.new_page()
    current.goto(f"{valetd.console}/approvals")
    saved = context.cookies()
    current.click("text=Log out")
    current.wait_for_selector("text=Logged out")
    replay = browser.new_context()
    replay.add_cookies(saved)
    ended = replay.new_page()
    assert ended.goto(f"{valetd.console}/approvals").status == 401
    assert "was ended (logged out" in ended.locator(".error").inner_text()

    records = audit_records(deployment)
    refused = [record for record in records if record["action"] == "console.refuse"]
    assert any("principal" not in record and record["console_action"] == "/revoke-all" for record in refused)
    assert any(record.get("principal") == "operator" and "CSRF" in record["reason"] for record in refused)
    assert any(
        record["action"] == "console.login" and record["outcome"] == "denied" and "used already" in record["reason"]
        for record in records
    )
    assert any(record["action"] == "console.logout" for record in records)
    # The stale page revoked nothing.
    assert not any(record.get("via") == "revoke_all" and record["outcome"] == "allowed" for record in records)


def test_a_rotated_key_ends_the_console_session_it_opened_live_and_operators_end_sessions(deploy, browser):
    deployment = deploy(console_config())
    valetd = deployment.start()
    mine = log_in(browser.new_context(), valetd)
    other_context = browser.new_context()
    other = log_in(other_context, valetd)

    # The sessions page lists both, with the key that opened them; ending the other one from
    # here ends it on its next request.
    mine.goto(f"{valetd.console}/sessions")
    rows = mine.locator("tr[data-session-id]")
    assert rows.count() == 2
    assert "principal key" in rows.first.inner_text()
    screenshot(mine, "sessions")
    with mine.expect_navigation():
        mine.locator("tr[data-session-id] form button").first.click()
    assert mine.locator("tr[data-session-id]").count() == 1
    assert other.goto(f"{valetd.console}/grants").status == 401
    assert "by an operator" in other.locator(".error").inner_text()

    # The operator key is rotated while the session is open on a live page: the event stream
    # ends within seconds and the page says so; the next request is refused with the reason.
    mine.goto(f"{valetd.console}/grants")
    mine.wait_for_selector(LIVE)
    config = deployment.path("valet.toml")
    config.write_text(
        config.read_text().replace(sha256_hex(OPERATOR_KEY), sha256_hex("vk_test_operator_rotated_77"))
    )
    reload = valet_cli(valetd, "config", "reload", key=ADMIN_KEY)
    assert reload.returncode == 0, reload.stderr
    mine.wait_for_selector("body[data-live=logged-out]", timeout=15_000)
    assert mine.goto(f"{valetd.console}/approvals").status == 401
    message = mine.locator(".error").inner_text()
    assert "no longer accepted" in message and "key was replaced" in message
    ended = [record for record in audit_records(deployment) if record["action"] == "console.session_end"]
    assert any("key was replaced" in record["reason"] for record in ended)
    assert any("by an operator" in record["reason"] for record in ended)


def test_an_expired_session_is_refused(deploy, browser):
    deployment = deploy(console_config(session_ttl="2s"))
    valetd = deployment.start()
    context = browser.new_context()
    page = log_in(context, valetd)
    cookie = next(cookie for cookie in context.cookies() if cookie["name"] == "valet_console")
    page.wait_for_timeout(2_500)
    # The browser drops the cookie at its Max-Age ...
    answer = page.goto(f"{valetd.console}/grants")
    assert answer.status == 401
    assert "valet console" in page.inner_text("main")
    # ... and valetd refuses it when it is replayed after its expiry, whatever the browser does.
    replayed = browser.new_context().request.get(
        f"{valetd.console}/grants", headers={"Cookie": f"valet_console={cookie['value']}"}
    )
    assert replayed.status == 401
    assert "console session expired at" in replayed.text()


def test_an_agent_cannot_open_the_console(deploy):
    import subprocess

    from conftest import BINARIES

    valetd = deploy(console_config()).start()
    answer = subprocess.run(
        [str(BINARIES / "valet"), "console", "--print-url"],
        env={"VALET_SERVER": valetd.server, "VALET_KEY": AGENT_KEY},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert answer.returncode != 0
    assert "opening the web console" in answer.stderr and "operator" in answer.stderr


def test_over_tls_the_console_speaks_http2_and_its_cookie_is_secure_and_host_only(deploy, browser):
    deployment = deploy(console_config(tls=True))
    certificates(deployment.directory)
    valetd = deployment.start(scheme="https")
    assert valetd.console.startswith("https://127.0.0.1:")
    url, code = login_url(valetd, ca_file=str(deployment.path("ca.crt")))
    assert url.startswith(valetd.console + "/login?link=")
    # The test's CA is not in Chromium's store; the certificate itself is checked by the CLI above.
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.goto(url)
    page.fill("#code", code)
    page.click("#login")
    page.wait_for_url("**/approvals")
    page.wait_for_selector(LIVE)
    protocol = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
    assert protocol == "h2", protocol
    (cookie,) = context.cookies()
    assert cookie["name"] == "__Host-valet_console"
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/" and "domain" in cookie
    # Logging out removes the __Host- cookie from the browser too (its removal must say Secure).
    page.click("text=Log out")
    page.wait_for_selector("text=Logged out")
    assert context.cookies() == []
