// kiban dev: the dashboard's pages. Every text goes in as a text node (never as HTML):
// log lines and attributes are whatever a caller sent.
"use strict";

const main = document.getElementById("main");

function h(tag, attrs, ...children) {
  const ns = ["svg", "g", "line", "circle", "text", "defs", "marker", "path", "title"].includes(tag)
    ? "http://www.w3.org/2000/svg" : null;
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "style" && !ns) node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

const fmt = {
  time(ns) { return ns ? new Date(ns / 1e6).toISOString().slice(11, 23) : ""; },
  ms(value) { return value === null || value === undefined ? "–" : `${Number(value).toFixed(value < 10 ? 2 : 0)} ms`; },
  pct(value) { return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`; },
  rate(value) { return value === null || value === undefined ? "–" : `${value.toFixed(2)}/s`; },
  uptime(s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  status(code) { return h("span", { class: code >= 500 ? "s5" : code >= 400 ? "s4" : "" }, code ?? "–"); },
};

function traceLink(traceId) {
  return traceId ? h("a", { href: `#/trace/${traceId}`, class: "mono" }, traceId.slice(0, 16) + "…") : "";
}

function params() {
  const [path, query] = location.hash.slice(1).split("?");
  return { parts: path.split("/").filter(Boolean), query: new URLSearchParams(query || "") };
}

function filterForm(fields, query, page) {
  const inputs = fields.map(([name, placeholder, options]) => options
    ? h("select", { name }, h("option", { value: "" }, placeholder),
        options.map((option) => h("option", { value: option, selected: query.get(name) === option }, option)))
    : h("input", { name, placeholder, value: query.get(name) || "" }));
  return h("form", {
    class: "filters",
    onsubmit(event) {
      event.preventDefault();
      const values = new URLSearchParams();
      for (const input of inputs) if (input.value) values.set(input.name, input.value);
      location.hash = `#/${page}?${values}`;
    },
  }, inputs, h("button", { type: "submit" }, "Filter"));
}

function table(headers, rows, empty) {
  if (!rows.length) return h("div", { class: "empty" }, empty);
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((name) => h("th", {}, name)))),
    h("tbody", {}, rows));
}

// -- pages -------------------------------------------------------------------------

const pages = {};

pages.services = async () => {
  const { services } = await api("/api/services");
  const rows = services.map((service) => {
    const ready = service.readiness || {};
    const checks = Object.entries(ready.checks || {}).map(([name, check]) =>
      h("div", { class: "checks", "data-check": name },
        h("span", { class: `badge ${check.status}` }, check.status), ` ${name} `,
        check.latency_ms !== undefined ? `${check.latency_ms} ms` : "", check.error ? ` ${check.error}` : ""));
    return h("tr", { "data-service": service.name },
      h("td", {}, h("strong", {}, service.name), h("div", { class: "checks" }, service.version || "")),
      h("td", {}, service.url ? h("a", { href: service.url + "/docs", target: "_blank" }, service.url) : "–"),
      h("td", {}, h("span", { class: `badge ${service.liveness}`, "data-liveness": service.liveness }, service.liveness)),
      h("td", {}, h("span", { class: `badge ${ready.status || "unknown"}`, "data-readiness": ready.status || "unknown" },
        ready.status || "unknown"), checks),
      h("td", { class: "num" }, fmt.uptime(service.uptime_s)),
      h("td", { class: "num", "data-rate": service.rate ?? "" }, fmt.rate(service.rate)),
      h("td", { class: "num" }, fmt.pct(service.error_rate)),
      h("td", { class: "num" }, fmt.ms(service.p50_ms)),
      h("td", { class: "num" }, fmt.ms(service.p99_ms)),
      h("td", { class: "num" }, service.requests),
      h("td", {}, service.managed ? h("button", {
        "data-restart": service.name,
        async onclick(event) {
          event.target.disabled = true;
          event.target.textContent = "restarting…";
          await fetch(`/api/services/${encodeURIComponent(service.name)}/restart`,
            { method: "POST", headers: { "x-kiban-dev": "1" } });
        },
      }, "Restart") : ""));
  });
  return [h("h1", {}, "Services"), table(
    ["service", "url", "liveness", "readiness", "uptime", "rate", "errors", "p50", "p99", "requests", ""],
    rows, "No service has reported yet.")];
};

