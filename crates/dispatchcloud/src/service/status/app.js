// The status page's only script: refresh the live part every 2 s, and turn the buttons into
// calls to the management API (the session cookie carries the token).
"use strict";
(function () {
  const live = document.getElementById("live");
  const flash = document.getElementById("flash");
  if (!live) return;
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch("/status/live", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401 || r.status === 403) { location.reload(); return; }
      if (r.ok) {
        live.innerHTML = await r.text();
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (e) {
      // The dispatcher may be restarting; try again at the next tick.
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, 2000);
  const paths = {
    hold: "/arvados/v1/dispatch/instances/hold",
    drain: "/arvados/v1/dispatch/instances/drain",
    run: "/arvados/v1/dispatch/instances/run",
    "kill-instance": "/arvados/v1/dispatch/instances/kill",
    "kill-container": "/arvados/v1/dispatch/containers/kill",
  };
  document.addEventListener("click", async function (ev) {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const action = b.dataset.action;
    const id = b.dataset.id;
    if (action.startsWith("kill") && !confirm("Really " + action.replace("-", " ") + " " + id + "?")) return;
    const body = new URLSearchParams();
    body.set(action === "kill-container" ? "container_uuid" : "instance_id", id);
    if (action.startsWith("kill")) body.set("reason", "status page");
    b.disabled = true;
    try {
      const r = await fetch(paths[action], { method: "POST", body: body, credentials: "same-origin" });
      flash.textContent = r.ok ? action + ": " + id : action + " failed: " + (await r.text());
      flash.className = r.ok ? "ok" : "bad";
    } catch (e) {
      flash.textContent = action + " failed: " + e;
      flash.className = "bad";
    }
    await refresh();
  });
})();
