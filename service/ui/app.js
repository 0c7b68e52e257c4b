// forkrl's dashboard: a single page over the control plane's REST API and its server-sent events.
// Every string a user or a job chose (names, owners, messages, config, token text, prompts, logs) is put
// on the page as text, never as HTML (h() appends strings as text nodes), and where it sits beside other
// text it is isolated (iso): its bidi controls cannot turn the text around it.
"use strict";

const TOKEN_KEY = "forkrl.token";
const STATES = ["QUEUED", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const MAX_POINTS = 600; // a curve with more steps is averaged in buckets down to this many points
const main = document.getElementById("main");
const conn = document.getElementById("conn");
let cleanup = []; // what the current view stops when the page moves on (timers, streams)

// ---- small helpers ------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

const fmt = (v, d = 3) => (typeof v === "number" && isFinite(v) ? +v.toFixed(d) : "–");
const when = (s) => (s ? new Date(s).toLocaleString() : "–");
const stateBadge = (s) => h("span", { class: `state ${s}`, "data-state": s }, s);
const jobUrl = (id, rest = "") => `/v1/jobs/${encodeURIComponent(id)}${rest}`; // an id from the address bar stays one segment

const CLOSER = { "\u202a": "\u202c", "\u202b": "\u202c", "\u202d": "\u202c", "\u202e": "\u202c",
  "\u2066": "\u2069", "\u2067": "\u2069", "\u2068": "\u2069" }; // LRE RLE LRO RLO -> PDF; LRI RLI FSI -> PDI

// A string's bidi controls, balanced: a closer it did not open is dropped (a PDI would end the isolate
// around it, and an override after it would turn what follows) and each opener it leaves open is closed.
function balanced(s) {
  s = String(s ?? "");
  if (!/[\u202a-\u202e\u2066-\u2069]/.test(s)) return s;
  const open = [];
  let out = "";
  for (const c of s) {
    if (CLOSER[c]) open.push(CLOSER[c]);
    else if (c === "\u2069") { const i = open.lastIndexOf(c); if (i < 0) continue; open.length = i; }
    else if (c === "\u202c") { if (open.at(-1) !== c) continue; open.pop(); }
    out += c;
  }
  return out + open.reverse().join("");
}
const iso = (s) => h("bdi", {}, balanced(s)); // a user string beside other text
// plotly.js reads trace names and titles as its own HTML (<a href>, <b>, <span style>): text goes in
// with <, > and & as the entities it turns back into characters
const plotText = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

function setConn(text, down = false) {
  conn.textContent = text;
  conn.classList.toggle("down", down);
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

async function api(path, opts = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Authorization: `Bearer ${token}`, ...(opts.headers || {}) };
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts = { ...opts, body: JSON.stringify(opts.json) };
  }
  const r = await fetch(path, { ...opts, headers });
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    signIn("The service no longer accepts this token (revoked or expired). Sign in again.");
    throw new ApiError(401, "unauthorized");
  }
  if (r.status === 204) return null;
  const ct = r.headers.get("content-type") || "";
  const body = ct.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, body && body.message ? body.message : body && body.detail ? body.detail : body);
  return body;
}

function confirmDialog(parts, yes) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-text").replaceChildren(...parts);
  document.getElementById("confirm-yes").textContent = yes;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "yes"), { once: true });
    dlg.showModal();
  });
}

// Server-sent events over fetch (EventSource cannot send the bearer token): calls onEvent(kind, data,
// id) for each event, and resolves when the stream ends or breaks.
async function readEvents(path, onEvent, signal) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, signal });
  if (r.status === 401) throw new ApiError(401, "unauthorized");
  if (!r.ok || !r.body) throw new ApiError(r.status, "event stream refused");
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let kind = "message", id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
        else if (line.startsWith("id:")) id = line.slice(3).trim();
      }
      if (data.length) onEvent(kind, JSON.parse(data.join("\n")), id);
    }
  }
}

// numbers only, as GET .../metrics?view=scalars gives them
function scalars(rec) {
  const out = {};
  for (const [k, v] of Object.entries(rec)) if (v === null || typeof v === "number") out[k] = v;
  if (Array.isArray(rec.samples) && rec.samples.length) out["samples/n"] = rec.samples.length;
  return out;
}

// ---- charts -------------------------------------------------------------------------------------

