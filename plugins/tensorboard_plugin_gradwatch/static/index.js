// gradwatch dashboard: entry point loaded by TensorBoard in an iframe
// (/data/plugin_entry.html?name=gradwatch, whose <base> is /data/plugin/gradwatch/,
// so the relative URLs below reach this plugin's routes).

import {drawGlobalChart} from './chart.js';
import {decodeCells, drawHeatmap, drawLegend} from './heatmap.js';
import {el, fmtStep, printable} from './format.js';
import {renderAlerts, renderRanking} from './tables.js';
import {buildLayout, globalLegend, showTooltip, hideTooltip} from './layout.js';
import {compareLayout, compareLegend, drawCompareChart} from './compare.js';
import {buildRunList, colorOf, selectedRuns, setRuns} from './runs.js';
import {loadVanishing, markVanishing, renderVanishing, vanishingCard} from './vanishing.js';

const MAX_HEATMAP_CELLS = 150000;  // keeps /heatmap responses small for deep models
const MAX_COMPARED = 100;  // runs per /compare request (the server's limit)
const state = {runs: [], run: null, data: null, selected: null, hitHeatmap: null, hoverGlobal: null, token: 0,
  compare: {data: null, token: 0, timer: null, hover: null}};
let ui = null;
let runList = null;

async function fetchJSON(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

/** Horizontal geometry shared by both charts, so that steps line up vertically. */
function makeLayout(layers) {
  const measure = document.createElement('canvas').getContext('2d');
  measure.font = '11px Roboto, "Helvetica Neue", Arial, sans-serif';
  let longest = 60;  // a loop, not Math.max(...): tens of thousands of layers overflow the argument list
  for (const name of layers) longest = Math.max(longest, measure.measureText(printable(name.slice(-80))).width);
  const width = plotWidthNow();  // page and card paddings
  const left = Math.round(Math.min(220, longest + 18));
  const plotWidth = width - left - 24;
  const data = state.data && state.data.heatmap;
  const first = data ? data.first_step : 0;
  const span = data ? data.last_step - data.first_step + 1 : 1;
  return {
    width, left, plotWidth,
    xOfStep: (step) => left + ((step - first) / span) * plotWidth,
    stepOfX: (x) => first + ((x - left) / plotWidth) * span,
  };
}

function setStatus(mode, message) {
  ui.root.dataset.state = mode;
  ui.loading.hidden = mode !== 'loading';
  ui.empty.hidden = mode !== 'empty' && mode !== 'error';
  ui.content.hidden = mode !== 'ready';
  if (message) ui.empty.textContent = printable(message);
}

async function loadRuns() {
  setStatus('loading');
  const {runs} = await fetchJSON('./runs');
  state.runs = runs;
  ui.runSelect.replaceChildren(...runs.map((run) => {
    const option = el('option', '', run.name);  // shown escaped; the value is the real name
    option.value = run.name;
    return option;
  }));
  setRuns(runList, runs.map((run) => run.name));
  ui.compareCard.hidden = runs.length < 2;
  if (runs.length >= 2) loadCompare();
  if (!runs.length) {
    setStatus('empty', 'No run holds gradwatch data yet. Train with gradwatch.GradientMonitor and reload.');
    return;
  }
  const names = runs.map((run) => run.name);
  const linked = new URLSearchParams(window.location.hash.slice(1)).get('run');  // e.g. #run=train
  const run = linked || (names.includes(state.run) ? state.run : names.includes('train') ? 'train' : names[0]);
  ui.runSelect.value = run;
  await loadRun(run);
}

async function loadRun(run) {
  const token = ++state.token;
  state.run = run;
  state.selected = null;
  setStatus('loading');
  const q = `run=${encodeURIComponent(run)}`;
  const plotWidth = Math.max(200, ui.root.clientWidth - 300);
  try {
    const layers = (state.runs.find((r) => r.name === run) || {}).layers || 1;
    const columns = Math.max(1, Math.min(plotWidth, Math.floor(MAX_HEATMAP_CELLS / Math.max(1, layers))));
    const [heatmap, global, alerts, ranking, vanishing] = await Promise.all([
      fetchJSON(`./heatmap?${q}&columns=${columns}`),
      fetchJSON(`./global?${q}&points=${Math.max(10, plotWidth)}`),
      fetchJSON(`./alerts?${q}&limit=2000`),
      fetchJSON(`./ranking?${q}&limit=10`),
      loadVanishing(run),
    ]);
    if (token !== state.token) return;
    if (heatmap.empty || global.empty) {
      setStatus('empty', 'no gradwatch data in this run');
      return;
    }
    state.data = {heatmap, cells: decodeCells(heatmap.cells), global, alerts, ranking, vanishing};
    setStatus('ready');
    renderTables();
    drawCharts();
  } catch (error) {
    if (token !== state.token) return;
    if (error.status === 404) setStatus('empty', 'no gradwatch data in this run');
    else setStatus('error', `Could not load run: ${error.message}`);
  }
}

function describeSampling(heatmap) {
  const total = heatmap.last_step - heatmap.first_step + 1;
  const bins = heatmap.bin_width > 1 ? ` Each column is the max over ${fmtStep(heatmap.bin_width)} steps.` : '';
  const capped = heatmap.layers_capped ? ` Showing the first ${fmtStep(heatmap.layers.length)} of ` +
    `${fmtStep(heatmap.layers_total)} layers (model order): the heat map is capped.` : '';
  const narrowed = heatmap.columns_capped ? ' Fewer columns than asked, to bound the response.' : '';
  const notes = `${bins}${capped}${narrowed}`;
  if (!heatmap.sampled) return `${heatmap.layers_total ?? heatmap.layers.length} layers × ${fmtStep(total)} steps.${notes}`;
  return `${heatmap.layers_total ?? heatmap.layers.length} layers; sampled: TensorBoard kept ${fmtStep(heatmap.stored_steps)} of ` +
    `${fmtStep(total)} steps (start it with --samples_per_plugin=scalars=0 to keep all).${notes}`;
}

/** Redraws both canvases (after loading, a selection or a resize). */
function drawCharts() {
  const {heatmap, cells, global} = state.data;
  const layout = makeLayout(heatmap.layers);
  ui.sampling.textContent = describeSampling(heatmap);
  ui.sampling.classList.toggle('gw-warn', heatmap.sampled || Boolean(heatmap.layers_capped));
  globalLegend(ui.globalLegend, global);
  state.hoverGlobal = drawGlobalChart(ui.global, global, layout, state.selected);
  state.hitHeatmap = drawHeatmap(ui.heatmap, heatmap, cells, layout, state.selected);
  markVanishing(ui.heatmap, heatmap, layout, state.data.vanishing);
  // Under the plot, inside the card: its left margin comes off its width (no horizontal scrollbar).
  drawLegend(ui.heatmapLegend, heatmap, layout.width - (layout.left - 10));
  ui.heatmapLegend.style.marginLeft = `${layout.left - 10}px`;
}

function plotWidthNow() {
  return Math.max(480, ui.root.clientWidth - 66);
}

/** Fetches and draws the comparison of the selected runs (latest request wins). */
async function loadCompare() {
  const token = ++state.compare.token;
  const names = selectedRuns(runList);
  if (!names.length) {
    state.compare.data = null;
    ui.compareNote.textContent = 'Select runs above to overlay their global norms.';
    ui.compareLegend.replaceChildren();
    ui.compare.hidden = true;
    return;
  }
  const asked = names.slice(0, MAX_COMPARED);
  const query = asked.map((name) => `run=${encodeURIComponent(name)}`).join('&');
  try {
    const data = await fetchJSON(`./compare?${query}&points=${Math.max(10, plotWidthNow() - 88)}`);
    if (token !== state.compare.token) return;
    state.compare.data = data;
    state.compare.asked = names.length;
    drawCompare();
  } catch (error) {
    if (token !== state.compare.token) return;
    ui.compareNote.textContent = printable(`Could not load the comparison: ${error.message}`);
  }
}

function describeCompare(data, selectedCount) {
  const parts = [`${data.runs.length} run${data.runs.length === 1 ? '' : 's'}, max per bin of ` +
    `${data.bin_width > 1 ? fmtStep(data.bin_width) + ' steps' : 'one step'}; dots: explosions. ` +
    'Click a legend entry to show that run below.'];
  if (selectedCount > MAX_COMPARED) parts.push(`Showing the first ${MAX_COMPARED} of ${selectedCount} selected runs.`);
  if (data.points_capped) parts.push(`Fewer points per run (${data.points}) to keep the response small.`);
  if (data.sampled) parts.push('Some runs are sampled by TensorBoard (start it with --samples_per_plugin=scalars=0 to keep all).');
  if (data.missing.length) parts.push(`No global norm in: ${data.missing.join(', ')}.`);
  return parts.join(' ');
}

function drawCompare() {
  const data = state.compare.data;
  if (!data || data.empty) {
    ui.compareNote.textContent = 'No global norm recorded in the selected runs.';
    ui.compareLegend.replaceChildren();
    ui.compare.hidden = true;
    return;
  }
  const color = (name) => colorOf(runList, name);
  ui.compare.hidden = false;
  ui.compareNote.textContent = printable(describeCompare(data, state.compare.asked));
  compareLegend(ui.compareLegend, data, color, (name) => {
    ui.runSelect.value = name;
    loadRun(name);
  });
  state.compare.hover = drawCompareChart(ui.compare, data, compareLayout(plotWidthNow(), data), color);
}

function renderTables() {
  renderAlerts(ui.alerts, state.data.alerts, state.selected, select);
  renderRanking(ui.ranking, state.data.ranking);
  renderVanishing(ui.vanishing, state.data.vanishing);
}

/** Marks `step` (or clears the mark when clicked again) in both charts and the table. */
function select(step) {
  state.selected = state.selected === step ? null : step;
  for (const row of ui.alerts.querySelectorAll('tbody tr')) {
    row.classList.toggle('gw-selected', Number(row.dataset.step) === state.selected);
  }
  drawCharts();
}

function wireEvents() {
  ui.runSelect.addEventListener('change', () => loadRun(ui.runSelect.value));
  ui.refresh.addEventListener('click', () => loadRuns());
  ui.heatmap.addEventListener('mousemove', (event) => {
    const hit = state.hitHeatmap && state.hitHeatmap(event.offsetX, event.offsetY);
    if (!hit) return hideTooltip(ui.tooltip);
    showTooltip(ui.tooltip, event, hit.layer, [[hit.steps, hit.value]]);
  });
  ui.global.addEventListener('mousemove', (event) => {
    const hit = state.hoverGlobal && state.hoverGlobal(event.offsetX);
    if (!hit) return hideTooltip(ui.tooltip);
    showTooltip(ui.tooltip, event, hit.label, hit.rows);
  });
  ui.compare.addEventListener('mousemove', (event) => {
    const hit = state.compare.hover && state.compare.hover(event.offsetX);
    if (!hit) return hideTooltip(ui.tooltip);
    showTooltip(ui.tooltip, event, hit.label, hit.rows);
  });
  for (const canvas of [ui.heatmap, ui.global, ui.compare]) canvas.addEventListener('mouseleave', () => hideTooltip(ui.tooltip));
  let pending = null;
  let lastWidth = ui.root.clientWidth;
  new ResizeObserver(() => {
    if (ui.root.clientWidth === lastWidth) return;
    lastWidth = ui.root.clientWidth;
    clearTimeout(pending);
    pending = setTimeout(() => {
      if (state.data && !ui.content.hidden) drawCharts();
      if (state.compare.data && !ui.compareCard.hidden) drawCompare();
    }, 100);
  }).observe(ui.root);
}

/** Called by TensorBoard once the module is loaded. */
export async function render() {
  runList = buildRunList(() => {
    clearTimeout(state.compare.timer);
    state.compare.timer = setTimeout(loadCompare, 150);
  });
  ui = buildLayout(document.body, runList);
  ui.vanishing = vanishingCard(ui.content, ui.heatmap);
  wireEvents();
  try {
    await loadRuns();
  } catch (error) {
    setStatus('error', `Could not reach the gradwatch plugin: ${error.message}`);
  }
}
