// Loads the coordinator's dashboard in headless Chromium (playwright-core
// drives /usr/bin/chromium; no browser is downloaded), waits for the worker
// rows and the layer bar, asks a question in the chat box and waits for the
// streamed answer, saves a screenshot and prints what the page shows as JSON.
// With DASHBOARD_API_KEY set, it first asks with the API key field empty
// (the page's 401 message is reported), then types the key, reloads the
// page (the key is kept in localStorage) and asks again.
//
// usage: [DASHBOARD_API_KEY=…] NODE_PATH=<node_modules> node dashboard.js BASE_URL SCREENSHOT USER_DATA_DIR WORKERS QUESTION MAX_TOKENS
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [base, shot, userDir, workers, question, maxTokens] = process.argv.slice(2);
  const ctx = await chromium.launchPersistentContext(userDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1400, height: 860 },
  });
  try {
    const page = ctx.pages()[0] || (await ctx.newPage());
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    await page.goto(base + "/", { waitUntil: "load", timeout: 30000 });
    // Every worker listed with its shard ready, every layer served.
    const allReady = () => page.waitForFunction((n) => {
      const rows = document.querySelectorAll("#workers tr.worker");
      const layers = [...document.querySelectorAll("#layers .layer")];
      return rows.length === n && [...rows].every((r) => r.querySelector(".state-ready")) &&
        layers.length > 0 && layers.every((l) => l.dataset.replicas !== "0");
    }, Number(workers), { timeout: 30000 });
    await allReady();
    const apiKey = process.env.DASHBOARD_API_KEY;
    let unauthorized = null, keyAfterReload = null, errorsBeforeReload = null;
    if (apiKey !== undefined) {
      await page.fill("#api-key", "");
      await page.fill("#chat-input", question);
      await page.click("#chat-send");
      await page.waitForSelector('#chat-log .msg[data-done="true"]', { timeout: 60000 });
      unauthorized = await page.evaluate(() => {
        const m = document.querySelector("#chat-log .msg.assistant, #chat-log .msg.error");
        return { text: m.textContent, class: m.className, status: m.dataset.status || null };
      });
      await page.fill("#api-key", apiKey);
      errorsBeforeReload = errors.splice(0);
      await page.reload({ waitUntil: "load", timeout: 30000 });
      await allReady();
      keyAfterReload = await page.inputValue("#api-key");
    }
    await page.fill("#max-tokens", maxTokens);
    await page.fill("#chat-input", question);
    await page.click("#chat-send");
    await page.waitForSelector('#chat-log .msg.assistant[data-done="true"], #chat-log .msg.error', { timeout: 120000 });
    // A poll after the answer ended: nothing in flight, its tokens counted
    // in the coordinator's metrics (the page polls every few seconds).
    await page.waitForFunction(() => document.getElementById("in-flight").textContent === "0" &&
      Number(document.getElementById("tokens-total").textContent) > 0,
      null, { timeout: 20000 }).catch(() => {});
    const facts = await page.evaluate(() => {
      const text = (id) => document.getElementById(id).textContent;
      const answer = document.querySelector("#chat-log .msg.assistant, #chat-log .msg.error");
      return {
        title: document.title,
        ready: text("ready"),
        models: text("models"),
        workers: [...document.querySelectorAll("#workers tr.worker")].map((r) => ({
          peer: r.dataset.peer, addr: r.dataset.addr, cells: [...r.cells].map((c) => c.textContent),
        })),
        layers: [...document.querySelectorAll("#layers .layer")].map((l) => ({
          replicas: Number(l.dataset.replicas),
          workers: [...l.querySelectorAll(".replica")].map((x) => Number(x.dataset.worker)),
          colors: [...l.querySelectorAll(".replica")].map((x) => getComputedStyle(x).backgroundColor),
        })),
        legend: text("legend"),
        downloads: text("no-downloads"),
        answer: answer ? answer.textContent : null,
        answer_class: answer ? answer.className : null,
        chat_status: text("chat-status"),
        in_flight: text("in-flight"),
        tokens_total: text("tokens-total"),
        tokens_per_second: text("tokens-per-second"),
      };
    });
    if (apiKey !== undefined) Object.assign(facts, { unauthorized, key_after_reload: keyAfterReload, errors_before_reload: errorsBeforeReload });
    await page.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify({ ...facts, errors }));
  } finally {
    await ctx.close();
  }
}

main().catch((e) => { console.error((e && e.stack) || e); process.exit(1); });