function series(records, key) {
  let xs = [], ys = [];
  for (const r of records) if (typeof r[key] === "number") { xs.push(r.step); ys.push(r[key]); }
  if (xs.length > MAX_POINTS) { // bucket means: the page stays fast for runs of thousands of steps
    const size = Math.ceil(xs.length / MAX_POINTS), bx = [], by = [];
    for (let i = 0; i < xs.length; i += size) {
      const n = Math.min(size, xs.length - i);
      bx.push(xs.slice(i, i + n).reduce((a, b) => a + b, 0) / n);
      by.push(ys.slice(i, i + n).reduce((a, b) => a + b, 0) / n);
    }
    xs = bx; ys = by;
  }
  return { xs, ys };
}

const LAYOUT = {
  margin: { l: 48, r: 12, t: 30, b: 34 }, height: 258, font: { size: 11 },
  legend: { orientation: "h", y: -0.14 }, xaxis: { hoverformat: "d" }, hovermode: "x unified", paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  hoverlabel: { namelength: -1 }, // whole names: two runs differ after the first 15 characters
};
const PLOT_OPTS = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

function lineChart(el, title, traces) {
  const data = traces.map((t) => ({ x: t.xs, y: t.ys, name: plotText(t.name), type: "scatter", mode: t.xs.length > 60 ? "lines" : "lines+markers" }));
  el.dataset.points = String(traces.reduce((a, t) => a + t.xs.length, 0));
  el.dataset.traces = String(traces.filter((t) => t.xs.length).length);
  window.Plotly.react(el, data, { ...LAYOUT, title: { text: plotText(title), font: { size: 13 } } }, PLOT_OPTS);
}

const PHASES = ["generate", "verify", "learn", "weight_sync", "checkpoint"];

function timeChart(el, records) {
  const traces = PHASES.map((p) => ({ ...series(records, `timing/${p}`), name: p.replace("_", " ") }));
  // what the named phases leave of the step: sampling, advantages, evaluation, logging
  const other = records.filter((r) => typeof r["timing/step"] === "number").map((r) => ({
    step: r.step, v: Math.max(0, r["timing/step"] - PHASES.reduce((a, p) => a + (r[`timing/${p}`] || 0), 0)),
  }));
  traces.push({ ...series(other.map((o) => ({ step: o.step, x: o.v })), "x"), name: "other" });
  const data = traces.map((t) => ({ x: t.xs, y: t.ys, name: plotText(t.name), type: "bar" }));
  // asynchronous mode: the bars are the learner's time (generate = waiting for groups); the line is the engines'
  // seconds generating in the same step - where it rises above the generate bar, generation overlapped learning
  const busy = series(records, "timing/engine_busy");
  if (busy.xs.length) {
    traces.push(busy);
    data.push({ x: busy.xs, y: busy.ys, name: "engines generating (async)", type: "scatter", mode: "lines+markers" });
  }
  el.dataset.traces = String(traces.filter((t) => t.xs.length).length);
  el.dataset.points = String(traces.reduce((a, t) => a + t.xs.length, 0));
  window.Plotly.react(el, data, { ...LAYOUT, barmode: "stack", title: { text: "Step time (s)", font: { size: 13 } } },
    PLOT_OPTS);
}

const CURVES = [
  ["reward", "Reward", [["reward/mean", "train (all completions)"], ["eval/reward_mean", "held-out eval (greedy)"]]],
  ["entropy", "Entropy", [["entropy/mean", "mean"], ["entropy/p80", "p80"], ["entropy/threshold", "threshold τ"],
    ["entropy/kept_mean", "kept tokens' mean"], ["entropy/dropped_mean", "dropped tokens' mean"]]],
  ["shares", "Token shares", [["entropy/kept_frac", "kept by the filter"], ["entropy/frac_below_0.01", "entropy < 0.01"]]],
  ["length", "Response length (tokens)", [["response/length_mean", "mean"]]],
  ["clip", "Clipped shares (of kept tokens)", [["actor/clipfrac_high", "clipped above 1 + ε_high"], ["actor/clipfrac_low", "clipped below 1 − ε_low"], ["actor/dual_clipfrac", "dual-clipped"],
    ["cov/selected_frac", "Clip-Cov / KL-Cov tokens"], ["mismatch/limited_frac", "mismatch weight capped"]]],
  ["cov", "Log-prob × advantage covariance (kept tokens)", [["cov/p01", "p01"], ["cov/p50", "median"],
    ["cov/p99", "p99"], ["cov/max", "max"]]],
  ["mismatch", "Engine / learner mismatch", [["mismatch/weight_mean", "importance weight (mean)"],
    ["rollout/logprob_abs_diff", "|log-prob gap| per token"]]],
  ["kl", "KL", [["actor/approx_kl_old", "to the rollout policy"], ["actor/kl_ref", "to the reference"]]],
  ["gradnorm", "Grad norm", [["actor/grad_norm", "grad norm"]]],
];

