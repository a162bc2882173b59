/*
 * trainstream dashboard: history from the REST API, live points from SSE,
 * charts by uPlot. Plain JavaScript, no build step, no dependency but uPlot.
 *
 * How the history and the live stream join without gap or duplicate:
 *   1. GET api/health gives last_id = C (the cutoff) before anything else.
 *   2. EventSource on events?last_event_id=C: the server sends every event
 *      with id > C; they are buffered while the history loads.
 *   3. The history of every series (max_points ~ 2x a chart's width) covers
 *      at least every point up to C. It may also hold points published after
 *      C (it is read later): the buffered event of such a point is skipped,
 *      since its step is not past the last step of the loaded history
 *      (`boundary`), unless the steps went back (a checkpoint rewind: a new
 *      segment, never in that history).
 *   4. The buffered events are applied in id order, then live ones, once per
 *      animation frame (setData at most once per frame per chart, within a
 *      time budget, and only for charts on screen).
 * Rewinds: a series whose step goes back drops its points at and after that
 * step. The server's `status` with `rewind_to` comes after the batch that
 * went back; it drops the stale tail of the run's other series.
 * Coalesced events (a slow page): the folded points are fetched over REST.
 * Reconnects: EventSource sends Last-Event-ID itself; when this page opens a
 * new EventSource (after the browser gave up, or on `event: overflow`) it
 * passes ?last_event_id= with the last id it has. Events are kept only when
 * their id is above the last one seen, so a replay never duplicates a point.
 * `event: reset` or a changed health `epoch` (another history) reloads all.
 */
