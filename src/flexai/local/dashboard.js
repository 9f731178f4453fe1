// The flexai pool dashboard. Served as a file of its own: the page's Content-Security-Policy allows no inline
// script. Every piece of data (job names, commands, reasons, model names) goes into the page as text
// (textContent, setAttribute), never as markup, so a hostile job name shows as text and runs nothing.
// The API token comes in the URL fragment (#token=...): it is read once, removed from the address bar and the
// history, and kept in this closure only.
(() => {
  "use strict";
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  const headers = token ? { Authorization: "Bearer " + token } : {};

  const SVG = "http://www.w3.org/2000/svg";
  const palette = ["#3b6fd8", "#d8733b", "#2f9e6e", "#9b4fd0", "#c8414f", "#2b95a8", "#8a7a1f", "#d14f98"];
  const jobColour = id => palette[[...String(id)].reduce((a, c) => a + c.charCodeAt(0), 0) % palette.length];
  const deviceColour = index => palette[Number(index) % palette.length];

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "style") Object.assign(node.style, value);
      else node[key] = value; // className, title, textContent: properties, never markup
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  async function get(path) {
    const r = await fetch(path, { headers });
    if (r.status === 401) throw new Error("the API wants a token: open this page as /#token=YOUR_TOKEN");
    if (!r.ok) throw new Error(path + " answered " + r.status);
    return r.json();
  }

  const pct = milli => (milli / 10).toFixed(0) + " %";
  const mib = m => (m >= 1024 ? (m / 1024).toFixed(1) + " GiB" : m + " MiB");

  function sliceNode(s) {
    const used = s.used_memory_mib === null || s.used_memory_mib === undefined ? "?" : mib(s.used_memory_mib);
    const quota = s.memory_mib ? mib(s.memory_mib) : "no quota";
    return el(
      "div",
      {
        className: "slice" + (s.paused ? " paused" : ""),
        dataset: { job: s.job },
        title: `${s.name} (${s.job}): ${pct(s.share_milli)}, memory ${used} of ${quota}` + (s.paused ? ", paused" : ""),
        style: { width: s.share_milli / 10 + "%", background: jobColour(s.job) },
      },
      el("span", { className: "name", textContent: `${s.name} ${pct(s.share_milli)}` }),
      el("span", { className: "use", textContent: `${used} / ${quota}` }),
    );
  }

  // A time-sharing guest runs on share granted to others while they leave it idle: not part of the bar (the
  // owners fill it), shown under it.
  function guestNode(s) {
    const used = s.used_memory_mib === null || s.used_memory_mib === undefined ? "?" : mib(s.used_memory_mib);
    const text = `opportunistic: ${s.name} (${s.job}), memory ${used} / ${mib(s.memory_mib)}` +
      (s.paused ? ", paused (owners busy)" : ", running on idle share");
    return el("div", { className: "guest" + (s.paused ? " paused" : ""), dataset: { job: s.job }, textContent: text });
  }

  function deviceNode(d) {
    const busy = d.utilisation_pct === null || d.utilisation_pct === undefined ? "n/a" : d.utilisation_pct.toFixed(0) + " %";
    const memory = d.used_memory_mib === null || d.used_memory_mib === undefined ? "?" : mib(d.used_memory_mib);
    const owners = d.slices.filter(s => !s.opportunistic);
    const guests = d.slices.filter(s => s.opportunistic);
    return el(
      "div",
      { className: "device", dataset: { device: d.index } },
      el("div", { className: "label" }, el("b", { textContent: "#" + d.index }), ` ${d.model} · ${mib(d.memory_mib)}`),
      el("div", { className: "slices" }, el("div", { className: "bar" }, ...owners.map(sliceNode)), ...guests.map(guestNode)),
      el(
        "div",
        { className: "stats" },
        el("div", { textContent: `busy ${busy} · ` }, el("span", { className: "free", textContent: `${pct(d.free_share_milli)} free` })),
        el("div", { textContent: `memory ${memory} / ${mib(d.memory_mib)}` }),
      ),
    );
  }

  function queueRows(jobs) {
    const now = Date.now() / 1000;
    const waiting = jobs.filter(j => j.state === "queued" || j.state === "preempted");
    if (!waiting.length) return [el("tr", {}, el("td", { colSpan: 7, textContent: "empty" }))];
    return waiting.map(j =>
      el(
        "tr",
        { className: j.state },
        el("td", { textContent: j.id }),
        el("td", { textContent: j.name }),
        el("td", { textContent: (j.priority_class || "normal") + (j.priority ? ":" + j.priority : "") }),
        el("td", { textContent: j.queue || "default" }),
        el("td", {
          textContent: `${j.device_count} × ${pct(j.share_milli)}, ${j.memory_mib} MiB` + (j.model ? " on " + j.model : ""),
        }),
        el("td", { textContent: Math.round(now - j.submitted_at) + " s" }),
        el("td", { className: "reason", textContent: j.reason }),
      ),
    );
  }

  function chart(util, devices) {
    const box = document.getElementById("util");
    const w = Number(box.getAttribute("width")), h = Number(box.getAttribute("height"));
    const left = 52, right = 14, top = 10, bottom = 42;
    const plotW = w - left - right, plotH = h - top - bottom;
    const nodes = [];
    const y = p => top + plotH - (Math.max(0, Math.min(100, p)) / 100) * plotH;
    for (const tick of [0, 25, 50, 75, 100]) {
      nodes.push(svg("line", { x1: left, x2: left + plotW, y1: y(tick), y2: y(tick), stroke: "#e3e6ee" }));
      nodes.push(svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }, tick + " %"));
    }
    nodes.push(svg("line", { x1: left, x2: left, y1: top, y2: top + plotH, stroke: "#8a91a3" }));
    nodes.push(svg("line", { x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH, stroke: "#8a91a3" }));
    nodes.push(
      svg("text", { x: 12, y: top + plotH / 2, transform: `rotate(-90 12 ${top + plotH / 2})`, "text-anchor": "middle" },
        "share / busy (%)"),
    );
    nodes.push(svg("text", { x: left + plotW / 2, y: h - 6, "text-anchor": "middle" }, "time (this machine's clock)"));
    if (util.length > 1) {
      const t0 = util[0].ts, t1 = Math.max(util[util.length - 1].ts, t0 + 1);
      const x = t => left + ((t - t0) / (t1 - t0)) * plotW;
      for (let i = 0; i <= 4; i++) {
        const t = t0 + ((t1 - t0) * i) / 4;
        nodes.push(svg("line", { x1: x(t), x2: x(t), y1: top + plotH, y2: top + plotH + 4, stroke: "#8a91a3" }));
        const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
        nodes.push(svg("text", { x: x(t), y: top + plotH + 16, "text-anchor": anchor },
          new Date(t * 1000).toLocaleTimeString([], { hour12: false })));
      }
      for (const d of devices) {
        const key = String(d.index);
        const share = util.map(p => `${x(p.ts)},${y((p.allocated_share_milli[key] || 0) / 10)}`);
        nodes.push(svg("polyline", { fill: "none", stroke: deviceColour(d.index), "stroke-width": 2, points: share.join(" ") }));
        const busy = util.filter(p => p.utilisation_pct && typeof p.utilisation_pct[key] === "number");
        if (busy.length > 1) {
          const pts = busy.map(p => `${x(p.ts)},${y(p.utilisation_pct[key])}`);
          nodes.push(svg("polyline", {
            fill: "none", stroke: deviceColour(d.index), "stroke-width": 1.5, "stroke-dasharray": "5 3", points: pts.join(" "),
          }));
        }
      }
    } else {
      nodes.push(svg("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, "collecting…"));
    }
    box.replaceChildren(...nodes);
    const keys = devices.map(d =>
      el("span", { className: "key" },
        el("span", { className: "swatch", style: { borderTopColor: deviceColour(d.index) } }),
        `#${d.index} ${d.model}: allocated share`),
    );
    keys.push(el("span", { className: "key" }, el("span", { className: "swatch dashed", style: { borderTopColor: "#3a4252" } }),
      "dashed: device busy (when the device can tell)"));
    document.getElementById("legend").replaceChildren(...keys);
  }

  async function refresh() {
    const [pool, jobs, util] = await Promise.all([get("/api/v1/pool"), get("/api/v1/jobs"), get("/api/v1/utilisation")]);
    const meta = document.getElementById("meta");
    meta.className = "meta";
    meta.textContent =
      `${pool.devices.length} devices (${pool.backend}), slices in steps of ${pct(pool.share_step_milli)}, ` +
      `lending ${pool.lending ? "on" : "off"} — ${pool.running} running, ${pool.queued} queued` +
      (pool.preempted ? `, ${pool.preempted} preempted` : "");
    document.getElementById("devices").replaceChildren(...pool.devices.map(deviceNode));
    document.querySelector("#queue tbody").replaceChildren(...queueRows(jobs));
    chart(util, pool.devices);
  }

  function showError(e) {
    const meta = document.getElementById("meta");
    meta.className = "meta error";
    meta.textContent = "error: " + e.message;
  }

  function start() {
    refresh().catch(showError);
    setInterval(() => refresh().catch(showError), 1000);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