// ---- sign-in ------------------------------------------------------------------------------------

function signIn(message) {
  stopView();
  document.getElementById("signout").hidden = true;
  setConn("");
  const err = h("p", { class: "error", role: "alert", id: "signin-error" }, message || "");
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, "aria-describedby": "signin-help" });
  const form = h("form", { class: "card signin", "aria-label": "Sign in" },
    h("h1", {}, "Sign in to forkrl"),
    h("label", { for: "token" }, "Access token"), input,
    h("p", { class: "muted small", id: "signin-help" },
      "A token from `forkrl token create` or your operator. It is kept in this browser tab's session only."),
    h("button", { class: "primary", type: "submit" }, "Sign in"), err);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    const r = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${input.value.trim()}` } });
    if (r.ok) {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
      route();
    } else {
      const body = await r.json().catch(() => ({}));
      err.replaceChildren(`Sign-in refused (${r.status}): `, iso(body.detail || r.statusText));
    }
  });
  main.replaceChildren(form);
  input.focus();
}

// ---- jobs list ----------------------------------------------------------------------------------

const YAML_TEMPLATE = `# A JobConfig, as \`forkrl submit\` reads it (see examples/ in the repository)
name: my-job
model: {path: smollm2-135m-instruct}
data:
  source: {type: builtin, task: arithmetic}
  prompts_per_step: 8
rollout: {group_size: 8, max_new_tokens: 64}
reward:
  verifiers: [{type: numeric}]
algorithm: {top_entropy_quantile: 0.2}
trainer: {steps: 20}
`;

function jobsView() {
  const filter = h("select", { id: "state-filter", "aria-label": "Filter by state" },
    h("option", { value: "" }, "all states"), ...STATES.map((s) => h("option", { value: s }, s)));
  filter.value = sessionStorage.getItem("forkrl.filter") || "";
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const tbody = h("tbody");
  const table = h("table", { "aria-label": "Jobs" },
    h("thead", {}, h("tr", {}, h("th", {}, h("span", { class: "sr" }, "Pick")), h("th", {}, "Name"), h("th", {}, "Id"),
      h("th", {}, "Owner"), h("th", {}, "State"), h("th", {}, "Steps"), h("th", {}, "Created"), h("th", {}, "Actions"))),
    tbody);
  const status = h("p", { class: "muted small", role: "status" });
  const picked = new Set();
  compare.addEventListener("click", () => { location.hash = `#/compare/${[...picked].join(",")}`; });

  async function refresh() {
    try {
      const q = filter.value ? `&state=${filter.value}` : "";
      const { jobs } = await api(`/v1/jobs?limit=200${q}`);
      tbody.replaceChildren(...jobs.map(jobRow));
      status.textContent = jobs.length ? `${jobs.length} job(s), updated ${new Date().toLocaleTimeString()}` : "No jobs yet.";
      setConn("Live");
    } catch (e) {
      if (e.status !== 401) setConn("Service unreachable, retrying…", true);
    }
  }

  function jobRow(j) {
    const box = h("input", { type: "checkbox", "aria-label": `Pick ${j.name} (${j.id}) to compare`, checked: picked.has(j.id) });
    box.addEventListener("change", () => {
      box.checked ? picked.add(j.id) : picked.delete(j.id);
      compare.disabled = picked.size < 2;
    });
    return h("tr", { "data-job": j.id },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, iso(j.name))),
      h("td", { class: "small" }, j.id), h("td", {}, j.owner), h("td", {}, stateBadge(j.state)),
      h("td", {}, `${j.last_step} / ${j.total_steps}`), h("td", { class: "small" }, when(j.created_at)),
      h("td", {}, actionButtons(j, refresh)));
  }

  filter.addEventListener("change", () => { sessionStorage.setItem("forkrl.filter", filter.value); refresh(); });
  main.replaceChildren(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" }, h("label", { for: "state-filter" }, "State"), filter, compare), status,
    h("section", { class: "card" }, table),
    submitForm(refresh));
  refresh();
  const timer = setInterval(refresh, 3000);
  cleanup.push(() => clearInterval(timer));
}

