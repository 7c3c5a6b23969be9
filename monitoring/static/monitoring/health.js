/*
 * System health page: the current reading (GET /api/system/health, which also stores this web process's
 * sample) every 30 s, and history charts from GET /api/system/health/history?since=... (CPU, memory, disk
 * free, queue depths, workers alive, open long-polls). The x axis is minutes before now.
 */
(function () {
  "use strict";

  const root = document.getElementById("health-page");
  if (!root) return;
  const request = window.FedLive.request;
  const format = window.FedChart.formatNumber;
  const REFRESH_MS = 30000;

  function figure(name, text) {
    const element = root.querySelector(`[data-figure="${name}"]`);
    if (element) element.textContent = text;
  }

  function gib(bytes) {
    return bytes === null || bytes === undefined ? "–" : `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  }

  function badge(value) {
    const span = document.createElement("span");
    span.className = `badge status-${String(value).replace(/[^a-z0-9_-]/gi, "")}`;
    span.textContent = value;
    return span;
  }

  function renderCurrent(health) {
    const status = document.getElementById("health-status");
    status.textContent = "";
    status.appendChild(badge(health.health_status));
    const r = health.resources || {};
    figure("cpu", `${format(r.cpu_percent, 0)} %`);
    figure("cpu-detail", `of ${r.cpu_count} cores (${r.cpu_cores_configured} configured)${r.load_average ? `, load ${r.load_average.map((v) => v.toFixed(2)).join(" ")}` : ""}`);
    figure("memory", `${format(r.memory_percent, 0)} %`);
    figure("memory-detail", `${gib(r.memory_available_bytes)} available`);
    figure("disk", `${format(r.disk_free_percent, 0)} % free`);
    figure("disk-detail", `${gib(r.disk_free_bytes)} of ${gib(r.disk_total_bytes)}`);
    const components = health.components || {};
    const celery = components.celery && components.celery.status !== "embedded" ? components.celery : null;
    // components.celery: {status, workers (how many answered the ping), names}
    figure("workers", celery ? String(celery.workers ?? 0) : "–");
    figure("workers-detail", celery ? (celery.names || []).join(", ") || celery.error || celery.status : "embedded mode: eager tasks, no worker");
    const queues = health.queue_depths || {};
    const names = Object.keys(queues);
    figure("queues", names.length ? String(names.reduce((sum, name) => sum + queues[name], 0)) : "–");
    figure("queues-detail", names.length ? names.map((name) => `${name} ${queues[name]}`).join(", ") : "no broker (unknown)");
    figure("long-polls", health.open_long_polls === null || health.open_long_polls === undefined ? "–" : String(health.open_long_polls));
    figure("alerts", `${health.open_alerts ?? 0} open alert(s)`);
    const body = document.querySelector("#components tbody");
    body.textContent = "";
    for (const [name, component] of Object.entries(health.components || {})) {
      const row = document.createElement("tr");
      const nameCell = document.createElement("th");
      nameCell.textContent = name;
      const statusCell = document.createElement("td");
      statusCell.appendChild(badge(component.status));
      const detail = document.createElement("td");
      detail.className = "muted";
      detail.textContent = component.latency_ms !== undefined && component.latency_ms !== null ? `${component.latency_ms.toFixed(1)} ms` : component.error || component.detail || (component.names ? `${component.workers} alive: ${component.names.join(", ")}` : "");
      row.append(nameCell, statusCell, detail);
      body.appendChild(row);
    }
  }

  const charts = {
    cpu: window.FedChart.line(document.getElementById("chart-cpu"), {
      title: "CPU and memory use (percent)", xLabel: "minutes ago", yMin: 0, yMax: 100, yLabel: "%",
      xTicks: { precision: 1 },
      series: [{ key: "cpu_percent", label: "CPU %" }, { key: "memory_percent", label: "memory %" }],
    }),
    disk: window.FedChart.line(document.getElementById("chart-disk"), {
      title: "Blob store disk free (percent)", xLabel: "minutes ago", yMin: 0, yMax: 100, yLabel: "% free",
      xTicks: { precision: 1 }, series: [{ key: "disk_free_percent", label: "disk free %" }],
    }),
    queues: window.FedChart.line(document.getElementById("chart-queues"), {
      title: "Queue depths", xLabel: "minutes ago", yMin: 0, yLabel: "messages", xTicks: { precision: 1 },
      series: [{ key: "aggregation", label: "aggregation" }, { key: "privacy", label: "privacy" }, { key: "default", label: "default" }],
    }),
    workers: window.FedChart.line(document.getElementById("chart-workers"), {
      title: "Workers alive and open long-polls", xLabel: "minutes ago", yMin: 0, yLabel: "count", xTicks: { precision: 1 },
      series: [{ key: "workers_alive", label: "workers alive" }, { key: "open_long_polls", label: "open long-polls (web)" }],
    }),
  };

  function renderHistory(samples) {
    const now = Date.now();
    const series = { cpu_percent: [], memory_percent: [], disk_free_percent: [], aggregation: [], privacy: [], default: [], workers_alive: [], open_long_polls: [] };
    for (const s of samples) {
      const x = -Math.round((now - Date.parse(s.created_at)) / 6000) / 10;  // minutes before now, 0.1 steps
      for (const key of ["cpu_percent", "memory_percent", "disk_free_percent"]) if (s[key] !== null) series[key].push({ x, y: s[key] });
      for (const queue of ["aggregation", "privacy", "default"]) if (s.queue_depths && s.queue_depths[queue] !== undefined) series[queue].push({ x, y: s.queue_depths[queue] });
      if (s.role === "worker" && s.workers_alive !== null) series.workers_alive.push({ x, y: s.workers_alive });
      if (s.role === "web" && s.open_long_polls !== null) series.open_long_polls.push({ x, y: s.open_long_polls });
    }
    charts.cpu.setPoints("cpu_percent", series.cpu_percent);
    charts.cpu.setPoints("memory_percent", series.memory_percent);
    charts.disk.setPoints("disk_free_percent", series.disk_free_percent);
    for (const queue of ["aggregation", "privacy", "default"]) charts.queues.setPoints(queue, series[queue]);
    charts.workers.setPoints("workers_alive", series.workers_alive);
    charts.workers.setPoints("open_long_polls", series.open_long_polls);
  }

  async function refresh() {
    try {
      renderCurrent(await request(root.dataset.healthUrl));
      const hours = Number(document.getElementById("history-range").value);
      const since = new Date(Date.now() - hours * 3600 * 1000).toISOString();
      const history = await request(`${root.dataset.historyUrl}?since=${encodeURIComponent(since)}&limit=2000`);
      renderHistory(history.samples);
    } catch (error) {
      console.warn("health refresh failed", error);
    }
  }

  document.getElementById("history-range").addEventListener("change", refresh);
  refresh();
  window.setInterval(refresh, REFRESH_MS);
})();
