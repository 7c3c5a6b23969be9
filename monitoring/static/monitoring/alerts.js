/*
 * Alerts page: acknowledge one (POST /api/alerts/<id>/acknowledge) or many (POST /api/alerts/acknowledge
 * {"ids": [...]}); new and changed alerts arrive over the WebSocket (the page subscribes to the trainings
 * still running, or to the filtered one; system alerts reach every socket) and are inserted at the top
 * when they match the filters. The page asks /api/alerts every 5 s while the socket is down, and in the
 * embedded mode every 15 s even while it is up: there the in-memory channel layer reaches only the web
 * process, so an alert raised elsewhere (a command, another process) sends no event.
 */
(function () {
  "use strict";

  const root = document.getElementById("alerts-page");
  if (!root) return;
  const request = window.FedLive.request;
  const filters = JSON.parse(document.getElementById("alert-filters").textContent);
  const body = document.querySelector("#alerts tbody");
  const message = document.getElementById("alerts-message");
  const selectedButton = document.getElementById("acknowledge-selected");
  const selectAll = document.getElementById("select-all");
  const trainingNames = {};
  for (const option of document.querySelectorAll("select[name=training] option")) trainingNames[option.value] = option.textContent;

  function notify(text, isError) {
    message.hidden = false;
    message.className = isError ? "notice error" : "notice";
    message.textContent = text;
  }

  function picks() {
    return [...body.querySelectorAll("input.pick")];
  }

  function updateSelection() {
    const chosen = picks().filter((p) => p.checked);
    selectedButton.disabled = chosen.length === 0;
    selectedButton.textContent = chosen.length ? `Acknowledge selected (${chosen.length})` : "Acknowledge selected";
  }

  function markAcknowledged(id, by) {
    const row = body.querySelector(`tr[data-alert-id="${id}"]`);
    if (!row) return;
    row.classList.add("acknowledged");
    const state = row.querySelector('[data-cell="state"]');
    if (state) state.textContent = `acknowledged${by ? ` by ${by}` : ""}`;
    for (const control of row.querySelectorAll("input.pick, button.acknowledge")) control.remove();
    updateSelection();
  }

  async function acknowledge(ids) {
    try {
      if (ids.length === 1) {
        const alert = await request(`/api/alerts/${ids[0]}/acknowledge`, { method: "POST" });
        markAcknowledged(ids[0], alert.acknowledged_by);
      } else {
        const result = await request(root.dataset.acknowledgeUrl, { method: "POST", body: { ids: ids.map(Number) } });
        for (const id of [...result.acknowledged, ...result.already_acknowledged]) markAcknowledged(id, "");
      }
      notify(`Acknowledged ${ids.length} alert${ids.length === 1 ? "" : "s"}.`, false);
    } catch (error) {
      notify(`Acknowledge failed: ${error.message}`, true);
    }
  }

  body.addEventListener("click", (event) => {
    const button = event.target.closest("button.acknowledge");
    if (button) acknowledge([button.dataset.alertId]);
  });
  body.addEventListener("change", (event) => {
    if (event.target.matches("input.pick")) updateSelection();
  });
  selectAll.addEventListener("change", () => {
    for (const pick of picks()) pick.checked = selectAll.checked;
    updateSelection();
  });
  selectedButton.addEventListener("click", () => {
    const ids = picks().filter((p) => p.checked).map((p) => p.value);
    if (ids.length) acknowledge(ids);
  });

  function matches(alert, trainingId) {
    if (filters.severity && alert.severity !== filters.severity) return false;
    if (filters.kind && alert.kind !== filters.kind) return false;
    if (filters.training && trainingId !== filters.training) return false;
    if (filters.state === "open" && (alert.resolved_at || alert.acknowledged_at)) return false;
    if (filters.state === "acknowledged" && !alert.acknowledged_at) return false;
    if (filters.state === "resolved" && !alert.resolved_at) return false;
    return true;
  }

  function td(row, text, className) {
    const cell = document.createElement("td");
    if (className) cell.className = className;
    if (text instanceof Node) cell.appendChild(text);
    else if (text !== undefined) cell.textContent = text;
    row.appendChild(cell);
    return cell;
  }

  function upsert(alert, trainingId) {
    const existing = body.querySelector(`tr[data-alert-id="${alert.id}"]`);
    if (!matches(alert, trainingId)) {
      if (existing && alert.acknowledged_at) markAcknowledged(alert.id, alert.acknowledged_by);
      return;
    }
    const row = document.createElement("tr");
    row.dataset.alertId = String(alert.id);
    row.className = `severity-row-${alert.severity}${alert.acknowledged_at ? " acknowledged" : ""} arrived`;
    const pickCell = td(row);
    if (!alert.acknowledged_at) {
      const pick = document.createElement("input");
      pick.type = "checkbox";
      pick.className = "pick";
      pick.value = String(alert.id);
      pick.setAttribute("aria-label", `Select alert ${alert.id}`);
      pickCell.appendChild(pick);
    }
    const badge = document.createElement("span");
    badge.className = `badge severity-${alert.severity}`;
    badge.textContent = alert.severity;
    td(row, badge);
    td(row, alert.kind);
    if (trainingId) {
      const link = document.createElement("a");
      link.href = `/dashboard/trainings/${trainingId}/`;
      link.textContent = trainingNames[trainingId] || trainingId;
      const cell = td(row, link);
      if (alert.round !== null && alert.round !== undefined) cell.append(` round ${alert.round}`);
    } else td(row, alert.subject || "system", "muted");
    td(row, alert.message, "message");
    td(row, String(alert.count ?? 1), "num");
    td(row, (alert.created_at || "").slice(0, 19).replace("T", " "));
    const state = td(row, alert.acknowledged_at ? `acknowledged by ${alert.acknowledged_by}` : alert.resolved_at ? "resolved" : "open");
    state.dataset.cell = "state";
    const actions = td(row);
    if (!alert.acknowledged_at) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "button secondary small acknowledge";
      button.dataset.alertId = String(alert.id);
      button.textContent = "Acknowledge";
      actions.appendChild(button);
    }
    const empty = body.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    if (existing) existing.replaceWith(row);
    else body.prepend(row);
    document.getElementById("alert-count").textContent = String(body.querySelectorAll("tr[data-alert-id]").length);
    updateSelection();
  }

  // Alerts from /api/alerts carry "training" and "round_number"; events carry "round".
  async function pollAlerts() {
    const params = new URLSearchParams({ limit: "50" });
    if (filters.training) params.set("training_id", filters.training);
    if (filters.severity) params.set("severity", filters.severity);
    try {
      const answer = await request(`${root.dataset.alertsUrl}?${params}`);
      const alerts = Array.isArray(answer) ? answer : (answer.alerts || answer.results || []);
      for (const alert of alerts.slice().reverse()) {
        if (!body.querySelector(`tr[data-alert-id="${alert.id}"]`)) upsert({ ...alert, round: alert.round_number }, alert.training || "");
      }
    } catch (error) {
      console.warn("alerts poll failed", error);
    }
  }

  window.FedLive.connect({
    trainingIds: JSON.parse(document.getElementById("live-trainings").textContent),
    onEvent(event) {
      if (event.type === "alert" && event.alert) upsert(event.alert, event.training_id || "");
    },
    onState: window.FedLive.pollWhileDown({
      badge: document.getElementById("live-state"),
      poll: pollAlerts,
      embedded: root.dataset.embedded === "1",
    }),
  });
  updateSelection();
})();