function actionButtons(j, after) {
  const out = [];
  if (!TERMINAL.has(j.state)) {
    out.push(h("button", { type: "button", class: "danger", "aria-label": `Cancel ${j.name} (${j.id})`, onclick: async () => {
      if (await confirmDialog(["Cancel job ", iso(j.name), ` (${j.id})? It stops at once; checkpoints stay.`], "Cancel job")) {
        await api(jobUrl(j.id, "/cancel"), { method: "POST" }).catch((e) => alertError(e));
        after();
      }
    } }, "Cancel"));
  } else {
    out.push(h("button", { type: "button", class: "danger", "aria-label": `Delete ${j.name} (${j.id})`, onclick: async () => {
      if (await confirmDialog(["Delete job ", iso(j.name), ` (${j.id}) and its stored metrics? The run directory stays.`], "Delete")) {
        await api(jobUrl(j.id), { method: "DELETE" }).catch((e) => alertError(e));
        after();
      }
    } }, "Delete"));
  }
  return out;
}

function alertError(e) {
  const p = h("p", { class: "error", role: "alert" }, "Refused: ", iso(e.message));
  main.prepend(p);
  setTimeout(() => p.remove(), 8000);
}

// The YAML submit form: checked by POST /v1/configs/validate; each error is shown under its line.
function submitForm(after) {
  const text = h("textarea", { id: "config-yaml", rows: 14, spellcheck: "false" });
  text.value = sessionStorage.getItem("forkrl.draft") || YAML_TEMPLATE;
  text.addEventListener("input", () => sessionStorage.setItem("forkrl.draft", text.value));
  const out = h("div", { id: "config-check", "aria-live": "polite" });

  function showErrors(errors) {
    const byLine = new Map();
    const loose = [];
    for (const e of errors) {
      const msg = [iso(e.field), ...(e.input ? [" = ", iso(e.input)] : []), ": ", iso(e.msg)];
      if (e.line) byLine.set(e.line, [...(byLine.get(e.line) || []), msg]);
      else loose.push(msg);
    }
    const lines = text.value.split("\n");
    const view = h("div", { class: "yaml-errors", role: "group", "aria-label": "Config errors beside their lines" });
    lines.forEach((l, i) => {
      const msgs = byLine.get(i + 1);
      view.append(h("div", { class: `ln${msgs ? " bad" : ""}` }, h("span", { class: "no" }, i + 1), iso(l || " ")));
      for (const m of msgs || []) view.append(h("div", { class: "msg field-error", "data-line": i + 1 }, "↑ ", m));
    });
    out.replaceChildren(
      h("p", { class: "error", role: "alert" }, `${errors.length} problem(s) in the config:`),
      ...loose.map((m) => h("p", { class: "error field-error" }, ...m)), view);
  }

  async function check() {
    const res = await api("/v1/configs/validate", { method: "POST", json: { yaml: text.value } });
    if (!res.valid) showErrors(res.errors);
    else out.replaceChildren(h("p", { class: "muted" }, "The config is valid."));
    return res;
  }

  const form = h("form", { class: "card", "aria-label": "Submit a job" },
    h("h2", {}, "Submit a job"),
    h("label", { for: "config-yaml" }, "Job config (YAML)"), text,
    h("div", { class: "toolbar" },
      h("button", { type: "button", id: "check-config", onclick: () => check().catch(alertError) }, "Check"),
      h("button", { type: "submit", class: "primary", id: "submit-config" }, "Submit")),
    out);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const res = await check();
      if (!res.valid) return;
      const job = await api("/v1/jobs", { method: "POST", json: res.config });
      sessionStorage.removeItem("forkrl.draft");
      out.replaceChildren(h("p", {}, "Submitted ", h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id), "."));
      after();
    } catch (err) {
      if (err.status !== 401) alertError(err);
    }
  });
  return form;
}

// ---- one job ------------------------------------------------------------------------------------

