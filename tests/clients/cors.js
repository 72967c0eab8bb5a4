// A web page of another origin calls the coordinator's OpenAI API from the
// browser, as a chat front end served elsewhere does: headless Chromium
// (playwright-core, /usr/bin/chromium) opens each PAGE_URL (a page of that
// origin), and from it POSTs a streamed chat completion to API_BASE with
// fetch() (a JSON body and, with API_KEY, a bearer header: the browser asks
// the API first with a CORS preflight). Prints, per page, the streamed text
// or the error the page got, and which of the dashboard's JSON and the
// metrics it could read (none: they stay same-origin), as JSON.
//
// usage: NODE_PATH=<node_modules> node cors.js API_BASE USER_DATA_DIR API_KEY QUESTION MAX_TOKENS PAGE_URL...
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [base, userDir, key, question, maxTokens, ...pages] = process.argv.slice(2);
  const ctx = await chromium.launchPersistentContext(userDir, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const results = [];
  try {
    const page = ctx.pages()[0] || (await ctx.newPage());
    for (const url of pages) {
      await page.goto(url, { waitUntil: "load", timeout: 30000 });
      const r = await page.evaluate(async ({ base, key, question, maxTokens }) => {
        const headers = { "content-type": "application/json" };
        if (key) headers.authorization = "Bearer " + key;
        try {
          const resp = await fetch(base + "/v1/chat/completions", {
            method: "POST",
            headers,
            body: JSON.stringify({
              model: "smollm2-135m-instruct",
              messages: [{ role: "user", content: question }],
              max_tokens: Number(maxTokens),
              stream: true,
            }),
          });
          const reader = resp.body.getReader();
          const dec = new TextDecoder();
          let buf = "", text = "";
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            buf += dec.decode(value, { stream: true });
            let i;
            while ((i = buf.indexOf("\n\n")) >= 0) {
              const ev = buf.slice(0, i);
              buf = buf.slice(i + 2);
              if (!ev.startsWith("data: ") || ev === "data: [DONE]") continue;
              const d = JSON.parse(ev.slice(6)).choices?.[0]?.delta;
              if (d && d.content) text += d.content;
            }
          }
          return { origin: location.origin, ok: true, status: resp.status, text, private: await privateReads() };
        } catch (e) {
          return { origin: location.origin, ok: false, error: String(e), private: await privateReads() };
        }
        // The dashboard's JSON and the metrics stay same-origin: which of
        // them this page could read.
        async function privateReads() {
          const readable = [];
          for (const path of ["/api/cluster", "/metrics"]) {
            try {
              await (await fetch(base + path)).text();
              readable.push(path);
            } catch (e) { /* refused by the browser */ }
          }
          return readable;
        }
      }, { base, key, question, maxTokens });
      results.push(r);
    }
    console.log(JSON.stringify(results));
  } finally {
    await ctx.close();
  }
}

main().catch((e) => { console.error((e && e.stack) || e); process.exit(1); });
