/*
 * Live training page: Chart.js charts (accuracy, loss, participation, round duration, privacy budget
 * spent), status cards, the rounds table, alerts, the event log, and the Stop button.
 *
 * Updates are incremental, from WebSocket events (docs/websocket.md): metric_update and round_completed
 * add points to the charts; round_opened / round_completed fetch only the rounds from that number on
 * (rounds.json?after=n) for the participation chart and the table row; alert events add or update one
 * alert. Polling of /metrics and /status is the fallback, only while the socket is not live (every 3 s),
 * plus a slow 15 s check in the embedded mode where the channel layer is per process; and none at all once
 * the training is in a terminal state (completed, stopped, failed, budget_exhausted).
 */
(function () {
  "use strict";

  const root = document.getElementById("training-dashboard");
  if (!root) return;

  const TERMINAL = new Set(JSON.parse(document.getElementById("terminal-statuses").textContent));
  const POLL_MS = 3000;
  const SLOW_POLL_MS = 15000;
  const trainingId = root.dataset.trainingId;
  const urls = {
    status: root.dataset.statusUrl,
    metrics: root.dataset.metricsUrl,
    stop: root.dataset.stopUrl,
    rounds: root.dataset.roundsUrl,
  };
  const request = window.FedLive.request;

  function readJsonScript(id) {
    const element = document.getElementById(id);
    return element ? JSON.parse(element.textContent) : null;
  }

  // --- charts ---------------------------------------------------------------------------------
  const charts = {
    accuracy: window.FedChart.line(document.getElementById("chart-accuracy"), {
      title: "Accuracy per round", yMin: 0, yMax: 1, yLabel: "accuracy",
      series: [
        { key: "accuracy", label: "accuracy (central evaluation)" },
        { key: "federated_accuracy", label: "federated accuracy (agents)" },
      ],
    }),
    loss: window.FedChart.line(document.getElementById("chart-loss"), {
      title: "Loss per round", yMin: 0, yLabel: "loss",
      series: [
        { key: "loss", label: "loss (central evaluation)" },
        { key: "federated_loss", label: "federated loss (agents)" },
        { key: "train_loss", label: "training loss" },
      ],
    }),
    participation: window.FedChart.bar(document.getElementById("chart-participation"), {
      title: "Participation per round", yLabel: "agents",
      series: [
        { key: "selected", label: "selected", color: "#94a3b8" },
        { key: "reported", label: "reported", color: "#16a34a" },
        { key: "dropped", label: "dropped", color: "#dc2626" },
      ],
    }),
    duration: window.FedChart.line(document.getElementById("chart-duration"), {
      title: "Round duration", yMin: 0, yLabel: "seconds",
      series: [
        { key: "round_seconds", label: "round (open to aggregated)" },
        { key: "aggregation_seconds", label: "aggregation" },
      ],
    }),
    privacy: window.FedChart.line(document.getElementById("chart-privacy"), {
      title: "Privacy budget spent", yMin: 0, yLabel: "epsilon",
      series: [
        { key: "privacy_epsilon_spent", label: "epsilon spent" },
        { key: "privacy_budget", label: "epsilon budget", color: "#9ca3af" },
      ],
    }),
  };
  const METRIC_CHART = {};
  for (const [chartName, keys] of Object.entries({
    accuracy: ["accuracy", "federated_accuracy"],
    loss: ["loss", "federated_loss", "train_loss"],
    duration: ["round_seconds", "aggregation_seconds"],
    privacy: ["privacy_epsilon_spent"],
  })) for (const key of keys) METRIC_CHART[key] = charts[chartName];

  function applyMetrics(metrics) {
    for (const [name, chart] of Object.entries(METRIC_CHART)) chart.setPoints(name, (metrics && metrics[name]) || []);
    drawBudgetLine();
  }

  function addMetric(name, round, value) {
    const chart = METRIC_CHART[name];
    if (chart && value !== null && value !== undefined) chart.addPoint(name, Number(round), Number(value));
    if (name === "privacy_epsilon_spent") drawBudgetLine();
  }

  function drawBudgetLine() {
    if (!lastStatus || !lastStatus.privacy) return;
    const spent = charts.privacy.dataset("privacy_epsilon_spent").data;
    const last = spent.length ? spent[spent.length - 1].x : 1;
    const epsilon = lastStatus.privacy.epsilon;
    // over the rounds drawn so far (to max_rounds would squash the spend of a long training)
    charts.privacy.setPoints("privacy_budget", [{ x: spent.length ? spent[0].x : 0, y: epsilon }, { x: last, y: epsilon }]);
  }

  // --- rounds (participation chart and table rows) --------------------------------------------
  const roundsBody = document.querySelector("#rounds tbody");

  function formatNumber(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function badge(value) {
    const span = document.createElement("span");
    span.className = `badge status-${String(value).replace(/[^a-z0-9_-]/gi, "")}`;
    span.textContent = value;
    return span;
  }

  function roundRow(number) {
    let row = roundsBody.querySelector(`tr[data-round="${number}"]`);
    if (row) return row;
    const empty = roundsBody.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    row = document.createElement("tr");
    row.dataset.round = String(number);
    const cells = [["num", null, String(number)], ["", "status"], ["num", "attempt"], ["num", "tasks"], ["num", "accuracy", "–"], ["num", "loss", "–"], ["num", "duration"], ["", "completed"], ["muted", "error"]];
    for (const [className, name, text] of cells) {
      const cell = document.createElement("td");
      if (className) cell.className = className;
      if (name) cell.dataset.cell = name;
      if (text) cell.textContent = text;
      row.appendChild(cell);
    }
    // newest first, like the server-rendered table
    const next = [...roundsBody.querySelectorAll("tr[data-round]")].find((r) => Number(r.dataset.round) < number);
    roundsBody.insertBefore(row, next || null);
    return row;
  }

  function setCell(row, name, content) {
    // (the status cell is the second; server-rendered rows keep a plain <td> there)
    const cell = row.querySelector(`[data-cell="${name}"]`) || (name === "status" ? row.children[1] : null);
    if (!cell) return;
    cell.textContent = "";
    if (content instanceof Node) cell.appendChild(content);
    else cell.textContent = content;
  }

  let lastRoundFetched = 0;

  function applyRounds(rows) {
    for (const r of rows) {
      charts.participation.addPoint("selected", r.round, r.selected);
      charts.participation.addPoint("reported", r.round, r.reported);
      charts.participation.addPoint("dropped", r.round, r.dropped);
      const row = roundRow(r.round);
      setCell(row, "status", badge(r.status));
      setCell(row, "attempt", String(r.attempt));
      setCell(row, "tasks", `${r.reported} / ${r.selected}`);
      setCell(row, "duration", r.duration === null ? "" : `${r.duration.toFixed(1)} s`);
      lastRoundFetched = Math.max(lastRoundFetched, r.round);
    }
  }

  async function refreshRounds(from) {
    const body = await request(`${urls.rounds}?after=${Math.max(0, from)}`);
    applyRounds(body.rounds);
  }

  function setRoundMetrics(round, metrics) {
    const row = roundsBody.querySelector(`tr[data-round="${round}"]`);
    if (!row) return;
    const accuracy = metrics.accuracy ?? metrics.federated_accuracy;
    const loss = metrics.loss ?? metrics.federated_loss ?? metrics.train_loss;
    if (accuracy !== undefined) setCell(row, "accuracy", formatNumber(accuracy, 4));
    if (loss !== undefined) setCell(row, "loss", formatNumber(loss, 4));
    setCell(row, "completed", new Date().toISOString().slice(0, 19).replace("T", " "));
  }

  function addVersionRow(number) {
    const body = document.querySelector("#versions tbody");
    if (!body || number === null || number === undefined) return;
    if ([...body.querySelectorAll("td:first-child")].some((td) => td.textContent.trim().startsWith(`v${number}`))) return;
    const empty = body.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    for (const current of body.querySelectorAll("tr.current")) {
      current.classList.remove("current");
      const small = current.querySelector("small");
      if (small) small.remove();
    }
    const row = document.createElement("tr");
    row.className = "current";
    const first = document.createElement("td");
    first.className = "num";
    first.textContent = `v${number} `;
    const small = document.createElement("small");
    small.textContent = "current";
    first.appendChild(small);
    row.appendChild(first);
    for (let i = 0; i < 4; i += 1) row.appendChild(document.createElement("td"));
    body.prepend(row);
  }

  // --- status cards ---------------------------------------------------------------------------
  let lastStatus = null;

  function setField(name, text) {
    for (const element of root.querySelectorAll(`[data-field="${name}"]`)) element.textContent = text;
  }

  function renderStatus(status) {
    for (const element of root.querySelectorAll('[data-field="status"]')) {
      element.textContent = "";
      element.appendChild(badge(status.status));
    }
    setField("current_round", String(status.current_round));
    setField("completed_rounds", String(status.completed_rounds));
    setField("round_status", status.round ? status.round.status : "no round");
    setField("deadline", status.round && status.round.deadline ? status.round.deadline : "–");
    setField("best_accuracy", formatNumber(status.best_accuracy, 4));
    setField("version", status.current_version ? `v${status.current_version.number}` : "–");
    setField("stop_reason", status.stop_reason || "");
    if (status.privacy) setField("privacy_spent", formatNumber(status.privacy.spent_epsilon, 3));
    const tasks = root.querySelector('[data-field="tasks"]');
    if (tasks) {
      tasks.textContent = "";
      for (const [name, count] of Object.entries((status.round && status.round.tasks) || {})) {
        if (!count) continue;
        const pill = document.createElement("span");
        pill.className = "pill";
        pill.textContent = `${name} ${count}`;
        tasks.append(pill, " ");
      }
    }
    document.getElementById("status-json").textContent = JSON.stringify(status, null, 2);
    const finished = TERMINAL.has(status.status);
    document.getElementById("stop-form").hidden = finished || status.status === "pending";
    const startForm = document.getElementById("start-form");
    if (startForm) startForm.hidden = status.status !== "pending";
    root.dataset.status = status.status;
    lastStatus = status;
    if (finished) stopPolling();
  }

  async function refreshStatus() {
    renderStatus(await request(urls.status));
  }

  // --- polling (fallback) ---------------------------------------------------------------------
  let pollTimer = null;
  let pollEvery = 0;

  async function poll() {
    try {
      const [metrics] = await Promise.all([request(urls.metrics), refreshStatus()]);
      applyMetrics(metrics.metrics);
      await refreshRounds(lastRoundFetched);
    } catch (error) {
      console.warn("poll failed", error);
    }
  }

  function startPolling(every) {
    if (lastStatus && TERMINAL.has(lastStatus.status)) return;
    if (pollTimer && pollEvery === every) return;
    stopPolling();
    pollEvery = every;
    pollTimer = window.setInterval(poll, every);
  }

  function stopPolling() {
    if (pollTimer) window.clearInterval(pollTimer);
    pollTimer = null;
    pollEvery = 0;
  }

  // --- event log and alerts -------------------------------------------------------------------
  const eventLog = document.getElementById("event-log");

  function logEvent(text) {
    const empty = eventLog.querySelector(".empty");
    if (empty) empty.remove();
    const item = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    item.append(time, text);
    eventLog.prepend(item);
    while (eventLog.children.length > 50) eventLog.lastChild.remove();
  }

  function showAlert(alert) {
    const list = document.getElementById("alerts-list");
    if (!list || !alert) return;
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    const old = list.querySelector(`li[data-alert-id="${alert.id}"]`);
    const item = window.FedLive.alertItem(alert);
    if (old) old.replaceWith(item);
    else list.prepend(item);
  }

  // --- WebSocket ------------------------------------------------------------------------------
  function handleEvent(message) {
    if (message.training_id && message.training_id !== trainingId) return;
    if (message.type === "alert" && !message.training_id) return; // a system alert, on the alerts page
    switch (message.type) {
      case "metric_update":
        if (message.metric) addMetric(message.metric.name, message.metric.round ?? message.round, message.metric.value);
        break;
      case "round_completed":
        logEvent(`round ${message.round} completed (version ${message.version ?? "?"})`);
        for (const [name, value] of Object.entries(message.metrics || {})) addMetric(name, message.round, value);
        refreshRounds(message.round).then(() => setRoundMetrics(message.round, message.metrics || {})).catch(() => {});
        addVersionRow(message.version);
        refreshStatus().catch(() => {});
        break;
      case "round_opened":
        logEvent(`round ${message.round} opened with ${message.agents} agent(s)`);
        refreshRounds(message.round).catch(() => {});
        refreshStatus().catch(() => {});
        break;
      case "training_started":
        logEvent("training started");
        refreshStatus().catch(() => {});
        break;
      case "training_completed":
        logEvent(`training ${message.status}${message.reason ? `: ${message.reason}` : ""}`);
        refreshStatus().then(() => refreshRounds(lastRoundFetched)).catch(() => {});
        break;
      case "training.rolled_back":
        logEvent(`rolled back to version ${message.target_version} (new version ${message.version}, ${message.trigger})`);
        addVersionRow(message.version);
        refreshStatus().catch(() => {});
        break;
      case "alert":
        if (message.alert) {
          logEvent(`alert ${message.action || ""} (${message.alert.severity}): ${message.alert.message}`);
          showAlert(message.alert);
        }
        break;
      case "error":
        logEvent(`server: ${message.message}`);
        break;
      default:
        break;
    }
  }

  const liveBadge = document.getElementById("live-state");
  const embedded = root.dataset.embedded === "1";
  window.FedLive.connect({
    trainingIds: [trainingId],
    onEvent: handleEvent,
    onState(state) {
      window.FedLive.showState(liveBadge, state, "polling");
      if (lastStatus && TERMINAL.has(lastStatus.status)) return;
      if (state === "live") {
        // Embedded mode: the in-memory channel layer reaches only this web process's own events.
        if (embedded) startPolling(SLOW_POLL_MS);
        else stopPolling();
      } else if (state !== "connecting") startPolling(POLL_MS);
    },
  });

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
    try {
      const body = await request(urls.stop, { method: "POST" });
      notify(`Training ${body.status}.`, false);
      await refreshStatus();
    } catch (error) {
      notify(`Stop failed: ${error.message}`, true);
    } finally {
      button.disabled = false;
    }
  });

  // --- start ----------------------------------------------------------------------------------
  renderStatus(readJsonScript("initial-status"));
  applyMetrics(readJsonScript("initial-metrics"));
  applyRounds(readJsonScript("initial-rounds") || []);
  if (!TERMINAL.has(lastStatus.status)) startPolling(POLL_MS);  // until the socket says it is live
})();