function jobView(id) {
  const records = []; // scalars per step, in step order
  const byStep = new Map();
  const seenEvents = new Set();
  const head = h("div");
  const timeline = h("ol", { class: "timeline", "aria-label": "State timeline" });
  const charts = Object.fromEntries(CURVES.map(([key]) => [key, h("div", { class: "chart", id: `chart-${key}`, role: "img", "aria-label": key })]));
  const timeEl = h("div", { class: "chart", id: "chart-time", role: "img", "aria-label": "step time breakdown" });
  const forking = h("section", { class: "card", id: "forking", "aria-label": "Forking tokens" });
  const stepPick = h("select", { id: "sample-step", "aria-label": "Step to show" });
  const checkpoints = h("tbody");
  const config = h("pre", { id: "config", "aria-label": "Config" });
  const logs = h("pre", { id: "logs", "aria-label": "Log tail" }, "…");
  let job = null, drawPending = false, abort = null, stopped = false;

  function renderHead() {
    head.replaceChildren(
      h("h1", {}, iso(job.name), " ", stateBadge(job.state)),
      h("div", { class: "toolbar" },
        h("span", { class: "muted" }, `${job.id} · owner `, iso(job.owner), " · step ", h("b", { id: "last-step" }, job.last_step),
          ` of ${job.total_steps} · created ${when(job.created_at)} · `, h("span", { id: "job-params" }, job.training),
          job.demand ? h("span", { id: "job-demand", title: job.demand.summary }, ` · needs ${job.demand.cpus} CPUs, ${job.demand.gpus} GPUs`) : "",
          job.queue_position ? h("span", { id: "job-queue" }, ` · queue position ${job.queue_position}, priority ${job.priority}`) : ""),
        ...actionButtons(job, () => (TERMINAL.has(job.state) && !job.cancel_requested ? (location.hash = "#/jobs") : reload()))),
      job.message ? h("p", { class: job.state === "FAILED" ? "error" : "muted", id: "job-message" }, job.message) : "");
  }

  async function reload() {
    job = await api(jobUrl(id));
    renderHead();
    const ck = await api(jobUrl(id, "/checkpoints"));
    checkpoints.replaceChildren(...ck.checkpoints.map((c) => h("tr", {}, h("td", {}, c.step), h("td", { class: "small" }, c.path), h("td", { class: "small" }, when(c.created_at)))));
  }

  function add(rec) {
    if (byStep.has(rec.step)) return;
    byStep.set(rec.step, rec);
    records.push(rec);
    records.sort((a, b) => a.step - b.step);
  }

  function draw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      for (const [key, title, keys] of CURVES) lineChart(charts[key], title, keys.map(([k, name]) => ({ ...series(records, k), name })));
      timeChart(timeEl, records);
      const steps = records.filter((r) => r["samples/n"]).map((r) => r.step);
      const chosen = stepPick.value;
      stepPick.replaceChildren(...steps.map((s) => h("option", { value: s }, `step ${s}`)));
      if (steps.length && !chosen) { stepPick.value = String(steps[steps.length - 1]); showSamples(); }
      else if (chosen) stepPick.value = chosen;
      if (job) { const ls = document.getElementById("last-step"); if (ls && records.length) ls.textContent = records[records.length - 1].step; }
    });
  }

  async function showSamples() {
    if (!stepPick.value) return;
    const step = Number(stepPick.value);
    const s = await api(jobUrl(id, `/samples?step=${step}`));
    forking.replaceChildren(...forkingView(s, byStep.get(step) || {}, stepPick));
  }
  stepPick.addEventListener("change", () => showSamples().catch(alertError));

  async function tailLogs() {
    try { logs.textContent = await api(jobUrl(id, "/logs?lines=200")); logs.scrollTop = logs.scrollHeight; }
    catch (e) { logs.textContent = `(no log: ${e.message})`; }
  }

  async function follow() {
    // live: state changes and new steps; after a break (the service restarted, the network dropped)
    // it reconnects from the last step it has
    let delay = 1000;
    while (!stopped) {
      abort = new AbortController();
      try {
        let ended = null;
        const after = records.length ? records[records.length - 1].step : -1; // -1: step 0 (the evaluation before training) too
        setConn("Live");
        await readEvents(jobUrl(id, `/events?after_step=${after}`), (kind, data, eid) => {
          delay = 1000;
          if (kind === "state" && !seenEvents.has(eid)) {
            seenEvents.add(eid);
            timeline.append(h("li", { "data-state": data.state }, stateBadge(data.state), ` ${when(data.at)}`, data.message ? [" · ", iso(data.message)] : ""));
            if (job && job.state !== data.state) reload().catch(() => {});
          } else if (kind === "metrics") { add(scalars(data)); draw(); }
          else if (kind === "end") ended = data;
        }, abort.signal);
        if (ended && ended.state) { setConn(`Finished: ${ended.state}`); await reload(); await tailLogs(); return; }
        if (ended && ended.reason === "deleted") { setConn("Deleted"); return; }
      } catch (e) {
        if (stopped || e.name === "AbortError") return;
        if (e.status === 401) { signIn("The service no longer accepts this token. Sign in again."); return; }
      }
      setConn("Disconnected, reconnecting…", true);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }

  main.replaceChildren(
    head,
    h("h2", {}, "State timeline"), timeline,
    h("h2", {}, "Curves"),
    h("div", { class: "grid" }, ...Object.values(charts), timeEl),
    h("h2", {}, "Forking tokens"),
    h("div", { class: "toolbar" }, h("label", { for: "sample-step" }, "Step"), stepPick,
      h("span", { class: "muted small" }, "Sampled completions of the step: each token shaded by its entropy; the tokens the filter kept are boxed.")),
    forking,
    h("div", { class: "cols" },
      h("section", { class: "card" }, h("h2", {}, "Checkpoints"),
        h("table", { "aria-label": "Checkpoints" }, h("thead", {}, h("tr", {}, h("th", {}, "Step"), h("th", {}, "Path"), h("th", {}, "Saved"))), checkpoints)),
      h("section", { class: "card" }, h("h2", {}, "Log tail ", h("button", { type: "button", onclick: tailLogs }, "Refresh")), logs)),
    h("section", { class: "card" }, h("h2", {}, "Config"), config));

  (async () => {
    try {
      await reload();
      config.textContent = JSON.stringify(job.config, null, 2);
      const m = await api(jobUrl(id, "/metrics?view=scalars&limit=10000"));
      m.metrics.forEach(add);
      draw();
      tailLogs();
      const timer = setInterval(() => { if (job && !TERMINAL.has(job.state)) tailLogs(); }, 10000);
      cleanup.push(() => clearInterval(timer));
      follow();
    } catch (e) {
      if (e.status !== 401) main.replaceChildren(h("p", { class: "error", role: "alert" }, "Cannot show ", iso(id), ": ", iso(e.message)));
    }
  })();
  cleanup.push(() => { stopped = true; if (abort) abort.abort(); });
}

