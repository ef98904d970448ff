// Drives Debian's Chromium through the status page of a running `simulate`
// (tests/status_page.rs starts it and runs this with STATUS_URL, STATUS_TOKEN, SCREENSHOT_DIR).
// Every wait is for an exact state on the page or in the management API, never for time.
// Prints one JSON line of what it saw; exits non-zero with the reason on any failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const base = process.env.STATUS_URL;
const token = process.env.STATUS_TOKEN;
const shots = process.env.SCREENSHOT_DIR;
if (!base || !token || !shots) {
  console.error("STATUS_URL, STATUS_TOKEN and SCREENSHOT_DIR must be set");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });
const LIMIT = 120_000;

function check(cond, what) {
  if (!cond) throw new Error(what);
}

async function api(path, init = {}) {
  const r = await fetch(base + path, {
    ...init,
    headers: { Authorization: "Bearer " + token, ...(init.headers || {}) },
  });
  check(r.ok, `${path}: HTTP ${r.status}`);
  return r.json();
}

async function apiInstance(id) {
  const list = await api("/arvados/v1/dispatch/instances");
  return list.items.find((i) => i.instance === id);
}

/// Poll `probe` until it returns a truthy value.
async function until(what, probe, limit = LIMIT) {
  const end = Date.now() + limit;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function login(page, t) {
  await page.goto(base + "/status");
  await page.fill("#token", t);
  await Promise.all([page.waitForLoadState("load"), page.click("button[type=submit]")]);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
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
let sampling = false;
const seen = { wrongToken: false, states: {}, held: null, drained: null, phoneOverflow: null };
try {
  // 1. Log in first and start watching containers go queued → running → done.
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  page.on("dialog", (d) => d.accept());
  await login(page, token);
  check(await page.isVisible("#live"), "logged in: the live view is shown");
  const cookies = await ctx.cookies();
  const c = cookies.find((c) => c.name === "arvados_api_token");
  check(c && c.httpOnly && c.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  const states = seen.states;
  // Every state each container is seen in, from now on, while the steps below run.
  async function sample() {
    const rows = await page.$$eval("tr[data-container]", (rs) =>
      rs.map((r) => [r.dataset.container, r.dataset.state]),
    );
    for (const [u, s] of rows) (states[u] ||= new Set()).add(s);
    const done = await page.$$eval("li[data-kind=complete], li[data-kind=cancelled]", (ls) =>
      ls.map((l) => l.dataset.subject),
    );
    for (const u of done) (states[u] ||= new Set()).add("done");
  }
  sampling = true;
  const sampler = (async () => {
    while (sampling) {
      await sample().catch(() => {});
      await new Promise((r) => setTimeout(r, 250));
    }
  })();
  const journeyDone = () =>
    Object.keys(states).find((u) => {
      const s = states[u];
      return (s.has("Queued") || s.has("Locked")) && s.has("Running") && s.has("done");
    });

  // 2. No token, no data; a wrong token, no data (another browser).
  const anon = await browser.newContext();
  const a = await anon.newPage();
  await a.goto(base + "/status");
  check(await a.isVisible("#token"), "the login form is shown without a token");
  check((await a.$("#live")) === null, "no data without a token");
  const live = await a.request.get(base + "/status/live");
  check(live.status() === 401, `/status/live without a token: ${live.status()}`);
  await login(a, "not-the-token");
  check(
    (await a.textContent("#login-message")).includes("not the management token"),
    "a wrong token is refused",
  );
  const html = await a.content();
  check(!html.includes("dz642") && (await a.$("#live")) === null, "a wrong token sees no data");
  const apiWrong = await a.request.get(base + "/arvados/v1/dispatch/containers");
  check(apiWrong.status() === 401, `API without the cookie: ${apiWrong.status()}`);
  seen.wrongToken = true;
  await anon.close();

  // 3. Hold a busy instance with its button, see it in the API, release it with Run. An
  // instance can end between being seen and being clicked (its container ended): then the
  // button reports the 404 and the next instance is tried.
  async function press(action, state, behavior) {
    for (let attempt = 0; attempt < 10; attempt++) {
      const id = await until(`an instance ${state}/${behavior}`, () =>
        page
          .$eval(
            `tr[data-instance][data-state=${state}][data-idle-behavior=${behavior}]`,
            (r) => r.dataset.instance,
          )
          .catch(() => null),
      );
      const button = `tr[data-instance="${id}"] button[data-action=${action}]`;
      try {
        await page.click(button, { timeout: 3000 });
      } catch {
        continue; // the row was refreshed away
      }
      const flash = await until("the button's answer", () =>
        page.textContent("#flash").then((t) => (t.startsWith(action) ? t : null)),
      );
      await page.evaluate(() => (document.getElementById("flash").textContent = ""));
      if (flash === `${action}: ${id}`) return id;
    }
    throw new Error(`${action}: no instance took it in 10 tries`);
  }
  const held = await press("hold", "running", "run");
  check((await apiInstance(held))?.idle_behavior === "hold", "the API shows the held instance");
  await page.waitForSelector(`tr[data-instance="${held}"][data-idle-behavior=hold]`);
  seen.held = held;
  await page.screenshot({ path: join(shots, "status.png") });
  await page.screenshot({ path: join(shots, "status-full.png"), fullPage: true });
  await page.click(`tr[data-instance="${held}"] button[data-action=run]`);
  await until("run's answer", () =>
    page.textContent("#flash").then((t) => t === `run: ${held}`),
  );
  const released = await apiInstance(held);
  check(
    released === undefined || released.idle_behavior === "run",
    `Run releases the hold: ${JSON.stringify(released)}`,
  );

  // 4. Drain a busy instance: it stays until its containers end.
  const busy = await press("drain", "running", "run");
  const drained = await apiInstance(busy);
  check(
    drained === undefined || drained.idle_behavior === "drain",
    `the API shows the drained instance: ${JSON.stringify(drained)}`,
  );
  seen.drained = busy;

  // The container journey, seen while the buttons were pressed (or seen now).
  seen.journey = await until("a container seen queued or locked, then running, then done", async () =>
    journeyDone(),
  );
  sampling = false;
  await sampler;

  // 5. A phone-width screen: the page itself does not scroll sideways.
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true });
  const p = await phone.newPage();
  await login(p, token);
  check(await p.isVisible("#live"), "the phone logs in too");
  const overflow = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  seen.phoneOverflow = overflow;
  check(overflow <= 1, `the page is ${overflow}px wider than a phone screen`);
  await p.screenshot({ path: join(shots, "status-phone.png") });

  // 6. Log out: the form again, and the cookie is gone.
  await Promise.all([page.waitForLoadState("load"), page.click("header form button")]);
  check(await page.isVisible("#token"), "logged out: the login form again");
  check(!(await ctx.cookies()).some((c) => c.name === "arvados_api_token" && c.value), "cookie cleared");

  const out = { ...seen, states: undefined, containersSeen: Object.keys(states).length };
  console.log(JSON.stringify(out));
} catch (e) {
  console.error("status page test failed: " + (e && e.stack ? e.stack : e));
  process.exitCode = 1;
} finally {
  sampling = false;
  await browser.close();
}
