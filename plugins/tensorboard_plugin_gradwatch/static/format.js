// Shared helpers: numbers from the server, formatting, colors, canvas setup.

/** Colors used across the dashboard (kept in sync with the legend swatches in style.css). */
export const COLORS = {
  preClip: '#1a73e8',
  postClip: '#188038',
  threshold: '#e37400',
  clipThreshold: '#8e24aa',
  clipSpan: 'rgba(142, 36, 170, 0.10)',
  explosion: '#d93025',
  overflow: '#5f6368',
  nan: '#ff00c8',
  inf: '#d93025',
  missing: '#eceff1',
  highlight: '#202124',
  grid: '#e8eaed',
  axis: '#5f6368',
  text: '#3c4043',
};

/** A number from JSON: handles "nan"/"NaN", "inf"/"Infinity" and null (-> NaN). */
export function num(value) {
  if (typeof value === 'number') return value;
  if (typeof value !== 'string') return NaN;
  const text = value.toLowerCase();
  if (text === 'inf' || text === 'infinity' || text === '+inf') return Infinity;
  if (text === '-inf' || text === '-infinity') return -Infinity;
  return Number(value);
}

/** Short human form of a norm: 3 significant digits, exponent for extremes. */
export function fmt(value) {
  const v = num(value);
  if (Number.isNaN(v)) return 'NaN';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(3)));
}

/** Step number with thin separators: 12345 -> "12,345". */
export function fmtStep(step) {
  return Number(step).toLocaleString('en-US');
}

// Viridis anchors (perceptually uniform, colour-blind safe), interpolated to 256 entries.
const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];

/** 256 [r, g, b] entries of the viridis color map. */
export const COLOR_TABLE = Array.from({length: 256}, (_, i) => {
  const x = (i / 255) * (VIRIDIS.length - 1);
  const k = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const t = x - k;
  return VIRIDIS[k].map((c, j) => Math.round(c + (VIRIDIS[k + 1][j] - c) * t));
});

/** CSS color of position t in [0, 1] of the color map. */
export function colorAt(t) {
  const [r, g, b] = COLOR_TABLE[Math.max(0, Math.min(255, Math.round(t * 255)))];
  return `rgb(${r},${g},${b})`;
}

/** Integer decades covering [lo, hi] (log10 units), at most ~8 ticks. */
export function decadeTicks(lo, hi) {
  const first = Math.floor(lo);
  const last = Math.ceil(hi);
  const stride = Math.max(1, Math.ceil((last - first) / 8));
  const ticks = [];
  for (let d = first; d <= last; d += stride) ticks.push(d);
  return ticks;
}

/** Label of the decade tick 10^d. */
export function decadeLabel(d) {
  return d >= -2 && d <= 3 ? String(10 ** d >= 1 ? 10 ** d : Number((10 ** d).toFixed(-d))) : `1e${d}`;
}

/** About `count` round step ticks in [first, last]: whole steps only (a short run gets 1, 2, 3, ...). */
export function stepTicks(first, last, count) {
  const span = Math.max(1, last - first);
  const raw = Math.max(1, span / Math.max(1, count));
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const stride = Math.max(1, Math.round([1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw));
  const ticks = [];
  for (let s = Math.ceil(first / stride) * stride; s <= last; s += stride) ticks.push(s);
  return ticks;
}

/** Sizes `canvas` to `width` x `height` CSS px at device resolution; returns its 2D context. */
export function setupCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.font = '11px Roboto, "Helvetica Neue", Arial, sans-serif';
  return ctx;
}

/** `text` with control, format (bidi overrides), separator and unassigned characters shown as
 * `\\u{...}` escapes: names from event files and folders can neither hide nor reorder text. */
export function printable(text) {
  return String(text).replace(/[\p{C}\u2028\u2029]/gu, (c) => `\\u{${c.codePointAt(0).toString(16)}}`);
}

/** Creates an element with a class name and optional text (always as text, escaped by printable). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = printable(text);
  return node;
}

const LABEL_CHARS = 300;  // no label this wide fits a row label: measure only this tail

/** `text`, or '…' + its longest tail narrower than `maxWidth` (binary search: ~9 measureText calls). */
export function shortenLabel(ctx, text, maxWidth) {
  if (text.length <= LABEL_CHARS && ctx.measureText(text).width <= maxWidth) return text;
  const tail = text.slice(-LABEL_CHARS);
  let lo = 0;
  let hi = tail.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText('…' + tail.slice(-mid)).width <= maxWidth) lo = mid; else hi = mid - 1;
  }
  return '…' + tail.slice(tail.length - lo);
}