// Runs of consecutive model tokens (obs false) and observation tokens (obs true): [{obs, items: [index]}]
function segments(tokens, observation) {
  const out = [];
  tokens.forEach((_, j) => {
    const obs = Boolean(observation[j]);
    const last = out.at(-1);
    if (last && last.obs === obs) last.items.push(j); else out.push({ obs, items: [j] });
  });
  return out;
}

// A tree rollout's group (rollout.tree): the shared prefix once, each branch nested under the token it
// forks at (its first token, marked), the leaves coloured by their reward (red lowest, green highest).
function treeView(tree, shade) {
  const kids = new Map();
  tree.nodes.forEach((n, i) => { if (!kids.has(n.parent)) kids.set(n.parent, []); kids.get(n.parent).push(i); });
  const reward = new Map(tree.leaves.map((l) => [l.node, l.reward]));
  const rs = tree.leaves.map((l) => l.reward);
  const lo = Math.min(...rs), hi = Math.max(...rs);
  const colour = (r) => { const t = hi > lo ? (r - lo) / (hi - lo) : 0.5; return `hsl(${Math.round(120 * t)}, 65%, 42%)`; };
  const node = (i) => {
    const n = tree.nodes[i];
    const fork = (kids.get(n.parent) || []).length > 1;
    const toks = n.tokens.map((t, j) => h("span", {
      class: `tok${fork && j === 0 ? " fork" : ""}`, style: shade(n.entropy[j]),
      title: `entropy ${n.entropy[j]}${fork && j === 0 ? " · a forking token: the branches re-drew it" : ""}`,
    }, balanced(t)));
    const leaf = reward.has(i) ? [h("span", {
      class: `leaf${i === tree.shown ? " shown" : ""}`, style: `background: ${colour(reward.get(i))}`,
      title: i === tree.shown ? "the sample shown above" : "a leaf: one completion of the group",
    }, `reward ${fmt(reward.get(i))}`)] : [];
    return h("li", { class: "tnode" }, h("span", { class: "tokens" }, ...toks), ...leaf,
      ...(kids.has(i) ? [h("ul", { class: "tbranches" }, ...kids.get(i).map(node))] : []));
  };
  return h("details", { class: "tree", open: "" },
    h("summary", { class: "small" }, `Group as a tree: ${tree.leaves.length} leaves, ${tree.nodes.length} segments${tree.truncated ? " (truncated)" : ""}`),
    h("ul", { class: "tbranches", "aria-label": "Group tree" }, ...(kids.get(-1) || []).map(node)));
}

