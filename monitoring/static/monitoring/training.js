/*
 * Live training page: charts, status cards, tables, event log and the Stop button.
 *
 * Two sources of updates, both always on:
 *  - WebSocket /ws/dashboard-<random>: {"action": "subscribe", "training_id": ...}, then the events
 *    metric_update, round_completed, training_completed, alert (and round_opened, training_started);
 *  - polling GET /api/training/<id>/metrics and /status every 3 s, because in embedded mode the
 *    in-memory channel layer only reaches the process that sent the event.
 * Operator actions use the REST API (POST /api/training/<id>/stop with the CSRF token).
 */
(function () {
  "use strict";

  const root = document.getElementById("training-dashboard");
  if (!root) return;

  const ACCURACY_SERIES = ["accuracy", "federated_accuracy"];
  const LOSS_SERIES = ["loss", "federated_loss", "train_loss"];
  const TERMINAL = new Set(["completed", "stopped", "failed"]);
  const POLL_MS = 3000;
  const TABLES_EVERY_POLLS = 5;

  const trainingId = root.dataset.trainingId;
  const urls = {
    status: root.dataset.statusUrl,
    metrics: root.dataset.metricsUrl,
    stop: root.dataset.stopUrl,
    tables: root.dataset.tablesUrl,
  };

  const accuracyChart = new window.FedChart.LineChart(document.getElementById("chart-accuracy"), {
    series: ACCURACY_SERIES, yMin: 0, yMax: 1,
  });
  const lossChart = new window.FedChart.LineChart(document.getElementById("chart-loss"), {
    series: LOSS_SERIES, yMin: 0,
  });

  function readJsonScript(id) {
    const element = document.getElementById(id);
    return element ? JSON.parse(element.textContent) : null;
  }

  function chartFor(name) {
    if (ACCURACY_SERIES.includes(name)) return accuracyChart;
    if (LOSS_SERIES.includes(name)) return lossChart;
    return null;
  }

  function applyMetrics(metrics) {
    for (const name of [...ACCURACY_SERIES, ...LOSS_SERIES]) {
      chartFor(name).setPoints(name, (metrics && metrics[name]) || []);
    }
  }

  function addMetric(name, round, value) {
    const chart = chartFor(name);
    if (chart) chart.addPoint(name, Number(round), Number(value));
  }

  // --- status cards ---------------------------------------------------------------------------
  let lastStatus = null;

  function setField(name, text) {
    for (const element of root.querySelectorAll(`[data-field="${name}"]`)) element.textContent = text;
  }

  function setBadge(name, value) {
    for (const element of root.querySelectorAll(`[data-field="${name}"]`)) {
      element.textContent = "";
      const badge = document.createElement("span");
      badge.className = `badge status-${String(value).replace(/[^a-z0-9_-]/gi, "")}`;
      badge.textContent = value;
      element.appendChild(badge);
    }
  }

  function format(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function renderStatus(status) {
    setBadge("status", status.status);
    setField("current_round", String(status.current_round));
    setField("completed_rounds", String(status.completed_rounds));
    setField("round_status", status.round ? status.round.status : "no round");
    setField("deadline", status.round && status.round.deadline ? status.round.deadline : "–");
    setField("best_accuracy", format(status.best_accuracy, 4));
    setField("version", status.current_version ? `v${status.current_version.number}` : "–");
    setField("stop_reason", status.stop_reason || "");
    if (status.privacy) setField("privacy_spent", format(status.privacy.spent_epsilon, 3));
    const tasks = root.querySelector('[data-field="tasks"]');
    if (tasks) {
      tasks.textContent = "";
      for (const [name, count] of Object.entries((status.round && status.round.tasks) || {})) {
        if (!count) continue;
        const pill = document.createElement("span");
        pill.className = "pill";
        pill.textContent = `${name} ${count}`;
        tasks.appendChild(pill);
        tasks.appendChild(document.createTextNode(" "));
      }
    }
    document.getElementById("status-json").textContent = JSON.stringify(status, null, 2);
    document.getElementById("stop-form").hidden = TERMINAL.has(status.status);
    const changed = !lastStatus || lastStatus.completed_rounds !== status.completed_rounds
      || lastStatus.status !== status.status || lastStatus.current_round !== status.current_round;
    lastStatus = status;
    return changed;
  }

  // --- HTTP -----------------------------------------------------------------------------------
  async function fetchJson(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  async function refreshTables() {
    const response = await fetch(urls.tables, { credentials: "same-origin" });
    if (response.ok) document.getElementById("training-tables").innerHTML = await response.text();
  }

  async function refreshStatus() {
    const changed = renderStatus(await fetchJson(urls.status));
    if (changed) await refreshTables();
  }

  let polls = 0;
  let pollTimer = null;

  async function poll() {
    polls += 1;
    try {
      const [metrics] = await Promise.all([fetchJson(urls.metrics), refreshStatus()]);
      applyMetrics(metrics.metrics);
      if (polls % TABLES_EVERY_POLLS === 0) await refreshTables();
    } catch (error) {
      console.warn("poll failed", error);
    }
    if (lastStatus && TERMINAL.has(lastStatus.status)) {
      // Finished: one last refresh happened above; stop polling but keep the socket for late alerts.
      window.clearInterval(pollTimer);
      pollTimer = null;
    }
  }

  // --- event log ------------------------------------------------------------------------------
  const eventLog = document.getElementById("event-log");

  function logEvent(text) {
    const empty = eventLog.querySelector(".empty");
    if (empty) empty.remove();
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    item.appendChild(time);
    item.appendChild(document.createTextNode(text));
    eventLog.prepend(item);
    while (eventLog.children.length > 50) eventLog.lastChild.remove();
  }

  function showAlert(alert) {
    const list = document.getElementById("alerts-list");
    if (!list || !alert) return;
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    const item = document.createElement("li");
    item.className = `alert severity-${alert.severity}`;
    const badge = document.createElement("span");
    badge.className = `badge severity-${alert.severity}`;
    badge.textContent = alert.severity;
    const time = document.createElement("time");
    time.textContent = alert.created_at || new Date().toISOString();
    const message = document.createElement("span");
    message.className = "message";
    message.textContent = alert.message;
    item.append(badge, " ", time, " ");
    if (alert.round !== null && alert.round !== undefined) {
      const round = document.createElement("span");
      round.className = "muted";
      round.textContent = `round ${alert.round}`;
      item.append(round, " ");
    }
    item.append(message);
    list.prepend(item);
  }

  // --- WebSocket ------------------------------------------------------------------------------
  const liveState = document.getElementById("live-state");
  let retryDelay = 1000;

  function setLive(on, text) {
    liveState.className = `badge ${on ? "live-on" : "live-off"}`;
    liveState.textContent = text;
  }

  function handleEvent(message) {
    switch (message.type) {
      case "connected":
        break;
      case "subscribed":
        setLive(true, "live");
        break;
      case "metric_update":
        if (message.metric) addMetric(message.metric.name, message.metric.round ?? message.round, message.metric.value);
        break;
      case "round_completed":
        logEvent(`round ${message.round} completed (version ${message.version ?? "?"})`);
        for (const [name, value] of Object.entries(message.metrics || {})) addMetric(name, message.round, value);
        refreshStatus().then(refreshTables).catch(() => {});
        break;
      case "training_completed":
        logEvent(`training ${message.status}${message.reason ? `: ${message.reason}` : ""}`);
        refreshStatus().then(refreshTables).catch(() => {});
        break;
      case "alert":
        if (message.alert) {
          logEvent(`alert (${message.alert.severity}): ${message.alert.message}`);
          showAlert(message.alert);
        }
        break;
      case "round_opened":
        logEvent(`round ${message.round} opened with ${message.agents} agent(s)`);
        refreshStatus().catch(() => {});
        break;
      case "training_started":
        logEvent("training started");
        refreshStatus().catch(() => {});
        break;
      case "error":
        logEvent(`server: ${message.message}`);
        break;
      default:
        break;
    }
  }

  function connect() {
    const random = Array.from(window.crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    let socket;
    try {
      socket = new WebSocket(`${scheme}://${window.location.host}/ws/dashboard-${random}`);
    } catch (error) {
      setLive(false, "polling");
      return;
    }
    socket.addEventListener("open", () => {
      retryDelay = 1000;
      socket.send(JSON.stringify({ action: "subscribe", training_id: trainingId }));
    });
    socket.addEventListener("message", (event) => {
      try {
        handleEvent(JSON.parse(event.data));
      } catch (error) {
        console.warn("bad event", error);
      }
    });
    socket.addEventListener("close", (event) => {
      setLive(false, event.code === 4401 ? "not authorised (polling)" : "polling");
      if (event.code === 4401) return;
      window.setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 30000);
    });
  }

  // --- Stop button ----------------------------------------------------------------------------
  const stopForm = document.getElementById("stop-form");
  const actionMessage = document.getElementById("action-message");

  function notify(text, isError) {
    actionMessage.hidden = false;
    actionMessage.className = isError ? "notice error" : "notice";
    actionMessage.textContent = text;
  }

  stopForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!window.confirm("Stop this training? The open round is cancelled; the latest version stays the result.")) return;
    const button = stopForm.querySelector("button");
    button.disabled = true;
    const token = stopForm.querySelector("input[name=csrfmiddlewaretoken]").value;
    try {
      const response = await fetch(urls.stop, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRFToken": token, Accept: "application/json" },
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        notify((body.error && body.error.message) || `Stop failed (HTTP ${response.status}).`, true);
      } else {
        notify(`Training ${body.status}.`, false);
      }
      await refreshStatus();
    } catch (error) {
      notify(`Stop failed: ${error.message}`, true);
    } finally {
      button.disabled = false;
    }
  });

  // --- start ----------------------------------------------------------------------------------
  applyMetrics(readJsonScript("initial-metrics"));
  renderStatus(readJsonScript("initial-status"));
  connect();
  pollTimer = window.setInterval(poll, POLL_MS);
})();
