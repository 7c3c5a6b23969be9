/*
 * A small self-contained SVG line chart (no dependencies): one x axis (round), one y axis, several
 * named series. Used by the training dashboard for accuracy and loss per round.
 *
 *   const chart = new FedChart.LineChart(element, {series: ["accuracy", "loss"], yMin: 0, yMax: 1});
 *   chart.setPoints("accuracy", [{round: 1, value: 0.5}, ...]);   // replace a series
 *   chart.addPoint("accuracy", 2, 0.7);                          // add or overwrite one round
 *
 * All text is set with textContent, never innerHTML, so metric names cannot inject markup.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
  const MARGIN = { top: 12, right: 16, bottom: 34, left: 52 };

  function svgElement(name, attributes, parent) {
    const element = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attributes || {})) {
      element.setAttribute(key, String(value));
    }
    if (parent) parent.appendChild(element);
    return element;
  }

  /** Round numbers for axis ticks between min and max (about `count` of them). */
  function niceTicks(min, max, count) {
    if (!(max > min)) return [min];
    const rawStep = (max - min) / Math.max(count, 1);
    const magnitude = Math.pow(10, Math.floor(Math.log10(rawStep)));
    const residual = rawStep / magnitude;
    const step = (residual > 5 ? 10 : residual > 2 ? 5 : residual > 1 ? 2 : 1) * magnitude;
    const ticks = [];
    const first = Math.ceil(min / step - 1e-9);
    for (let index = first; index * step <= max + step * 1e-9; index += 1) {
      ticks.push(Number((index * step).toPrecision(12)));  // 0.6, not 0.6000000000000001
    }
    return ticks;
  }

  function formatNumber(value) {
    if (value === 0) return "0";
    const magnitude = Math.abs(value);
    if (magnitude >= 1000 || magnitude < 0.001) return value.toExponential(1);
    return String(Number(value.toPrecision(3)));
  }

  class LineChart {
    constructor(container, options) {
      this.container = container;
      this.options = Object.assign({ height: 260, series: [], yMin: null, yMax: null, xLabel: "round" }, options);
      this.data = new Map();
      for (const name of this.options.series) this.data.set(name, new Map());
      this.svg = svgElement("svg", { role: "img" }, container);
      this.legend = document.createElement("div");
      this.legend.className = "chart-legend";
      container.appendChild(this.legend);
      this.scheduled = false;
      if (typeof ResizeObserver !== "undefined") {
        new ResizeObserver(() => this.scheduleRender()).observe(container);
      } else {
        window.addEventListener("resize", () => this.scheduleRender());
      }
      this.render();
    }

    series(name) {
      if (!this.data.has(name)) this.data.set(name, new Map());
      return this.data.get(name);
    }

    setPoints(name, points) {
      const series = this.series(name);
      series.clear();
      for (const point of points || []) {
        if (Number.isFinite(point.round) && Number.isFinite(point.value)) series.set(point.round, point.value);
      }
      this.scheduleRender();
    }

    addPoint(name, round, value) {
      if (!Number.isFinite(round) || !Number.isFinite(value)) return;
      this.series(name).set(round, value);
      this.scheduleRender();
    }

    scheduleRender() {
      if (this.scheduled) return;
      this.scheduled = true;
      window.requestAnimationFrame(() => {
        this.scheduled = false;
        this.render();
      });
    }

    color(name) {
      const index = Array.from(this.data.keys()).indexOf(name);
      return PALETTE[index % PALETTE.length];
    }

    render() {
      const width = Math.max(this.container.clientWidth || 600, 240);
      const height = this.options.height;
      const svg = this.svg;
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      svg.setAttribute("width", width);
      svg.setAttribute("height", height);

      const points = [];
      for (const series of this.data.values()) {
        for (const [round, value] of series) points.push([round, value]);
      }
      this.renderLegend();
      if (points.length === 0) {
        const text = svgElement("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty-text" }, svg);
        text.textContent = "No data yet";
        return;
      }

      let xMin = Math.min(...points.map((p) => p[0]));
      let xMax = Math.max(...points.map((p) => p[0]));
      if (xMin === xMax) { xMin -= 1; xMax += 1; }
      let yMin = this.options.yMin ?? Math.min(...points.map((p) => p[1]));
      let yMax = this.options.yMax ?? Math.max(...points.map((p) => p[1]));
      yMin = Math.min(yMin, ...points.map((p) => p[1]));
      yMax = Math.max(yMax, ...points.map((p) => p[1]));
      if (yMin === yMax) { yMin -= 0.5; yMax += 0.5; }
      const plotWidth = width - MARGIN.left - MARGIN.right;
      const plotHeight = height - MARGIN.top - MARGIN.bottom;
      const x = (round) => MARGIN.left + ((round - xMin) / (xMax - xMin)) * plotWidth;
      const y = (value) => MARGIN.top + (1 - (value - yMin) / (yMax - yMin)) * plotHeight;

      const grid = svgElement("g", { class: "grid" }, svg);
      const axis = svgElement("g", { class: "axis" }, svg);
      for (const tick of niceTicks(yMin, yMax, 5)) {
        svgElement("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(tick), y2: y(tick) }, grid);
        const label = svgElement("text", { x: MARGIN.left - 6, y: y(tick) + 4, "text-anchor": "end" }, axis);
        label.textContent = formatNumber(tick);
      }
      const xTicks = niceTicks(xMin, xMax, Math.max(2, Math.floor(plotWidth / 70))).filter(Number.isInteger);
      for (const tick of xTicks) {
        svgElement("line", { x1: x(tick), x2: x(tick), y1: MARGIN.top + plotHeight, y2: MARGIN.top + plotHeight + 4 }, axis);
        const label = svgElement("text", { x: x(tick), y: MARGIN.top + plotHeight + 16, "text-anchor": "middle" }, axis);
        label.textContent = String(tick);
      }
      svgElement("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotHeight, y2: MARGIN.top + plotHeight }, axis);
      svgElement("line", { x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotHeight }, axis);
      const xLabel = svgElement("text", { x: MARGIN.left + plotWidth / 2, y: height - 4, "text-anchor": "middle" }, axis);
      xLabel.textContent = this.options.xLabel;

      for (const [name, series] of this.data) {
        if (series.size === 0) continue;
        const color = this.color(name);
        const sorted = Array.from(series.entries()).sort((a, b) => a[0] - b[0]);
        const path = sorted.map(([round, value]) => `${x(round).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
        svgElement("polyline", { points: path, fill: "none", stroke: color, "stroke-width": 2, "stroke-linejoin": "round" }, svg);
        const dots = svgElement("g", { fill: color }, svg);
        const radius = sorted.length > 60 ? 1.5 : 3;
        for (const [round, value] of sorted) {
          const dot = svgElement("circle", { cx: x(round), cy: y(value), r: radius }, dots);
          const title = svgElement("title", {}, dot);
          title.textContent = `${name}, round ${round}: ${value.toFixed(4)}`;
        }
      }
    }

    renderLegend() {
      while (this.legend.firstChild) this.legend.removeChild(this.legend.firstChild);
      for (const [name, series] of this.data) {
        const item = document.createElement("span");
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = this.color(name);
        item.appendChild(swatch);
        const last = Array.from(series.entries()).sort((a, b) => a[0] - b[0]).pop();
        item.appendChild(document.createTextNode(last ? `${name} ${last[1].toFixed(4)}` : `${name} (no data)`));
        if (!last) item.className = "nodata";
        this.legend.appendChild(item);
      }
    }
  }

  window.FedChart = { LineChart, niceTicks };
})();
