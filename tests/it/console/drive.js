// Drives the operator console in headless Chromium with playwright-core (tests/it/console.rs).
// Arguments: the console URL, the admin token, the webhook with a dead letter, its seq, how
// many events the tail must show, and where to write the screenshot; the webhook `gone` is
// disabled (a 410) and is re-enabled. Prints one JSON object
// with what it saw; exits non-zero (with the reason on stderr) when a step fails.
"use strict";
const { chromium } = require("playwright-core");

const [url, token, webhook, deadSeq, events, screenshot] = process.argv.slice(2);
const STEP_MS = 30000;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const seen = { urls: [], eventsAuth: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.on("request", (r) => {
      seen.urls.push(r.url());
      if (r.url().includes("/v1/events")) seen.eventsAuth.push(r.headers()["authorization"] || "");
    });
    await page.goto(url);
    // Public view: status and charts, no tail or dead letters without the token.
    await page.waitForSelector("#last-updated:not(:text('never'))", { timeout: STEP_MS });
    seen.publicTailHidden = await page.locator("#tail-section").isHidden();
    seen.publicDeadHidden = await page.locator("#dead-section").isHidden();
    // The durable subscription the test created, with its lag.
    await page.waitForSelector("#durable-admin-console-lag", { timeout: STEP_MS });
    seen.durableName = await page.textContent("#durable-admin-console-name");
    seen.durableLag = await page.textContent("#durable-admin-console-lag");

    await page.fill("#admin-token", token);
    await page.click("#token-save");
    await page.waitForSelector("#tail-section", { state: "visible", timeout: STEP_MS });
    seen.tokenInStorage = await page.evaluate(() => sessionStorage.getItem("wsbridge.adminToken"));
    seen.tokenFieldAfter = await page.inputValue("#admin-token");

    // The tail, from the start of the journal.
    await page.fill("#tail-from", "earliest");
    await page.click("#tail-start");
    await page.waitForFunction(
      (n) => document.querySelectorAll("#tail tr.tail-row").length >= n,
      Number(events), { timeout: STEP_MS });
    seen.tailRows = await page.locator("#tail tr.tail-row").count();
    seen.tailProviders = await page.$$eval("#tail tr.tail-row td:nth-child(3)", (tds) => tds.map((t) => t.textContent));
    await page.locator("#tail tr.tail-row").first().click();
    seen.envelope = JSON.parse(await page.locator("#tail pre.envelope").first().textContent());
    await page.click("#tail-pause");
    seen.pausedState = await page.textContent("#tail-state");

    // Charts: points once the page has polled twice.
    await page.waitForFunction(
      () => Number(document.getElementById("chart-events").dataset.points) >= 2, null, { timeout: STEP_MS });
    seen.chartEventsPoints = Number(await page.getAttribute("#chart-events", "data-points"));
    seen.chartEventsSeries = await page.$$eval("#chart-events polyline", (ls) => ls.map((l) => l.dataset.series));
    seen.chartJournalPoints = Number(await page.getAttribute("#chart-journal", "data-points"));
    // Attempt latency: the page's /metrics samples around live deliveries.
    await page.waitForFunction(
      () => Number(document.getElementById("chart-latency").dataset.points) >= 1, null, { timeout: STEP_MS });
    seen.chartLatencySeries = await page.$$eval("#chart-latency polyline", (ls) => ls.map((l) => l.dataset.series));

    // The dead letter, replayed with its button.
    const replay = `#replay-${webhook}-${deadSeq}`;
    await page.waitForSelector(replay, { timeout: STEP_MS });
    seen.deadRowText = await page.textContent(`#dead-${webhook}`);
    if (screenshot) {
      // A few more seconds of live samples, so the screenshot's charts show lines.
      await page.waitForFunction(
        () => Number(document.getElementById("chart-events").dataset.points) >= 8 &&
              Number(document.getElementById("chart-latency").dataset.points) >= 3,
        null, { timeout: STEP_MS });
      await page.screenshot({ path: screenshot, fullPage: true });
    }
    await page.click(replay);
    await page.waitForSelector(replay, { state: "detached", timeout: STEP_MS });
    seen.replayed = true;
    // The endpoint a 410 disabled, re-enabled with its button.
    await page.click("#enable-gone");
    await page.waitForSelector("#enable-gone", { state: "detached", timeout: STEP_MS });
    seen.reenabled = true;
    process.stdout.write(JSON.stringify(seen) + "\n");
  } finally {
    await browser.close();
  }
})().catch((e) => {
  process.stderr.write(`console drive failed: ${e && e.stack || e}\n`);
  process.exit(1);
});
