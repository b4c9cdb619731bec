// Alerts table (one row per explosion) and the per-layer ranking.

import {el, fmt, fmtStep, printable} from './format.js';

const ACTION_LABELS = {
  none: 'alert only',
  clipping_on: 'clipping switched on',
  clipped: 'clipped',
  skipped: 'update skipped',
};

function table(id, headers) {
  const node = el('table', 'gw-table');
  node.id = id;
  const head = node.createTHead().insertRow();
  for (const [text, className] of headers) head.appendChild(el('th', className || '', text));
  node.appendChild(el('tbody'));
  return node;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = printable(text);
  if (className) td.className = className;
  return td;
}

function topLayersCell(row, alert) {
  const td = row.insertCell();
  td.className = 'gw-top-layers';
  for (const [layer, norm] of alert.top_layers) {
    const item = el('span', 'gw-layer-chip');
    item.appendChild(el('span', 'gw-layer-name', layer));
    item.appendChild(el('span', 'gw-layer-norm', fmt(norm)));
    td.appendChild(item);
  }
  const more = alert.layer_count - alert.top_layers.length;
  if (more > 0) {
    const rest = el('span', 'gw-more', `+${more}`);
    rest.title = `${more} more layers in this record`;
    td.appendChild(rest);
  }
}

const CULPRITS_SHOWN = 3;
const PNG_BASE64 = /^iVBORw0KGgo[A-Za-z0-9+/]*={0,2}$/;  // a PNG, base64: nothing else becomes an image

function previewNode(preview) {
  const box = el('span', 'gw-preview');
  if (!preview) return box;
  for (const input of preview.inputs || []) {
    if (input.kind === 'image' && typeof input.png === 'string' && PNG_BASE64.test(input.png)) {
      const img = document.createElement('img');
      img.className = 'gw-thumb';
      img.alt = `${printable(input.name)} (thumbnail)`;
      img.src = `data:image/png;base64,${input.png}`;
      box.appendChild(img);
    } else if (input.kind === 'values' && Array.isArray(input.values)) {
      box.appendChild(el('span', 'gw-values', `${input.name}: [${input.values.map(fmt).join(', ')}` +
        `${(input.shape || []).reduce((a, b) => a * b, 1) > input.values.length ? ', …' : ''}]`));
    }
  }
  if (Array.isArray(preview.target)) {
    box.appendChild(el('span', 'gw-values', `target: [${preview.target.map(fmt).join(', ')}]`));
  }
  return box;
}

function culpritsCell(row, alert) {
  const td = row.insertCell();
  td.className = 'gw-culprits';
  if (!Array.isArray(alert.culprits)) {
    td.appendChild(el('span', 'gw-dim', '—'));
    return;
  }
  if (alert.culprits_summary) td.appendChild(el('div', 'gw-culprit-summary', alert.culprits_summary));
  for (const culprit of alert.culprits.slice(0, CULPRITS_SHOWN)) {
    const item = el('div', 'gw-culprit');
    const share = typeof culprit.share === 'number' ? `${(100 * culprit.share).toFixed(0)}%` : String(culprit.share);
    item.appendChild(el('span', 'gw-culprit-index', `#${culprit.index}`));
    item.appendChild(el('span', 'gw-culprit-numbers',
      `loss ${fmt(culprit.loss)} · grad ${fmt(culprit.grad_norm)} · ${share}`));
    item.appendChild(previewNode(culprit.preview));
    td.appendChild(item);
  }
}

