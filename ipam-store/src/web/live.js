// Cairn IPAM web view: live updates. Listens to /api/v1/events (server-sent events of the
// ledger's durable commits) and, without reloading the page,
//  - puts each new or changed allocation's row (rendered and escaped by the server) at the top
//    of the table when it matches the table's filters, and strikes released ones through;
//  - refreshes the usage bars from /api/v1/networks.
// A `resync` event (this page fell behind the ledger) reloads the page.
"use strict";
(() => {
  const live = document.getElementById("live");
  const table = document.querySelector("table[data-live]");
  const fields = ["network", "pool", "cluster", "kind", "namespace", "name"];
  const cap = (s) => s[0].toUpperCase() + s.slice(1);

  const matches = (a) => {
    const f = table.dataset;
    const o = { network: a.network, pool: a.pool, cluster: a.owner.cluster, kind: a.owner.kind,
                namespace: a.owner.namespace, name: a.owner.name };
    for (const k of fields) {
      const want = f["filter" + cap(k)];
      if (want && want !== o[k]) return false;
    }
    return !f.filterAddress || a.addresses.includes(f.filterAddress);
  };

  const apply = (c) => {
    if (!table || !matches(c.allocation)) return;
    const body = table.tBodies[0];
    const old = [...body.rows].find((r) => r.dataset.key === c.allocation.key);
    if (c.type === "DELETED") {
      if (old) {
        old.classList.add("gone");
        old.querySelector("td.state").textContent = "released";
      }
      return;
    }
    const tmp = document.createElement("tbody");
    tmp.innerHTML = c.row; // server-rendered, every value escaped
    const row = tmp.firstElementChild;
    row.classList.add("fresh");
    if (old) old.replaceWith(row); else body.prepend(row);
    const none = document.getElementById("no-rows");
    if (none) none.remove();
  };

  let pending = null;
  const refreshUsage = () => {
    if (pending || !document.querySelector("[data-usage]")) return;
    pending = setTimeout(async () => {
      pending = null;
      const r = await fetch("/api/v1/networks", { headers: { Accept: "application/json" } });
      if (!r.ok) return;
      const { networks } = await r.json();
      for (const n of networks) for (const p of n.pools) for (const u of p.usage) {
        const el = document.querySelector(`[data-usage="${CSS.escape(n.name + "/" + p.name + "/" + u.family)}"]`);
        if (!el) continue;
        el.querySelector("rect.used").setAttribute("width", u.used_percent);
        const g = el.querySelector("rect.grace");
        g.setAttribute("x", u.used_percent);
        g.setAttribute("width", u.grace_percent);
        el.querySelector(".used-n").textContent = u.used;
        el.querySelector(".total-n").textContent = u.total;
        el.querySelector(".pct").textContent = u.used_percent;
        el.querySelector(".grace-n").textContent = u.in_grace;
        el.querySelector(".free-n").textContent = u.free;
      }
    }, 300);
  };

  const src = new EventSource("/api/v1/events");
  src.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
  src.onerror = () => { live.textContent = "reconnecting…"; live.classList.remove("on"); };
  src.addEventListener("change", (e) => {
    apply(JSON.parse(e.data));
    refreshUsage();
  });
  src.addEventListener("resync", () => location.reload());
})();
