// Page skeleton, the global chart's legend and the hover tooltip.

import {COLORS, el} from './format.js';

function card(title, id) {
  const section = el('section', 'gw-card');
  if (id) section.id = id;
  section.appendChild(el('h2', '', title));
  return section;
}

function canvas(id) {
  const node = el('canvas', 'gw-canvas');
  node.id = id;
  return node;
}

/** The "compare runs" card: run selector, note, legend and chart (hidden for fewer than 2 runs). */
function compareCard(runList) {
  const section = card('Compare runs: global gradient norm', 'gw-compare-card');
  section.hidden = true;
  const note = el('p', 'gw-caption');
  note.id = 'gw-compare-note';
  const legend = el('div', 'gw-legend gw-compare-legend');
  legend.id = 'gw-compare-legend';
  const chart = canvas('gw-compare');
  section.append(runList.box, note, legend, chart);
  return {compareCard: section, compareNote: note, compareLegend: legend, compare: chart};
}

/** Builds the dashboard DOM in `parent`; returns the nodes the code updates. */
export function buildLayout(parent, runList) {
  const stylesheet = el('link');
  stylesheet.rel = 'stylesheet';
  stylesheet.href = './style.css';
  document.head.appendChild(stylesheet);

  const root = el('div', 'gw-root');
  root.id = 'gw-root';
  const header = el('header', 'gw-header');
  const title = el('div', 'gw-title');
  title.append(el('h1', '', 'Gradient norms'), el('span', 'gw-subtitle', 'gradwatch'));
  const runLabel = el('label', 'gw-run-label', 'Run ');
  const runSelect = el('select');
  runSelect.id = 'gw-run';
  runLabel.appendChild(runSelect);
  const refresh = el('button', 'gw-button', 'Reload');
  refresh.id = 'gw-refresh';
  header.append(title, runLabel, refresh);
  const compareNodes = compareCard(runList);

  const loading = el('div', 'gw-state gw-loading-box');
  loading.id = 'gw-loading';
  loading.append(el('span', 'gw-spinner'), el('span', '', 'Loading gradwatch data…'));
  const empty = el('div', 'gw-state gw-empty');
  empty.id = 'gw-empty';
  empty.hidden = true;

  const content = el('main', 'gw-content');
  content.id = 'gw-content';
  content.hidden = true;
  const globalCard = card('Global gradient norm');
  const globalLegend = el('div', 'gw-legend');
  globalLegend.id = 'gw-global-legend';
  const global = canvas('gw-global');
  globalCard.append(globalLegend, global);

  const heatCard = card('Per-layer gradient norm');
  const sampling = el('p', 'gw-caption');
  sampling.id = 'gw-sampling';
  const heatmap = canvas('gw-heatmap');
  const heatmapLegend = canvas('gw-heatmap-legend');
  const legendTitle = el('p', 'gw-caption gw-legend-title', 'Colour: max L2 norm of the layer\'s gradient in the bin (log scale). Rows: layers in model order.');
  heatCard.append(sampling, heatmap, legendTitle, heatmapLegend);

  const row = el('div', 'gw-row');
  const alertsCard = card('Alerts');
  alertsCard.classList.add('gw-grow');
  const alerts = el('div');
  alerts.id = 'gw-alerts-box';
  alertsCard.appendChild(alerts);
  const rankingCard = card('Layer ranking');
  const ranking = el('div');
  ranking.id = 'gw-ranking-box';
  rankingCard.appendChild(ranking);
  row.append(alertsCard, rankingCard);
  content.append(globalCard, heatCard, row);

  const tooltip = el('div', 'gw-tooltip');
  tooltip.id = 'gw-tooltip';
  tooltip.hidden = true;
  root.append(header, compareNodes.compareCard, loading, empty, content, tooltip);
  parent.appendChild(root);
  return {...compareNodes, root, runSelect, refresh, loading, empty, content, global, globalLegend,
    heatmap, heatmapLegend, sampling, alerts, ranking, tooltip};
}

function legendItem(kind, color, label) {
  const item = el('span', 'gw-legend-item');
  const swatch = el('span', `gw-swatch gw-swatch-${kind}`);
  swatch.style.setProperty('--gw-color', color);
  item.append(swatch, el('span', '', label));
  return item;
}

/** Legend entries for the series present in the /global response. */
export function globalLegend(container, data) {
  const items = [legendItem('line', COLORS.preClip, data.post_clip ? 'global norm, before clipping' : 'global norm')];
  if (data.post_clip) items.push(legendItem('wide', COLORS.postClip, 'after clipping (wide, under)'));
  if (data.threshold) items.push(legendItem('dashed', COLORS.threshold, 'explosion threshold'));
  if (data.clip_threshold) items.push(legendItem('dotted', COLORS.clipThreshold, 'clip threshold'));
  if (data.clipping_spans.length) items.push(legendItem('area', COLORS.clipSpan, 'clipping on'));
  items.push(legendItem('dot', COLORS.explosion, `explosion (${data.explosion_steps.length})`));
  if (data.overflow_steps.length) items.push(legendItem('tick', COLORS.overflow, `loss-scale overflow (${data.overflow_steps.length})`));
  items.push(legendItem('triangle', COLORS.nan, 'NaN / Inf step (top edge)'));
  container.replaceChildren(...items);
}

/** Shows the tooltip near the mouse: a title and [name, value] rows. */
export function showTooltip(tooltip, event, title, rows) {
  tooltip.replaceChildren(el('div', 'gw-tooltip-title', title));
  for (const [name, value] of rows) {
    const line = el('div', 'gw-tooltip-row');
    line.append(el('span', '', name), el('b', '', value));
    tooltip.appendChild(line);
  }
  tooltip.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
  tooltip.style.left = `${x + window.scrollX}px`;
  tooltip.style.top = `${event.clientY + window.scrollY + 14}px`;
}

export function hideTooltip(tooltip) {
  tooltip.hidden = true;
}
