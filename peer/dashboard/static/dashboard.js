// silomesh dashboard: actions call the control API's JSON routes; live state comes from SSE.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

function flash(message, kind) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = message;
  box.className = kind || "error";
  box.hidden = false;
}

async function api(method, url, body, contentType) {
  const headers = { "X-CSRF-Token": csrf };
  let payload = body;
  if (body !== undefined && contentType === undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  } else if (contentType) {
    headers["Content-Type"] = contentType;
  }
  const response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  }
  return data;
}

async function act(work, done) {
  try {
    await work();
    if (done) done(); else window.location.reload();
  } catch (e) {
    flash(e.message);
  }
}

function on(selector, event, handler) {
  document.querySelectorAll(selector).forEach((el) => el.addEventListener(event, handler));
}

// ---------------------------------------------------------------- actions

on("#logout", "click", () => act(() => api("POST", "/dashboard/logout"), () => { window.location.href = "/dashboard/"; }));

on("#save-selection", "click", () => {
  const ids = [...document.querySelectorAll(".select-neighbour:checked")].map((el) => el.value);
  act(() => api("PUT", "/api/neighbours/selection", { peer_ids: ids }));
});

on("button.rename", "click", (ev) => {
  const row = ev.target.closest("tr");
  const name = row.querySelector(".rename-input").value.trim();
  if (!name) { flash("Type the new name first."); return; }
  act(() => api("PATCH", `/api/models/${encodeURIComponent(ev.target.dataset.digest)}`, { name }));
});

on("button.delete", "click", (ev) => {
  const label = ev.target.dataset.label;
  if (!window.confirm(`Delete the weights of model ${label}? The record stays in the history.`)) return;
  act(() => api("DELETE", `/api/models/${encodeURIComponent(ev.target.dataset.digest)}`));
});

on("#import-form", "submit", (ev) => {
  ev.preventDefault();
  const file = document.getElementById("import-file").files[0];
  if (!file) { flash("Choose a .safetensors file."); return; }
  act(() => api("POST", `/api/models/import?filename=${encodeURIComponent(file.name)}`, file, "application/octet-stream"));
});

on("#dataset-form", "submit", (ev) => {
  ev.preventDefault();
  const path = document.getElementById("dataset-path").value.trim();
  act(() => api("POST", "/api/datasets", { path }));
});

on("button.decide", "click", (ev) => {
  const approve = ev.target.dataset.approve === "true";
  act(() => api("POST", `/api/approvals/${ev.target.dataset.id}`, { approve }));
});

on("#approve-study", "click", (ev) => {
  const digest = ev.target.dataset.digest;
  if (!window.confirm(`Approve study ${digest.slice(0, 12)}? This peer will train with its members.`)) return;
  act(() => api("POST", "/api/study/approve", { digest }));
});

on("#verify-log", "click", () => act(async () => {
  const box = document.getElementById("verify-result");
  box.hidden = false;
  box.className = "";
  box.textContent = "Verifying…";
  const report = await api("POST", "/api/audit/verify");
  box.className = report.ok ? "ok" : "error";
  box.textContent = "";
  const head = document.createElement("p");
  head.id = "verify-summary";
  head.textContent = report.summary;
  box.appendChild(head);
  if (report.findings.length) {
    const list = document.createElement("ul");
    for (const f of report.findings) {
      const li = document.createElement("li");
      li.textContent = (f.entry !== null ? `entry ${f.entry}: ` : "") + `${f.code}: ${f.message}`;
      list.appendChild(li);
    }
    box.appendChild(list);
  }
}, () => {}));

// ---------------------------------------------------------------- rounds chart

const roundsData = document.getElementById("rounds-data");
if (roundsData && window.Chart) {
  const rounds = JSON.parse(roundsData.textContent);
  const names = [...new Set(rounds.flatMap((r) => Object.keys(r.metrics || {})))].sort();
  const palette = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];
  new window.Chart(document.getElementById("metric-chart"), {
    type: "line",
    data: {
      labels: rounds.map((r) => r.round),
      datasets: names.map((name, i) => ({
        label: name,
        data: rounds.map((r) => (r.metrics && typeof r.metrics[name] === "number" ? r.metrics[name] : null)),
        borderColor: palette[i % palette.length],
        backgroundColor: palette[i % palette.length],
        spanGaps: true,
        tension: 0.2,
        yAxisID: name.includes("loss") ? "loss" : "score",
      })),
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {
        x: { title: { display: true, text: "round" } },
        score: { position: "left", title: { display: true, text: "local metric (test split)" } },
        loss: { position: "right", title: { display: true, text: "loss" }, grid: { drawOnChartArea: false } },
      },
    },
  });
}

// ---------------------------------------------------------------- live updates

// how a neighbour is reached, as the server renders it (pages.py, _link)
function linkText(n) {
  const reconnects = n.reconnects || 0;
  const tail = `${reconnects} reconnect${reconnects === 1 ? "" : "s"}`;
  if (!n.connected) return reconnects ? `— (${tail})` : "—";
  const parts = [n.connection || "direct"];
  if (typeof n.rtt_ms === "number") parts.push(`${n.rtt_ms.toFixed(1)} ms`);
  parts.push(tail);
  return parts.join(", ");
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function showState(state) {
  const s = state.status;
  const values = {
    round: s.round, phase: s.phase, health: s.health, samples: s.samples, model: s.model || "—",
    neighbours_connected: s.neighbours_connected, models_count: state.models.length,
  };
  document.querySelectorAll("[data-live]").forEach((el) => {
    const v = values[el.dataset.live];
    if (v !== undefined && el.textContent !== String(v)) el.textContent = String(v);
  });
  const tbody = document.getElementById("ov-neighbours");
  if (tbody) {
    tbody.replaceChildren(...state.neighbours.map((n) => {
      const tr = document.createElement("tr");
      tr.append(cell(n.name || ""), cell(n.peer_id.length > 16 ? n.peer_id.slice(0, 16) + "…" : n.peer_id),
        cell(n.connected ? "yes" : "no"), cell(n.selected ? "yes" : "no"),
        cell(n.samples === null || n.samples === undefined ? "—" : String(n.samples)), cell(String(n.refused || 0)),
        cell(linkText(n)));
      tr.cells[1].className = "mono";
      return tr;
    }));
  }
  const list = document.getElementById("ov-model-list");
  if (list) {
    list.replaceChildren(...state.models.slice(-5).reverse().map((m) => {
      const li = document.createElement("li");
      const digest = document.createElement("span");
      digest.className = "mono";
      digest.textContent = m.digest.slice(0, 12) + "…";
      li.append(digest, ` round ${m.round}`);
      if (m.name) { const b = document.createElement("b"); b.textContent = m.name; li.append(" · ", b); }
      return li;
    }));
  }
  document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
}

if (window.EventSource && document.getElementById("live-strip")) {
  const dot = document.getElementById("live-dot");
  const source = new EventSource("/dashboard/events");
  source.addEventListener("open", () => { dot.classList.add("on"); });
  source.addEventListener("error", () => { dot.classList.remove("on"); });
  source.addEventListener("state", (ev) => showState(JSON.parse(ev.data)));
}
