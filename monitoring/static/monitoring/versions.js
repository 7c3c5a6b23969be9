/*
 * Versions page: compare two versions (GET /api/v1/trainings/<id>/versions/compare?a=&b=, a per-tensor
 * table), roll back with a confirmation dialog (POST /api/v1/trainings/<id>/rollback), then reload to show
 * the new version and the rollback history.
 */
(function () {
  "use strict";

  const root = document.getElementById("versions-page");
  if (!root) return;
  const request = window.FedLive.request;
  const format = (value) => window.FedChart ? window.FedChart.formatNumber(value) : (value === null || value === undefined ? "–" : String(Number(Number(value).toPrecision(4))));
  const message = document.getElementById("versions-message");

  function notify(text, isError) {
    message.hidden = false;
    message.className = isError ? "notice error" : "notice";
    message.textContent = text;
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    row.appendChild(td);
  }

  async function compare(a, b) {
    const section = document.getElementById("comparison");
    try {
      const body = await request(`${root.dataset.compareUrl}?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
      document.getElementById("comparison-title").textContent = `Comparison of v${body.a.number} and v${body.b.number}`;
      const o = body.overall || {};
      document.getElementById("comparison-overall").textContent = `Whole model: L2 distance ${format(o.l2_distance)}, relative change ${format(o.relative_change)}, cosine similarity ${format(o.cosine_similarity)}, max |difference| ${format(o.max_abs_difference)}.`;
      const tensors = document.querySelector("#comparison-tensors tbody");
      tensors.textContent = "";
      for (const t of body.tensors) {
        const row = document.createElement("tr");
        cell(row, t.name);
        cell(row, `[${t.shape.join(", ")}]`);
        cell(row, format(t.l2_distance), "num");
        cell(row, format(t.relative_change), "num");
        cell(row, format(t.cosine_similarity), "num");
        cell(row, format(t.max_abs_difference), "num");
        tensors.appendChild(row);
      }
      const metrics = document.querySelector("#comparison-metrics tbody");
      metrics.textContent = "";
      for (const [name, d] of Object.entries(body.metric_deltas || {})) {
        const row = document.createElement("tr");
        cell(row, name);
        cell(row, format(d.a), "num");
        cell(row, format(d.b), "num");
        cell(row, format(d.delta), "num");
        metrics.appendChild(row);
      }
      section.hidden = false;
      section.scrollIntoView({ block: "nearest" });
    } catch (error) {
      notify(`Compare failed: ${error.message}`, true);
    }
  }

  document.getElementById("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    compare(document.getElementById("compare-a").value, document.getElementById("compare-b").value);
  });

  const picks = [...document.querySelectorAll("input.pick")];
  for (const pick of picks) {
    pick.addEventListener("change", () => {
      const chosen = picks.filter((p) => p.checked).map((p) => p.value);
      if (chosen.length === 2) {
        const [b, a] = chosen;  // rows are newest first
        document.getElementById("compare-a").value = a;
        document.getElementById("compare-b").value = b;
        compare(a, b);
        for (const p of picks) p.checked = false;
      }
    });
  }

  const dialog = document.getElementById("rollback-dialog");
  let target = null;
  for (const button of document.querySelectorAll("button.rollback")) {
    button.addEventListener("click", () => {
      target = button.dataset.version;
      dialog.querySelector('[data-field="target"]').textContent = `v${target}`;
      dialog.querySelector("input[name=reason]").value = "";
      dialog.showModal();
    });
  }
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "confirm" || target === null) return;
    const reason = dialog.querySelector("input[name=reason]").value;
    try {
      const body = await request(root.dataset.rollbackUrl, { method: "POST", body: { version: Number(target), reason } });
      notify(body.status === "applied" ? `Rolled back to v${body.target_version}: v${body.version} is current.` : `Rollback to v${body.target_version} is ${body.status}: it is applied after the round in flight.`, false);
      window.setTimeout(() => window.location.reload(), 1200);
    } catch (error) {
      notify(`Rollback failed: ${error.message}`, true);
    }
  });
})();
