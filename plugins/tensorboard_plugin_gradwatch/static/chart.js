// Global gradient norm on a log scale: pre/post-clip lines, thresholds, explosions, clipping spans.

import {COLORS, decadeLabel, fmt, fmtStep, num, setupCanvas, stepTicks} from './format.js';

export const TOP = 22;
export const PLOT_HEIGHT = 230;
export const AXIS = 38;

/** Numeric points {step, value} of a {steps, values} line (null -> []). */
export function points(line) {
  if (!line) return [];
  return line.steps.map((step, i) => ({step, value: num(line.values[i])}));
}

/** [lo, hi] in log10 covering every finite positive value, padded a little. */
export function logRange(lines) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const line of lines) {
    for (const p of line) {
      if (Number.isFinite(p.value) && p.value > 0) {
        lo = Math.min(lo, Math.log10(p.value));
        hi = Math.max(hi, Math.log10(p.value));
      }
    }
  }
  if (!Number.isFinite(lo)) return [-1, 1];
  const pad = Math.max(0.15, (hi - lo) * 0.08);
  return [lo - pad, hi + pad];
}

/** Tick values (norms) for the log axis: decades, plus 2 and 5 when few decades show. */
function logTicks(lo, hi) {
  const ticks = [];
  const multipliers = hi - lo < 2.5 ? [1, 2, 5] : [1];
  for (let d = Math.floor(lo); d <= Math.ceil(hi); d++) {
    for (const m of multipliers) {
      const v = m * 10 ** d;
      if (Math.log10(v) >= lo && Math.log10(v) <= hi) ticks.push(v);
    }
  }
  return ticks;
}

export function drawAxes(ctx, layout, y, data) {
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (const v of logTicks(y.lo, y.hi)) {
    const py = y.of(v);
    ctx.beginPath();
    ctx.moveTo(layout.left, py);
    ctx.lineTo(layout.left + layout.plotWidth, py);
    ctx.stroke();
    const d = Math.log10(v);
    ctx.fillText(Number.isInteger(d) ? decadeLabel(d) : fmt(v), layout.left - 6, py);
  }
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  const bottom = TOP + PLOT_HEIGHT;
  const ticks = stepTicks(data.first_step, data.last_step, Math.floor(layout.plotWidth / 90));
  ctx.canvas.dataset.ticks = ticks.join(' ');  // read by the browser test
  for (const step of ticks) {
    ctx.fillRect(layout.xOfStep(step + 0.5), bottom, 1, 4);
    ctx.fillText(fmtStep(step), layout.xOfStep(step + 0.5), bottom + 6);
  }
  ctx.fillText('step (optimizer iteration)', layout.left + layout.plotWidth / 2, bottom + 21);
  ctx.save();
  ctx.translate(12, TOP + PLOT_HEIGHT / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText('global L2 norm (log scale)', 0, -6);
  ctx.restore();
  ctx.strokeStyle = COLORS.axis;
  ctx.strokeRect(layout.left - 0.5, TOP - 0.5, layout.plotWidth + 1, PLOT_HEIGHT + 1);
}

function drawSpans(ctx, layout, spans) {
  for (const [start, end] of spans) {
    const x0 = layout.xOfStep(start);
    const x1 = layout.xOfStep(end + 1);
    ctx.fillStyle = COLORS.clipSpan;
    ctx.fillRect(x0, TOP, Math.max(1, x1 - x0), PLOT_HEIGHT);
    ctx.fillStyle = COLORS.clipThreshold;
    ctx.textAlign = 'left';
    ctx.textBaseline = 'top';
    ctx.fillText('clipping on', x0 + 4, TOP + 4);
  }
}

/** Polyline through finite values; gaps at non-finite ones. */
export function drawLine(ctx, layout, y, line, color, dash, width) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.setLineDash(dash);
  ctx.beginPath();
  let pen = false;
  for (const p of line) {
    if (!(Number.isFinite(p.value) && p.value > 0)) { pen = false; continue; }
    const px = layout.xOfStep(p.step + 0.5);
    const py = y.of(p.value);
    if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    pen = true;
  }
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.lineWidth = 1;
}

/** Value of `line` at the largest stored step <= `step` within `window` steps, else null. */
export function valueAt(line, step, window = Infinity) {
  let lo = 0;
  let hi = line.length - 1;
  if (hi < 0 || line[0].step > step) return null;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (line[mid].step <= step) lo = mid; else hi = mid - 1;
  }
  return step - line[lo].step < window ? line[lo].value : null;
}

