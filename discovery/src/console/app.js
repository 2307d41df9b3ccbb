// Pilotfish console: polls discovery's HTTP API every 2 s and draws services, routes,
// proxies and refused files. The canary control (and `?set=`) writes a route through the rules
// API: GET for the ETag, PUT with If-Match; every refusal (400, 401, 409, 503) is shown.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TOKEN_KEY = "pilotfish-api-token";

  // `?token=` (for scripts) goes to sessionStorage; `?set=` is applied once. Both leave the
  // address bar, so the token stays out of history and a reload does not apply `set=` again.
  const params = new URLSearchParams(location.search);
  if (params.get("token")) sessionStorage.setItem(TOKEN_KEY, params.get("token"));
  let pendingSet = params.get("set");
  if (params.has("token") || params.has("set")) {
    history.replaceState(null, "", location.pathname);
  }

  const $ = (id) => document.getElementById(id);
  const body = (section) => $(section).querySelector(".body");

  // Builds an element; children may be strings, nodes, arrays or null.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    const add = (c) => {
      if (c === null || c === undefined || c === false) return;
      if (Array.isArray(c)) c.forEach(add);
      else node.append(c instanceof Node ? c : String(c));
    };
    children.forEach(add);
    return node;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // One call to discovery; JSON in and out. Throws ApiError with the server's own words.
  async function api(method, path, options = {}) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    if (options.ifMatch) headers["If-Match"] = options.ifMatch;
    let payload;
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(options.body);
    }
    const res = await fetch(path, { method, headers, body: payload, cache: "no-store" });
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!res.ok) {
      const why = data && Array.isArray(data.errors) ? data.errors.join("\n") : text;
      throw new ApiError(res.status, `${res.status} ${res.statusText}: ${why}`.trim());
    }
    return { data, etag: res.headers.get("ETag") };
  }

  // ---- token ----

  let polling = null;

  function askForToken(message) {
    clearTimeout(polling);
    polling = null;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token-input").focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    $("login").hidden = true;
    refresh();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("");
  });

  // ---- polling ----

  const last = {}; // section -> JSON drawn last, so unchanged data is not redrawn
  const drafts = {}; // "service/rule" -> weights being edited
  const results = {}; // "service/rule" -> {ok, text} of the last apply

  let running = false;
  let again = false;

  // One poll at a time: a refresh asked for while one runs follows it.
  async function refresh() {
    clearTimeout(polling);
    if (running) {
      again = true;
      return;
    }
    running = true;
    let authorized = true;
    try {
      authorized = await poll();
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      refresh();
    } else if (authorized) {
      polling = setTimeout(refresh, POLL_MS);
    }
  }

  // Reads everything and redraws; false when discovery wants a (different) token.
  async function poll() {
    const calls = {
      services: api("GET", "/v1/services"),
      routes: api("GET", "/v1/routes"),
      proxies: api("GET", "/v1/proxies"),
      status: api("GET", "/status"),
    };
    const settled = {};
    for (const [name, call] of Object.entries(calls)) {
      try {
        settled[name] = { data: (await call).data };
      } catch (e) {
        settled[name] = { error: e };
      }
    }
    const unauthorized = Object.values(settled).find((s) => s.error && s.error.status === 401);
    if (unauthorized) {
      askForToken(sessionStorage.getItem(TOKEN_KEY) ? unauthorized.error.message : "");
      return false;
    }
    $("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
    draw("services", settled.services, drawServices);
    draw("routes", settled.routes, drawRoutes);
    draw("proxies", settled.proxies, drawProxies);
    draw("refused", settled.status, drawRefused);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if (pendingSet) {
      const set = pendingSet;
      pendingSet = null;
      await applySet(set);
      delete last.routes;
      again = true; // show the route as written
    }
    return true;
  }

  function draw(section, result, render) {
    const key = JSON.stringify(result.error ? { error: result.error.message } : result.data);
    if (last[section] === key) return;
    last[section] = key;
    const target = body(section);
    const drawn = result.error ? el("p", { class: "error" }, result.error.message) : render(result.data);
    target.replaceChildren(...[drawn].flat(Infinity).filter((n) => n));
  }

  // ---- services ----

  function drawServices(data) {
    const items = data.items || [];
    if (!items.length) return el("p", { class: "muted" }, "No services.");
    return items.map((s) =>
      el(
        "div",
        { class: "service", "data-service": s.name },
        el(
          "h3",
          {},
          s.name,
          " ",
          el("span", { class: "muted" }, `${s.protocol} :${s.port} — `, el("code", {}, s.origin)),
        ),
        s.instances.length
          ? el(
              "table",
              {},
              el("tr", {}, ["node", "address", "health", "labels", "locality"].map((h) => el("th", {}, h))),
              s.instances.map((i) =>
                el(
                  "tr",
                  {},
                  el("td", {}, i.node || el("span", { class: "muted" }, "(outside the mesh)")),
                  el("td", { class: "mono" }, `${i.address}:${i.port}`),
                  el(
                    "td",
                    { class: i.healthy ? "ok" : "bad" },
                    i.healthy ? "healthy" : "unhealthy",
                  ),
                  el(
                    "td",
                    {},
                    Object.entries(i.labels || {}).map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`)),
                  ),
                  el("td", {}, i.locality || ""),
                ),
              ),
            )
          : el("p", { class: "muted" }, "No instances."),
      ),
    );
  }

  // ---- routes ----

  function describeMatch(m) {
    if (!m) return "every request";
    return Object.entries(m)
      .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(", ");
  }

  function weightsOf(rule) {
    return rule.to.map((d) => (d.weight === undefined ? (rule.to.length === 1 ? 100 : 0) : d.weight));
  }

  function drawRoutes(data) {
    const items = data.items || [];
    if (!items.length) return el("p", { class: "muted" }, "No routes.");
    return items.map((route) => {
      const rules = (route.spec && route.spec.rules) || [];
      return el(
        "div",
        { class: "route", "data-route": route.service },
        el(
          "h3",
          {},
          route.service,
          " ",
          el(
            "span",
            { class: "muted" },
            route.managed ? "written by the rules API" : "declared in ",
            route.managed ? null : el("code", {}, route.source),
            ` (version ${route.version})`,
          ),
        ),
        rules.map((rule, index) => drawRule(route, rule, index)),
      );
    });
  }

  function drawRule(route, rule, index) {
    const to = Array.isArray(rule.to) ? rule.to : [];
    const weights = weightsOf({ to });
    const total = weights.reduce((a, b) => a + b, 0) || 1;
    const split = el(
      "div",
      { class: "split" },
      to.map((d, i) => [
        el("span", {}, d.subset || "(all instances)"),
        el("div", { class: "bar" }, el("span", { style: `width:${(100 * weights[i]) / total}%` })),
        el(
          "span",
          { class: "mono", "data-weight": d.subset || "" },
          `${weights[i]} (${Math.round((100 * weights[i]) / total)}%)`,
        ),
      ]),
    );
    return el(
      "div",
      { class: "rule" },
      el("div", { class: "muted" }, `rule ${index + 1}: ${describeMatch(rule.match)}`),
      to.length ? split : el("div", { class: "muted" }, "(no destinations: redirect or fault)"),
      to.length > 1 ? canary(route, to, weights, index) : null,
    );
  }

  // Weight inputs (and a slider for a two-way split) with Apply; kept across redraws.
  function canary(route, to, weights, index) {
    const key = `${route.service}/${index}`;
    // Only an edit makes a draft; an untouched control follows the route as polled.
    const draft = drafts[key] || weights.slice();
    const numbers = to.map((d, i) =>
      el("input", {
        type: "number",
        min: 0,
        step: 1,
        value: draft[i],
        "aria-label": `weight of ${d.subset || i}`,
        oninput: (e) => {
          draft[i] = Number(e.target.value);
          drafts[key] = draft;
          if (slider) slider.value = String(sliderValue());
        },
      }),
    );
    const sliderValue = () => Math.round((100 * draft[1]) / (draft[0] + draft[1] || 1));
    const slider =
      to.length === 2
        ? el("input", {
            type: "range",
            min: 0,
            max: 100,
            value: sliderValue(),
            "aria-label": `share of ${to[1].subset}`,
            oninput: (e) => {
              draft[1] = Number(e.target.value);
              drafts[key] = draft;
              draft[0] = 100 - draft[1];
              numbers[0].value = String(draft[0]);
              numbers[1].value = String(draft[1]);
            },
          })
        : null;
    const result = results[key];
    const message = el(
      "span",
      { class: result ? (result.ok ? "ok" : "error") : "muted", "data-result": key },
      result ? result.text : "",
    );
    const button = el(
      "button",
      {
        type: "button",
        onclick: async () => {
          button.disabled = true;
          message.className = "muted";
          message.textContent = "applying…";
          await applyWeights(route.service, index, draft.slice());
          button.disabled = false;
          refresh();
        },
      },
      "Apply",
    );
    return el(
      "div",
      { class: "canary" },
      to.map((d, i) => el("label", {}, `${d.subset || i} `, numbers[i])),
      slider,
      button,
      message,
    );
  }

  // The one write path (Apply and `?set=`): read the route for its ETag, change the weights of
  // rule `index`, write it back with If-Match. A concurrent change answers 409, shown as is.
  async function applyWeights(service, index, weights) {
    const key = `${service}/${index}`;
    const path = "/v1/routes/" + encodeURIComponent(service);
    let outcome;
    try {
      const { data, etag } = await api("GET", path);
      const rule = data.spec && data.spec.rules && data.spec.rules[index];
      if (!rule || !Array.isArray(rule.to) || rule.to.length !== weights.length) {
        throw new Error(`rule ${index + 1} of ${service} does not split between ${weights.length} destinations`);
      }
      rule.to.forEach((d, i) => {
        d.weight = weights[i];
      });
      const put = await api("PUT", path, { body: data.spec, ifMatch: etag });
      const split = rule.to.map((d, i) => `${d.subset || i}=${weights[i]}`).join(" ");
      outcome = { ok: true, text: `${service}: applied ${split} (version ${put.data.version})` };
      delete drafts[key];
    } catch (e) {
      outcome = { ok: false, text: `${service}: ${e.message}` };
    }
    results[key] = outcome;
    delete last.routes; // redraw with the outcome
    return outcome;
  }

  // `?set=SERVICE:W1,W2[,...]`: the weights of the first rule of SERVICE that splits between
  // that many destinations, through the same path as Apply.
  async function applySet(set) {
    const banner = $("action");
    banner.hidden = false;
    const m = /^([^:]+):(\d+(?:,\d+)+)$/.exec(set);
    let outcome;
    if (!m) {
      outcome = { ok: false, text: `set=${set}: expected SERVICE:WEIGHT,WEIGHT[,...]` };
    } else {
      const [, service, list] = m;
      const weights = list.split(",").map(Number);
      let index = -1;
      try {
        const { data } = await api("GET", "/v1/routes/" + encodeURIComponent(service));
        index = ((data.spec && data.spec.rules) || []).findIndex(
          (r) => Array.isArray(r.to) && r.to.length === weights.length && r.to.length > 1,
        );
        outcome =
          index < 0
            ? { ok: false, text: `${service}: no rule splits between ${weights.length} destinations` }
            : await applyWeights(service, index, weights);
      } catch (e) {
        outcome = { ok: false, text: `${service}: ${e.message}` };
      }
    }
    banner.className = outcome.ok ? "" : "failed";
    banner.replaceChildren(
      el("span", { class: outcome.ok ? "ok" : "error", id: "action-result", "data-ok": String(outcome.ok) }, outcome.text),
    );
  }

  // ---- proxies ----

  const TYPES = [
    ["clusters", "CDS"],
    ["listeners", "LDS"],
    ["endpoints", "EDS"],
    ["routes", "RDS"],
    ["secrets", "SDS"],
  ];

  function stateCell(t) {
    if (!t) return el("td", { class: "muted" }, "-");
    const cls = { synced: "ok", stale: "warn", nacked: "bad" }[t.state] || "muted";
    const text = t.state === "stale" && t.sent_unix_ms
      ? `stale (${Math.max(0, Math.round((Date.now() - t.sent_unix_ms) / 1000))}s)`
      : t.state.replace("_", " ");
    return el("td", { class: cls, title: t.version ? `version ${t.version}` : null }, text);
  }

  function drawProxies(data) {
    const items = data.items || [];
    if (!items.length) return el("p", { class: "muted" }, "No proxies have connected.");
    const nacks = [];
    const rows = items.map((p) => {
      for (const [type, short] of TYPES) {
        const t = p.types && p.types[type];
        if (t && t.state === "nacked") nacks.push(el("li", { class: "error" }, `${p.node} ${short} NACKED: ${t.nack_reason || "(no reason given)"}`));
      }
      const seen = Math.round((Date.now() - p.last_seen_unix_ms) / 1000);
      return el(
        "tr",
        { "data-proxy": p.node },
        el("td", {}, p.node),
        el("td", {}, (p.services || []).join(", ") || "-"),
        el("td", {}, p.flavour),
        el("td", {}, p.agent || "-"),
        p.connected
          ? TYPES.map(([type]) => stateCell(p.types && p.types[type]))
          : el("td", { class: "bad", colspan: TYPES.length }, `disconnected (last seen ${seen}s ago)`),
      );
    });
    return [
      el(
        "table",
        {},
        el("tr", {}, ["node", "services", "flavour", "agent", ...TYPES.map(([, s]) => s)].map((h) => el("th", {}, h))),
        rows,
      ),
      nacks.length ? el("ul", {}, nacks) : null,
    ];
  }

  // ---- refused files ----

  function drawRefused(status) {
    const files = (status.sources && status.sources.files) || {};
    const refused = Object.entries(files).filter(([, f]) => !f.in_force || f.problems.length);
    const unresolved = (status.sources && status.sources.unresolved) || [];
    const out = [];
    if (!refused.length) out.push(el("p", { class: "ok" }, "Every registry file is in force."));
    for (const [path, f] of refused) {
      const note = !f.in_force
        ? "refused: nothing of it is in force"
        : f.restored
          ? `refused: the copy stored ${f.since} is in force`
          : "refused: its last good version stays in force";
      out.push(
        el(
          "div",
          { class: "file", "data-file": path },
          el("h3", {}, el("code", {}, path), " ", el("span", { class: "warn" }, note)),
          el("ul", {}, f.problems.map((p) => el("li", { class: "mono error" }, p))),
        ),
      );
    }
    if (unresolved.length) {
      out.push(el("h3", {}, "Warnings"), el("ul", {}, unresolved.map((u) => el("li", { class: "mono warn" }, u))));
    }
    return out;
  }

  refresh();
})();
