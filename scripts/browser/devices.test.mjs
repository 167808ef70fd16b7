// The fleet view in a real browser: Debian's Chromium, driven by playwright-core, opens the page the
// real handler serves against its simulated tenant (started by scripts/browser-check.sh), checks its
// rows against the JSON answer and the outbreak made here, and saves screenshots under target/browser/.
//
// Environment: HANDLER_URL (the handler), SIM_URL (its simulator's /_sim controls), SCREENSHOTS (a
// folder), CHROMIUM (the browser binary, /usr/bin/chromium by default).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import path from "node:path";

import { chromium } from "playwright-core";

const HANDLER = process.env.HANDLER_URL;
const SIM = process.env.SIM_URL;
const SCREENSHOTS = process.env.SCREENSHOTS ?? "target/browser";
const KEY = "browser-check-key";
const PAGE = `${HANDLER}/api/restrict-code-execution/devices?code=${KEY}`;

// The simulator's seeded devices (src/simulator/seed.rs).
const ALPHA = { aad: "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d", id: "c5cb89852ce0d21636c0491709a4571b5f190e75" };
const BRAVO = { aad: "7b2e9d14-6c3a-4f85-b1d0-2a9c8e7f6d54", id: "39a7550d43b78a7757871f5c146184282381ec3d" };
const CHARLIE = { aad: "c4d5e6f7-0819-4a2b-8c3d-4e5f60718293", id: "47926ef9a6c81431554277273f9b8e07e2649733" };
const KIOSK = { id: "327e13c6bfe7466bcd0564fd94d1bedf29ac2659" };
// A device with a long name and a long comment, to see that a phone does not scroll sideways.
const LONG = {
  id: "0123456789abcdef0123456789abcdef01234567",
  name: "FINANCE-WORKSTATION-WITH-A-VERY-LONG-HOSTNAME-0042.emea.corp.contoso.com",
};
const HOSTILE = `<script>alert("x")</script><img src=x onerror=alert(1)> INC-7 & </td>`;

async function call(method, url, body, headers = {}) {
  const response = await fetch(url, {
    method,
    headers: { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, text };
}

async function act(deviceId, release, comment) {
  const { status, text } = await call("POST", `${HANDLER}/api/restrict-code-execution`, {
    deviceId,
    release,
    comment,
    callerName: "soc@contoso.com",
  });
  assert.equal(status, 201, text);
}

async function advance(seconds) {
  const { status, text } = await call("POST", `${SIM}/_sim/clock`, { advanceSeconds: seconds });
  assert.equal(status, 200, text);
}

async function offline(id) {
  const { status, text } = await call("POST", `${SIM}/_sim/machines/${id}/offline`, { offline: true });
  assert.equal(status, 204, text);
}

let browser;

before(async () => {
  assert.ok(HANDLER && SIM, "HANDLER_URL and SIM_URL must be set (run scripts/browser-check.sh)");
  // The outbreak: ALPHA, BRAVO, CHARLIE and LONG restricted; CHARLIE released again; ALPHA's release
  // still pending (offline); KIOSK's restrict pending (offline), so its state is unknown.
  const added = await call("POST", `${SIM}/_sim/machines`, {
    id: LONG.id,
    computerDnsName: LONG.name,
    aadDeviceId: "0a0b0c0d-0e0f-4a1b-8c2d-3e4f5a6b7c8d",
    healthStatus: "Active",
    osPlatform: "Windows11",
    onboardingStatus: "Onboarded",
  });
  assert.equal(added.status, 201, added.text);
  await act(ALPHA.aad, false, HOSTILE);
  await act(CHARLIE.aad, false, "INC-7");
  await act(BRAVO.aad, false, "INC-7");
  await act(LONG.id, false, "INC-7: ".padEnd(160, "suspicious-powershell-download-cradle-"));
  await advance(60);
  await act(CHARLIE.aad, true, "INC-7 cleared");
  await advance(60);
  await offline(ALPHA.id);
  await act(ALPHA.aad, true, "INC-7 cleared");
  await offline(KIOSK.id);
  await act(KIOSK.id, false, "INC-8");

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    // playwright-core gives every launch a fresh, temporary profile (--user-data-dir).
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
});

/** A page that records every request it makes and every dialog a script would open. */
async function open(viewport, url) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 2 });
  const page = await context.newPage();
  const requests = [];
  const dialogs = [];
  page.on("request", (r) => requests.push(r.url()));
  page.on("dialog", async (d) => {
    dialogs.push(d.message());
    await d.dismiss();
  });
  const response = await page.goto(url);
  return { context, page, response, requests, dialogs };
}

