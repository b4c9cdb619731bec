// Heat map: layers (model order, top to bottom) x step bins, colored by log10 of the max norm.

import {COLORS, COLOR_TABLE, colorAt, decadeLabel, decadeTicks, fmt, fmtStep, printable, setupCanvas, shortenLabel,
  stepTicks} from './format.js';

const MISSING = -1;  // server marker: no stored sample in this bin
export const TOP = 18;
const AXIS = 34;

/** Float32Array of the base64 little-endian cells sent by /heatmap. */
export function decodeCells(base64) {
  const binary = atob(base64);
  const view = new DataView(new ArrayBuffer(binary.length));
  for (let i = 0; i < binary.length; i++) view.setUint8(i, binary.charCodeAt(i));
  const cells = new Float32Array(binary.length / 4);
  for (let i = 0; i < cells.length; i++) cells[i] = view.getFloat32(i * 4, true);
  return cells;
}

/** Row height in CSS px for `rows` layers: tall rows for small models, thin ones for big. */
export function rowHeight(rows) {
  return Math.max(2, Math.min(22, Math.floor(520 / Math.max(1, rows))));
}

/** [r, g, b] of one cell value given the log10 range [lo, hi]. */
function cellRGB(value, lo, hi) {
  if (Number.isNaN(value)) return [255, 0, 200];
  if (value === Infinity) return [217, 48, 37];
  if (value === MISSING) return [236, 239, 241];
  const t = value > 0 && hi > lo ? (Math.log10(value) - lo) / (hi - lo) : 0;
  return COLOR_TABLE[Math.max(0, Math.min(255, Math.round(t * 255)))];
}

/** An offscreen canvas holding one pixel per cell. */
function cellImage(data, cells, lo, hi) {
  const rows = data.layers.length;
  const image = new ImageData(data.columns, rows);
  for (let i = 0; i < cells.length; i++) {
    const [r, g, b] = cellRGB(cells[i], lo, hi);
    image.data.set([r, g, b, 255], i * 4);
  }
  const offscreen = document.createElement('canvas');
  offscreen.width = data.columns;
  offscreen.height = rows;
  offscreen.getContext('2d').putImageData(image, 0, 0);
  return offscreen;
}

function drawRowLabels(ctx, layers, layout, rowH) {
  const stride = Math.ceil(12 / rowH);
  ctx.fillStyle = COLORS.text;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  layers.forEach((layer, row) => {
    if (row % stride) return;
    const label = shortenLabel(ctx, printable(layer), layout.left - 12);
    ctx.fillText(label, layout.left - 8, TOP + (row + 0.5) * rowH);
  });
}

function drawStepAxis(ctx, layout, first, last, y) {
  ctx.fillStyle = COLORS.text;
  ctx.strokeStyle = COLORS.axis;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  const ticks = stepTicks(first, last, Math.floor(layout.plotWidth / 90));
  ctx.canvas.dataset.ticks = ticks.join(' ');  // read by the browser test, with data-plot
  ctx.canvas.dataset.plot = `${layout.left} ${layout.plotWidth} ${TOP}`;
  for (const step of ticks) {
    const x = layout.xOfStep(step + 0.5);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x, y + 4);
    ctx.stroke();
    ctx.fillText(fmtStep(step), x, y + 6);
  }
  ctx.fillText('step (optimizer iteration)', layout.left + layout.plotWidth / 2, y + 20);
}

