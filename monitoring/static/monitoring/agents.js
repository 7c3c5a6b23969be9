/*
 * Agents pages.
 *
 * The list (#agents): sort the table in place by a column (the headings are also plain links that sort on
 * the server, so the page works without JavaScript; rows without a value stay last in either order, as in
 * the API's leaderboard), and live rows: each `agent_update` WebSocket event (docs/websocket.md) rewrites
 * the one row it names, and the online badges follow last-seen times locally. Polling of /api/v1/agents/
 * runs only while the socket is down (and slowly in the embedded mode, whose in-memory channel layer does
 * not carry events from another process).
 *
 * Both pages: quarantine / activate / disable after a confirmation
 * (POST /api/v1/agents/<agent_id>/<action>/, staff only, audited). The agent page (#agent-page) also draws
 * the reliability chart from the json_script "reliability-series".
 */
(function () {
  "use strict";

  const message = document.getElementById("agents-message");
  const TARGETS = { quarantine: "quarantined", activate: "active", disable: "disabled" };
  const WARNINGS = {
    quarantine: "It gets no new tasks until activated; its open tasks stay.",
    disable: "Its token stops working for the agent protocol until it is activated again.",
    activate: "It becomes eligible for rounds again.",
  };

  function notify(text, isError) {
    if (!message) return;
    message.hidden = false;
    message.className = isError ? "notice error" : "notice";
    message.textContent = text;
  }

  function badge(className, text) {
    const span = document.createElement("span");
    span.className = `badge ${className}`;
    span.textContent = text;
    return span;
  }

  function setStatus(container, status) {
    const cell = container.querySelector('[data-cell="status"]');
    if (cell) {
      cell.dataset.sortValue = status;
      cell.replaceChildren(badge(`status-${String(status).replace(/[^a-z0-9_-]/gi, "")}`, status));
    }
    for (const button of container.querySelectorAll("button.agent-action")) button.hidden = TARGETS[button.dataset.action] === status;
  }

  // --- status buttons (list rows and the agent page) --------------------------------------------
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button.agent-action");
    if (!button) return;
    const { action, agent } = button.dataset;
    if (!window.confirm(`${action[0].toUpperCase()}${action.slice(1)} agent ${agent}? ${WARNINGS[action] || ""}`)) return;
    try {
      const result = await window.FedLive.request(`/api/v1/agents/${encodeURIComponent(agent)}/${action}/`, { method: "POST" });
      setStatus(button.closest("[data-agent]:not(button)"), result.status);
      notify(`Agent ${agent} is ${result.status}.`, false);
    } catch (error) {
      notify(`${action} failed: ${error.message}`, true);
    }
  });

  // --- the agent page's reliability chart -------------------------------------------------------
  const reliabilityBox = document.getElementById("chart-reliability");
  if (reliabilityBox && window.FedChart) {
    const series = JSON.parse(document.getElementById("reliability-series").textContent);
    const chart = window.FedChart.line(reliabilityBox, {
      title: "Reliability over the agent's tasks", yMin: 0, yMax: 1, yLabel: "reliability", xLabel: "task",
      series: [{ key: "reliability", label: "reliability" }],
    });
    chart.setPoints("reliability", series.map((point) => ({ x: point.task, y: point.reliability })));
    const page = document.getElementById("agent-page");
    let finished = series.length ? series[series.length - 1].task : 0;
    // agent_update events of this agent: status, counts, and the chart's next point (its task counters
    // count the same finished tasks as the series); polled only while the socket is down
    const applyOwn = (agent) => {
      if (agent.agent_id !== page.dataset.agent) return;
      setStatus(page, agent.status);
      const total = agent.tasks_completed + agent.tasks_failed + agent.tasks_expired;
      const reliability = agent.reliability ?? (agent.tasks_completed + 1) / (total + 2);
      document.getElementById("agent-reliability").textContent = reliability.toFixed(3);
      document.getElementById("agent-counts").textContent =
        `${agent.tasks_completed} completed, ${agent.tasks_failed} failed, ${agent.tasks_expired} expired of ${total}`;
      if (total > finished) {
        finished = total;
        chart.addPoint("reliability", total, reliability);
      }
    };
    window.FedLive.connect({
      trainingIds: [],
      onEvent(event) {
        if (event.type === "agent_update") applyOwn(event);
      },
      onState: window.FedLive.pollWhileDown({
        badge: document.getElementById("live-state"),
        poll: () => window.FedLive.request(`/api/v1/agents/${encodeURIComponent(page.dataset.agent)}/`).then(applyOwn, () => {}),
        embedded: page.dataset.embedded === "true",
      }),
    });
  }

  // --- the list -----------------------------------------------------------------------------------
  const table = document.getElementById("agents");
  if (!table) return;
  const body = table.querySelector("tbody");
  const headings = [...table.querySelectorAll("thead th")];
  const timeoutMs = Number(table.dataset.timeout || 90) * 1000;

  function sortBy(index, descending) {
    const rows = [...body.querySelectorAll("tr[data-agent]")];
    const value = (row) => row.children[index].dataset.sortValue ?? row.children[index].textContent;
    const known = rows.filter((row) => value(row) !== "");
    const unknown = rows.filter((row) => value(row) === "");
    const numeric = known.every((row) => Number.isFinite(Number(value(row))));
    known.sort((a, b) => {
      const x = value(a);
      const y = value(b);
      const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return descending ? -order : order;
    });
    for (const row of [...known, ...unknown]) body.appendChild(row);
    headings.forEach((th, i) => {
      if (th.querySelector("[data-sort-key]")) th.setAttribute("aria-sort", i === index ? (descending ? "descending" : "ascending") : "none");
    });
  }

  headings.forEach((th, index) => {
    const link = th.querySelector("[data-sort-key]");
    if (!link) return;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      const descending = th.getAttribute("aria-sort") === "ascending";
      sortBy(index, descending);
      const url = new URL(window.location.href);
      url.searchParams.set("sort", link.dataset.sortKey);
      url.searchParams.set("order", descending ? "desc" : "asc");
      window.history.replaceState(null, "", url);
    });
  });

  function setCell(row, name, text, sortValue) {
    const cell = row.querySelector(`[data-cell="${name}"]`);
    if (!cell) return;
    cell.textContent = text;
    if (sortValue !== undefined) cell.dataset.sortValue = String(sortValue);
  }

  function setOnline(row) {
    const seen = row.dataset.lastSeen ? Date.parse(row.dataset.lastSeen) : NaN;
    const online = Number.isFinite(seen) && Date.now() - seen <= timeoutMs;
    const cell = row.querySelector('[data-cell="online"]');
    if (cell && cell.textContent !== (online ? "online" : "offline")) {
      cell.replaceChildren(badge(online ? "status-online" : "status-offline", online ? "online" : "offline"));
    }
  }

  const sortedColumn = () => headings.findIndex((th) => th.getAttribute("aria-sort") !== "none" && th.hasAttribute("aria-sort"));

  const signature = (agent) => JSON.stringify([agent.status, agent.state, agent.last_seen_at, agent.tasks_completed, agent.tasks_failed, agent.tasks_expired]);

  /** Rewrite the row of one agent from an agent_update event or an /api/v1/agents/ entry (a poll's
   * entries that did not change since the last poll are skipped). */
  function applyAgent(agent, fromEvent) {
    const row = body.querySelector(`tr[data-agent="${CSS.escape(agent.agent_id)}"]`);
    if (!row) {
      notify(`New agent ${agent.agent_id} registered; reload the page to list it.`, false);
      return;
    }
    const known = row.dataset.signature;
    row.dataset.signature = signature(agent);
    if (!fromEvent && known === row.dataset.signature) return;
    const completed = agent.tasks_completed;
    const assigned = completed + agent.tasks_failed + agent.tasks_expired;
    const reliability = agent.reliability ?? (completed + 1) / (assigned + 2);
    setStatus(row, agent.status);
    setCell(row, "reliability", reliability.toFixed(2), reliability);
    setCell(row, "assigned", String(assigned), assigned);
    setCell(row, "completed", String(completed), completed);
    setCell(row, "failed", String(agent.tasks_failed), agent.tasks_failed);
    setCell(row, "expired", String(agent.tasks_expired), agent.tasks_expired);
    setCell(row, "state", agent.state);
    if (agent.last_seen_at) {
      row.dataset.lastSeen = agent.last_seen_at;
      const cell = row.querySelector('[data-cell="last_seen"]');
      const time = document.createElement("time");
      time.dateTime = agent.last_seen_at;
      time.title = agent.last_seen_at.slice(0, 19).replace("T", " ");
      time.textContent = new Date(agent.last_seen_at).toLocaleTimeString();
      cell.replaceChildren(time);
      cell.dataset.sortValue = String(Math.floor(Date.parse(agent.last_seen_at) / 1000));
    }
    setOnline(row);
    if (fromEvent || known !== undefined) {
      row.classList.remove("arrived");
      void row.offsetWidth; // restart the highlight animation
      row.classList.add("arrived");
    }
    const index = sortedColumn();
    if (index >= 0) sortBy(index, headings[index].getAttribute("aria-sort") === "descending");
  }

  async function pollAgents() {
    try {
      const answer = await window.FedLive.request("/api/v1/agents/?limit=1000");
      for (const agent of answer.results || answer) applyAgent(agent, false);
    } catch (error) {
      console.warn("agents poll failed", error);
    }
  }

  window.setInterval(() => body.querySelectorAll("tr[data-agent]").forEach(setOnline), 15000);
  const embedded = table.dataset.embedded === "true";
  window.FedLive.connect({
    trainingIds: [],
    onEvent(event) {
      if (event.type === "agent_update" && event.agent_id) applyAgent(event, true);
    },
    onState: window.FedLive.pollWhileDown({ badge: document.getElementById("live-state"), poll: pollAgents, embedded }),
  });
})();