async function rows(page) {
  return page.$$eval("tbody tr[data-machine-id]", (trs) =>
    trs.map((tr) => ({
      id: tr.dataset.machineId,
      state: tr.dataset.state,
      cells: [...tr.cells].map((td) => td.innerText.trim()),
    })),
  );
}

test("the restricted devices, newest first, with every Defender string shown as text", async () => {
  const json = JSON.parse((await call("GET", PAGE, undefined, { Accept: "application/json" })).text);
  const { context, page, response, requests, dialogs } = await open({ width: 1280, height: 800 }, PAGE);
  assert.equal(response.status(), 200);
  assert.match(response.headers()["content-type"], /^text\/html/);

  const shown = await rows(page);
  assert.deepEqual(
    shown.map((r) => r.id),
    json.devices.map((d) => d.machineId),
    "the page lists what the JSON answer lists, in its order",
  );
  assert.deepEqual(new Set(shown.map((r) => r.id)), new Set([ALPHA.id, BRAVO.id, LONG.id]));
  assert.ok(shown.every((r) => r.state === "restricted" && r.cells[1] === "restricted"));

  const alpha = shown.find((r) => r.id === ALPHA.id);
  assert.match(alpha.cells[0], /DESKTOP-ALPHA\.contoso\.local/);
  assert.ok(alpha.cells[3].includes(HOSTILE), `the comment is shown as written: ${alpha.cells[3]}`);
  assert.match(alpha.cells[4], /^Release Pending, created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC/);
  assert.equal(await page.$$eval("script, img", (els) => els.length), 0, "no element from a comment");
  assert.deepEqual(dialogs, [], "no script ran");
  assert.equal(await page.locator("#count").innerText(), "3");
  const asOf = Date.parse(await page.locator("#as-of").getAttribute("datetime"));
  assert.ok(Math.abs(Date.now() - asOf) < 60_000, "asOf is when Defender was read");

  // Nothing was fetched from anywhere but the handler: no external assets.
  const origin = new URL(HANDLER).origin;
  assert.ok(requests.length >= 1);
  assert.deepEqual(requests.filter((u) => new URL(u).origin !== origin), []);
  await page.screenshot({ path: path.join(SCREENSHOTS, "devices-desktop.png"), fullPage: true });
  await context.close();
});

test("the filter links keep the key and list every state", async () => {
  const { context, page } = await open({ width: 1280, height: 800 }, PAGE);
  await page.getByRole("link", { name: /^all \(5\)$/ }).click();
  await page.waitForURL(/state=all/);
  assert.match(page.url(), new RegExp(`code=${KEY}`));
  const all = await rows(page);
  assert.equal(all.length, 5);
  assert.equal(all.at(-1).id, KIOSK.id, "the device whose state is unknown comes last");
  assert.equal(all.at(-1).state, "unknown");
  assert.deepEqual(
    all.filter((r) => r.state === "released").map((r) => r.id),
    [CHARLIE.id],
  );

  await page.getByRole("link", { name: /^pending \(2\)$/ }).click();
  await page.waitForURL(/state=pending/);
  assert.deepEqual(new Set((await rows(page)).map((r) => r.id)), new Set([ALPHA.id, KIOSK.id]));
  await context.close();
});

test("readable on a phone: one card per device, nothing wider than the screen", async () => {
  const phone = { width: 390, height: 844 };
  const { context, page } = await open(phone, `${PAGE}&state=all`);
  const widths = await page.evaluate(() => ({
    document: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    header: getComputedStyle(document.querySelector("thead")).display,
    font: parseFloat(getComputedStyle(document.body).fontSize),
  }));
  assert.ok(widths.document <= widths.viewport, `no sideways scrolling: ${JSON.stringify(widths)}`);
  assert.equal(widths.header, "none", "the table header gives way to labelled cards");
  assert.ok(widths.font >= 14, "text large enough to read");
  const long = (await rows(page)).find((r) => r.id === LONG.id);
  assert.ok(long.cells[0].includes(LONG.name));
  await page.screenshot({ path: path.join(SCREENSHOTS, "devices-phone.png"), fullPage: true });
  await context.close();
});