pages.requests = async ({ query }) => {
  const { requests } = await api(`/api/requests?${query}`);
  const services = (await api("/api/services")).services.map((service) => service.name);
  const rows = requests.map((request) => h("tr", { "data-trace": request.trace_id || "" },
    h("td", { class: "mono" }, fmt.time(request.time)),
    h("td", {}, request.service),
    h("td", {}, request.method),
    h("td", { class: "mono" }, request.route || request.path),
    h("td", {}, fmt.status(request.status)),
    h("td", { class: "num" }, fmt.ms(request.latency_s * 1000)),
    h("td", {}, request.uid ?? ""),
    h("td", {}, traceLink(request.trace_id))));
  return [h("h1", {}, "Requests"),
    filterForm([["service", "any service", services], ["status", "status (404, 5xx)"],
      ["route", "route"], ["uid", "uid"], ["trace_id", "trace id"]], query, "requests"),
    table(["time", "service", "method", "route", "status", "latency", "uid", "trace"], rows,
      "No request in the window.")];
};

pages.traces = async () => {
  const { traces } = await api("/api/traces");
  const rows = traces.map((trace) => h("tr", { "data-trace": trace.trace_id },
    h("td", { class: "mono" }, fmt.time(trace.start)),
    h("td", {}, traceLink(trace.trace_id)),
    h("td", {}, trace.name),
    h("td", {}, trace.services.join(", ")),
    h("td", { class: "num" }, trace.spans),
    h("td", { class: "num" }, trace.errors ? h("span", { class: "s5" }, trace.errors) : 0)));
  return [h("h1", {}, "Traces"),
    table(["time", "trace", "root", "services", "spans", "errors"], rows, "No trace in the window.")];
};

function attributesTable(attributes) {
  return h("table", {}, Object.entries(attributes).map(([key, value]) =>
    h("tr", {}, h("td", { class: "mono" }, key), h("td", { class: "mono" },
      typeof value === "object" ? JSON.stringify(value) : String(value)))));
}

pages.trace = async ({ parts }) => {
  const trace = await api(`/api/traces/${encodeURIComponent(parts[1] || "")}`);
  if (!trace) return [h("h1", {}, "Trace"), h("div", { class: "empty" }, "This trace is not in the window.")];
  const start = trace.start;
  const total = Math.max(trace.duration_ms * 1e6, 1);
  const position = (ns) => `${Math.min(100, Math.max(0, ((ns - start) / total) * 100))}%`;
  const rows = [];
  for (const span of trace.spans) {
    const logs = trace.logs.filter((log) => log.span_id === span.span_id);
    const detail = h("div", { class: "detail", hidden: true },
      attributesTable({ service: span.service, kind: span.kind, status: span.status,
        ...(span.status_message ? { "status.message": span.status_message } : {}),
        span_id: span.span_id, ...span.attributes }),
      span.events.map((event) => h("div", { class: "checks" }, `event ${event.name} `,
        JSON.stringify(event.attributes))),
      logs.map((log) => h("div", { class: `checks lvl-${log.level}` },
        `${fmt.time(log.time)} ${log.level} ${log.msg || log.attributes.log || ""}`)));
    rows.push(h("div", {
      class: `span-row ${span.status === "error" ? "error" : ""}`,
      "data-service": span.service, "data-kind": span.kind, "data-span": span.span_id,
      onclick() { detail.hidden = !detail.hidden; },
    },
    h("div", { class: "span-name", style: `padding-left: ${8 + span.depth * 14}px`, title: span.name },
      h("span", { class: "svc" }, span.service), span.name),
    h("div", { class: "span-track" },
      h("div", { class: `span-bar ${span.kind}`, style: `left: ${position(span.start)}; width: calc(${position(span.end)} - ${position(span.start)})` }),
      h("span", { class: "span-dur", style: `left: calc(${position(span.end)} + 4px)` }, fmt.ms(span.duration_ms)),
      logs.map((log) => h("div", { class: "log-mark", style: `left: ${position(log.time)}`, title: log.msg })))));
    rows.push(detail);
  }
  const logRows = trace.logs.map((log) => h("tr", { class: `lvl-${log.level}`, "data-log": log.span_id },
    h("td", { class: "mono" }, fmt.time(log.time)), h("td", {}, log.service), h("td", {}, log.level),
    h("td", {}, log.msg), h("td", { class: "mono" }, log.attributes.log === "access"
      ? `${log.attributes.method} ${log.attributes.path} → ${log.attributes.status}` : "")));
  return [
    h("h1", {}, "Trace ", h("span", { class: "mono" }, trace.trace_id)),
    h("p", {}, `${trace.spans.length} spans across ${trace.services.join(", ")} · ${fmt.ms(trace.duration_ms)}`,
      trace.errors ? h("span", { class: "s5" }, ` · ${trace.errors} failed`) : ""),
    h("div", { class: "waterfall", id: "waterfall" }, rows),
    h("h2", {}, "Log lines"),
    table(["time", "service", "level", "message", ""], logRows, "No log line in this trace."),
  ];
};

