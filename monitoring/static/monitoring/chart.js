/*
 * FedChart: the dashboard's line and bar charts, drawn by Chart.js (served from /static/vendor/, installed
 * by `make assets` from the npm registry) with chartjs-plugin-zoom.
 *
 *   const chart = FedChart.line(container, {title: "Accuracy", series: [{key: "accuracy", label: ...}],
 *                                           yMin: 0, yMax: 1, xLabel: "round"});
 *   chart.setPoints("accuracy", [{x: 1, y: 0.5}, ...]);   // replace a series
 *   chart.addPoint("accuracy", 2, 0.7);                    // add or overwrite one x (incremental)
 *
 * Every chart has a legend that toggles series, tooltips with the values under the pointer, zoom by
 * dragging a range (wheel and pinch too) and a keyboard-usable range form (from / to, reset). Its canvas
 * is role="img" with an aria-label, and a text summary of each series (count, latest, min, max) is kept
 * beside it, so a screen reader gets the figures. Text is set with textContent, never innerHTML.
 */
(function () {
  "use strict";

  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

  function element(name, attributes, parent) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, String(value));
    }
    if (parent) parent.appendChild(node);
    return node;
  }

  function formatNumber(value, digits) {
    if (value === null || value === undefined || !Number.isFinite(Number(value))) return "–";
    const number = Number(value);
    if (digits !== undefined) return number.toFixed(digits);
    const magnitude = Math.abs(number);
    if (magnitude !== 0 && (magnitude < 0.001 || magnitude >= 1e6)) return number.toExponential(3);
    return String(Number(number.toPrecision(4)));
  }

  let counter = 0;

  class FedChartBase {
    constructor(container, options) {
      if (!window.Chart) throw new Error("Chart.js is not loaded (run `make assets`).");
      counter += 1;
      this.options = options;
      this.id = `fedchart-${counter}`;
      this.series = options.series.map((s, index) => ({ ...s, color: s.color || PALETTE[index % PALETTE.length] }));
      container.classList.add("fedchart");
      const box = element("div", { class: "fedchart-canvas" }, container);
      this.canvas = element("canvas", {
        role: "img",
        "aria-label": options.title,
        "aria-describedby": `${this.id}-summary`,
        id: `${this.id}-canvas`,
      }, box);
      element("p", { class: "fedchart-fallback", text: `${options.title}: the summary below lists the figures.` }, this.canvas);
      this.summary = element("p", { class: "fedchart-summary small muted", id: `${this.id}-summary`, "aria-live": "polite" }, container);
      this._buildRangeForm(container);
      this.chart = new window.Chart(this.canvas, this._config());
      this.updateSummary();
    }

    _zoomOptions() {
      return {
        limits: { x: { min: "original", max: "original" } },
        pan: { enabled: true, mode: "x", modifierKey: "shift" },
        zoom: {
          mode: "x",
          drag: { enabled: true, backgroundColor: "rgba(37,99,235,0.12)" },
          wheel: { enabled: true, modifierKey: "ctrl" },
          pinch: { enabled: true },
        },
      };
    }

    _plugins() {
      return {
        legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 3 } },
        tooltip: {
          mode: "index",
          intersect: false,
          callbacks: {
            title: (items) => (items.length ? `${this.options.xLabel || "round"} ${items[0].label}` : ""),
            label: (item) => `${item.dataset.label}: ${formatNumber(item.parsed.y)}`,
          },
        },
        zoom: this._zoomOptions(),
      };
    }

    _buildRangeForm(container) {
      const form = element("form", { class: "fedchart-range", "aria-label": `${this.options.title}: range` }, container);
      const from = element("label", { text: "from " }, form);
      this.fromInput = element("input", { type: "number", inputmode: "numeric", step: "any", "aria-label": `${this.options.title}: from ${this.options.xLabel || "round"}` }, from);
      const to = element("label", { text: " to " }, form);
      this.toInput = element("input", { type: "number", inputmode: "numeric", step: "any", "aria-label": `${this.options.title}: to ${this.options.xLabel || "round"}` }, to);
      element("button", { type: "submit", class: "button secondary small", text: "Zoom" }, form);
      const reset = element("button", { type: "button", class: "button secondary small", text: "Reset zoom" }, form);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const min = this.fromInput.value === "" ? undefined : Number(this.fromInput.value);
        const max = this.toInput.value === "" ? undefined : Number(this.toInput.value);
        if (min !== undefined && max !== undefined && min >= max) return;
        this.zoomTo(min, max);
      });
      reset.addEventListener("click", () => this.resetZoom());
    }

    zoomTo(min, max) {
      if (typeof this.chart.zoomScale === "function") {
        const scale = this.chart.scales.x;
        this.chart.zoomScale("x", { min: min ?? scale.min, max: max ?? scale.max }, "default");
      }
    }

    resetZoom() {
      this.fromInput.value = "";
      this.toInput.value = "";
      if (typeof this.chart.resetZoom === "function") this.chart.resetZoom();
    }

    dataset(key) {
      const index = this.series.findIndex((s) => s.key === key);
      return index < 0 ? null : this.chart.data.datasets[index];
    }

    updateSummary() {
      const parts = [];
      for (const [index, s] of this.series.entries()) {
        const points = this.chart.data.datasets[index].data.filter((p) => p.y !== null && Number.isFinite(p.y));
        if (!points.length) continue;
        const values = points.map((p) => p.y);
        const last = points[points.length - 1];
        parts.push(
          `${s.label}: ${points.length} value${points.length === 1 ? "" : "s"}, latest ${formatNumber(last.y)} at ${this.options.xLabel || "round"} ${last.x}, `
          + `min ${formatNumber(Math.min(...values))}, max ${formatNumber(Math.max(...values))}`,
        );
      }
      this.summary.textContent = parts.length ? `${parts.join("; ")}.` : "No data yet.";
      this.canvas.setAttribute("aria-label", `${this.options.title}. ${this.summary.textContent}`);
    }

    /** Replace one series with points [{x, y}] (or {round, value}). */
    setPoints(key, points) {
      const dataset = this.dataset(key);
      if (!dataset) return;
      dataset.data = (points || []).map((p) => ({ x: Number(p.x ?? p.round), y: p.y ?? p.value }))
        .filter((p) => Number.isFinite(p.x)).sort((a, b) => a.x - b.x);
      this.chart.update("none");
      this.updateSummary();
    }

    /** Add or overwrite the value at x of one series, keeping x order. */
    addPoint(key, x, y) {
      const dataset = this.dataset(key);
      if (!dataset || !Number.isFinite(Number(x))) return;
      const number = Number(x);
      const existing = dataset.data.findIndex((p) => p.x === number);
      if (existing >= 0) dataset.data[existing] = { x: number, y: Number(y) };
      else {
        dataset.data.push({ x: number, y: Number(y) });
        dataset.data.sort((a, b) => a.x - b.x);
      }
      this.chart.update();
      this.updateSummary();
    }

    pointCount(key) {
      const dataset = this.dataset(key);
      return dataset ? dataset.data.length : 0;
    }
  }

  /** One Chart.js configuration for both kinds; they differ in dataset style and x-axis offset. */
  function chartConfig(kind, series, o, plugins) {
    const line = kind === "line";
    return {
      type: kind,
      data: {
        datasets: series.map((s) => ({
          label: s.label, data: [], borderColor: s.color, backgroundColor: s.color, parsing: false,
          ...(line ? { borderWidth: 2, pointRadius: 2, tension: 0, spanGaps: true } : {}),
        })),
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: {
            type: "linear", offset: !line, title: { display: true, text: o.xLabel || "round" },
            ticks: o.xTicks || { precision: 0 },
          },
          y: {
            min: line ? o.yMin : 0, max: o.yMax, ticks: line ? {} : { precision: 0 },
            title: { display: !!o.yLabel, text: o.yLabel || "" },
          },
        },
        plugins,
      },
    };
  }

  class LineChart extends FedChartBase {
    _config() {
      return chartConfig("line", this.series, this.options, this._plugins());
    }
  }

  class BarChart extends FedChartBase {
    _config() {
      return chartConfig("bar", this.series, this.options, this._plugins());
    }
  }

  window.FedChart = {
    line: (container, options) => new LineChart(container, options),
    bar: (container, options) => new BarChart(container, options),
    formatNumber,
    PALETTE,
  };
})();
