/*
 * Agents page: sort the table in place by a column (the headings are also plain links that sort on the
 * server, so the page works without JavaScript), and quarantine / activate / disable an agent after a
 * confirmation (POST /api/v1/agents/<agent_id>/<action>/, staff only, audited).
 */
(function () {
  "use strict";

  const table = document.getElementById("agents");
  if (!table) return;
  const body = table.querySelector("tbody");
  const message = document.getElementById("agents-message");
  const headings = [...table.querySelectorAll("thead th")];

  function notify(text, isError) {
    message.hidden = false;
    message.className = isError ? "notice error" : "notice";
    message.textContent = text;
  }

  function sortBy(index, descending) {
    const rows = [...body.querySelectorAll("tr[data-agent]")];
    const value = (row) => row.children[index].dataset.sortValue ?? row.children[index].textContent;
    const numeric = rows.every((row) => value(row) !== "" && Number.isFinite(Number(value(row))));
    rows.sort((a, b) => {
      const x = value(a);
      const y = value(b);
      const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return descending ? -order : order;
    });
    for (const row of rows) body.appendChild(row);
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

  const WARNINGS = {
    quarantine: "It gets no new tasks until activated; its open tasks stay.",
    disable: "Its token stops working for the agent protocol until it is activated again.",
    activate: "It becomes eligible for rounds again.",
  };

  body.addEventListener("click", async (event) => {
    const button = event.target.closest("button.agent-action");
    if (!button) return;
    const { action, agent } = button.dataset;
    if (!window.confirm(`${action[0].toUpperCase()}${action.slice(1)} agent ${agent}? ${WARNINGS[action] || ""}`)) return;
    try {
      const result = await window.FedLive.request(`/api/v1/agents/${encodeURIComponent(agent)}/${action}/`, { method: "POST" });
      const row = button.closest("tr");
      const cell = row.querySelector('[data-cell="status"]');
      cell.dataset.sortValue = result.status;
      cell.textContent = "";
      const badge = document.createElement("span");
      badge.className = `badge status-${result.status}`;
      badge.textContent = result.status;
      cell.appendChild(badge);
      const targets = { quarantine: "quarantined", activate: "active", disable: "disabled" };
      for (const other of row.querySelectorAll("button.agent-action")) other.hidden = targets[other.dataset.action] === result.status;
      notify(`Agent ${agent} is ${result.status}.`, false);
    } catch (error) {
      notify(`${action} failed: ${error.message}`, true);
    }
  });
})();