pages.logs = async ({ query }) => {
  const { logs } = await api(`/api/logs?${query}`);
  const services = (await api("/api/services")).services.map((service) => service.name);
  const rows = logs.map((log) => h("tr", { class: `lvl-${log.level}` },
    h("td", { class: "mono" }, fmt.time(log.time)), h("td", {}, log.service), h("td", {}, log.level),
    h("td", {}, log.msg, h("div", { class: "checks mono" }, Object.entries(log.attributes)
      .filter(([key]) => !["service", "log"].includes(key))
      .map(([key, value]) => `${key}=${typeof value === "object" ? JSON.stringify(value) : value}`).join("  "))),
    h("td", {}, traceLink(log.trace_id))));
  return [h("h1", {}, "Logs"),
    filterForm([["level", "any level", ["debug", "info", "warning", "error"]],
      ["service", "any service", services], ["trace_id", "trace id"], ["q", "text"]], query, "logs"),
    table(["time", "service", "level", "message", "trace"], rows, "No log line matches.")];
};

pages.map = async () => {
  const graph = await api("/api/map");
  if (!graph.nodes.length) return [h("h1", {}, "Map"), h("div", { class: "empty" }, "No service yet.")];
  const width = 900, height = 560, cx = width / 2, cy = height / 2;
  const radius = Math.min(cx, cy) - 80;
  const at = {};
  graph.nodes.forEach((node, index) => {
    const angle = (2 * Math.PI * index) / graph.nodes.length - Math.PI / 2;
    at[node.id] = graph.nodes.length === 1 ? [cx, cy] : [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)];
  });
  const edges = graph.edges.map((edge) => {
    const [x1, y1] = at[edge.source], [x2, y2] = at[edge.target];
    const length = Math.hypot(x2 - x1, y2 - y1) || 1;
    const shorten = 42 / length;
    return h("g", { class: `edge ${edge.errors ? "failing" : ""}`, "data-source": edge.source,
      "data-target": edge.target, "data-calls": edge.calls, "data-errors": edge.errors },
    h("line", { x1: x1 + (x2 - x1) * shorten, y1: y1 + (y2 - y1) * shorten,
      x2: x2 - (x2 - x1) * shorten, y2: y2 - (y2 - y1) * shorten }),
    h("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6 },
      `${edge.calls} calls · ${(edge.error_rate * 100).toFixed(0)}% errors · ${fmt.ms(edge.mean_ms)}`));
  });
  const nodes = graph.nodes.map((node) => h("g", { class: `node ${node.kind}`, "data-id": node.id,
    transform: `translate(${at[node.id][0]},${at[node.id][1]})` },
  h("circle", { r: 38 }), h("text", { y: 5 }, node.id)));
  return [h("h1", {}, "Map"), h("svg", { class: "map", viewBox: `0 0 ${width} ${height}` },
    h("defs", {}, h("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" }, h("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#9aa3a8" }))),
    edges, nodes)];
};

// -- rendering and live updates -------------------------------------------------------

let rendering = null;
let pending = false;

async function render() {
  if (rendering) { pending = true; return; }
  const route = params();
  const name = pages[route.parts[0]] ? route.parts[0] : "services";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === (name === "trace" ? "traces" : name));
  }
  rendering = (async () => {
    try {
      const content = await pages[name](route);
      const open = [...main.querySelectorAll(".detail:not([hidden])")].map((node) => node.previousSibling?.dataset.span);
      main.replaceChildren(...content);
      for (const span of open) {
        const row = main.querySelector(`[data-span="${span}"]`);
        if (row && row.nextSibling) row.nextSibling.hidden = false;
      }
      main.dataset.page = name;
      main.dataset.state = "ready";
    } catch (error) {
      main.dataset.state = "error";
      main.replaceChildren(h("div", { class: "empty" }, `Could not load: ${error.message}`));
    }
  })();
  await rendering;
  rendering = null;
  if (pending) { pending = false; render(); }
}

async function status() {
  const current = await api("/api/status");
  document.getElementById("window").textContent = `${current.spans} spans · ${current.logs} log lines in the window`;
}

let throttle = null;
function live() {
  const events = new EventSource("/api/events");
  const dot = document.getElementById("live");
  events.addEventListener("open", () => dot.classList.add("on"));
  events.addEventListener("error", () => dot.classList.remove("on"));
  events.addEventListener("change", () => {
    const typing = document.activeElement;
    if (throttle || (typing && main.contains(typing) && ["INPUT", "SELECT"].includes(typing.tagName))) return;
    throttle = setTimeout(() => { throttle = null; render(); status(); }, 500);
  });
}

window.addEventListener("hashchange", render);
render();
status();
live();
setInterval(() => { if (params().parts[0] === "services" || !params().parts[0]) render(); }, 2000);