export function marker(ctx, x, py, color, shape) {
  ctx.fillStyle = color;
  ctx.strokeStyle = '#fff';
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  if (shape === 'triangle') {
    ctx.moveTo(x, py + 5); ctx.lineTo(x - 5, py - 4); ctx.lineTo(x + 5, py - 4); ctx.closePath();
  } else {
    ctx.arc(x, py, 4.5, 0, 2 * Math.PI);
  }
  ctx.fill();
  ctx.stroke();
  ctx.lineWidth = 1;
}

function drawMarkers(ctx, layout, y, data, pre) {
  for (const step of data.overflow_steps) {
    ctx.fillStyle = COLORS.overflow;
    ctx.fillRect(layout.xOfStep(step + 0.5) - 1, TOP + PLOT_HEIGHT - 8, 2, 8);
  }
  for (const step of data.explosion_steps) {
    const value = valueAt(pre, step, data.bin_width);
    if (value === null) continue;
    const finite = Number.isFinite(value) && value > 0;
    const color = Number.isNaN(value) ? COLORS.nan : COLORS.explosion;
    marker(ctx, layout.xOfStep(step + 0.5), finite ? y.of(value) : TOP + 6, color, finite ? 'circle' : 'triangle');
  }
}

/** Draws the chart; returns a hover function (x) -> tooltip info or null. */
export function drawGlobalChart(canvas, data, layout, highlightStep) {
  const ctx = setupCanvas(canvas, layout.width, TOP + PLOT_HEIGHT + AXIS);
  const lines = {
    pre: points(data.pre_clip), post: points(data.post_clip),
    threshold: points(data.threshold), clip: points(data.clip_threshold),
  };
  const [lo, hi] = logRange(Object.values(lines));
  const y = {lo, hi, of: (v) => TOP + PLOT_HEIGHT * (1 - (Math.log10(v) - lo) / (hi - lo))};
  drawSpans(ctx, layout, data.clipping_spans);
  drawAxes(ctx, layout, y, data);
  drawLine(ctx, layout, y, lines.threshold, COLORS.threshold, [6, 4], 1.5);
  drawLine(ctx, layout, y, lines.clip, COLORS.clipThreshold, [2, 3], 1.5);
  // After clipping: a wide, see-through line under the pre-clip one, so that both show where they
  // coincide (clipping off, or a step under the threshold).
  ctx.globalAlpha = 0.55;
  drawLine(ctx, layout, y, lines.post, COLORS.postClip, [], 5);
  ctx.globalAlpha = 1;
  drawLine(ctx, layout, y, lines.pre, COLORS.preClip, [], 1.5);
  drawMarkers(ctx, layout, y, data, lines.pre);
  if (highlightStep != null) drawHighlight(ctx, layout, highlightStep);
  canvas.dataset.drawn = 'true';
  return (x) => hover(lines, layout, data, x);
}

function drawHighlight(ctx, layout, step) {
  const x = layout.xOfStep(step + 0.5);
  ctx.strokeStyle = COLORS.highlight;
  ctx.lineWidth = 1.5;
  ctx.setLineDash([4, 3]);
  ctx.beginPath();
  ctx.moveTo(x, TOP - 4);
  ctx.lineTo(x, TOP + PLOT_HEIGHT);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.lineWidth = 1;
  ctx.fillStyle = COLORS.highlight;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'bottom';
  ctx.fillText(`step ${fmtStep(step)}`, x, TOP - 5);
}

function hover(lines, layout, data, x) {
  if (x < layout.left || x > layout.left + layout.plotWidth || !lines.pre.length) return null;
  const width = data.bin_width;
  const step = data.first_step + Math.floor((layout.stepOfX(x) - data.first_step) / width) * width;
  const end = Math.min(data.last_step, step + width - 1);
  const rows = [
    ['global norm (pre-clip)', lines.pre], ['after clipping', lines.post],
    ['explosion threshold', lines.threshold], ['clip threshold', lines.clip],
  ].map(([name, line]) => [name, valueAt(line, end, width)]).filter(([, v]) => v !== null);
  if (!rows.length) return null;
  const label = width > 1 ? `steps ${fmtStep(step)}–${fmtStep(end)} (max)` : `step ${fmtStep(step)}`;
  return {label, rows: rows.map(([name, v]) => [name, fmt(v)])};
}