(() => {
  "use strict";

  const PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1",
    "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#8cd17d",
  ];
  const EVENT_TYPES = ["metric", "status", "log", "hparams", "alert", "histogram", "image", "pr_curve", "layout"];
  const PANEL_EVENTS = 500;          // status/log/alert entries kept in the panel
  const FRAME_BUDGET_MS = 8;         // chart redraw time per animation frame
  const HISTORY_CONCURRENCY = 6;     // parallel history requests
  const RECENT_EVENTS_WINDOW = 20000; // ids before the cutoff searched for panel events
  const CHART_HEIGHT = 220;

  const token = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- REST

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function urlFor(path, query, withToken) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query || {})) {
      if (v !== null && v !== undefined) q.set(k, String(v));
    }
    if (withToken && token) q.set("token", token);
    const s = q.toString();
    return s ? `${path}?${s}` : path;
  }

  async function api(path, query) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(urlFor(path, query, false), { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error ? body.error : response.statusText;
      throw new HttpError(response.status, `${response.status} ${message}`);
    }
    return body;
  }

  // A run is one path segment (its '/' sent as %2F); a metric name's
  // segments go as they are (docs/protocol.md, "Names with / in REST paths").
  const runPath = (run) => `api/runs/${encodeURIComponent(run)}`;
  const metricPath = (run, name) =>
    `${runPath(run)}/metrics/${name.split("/").map(encodeURIComponent).join("/")}`;

  function toNumber(v) {
    if (typeof v === "number") return Number.isFinite(v) ? v : null;
    return null; // "NaN", "Infinity", "-Infinity": a gap in the line
  }

  // -------------------------------------------------------------- series

  /** One (run, metric) series: parallel arrays sorted by step. */
  class Series {
    constructor(run, name) {
      this.run = run;
      this.name = name;
      this.steps = [];
      this.values = [];
      this.times = [];
      this.timesSorted = true;
      this.boundary = null; // last step of the loaded history, until passed
      this.seenStep = null; // step of the last live event, applied or not
      this.wentBackId = 0;  // id of the last live event whose step went back
      this.changes = 0;     // bumped on anything but an append
      this.resetSmoothing();
    }

    resetSmoothing() {
      this.sm = null;
    }

    setHistory(points) {
      this.steps = points.map((p) => p[0]);
      this.values = points.map((p) => toNumber(p[1]));
      this.times = points.map((p) => p[2]);
      this.timesSorted = this.times.every((t, i) => i === 0 || t >= this.times[i - 1]);
      this.boundary = this.steps.length ? this.steps[this.steps.length - 1] : null;
      this.seenStep = this.boundary;
      this.changes++;
      this.resetSmoothing();
    }

    lastStep() {
      return this.steps.length ? this.steps[this.steps.length - 1] : null;
    }

    append(step, value, time) {
      const n = this.steps.length;
      if (n && step <= this.steps[n - 1]) {
        if (step === this.steps[n - 1]) {
          // The same step again: the newer value wins.
          this.values[n - 1] = value;
          this.times[n - 1] = time;
          this.changes++;
          this.resetSmoothing();
          return;
        }
        this.truncate(step); // a series that goes back drops its stale tail
      }
      const m = this.times.length;
      if (m && time < this.times[m - 1]) this.timesSorted = false;
      this.steps.push(step);
      this.values.push(value);
      this.times.push(time);
    }

    /** Drop the points with step >= `step`. */
    truncate(step) {
      const i = lowerBound(this.steps, step);
      if (i === this.steps.length) return;
      this.steps.length = i;
      this.values.length = i;
      this.times.length = i;
      this.changes++;
      this.resetSmoothing();
    }

    /** Put `points` (sorted by step, all within [from, to]) in place of that range. */
    fill(from, to, points) {
      const lo = lowerBound(this.steps, from);
      const hi = lowerBound(this.steps, to + 1);
      this.steps.splice(lo, hi - lo, ...points.map((p) => p[0]));
      this.values.splice(lo, hi - lo, ...points.map((p) => toNumber(p[1])));
      this.times.splice(lo, hi - lo, ...points.map((p) => p[2]));
      this.timesSorted = this.times.every((t, i) => i === 0 || t >= this.times[i - 1]);
      this.changes++;
      this.resetSmoothing();
    }

    /** Keep about `target` points: each bucket's min and max, and the last point. */
    compact(target) {
      const n = this.steps.length;
      const size = Math.ceil(n / Math.max(1, Math.floor(target / 2)));
      const keep = [];
      for (let start = 0; start < n; start += size) {
        const end = Math.min(n, start + size);
        let lo = start;
        let hi = start;
        for (let i = start; i < end; i++) {
          const v = this.values[i];
          if (v === null) continue;
          if (this.values[lo] === null || v < this.values[lo]) lo = i;
          if (this.values[hi] === null || v > this.values[hi]) hi = i;
        }
        keep.push(Math.min(lo, hi));
        if (hi !== lo) keep.push(Math.max(lo, hi));
      }
      if (keep[keep.length - 1] !== n - 1) keep.push(n - 1);
      this.steps = keep.map((i) => this.steps[i]);
      this.values = keep.map((i) => this.values[i]);
      this.times = keep.map((i) => this.times[i]);
      this.changes++;
      this.resetSmoothing();
    }

    /**
     * The EMA of the values, debiased like TensorBoard's: extended in place
     * while points are only appended, recomputed after any other change.
     */
    smoothed(weight) {
      if (this.sm === null || this.smWeight !== weight || this.smChanges !== this.changes) {
        this.sm = [];
        this.smWeight = weight;
        this.smChanges = this.changes;
        this.emaLast = 0;
        this.emaCount = 0;
      }
      const values = this.values;
      for (let i = this.sm.length; i < values.length; i++) {
        const v = values[i];
        if (v === null) {
          this.sm.push(null);
          continue;
        }
        this.emaLast = this.emaLast * weight + (1 - weight) * v;
        this.emaCount++;
        const debias = weight === 1 ? 1 : 1 - Math.pow(weight, this.emaCount);
        this.sm.push(this.emaLast / debias);
      }
      return this.sm;
    }

    /** x values (steps or times) in ascending order, with the matching value arrays. */
    columns(xAxis, cols) {
      if (xAxis === "step" || this.timesSorted) {
        return { xs: xAxis === "step" ? this.steps : this.times, cols };
      }
      const order = this.times.map((_, i) => i).sort((a, b) => this.times[a] - this.times[b]);
      return { xs: order.map((i) => this.times[i]), cols: cols.map((c) => order.map((i) => c[i])) };
    }
  }

  function lowerBound(sorted, value) {
    let lo = 0;
    let hi = sorted.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (sorted[mid] < value) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /**
   * uPlot wants one x array shared by every series: merge the sorted x
   * arrays of several runs, null where a run has no point (spanGaps joins them).
   */
  function join(parts) {
    if (parts.length === 1) return [parts[0].xs, ...parts[0].cols];
    const k = parts.length;
    const at = new Array(k).fill(0);
    const xs = [];
    const out = parts.map((p) => p.cols.map(() => []));
    for (;;) {
      let min = Infinity;
      for (let j = 0; j < k; j++) {
        const p = parts[j];
        if (at[j] < p.xs.length && p.xs[at[j]] < min) min = p.xs[at[j]];
      }
      if (min === Infinity) break;
      xs.push(min);
      for (let j = 0; j < k; j++) {
        const p = parts[j];
        const hit = at[j] < p.xs.length && p.xs[at[j]] === min;
        for (let c = 0; c < p.cols.length; c++) out[j][c].push(hit ? p.cols[c][at[j]] : null);
        if (hit) at[j]++;
      }
    }
    return [xs, ...out.flat()];
  }

  // --------------------------------------------------------------- state

  const settings = loadSettings();
  const state = {
    generation: 0,
    epoch: null,
    cutoff: 0,
    lastId: 0,           // highest event id received
    loading: true,
    connection: "connecting",
    source: null,
    reopenTimer: null,
    reopenDelay: 1000,
    hadError: false,
    runs: new Map(),     // run name -> run record
    series: new Map(),   // run + "\n" + metric -> Series
    charts: new Map(),   // metric name -> Chart
    pending: [],         // received events not yet applied
    panel: [],           // status/log/alert events, oldest first
    selected: null,
    maxPoints: 1000,
    runsDirty: true,
    rr: 0,               // round-robin start for chart redraws
  };

  function loadSettings() {
    const saved = {};
    try {
      Object.assign(saved, JSON.parse(localStorage.getItem("trainstream.settings") || "{}"));
    } catch (e) {
      /* a fresh profile or storage off */
    }
    const dark = window.matchMedia && matchMedia("(prefers-color-scheme: dark)").matches;
    return {
      smoothing: typeof saved.smoothing === "number" ? saved.smoothing : 0.6,
      log: saved.log === true,
      xAxis: saved.xAxis === "time" ? "time" : "step",
      theme: saved.theme === "dark" || saved.theme === "light" ? saved.theme : dark ? "dark" : "light",
      filter: "",
    };
  }

  function saveSettings() {
    try {
      const { smoothing, log, xAxis, theme } = settings;
      localStorage.setItem("trainstream.settings", JSON.stringify({ smoothing, log, xAxis, theme }));
    } catch (e) {
      /* storage off: settings last for this page only */
    }
  }

  const seriesKey = (run, name) => `${run}\n${name}`;

  function ensureRun(name, info) {
    let run = state.runs.get(name);
    if (!run) {
      // ?run=NAME (repeatable, as a notebook's iframe gives): only those on
      // the charts, and one alone is selected; the others stay in the list.
      const only = new URLSearchParams(location.search).getAll("run");
      run = {
        name,
        state: "created",
        updated: null,
        hparams: {},
        metrics: new Set(),
        color: PALETTE[state.runs.size % PALETTE.length],
        visible: !only.length || only.includes(name),
        rewindId: 0,
        el: null,
      };
      if (only.length === 1 && only[0] === name) state.selected = name;
      state.runs.set(name, run);
      state.runsDirty = true;
    }
    if (info) {
      run.state = info.state || run.state;
      run.updated = info.updated || run.updated;
    }
    return run;
  }

  function ensureSeries(run, name) {
    const key = seriesKey(run.name, name);
    let s = state.series.get(key);
    if (!s) {
      s = new Series(run.name, name);
      state.series.set(key, s);
      run.metrics.add(name);
      ensureChart(name).dirty = true;
    }
    return s;
  }

  function touch(run, time) {
    if (typeof time === "number" && (run.updated === null || time > run.updated)) run.updated = time;
    state.runsDirty = true;
  }

  // -------------------------------------------------------------- events

  function applyEvent(ev) {
    const run = ensureRun(ev.run);
    touch(run, ev.time);
    switch (ev.type) {
      case "metric": {
        if (run.state === "created" || run.state === "stalled") run.state = "running";
        const s = ensureSeries(run, ev.name);
        if (s.seenStep !== null && ev.step < s.seenStep) {
          // Steps went back (resumed from a checkpoint): a new segment,
          // never in the loaded history; append() drops the stale tail.
          s.wentBackId = ev.id;
          s.boundary = null;
        }
        s.seenStep = ev.step;
        if (s.boundary !== null) {
          if (ev.step <= s.boundary) return; // already in the loaded history
          s.boundary = null;
        }
        const previous = s.lastStep();
        s.append(ev.step, toNumber(ev.value), ev.time);
        // Memory and redraw time stay bounded on a long live session.
        if (s.steps.length > state.maxPoints * 4) s.compact(state.maxPoints * 2);
        if (ev.coalesced && previous !== null && ev.step - previous > 1) {
          fillGap(s, previous + 1, ev.step - 1); // the server folded points: fetch them
        }
        markChart(ev.name);
        return;
      }
      case "status":
        run.state = ev.state;
        if (typeof ev.rewind_to === "number") {
          // The server announces a rewind after the batch whose step went
          // back: series that went back since the last announcement have
          // dropped their own stale tail already; the others drop it now.
          for (const name of run.metrics) {
            const s = state.series.get(seriesKey(run.name, name));
            if (s.wentBackId > run.rewindId) continue;
            s.boundary = null;
            s.truncate(ev.rewind_to);
            markChart(name);
          }
          run.rewindId = ev.id;
        }
        addPanelEvent(ev);
        return;
      case "hparams":
        Object.assign(run.hparams, ev.params || {});
        if (state.selected === run.name) renderHparams();
        return;
      case "log":
      case "alert":
        addPanelEvent(ev);
        return;
      case "histogram":
      case "image":
      case "pr_curve":
      case "layout":
        applyMedia(ev);
        return;
      default:
        return;
    }
  }

  function applyPending() {
    const events = state.pending;
    state.pending = [];
    for (const ev of events) applyEvent(ev);
  }

  async function fillGap(s, from, to) {
    const generation = state.generation;
    const changes = s.changes;
    try {
      const h = await api(metricPath(s.run, s.name), {
        from_step: from,
        to_step: to,
        max_points: state.maxPoints,
      });
      if (generation !== state.generation || changes !== s.changes) return;
      s.fill(from, to, h.points);
      markChart(s.name);
    } catch (e) {
      console.warn(`trainstream: could not fill ${s.run} ${s.name} ${from}..${to}: ${e.message}`);
    }
  }

  // -------------------------------------------------------------- stream

  function openStream(afterId) {
    closeStream();
    const generation = state.generation;
    const source = new EventSource(urlFor("events", { last_event_id: afterId }, true));
    state.source = source;
    const onEvent = (message) => {
      if (generation !== state.generation) return;
      const ev = JSON.parse(message.data);
      if (ev.id <= state.lastId) return; // seen before this reconnect
      state.lastId = ev.id;
      state.pending.push(ev);
    };
    for (const type of EVENT_TYPES) source.addEventListener(type, onEvent);
    source.addEventListener("reset", (message) => {
      const data = JSON.parse(message.data);
      reload(`history reset (${data.reason})`);
    });
    source.addEventListener("overflow", () => {
      // Too slow for the server: it closes; resume after what we have.
      setConnection("connecting", "caught up after overflow");
      openStream(state.lastId);
    });
    source.onopen = () => {
      if (generation !== state.generation) return;
      state.reopenDelay = 1000;
      setConnection("live");
      if (state.hadError) {
        state.hadError = false;
        checkEpoch();
      }
    };
    source.onerror = () => {
      if (generation !== state.generation) return;
      state.hadError = true;
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (refused, 401, ...): reopen from the last id.
        setConnection("offline", "retrying");
        scheduleReopen();
      } else {
        setConnection("connecting", "reconnecting");
      }
    };
  }

  function closeStream() {
    if (state.source) state.source.close();
    state.source = null;
    clearTimeout(state.reopenTimer);
  }

  function scheduleReopen() {
    clearTimeout(state.reopenTimer);
    const delay = state.reopenDelay;
    state.reopenDelay = Math.min(delay * 2, 15000);
    state.reopenTimer = setTimeout(() => openStream(state.lastId), delay);
  }

  /** After a reconnect: the same history (epoch), or reload everything. */
  async function checkEpoch() {
    try {
      const health = await api("api/health");
      if (health.epoch !== state.epoch) reload("the server has another history");
    } catch (e) {
      /* the stream says how the connection is */
    }
  }

  // --------------------------------------------------------------- load

  async function load() {
    const generation = ++state.generation;
    const current = () => generation === state.generation;
    setConnection("connecting");
    let health;
    try {
      health = await api("api/health");
    } catch (e) {
      if (!current()) return;
      setConnection("offline", e.message);
      setTimeout(() => current() && load(), 2000);
      return;
    }
    if (!current()) return;
    state.epoch = health.epoch;
    state.cutoff = health.last_id;
    state.lastId = health.last_id;
    state.loading = true;
    openStream(health.last_id);
    try {
      const { runs } = await api("api/runs");
      if (!current()) return;
      runs.sort((a, b) => (a.created || 0) - (b.created || 0) || (a.run < b.run ? -1 : 1));
      for (const info of runs) ensureRun(info.run, info);
      state.maxPoints = pointsPerChart();
      const tasks = [];
      for (const info of runs) {
        tasks.push(() => loadRun(info.run, current));
        for (const name of info.metrics) tasks.push(() => loadSeries(info.run, name, current));
      }
      tasks.push(() => loadPanelEvents(current));
      await inParallel(tasks, HISTORY_CONCURRENCY);
    } catch (e) {
      if (!current()) return;
      if (e.status === 401) {
        setConnection("unauthorized", "open the page as /?token=TOKEN");
        closeStream();
        return;
      }
      setConnection("offline", `loading history failed: ${e.message}`);
      setTimeout(() => current() && reload("retry"), 3000);
      return;
    }
    if (!current()) return;
    state.loading = false;
    renderRuns();
  }

  async function loadRun(name, current) {
    const detail = await api(runPath(name));
    if (!current()) return;
    const run = ensureRun(name, detail);
    Object.assign(run.hparams, detail.hparams || {});
    if (state.selected === name) renderHparams();
    await loadMedia(name, detail, current);
  }

  async function loadSeries(runName, name, current) {
    const h = await api(metricPath(runName, name), { max_points: state.maxPoints });
    if (!current()) return;
    const s = ensureSeries(ensureRun(runName), name);
    s.setHistory(h.points);
    markChart(name);
  }

  async function loadPanelEvents(current) {
    const after = Math.max(0, state.cutoff - RECENT_EVENTS_WINDOW);
    const { events } = await api("api/events", {
      after,
      type: "status,log,alert",
      limit: 10000,
    });
    if (!current()) return;
    // Only those up to the cutoff: later ones arrive on the stream.
    for (const ev of events) if (ev.id <= state.cutoff) addPanelEvent(ev, true);
    renderPanel();
  }

  async function inParallel(tasks, width) {
    let next = 0;
    const worker = async () => {
      while (next < tasks.length) await tasks[next++]();
    };
    await Promise.all(Array.from({ length: Math.min(width, tasks.length) }, worker));
  }

  function pointsPerChart() {
    const area = $("charts").clientWidth || 800;
    const columns = Math.max(1, Math.floor(area / 430));
    const width = area / columns;
    return Math.max(200, Math.min(8000, Math.round(2 * width)));
  }

  function reload(reason) {
    console.info(`trainstream: reloading: ${reason}`);
    closeStream();
    for (const chart of state.charts.values()) chart.destroy();
    state.charts.clear();
    resetMedia();
    state.runs.clear();
    state.series.clear();
    state.pending = [];
    state.panel = [];
    names.disconnect();
    $("runs").textContent = "";
    renderPanel();
    renderHparams();
    updateEmpty();
    load();
  }

  // -------------------------------------------------------------- charts

  class Chart {
    constructor(name) {
      this.name = name;
      this.dirty = true;
      this.zoomed = false;
      this.onscreen = true;
      this.layout = "";
      this.plot = null;
      this.card = document.createElement("div");
      this.card.className = "chart";
      const title = document.createElement("h3");
      const label = document.createElement("span");
      label.textContent = name;
      const hint = document.createElement("span");
      hint.className = "hint";
      hint.textContent = "drag to zoom, double-click to reset";
      title.append(label, hint);
      this.target = document.createElement("div");
      this.target.className = "plot";
      this.card.append(title, this.target);
    }

    runs() {
      const out = [];
      for (const run of state.runs.values()) {
        if (run.visible && run.metrics.has(this.name)) {
          out.push({ run, s: state.series.get(seriesKey(run.name, this.name)) });
        }
      }
      return out;
    }

    shown() {
      return !settings.filter || this.name.toLowerCase().includes(settings.filter);
    }

    update() {
      this.dirty = false;
      const runs = this.runs();
      const smooth = settings.smoothing > 0;
      const layout = [settings.theme, settings.log, settings.xAxis, smooth, ...runs.map((r) => r.run.name)].join("\n");
      const data = this.data(runs, smooth);
      if (!this.plot || layout !== this.layout) {
        this.layout = layout;
        this.build(runs, smooth, data);
      } else {
        this.plot.setData(data);
      }
    }

    data(runs, smooth) {
      if (!runs.length) return [[]];
      const parts = runs.map(({ s }) => {
        const cols = smooth ? [s.values, s.smoothed(settings.smoothing)] : [s.values];
        return s.columns(settings.xAxis, cols);
      });
      const data = join(parts);
      if (settings.log) {
        for (let c = 1; c < data.length; c++) data[c] = data[c].map((v) => (v !== null && v > 0 ? v : null));
      }
      return data;
    }

    build(runs, smooth, data) {
      if (this.plot) this.plot.destroy();
      const css = getComputedStyle(document.documentElement);
      const color = (name) => css.getPropertyValue(name).trim();
      const axis = {
        stroke: color("--axis"),
        grid: { stroke: color("--grid"), width: 1 },
        ticks: { stroke: color("--grid"), width: 1 },
      };
      const time = settings.xAxis === "time";
      const series = [
        {
          label: time ? "time" : "step",
          value: (u, v) => (v == null ? "–" : time ? new Date(v * 1000).toLocaleString() : String(v)),
        },
      ];
      const raw = [];
      const named = [];
      for (const { run } of runs) {
        if (smooth) {
          raw.push(series.length);
          series.push({
            label: `${run.name} (raw)`,
            stroke: `${run.color}44`,
            width: 1,
            spanGaps: true,
            points: { show: false },
            value: legendValue(0),
          });
        }
        named.push([series.length, run.name]);
        series.push({
          label: run.name,
          stroke: run.color,
          width: 1.5,
          spanGaps: true,
          points: { show: false },
          // The logged value, not the smoothed one: the raw series is the one before.
          value: legendValue(smooth ? 1 : 0),
        });
      }
      const chart = this;
      this.plot = new uPlot(
        {
          width: this.width(),
          height: CHART_HEIGHT,
          series,
          scales: {
            x: { time, auto: () => !chart.zoomed },
            y: settings.log ? { distr: 3, log: 10 } : {},
          },
          axes: [
            { ...axis, space: 60 },
            {
              ...axis,
              size: axisSize,
              values: (u, splits, i, space, incr) => formatTicks(splits, incr, settings.log),
            },
          ],
          cursor: {
            drag: { x: true, y: false },
            sync: { key: "trainstream" },
            points: { size: 6 },
            dataIdx: nearestValue,
          },
          legend: { live: true },
          hooks: {
            setScale: [
              (u, key) => {
                if (key !== "x") return;
                const xs = u.data[0];
                const n = xs ? xs.length : 0;
                chart.zoomed = n > 1 && (u.scales.x.min > xs[0] || u.scales.x.max < xs[n - 1]);
              },
            ],
            // Off the chart uPlot shows "--": show the latest values instead.
            setData: [(u) => u.status === 1 && u.cursor.left < 0 && showLatest(u)],
            setLegend: [(u) => u.legend.idx == null && showLatest(u)],
          },
        },
        data,
        this.target
      );
      showLatest(this.plot);
      const rows = this.plot.root.querySelectorAll(".u-legend .u-series");
      for (const i of raw) if (rows[i]) rows[i].classList.add("raw");
      for (const [i, name] of named) {
        const label = rows[i] && rows[i].querySelector(".u-label");
        if (label) fitName(label, name);
      }
    }

    width() {
      return Math.max(200, this.target.clientWidth || this.card.clientWidth - 16 || 400);
    }

    resize() {
      if (this.plot) this.plot.setSize({ width: this.width(), height: CHART_HEIGHT });
    }

    destroy() {
      if (this.plot) this.plot.destroy();
      this.plot = null;
      this.card.remove();
    }
  }

  /**
   * The legend's value of a series: `offset` series before it holds the
   * value shown (1: the raw series of a smoothed one). At the last index
   * (the legend off the chart) a run that has no point there shows its own
   * latest value.
   */
  function legendValue(offset) {
    return (u, v, sidx, idx) => {
      if (idx == null) return "–";
      const col = u.data[sidx - offset];
      let i = idx;
      if (i === u.data[0].length - 1) while (i > 0 && col[i] == null) i--;
      return formatValue(col[i]);
    };
  }

  /** The legend at the last point, as when the cursor is off the chart. */
  function showLatest(u) {
    const n = u.data[0] ? u.data[0].length : 0;
    if (n) u.setLegend({ idx: n - 1 }, false);
  }

  /** Under the cursor, each series' point nearest in x: runs log at different steps. */
  function nearestValue(u, sidx, idx) {
    const col = u.data[sidx];
    if (sidx === 0 || idx == null || col[idx] != null) return idx;
    const xs = u.data[0];
    let lo = idx - 1;
    while (lo >= 0 && col[lo] == null) lo--;
    let hi = idx + 1;
    while (hi < col.length && col[hi] == null) hi++;
    if (lo < 0) return hi < col.length ? hi : idx;
    if (hi >= col.length) return lo;
    return xs[idx] - xs[lo] <= xs[hi] - xs[idx] ? lo : hi;
  }

  const measurer = document.createElement("canvas").getContext("2d");

  function textWidth(text, font) {
    measurer.font = font;
    return measurer.measureText(text).width;
  }

  /**
   * The y axis as wide as its widest label (uPlot's dynamic axis size).
   * Every pass of uPlot's layout measures the labels of that pass: they
   * change while the plot's height settles (a stale size cut "1.00" to
   * ".00"), and they depend on the height only, never on this width.
   */
  function axisSize(u, values, axisIdx) {
    const axis = u.axes[axisIdx];
    let widest = 0;
    for (const v of values || []) if (v) widest = Math.max(widest, textWidth(String(v), axis.font[0]));
    return Math.ceil(axis.ticks.size + axis.gap + widest / devicePixelRatio + 4);
  }

  /** "1234567.5" -> "1,234,567.5" */
  function group(s) {
    const dot = s.indexOf(".");
    const int = dot < 0 ? s : s.slice(0, dot);
    return int.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (dot < 0 ? "" : s.slice(dot));
  }

  /** A value in a legend: up to 6 significant digits, exponent form if very large or small. */
  function formatValue(v) {
    if (v == null) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(5).replace(/\.?0+e/, "e");
    return group(String(Number(v.toPrecision(6))));
  }

  /** 10^k of the last digit of `x`: 5e-6 -> -6, 2.5e-7 -> -8, 1e9 -> 9. */
  function lastDigit(x) {
    const [mantissa, exp] = Number(Math.abs(x).toPrecision(6)).toExponential().split("e");
    const dot = mantissa.indexOf(".");
    return Number(exp) - (dot < 0 ? 0 : mantissa.length - dot - 1);
  }

  /**
   * The y axis's tick labels: one notation for the axis, and as many digits
   * as the step between ticks needs, so every label is whole and distinct
   * (1.23e+11, 3.00e-4, 0.5, 1,234).
   */
  function formatTicks(splits, incr, log) {
    if (log || !(incr > 0)) return splits.map((v) => (v == null ? "" : formatValue(v)));
    const finite = splits.filter((v) => v != null && Number.isFinite(v));
    const big = Math.max(0, ...finite.map(Math.abs));
    const pos = lastDigit(incr);
    if (big !== 0 && (big >= 1e5 || big < 1e-3)) {
      const digits = Math.max(0, Number(big.toExponential().split("e")[1]) - pos);
      return splits.map((v) => (v == null ? "" : v === 0 ? "0" : v.toExponential(Math.min(digits, 20))));
    }
    const decimals = Math.min(20, Math.max(0, -pos));
    return splits.map((v) => (v == null ? "" : group((v === 0 ? 0 : v).toFixed(decimals))));
  }

  /** middle("experiment-resnet50-a", 14) -> "experim…net50-a": `keep` characters of start and end. */
  function middle(text, keep) {
    const head = Math.ceil(keep / 2);
    return `${text.slice(0, head)}…${text.slice(text.length - (keep - head))}`;
  }

  /**
   * Show `text` in `el` (whose width CSS bounds), cut in the middle when it
   * does not fit, so names that share a long prefix stay distinguishable;
   * the full text on hover.
   */
  function fitName(el, text) {
    el.title = text;
    el.textContent = text;
    const room = el.clientWidth;
    if (!room || el.scrollWidth <= room) return;
    const style = getComputedStyle(el);
    const font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    let lo = 0;
    let hi = text.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (textWidth(middle(text, mid), font) <= room - 1) lo = mid;
      else hi = mid - 1;
    }
    el.textContent = middle(text, lo);
    // Canvas and layout may round differently: the page has the last word.
    while (lo > 0 && el.scrollWidth > el.clientWidth) el.textContent = middle(text, --lo);
  }

  const visibility = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const chart = entry.target.chart;
      if (chart) chart.onscreen = entry.isIntersecting;
    }
  });

  function ensureChart(name) {
    let chart = state.charts.get(name);
    if (chart) return chart;
    chart = new Chart(name);
    state.charts.set(name, chart);
    chart.card.chart = chart;
    const names = [...state.charts.keys()].sort();
    const after = names[names.indexOf(name) + 1];
    const container = $("charts");
    container.insertBefore(chart.card, after ? state.charts.get(after).card : mediaHead());
    chart.card.hidden = !chart.shown();
    visibility.observe(chart.card);
    updateEmpty();
    return chart;
  }

  function markChart(name) {
    const chart = state.charts.get(name);
    if (chart) chart.dirty = true;
  }

  function markAll() {
    for (const chart of state.charts.values()) chart.dirty = true;
  }

  /** Redraw dirty, visible charts, round robin, within the frame budget. */
  function drawCharts(start) {
    const charts = [...state.charts.values()];
    const n = charts.length;
    for (let k = 0; k < n; k++) {
      const chart = charts[(state.rr + k) % n];
      if (!chart.dirty || chart.card.hidden || !chart.onscreen) continue;
      if (performance.now() - start > FRAME_BUDGET_MS) {
        state.rr = (state.rr + k) % n; // go on from here next frame
        return;
      }
      chart.update();
    }
  }

  function frame() {
    requestAnimationFrame(frame);
    const start = performance.now();
    if (!state.loading && state.pending.length) applyPending();
    if (state.runsDirty) renderRuns();
    drawCharts(start);
    drawMedia();
  }

  // ------------------------------------------------------------ side panel

  function renderRuns() {
    state.runsDirty = false;
    const list = $("runs");
    const now = Date.now() / 1000;
    for (const run of state.runs.values()) {
      if (!run.el) run.el = runItem(run, list);
      const { stateEl, ageEl } = run.el;
      stateEl.textContent = run.state;
      stateEl.className = `state state-${run.state}`;
      ageEl.textContent = run.updated ? age(now - run.updated) : "";
      ageEl.title = run.updated ? `last event ${new Date(run.updated * 1000).toLocaleString()}` : "";
      run.el.item.classList.toggle("selected", state.selected === run.name);
    }
    $("run-count").textContent = state.runs.size ? `(${state.runs.size})` : "";
  }

  const names = new ResizeObserver((entries) => {
    for (const entry of entries) fitName(entry.target, entry.target.title);
  });

  function runItem(run, list) {
    const item = document.createElement("li");
    item.title = run.name;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = run.visible;
    box.title = "show on the charts";
    box.addEventListener("click", (e) => e.stopPropagation());
    box.addEventListener("change", () => {
      run.visible = box.checked;
      for (const name of run.metrics) markChart(name);
      refreshMediaVisibility();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = run.color;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = run.name;
    label.title = run.name;
    const right = document.createElement("span");
    const stateEl = document.createElement("span");
    const ageEl = document.createElement("span");
    ageEl.className = "age";
    right.append(stateEl, " ", ageEl);
    item.append(box, swatch, label, right);
    item.addEventListener("click", () => {
      state.selected = state.selected === run.name ? null : run.name;
      state.runsDirty = true;
      renderHparams();
      renderPanel();
    });
    list.append(item);
    fitName(label, run.name);
    names.observe(label); // the column narrows when the age or a scrollbar grows
    return { item, stateEl, ageEl };
  }

  function age(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m`;
    if (s < 86400) return `${Math.floor(s / 3600)}h`;
    return `${Math.floor(s / 86400)}d`;
  }

  function renderHparams() {
    const table = $("hparams");
    table.textContent = "";
    const run = state.selected ? state.runs.get(state.selected) : null;
    $("hparams-run").textContent = run ? run.name : "(select a run)";
    if (!run) return;
    const keys = Object.keys(run.hparams).sort();
    for (const key of keys) {
      const row = table.insertRow();
      row.insertCell().textContent = key;
      row.insertCell().textContent = JSON.stringify(run.hparams[key]);
    }
    if (!keys.length) table.insertRow().insertCell().textContent = "none logged";
  }

  function addPanelEvent(ev, quiet) {
    state.panel.push(ev);
    if (state.panel.length > PANEL_EVENTS * 2) state.panel = state.panel.slice(-PANEL_EVENTS);
    if (quiet || (state.selected && ev.run !== state.selected)) return;
    const list = $("events");
    list.prepend(panelItem(ev));
    while (list.childElementCount > PANEL_EVENTS) list.lastElementChild.remove();
  }

  function renderPanel() {
    const list = $("events");
    list.textContent = "";
    const shown = state.panel.filter((ev) => !state.selected || ev.run === state.selected);
    for (const ev of shown.slice(-PANEL_EVENTS).reverse()) list.append(panelItem(ev));
  }

  function panelItem(ev) {
    const item = document.createElement("li");
    const kind = document.createElement("span");
    kind.className = "kind";
    let text = "";
    if (ev.type === "status") {
      item.className = `type-status state-${ev.state}`;
      kind.textContent = ev.state;
      text = [
        ev.epoch !== undefined ? `epoch ${ev.epoch}` : "",
        ev.rewind_to !== undefined ? `rewound to step ${ev.rewind_to}` : "",
        ev.message || "",
      ].filter(Boolean).join(" · ");
    } else if (ev.type === "log") {
      item.className = `type-log level-${ev.level}`;
      kind.textContent = ev.level;
      text = ev.message;
    } else {
      item.className = "type-alert";
      kind.textContent = `alert ${ev.kind}`;
      text = [ev.name, ev.message].filter(Boolean).join(": ");
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${ev.run} · ${new Date(ev.time * 1000).toLocaleTimeString()}`;
    item.append(kind, document.createTextNode(text), meta);
    return item;
  }

  function setConnection(kind, detail) {
    state.connection = kind;
    const el = $("connection");
    el.dataset.state = kind;
    $("connection-text").textContent = detail ? `${kind}: ${detail}` : kind;
    el.title = `last event id ${state.lastId}`;
  }

  function updateEmpty() {
    $("empty").hidden = state.charts.size > 0 || media.cards.size > 0 || media.layouts.size > 0;
  }

  // ------------------------------------------------------------- controls

  function applyTheme() {
    document.documentElement.dataset.theme = settings.theme;
    $("theme").textContent = settings.theme === "dark" ? "light theme" : "dark theme";
  }

  function setupControls() {
    const slider = $("smoothing");
    const shown = $("smoothing-value");
    slider.value = String(settings.smoothing);
    shown.textContent = settings.smoothing.toFixed(2);
    slider.addEventListener("input", () => {
      settings.smoothing = Number(slider.value);
      shown.textContent = settings.smoothing.toFixed(2);
      saveSettings();
      markAll();
    });
    const log = $("log-scale");
    log.checked = settings.log;
    log.addEventListener("change", () => {
      settings.log = log.checked;
      saveSettings();
      markAll();
    });
    const xAxis = $("x-axis");
    xAxis.value = settings.xAxis;
    xAxis.addEventListener("change", () => {
      settings.xAxis = xAxis.value;
      for (const chart of state.charts.values()) chart.zoomed = false;
      saveSettings();
      markAll();
    });
    const filter = $("metric-filter");
    filter.addEventListener("input", () => {
      settings.filter = filter.value.trim().toLowerCase();
      for (const chart of state.charts.values()) {
        chart.card.hidden = !chart.shown();
        chart.dirty = true;
      }
      refreshMediaVisibility();
    });
    $("theme").addEventListener("click", () => {
      settings.theme = settings.theme === "dark" ? "light" : "dark";
      applyTheme();
      saveSettings();
      markAll();
      for (const card of media.cards.values()) {
        if (card.plot) card.plot.destroy();
        card.plot = null;
        card.dirty = true;
      }
      for (const card of media.layouts.values()) for (const c of card.charts) c.sig = "";
    });
    new ResizeObserver(() => {
      for (const card of media.cards.values()) card.dirty = true;
      for (const chart of state.charts.values()) chart.resize();
    }).observe($("charts"));
  }

  // --------------------------------------------------------------- media
  //
  // Images, histograms, PR curves and custom-scalar layouts (docs/protocol.md,
  // "Media events"): one card per (kind, run, name), after the charts. A run's
  // detail (api/runs/{run}) lists each series' [step, id]; an image is
  // fetched by its id when shown (api/events?after=id-1&limit=1), the latest
  // histograms at load; live events bring their data with them. The cutoff
  // rule of the metrics holds: a live event whose id is already listed is
  // skipped, so no step is shown twice.

  const MEDIA_KEYS = { image: "images", histogram: "histograms", pr_curve: "pr_curves" };
  const HISTOGRAM_STEPS = 20;  // steps a histogram card draws, the latest
  const HISTOGRAM_BINS = 30;   // bins each step is drawn with (TensorBoard's)
  const IMAGES_KEPT = 64;      // decoded images a card keeps (others fetched again)
  const media = { cards: new Map(), layouts: new Map() };
  const mediaKey = (kind, run, name) => `${kind}\n${run}\n${name}`;

  function mediaHead() {
    let head = $("media-head");
    if (!head) {
      head = document.createElement("h2");
      head.id = "media-head";
      head.className = "media-head";
      head.textContent = "Images, histograms, PR curves";
      head.hidden = true;
      $("charts").append(head);
    }
    return head;
  }

  function mediaCard(kind, run, name) {
    const key = mediaKey(kind, run, name);
    let card = media.cards.get(key);
    if (card) return card;
    card = kind === "image" ? new ImageCard(run, name) : kind === "histogram"
      ? new HistogramCard(run, name) : new CurveCard(run, name);
    card.kind = kind;
    media.cards.set(key, card);
    card.el.dataset.kind = kind;
    card.el.dataset.run = run;
    card.el.dataset.name = name;
    // After the charts, sorted by kind, name, run.
    const head = mediaHead();
    head.hidden = false;
    const keys = [...media.cards.keys()].sort();
    const next = keys[keys.indexOf(key) + 1];
    $("charts").insertBefore(card.el, next ? media.cards.get(next).el : null);
    card.el.hidden = !mediaShown(card);
    updateEmpty();
    return card;
  }

  function mediaShown(card) {
    const run = state.runs.get(card.run);
    return (!run || run.visible) && (!settings.filter || card.name.toLowerCase().includes(settings.filter));
  }

  function refreshMediaVisibility() {
    for (const card of media.cards.values()) {
      card.el.hidden = !mediaShown(card);
      if (!card.el.hidden) card.dirty = true;
    }
  }

  function cardShell(title, run) {
    const el = document.createElement("div");
    el.className = "chart media-card";
    const h = document.createElement("h3");
    const label = document.createElement("span");
    label.textContent = title;
    const who = document.createElement("span");
    who.className = "hint";
    who.textContent = run;
    h.append(label, who);
    el.append(h);
    return el;
  }

  /** Insert [step, id] into a sorted list (a step again: the newer id). False if known. */
  function addStep(steps, step, id) {
    const i = lowerBound(steps.map((s) => s[0]), step);
    if (i < steps.length && steps[i][0] === step) {
      if (steps[i][1] >= id) return false;
      steps[i][1] = id;
      return true;
    }
    steps.splice(i, 0, [step, id]);
    return true;
  }

  class ImageCard {
    constructor(run, name) {
      this.run = run;
      this.name = name;
      this.steps = [];        // [step, id], by step
      this.data = new Map();  // id -> data: URL
      this.follow = true;     // the slider follows the latest step until moved
      this.index = -1;
      this.shownId = 0;
      this.el = cardShell(name, run);
      this.img = document.createElement("img");
      this.img.className = "media-image";
      this.img.alt = `${name} (${run})`;
      const row = document.createElement("div");
      row.className = "media-row";
      this.slider = document.createElement("input");
      this.slider.type = "range";
      this.slider.min = "0";
      this.slider.max = "0";
      this.slider.value = "0";
      this.slider.title = "step";
      this.label = document.createElement("output");
      row.append(this.slider, this.label);
      this.el.append(this.img, row);
      this.slider.addEventListener("input", () => {
        this.index = Number(this.slider.value);
        this.follow = this.index === this.steps.length - 1;
        this.show();
      });
    }

    add(step, id, ev) {
      if (!addStep(this.steps, step, id)) return;
      if (ev) this.keep(id, ev);
      if (this.follow) this.index = this.steps.length - 1;
      else if (this.index >= 0 && this.steps[this.index][1] !== this.shownId) {
        // a step was inserted before the one shown: keep showing that one
        const at = this.steps.findIndex((s) => s[1] === this.shownId);
        if (at >= 0) this.index = at;
      }
      this.show();
    }

    keep(id, ev) {
      this.data.set(id, `data:image/${ev.format};base64,${ev.data}`);
      if (this.data.size > IMAGES_KEPT) this.data.delete(this.data.keys().next().value);
    }

    async show() {
      const n = this.steps.length;
      this.slider.max = String(Math.max(0, n - 1));
      if (this.index < 0 || this.index >= n) this.index = n - 1;
      this.slider.value = String(this.index);
      this.slider.disabled = n < 2;
      if (n === 0) return;
      const [step, id] = this.steps[this.index];
      this.label.textContent = `step ${step} (${this.index + 1}/${n})`;
      let src = this.data.get(id);
      if (!src) {
        const generation = state.generation;
        try {
          const { events } = await api("api/events", {
            after: id - 1, limit: 1, run: this.run, type: "image",
          });
          if (generation !== state.generation || !events.length || events[0].id !== id) return;
          this.keep(id, events[0]);
          src = this.data.get(id);
        } catch (e) {
          console.warn(`trainstream: image ${this.name} of ${this.run} at step ${step}: ${e.message}`);
          return;
        }
        if (this.steps[this.index][1] !== id) return; // the slider moved on meanwhile
      }
      this.shownId = id;
      this.shownStep = step;
      this.img.src = src;
    }

    info() {
      return { steps: this.steps.map((s) => s[0]), shown: this.shownStep, follow: this.follow,
               width: this.img.naturalWidth, height: this.img.naturalHeight };
    }
  }

  class HistogramCard {
    constructor(run, name) {
      this.run = run;
      this.name = name;
      this.steps = [];   // [step, id, buckets], by step, the latest HISTOGRAM_STEPS
      this.dirty = true;
      this.el = cardShell(name, run);
      this.canvas = document.createElement("canvas");
      this.canvas.className = "media-histogram";
      this.caption = document.createElement("div");
      this.caption.className = "media-row muted";
      this.el.append(this.canvas, this.caption);
    }

    add(step, id, ev) {
      const i = lowerBound(this.steps.map((s) => s[0]), step);
      if (i < this.steps.length && this.steps[i][0] === step) {
        if (this.steps[i][1] >= id) return;
        this.steps[i] = [step, id, ev.buckets];
      } else {
        this.steps.splice(i, 0, [step, id, ev.buckets]);
      }
      if (this.steps.length > HISTOGRAM_STEPS) this.steps.splice(0, this.steps.length - HISTOGRAM_STEPS);
      this.dirty = true;
    }

    /** The TensorBoard "offset" view: one filled curve per step, the newest in front. */
    draw() {
      this.dirty = false;
      const width = this.el.clientWidth - 16 || 400;
      const height = CHART_HEIGHT - 30;
      const ratio = devicePixelRatio || 1;
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
      const g = this.canvas.getContext("2d");
      g.setTransform(ratio, 0, 0, ratio, 0, 0);
      g.clearRect(0, 0, width, height);
      const steps = this.steps;
      if (!steps.length) return;
      let lo = Infinity;
      let hi = -Infinity;
      for (const [, , buckets] of steps) {
        for (const [l, r, c] of buckets) {
          if (c > 0 && r >= l) {
            lo = Math.min(lo, l);
            hi = Math.max(hi, r);
          }
        }
      }
      if (!(hi >= lo)) return;
      if (hi === lo) { lo -= 0.5; hi += 0.5; }
      const bins = steps.map(([, , buckets]) => rebin(buckets, lo, hi, HISTOGRAM_BINS));
      const top = Math.max(1e-12, ...bins.flat());
      const css = getComputedStyle(document.documentElement);
      const axis = css.getPropertyValue("--axis").trim();
      const run = state.runs.get(this.run);
      const color = run ? run.color : PALETTE[0];
      const left = 8;
      const bottom = height - 18;
      const offset = steps.length > 1 ? Math.min(10, (bottom * 0.45) / (steps.length - 1)) : 0;
      const plotH = bottom - offset * (steps.length - 1) - 4;
      const plotW = width - left - 8 - offset * 0.5 * (steps.length - 1);
      for (let k = 0; k < steps.length; k++) {
        const base = bottom - offset * (steps.length - 1 - k);
        const shift = left + offset * 0.5 * (steps.length - 1 - k);
        const counts = bins[k];
        g.beginPath();
        g.moveTo(shift, base);
        for (let b = 0; b < counts.length; b++) {
          g.lineTo(shift + (plotW * (b + 0.5)) / counts.length, base - (plotH * counts[b]) / top);
        }
        g.lineTo(shift + plotW, base);
        g.closePath();
        g.globalAlpha = 0.25 + (0.6 * (k + 1)) / steps.length;
        g.fillStyle = color;
        g.fill();
        g.globalAlpha = 1;
        g.strokeStyle = css.getPropertyValue("--panel").trim() || "#fff";
        g.lineWidth = 1;
        g.stroke();
      }
      g.fillStyle = axis;
      g.font = "11px system-ui, sans-serif";
      g.textBaseline = "top";
      g.textAlign = "left";
      g.fillText(formatValue(lo), left, bottom + 4);
      g.textAlign = "right";
      g.fillText(formatValue(hi), left + plotW, bottom + 4);
      const first = steps[0][0];
      const last = steps[steps.length - 1][0];
      this.caption.textContent = steps.length > 1
        ? `steps ${first}–${last} (${steps.length} shown, newest in front)` : `step ${last}`;
    }

    info() {
      return { steps: this.steps.map((s) => s[0]) };
    }
  }

  /** Counts of `buckets` ([left, right, count]) spread over `n` equal bins of [lo, hi]. */
  function rebin(buckets, lo, hi, n) {
    const out = new Array(n).fill(0);
    const w = (hi - lo) / n;
    for (const [l, r, c] of buckets) {
      if (!(c > 0) || r < l) continue;
      if (r === l) {
        out[Math.min(n - 1, Math.max(0, Math.floor((l - lo) / w)))] += c;
        continue;
      }
      const b0 = Math.max(0, Math.floor((l - lo) / w));
      const b1 = Math.min(n - 1, Math.floor((r - lo) / w));
      for (let b = b0; b <= b1; b++) {
        const overlap = Math.min(r, lo + (b + 1) * w) - Math.max(l, lo + b * w);
        if (overlap > 0) out[b] += (c * overlap) / (r - l);
      }
    }
    return out;
  }

  class CurveCard {
    constructor(run, name) {
      this.run = run;
      this.name = name;
      this.latest = null;   // [step, id, event]
      this.dirty = true;
      this.plot = null;
      this.el = cardShell(`${name} (PR curve)`, run);
      this.target = document.createElement("div");
      this.target.className = "plot";
      this.caption = document.createElement("div");
      this.caption.className = "media-row muted";
      this.el.append(this.target, this.caption);
    }

    add(step, id, ev) {
      if (this.latest && (this.latest[0] > step || this.latest[1] >= id)) return;
      this.latest = [step, id, ev];
      this.dirty = true;
    }

    draw() {
      this.dirty = false;
      if (!this.latest) return;
      const [step, , ev] = this.latest;
      const n = Math.min(ev.precision.length, ev.recall.length);
      const points = [];
      for (let i = 0; i < n; i++) points.push([ev.recall[i], ev.precision[i]]);
      points.sort((a, b) => a[0] - b[0]);
      const data = [points.map((p) => p[0]), points.map((p) => p[1])];
      this.caption.textContent = `precision (y) against recall (x) at step ${step}`;
      const width = this.el.clientWidth - 16 || 400;
      if (this.plot) {
        this.plot.setData(data);
        return;
      }
      const css = getComputedStyle(document.documentElement);
      const axis = { stroke: css.getPropertyValue("--axis").trim(), grid: { stroke: css.getPropertyValue("--grid").trim() } };
      const run = state.runs.get(this.run);
      this.plot = new uPlot({
        width, height: CHART_HEIGHT - 40,
        scales: { x: { time: false, range: [0, 1] }, y: { range: [0, 1] } },
        axes: [axis, axis],
        legend: { show: false },
        series: [{}, { label: "precision", stroke: run ? run.color : PALETTE[0], width: 2 }],
      }, data, this.target);
    }

    info() {
      return { steps: this.latest ? [this.latest[0]] : [] };
    }
  }

  /**
   * A run's custom scalars (its latest `layout` event): one chart per entry,
   * drawing the run's metrics that the entry's tags name. As in TensorBoard,
   * a Multiline tag is a regular expression over metric names; a Margin
   * chart is value, lower and upper (the bounds dashed).
   */
  class LayoutCard {
    constructor(run) {
      this.run = run;
      this.charts = [];
      this.el = cardShell("custom scalars", run);
      this.el.classList.add("media-layout");
      this.el.dataset.kind = "layout";
      this.el.dataset.run = run;
    }

    set(layout) {
      for (const c of this.charts) if (c.plot) c.plot.destroy();
      this.el.querySelectorAll(".layout-chart").forEach((e) => e.remove());
      this.charts = [];
      for (const [category, charts] of Object.entries(layout || {})) {
        for (const [title, [kind, tags]] of Object.entries(charts)) {
          const box = document.createElement("div");
          box.className = "layout-chart";
          const head = document.createElement("div");
          head.className = "media-row";
          head.textContent = `${category} / ${title} (${kind}): ${tags.join(", ")}`;
          const target = document.createElement("div");
          target.className = "plot";
          box.append(head, target);
          this.el.append(box);
          const patterns = tags.map((t) => {
            try {
              return new RegExp(`^(?:${t})$`);
            } catch (e) {
              return { test: (name) => name === t };
            }
          });
          this.charts.push({ kind, tags, patterns, target, plot: null, shape: "", sig: "" });
        }
      }
    }

    /** The series each chart draws: Margin by position, Multiline every match. */
    seriesOf(chart) {
      const run = state.runs.get(this.run);
      if (!run) return [];
      const names = [...run.metrics].sort();
      const picked = chart.kind === "Margin"
        ? chart.tags.map((t) => (run.metrics.has(t) ? t : null)).filter(Boolean)
        : names.filter((n) => chart.patterns.some((p) => p.test(n)));
      return picked.map((n) => state.series.get(seriesKey(this.run, n))).filter(Boolean);
    }

    draw() {
      for (const chart of this.charts) {
        const series = this.seriesOf(chart);
        const sig = series.map((s) => `${s.name}:${s.steps.length}:${s.changes}`).join("|");
        if (sig === chart.sig && chart.plot) continue;
        chart.sig = sig;
        const data = series.length
          ? join(series.map((s) => ({ xs: s.steps, cols: [s.values] })))
          : [[]];
        const shape = [settings.theme, ...series.map((s) => s.name)].join("\n");
        if (chart.plot && shape === chart.shape) {
          chart.plot.setData(data);
          continue;
        }
        if (chart.plot) chart.plot.destroy();
        chart.shape = shape;
        const css = getComputedStyle(document.documentElement);
        const axis = { stroke: css.getPropertyValue("--axis").trim(), grid: { stroke: css.getPropertyValue("--grid").trim() } };
        chart.plot = new uPlot({
          width: Math.max(200, chart.target.clientWidth || this.el.clientWidth - 16 || 400),
          height: 160,
          scales: { x: { time: false } },
          axes: [axis, axis],
          legend: { show: true },
          series: [{ label: "step" }, ...series.map((s, i) => ({
            label: s.name,
            stroke: PALETTE[i % PALETTE.length],
            width: chart.kind === "Margin" && i > 0 ? 1 : 2,
            dash: chart.kind === "Margin" && i > 0 ? [4, 4] : undefined,
            spanGaps: true,
          }))],
        }, data, chart.target);
      }
    }

    info() {
      return this.charts.map((c) => ({
        kind: c.kind,
        tags: c.tags,
        drawn: c.plot ? c.plot.series.slice(1).map((x) => x.label) : [],
      }));
    }
  }

  function layoutCard(run, layout) {
    let card = media.layouts.get(run);
    if (!card) {
      card = new LayoutCard(run);
      media.layouts.set(run, card);
      mediaHead().hidden = false;
      $("charts").insertBefore(card.el, mediaHead().nextSibling);
    }
    card.set(layout);
    updateEmpty();
  }

  function applyMedia(ev) {
    if (ev.type === "layout") {
      layoutCard(ev.run, ev.layout);
      return;
    }
    const card = mediaCard(ev.type, ev.run, ev.name);
    card.add(ev.step, ev.id, ev);
  }

  /** A run's media at load: the cards from its detail, then their content. */
  async function loadMedia(runName, detail, current) {
    if (detail.layout) layoutCard(runName, detail.layout);
    const fetches = [];
    for (const [kind, key] of Object.entries(MEDIA_KEYS)) {
      for (const [name, index] of Object.entries(detail[key] || {})) {
        const card = mediaCard(kind, runName, name);
        if (kind === "image") {
          for (const [step, id] of index.steps) addStep(card.steps, step, id);
          card.show();
          continue;
        }
        const wanted = kind === "histogram" ? index.steps.slice(-HISTOGRAM_STEPS) : index.steps.slice(-1);
        if (!wanted.length) continue;
        const ids = new Map(wanted.map(([step, id]) => [id, step]));
        fetches.push(
          api("api/events", {
            after: wanted[0][1] - 1, run: runName, type: kind, name, limit: 1000,
          }).then(({ events }) => {
            if (!current()) return;
            for (const ev of events) if (ids.has(ev.id)) card.add(ev.step, ev.id, ev);
          }),
        );
      }
    }
    await Promise.all(fetches);
  }

  let layoutsDrawn = 0;

  function drawMedia() {
    for (const card of media.cards.values()) {
      if (card.dirty && card.draw && !card.el.hidden) card.draw();
    }
    // Layout charts follow their series: looked at twice a second.
    if (media.layouts.size && performance.now() - layoutsDrawn > 500) {
      layoutsDrawn = performance.now();
      for (const card of media.layouts.values()) card.draw();
    }
  }

  function resetMedia() {
    for (const card of media.cards.values()) {
      if (card.plot) card.plot.destroy();
      card.el.remove();
    }
    for (const card of media.layouts.values()) {
      for (const c of card.charts) if (c.plot) c.plot.destroy();
      card.el.remove();
    }
    media.cards.clear();
    media.layouts.clear();
    mediaHead().hidden = true;
  }

  // ------------------------------------------------------------ start

  /** Read-only hooks for tests and benchmarks. */
  window.trainstream = Object.freeze({
    points: (run, name) => {
      const s = state.series.get(seriesKey(run, name));
      return s ? s.steps.slice() : null;
    },
    values: (run, name) => {
      const s = state.series.get(seriesKey(run, name));
      return s ? s.values.slice() : null;
    },
    status: () => ({
      connection: state.connection,
      loading: state.loading,
      lastId: state.lastId,
      epoch: state.epoch,
      pending: state.pending.length,
      runs: [...state.runs.values()].map((r) => ({ run: r.name, state: r.state, updated: r.updated })),
      charts: [...state.charts.keys()],
      drawn: [...state.charts.values()].filter((c) => c.plot && !c.dirty).map((c) => c.name),
    }),
    /** The media cards: kind, run, name and what each holds (image: shown step, follow). */
    media: () => [...media.cards.values()].map((c) => ({ kind: c.kind, run: c.run, name: c.name, ...c.info() })),
    /** Each run's custom-scalar charts: kind, tags, and the series each draws. */
    layouts: () => Object.fromEntries([...media.layouts].map(([run, c]) => [run, c.info()])),
    /** What uPlot drew on a chart's y axis (CSS pixels; label x = pos - tick - gap, right-aligned). */
    yAxis: (name) => {
      const chart = state.charts.get(name);
      const axis = chart && chart.plot ? chart.plot.axes[1] : null;
      if (!axis || !axis._values) return null;
      return {
        labels: axis._values.slice(),
        splits: axis._splits.slice(),
        size: axis._size,
        pos: axis._pos,
        tick: axis.ticks.size,
        gap: axis.gap,
        font: axis.font[0],
        pxRatio: devicePixelRatio,
      };
    },
  });

  applyTheme();
  if (typeof uPlot === "undefined") {
    $("empty").textContent =
      "The chart library did not load: the server is missing uPlot's files (reinstall trainstream).";
    setConnection("offline", "uPlot missing");
    return;
  }
  setupControls();
  renderHparams();
  setInterval(() => {
    // Ages tick; and a hidden tab (no animation frames) still applies events.
    if (document.hidden && !state.loading && state.pending.length) applyPending();
    state.runsDirty = true;
  }, 1000);
  requestAnimationFrame(frame);
  load();
})();