/** Draws the heat map; returns a hit-test function (x, y) -> tooltip info or null. */
export function drawHeatmap(canvas, data, cells, layout, highlightStep) {
  const rows = data.layers.length;
  const rowH = rowHeight(rows);
  const height = TOP + rows * rowH + AXIS + 6;
  const ctx = setupCanvas(canvas, layout.width, height);
  const [lo, hi] = data.log10_range || [0, 1];
  ctx.imageSmoothingEnabled = false;
  // Column i holds steps first + i * bin_width ... : drawn from the x of its first step to that of the
  // next column's, so cells sit on whole steps under the ticks (the last bin may run past the last step).
  const binsWidth = layout.xOfStep(data.first_step + data.columns * data.bin_width) - layout.left;
  ctx.save();
  ctx.beginPath();
  ctx.rect(layout.left, TOP, layout.plotWidth, rows * rowH);
  ctx.clip();
  ctx.drawImage(cellImage(data, cells, lo, hi), layout.left, TOP, binsWidth, rows * rowH);
  ctx.restore();
  ctx.strokeStyle = COLORS.axis;
  ctx.strokeRect(layout.left - 0.5, TOP - 0.5, layout.plotWidth + 1, rows * rowH + 1);
  drawRowLabels(ctx, data.layers, layout, rowH);
  drawStepAxis(ctx, layout, data.first_step, data.last_step, TOP + rows * rowH + 2);
  if (highlightStep != null) drawHighlight(ctx, layout, highlightStep, TOP, rows * rowH);
  canvas.dataset.drawn = 'true';
  return (x, y) => hitTest(data, cells, layout, rowH, x, y);
}

function drawHighlight(ctx, layout, step, top, height) {
  const x = layout.xOfStep(step + 0.5);
  if (x < layout.left || x > layout.left + layout.plotWidth) return;
  ctx.strokeStyle = 'rgba(32, 33, 36, 0.55)';  // see-through: the marked cells stay visible
  ctx.lineWidth = 1;
  ctx.setLineDash([3, 3]);
  ctx.beginPath();
  ctx.moveTo(x, top - 4);
  ctx.lineTo(x, top + height + 2);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = COLORS.highlight;
  ctx.textAlign = 'center';
  ctx.textBaseline = 'bottom';
  ctx.fillText(`step ${fmtStep(step)}`, x, top - 4);
}

function hitTest(data, cells, layout, rowH, x, y) {
  if (x < layout.left || x > layout.left + layout.plotWidth) return null;
  const column = Math.floor((layout.stepOfX(x) - data.first_step) / data.bin_width);
  const row = Math.floor((y - TOP) / rowH);
  if (column < 0 || column >= data.columns || row < 0 || row >= data.layers.length) return null;
  const start = data.first_step + column * data.bin_width;
  const end = Math.min(data.last_step, start + data.bin_width - 1);
  const value = cells[row * data.columns + column];
  const steps = start === end ? `step ${fmtStep(start)}` : `steps ${fmtStep(start)}–${fmtStep(end)} (max)`;
  return {layer: data.layers[row], steps, value: value === MISSING ? 'no sample' : fmt(value)};
}

/** Draws the color bar (log10 of the norm) and the NaN / Inf / no-sample swatches. */
export function drawLegend(canvas, data, width) {
  const ctx = setupCanvas(canvas, width, 42);
  const [lo, hi] = data.log10_range || [0, 1];
  const barWidth = Math.min(320, width - 300);
  for (let i = 0; i < barWidth; i++) {
    ctx.fillStyle = colorAt(i / (barWidth - 1));
    ctx.fillRect(10 + i, 4, 1, 12);
  }
  ctx.fillStyle = COLORS.text;
  ctx.textBaseline = 'top';
  ctx.textAlign = 'center';
  for (const d of decadeTicks(lo, hi)) {
    if (d < lo - 1e-9 || d > hi + 1e-9) continue;
    const x = 10 + ((d - lo) / Math.max(1e-9, hi - lo)) * (barWidth - 1);
    ctx.fillRect(x, 16, 1, 4);
    ctx.fillText(decadeLabel(d), x, 22);
  }
  swatches(ctx, 24 + barWidth, [[COLORS.nan, 'NaN'], [COLORS.inf, '+Inf'], [COLORS.missing, 'no sample']]);
}

function swatches(ctx, x, items) {
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  for (const [color, label] of items) {
    ctx.fillStyle = color;
    ctx.fillRect(x, 4, 12, 12);
    ctx.strokeStyle = '#bdc1c6';
    ctx.strokeRect(x + 0.5, 4.5, 11, 11);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(label, x + 16, 10);
    x += 24 + ctx.measureText(label).width;
  }
}