/** Fills `container` with the alerts table; clicking a row calls onSelect(step). */
export function renderAlerts(container, data, selectedStep, onSelect) {
  container.replaceChildren();
  const count = data.total === 1 ? '1 explosion' : `${data.total} explosions`;
  const shown = data.alerts.length < data.total ? ` (first ${data.alerts.length} shown)` : '';
  container.appendChild(el('p', 'gw-caption', `${count}${shown}. Click a row to mark its step in both charts.`));
  if (!data.alerts.length) {
    container.appendChild(el('p', 'gw-none', 'No explosions detected in this run.'));
    return;
  }
  const node = table('gw-alerts', [
    ['Step', 'gw-num'], ['Epoch', 'gw-num'], ['Global norm', 'gw-num'], ['Threshold', 'gw-num'],
    ['Top layers (norm)'], ['Action'], ['Culprits (sample of the batch: loss · gradient norm · share)'],
  ]);
  for (const alert of data.alerts) {
    const row = node.tBodies[0].insertRow();
    row.dataset.step = String(alert.step);
    if (alert.step === selectedStep) row.classList.add('gw-selected');
    cell(row, fmtStep(alert.step), 'gw-num');
    cell(row, alert.epoch == null ? '—' : String(alert.epoch + 1), 'gw-num');  // from 1, like the log lines
    cell(row, fmt(alert.global_norm), 'gw-num gw-strong');
    cell(row, alert.threshold == null ? '—' : fmt(alert.threshold), 'gw-num');
    topLayersCell(row, alert);
    const action = row.insertCell();
    action.appendChild(el('span', `gw-badge gw-action-${alert.action || 'unknown'}`,
      ACTION_LABELS[alert.action] || 'unknown'));
    culpritsCell(row, alert);
    row.addEventListener('click', () => onSelect(alert.step));
  }
  container.appendChild(el('div', 'gw-scroll')).appendChild(node);
  renderClipping(container, data.clipping, onSelect);
}

function restartText(event) {
  if (!event.restarted) return '';
  if (event.restart_step != null && event.restart_step > 1) {
    return `; the run rolled back to the weights before step ${fmtStep(event.restart_step)}`;
  }
  return '; the run restarted from the weights before its first step';
}

function renderClipping(container, events, onSelect) {
  if (!events || !events.length) return;
  const list = el('ul', 'gw-clipping');
  list.id = 'gw-clipping-events';
  for (const event of events) {
    const item = el('li', '', `Clipping switched on at step ${fmtStep(event.step)}` +
      ` (${event.mode || 'global norm'}, threshold ${fmt(event.threshold)}` +
      `${event.cause_step != null ? `, caused by step ${fmtStep(event.cause_step)}` : ''})` +
      `${restartText(event)}.`);
    item.addEventListener('click', () => onSelect(event.step));
    list.appendChild(item);
  }
  container.appendChild(list);
}

/** Fills `container` with the per-layer ranking (alerts led, non-finite count, peak). */
export function renderRanking(container, data) {
  container.replaceChildren();
  container.appendChild(el('p', 'gw-caption',
    'Layers with the largest norm at an explosion come first, then layers with NaN/Inf, then by peak norm.'));
  const node = table('gw-ranking', [
    ['#', 'gw-num'], ['Layer'], ['Alerts led', 'gw-num'], ['NaN/Inf', 'gw-num'],
    ['Peak', 'gw-num'], ['Median', 'gw-num'], ['Peak / median', 'gw-num'],
  ]);
  data.layers.forEach((layer, i) => {
    const row = node.tBodies[0].insertRow();
    row.dataset.layer = layer.layer;
    cell(row, String(i + 1), 'gw-num gw-dim');
    cell(row, layer.layer, 'gw-layer-name');
    cell(row, String(layer.times_top), layer.times_top ? 'gw-num gw-strong' : 'gw-num gw-dim');
    cell(row, String(layer.nonfinite), layer.nonfinite ? 'gw-num gw-bad' : 'gw-num gw-dim');
    cell(row, layer.peak == null ? '—' : fmt(layer.peak), 'gw-num');
    cell(row, layer.median == null ? '—' : fmt(layer.median), 'gw-num');
    cell(row, layer.peak_over_median == null ? '—' : `${fmt(layer.peak_over_median)}×`, 'gw-num');
  });
  container.appendChild(node);
  if (data.total > data.layers.length) {
    container.appendChild(el('p', 'gw-caption', `Top ${data.layers.length} of ${data.total} layers.`));
  }
}
