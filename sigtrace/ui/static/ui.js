// sigtrace's signals page: fetches <base>/data.json every few seconds and draws
// the signal map (SVG), the receivers table, the slowest recent sends and the
// endpoints.
//
// Hand-written vanilla JavaScript, no library: the page must work offline,
// ship inside the Python package and need no build step, and it draws one
// simple layered graph, which needs no graph library.
//
// Signal and receiver names come from user code. They are only ever inserted
// with createTextNode / textContent or as attribute values through
// setAttribute, never as HTML, so a name such as "<script>" shows as text.
"use strict";

(function () {
  const base = document.body.dataset.base;
  const MAP_LIMIT = 40;      // signals drawn before "show all"
  const ROW_LIMIT = 300;     // table rows shown before "show all"
  const RECENT_SHOWN = 8;    // slow sends shown
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    data: null,
    previous: new Map(),   // key -> [count, time]: calls/s between two refreshes
    rates: new Map(),
    sortKey: "calls",
    sortDir: -1,
    filter: "",
    mapAll: false,
    rowsAll: false,
    timer: null,
  };

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1e-3) return (seconds * 1e6).toFixed(seconds < 1e-5 ? 1 : 0) + " µs";
    if (seconds < 1) return (seconds * 1e3).toFixed(seconds < 1e-2 ? 2 : 1) + " ms";
    return seconds.toFixed(2) + " s";
  }

  function rate(value) {
    if (value === null || value === undefined) return "–";
    return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
  }

  function percent(errors, calls) {
    if (!calls) return errors ? "100%" : "0%";
    const p = (100 * errors) / calls;
    return (p >= 10 || p === 0 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  function short(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function ago(epochSeconds, now) {
    const s = Math.max(0, now - epochSeconds);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }

  function matches(...names) {
    if (!state.filter) return true;
    return names.some((n) => n.toLowerCase().includes(state.filter));
  }

  // ------------------------------------------------------------ the model

  function receiverState(r, threshold) {
    if (r.errors > 0) return "failing";
    if (r.calls === 0) return "idle";
    if (r.p99 !== null && r.p99 > threshold) return "slow";
    return "ok";
  }

  function updateRates(data) {
    const seen = new Map();
    const note = (key, count) => {
      const before = state.previous.get(key);
      if (before && data.time > before[1]) {
        state.rates.set(key, Math.max(0, count - before[0]) / (data.time - before[1]));
      }
      seen.set(key, [count, data.time]);
    };
    for (const s of data.signals) {
      note("s\u0000" + s.name, s.sends);
      for (const r of s.receivers) note("r\u0000" + s.name + "\u0000" + r.name, r.calls);
    }
    state.previous = seen;
  }

  function rows(data) {
    const out = [];
    for (const s of data.signals) {
      for (const r of s.receivers) {
        out.push({
          signal: s.name,
          receiver: r.name,
          calls: r.calls,
          rate: state.rates.has("r\u0000" + s.name + "\u0000" + r.name)
            ? state.rates.get("r\u0000" + s.name + "\u0000" + r.name) : null,
          errors: r.errors,
          errorRate: r.calls ? r.errors / r.calls : (r.errors ? 1 : 0),
          p50: r.p50, p95: r.p95, p99: r.p99,
          state: receiverState(r, data.slow_threshold),
        });
      }
    }
    return out;
  }

  // ------------------------------------------------------------- drawing

  function drawCards(data, all) {
    const cards = document.getElementById("cards");
    clear(cards);
    let sendRate = 0, haveRate = false;
    for (const s of data.signals) {
      const r = state.rates.get("s\u0000" + s.name);
      if (r !== undefined) { sendRate += r; haveRate = true; }
    }
    const errors = all.reduce((n, r) => n + r.errors, 0);
    const failing = all.filter((r) => r.state === "failing").length;
    const slow = all.filter((r) => r.state === "slow").length;
    const card = (value, label, cls) =>
      el("div", { class: "card " + (cls || "") }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
    cards.append(
      card(String(data.signals.length), "signals"),
      card(String(all.length), "receivers"),
      card(haveRate ? rate(sendRate) : "–", "sends / s"),
      card(String(errors), "receiver errors" + (failing ? " (" + failing + " failing)" : ""), errors ? "bad" : ""),
      card(String(slow), "slow receivers (p99 > " + duration(data.slow_threshold) + ")", slow ? "warn" : ""),
      card(String(data.recent.length), "slow or failed sends kept"),
    );
  }

  function drawMap(data) {
    const box = document.getElementById("map");
    const more = document.getElementById("map-more");
    clear(box);
    clear(more);
    const threshold = data.slow_threshold;
    const withReceivers = [];
    const lonely = [];
    for (const s of data.signals) {
      const receivers = s.receivers.filter((r) => matches(s.name, r.name));
      if (!receivers.length) {
        if (matches(s.name)) lonely.push(s.name);
        continue;
      }
      withReceivers.push({ s, receivers });
    }
    withReceivers.sort((a, b) => b.s.sends - a.s.sends || (a.s.name < b.s.name ? -1 : 1));
    const shown = state.mapAll ? withReceivers : withReceivers.slice(0, MAP_LIMIT);
    if (!shown.length) {
      box.appendChild(el("div", { class: "empty" }, state.filter ? "No signal or receiver matches the filter." : "No signal with receivers yet."));
    } else {
      const RH = 34, GAP = 14, W = 1140;
      const SX = 8, SW = 300, RX = 420, RW = 370, TX = RX + RW + 14;
      let height = 8;
      for (const { receivers } of shown) height += receivers.length * RH + GAP;
      const root = svg("svg", { viewBox: "0 0 " + W + " " + height, role: "img", "aria-label": "signal map" });
      let y = 8;
      for (const { s, receivers } of shown) {
        const laneHeight = receivers.length * RH;
        const cy = y + laneHeight / 2;
        const rateS = state.rates.get("s\u0000" + s.name);
        const node = svg("g", { class: "node signal", "data-signal": s.name });
        node.appendChild(svg("title", {}, s.name));
        node.appendChild(svg("rect", { x: SX, y: cy - 19, width: SW, height: 38 }));
        node.appendChild(svg("text", { class: "name", x: SX + 12, y: cy - 7 }, short(s.name, 38)));
        node.appendChild(svg("text", { class: "sub", x: SX + 12, y: cy + 9 },
          s.sends + " sends" + (rateS !== undefined ? " · " + rate(rateS) + "/s" : "")));
        receivers.forEach((r, i) => {
          const ry = y + i * RH + RH / 2;
          const st = receiverState(r, threshold);
          const key = "r\u0000" + s.name + "\u0000" + r.name;
          const edge = svg("path", {
            class: "edge " + st,
            d: "M" + (SX + SW) + "," + cy + " C" + (SX + SW + 65) + "," + cy + " " + (RX - 65) + "," + ry + " " + RX + "," + ry,
          });
          root.appendChild(edge);
          const g = svg("g", { class: "node receiver " + st, "data-signal": s.name, "data-receiver": r.name, "data-calls": r.calls, "data-state": st });
          g.appendChild(svg("title", {}, r.name));
          g.appendChild(svg("rect", { x: RX, y: ry - 13, width: RW, height: 26 }));
          g.appendChild(svg("text", { x: RX + 10, y: ry + 1 }, short(r.name, 50)));
          let stat;
          if (r.calls === 0 && r.errors === 0) {
            stat = "not called yet";
          } else {
            const perSecond = state.rates.get(key);
            stat = (perSecond !== undefined ? rate(perSecond) + "/s · " : "") + r.calls + " calls · " +
              percent(r.errors, r.calls) + " err · p99 " + duration(r.p99);
          }
          g.appendChild(svg("text", { class: "stat " + st, x: TX, y: ry + 1 }, stat));
          root.appendChild(g);
        });
        root.appendChild(node);
        y += laneHeight + GAP;
      }
      box.appendChild(root);
    }
    if (lonely.length) {
      box.appendChild(el("div", { class: "lonely" }, "Signals without receivers: " + lonely.join(", ")));
    }
    if (withReceivers.length > MAP_LIMIT) {
      const button = el("button", { type: "button" }, state.mapAll ? "show the busiest " + MAP_LIMIT : "show all " + withReceivers.length + " signals");
      button.addEventListener("click", () => { state.mapAll = !state.mapAll; draw(); });
      more.append("Showing " + shown.length + " of " + withReceivers.length + " signals with receivers (busiest first; filter to narrow). ", button);
    }
  }

  function sortRows(list) {
    const key = state.sortKey, dir = state.sortDir;
    return list.sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === y) return a.signal < b.signal ? -1 : a.signal > b.signal ? 1 : (a.receiver < b.receiver ? -1 : 1);
      if (x === null) return 1;   // unknown values last, whichever the direction
      if (y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }

  function drawTable(data, all) {
    const table = document.getElementById("receivers");
    for (const th of table.tHead.rows[0].cells) {
      th.setAttribute("aria-sort", th.dataset.key === state.sortKey ? (state.sortDir > 0 ? "ascending" : "descending") : "none");
    }
    const body = table.tBodies[0];
    clear(body);
    const list = sortRows(all.filter((r) => matches(r.signal, r.receiver)));
    const shown = state.rowsAll ? list : list.slice(0, ROW_LIMIT);
    const threshold = data.slow_threshold;
    for (const r of shown) {
      const receiverCell = el("td", { class: "name", title: r.receiver }, r.receiver);
      if (r.state === "failing") receiverCell.appendChild(el("span", { class: "badge failing" }, "failing"));
      else if (r.state === "slow") receiverCell.appendChild(el("span", { class: "badge slow" }, "slow"));
      else if (r.state === "idle") receiverCell.appendChild(el("span", { class: "badge idle" }, "not called"));
      const lat = (v) => el("td", { class: "num" + (v !== null && v > threshold ? " slow" : "") }, duration(v));
      body.appendChild(el("tr", { class: r.state, "data-signal": r.signal, "data-receiver": r.receiver },
        el("td", { class: "name", title: r.signal }, r.signal),
        receiverCell,
        el("td", { class: "num" }, String(r.calls)),
        el("td", { class: "num" }, rate(r.rate)),
        el("td", { class: "num" + (r.errors ? " bad" : "") }, String(r.errors)),
        el("td", { class: "num" + (r.errors ? " bad" : "") }, percent(r.errors, r.calls)),
        lat(r.p50), lat(r.p95), lat(r.p99)));
    }
    const more = document.getElementById("table-more");
    clear(more);
    if (list.length > ROW_LIMIT) {
      const button = el("button", { type: "button" }, state.rowsAll ? "show " + ROW_LIMIT : "show all " + list.length);
      button.addEventListener("click", () => { state.rowsAll = !state.rowsAll; draw(); });
      more.append("Showing " + shown.length + " of " + list.length + " receivers. ", button);
    }
  }

  function traceLink(template, traceId) {
    if (!template || !/^[0-9a-f]{32}$/.test(traceId)) return null;
    return el("a", { href: template.split("{trace_id}").join(traceId), target: "_blank", rel: "noopener noreferrer" }, "open trace ↗");
  }

  function drawRecent(data) {
    const box = document.getElementById("recent");
    clear(box);
    const note = document.getElementById("recent-note");
    note.textContent = "over " + duration(data.slow_threshold) + " or failed · this process (pid " + data.pid + ")" +
      (data.merged ? "; each worker keeps its own" : "");
    if (!data.recording) {
      box.appendChild(el("div", { class: "empty" },
        "Not recorded: slow sends are read from sigtrace's spans, and this process records none " +
        "(it needs the OpenTelemetry SDK's TracerProvider and SIGTRACE_TRACING on)."));
      return;
    }
    const sends = data.recent.filter((s) => matches(s.signal, ...s.receivers.map((r) => r.name)))
      .sort((a, b) => b.seconds - a.seconds).slice(0, RECENT_SHOWN);
    if (!sends.length) {
      box.appendChild(el("div", { class: "empty" }, "No send over the threshold yet (sends are traced inside a request's span)."));
      return;
    }
    for (const send of sends) {
      const card = el("div", { class: "send" + (send.error ? " failed" : ""), "data-signal": send.signal });
      const head = el("div", { class: "send-head" },
        el("span", { class: "sig" }, send.signal),
        el("span", { class: "dur" }, duration(send.seconds)),
        el("span", { class: "muted" }, send.receivers_called + " receiver" + (send.receivers_called === 1 ? "" : "s") + " · " + ago(send.at, data.time)));
      if (send.error) head.appendChild(el("span", { class: "badge failing" }, send.error));
      const link = traceLink(data.trace_url, send.trace_id);
      if (link) head.appendChild(link);
      card.appendChild(head);
      const tree = el("ul", { class: "tree" });
      let slowest = null;
      for (const r of send.receivers) if (!slowest || r.seconds > slowest.seconds) slowest = r;
      const total = send.seconds || 1e-9;
      for (const r of send.receivers) {
        const left = Math.min(100, Math.max(0, (100 * r.start) / total));
        const width = Math.min(100 - left, (100 * r.seconds) / total);
        const bar = el("div", { class: "bar" }, el("span", { style: null }));
        bar.firstChild.style.left = left + "%";
        bar.firstChild.style.width = width + "%";
        const name = el("span", { class: "rname", title: r.name }, r.name);
        const mark = el("span", { class: "mark" });
        if (r.error) mark.appendChild(el("span", { class: "badge failing", title: r.error }, "error"));
        else if (r === slowest && send.receivers.length > 1) mark.appendChild(el("span", { class: "badge slow" }, "slowest"));
        const item = el("li", { class: (r === slowest ? "slowest" : "") + (r.error ? " error" : "") }, name, bar,
          el("span", { class: "rdur" }, duration(r.seconds)), mark);
        tree.appendChild(item);
      }
      if (send.receivers_called > send.receivers.length) {
        tree.appendChild(el("li", { class: "muted" }, (send.receivers_called - send.receivers.length) + " receiver span(s) not kept"));
      }
      card.appendChild(tree);
      box.appendChild(card);
    }
  }

  function drawEndpoints(data) {
    const body = document.getElementById("endpoints").tBodies[0];
    clear(body);
    const list = data.endpoints.filter((e) => matches(e.endpoint)).sort((a, b) => b.calls - a.calls);
    if (!list.length) {
      body.appendChild(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No request timed yet.")));
    }
    for (const e of list) {
      const exc = el("td", { class: "exc" }, e.exceptions.map((x) => x.name + " × " + x.count).join(", "));
      body.appendChild(el("tr", { class: e.errors ? "failing" : "" },
        el("td", { class: "name", title: e.method + " " + e.endpoint }, e.method + " " + e.endpoint),
        el("td", { class: "num" }, String(e.calls)),
        el("td", { class: "num" + (e.errors ? " bad" : "") }, String(e.errors)),
        el("td", { class: "num" }, duration(e.p50)),
        el("td", { class: "num" }, duration(e.p99)),
        exc));
    }
  }

  function draw() {
    const data = state.data;
    if (!data) return;
    document.getElementById("app").textContent = data.app;
    document.getElementById("scope").textContent = !data.metrics ? "metrics off"
      : data.merged ? "map and tables: all workers, merged as /metrics" : "this process (pid " + data.pid + ")";
    document.getElementById("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString();
    const all = rows(data);
    drawCards(data, all);
    drawMap(data);
    drawTable(data, all);
    drawRecent(data);
    drawEndpoints(data);
    document.body.dataset.loaded = String((Number(document.body.dataset.loaded) || 0) + 1);
  }

  // ------------------------------------------------------------- loading

  async function load() {
    clearTimeout(state.timer);
    const banner = document.getElementById("error");
    try {
      const response = await fetch(base + "/data.json", { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) throw new Error(base + "/data.json answered " + response.status);
      const data = await response.json();
      updateRates(data);
      state.data = data;
      banner.hidden = true;
      draw();
    } catch (error) {
      banner.textContent = "Could not refresh: " + error.message;
      banner.hidden = false;
    }
    const refresh = state.data ? state.data.refresh : 5;
    if (document.getElementById("live").checked) state.timer = setTimeout(load, refresh * 1000);
  }

  document.getElementById("receivers").tHead.addEventListener("click", (event) => {
    const th = event.target.closest("th");
    if (!th) return;
    if (state.sortKey === th.dataset.key) state.sortDir = -state.sortDir;
    else {
      state.sortKey = th.dataset.key;
      state.sortDir = th.dataset.type === "text" ? 1 : -1;
    }
    draw();
  });
  document.getElementById("filter").addEventListener("input", (event) => {
    state.filter = event.target.value.trim().toLowerCase();
    draw();
  });
  document.getElementById("live").addEventListener("change", (event) => {
    if (event.target.checked) load(); else clearTimeout(state.timer);
  });
  load();
})();
