// Comparison chart: the global norm of several runs overlaid, one colour per run, with a legend.

import {AXIS, PLOT_HEIGHT, TOP, drawAxes, drawLine, logRange, points, valueAt} from './chart.js';
import {el, fmt, fmtStep, printable, setupCanvas} from './format.js';

const MAX_TOOLTIP_ROWS = 12;

/** Horizontal geometry of the comparison chart over the steps of `data`. */
export function compareLayout(width, data) {
  const left = 64;
  const plotWidth = width - left - 24;
  const first = data.first_step;
  const span = data.last_step - data.first_step + 1;
  return {
    width, left, plotWidth,
    xOfStep: (step) => left + ((step - first) / span) * plotWidth,
    stepOfX: (x) => first + ((x - left) / plotWidth) * span,
  };
}

/** Draws every run's pre-clip global norm; returns a hover function (x) -> tooltip info or null. */
export function drawCompareChart(canvas, data, layout, colorOf) {
  const ctx = setupCanvas(canvas, layout.width, TOP + PLOT_HEIGHT + AXIS);
  const lines = data.runs.map((run) => ({run, color: colorOf(run.name), pre: points(run.pre_clip)}));
  const [lo, hi] = logRange(lines.map((line) => line.pre));
  const y = {lo, hi, of: (v) => TOP + PLOT_HEIGHT * (1 - (Math.log10(v) - lo) / (hi - lo))};
  drawAxes(ctx, layout, y, data);
  for (const line of lines) drawLine(ctx, layout, y, line.pre, line.color, [], 1.5);
  for (const line of lines) {
    ctx.fillStyle = line.color;
    for (const step of line.run.explosion_steps) {
      const value = valueAt(line.pre, step, data.bin_width);
      const finite = value !== null && Number.isFinite(value) && value > 0;
      ctx.beginPath();
      ctx.arc(layout.xOfStep(step + 0.5), finite ? y.of(value) : TOP + 5, 3.5, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  canvas.dataset.drawn = 'true';
  canvas.dataset.lines = String(lines.length);
  return (x) => hover(lines, layout, data, x);
}

function hover(lines, layout, data, x) {
  if (x < layout.left || x > layout.left + layout.plotWidth) return null;
  const width = data.bin_width;
  const step = data.first_step + Math.floor((layout.stepOfX(x) - data.first_step) / width) * width;
  const end = Math.min(data.last_step, step + width - 1);
  const rows = lines.map((line) => [line.run.name, valueAt(line.pre, end, width)])
    .filter(([, value]) => value !== null)
    .sort((a, b) => (Number.isNaN(b[1]) - Number.isNaN(a[1])) || b[1] - a[1]);
  if (!rows.length) return null;
  const shown = rows.slice(0, MAX_TOOLTIP_ROWS).map(([name, value]) => [name, fmt(value)]);
  if (rows.length > shown.length) shown.push([`${rows.length - shown.length} more runs`, '']);
  const label = width > 1 ? `steps ${fmtStep(step)}–${fmtStep(end)} (max)` : `step ${fmtStep(step)}`;
  return {label, rows: shown};
}

/** Legend: one entry per drawn run (colour, name as text, explosion count); a click calls onPick(name). */
export function compareLegend(container, data, colorOf, onPick) {
  container.replaceChildren(...data.runs.map((run) => {
    const item = el('button', 'gw-legend-item gw-compare-item');
    item.type = 'button';
    item.dataset.run = run.name;
    item.title = `${printable(run.name)}: ${run.explosions} explosion(s); click to show its details below`;
    const swatch = el('span', 'gw-swatch gw-swatch-line');
    swatch.style.setProperty('--gw-color', colorOf(run.name));
    const name = el('span', 'gw-compare-name', run.name);
    item.append(swatch, name);
    if (run.explosions) item.appendChild(el('span', 'gw-compare-count', `(${run.explosions})`));
    item.addEventListener('click', () => onPick(run.name));
    return item;
  }));
}
