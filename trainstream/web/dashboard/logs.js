/*
 * trainstream dashboard: log search. A run's log events searched by level
 * and text through GET api/runs/{run}/logs?level=&q=&after=&limit= (the
 * server searches its history, case-insensitive); "more" pages on with
 * next_after. The run is the one selected in the runs list (or chosen
 * here). Plain JavaScript, on its own: it reads the page's DOM, never
 * app.js's state. Text is shown with textContent only.
 */
(() => {
  "use strict";

  const PAGE = 200;              // log events one search answers at most
  const LEVELS = ["debug", "info", "warning", "error"];
  const token = new URLSearchParams(location.search).get("token");

  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };

  function runPath(run) {
    // Each '/' of a run name as %2F: the server splits the path on '/logs'.
    return `api/runs/${encodeURIComponent(run)}/logs`;
  }

  async function api(path, query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query || {})) {
      if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
    }
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(`${path}${q.toString() ? "?" + q : ""}`, { headers });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  const state = { run: "", level: "", q: "", nextAfter: null, found: 0, scanned: 0, busy: false, generation: 0 };
  let ui = null;

  function build(box) {
    const run = el("select", { id: "log-run", title: "the run whose logs are searched" });
    const level = el("select", { id: "log-level", title: "only this level" },
      el("option", { value: "", textContent: "any level" }),
      ...LEVELS.map((l) => el("option", { value: l, textContent: l })));
    const text = el("input", {
      id: "log-q", type: "search", placeholder: "text in the message", size: 14,
    });
    const go = el("button", { id: "log-go", type: "submit", textContent: "search" });
    const form = el("form", { id: "log-form", className: "log-form" }, run, level, text, go);
    const status = el("div", { id: "log-status", className: "log-status muted" });
    const list = el("ol", { id: "log-results", className: "log-results" });
    const more = el("button", { id: "log-more", type: "button", textContent: "more", hidden: true });
    box.append(el("h2", { textContent: "Log search" }), form, status, list, more);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      search();
    });
    level.addEventListener("change", () => search());
    run.addEventListener("change", () => search());
    run.addEventListener("focus", () => refreshRuns());
    more.addEventListener("click", () => search(true));
    return { run, level, text, status, list, more };
  }

  async function refreshRuns() {
    let runs;
    try {
      ({ runs } = await api("api/runs"));
    } catch (e) {
      return;
    }
    const names = runs.map((r) => r.run).sort();
    const current = ui.run.value;
    const known = [...ui.run.options].map((o) => o.value);
    if (known.length === names.length && known.every((n, i) => n === names[i])) return;
    ui.run.replaceChildren(...names.map((n) => el("option", { value: n, textContent: n })));
    if (names.includes(current)) ui.run.value = current;
  }

  function selectedInList() {
    const item = document.querySelector("#runs li.selected");
    return item ? item.title : null;
  }

  let listed = null;

  async function follow() {
    // A run newly selected in the runs list (app.js marks it) is the one searched.
    const name = selectedInList();
    if (name === listed) return;
    listed = name;
    if (!name) return;
    if (![...ui.run.options].some((o) => o.value === name)) await refreshRuns();
    if ([...ui.run.options].some((o) => o.value === name)) {
      ui.run.value = name;
      search();
    }
  }

  function marked(message, q) {
    // The message with each case-insensitive match of q in a <mark>.
    const out = document.createDocumentFragment();
    if (!q) {
      out.append(message);
      return out;
    }
    const lower = message.toLowerCase();
    const needle = q.toLowerCase();
    let at = 0;
    for (let i = lower.indexOf(needle); i >= 0; i = lower.indexOf(needle, at)) {
      out.append(message.slice(at, i), el("mark", { textContent: message.slice(i, i + q.length) }));
      at = i + q.length;
    }
    out.append(message.slice(at));
    return out;
  }

  function item(ev, q) {
    const time = new Date(ev.time * 1000).toLocaleTimeString();
    return el("li", { className: `level-${ev.level}`, title: `id ${ev.id}` },
      el("span", { className: "kind", textContent: ev.level }),
      el("span", { className: "message" }, marked(String(ev.message), q)),
      el("div", { className: "meta", textContent: `#${ev.id} · ${time}` }));
  }

  async function search(more = false) {
    const run = ui.run.value;
    if (!run) {
      ui.status.textContent = "no run to search yet";
      return;
    }
    const generation = ++state.generation;
    if (!more) {
      Object.assign(state, {
        run, level: ui.level.value, q: ui.text.value, nextAfter: null, found: 0, scanned: 0,
      });
      ui.list.replaceChildren();
    }
    state.busy = true;
    ui.status.textContent = "searching…";
    try {
      const page = await api(runPath(state.run), {
        level: state.level, q: state.q, after: more ? state.nextAfter : 0, limit: PAGE,
      });
      if (generation !== state.generation) return;
      ui.list.append(...page.logs.map((ev) => item(ev, state.q)));
      state.found += page.logs.length;
      state.scanned += page.scanned;
      state.nextAfter = page.next_after;
      ui.more.hidden = page.next_after === null;
      const what = [state.level, state.q && `“${state.q}”`].filter(Boolean).join(" ");
      ui.status.textContent =
        `${state.found} log line${state.found === 1 ? "" : "s"}${what ? " matching " + what : ""}` +
        ` in ${state.run}` + (page.next_after === null ? "" : " (more)");
    } catch (e) {
      if (generation === state.generation) ui.status.textContent = `search failed: ${e.message}`;
    } finally {
      if (generation === state.generation) state.busy = false;
    }
  }

  function start() {
    const box = document.getElementById("log-search");
    if (!box) return;
    ui = build(box);
    refreshRuns().then(follow);
    const runs = document.getElementById("runs");
    if (runs) {
      new MutationObserver(() => follow()).observe(runs, {
        subtree: true, attributes: true, attributeFilter: ["class"], childList: true,
      });
    }
  }

  // For tests and the console: what the search shows.
  window.trainstreamLogs = {
    status: () => ({
      run: state.run, level: state.level, q: state.q, found: state.found,
      busy: state.busy, more: state.nextAfter !== null, text: ui ? ui.status.textContent : "",
    }),
    results: () => ui ? [...ui.list.children].map((li) => ({
      level: li.querySelector(".kind").textContent,
      message: li.querySelector(".message").textContent,
      marks: [...li.querySelectorAll("mark")].map((m) => m.textContent),
    })) : [],
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
