// Vanishing / dead gradients: row markers on the heat map and a list (route /vanishing).

import {el, fmt, fmtStep} from './format.js';
import {TOP, rowHeight} from './heatmap.js';

export const MARK_COLORS = {vanishing: '#f29900', dead: '#202124'};
// Outlines inside the plot: a dead row is at the dark end of the colour scale, so white.
const OUTLINE_COLORS = {vanishing: '#f29900', dead: '#ffffff'};
const LABELS = {vanishing: 'vanishing gradient', dead: 'dead gradient'};

/** {records, marks} of the run; empty lists if the route fails (older plugin data, errors). */
export async function loadVanishing(run) {
  try {
    const response = await fetch(`./vanishing?run=${encodeURIComponent(run)}`);
    if (!response.ok) return {records: [], marks: []};
    return await response.json();
  } catch (error) {
    return {records: [], marks: []};
  }
}

/** Marks flagged layers on the drawn heat map: a bar left of the row and an outline from the onset on. */
export function markVanishing(canvas, heatmap, layout, data) {
  if (!data || !data.marks.length) return;
  const ctx = canvas.getContext('2d');
  const rowH = rowHeight(heatmap.layers.length);
  const right = layout.left + layout.plotWidth;
  for (const mark of data.marks) {
    const row = heatmap.layers.indexOf(mark.layer);
    if (row < 0) continue;
    const y = TOP + row * rowH;
    ctx.fillStyle = MARK_COLORS[mark.kind];
    ctx.fillRect(layout.left - 5, y, 3, Math.max(1, rowH));
    const x = Math.max(layout.left, Math.min(right, layout.xOfStep(mark.step)));
    ctx.strokeStyle = OUTLINE_COLORS[mark.kind];
    ctx.lineWidth = 1;
    ctx.setLineDash(mark.kind === 'dead' ? [2, 2] : []);
    ctx.strokeRect(x + 0.5, y + 0.5, Math.max(1, right - x - 1), Math.max(1, rowH - 1));
    ctx.setLineDash([]);
  }
  canvas.dataset.vanishingMarks = String(data.marks.length);
}

/** Fills `container` with one line per onset (kind, step, layers with their norms). */
export function renderVanishing(container, data) {
  container.replaceChildren();
  const records = (data && data.records) || [];
  if (!records.length) {
    container.appendChild(el('p', 'gw-none', 'No vanishing or dead gradients detected in this run.'));
    return;
  }
  container.appendChild(el('p', 'gw-caption',
    'Layers whose gradient vanished (orders of magnitude below the layers nearer the loss) or died ' +
    '(zero for a sustained run of steps). Marked on the heat map from that step on: a bar left of ' +
    'the row, an amber outline (vanishing) or a dashed white one (dead).'));
  const list = el('ul', 'gw-vanishing-list');
  list.id = 'gw-vanishing-list';
  for (const record of records) {
    const item = el('li', '');
    item.dataset.kind = record.kind;
    const swatch = el('span', 'gw-vanishing-swatch');
    swatch.style.background = MARK_COLORS[record.kind];
    const layers = record.layers.map(([layer, norm]) => `${layer} (${fmt(norm)})`).join(', ');
    item.append(swatch, el('b', '', `${LABELS[record.kind]}`), el('span', '', ` at step ${fmtStep(record.step)}: ${layers}`));
    list.appendChild(item);
  }
  container.appendChild(list);
}

/** The card holding the list, placed after the heat map's card. */
export function vanishingCard(content, heatmapCanvas) {
  const card = el('section', 'gw-card');
  card.id = 'gw-vanishing';
  card.appendChild(el('h2', '', 'Vanishing and dead gradients'));
  const box = el('div');
  box.id = 'gw-vanishing-box';
  card.appendChild(box);
  const heatCard = heatmapCanvas.closest('.gw-card');
  content.insertBefore(card, heatCard ? heatCard.nextSibling : null);
  return box;
}
