/* aspy dashboard: reads the JSON API every 2 seconds and draws it.
 *
 * Every text that comes from the API is put in the page with textContent, never as HTML:
 * recorded prompts and answers may hold markup. The API token, when aspy asks for one,
 * lives in this browser only (sessionStorage, or localStorage when the user asks) and goes
 * to this aspy as "Authorization: Bearer".
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  // The clients (for the filters) change only with aspy's config: read them less often.
  const CLIENTS_EVERY = 15;
  const TOKEN_KEY = "aspy.token";
  const VIEW_KEY = "aspy.dashboard.view";
  // Relative to the page, so that a prefix added by a reverse proxy is kept.
  const API_ROOT = new URL("api/", document.baseURI);
  const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const TOKEN_KINDS = ["input", "output", "cache_read", "cache_write_5m", "cache_write_1h"];
  const DAY_S = 86400;
  const STEP_S = { day: DAY_S, week: 7 * DAY_S, month: 30.5 * DAY_S };
  // Past this many groups the smallest are shown together, so that colours stay tellable apart.
  const MAX_GROUPS = 9;
  const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
  const NO_GROUP = { client: "(legacy)", model: "(no model)", tag: "(no tag)" };
  const VIEW_IDS = ["measure", "by", "step", "range", "client-filter", "tag-filter"];

  const $ = (id) => document.getElementById(id);
  const intFmt = new Intl.NumberFormat();
  const compactFmt = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });

  // What the page knows between polls; window.aspyDashboard exposes it to the browser console.
  const state = { chart: null, chartKey: "", usage: null, clients: [], polls: 0, hoverText: "" };
  window.aspyDashboard = state;

  /* ---------- small helpers ---------- */

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function usd(value, digits) {
    const v = Number(value) || 0;
    // Cents from ten cents up; below that, enough digits that one session's cost is not "$0.00".
    const shown = digits !== undefined ? digits : v === 0 || Math.abs(v) >= 0.1 ? 2 : 4;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: shown, maximumFractionDigits: shown });
  }

  function usdTicks(u, ticks) {
    // As many decimals as the step between two ticks needs, cents at least.
    const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : Math.abs(ticks[0]) || 1;
    const digits = step >= 1 ? 0 : Math.min(4, Math.max(2, Math.ceil(-Math.log10(step) - 1e-9)));
    return ticks.map((t) => usd(t, digits));
  }

  function tokenSum(tokens) {
    return TOKEN_KINDS.reduce((sum, kind) => sum + (Number(tokens && tokens[kind]) || 0), 0);
  }

  function clock(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    const sameDay = date.toDateString() === new Date().toDateString();
    return sameDay
      ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
      : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function plural(count, word) {
    return intFmt.format(count) + " " + word + (count === 1 ? "" : "s");
  }

  function shortId(value) {
    return value && value.length > 13 ? value.slice(0, 8) + "…" : value || "";
  }

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function storage(kind) {
    // Storage can be refused (private modes, policies): the page then asks again after a reload.
    try { return window[kind]; } catch (err) { return null; }
  }

  /* ---------- the token ---------- */

  function storedToken() {
    const session = storage("sessionStorage");
    const local = storage("localStorage");
    return (session && session.getItem(TOKEN_KEY)) || (local && local.getItem(TOKEN_KEY)) || "";
  }

  function saveToken(token, remember) {
    for (const kind of ["sessionStorage", "localStorage"]) {
      const store = storage(kind);
      if (store) store.removeItem(TOKEN_KEY);
    }
    const store = storage(remember ? "localStorage" : "sessionStorage");
    if (store && token) store.setItem(TOKEN_KEY, token);
  }

  function tokenFromFragment() {
    // "#token=..." never reaches a server; once read it is wiped from the address bar and history.
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const token = params.get("token");
    if (token === null) return;
    saveToken(token.trim(), false);
    history.replaceState(null, "", location.pathname + location.search);
  }

  function showTokenForm(show) {
    $("token-form").hidden = !show;
    $("token-toggle").setAttribute("aria-expanded", String(show));
    if (show) $("token-input").focus();
  }

  /* ---------- the API ---------- */

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, params, body) {
    const url = new URL(path, API_ROOT);
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
    }
    const headers = { Accept: "application/json" };
    const token = storedToken();
    if (token) headers.Authorization = "Bearer " + token;
    const init = { headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      init.method = "POST";
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      throw new ApiError(0, "aspy cannot be reached");
    }
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    if (!response.ok) {
      const message = data && data.error && data.error.message ? data.error.message : response.statusText;
      throw new ApiError(response.status, message);
    }
    return data;
  }

  function explain(err) {
    if (!(err instanceof ApiError)) return "The dashboard failed: " + err.message;
    switch (err.status) {
      case 0:
        return "aspy cannot be reached. Retrying every 2 seconds…";
      case 401:
        return storedToken()
          ? "aspy refused this token (401). Paste the right API token, or a client's proxy token."
          : "This aspy needs an API token (401). Paste its [server] api_token, or a client's proxy token, below.";
      case 403:
        return "This token may not read that (403): " + err.message;
      case 503:
        return "aspy cannot read its store right now (503): " + err.message +
          " The proxy keeps forwarding; retrying every 2 seconds…";
      default:
        return "The API answered " + err.status + ": " + err.message;
    }
  }

  function showAlert(err) {
    const alert = $("alert");
    if (!err) {
      alert.hidden = true;
      alert.textContent = "";
      delete alert.dataset.status;
      return;
    }
    alert.textContent = explain(err);
    alert.dataset.status = err instanceof ApiError ? String(err.status) : "error";
    alert.hidden = false;
    if (err.status === 401 && $("token-form").hidden) showTokenForm(true);
  }

  /* ---------- the view the user chose ---------- */

  function view() {
    return {
      measure: $("measure").value,
      by: $("by").value,
      step: $("step").value,
      range: $("range").value,
      client: $("client-filter").value,
      tag: $("tag-filter").value,
    };
  }

  function saveView() {
    const store = storage("localStorage");
    if (!store) return;
    const saved = {};
    for (const id of VIEW_IDS) saved[id] = $(id).value;
    store.setItem(VIEW_KEY, JSON.stringify(saved));
  }

  function restoreView() {
    const store = storage("localStorage");
    let saved = {};
    try { saved = JSON.parse((store && store.getItem(VIEW_KEY)) || "{}") || {}; } catch (err) { saved = {}; }
    for (const id of VIEW_IDS) {
      const select = $(id);
      if (typeof saved[id] === "string" && [...select.options].some((o) => o.value === saved[id])) {
        select.value = saved[id];
      } else if (typeof saved[id] === "string" && id.endsWith("-filter")) {
        // A client or tag filter waits for the clients to be read before it can be chosen.
        select.dataset.wanted = saved[id];
      }
    }
  }

  function clientTags(clientId) {
    const client = state.clients.find((c) => c.id === clientId);
    return client ? client.tags || [] : [];
  }

  function shownClient(clientId) {
    // Sessions and events are filtered here too, should an older aspy ignore ?tag=.
    const v = view();
    if (v.client && clientId !== v.client) return false;
    if (v.tag && !clientTags(clientId).includes(v.tag)) return false;
    return true;
  }

  /* ---------- clients, for the filters ---------- */

  function fillSelect(select, options) {
    const current = select.value || select.dataset.wanted || "";
    const first = select.options[0];
    select.replaceChildren(first, ...options.map(([value, text]) => el("option", { value }, text)));
    if (options.some(([value]) => value === current)) {
      select.value = current;
      delete select.dataset.wanted;
    } else {
      select.value = "";
    }
  }

  async function loadClients() {
    const answer = await api("clients");
    state.clients = answer.clients || [];
    fillSelect($("client-filter"), state.clients.map((c) => [c.id, c.name && c.name !== c.id ? `${c.name} (${c.id})` : c.id]));
    const tags = [...new Set(state.clients.flatMap((c) => c.tags || []))].sort();
    fillSelect($("tag-filter"), tags.map((t) => [t, t]));
  }

  /* ---------- cost and tokens over time ---------- */

  function parsePeriod(key) {
    // "2026-11-21" (a day, or a week's Monday) or "2026-11" (a month), as a local date.
    const [y, m, d] = String(key).split("-").map(Number);
    return new Date(y, m - 1, d || 1);
  }

  function periodKey(date, step) {
    const pad = (n) => String(n).padStart(2, "0");
    if (step === "month") return `${date.getFullYear()}-${pad(date.getMonth() + 1)}`;
    let day = date;
    if (step === "week") {
      const back = (date.getDay() + 6) % 7;
      day = new Date(date.getFullYear(), date.getMonth(), date.getDate() - back);
    }
    return `${day.getFullYear()}-${pad(day.getMonth() + 1)}-${pad(day.getDate())}`;
  }

  function nextPeriod(date, step) {
    if (step === "month") return new Date(date.getFullYear(), date.getMonth() + 1, 1);
    return new Date(date.getFullYear(), date.getMonth(), date.getDate() + (step === "week" ? 7 : 1));
  }

  function periodsOf(answer, step) {
    // Every period of the range, empty ones too, so that the bars stand where their dates are.
    const seen = answer.rows.map((row) => row[step]).filter(Boolean).sort();
    const first = answer.since ? periodKey(new Date(answer.since), step) : seen[0];
    const last = periodKey(answer.until ? new Date(answer.until) : new Date(), step);
    const keys = [];
    if (first) {
      let date = parsePeriod(first);
      const lastKey = seen.length && seen[seen.length - 1] > last ? seen[seen.length - 1] : last;
      while (keys.length < 1000) {
        const key = periodKey(date, step);
        if (key > lastKey) break;
        keys.push(key);
        date = nextPeriod(parsePeriod(key), step);
      }
    }
    const periods = [...new Set([...keys, ...seen])].sort();
    // No traffic at all over "all time": the current period, so that the chart still has an axis.
    return periods.length ? periods : [periodKey(new Date(), step)];
  }

  function figure(row, measure) {
    return measure === "cost" ? Number(row.cost_usd) || 0 : tokenSum(row.tokens);
  }

  function groupsOf(answer, v) {
    const groups = new Map();
    for (const row of answer.rows) {
      const name = row[v.by] === null || row[v.by] === undefined ? NO_GROUP[v.by] : String(row[v.by]);
      const group = groups.get(name) || { name, requests: 0, failed: 0, tokens: 0, cost: 0, rows: [] };
      group.requests += Number(row.requests) || 0;
      group.failed += Number(row.failed) || 0;
      group.tokens += tokenSum(row.tokens);
      group.cost += Number(row.cost_usd) || 0;
      group.rows.push(row);
      groups.set(name, group);
    }
    const key = v.measure === "cost" ? "cost" : "tokens";
    const sorted = [...groups.values()].sort((a, b) => b[key] - a[key] || a.name.localeCompare(b.name));
    if (sorted.length <= MAX_GROUPS) return sorted;
    const rest = sorted.slice(MAX_GROUPS - 1);
    const other = { name: `${rest.length} others`, requests: 0, failed: 0, tokens: 0, cost: 0, rows: [] };
    for (const g of rest) {
      for (const field of ["requests", "failed", "tokens", "cost"]) other[field] += g[field];
      other.rows.push(...g.rows);
    }
    return [...sorted.slice(0, MAX_GROUPS - 1), other];
  }

  function setFigure(id, value, text) {
    const node = $(id);
    node.dataset.value = String(value);
    node.textContent = text;
  }

  function drawTotals(total, unpriced) {
    const t = total || {};
    setFigure("total-cost", Number(t.cost_usd) || 0, usd(t.cost_usd));
    setFigure("total-tokens", tokenSum(t.tokens), intFmt.format(tokenSum(t.tokens)));
    setFigure("total-requests", Number(t.requests) || 0, intFmt.format(Number(t.requests) || 0));
    setFigure("total-failed", Number(t.failed) || 0, intFmt.format(Number(t.failed) || 0));
    setFigure("total-savings", Number(t.savings_usd) || 0, usd(t.savings_usd));
    const note = $("unpriced");
    note.hidden = !(unpriced && unpriced.length);
    note.textContent = note.hidden ? "" :
      "Cost counts 0 for models the price table does not know: " + unpriced.join(", ") +
      ". Add them to models.yaml beside config.toml (see aspy models).";
  }

  function drawBreakdown(groups, v) {
    $("breakdown-by").textContent = { client: "Client", model: "Model", tag: "Tag" }[v.by];
    const body = $("breakdown").tBodies[0];
    const rows = groups.map((g, i) => {
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = COLORS[i % COLORS.length];
      const client = v.by === "client" ? state.clients.find((c) => c.id === g.name) : null;
      const name = el("td", {}, swatch, g.name,
        client && client.name && client.name !== client.id ? el("span", { class: "count" }, client.name) : null);
      return el("tr", { dataset: { group: g.name } }, name,
        el("td", {}, intFmt.format(g.requests)), el("td", {}, intFmt.format(g.failed)),
        el("td", { "data-value": g.tokens }, intFmt.format(g.tokens)),
        el("td", { "data-value": g.cost }, usd(g.cost)));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No traffic in this period.")));
    }
    body.replaceChildren(...rows);
  }

  function chartSize() {
    const box = $("chart");
    return { width: Math.max(200, box.clientWidth), height: window.innerWidth < 600 ? 200 : 260 };
  }

  function drawChart(answer, v) {
    const groups = groupsOf(answer, v);
    drawBreakdown(groups, v);
    const periods = periodsOf(answer, v.step);
    const index = new Map(periods.map((p, i) => [p, i]));
    const own = groups.map((g) => {
      const values = periods.map(() => 0);
      for (const row of g.rows) {
        const at = index.get(row[v.step]);
        if (at !== undefined) values[at] += figure(row, v.measure);
      }
      return values;
    });
    // Stacked bars: each series is the sum of its group and those below it, drawn tallest first.
    const stacked = [];
    own.forEach((values, g) => stacked.push(values.map((x, p) => x + (g ? stacked[g - 1][p] : 0))));
    const xs = periods.map((p) => parsePeriod(p).getTime() / 1000);
    const data = [xs, ...stacked.slice().reverse()];
    const labels = groups.map((g) => g.name).reverse();
    state.chartGroups = groups.map((g, i) => ({ name: g.name, color: COLORS[i % COLORS.length], values: own[i] }));
    state.chartPeriods = periods;
    $("chart").setAttribute("aria-label",
      (v.measure === "cost" ? "Cost" : "Tokens") + " per " + v.step + " by " + v.by + ": " +
      (groups.length ? groups.map((g) => g.name).join(", ") : "no traffic"));

    const key = JSON.stringify([v.measure, v.by, v.step, labels]);
    if (state.chart && key === state.chartKey) {
      state.chart.setData(data);
      return;
    }
    if (state.chart) state.chart.destroy();
    state.chartKey = key;
    if (typeof uPlot === "undefined") {
      throw new Error("the chart library did not load");
    }
    const pad = STEP_S[v.step] * 0.6;
    const muted = css("--muted") || "#5b6676";
    const line = css("--line") || "#dde3ea";
    const axisValue = v.measure === "cost" ? usdTicks : (u, ticks) => ticks.map((t) => compactFmt.format(t));
    const series = [{}].concat(groups.slice().reverse().map((g, i) => {
      const color = COLORS[(groups.length - 1 - i) % COLORS.length];
      return {
        label: g.name, stroke: color, fill: color, width: 0,
        paths: uPlot.paths.bars({ size: [0.7, 64] }),
        points: { show: false },
      };
    }));
    state.chart = new uPlot({
      ...chartSize(),
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: (u, min, max) => [min - pad, max + pad] },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      axes: [
        { stroke: muted, grid: { show: false }, ticks: { stroke: line }, splits: periodTicks, values: periodLabels(v.step) },
        { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line }, values: axisValue, size: 64 },
      ],
      series,
      hooks: { setCursor: [hover] },
    }, data, $("chart"));
  }

  function periodTicks(u) {
    // One tick per period, thinned to what fits, counted back from the latest period.
    const xs = u.data[0];
    const room = u.bbox.width / (window.devicePixelRatio || 1);
    const every = Math.max(1, Math.ceil((xs.length * 64) / Math.max(room, 1)));
    return xs.filter((x, i) => (xs.length - 1 - i) % every === 0);
  }

  function periodLabels(step) {
    const format = step === "month"
      ? new Intl.DateTimeFormat(undefined, { month: "short", year: "numeric" })
      : new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
    return (u, ticks) => ticks.map((t) => format.format(new Date(t * 1000)));
  }

  function hover(u) {
    const at = u.cursor.idx;
    const groups = state.chartGroups || [];
    const v = view();
    let text = "Point at or tap a bar for its figures.";
    if (at !== null && at !== undefined && state.chartPeriods && state.chartPeriods[at]) {
      const parts = groups.filter((g) => g.values[at])
        .map((g) => g.name + " " + (v.measure === "cost" ? usd(g.values[at]) : intFmt.format(g.values[at])));
      const period = periodLabels(v.step)(u, [u.data[0][at]])[0];
      text = (v.step === "week" ? "Week of " + period : period) + ": " + (parts.length ? parts.join(" · ") : "nothing");
    }
    if (text !== state.hoverText) {
      state.hoverText = text;
      $("chart-hover").textContent = text;
    }
  }

  async function loadUsage() {
    const v = view();
    let answer;
    try {
      answer = await api("usage", {
        group_by: v.step + "," + v.by, tz: TZ, time_range: v.range, client: v.client, tag: v.tag,
      });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && /endpoint/i.test(err.message)) {
        // An aspy older than /api/usage: the rest of the page still works.
        const note = $("usage-message");
        note.hidden = false;
        note.textContent = "This aspy has no /api/usage yet: charts need a newer aspy.";
        $("usage-view").hidden = true;
        return;
      }
      throw err;
    }
    $("usage-message").hidden = true;
    $("usage-view").hidden = false;
    state.usage = answer;
    drawTotals(answer.total, answer.unpriced_models);
    drawChart(answer, v);
  }

  /* ---------- live sessions and their context gauges ---------- */

  function gauge(context) {
    const pct = Number(context && context.usage_pct) || 0;
    const level = (context && context.warning_level) || "normal";
    const fill = el("div", { class: "fill" });
    // Set through the CSSOM: the page's policy allows no inline style attributes.
    fill.style.width = Math.min(100, pct) + "%";
    const limit = context && context.limit_tokens ? intFmt.format(context.limit_tokens) : "?";
    const label = `Context ${intFmt.format((context && context.current_tokens) || 0)} / ${limit} tokens ` +
      `(${pct.toLocaleString(undefined, { maximumFractionDigits: 1 })} %, ${level})` +
      (context && context.compactions ? `, ${context.compactions} compaction${context.compactions > 1 ? "s" : ""}` : "");
    return el("div", { class: "gauge " + level },
      el("div", { class: "track", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
                  "aria-valuenow": pct, "aria-label": "Context window used" }, fill),
      el("div", { class: "label" }, label));
  }

  function sessionItem(session, context) {
    const stats = session.stats || {};
    const name = session.client_name || session.client || "legacy " + (session.user || "");
    const requests = (stats.requests && stats.requests.total) || 0;
    const failed = (stats.requests && stats.requests.failed) || 0;
    const cost = stats.cost ? stats.cost.total_usd : 0;
    const model = (context && context.model) || "";
    return el("li", { class: "session", dataset: { session: session.id, claudeSession: session.claude_session_id || "" } },
      el("div", { class: "title" },
        el("span", { class: "name" }, name),
        session.client && session.client !== name ? el("span", { class: "id" }, session.client) : null,
        el("span", { class: "badge " + session.status }, session.status),
        el("span", { class: "id", title: session.claude_session_id || session.id },
          shortId(session.claude_session_id || session.id))),
      gauge(context),
      el("p", { class: "figures" },
        plural(requests, "request") + (failed ? ` (${intFmt.format(failed)} failed)` : "") +
        ` · ${intFmt.format(tokenSum(stats.tokens))} tokens · ${usd(cost)}` +
        (model ? ` · ${model}` : "") + ` · ${ago(session.last_activity)}`));
  }

  async function loadLive() {
    const v = view();
    const filter = { client: v.client, tag: v.tag, limit: 50 };
    const [active, idle, contexts] = await Promise.all([
      api("sessions", { status: "active", ...filter }),
      api("sessions", { status: "idle", ...filter }),
      api("context"),
    ]);
    const byId = new Map((contexts.contexts || []).map((c) => [c.session, c]));
    const live = [...active.sessions, ...idle.sessions].filter((s) => shownClient(s.client));
    const items = live.map((s) => sessionItem(s, byId.get(s.id) || s.context));
    $("live-count").textContent = live.length ? "(" + live.length + ")" : "";
    $("sessions").replaceChildren(...(items.length ? items
      : [el("li", { class: "empty" }, "No live session. A session appears here with its first request.")]));
  }

  /* ---------- the event feed ---------- */

  function eventDetail(e) {
    switch (e.type) {
      case "request":
        return [e.method, e.path, e.model, e.thread && e.thread !== "main" ? "(" + e.thread + ")" : ""].filter(Boolean).join(" ");
      case "response": {
        const usage = e.usage || {};
        const tokens = (usage.input_tokens || 0) + (usage.output_tokens || 0) + (usage.cache_read || 0) +
          (usage.cache_write_5m || 0) + (usage.cache_write_1h || 0);
        return [e.status, e.model, e.stop_reason, intFmt.format(tokens) + " tokens",
                e.cost_usd !== null && e.cost_usd !== undefined ? usd(e.cost_usd) : "",
                e.ttfb_ms !== null && e.ttfb_ms !== undefined ? "first byte " + e.ttfb_ms + " ms" : ""]
          .filter((x) => x !== "" && x !== null && x !== undefined).join(" · ");
      }
      case "tool_call":
        return e.tool || "";
      case "tool_result":
        return (e.tool || "") + (e.is_error ? " failed" : " ok");
      case "thinking":
        return intFmt.format(e.chars || 0) + " characters";
      case "error":
        return [e.status, e.error_type, e.message].filter(Boolean).join(" · ");
      case "rate_limit":
        return "status " + e.status;
      case "context_compact":
        return intFmt.format(e.before_tokens || 0) + " → " + intFmt.format(e.after_tokens || 0) + " tokens";
      case "session_start":
        return e.source || "";
      case "session_end":
        return e.reason || "";
      default:
        return "";
    }
  }

  async function loadEvents() {
    const v = view();
    const answer = await api("events", { limit: 40, client: v.client, tag: v.tag });
    const items = answer.events.filter((e) => shownClient(e.client)).map((e) => {
      const failed = (e.type === "tool_result" && e.is_error) || (e.type === "response" && e.status >= 400);
      return el("li", { class: "event " + e.type + (failed ? " failed" : ""), dataset: { id: e.id } },
        el("time", { datetime: e.timestamp, title: e.timestamp }, clock(e.timestamp)),
        el("div", {},
          el("span", { class: "type" }, e.type.replace("_", " ")), " ",
          el("span", { class: "who" }, (e.client || "legacy") + " · " + shortId(e.session || "")),
          el("div", { class: "detail" }, eventDetail(e))));
    });
    $("events").replaceChildren(...(items.length ? items : [el("li", { class: "empty" }, "No events yet.")]));
  }

  /* ---------- search ---------- */

  function snippet(text) {
    // The API marks matches as **word**: they become <mark> elements, the rest stays text.
    const node = el("p", { class: "snippet" });
    String(text || "").split("**").forEach((part, i) => node.append(i % 2 ? el("mark", {}, part) : part));
    return node;
  }

  async function search(event) {
    event.preventDefault();
    const keyword = $("search-input").value.trim();
    if (!keyword) return;
    const v = view();
    const body = { keyword, time_range: $("search-range").value, limit: 20 };
    if (v.client) body.client = v.client;
    const summary = $("search-summary");
    summary.textContent = "Searching…";
    try {
      const answer = await api("search", null, body);
      summary.textContent = answer.total_matches === 1 ? "1 match" : intFmt.format(answer.total_matches) + " matches" +
        (answer.total_matches > answer.results.length ? ", the best " + answer.results.length + " shown" : "");
      $("search-results").replaceChildren(...answer.results.map((r) => el("li", {},
        el("div", { class: "meta" }, [r.role, r.client || "legacy", clock(r.timestamp), shortId(r.session)].join(" · ")),
        snippet(r.snippet))));
    } catch (err) {
      summary.textContent = err instanceof ApiError && err.status === 400 ? err.message : explain(err);
      $("search-results").replaceChildren();
      if (err instanceof ApiError && err.status !== 400) showAlert(err);
    }
  }

  /* ---------- polling ---------- */

  let timer = null;
  let running = false;
  let again = false;

  async function refresh() {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    const jobs = [loadUsage(), loadLive(), loadEvents()];
    if (state.polls % CLIENTS_EVERY === 0 || !state.clients.length) jobs.push(loadClients());
    const results = await Promise.allSettled(jobs);
    running = false;
    state.polls += 1;
    const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    // Whatever stops every call (no aspy, no token, no store) is the one to tell.
    const first = failures.find((e) => e instanceof ApiError && [0, 401, 403, 503].includes(e.status)) || failures[0];
    for (const err of failures) if (!(err instanceof ApiError)) console.error(err);
    showAlert(first || null);
    $("status").textContent = first
      ? (first.status === 401 ? "Waiting for a token" : "Not updated · retrying")
      : "Live · updated " + new Date().toLocaleTimeString() + " · " + TZ;
    if (again) {
      again = false;
      refresh();
    } else if (!document.hidden) {
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  function start() {
    tokenFromFragment();
    restoreView();
    for (const id of VIEW_IDS) {
      $(id).addEventListener("change", () => {
        saveView();
        refresh();
      });
    }
    $("token-toggle").addEventListener("click", () => showTokenForm($("token-form").hidden));
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (!token) return;
      saveToken(token, $("token-remember").checked);
      $("token-input").value = "";
      showTokenForm(false);
      state.polls = 0;
      refresh();
    });
    $("token-forget").addEventListener("click", () => {
      saveToken("", false);
      state.polls = 0;
      refresh();
    });
    $("search-form").addEventListener("submit", search);
    window.addEventListener("hashchange", () => {
      tokenFromFragment();
      refresh();
    });
    // Polling stops while the tab is hidden and starts again, at once, when it is shown.
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => {
        if (state.chart) state.chart.setSize(chartSize());
      }).observe($("chart"));
    }
    refresh();
  }

  start();
})();
