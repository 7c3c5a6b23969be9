/*
 * Compare trainings: one Chart.js line per selected training for the chosen metric (the series are
 * embedded by the server), and a CSV download of that metric (round, one column per training).
 */
(function () {
  "use strict";

  const select = document.getElementById("compare-metric");
  const container = document.getElementById("chart-compare");
  if (!select || !container) return;
  const series = JSON.parse(document.getElementById("compare-series").textContent);
  const selected = JSON.parse(document.getElementById("compare-selected").textContent);
  const csvUrl = document.getElementById("compare-page").dataset.csvUrl;
  const chart = window.FedChart.line(container, {
    title: "Selected trainings, one metric per round",
    series: selected.filter((id) => series[id]).map((id) => ({ key: id, label: series[id].name })),
  });

  function draw() {
    const metric = select.value;
    for (const id of selected) if (series[id]) chart.setPoints(id, series[id].metrics[metric] || []);
    document.getElementById("compare-title").textContent = `${metric} per round`;
    const params = new URLSearchParams({ metric });
    for (const id of selected) params.append("training", id);
    document.getElementById("compare-csv").href = `${csvUrl}?${params}`;
  }

  select.addEventListener("change", draw);
  draw();
})();
