/*
 * Home page (trainings): live rows, counts and alerts.
 *
 * WebSocket events (docs/websocket.md) of the trainings that can still change (subscribed at load) rewrite
 * the one row they name: training_started / training_completed (status, best accuracy, finished),
 * round_opened / round_completed (round, best accuracy); the per-status counts move with each status
 * change. alert events (the subscribed trainings' and the system's) add or update one entry of the latest
 * alerts and keep the open count (from the ids the page started with). Only while the socket is down
 * (and every 15 s in the embedded mode, whose in-memory channel layer carries no event from another
 * process) the page polls /api/v1/trainings/ and /api/alerts; a poll also adds trainings created since
 * the page loaded.
 */
(function () {
  "use strict";

  const root = document.getElementById("home");
  if (!root) return;
  const request = window.FedLive.request;
  const table = document.querySelector("#trainings tbody");
  const alertsList = document.getElementById("alerts-list");
  const openCount = document.getElementById("open-alerts");
  const message = document.getElementById("home-message");
  const terminal = new Set(JSON.parse(document.getElementById("terminal-statuses").textContent));
  const openAlerts = new Set(JSON.parse(document.getElementById("open-alert-ids").textContent));
  const embedded = root.dataset.embedded === "true";

  function badge(status) {
    const span = document.createElement("span");
    span.className = `badge status-${String(status).replace(/[^a-z0-9_-]/gi, "")}`;
    span.textContent = status;
    return span;
  }

  const rowOf = (id) => table.querySelector(`tr[data-training="${CSS.escape(id)}"]`);

  function bumpCount(status, delta) {
    const cell = document.querySelector(`#training-counts [data-count="${CSS.escape(status)}"]`);
    if (cell) cell.textContent = String(Math.max(0, Number(cell.textContent) + delta));
  }

  function flash(row) {
    row.classList.remove("arrived");
    void row.offsetWidth; // restart the highlight animation
    row.classList.add("arrived");
  }

  function setStatus(row, status) {
    if (!status || row.dataset.status === status) return;
    bumpCount(row.dataset.status, -1);
    bumpCount(status, +1);
    row.dataset.status = status;
    row.querySelector('[data-cell="status"]').replaceChildren(badge(status));
  }

  function setRound(row, round) {
    if (round === null || round === undefined) return;
    const max = row.dataset.maxRounds;
    row.querySelector('[data-cell="round"]').textContent = max ? `${round} / ${max}` : String(round);
  }

  function setBestAccuracy(row, value) {
    if (value === null || value === undefined || !Number.isFinite(Number(value))) return;
    const cell = row.querySelector('[data-cell="best_accuracy"]');
    const shown = Number(cell.dataset.value ?? cell.textContent);
    if (!Number.isFinite(shown) || Number(value) >= shown) {
      cell.dataset.value = String(value);
      cell.textContent = Number(value).toFixed(4);
    }
  }

  function setFinished(row, isoTime) {
    const cell = row.querySelector('[data-cell="finished"]');
    if (!cell.textContent.trim() && isoTime) cell.textContent = isoTime.slice(0, 16).replace("T", " ");
  }

  function showOpenCount() {
    openCount.textContent = String(openAlerts.size);
  }

  function showAlert(alert, trainingId) {
    if (!alert) return;
    if (alert.acknowledged_at || alert.resolved_at) openAlerts.delete(alert.id);
    else openAlerts.add(alert.id);
    showOpenCount();
    const empty = alertsList.querySelector(".empty");
    if (empty) empty.remove();
    const name = trainingId && rowOf(trainingId) ? rowOf(trainingId).querySelector("td a").textContent : "";
    const item = window.FedLive.alertItem(alert, trainingId ? { id: trainingId, name } : null);
    const old = alertsList.querySelector(`li[data-alert-id="${alert.id}"]`);
    if (old) old.replaceWith(item);
    else {
      alertsList.prepend(item);
      while (alertsList.children.length > 20) alertsList.lastChild.remove();
    }
  }

  function handleEvent(event) {
    if (event.type === "alert") {
      showAlert(event.alert, event.training_id);
      return;
    }
    const row = event.training_id ? rowOf(event.training_id) : null;
    if (!row) return;
    switch (event.type) {
      case "training_started":
        setStatus(row, event.status || "running");
        break;
      case "round_opened":
        setRound(row, event.round);
        break;
      case "round_completed":
        setRound(row, event.round);
        if (event.metrics) setBestAccuracy(row, event.metrics.accuracy ?? event.metrics.federated_accuracy);
        break;
      case "training_completed":
        setStatus(row, event.status);
        setRound(row, event.rounds);
        setBestAccuracy(row, event.best_accuracy);
        setFinished(row, new Date().toISOString());
        break;
      default:
        return;
    }
    flash(row);
  }

  // --- the fallback: poll the API while the socket is down --------------------------------------
  function cell(row, text, attributes) {
    const td = document.createElement("td");
    for (const [key, value] of Object.entries(attributes || {})) td.setAttribute(key, value);
    if (text instanceof Node) td.appendChild(text);
    else td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  /** A row for a training created after the page loaded (the template's columns). */
  function addRow(training) {
    const row = document.createElement("tr");
    row.dataset.training = training.id;
    row.dataset.status = training.status;
    row.dataset.maxRounds = training.config && training.config.max_rounds ? String(training.config.max_rounds) : "";
    cell(row, link(`/dashboard/trainings/${training.id}/`, training.name));
    cell(row, badge(training.status), { "data-cell": "status" });
    cell(row, training.algorithm);
    cell(row, "", { class: "num", "data-cell": "round" });
    cell(row, "–", { class: "num", "data-cell": "best_accuracy" });
    cell(row, (training.created_at || "").slice(0, 16).replace("T", " "));
    cell(row, "", { "data-cell": "finished" });
    const links = cell(row, "", { class: "links" });
    links.append(
      link(`/dashboard/trainings/${training.id}/`, "live"), " · ",
      link(`/dashboard/trainings/${training.id}/versions/`, "versions"), " · ",
      link(`/dashboard/trainings/new/?clone=${training.id}`, "clone"), " · ",
      link(`/admin/trainings/training/${training.id}/change/`, "admin"), " · ",
      link(`/api/training/${training.id}/status`, "status JSON"),
    );
    const empty = table.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    table.prepend(row);
    bumpCount(training.status, +1);
    return row;
  }

  let live = null;

  function applyTraining(training) {
    let row = rowOf(training.id);
    if (!row) {
      row = addRow(training);
      if (!terminal.has(training.status) && live) live.subscribe(training.id);
      message.hidden = false;
      message.textContent = `New training ${training.name} (${training.status}).`;
    }
    const before = row.textContent;
    setStatus(row, training.status);
    setRound(row, training.current_round);
    setBestAccuracy(row, training.best_accuracy);
    setFinished(row, training.finished_at);
    if (row.textContent !== before) flash(row);
  }

  async function poll() {
    try {
      const trainings = await request("/api/v1/trainings/?limit=100");
      for (const training of (trainings.results || trainings).slice().reverse()) applyTraining(training);
      const latest = await request("/api/alerts?limit=20");
      for (const alert of latest.alerts.slice().reverse()) {
        if (!alertsList.querySelector(`li[data-alert-id="${alert.id}"]`)) showAlert(alert, alert.training || "");
      }
      const open = await request("/api/alerts?open=1&unacknowledged=1&limit=1000");
      openAlerts.clear();
      for (const alert of open.alerts) openAlerts.add(alert.id);
      showOpenCount();
    } catch (error) {
      console.warn("home poll failed", error);
    }
  }

  live = window.FedLive.connect({
    trainingIds: JSON.parse(document.getElementById("live-trainings").textContent),
    onEvent: handleEvent,
    onState: window.FedLive.pollWhileDown({ badge: document.getElementById("live-state"), poll, embedded }),
  });
})();