// The paper's view: completions with each token shaded by its entropy, kept tokens boxed, and the
// step's most frequent kept tokens with how often the filter dropped them.
function forkingView(s, rec, stepPick) {
  const all = s.samples.flatMap((x) => x.entropy);
  const top = Math.max(1e-6, ...all); // the darkest shade is the step's highest entropy shown
  const visible = (t) => t.replace(/ /g, "·").replace(/\n/g, "↵");
  const tok = (x, t, j) => h("span", {
    class: `tok${x.kept[j] ? " kept" : ""}`,
    style: `background: rgba(36,86,200,${(0.85 * x.entropy[j] / top).toFixed(3)})`,
    title: `entropy ${x.entropy[j]}${x.kept[j] ? " · kept" : ""}`,
    "data-entropy": x.entropy[j],
  }, balanced(t));
  const cards = s.samples.map((x, i) => {
    // a multi-turn trajectory: the model's turns token by token, each observation set apart as one block
    const turns = segments(x.tokens, x.observation || []);
    const modelTokens = x.tokens.length - (x.observation || []).filter(Boolean).length;
    const shown = turns.map((seg) => seg.obs
      ? [h("div", { class: "obs", title: "observation: the environment's answer (context: no loss, not counted by the filter)" },
        h("span", { class: "obs-label" }, "tool"), balanced(seg.items.map((j) => x.tokens[j]).join("")))]
      : seg.items.map((j) => tok(x, x.tokens[j], j)));
    const nTurns = turns.filter((seg) => !seg.obs).length;
    return h("article", { class: "sample", "aria-label": `Sample ${i + 1}` },
      h("div", { class: "toolbar small" }, h("b", {}, `Sample ${i + 1}`), h("span", {}, `reward ${fmt(x.reward)}`),
        h("span", {}, `${x.kept.filter(Boolean).length} of ${modelTokens} tokens kept`),
        x.observation ? h("span", { class: "turns" }, `${nTurns} turn${nTurns === 1 ? "" : "s"}`) : "",
        x.truncated ? h("span", {}, "(truncated)") : ""),
      h("details", {}, h("summary", { class: "small muted" }, "prompt"), h("pre", {}, x.prompt)),
      h("div", { class: "tokens" }, ...shown.flat()),
      x.tree ? treeView(x.tree, (e) => `background: rgba(36,86,200,${(0.85 * e / top).toFixed(3)})`) : "");
  });
  const dropped = (rec["entropy/num_valid"] || 0) - (rec["entropy/kept_tokens"] || 0);
  const table = h("table", { id: "forking-table", "aria-label": "Most frequent kept tokens" },
    h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Token"), h("th", {}, "Kept"), h("th", {}, "Dropped"),
      h("th", {}, "Share of dropped tokens"), h("th", {}, "Kept rate"))),
    h("tbody", {}, ...s.forking_tokens.map((t, i) => h("tr", {},
      h("td", {}, i + 1), h("td", {}, h("code", { class: "tk" }, visible(t.text))), h("td", {}, t.kept), h("td", {}, t.dropped),
      h("td", {}, dropped > 0 ? `${(100 * t.dropped / dropped).toFixed(2)}%` : "–"),
      h("td", {}, `${(100 * t.kept / Math.max(1, t.kept + t.dropped)).toFixed(0)}%`)))));
  return [
    h("div", { class: "legend" }, "entropy 0", h("span", { class: "swatch" }), `${fmt(top)}`,
      h("span", { class: "keptmark" }, "kept"), `step ${s.step} · threshold τ = ${fmt(rec["entropy/threshold"])} · kept share ${fmt(rec["entropy/kept_frac"])}`),
    h("div", { class: "cols" }, h("div", {}, ...cards),
      h("div", {}, h("h3", {}, "Most frequent kept (forking) tokens"),
        h("p", { class: "muted small" }, "· is a space, ↵ a newline. Kept rate: of the token's occurrences in the step, the share the filter kept."),
        s.forking_tokens.length ? table : h("p", { class: "muted" }, "None logged (log_entropy off)."))),
  ];
}

// ---- compare ------------------------------------------------------------------------------------

const COMPARE = [
  ["reward/mean", "Train reward"], ["eval/reward_mean", "Held-out eval reward"], ["entropy/mean", "Entropy mean"],
  ["entropy/p80", "Entropy p80"], ["entropy/kept_frac", "Kept share"], ["response/length_mean", "Response length"],
  ["actor/clipfrac", "Clip fraction"], ["timing/step", "Step time (s)"],
];

// jobs a study submits are named <study>-<arm>-s<seed> (service/study.py): the arm is the name less the seed
const armOf = (name) => name.replace(/-s\d+$/, "");

function meanRecords(runs) { // per step, each number averaged over the runs that recorded it
  const steps = new Map();
  for (const records of runs) for (const r of records) {
    const acc = steps.get(r.step) || new Map();
    for (const [k, v] of Object.entries(r)) if (typeof v === "number" && k !== "step") acc.set(k, [...(acc.get(k) || []), v]);
    steps.set(r.step, acc);
  }
  return [...steps.keys()].sort((a, b) => a - b).map((step) =>
    Object.fromEntries([["step", step], ...[...steps.get(step)].map(([k, v]) => [k, v.reduce((a, b) => a + b, 0) / v.length])]));
}

async function compareView(ids, byArm) {
  const picker = h("fieldset", { class: "card", id: "compare-picker" }, h("legend", {}, "Jobs to compare"));
  const grid = h("div", { class: "grid" });
  const chosen = new Set(ids.filter(Boolean));
  const go = (arms) => { location.hash = `#/compare/${[...chosen].join(",")}${arms ? "/arms" : ""}`; };
  const armsBox = h("input", { type: "checkbox", id: "cmp-arms", checked: byArm });
  armsBox.addEventListener("change", () => go(armsBox.checked));
  const armsToggle = h("p", { class: "small" }, armsBox,
    h("label", { for: "cmp-arms" }, " Average the seeds of each study arm (jobs named <study>-<arm>-s<seed>)"));
  main.replaceChildren(h("h1", {}, "Compare jobs"), picker, armsToggle, grid);
  const { jobs } = await api("/v1/jobs?limit=200");
  for (const j of jobs) {
    const box = h("input", { type: "checkbox", id: `cmp-${j.id}`, checked: chosen.has(j.id) });
    box.addEventListener("change", () => {
      box.checked ? chosen.add(j.id) : chosen.delete(j.id);
      go(byArm);
    });
    picker.append(h("span", { class: "small", style: "margin-right:1rem" }, box, h("label", { for: `cmp-${j.id}` }, iso(j.name)), h("span", { class: "muted" }, j.id.slice(-6))));
  }
  if (chosen.size < 1) { grid.replaceChildren(h("p", { class: "muted" }, "Pick two or more jobs.")); return; }
  let runs = await Promise.all([...chosen].map(async (id) => {
    const [job, m] = await Promise.all([api(jobUrl(id)), api(jobUrl(id, "/metrics?view=scalars&limit=10000"))]);
    const algo = (job.config && job.config.algorithm) || {};
    // FSI ... PDI: the name isolated within the label, as <bdi> does on the page
    const label = `\u2068${balanced(job.name)}\u2069 (ρ=${algo.top_entropy_quantile ?? "?"}, ${id.slice(-6)})`;
    return { label, name: job.name, records: m.metrics };
  }));
  if (byArm) { // one curve per arm: the mean over its seeds, in the order the arms first appear
    const arms = new Map();
    for (const r of runs) arms.set(armOf(r.name), [...(arms.get(armOf(r.name)) || []), r.records]);
    runs = [...arms].map(([arm, list]) => ({
      label: `\u2068${balanced(arm)}\u2069 (mean of ${list.length} seed${list.length === 1 ? "" : "s"})`, records: meanRecords(list),
    }));
  }
  grid.replaceChildren(...COMPARE.map(([key, title]) => {
    const el = h("div", { class: "chart", id: `cmp-${key.replace(/[^a-z0-9]/gi, "-")}`, role: "img", "aria-label": title });
    requestAnimationFrame(() => lineChart(el, title, runs.map((r) => ({ ...series(r.records, key), name: r.label }))));
    return el;
  }));
}

// ---- routing ------------------------------------------------------------------------------------

function stopView() {
  for (const f of cleanup) f();
  cleanup = [];
}

function route() {
  stopView();
  if (!sessionStorage.getItem(TOKEN_KEY)) return signIn();
  document.getElementById("signout").hidden = false;
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  try {
    if (parts[0] === "jobs" && parts[1]) return jobView(decodeURIComponent(parts[1]));
    if (parts[0] === "compare") return compareView((parts[1] || "").split(","), parts[2] === "arms").catch(alertError);
    return jobsView();
  } finally {
    main.focus({ preventScroll: true });
  }
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  signIn("Signed out.");
});
window.addEventListener("hashchange", route);
route();
